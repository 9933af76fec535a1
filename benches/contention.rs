//! Throughput under contention: 32 tasks sharing a pool of 8 connections on a
//! multi-thread runtime with 2 workers, each request one checkout and one query of alice's
//! view of `LIST`.
//!
//! Subjects:
//! - `deadpool_fast` — **the baseline**: deadpool-postgres, `RecyclingMethod::Fast`, on the
//!   `hr_alice` login whose role defaults hold alice's context (so it pays nothing for it);
//! - `deadpool_clean`, `bb8_postgres` (defaults; `query_typed`, as bb8-postgres has no
//!   statement cache), `sqlx` (`PgPool` defaults): the same login;
//! - `ctxpool_plain` (`get`, no context) and `ctxpool_transaction_scope`
//!   (`acquire_as(&alice)`), on hr_app.
//!
//! # Reading it
//! Subjects are measured interleaved (see `support/interleave.rs`): each round runs, for
//! every subject in rotating order, a burst of 32 × 8 requests spread over the 32 tasks
//! and takes burst time / requests as that round's time per request. Criterion's figures
//! are per request (its "throughput" is their inverse). The table printed at the end gives
//! each subject's requests/s (median round) and the median, p25 and p75 of its per-round
//! throughput ratio to `deadpool_fast` (below 1 is slower). A second table says where the
//! time went: how busy the host's cores were during each subject's bursts, and the CPU
//! time per request, split into the bench process's (the client: the pool, tokio-postgres
//! and their kernel work) and the rest of the host's (the server backends, mostly). When
//! the cores are busy throughout, throughput is the inverse of that CPU time.
//!
//! `cargo bench --features peers --bench contention`; a smoke run with
//! `CTXPOOL_BENCH_QUICK=1` (or criterion's `-- --quick`).

mod support;

use std::hint::black_box;
use std::time::{Duration, Instant};

use ctxpool::postgres::ContextScope;
use deadpool_postgres::RecyclingMethod;
use support::interleave::{Interleaver, Report};
use support::*;

const TASKS: u64 = 32;
const POOL: usize = 8;
/// Requests per task in one burst.
const PER_TASK: u64 = 8;

type Bb8Pool = bb8::Pool<bb8_postgres::PostgresConnectionManager<tokio_postgres::NoTls>>;

#[derive(Clone)]
enum Subject {
    Deadpool(deadpool_postgres::Pool),
    Bb8(Bb8Pool),
    Sqlx(sqlx::PgPool),
    CtxpoolPlain(ctxpool::postgres::Pool),
    CtxpoolAs(ctxpool::postgres::Pool, ctxpool::SecurityContext),
}

impl Subject {
    /// One checkout and one query; the names read.
    async fn request(&self) -> Vec<String> {
        match self {
            Self::Deadpool(p) => deadpool_request(p).await,
            Self::Bb8(p) => bb8_request(p).await,
            Self::Sqlx(p) => sqlx_request(p).await,
            Self::CtxpoolPlain(p) => ctxpool_request(p, None).await,
            Self::CtxpoolAs(p, who) => ctxpool_request(p, Some(who)).await,
        }
    }

    /// `n` requests spread over [`TASKS`] tasks; the time until the last one finished.
    async fn burst(&self, n: u64) -> Duration {
        let per_task = n.div_ceil(TASKS);
        let start = Instant::now();
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let s = self.clone();
                tokio::spawn(async move {
                    for _ in 0..per_task {
                        black_box(s.request().await);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        start.elapsed()
    }
}

/// CPU time of this process's threads in nanoseconds (the first field of Linux's
/// `schedstat` of each); 0 where it cannot be read.
fn process_cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|task| Some(cpu_ns(task.ok()?.path().join("schedstat"))))
        .sum()
}

/// The host's busy and total CPU time since boot, in clock ticks (the `cpu` line of
/// `/proc/stat`; idle and iowait count as not busy); zeros where it cannot be read.
fn host_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// Nanoseconds per clock tick of `/proc/stat` (`USER_HZ`, 100 on Linux).
const NS_PER_TICK: u64 = 10_000_000;

/// A subject with where its time went, summed over every timed burst.
struct Measured {
    subject: Subject,
    requests: u64,
    client_ns: u64,
    busy_ticks: u64,
    total_ticks: u64,
}

impl Measured {
    fn new(subject: Subject) -> Self {
        Self {
            subject,
            requests: 0,
            client_ns: 0,
            busy_ticks: 0,
            total_ticks: 0,
        }
    }

    fn burst(&mut self, rt: &tokio::runtime::Runtime, n: u64) -> Duration {
        let (busy, total) = host_ticks();
        let client = process_cpu_ns();
        let wall = rt.block_on(self.subject.burst(n));
        let (busy_after, total_after) = host_ticks();
        self.client_ns += process_cpu_ns().saturating_sub(client);
        self.busy_ticks += busy_after.saturating_sub(busy);
        self.total_ticks += total_after.saturating_sub(total);
        self.requests += n.div_ceil(TASKS) * TASKS;
        wall
    }

    /// One row of the CPU table.
    fn row(&self, name: &str) -> String {
        let per = |ns: f64| ns / 1000.0 / self.requests.max(1) as f64;
        let host = (self.busy_ticks * NS_PER_TICK) as f64;
        format!(
            "| {name} | {:.0} % | {:.1} µs | {:.1} µs | {:.1} µs |",
            100.0 * self.busy_ticks as f64 / self.total_ticks.max(1) as f64,
            per(host),
            per(self.client_ns as f64),
            per((host - self.client_ns as f64).max(0.0)),
        )
    }
}

fn main() {
    let mut c = criterion();
    let cluster = cluster();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = url(cluster.port(), "hr_app");
    let login = url(cluster.port(), ALICE_LOGIN);

    // The baseline login, from the settings ctxpool applies for alice, checked to match.
    let ctx_pool = pool(&app, ContextScope::Transaction, POOL);
    let settings = rt.block_on(async {
        let c = ctx_pool.acquire_as(&alice()).await.unwrap();
        ContextSettings::from_row(&c.query_one(SETTINGS_SQL, &[]).await.unwrap())
    });
    settings.create_login(&cluster, ALICE_LOGIN);
    let (bb8, sqlx) = rt.block_on(async {
        (
            bb8(&login, POOL as u32).await,
            sqlx(&login, POOL as u32).await,
        )
    });
    let subjects = [
        (
            "deadpool_fast",
            Subject::Deadpool(deadpool(&login, RecyclingMethod::Fast, POOL)),
        ),
        (
            "deadpool_clean",
            Subject::Deadpool(deadpool(&login, RecyclingMethod::Clean, POOL)),
        ),
        ("bb8_postgres", Subject::Bb8(bb8)),
        ("sqlx", Subject::Sqlx(sqlx)),
        (
            "ctxpool_plain",
            Subject::CtxpoolPlain(pool(&app, ContextScope::Transaction, POOL)),
        ),
        (
            "ctxpool_transaction_scope",
            Subject::CtxpoolAs(ctx_pool, alice()),
        ),
    ];

    let mut inter = Interleaver::new(TASKS * PER_TASK, |s: &mut Measured, n| s.burst(&rt, n))
        .fresh_per_call(short_run());
    for (name, subject) in subjects {
        inter.add(name, Measured::new(subject));
    }
    // Every subject with alice's context reads her rows; ctxpool_plain reads none.
    let alice_rows = rt.block_on(
        inter
            .variants_mut()
            .next()
            .expect("a baseline")
            .1
            .subject
            .request(),
    );
    assert!(!alice_rows.is_empty(), "the baseline sees alice's rows");
    for (name, subject) in inter.variants_mut() {
        let rows = rt.block_on(subject.subject.request());
        if name == "ctxpool_plain" {
            assert_ne!(rows, alice_rows, "{name} has no context");
        } else {
            assert_eq!(rows, alice_rows, "{name}");
        }
    }
    inter.warm_up(2);

    let group_name = format!("contention_{TASKS}_tasks_pool_{POOL}");
    let mut group = c.benchmark_group(&group_name);
    configure(&mut group, 20, 1.0, 8.0);
    let names: Vec<String> = inter.names().to_vec();
    for (i, name) in names.iter().enumerate() {
        group.bench_function(name, |b| b.iter_custom(|iters| inter.take(i, iters)));
    }
    group.finish();
    c.final_summary();

    println!(
        "\n### {group_name}\n\n{}",
        inter.table("deadpool_fast", Report::Throughput)
    );
    let mut cpu = String::from(
        "| variant | host busy | CPU per request | client | server and rest |\n\
         |---|---:|---:|---:|---:|\n",
    );
    for (name, measured) in inter.variants_mut() {
        cpu.push_str(&measured.row(name));
        cpu.push('\n');
    }
    println!("\n### {group_name}, where the time went\n\n{cpu}");

    // How often, on this multi-thread runtime, a context statement and its user statement
    // reached the wire apart (the Sync held until the second came) or not together at
    // all (the Sync kept): summed over the pool's connections.
    let ctx_pool = inter.variants_mut().find_map(|(_, s)| match &s.subject {
        Subject::CtxpoolAs(p, _) => Some(p.clone()),
        _ => None,
    });
    if let Some(pool) = ctx_pool {
        let (held, unmerged) = rt.block_on(async {
            let mut held = 0;
            let mut unmerged = 0;
            let mut handles = Vec::new();
            for _ in 0..POOL {
                let c = pool.get().await.unwrap();
                held += c.held_syncs();
                unmerged += c.unmerged_batches();
                handles.push(c);
            }
            (held, unmerged)
        });
        println!(
            "ctxpool_transaction_scope, over its {POOL} connections: {held} Syncs held for a \
             follower that came later, {unmerged} batches sent unmerged"
        );
    }
}
