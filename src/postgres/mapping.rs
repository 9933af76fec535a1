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

use base64::Engine;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use tokio_postgres::types::{ToSql, Type};

use crate::context::SecurityContext;

/// When the context is applied, and for how long.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContextScope {
    /// Every transaction the handle runs carries the context inside itself, in the same
    /// flight; nothing survives the transaction. Safe behind PgBouncer in transaction mode.
    #[default]
    Transaction,
    /// Applied once per checkout on the first statement and kept in the session; reset on
    /// the next checkout's first statement unless the same context comes back. Fewer
    /// statements per query, but session state: never behind PgBouncer in transaction mode.
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
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContextConfig {
    /// When the context is applied.
    pub scope: ContextScope,
    /// Which role the session runs as.
    pub role: RoleMapping,
    /// The roles a session may run as and the data roles a context may carry. Anything
    /// else is refused before any SQL is sent.
    pub allowed_roles: BTreeSet<String>,
}

impl ContextConfig {
    /// A configuration allowing `roles`, mapping with `role`, in transaction scope.
    pub fn new<I, S>(role: RoleMapping, allowed_roles: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            scope: ContextScope::Transaction,
            role,
            allowed_roles: allowed_roles.into_iter().map(Into::into).collect(),
        }
    }

    /// The same configuration in `scope`.
    pub fn scope(mut self, scope: ContextScope) -> Self {
        self.scope = scope;
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

/// One statement sets the whole context: the role, the three `ctxpool.*` settings and
/// every flattened attribute, all as bind parameters. `$7` says transaction-local or not.
/// The aggregate evaluates `set_config` once per attribute; it cannot be optimised away.
pub(crate) const SYNC_SQL: &str = "SELECT set_config('role', $1, $7), \
     set_config('ctxpool.end_user', $2, $7), \
     set_config('ctxpool.data_roles', $3, $7), \
     set_config('ctxpool.attributes', $4, $7), \
     (SELECT count(set_config(k, v, $7)) FROM unnest($5::text[], $6::text[]) AS a(k, v))";

impl Mapped {
    /// The parameters of [`SYNC_SQL`] for this context.
    pub(crate) fn params(&self, local: &'static bool) -> [(&(dyn ToSql + Sync), Type); 7] {
        [
            (&self.role, Type::TEXT),
            (&self.end_user, Type::TEXT),
            (&self.data_roles, Type::TEXT),
            (&self.attributes, Type::TEXT),
            (&self.names, Type::TEXT_ARRAY),
            (&self.values, Type::TEXT_ARRAY),
            (local, Type::BOOL),
        ]
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
    let payload = token
        .split('.')
        .nth(1)
        .ok_or(MappingError::TokenNotDecodable)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| MappingError::TokenNotDecodable)?;
    match serde_json::from_slice(&bytes) {
        Ok(serde_json::Value::Object(claims)) => Ok(claims),
        _ => Err(MappingError::TokenNotDecodable),
    }
}
