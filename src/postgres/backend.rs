//! The PostgreSQL backend: opens connections and vouches for idle ones.

use std::fmt;
use std::sync::Arc;

use futures_util::future::join;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Config as PgConfig, SimpleQueryMessage};

use crate::backend::{Backend, DiscardReason};

use super::client::ClientWrapper;
use super::config::{ManagerConfig, RecyclingMethod};
use super::connect::{self, MakeTls, Opened, Socket};
use super::connection::{PoolStatements, Session};
use super::error::Error;
use super::mapping::ContextConfig;
use super::wire::TxStatus;

type ConnectFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Opened, Error>> + Send + 'a>>;

/// Opens a connection; object-safe so that the manager is not generic over the TLS type.
trait Connect: Send + Sync {
    fn connect<'a>(&'a self, config: &'a PgConfig) -> ConnectFuture<'a>;
}

struct TlsConnector<T>(T);

impl<T: MakeTls> Connect for TlsConnector<T> {
    fn connect<'a>(&'a self, config: &'a PgConfig) -> ConnectFuture<'a> {
        Box::pin(connect::open(config, &self.0))
    }
}

/// The PostgreSQL backend, named as deadpool-postgres's manager.
pub struct Manager {
    pg_config: PgConfig,
    config: ManagerConfig,
    connect: Box<dyn Connect>,
    context: Arc<ContextConfig>,
}

impl fmt::Debug for Manager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // tokio-postgres's Config redacts the password in its Debug.
        f.debug_struct("Manager")
            .field("pg_config", &self.pg_config)
            .field("config", &self.config)
            .field("context", &self.context)
            .finish_non_exhaustive()
    }
}

impl Manager {
    /// A manager with the default [`ManagerConfig`] and [`ContextConfig`].
    pub fn new<T>(pg_config: PgConfig, tls: T) -> Self
    where
        T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
        T::Stream: Send + 'static,
        T::TlsConnect: Send + 'static,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send + 'static,
    {
        Self::from_config(pg_config, tls, ManagerConfig::default())
    }

    /// A manager with the given [`ManagerConfig`].
    pub fn from_config<T>(pg_config: PgConfig, tls: T, config: ManagerConfig) -> Self
    where
        T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
        T::Stream: Send + 'static,
        T::TlsConnect: Send + 'static,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send + 'static,
    {
        Self {
            pg_config,
            config,
            connect: Box::new(TlsConnector(tls)),
            context: Arc::new(ContextConfig::default()),
        }
    }

    /// How contexts map onto sessions (roles allowed, scope). The default allows no role,
    /// so every context is refused until this is set.
    pub fn with_context(mut self, context: ContextConfig) -> Self {
        self.context = Arc::new(context);
        self
    }

    /// The context configuration.
    pub fn context_config(&self) -> &ContextConfig {
        &self.context
    }
}

impl Backend for Manager {
    type Connection = ClientWrapper;
    type Error = Error;

    async fn connect(&self) -> Result<ClientWrapper, Error> {
        let Opened { client, task, wire } = self.connect.connect(&self.pg_config).await?;
        // One flight: the pool's statements, and the process id the server itself reports,
        // to compare with the one of BackendKeyData (a pooler or proxy answers with its
        // own).
        let statements = async {
            if self.context.prepared_statements {
                PoolStatements::prepare(&client, &wire).await
            } else {
                Ok(None)
            }
        };
        let pid = client.simple_query("SELECT pg_catalog.pg_backend_pid()");
        let (statements, pid) = join(statements, pid).await;
        let (statements, pid) = (statements?, pid?);
        let reported = pid.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).and_then(|v| v.parse::<i32>().ok()),
            _ => None,
        });
        let proxied = reported.is_none() || reported != wire.backend_pid();
        if proxied {
            tracing::debug!(
                announced = ?wire.backend_pid(),
                reported = ?reported,
                "ctxpool: a pooler or proxy sits between the pool and the server"
            );
        }
        // Behind a pooler, the next transaction may run on another server connection,
        // where these statements do not exist: send them unnamed instead.
        let statements = if proxied { None } else { statements };
        wire.settled().await;
        let session = Session::new(wire, self.context.clone(), statements, proxied);
        Ok(ClientWrapper::new(client, task, session))
    }

    async fn recycle(&self, client: &mut ClientWrapper) -> Result<(), DiscardReason> {
        if client.is_closed() {
            return Err(DiscardReason::Lost);
        }
        // A rollback sent at release, or the last reply, may still be on its way.
        let wire = &client.session().wire;
        wire.settled().await;
        if client.is_closed() {
            return Err(DiscardReason::Lost);
        }
        if wire.status() != TxStatus::Idle && !super::connection::sabotaged_status() {
            return Err(DiscardReason::OpenTransaction);
        }
        let Some(sql) = self.config.recycling_method.query() else {
            return Ok(());
        };
        match client.client().simple_query(sql).await {
            Ok(_) => {
                if self.config.recycling_method != RecyclingMethod::Verified {
                    // The recycle query may have changed the session behind our back.
                    client.session().arm_reset();
                }
                Ok(())
            }
            Err(e) => {
                tracing::debug!(error = %e, "ctxpool: postgres recycle query failed");
                Err(DiscardReason::RecycleFailed)
            }
        }
    }
}
