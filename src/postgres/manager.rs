//! The PostgreSQL backend: opens connections and vouches for idle ones.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client as PgClient, Config as PgConfig, Error, Socket};

use crate::backend::{Backend, DiscardReason};

use super::client::{ClientWrapper, SyncStatements};
use super::config::{ManagerConfig, RecyclingMethod};
use super::mapping::ContextConfig;

type ConnectFuture<'a> =
    Pin<Box<dyn Future<Output = Result<(PgClient, JoinHandle<()>), Error>> + Send + 'a>>;

/// Opens a connection; object-safe so that the manager is not generic over the TLS type.
trait Connect: Send + Sync {
    fn connect<'a>(&'a self, config: &'a PgConfig) -> ConnectFuture<'a>;
}

struct TlsConnector<T>(T);

impl<T> Connect for TlsConnector<T>
where
    T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
    T::Stream: Sync + Send,
    T::TlsConnect: Sync + Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    fn connect<'a>(&'a self, config: &'a PgConfig) -> ConnectFuture<'a> {
        let tls = self.0.clone();
        Box::pin(async move {
            let (client, connection) = config.connect(tls).await?;
            let task = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "ctxpool: postgres connection ended");
                }
            });
            Ok((client, task))
        })
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
        T::Stream: Sync + Send,
        T::TlsConnect: Sync + Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        Self::from_config(pg_config, tls, ManagerConfig::default())
    }

    /// A manager with the given [`ManagerConfig`].
    pub fn from_config<T>(pg_config: PgConfig, tls: T, config: ManagerConfig) -> Self
    where
        T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
        T::Stream: Sync + Send,
        T::TlsConnect: Sync + Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
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
        let (client, task) = self.connect.connect(&self.pg_config).await?;
        // Prepared here, in one flight, so that no checkout pays a round trip for them.
        let statements = if self.context.prepared_statements {
            Some(SyncStatements::prepare(&client).await?)
        } else {
            None
        };
        Ok(ClientWrapper::new(
            client,
            task,
            self.context.clone(),
            statements,
        ))
    }

    async fn recycle(&self, client: &mut ClientWrapper) -> Result<(), DiscardReason> {
        if client.is_closed() {
            return Err(DiscardReason::Lost);
        }
        let Some(sql) = self.config.recycling_method.query() else {
            return Ok(());
        };
        match client.client().simple_query(sql).await {
            Ok(_) => {
                if self.config.recycling_method != RecyclingMethod::Verified {
                    // The recycle query may have changed the session behind our back.
                    client.invalidate_session();
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
