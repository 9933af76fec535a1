//! The PostgreSQL backend: contexts become a role and settings that Row-Level Security
//! policies read. A drop-in for deadpool-postgres: replace `deadpool_postgres` with
//! `ctxpool::postgres` in your imports.
//!
//! ```no_run
//! use ctxpool::postgres::{Config, ContextConfig, ManagerConfig, RecyclingMethod, RoleMapping, Runtime};
//! use ctxpool::{EndUserIdentity, SecurityContext};
//! use tokio_postgres::NoTls;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let mut cfg = Config::new();
//! cfg.url = Some("postgres://hr_app@127.0.0.1/hr".into());
//! cfg.manager = Some(ManagerConfig { recycling_method: RecyclingMethod::Fast });
//! cfg.context = Some(ContextConfig::new(RoleMapping::FirstDataRole, ["hr_employee", "hr_manager"]));
//! let pool = cfg.create_pool(Some(Runtime::Tokio1), NoTls)?;
//!
//! let alice = SecurityContext::builder(EndUserIdentity::named("alice", None), "db-token")
//!     .data_roles(["hr_employee"])
//!     .attributes(serde_json::json!({"hr.hcm_context": {"emp_id": 3, "org_id": 5}}))
//!     .build()?;
//! let client = pool.acquire_as(&alice).await?;
//! let stmt = client.prepare_cached("SELECT name FROM hr.employees").await?;
//! let rows = client.query(&stmt, &[]).await?; // only the rows alice's policies allow
//! # Ok(()) }
//! ```
//!
//! # The mapping
//! See [`mapping`] for the role and the settings a policy reads, and [`HELPERS_SQL`] for
//! `ctxpool.has_data_role(text)`, `ctxpool.attr(ctx, key)` and `ctxpool.end_user()`.
//! Every value is a bind parameter (`set_config('role', $1, …)`): nothing from a context
//! is ever spliced into SQL text. The role and every data role must be in the
//! [`ContextConfig::allowed_roles`] allow-list, checked when the context is attached,
//! before any SQL is sent. The pool's login role must be granted each allowed role.
//!
//! # Scopes and the wire
//! - [`ContextScope::Transaction`] (default): every statement run with a context travels
//!   as `BEGIN`, the context statement, the statement, `COMMIT`, pipelined in **one
//!   flight**: the same round trips as the bare statement. The context is
//!   transaction-local, so nothing survives it and PgBouncer in transaction mode is safe.
//!   If the context statement fails (role dropped or not granted, a setting refused) the
//!   transaction is aborted, the statement never runs, and the caller gets the context
//!   statement's error. [`ClientWrapper::transaction`] sends `BEGIN` and the context in one
//!   flight; every statement of the transaction then runs under it. SQL text run with a
//!   context (`batch_execute`, `simple_query`) runs inside the context's transaction, so
//!   transaction control in that text (`BEGIN`, `COMMIT`) is not supported there: use
//!   [`ClientWrapper::transaction`]. `query_raw` and `copy_out` send the `COMMIT` in the
//!   same flight without waiting for it, so that their rows stream.
//! - [`ContextScope::Session`]: the context is set session-wide on the first statement of a
//!   checkout (same pipeline, same fail-closed shape) and kept; the next statements go
//!   bare. At the next checkout the first statement carries the reset, unless the same
//!   context comes back (affinity): then nothing is sent at all. Not for PgBouncer in
//!   transaction mode.
//!
//! # What the pool does not see, and how it copes
//! PostgreSQL does not report a change of role or of a custom setting, and `SET ROLE` is no
//! boundary against SQL on the same connection: the user's SQL can run `RESET ROLE`, `SET
//! ROLE other`, `set_config(…)`. So the pool reads the SQL text it sends: text that may
//! change session state (anything but plain data statements) marks the connection, and
//! the next checkout's first statement carries a full reset (`ROLLBACK`, `RESET ALL`,
//! `RESET ROLE`, cursors, listeners, advisory locks, temporary tables) inside its
//! transaction. Text that may leave a transaction open (`BEGIN` sent as SQL) gets the
//! connection discarded at release. A *function* that changes session state
//! (`set_config(…, false)` inside a PL/pgSQL body) is not visible in the text: do not grant
//! such functions to end-user roles, and write policies on the `ctxpool.*` settings, which
//! the pool itself sets in every context transaction.

/// The statement methods [`ClientWrapper`] and [`Transaction`] share: resolve the
/// statement (text is prepared first), then run it through the type's own `run`, which
/// decides what travels with it.
macro_rules! statement_methods {
    () => {
        /// Like `tokio_postgres::Client::query`.
        pub async fn query<T>(
            &self,
            statement: &T,
            params: &[&(dyn ToSql + Sync)],
        ) -> Result<Vec<Row>, Error>
        where
            T: ?Sized + ToStatement,
        {
            let statement = self.resolve(statement).await?;
            self.run(|c| c.query(&statement, params)).await
        }

        /// Like `tokio_postgres::Client::query_one`.
        pub async fn query_one<T>(
            &self,
            statement: &T,
            params: &[&(dyn ToSql + Sync)],
        ) -> Result<Row, Error>
        where
            T: ?Sized + ToStatement,
        {
            let statement = self.resolve(statement).await?;
            self.run(|c| c.query_one(&statement, params)).await
        }

        /// Like `tokio_postgres::Client::query_opt`.
        pub async fn query_opt<T>(
            &self,
            statement: &T,
            params: &[&(dyn ToSql + Sync)],
        ) -> Result<Option<Row>, Error>
        where
            T: ?Sized + ToStatement,
        {
            let statement = self.resolve(statement).await?;
            self.run(|c| c.query_opt(&statement, params)).await
        }

        /// Like `tokio_postgres::Client::execute`.
        pub async fn execute<T>(
            &self,
            statement: &T,
            params: &[&(dyn ToSql + Sync)],
        ) -> Result<u64, Error>
        where
            T: ?Sized + ToStatement,
        {
            let statement = self.resolve(statement).await?;
            self.run(|c| c.execute(&statement, params)).await
        }

        /// Like `tokio_postgres::Client::execute_raw`.
        pub async fn execute_raw<T, P, I>(&self, statement: &T, params: I) -> Result<u64, Error>
        where
            T: ?Sized + ToStatement,
            P: BorrowToSql,
            I: IntoIterator<Item = P>,
            I::IntoIter: ExactSizeIterator,
        {
            let statement = self.resolve(statement).await?;
            self.run(|c| c.execute_raw(&statement, params)).await
        }

        /// Like `tokio_postgres::Client::query_typed`: one unnamed statement, no prepare
        /// round trip, and safe behind PgBouncer in transaction mode.
        pub async fn query_typed(
            &self,
            query: &str,
            params: &[(&(dyn ToSql + Sync), Type)],
        ) -> Result<Vec<Row>, Error> {
            self.run(|c| c.query_typed(query, params)).await
        }

        /// Like `tokio_postgres::Client::batch_execute`.
        pub async fn batch_execute(&self, query: &str) -> Result<(), Error> {
            self.run(|c| c.batch_execute(query)).await
        }

        /// Like `tokio_postgres::Client::simple_query`.
        pub async fn simple_query(&self, query: &str) -> Result<Vec<SimpleQueryMessage>, Error> {
            self.run(|c| c.simple_query(query)).await
        }
    };
}

mod backend;
mod client;
mod config;
mod connect;
mod connection;
mod error;
mod generic_client;
pub mod mapping;
mod statement_cache;
mod transaction;
mod wire;

pub use backend::Manager;
pub use client::{ClientWrapper, StatementRef, ToStatement};
pub use config::{
    ChannelBinding, Config, ConfigError, LoadBalanceHosts, ManagerConfig, RecyclingMethod, SslMode,
    TargetSessionAttrs,
};
pub use connect::Socket;
pub use deadpool::Runtime;
pub use deadpool::managed::{PoolConfig, Timeouts};
pub use error::Error;
pub use generic_client::GenericClient;
pub use mapping::{ContextConfig, ContextScope, MappingError, RoleMapping};
pub use statement_cache::StatementCache;
pub use tokio_postgres;
pub use transaction::{Transaction, TransactionBuilder};

pub use crate::pool::Status;

/// A pool of PostgreSQL connections.
pub type Pool = crate::Pool<Manager>;
/// Builds a [`Pool`].
pub type PoolBuilder = crate::PoolBuilder<Manager>;
/// A pooled connection; dereferences to [`ClientWrapper`].
pub type Object = crate::Object<Manager>;
/// A pooled connection (deadpool-postgres's name).
pub type Client = Object;
/// Why a connection could not be handed out.
pub type PoolError = crate::PoolError<Error>;

/// The SQL helpers policies use: `ctxpool.end_user()`, `ctxpool.has_data_role(text)` and
/// `ctxpool.attr(ctx text, key text)`, each NULL when no context is set. Also shipped as
/// `src/postgres/ctxpool.sql`.
pub const HELPERS_SQL: &str = include_str!("ctxpool.sql");

/// Installs [`HELPERS_SQL`] (idempotent). Run it once, as a role that may create schemas,
/// on a connection of your own (not a pooled end-user one).
pub async fn install_helpers(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(HELPERS_SQL).await
}

/// Why [`Config::create_pool`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CreatePoolError {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(#[source] ConfigError),
    /// The pool could not be built.
    #[error("could not build the pool: {0}")]
    Build(#[source] crate::pool::BuildError),
}
