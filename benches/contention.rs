//! Throughput under contention: 32 tasks on a pool of 8, each task doing get (or
//! acquire_as) + one prepared query, ctxpool plain and with a context (transaction scope)
//! against deadpool-postgres with `RecyclingMethod::Fast`. Target: with context ≥ 0.9×
//! deadpool-postgres plain throughput.
//!
//! Needs the `peers` feature: `cargo bench --features peers --bench contention`.

mod support;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use ctxpool::postgres::ContextScope;
use support::*;

const TASKS: u64 = 32;
const POOL: usize = 8;

#[derive(Clone)]
enum Subject {
    CtxpoolPlain(ctxpool::postgres::Pool),
    CtxpoolContext(ctxpool::postgres::Pool, ctxpool::SecurityContext),
    Deadpool(deadpool_postgres::Pool),
}

impl Subject {
    async fn request(&self) {
        match self {
            Self::CtxpoolPlain(p) => {
                let c = p.get().await.unwrap();
                let s = c.prepare_cached(LIST).await.unwrap();
                black_box(c.query(&s, &[]).await.unwrap());
            }
            Self::CtxpoolContext(p, ctx) => {
                let c = p.acquire_as(ctx).await.unwrap();
                let s = c.prepare_cached(LIST).await.unwrap();
                black_box(c.query(&s, &[]).await.unwrap());
            }
            Self::Deadpool(p) => {
                let c = p.get().await.unwrap();
                let s = c.prepare_cached(LIST).await.unwrap();
                black_box(c.query(&s, &[]).await.unwrap());
            }
        }
    }
}

fn main() {
    let mut c = Criterion::default()
        .output_directory(&criterion_dir())
        .configure_from_args();
    let cluster = cluster();
    let url = cluster.url("hr_app", "hr");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let deadpool = {
        let mut cfg = deadpool_postgres::Config::new();
        cfg.url = Some(url.clone());
        cfg.manager = Some(deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        });
        cfg.pool = Some(deadpool_postgres::PoolConfig::new(POOL));
        cfg.create_pool(
            Some(deadpool_postgres::Runtime::Tokio1),
            tokio_postgres::NoTls,
        )
        .unwrap()
    };
    let subjects = [
        ("deadpool_postgres_plain", Subject::Deadpool(deadpool)),
        (
            "ctxpool_plain",
            Subject::CtxpoolPlain(pool(&url, ContextScope::Transaction, POOL)),
        ),
        (
            "ctxpool_context",
            Subject::CtxpoolContext(pool(&url, ContextScope::Transaction, POOL), alice()),
        ),
    ];
    let mut group = c.benchmark_group("contention_32_tasks_pool_8");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(6));
    for (name, subject) in &subjects {
        group.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let per_task = iters.div_ceil(TASKS);
                    let start = Instant::now();
                    let tasks: Vec<_> = (0..TASKS)
                        .map(|_| {
                            let s = subject.clone();
                            tokio::spawn(async move {
                                for _ in 0..per_task {
                                    s.request().await;
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
    c.final_summary();

    let group = "contention_32_tasks_pool_8";
    println!(
        "\ncontention, 32 tasks on a pool of 8 (throughput relative to deadpool-postgres Fast):"
    );
    println!("| pool | per request | requests/s | ratio |");
    println!("|---|---:|---:|---:|");
    let Some(base) = median_ns(group, "deadpool_postgres_plain") else {
        return;
    };
    for (name, _) in &subjects {
        if let Some(ns) = median_ns(group, name) {
            println!(
                "| {name} | {:.1} µs | {:.0} | {:.2}× |",
                ns / 1e3,
                1e9 / ns,
                base / ns
            );
        }
    }
}
