//! Shared by the property tests: cancelling a future at a chosen poll, and keeping the
//! deliberate panics of a schedule out of the test output.

use std::future::Future;
use std::pin::Pin;
use std::sync::Once;
use std::task::{Context, Poll};

/// Resolves to `None` once the inner future has been polled `limit` times without
/// finishing, dropping it right there: a cancellation at that exact await point.
pub struct PollLimited<F> {
    inner: Option<Pin<Box<F>>>,
    left: u16,
}

impl<F> PollLimited<F> {
    pub fn new(inner: F, limit: u16) -> Self {
        Self {
            inner: Some(Box::pin(inner)),
            left: limit,
        }
    }
}

impl<F: Future> Future for PollLimited<F> {
    type Output = Option<F::Output>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.left == 0 {
            self.inner = None;
            return Poll::Ready(None);
        }
        self.left -= 1;
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match inner.as_mut().poll(cx) {
            Poll::Ready(v) => Poll::Ready(Some(v)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The message of a schedule's deliberate panics.
pub const DELIBERATE_PANIC: &str = "ctxpool-deliberate-panic";

/// Installs (once) a panic hook that stays quiet for [`DELIBERATE_PANIC`] and reports
/// every other panic as usual.
pub fn silence_deliberate_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let deliberate = payload
                .downcast_ref::<&str>()
                .is_some_and(|s| *s == DELIBERATE_PANIC)
                || payload
                    .downcast_ref::<String>()
                    .is_some_and(|s| s == DELIBERATE_PANIC);
            if !deliberate {
                default(info);
            }
        }));
    });
}
