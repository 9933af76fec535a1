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
use std::sync::Arc;

use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use tokio_postgres::types::{ToSql, Type};

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
    role: String,
    end_user: String,
    data_roles: String,
    attributes: String,
    names: Vec<String>,
    values: Vec<String>,
}

impl fmt::Debug for Mapped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mapped")
            .field("role", &self.role)
            .field("end_user", &self.end_user)
            .finish_non_exhaustive()
    }
}

/// Contexts with at most this many flattened attributes use a statement with one
/// `set_config` per attribute; larger ones use [`SYNC_ANY_SQL`].
pub(crate) const MAX_FLAT: usize = 6;

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
    /// The mapping that undoes this one inside a transaction: no role (the session's
    /// own), every `ctxpool.*` setting and each of this context's attributes empty.
    pub(crate) fn cleared(&self) -> Self {
        Self {
            context: self.context.clone(),
            role: "none".to_owned(),
            end_user: String::new(),
            data_roles: String::new(),
            attributes: String::new(),
            names: self.names.clone(),
            values: vec![String::new(); self.values.len()],
        }
    }

    /// Whether this is a [`cleared`](Self::cleared) mapping.
    pub(crate) fn is_cleared(&self) -> bool {
        self.role == "none" && self.end_user.is_empty()
    }

    /// Whether two mappings set the same values.
    pub(crate) fn same_as(&self, other: &Self) -> bool {
        self.role == other.role
            && self.end_user == other.end_user
            && self.data_roles == other.data_roles
            && self.attributes == other.attributes
            && self.names == other.names
            && self.values == other.values
    }

    /// How many flattened attributes the context has.
    pub(crate) fn attribute_count(&self) -> usize {
        self.names.len()
    }

    /// The values of [`sync_sql`] for this context's attribute count, `local` aside: the
    /// four settings, then each attribute's name and value.
    fn flat_values(&self) -> impl Iterator<Item = &String> {
        [
            &self.role,
            &self.end_user,
            &self.data_roles,
            &self.attributes,
        ]
        .into_iter()
        .chain(
            self.names
                .iter()
                .zip(&self.values)
                .flat_map(|(name, value)| [name, value]),
        )
    }

    /// The parameters of [`sync_sql`] in text format, for a statement the wire layer binds
    /// itself (`local` last, as `true` or `false`).
    pub(crate) fn flat_text_params(&self, local: bool) -> Vec<&str> {
        self.flat_values()
            .map(String::as_str)
            .chain(std::iter::once(if local { "true" } else { "false" }))
            .collect()
    }

    /// The parameters of [`SYNC_ANY_SQL`].
    pub(crate) fn any_params(&self, local: &'static bool) -> [&(dyn ToSql + Sync); 7] {
        [
            &self.role,
            &self.end_user,
            &self.data_roles,
            &self.attributes,
            &self.names,
            &self.values,
            local,
        ]
    }

    /// [`any_params`](Self::any_params) with their types, for an unnamed statement.
    pub(crate) fn typed_any_params(
        &self,
        local: &'static bool,
    ) -> Vec<(&(dyn ToSql + Sync), Type)> {
        self.any_params(local)
            .into_iter()
            .zip(SYNC_ANY_TYPES)
            .collect()
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
    let end_user = match (identity.name(), &claims) {
        (Some(name), _) => name.to_owned(),
        (None, Some(claims)) => claims
            .get("sub")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| MappingError::ClaimMissing("sub".into()))?
            .to_owned(),
        (None, None) => return Err(MappingError::TokenNotDecodable),
    };
    let role = match &config.role {
        RoleMapping::Fixed(role) => role.clone(),
        RoleMapping::FirstDataRole => context
            .data_roles()
            .first()
            .cloned()
            .ok_or(MappingError::NoDataRole)?,
        RoleMapping::TokenClaim(claim) => {
            let value = claims.as_ref().and_then(|c| c.get(claim.as_str()));
            let role = match value {
                Some(serde_json::Value::String(s)) => Some(s.as_str()),
                Some(serde_json::Value::Array(a)) => a.iter().find_map(serde_json::Value::as_str),
                _ => None,
            };
            role.ok_or_else(|| MappingError::ClaimMissing(claim.clone()))?
                .to_owned()
        }
    };
    if !config.allowed_roles.contains(&role) {
        return Err(MappingError::RoleNotAllowed(role));
    }
    if let Some(r) = context
        .data_roles()
        .iter()
        .find(|r| !config.allowed_roles.contains(*r))
    {
        return Err(MappingError::DataRoleNotAllowed(r.clone()));
    }
    let (names, values) = context.attributes().flattened().unzip();
    Ok(Arc::new(Mapped {
        context: context.clone(),
        role,
        end_user,
        // Serializing strings and validated JSON cannot fail.
        data_roles: serde_json::to_string(context.data_roles()).unwrap_or_default(),
        attributes: serde_json::to_string(context.attributes().as_json()).unwrap_or_default(),
        names,
        values,
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
        assert_eq!((m.role.as_str(), m.end_user.as_str()), ("hr_manager", "al"));
        assert_eq!(m.data_roles, r#"["hr_manager","hr_employee"]"#);
        assert_eq!(
            (m.names.as_slice(), m.values.as_slice()),
            (&["hr.ctx.emp_id".to_owned()][..], &["3".to_owned()][..])
        );
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
    fn fixed_role_and_the_allow_list() {
        let m = map(
            &config(RoleMapping::Fixed("hr_employee".into())),
            &ctx(EndUserIdentity::named("al", None), &[]),
        )
        .unwrap();
        assert_eq!(m.role, "hr_employee");
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
        assert_eq!(
            (m.role.as_str(), m.end_user.as_str()),
            ("hr_employee", "erin")
        );
        let m = map(
            &config(RoleMapping::TokenClaim("role".into())),
            &ctx(identity.clone(), &[]),
        )
        .unwrap();
        assert_eq!(m.role, "hr_manager");
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
