//! A service written against deadpool-postgres, with `deadpool_postgres` replaced by
//! `ctxpool::postgres` in its imports and nothing else changed, compiles and runs.

mod support;

// The one changed line: `use deadpool_postgres as pg;` before.
use ctxpool::postgres as pg;

use pg::{Config, GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

/// deadpool-postgres's README example, verbatim but for the import.
async fn readme_example(url: &str) -> Result<i32, Box<dyn std::error::Error>> {
    let mut cfg = Config::new();
    cfg.url = Some(url.to_owned());
    cfg.manager = Some(ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    });
    let pool = cfg.create_pool(Some(Runtime::Tokio1), NoTls)?;
    let mut last = 0;
    for i in 1..10i32 {
        let client = pool.get().await?;
        let stmt = client.prepare_cached("SELECT 1 + $1").await?;
        let rows = client.query(&stmt, &[&i]).await?;
        let value: i32 = rows[0].get(0);
        assert_eq!(value, i + 1);
        last = value;
    }
    Ok(last)
}

/// The manager and builder style.
fn build_by_hand(url: &str) -> Pool {
    let pg_config: tokio_postgres::Config = url.parse().unwrap();
    let mgr_config = ManagerConfig {
        recycling_method: RecyclingMethod::Verified,
    };
    let mgr = Manager::from_config(pg_config, NoTls, mgr_config);
    Pool::builder(mgr).max_size(16).build().unwrap()
}

/// Code generic over a client or a transaction.
async fn count<C: GenericClient>(client: &C) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT count(*) FROM generate_series(1, 3)", &[])
        .await?;
    Ok(row.get(0))
}

/// A service error with a `From<tokio_postgres::Error>`, as services write them.
#[derive(Debug)]
#[allow(dead_code)] // fields read only through Debug, as in many services
enum ServiceError {
    Db(tokio_postgres::Error),
    Pool(pg::PoolError),
}

impl From<tokio_postgres::Error> for ServiceError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(e)
    }
}

impl From<pg::PoolError> for ServiceError {
    fn from(e: pg::PoolError) -> Self {
        Self::Pool(e)
    }
}

async fn service(pool: &Pool) -> Result<i64, ServiceError> {
    let mut client = pool.get().await?;
    let n = count(&client).await?;
    let tx = client.transaction().await?;
    let m = count(&tx).await?;
    tx.execute("SELECT $1::int", &[&1i32]).await?;
    tx.commit().await?;
    let status: pg::Status = pool.status();
    assert!(status.size >= 1);
    Ok(n + m)
}

#[tokio::test]
async fn a_deadpool_postgres_service_runs_unchanged() {
    let cluster = ctxpool_testkit::PgCluster::start().unwrap_or_else(|e| panic!("{e}"));
    let url = cluster.url("postgres", "postgres");
    assert_eq!(readme_example(&url).await.unwrap(), 10);
    let pool = build_by_hand(&url);
    assert_eq!(service(&pool).await.unwrap(), 6);
    match &pool.get().await {
        Ok(_) => {}
        Err(e) => panic!("{e:?}"),
    }
}
