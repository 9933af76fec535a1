//! The Oracle AI Database 26ai backend (feature `oracle`): contexts become the server's own
//! Deep Data Security end-user security context, on Oracle's pure-Rust `oracledb` driver.
//!
//! ```no_run
//! use ctxpool::oracle::{OracleBackend, OracleConfig, OracleError, Pool};
//! use ctxpool::{EndUserIdentity, SecurityContext};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // The one least-privileged login; TCPS is required (Deep Data Security needs TLS).
//! let config = OracleConfig::new("hr_app", "app-password", "tcps://db.example.com:1522/hr")
//!     .wallet("/etc/ctxpool/wallet", None);
//! let pool: Pool = Pool::builder(OracleBackend::new(config)?).max_size(8).build()?;
//!
//! // Per request:
//! let alice = SecurityContext::builder(EndUserIdentity::named("alice", None), "db-access-token")
//!     .data_roles(["hr_employee"])
//!     .attributes(serde_json::json!({"hr.hcm_context": {"emp_id": 3, "org_id": 5}}))
//!     .build()?;
//! let mut conn = pool.acquire_as(&alice).await?;   // or pool.get() for a plain connection
//! let rows = conn.query("SELECT name FROM hr.employees WHERE org_id = :1", (5,)).await?;
//! for row in &rows {
//!     // The driver's own error type is not `std::error::Error`; `OracleError` wraps it.
//!     let name: String = row.get(0).map_err(OracleError::from)?;
//!     println!("{name}");                          // only what alice's data grants allow
//! }
//! # Ok(()) }
//! ```
//!
//! # How the context travels
//! The driver keeps the context as local state and attaches it to every round trip
//! (`Connection::set_end_user_security_context`, no round trip of its own). So
//! [`acquire_as`](crate::Pool::acquire_as) only translates and encodes the context (no
//! I/O; a context whose encoding exceeds 65,535 bytes is refused here with
//! [`OracleError::ContextTooLarge`]), and each call sets it on the driver connection,
//! runs, and clears it, on a blocking thread. The driver therefore never holds a context
//! between calls, and a released connection carries none.
//!
//! | ctxpool | driver (`oracledb`) |
//! |---|---|
//! | `EndUserIdentity::token(t)` | `EndUserIdentity::Token(t)` |
//! | `EndUserIdentity::named(n, key)` | `EndUserIdentity::DatabaseUser { name: n, key }` |
//! | database-access token | the builder's `database_access_token` |
//! | data roles (omitted when empty) | `.data_roles(..)` |
//! | attributes `{"schema.ctx": {"a": v}}` (omitted when empty) | `.attributes(..)`: name `schema.ctx`, values `{"a": v}`; integers as `NUMBER`, other numbers as `BINARY_DOUBLE` |
//!
//! # Blocking, cancellation, release
//! The driver is synchronous, so every call runs in `tokio::task::spawn_blocking` and
//! never blocks the async runtime. If a caller's future is dropped mid-call, the call
//! finishes on its thread and keeps the connection; if the handle is released before it
//! finishes, the connection is discarded ([`DiscardReason::InFlight`](crate::DiscardReason)).
//! Release clears the context (no I/O on the caller's thread). Possibly uncommitted work
//! is rolled back right away on a blocking thread, context cleared first; the backend's
//! recycle step waits for that rollback before the connection is handed out again, and
//! discards a connection whose rollback failed. The driver does not expose the
//! server's transaction flag, so any `execute`/`with_connection` since the last
//! commit or rollback, and any query that is not a plain `SELECT`/`WITH`, counts as a
//! possibly open transaction.
//!
//! # Errors
//! [`OracleError`] names the cases a caller acts on: no TLS, no Deep Data Security, a
//! context too large, and the database refusing the end-user token (ORA-52601) or the
//! database-access token (ORA-52602). A refusal fails the call, which does not run; the
//! connection stays usable (clear the context, or release it). Connection-level failures
//! (end of file on the channel, killed session…) mark the connection lost, and release
//! discards it.

mod backend;
mod config;
mod connection;
mod error;
mod session;
mod translate;

#[cfg(test)]
mod double;

pub use backend::OracleBackend;
pub use config::OracleConfig;
pub use connection::OracleConnection;
pub use error::{ORA_DATABASE_TOKEN_REFUSED, ORA_END_USER_TOKEN_REFUSED, OracleError};
pub use oracledb;
pub use session::{Param, Params, Session};
pub use translate::{DriverContext, translate};

/// A pool of Oracle connections.
pub type Pool = crate::Pool<OracleBackend>;
/// Builds a [`Pool`].
pub type PoolBuilder = crate::PoolBuilder<OracleBackend>;
/// A pooled Oracle connection; dereferences to [`OracleConnection`].
pub type Object = crate::Object<OracleBackend>;
/// Why a connection could not be handed out.
pub type PoolError = crate::PoolError<OracleError>;
