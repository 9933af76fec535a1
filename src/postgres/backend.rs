//! The PostgreSQL backend: opens connections and vouches for idle ones.

use std::fmt;
use std::sync::Arc;

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
        // First the process id and client port the server itself reports, to compare
        // with the process id of BackendKeyData and the port of our socket (a pooler or
        // proxy answers with its own process id, or holds a socket of its own towards
        // the server); then, on a direct connection only, the pool's statements. Nothing
        // is prepared by name before it is known whether a pooler sits in between: there
        // a statement left under a name of tokio-postgres's on a server connection could
        // be bound by another client process that uses the same name.
        let probe = client
            .simple_query("SELECT pg_catalog.pg_backend_pid(), pg_catalog.inet_client_port()")
            .await?;
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
        let pid_differs = reported.is_none() || reported != wire.backend_pid();
        // A socket of its own towards the server, with the same process id: a plain TCP
        // forwarder (one server session per connection, nothing to change), or pgpool-II
        // on a session whose balancing node answered the probe. Over a Unix socket the
        // server reports no port; one reported anyway is another socket's. (A pooler
        // reached over a Unix socket that reaches the server over one too shows neither
        // sign when the process ids agree.)
        let other_socket = client_port != local_port;
        let routing = if pid_differs || other_socket {
            match pgpool_routing(&client).await {
                Some(routing) => routing,
                None if pid_differs => Routing::Pooler,
                None => Routing::Direct,
            }
        } else {
            Routing::Direct
        };
        let proxied = routing != Routing::Direct;
        if proxied {
            tracing::debug!(
                announced = ?wire.backend_pid(),
                reported = ?reported,
                local_port = ?local_port,
                client_port = ?client_port,
                routing = ?routing,
                "ctxpool: a pooler sits between the pool and the server"
            );
        }
        // Behind a pooler, the next transaction may run on another server connection,
        // where these statements do not exist: send them unnamed instead. Behind a
        // transaction pooler, so go the user's own named statements (pgpool-II keeps a
        // client's statements on the server connections of its session).
        if routing == Routing::Pooler {
            wire.behind_transaction_pooler();
        }
        let statements = if proxied || !self.context.prepared_statements {
            None
        } else {
            PoolStatements::prepare(&client, &wire).await?
        };
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
        if wire.status() != TxStatus::Idle && !crate::sabotage::status_ignored() {
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

/// pgpool-II's routing, or `None` when the connection does not go through pgpool-II.
/// Only pgpool-II answers `SHOW pool_status` itself (PostgreSQL, directly or behind
/// another pooler, refuses it: an error, which leaves the connection usable); its settings
/// decide whether the context statement and the user's statement run together.
async fn pgpool_routing(client: &tokio_postgres::Client) -> Option<Routing> {
    let rows = client.simple_query("SHOW pool_status").await.ok()?;
    let status = |item: &str| {
        rows.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(row) if row.get(0) == Some(item) => {
                Some(row.get(1).unwrap_or("").trim().to_owned())
            }
            _ => None,
        })
    };
    Some(match pgpool_split(&status) {
        _ if crate::sabotage::pgpool_trusted() => Routing::Pgpool,
        None => Routing::Pgpool,
        Some(why) => Routing::PgpoolSplits(why),
    })
}

/// Why pgpool-II with these settings (`status` looks an item of `SHOW pool_status` up)
/// may run a context statement and the statement after it apart, or `None` when it
/// cannot. A setting missing or not understood counts against it: fail closed.
///
/// Two ways to lose the context were found on pgpool-II 4.3:
/// - Routing. The context statement calls `set_config`, a volatile function: a write to
///   pgpool-II, sent to the primary, while the read after it goes to the session's
///   load-balancing node. Safe: load balancing off, or `disable_load_balance_on_write =
///   'always'` (no read balanced after a write, until the session ends) with
///   `set_config` and `pg_catalog.set_config` in `write_function_list`.
/// - Catalog look-ups. The first time it meets a function (to learn its volatility, when
///   both function lists are empty) or a table (`check_temp_table = catalog`,
///   `check_unlogged_table = on`), pgpool-II sends a query of its own, with its own Sync,
///   in the middle of the client's statements: that Sync ends the implicit transaction
///   holding the transaction-local context, and the user's statement runs without it.
///   Safe: a function list set, `check_temp_table` `none` or `trace`,
///   `check_unlogged_table = off`.
pub(crate) fn pgpool_split(status: &dyn Fn(&str) -> Option<String>) -> Option<&'static str> {
    let list = |item: &str| {
        status(item).map(|v| {
            v.split(',')
                .map(|f| f.trim().to_owned())
                .filter(|f| !f.is_empty())
                .collect::<Vec<_>>()
        })
    };
    let (Some(read_only), Some(write)) =
        (list("read_only_function_list"), list("write_function_list"))
    else {
        return Some("function lists not reported");
    };
    if read_only.is_empty() && write.is_empty() {
        return Some(
            "both function lists are empty, so pgpool-II looks each new function up in the \
             catalog in the middle of a transaction",
        );
    }
    // check_temp_table: 1 catalog, 2 trace, 3 none (on and off are catalog and none).
    if !matches!(
        status("check_temp_table").as_deref(),
        Some("2" | "3" | "trace" | "none" | "off")
    ) {
        return Some(
            "check_temp_table looks tables up in the catalog in the middle of a transaction",
        );
    }
    if !matches!(status("check_unlogged_table").as_deref(), Some("0" | "off")) {
        return Some(
            "check_unlogged_table looks tables up in the catalog in the middle of a transaction",
        );
    }
    if matches!(status("load_balance_mode").as_deref(), Some("0" | "off")) {
        return None;
    }
    // disable_load_balance_on_write: 1 off, 2 transaction, 3 trans_transaction, 4 always,
    // 5 dml_adaptive.
    if !matches!(
        status("disable_load_balance_on_write").as_deref(),
        Some("4" | "always")
    ) {
        return Some(
            "load balancing sends a read after the context statement to another server \
             (disable_load_balance_on_write is not 'always')",
        );
    }
    let named = |f: &str| write.iter().any(|w| w == f);
    if !read_only.is_empty() || !named("set_config") || !named("pg_catalog.set_config") {
        return Some(
            "load balancing may send the context statement to another server than the \
             statements after it (write_function_list does not name set_config and \
             pg_catalog.set_config)",
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::pgpool_split;

    /// pgpool-II's defaults, as SHOW pool_status reports them, with `changes` over them.
    fn split(changes: &[(&str, &str)]) -> Option<&'static str> {
        let mut status = vec![
            ("load_balance_mode", "1"),
            ("disable_load_balance_on_write", "2"),
            ("read_only_function_list", ""),
            ("write_function_list", ""),
            ("check_temp_table", "1"),
            ("check_unlogged_table", "1"),
        ];
        for (k, v) in changes {
            status.retain(|(name, _)| name != k);
            status.push((k, v));
        }
        pgpool_split(&|item: &str| {
            status
                .iter()
                .find(|(k, _)| *k == item)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    const NO_LOOKUPS: [(&str, &str); 3] = [
        ("write_function_list", "nextval, setval"),
        ("check_temp_table", "3"),
        ("check_unlogged_table", "0"),
    ];
    const SET_CONFIG_WRITES: (&str, &str) = (
        "write_function_list",
        "nextval,setval,set_config,pg_catalog.set_config",
    );

    #[test]
    fn pgpool_defaults_split_a_context_from_its_statement() {
        assert!(split(&[]).is_some_and(|why| why.contains("function lists are empty")));
    }

    #[test]
    fn pgpool_without_catalog_look_ups_and_load_balancing_keeps_them_together() {
        assert_eq!(
            split(&[&NO_LOOKUPS[..], &[("load_balance_mode", "0")]].concat()),
            None
        );
        // Each look-up alone is enough to refuse.
        for undo in [
            ("write_function_list", ""),
            ("check_temp_table", "1"),
            ("check_unlogged_table", "1"),
        ] {
            let mut s = NO_LOOKUPS.to_vec();
            s.push(("load_balance_mode", "0"));
            s.push(undo);
            assert!(split(&s).is_some(), "{undo:?}");
        }
        // trace needs no catalog.
        let mut s = NO_LOOKUPS.to_vec();
        s.extend([("load_balance_mode", "0"), ("check_temp_table", "2")]);
        assert_eq!(split(&s), None);
    }

    #[test]
    fn pgpool_load_balancing_needs_always_and_set_config_as_a_write() {
        let mut s = NO_LOOKUPS.to_vec();
        s.push(("disable_load_balance_on_write", "4"));
        // set_config not named: pgpool-II takes it for a read.
        assert!(split(&s).is_some_and(|why| why.contains("set_config")));
        s.push(SET_CONFIG_WRITES);
        assert_eq!(split(&s), None);
        for on_write in ["1", "2", "3", "5", "x"] {
            let mut t = s.clone();
            t.push(("disable_load_balance_on_write", on_write));
            assert!(split(&t).is_some(), "{on_write}");
        }
        // A read-only list alongside: refused.
        s.push(("read_only_function_list", "lower"));
        assert!(split(&s).is_some());
    }

    #[test]
    fn pgpool_settings_not_reported_count_against_it() {
        assert!(pgpool_split(&|_: &str| None).is_some());
    }
}
