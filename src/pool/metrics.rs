//! The metric names the pool records through the [`metrics`] facade.
//!
//! No label carries an identity, a token or any other part of a context.

use crate::backend::DiscardReason;

use super::error::TimeoutType;

/// Connections handed out by [`Pool::get`](crate::Pool::get).
pub const ACQUIRED: &str = "ctxpool_acquired_total";
/// Connections handed out by [`Pool::acquire_as`](crate::Pool::acquire_as).
pub const ACQUIRED_AS: &str = "ctxpool_acquired_as_total";
/// Contexts attached to a handle (by `acquire_as` or `set_end_user_security_context`).
pub const CONTEXTS_APPLIED: &str = "ctxpool_contexts_applied_total";
/// Connections discarded instead of reused; label `reason` ([`DiscardReason::as_str`]).
pub const DISCARDED: &str = "ctxpool_discarded_total";
/// Timeouts; label `kind` ([`TimeoutType::as_str`]).
pub const TIMEOUTS: &str = "ctxpool_timeouts_total";

/// Handles of the hot-path counters, registered once per pool: with a real recorder,
/// `counter!` is a registry lookup on every call.
pub(crate) struct Counters {
    pub(crate) acquired: metrics::Counter,
    pub(crate) acquired_as: metrics::Counter,
    pub(crate) contexts_applied: metrics::Counter,
}

impl Counters {
    pub(crate) fn register() -> Self {
        Self {
            acquired: metrics::counter!(ACQUIRED),
            acquired_as: metrics::counter!(ACQUIRED_AS),
            contexts_applied: metrics::counter!(CONTEXTS_APPLIED),
        }
    }
}

pub(crate) fn discarded(reason: DiscardReason) {
    tracing::debug!(reason = reason.as_str(), "ctxpool: connection discarded");
    metrics::counter!(DISCARDED, "reason" => reason.as_str()).increment(1);
}

pub(crate) fn timed_out(kind: TimeoutType) {
    tracing::debug!(kind = kind.as_str(), "ctxpool: timeout");
    metrics::counter!(TIMEOUTS, "kind" => kind.as_str()).increment(1);
}
