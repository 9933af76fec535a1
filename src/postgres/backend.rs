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
use super::connection::{PoolStatements, Routing, Session};
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
        let Opened {
            client,
            task,
            wire,
            local_port,
        } = self.connect.connect(&self.pg_config).await?;
        // One flight: the pool's statements, and the process id and client port the
        // server itself reports, to compare with the process id of BackendKeyData and the
        // port of our socket (a pooler or proxy answers with its own process id, or holds
        // a socket of its own towards the server).
        let statements = async {
            if self.context.prepared_statements {
                PoolStatements::prepare(&client, &wire).await
            } else {
                Ok(None)
            }
        };
        let probe = client
            .simple_query("SELECT pg_catalog.pg_backend_pid(), pg_catalog.inet_client_port()");
        let (statements, probe) = join(statements, probe).await;
        let (statements, probe) = (statements?, probe?);
        let row = probe.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        });
        let reported = row
            .and_then(|r| r.get(0))
            .and_then(|v| v.parse::<i32>().ok());
        let client_port = row
            .and_then(|r| r.get(1))
            .and_then(|v| v.parse::<u16>().ok());
        let other_socket = local_port.is_some() && client_port != local_port;
        let proxied = reported.is_none() || reported != wire.backend_pid() || other_socket;
        let mut routing = Routing::Direct;
        if proxied {
            routing = pooler_routing(&client).await;
            tracing::debug!(
                announced = ?wire.backend_pid(),
                reported = ?reported,
                local_port = ?local_port,
                client_port = ?client_port,
                routing = ?routing,
                "ctxpool: a pooler or proxy sits between the pool and the server"
            );
        }
        // Behind a pooler, the next transaction may run on another server connection,
        // where these statements do not exist: send them unnamed instead.
        let statements = if proxied { None } else { statements };
        wire.settled().await;
        let session = Session::new(wire, self.context.clone(), statements, routing);
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

/// What a pooler found at connect says about where a context and the statement after it
/// run. Only pgpool-II answers `SHOW pool_status` itself (PostgreSQL behind another
/// pooler refuses it: an error, which leaves the connection usable); its settings decide
/// whether it may send the context statement and the user's statement to different
/// servers.
async fn pooler_routing(client: &tokio_postgres::Client) -> Routing {
    let Ok(rows) = client.simple_query("SHOW pool_status").await else {
        return Routing::Pooler;
    };
    let value = |item: &str| {
        rows.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(row) if row.get(0) == Some(item) => {
                Some(row.get(1).unwrap_or("").trim().to_owned())
            }
            _ => None,
        })
    };
    if pgpool_keeps_context_together(
        value("load_balance_mode").as_deref(),
        value("disable_load_balance_on_write").as_deref(),
        value("read_only_function_list").as_deref(),
        value("write_function_list").as_deref(),
    ) {
        Routing::Pgpool
    } else {
        Routing::PgpoolSplits
    }
}

/// Whether pgpool-II with these settings (as `SHOW pool_status` reports them) sends a
/// context statement and the statements after it to the same server. The context
/// statement calls `set_config`, a volatile function, which pgpool-II counts as a write
/// and sends to the primary while both function lists are empty; a read after it goes to
/// the session's load-balancing node, unless load balancing is off or
/// `disable_load_balance_on_write` is `always` (reported as `4`), under which no read is
/// balanced after a write until the session ends. Anything else, or a value missing or
/// not understood, counts as splitting: fail closed.
pub(crate) fn pgpool_keeps_context_together(
    load_balance_mode: Option<&str>,
    disable_load_balance_on_write: Option<&str>,
    read_only_function_list: Option<&str>,
    write_function_list: Option<&str>,
) -> bool {
    if matches!(load_balance_mode, Some("0" | "off")) {
        return true;
    }
    matches!(disable_load_balance_on_write, Some("4" | "always"))
        && read_only_function_list == Some("")
        && write_function_list == Some("")
}

#[cfg(test)]
mod tests {
    use super::pgpool_keeps_context_together as together;

    #[test]
    fn pgpool_settings_that_keep_a_context_with_its_statement() {
        // Load balancing off: everything goes to the primary.
        assert!(together(Some("0"), Some("2"), Some(""), Some("")));
        // pgpool-II's defaults: a read after the context goes to the balancing node.
        assert!(!together(Some("1"), Some("2"), Some(""), Some("")));
        // always: no read is balanced after the context's write.
        assert!(together(Some("1"), Some("4"), Some(""), Some("")));
        assert!(together(Some("1"), Some("always"), Some(""), Some("")));
        // A function list: set_config's volatility is no longer what decides.
        assert!(!together(
            Some("1"),
            Some("4"),
            Some("set_config"),
            Some("")
        ));
        assert!(!together(Some("1"), Some("4"), Some(""), Some("nextval")));
        // off, trans_transaction, dml_adaptive, and anything unknown or missing.
        for on_write in [Some("1"), Some("3"), Some("5"), Some("x"), None] {
            assert!(!together(Some("1"), on_write, Some(""), Some("")));
        }
        assert!(!together(None, Some("4"), None, None));
    }
}
