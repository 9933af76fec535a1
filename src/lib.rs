//! # ctxpool: a connection pool whose connections run as the end user
//!
//! Services connect to their database with one shared, least-privileged account. With
//! ctxpool they acquire each connection *as an end user*:
//!
//! ```text
//! let conn = pool.acquire_as(security_context).await?;   // or an EndUserIdentity
//! ```
//!
//! and the connection runs under that user's **security context** (identity,
//! database-access token, data roles and attributes), so the database, not the application,
//! decides what the user may see. The model is Oracle Deep Data Security's end-user security
//! context as python-oracledb exposes it; the reference database is PostgreSQL, where the
//! context becomes a role and settings read by Row-Level Security policies.
//!
//! ## The promises
//! - **Piggybacked.** Setting a context costs no round trip: the backend sends it with the
//!   next statement ([`backend`] explains the contract).
//! - **Always cleared.** Releasing a handle clears its context on every exit path (drop,
//!   cancellation, panic, error, lost connection). A connection returns to the pool only if
//!   the backend proves it idle; otherwise it is discarded and the reason is counted.
//! - **No identity, no error.** [`Pool::get`] gives a plain least-privileged connection.
//! - **Fails closed.** An identity whose context cannot be completed or applied is an error,
//!   never a connection under another or a broader context.
//! - **Explicit wins.** A [`SecurityContext`] passed to [`Pool::acquire_as`] is used as is;
//!   an [`EndUserIdentity`] is completed by the pool's [`ContextProvider`].
//!
//! ## Layout
//! The core, always built:
//! - [`context`]: [`EndUserIdentity`], [`SecurityContext`] and their validation.
//! - [`pool`]: [`Pool`], its handle [`Object`], configuration, errors and metrics.
//! - [`backend`]: the [`Backend`] trait a database implements.
//! - [`provider`]: the [`ContextProvider`] SPI that turns identities into contexts.
//! - [`token_check`]: the [`TokenCheck`](token_check::TokenCheck) interface a token
//!   validator implements for the tower layer.
//! - [`scope`]: the task-local per-request identity: inside an
//!   [`EndUserScope`](scope::EndUserScope), a provider-configured pool's [`Pool::get`]
//!   acquires as the scope's end user.
//!
//! Backends, providers and middleware, each behind a feature:
//! - `postgres` (feature `postgres`, on by default): the PostgreSQL backend, a drop-in for
//!   deadpool-postgres; contexts become a role and settings that Row-Level Security
//!   policies read.
//! - `oracle` (feature `oracle`): the Oracle AI Database 26ai backend, on the server's own
//!   Deep Data Security end-user security context.
//! - `providers` (feature `providers`): the `end_user_sec_params` block, Entra ID and OCI
//!   IAM token endpoints, a token cache and end-user token validation.
//! - `middleware` (feature `tower`): a tower layer that runs each HTTP request in the scope
//!   of the end user named by its `identity` cookie or `Authorization: Bearer` header.
//!
//! Dependencies point one way: backends, providers and middleware depend on the core,
//! never the reverse.
//!
//! ## Quick start (PostgreSQL)
//! The database needs a login for the pool, the data roles granted to it, ctxpool's SQL
//! helpers and Row-Level Security policies that read them: `examples/hr.sql` in the
//! repository is a complete set-up, and the README's "Database set-up" explains it.
//! ```
//! # #[cfg(feature = "postgres")]
//! # ctxpool_testkit::hr::on_hr_database(|database_url| async move {
//! use ctxpool::postgres::{Config, ContextConfig, RoleMapping, Runtime};
//! use ctxpool::{EndUserIdentity, SecurityContext};
//!
//! // One pool, for the one least-privileged login (`postgres://hr_app@…/hr`).
//! let mut cfg = Config::new();
//! cfg.url = Some(database_url);
//! cfg.context = Some(ContextConfig::new(RoleMapping::FirstDataRole, ["hr_employee", "hr_manager"]));
//! let pool = cfg.create_pool(Some(Runtime::Tokio1), tokio_postgres::NoTls)?;
//!
//! // Per request: alice, an employee, sees her own row; the database decides.
//! let alice = SecurityContext::builder(EndUserIdentity::named("alice", None), "unused-on-postgres")
//!     .data_roles(["hr_employee"])
//!     .attributes(serde_json::json!({"hr.hcm_context": {"emp_id": 3, "org_id": 5}}))
//!     .build()?;
//! let client = pool.acquire_as(&alice).await?;
//! let rows = client.query("SELECT name FROM hr.employees", &[]).await?;
//! assert_eq!(rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>(), ["Alan"]);
//! drop(client); // the context is cleared; nothing of it reaches the next acquirer
//!
//! // No identity: the plain login, which no policy lets see a row.
//! let plain = pool.get().await?;
//! assert!(plain.query("SELECT name FROM hr.employees", &[]).await?.is_empty());
//! # Ok(())
//! # });
//! ```
//! The doctest runs on a throwaway PostgreSQL started by ctxpool's test kit (the hidden
//! lines); a service passes its own URL.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// docs.rs builds with `--cfg docsrs` on nightly: each feature-gated item gets its badge,
// from the explicit `doc(cfg)` on the gated modules below (what rustdoc would infer by
// itself depends on the nightly).
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(clippy::unwrap_used)]

pub mod backend;
pub mod context;
#[cfg(any(feature = "postgres", feature = "providers"))]
mod jwt;
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub mod middleware;
#[cfg(feature = "oracle")]
#[cfg_attr(docsrs, doc(cfg(feature = "oracle")))]
pub mod oracle;
pub mod pool;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
pub mod provider;
#[cfg(feature = "providers")]
#[cfg_attr(docsrs, doc(cfg(feature = "providers")))]
pub mod providers;
#[cfg(feature = "sabotage")]
#[doc(hidden)]
pub mod sabotage;
/// Without feature `sabotage` every switch reads "off", as a constant the compiler folds
/// away: the backend asks `crate::sabotage` the same way in every build.
#[cfg(all(not(feature = "sabotage"), feature = "postgres"))]
mod sabotage {
    pub(crate) const fn reset_skipped() -> bool {
        false
    }
    pub(crate) const fn status_ignored() -> bool {
        false
    }
    pub(crate) const fn pgpool_trusted() -> bool {
        false
    }
}
pub mod scope;
mod take_once;
pub mod token_check;

/// The README's Rust snippets, compiled and run as doctests (they need every user-facing
/// feature): `cargo test --doc --features providers,tower,oracle`.
#[cfg(all(doctest, feature = "providers", feature = "tower", feature = "oracle"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub use backend::{Backend, Connection, DiscardReason};
pub use context::{ContextError, EndUserIdentity, SecurityContext};
pub use pool::{AcquireAs, Object, Pool, PoolBuilder, PoolConfig, PoolError, Status, Timeouts};
pub use provider::{ContextProvider, ContextRequest, ProviderError};
