//! The modelled server and the backend that connects to it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ctxpool::backend::{Backend, DiscardReason};

use crate::mem_connection::MemConnection;

/// Errors of the in-process backend, named after what a real server would say.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MemError {
    /// The session was killed or the connection lost.
    #[error("connection lost")]
    Lost,
    /// The server refused new connections.
    #[error("connection refused")]
    ConnectRefused,
    /// The server refused to apply the context (e.g. a refused token); the statement did
    /// not run.
    #[error("security context refused; the statement did not run")]
    ContextRefused,
    /// The statement failed (an injected error).
    #[error("statement failed")]
    StatementFailed,
    /// A statement was sent inside an aborted transaction.
    #[error("current transaction is aborted, commands ignored until end of transaction block")]
    InFailedTransaction,
}

/// Transaction status of a session, as PostgreSQL's ReadyForQuery reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum TxStatus {
    #[default]
    Idle,
    InTransaction,
    Failed,
}

/// Server-side state of one session.
#[derive(Debug, Default)]
pub(crate) struct Session {
    pub(crate) alive: bool,
    pub(crate) role: Option<String>,
    pub(crate) end_user: Option<String>,
    pub(crate) data_roles: Vec<String>,
    pub(crate) tx: TxStatus,
}

pub(crate) type SessionCell = Arc<Mutex<Session>>;

/// Locks, ignoring poisoning: a test task that panicked must not wedge the server model.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counters the server keeps; read with [`MemServer::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections opened.
    pub connects: u64,
    /// Client-to-server flights (round trips).
    pub flights: u64,
    /// Statements executed (context statements included).
    pub statements: u64,
    /// Sessions alive now.
    pub live_sessions: usize,
}

#[derive(Default)]
struct State {
    next_id: AtomicU64,
    connects: AtomicU64,
    flights: AtomicU64,
    statements: AtomicU64,
    sessions: Mutex<HashMap<u64, SessionCell>>,
    refused: Mutex<HashSet<String>>,
    failing_connects: AtomicUsize,
    hang_connects: AtomicBool,
    hang_recycles: AtomicBool,
    latency_yields: AtomicUsize,
}

/// The modelled server. Cheap to clone; clones share one server.
#[derive(Clone, Default)]
pub struct MemServer(Arc<State>);

impl std::fmt::Debug for MemServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("MemServer").field(&self.stats()).finish()
    }
}

impl MemServer {
    /// A server with no sessions and no faults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Kills one session: its connection's next statement fails with [`MemError::Lost`].
    pub fn kill(&self, session: u64) {
        if let Some(cell) = lock(&self.0.sessions).remove(&session) {
            lock(&cell).alive = false;
        }
    }

    /// Kills every session.
    pub fn kill_all(&self) {
        for (_, cell) in lock(&self.0.sessions).drain() {
            lock(&cell).alive = false;
        }
    }

    /// Refuses (or accepts again) contexts of the end user with this name.
    pub fn refuse(&self, end_user: &str, refused: bool) {
        let mut set = lock(&self.0.refused);
        if refused {
            set.insert(end_user.to_owned());
        } else {
            set.remove(end_user);
        }
    }

    /// The next `n` connects fail with [`MemError::ConnectRefused`].
    pub fn fail_connects(&self, n: usize) {
        self.0.failing_connects.store(n, Ordering::SeqCst);
    }

    /// Connects hang (until the pool's create timeout) while `hang` is true.
    pub fn hang_connects(&self, hang: bool) {
        self.0.hang_connects.store(hang, Ordering::SeqCst);
    }

    /// Recycle checks hang (until the pool's recycle timeout) while `hang` is true.
    pub fn hang_recycles(&self, hang: bool) {
        self.0.hang_recycles.store(hang, Ordering::SeqCst);
    }

    /// Extra runtime yields per flight: a slow network.
    pub fn set_latency_yields(&self, n: usize) {
        self.0.latency_yields.store(n, Ordering::SeqCst);
    }

    /// The server's counters.
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            connects: self.0.connects.load(Ordering::SeqCst),
            flights: self.0.flights.load(Ordering::SeqCst),
            statements: self.0.statements.load(Ordering::SeqCst),
            live_sessions: lock(&self.0.sessions).len(),
        }
    }

    pub(crate) fn is_refused(&self, end_user: &str) -> bool {
        lock(&self.0.refused).contains(end_user)
    }

    pub(crate) fn latency_yields(&self) -> usize {
        self.0.latency_yields.load(Ordering::Relaxed)
    }

    pub(crate) fn count_flight(&self, statements: u64) {
        self.0.flights.fetch_add(1, Ordering::Relaxed);
        self.0.statements.fetch_add(statements, Ordering::Relaxed);
    }

    fn open_session(&self) -> (u64, SessionCell) {
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        let cell = Arc::new(Mutex::new(Session {
            alive: true,
            ..Session::default()
        }));
        lock(&self.0.sessions).insert(id, cell.clone());
        self.0.connects.fetch_add(1, Ordering::Relaxed);
        (id, cell)
    }

    pub(crate) fn close_session(&self, id: u64) {
        lock(&self.0.sessions).remove(&id);
    }
}

/// Connects to a [`MemServer`].
#[derive(Clone, Debug, Default)]
pub struct MemBackend {
    server: MemServer,
}

impl MemBackend {
    /// A backend for `server`.
    pub fn new(server: MemServer) -> Self {
        Self { server }
    }

    /// The server.
    pub fn server(&self) -> &MemServer {
        &self.server
    }
}

impl Backend for MemBackend {
    type Connection = MemConnection;
    type Error = MemError;

    async fn connect(&self) -> Result<MemConnection, MemError> {
        let state = &self.server.0;
        if state.hang_connects.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let refused = state
            .failing_connects
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if refused {
            return Err(MemError::ConnectRefused);
        }
        let (id, session) = self.server.open_session();
        Ok(MemConnection::new(id, self.server.clone(), session))
    }

    async fn recycle(&self, conn: &mut MemConnection) -> Result<(), DiscardReason> {
        if self.server.0.hang_recycles.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if conn.is_alive() {
            Ok(())
        } else {
            Err(DiscardReason::Lost)
        }
    }
}
