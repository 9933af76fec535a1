//! The server's truth about reused sessions: whatever a checkout does to its session, the
//! next checkout of the same connection sees exactly what a fresh connection of the same
//! login sees.
//!
//! Every case runs in both context scopes on a pool of one connection, so that the next
//! checkout really gets the same server session (asserted by `pg_backend_pid()`), or, where
//! the pool must discard it, a new one. A checkout "A" changes its session, releases, and a
//! plain checkout "B" (no context, the same login) takes one [`Snapshot`] of its session
//! as its first statement; the snapshot is compared with the one a fresh `tokio_postgres`
//! connection as `hr_app` takes, never with a list of expected values. Then a checkout
//! under bob is compared with bob's first checkout on a fresh pool, and writes.
//!
//! A case's SQL is first run on a raw connection too, to show the snapshot sees what the
//! case changes (a case whose change the snapshot cannot see would prove nothing).
//!
//! Each test runs its cases one after the other and reports every failing one, with the
//! scenario and the scope in its name, rather than stopping at the first.

mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use ctxpool::SecurityContext;
use ctxpool::postgres::{Client, ClientWrapper, ContextScope, Pool};
use ctxpool_testkit::PgCluster;
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use support::*;
use tokio_postgres::{Error, IsolationLevel, SimpleQueryMessage};

const SCOPES: [ContextScope; 2] = [ContextScope::Transaction, ContextScope::Session];

/// A failure detector only: nothing here waits on time to synchronise.
const DETECTOR: Duration = Duration::from_secs(30);

/// What the tests add to the HR schema: a sequence and probes that report its session
/// state (`currval`, `lastval`) without failing the snapshot, a table without RLS, and a
/// table with a deferred constraint.
const FIXTURE: &str = r#"
CREATE SEQUENCE hr.s;
GRANT USAGE ON SEQUENCE hr.s TO hr_app, hr_employee, hr_manager;
CREATE FUNCTION hr.currval_probe() RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  RETURN pg_catalog.currval('hr.s')::text;
EXCEPTION WHEN others THEN
  RETURN 'error ' || SQLSTATE;
END $$;
CREATE FUNCTION hr.lastval_probe() RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  RETURN pg_catalog.lastval()::text;
EXCEPTION WHEN others THEN
  RETURN 'error ' || SQLSTATE;
END $$;
CREATE TABLE hr.notes (what text);
GRANT SELECT, INSERT ON hr.notes TO hr_app, hr_employee, hr_manager;
CREATE TABLE hr.deferred (
  k int,
  what text,
  CONSTRAINT deferred_k UNIQUE (k) DEFERRABLE INITIALLY DEFERRED
);
GRANT SELECT, INSERT ON hr.deferred TO hr_app, hr_employee, hr_manager;
"#;

fn fixture() -> PgCluster {
    let cluster = hr_cluster();
    cluster
        .psql("hr", FIXTURE)
        .unwrap_or_else(|e| panic!("fixture: {e}"));
    cluster
}

/// Everything a session holds that a policy, a statement or a later checkout could
/// observe, as one statement (so that it can be a checkout's first). Nothing in it uses a
/// backslash (`standard_conforming_strings` may be off if a reset is missing) or an
/// unqualified name outside `pg_catalog`.
const SNAPSHOT_SQL: &str = "SELECT pg_catalog.json_build_object(
  'pid', pg_backend_pid(),
  'current_user', current_user,
  'session_user', session_user,
  'role', current_setting('role'),
  'settings', (SELECT json_object_agg(n, nullif(current_setting(n, true), '') ORDER BY n)
               FROM (SELECT unnest(ARRAY['ctxpool.end_user', 'ctxpool.data_roles',
                                         'ctxpool.attributes', 'hr.hcm_context.emp_id',
                                         'hr.hcm_context.org_id'])
                     UNION
                     SELECT name FROM pg_settings
                     WHERE name LIKE 'ctxpool.%' OR name LIKE 'hr.%') AS s(n)),
  'search_path', current_setting('search_path'),
  'statement_timeout', current_setting('statement_timeout'),
  'standard_conforming_strings', current_setting('standard_conforming_strings'),
  'default_transaction_read_only', current_setting('default_transaction_read_only'),
  'transaction_read_only', current_setting('transaction_read_only'),
  'default_transaction_isolation', current_setting('default_transaction_isolation'),
  'transaction_isolation', current_setting('transaction_isolation'),
  'employees', (SELECT json_agg(name ORDER BY id) FROM hr.employees),
  'advisory_locks', (SELECT json_agg(json_build_object('classid', classid, 'objid', objid,
                                                       'objsubid', objsubid, 'mode', mode,
                                                       'granted', granted)
                                     ORDER BY classid, objid, objsubid, mode)
                     FROM pg_locks
                     WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
  'listening', (SELECT json_agg(c ORDER BY c) FROM pg_listening_channels() AS c),
  'cursors', (SELECT json_agg(name ORDER BY name) FROM pg_cursors),
  'sql_prepared', (SELECT json_agg(name ORDER BY name) FROM pg_prepared_statements
                   WHERE from_sql),
  'temp_objects', (SELECT json_agg(relname ORDER BY relname) FROM pg_class
                   WHERE relnamespace = pg_my_temp_schema()),
  'txid', txid_current_if_assigned(),
  'currval', hr.currval_probe(),
  'lastval', hr.lastval_probe()
)::text";

/// What a session holds: every field of [`SNAPSHOT_SQL`] but the backend's pid, as JSON
/// text, with `settings` flattened to `setting NAME`. A NULL field or setting is left
/// out, so that a placeholder the session defined earlier (which reads `''`, made NULL
/// by `nullif`) compares equal to one never defined.
#[derive(Debug, Clone)]
struct Snapshot {
    pid: i32,
    state: BTreeMap<String, String>,
}

impl Snapshot {
    fn parse(text: &str) -> Self {
        let value: serde_json::Value =
            serde_json::from_str(text).unwrap_or_else(|e| panic!("snapshot {text}: {e}"));
        let serde_json::Value::Object(fields) = value else {
            panic!("snapshot {text}: not an object");
        };
        let mut pid = None;
        let mut state = BTreeMap::new();
        for (key, v) in fields {
            match (key.as_str(), v) {
                ("pid", v) => pid = v.as_i64().and_then(|p| i32::try_from(p).ok()),
                ("settings", serde_json::Value::Object(settings)) => {
                    for (name, sv) in settings {
                        if !sv.is_null() {
                            state.insert(format!("setting {name}"), sv.to_string());
                        }
                    }
                }
                (_, serde_json::Value::Null) => {}
                (_, v) => {
                    state.insert(key, v.to_string());
                }
            }
        }
        Self {
            pid: pid.unwrap_or_else(|| panic!("snapshot {text}: no pid")),
            state,
        }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.state.get(key).map(String::as_str)
    }

    /// The fields that differ from `want`, each as `field: got … , fresh …`.
    fn diff(&self, want: &Snapshot) -> Vec<String> {
        let mut keys: Vec<&String> = self.state.keys().chain(want.state.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter_map(|k| {
                let (g, w) = (self.state.get(k), want.state.get(k));
                (g != w).then(|| {
                    let show = |v: Option<&String>| v.map_or("NULL".to_owned(), |s| s.clone());
                    format!("{k}: reused session {} / fresh {}", show(g), show(w))
                })
            })
            .collect()
    }
}

/// What the snapshot needs of a client: a pooled one or a raw tokio-postgres one.
trait Sql {
    async fn simple(&self, sql: &str) -> Result<Vec<SimpleQueryMessage>, Error>;
    async fn batch(&self, sql: &str) -> Result<(), Error>;
    async fn rows(&self, sql: &str) -> Result<usize, Error>;
}

impl Sql for tokio_postgres::Client {
    async fn simple(&self, sql: &str) -> Result<Vec<SimpleQueryMessage>, Error> {
        self.simple_query(sql).await
    }
    async fn batch(&self, sql: &str) -> Result<(), Error> {
        self.batch_execute(sql).await
    }
    async fn rows(&self, sql: &str) -> Result<usize, Error> {
        self.query(sql, &[]).await.map(|r| r.len())
    }
}

impl Sql for ClientWrapper {
    async fn simple(&self, sql: &str) -> Result<Vec<SimpleQueryMessage>, Error> {
        self.simple_query(sql).await
    }
    async fn batch(&self, sql: &str) -> Result<(), Error> {
        self.batch_execute(sql).await
    }
    async fn rows(&self, sql: &str) -> Result<usize, Error> {
        self.query(sql, &[]).await.map(|r| r.len())
    }
}

async fn try_snapshot(c: &impl Sql) -> Result<Snapshot, Error> {
    let messages = c.simple(SNAPSHOT_SQL).await?;
    let text = messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("the snapshot returns one row");
    Ok(Snapshot::parse(&text))
}

async fn snapshot(c: &impl Sql, what: &str) -> Snapshot {
    within(what, try_snapshot(c))
        .await
        .unwrap_or_else(|e| panic!("{what}: the snapshot failed: {}", describe(&e)))
}

/// A fresh connection as hr_app, straight from tokio-postgres.
async fn fresh(cluster: &PgCluster) -> Snapshot {
    let raw = connect_raw(&cluster.url("hr_app", "hr")).await;
    snapshot(&raw, "fresh hr_app connection").await
}

/// The first checkout under `ctx` of a fresh pool.
async fn fresh_as(cluster: &PgCluster, scope: ContextScope, ctx: &SecurityContext) -> Snapshot {
    let p = pool(&cluster.url("hr_app", "hr"), scope, 1);
    let c = p.acquire_as(ctx).await.expect("fresh pool: acquire_as");
    snapshot(&*c, "fresh pool, first checkout under a context").await
}

fn assert_same(name: &str, who: &str, got: &Snapshot, want: &Snapshot) {
    let diff = got.diff(want);
    assert!(
        diff.is_empty(),
        "{name}: {who} differs from a fresh connection:\n  {}",
        diff.join("\n  ")
    );
}

/// Whether the next checkout must get A's server session, or a new one.
#[derive(Clone, Copy, Debug)]
enum Reuse {
    Same(i32),
    Replaced(i32),
}

impl Reuse {
    fn check(self, name: &str, who: &str, pid: i32) {
        match self {
            Reuse::Same(a) => assert_eq!(
                pid, a,
                "{name}: {who} runs on backend {pid}, not A's {a}: the connection was not \
                 reused, so the case did not exercise reuse"
            ),
            Reuse::Replaced(a) => assert_ne!(
                pid, a,
                "{name}: {who} got A's backend {a} back, which the pool had to discard"
            ),
        }
    }
}

fn describe(e: &Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} [{}]", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

fn code(e: &Error) -> Option<&str> {
    e.code().map(|c| c.code())
}

async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(DETECTOR, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: did not complete within {DETECTOR:?}: blocked"))
}

async fn backend_pid(c: &impl Sql, what: &str) -> i32 {
    let messages = c
        .simple("SELECT pg_backend_pid()")
        .await
        .unwrap_or_else(|e| panic!("{what}: pg_backend_pid(): {}", describe(&e)));
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .expect("a pid")
}

/// A string usable inside a SQL literal.
fn tag(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn count(cluster: &PgCluster, table: &str, what: &str) -> String {
    cluster
        .psql(
            "hr",
            &format!("SELECT count(*) FROM {table} WHERE what = '{}'", tag(what)),
        )
        .unwrap_or_else(|e| panic!("psql: {e}"))
        .trim()
        .to_owned()
}

/// B: a plain checkout whose first statement is the snapshot, compared with a fresh
/// connection; the same again as its second statement; then a checkout under bob,
/// compared with bob's first checkout on a fresh pool, which writes. Returns B's pid.
async fn expect_clean(
    cluster: &PgCluster,
    pool: &Pool,
    scope: ContextScope,
    name: &str,
    reuse: Reuse,
) -> i32 {
    let b = within(&format!("{name}: B's pool.get()"), pool.get())
        .await
        .unwrap_or_else(|e| panic!("{name}: B's pool.get(): {e}"));
    let first = match within(name, try_snapshot(&*b)).await {
        Ok(first) => first,
        Err(e) => {
            // Say whether a retry on the same handle would have seen a clean session.
            let retry = match within(name, try_snapshot(&*b)).await {
                Ok(again) => {
                    let diff = again.diff(&fresh(cluster).await);
                    if diff.is_empty() {
                        "a retry on the same handle sees a clean session".to_owned()
                    } else {
                        format!("a retry differs too: {}", diff.join("; "))
                    }
                }
                Err(e) => format!("a retry fails too: {}", describe(&e)),
            };
            panic!(
                "{name}: B's first statement (the snapshot) failed where a fresh connection \
                 succeeds: {} ({retry})",
                describe(&e)
            );
        }
    };
    let want = fresh(cluster).await;
    assert_same(name, "B (plain get), first statement", &first, &want);
    reuse.check(name, "B", first.pid);
    let second = snapshot(&*b, &format!("{name}: B's second statement")).await;
    assert_same(name, "B (plain get), second statement", &second, &want);
    drop(b);

    let c = within(
        &format!("{name}: the next acquire_as(bob)"),
        pool.acquire_as(&bob()),
    )
    .await
    .unwrap_or_else(|e| panic!("{name}: the next acquire_as(bob): {e}"));
    let got = snapshot(&*c, &format!("{name}: the next checkout, as bob")).await;
    let want = fresh_as(cluster, scope, &bob()).await;
    assert_same(name, "the next checkout as bob", &got, &want);
    assert_eq!(
        got.pid, first.pid,
        "{name}: the checkout after B got another backend"
    );
    let written = within(
        name,
        c.execute(
            "INSERT INTO hr.audit VALUES (current_setting('ctxpool.end_user'), $1)",
            &[&tag(name)],
        ),
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{name}: bob's INSERT on the next checkout: {}",
            describe(&e)
        )
    });
    assert_eq!(written, 1, "{name}: bob's INSERT");
    drop(c);
    let who = cluster
        .psql(
            "hr",
            &format!("SELECT who FROM hr.audit WHERE what = '{}'", tag(name)),
        )
        .unwrap_or_else(|e| panic!("psql: {e}"));
    assert_eq!(who.trim(), "bob", "{name}: bob's INSERT was not committed");
    first.pid
}

/// Who A is.
#[derive(Clone, Copy, Debug)]
enum Who {
    Alice,
    Plain,
}

async fn checkout(pool: &Pool, who: Who, name: &str) -> Client {
    let c = match who {
        Who::Alice => within(name, pool.acquire_as(&alice())).await,
        Who::Plain => within(name, pool.get()).await,
    };
    c.unwrap_or_else(|e| panic!("{name}: A's checkout: {e}"))
}

/// One statement of A's.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// `batch_execute` (simple protocol).
    Batch(&'static str),
    /// `simple_query`.
    Simple(&'static str),
    /// `query` (extended protocol).
    Query(&'static str),
}

async fn run_steps(c: &impl Sql, steps: &[Step], name: &str) {
    for step in steps {
        let result = match *step {
            Step::Batch(sql) => c.batch(sql).await,
            Step::Simple(sql) => c.simple(sql).await.map(drop),
            Step::Query(sql) => c.rows(sql).await.map(drop),
        };
        if let Err(e) = result {
            panic!("{name}: A's step {step:?} failed: {}", describe(&e));
        }
    }
}

/// The steps on a raw connection leave a trace the snapshot sees.
async fn control(cluster: &PgCluster, steps: &[Step], name: &str) {
    let raw = connect_raw(&cluster.url("hr_app", "hr")).await;
    run_steps(&raw, steps, &format!("{name} (control)")).await;
    let dirty = snapshot(&raw, &format!("{name} (control)")).await;
    let clean = fresh(cluster).await;
    assert!(
        !dirty.diff(&clean).is_empty(),
        "{name}: control: the steps leave nothing the snapshot sees; the case proves nothing"
    );
}

/// Runs cases, keeping every failure.
#[derive(Default)]
struct Cases {
    passed: Vec<String>,
    failed: Vec<String>,
}

impl Cases {
    async fn run<F: Future<Output = ()>>(&mut self, name: String, case: F) {
        match AssertUnwindSafe(case).catch_unwind().await {
            Ok(()) => self.passed.push(name),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "(a panic without a message)".to_owned());
                self.failed.push(format!("[{name}] {message}"));
            }
        }
    }

    fn finish(self, test: &str) {
        for name in &self.passed {
            println!("{test}: PASS {name}");
        }
        for failure in &self.failed {
            println!("{test}: FAIL {failure}");
        }
        assert!(
            self.failed.is_empty(),
            "{test}: {} of {} cases failed:\n{}",
            self.failed.len(),
            self.failed.len() + self.passed.len(),
            self.failed.join("\n")
        );
    }
}

/// Scenario 1: session settings changed by A's SQL, however spelt.
const SETTINGS: &[(&str, &[Step])] = &[
    ("SET ROLE", &[Step::Batch("SET ROLE hr_manager")]),
    (
        "set_config ctxpool.end_user",
        &[Step::Query(
            "SELECT set_config('ctxpool.end_user', 'mallory', false)",
        )],
    ),
    (
        "set_config of attribute settings",
        &[Step::Query(
            "SELECT set_config('hr.hcm_context.org_id', '7', false), \
             set_config('hr.hcm_context.emp_id', '4', false), \
             set_config('ctxpool.data_roles', '[\"hr_manager\"]', false)",
        )],
    ),
    ("SET search_path", &[Step::Batch("SET search_path = hr")]),
    (
        "SET statement_timeout",
        &[Step::Batch("SET statement_timeout = 1234")],
    ),
    (
        "U& escaped set_config",
        &[Step::Query(
            r#"SELECT U&"set\005fconfig"('ctxpool.end_user', 'x', false)"#,
        )],
    ),
    (
        "UESCAPE set_config",
        &[Step::Simple(
            r#"SELECT U&"set!005fconfig" UESCAPE '!' ('ctxpool.end_user', 'y', false)"#,
        )],
    ),
    (
        "nested comments",
        &[
            Step::Batch("/* /* */ SELECT 1; */ SET ROLE hr_manager"),
            Step::Simple("SELECT 1 /* a /* b */ c */; SET /* x */ search_path -- y\n = hr"),
        ],
    ),
    (
        "DO EXECUTE SET ROLE",
        &[Step::Batch(
            "DO $$ BEGIN EXECUTE 'SET ROLE hr_manager'; END $$",
        )],
    ),
    (
        "DO PERFORM set_config",
        &[Step::Batch(
            "DO $$ BEGIN PERFORM set_config('ctxpool.end_user', 'mallory', false); END $$",
        )],
    ),
    (
        "PREPARE + EXECUTE",
        &[
            Step::Batch("PREPARE p AS SELECT 1"),
            Step::Batch("EXECUTE p"),
        ],
    ),
    (
        "PREPARE inside DO",
        &[Step::Batch(
            "DO $$ BEGIN EXECUTE 'PREPARE q AS SELECT 2'; END $$",
        )],
    ),
    (
        "UPDATE pg_settings",
        &[Step::Query(
            "UPDATE pg_settings SET setting = 'hr' WHERE name = 'search_path'",
        )],
    ),
    (
        "SET default_transaction_read_only",
        &[Step::Batch("SET default_transaction_read_only = on")],
    ),
    (
        "SET default_transaction_isolation",
        &[Step::Batch(
            "SET default_transaction_isolation = 'serializable'",
        )],
    ),
    (
        "SET standard_conforming_strings",
        &[Step::Batch("SET standard_conforming_strings = off")],
    ),
    (
        "everything in one string",
        &[Step::Batch(
            "SET ROLE hr_manager; SET search_path = hr; SET statement_timeout = 1234; \
             SELECT set_config('ctxpool.end_user', 'mallory', false); \
             SET standard_conforming_strings = off; SET default_transaction_read_only = on",
        )],
    ),
];

/// Scenario 2: objects and state that live in the session.
const OBJECTS: &[(&str, &[Step])] = &[
    (
        "SELECT INTO TEMP",
        &[Step::Batch("SELECT 1 AS x INTO TEMP t")],
    ),
    (
        "CREATE TEMP TABLE",
        &[
            Step::Batch("CREATE TEMP TABLE t2 (x int)"),
            Step::Query("INSERT INTO t2 VALUES (1)"),
        ],
    ),
    (
        "temp sequence and view",
        &[Step::Batch(
            "CREATE TEMP SEQUENCE ts; CREATE TEMP VIEW tv AS SELECT 1 AS x; SELECT nextval('ts')",
        )],
    ),
    (
        "DECLARE WITH HOLD",
        &[
            Step::Batch(
                "BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 10) g; \
                 COMMIT",
            ),
            Step::Batch("FETCH 1 FROM c"),
        ],
    ),
    (
        "DECLARE WITH HOLD, separate statements",
        &[
            Step::Batch("BEGIN"),
            Step::Batch("DECLARE c2 CURSOR WITH HOLD FOR SELECT 1"),
            Step::Batch("COMMIT"),
        ],
    ),
    (
        "pg_advisory_lock",
        &[
            Step::Query("SELECT pg_advisory_lock(42)"),
            Step::Query("SELECT pg_advisory_lock(42), pg_advisory_lock_shared(7)"),
        ],
    ),
    (
        "LISTEN",
        &[
            Step::Batch("LISTEN chan"),
            Step::Batch("LISTEN \"Other Chan\""),
        ],
    ),
    ("nextval", &[Step::Query("SELECT nextval('hr.s')")]),
    (
        "everything in one string",
        &[Step::Batch(
            "SELECT 1 AS x INTO TEMP t3; SELECT pg_advisory_lock(43); LISTEN chan2; \
             SELECT nextval('hr.s'); BEGIN; DECLARE c3 CURSOR WITH HOLD FOR SELECT 1; COMMIT",
        )],
    ),
];

/// A changes its session with `steps` and releases; B must be clean on the same backend.
async fn dirty_then_clean(
    cluster: &PgCluster,
    scope: ContextScope,
    who: Who,
    steps: &[Step],
    name: &str,
) {
    control(cluster, steps, name).await;
    let pool = pool(&cluster.url("hr_app", "hr"), scope, 1);
    let a = checkout(&pool, who, name).await;
    run_steps(&*a, steps, name).await;
    let pid = backend_pid(&*a, name).await;
    drop(a);
    expect_clean(cluster, &pool, scope, name, Reuse::Same(pid)).await;
}

#[tokio::test]
async fn s1_session_settings_do_not_survive_release() {
    let cluster = fixture();
    let mut cases = Cases::default();
    for scope in SCOPES {
        for who in [Who::Alice, Who::Plain] {
            for (variant, steps) in SETTINGS {
                let name = format!("S1 {variant} | A={who:?} | {scope:?}");
                cases
                    .run(
                        name.clone(),
                        dirty_then_clean(&cluster, scope, who, steps, &name),
                    )
                    .await;
            }
        }
    }
    cases.finish("s1");
}

#[tokio::test]
async fn s2_session_objects_do_not_survive_release() {
    let cluster = fixture();
    let mut cases = Cases::default();
    for scope in SCOPES {
        for who in [Who::Alice, Who::Plain] {
            for (variant, steps) in OBJECTS {
                let name = format!("S2 {variant} | A={who:?} | {scope:?}");
                cases
                    .run(
                        name.clone(),
                        dirty_then_clean(&cluster, scope, who, steps, &name),
                    )
                    .await;
            }
        }
    }
    cases.finish("s2");
}

/// Scenario 3: the transaction shapes a checkout can be released in.
#[derive(Clone, Copy, Debug)]
enum LeftTx {
    /// `batch_execute("BEGIN; SELECT txid_current()")`, left open.
    RawBegin,
    /// `execute("BEGIN")`, then an error: aborted.
    Aborted,
    /// `transaction()` with a write, dropped.
    Dropped,
    /// `transaction()` with a write, `std::mem::forget`.
    Forgotten,
    /// A COMMIT that fails on a deferred constraint.
    DeferredCommitFails,
    /// `tx.batch_execute("ROLLBACK")`, then `tx.commit()`.
    RollbackThenCommit,
}

/// The write a transaction of A's makes: hr.audit under a context (its policy needs
/// one), hr.notes without.
fn write_sql(who: Who) -> (&'static str, &'static str) {
    match who {
        Who::Alice => (
            "hr.audit",
            "INSERT INTO hr.audit VALUES (current_setting('ctxpool.end_user'), $1)",
        ),
        Who::Plain => ("hr.notes", "INSERT INTO hr.notes VALUES ($1)"),
    }
}

async fn left_tx_case(cluster: &PgCluster, scope: ContextScope, who: Who, shape: LeftTx) {
    let name = format!("S3 {shape:?} | A={who:?} | {scope:?}");
    let name = name.as_str();
    // A's own writes carry a tag of their own (the follow-up checkout writes `tag(name)`).
    let t = format!("{}_a", tag(name));
    let (table, insert) = write_sql(who);
    let pool = pool(&cluster.url("hr_app", "hr"), scope, 1);
    let mut a = checkout(&pool, who, name).await;
    let pid = backend_pid(&*a, name).await;
    match shape {
        LeftTx::RawBegin => {
            a.batch_execute("BEGIN; SELECT txid_current()")
                .await
                .unwrap_or_else(|e| panic!("{name}: {}", describe(&e)));
            let open: bool = a
                .query_one("SELECT txid_current_if_assigned() IS NOT NULL", &[])
                .await
                .unwrap_or_else(|e| panic!("{name}: {}", describe(&e)))
                .get(0);
            assert!(open, "{name}: A's BEGIN opened no transaction");
        }
        LeftTx::Aborted => {
            a.execute("BEGIN", &[])
                .await
                .unwrap_or_else(|e| panic!("{name}: {}", describe(&e)));
            let err = a.query("SELECT 1/0", &[]).await.unwrap_err();
            assert_eq!(code(&err), Some("22012"), "{name}: {}", describe(&err));
            let err = a.query("SELECT 1", &[]).await.unwrap_err();
            assert_eq!(
                code(&err),
                Some("25P02"),
                "{name}: not aborted: {}",
                describe(&err)
            );
        }
        LeftTx::Dropped => {
            let tx = a.transaction().await.unwrap();
            assert_eq!(tx.execute(insert, &[&t]).await.unwrap(), 1, "{name}");
            drop(tx);
        }
        LeftTx::Forgotten => {
            let tx = a.transaction().await.unwrap();
            assert_eq!(tx.execute(insert, &[&t]).await.unwrap(), 1, "{name}");
            std::mem::forget(tx);
        }
        LeftTx::DeferredCommitFails => {
            let tx = a.transaction().await.unwrap();
            tx.execute("INSERT INTO hr.deferred VALUES (1, $1), (1, $1)", &[&t])
                .await
                .unwrap_or_else(|e| panic!("{name}: {}", describe(&e)));
            let err = tx.commit().await.unwrap_err();
            assert_eq!(
                code(&err),
                Some("23505"),
                "{name}: the deferred check: {}",
                describe(&err)
            );
            let (in_tx, user): (bool, String) = {
                let row = a
                    .query_one(
                        "SELECT txid_current_if_assigned() IS NOT NULL, current_user::text",
                        &[],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{name}: after the failed COMMIT: {e}"));
                (row.get(0), row.get(1))
            };
            assert!(!in_tx, "{name}: a transaction is still open");
            let expected_user = match who {
                Who::Alice => "hr_employee",
                Who::Plain => "hr_app",
            };
            assert_eq!(user, expected_user, "{name}: after the failed COMMIT");
        }
        LeftTx::RollbackThenCommit => {
            let tx = a.transaction().await.unwrap();
            assert_eq!(tx.execute(insert, &[&t]).await.unwrap(), 1, "{name}");
            tx.batch_execute("ROLLBACK")
                .await
                .unwrap_or_else(|e| panic!("{name}: {}", describe(&e)));
            tx.commit().await.unwrap_or_else(|e| {
                panic!(
                    "{name}: COMMIT after ROLLBACK (a warning only on PostgreSQL): {}",
                    describe(&e)
                )
            });
        }
    }
    drop(a);
    assert_eq!(
        pool.status().size,
        1,
        "{name}: the connection was discarded, not rolled back and kept"
    );
    if let LeftTx::Forgotten = shape {
        // B commits whatever transaction it is in; A's row must not be in it.
        let b = within(name, pool.get()).await.unwrap();
        within(name, b.batch_execute("BEGIN; COMMIT"))
            .await
            .unwrap_or_else(|e| panic!("{name}: B's BEGIN; COMMIT: {}", describe(&e)));
        assert_eq!(
            backend_pid(&*b, name).await,
            pid,
            "{name}: B did not get A's backend"
        );
        drop(b);
    }
    expect_clean(cluster, &pool, scope, name, Reuse::Same(pid)).await;
    assert_eq!(
        count(cluster, table, &t),
        "0",
        "{name}: A's uncommitted write exists"
    );
    assert_eq!(
        count(cluster, "hr.deferred", &t),
        "0",
        "{name}: the write whose COMMIT failed exists"
    );
}

#[tokio::test]
async fn s3_transactions_left_behind_never_reach_the_next_checkout() {
    let cluster = fixture();
    let mut cases = Cases::default();
    for scope in SCOPES {
        for who in [Who::Alice, Who::Plain] {
            for shape in [
                LeftTx::RawBegin,
                LeftTx::Aborted,
                LeftTx::Dropped,
                LeftTx::Forgotten,
                LeftTx::DeferredCommitFails,
                LeftTx::RollbackThenCommit,
            ] {
                let name = format!("S3 {shape:?} | A={who:?} | {scope:?}");
                cases
                    .run(name, left_tx_case(&cluster, scope, who, shape))
                    .await;
            }
        }
    }
    cases.finish("s3");
}

/// Scenario 4: B's first statement, whose transaction rolls back.
#[derive(Clone, Copy, Debug)]
enum FirstRollsBack {
    BeginSelectRollback,
    BareRollback,
    BareCommit,
    DivisionByZero,
    SimpleThenError,
    BeginErrorThenRollback,
    TransactionRolledBack,
    TransactionDropped,
    SerializableThenError,
    BeginRollbackSeparately,
    RefusedByTheDriver,
    UnknownTable,
}

async fn first_statement(b: &mut Client, how: FirstRollsBack, name: &str) {
    use FirstRollsBack::*;
    let fail = |e: Error| -> ! { panic!("{name}: B's first statement: {}", describe(&e)) };
    match how {
        BeginSelectRollback => b
            .batch_execute("BEGIN; SELECT 1; ROLLBACK")
            .await
            .unwrap_or_else(|e| fail(e)),
        BareRollback => b
            .batch_execute("ROLLBACK")
            .await
            .unwrap_or_else(|e| fail(e)),
        BareCommit => b.batch_execute("COMMIT").await.unwrap_or_else(|e| fail(e)),
        DivisionByZero => {
            let err = b.query("SELECT 1/0", &[]).await.unwrap_err();
            assert_eq!(code(&err), Some("22012"), "{name}: {}", describe(&err));
        }
        SimpleThenError => {
            let err = b.batch_execute("SELECT 1; SELECT 1/0").await.unwrap_err();
            assert_eq!(code(&err), Some("22012"), "{name}: {}", describe(&err));
        }
        BeginErrorThenRollback => {
            let err = b.batch_execute("BEGIN; SELECT 1/0").await.unwrap_err();
            assert_eq!(code(&err), Some("22012"), "{name}: {}", describe(&err));
            b.batch_execute("ROLLBACK")
                .await
                .unwrap_or_else(|e| fail(e));
        }
        TransactionRolledBack => {
            let tx = b.transaction().await.unwrap_or_else(|e| fail(e));
            tx.query("SELECT 1", &[]).await.unwrap_or_else(|e| fail(e));
            tx.rollback().await.unwrap_or_else(|e| fail(e));
        }
        TransactionDropped => {
            let tx = b.transaction().await.unwrap_or_else(|e| fail(e));
            tx.query("SELECT 1", &[]).await.unwrap_or_else(|e| fail(e));
            drop(tx);
        }
        SerializableThenError => {
            let tx = b
                .build_transaction()
                .isolation_level(IsolationLevel::Serializable)
                .start()
                .await
                .unwrap_or_else(|e| fail(e));
            let err = tx.query("SELECT 1/0", &[]).await.unwrap_err();
            assert_eq!(code(&err), Some("22012"), "{name}: {}", describe(&err));
            drop(tx);
        }
        BeginRollbackSeparately => {
            b.batch_execute("BEGIN").await.unwrap_or_else(|e| fail(e));
            b.batch_execute("ROLLBACK")
                .await
                .unwrap_or_else(|e| fail(e));
        }
        RefusedByTheDriver => {
            // tokio-postgres refuses the parameter before sending anything of the
            // statement: the pool's part of the batch goes out alone.
            let err = b
                .query("SELECT $1::int", &[&"not an int"])
                .await
                .unwrap_err();
            assert!(err.code().is_none(), "{name}: a client-side error: {err}");
        }
        UnknownTable => {
            let err = b
                .query_typed("SELECT * FROM hr.no_such_table", &[])
                .await
                .unwrap_err();
            assert_eq!(code(&err), Some("42P01"), "{name}: {}", describe(&err));
        }
    }
}

async fn first_rolls_back_case(cluster: &PgCluster, scope: ContextScope, how: FirstRollsBack) {
    let name = format!("S4 {how:?} | A=alice, B=bob | {scope:?}");
    let name = name.as_str();
    let pool = pool(&cluster.url("hr_app", "hr"), scope, 1);
    // A: alice, who also dirties her session with another identity.
    let a = checkout(&pool, Who::Alice, name).await;
    run_steps(
        &*a,
        &[Step::Batch(
            "SELECT set_config('ctxpool.end_user', 'mallory', false); SET ROLE hr_employee",
        )],
        name,
    )
    .await;
    let pid = backend_pid(&*a, name).await;
    drop(a);

    let mut b = within(name, pool.acquire_as(&bob())).await.unwrap();
    within(name, first_statement(&mut b, how, name)).await;
    let want = fresh_as(cluster, scope, &bob()).await;
    for which in ["second", "third"] {
        let got = snapshot(&*b, &format!("{name}: B's {which} statement")).await;
        assert_eq!(
            (got.get("current_user"), got.get("setting ctxpool.end_user")),
            (Some("\"hr_manager\""), Some("\"bob\"")),
            "{name}: B's {which} statement does not run as bob"
        );
        assert_same(name, &format!("B as bob, {which} statement"), &got, &want);
        Reuse::Same(pid).check(name, "B", got.pid);
    }
    drop(b);
    expect_clean(cluster, &pool, scope, name, Reuse::Same(pid)).await;
}

#[tokio::test]
async fn s4_a_first_statement_that_rolls_back_keeps_the_new_context() {
    use FirstRollsBack::*;
    let cluster = fixture();
    let mut cases = Cases::default();
    for scope in SCOPES {
        for how in [
            BeginSelectRollback,
            BareRollback,
            BareCommit,
            DivisionByZero,
            SimpleThenError,
            BeginErrorThenRollback,
            TransactionRolledBack,
            TransactionDropped,
            SerializableThenError,
            BeginRollbackSeparately,
            RefusedByTheDriver,
            UnknownTable,
        ] {
            let name = format!("S4 {how:?} | {scope:?}");
            cases
                .run(name, first_rolls_back_case(&cluster, scope, how))
                .await;
        }
    }
    cases.finish("s4");
}

/// Scenario 5: how the user opens a transaction in SQL.
#[derive(Clone, Copy, Debug)]
enum RawBegin {
    Batch,
    Execute,
    SimpleStartTransaction,
    BatchWithOptions,
    BeginThenSetTransaction,
    BeginAndInsertInOneString,
}

async fn raw_begin_case(cluster: &PgCluster, scope: ContextScope, how: RawBegin) {
    let name = format!("S5 {how:?} | A=alice | {scope:?}");
    let name = name.as_str();
    let t = tag(name);
    let insert =
        format!("INSERT INTO hr.audit VALUES (current_setting('ctxpool.end_user'), '{t}')");
    let pool = pool(&cluster.url("hr_app", "hr"), scope, 1);
    let c = checkout(&pool, Who::Alice, name).await;
    let pid = backend_pid(&*c, name).await;
    let ok = |r: Result<(), Error>| {
        r.unwrap_or_else(|e| panic!("{name}: opening the transaction: {}", describe(&e)))
    };
    let mut inserted = false;
    match how {
        RawBegin::Batch => ok(c.batch_execute("BEGIN").await),
        RawBegin::Execute => ok(c.execute("BEGIN", &[]).await.map(drop)),
        RawBegin::SimpleStartTransaction => ok(c.simple_query("START TRANSACTION").await.map(drop)),
        RawBegin::BatchWithOptions => ok(c
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            .await),
        RawBegin::BeginThenSetTransaction => {
            ok(c.batch_execute("BEGIN").await);
            ok(
                c.batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    .await,
            );
        }
        RawBegin::BeginAndInsertInOneString => {
            ok(c.batch_execute(&format!("BEGIN; {insert}")).await);
            inserted = true;
        }
    }
    let probe = "SELECT txid_current()::text, current_setting('ctxpool.end_user', true), \
                 current_user::text";
    let seen = |row: tokio_postgres::Row| -> (String, Option<String>, String) {
        (row.get(0), row.get(1), row.get(2))
    };
    let first = seen(
        c.query_one(probe, &[])
            .await
            .unwrap_or_else(|e| panic!("{name}: inside the transaction: {}", describe(&e))),
    );
    assert_eq!(
        (first.1.as_deref(), first.2.as_str()),
        (Some("alice"), "hr_employee"),
        "{name}: a statement inside the user's transaction does not see the context"
    );
    if !inserted {
        let n = c
            .execute(insert.as_str(), &[])
            .await
            .unwrap_or_else(|e| panic!("{name}: INSERT inside the transaction: {}", describe(&e)));
        assert_eq!(n, 1, "{name}");
    }
    let again = seen(c.query_one(probe, &[]).await.unwrap());
    assert_eq!(
        again, first,
        "{name}: the statements after BEGIN are not one transaction under the context"
    );
    c.batch_execute("ROLLBACK")
        .await
        .unwrap_or_else(|e| panic!("{name}: ROLLBACK: {}", describe(&e)));
    assert_eq!(
        count(cluster, "hr.audit", name),
        "0",
        "{name}: the row inserted inside BEGIN … ROLLBACK exists: no real transaction"
    );
    let after = c
        .query_one(
            "SELECT txid_current_if_assigned()::text, current_setting('ctxpool.end_user', true)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            after.get::<_, Option<String>>(0),
            after.get::<_, Option<String>>(1)
        ),
        (None, Some("alice".to_owned())),
        "{name}: after ROLLBACK: out of the transaction, still under the context"
    );
    drop(c);
    expect_clean(cluster, &pool, scope, name, Reuse::Same(pid)).await;
}

/// Scenario 5, with the API: `transaction()`, then `SET TRANSACTION …` as its first
/// statement, which PostgreSQL allows before any query of the transaction.
async fn set_transaction_case(cluster: &PgCluster, scope: ContextScope, who: Who, sql: &str) {
    let name = format!("S5 transaction() then {sql} | A={who:?} | {scope:?}");
    let name = name.as_str();
    let raw = connect_raw(&cluster.url("hr_app", "hr")).await;
    raw.batch_execute(&format!("BEGIN; {sql}; ROLLBACK"))
        .await
        .unwrap_or_else(|e| panic!("{name}: control on a fresh connection: {}", describe(&e)));
    drop(raw);
    let pool = pool(&cluster.url("hr_app", "hr"), scope, 1);
    let mut c = checkout(&pool, who, name).await;
    let pid = backend_pid(&*c, name).await;
    {
        let tx = c.transaction().await.unwrap();
        tx.batch_execute(sql).await.unwrap_or_else(|e| {
            panic!(
                "{name}: fails inside the pool's transaction, succeeds on a fresh \
                 connection: {}",
                describe(&e)
            )
        });
        tx.rollback().await.unwrap();
    }
    drop(c);
    expect_clean(cluster, &pool, scope, name, Reuse::Same(pid)).await;
}

#[tokio::test]
async fn s5_a_raw_begin_under_a_context_opens_a_real_transaction() {
    let cluster = fixture();
    let mut cases = Cases::default();
    for scope in SCOPES {
        for how in [
            RawBegin::Batch,
            RawBegin::Execute,
            RawBegin::SimpleStartTransaction,
            RawBegin::BatchWithOptions,
            RawBegin::BeginThenSetTransaction,
            RawBegin::BeginAndInsertInOneString,
        ] {
            if scope == ContextScope::Transaction
                && matches!(
                    how,
                    RawBegin::BatchWithOptions | RawBegin::BeginThenSetTransaction
                )
            {
                // The documented limit, checked by the next test.
                continue;
            }
            let name = format!("S5 {how:?} | {scope:?}");
            cases.run(name, raw_begin_case(&cluster, scope, how)).await;
        }
        for who in [Who::Alice, Who::Plain] {
            for sql in [
                "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
                "SET TRANSACTION READ WRITE",
            ] {
                if scope == ContextScope::Transaction
                    && matches!(who, Who::Alice)
                    && sql.contains("ISOLATION")
                {
                    // The documented limit, checked by the next test.
                    continue;
                }
                let name = format!("S5 transaction() then {sql} | A={who:?} | {scope:?}");
                cases
                    .run(name, set_transaction_case(&cluster, scope, who, sql))
                    .await;
            }
        }
    }
    cases.finish("s5");
}

/// The documented limit of transaction scope: the context statement is a query, so under
/// a context a transaction's characteristics set after its first statement (`BEGIN
/// ISOLATION LEVEL …` in SQL text, `SET TRANSACTION ISOLATION LEVEL …` after `BEGIN`) are
/// refused by the server with 25001, before anything of the user's ran; given to
/// `build_transaction()` they work. Either way the next checkout is clean.
#[tokio::test]
async fn s5_transaction_characteristics_under_a_context_go_through_build_transaction() {
    let cluster = fixture();
    let name = "S5 characteristics | A=alice | Transaction";
    let pool = pool(&cluster.url("hr_app", "hr"), ContextScope::Transaction, 1);
    let mut c = checkout(&pool, Who::Alice, name).await;
    let pid = backend_pid(&*c, name).await;
    for sql in [
        "BEGIN ISOLATION LEVEL REPEATABLE READ",
        "BEGIN; SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    ] {
        let err = c.batch_execute(sql).await.unwrap_err();
        assert_eq!(
            code(&err),
            Some("25001"),
            "{name}: {sql}: {}",
            describe(&err)
        );
        c.batch_execute("ROLLBACK").await.unwrap();
    }
    let tx = c
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap();
    let row = tx
        .query_one(
            "SELECT current_setting('transaction_isolation'), current_setting('ctxpool.end_user')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        ("repeatable read".to_owned(), "alice".to_owned()),
        "{name}: build_transaction"
    );
    tx.rollback().await.unwrap();
    drop(c);
    expect_clean(
        &cluster,
        &pool,
        ContextScope::Transaction,
        name,
        Reuse::Same(pid),
    )
    .await;
}

/// What A leaves behind in the wedge cases.
const DIRT: &[Step] = &[Step::Batch(
    "SET ROLE hr_manager; SELECT set_config('ctxpool.end_user', 'mallory', false); \
     SET default_transaction_read_only = on; SET default_transaction_isolation = 'read uncommitted'; \
     SET statement_timeout = 1234; SET search_path = hr; LISTEN chan; \
     SELECT pg_advisory_lock(42); CREATE TEMP TABLE wedge (x int)",
)];

/// Scenario 6a/b: after a dirty checkout, a serializable transaction and writes work.
async fn serializable_after_dirt(cluster: &PgCluster, scope: ContextScope, who: Who) {
    let name = format!("S6 serializable and writes after dirt | A={who:?} | {scope:?}");
    let name = name.as_str();
    control(cluster, DIRT, name).await;
    let pool = pool(&cluster.url("hr_app", "hr"), scope, 1);
    let a = checkout(&pool, who, name).await;
    run_steps(&*a, DIRT, name).await;
    let pid = backend_pid(&*a, name).await;
    drop(a);

    // What a fresh connection sees inside a serializable transaction.
    let raw = connect_raw(&cluster.url("hr_app", "hr")).await;
    raw.batch_execute("START TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        .await
        .unwrap();
    let want = snapshot(&raw, "fresh, serializable").await;
    drop(raw);

    // Plain B, whose first statement is the START TRANSACTION.
    let mut b = within(name, pool.get()).await.unwrap();
    let tx = within(
        name,
        b.build_transaction()
            .isolation_level(IsolationLevel::Serializable)
            .start(),
    )
    .await
    .unwrap_or_else(|e| panic!("{name}: B's serializable transaction: {}", describe(&e)));
    let level: String = tx
        .query_one("SHOW transaction_isolation", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(level, "serializable", "{name}: B's transaction_isolation");
    let got = {
        let messages = tx.simple_query(SNAPSHOT_SQL).await.unwrap();
        let text = messages
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .unwrap();
        Snapshot::parse(&text)
    };
    assert_same(name, "B inside its serializable transaction", &got, &want);
    Reuse::Same(pid).check(name, "B", got.pid);
    let n = tx
        .execute("INSERT INTO hr.notes VALUES ($1)", &[&tag(name)])
        .await
        .unwrap_or_else(|e| panic!("{name}: B's write: {}", describe(&e)));
    assert_eq!(n, 1, "{name}");
    tx.commit()
        .await
        .unwrap_or_else(|e| panic!("{name}: B's COMMIT: {}", describe(&e)));
    drop(b);
    assert_eq!(count(cluster, "hr.notes", name), "1", "{name}: B's write");

    // Dirty again, then bob: serializable, read write, and a write under the context.
    let a = checkout(&pool, who, name).await;
    run_steps(&*a, DIRT, name).await;
    drop(a);
    let mut c = within(name, pool.acquire_as(&bob())).await.unwrap();
    let tx = within(
        name,
        c.build_transaction()
            .isolation_level(IsolationLevel::Serializable)
            .read_only(false)
            .start(),
    )
    .await
    .unwrap_or_else(|e| panic!("{name}: bob's serializable transaction: {}", describe(&e)));
    let row = tx
        .query_one(
            "SELECT current_setting('transaction_isolation'), current_user::text, \
             current_setting('ctxpool.end_user', true)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, String>(1),
            row.get::<_, Option<String>>(2)
        ),
        (
            "serializable".to_owned(),
            "hr_manager".to_owned(),
            Some("bob".to_owned())
        ),
        "{name}: bob's serializable transaction"
    );
    let bob_tag = format!("{} bob", tag(name));
    tx.execute(
        "INSERT INTO hr.audit VALUES (current_setting('ctxpool.end_user'), $1)",
        &[&bob_tag],
    )
    .await
    .unwrap_or_else(|e| panic!("{name}: bob's write: {}", describe(&e)));
    tx.commit()
        .await
        .unwrap_or_else(|e| panic!("{name}: bob's COMMIT: {}", describe(&e)));
    drop(c);
    let who_wrote = cluster
        .psql(
            "hr",
            &format!("SELECT who FROM hr.audit WHERE what = '{bob_tag}'"),
        )
        .unwrap();
    assert_eq!(who_wrote.trim(), "bob", "{name}: bob's write");

    // Dirty again, then a plain write in autocommit and a transaction() write under bob.
    let a = checkout(&pool, who, name).await;
    run_steps(&*a, DIRT, name).await;
    drop(a);
    let mut c = within(name, pool.acquire_as(&bob())).await.unwrap();
    {
        let tx = c
            .transaction()
            .await
            .unwrap_or_else(|e| panic!("{name}: bob's transaction(): {}", describe(&e)));
        let tx_tag = format!("{} tx", tag(name));
        tx.execute(
            "INSERT INTO hr.audit VALUES (current_setting('ctxpool.end_user'), $1)",
            &[&tx_tag],
        )
        .await
        .unwrap_or_else(|e| panic!("{name}: bob's write in transaction(): {}", describe(&e)));
        tx.commit().await.unwrap();
    }
    drop(c);
    expect_clean(cluster, &pool, scope, name, Reuse::Same(pid)).await;
}

/// Scenario 6c: a result stream that outlives its handle.
async fn stream_outlives_handle(
    cluster: &PgCluster,
    scope: ContextScope,
    who: Who,
    read_one: bool,
    in_tx: bool,
) {
    let name = format!(
        "S6 stream outlives its handle{}{} | A={who:?} | {scope:?}",
        if read_one { ", one row read" } else { "" },
        if in_tx { ", in a transaction" } else { "" },
    );
    let name = name.as_str();
    let pool = pool(&cluster.url("hr_app", "hr"), scope, 1);
    let mut a = checkout(&pool, who, name).await;
    let pid = backend_pid(&*a, name).await;
    let sql = "SELECT g FROM generate_series(1, 100000) g";
    let mut stream = if in_tx {
        let tx = a.transaction().await.unwrap();
        let stream = tx
            .query_raw(sql, std::iter::empty::<i32>())
            .await
            .unwrap_or_else(|e| panic!("{name}: query_raw: {}", describe(&e)));
        drop(tx);
        Box::pin(stream)
    } else {
        Box::pin(
            a.query_raw(sql, std::iter::empty::<i32>())
                .await
                .unwrap_or_else(|e| panic!("{name}: query_raw: {}", describe(&e))),
        )
    };
    if read_one {
        let first = within(name, stream.next()).await;
        assert!(matches!(first, Some(Ok(_))), "{name}: the first row");
    }
    drop(a);
    expect_clean(cluster, &pool, scope, name, Reuse::Replaced(pid)).await;
    assert!(
        pool.status().size <= 1,
        "{name}: the pool grew past its size"
    );
    drop(stream);
}

#[tokio::test]
async fn s6_no_checkout_wedges_the_next() {
    let cluster = fixture();
    let mut cases = Cases::default();
    for scope in SCOPES {
        for who in [Who::Alice, Who::Plain] {
            cases
                .run(
                    format!("S6 serializable and writes after dirt | A={who:?} | {scope:?}"),
                    serializable_after_dirt(&cluster, scope, who),
                )
                .await;
            for (read_one, in_tx) in [(false, false), (true, false), (false, true)] {
                cases
                    .run(
                        format!(
                            "S6 stream outlives handle read_one={read_one} in_tx={in_tx} | \
                             A={who:?} | {scope:?}"
                        ),
                        stream_outlives_handle(&cluster, scope, who, read_one, in_tx),
                    )
                    .await;
            }
        }
    }
    cases.finish("s6");
}

/// Scenario 7: a stream that errors mid-way, read to the error.
#[derive(Clone, Copy, Debug)]
enum StreamError {
    QueryRaw,
    QueryRawInTransaction,
    CopyOut,
}

async fn stream_error_case(cluster: &PgCluster, scope: ContextScope, who: Who, how: StreamError) {
    let name = format!("S7 {how:?} errors mid-stream | A={who:?} | {scope:?}");
    let name = name.as_str();
    let pool = pool(&cluster.url("hr_app", "hr"), scope, 1);
    let mut a = checkout(&pool, who, name).await;
    let pid = backend_pid(&*a, name).await;
    let sql = "SELECT 1/(g-5000) FROM generate_series(1, 10000) g";
    let err = match how {
        StreamError::QueryRaw => match a.query_raw(sql, std::iter::empty::<i32>()).await {
            Ok(s) => within(name, s.try_collect::<Vec<_>>()).await.err(),
            Err(e) => Some(e),
        },
        StreamError::QueryRawInTransaction => {
            let tx = a.transaction().await.unwrap();
            let err = match tx.query_raw(sql, std::iter::empty::<i32>()).await {
                Ok(s) => within(name, s.try_collect::<Vec<_>>()).await.err(),
                Err(e) => Some(e),
            };
            drop(tx);
            err
        }
        StreamError::CopyOut => match a.copy_out(&format!("COPY ({sql}) TO STDOUT")).await {
            Ok(s) => within(name, s.try_collect::<Vec<_>>()).await.err(),
            Err(e) => Some(e),
        },
    };
    let err = err.unwrap_or_else(|| panic!("{name}: the stream ended without its error"));
    assert_eq!(code(&err), Some("22012"), "{name}: {}", describe(&err));
    let one: i32 = a
        .query_one("SELECT 1", &[])
        .await
        .unwrap_or_else(|e| panic!("{name}: A's next statement: {}", describe(&e)))
        .get(0);
    assert_eq!(one, 1, "{name}");
    drop(a);
    expect_clean(cluster, &pool, scope, name, Reuse::Same(pid)).await;
}

#[tokio::test]
async fn s7_a_stream_that_errors_leaves_a_clean_session() {
    let cluster = fixture();
    let mut cases = Cases::default();
    for scope in SCOPES {
        for who in [Who::Alice, Who::Plain] {
            for how in [
                StreamError::QueryRaw,
                StreamError::QueryRawInTransaction,
                StreamError::CopyOut,
            ] {
                let name = format!("S7 {how:?} | A={who:?} | {scope:?}");
                cases
                    .run(name, stream_error_case(&cluster, scope, who, how))
                    .await;
            }
        }
    }
    cases.finish("s7");
}

/// Scenario 8: B's first statement, which carries the reset, fails.
#[derive(Clone, Copy, Debug)]
enum FirstFails {
    QueryDivisionByZero,
    BatchDivisionByZero,
    BatchSyntaxError,
    QuerySyntaxError,
    QueryTypedSyntaxError,
    QueryTypedDivisionByZero,
    BeginThenErrorThenRollback,
}

async fn first_fails(b: &Client, how: FirstFails, name: &str) {
    let expect = |r: Result<(), Error>, code_: &str| {
        let err = r.expect_err("B's first statement succeeded");
        assert_eq!(code(&err), Some(code_), "{name}: {}", describe(&err));
    };
    match how {
        FirstFails::QueryDivisionByZero => {
            expect(b.query("SELECT 1/0", &[]).await.map(drop), "22012");
        }
        FirstFails::BatchDivisionByZero => expect(b.batch_execute("SELECT 1/0").await, "22012"),
        FirstFails::BatchSyntaxError => expect(b.batch_execute("SELEC 1").await, "42601"),
        FirstFails::QuerySyntaxError => expect(b.query("SELEC 1", &[]).await.map(drop), "42601"),
        FirstFails::QueryTypedSyntaxError => {
            expect(b.query_typed("SELEC 1", &[]).await.map(drop), "42601");
        }
        FirstFails::QueryTypedDivisionByZero => {
            expect(b.query_typed("SELECT 1/0", &[]).await.map(drop), "22012");
        }
        FirstFails::BeginThenErrorThenRollback => {
            expect(b.batch_execute("BEGIN; SELECT 1/0").await, "22012");
            b.batch_execute("ROLLBACK")
                .await
                .unwrap_or_else(|e| panic!("{name}: B's ROLLBACK: {}", describe(&e)));
        }
    }
}

async fn first_fails_case(
    cluster: &PgCluster,
    scope: ContextScope,
    who: Who,
    b_as_bob: bool,
    how: FirstFails,
) {
    let name = format!(
        "S8 {how:?} | A={who:?}, B={} | {scope:?}",
        if b_as_bob { "bob" } else { "plain" }
    );
    let name = name.as_str();
    control(cluster, DIRT, name).await;
    let pool = pool(&cluster.url("hr_app", "hr"), scope, 1);
    let a = checkout(&pool, who, name).await;
    run_steps(&*a, DIRT, name).await;
    let pid = backend_pid(&*a, name).await;
    drop(a);

    let b = if b_as_bob {
        within(name, pool.acquire_as(&bob())).await.unwrap()
    } else {
        within(name, pool.get()).await.unwrap()
    };
    within(name, first_fails(&b, how, name)).await;
    let want = if b_as_bob {
        fresh_as(cluster, scope, &bob()).await
    } else {
        fresh(cluster).await
    };
    let got = snapshot(&*b, &format!("{name}: B's second statement")).await;
    assert_same(
        name,
        "B's second statement, after its failed first",
        &got,
        &want,
    );
    Reuse::Same(pid).check(name, "B", got.pid);
    drop(b);
    expect_clean(cluster, &pool, scope, name, Reuse::Same(pid)).await;
}

#[tokio::test]
async fn s8_the_reset_counts_only_once_the_server_committed_it() {
    use FirstFails::*;
    let cluster = fixture();
    let mut cases = Cases::default();
    for scope in SCOPES {
        for who in [Who::Alice, Who::Plain] {
            for b_as_bob in [false, true] {
                for how in [
                    QueryDivisionByZero,
                    BatchDivisionByZero,
                    BatchSyntaxError,
                    QuerySyntaxError,
                    QueryTypedSyntaxError,
                    QueryTypedDivisionByZero,
                    BeginThenErrorThenRollback,
                ] {
                    let name = format!("S8 {how:?} | A={who:?} B-bob={b_as_bob} | {scope:?}");
                    cases
                        .run(name, first_fails_case(&cluster, scope, who, b_as_bob, how))
                        .await;
                }
            }
        }
    }
    cases.finish("s8");
}

/// What a checkout last did before its handle was dropped at once.
#[derive(Clone, Copy, Debug)]
enum Finished {
    Query,
    Prepare,
    PrepareFails,
    QueryFails,
    QueryRawToItsEnd,
    QueryRawToItsError,
    CopyOutToItsEnd,
}

/// A request whose reply the caller already read is finished: the handle released right
/// after it keeps its connection, whatever the runtime does with the connection task in
/// between. (On a multi-thread runtime the connection task runs beside the caller, so
/// each variant is repeated: a race shows in some of the runs.)
async fn finished_case(cluster: &PgCluster, scope: ContextScope, who: Who, how: Finished) {
    const RUNS: usize = 600;
    let name = format!("S9 {how:?} then release | A={who:?} | {scope:?}");
    let name = name.as_str();
    let pool = pool(&cluster.url("hr_app", "hr"), scope, 1);
    let mut discarded = 0;
    for _ in 0..RUNS {
        let a = checkout(&pool, who, name).await;
        match how {
            Finished::Query => drop(a.query("SELECT 1", &[]).await.unwrap()),
            Finished::Prepare => drop(a.prepare("SELECT 1").await.unwrap()),
            Finished::PrepareFails => drop(a.prepare("SELEC 1").await.unwrap_err()),
            Finished::QueryFails => drop(a.query("SELECT 1/0", &[]).await.unwrap_err()),
            Finished::QueryRawToItsEnd => {
                let s = a
                    .query_raw(
                        "SELECT g FROM generate_series(1, 10) g",
                        std::iter::empty::<i32>(),
                    )
                    .await
                    .unwrap();
                assert_eq!(s.try_collect::<Vec<_>>().await.unwrap().len(), 10);
            }
            Finished::QueryRawToItsError => {
                let s = a
                    .query_raw(
                        "SELECT 1/(g-5) FROM generate_series(1, 10) g",
                        std::iter::empty::<i32>(),
                    )
                    .await
                    .unwrap();
                let err = s.try_collect::<Vec<_>>().await.unwrap_err();
                assert_eq!(code(&err), Some("22012"), "{name}: {}", describe(&err));
            }
            Finished::CopyOutToItsEnd => {
                let s = a
                    .copy_out("COPY (SELECT g FROM generate_series(1, 10) g) TO STDOUT")
                    .await
                    .unwrap();
                assert_eq!(s.try_collect::<Vec<_>>().await.unwrap().len(), 10);
            }
        }
        drop(a);
        if pool.status().size == 0 {
            discarded += 1;
        }
    }
    // A stream read to its error can still, rarely, cost its connection on a
    // multi-thread runtime (1 in 600 runs seen; 12 to 75 before streams counted as ended
    // at their error): a needless reconnect, never a dirty reuse. The bound catches a
    // regression to the old rate.
    let allowed = if matches!(how, Finished::QueryRawToItsError) {
        RUNS / 100
    } else {
        0
    };
    assert!(
        discarded <= allowed,
        "{name}: the connection was discarded in {discarded} of {RUNS} runs although \
         every reply had been read"
    );
    let pid = {
        let c = pool.get().await.unwrap();
        backend_pid(&*c, name).await
    };
    expect_clean(cluster, &pool, scope, name, Reuse::Same(pid)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s9_a_finished_request_never_costs_the_connection() {
    let cluster = fixture();
    let mut cases = Cases::default();
    for scope in SCOPES {
        for who in [Who::Alice, Who::Plain] {
            for how in [
                Finished::Query,
                Finished::Prepare,
                Finished::PrepareFails,
                Finished::QueryFails,
                Finished::QueryRawToItsEnd,
                Finished::QueryRawToItsError,
                Finished::CopyOutToItsEnd,
            ] {
                let name = format!("S9 {how:?} | A={who:?} | {scope:?}");
                cases
                    .run(name, finished_case(&cluster, scope, who, how))
                    .await;
            }
        }
    }
    cases.finish("s9");
}
