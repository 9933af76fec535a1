//! The live property runner shared by `tests/postgres_property.rs` and
//! `tests/postgres_property_sabotage.rs` (included by `#[path]`, next to `mod support`).
//!
//! A case is a [`Schedule`]: tasks run concurrently on one fresh pool, each acquiring a
//! handle (plain or under an identity) and running operations on it, cancelled after any
//! number of polls or panicking. Two properties are checked:
//!
//! - **per statement**: every statement observes exactly its acquirer's context (the rows
//!   Row-Level Security lets through, `current_user`, `ctxpool.end_user`), except for what
//!   the handle's own SQL changed during its own checkout (`SET ROLE`, `set_config` of the
//!   end user: the user's doing, relaxed for the rest of that checkout only);
//! - **fresh-connection equality**: a plain handle's session, as its statements observe
//!   it, equals that of a fresh connection of the same login ([`Snapshot`]). It is checked
//!   after every task ends (a plain handle the checker acquires itself), by an operation
//!   on a handle of the task's own that has sent nothing yet ([`Op::Snapshot`]), and at the
//!   end of the case on every pooled connection at once.
//!
//! Why the equality check is sound while other tasks run: it looks only at connections
//! the checker holds itself, and the snapshot reads only session-local state (settings,
//! roles, cursors, prepared statements, listeners, temporary tables of
//! `pg_my_temp_schema()`, advisory locks of `pg_backend_pid()`, the transaction's xid and
//! whether a transaction block is open) plus rows of a table no operation writes. While
//! the checker holds a connection no other task can send anything on it, so any
//! difference from a fresh connection is state an earlier checkout left behind. A task's
//! own state while it holds its connection is never compared.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ctxpool::pool::QueueMode;
use ctxpool::postgres::{
    Config, ContextScope, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use ctxpool::{EndUserIdentity, SecurityContext};
use ctxpool_testkit::PgCluster;
use futures_util::StreamExt;
use proptest::prelude::*;
use proptest::test_runner::{TestError, TestRunner};
use serde_json::json;
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Row, RowStream};

use crate::support::poll::{DELIBERATE_PANIC, PollLimited, silence_deliberate_panics};
use crate::support::{LIST, alice, bob, context_config, hr_cluster, names};

/// What each identity is, and sees (sorted), per `examples/hr.sql`.
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
/// Fails at the 50th row; the rows before it say who they ran as.
const STREAM_ERROR: &str = "SELECT 1/(g-50), current_user::text, \
     current_setting('ctxpool.end_user', true) FROM generate_series(1,100) g";
/// More rows than socket buffers hold: unread, its ReadyForQuery stays on the server.
const LONG_STREAM: &str = "SELECT g FROM generate_series(1,100000) g";
/// Added to the HR schema for the property: a foreign key checked at COMMIT, whose parent
/// table stays empty, so that any row the login inserts fails its transaction's COMMIT.
const FIXTURE_SQL: &str = "\
    CREATE TABLE hr.deferred_parent (id int PRIMARY KEY);
    CREATE TABLE hr.deferred_child (parent int NOT NULL
      REFERENCES hr.deferred_parent DEFERRABLE INITIALLY DEFERRED);
    GRANT INSERT ON hr.deferred_child TO hr_app, hr_employee, hr_manager;";

/// Dana, a manager of org 5.
fn dana() -> SecurityContext {
    SecurityContext::builder(EndUserIdentity::named("dana", None), "db-token")
        .data_roles(["hr_manager"])
        .attributes(json!({"hr.hcm_context": {"emp_id": 1, "org_id": 5}}))
        .build()
        .unwrap()
}

#[derive(Debug, Clone)]
pub enum Op {
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
    /// [`STREAM_ERROR`] through `query_raw`, read until its error (which must come); the
    /// rows before it are checked like WHO.
    StreamError,
    /// In `transaction()`: WHO (checked), a row that violates a deferred foreign key, and
    /// `commit()`, which must fail if the row went in.
    DeferredCommit,
    /// WHO and LIST in flight at once on the handle (`join`), both checked: the second
    /// is planned before the first is answered.
    Pipelined,
    /// `ROLLBACK` as SQL text.
    UserRollback,
    /// `COMMIT` as SQL text.
    UserCommit,
    /// `BEGIN; SELECT 1` as one SQL string.
    UserBeginSelect,
    /// `transaction()`, WHO (checked) and `txid_current()` in it, then
    /// `std::mem::forget(transaction)`; the handle is dropped and the task goes on with a
    /// new checkout.
    ForgetTransaction,
    /// `query_raw` of [`LONG_STREAM`], `read` rows read, then the handle is dropped with
    /// the stream alive; `keep`: the stream lives until the end of the case, else until
    /// the end of the task. The task goes on with a new checkout.
    StreamOutlives {
        read: u8,
        keep: bool,
    },
    /// `SELECT U&"set\005fconfig"('search_path','hr',false)`.
    SetConfigUnicode,
    /// `SET/*x*/ROLE hr_manager`.
    SetRoleComment,
    /// A DO block that sets `ctxpool.end_user` to `mallory`, session-wide.
    DoEndUser,
    /// `SELECT 1 AS x INTO TEMP t_<n>`.
    TempTable(u8),
    /// `BEGIN; DECLARE c<n> CURSOR WITH HOLD FOR SELECT 1; COMMIT`.
    HoldCursor(u8),
    /// `SELECT pg_advisory_lock(<key>)`, with a key unique in the case (so that no task
    /// waits for another's lock).
    AdvisoryLock,
    /// `PREPARE p<n> AS SELECT 1`.
    Prepare(u8),
    /// `UPDATE pg_settings SET setting = 'hr' WHERE name = 'search_path'`.
    UpdatePgSettings,
    /// `SET default_transaction_read_only = on`.
    ReadOnly,
    /// Fresh-connection equality on this handle, if it is plain and has sent nothing in
    /// this checkout.
    Snapshot,
}

#[derive(Debug, Clone)]
pub struct Task {
    /// `None`: `pool.get()`; `Some(i)`: `pool.acquire_as(identity i)`.
    acquire: Option<usize>,
    ops: Vec<Op>,
    /// Cancel the task after this many polls.
    poll_limit: Option<u16>,
}

#[derive(Debug, Clone)]
pub struct Schedule {
    scope: ContextScope,
    max_size: usize,
    /// FIFO hands the checker after a task the longest-idle connection, LIFO most often
    /// the one the task just released.
    queue: QueueMode,
    tasks: Vec<Task>,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => Just(Op::Query),
        3 => (0..IDENTITIES.len()).prop_map(Op::Set),
        1 => Just(Op::Clear),
        1 => Just(Op::RawBegin),
        1 => Just(Op::Fail),
        1 => Just(Op::SetRole),
        1 => Just(Op::TerminateMine),
        1 => Just(Op::TerminateIdle),
        1 => Just(Op::Panic),
        1 => Just(Op::StreamError),
        1 => Just(Op::DeferredCommit),
        1 => Just(Op::Pipelined),
        1 => Just(Op::UserRollback),
        1 => Just(Op::UserCommit),
        1 => Just(Op::UserBeginSelect),
        1 => Just(Op::ForgetTransaction),
        1 => (0u8..3, any::<bool>()).prop_map(|(read, keep)| Op::StreamOutlives { read, keep }),
        1 => Just(Op::SetConfigUnicode),
        1 => Just(Op::SetRoleComment),
        1 => Just(Op::DoEndUser),
        1 => (0u8..2).prop_map(Op::TempTable),
        1 => (0u8..2).prop_map(Op::HoldCursor),
        1 => Just(Op::AdvisoryLock),
        1 => (0u8..2).prop_map(Op::Prepare),
        1 => Just(Op::UpdatePgSettings),
        1 => Just(Op::ReadOnly),
        1 => Just(Op::Snapshot),
    ]
}

fn task() -> impl Strategy<Value = Task> {
    (
        prop::option::of(0..IDENTITIES.len()),
        prop::collection::vec(op(), 0..8),
        prop::option::of(0u16..60),
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
        prop_oneof![Just(QueueMode::Fifo), Just(QueueMode::Lifo)],
        prop::collection::vec(task(), 1..6),
    )
        .prop_map(|(scope, max_size, queue, tasks)| Schedule {
            scope,
            max_size,
            queue,
            tasks,
        })
}

/// What a session holds, as its statements observe it: everything a checkout could leave
/// behind that a fresh connection of the login does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    current_user: String,
    session_user: String,
    role: String,
    /// `name=value` of the `ctxpool.*` and `hr.hcm_context.*` settings not NULL or `''`.
    context_settings: Vec<String>,
    search_path: String,
    statement_timeout: String,
    default_transaction_read_only: String,
    standard_conforming_strings: String,
    /// `name=value` of every setting whose source is the session (`SET`, `set_config`).
    session_settings: Vec<String>,
    /// `SELECT name FROM hr.employees ORDER BY id`.
    rows: Vec<String>,
    advisory_locks: Vec<String>,
    listening: Vec<String>,
    cursors: Vec<String>,
    sql_prepared: Vec<String>,
    temp_tables: Vec<String>,
    xid: Option<String>,
    /// `SAVEPOINT` succeeded: the statements ran inside a transaction block.
    in_transaction_block: bool,
}

/// The snapshot, one statement. Every name is qualified: a leftover `search_path` (or a
/// temporary table) must not change what it reads.
const SNAPSHOT_SQL: &str = "SELECT current_user::text, session_user::text, \
    pg_catalog.current_setting('role'), \
    (SELECT coalesce(pg_catalog.array_agg(n || '=' || v ORDER BY n), '{}') FROM \
       (SELECT n, NULLIF(pg_catalog.current_setting(n, true), '') AS v FROM pg_catalog.unnest( \
          ARRAY['ctxpool.end_user', 'ctxpool.data_roles', 'ctxpool.attributes', \
                'hr.hcm_context.emp_id', 'hr.hcm_context.org_id']) AS n) AS s \
     WHERE v IS NOT NULL), \
    pg_catalog.current_setting('search_path'), \
    pg_catalog.current_setting('statement_timeout'), \
    pg_catalog.current_setting('default_transaction_read_only'), \
    pg_catalog.current_setting('standard_conforming_strings'), \
    (SELECT coalesce(pg_catalog.array_agg(name || '=' || setting ORDER BY name), '{}') \
       FROM pg_catalog.pg_settings WHERE source = 'session'), \
    (SELECT coalesce(pg_catalog.array_agg(name ORDER BY id), '{}') FROM hr.employees), \
    (SELECT coalesce(pg_catalog.array_agg(classid || ':' || objid || ':' || objsubid || ':' \
       || mode ORDER BY classid, objid, objsubid), '{}') FROM pg_catalog.pg_locks \
       WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()), \
    (SELECT coalesce(pg_catalog.array_agg(c ORDER BY c), '{}') \
       FROM pg_catalog.pg_listening_channels() AS c), \
    (SELECT coalesce(pg_catalog.array_agg(name ORDER BY name), '{}') FROM pg_catalog.pg_cursors), \
    (SELECT coalesce(pg_catalog.array_agg(name ORDER BY name), '{}') \
       FROM pg_catalog.pg_prepared_statements WHERE from_sql), \
    (SELECT coalesce(pg_catalog.array_agg(relname::text ORDER BY relname), '{}') \
       FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema()), \
    pg_catalog.txid_current_if_assigned()::text";

/// Outside a transaction block it fails (25P01) and changes nothing.
const PROBE_SQL: &str = "SAVEPOINT ctxpool_property_probe";

impl Snapshot {
    fn from_row(row: &Row, in_transaction_block: bool) -> Self {
        Self {
            current_user: row.get(0),
            session_user: row.get(1),
            role: row.get(2),
            context_settings: row.get(3),
            search_path: row.get(4),
            statement_timeout: row.get(5),
            default_transaction_read_only: row.get(6),
            standard_conforming_strings: row.get(7),
            session_settings: row.get(8),
            rows: row.get(9),
            advisory_locks: row.get(10),
            listening: row.get(11),
            cursors: row.get(12),
            sql_prepared: row.get(13),
            temp_tables: row.get(14),
            xid: row.get(15),
            in_transaction_block,
        }
    }

    /// The fields that differ, as `field: fresh → observed`.
    fn diff(&self, observed: &Self) -> Vec<String> {
        let mut out = Vec::new();
        macro_rules! fields {
            ($($f:ident),*) => {$(
                if self.$f != observed.$f {
                    out.push(format!(
                        "{}: fresh {:?}, observed {:?}",
                        stringify!($f),
                        self.$f,
                        observed.$f
                    ));
                }
            )*};
        }
        fields!(
            current_user,
            session_user,
            role,
            context_settings,
            search_path,
            statement_timeout,
            default_transaction_read_only,
            standard_conforming_strings,
            session_settings,
            rows,
            advisory_locks,
            listening,
            cursors,
            sql_prepared,
            temp_tables,
            xid,
            in_transaction_block
        );
        out
    }
}

fn probe_result(probe: Result<(), tokio_postgres::Error>) -> Result<bool, tokio_postgres::Error> {
    match probe {
        Ok(()) => Ok(true),
        Err(e) if e.code() == Some(&SqlState::NO_ACTIVE_SQL_TRANSACTION) => Ok(false),
        Err(e) => Err(e),
    }
}

async fn pooled_snapshot(conn: &Object) -> Result<Snapshot, tokio_postgres::Error> {
    let row = conn.query_one(SNAPSHOT_SQL, &[]).await?;
    let in_block = probe_result(conn.batch_execute(PROBE_SQL).await)?;
    Ok(Snapshot::from_row(&row, in_block))
}

async fn fresh_snapshot(client: &tokio_postgres::Client) -> Snapshot {
    let row = client.query_one(SNAPSHOT_SQL, &[]).await.unwrap();
    let in_block = probe_result(client.batch_execute(PROBE_SQL).await).unwrap();
    Snapshot::from_row(&row, in_block)
}

/// What lives across cases: the cluster, the runtime, a superuser connection, and the
/// snapshot of a fresh connection of the login.
pub struct Env {
    url: String,
    rt: tokio::runtime::Runtime,
    admin: Arc<tokio_postgres::Client>,
    contexts: Arc<Vec<SecurityContext>>,
    fresh: Arc<Snapshot>,
    // Last: dropped after the runtime and the connections.
    _cluster: PgCluster,
}

impl Env {
    /// Starts a throwaway cluster with the HR schema and the property's fixture.
    pub fn start() -> Self {
        let cluster = hr_cluster();
        cluster.psql("hr", FIXTURE_SQL).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let url = cluster.url(LOGIN, "hr");
        let (admin, fresh) = rt.block_on(async {
            let (admin, connection) =
                tokio_postgres::connect(&cluster.url("postgres", "hr"), NoTls)
                    .await
                    .unwrap();
            tokio::spawn(connection);
            // The login's fresh session, never pooled; no operation changes anything its
            // snapshot reads outside a session, so one serves every case.
            let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
            let task = tokio::spawn(connection);
            let fresh = fresh_snapshot(&client).await;
            drop(client);
            let _ = task.await;
            (admin, fresh)
        });
        Self {
            url,
            rt,
            admin: Arc::new(admin),
            contexts: Arc::new(vec![alice(), bob(), dana()]),
            fresh: Arc::new(fresh),
            _cluster: cluster,
        }
    }

    /// The fresh connection's snapshot.
    #[allow(dead_code)] // used by one of the two binaries
    pub fn fresh(&self) -> &Snapshot {
        &self.fresh
    }
}

/// What one handle's checkout did so far.
struct Checkout {
    conn: Object,
    /// The context the handle carries: `None` plain, `Some(i)` identity i.
    expected: Option<usize>,
    /// The handle's SQL set the role (`SET ROLE` in any spelling).
    role_tampered: bool,
    /// The handle's SQL set `ctxpool.end_user`.
    end_user_tampered: bool,
    /// The superuser terminated this handle's backend: no statement may succeed after.
    terminated: bool,
    /// The handle sent SQL in this checkout.
    touched: bool,
    pid: Option<i32>,
}

/// One case's state, shared by its tasks.
struct World {
    pool: Pool,
    /// Some task terminates idle backends.
    kills_idle: bool,
    /// Some task terminates backends (its own, or idle ones).
    kills: bool,
    admin: Arc<tokio_postgres::Client>,
    contexts: Arc<Vec<SecurityContext>>,
    fresh: Arc<Snapshot>,
    /// Advisory lock keys, unique in the case.
    next_key: AtomicI64,
    /// Result streams that outlive their handles until the case ends.
    streams: Mutex<Vec<Pin<Box<RowStream>>>>,
    violations: Mutex<Vec<String>>,
}

/// What a step leaves the task to do.
#[derive(PartialEq, Eq)]
enum Next {
    Continue,
    /// Drop the handle and acquire a new one.
    Release,
}

impl World {
    fn violation(&self, what: String) {
        self.violations.lock().unwrap().push(what);
    }

    /// Whether a statement error is the doing of a backend terminated by the superuser
    /// (possibly while idle in the pool, before its client noticed).
    fn killed(&self, conn: &Object, e: &tokio_postgres::Error) -> bool {
        self.kills
            && (conn.is_closed()
                || e.code().is_none()
                || e.code() == Some(&SqlState::ADMIN_SHUTDOWN))
    }

    async fn acquire(&self, at: &str, acquire: Option<usize>) -> Option<Checkout> {
        let acquired = match acquire {
            None => self.pool.get().await,
            Some(i) => self.pool.acquire_as(&self.contexts[i]).await,
        };
        let conn = match acquired {
            Ok(conn) => conn,
            // Terminating idle backends may hit one being opened (it idles between the
            // startup and the preparation of the context statements).
            Err(PoolError::Backend(_)) if self.kills_idle => return None,
            Err(e) => {
                self.violation(format!("{at}: acquire failed: {e}"));
                return None;
            }
        };
        let carried = conn
            .end_user_security_context()
            .and_then(|c| c.identity().name().map(str::to_owned));
        if carried.as_deref() != acquire.map(|i| IDENTITIES[i].name) {
            self.violation(format!(
                "{at}: handle carries {carried:?}, expected {}",
                who(acquire)
            ));
        }
        Some(Checkout {
            conn,
            expected: acquire,
            role_tampered: false,
            end_user_tampered: false,
            terminated: false,
            touched: false,
            pid: None,
        })
    }

    /// Checks what one statement observed of `current_user` and `ctxpool.end_user`.
    fn check_who(&self, at: &str, co: &Checkout, user: &str, end_user: Option<String>) {
        let end_user = end_user.filter(|u| !u.is_empty());
        let want_role = co.expected.map_or(LOGIN, |i| IDENTITIES[i].role);
        let want_user = co.expected.map(|i| IDENTITIES[i].name);
        // `SET ROLE` in user SQL may hold for the rest of the checkout (inside the user's
        // transaction, or session-wide in session scope): current_user is the user's doing.
        if !co.role_tampered && user != want_role {
            self.violation(format!(
                "{at}: expected current_user {want_role} for {}, observed {user}",
                who(co.expected)
            ));
        }
        if !co.end_user_tampered && end_user.as_deref() != want_user {
            self.violation(format!(
                "{at}: expected end_user {want_user:?}, observed {end_user:?}"
            ));
        }
    }

    fn check_who_row(&self, at: &str, co: &mut Checkout, row: &Row) {
        let user: String = row.get(0);
        co.pid = Some(row.get(2));
        self.check_who(at, co, &user, row.get(1));
    }

    /// Checks the rows LIST observed.
    fn check_list(&self, at: &str, co: &Checkout, rows: &[Row]) {
        let got = names(rows);
        let want = co.expected.map_or(&[][..], |i| IDENTITIES[i].rows);
        // After `SET ROLE` in user SQL, rows are the user's doing; a plain handle has no
        // settings, so no policy lets a row through whatever the role.
        let rows_hold = !co.role_tampered || co.expected.is_none();
        if rows_hold && got != want {
            self.violation(format!(
                "{at}: expected rows {want:?} for {}, observed {got:?}",
                who(co.expected)
            ));
        }
    }

    /// Runs LIST and WHO on the handle and checks what they observe. Returns whether any
    /// statement succeeded; records the backend's pid.
    async fn query(&self, at: &str, co: &mut Checkout) -> bool {
        let mut ran = false;
        let listed = match co.conn.prepare_cached(LIST).await {
            Ok(statement) => co.conn.query(&statement, &[]).await,
            Err(e) => Err(e),
        };
        if let Ok(rows) = &listed {
            ran = true;
            self.check_list(at, co, rows);
        }
        if let Ok(row) = co.conn.query_one(WHO, &[]).await {
            ran = true;
            self.check_who_row(at, co, &row);
        }
        ran
    }

    /// Fresh-connection equality on a plain handle this code alone holds.
    async fn check_snapshot(&self, at: &str, conn: &Object) -> Result<(), tokio_postgres::Error> {
        if let Some(ctx) = conn.end_user_security_context() {
            self.violation(format!(
                "{at}: a plain checkout carries a context: {:?}",
                ctx.identity().name()
            ));
            return Ok(());
        }
        let observed = pooled_snapshot(conn).await?;
        let diff = self.fresh.diff(&observed);
        if !diff.is_empty() {
            self.violation(format!(
                "{at}: a plain handle's session is not a fresh one's: {diff:#?}"
            ));
        }
        Ok(())
    }

    /// After a task: a plain handle of the checker's own must hold a fresh session.
    async fn check_after(&self, at: &str) {
        let conn = match self.pool.get().await {
            Ok(conn) => conn,
            Err(PoolError::Backend(_)) if self.kills_idle => return,
            Err(e) => return self.violation(format!("{at}: acquire failed: {e}")),
        };
        if let Err(e) = self.check_snapshot(at, &conn).await {
            if self.killed(&conn, &e) {
                // Out of the pool for good: its backend is gone.
                drop(Object::take(conn));
            } else {
                self.violation(format!("{at}: the snapshot failed: {}", describe(&e)));
            }
        }
    }

    /// Waits until the backend `pid` has exited, asking the server again after each
    /// answer: no timer (`pg_terminate_backend(pid, timeout)` would wait, but it polls
    /// every 100 ms).
    async fn wait_gone(&self, at: &str, pid: i32) {
        const ASKS: u32 = 100_000;
        for _ in 0..ASKS {
            match self
                .admin
                .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
                .await
            {
                Ok(None) => return,
                Ok(Some(_)) => tokio::task::yield_now().await,
                Err(e) => return self.violation(format!("{at}: superuser statement failed: {e}")),
            }
        }
        self.violation(format!(
            "{at}: backend {pid} still there {ASKS} questions after its termination"
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

    /// Runs one operation; returns whether a statement succeeded, and what next.
    async fn step(
        &self,
        at: &str,
        co: &mut Checkout,
        op: Op,
        streams: &mut Vec<Pin<Box<RowStream>>>,
    ) -> (bool, Next) {
        if !matches!(op, Op::Set(_) | Op::Clear | Op::Snapshot) {
            co.touched = true;
        }
        let ran = match op {
            Op::Query => self.query(at, co).await,
            Op::Set(i) => {
                co.conn
                    .set_end_user_security_context(&self.contexts[i])
                    .unwrap();
                co.expected = Some(i);
                false
            }
            Op::Clear => {
                co.conn.clear_end_user_security_context();
                co.expected = None;
                false
            }
            Op::RawBegin => co.conn.batch_execute("BEGIN").await.is_ok(),
            Op::Fail => {
                let ok = co.conn.query("SELECT 1/0", &[]).await.is_ok();
                if ok {
                    self.violation(format!("{at}: 1/0 succeeded"));
                }
                ok
            }
            Op::SetRole => {
                co.role_tampered = true;
                co.conn.batch_execute("SET ROLE hr_manager").await.is_ok()
            }
            Op::TerminateMine => {
                let mut ran = false;
                if co.pid.is_none() {
                    if let Ok(row) = co.conn.query_one("SELECT pg_backend_pid()", &[]).await {
                        ran = true;
                        co.pid = Some(row.get(0));
                    }
                }
                if co.terminated && ran {
                    self.violation(format!("{at}: a statement ran on a terminated backend"));
                }
                if let Some(p) = co.pid {
                    if self
                        .terminate("SELECT pg_terminate_backend($1)", &[&p])
                        .await
                    {
                        co.terminated = true;
                        self.wait_gone(at, p).await;
                    }
                }
                false
            }
            Op::TerminateIdle => {
                self.terminate(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE usename = 'hr_app' AND state = 'idle'",
                    &[],
                )
                .await;
                false
            }
            Op::Panic => std::panic::panic_any(DELIBERATE_PANIC),
            Op::StreamError => match co
                .conn
                .query_raw(STREAM_ERROR, std::iter::empty::<i32>())
                .await
            {
                Ok(stream) => {
                    let mut stream = std::pin::pin!(stream);
                    let mut failed = false;
                    let mut rows = 0;
                    while let Some(item) = stream.next().await {
                        match item {
                            Ok(row) => {
                                rows += 1;
                                let user: String = row.get(1);
                                self.check_who(at, co, &user, row.get(2));
                            }
                            Err(_) => {
                                failed = true;
                                break;
                            }
                        }
                    }
                    if !failed {
                        self.violation(format!(
                            "{at}: 1/(g-50) streamed {rows} rows to its end without an error"
                        ));
                    }
                    true
                }
                Err(_) => false,
            },
            Op::DeferredCommit => {
                let mut who_row = None;
                let mut ran = false;
                if let Ok(tx) = co.conn.transaction().await {
                    ran = true;
                    who_row = tx.query_one(WHO, &[]).await.ok();
                    let inserted = tx
                        .execute("INSERT INTO hr.deferred_child VALUES (-1)", &[])
                        .await
                        .is_ok();
                    let committed = tx.commit().await.is_ok();
                    if inserted && committed {
                        self.violation(format!(
                            "{at}: a COMMIT with a deferred foreign key violation succeeded"
                        ));
                    }
                }
                if let Some(row) = &who_row {
                    self.check_who_row(at, co, row);
                }
                ran
            }
            Op::Pipelined => {
                let (who_row, listed) = futures_util::future::join(
                    co.conn.query_one(WHO, &[]),
                    co.conn.query(LIST, &[]),
                )
                .await;
                if let Ok(rows) = &listed {
                    self.check_list(at, co, rows);
                }
                if let Ok(row) = &who_row {
                    self.check_who_row(at, co, row);
                }
                listed.is_ok() || who_row.is_ok()
            }
            Op::UserRollback => co.conn.batch_execute("ROLLBACK").await.is_ok(),
            Op::UserCommit => co.conn.batch_execute("COMMIT").await.is_ok(),
            Op::UserBeginSelect => co.conn.batch_execute("BEGIN; SELECT 1").await.is_ok(),
            Op::ForgetTransaction => {
                let mut ran = false;
                let mut who_row = None;
                if let Ok(tx) = co.conn.transaction().await {
                    ran = true;
                    who_row = tx.query_one(WHO, &[]).await.ok();
                    let _ = tx.query_one("SELECT txid_current()", &[]).await;
                    std::mem::forget(tx);
                }
                if let Some(row) = &who_row {
                    self.check_who_row(at, co, row);
                }
                return (ran, Next::Release);
            }
            Op::StreamOutlives { read, keep } => {
                let mut ran = false;
                if let Ok(stream) = co
                    .conn
                    .query_raw(LONG_STREAM, std::iter::empty::<i32>())
                    .await
                {
                    ran = true;
                    let mut stream = Box::pin(stream);
                    for _ in 0..read {
                        if stream.next().await.is_none() {
                            break;
                        }
                    }
                    if keep {
                        self.streams.lock().unwrap().push(stream);
                    } else {
                        streams.push(stream);
                    }
                }
                return (ran, Next::Release);
            }
            Op::SetConfigUnicode => co
                .conn
                .batch_execute(r#"SELECT U&"set\005fconfig"('search_path','hr',false)"#)
                .await
                .is_ok(),
            Op::SetRoleComment => {
                co.role_tampered = true;
                co.conn
                    .batch_execute("SET/*x*/ROLE hr_manager")
                    .await
                    .is_ok()
            }
            Op::DoEndUser => {
                co.end_user_tampered = true;
                co.conn.batch_execute(
                    "DO $$ BEGIN PERFORM set_config('ctxpool.end_user','mallory',false); END $$",
                )
                .await
                .is_ok()
            }
            Op::TempTable(n) => co
                .conn
                .execute(&format!("SELECT 1 AS x INTO TEMP t_{n}"), &[])
                .await
                .is_ok(),
            Op::HoldCursor(n) => co
                .conn
                .batch_execute(&format!(
                    "BEGIN; DECLARE c{n} CURSOR WITH HOLD FOR SELECT 1; COMMIT"
                ))
                .await
                .is_ok(),
            Op::AdvisoryLock => {
                let key = self.next_key.fetch_add(1, Ordering::Relaxed);
                co.conn
                    .query_one(&format!("SELECT pg_advisory_lock({key})"), &[])
                    .await
                    .is_ok()
            }
            Op::Prepare(n) => co
                .conn
                .batch_execute(&format!("PREPARE p{n} AS SELECT 1"))
                .await
                .is_ok(),
            Op::UpdatePgSettings => co
                .conn
                .execute(
                    "UPDATE pg_settings SET setting = 'hr' WHERE name = 'search_path'",
                    &[],
                )
                .await
                .is_ok(),
            Op::ReadOnly => co
                .conn
                .batch_execute("SET default_transaction_read_only = on")
                .await
                .is_ok(),
            Op::Snapshot => {
                if co.touched || co.expected.is_some() {
                    return (false, Next::Continue);
                }
                match self.check_snapshot(at, &co.conn).await {
                    Ok(()) => true,
                    Err(e) if self.killed(&co.conn, &e) => false,
                    Err(e) => {
                        self.violation(format!("{at}: the snapshot failed: {}", describe(&e)));
                        false
                    }
                }
            }
        };
        (ran, Next::Continue)
    }
}

/// A statement error with the server's message and SQLSTATE (tokio-postgres's Display
/// says only "db error").
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => e.to_string(),
    }
}

fn who(expected: Option<usize>) -> &'static str {
    expected.map_or("a plain handle", |i| IDENTITIES[i].name)
}

async fn run_task(world: Arc<World>, index: usize, task: Task) {
    // Streams that outlive their handles until the task ends (or is cancelled).
    let mut streams = Vec::new();
    let mut checkout = 1;
    let Some(mut co) = world
        .acquire(&format!("task {index} checkout 1"), task.acquire)
        .await
    else {
        return;
    };
    for (step, op) in task.ops.into_iter().enumerate() {
        let at = format!("task {index} checkout {checkout} step {} {op:?}", step + 1);
        let (ran, next) = world.step(&at, &mut co, op, &mut streams).await;
        if co.terminated && ran {
            world.violation(format!("{at}: a statement ran on a terminated backend"));
        }
        if next == Next::Release {
            drop(co);
            checkout += 1;
            let at = format!("task {index} checkout {checkout}");
            co = match world.acquire(&at, task.acquire).await {
                Some(co) => co,
                None => return,
            };
        }
    }
}

/// Builds the case's pool.
fn pool(url: &str, schedule: &Schedule) -> Pool {
    let mut cfg = Config::new();
    cfg.url = Some(url.to_owned());
    cfg.manager = Some(ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    });
    let mut pool = ctxpool::postgres::PoolConfig::new(schedule.max_size);
    pool.queue_mode = schedule.queue;
    cfg.pool = Some(pool);
    cfg.context = Some(context_config(schedule.scope));
    cfg.create_pool(Some(Runtime::Tokio1), NoTls).unwrap()
}

async fn run_case(env: &Env, schedule: &Schedule) -> Result<(), TestCaseError> {
    let pool = pool(&env.url, schedule);
    let any_op = |f: fn(&Op) -> bool| schedule.tasks.iter().any(|t| t.ops.iter().any(f));
    let kills_idle = any_op(|op| matches!(op, Op::TerminateIdle));
    let world = Arc::new(World {
        pool: pool.clone(),
        kills_idle,
        kills: kills_idle || any_op(|op| matches!(op, Op::TerminateMine)),
        admin: env.admin.clone(),
        contexts: env.contexts.clone(),
        fresh: env.fresh.clone(),
        next_key: AtomicI64::new(1),
        streams: Mutex::new(Vec::new()),
        violations: Mutex::new(Vec::new()),
    });
    let handles: Vec<_> = schedule
        .tasks
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, task)| {
            let world = world.clone();
            tokio::spawn(async move {
                let limit = task.poll_limit;
                let fut = run_task(world.clone(), i, task);
                let inner = tokio::spawn(async move {
                    match limit {
                        Some(left) => {
                            PollLimited::new(fut, left).await;
                        }
                        None => fut.await,
                    }
                });
                // A deliberate panic surfaces here as a JoinError; the pool must not care.
                let _ = inner.await;
                // Every handle of the task is released (dropped with the task's future).
                world.check_after(&format!("after task {i}")).await;
            })
        })
        .collect();
    for handle in handles {
        handle.await.unwrap();
    }

    let status = pool.status();
    prop_assert_eq!(
        status.available,
        status.size,
        "connections still checked out: {:?}",
        status
    );
    prop_assert!(status.size <= schedule.max_size, "{:?}", status);

    // Every idle connection, all checked out at once, must hold a fresh session. One
    // killed while idle may be handed out before its client noticed: its statement fails,
    // it is taken out of the pool, and a new checkout replaces it.
    let mut all = Vec::new();
    for _ in 0..status.size {
        all.push(Some(pool.get().await.unwrap()));
    }
    for (n, slot) in all.iter_mut().enumerate() {
        let at = format!("after the tasks, connection {n}");
        let mut retried: Option<String> = None;
        loop {
            let conn = slot.as_ref().unwrap();
            match world.check_snapshot(&at, conn).await {
                Ok(()) => break,
                Err(e) if retried.is_none() && world.killed(conn, &e) => {
                    retried = Some(describe(&e));
                    drop(Object::take(slot.take().unwrap()));
                    *slot = Some(pool.get().await.unwrap());
                }
                Err(e) => {
                    world.violation(format!(
                        "{at}: the snapshot failed: {} (an earlier one: {retried:?})",
                        describe(&e)
                    ));
                    break;
                }
            }
        }
    }
    drop(all);
    drop(pool);
    let streams = std::mem::take(&mut *world.streams.lock().unwrap());
    drop(streams);
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

/// What a run of the property found.
pub struct Outcome {
    /// `Err(TestError::Fail(why, shrunk schedule))` when a case failed.
    pub result: Result<(), TestError<Schedule>>,
    /// Schedules run, shrinking included.
    pub ran: u32,
    /// The number of the schedule that failed first (1-based), if one did.
    pub first_failure: Option<u32>,
    pub elapsed: Duration,
}

/// Runs the property for `config.cases` schedules and shrinks the first failure. Whether
/// a schedule fails can depend on timing (which connection a checkout gets), so once a
/// failure was seen, each simplification is tried up to `tries` times before it counts as
/// passing: shrinking then rarely stops at a schedule larger than it needs.
pub fn run(env: &Env, config: ProptestConfig, tries: u32) -> Outcome {
    let started = Instant::now();
    let ran = AtomicU32::new(0);
    let failed = AtomicBool::new(false);
    let first_failure = AtomicU32::new(0);
    let mut runner = TestRunner::new(config);
    let result = runner.run(&schedule(), |schedule| {
        let tries = if failed.load(Ordering::Relaxed) {
            tries.max(1)
        } else {
            1
        };
        let mut outcome = Ok(());
        for _ in 0..tries {
            ran.fetch_add(1, Ordering::Relaxed);
            outcome = run_schedule(env, &schedule);
            if outcome.is_err() {
                if !failed.swap(true, Ordering::Relaxed) {
                    first_failure.store(ran.load(Ordering::Relaxed), Ordering::Relaxed);
                }
                break;
            }
        }
        outcome
    });
    Outcome {
        result,
        ran: ran.into_inner(),
        first_failure: Some(first_failure.into_inner()).filter(|&n| n != 0),
        elapsed: started.elapsed(),
    }
}
