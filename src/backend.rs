//! The backend contract: how a database attaches, checks and clears a security context.
//!
//! The pool is generic over [`Backend`]. A backend opens connections and vouches for them;
//! each connection implements [`Connection`], the half the pool drives on every checkout.
//! The PostgreSQL backend is in [`crate::postgres`] (feature `postgres`), the in-process
//! model the property tests use is in ctxpool's test kit (`tests/kit`, never published).
//!
//! # The invariant a backend upholds
//! The pool hands out a connection and takes it back; a backend makes these promises, and
//! the pool's property tests check them against the in-process backend:
//!
//! 1. **Attaching is free.** [`Connection::attach_context`] and
//!    [`Connection::clear_context`] do no I/O. From the moment they return, every statement
//!    the connection runs executes under exactly the attached context (after a clear: the
//!    login role with no context settings), or fails without running.
//!    That is the *piggyback*: the context travels with the next operation.
//! 2. **Release is checked synchronously.** When a handle is released (dropped, cancelled,
//!    unwound by a panic) the pool first clears the context, then calls
//!    [`Connection::check_release`]. Anything the backend cannot prove idle (an operation
//!    still in flight because its future was dropped, a transaction left open or aborted,
//!    a lost connection) is an `Err`, and the pool discards the connection.
//! 3. **Reuse is checked again.** Before an idle connection is handed out, the pool awaits
//!    [`Backend::recycle`] under the recycle timeout; an `Err` discards it.
//!
//! A backend may leave server-side session state behind at release (a role, settings) as
//! long as promise 1 holds: the next statement resets it in the same flight, or fails.

use std::fmt;
use std::future::Future;

use crate::context::SecurityContext;

/// A database the pool can manage connections to.
pub trait Backend: Send + Sync + 'static {
    /// One connection, with the per-checkout context state the pool drives.
    type Connection: Connection;
    /// What [`connect`](Self::connect) fails with.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Opens a new, least-privileged connection carrying no context.
    fn connect(&self) -> impl Future<Output = Result<Self::Connection, Self::Error>> + Send;

    /// Vouches for an idle connection before it is handed out again: still open, idle,
    /// carrying no context but what its next statement will reset. Bounded by the pool's
    /// recycle timeout. The default accepts every connection whose release was accepted.
    fn recycle(
        &self,
        conn: &mut Self::Connection,
    ) -> impl Future<Output = Result<(), DiscardReason>> + Send {
        let _ = conn;
        std::future::ready(Ok(()))
    }
}

/// The pool's view of one connection.
pub trait Connection: Send + 'static {
    /// Why [`attach_context`](Self::attach_context) refused a context (e.g. a role outside
    /// the allow-list).
    type AttachError: std::error::Error + Send + Sync + 'static;

    /// Sets the context every following statement runs under, replacing any previous one.
    /// Must not do I/O: the backend sends the change with the next statement. A context the
    /// backend cannot map is refused here, before any SQL; the connection is then left
    /// with no context.
    fn attach_context(&mut self, context: SecurityContext) -> Result<(), Self::AttachError>;

    /// Clears the context: following statements run as the plain login. No I/O; never fails.
    fn clear_context(&mut self);

    /// The context the next statement runs under.
    fn context(&self) -> Option<&SecurityContext>;

    /// Called at release, after `clear_context`: `Ok` only if the connection is
    /// provably idle (nothing in flight, no transaction open or aborted, still open).
    fn check_release(&mut self) -> Result<(), DiscardReason>;
}

/// Why the pool discarded a connection instead of reusing it. Counted in the
/// `ctxpool_discarded_total` metric under the label `reason` ([`DiscardReason::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DiscardReason {
    /// Released while an operation was in flight: its future was cancelled.
    InFlight,
    /// Released while the holder was panicking.
    Panicked,
    /// Released with a transaction open.
    OpenTransaction,
    /// Released with a failed (aborted) transaction.
    FailedTransaction,
    /// The connection to the server was lost or closed.
    Lost,
    /// The session state could not be reset.
    ResetFailed,
    /// The backend's health check refused it.
    RecycleFailed,
    /// The recycle check did not finish within the recycle timeout.
    RecycleTimeout,
}

impl DiscardReason {
    /// The reason as a metric label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InFlight => "in_flight",
            Self::Panicked => "panicked",
            Self::OpenTransaction => "open_transaction",
            Self::FailedTransaction => "failed_transaction",
            Self::Lost => "lost",
            Self::ResetFailed => "reset_failed",
            Self::RecycleFailed => "recycle_failed",
            Self::RecycleTimeout => "recycle_timeout",
        }
    }
}

impl fmt::Display for DiscardReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
