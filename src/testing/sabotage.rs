//! Switches that break the PostgreSQL backend's safety on purpose, so that a test can show
//! its checks would catch the breakage (a property test that still passes with them on
//! proves nothing). Process-wide: use them only in a test binary of their own.

use std::sync::atomic::{AtomicBool, Ordering};

static SKIP_RESET: AtomicBool = AtomicBool::new(false);
static IGNORE_STATUS: AtomicBool = AtomicBool::new(false);

/// Never send the session reset.
pub fn skip_reset(on: bool) {
    SKIP_RESET.store(on, Ordering::SeqCst);
}

/// Take every connection back as idle, whatever the server's last transaction status.
pub fn ignore_status(on: bool) {
    IGNORE_STATUS.store(on, Ordering::SeqCst);
}

#[cfg(feature = "postgres")]
pub(crate) fn reset_skipped() -> bool {
    SKIP_RESET.load(Ordering::Relaxed)
}

#[cfg(feature = "postgres")]
pub(crate) fn status_ignored() -> bool {
    IGNORE_STATUS.load(Ordering::Relaxed)
}
