//! The pool's invariant as a property, against a live PostgreSQL cluster (the live twin of
//! `tests/no_bleed.rs`): every statement observes exactly its acquirer's context (the
//! rows Row-Level Security lets through, `current_user`, `ctxpool.end_user`), and nothing
//! survives release, whatever the exit path: a normal drop, cancellation after any number
//! of polls, a panic, statement errors, raw `BEGIN`, aborted transactions, `SET ROLE` in
//! user SQL, and backends terminated while checked out or idle.
//!
//! One throwaway cluster serves every case; each case gets a fresh pool. `PROPTEST_CASES`
//! sets the case count (default 500).

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ctxpool::postgres::{ContextScope, Object, Pool, PoolError};
use ctxpool::{EndUserIdentity, SecurityContext};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde_json::json;
use support::poll::{DELIBERATE_PANIC, PollLimited, silence_deliberate_panics};
use support::*;
use tokio_postgres::NoTls;

/// What each identity is, and sees (sorted), per `tests/support/hr.sql`.
struct Identity {
    name: &'static str,
    role: &'static str,
    rows: &'static [&'static str],
}

const IDENTITIES: [Identity; 3] = [
    Identity {
        name: "alice",
        role: "hr_employee",
        rows: &["Alan"],
    },
    Identity {
        name: "bob",
        role: "hr_manager",
        rows: &["Barbara", "Edsger"],
    },
    Identity {
        name: "dana",
        role: "hr_manager",
        rows: &["Ada", "Alan", "Grace"],
    },
];

/// The pool's login.
const LOGIN: &str = "hr_app";
/// Who the statement runs as, and which backend runs it.
const WHO: &str =
    "SELECT current_user::text, current_setting('ctxpool.end_user', true), pg_backend_pid()";

/// Dana, a manager of org 5.
fn dana() -> SecurityContext {
    SecurityContext::builder(EndUserIdentity::named("dana", None), "db-token")
        .data_roles(["hr_manager"])
        .attributes(json!({"hr.hcm_context": {"emp_id": 1, "org_id": 5}}))
        .build()
        .unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    /// LIST (prepared, cached) and WHO, both checked.
    Query,
    Set(usize),
    Clear,
    /// `BEGIN` as SQL text.
    RawBegin,
    /// `SELECT 1/0`: must fail.
    Fail,
    /// `SET ROLE hr_manager` as SQL text.
    SetRole,
    /// The superuser terminates this handle's backend.
    TerminateMine,
    /// The superuser terminates every idle backend of the login (pooled or checked out).
    TerminateIdle,
    Panic,
}

#[derive(Debug, Clone)]
struct Task {
    /// `None`: `pool.get()`; `Some(i)`: `pool.acquire_as(identity i)`.
    acquire: Option<usize>,
    ops: Vec<Op>,
    /// Cancel the task after this many polls.
    poll_limit: Option<u16>,
}

#[derive(Debug, Clone)]
struct Schedule {
    scope: ContextScope,
    max_size: usize,
    tasks: Vec<Task>,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => Just(Op::Query),
        2 => (0..IDENTITIES.len()).prop_map(Op::Set),
        1 => Just(Op::Clear),
        1 => Just(Op::RawBegin),
        1 => Just(Op::Fail),
        1 => Just(Op::SetRole),
        1 => Just(Op::TerminateMine),
        1 => Just(Op::TerminateIdle),
        1 => Just(Op::Panic),
    ]
}

fn task() -> impl Strategy<Value = Task> {
    (
        prop::option::of(0..IDENTITIES.len()),
        prop::collection::vec(op(), 0..6),
        prop::option::of(0u16..40),
    )
        .prop_map(|(acquire, ops, poll_limit)| Task {
            acquire,
            ops,
            poll_limit,
        })
}

fn schedule() -> impl Strategy<Value = Schedule> {
    (
        prop_oneof![Just(ContextScope::Transaction), Just(ContextScope::Session)],
        1usize..=3,
        prop::collection::vec(task(), 1..6),
    )
        .prop_map(|(scope, max_size, tasks)| Schedule {
            scope,
            max_size,
            tasks,
        })
}

/// What lives across cases: the cluster, the runtime, a superuser connection.
struct Env {
    url: String,
    rt: tokio::runtime::Runtime,
    admin: Arc<tokio_postgres::Client>,
    contexts: Arc<Vec<SecurityContext>>,
}

/// One case's state, shared by its tasks.
struct World {
    pool: Pool,
    scope: ContextScope,
    /// Some task terminates idle backends.
    kills_idle: bool,
    admin: Arc<tokio_postgres::Client>,
    contexts: Arc<Vec<SecurityContext>>,
    violations: Mutex<Vec<String>>,
}

impl World {
    fn violation(&self, what: String) {
        self.violations.lock().unwrap().push(what);
    }

    /// Runs LIST and WHO on the handle and checks what they observe against `expected`.
    /// Returns whether any statement succeeded; records the backend's pid.
    async fn query(
        &self,
        at: &str,
        conn: &Object,
        expected: Option<usize>,
        tampered: bool,
        pid: &mut Option<i32>,
    ) -> bool {
        let mut ran = false;
        let listed = match conn.prepare_cached(LIST).await {
            Ok(statement) => conn.query(&statement, &[]).await,
            Err(e) => Err(e),
        };
        if let Ok(rows) = &listed {
            ran = true;
            let got = names(rows);
            let want = expected.map_or(&[][..], |i| IDENTITIES[i].rows);
            // After `SET ROLE` in user SQL, a session-scope context runs under the user's
            // role with its own settings until the next switch: rows are the user's doing.
            // Transaction scope sets the role in every transaction; a plain handle has no
            // settings, so no policy lets a row through whatever the role.
            let rows_hold =
                !tampered || expected.is_none() || self.scope == ContextScope::Transaction;
            if rows_hold && got != want {
                self.violation(format!(
                    "{at}: expected rows {want:?} for {}, observed {got:?}",
                    who(expected)
                ));
            }
        }
        if let Ok(row) = conn.query_one(WHO, &[]).await {
            ran = true;
            let user: String = row.get(0);
            let end_user: Option<String> = row.get(1);
            *pid = Some(row.get(2));
            let end_user = end_user.filter(|u| !u.is_empty());
            let want_role = expected.map_or(LOGIN, |i| IDENTITIES[i].role);
            let want_user = expected.map(|i| IDENTITIES[i].name);
            // `SET ROLE` in user SQL holds for the rest of the handle's statements that do
            // not set a role themselves: current_user is then the user's doing.
            if !tampered && user != want_role {
                self.violation(format!(
                    "{at}: expected current_user {want_role} for {}, observed {user}",
                    who(expected)
                ));
            }
            if end_user.as_deref() != want_user {
                self.violation(format!(
                    "{at}: expected end_user {want_user:?}, observed {end_user:?}"
                ));
            }
        }
        ran
    }

    /// Waits until the backend `pid` has exited (`pg_terminate_backend(pid, timeout)`
    /// would, but it polls every 100 ms).
    async fn wait_gone(&self, at: &str, pid: i32) {
        for _ in 0..5000 {
            match self
                .admin
                .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
                .await
            {
                Ok(None) => return,
                Ok(Some(_)) => tokio::time::sleep(Duration::from_millis(1)).await,
                Err(e) => return self.violation(format!("{at}: superuser statement failed: {e}")),
            }
        }
        self.violation(format!(
            "{at}: backend {pid} still there 5000 polls after its termination"
        ));
    }

    /// Terminates backends as the superuser; true if one was terminated.
    async fn terminate(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> bool {
        match self.admin.query(sql, params).await {
            Ok(rows) => rows.iter().any(|r| r.get::<_, bool>(0)),
            Err(e) => {
                self.violation(format!("superuser statement failed: {sql}: {e}"));
                false
            }
        }
    }
}

fn who(expected: Option<usize>) -> &'static str {
    expected.map_or("a plain handle", |i| IDENTITIES[i].name)
}

async fn run_task(world: Arc<World>, index: usize, task: Task) {
    let acquired = match task.acquire {
        None => world.pool.get().await,
        Some(i) => world.pool.acquire_as(&world.contexts[i]).await,
    };
    let mut conn = match acquired {
        Ok(conn) => conn,
        // Terminating idle backends may hit one being opened (it idles between the
        // startup and the preparation of the context statements).
        Err(PoolError::Backend(_)) if world.kills_idle => return,
        Err(e) => return world.violation(format!("task {index}: acquire failed: {e}")),
    };
    let mut expected = task.acquire;
    let carried = conn
        .end_user_security_context()
        .and_then(|c| c.identity().name().map(str::to_owned));
    if carried.as_deref() != expected.map(|i| IDENTITIES[i].name) {
        world.violation(format!(
            "task {index}: handle carries {carried:?}, expected {}",
            who(expected)
        ));
    }
    // The handle's SQL ran `SET ROLE`.
    let mut tampered = false;
    // The superuser terminated this handle's backend: no statement may succeed after.
    let mut terminated = false;
    let mut pid: Option<i32> = None;
    for (step, op) in task.ops.into_iter().enumerate() {
        let at = format!("task {index} step {} {op:?}", step + 1);
        let ran = match op {
            Op::Query => world.query(&at, &conn, expected, tampered, &mut pid).await,
            Op::Set(i) => {
                conn.set_end_user_security_context(&world.contexts[i])
                    .unwrap();
                expected = Some(i);
                false
            }
            Op::Clear => {
                conn.clear_end_user_security_context();
                expected = None;
                false
            }
            Op::RawBegin => conn.batch_execute("BEGIN").await.is_ok(),
            Op::Fail => {
                let ok = conn.query("SELECT 1/0", &[]).await.is_ok();
                if ok {
                    world.violation(format!("{at}: 1/0 succeeded"));
                }
                ok
            }
            Op::SetRole => {
                tampered = true;
                conn.batch_execute("SET ROLE hr_manager").await.is_ok()
            }
            Op::TerminateMine => {
                let mut ran = false;
                if pid.is_none() {
                    if let Ok(row) = conn.query_one("SELECT pg_backend_pid()", &[]).await {
                        ran = true;
                        pid = Some(row.get(0));
                    }
                }
                if terminated && ran {
                    world.violation(format!("{at}: a statement ran on a terminated backend"));
                }
                if let Some(p) = pid {
                    if world
                        .terminate("SELECT pg_terminate_backend($1)", &[&p])
                        .await
                    {
                        terminated = true;
                        world.wait_gone(&at, p).await;
                    }
                }
                false
            }
            Op::TerminateIdle => {
                world
                    .terminate(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE usename = 'hr_app' AND state = 'idle'",
                        &[],
                    )
                    .await;
                false
            }
            Op::Panic => std::panic::panic_any(DELIBERATE_PANIC),
        };
        if terminated && ran {
            world.violation(format!("{at}: a statement ran on a terminated backend"));
        }
    }
}

/// Checks that an idle connection comes back plain: `Ok(Err(_))` is a wrong result,
/// `Err(_)` a statement error (a backend terminated while idle).
async fn check_plain(conn: &Object) -> Result<Result<(), String>, tokio_postgres::Error> {
    if let Some(ctx) = conn.end_user_security_context() {
        return Ok(Err(format!(
            "a checkout carries a context: {:?}",
            ctx.identity().name()
        )));
    }
    let rows = names(&conn.query(LIST, &[]).await?);
    let row = conn.query_one(WHO, &[]).await?;
    let user: String = row.get(0);
    let end_user: Option<String> = row.get(1);
    if !rows.is_empty() || user != LOGIN || end_user.as_deref().is_some_and(|u| !u.is_empty()) {
        return Ok(Err(format!(
            "a released context survived: rows {rows:?}, current_user {user}, end_user {end_user:?}"
        )));
    }
    Ok(Ok(()))
}

async fn run_case(env: &Env, schedule: &Schedule) -> Result<(), TestCaseError> {
    let pool = pool(&env.url, schedule.scope, schedule.max_size);
    let world = Arc::new(World {
        pool: pool.clone(),
        scope: schedule.scope,
        kills_idle: schedule
            .tasks
            .iter()
            .any(|t| t.ops.iter().any(|op| matches!(op, Op::TerminateIdle))),
        admin: env.admin.clone(),
        contexts: env.contexts.clone(),
        violations: Mutex::new(Vec::new()),
    });
    let handles: Vec<_> = schedule
        .tasks
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, task)| {
            let limit = task.poll_limit;
            let fut = run_task(world.clone(), i, task);
            tokio::spawn(async move {
                match limit {
                    Some(left) => {
                        PollLimited::new(fut, left).await;
                    }
                    None => fut.await,
                }
            })
        })
        .collect();
    for handle in handles {
        // A deliberate panic surfaces here as a JoinError; the pool must not care.
        let _ = handle.await;
    }

    let status = pool.status();
    prop_assert_eq!(
        status.available,
        status.size,
        "connections still checked out: {:?}",
        status
    );
    prop_assert!(status.size <= schedule.max_size, "{:?}", status);

    // Every idle connection, all checked out at once, must come back plain. One killed
    // while idle may be handed out before its client noticed: its statement fails, and a
    // fresh checkout replaces it.
    let mut all = Vec::new();
    for _ in 0..status.size {
        all.push(Some(pool.get().await.unwrap()));
    }
    for slot in &mut all {
        let mut retried: Option<String> = None;
        loop {
            let conn = slot.as_ref().unwrap();
            match check_plain(conn).await {
                Ok(Ok(())) => break,
                Ok(Err(wrong)) => {
                    world.violation(format!("after the tasks: {wrong}"));
                    break;
                }
                Err(e) if retried.is_some() => {
                    world.violation(format!(
                        "after the tasks: a fresh checkout failed: {e} (the first one: {})",
                        retried.unwrap()
                    ));
                    break;
                }
                Err(e) => {
                    retried = Some(e.to_string());
                    // The backend's FATAL can arrive before its client notices the closed
                    // socket: give it a moment, so that release discards the connection.
                    for _ in 0..100 {
                        if conn.is_closed() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    drop(slot.take());
                    *slot = Some(pool.get().await.unwrap());
                }
            }
        }
    }
    drop(all);
    drop(pool);
    let violations = std::mem::take(&mut *world.violations.lock().unwrap());
    drop(world);
    prop_assert!(violations.is_empty(), "violations: {:#?}", violations);
    Ok(())
}

fn run_schedule(env: &Env, schedule: &Schedule) -> Result<(), TestCaseError> {
    silence_deliberate_panics();
    env.rt.block_on(async {
        let outcome = tokio::time::timeout(Duration::from_secs(60), run_case(env, schedule)).await;
        // Whatever the outcome, no backend of this case lingers into the next one.
        env.admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'hr_app'",
                &[],
            )
            .await
            .unwrap();
        outcome.unwrap_or_else(|_| Err(TestCaseError::fail("the case hung for 60 s")))
    })
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500)
}

#[test]
fn no_context_bleeds_across_checkouts_on_postgres() {
    let cluster = hr_cluster();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let admin = rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(&cluster.url("postgres", "hr"), NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    });
    let env = Env {
        url: cluster.url("hr_app", "hr"),
        rt,
        admin: Arc::new(admin),
        contexts: Arc::new(vec![alice(), bob(), dana()]),
    };
    let config = ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let started = Instant::now();
    let ran = AtomicU32::new(0);
    let mut runner = TestRunner::new(config);
    let result = runner.run(&schedule(), |schedule| {
        ran.fetch_add(1, Ordering::Relaxed);
        run_schedule(&env, &schedule)
    });
    eprintln!(
        "{} schedules run (shrinking included) in {:.1?}",
        ran.into_inner(),
        started.elapsed()
    );
    drop(env);
    drop(cluster);
    if let Err(e) = result {
        panic!("{e}");
    }
}
