//! The pool's configuration as data: what a service keeps in a file or the environment.
//!
//! The field names and their meaning match deadpool-postgres 0.14, so a configuration
//! written for it (and the code that fills one in) works after the import changes; the
//! one addition is [`Config::context`]. Unlike deadpool-postgres, every connection field
//! reaches the connection, `target_session_attrs`, `channel_binding` and
//! `load_balance_hosts` included.

use std::{net::IpAddr, str::FromStr, time::Duration};

use tokio_postgres::config::{
    ChannelBinding as PgChannelBinding, LoadBalanceHosts as PgLoadBalanceHosts,
    SslMode as PgSslMode, TargetSessionAttrs as PgTargetSessionAttrs,
};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};

use super::Socket;
use super::mapping::ContextConfig;
use super::{Manager, Pool, PoolBuilder, PoolConfig, Runtime};

pub use super::CreatePoolError;

/// Where and how to connect, how to recycle, how large a pool, and how contexts map onto
/// the session. Every field is optional; [`Config::get_pg_config`] says what an unset one
/// becomes.
///
/// It (de)serializes with serde, so it can come from a file or from the environment, for
/// instance through the `config` crate with `__` as the separator:
///
/// ```text
/// PG__URL=postgres://hr_app@db.internal/hr
/// PG__POOL__MAX_SIZE=16
/// PG__POOL__TIMEOUTS__WAIT__SECS=5
/// PG__POOL__TIMEOUTS__WAIT__NANOS=0
/// ```
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let cfg: ctxpool::postgres::Config = serde_json::from_str(
///     r#"{"url": "postgres://hr_app@db.internal/hr", "pool": {"max_size": 16}}"#,
/// )?;
/// assert_eq!(cfg.get_pg_config()?.get_dbname(), Some("hr"));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct Config {
    /// A connection URL or key-value string, read first. The other fields then override
    /// what it set, except `host`/`hosts`, `hostaddr`/`hostaddrs` and `port`/`ports`,
    /// which add to its lists.
    pub url: Option<String>,
    /// The login role ([`tokio_postgres::Config::user`]); empty counts as unset. Unset
    /// everywhere, the `USER` environment variable is used.
    pub user: Option<String>,
    /// The login's password ([`tokio_postgres::Config::password`]).
    pub password: Option<String>,
    /// The database ([`tokio_postgres::Config::dbname`]). Required, here or in `url`.
    pub dbname: Option<String>,
    /// Command-line options for the server process ([`tokio_postgres::Config::options`]).
    pub options: Option<String>,
    /// The name the server shows in `pg_stat_activity`
    /// ([`tokio_postgres::Config::application_name`]).
    pub application_name: Option<String>,
    /// Whether to use TLS ([`tokio_postgres::Config::ssl_mode`]).
    pub ssl_mode: Option<SslMode>,
    /// One host name or Unix socket directory. A separate field from `hosts` so that a
    /// single host fits in one environment variable.
    pub host: Option<String>,
    /// Several hosts, tried in order (or shuffled, see `load_balance_hosts`).
    pub hosts: Option<Vec<String>>,
    /// One host address, which spares the name lookup
    /// ([`tokio_postgres::Config::hostaddr`]).
    pub hostaddr: Option<IpAddr>,
    /// Several host addresses, one per host.
    pub hostaddrs: Option<Vec<IpAddr>>,
    /// One port, for every host.
    pub port: Option<u16>,
    /// One port per host.
    pub ports: Option<Vec<u16>>,
    /// How long one connection attempt may take
    /// ([`tokio_postgres::Config::connect_timeout`]). The pool's own create timeout
    /// bounds all attempts together.
    pub connect_timeout: Option<Duration>,
    /// Whether TCP keepalives are on ([`tokio_postgres::Config::keepalives`]).
    pub keepalives: Option<bool>,
    /// Idle time before the first keepalive ([`tokio_postgres::Config::keepalives_idle`]).
    pub keepalives_idle: Option<Duration>,
    /// What the chosen server must be: any, writable (a primary) or read-only (a standby).
    pub target_session_attrs: Option<TargetSessionAttrs>,
    /// Whether SCRAM channel binding is used ([`tokio_postgres::Config::channel_binding`]).
    pub channel_binding: Option<ChannelBinding>,
    /// Whether the hosts are tried in a random order.
    pub load_balance_hosts: Option<LoadBalanceHosts>,
    /// How a returning connection is checked; `None` is [`ManagerConfig::default`].
    pub manager: Option<ManagerConfig>,
    /// Size and timeouts of the pool; `None` is [`PoolConfig::default`].
    pub pool: Option<PoolConfig>,
    /// How end-user security contexts map onto the session: ctxpool's addition. `None` is
    /// [`ContextConfig::default`].
    pub context: Option<ContextConfig>,
}

/// A configuration that cannot produce a connection.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `url` does not parse as a connection URL or key-value string.
    #[error("configuration property \"url\" is invalid: {0}")]
    InvalidUrl(#[source] tokio_postgres::Error),
    /// Neither `dbname` nor `url` names a database.
    #[error("configuration property \"dbname\" not found")]
    DbnameMissing,
    /// The database name is the empty string.
    #[error("configuration property \"dbname\" contains an empty string")]
    DbnameEmpty,
}

impl Config {
    /// An empty configuration, the same as [`Config::default`].
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds the pool in one step: [`Config::builder`], the runtime if given, then
    /// `build`.
    ///
    /// # Errors
    /// [`CreatePoolError::Config`] for an unusable configuration,
    /// [`CreatePoolError::Build`] if the pool cannot be built.
    pub fn create_pool<T>(&self, runtime: Option<Runtime>, tls: T) -> Result<Pool, CreatePoolError>
    where
        T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
        T::Stream: Sync + Send,
        T::TlsConnect: Send + 'static,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send + 'static,
    {
        let builder = self.builder(tls).map_err(CreatePoolError::Config)?;
        let builder = match runtime {
            Some(runtime) => builder.runtime(runtime),
            None => builder,
        };
        builder.build().map_err(CreatePoolError::Build)
    }

    /// A pool builder with this configuration's manager, context mapping and pool
    /// settings, for callers that add a provider, hooks or a runtime before building.
    ///
    /// # Errors
    /// A [`ConfigError`] if the connection settings are unusable.
    pub fn builder<T>(&self, tls: T) -> Result<PoolBuilder, ConfigError>
    where
        T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
        T::Stream: Sync + Send,
        T::TlsConnect: Send + 'static,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send + 'static,
    {
        let manager = Manager::from_config(self.get_pg_config()?, tls, self.get_manager_config())
            .with_context(self.context.clone().unwrap_or_default());
        Ok(Pool::builder(manager).config(self.get_pool_config()))
    }

    /// The tokio-postgres configuration the pool connects with.
    ///
    /// `url` comes first; the scalar fields then replace what it set and the list fields
    /// extend it. What stays unset: the user becomes `$USER`, and without any host the
    /// Unix socket directories `/run/postgresql`, `/var/run/postgresql` and `/tmp` are
    /// tried (`127.0.0.1` off Unix).
    ///
    /// # Errors
    /// [`ConfigError::InvalidUrl`], or [`ConfigError::DbnameMissing`] /
    /// [`ConfigError::DbnameEmpty`] when no usable database name is left.
    pub fn get_pg_config(&self) -> Result<tokio_postgres::Config, ConfigError> {
        let mut pg = match &self.url {
            Some(url) => tokio_postgres::Config::from_str(url).map_err(ConfigError::InvalidUrl)?,
            None => tokio_postgres::Config::new(),
        };
        self.apply_session_fields(&mut pg);
        match pg.get_dbname() {
            None => return Err(ConfigError::DbnameMissing),
            Some("") => return Err(ConfigError::DbnameEmpty),
            Some(_) => {}
        }
        self.apply_network_fields(&mut pg);
        Ok(pg)
    }

    /// Who logs in to which database, and how the session starts.
    fn apply_session_fields(&self, pg: &mut tokio_postgres::Config) {
        let non_empty = |field: &Option<String>| field.clone().filter(|s| !s.is_empty());
        if let Some(user) = non_empty(&self.user) {
            pg.user(user);
        }
        if pg.get_user().is_none_or(str::is_empty) {
            if let Ok(user) = std::env::var("USER") {
                pg.user(user);
            }
        }
        if let Some(password) = &self.password {
            pg.password(password);
        }
        if let Some(dbname) = non_empty(&self.dbname) {
            pg.dbname(dbname);
        }
        if let Some(options) = &self.options {
            pg.options(options);
        }
        if let Some(name) = &self.application_name {
            pg.application_name(name);
        }
        if let Some(mode) = self.ssl_mode {
            pg.ssl_mode(mode.into());
        }
        if let Some(binding) = self.channel_binding {
            pg.channel_binding(binding.into());
        }
        if let Some(attrs) = self.target_session_attrs {
            pg.target_session_attrs(attrs.into());
        }
    }

    /// Where the servers are and how the sockets behave.
    fn apply_network_fields(&self, pg: &mut tokio_postgres::Config) {
        for host in self.host.iter().chain(self.hosts.iter().flatten()) {
            pg.host(host);
        }
        if pg.get_hosts().is_empty() {
            if cfg!(unix) {
                for dir in ["/run/postgresql", "/var/run/postgresql", "/tmp"] {
                    pg.host(dir);
                }
            } else {
                pg.host("127.0.0.1");
            }
        }
        for addr in self.hostaddr.iter().chain(self.hostaddrs.iter().flatten()) {
            pg.hostaddr(*addr);
        }
        for port in self.port.iter().chain(self.ports.iter().flatten()) {
            pg.port(*port);
        }
        if let Some(timeout) = self.connect_timeout {
            pg.connect_timeout(timeout);
        }
        if let Some(on) = self.keepalives {
            pg.keepalives(on);
        }
        if let Some(idle) = self.keepalives_idle {
            pg.keepalives_idle(idle);
        }
        if let Some(order) = self.load_balance_hosts {
            pg.load_balance_hosts(order.into());
        }
    }

    /// The manager settings: `manager`, or the default.
    #[must_use]
    pub fn get_manager_config(&self) -> ManagerConfig {
        self.manager.clone().unwrap_or_default()
    }

    /// The pool settings: `pool`, or the default (finite timeouts).
    #[must_use]
    pub fn get_pool_config(&self) -> PoolConfig {
        self.pool.unwrap_or_default()
    }
}

/// What the pool checks when a connection comes back for reuse.
///
/// Whatever the method, the pool first requires the server to report the session idle (a
/// connection inside a transaction is discarded), and ctxpool's own reset of the session
/// (role, settings, cursors, listeners, locks, temporary objects) rides with the next
/// checkout's first statement. The method only adds work of its own on top.
#[derive(Clone, Debug, Eq, PartialEq, Default, serde::Deserialize, serde::Serialize)]
pub enum RecyclingMethod {
    /// No extra work: a closed connection is dropped, an open one is reused. The right
    /// choice with ctxpool, whose reset already does what [`Clean`](Self::Clean) does.
    #[default]
    Fast,
    /// One empty query, answered by the server before reuse: catches a connection that
    /// died without the client noticing, at a round trip per checkout.
    Verified,
    /// A round trip of clean-up statements, as deadpool-postgres runs them
    /// ([`RecyclingMethod::query`] shows them). Kept so a configuration that names it
    /// works; with ctxpool it only adds a round trip, as the reset follows anyway.
    Clean,
    /// A round trip running this SQL (simple query protocol). The reset follows it, so
    /// it cannot leave state behind for the next acquirer.
    Custom(String),
}

impl RecyclingMethod {
    /// The statements of [`RecyclingMethod::Clean`]: everything of `DISCARD ALL` except
    /// dropping prepared statements and plans, which the statement cache still needs.
    const CLEAN_SQL: &'static str = "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; \
        RESET ALL; UNLISTEN *; SELECT pg_advisory_unlock_all(); DISCARD TEMP; \
        DISCARD SEQUENCES;";

    /// The SQL this method runs at recycle: `None` for none, `Some("")` for the empty
    /// query of [`Verified`](Self::Verified).
    pub fn query(&self) -> Option<&str> {
        match self {
            Self::Fast => None,
            Self::Verified => Some(""),
            Self::Clean => Some(Self::CLEAN_SQL),
            Self::Custom(sql) => Some(sql),
        }
    }
}

/// The manager's settings.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct ManagerConfig {
    /// What is checked when a connection comes back (see [`RecyclingMethod`]).
    pub recycling_method: RecyclingMethod,
}

/// Declares a serde-capable enum and its one-to-one conversion into tokio-postgres's enum
/// of the same name (which has no serde support).
macro_rules! pg_enum {
    ($(#[$doc:meta])* $name:ident => $pg:ident { $($(#[$vdoc:meta])* $variant:ident,)+ }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Eq, PartialEq, serde::Deserialize, serde::Serialize)]
        #[non_exhaustive]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl From<$name> for $pg {
            fn from(value: $name) -> Self {
                match value {
                    $($name::$variant => Self::$variant,)+
                }
            }
        }
    };
}

pg_enum! {
    /// What the chosen server must be; with several hosts, the first that qualifies wins.
    TargetSessionAttrs => PgTargetSessionAttrs {
        /// Any server.
        Any,
        /// A server that accepts writes (a primary).
        ReadWrite,
        /// A server in read-only mode (a hot standby).
        ReadOnly,
    }
}

pg_enum! {
    /// Whether the connection uses TLS.
    SslMode => PgSslMode {
        /// Plain TCP only.
        Disable,
        /// TLS when the server offers it, plain otherwise.
        Prefer,
        /// TLS or no connection.
        Require,
    }
}

pg_enum! {
    /// Whether SCRAM authentication binds itself to the TLS channel.
    ChannelBinding => PgChannelBinding {
        /// Never.
        Disable,
        /// When the server supports it.
        Prefer,
        /// Always, or no connection.
        Require,
    }
}

pg_enum! {
    /// The order in which the hosts are tried.
    LoadBalanceHosts => PgLoadBalanceHosts {
        /// As listed.
        Disable,
        /// Shuffled for each connection.
        Random,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_json(text: &str) -> Config {
        serde_json::from_str(text).expect("a valid configuration")
    }

    #[test]
    fn fields_override_the_url_and_lists_extend_it() {
        let cfg = from_json(
            r#"{"url": "postgres://u1:pw1@h1:5001/db1?application_name=a1",
                "user": "u2", "dbname": "db2", "application_name": "a2",
                "host": "h2", "hosts": ["h3"], "port": 5002,
                "target_session_attrs": "ReadWrite", "load_balance_hosts": "Random",
                "channel_binding": "Require", "ssl_mode": "Disable"}"#,
        );
        let pg = cfg.get_pg_config().expect("usable");
        assert_eq!(pg.get_user(), Some("u2"));
        assert_eq!(pg.get_password(), Some(&b"pw1"[..]));
        assert_eq!(pg.get_dbname(), Some("db2"));
        assert_eq!(pg.get_application_name(), Some("a2"));
        let hosts: Vec<String> = pg
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        assert_eq!(hosts, ["h1", "h2", "h3"]);
        assert_eq!(pg.get_ports(), [5001, 5002]);
        assert_eq!(
            pg.get_target_session_attrs(),
            PgTargetSessionAttrs::ReadWrite
        );
        assert_eq!(pg.get_load_balance_hosts(), PgLoadBalanceHosts::Random);
        assert_eq!(pg.get_channel_binding(), PgChannelBinding::Require);
        assert_eq!(pg.get_ssl_mode(), PgSslMode::Disable);
    }

    #[test]
    fn empty_fields_do_not_override() {
        let cfg = from_json(r#"{"url": "postgres://u1@h1/db1", "user": "", "dbname": ""}"#);
        let pg = cfg.get_pg_config().expect("usable");
        assert_eq!(pg.get_user(), Some("u1"));
        assert_eq!(pg.get_dbname(), Some("db1"));
    }

    #[test]
    fn a_database_name_is_required() {
        assert!(matches!(
            from_json(r#"{"host": "h1"}"#).get_pg_config(),
            Err(ConfigError::DbnameMissing)
        ));
        assert!(matches!(
            from_json(r#"{"url": "host=h1 dbname=''"}"#).get_pg_config(),
            Err(ConfigError::DbnameEmpty)
        ));
        let err = from_json(r#"{"url": "postgres://h1:notaport/db"}"#)
            .get_pg_config()
            .expect_err("a bad port");
        assert!(
            err.to_string()
                .starts_with("configuration property \"url\" is invalid")
        );
    }

    #[test]
    fn without_a_host_the_socket_directories_are_tried() {
        let pg = from_json(r#"{"dbname": "db"}"#)
            .get_pg_config()
            .expect("usable");
        assert_eq!(pg.get_hosts().len(), if cfg!(unix) { 3 } else { 1 });
    }

    #[test]
    fn recycling_methods_name_their_sql() {
        assert_eq!(RecyclingMethod::Fast.query(), None);
        assert_eq!(RecyclingMethod::Verified.query(), Some(""));
        assert!(
            RecyclingMethod::Clean
                .query()
                .is_some_and(|sql| sql.contains("DISCARD TEMP"))
        );
        assert_eq!(
            RecyclingMethod::Custom("SELECT 1".into()).query(),
            Some("SELECT 1")
        );
    }
}
