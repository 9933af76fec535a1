//! The throwaway PostgreSQL cluster and PgBouncer harness (`ctxpool::testing::PgCluster`).
//!
//! Needs PostgreSQL and PgBouncer installed (`apt-get install -y postgresql pgbouncer`);
//! without them the test fails, saying so.

use std::process::Command;
use std::time::Instant;

use ctxpool::testing::{ClusterError, PgBouncer, PgCluster};

/// Starts a cluster or fails the test with the harness's message (which names the
/// install command when PostgreSQL is missing).
fn start_cluster() -> PgCluster {
    let started = Instant::now();
    match PgCluster::start() {
        Ok(cluster) => {
            eprintln!(
                "cluster on port {} started in {:?}",
                cluster.port(),
                started.elapsed()
            );
            cluster
        }
        Err(e) => panic!("cannot start a throwaway PostgreSQL cluster: {e}"),
    }
}

/// Runs `psql` against `url` directly, as a client would.
fn psql_url(url: &str, sql: &str) -> String {
    let output = Command::new("psql")
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", url, "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap_or_else(|e| panic!("cannot run psql (apt-get install -y postgresql): {e}"));
    assert!(
        output.status.success(),
        "psql {url} -c {sql:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn cluster_survives_restart_and_serves_through_pgbouncer() {
    let cluster = start_cluster();
    assert_eq!(cluster.host(), "127.0.0.1");
    assert_eq!(cluster.superuser(), "postgres");
    assert_eq!(
        cluster.url("alice", "app"),
        format!("postgres://alice@127.0.0.1:{}/app", cluster.port())
    );

    assert_eq!(cluster.psql("postgres", "select 1").unwrap(), "1\n");
    cluster
        .psql(
            "postgres",
            "create table t (id int primary key, name text);
             insert into t values (1, 'one'), (2, 'two');",
        )
        .unwrap();
    assert_eq!(
        cluster
            .psql("postgres", "select id, name from t order by id")
            .unwrap(),
        "1|one\n2|two\n"
    );

    // A failing statement is an error that carries psql's message.
    match cluster.psql("postgres", "select * from missing_table") {
        Err(ClusterError::Command { stderr, .. }) => {
            assert!(stderr.contains("missing_table"), "{stderr}")
        }
        other => panic!("expected a psql failure, got {other:?}"),
    }

    // Restart keeps the port and the data.
    let port = cluster.port();
    cluster.restart().unwrap();
    assert_eq!(cluster.port(), port);
    assert_eq!(
        cluster.psql("postgres", "select count(*) from t").unwrap(),
        "2\n"
    );

    // Stop, then resume.
    cluster.stop().unwrap();
    assert!(cluster.psql("postgres", "select 1").is_err());
    cluster.resume().unwrap();
    assert_eq!(
        cluster
            .psql("postgres", "select name from t where id = 2")
            .unwrap(),
        "two\n"
    );

    // The superuser and another login role through PgBouncer in transaction mode.
    cluster
        .psql(
            "postgres",
            "create role app_user login; grant select on t to app_user;",
        )
        .unwrap();
    let bouncer = PgBouncer::start(&cluster, "transaction", 4).unwrap();
    assert_ne!(bouncer.port(), cluster.port());
    assert_eq!(
        psql_url(&bouncer.url("postgres", "postgres"), "select 2"),
        "2\n"
    );
    assert_eq!(
        psql_url(
            &bouncer.url("app_user", "postgres"),
            "select current_user, count(*) from t"
        ),
        "app_user|2\n"
    );
    // Directly, too.
    assert_eq!(
        psql_url(&cluster.url("app_user", "postgres"), "select 3"),
        "3\n"
    );

    drop(bouncer);
    drop(cluster);
}

#[test]
fn unknown_pool_mode_is_rejected() {
    let cluster = start_cluster();
    match PgBouncer::start(&cluster, "sometimes", 4) {
        Err(ClusterError::InvalidArgument(msg)) => assert!(msg.contains("sometimes"), "{msg}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}
