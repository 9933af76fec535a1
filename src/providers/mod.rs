//! Token providers (feature `providers`): the `end_user_sec_params` configuration of the
//! reference, and the identity providers that fetch database-access tokens for it.
//!
//! - [`config`]: `end_user_sec_params`, from JSON or TOML, bare or nested under
//!   `extra_auth_params`.
//! - [`token_source`]: Entra ID (client credentials, on-behalf-of) and OCI IAM (client
//!   credentials) token endpoints over HTTPS, with timeouts and bounded retries.
//! - [`http`]: what the token source and the JWKS fetch share: the trust roots (webpki,
//!   the platform's, extra PEM roots), the bounded body read, the one loopback rule.
//! - [`cache`]: the token cache: single-flight, expiry with a safety margin, refresh ahead,
//!   bounded per-user entries.
//!
//! [`EndUserSecProvider`] puts them together as the core's
//! [`ContextProvider`](crate::ContextProvider): build a pool with it and
//! `acquire_as(identity)` fetches (or reuses) the database-access token. Providers depend
//! on the core; the core does not depend on them.

pub mod cache;
pub mod config;
mod end_user_sec;
mod flight;
pub mod http;
pub mod token_source;
pub mod validation;

pub use end_user_sec::EndUserSecProvider;
