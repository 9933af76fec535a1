//! Live operations: PgBouncer in transaction mode, and a server restart under load.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ctxpool::SecurityContext;
use ctxpool::postgres::ContextScope;
use ctxpool_testkit::PgBouncer;
use support::*;

/// The expected rows of each identity (`None`: a plain handle).
fn cases() -> Vec<(Option<SecurityContext>, Vec<&'static str>)> {
    vec![
        (Some(alice()), vec!["Alan"]),
        (Some(bob()), vec!["Barbara", "Edsger"]),
        (None, vec![]),
    ]
}

/// One request, its statement sent the `i`-th of three ways: `query_typed` (unnamed),
/// `prepare_cached` (prepared by name once per connection, bound in later checkouts), and
/// `query` with a `&str` (prepared by name and bound in two requests). Behind PgBouncer
/// in transaction mode the two named ways would each meet server connections without the
/// statement, were the pool not sending them unnamed.
async fn request(
    pool: &ctxpool::postgres::Pool,
    who: &Option<SecurityContext>,
    i: usize,
) -> Result<Vec<String>, String> {
    let client = match who {
        Some(ctx) => pool.acquire_as(ctx).await,
        None => pool.get().await,
    }
    .map_err(|e| e.to_string())?;
    let rows = match i % 3 {
        0 => client.query_typed(LIST, &[]).await,
        1 => match client.prepare_cached(LIST).await {
            Ok(statement) => client.query(&statement, &[]).await,
            Err(e) => Err(e),
        },
        _ => client.query(LIST, &[]).await,
    }
    .map_err(|e| e.to_string())?;
    Ok(names(&rows))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_interleaved_requests_through_pgbouncer() {
    let cluster = hr_cluster();
    // Two server connections for a pool of four: transactions of different end users
    // share server sessions, so anything session-level would show.
    let bouncer = PgBouncer::start(&cluster, "transaction", 2).unwrap();
    // The default configuration (prepared context statements on) and the unnamed one
    // both work: the pool detects the pooler at connect and sends its statements unnamed.
    for config in [
        context_config(ContextScope::Transaction),
        context_config(ContextScope::Transaction).prepared_statements(false),
    ] {
        interleaved_requests(&bouncer.url("hr_app", "hr"), config).await;
    }
}

async fn interleaved_requests(url: &str, config: ctxpool::postgres::ContextConfig) {
    let pool = pool_with(url, config, 4);
    let c = pool.get().await.unwrap();
    assert!(c.behind_proxy() && !c.behind_pgpool());
    drop(c);
    let wrong = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..20 {
        let (pool, wrong, done) = (pool.clone(), wrong.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let cases = cases();
            for i in 0..50 {
                // Two identities interleaved, and a plain request every fifth time.
                let (who, want) = if i % 5 == 4 {
                    &cases[2]
                } else {
                    &cases[(t + i) % 2]
                };
                match request(&pool, who, t + i).await {
                    Ok(seen) if seen == *want => {}
                    other => {
                        eprintln!(
                            "wrong answer: {other:?} for {want:?}, statement kind {}",
                            (t + i) % 3
                        );
                        wrong.fetch_add(1, Ordering::SeqCst);
                    }
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), 1000);
    assert_eq!(wrong.load(Ordering::SeqCst), 0);
    let status = pool.status();
    assert_eq!(status.available, status.size);
}

/// The hazard of named statements behind a transaction pooler: tokio-postgres names its
/// statements `s0`, `s1`, … in every process, so a server connection may hold a statement
/// of another client process under the name a later Bind of ours uses. Here that other
/// client replaces every such name on the one server connection PgBouncer has, between
/// our prepare and our execute.
#[tokio::test]
async fn a_statement_another_client_left_under_our_name_never_runs() {
    const MINE: &str = "SELECT 'mine'::text";
    let cluster = hr_cluster();
    let bouncer = PgBouncer::start(&cluster, "transaction", 1).unwrap();
    let url = bouncer.url("hr_app", "hr");
    let pool = pool(&url, ContextScope::Transaction, 1);
    let other = connect_raw(&url).await;
    for who in [None, Some(alice())] {
        let c = match &who {
            Some(ctx) => pool.acquire_as(ctx).await.unwrap(),
            None => pool.get().await.unwrap(),
        };
        let cached = c.prepare_cached(MINE).await.unwrap();
        let held = c.prepare(MINE).await.unwrap();
        // No name of ours reached the server: it holds no statement of that text.
        let named: i64 = other
            .query_one(
                "SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE statement = $1",
                &[&MINE],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            named, 0,
            "statements of ours prepared by name on the server"
        );
        // The other client takes every name tokio-postgres could have given ours.
        other
            .batch_execute(
                "DO $$ BEGIN FOR i IN 0..20000 LOOP \
                   BEGIN EXECUTE format('DEALLOCATE %I', 's' || i); \
                   EXCEPTION WHEN invalid_sql_statement_name THEN NULL; END; \
                   EXECUTE format('PREPARE %I AS SELECT ''theirs''::text', 's' || i); \
                 END LOOP; END $$",
            )
            .await
            .unwrap();
        for statement in [&cached, &held] {
            let row = c.query_one(statement, &[]).await.unwrap();
            assert_eq!(
                row.get::<_, String>(0),
                "mine",
                "context {:?}",
                who.is_some()
            );
        }
        let row = c.query_one(MINE, &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "mine");
        drop((cached, held, c));
        other.batch_execute("DEALLOCATE ALL").await.unwrap();
    }
}

/// Requests that follow one another without waiting behind PgBouncer: a `query` with a
/// `&str` drops its statement, whose Close (with its own Sync) goes out right before the
/// next checkout's batch. Tasks of two kinds (plain, and under a context) share
/// PgBouncer's one server connection, each statement a `query` with a `&str`; each must
/// get its own answer under its own context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_pipelined_behind_pgbouncer_each_get_their_own_answer() {
    const ECHO: &str = "SELECT $1::text, pg_catalog.current_setting('ctxpool.end_user', true)";
    let cluster = hr_cluster();
    let bouncer = PgBouncer::start(&cluster, "transaction", 1).unwrap();
    let pool = pool(&bouncer.url("hr_app", "hr"), ContextScope::Transaction, 4);
    let mut tasks = Vec::new();
    for t in 0..4 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..250 {
                let (c, user) = match t % 2 {
                    0 => (pool.get().await.unwrap(), ""),
                    _ => (pool.acquire_as(&alice()).await.unwrap(), "alice"),
                };
                let value = format!("{t}.{i}");
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&value];
                let asked = c.query_one(ECHO, &params);
                let row = tokio::time::timeout(std::time::Duration::from_secs(30), asked)
                    .await
                    .unwrap_or_else(|_| panic!("task {t}, round {i}: no answer"))
                    .unwrap_or_else(|e| panic!("task {t}, round {i}: {e}"));
                assert_eq!(row.get::<_, String>(0), value);
                assert_eq!(row.get::<_, Option<String>>(1).unwrap_or_default(), user);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// COPY FROM STDIN sends its data after the Sync of its request (the server ignores that
/// Sync and answers the one after CopyDone): the data is no request of its own, and
/// behind PgBouncer, where a request waits for the one before, it must not wait.
#[tokio::test]
async fn copy_in_runs_directly_and_behind_pgbouncer() {
    let cluster = hr_cluster();
    let bouncer = PgBouncer::start(&cluster, "transaction", 1).unwrap();
    for (url, behind) in [
        (cluster.url("hr_app", "hr"), false),
        (bouncer.url("hr_app", "hr"), true),
    ] {
        let pool = pool(&url, ContextScope::Transaction, 1);
        for who in [None, Some(alice())] {
            let user = if who.is_some() { "alice" } else { "" };
            // A wait here is the failure: the data held back, or a request registered
            // for it that no answer ends.
            tokio::time::timeout(Duration::from_secs(30), copy_in(&pool, who, behind))
                .await
                .unwrap_or_else(|_| {
                    panic!("COPY FROM STDIN waited (behind PgBouncer: {behind}, user {user:?})")
                });
        }
    }
}

/// Three rows by COPY FROM STDIN into a temporary table, checked, then one more statement
/// on the same handle.
async fn copy_in(pool: &ctxpool::postgres::Pool, who: Option<SecurityContext>, behind: bool) {
    use futures_util::SinkExt;
    let mut c = match &who {
        Some(ctx) => pool.acquire_as(ctx).await.unwrap(),
        None => pool.get().await.unwrap(),
    };
    assert_eq!(c.behind_proxy(), behind);
    let tx = c.transaction().await.unwrap();
    tx.batch_execute("CREATE TEMP TABLE copied (n int) ON COMMIT DROP")
        .await
        .unwrap();
    let sink = tx.copy_in("COPY copied (n) FROM STDIN").await.unwrap();
    let mut sink = std::pin::pin!(sink);
    for n in 0..3 {
        sink.send(bytes::Bytes::from(format!("{n}\n")))
            .await
            .unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 3);
    let row = tx
        .query_one(
            "SELECT count(*), pg_catalog.current_setting('ctxpool.end_user', true) FROM copied",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 3);
    let user: Option<String> = row.get(1);
    assert_eq!(
        user.unwrap_or_default(),
        if who.is_some() { "alice" } else { "" }
    );
    tx.commit().await.unwrap();
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
}

#[tokio::test]
async fn session_scope_is_refused_behind_pgbouncer_and_allowed_direct() {
    let cluster = hr_cluster();
    let bouncer = PgBouncer::start(&cluster, "transaction", 2).unwrap();
    let pool = pool(&bouncer.url("hr_app", "hr"), ContextScope::Session, 1);
    match pool.acquire_as(&alice()).await {
        Err(ctxpool::PoolError::ContextRejected(e)) => assert!(
            e.to_string().contains("session scope is refused behind"),
            "{e}"
        ),
        other => panic!("session scope behind PgBouncer: {:?}", other.map(|_| ())),
    }
    // Plain connections are fine there.
    assert!(
        pool.get()
            .await
            .unwrap()
            .query(LIST, &[])
            .await
            .unwrap()
            .is_empty()
    );

    let direct = pool_with(
        &cluster.url("hr_app", "hr"),
        context_config(ContextScope::Session),
        1,
    );
    let c = direct.acquire_as(&alice()).await.unwrap();
    assert!(!c.behind_proxy());
    assert_eq!(names(&c.query(LIST, &[]).await.unwrap()), ["Alan"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_recovers_from_a_server_restart_under_load() {
    let cluster = Arc::new(hr_cluster());
    let pool = pool(&cluster.url("hr_app", "hr"), ContextScope::Transaction, 4);
    let (restarted_tx, restarted) = tokio::sync::watch::channel(false);
    let before = Arc::new(tokio::sync::Semaphore::new(0));
    let wrong = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..8usize {
        let (pool, wrong, failed, before) =
            (pool.clone(), wrong.clone(), failed.clone(), before.clone());
        let mut restarted = restarted.clone();
        tasks.push(tokio::spawn(async move {
            let cases = cases();
            let mut after_ok = 0;
            let mut i = 0usize;
            // Run until 40 requests in a row succeed after the restart.
            while after_ok < 40 {
                i += 1;
                let (who, want) = &cases[(t + i) % 3];
                match request(&pool, who, t + i).await {
                    Ok(seen) => {
                        if seen != *want {
                            wrong.fetch_add(1, Ordering::SeqCst);
                        }
                        if *restarted.borrow() {
                            after_ok += 1;
                        } else if i == 10 {
                            before.add_permits(1);
                        }
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        after_ok = 0;
                        // Wait for the server instead of spinning on it.
                        let _ = restarted.wait_for(|r| *r).await;
                    }
                }
                assert!(i < 10_000, "the pool did not recover");
            }
        }));
    }
    // Restart once every task has done ten requests.
    let _ = before.acquire_many(8).await.unwrap();
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.restart().unwrap())
        .await
        .unwrap();
    restarted_tx.send(true).unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(wrong.load(Ordering::SeqCst), 0);
    // Each task fails at most once while the server is down, plus once per connection
    // that died in the pool before recycle could see it.
    assert!(failed.load(Ordering::SeqCst) <= 8 + 4 * 8, "{failed:?}");
    let status = pool.status();
    assert_eq!(status.available, status.size);
}
