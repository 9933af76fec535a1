//! The pooled client: every statement carries the handle's context.

use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;

use tokio::task::JoinHandle;
use tokio_postgres::types::{BorrowToSql, ToSql, Type};
use tokio_postgres::{Client, CopyOutStream, Error, Row, RowStream, SimpleQueryMessage, Statement};

use crate::backend::{Connection, DiscardReason};
use crate::context::SecurityContext;

use super::connection::{BatchPlan, Plan, Purpose, Routing, Session};
use super::mapping::{self, ContextScope, Mapped, MappingError};
use super::statement_cache::StatementCache;
use super::to_statement::{StatementRef, ToStatement};
use super::transaction::{Transaction, TransactionBuilder};
use super::wire::TxStatus;

/// A PostgreSQL connection whose statements run under the handle's security context.
///
/// It does not dereference to [`tokio_postgres::Client`]: every method that runs SQL is
/// here, and each carries the context, so no call path can bypass it. The methods mirror
/// tokio-postgres's; see [`super`] for how each context scope travels on the wire.
pub struct ClientWrapper {
    // The client and the session are boxed: deadpool moves a pooled object about fifteen
    // times per checkout and return, and two pointers move cheaper than the 450 bytes of
    // the two.
    client: Box<Client>,
    conn_task: JoinHandle<()>,
    /// Statements prepared by [`prepare_cached`](Self::prepare_cached).
    pub statement_cache: Arc<StatementCache>,
    session: Box<Session>,
    desired: Option<Arc<Mapped>>,
    /// Operations started and not finished. A future dropped mid-flight leaves it above
    /// zero, and the connection is discarded at release.
    in_flight: AtomicUsize,
    /// A stream this handle returned is still open while fewer requests than this were
    /// answered.
    streams_until: AtomicU64,
    /// Held while a batch's two requests are handed to tokio-postgres, so that no request
    /// of another task comes between them.
    enqueue: parking_lot::Mutex<()>,
}

impl fmt::Debug for ClientWrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientWrapper")
            .field("context", &self.desired)
            .field("scope", &self.session.config().scope)
            .field("closed", &self.client.is_closed())
            .finish_non_exhaustive()
    }
}

impl ClientWrapper {
    pub(crate) fn new(client: Client, conn_task: JoinHandle<()>, session: Session) -> Self {
        Self {
            client: Box::new(client),
            conn_task,
            statement_cache: Arc::new(StatementCache::default()),
            session: Box::new(session),
            desired: None,
            in_flight: AtomicUsize::new(0),
            streams_until: AtomicU64::new(0),
            enqueue: parking_lot::Mutex::new(()),
        }
    }

    /// Runs one user operation under the plan, then waits for the server's
    /// ReadyForQuery (normally read with the reply), so that the session knows the
    /// transaction status the operation left.
    pub(crate) async fn run<'s, R, Fut>(
        &'s self,
        op: impl FnMut(&'s Client) -> Fut,
    ) -> Result<R, Error>
    where
        Fut: Future<Output = Result<R, Error>>,
    {
        self.run_as(false, false, op).await
    }

    /// [`run`](Self::run) for an operation whose request binds a prepared statement (its
    /// first frame is a Bind): the batch rides on that request itself.
    pub(crate) async fn run_bound<'s, R, Fut>(
        &'s self,
        op: impl FnMut(&'s Client) -> Fut,
    ) -> Result<R, Error>
    where
        Fut: Future<Output = Result<R, Error>>,
    {
        self.run_as(false, true, op).await
    }

    /// For an operation that cannot be sent twice, is not a stream, and whose request
    /// binds a prepared statement.
    pub(crate) async fn run_single_bound<'s, R, Fut>(
        &'s self,
        op: impl FnOnce(&'s Client) -> Fut,
    ) -> Result<R, Error>
    where
        Fut: Future<Output = Result<R, Error>>,
    {
        self.run_once(false, true, op).await
    }

    /// [`run`](Self::run) for an operation that returns a stream: its ReadyForQuery comes
    /// only once the stream is read to its end.
    pub(crate) async fn run_as<'s, R, Fut>(
        &'s self,
        stream: bool,
        binds: bool,
        mut op: impl FnMut(&'s Client) -> Fut,
    ) -> Result<R, Error>
    where
        Fut: Future<Output = Result<R, Error>>,
    {
        // Once more when the reset found SQL-level prepared statements of an earlier
        // checkout that no command tag had shown (made inside a function): the server
        // skipped the user's statement, and the next reset deallocates them first.
        match self.attempt(stream, binds, true, &mut op).await {
            (true, _) => self.attempt(stream, binds, false, &mut op).await.1,
            (false, result) => result,
        }
    }

    /// [`run_as`](Self::run_as) for an operation that cannot be sent twice (its
    /// parameters are an iterator): the reset's refusal above reaches the caller.
    pub(crate) async fn run_once<'s, R, Fut>(
        &'s self,
        stream: bool,
        binds: bool,
        op: impl FnOnce(&'s Client) -> Fut,
    ) -> Result<R, Error>
    where
        Fut: Future<Output = Result<R, Error>>,
    {
        self.attempt(stream, binds, false, op).await.1
    }

    /// One attempt; says whether it should be made again.
    async fn attempt<'s, R, Fut>(
        &'s self,
        stream: bool,
        binds: bool,
        may_retry: bool,
        op: impl FnOnce(&'s Client) -> Fut,
    ) -> (bool, Result<R, Error>)
    where
        Fut: Future<Output = Result<R, Error>>,
    {
        let wire = &self.session.wire;
        if wire.outstanding().1 != 0 {
            // A rollback of the pool's is on its way (a dropped transaction): plan on the
            // status it leaves.
            wire.settled().await;
        }
        let plan = self
            .session
            .plan(self.desired.as_ref(), Purpose::Statement, binds);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let (carrier_ok, result) = match &plan {
            Plan::Direct => (true, op(&self.client).await),
            Plan::Batch(p) if p.leading => (true, self.run_leading(p, op).await),
            Plan::Batch(p) => self.run_batch(p, op).await,
        };
        if !stream {
            wire.settled().await;
        } else if result.is_ok() {
            // The stream's request is written (its first reply came); it ends once it is
            // answered.
            self.streams_until
                .fetch_max(wire.written(), Ordering::SeqCst);
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let reset_failed = self.session.settle(&plan, carrier_ok);
        if self.session.left_aborted(&plan, carrier_ok) {
            // A statement of the pool's failed inside the reset's transaction block: the
            // server skipped the user's request, and the block is the pool's to end.
            wire.send_query("ROLLBACK");
            wire.settled().await;
            self.session.settle(&Plan::Direct, true);
        }
        let retry = may_retry && reset_failed && matches!(&result, Err(e) if is_prepared_check(e));
        (retry, result)
    }

    /// Sends the user's request with the batch written before it by the layer. If the
    /// request never reached the layer (tokio-postgres refused it before sending), the
    /// batch is withdrawn, so that it cannot attach to a later request.
    async fn run_leading<'s, R, Fut>(
        &'s self,
        plan: &BatchPlan,
        op: impl FnOnce(&'s Client) -> Fut,
    ) -> Result<R, Error>
    where
        Fut: Future<Output = Result<R, Error>>,
    {
        let wire = &self.session.wire;
        let mut user = pin!(op(&self.client));
        let mut first = true;
        let result = std::future::poll_fn(|cx| {
            if std::mem::take(&mut first) {
                // Armed and enqueued under the lock, so that no other request of this
                // handle comes between the batch and its anchor.
                let _order = self.enqueue.lock();
                wire.arm(plan.batch.clone());
                return user.as_mut().poll(cx);
            }
            user.as_mut().poll(cx)
        })
        .await;
        if !plan.batch.matched() {
            wire.disarm(&plan.batch);
        }
        result
    }

    /// Sends the batch's carrier and the user's request together, and awaits both. The
    /// carrier's error comes first: the server then skipped the user's request.
    async fn run_batch<'s, R, Fut>(
        &'s self,
        plan: &BatchPlan,
        op: impl FnOnce(&'s Client) -> Fut,
    ) -> (bool, Result<R, Error>)
    where
        Fut: Future<Output = Result<R, Error>>,
    {
        let wire = &self.session.wire;
        wire.arm(plan.batch.clone());
        let mut carrier = pin!(self.session.send_carrier(&self.client, &plan.carrier));
        let mut user = pin!(op(&self.client));
        let mut carrier_out: Option<Result<(), Error>> = None;
        let mut user_out: Option<Result<R, Error>> = None;
        let mut first = true;
        std::future::poll_fn(|cx| {
            if std::mem::take(&mut first) {
                let _order = self.enqueue.lock();
                if let Poll::Ready(r) = carrier.as_mut().poll(cx) {
                    if let Err(e) = r {
                        // Refused by tokio-postgres before it was sent. The user's request
                        // is not sent either: fail closed.
                        wire.disarm(&plan.batch);
                        return Poll::Ready((false, Err(e)));
                    }
                    carrier_out = Some(Ok(()));
                }
                match user.as_mut().poll(cx) {
                    Poll::Ready(r) => {
                        wire.follower(&plan.batch, false);
                        user_out = Some(r);
                    }
                    Poll::Pending => wire.follower(&plan.batch, true),
                }
            }
            if carrier_out.is_none() {
                if let Poll::Ready(r) = carrier.as_mut().poll(cx) {
                    carrier_out = Some(r);
                }
            }
            if user_out.is_none() {
                if let Poll::Ready(r) = user.as_mut().poll(cx) {
                    user_out = Some(r);
                }
            }
            match (carrier_out.take(), user_out.take()) {
                // The carrier's error is the cause; the server skipped the user's request.
                (Some(Err(e)), Some(_)) => Poll::Ready((false, Err(e))),
                (Some(Ok(())), Some(r)) => Poll::Ready((true, r)),
                (c, u) => {
                    carrier_out = c;
                    user_out = u;
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// The statement, prepared first when given as text (as tokio-postgres does).
    pub(crate) async fn resolve<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
    ) -> Result<Statement, Error> {
        match statement.to_statement() {
            StatementRef::Prepared(s) => Ok(s.clone()),
            StatementRef::Sql(sql) => self.prepare(sql).await,
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
        statement
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
        if let Some(statement) = self.statement_cache.get(query, types) {
            return Ok(statement);
        }
        let statement = self.prepare_typed(query, types).await?;
        self.statement_cache.insert(query, types, statement.clone());
        Ok(statement)
    }

    statement_methods!();

    /// Like [`Client::query_raw`]. The rows stream as they arrive; until the stream is
    /// read to its end the connection has a request in flight, and a handle released
    /// before that discards its connection.
    pub async fn query_raw<T, P, I>(&self, statement: &T, params: I) -> Result<RowStream, Error>
    where
        T: ?Sized + ToStatement,
        P: BorrowToSql,
        I: IntoIterator<Item = P>,
        I::IntoIter: ExactSizeIterator,
    {
        let statement = self.resolve(statement).await?;
        self.run_once(true, true, |c| c.query_raw(&statement, params))
            .await
    }

    /// Like [`Client::copy_out`]; streams like [`query_raw`](Self::query_raw).
    pub async fn copy_out<T>(&self, statement: &T) -> Result<CopyOutStream, Error>
    where
        T: ?Sized + ToStatement,
    {
        let statement = self.resolve(statement).await?;
        self.run_as(true, true, |c| c.copy_out(&statement)).await
    }

    /// Starts a transaction, with the context applied in the same flight as `BEGIN`. Every
    /// statement of the transaction runs under the context. COPY FROM STDIN
    /// ([`Transaction::copy_in`]) is available here.
    pub async fn transaction(&mut self) -> Result<Transaction<'_>, Error> {
        self.begin("BEGIN").await
    }

    /// Like [`Client::build_transaction`].
    pub fn build_transaction(&mut self) -> TransactionBuilder<'_> {
        TransactionBuilder::new(self)
    }

    /// Opens a transaction with `begin` (a `BEGIN` or `START TRANSACTION …` statement),
    /// in the same flight as the reset and the context when they are due.
    pub(crate) async fn begin(&mut self, begin: &str) -> Result<Transaction<'_>, Error> {
        let wire = self.session.wire.clone();
        if wire.outstanding().1 != 0 {
            wire.settled().await;
        }
        let plan = self
            .session
            .plan(self.desired.as_ref(), Purpose::Begin(begin), false);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let result = match &plan {
            Plan::Direct => self.client.batch_execute(begin).await,
            Plan::Batch(p) => {
                wire.arm(p.batch.clone());
                let mut carrier = pin!(self.session.send_carrier(&self.client, &p.carrier));
                let mut first = true;
                std::future::poll_fn(|cx| {
                    let out = carrier.as_mut().poll(cx);
                    if std::mem::take(&mut first) {
                        if out.is_ready() {
                            wire.disarm(&p.batch);
                        }
                        wire.follower(&p.batch, false);
                    }
                    out
                })
                .await
            }
        };
        wire.settled().await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.session.settle(&plan, result.is_ok());
        if result.is_err() && wire.status() != TxStatus::Idle {
            // BEGIN went through and the context did not: leave no aborted transaction.
            wire.send_query("ROLLBACK");
            wire.settled().await;
            self.session.settle(&Plan::Direct, true);
        }
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

    pub(crate) fn session(&self) -> &Session {
        &self.session
    }

    /// How often a batch's two requests reached the wire apart (a multi-thread runtime
    /// ran the connection task between them), so that the layer held the first one's
    /// Sync until the second came.
    pub fn held_syncs(&self) -> u64 {
        self.session.wire.held_syncs()
    }

    /// How often a batch's first request went out alone because the request meant to
    /// follow it was never sent (tokio-postgres refused it before sending, e.g. a
    /// parameter that failed to encode).
    pub fn unmerged_batches(&self) -> u64 {
        self.session.wire.unmerged()
    }

    /// The value of a run-time parameter the server reported (ParameterStatus), such as
    /// `server_version`, `TimeZone` or `in_hot_standby`.
    pub fn parameter_status(&self, name: &str) -> Option<String> {
        self.session.wire.parameter(name)
    }

    /// Whether the connection goes through a pooler (PgBouncer, pgpool-II): detected at
    /// connect, when the process id the server announced differs from `pg_backend_pid()`,
    /// or when pgpool-II answers `SHOW pool_status` (asked when either that differs or the
    /// server sees the client on another port than the pool's socket, as behind any TCP
    /// proxy; a plain TCP forwarder, one server session per connection, is no pooler).
    pub fn behind_proxy(&self) -> bool {
        self.session.proxied()
    }

    /// Whether the connection goes through pgpool-II (it answered `SHOW pool_status` at
    /// connect). Contexts are refused there when its settings may run them apart from the
    /// statements after them ([`MappingError::ContextRoutedApart`]).
    pub fn behind_pgpool(&self) -> bool {
        matches!(
            self.session.routing(),
            Routing::Pgpool | Routing::PgpoolSplits(_)
        )
    }
}

/// Whether `e` is the reset's refusal to run over SQL-level prepared statements of an
/// earlier checkout (the statement after it was skipped, so it may be sent again).
fn is_prepared_check(e: &Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        db.code() == &tokio_postgres::error::SqlState::INVALID_TEXT_REPRESENTATION
            && db
                .message()
                .contains(super::connection::PREPARED_CHECK_MARK)
    })
}

impl Connection for ClientWrapper {
    type AttachError = MappingError;

    fn attach_context(&mut self, context: SecurityContext) -> Result<(), MappingError> {
        if let Routing::PgpoolSplits(why) = self.session.routing() {
            return Err(MappingError::ContextRoutedApart { why });
        }
        if self.session.config().scope == ContextScope::Session && self.session.proxied() {
            return Err(MappingError::SessionScopeBehindProxy);
        }
        // Reattaching the same context keeps its mapping.
        if let Some(d) = &self.desired {
            if d.context.ptr_eq(&context) {
                return Ok(());
            }
        }
        self.desired = Some(mapping::map(self.session.config(), &context)?);
        Ok(())
    }

    fn clear_context(&mut self) {
        self.desired = None;
    }

    fn context(&self) -> Option<&SecurityContext> {
        self.desired.as_ref().map(|m| &m.context)
    }

    fn check_release(&mut self) -> Result<(), DiscardReason> {
        let stream_open = self.session.wire.ended() < self.streams_until.load(Ordering::SeqCst);
        self.session.release(
            self.client.is_closed(),
            self.in_flight.load(Ordering::SeqCst) != 0 || stream_open,
        )
    }
}

impl Drop for ClientWrapper {
    fn drop(&mut self) {
        self.conn_task.abort();
    }
}
