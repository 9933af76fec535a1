//! The pooled handle: a connection checked out under at most one end user's context.

use std::fmt;
use std::ops::{Deref, DerefMut};

use deadpool::managed;

use crate::backend::{Backend, Connection, DiscardReason};
use crate::context::SecurityContext;
use crate::take_once::TakeOnce;

use super::manager::Manager;

/// The error a backend's connection refuses a context with.
pub type AttachError<B> = <<B as Backend>::Connection as Connection>::AttachError;
use super::metrics;

/// A connection checked out of a [`Pool`](super::Pool).
///
/// It dereferences to the backend's connection type, whose statements run under the
/// handle's security context. Setting or clearing the context costs no round trip: the
/// backend carries it on the next statement.
///
/// Dropping the handle always clears its context, whatever the exit path: a normal drop,
/// a cancelled future, a panic. The connection goes back to the pool only if the backend
/// proves it idle; otherwise it is discarded and the reason is counted
/// ([`DiscardReason`]). Either way its slot is freed at once.
#[must_use = "dropping the handle returns the connection to the pool at once"]
pub struct Object<B: Backend> {
    // `Drop` and `take` move the deadpool object out, once.
    inner: TakeOnce<managed::Object<Manager<B>>>,
}

impl<B: Backend> Object<B> {
    pub(crate) fn new(inner: managed::Object<Manager<B>>) -> Self {
        Self {
            inner: TakeOnce::new(inner),
        }
    }

    /// Sets the end-user security context the following statements run under, replacing
    /// any previous one. No I/O: the context is piggybacked on the next statement.
    ///
    /// A context the backend cannot map (a role outside its allow-list, say) is refused
    /// here, before any SQL is sent, and the handle is left with no context: fail closed.
    pub fn set_end_user_security_context(
        &mut self,
        context: &SecurityContext,
    ) -> Result<(), AttachError<B>> {
        self.attach(context.clone())?;
        ::metrics::counter!(metrics::CONTEXTS_APPLIED).increment(1);
        Ok(())
    }

    /// Attaches without counting: the pool counts through its cached handles.
    pub(crate) fn attach(&mut self, context: SecurityContext) -> Result<(), AttachError<B>> {
        let attached = self.inner.attach_context(context);
        if attached.is_err() {
            self.inner.clear_context();
        }
        attached
    }

    /// Clears the end-user security context: the following statements run as the pool's
    /// least-privileged login. No I/O. Release does this too, on every exit path.
    pub fn clear_end_user_security_context(&mut self) {
        self.inner.clear_context();
    }

    /// The context the next statement runs under, if any.
    pub fn end_user_security_context(&self) -> Option<&SecurityContext> {
        self.inner.context()
    }

    /// The pool-wide unique id of this connection.
    pub fn id(this: &Self) -> managed::ObjectId {
        managed::Object::id(&this.inner)
    }

    /// When this connection was created and last recycled, and how often.
    pub fn metrics(this: &Self) -> &managed::Metrics {
        managed::Object::metrics(&this.inner)
    }

    /// Takes the connection out of the pool for good, with its context cleared. The pool's
    /// size shrinks by one, so a new connection may be opened in its place.
    pub fn take(mut this: Self) -> B::Connection {
        // Only `drop` takes it otherwise, and that has not run yet. When `this` drops at
        // the end, its `Drop` finds nothing left to do.
        let Some(inner) = this.inner.take() else {
            unreachable!("a handle's connection is taken only by `take` or `drop`")
        };
        let mut conn = managed::Object::take(inner);
        conn.clear_context();
        conn
    }
}

impl<B: Backend> Drop for Object<B> {
    fn drop(&mut self) {
        // Nothing left: `Object::take` has taken the connection out of the pool.
        let Some(mut inner) = self.inner.take() else {
            return;
        };
        let _span = tracing::trace_span!("ctxpool.release").entered();
        // Clear first: nothing the checks below decide may depend on the old context.
        inner.clear_context();
        let verdict = if std::thread::panicking() {
            Err(DiscardReason::Panicked)
        } else {
            inner.check_release()
        };
        match verdict {
            // deadpool's own drop puts it back in the idle queue.
            Ok(()) => drop(inner),
            Err(reason) => {
                metrics::discarded(reason);
                // Detaches it from the pool (size - 1) and closes it.
                drop(managed::Object::take(inner));
            }
        }
    }
}

impl<B: Backend> Deref for Object<B> {
    type Target = B::Connection;
    fn deref(&self) -> &B::Connection {
        &self.inner
    }
}

impl<B: Backend> DerefMut for Object<B> {
    fn deref_mut(&mut self) -> &mut B::Connection {
        &mut self.inner
    }
}

impl<B: Backend> fmt::Debug for Object<B>
where
    B::Connection: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Object")
            .field("connection", &**self.inner)
            .finish()
    }
}
