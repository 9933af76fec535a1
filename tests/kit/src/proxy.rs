//! A loopback TCP proxy that counts client-to-server flights and injects latency.
//!
//! [`FlightProxy`] sits between a client and a real server (a PostgreSQL, a PgBouncer) so
//! that tests can prove "this operation cost exactly N round trips" and benches can run
//! against a simulated network instead of a sub-millisecond loopback.
//!
//! It uses OS threads, not tokio: the injected latency must be precise, and tokio's timer
//! wheel rounds to whole milliseconds, which would swamp a 1 ms simulated network. Each
//! proxied connection has, per direction, a reader thread that timestamps chunks as they
//! arrive and a writer thread that forwards each chunk once its delay has elapsed, so
//! chunks keep their order and the delay does not accumulate across chunks.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long a new connection may take to reach the upstream; bounds how long a `Drop`
/// racing with a connect to an unresponsive upstream can wait.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest chunk read at once; a PostgreSQL exchange in a test fits easily, so a burst is
/// normally seen (and counted) as one chunk.
const CHUNK: usize = 64 * 1024;

/// Longest uninterrupted sleep of a writer, so that closing a connection is noticed even
/// while a (possibly huge) delay is pending.
const SLEEP_SLICE: Duration = Duration::from_millis(20);

/// Errors starting a [`FlightProxy`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The listening socket on 127.0.0.1 could not be bound.
    #[error("cannot bind the proxy's listening socket: {0}")]
    Bind(#[source] io::Error),
    /// Another I/O operation failed while setting the proxy up (configuring the listener,
    /// spawning its thread).
    #[error("proxy I/O error: {0}")]
    Io(#[from] io::Error),
}

/// A loopback TCP proxy that counts client-to-server *flights* and can add latency.
///
/// Start it in front of a server with [`FlightProxy::start`] and point the client at
/// [`FlightProxy::addr`]. Every accepted connection is forwarded to the upstream address
/// over a fresh TCP connection.
///
/// Dropping the proxy stops accepting, closes every proxied connection and joins its
/// threads; it never panics and does not hang (sockets are shut down, which unblocks every
/// thread).
pub struct FlightProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

/// State shared by the proxy handle, the accept thread and every connection.
struct Shared {
    upstream: SocketAddr,
    flights: AtomicU64,
    /// Client-to-server protocol messages seen, by type byte.
    messages: [AtomicU64; 256],
    connections: AtomicUsize,
    /// One-way delay in nanoseconds (saturated), read when a chunk arrives.
    delay_nanos: AtomicU64,
    stop: AtomicBool,
    next_id: AtomicU64,
    /// Open connections, so that `Drop` can shut their sockets down. Registration checks
    /// `stop` under this lock, so no connection can slip in after `Drop` swept it.
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// One supervisor thread per connection; joined by `Drop`.
    supervisors: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_nanos.load(Ordering::Relaxed))
    }
}

/// Locks, ignoring poisoning: a panicking thread must not wedge the proxy or its `Drop`.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl FlightProxy {
    /// Starts a proxy on `127.0.0.1:0` (an ephemeral port) that forwards to `upstream`,
    /// delaying every chunk by `one_way_delay` in each direction (so a round trip costs
    /// about twice that on top of the real one).
    ///
    /// # Errors
    /// [`ProxyError::Bind`] if no loopback port can be bound, [`ProxyError::Io`] if the
    /// listener cannot be configured or its thread spawned. Failures to reach the upstream
    /// happen later, per connection: that client's connection is closed.
    pub fn start(upstream: SocketAddr, one_way_delay: Duration) -> Result<Self, ProxyError> {
        let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
            .map_err(ProxyError::Bind)?;
        let addr = listener.local_addr()?;
        // Nonblocking and polled: a blocked accept() cannot be interrupted portably, and
        // the proxy must stop promptly on drop.
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            upstream,
            flights: AtomicU64::new(0),
            messages: std::array::from_fn(|_| AtomicU64::new(0)),
            connections: AtomicUsize::new(0),
            delay_nanos: AtomicU64::new(nanos(one_way_delay)),
            stop: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            supervisors: Mutex::new(Vec::new()),
        });
        let accept_shared = Arc::clone(&shared);
        let accept_thread = thread::Builder::new()
            .name(format!("flight-proxy-accept-{}", addr.port()))
            .spawn(move || accept_loop(&listener, &accept_shared))?;
        Ok(Self {
            addr,
            shared,
            accept_thread: Some(accept_thread),
        })
    }

    /// The address clients connect to (`127.0.0.1` and an ephemeral port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Client-to-server flights so far, over all connections.
    ///
    /// A *flight* is a burst of client-to-server bytes sent while the server has not yet
    /// answered. Each connection keeps an "awaiting a new flight" flag, set when the
    /// connection opens and whenever server-to-client bytes are forwarded; when bytes from
    /// the client arrive while the flag is set, one flight is counted and the flag cleared.
    /// So messages pipelined before any answer count as one flight, and each
    /// request/response exchange counts one.
    ///
    /// The count includes the client's startup and authentication exchanges: measure with
    /// [`reset_flights`](Self::reset_flights) or a delta after connecting.
    pub fn flights(&self) -> u64 {
        self.shared.flights.load(Ordering::SeqCst)
    }

    /// Resets the flight counter and the message counts to zero (per-connection flags are
    /// kept).
    pub fn reset_flights(&self) {
        self.shared.flights.store(0, Ordering::SeqCst);
        for count in &self.shared.messages {
            count.store(0, Ordering::SeqCst);
        }
    }

    /// Client-to-server PostgreSQL protocol messages of this type byte seen so far, over
    /// all connections: `b'S'` counts Syncs, `b'Q'` simple queries, `b'E'` Executes. Startup
    /// packets (which carry no type byte) are not counted. Messages are counted as their
    /// whole header arrives, before they are forwarded.
    ///
    /// Counts are meaningful for PostgreSQL traffic in plaintext only; reset them with
    /// [`reset_flights`](Self::reset_flights).
    pub fn messages(&self, type_byte: u8) -> u64 {
        self.shared.messages[usize::from(type_byte)].load(Ordering::SeqCst)
    }

    /// Syncs sent by clients so far: `messages(b'S')`.
    pub fn syncs(&self) -> u64 {
        self.messages(b'S')
    }

    /// Proxied connections currently open (connected to the upstream and not yet closed
    /// on both sides).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Changes the one-way delay; it applies to chunks read from now on (chunks already
    /// waiting keep theirs, and order is always kept).
    pub fn set_delay(&self, one_way: Duration) {
        self.shared
            .delay_nanos
            .store(nanos(one_way), Ordering::Relaxed);
    }
}

impl std::fmt::Debug for FlightProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlightProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .field("delay", &self.shared.delay())
            .field("flights", &self.flights())
            .field("connections", &self.connections())
            .finish()
    }
}

impl Drop for FlightProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // The accept loop polls `stop` every millisecond; once it is joined no new
        // supervisor can be spawned.
        if let Some(handle) = self.accept_thread.take() {
            let _ = handle.join();
        }
        // Shutting the sockets down unblocks every reader and writer; supervisors that
        // have not registered yet see `stop` under the same lock and give up.
        for conn in lock(&self.shared.conns).values() {
            conn.abort();
        }
        let supervisors = std::mem::take(&mut *lock(&self.shared.supervisors));
        for handle in supervisors {
            let _ = handle.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                let conn_shared = Arc::clone(shared);
                let spawned = thread::Builder::new()
                    .name(format!("flight-proxy-conn-{id}"))
                    .spawn(move || supervise(id, client, &conn_shared));
                // A failed spawn drops the client socket, closing that connection: the
                // client sees a reset, as with a server out of resources.
                if let Ok(handle) = spawned {
                    let mut supervisors = lock(&shared.supervisors);
                    // Prune finished supervisors so that long benches do not accumulate
                    // handles.
                    supervisors.retain(|h| !h.is_finished());
                    supervisors.push(handle);
                }
            }
            // WouldBlock is the idle case; other errors (e.g. out of file descriptors) are
            // retried after the same pause instead of spinning.
            Err(_) => thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// One proxied connection: both sockets, so that any thread can tear the pair down.
struct Conn {
    client: TcpStream,
    upstream: TcpStream,
    /// Set once the connection is being torn down; writers stop waiting out delays.
    closed: AtomicBool,
    /// See [`FlightProxy::flights`].
    awaiting_new_flight: AtomicBool,
}

impl Conn {
    /// Tears the whole connection down after an error or on proxy drop: shutting both
    /// sockets down in both directions unblocks every thread of the connection.
    fn abort(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.upstream.shutdown(Shutdown::Both);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    ClientToServer,
    ServerToClient,
}

/// A chunk read from one side, to be written to the other at `due` (`None`: the delay
/// overflowed `Instant`, i.e. never, until the connection closes).
struct Chunk {
    due: Option<Instant>,
    bytes: Vec<u8>,
}

fn supervise(id: u64, client: TcpStream, shared: &Arc<Shared>) {
    let Some(conn) = open(client, shared) else {
        return;
    };
    {
        let mut conns = lock(&shared.conns);
        if shared.stop.load(Ordering::SeqCst) {
            drop(conns);
            conn.abort();
            return;
        }
        conns.insert(id, Arc::clone(&conn));
    }
    shared.connections.fetch_add(1, Ordering::SeqCst);

    let handles = [Direction::ClientToServer, Direction::ServerToClient]
        .into_iter()
        .flat_map(|dir| spawn_direction(id, dir, &conn, shared))
        .collect::<Vec<_>>();
    if handles.len() < 4 {
        // A thread could not be spawned: a half-working connection would hang its client,
        // so close it.
        conn.abort();
    }
    for handle in handles {
        let _ = handle.join();
    }

    lock(&shared.conns).remove(&id);
    // Dropping the last handle closes both sockets before the connection stops counting,
    // so a caller that sees `connections()` drop knows the upstream was closed.
    drop(conn);
    shared.connections.fetch_sub(1, Ordering::SeqCst);
}

/// Connects to the upstream and configures both sockets; `None` closes the client.
fn open(client: TcpStream, shared: &Shared) -> Option<Arc<Conn>> {
    let upstream = TcpStream::connect_timeout(&shared.upstream, CONNECT_TIMEOUT).ok()?;
    // Accepted sockets inherit the listener's nonblocking mode on some platforms; the
    // forwarding threads need blocking I/O.
    client.set_nonblocking(false).ok()?;
    // Nagle's algorithm would hold small messages back for tens of milliseconds (waiting
    // for delayed ACKs), adding latency the proxy does not mean to inject.
    client.set_nodelay(true).ok()?;
    upstream.set_nodelay(true).ok()?;
    Some(Arc::new(Conn {
        client,
        upstream,
        closed: AtomicBool::new(false),
        awaiting_new_flight: AtomicBool::new(true),
    }))
}

/// Spawns the reader and the writer of one direction; returns those that started.
fn spawn_direction(
    id: u64,
    dir: Direction,
    conn: &Arc<Conn>,
    shared: &Arc<Shared>,
) -> Vec<JoinHandle<()>> {
    let tag = match dir {
        Direction::ClientToServer => "c2s",
        Direction::ServerToClient => "s2c",
    };
    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::with_capacity(2);
    let (reader_conn, reader_shared) = (Arc::clone(conn), Arc::clone(shared));
    if let Ok(h) = thread::Builder::new()
        .name(format!("flight-proxy-{id}-{tag}-read"))
        .spawn(move || read_side(dir, &reader_conn, &reader_shared, &tx))
    {
        handles.push(h);
    }
    let writer_conn = Arc::clone(conn);
    if let Ok(h) = thread::Builder::new()
        .name(format!("flight-proxy-{id}-{tag}-write"))
        .spawn(move || write_side(dir, &writer_conn, &rx))
    {
        handles.push(h);
    }
    handles
}

/// Reads chunks from the source side, stamps them with their due time and queues them.
/// Returning drops the sender, which tells the writer that the source reached EOF.
fn read_side(dir: Direction, conn: &Conn, shared: &Shared, tx: &Sender<Chunk>) {
    let mut source = match dir {
        Direction::ClientToServer => &conn.client,
        Direction::ServerToClient => &conn.upstream,
    };
    let mut buf = vec![0u8; CHUNK];
    let mut frames = FrontendFrames::default();
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                conn.abort();
                return;
            }
        };
        // The delay runs from the moment the bytes arrived, so time spent queued behind
        // earlier chunks does not add to it.
        let read_at = Instant::now();
        if dir == Direction::ClientToServer
            && conn.awaiting_new_flight.swap(false, Ordering::SeqCst)
        {
            shared.flights.fetch_add(1, Ordering::SeqCst);
        }
        if dir == Direction::ClientToServer {
            frames.feed(&buf[..n], &shared.messages);
        }
        let chunk = Chunk {
            due: read_at.checked_add(shared.delay()),
            bytes: buf[..n].to_vec(),
        };
        if tx.send(chunk).is_err() {
            // The writer is gone, so it failed and already aborted the connection.
            return;
        }
    }
}

/// Follows the frames of the client-to-server stream across chunk boundaries, to count
/// messages by type. The stream opens with untagged packets (a length, then a code): an
/// SSL or GSS encryption request, after which the client sends another, then the startup
/// packet; every later message is a type byte and a length.
#[derive(Default)]
struct FrontendFrames {
    /// The startup packet has been seen.
    started: bool,
    /// Header bytes collected so far (4 for an untagged packet, 5 for a message).
    header: [u8; 8],
    have: usize,
    /// Body bytes still to skip of the current frame.
    skip: usize,
}

impl FrontendFrames {
    /// Codes of the untagged requests that precede the startup packet.
    const SSL_REQUEST: u32 = 80_877_103;
    const GSSENC_REQUEST: u32 = 80_877_104;

    fn feed(&mut self, mut bytes: &[u8], counts: &[AtomicU64; 256]) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            // An untagged packet is read up to its code (8 bytes); a message up to its
            // length (5 bytes).
            let want = if self.started { 5 } else { 8 };
            let n = (want - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have < want {
                continue;
            }
            self.have = 0;
            let word = |at: usize| {
                u32::from_be_bytes([
                    self.header[at],
                    self.header[at + 1],
                    self.header[at + 2],
                    self.header[at + 3],
                ])
            };
            if self.started {
                counts[usize::from(self.header[0])].fetch_add(1, Ordering::SeqCst);
                self.skip = (word(1) as usize).saturating_sub(4);
            } else {
                let code = word(4);
                self.started = code != Self::SSL_REQUEST && code != Self::GSSENC_REQUEST;
                self.skip = (word(0) as usize).saturating_sub(8);
            }
        }
    }
}

/// Writes queued chunks to the destination side once due; on the source's EOF, propagates
/// it with a write shutdown so that half-closed protocols keep working.
fn write_side(dir: Direction, conn: &Conn, rx: &Receiver<Chunk>) {
    let mut dest = match dir {
        Direction::ClientToServer => &conn.upstream,
        Direction::ServerToClient => &conn.client,
    };
    while let Ok(chunk) = rx.recv() {
        if !wait_until(chunk.due, conn) {
            return;
        }
        if dir == Direction::ServerToClient {
            // Set before writing: once the bytes are written the client may answer at
            // once, and its answer must find the flag set. (Set after, a fast client could
            // race ahead and its next request would go uncounted.)
            conn.awaiting_new_flight.store(true, Ordering::SeqCst);
        }
        if dest.write_all(&chunk.bytes).is_err() {
            conn.abort();
            return;
        }
    }
    let _ = dest.shutdown(Shutdown::Write);
}

/// Sleeps until `due`; `false` if the connection closed meanwhile.
fn wait_until(due: Option<Instant>, conn: &Conn) -> bool {
    loop {
        if conn.closed.load(Ordering::SeqCst) {
            return false;
        }
        let left = match due {
            Some(due) => due.saturating_duration_since(Instant::now()),
            None => SLEEP_SLICE,
        };
        if left.is_zero() {
            return true;
        }
        // thread::sleep is precise to tens of microseconds on Linux (hrtimers); slices
        // keep a pending delay from holding up the teardown for long.
        thread::sleep(left.min(SLEEP_SLICE));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn frontend_messages_are_counted_across_any_chunking() {
        let mut stream = Vec::new();
        // An SSL request refused, then the startup packet.
        stream.extend_from_slice(&8u32.to_be_bytes());
        stream.extend_from_slice(&FrontendFrames::SSL_REQUEST.to_be_bytes());
        let startup = b"\0\x03\0\0user\0u\0\0";
        stream.extend_from_slice(&(startup.len() as u32 + 4).to_be_bytes());
        stream.extend_from_slice(startup);
        for _ in 0..3 {
            // A body holding an 'S' byte, so a lost frame boundary would miscount.
            stream.extend(message(b'B', b"\0S\0S\0\0\0\0\0\0"));
            stream.extend(message(b'E', b"\0\0\0\0\0"));
            stream.extend(message(b'S', b""));
        }
        stream.extend(message(b'Q', b"SELECT 1\0"));
        for chunk in [1, 2, 3, 5, 7, 64, stream.len()] {
            let counts: [AtomicU64; 256] = std::array::from_fn(|_| AtomicU64::new(0));
            let mut frames = FrontendFrames::default();
            for piece in stream.chunks(chunk) {
                frames.feed(piece, &counts);
            }
            let count = |t: u8| counts[usize::from(t)].load(Ordering::SeqCst);
            assert_eq!(
                (count(b'S'), count(b'B'), count(b'E'), count(b'Q')),
                (3, 3, 3, 1),
                "chunks of {chunk}"
            );
            assert_eq!(
                counts.iter().map(|c| c.load(Ordering::SeqCst)).sum::<u64>(),
                10
            );
        }
    }
}
