//! What a security context costs per request, one request at a time (current-thread
//! runtime, every pool of size 1), on loopback (`direct`) and through a proxy adding
//! ~1 ms of round trip (`rtt_1ms`).
//!
//! # Groups
//! `piggyback_{network}`: one request = check out, run alice's view of `LIST`, release.
//! Every variant returns the same rows (checked at start-up) except `ctxpool_plain`,
//! which has no context and so sees none, and `ctxpool_session_switching`, which
//! alternates alice and bob.
//! - `deadpool_fast` — **the baseline**: deadpool-postgres, `RecyclingMethod::Fast`,
//!   logging in as `hr_alice`, whose role defaults hold exactly the settings ctxpool
//!   applies for alice: the context costs it nothing per request, so it is the cost of a
//!   pooled query alone.
//! - `deadpool_clean` (`RecyclingMethod::Clean`), `bb8_postgres` (bb8 defaults: a
//!   `simple_query("")` check on checkout; no statement cache, so `query_typed`, one round
//!   trip), `sqlx` (`PgPool` defaults: a ping before acquire; `sqlx::query`, prepared and
//!   cached): the same login.
//! - `ctxpool_plain` (`get`, no context), `ctxpool_transaction_scope` and
//!   `ctxpool_session_scope` (`acquire_as(&alice)`), `ctxpool_session_switching` (alice
//!   and bob in turn): ctxpool on hr_app.
//! - `naive`: a plain pool with the context set by an awaited `set_config` statement, the
//!   query, and an awaited `RESET`: three round trips.
//! - `raw_fast`: the baseline's query on the baseline's login, no pool, through the raw
//!   client of `limit`: `deadpool_fast` over `raw_fast` is what tokio-postgres and a pool
//!   cost the client, a share every variant built on them pays and the limits do not.
//! - `limit`: the physical limit, no pool: one raw connection, the context statement and
//!   `LIST` prepared once, each request their two Bind/Execute under one Sync.
//!   `limit_with_reset` sends ctxpool's session reset first (its check, then `BEGIN`, the
//!   statements of `RecyclingMethod::Clean` and `COMMIT`), still under the one Sync: what
//!   a pool that resets and applies a context in the request's own flight costs at best.
//!
//! After each `piggyback` table comes where the time went: per request, the wall time,
//! the CPU time of the bench thread (the client: tokio-postgres, the pool, the kernel's
//! send and receive) and that of the variant's server backend, both read from Linux's
//! `/proc/…/schedstat` around every timed batch. The server column shows what a variant
//! asks of PostgreSQL, whatever the scheduling of this host does to the wall time.
//!
//! `further_statement_{network}`: the cost of one more statement in a checkout already
//! held (checkout, statement preparation and a first query are done before the clock
//! starts): `deadpool_fast_held` (baseline), `ctxpool_transaction_scope_held`,
//! `ctxpool_plain_held`, and `limit_held`, the limit's request (the context statement
//! and `LIST` under one Sync on the raw connection): what one more statement under a
//! context costs at best. Its table of where the time went follows it, as for
//! `piggyback`.
//!
//! # Reading it
//! Variants are measured interleaved (see `support/interleave.rs`): rounds of 8 requests
//! of every variant in rotating order, so that every figure was measured side by side
//! with the others. At the end the bench prints, per group, a markdown table of the
//! median time per request and the median, p25 and p75 of the per-round ratio to the
//! baseline: those ratios are the figures to compare. Criterion's own report
//! (`$CARGO_TARGET_DIR/criterion/report/index.html`) shows each variant's distribution.
//!
//! `cargo bench --features peers --bench piggyback`; a smoke run with
//! `CTXPOOL_BENCH_QUICK=1` (or criterion's `-- --quick`).

#[path = "support/limit.rs"]
mod limit;
#[path = "support/raw.rs"]
mod raw;
mod support;

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ctxpool::SecurityContext;
use ctxpool::postgres::{ContextScope, Pool};
use ctxpool_testkit::FlightProxy;
use deadpool_postgres::RecyclingMethod;
use limit::{Limit, PID_SQL};
use support::interleave::{Interleaver, Report};
use support::*;
use tokio::runtime::Runtime;
use tokio_postgres::types::Type;

/// A variant of a group with where its time went: the bench thread's CPU
/// time (the client: every variant runs on this one thread) and its server backend's,
/// summed over every timed batch.
struct Measured<V> {
    variant: V,
    /// The server process of the variant's one connection, when it can be asked.
    backend: Option<String>,
    wall: Duration,
    client_ns: u64,
    server_ns: u64,
    requests: u64,
}

/// What a measured variant does: `n` requests timed together, and the process id of its
/// one server connection where it can be asked.
trait Variant {
    async fn batch(&mut self, n: u64) -> Duration;
    async fn backend_pid(&mut self) -> Option<i32>;
}

impl<V: Variant> Measured<V> {
    async fn new(mut variant: V) -> Self {
        let backend = variant
            .backend_pid()
            .await
            .map(|pid| format!("/proc/{pid}/schedstat"));
        Self {
            variant,
            backend,
            wall: Duration::ZERO,
            client_ns: 0,
            server_ns: 0,
            requests: 0,
        }
    }

    async fn batch(&mut self, n: u64) -> Duration {
        const CLIENT: &str = "/proc/thread-self/schedstat";
        let server = self.backend.as_deref().map_or(0, cpu_ns);
        let client = cpu_ns(CLIENT);
        let wall = self.variant.batch(n).await;
        self.client_ns += cpu_ns(CLIENT).saturating_sub(client);
        self.server_ns += self
            .backend
            .as_deref()
            .map_or(0, cpu_ns)
            .saturating_sub(server);
        self.wall += wall;
        self.requests += n;
        wall
    }

    /// One row of the CPU table: wall, client CPU and server CPU per request.
    fn row(&self, name: &str) -> String {
        let per = |ns: f64| ns / 1000.0 / self.requests.max(1) as f64;
        let server = if self.backend.is_some() {
            format!("{:.1} µs", per(self.server_ns as f64))
        } else {
            "–".to_owned()
        };
        format!(
            "| {name} | {:.1} µs | {:.1} µs | {server} |",
            per(self.wall.as_nanos() as f64),
            per(self.client_ns as f64),
        )
    }
}

/// The table of where each variant's time went: wall, client and server CPU per request.
fn cpu_table<V: Variant, R>(inter: &mut Interleaver<Measured<V>, R>) -> String
where
    R: FnMut(&mut Measured<V>, u64) -> Duration,
{
    let mut cpu = String::from(
        "| variant | wall per request | client CPU | server CPU |\n|---|---:|---:|---:|\n",
    );
    for (name, variant) in inter.variants_mut() {
        cpu.push_str(&variant.row(name));
        cpu.push('\n');
    }
    cpu
}

/// Requests of each variant per round.
const BATCH: u64 = 8;

/// The session-wide context of `naive`, set by an awaited statement of its own.
const NAIVE_SET_SQL: &str = "SELECT set_config('role', $1, false), \
     set_config('ctxpool.end_user', $2, false), \
     set_config('ctxpool.data_roles', $3, false), \
     set_config('ctxpool.attributes', $4, false), \
     set_config($5, $6, false), set_config($7, $8, false)";

/// … and undone by another.
const NAIVE_RESET_SQL: &str = "RESET ROLE; RESET ctxpool.end_user; RESET ctxpool.data_roles; \
     RESET ctxpool.attributes; RESET \"hr.hcm_context.emp_id\"; RESET \"hr.hcm_context.org_id\"";

type Bb8Pool = bb8::Pool<bb8_postgres::PostgresConnectionManager<tokio_postgres::NoTls>>;

/// A variant of the `piggyback` groups: what one request does.
enum Request {
    Deadpool(deadpool_postgres::Pool),
    Bb8(Bb8Pool),
    Sqlx(sqlx::PgPool),
    CtxpoolPlain(Pool),
    CtxpoolAs(Pool, SecurityContext),
    CtxpoolSwitching(Pool, [SecurityContext; 2], usize),
    Naive(Pool, Vec<String>),
    Limit(Box<Limit>),
}

/// The process id a [`PID_SQL`] query answered.
async fn pid_of(
    row: impl std::future::Future<Output = Result<tokio_postgres::Row, tokio_postgres::Error>>,
) -> Option<i32> {
    row.await.ok()?.try_get(0).ok()
}

/// The process id of a deadpool-postgres pool's one server connection.
async fn deadpool_backend_pid(pool: &deadpool_postgres::Pool) -> Option<i32> {
    let c = pool.get().await.ok()?;
    pid_of(c.query_one(PID_SQL, &[])).await
}

/// The process id of a ctxpool pool's one server connection.
async fn ctxpool_backend_pid(pool: &Pool) -> Option<i32> {
    let c = pool.get().await.ok()?;
    pid_of(c.query_one(PID_SQL, &[])).await
}

impl Variant for Request {
    /// bb8 and sqlx: not asked.
    async fn backend_pid(&mut self) -> Option<i32> {
        match self {
            Self::Deadpool(pool) => deadpool_backend_pid(pool).await,
            Self::CtxpoolPlain(pool)
            | Self::CtxpoolAs(pool, _)
            | Self::CtxpoolSwitching(pool, ..)
            | Self::Naive(pool, _) => ctxpool_backend_pid(pool).await,
            Self::Limit(limit) => limit.backend_pid().await,
            Self::Bb8(_) | Self::Sqlx(_) => None,
        }
    }

    async fn batch(&mut self, n: u64) -> Duration {
        let start = Instant::now();
        for _ in 0..n {
            black_box(self.run().await);
        }
        start.elapsed()
    }
}

impl Request {
    /// One request; the names it read.
    async fn run(&mut self) -> Vec<String> {
        match self {
            Self::Deadpool(pool) => deadpool_request(pool).await,
            Self::Bb8(pool) => bb8_request(pool).await,
            Self::Sqlx(pool) => sqlx_request(pool).await,
            Self::CtxpoolPlain(pool) => ctxpool_request(pool, None).await,
            Self::CtxpoolAs(pool, who) => ctxpool_request(pool, Some(who)).await,
            Self::CtxpoolSwitching(pool, who, turn) => {
                *turn = (*turn + 1) % who.len();
                ctxpool_request(pool, Some(&who[*turn])).await
            }
            Self::Naive(pool, params) => {
                let c = pool.get().await.unwrap();
                let s = c.prepare_cached(LIST).await.unwrap();
                let typed: Vec<_> = params
                    .iter()
                    .map(|p| (p as &(dyn tokio_postgres::types::ToSql + Sync), Type::TEXT))
                    .collect();
                c.query_typed(NAIVE_SET_SQL, &typed).await.unwrap();
                let rows = c.query(&s, &[]).await.unwrap();
                c.batch_execute(NAIVE_RESET_SQL).await.unwrap();
                names(&rows)
            }
            Self::Limit(limit) => limit.request().await,
        }
    }
}

/// Runs `query` once untimed (so a first-statement cost stays out), then `n` times, timed.
async fn timed<F, Fut>(n: u64, mut query: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Vec<tokio_postgres::Row>>,
{
    black_box(query().await);
    let start = Instant::now();
    for _ in 0..n {
        black_box(names(&query().await));
    }
    start.elapsed()
}

/// A variant of the `further_statement` groups: one checkout held for the batch.
enum Held {
    Deadpool(deadpool_postgres::Pool),
    Ctxpool(Pool, Option<SecurityContext>),
    /// The context statement and `LIST` under one Sync on the raw connection: what one
    /// more statement under a context costs at best.
    Limit(Box<Limit>),
}

impl Variant for Held {
    /// Checks out, prepares `LIST` and runs it once, then times `n` more runs of it.
    async fn batch(&mut self, n: u64) -> Duration {
        match self {
            Self::Deadpool(pool) => {
                let c = pool.get().await.unwrap();
                let s = c.prepare_cached(LIST).await.unwrap();
                let (c, s) = (&c, &s);
                timed(n, move || async move { c.query(s, &[]).await.unwrap() }).await
            }
            Self::Ctxpool(pool, who) => {
                let c = match who {
                    Some(who) => pool.acquire_as(&*who).await.unwrap(),
                    None => pool.get().await.unwrap(),
                };
                let s = c.prepare_cached(LIST).await.unwrap();
                let (c, s) = (&c, &s);
                timed(n, move || async move { c.query(s, &[]).await.unwrap() }).await
            }
            Self::Limit(limit) => {
                black_box(limit.request().await);
                let start = Instant::now();
                for _ in 0..n {
                    black_box(limit.request().await);
                }
                start.elapsed()
            }
        }
    }

    async fn backend_pid(&mut self) -> Option<i32> {
        match self {
            Self::Deadpool(pool) => deadpool_backend_pid(pool).await,
            Self::Ctxpool(pool, _) => ctxpool_backend_pid(pool).await,
            Self::Limit(limit) => limit.backend_pid().await,
        }
    }
}

impl Held {
    /// The names one statement of a fresh checkout reads.
    async fn names(&mut self) -> Vec<String> {
        match self {
            Self::Deadpool(pool) => {
                let c = pool.get().await.unwrap();
                names(&c.query(LIST, &[]).await.unwrap())
            }
            Self::Ctxpool(pool, who) => {
                let c = match who {
                    Some(who) => pool.acquire_as(&*who).await.unwrap(),
                    None => pool.get().await.unwrap(),
                };
                names(&c.query(LIST, &[]).await.unwrap())
            }
            Self::Limit(limit) => limit.request().await,
        }
    }
}

/// What the start-up checks established.
struct Expected {
    alice: Vec<String>,
    bob: Vec<String>,
    plain: Vec<String>,
    settings: ContextSettings,
}

/// Creates the baseline login from the settings ctxpool applies for alice, and checks
/// that it is a faithful baseline: the same settings, the same rows, and rows that differ
/// from a plain hr_app session's.
fn set_up(rt: &Runtime, cluster: &ctxpool_testkit::PgCluster) -> Expected {
    let url_app = url(cluster.port(), "hr_app");
    let probe = pool(&url_app, ContextScope::Transaction, 1);
    let (settings, alice_rows, bob_rows, plain_rows) = rt.block_on(async {
        let c = probe.acquire_as(&alice()).await.unwrap();
        let settings = ContextSettings::from_row(&c.query_one(SETTINGS_SQL, &[]).await.unwrap());
        let alice_rows = names(&c.query(LIST, &[]).await.unwrap());
        drop(c);
        let c = probe.acquire_as(&bob()).await.unwrap();
        let bob_rows = names(&c.query(LIST, &[]).await.unwrap());
        drop(c);
        let c = probe.get().await.unwrap();
        let plain_rows = names(&c.query(LIST, &[]).await.unwrap());
        (settings, alice_rows, bob_rows, plain_rows)
    });
    settings.create_login(cluster, ALICE_LOGIN);
    let baseline = deadpool(&url(cluster.port(), ALICE_LOGIN), RecyclingMethod::Fast, 1);
    let (base_settings, base_rows) = rt.block_on(async {
        let c = baseline.get().await.unwrap();
        let s = ContextSettings::from_row(&c.query_one(SETTINGS_SQL, &[]).await.unwrap());
        (s, names(&c.query(LIST, &[]).await.unwrap()))
    });
    assert_eq!(
        base_settings, settings,
        "the baseline login holds alice's context"
    );
    assert_eq!(base_rows, alice_rows, "the baseline sees alice's rows");
    assert!(!alice_rows.is_empty(), "alice sees rows");
    assert_ne!(alice_rows, plain_rows, "a context changes what hr_app sees");
    assert_ne!(alice_rows, bob_rows, "alice and bob see different rows");
    println!(
        "baseline login {ALICE_LOGIN}: {settings:?}\n  alice sees {alice_rows:?}, bob {bob_rows:?}, \
         plain hr_app {plain_rows:?}"
    );
    Expected {
        alice: alice_rows,
        bob: bob_rows,
        plain: plain_rows,
        settings,
    }
}

fn main() {
    let mut c = criterion();
    let cluster = cluster();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let expected = set_up(&rt, &cluster);
    let upstream = SocketAddr::from(([127, 0, 0, 1], cluster.port()));
    let proxy = FlightProxy::start(upstream, Duration::from_micros(500)).unwrap();
    let networks = [("direct", upstream), ("rtt_1ms", proxy.addr())];

    let mut tables = Vec::new();
    for (network, addr) in networks {
        let app = url(addr.port(), "hr_app");
        let login = url(addr.port(), ALICE_LOGIN);

        // One request at a time.
        let mut inter = Interleaver::new(BATCH, |v: &mut Measured<Request>, n| {
            rt.block_on(v.batch(n))
        })
        .fresh_per_call(short_run());
        let (bb8, sqlx, raw_fast, limit, limit_with_reset) = rt.block_on(async {
            (
                bb8(&login, 1).await,
                sqlx(&login, 1).await,
                Limit::raw_fast(addr).await,
                Limit::new(addr, &expected.settings, false).await,
                Limit::new(addr, &expected.settings, true).await,
            )
        });
        let variants = [
            (
                "deadpool_fast",
                Request::Deadpool(deadpool(&login, RecyclingMethod::Fast, 1)),
            ),
            (
                "deadpool_clean",
                Request::Deadpool(deadpool(&login, RecyclingMethod::Clean, 1)),
            ),
            ("bb8_postgres", Request::Bb8(bb8)),
            ("sqlx", Request::Sqlx(sqlx)),
            (
                "ctxpool_plain",
                Request::CtxpoolPlain(pool(&app, ContextScope::Transaction, 1)),
            ),
            (
                "ctxpool_transaction_scope",
                Request::CtxpoolAs(pool(&app, ContextScope::Transaction, 1), alice()),
            ),
            (
                "ctxpool_session_scope",
                Request::CtxpoolAs(pool(&app, ContextScope::Session, 1), alice()),
            ),
            (
                "ctxpool_session_switching",
                Request::CtxpoolSwitching(
                    pool(&app, ContextScope::Session, 1),
                    [bob(), alice()],
                    0,
                ),
            ),
            (
                "naive",
                Request::Naive(
                    pool(&app, ContextScope::Transaction, 1),
                    expected.settings.statement_params(),
                ),
            ),
            ("raw_fast", Request::Limit(Box::new(raw_fast))),
            ("limit", Request::Limit(Box::new(limit))),
            (
                "limit_with_reset",
                Request::Limit(Box::new(limit_with_reset)),
            ),
        ];
        for (name, variant) in variants {
            let measured = rt.block_on(Measured::new(variant));
            inter.add(name, measured);
        }
        // Every variant reads what it should, twice (the second on a reused connection).
        for (name, variant) in inter.variants_mut() {
            for turn in 0..2 {
                let rows = rt.block_on(variant.variant.run());
                let want = match name {
                    "ctxpool_plain" => &expected.plain,
                    "ctxpool_session_switching" if turn == 0 => &expected.alice,
                    "ctxpool_session_switching" => &expected.bob,
                    _ => &expected.alice,
                };
                assert_eq!(&rows, want, "{network}/{name}, request {turn}");
            }
        }
        inter.warm_up(2);
        let group_name = format!("piggyback_{network}");
        let mut group = c.benchmark_group(&group_name);
        if network == "direct" {
            configure(&mut group, 20, 0.5, 4.0);
        } else {
            configure(&mut group, 15, 0.5, 5.0);
        }
        let names: Vec<String> = inter.names().to_vec();
        for (i, name) in names.iter().enumerate() {
            group.bench_function(name, |b| b.iter_custom(|iters| inter.take(i, iters)));
        }
        group.finish();
        tables.push((group_name, inter.table("deadpool_fast", Report::Latency)));
        tables.push((
            format!("piggyback_{network}, where the time went"),
            cpu_table(&mut inter),
        ));
        drop(inter);

        // One more statement in a held checkout.
        let mut held = Interleaver::new(BATCH, |v: &mut Measured<Held>, n| rt.block_on(v.batch(n)))
            .fresh_per_call(short_run());
        let held_limit = rt.block_on(Limit::new(addr, &expected.settings, false));
        let variants = [
            (
                "deadpool_fast_held",
                Held::Deadpool(deadpool(&login, RecyclingMethod::Fast, 1)),
            ),
            (
                "ctxpool_transaction_scope_held",
                Held::Ctxpool(pool(&app, ContextScope::Transaction, 1), Some(alice())),
            ),
            (
                "ctxpool_plain_held",
                Held::Ctxpool(pool(&app, ContextScope::Transaction, 1), None),
            ),
            ("limit_held", Held::Limit(Box::new(held_limit))),
        ];
        for (name, variant) in variants {
            let measured = rt.block_on(Measured::new(variant));
            held.add(name, measured);
        }
        for (name, variant) in held.variants_mut() {
            let rows = rt.block_on(variant.variant.names());
            let want = if name == "ctxpool_plain_held" {
                &expected.plain
            } else {
                &expected.alice
            };
            assert_eq!(&rows, want, "{network}/{name}");
        }
        held.warm_up(2);
        let group_name = format!("further_statement_{network}");
        let mut group = c.benchmark_group(&group_name);
        configure(&mut group, 20, 0.5, 3.0);
        let names: Vec<String> = held.names().to_vec();
        for (i, name) in names.iter().enumerate() {
            group.bench_function(name, |b| b.iter_custom(|iters| held.take(i, iters)));
        }
        group.finish();
        tables.push((
            group_name.clone(),
            held.table("deadpool_fast_held", Report::Latency),
        ));
        tables.push((
            format!("{group_name}, where the time went"),
            cpu_table(&mut held),
        ));
    }
    c.final_summary();

    for (group, table) in tables {
        println!("\n### {group}\n\n{table}");
    }
}
