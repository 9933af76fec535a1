//! Live PostgreSQL tests of the backend: isolation under RLS in both scopes, fail closed,
//! round trips counted on the wire, and every way a checkout can leave a session dirty.
//! Each test starts its own throwaway cluster (see `ctxpool_testkit::PgCluster`).

mod support;

use ctxpool::postgres::{ContextScope, MappingError, PoolError};
use ctxpool::{EndUserIdentity, SecurityContext};
use ctxpool_testkit::FlightProxy;
use serde_json::json;
use support::*;
use tokio_postgres::NoTls;

const SCOPES: [ContextScope; 2] = [ContextScope::Transaction, ContextScope::Session];

#[tokio::test]
async fn each_end_user_sees_only_their_rows_and_no_identity_sees_none() {
    let cluster = hr_cluster();
    for scope in SCOPES {
        let pool = pool(&cluster.url("hr_app", "hr"), scope, 2);
        let plain = pool.get().await.unwrap();
        assert!(
            plain.query(LIST, &[]).await.unwrap().is_empty(),
            "{scope:?}"
        );
        drop(plain);

        let a = pool.acquire_as(&alice()).await.unwrap();
        assert_eq!(
            names(&a.query(LIST, &[]).await.unwrap()),
            ["Alan"],
            "{scope:?}"
        );
        drop(a);
        let b = pool.acquire_as(&bob()).await.unwrap();
        assert_eq!(
            names(&b.query(LIST, &[]).await.unwrap()),
            ["Barbara", "Edsger"],
            "{scope:?}"
        );
        drop(b);

        // After both, the same connections serve a plain handle with nothing visible.
        for _ in 0..2 {
            let plain = pool.get().await.unwrap();
            assert!(
                plain.query(LIST, &[]).await.unwrap().is_empty(),
                "{scope:?}"
            );
            let who: String = plain
                .query_one("SELECT current_user::text", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(who, "hr_app");
        }
    }
}

#[tokio::test]
async fn every_query_method_carries_the_context() {
    use futures_util::{StreamExt, TryStreamExt};
    let cluster = hr_cluster();
    for scope in SCOPES {
        let pool = pool(&cluster.url("hr_app", "hr"), scope, 1);
        let mut c = pool.acquire_as(&bob()).await.unwrap();
        let stmt = c.prepare_cached(LIST).await.unwrap();
        assert_eq!(c.query(&stmt, &[]).await.unwrap().len(), 2);
        assert_eq!(
            c.query_one("SELECT count(*) FROM hr.employees", &[])
                .await
                .unwrap()
                .get::<_, i64>(0),
            2
        );
        assert!(
            c.query_opt("SELECT name FROM hr.employees WHERE id = 1", &[])
                .await
                .unwrap()
                .is_none()
        );
        let streamed: Vec<_> = c
            .query_raw(&stmt, std::iter::empty::<i32>())
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(streamed.len(), 2);
        assert_eq!(
            c.execute("UPDATE hr.employees SET salary = salary + 1", &[])
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            c.execute_raw(&stmt, std::iter::empty::<i32>())
                .await
                .unwrap(),
            2
        );
        let typed = c
            .query_typed(
                "SELECT name FROM hr.employees WHERE org_id = $1",
                &[(&7i32, tokio_postgres::types::Type::INT4)],
            )
            .await
            .unwrap();
        assert_eq!(typed.len(), 2);
        let simple = c
            .simple_query("SELECT name FROM hr.employees")
            .await
            .unwrap();
        let rows = simple
            .iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            .count();
        assert_eq!(rows, 2);
        c.batch_execute(
            "INSERT INTO hr.audit VALUES (current_setting('ctxpool.end_user'), 'batch')",
        )
        .await
        .unwrap();
        let out = c
            .copy_out("COPY (SELECT name FROM hr.employees) TO STDOUT")
            .await
            .unwrap();
        let bytes: Vec<_> = out.collect::<Vec<_>>().await;
        assert_eq!(bytes.len(), 2, "two COPY rows");
        {
            let tx = c.transaction().await.unwrap();
            assert_eq!(tx.query(LIST, &[]).await.unwrap().len(), 2);
            tx.commit().await.unwrap();
        }
        {
            let tx = c
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .unwrap();
            assert_eq!(tx.query(LIST, &[]).await.unwrap().len(), 2);
            let level: String = tx
                .query_one("SHOW transaction_isolation", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(level, "repeatable read");
        }
        drop(c);
        let audit = cluster
            .psql("hr", "SELECT who FROM hr.audit WHERE what = 'batch'")
            .unwrap();
        assert!(audit.lines().all(|w| w == "bob"), "{audit}");
        cluster.psql("hr", "DELETE FROM hr.audit").unwrap();
    }
}

#[tokio::test]
async fn a_context_that_cannot_be_applied_never_runs_the_statement() {
    let cluster = hr_cluster();
    for scope in SCOPES {
        let pool = pool(&cluster.url("hr_app", "hr"), scope, 1);
        // hr_auditor is allowed by the pool but not granted to hr_app: the server refuses
        // the role, so the INSERT must not run at all, under no role.
        let c = pool.acquire_as(&carol_auditor()).await.unwrap();
        let err = c
            .execute(
                "INSERT INTO hr.audit VALUES ('carol', 'must not exist')",
                &[],
            )
            .await
            .unwrap_err();
        let code = err.code().map(|c| c.code().to_owned());
        assert_eq!(
            code.as_deref(),
            Some("42501"),
            "the context error, not a later one: {err}"
        );
        // Explicit transactions fail closed too.
        drop(c);
        let mut c = pool.acquire_as(&carol_auditor()).await.unwrap();
        assert!(c.transaction().await.is_err());
        c.clear_end_user_security_context();
        assert_eq!(
            c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
            1
        );
        drop(c);
        let rows = cluster.psql("hr", "SELECT count(*) FROM hr.audit").unwrap();
        assert_eq!(rows.trim(), "0", "{scope:?}: the statement ran");
    }
}

/// A batch prepares a context statement on its first use; when the batch fails after the
/// statement was parsed (the role is refused when it is bound), the next batch prepares it
/// again from nothing: the failures leave one statement behind, not one each, and the
/// next context applies.
#[tokio::test]
async fn failed_first_uses_of_a_context_statement_leave_no_statements_behind() {
    const PID: &str = "SELECT pg_catalog.pg_backend_pid()";
    const HELD: &str = "SELECT pg_catalog.count(*) FROM pg_catalog.pg_prepared_statements \
         WHERE name LIKE 'ctxpool\\_context\\_%'";
    let cluster = hr_cluster();
    let pool = pool(&cluster.url("hr_app", "hr"), ContextScope::Transaction, 1);
    let warm = pool.get().await.unwrap();
    let pid: i32 = warm.query_one(PID, &[]).await.unwrap().get(0);
    let who = warm
        .prepare_cached("SELECT current_user::text")
        .await
        .unwrap();
    drop(warm);
    // carol's data role is allowed by the pool but not granted to hr_app; she and erin
    // both have no attributes, so they use the same context statement.
    for attempt in 0..3 {
        let c = pool.acquire_as(&carol_auditor()).await.unwrap();
        let err = c.query(&who, &[]).await.unwrap_err();
        assert_eq!(
            err.code().map(|c| c.code()),
            Some("42501"),
            "attempt {attempt}: {err}"
        );
    }
    let erin = SecurityContext::builder(EndUserIdentity::named("erin", None), "db-token")
        .data_roles(["hr_employee"])
        .build()
        .unwrap();
    let c = pool.acquire_as(&erin).await.unwrap();
    let current: String = c.query_one(&who, &[]).await.unwrap().get(0);
    assert_eq!(current, "hr_employee");
    assert_eq!(
        c.query_one(PID, &[]).await.unwrap().get::<_, i32>(0),
        pid,
        "the same connection"
    );
    let held: i64 = c.query_one(HELD, &[]).await.unwrap().get(0);
    assert_eq!(held, 1, "context statements the session holds");
}

#[tokio::test]
async fn roles_outside_the_allow_list_are_refused_before_any_sql() {
    let cluster = hr_cluster();
    let proxy = FlightProxy::start(addr(&cluster), std::time::Duration::ZERO).unwrap();
    let pool = pool(
        &format!("postgres://hr_app@127.0.0.1:{}/hr", proxy.port()),
        ContextScope::Transaction,
        1,
    );
    let warm = pool.get().await.unwrap();
    drop(warm);
    proxy.reset_flights();
    let superuser = SecurityContext::builder(EndUserIdentity::named("mallory", None), "t")
        .data_roles(["postgres"])
        .build()
        .unwrap();
    let err = pool.acquire_as(&superuser).await.unwrap_err();
    assert!(matches!(err, PoolError::ContextRejected(_)), "{err}");
    let mut c = pool.get().await.unwrap();
    let err = c.set_end_user_security_context(&superuser).unwrap_err();
    assert_eq!(err, MappingError::RoleNotAllowed("postgres".into()));
    assert!(
        c.end_user_security_context().is_none(),
        "a refused context leaves none"
    );
    assert_eq!(proxy.flights(), 0, "no SQL was sent");
}

/// Round trips counted on the wire: a context costs none.
#[tokio::test]
async fn a_context_costs_no_round_trip() {
    let cluster = hr_cluster();
    let proxy = FlightProxy::start(addr(&cluster), std::time::Duration::ZERO).unwrap();
    let url = format!("postgres://hr_app@127.0.0.1:{}/hr", proxy.port());

    // The baseline: a bare client, one prepared statement.
    let (bare, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    let stmt = bare.prepare(LIST).await.unwrap();
    proxy.reset_flights();
    bare.query(&stmt, &[]).await.unwrap();
    let baseline = proxy.flights();
    assert_eq!(baseline, 1);

    for scope in SCOPES {
        let pool = pool(&url, scope, 1);
        let warm = pool.get().await.unwrap();
        let stmt = warm.prepare_cached(LIST).await.unwrap();
        drop(warm);

        proxy.reset_flights();
        let c = pool.acquire_as(&alice()).await.unwrap();
        assert_eq!(proxy.flights(), 0, "{scope:?}: acquire_as sends nothing");
        assert_eq!(names(&c.query(&stmt, &[]).await.unwrap()), ["Alan"]);
        assert_eq!(proxy.flights(), baseline, "{scope:?}: acquire_as + query");
        c.query(&stmt, &[]).await.unwrap();
        assert_eq!(proxy.flights(), 2 * baseline, "{scope:?}: a second query");
        drop(c);
        assert_eq!(
            proxy.flights(),
            2 * baseline,
            "{scope:?}: release sends nothing"
        );

        proxy.reset_flights();
        let c = pool.get().await.unwrap();
        assert!(c.query(&stmt, &[]).await.unwrap().is_empty());
        assert_eq!(
            proxy.flights(),
            baseline,
            "{scope:?}: plain get after a context checkout"
        );
        drop(c);
    }
}

/// The context statements take a context's attributes in slots (up to six) or as arrays
/// (more): every count applies exactly its attributes, through each way a statement
/// travels (a prepared statement, whose request carries the context; `query_typed`, which
/// rides behind a context statement of the pool's), and the next checkout sees none.
#[tokio::test]
async fn contexts_of_every_attribute_count_apply_exactly_their_attributes() {
    const SLOTS: i32 = 12;
    let probe = format!(
        "SELECT pg_catalog.current_setting('ctxpool.end_user', true), \
         pg_catalog.array_agg(coalesce(pg_catalog.current_setting('hr.t.k' || i, true), '') \
         ORDER BY i) FROM pg_catalog.generate_series(0, {}) AS i",
        SLOTS - 1
    );
    let read =
        |row: &tokio_postgres::Row| -> (Option<String>, Vec<String>) { (row.get(0), row.get(1)) };
    let cluster = hr_cluster();
    for scope in SCOPES {
        let pool = pool(&cluster.url("hr_app", "hr"), scope, 1);
        for n in [0, 1, 6, 7, 12] {
            let attributes: serde_json::Map<String, serde_json::Value> = (0..n)
                .map(|i| (format!("k{i}"), json!(format!("v{i}"))))
                .collect();
            let ctx = SecurityContext::builder(EndUserIdentity::named("alice", None), "db-token")
                .data_roles(["hr_employee"])
                .attributes(json!({ "hr.t": attributes }))
                .build()
                .unwrap();
            let want: Vec<String> = (0..SLOTS)
                .map(|i| {
                    if i < n {
                        format!("v{i}")
                    } else {
                        String::new()
                    }
                })
                .collect();
            let c = pool.acquire_as(&ctx).await.unwrap();
            let stmt = c.prepare_cached(&probe).await.unwrap();
            let prepared = read(&c.query_one(&stmt, &[]).await.unwrap());
            assert_eq!(
                prepared,
                (Some("alice".to_owned()), want.clone()),
                "{scope:?}, {n} attributes, prepared"
            );
            let typed = read(&c.query_typed(&probe, &[]).await.unwrap()[0]);
            assert_eq!(
                typed,
                (Some("alice".to_owned()), want),
                "{scope:?}, {n} attributes, query_typed"
            );
            drop(c);

            let plain = pool.get().await.unwrap();
            let (end_user, values) = read(&plain.query_one(&probe, &[]).await.unwrap());
            assert!(
                end_user.unwrap_or_default().is_empty(),
                "{scope:?}, {n}: end user after release"
            );
            assert!(
                values.iter().all(String::is_empty),
                "{scope:?}, {n}: {values:?} after release"
            );
        }
    }
}

/// Only a superuser login can change its session authorization (the pool's login should not
/// be one; this is where the reset of it matters): whatever a checkout sets it to, by
/// command or by function, in either scope, the next checkout runs as the login again.
#[tokio::test]
async fn session_authorization_does_not_survive_release() {
    const WHO: &str = "SELECT session_user::text, current_user::text";
    let cluster = hr_cluster();
    let login = cluster.superuser();
    for scope in SCOPES {
        let pool = pool(&cluster.url(login, "hr"), scope, 1);
        for how in [
            "SET SESSION AUTHORIZATION hr_app",
            "SELECT pg_catalog.set_config('session_authorization', 'hr_app', false)",
        ] {
            let a = pool.get().await.unwrap();
            a.batch_execute(how).await.unwrap();
            let row = a.query_one(WHO, &[]).await.unwrap();
            let changed: (String, String) = (row.get(0), row.get(1));
            assert_eq!(
                changed,
                ("hr_app".to_owned(), "hr_app".to_owned()),
                "{scope:?}: {how}"
            );
            drop(a);

            let b = pool.get().await.unwrap();
            let row = b.query_one(WHO, &[]).await.unwrap();
            let after: (String, String) = (row.get(0), row.get(1));
            assert_eq!(
                after,
                (login.to_owned(), login.to_owned()),
                "{scope:?}: after {how}"
            );
        }
    }
}

#[tokio::test]
async fn session_scope_affinity_sends_nothing_for_the_same_context() {
    let cluster = hr_cluster();
    let proxy = FlightProxy::start(addr(&cluster), std::time::Duration::ZERO).unwrap();
    let pool = pool(
        &format!("postgres://hr_app@127.0.0.1:{}/hr", proxy.port()),
        ContextScope::Session,
        1,
    );
    let alice = alice();
    let c = pool.acquire_as(&alice).await.unwrap();
    let stmt = c.prepare_cached(LIST).await.unwrap();
    c.query(&stmt, &[]).await.unwrap();
    drop(c);
    let c = pool.acquire_as(&alice).await.unwrap();
    assert_eq!(names(&c.query(&stmt, &[]).await.unwrap()), ["Alan"]);
    // The same context came back: the session still holds it; the statement went bare.
    let who: String = c
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "hr_employee");
}

/// What a plain handle sees of its session: the backend, whether a transaction is open,
/// and who it runs as.
async fn idle_state(c: &ctxpool::postgres::Client) -> (i32, Option<i64>, String) {
    let row = c
        .query_one(
            "SELECT pg_backend_pid(), txid_current_if_assigned()::text::bigint, current_user::text",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test]
async fn transactions_left_open_or_aborted_are_rolled_back_before_reuse() {
    let cluster = hr_cluster();
    for scope in SCOPES {
        let pool = pool(&cluster.url("hr_app", "hr"), scope, 1);
        // A raw BEGIN as SQL text, left open with a transaction id assigned.
        let c = pool.get().await.unwrap();
        let (pid, _, _) = idle_state(&c).await;
        c.batch_execute("BEGIN; SELECT txid_current()")
            .await
            .unwrap();
        drop(c);
        assert_eq!(pool.status().size, 1, "{scope:?}: kept, to be rolled back");
        let c = pool.get().await.unwrap();
        assert_eq!(
            idle_state(&c).await,
            (pid, None, "hr_app".to_owned()),
            "{scope:?}: the same backend, out of the transaction"
        );
        drop(c);

        // An aborted one.
        let c = pool.get().await.unwrap();
        c.execute("BEGIN", &[]).await.unwrap();
        assert!(c.query("SELECT 1/0", &[]).await.is_err());
        drop(c);
        let c = pool.get().await.unwrap();
        assert_eq!(
            idle_state(&c).await,
            (pid, None, "hr_app".to_owned()),
            "{scope:?}"
        );
        drop(c);

        // A Transaction dropped without commit rolls back and keeps the connection.
        let mut c = pool.acquire_as(&bob()).await.unwrap();
        {
            let tx = c.transaction().await.unwrap();
            tx.execute("UPDATE hr.employees SET salary = 0", &[])
                .await
                .unwrap();
        }
        assert_eq!(
            c.query("SELECT 1 FROM hr.employees WHERE salary = 0", &[])
                .await
                .unwrap()
                .len(),
            0
        );
        drop(c);
        assert_eq!(pool.status().size, 1);
        let c = pool.get().await.unwrap();
        let status: String = c
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(status, "hr_app");
    }
}

#[tokio::test]
async fn session_changes_by_user_sql_do_not_survive_the_checkout() {
    let cluster = hr_cluster();
    for scope in SCOPES {
        let pool = pool(&cluster.url("hr_app", "hr"), scope, 1);
        let c = pool.acquire_as(&alice()).await.unwrap();
        c.batch_execute("SET ROLE hr_manager").await.unwrap();
        c.batch_execute("SET search_path TO hr").await.unwrap();
        c.query(
            "SELECT set_config('hr.hcm_context.org_id', '5', false)",
            &[],
        )
        .await
        .unwrap();
        c.batch_execute("RESET ROLE").await.unwrap();
        c.batch_execute("SET ROLE hr_manager").await.unwrap();
        c.batch_execute("CREATE TEMP TABLE leak (x int)")
            .await
            .unwrap();
        drop(c);

        let plain = pool.get().await.unwrap();
        assert!(
            plain.query(LIST, &[]).await.unwrap().is_empty(),
            "{scope:?}"
        );
        let row = plain
            .query_one(
                "SELECT current_user::text, current_setting('hr.hcm_context.org_id', true), \
                 current_setting('search_path'), to_regclass('pg_temp.leak') IS NULL",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "hr_app", "{scope:?}");
        assert_eq!(
            row.get::<_, Option<String>>(1).unwrap_or_default(),
            "",
            "{scope:?}"
        );
        assert_eq!(row.get::<_, String>(2), "\"$user\", public", "{scope:?}");
        assert!(row.get::<_, bool>(3), "{scope:?}: temp table survived");
        drop(plain);

        let b = pool.acquire_as(&bob()).await.unwrap();
        assert_eq!(
            names(&b.query(LIST, &[]).await.unwrap()),
            ["Barbara", "Edsger"],
            "{scope:?}"
        );
    }
}

#[tokio::test]
async fn a_role_revoked_or_dropped_while_idle_fails_closed() {
    let cluster = hr_cluster();
    cluster
        .psql(
            "hr",
            "CREATE ROLE hr_temp NOLOGIN; GRANT hr_temp TO hr_app;",
        )
        .unwrap();
    let temp = SecurityContext::builder(EndUserIdentity::named("tess", None), "t")
        .data_roles(["hr_temp"])
        .build()
        .unwrap();
    let mut config = context_config(ContextScope::Transaction);
    config.allowed_roles.insert("hr_temp".into());
    for scope in SCOPES {
        let pool = pool(&cluster.url("hr_app", "hr"), scope, 1);
        let c = pool.acquire_as(&bob()).await.unwrap();
        assert_eq!(c.query(LIST, &[]).await.unwrap().len(), 2);
        drop(c);
        cluster.psql("hr", "REVOKE hr_manager FROM hr_app").unwrap();
        // Transaction scope applies the role in every transaction: the revocation holds at
        // once. Session scope keeps an applied context for the same end user (affinity):
        // the revocation holds from the next time a context is applied.
        let ctx = match scope {
            ContextScope::Transaction => bob(),
            ContextScope::Session => bob()
                .with_attributes(serde_json::json!({"hr.hcm_context": {"org_id": 9}}))
                .unwrap(),
        };
        let c = pool.acquire_as(&ctx).await.unwrap();
        let err = c
            .execute("INSERT INTO hr.audit VALUES ('bob', 'after revoke')", &[])
            .await
            .unwrap_err();
        assert_eq!(
            err.code().map(|c| c.code()),
            Some("42501"),
            "{scope:?}: {err}"
        );
        drop(c);
        cluster.psql("hr", "GRANT hr_manager TO hr_app").unwrap();
        let c = pool.acquire_as(&bob()).await.unwrap();
        assert_eq!(
            c.query(LIST, &[]).await.unwrap().len(),
            2,
            "{scope:?}: usable again"
        );
    }

    // A role dropped outright.
    let mut cfg = ctxpool::postgres::Config::new();
    cfg.url = Some(cluster.url("hr_app", "hr"));
    cfg.context = Some(config);
    let pool = cfg
        .create_pool(Some(ctxpool::postgres::Runtime::Tokio1), NoTls)
        .unwrap();
    let c = pool.acquire_as(&temp).await.unwrap();
    c.query("SELECT 1", &[]).await.unwrap();
    drop(c);
    cluster.psql("hr", "DROP ROLE hr_temp").unwrap();
    let c = pool.acquire_as(&temp).await.unwrap();
    let err = c
        .execute("INSERT INTO hr.audit VALUES ('tess', 'after drop')", &[])
        .await
        .unwrap_err();
    assert!(err.code().is_some(), "a server error: {err}");
    drop(c);
    let rows = cluster.psql("hr", "SELECT count(*) FROM hr.audit").unwrap();
    assert_eq!(
        rows.trim(),
        "0",
        "no statement ran under a revoked or dropped role"
    );
}

#[tokio::test]
async fn a_connection_that_lost_its_context_statements_is_discarded() {
    let cluster = hr_cluster();
    let pool = pool(&cluster.url("hr_app", "hr"), ContextScope::Transaction, 1);
    let c = pool.acquire_as(&alice()).await.unwrap();
    // The first statement prepares alice's context statement on the connection.
    assert_eq!(names(&c.query(LIST, &[]).await.unwrap()), ["Alan"]);
    c.batch_execute("DEALLOCATE ALL").await.unwrap();
    // The context statement is gone: fail closed, then discard at release.
    let err = c.query(LIST, &[]).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("26000"), "{err}");
    drop(c);
    assert_eq!(pool.status().size, 0);
    let c = pool.acquire_as(&alice()).await.unwrap();
    assert_eq!(names(&c.query(LIST, &[]).await.unwrap()), ["Alan"]);
}
