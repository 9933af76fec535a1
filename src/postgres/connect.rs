//! Opening a connection: a socket to each configured host in turn (TCP or Unix), the wire
//! layer over it (over the TLS session when there is one), tokio-postgres's start-up
//! through the layer, and the session attributes `target_session_attrs` asks for.
//!
//! tokio-postgres's own `connect` cannot take a stream of ours, so this module does what
//! it would: resolve, connect with a timeout, set the socket options, negotiate TLS.

use std::any::TypeId;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::task::JoinHandle;
use tokio_postgres::config::{Host, LoadBalanceHosts, TargetSessionAttrs};
use tokio_postgres::tls::{MakeTlsConnect, NoTls, TlsConnect};
use tokio_postgres::{Client, Config as PgConfig, SimpleQueryMessage};

use super::error::Error;
use super::wire::{WireHandle, WireStream, WireTls};

/// The socket beneath a pooled connection: what a TLS connector given to the pool
/// ([`MakeTlsConnect`]) wraps. Any connector generic over its stream works (`NoTls`,
/// `postgres-native-tls`, `postgres-openssl`, `tokio-postgres-rustls`).
#[derive(Debug)]
pub enum Socket {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix-domain socket connection.
    Unix(UnixStream),
}

macro_rules! each_socket {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Socket::Tcp($s) => $e,
            Socket::Unix($s) => $e,
        }
    };
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each_socket!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each_socket!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_socket!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_socket!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// An open connection: the client, the task driving its connection, its wire layer.
pub(crate) struct Opened {
    pub(crate) client: Client,
    pub(crate) task: JoinHandle<()>,
    pub(crate) wire: WireHandle,
    /// The local port of a TCP connection (`None` over a Unix socket): a server reached
    /// directly sees it as `inet_client_port()`.
    pub(crate) local_port: Option<u16>,
}

/// The bounds a pool's TLS connector meets.
pub(crate) trait MakeTls:
    MakeTlsConnect<Socket, TlsConnect = Self::Connect, Stream = Self::TlsStream>
    + Clone
    + Send
    + Sync
    + 'static
{
    type Connect: TlsConnect<Socket, Stream = Self::TlsStream, Future = Self::TlsFuture>
        + Send
        + 'static;
    type TlsStream: tokio_postgres::tls::TlsStream + Unpin + Send + 'static;
    type TlsFuture: Send + 'static;
}

impl<T> MakeTls for T
where
    T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
    T::TlsConnect: Send + 'static,
    T::Stream: Send + 'static,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send + 'static,
{
    type Connect = T::TlsConnect;
    type TlsStream = T::Stream;
    type TlsFuture = <T::TlsConnect as TlsConnect<Socket>>::Future;
}

/// One place to connect to.
struct Target<'a> {
    host: Option<&'a Host>,
    addr: Option<IpAddr>,
    port: u16,
}

impl Target<'_> {
    fn describe(&self) -> String {
        match (self.host, self.addr) {
            (Some(Host::Tcp(h)), _) => format!("{h}:{}", self.port),
            (Some(Host::Unix(p)), _) => format!("{}/.s.PGSQL.{}", p.display(), self.port),
            (None, Some(a)) => SocketAddr::new(a, self.port).to_string(),
            (None, None) => "?".to_owned(),
        }
    }

    /// The name a TLS certificate is checked against.
    fn tls_name(&self) -> String {
        match (self.host, self.addr) {
            (Some(Host::Tcp(h)), _) => h.clone(),
            (None, Some(a)) => a.to_string(),
            _ => String::new(),
        }
    }
}

/// Opens a connection to the first suitable host of `config`.
pub(crate) async fn open<T: MakeTls>(config: &PgConfig, tls: &T) -> Result<Opened, Error> {
    let hosts = config.get_hosts();
    let addrs = config.get_hostaddrs();
    let ports = config.get_ports();
    let count = hosts.len().max(addrs.len());
    if count == 0 {
        return Err(Error::NoHost);
    }
    let mut order: Vec<usize> = (0..count).collect();
    if config.get_load_balance_hosts() == LoadBalanceHosts::Random {
        shuffle(&mut order);
    }
    let mut last = None;
    for i in order {
        let target = Target {
            host: hosts.get(i),
            addr: addrs.get(i).copied(),
            port: ports
                .get(i)
                .or_else(|| ports.first())
                .copied()
                .unwrap_or(5432),
        };
        match open_one(config, tls, &target).await {
            Ok(opened) => return Ok(opened),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(Error::NoHost))
}

async fn open_one<T: MakeTls>(
    config: &PgConfig,
    tls: &T,
    target: &Target<'_>,
) -> Result<Opened, Error> {
    let socket = match config.get_connect_timeout() {
        Some(limit) => tokio::time::timeout(*limit, socket(config, target))
            .await
            .map_err(|_| Error::ConnectTimeout {
                host: target.describe(),
            })??,
        None => socket(config, target).await?,
    };
    let local_port = match &socket {
        Socket::Tcp(tcp) => tcp.local_addr().ok().map(|a| a.port()),
        Socket::Unix(_) => None,
    };
    let wire = WireHandle::new();
    let stream = WireStream::new(socket, wire.clone());
    let (client, task) = if TypeId::of::<T>() == TypeId::of::<NoTls>() {
        // NoTls must stay NoTls: it tells tokio-postgres not to ask the server for TLS.
        let (client, connection) = config.connect_raw(stream, NoTls).await?;
        (client, spawn(connection))
    } else {
        let connector = tls
            .clone()
            .make_tls_connect(&target.tls_name())
            .map_err(|e| Error::Tls {
                host: target.describe(),
                message: e.into().to_string(),
            })?;
        let (client, connection) = config.connect_raw(stream, WireTls(connector)).await?;
        (client, spawn(connection))
    };
    let wanted = match config.get_target_session_attrs() {
        TargetSessionAttrs::ReadWrite => Some(("off", "read-write")),
        TargetSessionAttrs::ReadOnly => Some(("on", "read-only")),
        _ => None,
    };
    if let Some((value, wanted)) = wanted {
        let rows = client.simple_query("SHOW transaction_read_only").await?;
        let read_only = rows.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0),
            _ => None,
        });
        if read_only != Some(value) {
            task.abort();
            return Err(Error::NoSuitableHost { wanted });
        }
    }
    Ok(Opened {
        client,
        task,
        wire,
        local_port,
    })
}

fn spawn<F, E>(connection: F) -> JoinHandle<()>
where
    F: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "ctxpool: postgres connection ended");
        }
    })
}

async fn socket(config: &PgConfig, target: &Target<'_>) -> Result<Socket, Error> {
    let describe = || target.describe();
    let io = |source| Error::Connect {
        host: describe(),
        source,
    };
    match (target.host, target.addr) {
        (Some(Host::Unix(dir)), _) => {
            let path = dir.join(format!(".s.PGSQL.{}", target.port));
            Ok(Socket::Unix(UnixStream::connect(path).await.map_err(io)?))
        }
        (host, addr) => {
            let addrs: Vec<SocketAddr> = match (addr, host) {
                (Some(a), _) => vec![SocketAddr::new(a, target.port)],
                (None, Some(Host::Tcp(h))) => tokio::net::lookup_host((h.as_str(), target.port))
                    .await
                    .map_err(io)?
                    .collect(),
                _ => Vec::new(),
            };
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            for a in addrs {
                match TcpStream::connect(a).await {
                    Ok(tcp) => {
                        tune(&tcp, config).map_err(io)?;
                        return Ok(Socket::Tcp(tcp));
                    }
                    Err(e) => last = e,
                }
            }
            Err(io(last))
        }
    }
}

/// The TCP options of the configuration: no Nagle delay, keepalives, user timeout.
fn tune(tcp: &TcpStream, config: &PgConfig) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let sock = SockRef::from(tcp);
    if config.get_keepalives() {
        let mut keepalive = TcpKeepalive::new().with_time(config.get_keepalives_idle());
        if let Some(interval) = config.get_keepalives_interval() {
            keepalive = keepalive.with_interval(interval);
        }
        if let Some(retries) = config.get_keepalives_retries() {
            keepalive = keepalive.with_retries(retries);
        }
        sock.set_tcp_keepalive(&keepalive)?;
    }
    #[cfg(target_os = "linux")]
    if let Some(timeout) = config.get_tcp_user_timeout() {
        sock.set_tcp_user_timeout(Some(*timeout))?;
    }
    Ok(())
}

/// Shuffles `order` (load_balance_hosts=random); not cryptographic, and need not be.
fn shuffle(order: &mut [usize]) {
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64)
        | 1;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
}
