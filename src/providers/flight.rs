//! Single flight: of the callers that need the same fetch at the same time, one (the
//! leader) makes it and the others wait for its outcome.
//!
//! [`Flights`] is only the bookkeeping. It has no lock of its own: its owner keeps it
//! under the lock that guards what the fetch fills in, so that "is it there, is someone
//! fetching it, then I will" is one decision and "store it, end the flight" another. The
//! token cache and the validator's key set use it this way.
//!
//! A leader that goes away without an outcome (its future dropped, its fetch panicked)
//! drops its [`Leader`]: the waiters wake with nothing and join again, and the next of
//! them to do so leads. Nothing needs a guard for that, and nobody waits forever.

use std::collections::HashMap;
use std::hash::Hash;

use tokio::sync::watch;

/// The fetches in progress, by what they fetch. `T` is the outcome every caller of one
/// fetch receives.
pub(crate) struct Flights<K, T> {
    running: HashMap<K, Running<T>>,
    next_id: u64,
}

struct Running<T> {
    id: u64,
    outcome: watch::Receiver<Option<T>>,
}

impl<T> Running<T> {
    /// Whether the leader went away without landing: its sender is gone.
    fn abandoned(&self) -> bool {
        self.outcome.has_changed().is_err()
    }
}

/// What a caller does about a fetch: wait for the one in progress, or make it.
pub(crate) enum Turn<T> {
    /// Another caller is fetching.
    Wait(Waiter<T>),
    /// This caller fetches, then [`land`](Flights::land)s the outcome.
    Lead(Leader<T>),
}

/// A waiting caller's view of a flight.
pub(crate) struct Waiter<T>(watch::Receiver<Option<T>>);

/// The leading caller's hold on a flight. Dropped without landing, it wakes the waiters
/// with nothing.
pub(crate) struct Leader<T> {
    id: u64,
    sender: watch::Sender<Option<T>>,
}

impl<K, T> Default for Flights<K, T> {
    fn default() -> Self {
        Self {
            running: HashMap::new(),
            next_id: 0,
        }
    }
}

impl<K: Eq + Hash + Clone, T: Clone> Flights<K, T> {
    /// Whether a fetch of `key` is in progress.
    pub(crate) fn is_running(&self, key: &K) -> bool {
        self.running.get(key).is_some_and(|f| !f.abandoned())
    }

    /// Joins the fetch of `key` in progress, or starts one that this caller leads.
    pub(crate) fn join(&mut self, key: &K) -> Turn<T> {
        if let Some(flight) = self.running.get(key)
            && !flight.abandoned()
        {
            return Turn::Wait(Waiter(flight.outcome.clone()));
        }
        // Abandoned flights are only ever replaced, so this is where they go: it keeps
        // the map as small as the fetches in progress.
        self.running.retain(|_, f| !f.abandoned());
        self.next_id += 1;
        let id = self.next_id;
        let (sender, outcome) = watch::channel(None);
        self.running.insert(key.clone(), Running { id, outcome });
        Turn::Lead(Leader { id, sender })
    }

    /// Ends the leader's flight of `key` and hands `outcome` to its waiters. Called under
    /// the owner's lock, after the owner stored what was fetched: a caller arriving later
    /// finds it stored, and every earlier waiter still receives `outcome`.
    pub(crate) fn land(&mut self, key: &K, leader: Leader<T>, outcome: T) {
        // Only this leader's own flight: a flight is replaced only once abandoned, which
        // a leader that lands has not been, but the id keeps that from being a premise.
        if self.running.get(key).is_some_and(|f| f.id == leader.id) {
            self.running.remove(key);
        }
        leader.sender.send_replace(Some(outcome));
    }
}

impl<T: Clone> Waiter<T> {
    /// The leader's outcome, or `None` if the leader went away without one: then join
    /// again.
    pub(crate) async fn outcome(mut self) -> Option<T> {
        // Copied out at once: the borrow holds the channel's lock.
        self.0
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|seen| seen.clone())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn lead(flights: &mut Flights<&'static str, u32>, key: &'static str) -> Leader<u32> {
        match flights.join(&key) {
            Turn::Lead(leader) => leader,
            Turn::Wait(_) => panic!("expected to lead"),
        }
    }

    fn wait(flights: &mut Flights<&'static str, u32>, key: &'static str) -> Waiter<u32> {
        match flights.join(&key) {
            Turn::Wait(waiter) => waiter,
            Turn::Lead(_) => panic!("expected to wait"),
        }
    }

    #[tokio::test]
    async fn waiters_receive_the_leaders_outcome() {
        let mut flights = Flights::default();
        let leader = lead(&mut flights, "a");
        let waiter = wait(&mut flights, "a");
        // Another key is another flight.
        let _other = lead(&mut flights, "b");
        assert!(flights.is_running(&"a"));
        flights.land(&"a", leader, 7);
        assert!(!flights.is_running(&"a"));
        assert_eq!(waiter.outcome().await, Some(7));
        // Landed: the next caller leads a new flight.
        let _again = lead(&mut flights, "a");
    }

    #[tokio::test]
    async fn an_abandoned_flight_wakes_its_waiters_and_is_led_again() {
        let mut flights = Flights::default();
        let leader = lead(&mut flights, "a");
        let waiter = wait(&mut flights, "a");
        drop(leader);
        assert!(!flights.is_running(&"a"));
        assert_eq!(waiter.outcome().await, None);
        let leader = lead(&mut flights, "a");
        let waiter = wait(&mut flights, "a");
        flights.land(&"a", leader, 8);
        assert_eq!(waiter.outcome().await, Some(8));
        assert!(flights.running.is_empty());
    }
}
