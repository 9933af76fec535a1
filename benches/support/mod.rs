//! Shared by the PostgreSQL benches: a throwaway cluster with the HR schema, pools, the
//! baseline login that holds alice's context in its role defaults, and the
//! [`interleave::Interleaver`] that measures variants round-robin.

use std::time::Duration;

use criterion::{BenchmarkGroup, Criterion, measurement::WallTime};
use ctxpool::postgres::{ContextScope, Pool};
use ctxpool_testkit::PgCluster;

// `median_ns` serves the benches whose ratios come from criterion's estimates alone.
#[allow(dead_code)]
pub mod estimates;
pub mod interleave;
pub use estimates::criterion_dir;

#[path = "../../tests/support/mod.rs"]
mod hr;

// Each bench uses its own subset.
#[allow(unused_imports)]
pub use hr::{LIST, alice, bob};

/// The login of the baseline: a member of hr_app whose role defaults hold exactly the
/// settings ctxpool applies for [`alice`], so that a plain pool logging in as it runs every
/// statement under alice's context without sending a statement of its own.
pub const ALICE_LOGIN: &str = "hr_alice";

/// The flattened attributes of [`alice`], as the HR policies read them.
const ATTRIBUTES: [&str; 2] = ["hr.hcm_context.emp_id", "hr.hcm_context.org_id"];

/// Everything a policy can read of a context (see `ctxpool::postgres::mapping`): the
/// effective role, the `ctxpool.*` settings and alice's flattened attributes.
pub const SETTINGS_SQL: &str = "SELECT current_user::text, \
     current_setting('ctxpool.end_user', true), \
     current_setting('ctxpool.data_roles', true), \
     current_setting('ctxpool.attributes', true), \
     current_setting('hr.hcm_context.emp_id', true), \
     current_setting('hr.hcm_context.org_id', true)";

/// What [`SETTINGS_SQL`] read: a session's context as its policies see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContextSettings {
    pub role: String,
    pub end_user: String,
    pub data_roles: String,
    pub attributes: String,
    /// Values of `ATTRIBUTES`, in order.
    pub flattened: Vec<String>,
}

impl ContextSettings {
    /// From the one row of [`SETTINGS_SQL`] (a setting never set reads as `""`).
    pub fn from_row(row: &tokio_postgres::Row) -> Self {
        let col = |i: usize| row.get::<_, Option<String>>(i).unwrap_or_default();
        Self {
            role: col(0),
            end_user: col(1),
            data_roles: col(2),
            attributes: col(3),
            flattened: (4..4 + ATTRIBUTES.len()).map(col).collect(),
        }
    }

    /// Creates `login`, a member of hr_app whose role defaults are these settings.
    /// Membership of hr_app (which is granted the data roles) is what lets its default
    /// `role` be a data role: PostgreSQL 15 allows `SET ROLE` to any role the session
    /// user is a member of, directly or not.
    pub fn create_login(&self, cluster: &PgCluster, login: &str) {
        let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
        let mut sql = format!(
            "CREATE ROLE {login} LOGIN IN ROLE hr_app;\n\
             ALTER ROLE {login} SET role = {};\n\
             ALTER ROLE {login} SET ctxpool.end_user = {};\n\
             ALTER ROLE {login} SET ctxpool.data_roles = {};\n\
             ALTER ROLE {login} SET ctxpool.attributes = {};\n",
            quote(&self.role),
            quote(&self.end_user),
            quote(&self.data_roles),
            quote(&self.attributes),
        );
        for (name, value) in ATTRIBUTES.iter().zip(&self.flattened) {
            sql.push_str(&format!(
                "ALTER ROLE {login} SET \"{name}\" = {};\n",
                quote(value)
            ));
        }
        cluster
            .psql("hr", &sql)
            .unwrap_or_else(|e| panic!("creating the baseline login {login}: {e}"));
    }

    /// The parameters of a transaction-local context statement setting the same (see
    /// `CONTEXT_SQL` of the piggyback bench): role, the `ctxpool.*` settings, then each
    /// attribute's name and value.
    #[allow(dead_code)] // piggyback only
    pub fn statement_params(&self) -> Vec<String> {
        let mut params = vec![
            self.role.clone(),
            self.end_user.clone(),
            self.data_roles.clone(),
            self.attributes.clone(),
        ];
        for (name, value) in ATTRIBUTES.iter().zip(&self.flattened) {
            params.push((*name).to_owned());
            params.push(value.clone());
        }
        params
    }
}

/// CPU time a thread or process has run, in nanoseconds (the first field of Linux's
/// `schedstat` at this path); 0 where it cannot be read.
#[allow(dead_code)] // piggyback and contention only
pub fn cpu_ns(schedstat: impl AsRef<std::path::Path>) -> u64 {
    std::fs::read_to_string(schedstat)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The first column (`name`) of each row.
pub fn names(rows: &[tokio_postgres::Row]) -> Vec<String> {
    rows.iter().map(|r| r.get::<_, String>(0)).collect()
}

pub fn cluster() -> PgCluster {
    hr::hr_cluster()
}

/// A ctxpool pool on `url`, logging in as hr_app.
pub fn pool(url: &str, scope: ContextScope, max_size: usize) -> Pool {
    hr::pool(url, scope, max_size)
}

/// `postgres://{user}@127.0.0.1:{port}/hr`.
pub fn url(port: u16, user: &str) -> String {
    format!("postgres://{user}@127.0.0.1:{port}/hr")
}

/// A deadpool-postgres pool on `url` with this recycling method.
pub fn deadpool(
    url: &str,
    method: deadpool_postgres::RecyclingMethod,
    max_size: usize,
) -> deadpool_postgres::Pool {
    let mut cfg = deadpool_postgres::Config::new();
    cfg.url = Some(url.to_owned());
    cfg.manager = Some(deadpool_postgres::ManagerConfig {
        recycling_method: method,
    });
    cfg.pool = Some(deadpool_postgres::PoolConfig::new(max_size));
    cfg.create_pool(
        Some(deadpool_postgres::Runtime::Tokio1),
        tokio_postgres::NoTls,
    )
    .expect("a deadpool-postgres pool")
}

/// A bb8 pool (bb8-postgres, default builder but for the size) on `url`.
pub async fn bb8(
    url: &str,
    max_size: u32,
) -> bb8::Pool<bb8_postgres::PostgresConnectionManager<tokio_postgres::NoTls>> {
    let manager =
        bb8_postgres::PostgresConnectionManager::new_from_stringlike(url, tokio_postgres::NoTls)
            .expect("a bb8-postgres manager");
    bb8::Pool::builder()
        .max_size(max_size)
        .build(manager)
        .await
        .expect("a bb8 pool")
}

/// A sqlx pool (defaults but for the size) on `url`.
pub async fn sqlx(url: &str, max_size: u32) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max_size)
        .connect(url)
        .await
        .expect("a sqlx pool")
}

/// One deadpool-postgres checkout and `LIST` through its statement cache.
pub async fn deadpool_request(pool: &deadpool_postgres::Pool) -> Vec<String> {
    let c = pool.get().await.unwrap();
    let s = c.prepare_cached(LIST).await.unwrap();
    names(&c.query(&s, &[]).await.unwrap())
}

/// One bb8 checkout and `LIST` (bb8-postgres has no statement cache: `query_typed`, one
/// round trip).
pub async fn bb8_request(
    pool: &bb8::Pool<bb8_postgres::PostgresConnectionManager<tokio_postgres::NoTls>>,
) -> Vec<String> {
    let c = pool.get().await.unwrap();
    names(&c.query_typed(LIST, &[]).await.unwrap())
}

/// `LIST` on a sqlx pool (prepared and cached by sqlx).
pub async fn sqlx_request(pool: &sqlx::PgPool) -> Vec<String> {
    use sqlx::Row as _;
    sqlx::query(LIST)
        .fetch_all(pool)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<String, _>(0))
        .collect()
}

/// One ctxpool checkout (under `who`'s context, or plain) and `LIST` through its statement
/// cache.
pub async fn ctxpool_request(pool: &Pool, who: Option<&ctxpool::SecurityContext>) -> Vec<String> {
    let c = match who {
        Some(who) => pool.acquire_as(who).await.unwrap(),
        None => pool.get().await.unwrap(),
    };
    let s = c.prepare_cached(LIST).await.unwrap();
    names(&c.query(&s, &[]).await.unwrap())
}

/// Criterion writing to [`criterion_dir`], with 20 000 bootstrap resamples (a tenth of
/// the analysis time of the default 100 000, for confidence intervals as good at these
/// sample sizes); the command line still overrides.
pub fn criterion() -> Criterion {
    Criterion::default()
        .output_directory(&criterion_dir())
        .nresamples(20_000)
        .configure_from_args()
}

/// Whether a short smoke run was asked for with `CTXPOOL_BENCH_QUICK=1`.
pub fn quick() -> bool {
    std::env::var("CTXPOOL_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Whether this is a short run, by `CTXPOOL_BENCH_QUICK` or criterion's `--quick`: the
/// interleavers then draw fresh rounds for every call (see
/// [`interleave::Interleaver::fresh_per_call`]).
pub fn short_run() -> bool {
    quick() || std::env::args().any(|a| a == "--quick")
}

/// Applies `(sample size, warm-up, measurement)` to `group`, or the smoke-run settings
/// under [`quick`].
pub fn configure(
    group: &mut BenchmarkGroup<'_, WallTime>,
    samples: usize,
    warm: f64,
    measure: f64,
) {
    if quick() {
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(100))
            .measurement_time(Duration::from_millis(300));
    } else {
        group
            .sample_size(samples)
            .warm_up_time(Duration::from_secs_f64(warm))
            .measurement_time(Duration::from_secs_f64(measure));
    }
}
