//! Instructions per request, counted by valgrind's callgrind on both sides: what each
//! variant of the piggyback bench asks of the client process and of its server backend.
//! Wall and CPU times on this 2-core host move with its neighbours; instruction counts do
//! not, so this is where small differences between variants can be told apart.
//!
//! `cargo bench --features peers --bench instructions` (needs `valgrind`:
//! `apt-get install valgrind`). It starts the HR cluster, creates the baseline login
//! `hr_alice` (as the piggyback bench does), and restarts the server under callgrind, so
//! that every backend writes its instruction count when it exits. Then, for each variant,
//! it runs itself as a client under callgrind twice, for [`SHORT`] and for [`LONG`]
//! requests on one connection of its own (a pool of size 1). The difference between the
//! two runs, divided by the difference in requests, is the count per request: start-up,
//! connection and first-use costs cancel out. The table gives user-space instructions
//! only (callgrind does not see the kernel's send, receive and wake-ups). `ctxpool_plain`
//! and `ctxpool_plain_held` read no rows (hr_app without a context sees none), so their
//! server counts are lower than a query returning alice's rows would cost.
//!
//! Variants (see `piggyback.rs` for what each is):
//! - one request = one checkout and `LIST`: `deadpool_fast` (the baseline),
//!   `deadpool_clean`, `ctxpool_plain`, `ctxpool_transaction_scope`,
//!   `ctxpool_session_scope`; and on the bare client, no pool: `raw_fast`, `limit`
//!   (context statement and `LIST` under one Sync), `limit_with_reset`, and the reset's
//!   parts each alone in front of the limit's statements: `limit_with_check` (the check
//!   that opens the reset), `limit_with_check_unscanned` (the same without its scan of
//!   `pg_prepared_statements`), `limit_with_block` (`BEGIN`, the five statements,
//!   `COMMIT`) and `limit_with_select_1` (`SELECT 1`: what any statement costs);
//! - one more statement in a checkout already held: `deadpool_fast_held`,
//!   `ctxpool_transaction_scope_held`, `ctxpool_plain_held` (for which `limit` is the
//!   limit: the bare client has no checkout).

// Shared with the piggyback bench, which builds its limits with `Limit::new`.
#[allow(dead_code)]
#[path = "support/limit.rs"]
mod limit;
#[path = "support/raw.rs"]
mod raw;
// Shared with the criterion benches, of which this one uses the pools and requests only.
#[allow(dead_code)]
mod support;

use std::hint::black_box;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ctxpool::postgres::ContextScope;
use deadpool_postgres::RecyclingMethod;
use limit::{Limit, PID_SQL, RESET_SQL};
use support::*;

/// Requests of the shorter run of each variant.
const SHORT: u64 = 200;
/// Requests of the longer run.
const LONG: u64 = 1000;
/// How long a backend may take to write its count once its client has gone.
const DUMP_TIMEOUT: Duration = Duration::from_secs(120);

/// The reset's check without its scan of `pg_prepared_statements`.
const CHECK_UNSCANNED_SQL: &str =
    "SELECT pg_catalog.set_config('role', NULL, false), pg_catalog.pg_advisory_unlock_all()";

const VARIANTS: [&str; 15] = [
    "deadpool_fast",
    "deadpool_clean",
    "ctxpool_plain",
    "ctxpool_transaction_scope",
    "ctxpool_session_scope",
    "raw_fast",
    "limit",
    "limit_with_reset",
    "limit_with_check",
    "limit_with_check_unscanned",
    "limit_with_block",
    "limit_with_select_1",
    "deadpool_fast_held",
    "ctxpool_transaction_scope_held",
    "ctxpool_plain_held",
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--client") {
        Some(at) => {
            let variant = &args[at + 1];
            let requests: u64 = args[at + 2].parse().expect("a request count");
            let port: u16 = args[at + 3].parse().expect("a port");
            client(variant, requests, port);
        }
        None => count_all(),
    }
}

/// Starts the cluster under callgrind and prints the table.
fn count_all() {
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("the instructions bench needs valgrind: apt-get install valgrind");
        std::process::exit(1);
    }
    let cluster = cluster();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let app_pool = pool(&url(cluster.port(), "hr_app"), ContextScope::Transaction, 1);
    let settings = rt.block_on(async {
        let c = app_pool.acquire_as(&alice()).await.unwrap();
        ContextSettings::from_row(&c.query_one(SETTINGS_SQL, &[]).await.unwrap())
    });
    drop(app_pool);
    settings.create_login(&cluster, ALICE_LOGIN);
    // No autovacuum worker comes and goes during the runs (their counts are per process
    // anyway, but the server stays quieter).
    cluster
        .psql("postgres", "ALTER SYSTEM SET autovacuum = off")
        .unwrap();
    cluster.stop().unwrap();
    let counts = cluster.dir().join("callgrind");
    std::fs::create_dir_all(&counts).unwrap();
    chown_like(&counts, cluster.dir());
    let out_file = format!("--callgrind-out-file={}/server.%p", counts.display());
    cluster
        .resume_wrapped(&["valgrind", "--tool=callgrind", &out_file])
        .unwrap();
    // The first backend after a restart rebuilds the relation cache's init files, which
    // later backends read: it must not be one of the measured ones.
    cluster.psql("hr", "SELECT 1").unwrap();

    let exe = std::env::current_exe().unwrap();
    let mut rows = Vec::new();
    for variant in VARIANTS {
        let mut runs = [(0u64, 0u64); 2];
        for (run, requests) in [SHORT, LONG].into_iter().enumerate() {
            let client_file = counts.join(format!("client.{variant}.{requests}"));
            let output = Command::new("valgrind")
                .arg("--tool=callgrind")
                .arg(format!("--callgrind-out-file={}", client_file.display()))
                .arg(&exe)
                .args(["--client", variant, &requests.to_string()])
                .arg(cluster.port().to_string())
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{variant}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let pid: i32 = String::from_utf8_lossy(&output.stdout)
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("{variant}: no backend pid ({e})"));
            let server = total(&counts.join(format!("server.{pid}")), DUMP_TIMEOUT)
                .unwrap_or_else(|| panic!("{variant}: backend {pid} wrote no count"));
            let client = total(&client_file, Duration::ZERO)
                .unwrap_or_else(|| panic!("{variant}: the client wrote no count"));
            runs[run] = (client, server);
        }
        let per = |long: u64, short: u64| long.saturating_sub(short) / (LONG - SHORT);
        let row = (
            variant,
            per(runs[1].0, runs[0].0),
            per(runs[1].1, runs[0].1),
        );
        eprintln!("{row:?}");
        rows.push(row);
    }

    let base = |name: &str| {
        rows.iter()
            .find(|(v, ..)| *v == name)
            .map_or(1, |&(_, c, s)| (c + s).max(1))
    };
    let mut table = String::from(
        "| variant | client | server | both | both vs baseline |\n|---|---:|---:|---:|---:|\n",
    );
    for &(variant, client, server) in &rows {
        let baseline = if variant.ends_with("_held") {
            base("deadpool_fast_held")
        } else {
            base("deadpool_fast")
        };
        table.push_str(&format!(
            "| {variant} | {client} | {server} | {} | {:.2}× |\n",
            client + server,
            (client + server) as f64 / baseline as f64
        ));
    }
    println!(
        "\n### Instructions per request (user space; runs of {SHORT} and {LONG} requests)\n\n\
         {table}\nBaseline: deadpool_fast (deadpool_fast_held for the _held rows)."
    );
}

/// Gives `dir` the owner of `like` (the server's OS user may then write there).
fn chown_like(dir: &Path, like: &Path) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(like).unwrap();
    std::os::unix::fs::chown(dir, Some(meta.uid()), Some(meta.gid())).unwrap();
}

/// The instruction total of a callgrind file, waiting up to `timeout` for it to be
/// written (a backend writes it when it exits).
fn total(file: &PathBuf, timeout: Duration) -> Option<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = std::fs::read_to_string(file).ok().and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("totals:"))
                .and_then(|t| t.split_whitespace().next()?.parse().ok())
        });
        if found.is_some() || Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The client side: `requests` requests of `variant` on one connection to the server on
/// `port`, after printing that connection's backend pid.
fn client(variant: &str, requests: u64, port: u16) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let login = url(port, ALICE_LOGIN);
        let app = url(port, "hr_app");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        match variant {
            "deadpool_fast" | "deadpool_clean" | "deadpool_fast_held" => {
                let method = if variant == "deadpool_clean" {
                    RecyclingMethod::Clean
                } else {
                    RecyclingMethod::Fast
                };
                let pool = deadpool(&login, method, 1);
                let c = pool.get().await.unwrap();
                let pid: i32 = c.query_one(PID_SQL, &[]).await.unwrap().get(0);
                println!("{pid}");
                if variant.ends_with("_held") {
                    let s = c.prepare_cached(LIST).await.unwrap();
                    for _ in 0..requests {
                        black_box(c.query(&s, &[]).await.unwrap());
                    }
                } else {
                    drop(c);
                    for _ in 0..requests {
                        black_box(deadpool_request(&pool).await);
                    }
                }
            }
            "ctxpool_plain"
            | "ctxpool_transaction_scope"
            | "ctxpool_session_scope"
            | "ctxpool_transaction_scope_held"
            | "ctxpool_plain_held" => {
                let scope = if variant == "ctxpool_session_scope" {
                    ContextScope::Session
                } else {
                    ContextScope::Transaction
                };
                let who = (!variant.starts_with("ctxpool_plain")).then(alice);
                let pool = pool(&app, scope, 1);
                let pid: i32 = pool
                    .get()
                    .await
                    .unwrap()
                    .query_one(PID_SQL, &[])
                    .await
                    .unwrap()
                    .get(0);
                println!("{pid}");
                if variant.ends_with("_held") {
                    let c = match &who {
                        Some(who) => pool.acquire_as(who).await.unwrap(),
                        None => pool.get().await.unwrap(),
                    };
                    let s = c.prepare_cached(LIST).await.unwrap();
                    for _ in 0..requests {
                        black_box(c.query(&s, &[]).await.unwrap());
                    }
                } else {
                    for _ in 0..requests {
                        black_box(ctxpool_request(&pool, who.as_ref()).await);
                    }
                }
            }
            _ if variant == "raw_fast" || variant.starts_with("limit") => {
                let mut limit = if variant == "raw_fast" {
                    Limit::raw_fast(addr).await
                } else {
                    let probe = pool(&app, ContextScope::Transaction, 1);
                    let c = probe.acquire_as(&alice()).await.unwrap();
                    let settings =
                        ContextSettings::from_row(&c.query_one(SETTINGS_SQL, &[]).await.unwrap());
                    // Every variant with a part of the reset holds the reset's statements
                    // (and the stand-in it sends, if any), so that the scan builds the
                    // same rows as under limit_with_reset.
                    let with = |extra: &'static str| {
                        let mut statements = RESET_SQL.to_vec();
                        statements.push(extra);
                        statements
                    };
                    let (statements, sent): (Vec<&str>, Vec<usize>) = match variant {
                        "limit" => (RESET_SQL.to_vec(), vec![]),
                        "limit_with_reset" => (RESET_SQL.to_vec(), (0..RESET_SQL.len()).collect()),
                        "limit_with_check" => (RESET_SQL.to_vec(), vec![0]),
                        "limit_with_block" => (RESET_SQL.to_vec(), (1..RESET_SQL.len()).collect()),
                        "limit_with_check_unscanned" => {
                            (with(CHECK_UNSCANNED_SQL), vec![RESET_SQL.len()])
                        }
                        "limit_with_select_1" => (with("SELECT 1"), vec![RESET_SQL.len()]),
                        other => panic!("no variant {other}"),
                    };
                    Limit::with_parts(addr, &settings, &statements, &sent).await
                };
                let pid = limit.backend_pid().await.unwrap();
                println!("{pid}");
                for _ in 0..requests {
                    black_box(limit.request().await);
                }
            }
            other => panic!("no variant {other}"),
        }
    });
}
