//! The PostgreSQL backend: contexts become a role and settings that Row-Level Security
//! policies read. A drop-in for deadpool-postgres: replace `deadpool_postgres` with
//! `ctxpool::postgres` in your imports.
//!
//! ```
//! use ctxpool::postgres::{Config, ContextConfig, ManagerConfig, RecyclingMethod, RoleMapping, Runtime};
//! use ctxpool::{EndUserIdentity, SecurityContext};
//! use tokio_postgres::NoTls;
//!
//! # ctxpool_testkit::hr::on_hr_database(|database_url| async move {
//! let mut cfg = Config::new();
//! cfg.url = Some(database_url); // postgres://hr_app@…/hr, the one least-privileged login
//! cfg.manager = Some(ManagerConfig { recycling_method: RecyclingMethod::Fast });
//! cfg.context = Some(ContextConfig::new(RoleMapping::FirstDataRole, ["hr_employee", "hr_manager"]));
//! let pool = cfg.create_pool(Some(Runtime::Tokio1), NoTls)?;
//!
//! let alice = SecurityContext::builder(EndUserIdentity::named("alice", None), "unused-on-postgres")
//!     .data_roles(["hr_employee"])
//!     .attributes(serde_json::json!({"hr.hcm_context": {"emp_id": 3, "org_id": 5}}))
//!     .build()?;
//! let client = pool.acquire_as(&alice).await?;
//! let stmt = client.prepare_cached("SELECT name FROM hr.employees").await?;
//! let rows = client.query(&stmt, &[]).await?; // only the rows alice's policies allow
//! assert_eq!(rows.len(), 1);
//! # Ok(())
//! # });
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
//! Beneath tokio-postgres sits a wire layer of the pool's (`wire`): it reads the
//! transaction status of every ReadyForQuery, and it can send statements of the pool's
//! own in the same flight as the user's, under **one Sync**, so that they form one
//! implicit transaction with it. Everything the pool decides about a session comes from
//! what the server reports there, never from reading SQL text.
//! - [`ContextScope::Transaction`] (default): a statement run with a context travels as the
//!   context statement (`set_config(…, true)`) and the statement, under one Sync: the
//!   round trips of the bare statement, and the context is gone when the transaction ends.
//!   If the context statement fails (role dropped or not granted, a setting refused) the
//!   server skips the statement and the caller gets the context statement's error. A
//!   `BEGIN` of the user's ([`ClientWrapper::transaction`], SQL text, a multi-statement
//!   string) makes that transaction the user's own, still under the context, until its
//!   `COMMIT` or `ROLLBACK`. PgBouncer in transaction mode is safe.
//! - [`ContextScope::Session`]: the context statement (`set_config(…, false)`) is followed
//!   by a `COMMIT` of the pool's, under the same Sync as the checkout's first statement; the
//!   context counts as applied only once the server answered that `COMMIT`, and the next
//!   statements go bare. Refused behind a pooler (detected at connect).
//!
//! # Release and the reset
//! A checkout that sent any SQL leaves the session to be reset: role and session
//! authorization, every setting, cursors, listeners, advisory locks, temporary objects,
//! sequence state, SQL-level prepared statements (what `DISCARD ALL` does, bar the
//! protocol-level statements the pool and your statement cache own). The reset rides with
//! the next checkout's first statement, in the same flight, and ends in a `COMMIT` of its
//! own: it is done when the server answered that, and sent again until it is. A connection
//! released inside a transaction (a forgotten [`Transaction`], a `BEGIN` in SQL text never
//! ended) is rolled back at release and reused only once the server reports it idle; one
//! released with a result stream still unread is discarded.
//!
//! # What remains
//! `SET ROLE` is no boundary against SQL on the same connection: the user's SQL can run
//! `RESET ROLE`, `SET ROLE other`, `set_config(…)` during its own checkout. Write policies
//! on the `ctxpool.*` settings, which the pool sets for every statement under a context.
//! Some session state no statement can reset: a custom setting once defined reads `''`
//! rather than NULL for the rest of the session (policies must treat both as "none"), and
//! the state of `random()` after `setseed()`.

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
            self.run_bound(|c| c.query(&statement, params)).await
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
            self.run_bound(|c| c.query_one(&statement, params)).await
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
            self.run_bound(|c| c.query_opt(&statement, params)).await
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
            self.run_bound(|c| c.execute(&statement, params)).await
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
            self.run_single_bound(|c| c.execute_raw(&statement, params))
                .await
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
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;
mod generic_client;
pub mod mapping;
mod statement_cache;
mod to_statement;
mod transaction;
mod wire;

pub use backend::Manager;
pub use client::ClientWrapper;
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
pub use to_statement::{StatementRef, ToStatement};
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

/// The SQLSTATE of the error a statement gets when the server did not run it because an
/// earlier statement of its batch failed (the session reset, or the security context):
/// PostgreSQL's own code for "commands ignored until end of transaction block". The caller
/// of a pooled method gets that earlier error first; this one is what other requests of
/// the same batch see.
pub const SKIPPED_SQLSTATE: &str = wire::SKIPPED_SQLSTATE;

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
