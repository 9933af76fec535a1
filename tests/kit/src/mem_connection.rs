//! A connection to the modelled server.

use std::fmt;

use ctxpool::backend::{Connection, DiscardReason};
use ctxpool::context::SecurityContext;

use crate::mem_server::{MemError, MemServer, SessionCell, TxStatus, lock};

/// A statement of the model's tiny language.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Statement {
    /// Reads the session's context (the end user a policy would see).
    Query,
    /// Opens a transaction.
    Begin,
    /// Ends a transaction.
    Commit,
    /// Ends a transaction.
    Rollback,
    /// Fails, aborting an open transaction.
    Fail,
    /// User SQL that changes the session's role behind the pool's back (`SET ROLE`).
    SetRole(String),
    /// A query that takes this many extra runtime yields on the server.
    Slow(usize),
}

/// What a statement saw on the server: the context a row-level policy would read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The session the statement ran in.
    pub session: u64,
    /// The end user the session carried (`None`: no context).
    pub end_user: Option<String>,
    /// The session's current role (`None`: the login role).
    pub role: Option<String>,
    /// The data roles the session carried.
    pub data_roles: Vec<String>,
}

/// A connection to a [`MemServer`](super::MemServer).
///
/// Its context protocol is the one the PostgreSQL backend uses in session scope: the
/// server-side context is synchronised with the handle's context on the next statement,
/// in the same flight (reset first, then apply); the same context coming back costs
/// nothing; a refused context fails the statement before it runs.
pub struct MemConnection {
    id: u64,
    server: MemServer,
    session: SessionCell,
    /// The context the handle asked for.
    desired: Option<SecurityContext>,
    /// The context the server-side session carries.
    applied: Option<SecurityContext>,
    /// User SQL changed session state; the next statement resets it.
    dirty: bool,
    /// A statement was sent and its answer not yet read.
    in_flight: bool,
    /// Requests sent and not yet run by the server.
    wire: Vec<Request>,
}

impl fmt::Debug for MemConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemConnection")
            .field("session", &self.id)
            .field("context", &self.desired)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

/// The name the model's policies see for a context's end user.
fn end_user_name(ctx: &SecurityContext) -> String {
    ctx.identity().name().unwrap_or("token-user").to_owned()
}

impl MemConnection {
    pub(crate) fn new(id: u64, server: MemServer, session: SessionCell) -> Self {
        Self {
            id,
            server,
            session,
            desired: None,
            applied: None,
            dirty: false,
            in_flight: false,
            wire: Vec::new(),
        }
    }

    /// The server-side session id (for [`MemServer::kill`](super::MemServer::kill)).
    pub fn session_id(&self) -> u64 {
        self.id
    }

    /// Whether the server-side session is still alive.
    pub fn is_alive(&self) -> bool {
        lock(&self.session).alive
    }

    /// Runs one statement in one flight, with the context change (if any) piggybacked.
    ///
    /// The request is on the wire from the first poll: if this future is dropped before
    /// the answer arrives, the server still runs it, before whatever the connection sends
    /// next. That is why a connection released mid-flight must be discarded.
    pub async fn execute(&mut self, statement: Statement) -> Result<Observation, MemError> {
        // What the client knows now decides what travels with the statement.
        let sync = (self.dirty || self.applied != self.desired).then(|| self.desired.clone());
        if sync.is_some() {
            self.applied = self.desired.clone();
            self.dirty = false;
        }
        let slow = match statement {
            Statement::Slow(n) => n,
            _ => 0,
        };
        self.in_flight = true;
        self.wire.push(Request { sync, statement });
        self.flight().await; // request on the wire
        for _ in 0..slow {
            tokio::task::yield_now().await;
        }
        // The server runs everything on the wire in order; only the last answer is ours.
        let mut result = Err(MemError::Lost);
        for request in std::mem::take(&mut self.wire) {
            result = self.process(request);
        }
        self.flight().await; // answer on the wire
        self.in_flight = false;
        result
    }

    /// Shorthand for `execute(Statement::Query)`.
    pub async fn query(&mut self) -> Result<Observation, MemError> {
        self.execute(Statement::Query).await
    }

    async fn flight(&self) {
        for _ in 0..=self.server.latency_yields() {
            tokio::task::yield_now().await;
        }
    }

    /// What the server does with one request: sync the context, then run the statement.
    fn process(&mut self, request: Request) -> Result<Observation, MemError> {
        let session = self.session.clone();
        let mut s = lock(&session);
        if !s.alive {
            return Err(MemError::Lost);
        }
        let mut statements = 1;
        if let Some(context) = request.sync {
            statements += 1;
            if s.tx == TxStatus::Failed {
                self.server.count_flight(statements);
                self.applied = None;
                self.dirty = true;
                return Err(MemError::InFailedTransaction);
            }
            // Reset whatever the previous context or user SQL left, then apply.
            s.role = None;
            s.end_user = None;
            s.data_roles.clear();
            if let Some(ctx) = &context {
                let name = end_user_name(ctx);
                if self.server.is_refused(&name) {
                    self.server.count_flight(statements);
                    self.applied = None;
                    return Err(MemError::ContextRefused);
                }
                s.role = ctx.data_roles().first().cloned();
                s.end_user = Some(name);
                s.data_roles = ctx.data_roles().to_vec();
            }
        }
        self.server.count_flight(statements);
        match request.statement {
            Statement::Commit | Statement::Rollback => s.tx = TxStatus::Idle,
            _ if s.tx == TxStatus::Failed => return Err(MemError::InFailedTransaction),
            Statement::Begin => s.tx = TxStatus::InTransaction,
            Statement::Fail => {
                if s.tx == TxStatus::InTransaction {
                    s.tx = TxStatus::Failed;
                }
                return Err(MemError::StatementFailed);
            }
            Statement::SetRole(role) => {
                s.role = Some(role);
                // The server reports the change; the client resets it next time.
                self.dirty = true;
            }
            Statement::Query | Statement::Slow(_) => {}
        }
        Ok(Observation {
            session: self.id,
            end_user: s.end_user.clone(),
            role: s.role.clone(),
            data_roles: s.data_roles.clone(),
        })
    }
}

/// A request on the wire: the context change piggybacked (`Some(None)`: reset only) and
/// the statement.
struct Request {
    sync: Option<Option<SecurityContext>>,
    statement: Statement,
}

impl Connection for MemConnection {
    type AttachError = std::convert::Infallible;

    fn attach_context(&mut self, context: SecurityContext) -> Result<(), Self::AttachError> {
        self.desired = Some(context);
        Ok(())
    }

    fn clear_context(&mut self) {
        self.desired = None;
    }

    fn context(&self) -> Option<&SecurityContext> {
        self.desired.as_ref()
    }

    fn check_release(&mut self) -> Result<(), DiscardReason> {
        if self.in_flight {
            return Err(DiscardReason::InFlight);
        }
        let s = lock(&self.session);
        if !s.alive {
            return Err(DiscardReason::Lost);
        }
        match s.tx {
            TxStatus::Idle => Ok(()),
            TxStatus::InTransaction => Err(DiscardReason::OpenTransaction),
            TxStatus::Failed => Err(DiscardReason::FailedTransaction),
        }
    }
}

impl Drop for MemConnection {
    fn drop(&mut self) {
        self.server.close_session(self.id);
    }
}
