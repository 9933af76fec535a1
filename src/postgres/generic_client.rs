//! [`GenericClient`]: code that runs on a pooled client or inside a transaction alike.

use async_trait::async_trait;
use tokio_postgres::types::{BorrowToSql, ToSql, Type};
use tokio_postgres::{Error, Row, RowStream, Statement};

use super::to_statement::ToStatement;
use super::{Client, Transaction};

mod private {
    pub trait Sealed {}
}

/// The methods [`Client`] and [`Transaction`] share, as deadpool-postgres's trait of the
/// same name.
#[async_trait]
pub trait GenericClient: Sync + private::Sealed {
    /// Like `tokio_postgres::Client::execute`.
    async fn execute<T>(&self, query: &T, params: &[&(dyn ToSql + Sync)]) -> Result<u64, Error>
    where
        T: ?Sized + ToStatement + Sync + Send;

    /// Like `tokio_postgres::Client::execute_raw`.
    async fn execute_raw<P, I, T>(&self, statement: &T, params: I) -> Result<u64, Error>
    where
        T: ?Sized + ToStatement + Sync + Send,
        P: BorrowToSql,
        I: IntoIterator<Item = P> + Sync + Send,
        I::IntoIter: ExactSizeIterator;

    /// Like `tokio_postgres::Client::query`.
    async fn query<T>(&self, query: &T, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, Error>
    where
        T: ?Sized + ToStatement + Sync + Send;

    /// Like `tokio_postgres::Client::query_one`.
    async fn query_one<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error>
    where
        T: ?Sized + ToStatement + Sync + Send;

    /// Like `tokio_postgres::Client::query_opt`.
    async fn query_opt<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error>
    where
        T: ?Sized + ToStatement + Sync + Send;

    /// Like `tokio_postgres::Client::query_raw`.
    async fn query_raw<T, P, I>(&self, statement: &T, params: I) -> Result<RowStream, Error>
    where
        T: ?Sized + ToStatement + Sync + Send,
        P: BorrowToSql,
        I: IntoIterator<Item = P> + Sync + Send,
        I::IntoIter: ExactSizeIterator;

    /// Like `tokio_postgres::Client::prepare`.
    async fn prepare(&self, query: &str) -> Result<Statement, Error>;

    /// Like `tokio_postgres::Client::prepare_typed`.
    async fn prepare_typed(
        &self,
        query: &str,
        parameter_types: &[Type],
    ) -> Result<Statement, Error>;

    /// Like [`ClientWrapper::prepare_cached`](super::ClientWrapper::prepare_cached).
    async fn prepare_cached(&self, query: &str) -> Result<Statement, Error>;

    /// Like [`ClientWrapper::prepare_typed_cached`](super::ClientWrapper::prepare_typed_cached).
    async fn prepare_typed_cached(&self, query: &str, types: &[Type]) -> Result<Statement, Error>;

    /// Starts a transaction (a savepoint inside one).
    async fn transaction(&mut self) -> Result<Transaction<'_>, Error>;

    /// Like `tokio_postgres::Client::batch_execute`.
    async fn batch_execute(&self, query: &str) -> Result<(), Error>;
}

/// Implements the trait by forwarding to inherent methods of the same names.
macro_rules! forward {
    ($ty:ty, $this:ident => $target:expr) => {
        #[async_trait]
        impl GenericClient for $ty {
            async fn execute<T>(
                &self,
                query: &T,
                params: &[&(dyn ToSql + Sync)],
            ) -> Result<u64, Error>
            where
                T: ?Sized + ToStatement + Sync + Send,
            {
                let $this = self;
                $target.execute(query, params).await
            }

            async fn execute_raw<P, I, T>(&self, statement: &T, params: I) -> Result<u64, Error>
            where
                T: ?Sized + ToStatement + Sync + Send,
                P: BorrowToSql,
                I: IntoIterator<Item = P> + Sync + Send,
                I::IntoIter: ExactSizeIterator,
            {
                let $this = self;
                $target.execute_raw(statement, params).await
            }

            async fn query<T>(
                &self,
                query: &T,
                params: &[&(dyn ToSql + Sync)],
            ) -> Result<Vec<Row>, Error>
            where
                T: ?Sized + ToStatement + Sync + Send,
            {
                let $this = self;
                $target.query(query, params).await
            }

            async fn query_one<T>(
                &self,
                statement: &T,
                params: &[&(dyn ToSql + Sync)],
            ) -> Result<Row, Error>
            where
                T: ?Sized + ToStatement + Sync + Send,
            {
                let $this = self;
                $target.query_one(statement, params).await
            }

            async fn query_opt<T>(
                &self,
                statement: &T,
                params: &[&(dyn ToSql + Sync)],
            ) -> Result<Option<Row>, Error>
            where
                T: ?Sized + ToStatement + Sync + Send,
            {
                let $this = self;
                $target.query_opt(statement, params).await
            }

            async fn query_raw<T, P, I>(&self, statement: &T, params: I) -> Result<RowStream, Error>
            where
                T: ?Sized + ToStatement + Sync + Send,
                P: BorrowToSql,
                I: IntoIterator<Item = P> + Sync + Send,
                I::IntoIter: ExactSizeIterator,
            {
                let $this = self;
                $target.query_raw(statement, params).await
            }

            async fn prepare(&self, query: &str) -> Result<Statement, Error> {
                let $this = self;
                $target.prepare(query).await
            }

            async fn prepare_typed(
                &self,
                query: &str,
                parameter_types: &[Type],
            ) -> Result<Statement, Error> {
                let $this = self;
                $target.prepare_typed(query, parameter_types).await
            }

            async fn prepare_cached(&self, query: &str) -> Result<Statement, Error> {
                let $this = self;
                $target.prepare_cached(query).await
            }

            async fn prepare_typed_cached(
                &self,
                query: &str,
                types: &[Type],
            ) -> Result<Statement, Error> {
                let $this = self;
                $target.prepare_typed_cached(query, types).await
            }

            async fn transaction(&mut self) -> Result<Transaction<'_>, Error> {
                let $this = self;
                $target.transaction().await
            }

            async fn batch_execute(&self, query: &str) -> Result<(), Error> {
                let $this = self;
                $target.batch_execute(query).await
            }
        }
    };
}

impl private::Sealed for Client {}
// `**this`: the wrapper behind the handle. Plain `this` would find this very trait
// method on `Object` before auto-deref reaches the inherent one, and recurse.
forward!(Client, this => (**this));

impl private::Sealed for Transaction<'_> {}
forward!(Transaction<'_>, this => this);
