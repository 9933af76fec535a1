//! The deadpool manager: opens connections and vouches for idle ones under our timeouts.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use deadpool::managed::{self, RecycleError, RecycleResult};

use crate::backend::{Backend, DiscardReason};

use super::error::TimeoutType;
use super::metrics;

/// Why the manager could not open a connection.
#[derive(Debug)]
pub(crate) enum ManagerError<E> {
    Backend(E),
    CreateTimeout,
}

/// Adapts a [`Backend`] to deadpool. Timeouts are applied here rather than by deadpool so
/// that a check which completes at once never arms a timer (see [`lazy_timeout`]).
pub(crate) struct Manager<B> {
    pub(crate) backend: B,
    pub(crate) create_timeout: Duration,
    pub(crate) recycle_timeout: Duration,
}

impl<B: Backend> managed::Manager for Manager<B> {
    type Type = B::Connection;
    type Error = ManagerError<B::Error>;

    async fn create(&self) -> Result<B::Connection, Self::Error> {
        match tokio::time::timeout(self.create_timeout, self.backend.connect()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(ManagerError::Backend(e)),
            Err(_) => {
                metrics::timed_out(TimeoutType::Create);
                Err(ManagerError::CreateTimeout)
            }
        }
    }

    async fn recycle(
        &self,
        conn: &mut B::Connection,
        _: &managed::Metrics,
    ) -> RecycleResult<Self::Error> {
        let verdict = match lazy_timeout(self.recycle_timeout, self.backend.recycle(conn)).await {
            Some(verdict) => verdict,
            None => {
                metrics::timed_out(TimeoutType::Recycle);
                Err(DiscardReason::RecycleTimeout)
            }
        };
        // deadpool drops a connection whose recycle fails and serves the acquirer with
        // another idle one or a new one.
        verdict.map_err(|reason| {
            metrics::discarded(reason);
            RecycleError::message(reason.as_str())
        })
    }
}

/// Awaits `fut` for at most `limit`, arming the timer only if the first poll is pending.
///
/// Most recycle checks complete without I/O; `tokio::time::timeout` would read the clock
/// and register with the runtime's timer on every checkout, a third of the cost of a
/// deadpool `get`. `None` means the limit expired.
pub(crate) async fn lazy_timeout<F: Future>(limit: Duration, fut: F) -> Option<F::Output> {
    let mut fut = pin!(fut);
    if let Poll::Ready(out) = poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        return Some(out);
    }
    tokio::time::timeout(limit, fut).await.ok()
}
