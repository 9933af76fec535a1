//! Why a PostgreSQL connection could not be opened.

use std::io;

/// Why the PostgreSQL backend could not open a connection (the `Backend` variant of
/// [`PoolError`](super::PoolError)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server or the protocol failed: authentication, TLS, start-up, a statement the
    /// pool runs at connect.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// No socket could be opened to a host.
    #[error("could not connect to {host}: {source}")]
    Connect {
        /// The host (and port) tried last.
        host: String,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// Connecting to a host took longer than `connect_timeout`.
    #[error("connecting to {host} timed out")]
    ConnectTimeout {
        /// The host (and port) tried last.
        host: String,
    },
    /// The TLS connector could not be set up for a host.
    #[error("TLS set-up for {host} failed: {message}")]
    Tls {
        /// The host.
        host: String,
        /// The connector's error.
        message: String,
    },
    /// The configuration names no host to connect to.
    #[error("no host configured")]
    NoHost,
    /// Every host was reachable, but none had the session attributes that
    /// `target_session_attrs` asks for (read-write or read-only).
    #[error("no host is {wanted} (target_session_attrs)")]
    NoSuitableHost {
        /// What was asked for.
        wanted: &'static str,
    },
}

impl Error {
    /// The tokio-postgres error, when this is one.
    pub fn as_postgres(&self) -> Option<&tokio_postgres::Error> {
        match self {
            Self::Postgres(e) => Some(e),
            _ => None,
        }
    }
}
