//! Shared set-up of the live PostgreSQL tests: a throwaway cluster with the HR schema.
#![allow(dead_code)]

#[cfg(feature = "providers")]
pub mod keys;
pub mod poll;

use ctxpool::postgres::{
    Config, ContextConfig, ContextScope, ManagerConfig, Pool, RecyclingMethod, RoleMapping, Runtime,
};
use ctxpool::{EndUserIdentity, SecurityContext};
use ctxpool_testkit::PgCluster;
use serde_json::json;
use tokio_postgres::NoTls;

/// A cluster with the helpers and the HR schema in database `hr`.
pub fn hr_cluster() -> PgCluster {
    ctxpool_testkit::hr::hr_cluster().unwrap_or_else(|e| panic!("{e}"))
}

pub fn context_config(scope: ContextScope) -> ContextConfig {
    ContextConfig::new(
        RoleMapping::FirstDataRole,
        ["hr_employee", "hr_manager", "hr_auditor"],
    )
    .scope(scope)
}

/// A pool on `url` logging in as hr_app.
pub fn pool(url: &str, scope: ContextScope, max_size: usize) -> Pool {
    pool_with(url, context_config(scope), max_size)
}

/// A pool on `url` with this context configuration.
pub fn pool_with(url: &str, context: ContextConfig, max_size: usize) -> Pool {
    let mut cfg = Config::new();
    cfg.url = Some(url.to_owned());
    cfg.manager = Some(ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    });
    cfg.pool = Some(ctxpool::postgres::PoolConfig::new(max_size));
    cfg.context = Some(context);
    cfg.create_pool(Some(Runtime::Tokio1), NoTls).unwrap()
}

/// Alice, an employee (emp 3, org 5).
pub fn alice() -> SecurityContext {
    SecurityContext::builder(EndUserIdentity::named("alice", None), "db-token")
        .data_roles(["hr_employee"])
        .attributes(json!({"hr.hcm_context": {"emp_id": 3, "org_id": 5}}))
        .build()
        .unwrap()
}

/// Bob, a manager of org 7.
pub fn bob() -> SecurityContext {
    SecurityContext::builder(EndUserIdentity::named("bob", None), "db-token")
        .data_roles(["hr_manager"])
        .attributes(json!({"hr.hcm_context": {"emp_id": 4, "org_id": 7}}))
        .build()
        .unwrap()
}

/// Carol, whose data role exists but is not granted to the pool's login.
pub fn carol_auditor() -> SecurityContext {
    SecurityContext::builder(EndUserIdentity::named("carol", None), "db-token")
        .data_roles(["hr_auditor"])
        .build()
        .unwrap()
}

pub fn names(rows: &[tokio_postgres::Row]) -> Vec<String> {
    let mut v: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
    v.sort();
    v
}

pub const LIST: &str = "SELECT name FROM hr.employees ORDER BY id";

/// The cluster's loopback address.
pub fn addr(cluster: &PgCluster) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], cluster.port()))
}

/// A direct tokio-postgres connection to `url` (no pool), its connection task spawned.
pub async fn connect_raw(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url} directly: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}
