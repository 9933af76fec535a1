//! Pool configuration: size, queue order and the four timeouts.

use std::time::Duration;

pub use deadpool::managed::QueueMode;

/// The pool's timeouts. All are finite: a pool never waits forever.
///
/// Each has its own error ([`TimeoutType`](super::TimeoutType)) and its own label in the
/// `ctxpool_timeouts_total` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Waiting for a free slot when all connections are checked out. Default 30 s.
    pub wait: Duration,
    /// Opening a new connection. Default 10 s.
    pub create: Duration,
    /// The backend's check of an idle connection before reuse. Default 5 s. A connection
    /// whose check times out is discarded and the acquirer is served by another one.
    pub recycle: Duration,
    /// Completing an identity into a security context through the pool's provider
    /// (fetching a database-access token). Default 10 s.
    pub apply: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            wait: Duration::from_secs(30),
            create: Duration::from_secs(10),
            recycle: Duration::from_secs(5),
            apply: Duration::from_secs(10),
        }
    }
}

/// The pool's configuration.
#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    /// The most connections the pool holds at once. Default: four per CPU, as deadpool.
    pub max_size: usize,
    /// The timeouts.
    pub timeouts: Timeouts,
    /// Which idle connection is handed out first. Default FIFO, as deadpool.
    pub queue_mode: QueueMode,
}

impl From<deadpool::managed::PoolConfig> for PoolConfig {
    /// deadpool's configuration, with its unset (infinite) timeouts replaced by ctxpool's
    /// finite defaults.
    fn from(c: deadpool::managed::PoolConfig) -> Self {
        let d = Timeouts::default();
        Self {
            max_size: c.max_size,
            timeouts: Timeouts {
                wait: c.timeouts.wait.unwrap_or(d.wait),
                create: c.timeouts.create.unwrap_or(d.create),
                recycle: c.timeouts.recycle.unwrap_or(d.recycle),
                apply: d.apply,
            },
            queue_mode: c.queue_mode,
        }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_size: std::thread::available_parallelism().map_or(4, |n| n.get() * 4),
            timeouts: Timeouts::default(),
            queue_mode: QueueMode::default(),
        }
    }
}
