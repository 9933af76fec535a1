//! How a [`SecurityContext`] maps onto a PostgreSQL session: the contract policies are
//! written against.
//!
//! | what | where a policy reads it |
//! |---|---|
//! | the session role | `current_user` (set with `set_config('role', …)`) |
//! | the end user (application-store name, or the token's `sub`) | `current_setting('ctxpool.end_user', true)` |
//! | the data roles, as a JSON array | `current_setting('ctxpool.data_roles', true)` |
//! | the attributes, as JSON | `current_setting('ctxpool.attributes', true)` |
//! | each attribute, flattened | `current_setting('hr.hcm_context.emp_id', true)` |
//!
//! With no context every one of them reads NULL or `''` (a setting defined earlier in the
//! session reads `''` after a reset): **policies must deny on both**, e.g.
//! `nullif(current_setting('ctxpool.end_user', true), '') IS NOT NULL`. The helpers in
//! [`HELPERS_SQL`](super::HELPERS_SQL) do that for you.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, OnceLock};

use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use tokio_postgres::types::{ToSql, Type};

use super::wire::Statements;
use crate::context::SecurityContext;

/// When the context is applied, and for how long.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContextScope {
    /// Every transaction the handle runs carries the context inside itself: the context
    /// statement goes under the same Sync as the statement, and nothing survives the
    /// transaction. Safe behind PgBouncer in transaction mode.
    #[default]
    Transaction,
    /// Applied session-wide with the checkout's first statement (inside the reset's
    /// transaction block, so that it counts only once the server committed it) and kept for
    /// the checkout; the next checkout's first statement resets it. Fewer statements per
    /// query, but session state: refused behind a pooler, detected at connect.
    Session,
}

/// Which database role the session runs as.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoleMapping {
    /// Every end user runs as this role.
    Fixed(String),
    /// The first of the context's data roles.
    #[default]
    FirstDataRole,
    /// A claim of the end user's token: a string, or an array whose first string is used.
    /// The token is decoded, not verified: enable token validation in the provider.
    TokenClaim(String),
}

/// How contexts map onto sessions: scope, role mapping and the role allow-list.
///
/// The default (transaction scope, first data role, an empty allow-list) refuses every
/// context until roles are allowed: fail closed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContextConfig {
    /// When the context is applied.
    pub scope: ContextScope,
    /// Which role the session runs as.
    pub role: RoleMapping,
    /// The roles a session may run as and the data roles a context may carry. Anything
    /// else is refused before any SQL is sent.
    pub allowed_roles: BTreeSet<String>,
    /// Send the pool's statements (the context statement, the reset) prepared once per
    /// connection (default), or unnamed, parsed and planned every time, which costs
    /// server time on every statement. Behind a pooler (PgBouncer, whose server
    /// connections do not share prepared statements) the pool detects it at connect and
    /// sends them unnamed whatever this says.
    #[serde(default = "yes")]
    pub prepared_statements: bool,
}

fn yes() -> bool {
    true
}

impl Default for ContextConfig {
    fn default() -> Self {
        Self {
            scope: ContextScope::default(),
            role: RoleMapping::default(),
            allowed_roles: BTreeSet::new(),
            prepared_statements: true,
        }
    }
}

impl ContextConfig {
    /// A configuration allowing `roles`, mapping with `role`, in transaction scope.
    pub fn new<I, S>(role: RoleMapping, allowed_roles: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            role,
            allowed_roles: allowed_roles.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// The same configuration in `scope`.
    pub fn scope(mut self, scope: ContextScope) -> Self {
        self.scope = scope;
        self
    }

    /// The same configuration with [`prepared_statements`](Self::prepared_statements) set.
    pub fn prepared_statements(mut self, prepared: bool) -> Self {
        self.prepared_statements = prepared;
        self
    }
}

/// Why a context cannot be mapped onto a session. Raised when the context is attached
/// (by `acquire_as` or `set_end_user_security_context`), before any SQL is sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MappingError {
    /// The session role is not in the allow-list.
    #[error("the role {0:?} is not in the pool's allow-list")]
    RoleNotAllowed(String),
    /// A data role is not in the allow-list.
    #[error("the data role {0:?} is not in the pool's allow-list")]
    DataRoleNotAllowed(String),
    /// The role mapping is `FirstDataRole` and the context has no data role.
    #[error("the context has no data role to run as")]
    NoDataRole,
    /// The identity is a token whose payload is not a JSON object (not a JWT).
    #[error("the end-user token is not a decodable JWT")]
    TokenNotDecodable,
    /// The token lacks a claim the mapping needs.
    #[error("the end-user token has no usable {0:?} claim")]
    ClaimMissing(String),
    /// Session scope was asked for on a connection that goes through a pooler or proxy
    /// (PgBouncer, pgpool-II): session state there reaches other clients.
    #[error(
        "session scope is refused behind a connection pooler or proxy (detected at connect: \
         the backend process id differs from pg_backend_pid()); use transaction scope"
    )]
    SessionScopeBehindProxy,
    /// The connection goes through pgpool-II whose settings (read at connect from
    /// `SHOW pool_status`) may run the context statement apart from the statement after
    /// it: on another server (load balancing), or in another transaction (a catalog
    /// query of pgpool-II's own, with its own Sync, in between). The statement would run
    /// without the context.
    #[error(
        "contexts are refused behind this pgpool-II: {why}. Required: a function list set \
         (write_function_list naming set_config and pg_catalog.set_config), \
         check_temp_table = none or trace, check_unlogged_table = off, and load_balance_mode \
         = off or disable_load_balance_on_write = 'always'"
    )]
    ContextRoutedApart {
        /// Which setting is in the way.
        why: &'static str,
    },
}

/// A context mapped onto a session: everything a statement binds, computed once.
pub(crate) struct Mapped {
    pub(crate) context: SecurityContext,
    /// The values the context statement binds, back to back: the role, the end user, the
    /// data roles and the attributes as JSON, then each flattened attribute's name and
    /// value. One buffer, so that mapping a context costs a few allocations, not two per
    /// attribute: it runs at every `acquire_as`.
    text: String,
    /// Where each value of [`text`](Self::text) ends, in that order.
    ends: Vec<usize>,
    /// The Bind and Execute of the prepared flat context statement for these values,
    /// session-wide (`[0]`) and transaction-local (`[1]`), encoded at first use: every
    /// statement of a checkout in transaction scope sends the same frames.
    flat_binds: [OnceLock<Statements>; 2],
}

/// The index in [`Mapped`]'s values of the role, the end user, the data roles, the
/// attributes as JSON, and the first flattened attribute's name.
const ROLE: usize = 0;
const END_USER: usize = 1;
const DATA_ROLES: usize = 2;
const ATTRIBUTES: usize = 3;
const FIRST_ATTRIBUTE: usize = 4;

/// Builds a [`Mapped`]'s values.
struct Values {
    text: String,
    ends: Vec<usize>,
    /// Where JSON is written before it joins `text` (`serde_json` writes bytes).
    json: Vec<u8>,
}

impl Values {
    fn with_attributes(attributes: usize, text_capacity: usize) -> Self {
        Self {
            text: String::with_capacity(text_capacity),
            ends: Vec::with_capacity(FIRST_ATTRIBUTE + 2 * attributes),
            json: Vec::with_capacity(128),
        }
    }

    /// Ends the value written since the last end.
    fn end(&mut self) {
        self.ends.push(self.text.len());
    }

    fn push(&mut self, value: &str) {
        self.text.push_str(value);
        self.end();
    }

    /// Writes `value` as compact JSON.
    fn push_json<T: serde::Serialize + ?Sized>(&mut self, value: &T) {
        self.json.clear();
        // Strings and validated JSON always serialize, as UTF-8; nothing is written if
        // not.
        if serde_json::to_writer(&mut self.json, value).is_ok() {
            if let Ok(json) = std::str::from_utf8(&self.json) {
                self.text.push_str(json);
            }
        }
        self.end();
    }
}

/// The parameters of [`SYNC_ANY_SQL`] for one mapping; [`refs`](Self::refs) lends them
/// to tokio-postgres.
pub(crate) struct AnyParams<'a> {
    scalars: [&'a str; 4],
    names: Vec<&'a str>,
    values: Vec<&'a str>,
    local: &'static bool,
}

impl AnyParams<'_> {
    /// The seven parameters, in order.
    pub(crate) fn refs(&self) -> [&(dyn ToSql + Sync); 7] {
        [
            &self.scalars[0],
            &self.scalars[1],
            &self.scalars[2],
            &self.scalars[3],
            &self.names,
            &self.values,
            self.local,
        ]
    }

    /// [`refs`](Self::refs) with their types, for an unnamed statement.
    pub(crate) fn typed(&self) -> Vec<(&(dyn ToSql + Sync), Type)> {
        self.refs().into_iter().zip(SYNC_ANY_TYPES).collect()
    }
}

impl fmt::Debug for Mapped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mapped")
            .field("role", &self.value(ROLE))
            .field("end_user", &self.value(END_USER))
            .finish_non_exhaustive()
    }
}

/// Contexts with at most this many flattened attributes use a statement with one
/// `set_config` per attribute; larger ones use [`SYNC_ANY_SQL`].
pub(crate) const MAX_FLAT: usize = 6;

/// The name the flat context statement ([`sync_sql`]) of each attribute count is
/// prepared under, the same on every connection.
pub(crate) const FLAT_NAMES: [&str; MAX_FLAT + 1] = [
    "ctxpool_context_0",
    "ctxpool_context_1",
    "ctxpool_context_2",
    "ctxpool_context_3",
    "ctxpool_context_4",
    "ctxpool_context_5",
    "ctxpool_context_6",
];

/// The statement that sets a context with exactly `n` flattened attributes: the role, the
/// three `ctxpool.*` settings and each attribute, every value (attribute names included) a
/// bind parameter. The last parameter says transaction-local or not. Generated from `n`
/// alone: nothing of a context is ever part of the text.
pub(crate) fn sync_sql(n: usize) -> String {
    let local = 5 + 2 * n;
    let mut sql = format!(
        "SELECT pg_catalog.set_config('role', $1, ${local}), \
         pg_catalog.set_config('ctxpool.end_user', $2, ${local}), \
         pg_catalog.set_config('ctxpool.data_roles', $3, ${local}), \
         pg_catalog.set_config('ctxpool.attributes', $4, ${local})"
    );
    for i in 0..n {
        sql.push_str(&format!(
            ", pg_catalog.set_config(${}, ${}, ${local})",
            5 + 2 * i,
            6 + 2 * i
        ));
    }
    sql
}

/// The statement for any number of attributes, as two arrays. The aggregate evaluates
/// `set_config` once per attribute; it cannot be optimised away.
pub(crate) const SYNC_ANY_SQL: &str = "SELECT pg_catalog.set_config('role', $1, $7), \
     pg_catalog.set_config('ctxpool.end_user', $2, $7), \
     pg_catalog.set_config('ctxpool.data_roles', $3, $7), \
     pg_catalog.set_config('ctxpool.attributes', $4, $7), \
     (SELECT pg_catalog.count(pg_catalog.set_config(k, v, $7)) \
      FROM ROWS FROM (pg_catalog.unnest($5::text[]), pg_catalog.unnest($6::text[])) AS a(k, v))";

/// The parameter types of [`sync_sql`]`(n)`.
pub(crate) fn sync_types(n: usize) -> Vec<Type> {
    let mut types = vec![Type::TEXT; 4 + 2 * n];
    types.push(Type::BOOL);
    types
}

/// The parameter types of [`SYNC_ANY_SQL`].
pub(crate) const SYNC_ANY_TYPES: [Type; 7] = [
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::BOOL,
];

impl Mapped {
    /// The value at `index` (see [`ROLE`] and the others).
    fn value(&self, index: usize) -> &str {
        let start = index
            .checked_sub(1)
            .and_then(|i| self.ends.get(i).copied())
            .unwrap_or(0);
        let end = self.ends.get(index).copied().unwrap_or(start);
        self.text.get(start..end).unwrap_or_default()
    }

    /// Every value, in order: the four settings, then each attribute's name and value.
    fn values(&self) -> impl Iterator<Item = &str> {
        (0..self.ends.len()).map(|i| self.value(i))
    }

    /// The mapping that undoes this one inside a transaction: no role (the session's
    /// own), every `ctxpool.*` setting and each of this context's attributes empty.
    pub(crate) fn cleared(&self) -> Self {
        let mut values = Values::with_attributes(self.attribute_count(), self.text.len());
        values.push("none");
        for _ in END_USER..FIRST_ATTRIBUTE {
            values.end();
        }
        for i in 0..self.attribute_count() {
            values.push(self.value(FIRST_ATTRIBUTE + 2 * i));
            values.end();
        }
        Self {
            context: self.context.clone(),
            text: values.text,
            ends: values.ends,
            flat_binds: Default::default(),
        }
    }

    /// Whether this is a [`cleared`](Self::cleared) mapping.
    pub(crate) fn is_cleared(&self) -> bool {
        self.value(ROLE) == "none" && self.value(END_USER).is_empty()
    }

    /// Whether two mappings set the same values.
    pub(crate) fn same_as(&self, other: &Self) -> bool {
        self.ends == other.ends && self.text == other.text
    }

    /// How many flattened attributes the context has.
    pub(crate) fn attribute_count(&self) -> usize {
        self.ends.len().saturating_sub(FIRST_ATTRIBUTE) / 2
    }

    /// The parameters of [`sync_sql`] in text format, for a statement the wire layer binds
    /// itself: the four settings, then each attribute's name and value, and `local` last,
    /// as `true` or `false`.
    pub(crate) fn flat_text_params(&self, local: bool) -> Vec<&str> {
        self.values()
            .chain(std::iter::once(if local { "true" } else { "false" }))
            .collect()
    }

    /// The Bind and Execute of the flat context statement of this attribute count
    /// (prepared under [`FLAT_NAMES`]) with these values, `local` or session-wide; `None`
    /// past [`MAX_FLAT`] attributes.
    pub(crate) fn flat_bind(&self, local: bool) -> Option<&Statements> {
        let name = FLAT_NAMES.get(self.attribute_count())?;
        Some(self.flat_binds[usize::from(local)].get_or_init(|| {
            let params = self.flat_text_params(local);
            let size = 64 + params.iter().map(|p| 4 + p.len()).sum::<usize>();
            let mut frames = Statements::with_capacity(size);
            frames.push_bound(name, params.into_iter());
            frames
        }))
    }

    /// The parameters of [`SYNC_ANY_SQL`].
    pub(crate) fn any_params(&self, local: &'static bool) -> AnyParams<'_> {
        let attribute = |offset: usize| {
            (0..self.attribute_count())
                .map(|i| self.value(FIRST_ATTRIBUTE + 2 * i + offset))
                .collect()
        };
        AnyParams {
            scalars: [
                self.value(ROLE),
                self.value(END_USER),
                self.value(DATA_ROLES),
                self.value(ATTRIBUTES),
            ],
            names: attribute(0),
            values: attribute(1),
            local,
        }
    }
}

/// Maps `context` under `config`, or says why it cannot be.
pub(crate) fn map(
    config: &ContextConfig,
    context: &SecurityContext,
) -> Result<Arc<Mapped>, MappingError> {
    let identity = context.identity();
    let claims = identity
        .token_secret()
        .map(|t| decode_claims(t.expose_secret()))
        .transpose()?;
    // Borrowed, not copied: both go into the mapping's one buffer.
    let end_user: &str = match (identity.name(), &claims) {
        (Some(name), _) => name,
        (None, Some(claims)) => claims
            .get("sub")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| MappingError::ClaimMissing("sub".into()))?,
        (None, None) => return Err(MappingError::TokenNotDecodable),
    };
    let role: &str = match &config.role {
        RoleMapping::Fixed(role) => role,
        RoleMapping::FirstDataRole => context
            .data_roles()
            .first()
            .ok_or(MappingError::NoDataRole)?,
        RoleMapping::TokenClaim(claim) => {
            let value = claims.as_ref().and_then(|c| c.get(claim.as_str()));
            let role = match value {
                Some(serde_json::Value::String(s)) => Some(s.as_str()),
                Some(serde_json::Value::Array(a)) => a.iter().find_map(serde_json::Value::as_str),
                _ => None,
            };
            role.ok_or_else(|| MappingError::ClaimMissing(claim.clone()))?
        }
    };
    if !config.allowed_roles.contains(role) {
        return Err(MappingError::RoleNotAllowed(role.to_owned()));
    }
    if let Some(r) = context
        .data_roles()
        .iter()
        .find(|r| !config.allowed_roles.contains(*r))
    {
        return Err(MappingError::DataRoleNotAllowed(r.clone()));
    }
    let attributes = context.attributes();
    let mut values = Values::with_attributes(attributes.flattened_len(), 256);
    values.push(role);
    values.push(end_user);
    values.push_json(context.data_roles());
    values.push_json(attributes.as_json());
    attributes.each_flattened(|key, attribute, value| {
        values.text.push_str(key);
        values.text.push('.');
        values.text.push_str(attribute);
        values.end();
        match value {
            serde_json::Value::String(s) => values.push(s),
            serde_json::Value::Bool(true) => values.push("true"),
            serde_json::Value::Bool(false) => values.push("false"),
            // A number (null, arrays and objects are refused at validation).
            other => values.push_json(other),
        }
    });
    Ok(Arc::new(Mapped {
        context: context.clone(),
        text: values.text,
        ends: values.ends,
        flat_binds: Default::default(),
    }))
}

/// The claims of a JWT, decoded but not verified.
fn decode_claims(token: &str) -> Result<serde_json::Map<String, serde_json::Value>, MappingError> {
    crate::jwt::unverified_claims(token).ok_or(MappingError::TokenNotDecodable)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::context::EndUserIdentity;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    fn jwt(claims: serde_json::Value) -> String {
        let enc = |v: &serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.sig",
            enc(&serde_json::json!({"alg": "none"})),
            enc(&claims)
        )
    }

    fn ctx(identity: EndUserIdentity, roles: &[&str]) -> SecurityContext {
        SecurityContext::builder(identity, "db")
            .data_roles(roles.iter().copied())
            .attributes(serde_json::json!({"hr.ctx": {"emp_id": 3}}))
            .build()
            .unwrap()
    }

    fn config(role: RoleMapping) -> ContextConfig {
        ContextConfig::new(role, ["hr_employee", "hr_manager"])
    }

    #[test]
    fn first_data_role_and_the_flattened_settings() {
        let m = map(
            &config(RoleMapping::FirstDataRole),
            &ctx(
                EndUserIdentity::named("al", None),
                &["hr_manager", "hr_employee"],
            ),
        )
        .unwrap();
        assert_eq!(
            m.values().collect::<Vec<_>>(),
            [
                "hr_manager",
                "al",
                r#"["hr_manager","hr_employee"]"#,
                r#"{"hr.ctx":{"emp_id":3}}"#,
                "hr.ctx.emp_id",
                "3"
            ]
        );
        assert_eq!(m.attribute_count(), 1);
        assert_eq!(
            map(
                &config(RoleMapping::FirstDataRole),
                &ctx(EndUserIdentity::named("al", None), &[])
            )
            .unwrap_err(),
            MappingError::NoDataRole
        );
    }

    #[test]
    fn the_values_of_a_mapping_and_its_clearing() {
        let context = SecurityContext::builder(EndUserIdentity::named("al", None), "db")
            .data_roles(["hr_employee"])
            .attributes(serde_json::json!({
                "hr.ctx": {"emp_id": 3, "name": "Ça \"va\"", "boss": false},
                "crm.ctx": {"region": "emea", "weight": 1.5}
            }))
            .build()
            .unwrap();
        let m = map(&config(RoleMapping::FirstDataRole), &context).unwrap();
        let flat: Vec<(String, String)> = context.attributes().flattened().collect();
        let expected: Vec<String> = [
            "hr_employee".to_owned(),
            "al".to_owned(),
            serde_json::to_string(context.data_roles()).unwrap(),
            serde_json::to_string(context.attributes().as_json()).unwrap(),
        ]
        .into_iter()
        .chain(flat.iter().flat_map(|(n, v)| [n.clone(), v.clone()]))
        .collect();
        assert_eq!(m.values().collect::<Vec<_>>(), expected);
        assert_eq!(m.attribute_count(), 5);
        assert_eq!(m.flat_text_params(true).last(), Some(&"true"));
        assert_eq!(m.flat_text_params(false).len(), 4 + 2 * 5 + 1);
        let params = m.any_params(&true);
        assert_eq!(
            params.names,
            flat.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>()
        );
        assert_eq!(
            params.values,
            flat.iter().map(|(_, v)| v.as_str()).collect::<Vec<_>>()
        );
        assert_eq!(params.scalars[1], "al");

        let cleared = m.cleared();
        assert!(cleared.is_cleared() && !m.is_cleared());
        let mut want = vec!["none", "", "", ""];
        for (name, _) in &flat {
            want.extend([name.as_str(), ""]);
        }
        assert_eq!(cleared.values().collect::<Vec<_>>(), want);
        assert!(m.same_as(&map(&config(RoleMapping::FirstDataRole), &context).unwrap()));
        assert!(!m.same_as(&cleared));
    }

    #[test]
    fn fixed_role_and_the_allow_list() {
        let m = map(
            &config(RoleMapping::Fixed("hr_employee".into())),
            &ctx(EndUserIdentity::named("al", None), &[]),
        )
        .unwrap();
        assert_eq!(m.value(ROLE), "hr_employee");
        assert_eq!(
            map(
                &config(RoleMapping::Fixed("postgres".into())),
                &ctx(EndUserIdentity::named("al", None), &[])
            )
            .unwrap_err(),
            MappingError::RoleNotAllowed("postgres".into())
        );
        assert_eq!(
            map(
                &config(RoleMapping::FirstDataRole),
                &ctx(
                    EndUserIdentity::named("al", None),
                    &["hr_employee", "admin"]
                )
            )
            .unwrap_err(),
            MappingError::DataRoleNotAllowed("admin".into())
        );
    }

    #[test]
    fn token_claims_give_the_end_user_and_the_role() {
        let token = jwt(
            serde_json::json!({"sub": "erin", "roles": ["hr_employee", "x"], "role": "hr_manager"}),
        );
        let identity = EndUserIdentity::token(token);
        let m = map(
            &config(RoleMapping::TokenClaim("roles".into())),
            &ctx(identity.clone(), &[]),
        )
        .unwrap();
        assert_eq!((m.value(ROLE), m.value(END_USER)), ("hr_employee", "erin"));
        let m = map(
            &config(RoleMapping::TokenClaim("role".into())),
            &ctx(identity.clone(), &[]),
        )
        .unwrap();
        assert_eq!(m.value(ROLE), "hr_manager");
        assert_eq!(
            map(
                &config(RoleMapping::TokenClaim("groups".into())),
                &ctx(identity, &[])
            )
            .unwrap_err(),
            MappingError::ClaimMissing("groups".into())
        );
        let no_sub = EndUserIdentity::token(jwt(serde_json::json!({"role": "hr_manager"})));
        assert_eq!(
            map(
                &config(RoleMapping::FirstDataRole),
                &ctx(no_sub, &["hr_employee"])
            )
            .unwrap_err(),
            MappingError::ClaimMissing("sub".into())
        );
        for opaque in ["opaque-token", "a.!!!.c", "a.bm90IGpzb24.c"] {
            assert_eq!(
                map(
                    &config(RoleMapping::FirstDataRole),
                    &ctx(EndUserIdentity::token(opaque), &["hr_employee"])
                )
                .unwrap_err(),
                MappingError::TokenNotDecodable,
                "{opaque}"
            );
        }
    }

    #[test]
    fn the_flat_statement_text_depends_on_the_count_only() {
        assert_eq!(sync_types(2).len(), 9);
        let sql = sync_sql(2);
        assert!(
            sql.ends_with("pg_catalog.set_config($5, $6, $9), pg_catalog.set_config($7, $8, $9)"),
            "{sql}"
        );
        assert_eq!(sql.matches("set_config").count(), 6);
    }
}
