//! The cost of a token-cache hit: `TokenCache::get_or_fetch` for a key already cached, for
//! the shared client-credentials token and for one of 10 000 cached per-user (on-behalf-of)
//! tokens picked round-robin. The keys are built beforehand (for on-behalf-of, building one
//! hashes the user assertion), so what is measured is the lookup, the expiry check and the
//! token clone. The fetch closure fails: a miss would abort the bench instead of being
//! timed. Prints the medians at the end (target: ≤ 1 µs per hit).
//!
//! `cargo bench --features providers --bench token_cache`

#[path = "support/estimates.rs"]
mod estimates;
use estimates::{criterion_dir, median_ns};

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use ctxpool::ProviderError;
use ctxpool::providers::cache::{CacheKey, CacheOptions, TokenCache};
use secrecy::SecretString;
use tokio::runtime::Runtime;

const GROUP: &str = "token_cache";
const CLIENT_CREDENTIALS_HIT: &str = "client_credentials_hit";
const ON_BEHALF_OF_HIT: &str = "on_behalf_of_hit_10000_users";
const USERS: usize = 10_000;
const PROVIDER: &str = "azure_tokens";
const AUTHORITY: &str = "https://login.microsoftonline.com/my-tenant";
const CLIENT_ID: &str = "my-app";
/// Far beyond the refresh-ahead window of the default options: every lookup is a plain hit.
const LIFETIME: Duration = Duration::from_secs(24 * 3600);

type Fetched = Result<(SecretString, Duration), ProviderError>;

/// The fetch given on the measured path: it must never run.
async fn miss() -> Fetched {
    Err(ProviderError::Unavailable(
        "cache miss on the measured hit path".to_owned(),
    ))
}

/// Caches a token for `key`.
fn fill(rt: &Runtime, cache: &TokenCache, key: &CacheKey, token: String) {
    rt.block_on(cache.get_or_fetch(
        key,
        || async move { Ok((SecretString::from(token), LIFETIME)) },
    ))
    .expect("filling the cache");
}

fn benches(c: &mut Criterion) {
    // One runtime thread, as a request handler's await would run; the loop is inside one
    // `block_on` so that entering the runtime is not measured.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cache = TokenCache::new(CacheOptions::default());
    let scopes = ["https://database.example.com/.default".to_owned()];

    let shared = CacheKey::client_credentials(PROVIDER, AUTHORITY, CLIENT_ID, &scopes);
    fill(&rt, &cache, &shared, "client-credentials-token".to_owned());

    let users: Vec<CacheKey> = (0..USERS)
        .map(|i| {
            let assertion = SecretString::from(format!("eyJhbGciOi.user-{i}.signature"));
            CacheKey::on_behalf_of(PROVIDER, AUTHORITY, CLIENT_ID, &scopes, &assertion)
        })
        .collect();
    for (i, key) in users.iter().enumerate() {
        fill(&rt, &cache, key, format!("on-behalf-of-token-{i}"));
    }
    assert_eq!(cache.len(), USERS + 1, "every user's token is cached");

    let mut group = c.benchmark_group(GROUP);
    group.measurement_time(Duration::from_secs(4));
    group.warm_up_time(Duration::from_secs(1));
    let mut cursor = 0;
    group.bench_function(CLIENT_CREDENTIALS_HIT, |b| {
        b.iter_custom(|iters| {
            run(
                &rt,
                &cache,
                std::slice::from_ref(&shared),
                &mut cursor,
                iters,
            )
        })
    });
    let mut cursor = 0;
    group.bench_function(ON_BEHALF_OF_HIT, |b| {
        b.iter_custom(|iters| run(&rt, &cache, &users, &mut cursor, iters))
    });
    group.finish();
    assert_eq!(cache.len(), USERS + 1, "nothing was evicted or refetched");
}

/// `iters` hits, cycling through `keys` from `cursor`, inside one `block_on`; returns the
/// wall time. Panics on a miss.
fn run(
    rt: &Runtime,
    cache: &TokenCache,
    keys: &[CacheKey],
    cursor: &mut usize,
    iters: u64,
) -> Duration {
    rt.block_on(async {
        let mut next = *cursor;
        let start = Instant::now();
        for _ in 0..iters {
            let key = &keys[next];
            next += 1;
            if next == keys.len() {
                next = 0;
            }
            let token = cache.get_or_fetch(black_box(key), miss).await;
            black_box(token.expect("a cache hit"));
        }
        let elapsed = start.elapsed();
        *cursor = next;
        elapsed
    })
}

fn print_medians() {
    println!();
    for (bench, what) in [
        (CLIENT_CREDENTIALS_HIT, "client credentials"),
        (ON_BEHALF_OF_HIT, "on-behalf-of, 10 000 users"),
    ] {
        match median_ns(GROUP, bench) {
            Some(ns) => println!("token cache hit: {ns:.0} ns (target ≤ 1 µs) [{what}]"),
            None => println!("token cache hit: not measured in this run (target ≤ 1 µs) [{what}]"),
        }
    }
}

fn main() {
    let mut c = Criterion::default()
        .output_directory(&criterion_dir())
        .configure_from_args();
    benches(&mut c);
    c.final_summary();
    print_medians();
}
