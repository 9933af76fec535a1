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
//! - [`context`]: [`EndUserIdentity`], [`SecurityContext`] and their validation.
//! - [`pool`]: [`Pool`], its handle [`Object`], configuration, errors and metrics.
//! - [`backend`]: the [`Backend`] trait a database implements.
//! - [`provider`]: the [`ContextProvider`] SPI that turns identities into contexts.
//! - [`scope`]: the task-local per-request identity: inside an
//!   [`EndUserScope`](scope::EndUserScope), a provider-configured pool's [`Pool::get`]
//!   acquires as the scope's end user.
//! - `middleware` (feature `tower`): a tower layer that runs each HTTP request in the scope
//!   of the end user named by its `identity` cookie or `Authorization: Bearer` header.
//! - `oracle` (feature `oracle`): the Oracle AI Database 26ai backend, on the server's own
//!   Deep Data Security end-user security context.
//!
//! Dependencies point one way: backends and providers depend on the core, never the reverse.
//!
//! ## Quick start (in-process backend)
//! ```
//! # tokio_test_block_on(async {
//! use ctxpool::{EndUserIdentity, Pool, SecurityContext};
//! use ctxpool_testkit::{MemBackend, MemServer, Statement};
//!
//! let server = MemServer::new();
//! let pool = Pool::builder(MemBackend::new(server.clone())).max_size(4).build()?;
//!
//! let alice = SecurityContext::builder(EndUserIdentity::named("alice", None), "db-token")
//!     .data_roles(["hr_role"])
//!     .build()?;
//! let mut conn = pool.acquire_as(&alice).await?;
//! let seen = conn.execute(Statement::Query).await?;
//! assert_eq!(seen.end_user.as_deref(), Some("alice"));
//! drop(conn); // the context is cleared; the next statement on this connection resets it
//!
//! let mut plain = pool.get().await?;
//! assert_eq!(plain.execute(Statement::Query).await?.end_user, None);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
//! # }
//! ```
#![warn(missing_docs)]
// docs.rs builds with `--cfg docsrs` on nightly: each feature-gated item gets its badge.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(clippy::unwrap_used)]

pub mod backend;
pub mod context;
#[cfg(any(feature = "postgres", feature = "providers"))]
mod jwt;
#[cfg(feature = "tower")]
pub mod middleware;
#[cfg(feature = "oracle")]
pub mod oracle;
pub mod pool;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod provider;
#[cfg(feature = "providers")]
pub mod providers;
#[cfg(feature = "sabotage")]
#[doc(hidden)]
pub mod sabotage;
pub mod scope;

/// The README's Rust snippets, compiled and run as doctests (they need every user-facing
/// feature): `cargo test --doc --features providers,tower,oracle`.
#[cfg(all(doctest, feature = "providers", feature = "tower", feature = "oracle"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub use backend::{Backend, Connection, DiscardReason};
pub use context::{ContextError, EndUserIdentity, SecurityContext};
pub use pool::{AcquireAs, Object, Pool, PoolBuilder, PoolConfig, PoolError, Status, Timeouts};
pub use provider::{ContextProvider, ContextRequest, ProviderError};
