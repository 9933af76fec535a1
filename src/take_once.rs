//! The one idiom for a value that its owner gives up exactly once: in `Drop`, or in a
//! method that consumes the owner (and then runs `Drop` on what is left).

use std::ops::{Deref, DerefMut};

/// A value held until it is taken, once.
///
/// Owners whose `Drop` must move a field out (to hand a connection back, to close a
/// session on another thread) keep it in a `TakeOnce`. Dereferencing checks that the
/// value is still there: a branch the processor predicts every time, where moving the
/// value out without it would need code the compiler cannot check.
pub(crate) struct TakeOnce<T>(Option<T>);

impl<T> TakeOnce<T> {
    pub(crate) fn new(value: T) -> Self {
        Self(Some(value))
    }

    /// The value, the first time; `None` after that, so that a `Drop` running after a
    /// consuming method knows there is nothing left to do.
    pub(crate) fn take(&mut self) -> Option<T> {
        self.0.take()
    }
}

impl<T> Deref for TakeOnce<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // Only the owner's `Drop` or a method consuming the owner takes the value, and
        // neither dereferences afterwards.
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("value used after it was taken"))
    }
}

impl<T> DerefMut for TakeOnce<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.0
            .as_mut()
            .unwrap_or_else(|| unreachable!("value used after it was taken"))
    }
}

#[cfg(test)]
mod tests {
    use super::TakeOnce;

    #[test]
    fn the_value_is_taken_once() {
        let mut held = TakeOnce::new(String::from("a"));
        held.push('b');
        assert_eq!(&*held, "ab");
        assert_eq!(held.take().as_deref(), Some("ab"));
        assert_eq!(held.take(), None);
    }
}
