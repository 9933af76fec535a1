//! Errors of the pool layer.

use std::fmt;

use crate::provider::ProviderError;

/// Which of the pool's timeouts expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimeoutType {
    /// No connection became free within the wait timeout.
    Wait,
    /// Opening a connection took longer than the create timeout.
    Create,
    /// Checking an idle connection took longer than the recycle timeout.
    Recycle,
    /// Completing the security context took longer than the apply timeout.
    Apply,
}

impl TimeoutType {
    /// The timeout as a metric label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Wait => "wait",
            Self::Create => "create",
            Self::Recycle => "recycle",
            Self::Apply => "apply",
        }
    }
}

impl fmt::Display for TimeoutType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Wait => "no connection became free within the wait timeout",
            Self::Create => "opening a connection exceeded the create timeout",
            Self::Recycle => "checking an idle connection exceeded the recycle timeout",
            Self::Apply => "completing the security context exceeded the apply timeout",
        })
    }
}

/// Why the pool could not hand out a connection. `E` is the backend's connect error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError<E: std::error::Error + 'static> {
    /// A timeout expired.
    #[error("{0}")]
    Timeout(TimeoutType),
    /// The backend could not open a connection.
    #[error("could not open a connection: {0}")]
    Backend(#[source] E),
    /// The pool was closed.
    #[error("the pool is closed")]
    Closed,
    /// `acquire_as` was given an identity, but the pool has no context provider to complete
    /// it. Fails closed: a plain connection is never handed out instead.
    #[error(
        "acquire_as was given an identity but the pool has no context provider: \
         pass a SecurityContext or build the pool with a provider"
    )]
    NoProvider,
    /// The backend refused to map the context onto a session (e.g. a role outside its
    /// allow-list). No SQL was sent, and the connection went back to the pool.
    #[error("the backend refused the security context: {0}")]
    ContextRejected(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The provider could not complete the identity into a security context.
    #[error("the security context could not be completed: {0}")]
    Provider(#[source] ProviderError),
    /// A deadpool condition ctxpool never sets up (no runtime, a hook error). Report it.
    #[error("unexpected pool condition: {0}")]
    Unexpected(&'static str),
}

/// Why a pool could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// `max_size` was 0.
    #[error("max_size must be at least 1")]
    ZeroMaxSize,
    /// A timeout was zero.
    #[error("the {} timeout must be longer than zero", .0.as_str())]
    ZeroTimeout(TimeoutType),
    /// deadpool refused a configuration ctxpool never gives it. Report it.
    #[error("unexpected build failure: {0}")]
    Unexpected(&'static str),
}
