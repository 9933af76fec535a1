//! What a context costs per query: plain `get`+query against `acquire_as`+query in both
//! scopes and against the naive way (the context as separate awaited statements), on
//! loopback and through a proxy adding ~1 ms of round trip (OS-thread timers).
//!
//! Targets, as ratios to plain in the same run: ≤ 1.03× at 1 ms RTT, ≤ 1.3× direct.
//! `cargo bench --bench piggyback`; HTML in `target/criterion/report/index.html`.

mod support;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use ctxpool::SecurityContext;
use ctxpool::postgres::{ContextScope, Pool};
use ctxpool::testing::FlightProxy;
use support::*;
use tokio_postgres::types::Type;

const VARIANTS: [&str; 5] = [
    "plain",
    "transaction_scope",
    "session_scope_same_user",
    "session_scope_switching",
    "naive",
];

/// One request of the named variant.
async fn request(variant: &str, pools: &Pools, i: u64) {
    let (alice, bob) = (&pools.alice, &pools.bob);
    let rows = match variant {
        "plain" => {
            let c = pools.tx.get().await.unwrap();
            let s = c.prepare_cached(LIST).await.unwrap();
            c.query(&s, &[]).await.unwrap()
        }
        "transaction_scope" => {
            let c = pools.tx.acquire_as(alice).await.unwrap();
            let s = c.prepare_cached(LIST).await.unwrap();
            c.query(&s, &[]).await.unwrap()
        }
        "session_scope_same_user" => {
            let c = pools.session.acquire_as(alice).await.unwrap();
            let s = c.prepare_cached(LIST).await.unwrap();
            c.query(&s, &[]).await.unwrap()
        }
        "session_scope_switching" => {
            let who: &SecurityContext = if i % 2 == 0 { alice } else { bob };
            let c = pools.session.acquire_as(who).await.unwrap();
            let s = c.prepare_cached(LIST).await.unwrap();
            c.query(&s, &[]).await.unwrap()
        }
        _ => {
            // The naive way: set the context, query, reset, each statement awaited.
            let c = pools.tx.get().await.unwrap();
            let s = c.prepare_cached(LIST).await.unwrap();
            let set = "SELECT set_config('role', $1, false), set_config('ctxpool.end_user', $2, false), \
                       set_config('hr.hcm_context.emp_id', $3, false)";
            c.query_typed(
                set,
                &[
                    (&"hr_employee", Type::TEXT),
                    (&"alice", Type::TEXT),
                    (&"3", Type::TEXT),
                ],
            )
            .await
            .unwrap();
            let rows = c.query(&s, &[]).await.unwrap();
            c.batch_execute("RESET ROLE; RESET ctxpool.end_user; RESET hr.hcm_context.emp_id")
                .await
                .unwrap();
            rows
        }
    };
    black_box(rows);
}

struct Pools {
    tx: Pool,
    session: Pool,
    alice: SecurityContext,
    bob: SecurityContext,
}

fn main() {
    let mut c = Criterion::default()
        .output_directory(&criterion_dir())
        .configure_from_args();
    let cluster = cluster();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.port()));
    let proxy = FlightProxy::start(addr, Duration::from_micros(500)).unwrap();
    let networks = [
        ("direct", cluster.url("hr_app", "hr")),
        (
            "rtt_1ms",
            format!("postgres://hr_app@127.0.0.1:{}/hr", proxy.port()),
        ),
    ];
    for (network, url) in &networks {
        let pools = Pools {
            tx: pool(url, ContextScope::Transaction, 1),
            session: pool(url, ContextScope::Session, 1),
            alice: alice(),
            bob: bob(),
        };
        let mut group = c.benchmark_group(format!("piggyback_{network}"));
        if *network == "rtt_1ms" {
            group
                .sample_size(20)
                .measurement_time(Duration::from_secs(4));
        } else {
            group
                .sample_size(50)
                .measurement_time(Duration::from_secs(4));
        }
        for variant in VARIANTS {
            group.bench_function(variant, |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        for i in 0..iters {
                            request(variant, &pools, i).await;
                        }
                        start.elapsed()
                    })
                })
            });
        }
        group.finish();
    }
    c.final_summary();

    println!("\npiggyback, median per request (ratio to plain get+query, same run):");
    println!("| network | {} |", VARIANTS.join(" | "));
    println!("|---|{}", "---:|".repeat(VARIANTS.len()));
    for (network, _) in &networks {
        let group = format!("piggyback_{network}");
        let Some(plain) = median_ns(&group, "plain") else {
            continue;
        };
        let cells: Vec<String> = VARIANTS
            .iter()
            .map(|v| match median_ns(&group, v) {
                Some(ns) => format!("{:.0} µs ({:.2}×)", ns / 1e3, ns / plain),
                None => "-".into(),
            })
            .collect();
        println!("| {network} | {} |", cells.join(" | "));
    }
}
