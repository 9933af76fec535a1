//! The token-check interface: a gate that an end user's token passes before any database
//! work.
//!
//! The tower layer (`ctxpool::middleware`, feature `tower`) asks a [`TokenCheck`] about
//! each request's bearer token and answers a refusal itself; the JWKS validator of feature
//! `providers` (`ctxpool::providers::validation::TokenValidator`) is one. The trait lives
//! in the core so that neither of them depends on the other.

use std::sync::Arc;

use async_trait::async_trait;
use secrecy::SecretString;

use crate::provider::Verification;

/// Checks an end user's token before the request runs, so that an invalid token is
/// refused (a 401 from the tower layer) before any database work.
#[async_trait]
pub trait TokenCheck: Send + Sync + 'static {
    /// `Ok` if the token may be used, with evidence of the check if the checker leaves
    /// any: it reaches the pool's provider with the request
    /// ([`ContextRequest::verification`](crate::ContextRequest::verification)), so that a
    /// provider sharing the checker's validator does not verify the token again.
    async fn check(&self, token: &SecretString) -> Result<Option<Verification>, TokenRefusal>;
}

/// Why a [`TokenCheck`] refused a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenRefusal {
    /// The token is not valid: the tower layer answers 401.
    Invalid,
    /// The check cannot be made now (keys unreachable): the tower layer answers 503.
    Unavailable,
}

#[async_trait]
impl<T: TokenCheck + ?Sized> TokenCheck for Arc<T> {
    async fn check(&self, token: &SecretString) -> Result<Option<Verification>, TokenRefusal> {
        (**self).check(token).await
    }
}
