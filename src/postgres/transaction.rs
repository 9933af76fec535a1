//! Transactions: the context is applied in the same flight as `BEGIN` and holds for every
//! statement until `COMMIT` or `ROLLBACK`.

use std::fmt;
use std::future::Future;

use tokio_postgres::types::{BorrowToSql, ToSql, Type};
use tokio_postgres::{
    Client, CopyInSink, CopyOutStream, Error, IsolationLevel, Row, RowStream, SimpleQueryMessage,
    Statement,
};

use super::client::ClientWrapper;
use super::to_statement::ToStatement;

/// A transaction on a pooled connection, under the handle's context.
///
/// Dropped without [`commit`](Self::commit) it rolls back, as tokio-postgres's does. What
/// the pool does at release depends on the server's transaction status alone, so a
/// transaction that is leaked (`std::mem::forget`) is rolled back at release too.
pub struct Transaction<'a> {
    wrapper: &'a mut ClientWrapper,
    /// `Some` for a savepoint: its quoted name.
    savepoint: Option<String>,
    depth: u32,
    done: bool,
}

impl fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("savepoint", &self.savepoint)
            .field("depth", &self.depth)
            .finish_non_exhaustive()
    }
}

impl<'a> Transaction<'a> {
    pub(crate) fn new(wrapper: &'a mut ClientWrapper) -> Self {
        Self {
            wrapper,
            savepoint: None,
            depth: 0,
            done: false,
        }
    }

    /// Runs one statement under the session's plan (inside the open transaction: as it
    /// is, unless the handle's context changed).
    async fn run<'s, R, Fut>(&'s self, op: impl FnMut(&'s Client) -> Fut) -> Result<R, Error>
    where
        Fut: Future<Output = Result<R, Error>>,
    {
        self.wrapper.run(op).await
    }

    /// [`run`](Self::run) for an operation whose request binds a prepared statement.
    async fn run_bound<'s, R, Fut>(&'s self, op: impl FnMut(&'s Client) -> Fut) -> Result<R, Error>
    where
        Fut: Future<Output = Result<R, Error>>,
    {
        self.wrapper.run_bound(op).await
    }

    /// For an operation that cannot be sent twice, is not a stream, and whose request
    /// binds a prepared statement.
    async fn run_single_bound<'s, R, Fut>(
        &'s self,
        op: impl FnOnce(&'s Client) -> Fut,
    ) -> Result<R, Error>
    where
        Fut: Future<Output = Result<R, Error>>,
    {
        self.wrapper.run_single_bound(op).await
    }

    async fn resolve<T: ?Sized + ToStatement>(&self, statement: &T) -> Result<Statement, Error> {
        self.wrapper.resolve(statement).await
    }

    /// Like [`tokio_postgres::Transaction::prepare`].
    pub async fn prepare(&self, query: &str) -> Result<Statement, Error> {
        self.wrapper.prepare(query).await
    }

    /// Like [`tokio_postgres::Transaction::prepare_typed`].
    pub async fn prepare_typed(&self, query: &str, types: &[Type]) -> Result<Statement, Error> {
        self.wrapper.prepare_typed(query, types).await
    }

    /// Like [`ClientWrapper::prepare_cached`].
    pub async fn prepare_cached(&self, query: &str) -> Result<Statement, Error> {
        self.wrapper.prepare_cached(query).await
    }

    /// Like [`ClientWrapper::prepare_typed_cached`].
    pub async fn prepare_typed_cached(
        &self,
        query: &str,
        types: &[Type],
    ) -> Result<Statement, Error> {
        self.wrapper.prepare_typed_cached(query, types).await
    }

    statement_methods!();

    /// Like [`tokio_postgres::Transaction::query_raw`].
    pub async fn query_raw<T, P, I>(&self, statement: &T, params: I) -> Result<RowStream, Error>
    where
        T: ?Sized + ToStatement,
        P: BorrowToSql,
        I: IntoIterator<Item = P>,
        I::IntoIter: ExactSizeIterator,
    {
        let s = self.resolve(statement).await?;
        self.wrapper
            .run_once(true, true, |c| c.query_raw(&s, params))
            .await
    }

    /// Like [`tokio_postgres::Transaction::copy_in`].
    pub async fn copy_in<T, U>(&self, statement: &T) -> Result<CopyInSink<U>, Error>
    where
        T: ?Sized + ToStatement,
        U: bytes::Buf + 'static + Send,
    {
        let s = self.resolve(statement).await?;
        self.wrapper.run_as(true, true, |c| c.copy_in(&s)).await
    }

    /// Like [`tokio_postgres::Transaction::copy_out`].
    pub async fn copy_out<T>(&self, statement: &T) -> Result<CopyOutStream, Error>
    where
        T: ?Sized + ToStatement,
    {
        let s = self.resolve(statement).await?;
        self.wrapper.run_as(true, true, |c| c.copy_out(&s)).await
    }

    /// Commits the transaction (releases the savepoint).
    pub async fn commit(mut self) -> Result<(), Error> {
        self.done = true;
        let sql = match &self.savepoint {
            Some(name) => format!("RELEASE {name}"),
            None => "COMMIT".to_owned(),
        };
        self.run(|c| c.batch_execute(&sql)).await
    }

    /// Rolls the transaction back (to the savepoint).
    pub async fn rollback(mut self) -> Result<(), Error> {
        self.done = true;
        let sql = match &self.savepoint {
            Some(name) => format!("ROLLBACK TO {name}"),
            None => "ROLLBACK".to_owned(),
        };
        self.run(|c| c.batch_execute(&sql)).await
    }

    /// A nested transaction: a savepoint.
    pub async fn transaction(&mut self) -> Result<Transaction<'_>, Error> {
        let name = format!("sp_{}", self.depth + 1);
        self.savepoint(name).await
    }

    /// A nested transaction with a named savepoint. The name is quoted, never spliced.
    pub async fn savepoint<I: Into<String>>(&mut self, name: I) -> Result<Transaction<'_>, Error> {
        let name = format!("\"{}\"", name.into().replace('"', "\"\""));
        let depth = self.depth + 1;
        let sql = format!("SAVEPOINT {name}");
        self.run(|c| c.batch_execute(&sql)).await?;
        Ok(Transaction {
            wrapper: &mut *self.wrapper,
            savepoint: Some(name),
            depth,
            done: false,
        })
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // As tokio-postgres: the rollback is sent without waiting for it. The wire layer
        // writes it before any later request, and the next statement waits for it.
        let sql = match &self.savepoint {
            Some(name) => format!("ROLLBACK TO {name}"),
            None => "ROLLBACK".to_owned(),
        };
        self.wrapper.session().wire.send_query(&sql);
    }
}

/// Builds a transaction with options; see [`ClientWrapper::build_transaction`].
#[must_use = "a builder does nothing until `start` is called"]
pub struct TransactionBuilder<'a> {
    wrapper: &'a mut ClientWrapper,
    isolation_level: Option<IsolationLevel>,
    read_only: Option<bool>,
    deferrable: Option<bool>,
}

impl fmt::Debug for TransactionBuilder<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransactionBuilder")
            .field("isolation_level", &self.isolation_level)
            .field("read_only", &self.read_only)
            .field("deferrable", &self.deferrable)
            .finish_non_exhaustive()
    }
}

impl<'a> TransactionBuilder<'a> {
    pub(crate) fn new(wrapper: &'a mut ClientWrapper) -> Self {
        Self {
            wrapper,
            isolation_level: None,
            read_only: None,
            deferrable: None,
        }
    }

    /// Sets the isolation level.
    pub fn isolation_level(mut self, level: IsolationLevel) -> Self {
        self.isolation_level = Some(level);
        self
    }

    /// Sets the access mode.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = Some(read_only);
        self
    }

    /// Sets deferrability (with serializable and read only).
    pub fn deferrable(mut self, deferrable: bool) -> Self {
        self.deferrable = Some(deferrable);
        self
    }

    /// Starts the transaction, with the context in the same flight.
    pub async fn start(self) -> Result<Transaction<'a>, Error> {
        let mut options = Vec::new();
        if let Some(level) = self.isolation_level {
            options.push(isolation_sql(level));
        }
        match self.read_only {
            Some(true) => options.push("READ ONLY"),
            Some(false) => options.push("READ WRITE"),
            None => {}
        }
        match self.deferrable {
            Some(true) => options.push("DEFERRABLE"),
            Some(false) => options.push("NOT DEFERRABLE"),
            None => {}
        }
        let begin = if options.is_empty() {
            "BEGIN".to_owned()
        } else {
            format!("START TRANSACTION {}", options.join(", "))
        };
        self.wrapper.begin(&begin).await
    }
}

/// The isolation levels of [`TransactionBuilder`], as SQL. A level this crate does not
/// know is not mapped onto another: it is sent as a name PostgreSQL refuses, so that
/// the transaction fails to start.
fn isolation_sql(level: IsolationLevel) -> &'static str {
    match level {
        IsolationLevel::ReadUncommitted => "ISOLATION LEVEL READ UNCOMMITTED",
        IsolationLevel::ReadCommitted => "ISOLATION LEVEL READ COMMITTED",
        IsolationLevel::RepeatableRead => "ISOLATION LEVEL REPEATABLE READ",
        IsolationLevel::Serializable => "ISOLATION LEVEL SERIALIZABLE",
        _ => "ISOLATION LEVEL ctxpool_unknown_isolation_level",
    }
}
