//! The pooled client: every statement carries the handle's context.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures_util::future::{join, join3, join4, try_join_all};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{BorrowToSql, ToSql, Type};
use tokio_postgres::{
    Client, CopyOutStream, Error, IsolationLevel, Row, RowStream, SimpleQueryMessage, Statement,
};

use crate::backend::{Connection, DiscardReason};
use crate::context::SecurityContext;

use super::mapping::{
    self, ContextConfig, ContextScope, MAX_FLAT, Mapped, MappingError, SYNC_ANY_SQL, SYNC_ANY_TYPES,
};
use super::sql_text::{self, Effects, TxControl};
use super::statement_cache::StatementCache;
use super::transaction::{Transaction, TransactionBuilder};

/// Opens the transaction that carries a context.
const BEGIN: &str = "BEGIN";
/// Opens it after resetting everything a previous checkout may have left: an open or
/// aborted transaction first, then settings, role, cursors, listeners, advisory locks,
/// temporary tables. One simple-query message; every reset runs inside the new transaction,
/// so a reset that fails aborts it and nothing after it runs (fail closed).
const RESET_BEGIN: &str = "ROLLBACK; BEGIN; RESET ALL; RESET ROLE; CLOSE ALL; UNLISTEN *; \
     SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES";
/// In session scope, switching contexts within a checkout: drop the previous one first.
const SWITCH_BEGIN: &str = "BEGIN; RESET ALL; RESET ROLE";
const COMMIT: &str = "COMMIT";

static LOCAL: bool = true;
static SESSION: bool = false;

/// A statement given as SQL text or prepared: what `query` and friends accept, as in
/// tokio-postgres (`&str`, `String` or `Statement`).
pub trait ToStatement: private::Sealed + Sync {
    #[doc(hidden)]
    fn to_statement(&self) -> StatementRef<'_>;
}

/// The two shapes of [`ToStatement`].
#[doc(hidden)]
#[derive(Debug)]
pub enum StatementRef<'a> {
    Prepared(&'a Statement),
    Sql(&'a str),
}

mod private {
    pub trait Sealed {}
    impl Sealed for str {}
    impl Sealed for String {}
    impl Sealed for tokio_postgres::Statement {}
}

impl ToStatement for str {
    fn to_statement(&self) -> StatementRef<'_> {
        StatementRef::Sql(self)
    }
}
impl ToStatement for String {
    fn to_statement(&self) -> StatementRef<'_> {
        StatementRef::Sql(self)
    }
}
impl ToStatement for Statement {
    fn to_statement(&self) -> StatementRef<'_> {
        StatementRef::Prepared(self)
    }
}

/// What the client knows of the server session. Behind a mutex: statements take `&self`.
#[derive(Default)]
pub(crate) struct SessionState {
    /// Session scope: the context the session carries.
    applied: Option<Arc<Mapped>>,
    /// The session may hold state we did not put there: reset with the next statement.
    needs_reset: bool,
    /// This checkout ran SQL that may have changed session state.
    tainted: bool,
    /// This checkout's SQL text may have left a transaction open.
    maybe_in_transaction: bool,
    /// The connection lost its prepared context statements (a `DEALLOCATE ALL` or
    /// `DISCARD ALL` in user SQL): it can no longer carry a context and is discarded.
    broken: bool,
    /// This connection prepared text that may change session state. tokio-postgres gives
    /// statements no public identity, so from then on every prepared statement it runs is
    /// taken to be that one.
    unsafe_prepared: bool,
}

/// Whether a wrapped operation waits for its COMMIT.
#[derive(Clone, Copy)]
enum Commit {
    /// Wait: the operation's result is complete before COMMIT is answered.
    Await,
    /// Send it in the same flight, do not wait: the result is a stream that COMMIT's
    /// answer would queue behind (tokio-postgres buffers one message per request).
    Send,
}

/// Polls `main` to completion; polls `then` once, right after `main`'s first poll, so that
/// its request goes out after `main`'s, in the same flight, and is never awaited.
async fn send_with<F: Future, G: Future>(main: F, then: G) -> F::Output {
    let mut main = std::pin::pin!(main);
    let mut then = std::pin::pin!(then);
    let mut sent = false;
    std::future::poll_fn(|cx| {
        let out = main.as_mut().poll(cx);
        if !sent {
            sent = true;
            // Its answer is read and dropped by the connection task.
            let _ = then.as_mut().poll(cx);
        }
        out
    })
    .await
}

/// How one statement is sent.
enum Plan {
    /// As it is.
    Direct,
    /// Pipelined in one flight: `prefix` (BEGIN, with resets), the context statement,
    /// the user's statement, COMMIT.
    Wrapped {
        prefix: &'static str,
        sync: Option<(Arc<Mapped>, &'static bool)>,
        resets: bool,
    },
}

/// A PostgreSQL connection whose statements run under the handle's security context.
///
/// It does not dereference to [`tokio_postgres::Client`]: every method that runs SQL is
/// here, and each carries the context, so no call path can bypass it. The methods mirror
/// tokio-postgres's; see [`super`] for the protocol each context scope uses.
pub struct ClientWrapper {
    client: Client,
    conn_task: JoinHandle<()>,
    /// Statements prepared by [`prepare_cached`](Self::prepare_cached).
    pub statement_cache: Arc<StatementCache>,
    config: Arc<ContextConfig>,
    /// The context statements, when [`ContextConfig::prepared_statements`] is on.
    sync_statements: Option<SyncStatements>,
    desired: Option<Arc<Mapped>>,
    state: Mutex<SessionState>,
    /// Operations started and not finished. A future dropped mid-flight leaves it above
    /// zero, and the connection is discarded at release.
    in_flight: AtomicUsize,
}

impl fmt::Debug for ClientWrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientWrapper")
            .field("context", &self.desired)
            .field("scope", &self.config.scope)
            .field("closed", &self.client.is_closed())
            .finish_non_exhaustive()
    }
}

impl ClientWrapper {
    pub(crate) fn new(
        client: Client,
        conn_task: JoinHandle<()>,
        config: Arc<ContextConfig>,
        sync_statements: Option<SyncStatements>,
    ) -> Self {
        Self {
            client,
            conn_task,
            statement_cache: Arc::new(StatementCache::default()),
            config,
            sync_statements,
            desired: None,
            state: Mutex::new(SessionState::default()),
            in_flight: AtomicUsize::new(0),
        }
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Decides how the next statement is sent, and records what the server will hold if
    /// it succeeds.
    fn plan(&self) -> Plan {
        let mut st = self.state();
        match self.config.scope {
            ContextScope::Transaction => {
                let resets = st.needs_reset;
                st.needs_reset = false;
                match (&self.desired, resets) {
                    (None, false) => Plan::Direct,
                    (desired, _) => Plan::Wrapped {
                        prefix: if resets { RESET_BEGIN } else { BEGIN },
                        sync: desired.clone().map(|m| (m, &LOCAL)),
                        resets,
                    },
                }
            }
            ContextScope::Session => {
                let same = match (&st.applied, &self.desired) {
                    (None, None) => true,
                    (Some(a), Some(d)) => Arc::ptr_eq(a, d) || a.context == d.context,
                    _ => false,
                };
                if same && !st.needs_reset {
                    return Plan::Direct;
                }
                let prefix = if st.needs_reset {
                    RESET_BEGIN
                } else if st.applied.is_some() {
                    SWITCH_BEGIN
                } else {
                    BEGIN
                };
                st.needs_reset = false;
                st.applied = self.desired.clone();
                Plan::Wrapped {
                    prefix,
                    sync: self.desired.clone().map(|m| (m, &SESSION)),
                    resets: true,
                }
            }
        }
    }

    /// Records the outcome of a planned statement.
    fn settle(&self, plan: &Plan, error: Option<&Error>, effects: Effects) {
        if matches!(plan, Plan::Direct) && effects == Effects::default() {
            // The hot path of a plain handle: nothing to record.
            return;
        }
        let ok = error.is_none();
        let mut st = self.state();
        if error.and_then(Error::code) == Some(&SqlState::INVALID_SQL_STATEMENT_NAME) {
            st.broken = true;
        }
        if let (Plan::Wrapped { resets, .. }, false) = (plan, ok) {
            // The pipeline's transaction rolled back, and with it any reset or session
            // context it carried: the session is as before, or unknown.
            if *resets {
                st.needs_reset = true;
            }
            if self.config.scope == ContextScope::Session {
                st.applied = None;
                st.needs_reset = true;
            }
        }
        st.tainted |= effects.changes_session;
        match effects.tx {
            Some(TxControl::Begins) => st.maybe_in_transaction = true,
            Some(TxControl::Ends) => st.maybe_in_transaction = false,
            None => {}
        }
    }

    /// Runs one user operation under the plan, awaiting the whole pipeline.
    async fn run<'s, R, Fut>(
        &'s self,
        effects: Effects,
        op: impl FnOnce(&'s Client) -> Fut,
    ) -> Result<R, Error>
    where
        Fut: Future<Output = Result<R, Error>>,
    {
        self.run_as(effects, Commit::Await, op).await
    }

    /// Runs one user operation under the plan. `op` must send its request on its first
    /// poll (tokio-postgres does for prepared statements and simple queries), so that the
    /// pipeline goes out in order, in one flight.
    async fn run_as<'s, R, Fut>(
        &'s self,
        effects: Effects,
        commit: Commit,
        op: impl FnOnce(&'s Client) -> Fut,
    ) -> Result<R, Error>
    where
        Fut: Future<Output = Result<R, Error>>,
    {
        let plan = self.plan();
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let result = match &plan {
            Plan::Direct => op(&self.client).await,
            Plan::Wrapped { prefix, sync, .. } => {
                let client = &self.client;
                let begin = client.batch_execute(prefix);
                let context = sync_context(client, self.sync_statements.as_ref(), sync.as_ref());
                let user = op(client);
                let end = client.batch_execute(COMMIT);
                match commit {
                    Commit::Await => {
                        let (b, c, u, e) = join4(begin, context, user, end).await;
                        // The first error is the cause: a failed context statement aborts
                        // the transaction, so the user's statement never ran; the COMMIT
                        // of an aborted transaction reports success while rolling back.
                        b.and(c).and(u).and_then(|r| e.map(|()| r))
                    }
                    Commit::Send => {
                        let (b, c, u) = send_with(join3(begin, context, user), end).await;
                        b.and(c).and(u)
                    }
                }
            }
        };
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.settle(&plan, result.as_ref().err(), effects);
        result
    }

    /// The statement and what it may do; text is prepared first (as tokio-postgres does)
    /// so that only prepared statements travel in a pipeline.
    pub(crate) async fn resolve<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
    ) -> Result<(Statement, Effects), Error> {
        match statement.to_statement() {
            StatementRef::Prepared(s) => Ok((s.clone(), self.effects_of(s))),
            StatementRef::Sql(sql) => {
                let s = self.prepare(sql).await?;
                Ok((s, sql_text::effects(sql)))
            }
        }
    }

    /// What running a prepared statement may do.
    pub(crate) fn effects_of(&self, _statement: &Statement) -> Effects {
        Effects {
            changes_session: self.state().unsafe_prepared,
            tx: None,
        }
    }

    /// Notes what preparing `sql` tells about the statements this connection may run.
    pub(crate) fn record(&self, sql: &str) {
        self.note_prepared(sql_text::effects(sql));
    }

    fn note_prepared(&self, effects: Effects) {
        if effects != Effects::default() {
            let mut st = self.state();
            st.unsafe_prepared = true;
            st.tainted = true;
        }
    }

    /// Like [`Client::prepare`].
    pub async fn prepare(&self, query: &str) -> Result<Statement, Error> {
        self.prepare_typed(query, &[]).await
    }

    /// Like [`Client::prepare_typed`]. Preparing runs no user SQL, so it needs no context.
    pub async fn prepare_typed(&self, query: &str, types: &[Type]) -> Result<Statement, Error> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let statement = self.client.prepare_typed(query, types).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let statement = statement?;
        self.record(query);
        Ok(statement)
    }

    /// Like [`prepare`](Self::prepare), but reuses a statement from the
    /// [`StatementCache`] when it can.
    pub async fn prepare_cached(&self, query: &str) -> Result<Statement, Error> {
        self.prepare_typed_cached(query, &[]).await
    }

    /// Like [`prepare_typed`](Self::prepare_typed), but reuses a statement from the
    /// [`StatementCache`] when it can.
    pub async fn prepare_typed_cached(
        &self,
        query: &str,
        types: &[Type],
    ) -> Result<Statement, Error> {
        if let Some((statement, effects)) = self.statement_cache.get(query, types) {
            self.note_prepared(effects);
            return Ok(statement);
        }
        let statement = self.prepare_typed(query, types).await?;
        let effects = sql_text::effects(query);
        self.statement_cache
            .insert(query, types, statement.clone(), effects);
        Ok(statement)
    }

    statement_methods!();

    /// Like [`Client::query_raw`]. With a context in transaction scope, the COMMIT that
    /// ends the context's transaction travels in the same flight and is not awaited: the
    /// rows stream as they arrive.
    pub async fn query_raw<T, P, I>(&self, statement: &T, params: I) -> Result<RowStream, Error>
    where
        T: ?Sized + ToStatement,
        P: BorrowToSql,
        I: IntoIterator<Item = P>,
        I::IntoIter: ExactSizeIterator,
    {
        let (statement, effects) = self.resolve(statement).await?;
        self.run_as(effects, Commit::Send, |c| c.query_raw(&statement, params))
            .await
    }

    /// Like [`Client::copy_out`]: the COPY runs inside the context's transaction.
    pub async fn copy_out<T>(&self, statement: &T) -> Result<CopyOutStream, Error>
    where
        T: ?Sized + ToStatement,
    {
        let (statement, effects) = self.resolve(statement).await?;
        self.run_as(effects, Commit::Send, |c| c.copy_out(&statement))
            .await
    }

    /// Starts a transaction, with the context applied in the same flight as `BEGIN`. Every
    /// statement of the transaction runs under the context. COPY FROM STDIN
    /// ([`Transaction::copy_in`]) is available here.
    pub async fn transaction(&mut self) -> Result<Transaction<'_>, Error> {
        self.begin(BEGIN).await
    }

    /// Like [`Client::build_transaction`].
    pub fn build_transaction(&mut self) -> TransactionBuilder<'_> {
        TransactionBuilder::new(self)
    }

    /// Opens a transaction with `begin` (a `BEGIN` or `START TRANSACTION …` statement).
    pub(crate) async fn begin(&mut self, begin: &str) -> Result<Transaction<'_>, Error> {
        let plan = self.plan();
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let result = match &plan {
            Plan::Direct => self.client.batch_execute(begin).await,
            Plan::Wrapped { prefix, sync, .. } => {
                // The prefix already opened the transaction; `begin`'s options follow as
                // SET TRANSACTION, which must come before any query.
                let options = begin_options(begin);
                let client = &self.client;
                let open = async {
                    client.batch_execute(prefix).await?;
                    Ok(())
                };
                let opts = async {
                    match &options {
                        Some(sql) => client.batch_execute(sql).await,
                        None => Ok(()),
                    }
                };
                let ((o, p), c) = join(
                    join(open, opts),
                    sync_context(client, self.sync_statements.as_ref(), sync.as_ref()),
                )
                .await;
                o.and(p).and(c)
            }
        };
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if result.is_err() {
            // The transaction may be open but aborted: end it before anything else runs.
            self.client.__private_api_rollback(None);
        }
        self.settle(&plan, result.as_ref().err(), Effects::default());
        result.map(|()| Transaction::new(self))
    }

    /// Like [`Client::is_closed`].
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Like [`Client::clear_type_cache`].
    pub fn clear_type_cache(&self) {
        self.client.clear_type_cache();
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn in_flight(&self) -> &AtomicUsize {
        &self.in_flight
    }

    /// Marks the session as needing a full reset before its next statement (after a
    /// recycle query, a rolled-back session context...).
    pub(crate) fn invalidate_session(&self) {
        let mut st = self.state();
        st.needs_reset = true;
        st.applied = None;
    }

    pub(crate) fn set_transaction_outcome(&self, committed: bool, effects: Effects) {
        let mut st = self.state();
        st.tainted |= effects.changes_session;
        if !committed && self.config.scope == ContextScope::Session {
            // A session context applied inside a rolled-back transaction is gone.
            st.applied = None;
            st.needs_reset = true;
        }
    }
}

/// `SET TRANSACTION …` for the options of a `START TRANSACTION …` statement, if any.
fn begin_options(begin: &str) -> Option<String> {
    let rest = begin.strip_prefix("START TRANSACTION")?.trim();
    (!rest.is_empty()).then(|| format!("SET TRANSACTION {rest}"))
}

/// The context statements prepared on one connection: one per attribute count up to
/// [`MAX_FLAT`], and one for any count.
pub(crate) struct SyncStatements {
    flat: Vec<Statement>,
    any: Statement,
}

impl SyncStatements {
    /// Prepares them all in one flight.
    pub(crate) async fn prepare(client: &Client) -> Result<Self, Error> {
        let sqls: Vec<String> = (0..=MAX_FLAT).map(mapping::sync_sql).collect();
        let types: Vec<Vec<Type>> = (0..=MAX_FLAT).map(mapping::sync_types).collect();
        let flat = try_join_all(
            sqls.iter()
                .zip(&types)
                .map(|(sql, t)| client.prepare_typed(sql, t)),
        );
        let any = client.prepare_typed(SYNC_ANY_SQL, &SYNC_ANY_TYPES);
        let (flat, any) = join(flat, any).await;
        Ok(Self {
            flat: flat?,
            any: any?,
        })
    }
}

/// Sends the context statement, if there is a context to send.
async fn sync_context(
    client: &Client,
    prepared: Option<&SyncStatements>,
    sync: Option<&(Arc<Mapped>, &'static bool)>,
) -> Result<(), Error> {
    let Some((mapped, local)) = sync else {
        return Ok(());
    };
    match prepared {
        Some(statements) => match statements.flat.get(mapped.attribute_count()) {
            Some(statement) => client.execute(statement, &mapped.flat_params(local)).await,
            None => {
                client
                    .execute(&statements.any, &mapped.any_params(local))
                    .await
            }
        }
        .map(drop),
        None => client
            .query_typed(SYNC_ANY_SQL, &mapped.typed_any_params(local))
            .await
            .map(drop),
    }
}

impl Connection for ClientWrapper {
    type AttachError = MappingError;

    fn attach_context(&mut self, context: SecurityContext) -> Result<(), MappingError> {
        // Reattaching the same context keeps its mapping (and session-scope affinity).
        if let Some(d) = &self.desired {
            if d.context.ptr_eq(&context) {
                return Ok(());
            }
        }
        self.desired = Some(mapping::map(&self.config, &context)?);
        Ok(())
    }

    fn clear_context(&mut self) {
        self.desired = None;
    }

    fn context(&self) -> Option<&SecurityContext> {
        self.desired.as_ref().map(|m| &m.context)
    }

    fn check_release(&mut self) -> Result<(), DiscardReason> {
        if self.in_flight.load(Ordering::SeqCst) != 0 {
            // A request is on the wire: the server will run it, or a late cancel could hit
            // the next borrower.
            return Err(DiscardReason::InFlight);
        }
        if self.client.is_closed() {
            return Err(DiscardReason::Lost);
        }
        let mut st = self.state();
        if st.broken {
            return Err(DiscardReason::ResetFailed);
        }
        if st.maybe_in_transaction {
            return Err(DiscardReason::OpenTransaction);
        }
        if std::mem::take(&mut st.tainted) {
            st.needs_reset = true;
        }
        Ok(())
    }
}

impl Drop for ClientWrapper {
    fn drop(&mut self) {
        self.conn_task.abort();
    }
}

/// The isolation levels of [`TransactionBuilder`], as SQL.
pub(crate) fn isolation_sql(level: IsolationLevel) -> &'static str {
    match level {
        IsolationLevel::ReadUncommitted => "ISOLATION LEVEL READ UNCOMMITTED",
        IsolationLevel::ReadCommitted => "ISOLATION LEVEL READ COMMITTED",
        IsolationLevel::RepeatableRead => "ISOLATION LEVEL REPEATABLE READ",
        IsolationLevel::Serializable => "ISOLATION LEVEL SERIALIZABLE",
        _ => "ISOLATION LEVEL READ COMMITTED",
    }
}
