//! Batches on the wire, against a live server: one Sync per context statement and user
//! statement, and an error at any position of a batch stops the user's statement, reaches
//! its caller, and leaves nothing waiting.
//!
//! The error is injected with `ctxpool_testkit::sabotage::inject_error_at`, which is
//! process-wide: this file is a test binary of its own, and its tests take [`SERIAL`] so
//! that none runs while another injects.

mod support;

use std::time::Duration;

use ctxpool::postgres::{ContextScope, Pool};
use ctxpool_testkit::sabotage::inject_error_at;
use ctxpool_testkit::{FlightProxy, PgCluster};
use support::*;

/// Held by each test for its whole run: the injection switch is process-wide, and the
/// test harness runs tests on parallel threads.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// SQLSTATE of the injected statement (division by zero).
const INJECTED: &str = "22012";

/// A generous bound on one statement: reaching it means a request waits forever.
const HANG: Duration = Duration::from_secs(60);

/// Whether the checkout runs under alice's context or none.
#[derive(Clone, Copy, Debug)]
enum Who {
    Alice,
    Plain,
}

async fn checkout(pool: &Pool, who: Who) -> ctxpool::postgres::Client {
    match who {
        Who::Alice => pool.acquire_as(&alice()).await.unwrap(),
        Who::Plain => pool.get().await.unwrap(),
    }
}

/// The rows of the witness table written with this mark.
fn witnessed(cluster: &PgCluster, mark: &str) -> String {
    cluster
        .psql(
            "hr",
            &format!("SELECT count(*) FROM public.witness WHERE mark = '{mark}'"),
        )
        .unwrap()
        .trim()
        .to_owned()
}

/// One pool: every position of its batches gets the error in turn, until a position past
/// the end (the statement then succeeds). Returns how many positions failed.
async fn every_position(cluster: &PgCluster, pool: &Pool, label: &str, who: Who) -> usize {
    for at in 0.. {
        // The previous checkout changed the session, so the reset is armed.
        inject_error_at(None);
        let dirty = pool.get().await.unwrap();
        dirty
            .batch_execute("SET search_path = hr, public; SET statement_timeout = '1h'")
            .await
            .unwrap();
        drop(dirty);

        inject_error_at(Some(at));
        let c = checkout(pool, who).await;
        let mark = format!("{label}-{at}");
        let outcome = tokio::time::timeout(
            HANG,
            c.execute("INSERT INTO public.witness VALUES ($1)", &[&mark]),
        )
        .await
        .unwrap_or_else(|_| panic!("{label}: error at {at}: the statement never returned"));
        inject_error_at(None);
        match outcome {
            Err(e) => {
                let code = e.code().map(|c| c.code().to_owned());
                assert_eq!(
                    code.as_deref(),
                    Some(INJECTED),
                    "{label}: error at {at}: the caller gets the batch's error: {e}"
                );
                assert_eq!(
                    witnessed(cluster, &mark),
                    "0",
                    "{label}: error at {at}: the user's statement ran"
                );
            }
            Ok(n) => {
                assert_eq!(n, 1);
                assert_eq!(witnessed(cluster, &mark), "1");
                return at;
            }
        }
        // The same handle goes on: the reset goes again, under the same context.
        let row = tokio::time::timeout(
            HANG,
            c.query_one(
                "SELECT current_setting('search_path'), current_setting('statement_timeout'), \
                 coalesce(ctxpool.end_user(), '-')",
                &[],
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("{label}: after an error at {at}: the next statement hung"))
        .unwrap_or_else(|e| panic!("{label}: after an error at {at}: {e}"));
        let (path, timeout, user): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(
            (path.as_str(), timeout.as_str()),
            ("\"$user\", public", "0"),
            "{label}: after an error at {at}: the earlier checkout's settings are gone"
        );
        let expected = match who {
            Who::Alice => "alice",
            Who::Plain => "-",
        };
        assert_eq!(user, expected, "{label}: after an error at {at}");
        drop(c);
    }
    unreachable!("the loop returns once a position is past the end")
}

#[tokio::test]
async fn an_error_anywhere_in_a_batch_stops_the_statement_and_nothing_waits() {
    let _serial = SERIAL.lock().await;
    let cluster = hr_cluster();
    cluster
        .psql(
            "hr",
            "CREATE TABLE public.witness (mark text); \
             GRANT SELECT, INSERT ON public.witness TO hr_app, hr_employee, hr_manager",
        )
        .unwrap();
    let url = cluster.url("hr_app", "hr");
    for scope in [ContextScope::Transaction, ContextScope::Session] {
        for prepared in [true, false] {
            for who in [Who::Alice, Who::Plain] {
                let label = format!("{scope:?}-prepared={prepared}-{who:?}");
                let pool = pool_with(&url, context_config(scope).prepared_statements(prepared), 1);
                let positions = every_position(&cluster, &pool, &label, who).await;
                // The reset alone is eight statements; each position was tried.
                assert!(positions >= 8, "{label}: only {positions} positions");
            }
        }
    }
}

/// Syncs counted on the wire: a statement under a context, with the reset armed or not,
/// costs one, as on a bare client; so does a plain checkout's first statement with its
/// reset.
#[tokio::test]
async fn one_sync_per_statement_with_its_context_and_reset() {
    let _serial = SERIAL.lock().await;
    let cluster = hr_cluster();
    let proxy = FlightProxy::start(addr(&cluster), Duration::ZERO).unwrap();
    let url = format!("postgres://hr_app@127.0.0.1:{}/hr", proxy.port());

    let bare = connect_raw(&url).await;
    let stmt = bare.prepare(LIST).await.unwrap();
    proxy.reset_flights();
    bare.query(&stmt, &[]).await.unwrap();
    assert_eq!(
        (proxy.syncs(), proxy.messages(b'E')),
        (1, 1),
        "a bare client"
    );

    for scope in [ContextScope::Transaction, ContextScope::Session] {
        for prepared in [true, false] {
            let label = format!("{scope:?}-prepared={prepared}");
            let pool = pool_with(&url, context_config(scope).prepared_statements(prepared), 1);
            let warm = pool.get().await.unwrap();
            let stmt = warm.prepare_cached(LIST).await.unwrap();
            warm.batch_execute("SET search_path = hr").await.unwrap();
            drop(warm);

            // Reset armed, a context to apply, the user's statement: one Sync.
            proxy.reset_flights();
            let c = pool.acquire_as(&alice()).await.unwrap();
            assert_eq!(names(&c.query(&stmt, &[]).await.unwrap()), ["Alan"]);
            assert_eq!(proxy.syncs(), 1, "{label}: reset + context + statement");
            assert!(
                proxy.messages(b'E') >= 9,
                "{label}: the reset and the context went in the same Sync"
            );
            assert_eq!(proxy.messages(b'Q'), 0, "{label}: no simple query");
            // A further statement: its context statement (transaction scope) or none
            // (session scope) under the statement's own Sync.
            proxy.reset_flights();
            assert_eq!(names(&c.query(&stmt, &[]).await.unwrap()), ["Alan"]);
            let executes = match scope {
                ContextScope::Transaction => 2,
                _ => 1,
            };
            assert_eq!(
                (proxy.syncs(), proxy.messages(b'E')),
                (1, executes),
                "{label}: a further statement"
            );
            drop(c);

            // A plain checkout after a context: the reset and the statement, one Sync.
            proxy.reset_flights();
            let c = pool.get().await.unwrap();
            assert!(c.query(&stmt, &[]).await.unwrap().is_empty());
            assert_eq!(
                proxy.syncs(),
                1,
                "{label}: plain get after a context checkout"
            );
            assert_eq!(proxy.flights(), 1, "{label}: one round trip");
            drop(c);
        }
    }
}
