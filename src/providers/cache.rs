//! The token cache: database-access tokens keyed by who asked for what, single-flight
//! fetching, expiry with a safety margin, refresh ahead, bounded per-user entries.
//!
//! The cache does not know how a token is fetched: [`TokenCache::get_or_fetch`] takes the
//! fetch as a closure, so that the HTTP token sources plug in and tests need no HTTP.
//!
//! # Semantics
//!
//! - **Proportional to the lifetime.** The margin and the refresh window are each the
//!   smaller of their configured duration and a share of the token's lifetime (by default
//!   60 s or 10 %, 300 s or 25 %), so that together they never take more than 35 % of
//!   it: a short-lived token is still served from the cache for most of its life.
//! - **Expiry.** A fetched token expires at `completion + expires_in - margin`, where
//!   `completion` is [`tokio::time::Instant::now`] when the fetch returned. A token whose
//!   `expires_in` is not longer than the margin (or zero: lifetime unknown) is handed to
//!   the callers of that fetch but not cached.
//! - **Hits.** A cached token is returned only while `now < expires_at`; at or after its
//!   (margin-adjusted) expiry it is a miss and is never returned.
//! - **Refresh ahead.** A hit less than the refresh window before expiry makes that caller
//!   fetch a new token (no background task). Callers arriving while that refresh runs get
//!   the still-valid cached token at once, without waiting. If the refresh fails while the
//!   cached token is still valid, the caller gets the cached token (the failure is logged
//!   at debug level); once past expiry, a failed fetch is an error.
//! - **Single flight.** Concurrent misses for one key make exactly one fetch; the others
//!   wait for its outcome. A failure reaches every waiter (as an equivalent
//!   [`ProviderError`], since the error is not `Clone`). If the fetching caller is
//!   cancelled (its future dropped) or its fetch panics, the waiters are woken and the
//!   next of them becomes the fetcher: nobody waits forever.
//! - **Bounds.** Per-user (on-behalf-of) entries are bounded by `max_user_entries`: when
//!   an insertion exceeds it, expired per-user entries go first, then the least recently
//!   used ones. Client-credential entries are one per configured provider and scope set,
//!   and are not bounded.
//!
//! With the defaults and steady use, a token of a given lifetime is fetched this often:
//!
//! | `expires_in` | margin | refresh window | served from cache for | fetches per hour |
//! |--------------|--------|----------------|-----------------------|------------------|
//! | 60 s         | 6 s    | 15 s           | 39 s                  | ≈ 92             |
//! | 300 s        | 30 s   | 75 s           | 195 s                 | ≈ 18             |
//! | 600 s        | 60 s   | 150 s          | 390 s                 | ≈ 9              |
//! | 3600 s       | 60 s   | 300 s          | 3240 s                | ≈ 1.1            |
//! | 86400 s      | 60 s   | 300 s          | 86040 s               | ≈ 0.04           |

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::flight::{Flights, Leader, Turn, Waiter};
use crate::ProviderError;

/// What a cached token was issued for: provider, authority, client, scopes and, for
/// on-behalf-of tokens, the end user (as a SHA-256 hash of the user assertion).
///
/// The assertion itself is never stored: the hash identifies the user without keeping a
/// credential in memory, and `Debug` shows at most a short prefix of the hash.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    provider: String,
    authority: String,
    client_id: String,
    // Kept in the order given: a different order is a different key, which costs at
    // most one extra fetch, whereas sorting would presume the identity provider treats
    // scope order as insignificant.
    scopes: Vec<String>,
    user: Option<[u8; 32]>,
}

impl CacheKey {
    /// The key of a client-credentials token: shared by every user of the provider.
    pub fn client_credentials(
        provider: &str,
        authority: &str,
        client_id: &str,
        scopes: &[String],
    ) -> Self {
        Self {
            provider: provider.to_owned(),
            authority: authority.to_owned(),
            client_id: client_id.to_owned(),
            scopes: scopes.to_vec(),
            user: None,
        }
    }

    /// The key of an on-behalf-of token for the user whose token is `assertion`. Only a
    /// SHA-256 hash of the assertion is kept.
    pub fn on_behalf_of(
        provider: &str,
        authority: &str,
        client_id: &str,
        scopes: &[String],
        assertion: &SecretString,
    ) -> Self {
        let digest = Sha256::digest(assertion.expose_secret().as_bytes());
        Self {
            user: Some(digest.into()),
            ..Self::client_credentials(provider, authority, client_id, scopes)
        }
    }

    /// Whether the key is for one end user (on-behalf-of), as opposed to shared client
    /// credentials. Per-user entries are the bounded ones.
    pub fn is_per_user(&self) -> bool {
        self.user.is_some()
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Four bytes of the hash tell entries apart in logs; they say nothing usable
        // about the assertion.
        let user = self.user.map(|hash| {
            let prefix: String = hash[..4].iter().map(|b| format!("{b:02x}")).collect();
            format!("sha256:{prefix}…")
        });
        f.debug_struct("CacheKey")
            .field("provider", &self.provider)
            .field("authority", &self.authority)
            .field("client_id", &self.client_id)
            .field("scopes", &self.scopes)
            .field("user", &user)
            .finish()
    }
}

/// A cached token and the instant from which it must no longer be used (the safety margin
/// already subtracted).
#[derive(Clone)]
pub struct CachedToken {
    /// The database-access token.
    pub token: SecretString,
    /// The token is valid while `now < expires_at`.
    pub expires_at: Instant,
    /// From this instant on, a hit also starts a refresh.
    pub refresh_at: Instant,
}

impl fmt::Debug for CachedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedToken")
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .field("refresh_at", &self.refresh_at)
            .finish()
    }
}

/// Tuning of a [`TokenCache`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheOptions {
    /// Subtracted from the token lifetime the identity provider announces, so that a
    /// token is not used so close to its expiry that the database sees it expired (clock
    /// skew, time in flight). At most this much, and at most
    /// [`safety_margin_percent`](Self::safety_margin_percent) of the lifetime.
    /// Default 60 s.
    pub safety_margin: Duration,
    /// A hit less than this long before the (margin-adjusted) expiry makes the caller
    /// fetch a new token, so that tokens are replaced before callers have to wait for
    /// one. At most this much, and at most
    /// [`refresh_ahead_percent`](Self::refresh_ahead_percent) of the lifetime. Default
    /// 300 s.
    pub refresh_ahead: Duration,
    /// The largest share of a token's lifetime taken as the margin, in percent (capped at
    /// 100). Default 10.
    pub safety_margin_percent: u8,
    /// The largest share of a token's lifetime taken as the refresh window, in percent
    /// (capped at 100). Default 25. With 100 (and 100 for the margin) the durations apply
    /// as they are, and a refresh window not shorter than the lifetime makes every call
    /// fetch.
    pub refresh_ahead_percent: u8,
    /// The most per-user (on-behalf-of) entries kept; 0 disables caching them. Default
    /// 10 000.
    pub max_user_entries: usize,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            safety_margin: Duration::from_secs(60),
            refresh_ahead: Duration::from_secs(300),
            safety_margin_percent: 10,
            refresh_ahead_percent: 25,
            max_user_entries: 10_000,
        }
    }
}

impl CacheOptions {
    /// The margin and refresh window for a token living `lifetime`.
    pub fn windows(&self, lifetime: Duration) -> (Duration, Duration) {
        let share = |percent: u8| lifetime.mul_f64(f64::from(percent.min(100)) / 100.0);
        (
            self.safety_margin.min(share(self.safety_margin_percent)),
            self.refresh_ahead.min(share(self.refresh_ahead_percent)),
        )
    }
}

/// The outcome of one fetch as seen by its waiters: the error is shared because
/// [`ProviderError`] is not `Clone`; each waiter gets an equivalent copy.
type Outcome = Result<SecretString, Arc<ProviderError>>;

/// A cached token with its last use, for LRU eviction.
struct Slot {
    cached: CachedToken,
    last_used: u64,
}

#[derive(Default)]
struct State {
    tokens: HashMap<CacheKey, Slot>,
    /// The fetches in progress, under the same lock as the tokens they fill in.
    flights: Flights<CacheKey, Outcome>,
    /// Number of per-user keys in `tokens`, kept so that the bound check is O(1).
    user_entries: usize,
    /// Logical clock for LRU; a counter rather than an instant so that ties cannot occur.
    tick: u64,
    /// Bumped by `clear`: a fetch started before a clear does not repopulate the cache.
    generation: u64,
}

impl State {
    fn insert(&mut self, key: CacheKey, cached: CachedToken, max_user_entries: usize) {
        self.tick += 1;
        let slot = Slot {
            cached,
            last_used: self.tick,
        };
        let per_user = key.is_per_user();
        if self.tokens.insert(key, slot).is_none() && per_user {
            self.user_entries += 1;
        }
        if per_user && self.user_entries > max_user_entries {
            self.evict_users(max_user_entries);
        }
    }

    fn remove(&mut self, key: &CacheKey) {
        if self.tokens.remove(key).is_some() && key.is_per_user() {
            self.user_entries -= 1;
        }
    }

    /// Brings per-user entries down to `max`: expired ones first, then least recently
    /// used. O(entries), but it runs only after a fetch, whose round trip dwarfs it.
    fn evict_users(&mut self, max: usize) {
        let now = Instant::now();
        self.tokens
            .retain(|key, slot| !key.is_per_user() || now < slot.cached.expires_at);
        self.user_entries = self.tokens.keys().filter(|k| k.is_per_user()).count();
        while self.user_entries > max {
            let oldest = self
                .tokens
                .iter()
                .filter(|(key, _)| key.is_per_user())
                .min_by_key(|(_, slot)| slot.last_used)
                .map(|(key, _)| key.clone());
            match oldest {
                Some(key) => self.remove(&key),
                // Unreachable while the count is right; stop rather than loop.
                None => break,
            }
        }
    }
}

/// What a caller does after looking at the cache.
enum Step {
    /// A valid token, outside the refresh window (or being refreshed by someone else).
    Hit(SecretString),
    /// Wait for another caller's fetch.
    Wait(Waiter<Outcome>),
    /// Fetch; this caller leads the flight.
    Lead {
        leader: Leader<Outcome>,
        generation: u64,
    },
}

/// A cache of database-access tokens. `Send + Sync`; share it behind an `Arc`.
///
/// See the [module documentation](self) for the semantics.
pub struct TokenCache {
    options: CacheOptions,
    state: Mutex<State>,
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCache")
            .field("options", &self.options)
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl TokenCache {
    /// An empty cache.
    pub fn new(options: CacheOptions) -> Self {
        Self {
            options,
            state: Mutex::new(State::default()),
        }
    }

    /// Returns a valid token for `key`, fetching with `fetch` on a miss.
    ///
    /// `fetch` returns the token and its lifetime (`expires_in`); it is called at most
    /// once, and not at all on a hit or when another caller's fetch for the same key is
    /// in progress. Cancelling this future is safe: if it was fetching, a waiting caller
    /// takes over.
    ///
    /// # Errors
    ///
    /// The fetch's error, for the caller that fetched and for every caller that waited for
    /// it, unless a refresh ahead failed while the cached token was still valid (then the
    /// cached token is returned).
    pub async fn get_or_fetch<F, Fut>(
        &self,
        key: &CacheKey,
        fetch: F,
    ) -> Result<SecretString, ProviderError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(SecretString, Duration), ProviderError>>,
    {
        loop {
            match self.step(key) {
                Step::Hit(token) => return Ok(token),
                Step::Wait(waiter) => match waiter.outcome().await {
                    Some(Ok(token)) => return Ok(token),
                    Some(Err(error)) => return Err(replicate(&error)),
                    // The fetching caller went away without an outcome (cancelled or
                    // panicked): look again, and lead if nobody else does.
                    None => continue,
                },
                Step::Lead { leader, generation } => {
                    // Cancelled or panicking here, the leader drops with the future and
                    // its waiters take over.
                    let result = fetch().await;
                    return self.complete(key, leader, generation, result);
                }
            }
        }
    }

    /// The number of cached tokens, including expired ones not yet replaced or evicted.
    pub fn len(&self) -> usize {
        self.lock().tokens.len()
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every cached token, e.g. after a credential change. Fetches in progress still
    /// deliver their token to their callers but do not cache it.
    pub fn clear(&self) {
        let mut state = self.lock();
        state.tokens.clear();
        state.user_entries = 0;
        state.generation += 1;
    }

    /// Held briefly and never across an `.await`.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Looks at the cache and decides, atomically, what this caller does.
    fn step(&self, key: &CacheKey) -> Step {
        let now = Instant::now();
        let mut state = self.lock();
        state.tick += 1;
        let tick = state.tick;
        let mut valid = false;
        if let Some(slot) = state.tokens.get_mut(key)
            && now < slot.cached.expires_at
        {
            slot.last_used = tick;
            if now < slot.cached.refresh_at {
                return Step::Hit(slot.cached.token.clone());
            }
            valid = true;
        }
        if !valid {
            // Expired: never returned again, so free it now.
            state.remove(key);
        }
        if valid
            && state.flights.is_running(key)
            && let Some(slot) = state.tokens.get(key)
        {
            // Someone is already refreshing ahead; the cached token is still good.
            return Step::Hit(slot.cached.token.clone());
        }
        match state.flights.join(key) {
            Turn::Wait(waiter) => Step::Wait(waiter),
            Turn::Lead(leader) => Step::Lead {
                leader,
                generation: state.generation,
            },
        }
    }

    /// Publishes the leader's fetch result: caches the token, wakes the waiters, and
    /// returns this caller's result.
    fn complete(
        &self,
        key: &CacheKey,
        leader: Leader<Outcome>,
        generation: u64,
        result: Result<(SecretString, Duration), ProviderError>,
    ) -> Result<SecretString, ProviderError> {
        let now = Instant::now();
        let mut state = self.lock();
        let (outcome, result) = match result {
            Ok((token, expires_in)) => {
                let (margin, refresh_ahead) = self.options.windows(expires_in);
                let expires_at = expires_in
                    .checked_sub(margin)
                    .filter(|ttl| !ttl.is_zero())
                    .and_then(|ttl| now.checked_add(ttl));
                // Not cached: a lifetime within the margin (the token is too close to
                // expiry to keep) or one too far out to represent.
                if let Some(expires_at) = expires_at
                    && state.generation == generation
                {
                    let cached = CachedToken {
                        token: token.clone(),
                        expires_at,
                        refresh_at: expires_at.checked_sub(refresh_ahead).unwrap_or(now),
                    };
                    state.insert(key.clone(), cached, self.options.max_user_entries);
                }
                (Ok(token.clone()), Ok(token))
            }
            Err(error) => {
                let still_valid = state
                    .tokens
                    .get(key)
                    .filter(|slot| now < slot.cached.expires_at)
                    .map(|slot| slot.cached.token.clone());
                match still_valid {
                    Some(token) => {
                        tracing::debug!(
                            provider = %key.provider,
                            per_user = key.is_per_user(),
                            %error,
                            "token refresh ahead failed; the cached token is still valid"
                        );
                        (Ok(token.clone()), Ok(token))
                    }
                    None => {
                        let shared = Arc::new(replicate(&error));
                        (Err(shared), Err(error))
                    }
                }
            }
        };
        // Landed under the lock, after the token is stored: a caller arriving later sees
        // the cached token or starts a new fetch, and every earlier waiter gets this one.
        state.flights.land(key, leader, outcome);
        drop(state);
        result
    }
}

/// An equivalent of `error` for a waiter: same variant where its data can be copied, same
/// message otherwise.
fn replicate(error: &ProviderError) -> ProviderError {
    match error {
        ProviderError::Refused { status, code } => ProviderError::Refused {
            status: *status,
            code: code.clone(),
        },
        ProviderError::Unavailable(message) => ProviderError::Unavailable(message.clone()),
        ProviderError::Certificate(message) => ProviderError::Certificate(message.clone()),
        ProviderError::InvalidToken(message) => ProviderError::InvalidToken(message.clone()),
        ProviderError::Context(inner) => ProviderError::Context(inner.clone()),
        ProviderError::Other(inner) => {
            ProviderError::Other(Box::new(SharedFailure(inner.to_string())))
        }
    }
}

/// A custom provider's failure, as seen by the callers that waited for it: its message.
#[derive(Debug)]
struct SharedFailure(String);

impl fmt::Display for SharedFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SharedFailure {}
