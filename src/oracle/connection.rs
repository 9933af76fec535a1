//! The pooled Oracle connection: every driver call on a blocking thread, under the
//! attached context, and a release check that needs no I/O.

use std::fmt;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::error::{OracleError, Severity};
use super::session::{Params, Session, may_open_transaction};
use super::translate::{DriverContext, translate};
use crate::backend::{Connection, DiscardReason};
use crate::context::SecurityContext;
use crate::take_once::TakeOnce;

/// A driver session that is closed on a blocking thread when dropped: closing an Oracle
/// connection is a round trip (logoff), which must not block the async runtime.
pub(crate) struct Closer<S: Session>(TakeOnce<S>);

impl<S: Session> Closer<S> {
    pub(crate) fn new(session: S) -> Self {
        Self(TakeOnce::new(session))
    }
}

impl<S: Session> Deref for Closer<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.0
    }
}

impl<S: Session> DerefMut for Closer<S> {
    fn deref_mut(&mut self) -> &mut S {
        &mut self.0
    }
}

impl<S: Session> Drop for Closer<S> {
    fn drop(&mut self) {
        let Some(session) = self.0.take() else { return };
        match tokio::runtime::Handle::try_current() {
            // Also right on a blocking thread: one more short blocking task.
            Ok(rt) => drop(rt.spawn_blocking(move || drop(session))),
            Err(_) => drop(session),
        }
    }
}

/// The session and what the pool knows about it. Moves to the blocking thread with each
/// call and comes back with the answer, so a call whose future is dropped keeps it.
pub(crate) struct Held<S: Session> {
    pub(crate) session: Closer<S>,
    /// A call failed in a way that leaves the connection unusable.
    pub(crate) lost: bool,
    /// A statement ran since the last commit or rollback that may have opened a
    /// transaction. The driver does not expose the server's transaction flag, so this is
    /// the pool's own conservative record.
    pub(crate) tx_maybe_open: bool,
    /// The rollback of a reset failed (the connection itself is fine).
    pub(crate) reset_failed: bool,
}

enum Slot<S: Session> {
    /// Idle, on this side.
    Idle(Held<S>),
    /// On a blocking thread, running a call.
    Busy(JoinHandle<Held<S>>),
    /// Lost with a panicking call.
    Gone,
}

/// A pooled Oracle connection. Reach it through the pool's handle (it dereferences here).
///
/// Every method runs its driver call on tokio's blocking pool (`spawn_blocking`), under
/// the handle's end-user security context: the driver attaches the context to every
/// round trip, and the pool sets it on the driver right before the call and clears it
/// right after, so the driver never holds a context between calls.
///
/// If a method's future is dropped (cancelled) while its call runs, the call still
/// finishes on its blocking thread and keeps the driver connection; a release before it
/// finishes discards the connection ([`DiscardReason::InFlight`]). The next method on the
/// same handle first waits for it.
///
/// SQL takes bind values only ([`Params`]); nothing is spliced into SQL text.
pub struct OracleConnection<S: Session = oracledb::Connection> {
    slot: Slot<S>,
    context: Option<SecurityContext>,
    driver_context: Option<DriverContext>,
}

impl<S: Session> fmt::Debug for OracleConnection<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.slot {
            Slot::Idle(h) if h.lost => "lost",
            Slot::Idle(_) => "idle",
            Slot::Busy(_) => "busy",
            Slot::Gone => "gone",
        };
        f.debug_struct("OracleConnection")
            .field("state", &state)
            .field("context", &self.driver_context)
            .finish()
    }
}

impl<S: Session> OracleConnection<S> {
    pub(crate) fn new(session: Closer<S>) -> Self {
        Self {
            slot: Slot::Idle(Held {
                session,
                lost: false,
                tx_maybe_open: false,
                reset_failed: false,
            }),
            context: None,
            driver_context: None,
        }
    }

    /// Runs a statement (DML, DDL, PL/SQL) with positional bind values; returns the rows
    /// affected. The work is not committed: call [`commit`](Self::commit), or it is rolled
    /// back before the connection is reused.
    pub async fn execute(
        &mut self,
        sql: impl Into<String>,
        params: impl Into<Params>,
    ) -> Result<u64, OracleError> {
        let (sql, params) = (sql.into(), params.into());
        self.call(true, move |h| {
            h.tx_maybe_open = true;
            h.session.execute(&sql, &params)
        })
        .await
    }

    /// Runs a query with positional bind values and fetches every row.
    ///
    /// Rows are owned, but a LOB, cursor or object value in a row still refers to this
    /// connection: read such values inside [`with_connection`](Self::with_connection) (or
    /// select them as text or bytes), never after the handle is released.
    pub async fn query(
        &mut self,
        sql: impl Into<String>,
        params: impl Into<Params>,
    ) -> Result<Vec<S::Row>, OracleError> {
        let (sql, params) = (sql.into(), params.into());
        self.call(true, move |h| {
            if may_open_transaction(&sql) {
                h.tx_maybe_open = true;
            }
            h.session.query(&sql, &params)
        })
        .await
    }

    /// Commits the transaction.
    pub async fn commit(&mut self) -> Result<(), OracleError> {
        self.call(true, |h| {
            h.session.commit()?;
            h.tx_maybe_open = false;
            Ok(())
        })
        .await
    }

    /// Rolls the transaction back.
    pub async fn rollback(&mut self) -> Result<(), OracleError> {
        self.call(true, |h| {
            h.session.rollback()?;
            h.tx_maybe_open = false;
            Ok(())
        })
        .await
    }

    /// One round trip to the server, under the context (so it also checks that the
    /// database accepts the context).
    pub async fn ping(&mut self) -> Result<(), OracleError> {
        self.call(true, |h| h.session.ping()).await
    }

    /// Runs `f` on the driver connection, on a blocking thread, under the context: for
    /// everything the methods above do not cover (named binds, batches, LOBs, PL/SQL out
    /// binds). Whatever `f` runs counts as possibly leaving a transaction open, so the
    /// connection is rolled back before reuse unless you [`commit`](Self::commit).
    ///
    /// Do not set or clear the driver's end-user security context inside `f`: the pool
    /// owns it, and clears the driver's after `f` returns whatever `f` did.
    pub async fn with_connection<F, R>(&mut self, f: F) -> Result<R, OracleError>
    where
        F: FnOnce(&S::Raw) -> R + Send + 'static,
        R: Send + 'static,
    {
        self.call(true, move |h| {
            h.tx_maybe_open = true;
            Ok(f(h.session.raw()))
        })
        .await
    }

    /// Whether a call left running by a dropped future has finished (its session is not
    /// back in the slot until the next settle).
    #[cfg(test)]
    pub(crate) fn call_finished(&self) -> bool {
        matches!(&self.slot, Slot::Busy(handle) if handle.is_finished())
    }

    /// Whether a statement since the last commit or rollback may have left a transaction
    /// open (it will be rolled back before the connection is reused).
    pub fn may_have_open_transaction(&self) -> bool {
        matches!(&self.slot, Slot::Idle(h) if h.tx_maybe_open)
    }

    /// Runs `op` on a blocking thread with the driver session, under the attached
    /// context if `with_context`.
    pub(crate) async fn call<R, F>(&mut self, with_context: bool, op: F) -> Result<R, OracleError>
    where
        F: FnOnce(&mut Held<S>) -> Result<R, OracleError> + Send + 'static,
        R: Send + 'static,
    {
        let mut held = self.take_held().await?;
        let context = if with_context {
            self.driver_context.clone()
        } else {
            None
        };
        let (tx, rx) = oneshot::channel();
        let handle = tokio::task::spawn_blocking(move || {
            let result = run_blocking(&mut held, context.as_ref(), op);
            let _ = tx.send(result);
            held
        });
        // From here until the call comes back, the session lives in the blocking task; a
        // drop of this future leaves the handle in the slot.
        self.slot = Slot::Busy(handle);
        self.settle().await?;
        rx.await.unwrap_or(Err(OracleError::Lost))
    }

    /// Takes the idle session out, first waiting for a call a cancelled future left.
    async fn take_held(&mut self) -> Result<Held<S>, OracleError> {
        self.settle().await?;
        match std::mem::replace(&mut self.slot, Slot::Gone) {
            Slot::Idle(held) if held.lost => {
                self.slot = Slot::Idle(held);
                Err(OracleError::Lost)
            }
            Slot::Idle(held) => Ok(held),
            Slot::Busy(_) | Slot::Gone => Err(OracleError::Lost),
        }
    }

    /// Waits for a call in flight, if any, and puts its session back.
    async fn settle(&mut self) -> Result<(), OracleError> {
        let Slot::Busy(handle) = &mut self.slot else {
            return Ok(());
        };
        match handle.await {
            Ok(held) => {
                self.slot = Slot::Idle(held);
                Ok(())
            }
            Err(e) => {
                self.slot = Slot::Gone;
                Err(if e.is_panic() {
                    OracleError::BlockingPanicked
                } else {
                    OracleError::BlockingCancelled
                })
            }
        }
    }

    /// Puts the session back from a call that has finished, without waiting: one poll
    /// with a no-op waker. Still running: stays busy.
    fn settle_now(&mut self) {
        let Slot::Busy(handle) = &mut self.slot else {
            return;
        };
        if !handle.is_finished() {
            return;
        }
        match Pin::new(handle).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(held)) => self.slot = Slot::Idle(held),
            Poll::Ready(Err(_)) => self.slot = Slot::Gone,
            // tokio's cooperative budget can defer even a finished task: treat as busy.
            Poll::Pending => {}
        }
    }

    /// Starts the reset of a released connection on a blocking thread: clear the
    /// context, then roll back. Nothing runs on this thread (no I/O here), so release can
    /// call it; outside a tokio runtime it does nothing and recycle does it instead.
    /// Starting it at release, not at the next checkout, releases the row locks the
    /// holder's uncommitted work took as soon as the holder is done.
    fn start_reset(&mut self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut held = match std::mem::replace(&mut self.slot, Slot::Gone) {
            Slot::Idle(held) => held,
            // Only called on an idle connection; anything else is left as it was.
            other => {
                self.slot = other;
                return;
            }
        };
        self.slot = Slot::Busy(rt.spawn_blocking(move || {
            reset_blocking(&mut held);
            held
        }));
    }

    /// The recycle step: wait for the reset release started (or run it now), and vouch
    /// for the connection only if it succeeded. No I/O when nothing may be open.
    pub(crate) async fn recycle(&mut self) -> Result<(), DiscardReason> {
        // The pool cleared the context at release; clear again so nothing below can
        // carry one.
        self.clear_context();
        if let Slot::Idle(h) = &self.slot {
            if h.tx_maybe_open && !h.lost && !h.reset_failed {
                // Release ran outside a runtime and could not start the reset.
                self.start_reset();
            }
        }
        // Bounded by the pool's recycle timeout: if it expires, the connection is
        // discarded with the reset still running, and never handed out.
        if self.settle().await.is_err() {
            return Err(DiscardReason::Lost);
        }
        match &self.slot {
            Slot::Busy(_) => Err(DiscardReason::InFlight),
            Slot::Gone => Err(DiscardReason::Lost),
            Slot::Idle(h) if h.lost => Err(DiscardReason::Lost),
            Slot::Idle(h) if h.reset_failed || h.tx_maybe_open => Err(DiscardReason::ResetFailed),
            Slot::Idle(_) => Ok(()),
        }
    }
}

/// Resets a released session: clear the context first, so that the rollback can never
/// run under the last holder's context, then roll back.
fn reset_blocking<S: Session>(held: &mut Held<S>) {
    let reset = held
        .session
        .clear_context()
        .and_then(|()| held.session.rollback());
    match reset {
        Ok(()) => held.tx_maybe_open = false,
        Err(e) if e.severity() == Severity::Fatal => held.lost = true,
        Err(_) => held.reset_failed = true,
    }
}

/// The body of every blocking call: set the context, run, clear, and record what the
/// outcome means for the connection.
fn run_blocking<S: Session, R>(
    held: &mut Held<S>,
    context: Option<&DriverContext>,
    op: impl FnOnce(&mut Held<S>) -> Result<R, OracleError>,
) -> Result<R, OracleError> {
    let result = match context {
        // A context the driver refuses (no TLS, no Deep Data Security) fails the call
        // before anything is sent: fail closed, never run as the plain login.
        Some(context) => held.session.set_context(context).and_then(|()| op(held)),
        None => op(held),
    };
    // The driver must hold no context between calls, whatever happened above (a LOB read
    // through a returned row would otherwise carry it).
    if held.session.clear_context().is_err() {
        held.lost = true;
    }
    if let Err(e) = &result {
        if e.severity() == Severity::Fatal {
            held.lost = true;
        }
    }
    result
}

impl<S: Session> Connection for OracleConnection<S> {
    type AttachError = OracleError;

    fn attach_context(&mut self, context: SecurityContext) -> Result<(), OracleError> {
        // Translation and encoding are pure CPU work: no I/O here. The driver gets the
        // context inside the next call.
        match translate(&context) {
            Ok(driver) => {
                self.driver_context = Some(driver);
                self.context = Some(context);
                Ok(())
            }
            Err(e) => {
                self.clear_context();
                Err(e)
            }
        }
    }

    fn clear_context(&mut self) {
        self.context = None;
        self.driver_context = None;
    }

    fn context(&self) -> Option<&SecurityContext> {
        self.context.as_ref()
    }

    fn check_release(&mut self) -> Result<(), DiscardReason> {
        self.settle_now();
        match &self.slot {
            Slot::Busy(_) => Err(DiscardReason::InFlight),
            Slot::Gone => Err(DiscardReason::Lost),
            Slot::Idle(h) if h.lost => Err(DiscardReason::Lost),
            Slot::Idle(h) if h.tx_maybe_open => {
                // Possibly open work: roll it back on a blocking thread, with the context
                // cleared; the recycle step waits for it before anyone else gets the
                // connection, and discards the connection if it failed.
                self.start_reset();
                Ok(())
            }
            Slot::Idle(_) => Ok(()),
        }
    }
}
