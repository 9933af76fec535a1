//! The token cache: hits, expiry with the safety margin, refresh ahead, single flight
//! (success, failure, cancelled fetcher), per-user isolation and the per-user bound.
//! Timing runs on tokio's paused clock; synchronisation uses `Notify` and counters, never
//! sleeps.
#![cfg(feature = "providers")]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ctxpool::ProviderError;
use ctxpool::providers::cache::{CacheKey, CacheOptions, TokenCache};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Notify;

// ---- helpers -------------------------------------------------------------------------

type FetchResult = Result<(SecretString, Duration), ProviderError>;

/// A fetch that counts its calls and returns `tok-<n>` (n = the call number) valid for
/// `ttl`.
fn ok_fetch(
    count: &Arc<AtomicUsize>,
    ttl: Duration,
) -> impl FnOnce() -> std::future::Ready<FetchResult> + use<> {
    let count = Arc::clone(count);
    move || {
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        std::future::ready(Ok((SecretString::from(format!("tok-{n}")), ttl)))
    }
}

/// A fetch that counts its calls and fails as unavailable.
fn failing_fetch(
    count: &Arc<AtomicUsize>,
) -> impl FnOnce() -> std::future::Ready<FetchResult> + use<> {
    let count = Arc::clone(count);
    move || {
        count.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Err(ProviderError::Unavailable("connection refused".into())))
    }
}

/// A fetch that counts its call, then waits for `gate` before returning `result`.
fn gated_fetch<R: FnOnce() -> FetchResult + Send + 'static>(
    count: &Arc<AtomicUsize>,
    gate: &Arc<Notify>,
    result: R,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = FetchResult> + Send>> + Send + use<R> {
    let count = Arc::clone(count);
    let gate = Arc::clone(gate);
    move || {
        Box::pin(async move {
            count.fetch_add(1, Ordering::SeqCst);
            gate.notified().await;
            result()
        })
    }
}

fn scopes() -> Vec<String> {
    vec!["https://database.example/.default".to_owned()]
}

fn app_key() -> CacheKey {
    CacheKey::client_credentials("entra", "https://login.example/tenant", "app-id", &scopes())
}

fn user_key(assertion: &str) -> CacheKey {
    CacheKey::on_behalf_of(
        "entra",
        "https://login.example/tenant",
        "app-id",
        &scopes(),
        &SecretString::from(assertion.to_owned()),
    )
}

fn options(margin: u64, refresh_ahead: u64) -> CacheOptions {
    CacheOptions {
        safety_margin: Duration::from_secs(margin),
        refresh_ahead: Duration::from_secs(refresh_ahead),
        // The durations as given, not capped by a share of the lifetime.
        safety_margin_percent: 100,
        refresh_ahead_percent: 100,
        ..CacheOptions::default()
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Yields until `counter` reaches `n`; bounded by a (virtual-time) timeout so that a bug
/// fails the test instead of hanging it.
async fn until_at_least(counter: &AtomicUsize, n: usize) {
    tokio::time::timeout(secs(3600), async {
        while counter.load(Ordering::SeqCst) < n {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("counter never reached its target");
}

// ---- hits and expiry -----------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn second_get_is_a_hit() {
    let cache = TokenCache::new(options(60, 300));
    let count = Arc::new(AtomicUsize::new(0));
    let first = cache
        .get_or_fetch(&app_key(), ok_fetch(&count, secs(3600)))
        .await
        .unwrap();
    let second = cache
        .get_or_fetch(&app_key(), ok_fetch(&count, secs(3600)))
        .await
        .unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert_eq!(first.expose_secret(), "tok-1");
    assert_eq!(second.expose_secret(), "tok-1");
    assert_eq!(cache.len(), 1);
    assert!(!cache.is_empty());
    cache.clear();
    assert!(cache.is_empty());
}

#[tokio::test(start_paused = true)]
async fn default_windows_are_proportional_so_a_300_s_token_hits() {
    // 300 s: margin 30 s (10 %), refresh window 75 s (25 %): hits until 195 s.
    let cache = TokenCache::new(CacheOptions::default());
    let count = Arc::new(AtomicUsize::new(0));
    for _ in 0..5 {
        cache
            .get_or_fetch(&app_key(), ok_fetch(&count, secs(300)))
            .await
            .unwrap();
        tokio::time::advance(secs(48)).await;
    }
    assert_eq!(count.load(Ordering::SeqCst), 1);
    // At 240 s the refresh window is open: the next acquire fetches.
    cache
        .get_or_fetch(&app_key(), ok_fetch(&count, secs(300)))
        .await
        .unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 2);
    assert_eq!(
        CacheOptions::default().windows(secs(300)),
        (secs(30), secs(75))
    );
    assert_eq!(
        CacheOptions::default().windows(secs(3600)),
        (secs(60), secs(300))
    );
}

#[tokio::test(start_paused = true)]
async fn expiry_subtracts_the_safety_margin() {
    // expires_in 600 s, margin 60 s: valid until 540 s after the fetch.
    let cache = TokenCache::new(options(60, 0));
    let count = Arc::new(AtomicUsize::new(0));
    cache
        .get_or_fetch(&app_key(), ok_fetch(&count, secs(600)))
        .await
        .unwrap();

    tokio::time::advance(secs(539)).await;
    let token = cache
        .get_or_fetch(&app_key(), ok_fetch(&count, secs(600)))
        .await
        .unwrap();
    assert_eq!(token.expose_secret(), "tok-1");
    assert_eq!(count.load(Ordering::SeqCst), 1);

    // Exactly at the margin-adjusted expiry: a miss.
    tokio::time::advance(secs(1)).await;
    let token = cache
        .get_or_fetch(&app_key(), ok_fetch(&count, secs(600)))
        .await
        .unwrap();
    assert_eq!(token.expose_secret(), "tok-2");
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn never_returns_a_token_at_or_after_expiry() {
    let cache = TokenCache::new(options(60, 0));
    let count = Arc::new(AtomicUsize::new(0));
    cache
        .get_or_fetch(&app_key(), ok_fetch(&count, secs(600)))
        .await
        .unwrap();

    // At expiry a failing fetch is an error, not the old token.
    tokio::time::advance(secs(540)).await;
    let err = cache
        .get_or_fetch(&app_key(), failing_fetch(&count))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err}");

    // Long after expiry, likewise.
    tokio::time::advance(secs(10_000)).await;
    let err = cache
        .get_or_fetch(&app_key(), failing_fetch(&count))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err}");
    assert_eq!(count.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn lifetime_within_the_margin_is_used_once_not_cached() {
    let cache = TokenCache::new(options(60, 0));
    let count = Arc::new(AtomicUsize::new(0));
    for expected in ["tok-1", "tok-2"] {
        let token = cache
            .get_or_fetch(&app_key(), ok_fetch(&count, secs(60)))
            .await
            .unwrap();
        assert_eq!(token.expose_secret(), expected);
    }
    assert_eq!(count.load(Ordering::SeqCst), 2);
    assert!(cache.is_empty());
}

// ---- refresh ahead -------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn hit_within_the_refresh_window_refetches() {
    // expires_in 1000 s, margin 60 s: expires at 940 s; window opens at 640 s.
    let cache = TokenCache::new(options(60, 300));
    let count = Arc::new(AtomicUsize::new(0));
    cache
        .get_or_fetch(&app_key(), ok_fetch(&count, secs(1000)))
        .await
        .unwrap();

    tokio::time::advance(secs(639)).await;
    let token = cache
        .get_or_fetch(&app_key(), ok_fetch(&count, secs(1000)))
        .await
        .unwrap();
    assert_eq!(token.expose_secret(), "tok-1");

    tokio::time::advance(secs(2)).await;
    let token = cache
        .get_or_fetch(&app_key(), ok_fetch(&count, secs(1000)))
        .await
        .unwrap();
    assert_eq!(token.expose_secret(), "tok-2");
    assert_eq!(count.load(Ordering::SeqCst), 2);

    // The new token is cached in its turn.
    let token = cache
        .get_or_fetch(&app_key(), ok_fetch(&count, secs(1000)))
        .await
        .unwrap();
    assert_eq!(token.expose_secret(), "tok-2");
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn failed_refresh_returns_the_still_valid_token_then_errors_after_expiry() {
    let cache = TokenCache::new(options(60, 300));
    let count = Arc::new(AtomicUsize::new(0));
    cache
        .get_or_fetch(&app_key(), ok_fetch(&count, secs(1000)))
        .await
        .unwrap();

    tokio::time::advance(secs(700)).await;
    let token = cache
        .get_or_fetch(&app_key(), failing_fetch(&count))
        .await
        .unwrap();
    assert_eq!(token.expose_secret(), "tok-1");
    assert_eq!(count.load(Ordering::SeqCst), 2);

    // Still in the window: the next caller tries again.
    tokio::time::advance(secs(239)).await;
    let token = cache
        .get_or_fetch(&app_key(), failing_fetch(&count))
        .await
        .unwrap();
    assert_eq!(token.expose_secret(), "tok-1");
    assert_eq!(count.load(Ordering::SeqCst), 3);

    // At expiry (940 s) a failed fetch is an error.
    tokio::time::advance(secs(1)).await;
    let err = cache
        .get_or_fetch(&app_key(), failing_fetch(&count))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err}");
}

#[tokio::test(start_paused = true)]
async fn callers_during_a_refresh_get_the_valid_token_without_waiting() {
    let cache = Arc::new(TokenCache::new(options(60, 300)));
    let count = Arc::new(AtomicUsize::new(0));
    cache
        .get_or_fetch(&app_key(), ok_fetch(&count, secs(1000)))
        .await
        .unwrap();
    tokio::time::advance(secs(700)).await;

    let gate = Arc::new(Notify::new());
    let refresher = tokio::spawn({
        let cache = Arc::clone(&cache);
        let fetch = gated_fetch(&count, &gate, || {
            Ok((SecretString::from("fresh"), secs(1000)))
        });
        async move { cache.get_or_fetch(&app_key(), fetch).await }
    });
    until_at_least(&count, 2).await;

    // The refresh is in flight: another caller neither waits nor fetches.
    let token = cache
        .get_or_fetch(&app_key(), ok_fetch(&count, secs(1000)))
        .await
        .unwrap();
    assert_eq!(token.expose_secret(), "tok-1");
    assert_eq!(count.load(Ordering::SeqCst), 2);

    gate.notify_one();
    let token = refresher.await.unwrap().unwrap();
    assert_eq!(token.expose_secret(), "fresh");
    let token = cache
        .get_or_fetch(&app_key(), ok_fetch(&count, secs(1000)))
        .await
        .unwrap();
    assert_eq!(token.expose_secret(), "fresh");
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

// ---- single flight -------------------------------------------------------------------

const CALLERS: usize = 50;

/// Spawns `CALLERS` concurrent gets for `key`, each with a gated fetch returning
/// `result`, and waits until all of them are inside the cache (the first fetching, the
/// others waiting for it).
async fn spawn_callers(
    cache: &Arc<TokenCache>,
    key: &CacheKey,
    count: &Arc<AtomicUsize>,
    gate: &Arc<Notify>,
    result: fn() -> FetchResult,
) -> Vec<tokio::task::JoinHandle<Result<SecretString, ProviderError>>> {
    let started = Arc::new(AtomicUsize::new(0));
    let handles = (0..CALLERS)
        .map(|_| {
            let cache = Arc::clone(cache);
            let key = key.clone();
            let started = Arc::clone(&started);
            let fetch = gated_fetch(count, gate, result);
            tokio::spawn(async move {
                // `get_or_fetch` registers (as fetcher or waiter) on its first poll,
                // which follows this increment without a yield in between.
                started.fetch_add(1, Ordering::SeqCst);
                cache.get_or_fetch(&key, fetch).await
            })
        })
        .collect();
    until_at_least(&started, CALLERS).await;
    // One more turn so that the last spawned task has been polled past its increment.
    tokio::task::yield_now().await;
    handles
}

#[tokio::test(start_paused = true)]
async fn concurrent_misses_make_one_fetch() {
    let cache = Arc::new(TokenCache::new(CacheOptions::default()));
    let count = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Notify::new());
    let handles = spawn_callers(&cache, &app_key(), &count, &gate, || {
        Ok((SecretString::from("shared"), secs(3600)))
    })
    .await;
    assert_eq!(count.load(Ordering::SeqCst), 1);

    gate.notify_one();
    for handle in handles {
        let token = handle.await.unwrap().unwrap();
        assert_eq!(token.expose_secret(), "shared");
    }
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert_eq!(cache.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failed_fetch_reaches_every_waiter() {
    let cache = Arc::new(TokenCache::new(CacheOptions::default()));
    let count = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Notify::new());
    let handles = spawn_callers(&cache, &app_key(), &count, &gate, || {
        Err(ProviderError::Refused {
            status: 400,
            code: Some("invalid_grant".into()),
        })
    })
    .await;

    gate.notify_one();
    let mut errors = 0;
    for handle in handles {
        match handle.await.unwrap() {
            Err(ProviderError::Refused { status: 400, code })
                if code.as_deref() == Some("invalid_grant") =>
            {
                errors += 1;
            }
            other => panic!("unexpected outcome: {:?}", other.map(|_| "<token>")),
        }
    }
    assert_eq!(errors, CALLERS);
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert!(cache.is_empty());
}

#[tokio::test(start_paused = true)]
async fn waiters_get_an_equivalent_of_a_custom_error() {
    let cache = Arc::new(TokenCache::new(CacheOptions::default()));
    let count = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Notify::new());
    let handles = spawn_callers(&cache, &app_key(), &count, &gate, || {
        Err(ProviderError::Other("vault sealed".into()))
    })
    .await;

    gate.notify_one();
    for handle in handles {
        let err = handle.await.unwrap().unwrap_err();
        assert!(matches!(err, ProviderError::Other(_)));
        assert_eq!(err.to_string(), "the context provider failed: vault sealed");
    }
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_fetcher_hands_over_to_a_waiter() {
    let cache = Arc::new(TokenCache::new(CacheOptions::default()));
    let count = Arc::new(AtomicUsize::new(0));

    // The leader's fetch never completes on its own.
    let never = Arc::new(Notify::new());
    let leader = tokio::spawn({
        let cache = Arc::clone(&cache);
        let fetch = gated_fetch(&count, &never, || {
            Ok((SecretString::from("never"), secs(3600)))
        });
        async move { cache.get_or_fetch(&app_key(), fetch).await }
    });
    until_at_least(&count, 1).await;

    let started = Arc::new(AtomicUsize::new(0));
    let waiters: Vec<_> = (0..10)
        .map(|_| {
            let cache = Arc::clone(&cache);
            let fetch = ok_fetch(&count, secs(3600));
            let started = Arc::clone(&started);
            tokio::spawn(async move {
                started.fetch_add(1, Ordering::SeqCst);
                cache.get_or_fetch(&app_key(), fetch).await
            })
        })
        .collect();
    until_at_least(&started, 10).await;
    tokio::task::yield_now().await;
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "the waiters must not fetch yet"
    );

    // Drop the leader's future mid-fetch.
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());

    for waiter in waiters {
        let token = tokio::time::timeout(secs(3600), waiter)
            .await
            .expect("a waiter hung after the fetcher was cancelled")
            .unwrap()
            .unwrap();
        assert_eq!(token.expose_secret(), "tok-2");
    }
    // One take-over fetch, not one per waiter.
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_fetcher_future_leaves_no_stale_flight() {
    let cache = TokenCache::new(CacheOptions::default());
    let count = Arc::new(AtomicUsize::new(0));
    let never = Arc::new(Notify::new());
    let fetch = gated_fetch(&count, &never, || {
        Ok((SecretString::from("never"), secs(3600)))
    });
    // The timeout drops the pending future.
    let timed_out = tokio::time::timeout(secs(5), cache.get_or_fetch(&app_key(), fetch)).await;
    assert!(timed_out.is_err());

    let token = cache
        .get_or_fetch(&app_key(), ok_fetch(&count, secs(3600)))
        .await
        .unwrap();
    assert_eq!(token.expose_secret(), "tok-2");
}

// ---- per-user entries ----------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn users_are_isolated_and_keys_hide_the_assertion() {
    let cache = TokenCache::new(CacheOptions::default());
    let count = Arc::new(AtomicUsize::new(0));
    let alice = user_key("eyJhbGciOi.alice-assertion.sig");
    let bob = user_key("eyJhbGciOi.bob-assertion.sig");
    assert!(alice.is_per_user());
    assert!(!app_key().is_per_user());
    assert_ne!(alice, bob);
    assert_eq!(alice, user_key("eyJhbGciOi.alice-assertion.sig"));

    let a = cache
        .get_or_fetch(&alice, ok_fetch(&count, secs(3600)))
        .await
        .unwrap();
    let b = cache
        .get_or_fetch(&bob, ok_fetch(&count, secs(3600)))
        .await
        .unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 2);
    assert_ne!(a.expose_secret(), b.expose_secret());
    let again = cache
        .get_or_fetch(&alice, ok_fetch(&count, secs(3600)))
        .await
        .unwrap();
    assert_eq!(again.expose_secret(), a.expose_secret());
    assert_eq!(count.load(Ordering::SeqCst), 2);

    let debug = format!("{alice:?}");
    assert!(!debug.contains("alice-assertion"), "{debug}");
    assert!(!debug.contains("eyJ"), "{debug}");
    assert!(debug.contains("sha256:"), "{debug}");
}

#[tokio::test(start_paused = true)]
async fn per_user_entries_are_bounded_least_recently_used_first() {
    let cache = TokenCache::new(CacheOptions {
        max_user_entries: 3,
        ..CacheOptions::default()
    });
    let count = Arc::new(AtomicUsize::new(0));
    cache
        .get_or_fetch(&app_key(), ok_fetch(&count, secs(3600)))
        .await
        .unwrap();
    let users: Vec<_> = (0..5)
        .map(|i| user_key(&format!("assertion-{i}")))
        .collect();
    for user in &users {
        cache
            .get_or_fetch(user, ok_fetch(&count, secs(3600)))
            .await
            .unwrap();
        assert!(cache.len() <= 3 + 1);
    }
    assert_eq!(cache.len(), 4);
    assert_eq!(count.load(Ordering::SeqCst), 6);

    // The three most recent users and the client-credentials entry are hits.
    for key in [&users[2], &users[3], &users[4], &app_key()] {
        cache
            .get_or_fetch(key, ok_fetch(&count, secs(3600)))
            .await
            .unwrap();
    }
    assert_eq!(count.load(Ordering::SeqCst), 6);
    // The first user was evicted.
    cache
        .get_or_fetch(&users[0], ok_fetch(&count, secs(3600)))
        .await
        .unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 7);
    assert_eq!(cache.len(), 4);
}

#[tokio::test(start_paused = true)]
async fn eviction_takes_expired_entries_before_least_recently_used() {
    let cache = TokenCache::new(CacheOptions {
        max_user_entries: 2,
        refresh_ahead: Duration::ZERO,
        ..CacheOptions::default()
    });
    let count = Arc::new(AtomicUsize::new(0));
    let (old, short, new) = (user_key("old"), user_key("short"), user_key("new"));
    cache
        .get_or_fetch(&old, ok_fetch(&count, secs(3600)))
        .await
        .unwrap();
    cache
        .get_or_fetch(&short, ok_fetch(&count, secs(120)))
        .await
        .unwrap();
    // `short` expires (120 s less its 12 s margin: 10 % of the lifetime); `old` is the
    // least recently used but valid.
    tokio::time::advance(secs(109)).await;
    cache
        .get_or_fetch(&new, ok_fetch(&count, secs(3600)))
        .await
        .unwrap();
    assert_eq!(cache.len(), 2);
    assert_eq!(count.load(Ordering::SeqCst), 3);
    cache
        .get_or_fetch(&old, ok_fetch(&count, secs(3600)))
        .await
        .unwrap();
    assert_eq!(
        count.load(Ordering::SeqCst),
        3,
        "the valid entry was evicted"
    );
}

#[tokio::test(start_paused = true)]
async fn a_fetch_started_before_clear_is_not_cached() {
    let cache = Arc::new(TokenCache::new(CacheOptions::default()));
    let count = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Notify::new());
    let fetcher = tokio::spawn({
        let cache = Arc::clone(&cache);
        let fetch = gated_fetch(&count, &gate, || {
            Ok((SecretString::from("stale"), secs(3600)))
        });
        async move { cache.get_or_fetch(&app_key(), fetch).await }
    });
    until_at_least(&count, 1).await;
    cache.clear();
    gate.notify_one();
    assert_eq!(fetcher.await.unwrap().unwrap().expose_secret(), "stale");
    assert!(cache.is_empty());
}

#[test]
fn cache_is_send_and_sync_and_debug_is_redacted() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<TokenCache>();
    let cached = ctxpool::providers::cache::CachedToken {
        token: SecretString::from("super-secret-token"),
        expires_at: tokio::time::Instant::now(),
        refresh_at: tokio::time::Instant::now(),
    };
    let debug = format!("{cached:?}");
    assert!(!debug.contains("super-secret-token"), "{debug}");
}
