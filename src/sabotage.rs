//! Switches that break the PostgreSQL backend's safety on purpose, so that a test can show
//! its checks would catch the breakage (a property test that still passes with them on
//! proves nothing). Process-wide: use them only in a test binary of their own.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static SKIP_RESET: AtomicBool = AtomicBool::new(false);
static IGNORE_STATUS: AtomicBool = AtomicBool::new(false);
static TRUST_PGPOOL: AtomicBool = AtomicBool::new(false);
/// The injection position plus one; zero for none.
static INJECT_AT: AtomicUsize = AtomicUsize::new(0);

/// The statement [`inject_error_at`] adds: division by zero, SQLSTATE `22012`.
pub const INJECTED_ERROR_SQL: &str = "SELECT 1 / 0 /* ctxpool: injected error */";

/// Never send the session reset.
pub fn skip_reset(on: bool) {
    SKIP_RESET.store(on, Ordering::SeqCst);
}

/// Take every connection back as idle, whatever the server's last transaction status.
pub fn ignore_status(on: bool) {
    IGNORE_STATUS.store(on, Ordering::SeqCst);
}

/// Take every pgpool-II for one whose settings keep a context with the statement after
/// it, whatever `SHOW pool_status` reports.
pub fn trust_pgpool(on: bool) {
    TRUST_PGPOOL.store(on, Ordering::SeqCst);
}

/// Adds a failing statement ([`INJECTED_ERROR_SQL`]) to every batch of the pool's
/// statements from now on, at this position: `0..=b` before the `b` statements that go
/// before the anchor request (`b` is just before it), `b + 1..=b + 1 + a` among the `a`
/// that go after it (the last of those is just before the user's statement). A position
/// past the end adds nothing. `None` turns it off.
pub fn inject_error_at(position: Option<usize>) {
    INJECT_AT.store(
        position.map_or(0, |p| p.saturating_add(1)),
        Ordering::SeqCst,
    );
}

#[cfg(feature = "postgres")]
pub(crate) fn injected_error_position() -> Option<usize> {
    INJECT_AT.load(Ordering::Relaxed).checked_sub(1)
}

#[cfg(feature = "postgres")]
pub(crate) fn reset_skipped() -> bool {
    SKIP_RESET.load(Ordering::Relaxed)
}

#[cfg(feature = "postgres")]
pub(crate) fn status_ignored() -> bool {
    IGNORE_STATUS.load(Ordering::Relaxed)
}

#[cfg(feature = "postgres")]
pub(crate) fn pgpool_trusted() -> bool {
    TRUST_PGPOOL.load(Ordering::Relaxed)
}
