//! Why the pool refuses contexts behind pgpool-II with its defaults: with the refusal
//! switched off (`ctxpool_testkit::sabotage::trust_pgpool`), statements run without
//! their context there, in both ways the pool checks for. The switch is process-wide,
//! hence a binary of its own.

mod support;

use ctxpool::postgres::ContextScope;
use ctxpool_testkit::{PgCluster, PgPool, sabotage};
use support::*;

const SEEN_SQL: &str = "SELECT pg_catalog.current_setting('ctxpool.end_user', true), \
     pg_catalog.inet_server_port()";

/// Runs `rounds` of a plain request then two statements of alice's, each on a fresh pool
/// of one connection through `pgpool`; returns the ports of alice's statements that ran
/// without her context.
async fn missing(pgpool: &PgPool, rounds: usize) -> Vec<i32> {
    let mut out = Vec::new();
    for _ in 0..rounds {
        let pool = pool(&pgpool.url("hr_app", "hr"), ContextScope::Transaction, 1);
        let plain = pool.get().await.unwrap();
        plain.query_typed(SEEN_SQL, &[]).await.unwrap();
        drop(plain);
        let c = pool.acquire_as(&alice()).await.unwrap();
        for _ in 0..2 {
            let row = &c.query_typed(SEEN_SQL, &[]).await.unwrap()[0];
            let user: Option<String> = row.get(0);
            if user.as_deref().filter(|u| !u.is_empty()) != Some("alice") {
                out.push(row.get(1));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_refusal_off_pgpool_runs_statements_without_their_context() {
    sabotage::trust_pgpool(true);
    let primary = hr_cluster();
    let standby = PgCluster::start_standby(&primary).unwrap_or_else(|e| panic!("{e}"));

    // Load balancing off, catalog look-ups on (pgpool-II's default): the first context
    // statement after a plain request meets functions pgpool-II has not looked up yet,
    // and its look-up's Sync ends the transaction that held the context. On the primary.
    let pgpool = PgPool::start(&primary, &standby, &[("load_balance_mode", "off")])
        .unwrap_or_else(|e| panic!("{e}"));
    let lost = missing(&pgpool, 1).await;
    assert_eq!(lost, [i32::from(primary.port())], "catalog look-ups");
    drop(pgpool);

    // Load balancing with pgpool-II's defaults, reads weighted to the standby: the
    // context goes to the primary, the read to the standby (the checkout's first read may
    // still go to the primary, right after the reset's transaction block; the second
    // does not). This pgpool-II has not looked up the functions yet either, so the first
    // context may also be lost on the primary, as above.
    let pgpool = PgPool::start(
        &primary,
        &standby,
        &[("backend_weight0", "0"), ("backend_weight1", "1")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let lost = missing(&pgpool, 3).await;
    let on_standby = lost
        .iter()
        .filter(|p| **p == i32::from(standby.port()))
        .count();
    assert!(on_standby >= 3, "load balancing: {lost:?}");
}
