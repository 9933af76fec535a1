//! The cost the pool adds on the hot path: `get`+drop and `acquire_as`+drop against bare
//! deadpool `get`+drop, with the same connection type and no I/O, at 1 and 32 concurrent
//! tasks on one runtime thread. Prints the ratios of the run at the end (targets: get ≤ 1.15×, acquire_as ≤
//! 1.3× deadpool).
//!
//! `cargo bench --bench hot_path`; HTML reports in `target/criterion/report/index.html`.

#[path = "support/estimates.rs"]
mod estimates;
use estimates::{criterion_dir, median_ns};

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use ctxpool::{Backend, Connection, DiscardReason, EndUserIdentity, Pool, SecurityContext};
use deadpool::managed::{self, RecycleResult};

/// A connection that does nothing: what is measured is the pool.
#[derive(Default)]
struct NoIoConn {
    context: Option<SecurityContext>,
}

impl Connection for NoIoConn {
    type AttachError = std::convert::Infallible;
    fn attach_context(&mut self, context: SecurityContext) -> Result<(), Self::AttachError> {
        self.context = Some(context);
        Ok(())
    }
    fn clear_context(&mut self) {
        self.context = None;
    }
    fn context(&self) -> Option<&SecurityContext> {
        self.context.as_ref()
    }
    fn check_release(&mut self) -> Result<(), DiscardReason> {
        Ok(())
    }
}

struct NoIoBackend;

impl Backend for NoIoBackend {
    type Connection = NoIoConn;
    type Error = std::io::Error;
    async fn connect(&self) -> Result<NoIoConn, std::io::Error> {
        Ok(NoIoConn::default())
    }
}

/// The same connection under bare deadpool.
struct NoIoManager;

impl managed::Manager for NoIoManager {
    type Type = NoIoConn;
    type Error = std::io::Error;
    async fn create(&self) -> Result<NoIoConn, std::io::Error> {
        Ok(NoIoConn::default())
    }
    async fn recycle(
        &self,
        _: &mut NoIoConn,
        _: &managed::Metrics,
    ) -> RecycleResult<std::io::Error> {
        Ok(())
    }
}

const MAX_SIZE: usize = 32;
const TASKS: [usize; 2] = [1, 32];
const CTXPOOL_GET: &str = "ctxpool_get";
const CTXPOOL_ACQUIRE_AS: &str = "ctxpool_acquire_as";
const DEADPOOL_GET: &str = "deadpool_get";

/// One measured operation. Each task clones it once, so no reference count is touched
/// per iteration except by the pool itself.
trait Op: Clone + Send + Sync + 'static {
    fn run(&self) -> impl Future<Output = ()> + Send;
}

#[derive(Clone)]
struct DeadpoolGet(managed::Pool<NoIoManager>);

impl Op for DeadpoolGet {
    async fn run(&self) {
        drop(black_box(self.0.get().await.unwrap()));
    }
}

#[derive(Clone)]
struct CtxpoolGet(Pool<NoIoBackend>);

impl Op for CtxpoolGet {
    async fn run(&self) {
        drop(black_box(self.0.get().await.unwrap()));
    }
}

struct CtxpoolAcquireAs(Pool<NoIoBackend>, SecurityContext);

/// Each task gets a context of its own, as each request builds its own: tasks sharing one
/// `Arc` would measure contention on its reference count, not the pool.
impl Clone for CtxpoolAcquireAs {
    fn clone(&self) -> Self {
        let own = self
            .1
            .with_data_roles(self.1.data_roles().iter().cloned())
            .unwrap();
        Self(self.0.clone(), own)
    }
}

impl Op for CtxpoolAcquireAs {
    async fn run(&self) {
        drop(black_box(self.0.acquire_as(&self.1).await.unwrap()));
    }
}

/// Runs `iters` iterations of `op` spread over `tasks` tasks and returns the wall time.
fn spread<O: Op>(rt: &tokio::runtime::Runtime, tasks: usize, iters: u64, op: &O) -> Duration {
    rt.block_on(async {
        let per_task = iters.div_ceil(tasks as u64);
        let start = Instant::now();
        let handles: Vec<_> = (0..tasks)
            .map(|_| {
                let op = op.clone();
                tokio::spawn(async move {
                    for _ in 0..per_task {
                        op.run().await;
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.unwrap();
        }
        start.elapsed()
    })
}

fn benches(c: &mut Criterion) {
    let ctx = SecurityContext::builder(EndUserIdentity::named("alice", None), "db-token")
        .data_roles(["hr_role"])
        .build()
        .unwrap();
    for tasks in TASKS {
        // One runtime thread: the tasks interleave at every await, and the ratios are
        // reproducible. On a multi-thread runtime with 2 workers the 32-task figures of
        // every pool, deadpool's included, swing by 2-4× between runs with how the tasks
        // land on the workers.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ours = Pool::builder(NoIoBackend)
            .max_size(MAX_SIZE)
            .build()
            .unwrap();
        let bare: managed::Pool<NoIoManager> = managed::Pool::builder(NoIoManager)
            .max_size(MAX_SIZE)
            .build()
            .unwrap();
        let mut group = c.benchmark_group(format!("hot_path_{tasks}"));
        group.measurement_time(Duration::from_secs(4));
        group.warm_up_time(Duration::from_secs(1));
        let deadpool_get = DeadpoolGet(bare);
        let ctxpool_get = CtxpoolGet(ours.clone());
        let ctxpool_acquire_as = CtxpoolAcquireAs(ours, ctx.clone());
        group.bench_function(DEADPOOL_GET, |b| {
            b.iter_custom(|iters| spread(&rt, tasks, iters, &deadpool_get))
        });
        group.bench_function(CTXPOOL_GET, |b| {
            b.iter_custom(|iters| spread(&rt, tasks, iters, &ctxpool_get))
        });
        group.bench_function(CTXPOOL_ACQUIRE_AS, |b| {
            b.iter_custom(|iters| spread(&rt, tasks, iters, &ctxpool_acquire_as))
        });
        group.finish();
    }
}

fn print_ratios() {
    println!("\nhot path, median per operation (ratio to bare deadpool get+drop, same run):");
    println!("| tasks | deadpool get | ctxpool get | ratio | ctxpool acquire_as | ratio |");
    println!("|------:|-------------:|------------:|------:|-------------------:|------:|");
    for tasks in TASKS {
        let group = format!("hot_path_{tasks}");
        let (Some(d), Some(g), Some(a)) = (
            median_ns(&group, DEADPOOL_GET),
            median_ns(&group, CTXPOOL_GET),
            median_ns(&group, CTXPOOL_ACQUIRE_AS),
        ) else {
            println!("| {tasks} | (not measured in this run) | | | | |");
            continue;
        };
        println!(
            "| {tasks} | {d:.0} ns | {g:.0} ns | {:.2}× | {a:.0} ns | {:.2}× |",
            g / d,
            a / d
        );
    }
}

fn main() {
    let mut c = Criterion::default()
        .output_directory(&criterion_dir())
        .configure_from_args();
    benches(&mut c);
    c.final_summary();
    print_ratios();
}
