//! The wire layer: the byte stream tokio-postgres talks through, which reads every frame
//! header in both directions and reports what the *server* says about the session.
//!
//! tokio-postgres ignores the transaction status of ReadyForQuery and offers no way to
//! send several requests under one Sync. This layer sits between it and the socket (or
//! the TLS stream, so that it sees plaintext) and gives the session:
//!
//! - **the server's truth**: the status byte of the last ReadyForQuery (idle, in a
//!   transaction, in a failed transaction), how many requests are written and answered,
//!   the backend process id of BackendKeyData, ParameterStatus values, and the command
//!   tags that mean the session lost prepared statements;
//! - **batches** ([`Batch`]): statements of the pool's own (the session reset, `COMMIT`s)
//!   written right before and after an *anchor* request of tokio-postgres (the pool's
//!   context statement, recognised by its prepared statement's name or its text), with the
//!   anchor's Sync removed so that the anchor and the next request run under one Sync. The
//!   replies to the pool's own statements are swallowed; the anchor gets a ReadyForQuery
//!   of ours; when the server skipped requests after an error, each of them gets an error
//!   reply of ours, so that no request of tokio-postgres waits forever and the caller sees
//!   the first error;
//! - **statements of its own** ([`WireHandle::send_query`]), written at the next request
//!   boundary, with their replies swallowed (the `ROLLBACK` a release sends);
//! - behind a transaction pooler ([`WireHandle::behind_transaction_pooler`]), **no
//!   statement name on the server**: the statements tokio-postgres prepares by name are
//!   sent unnamed, parsed again by each request that uses them (see [`unnamed`]); and
//!   **one request in flight**: a request written while an earlier one awaits its
//!   ReadyForQuery is held back until it came (PgBouncer before 1.21 lets another client
//!   have the server connection at that ReadyForQuery, with whatever was sent after it).
//!
//! Everything else passes through. Payloads are copied once into the layer's buffers and
//! never parsed, except the few short control messages listed above (and, behind a
//! transaction pooler, the statement names of Parse, Bind, Describe and Close).

mod frame;
pub(crate) mod reader;
mod stream;
mod tls;
mod unnamed;
pub(crate) mod writer;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU32, AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;

pub(crate) use stream::WireStream;
pub(crate) use tls::WireTls;

pub(crate) use frame::SKIPPED_SQLSTATE;

/// The transaction status of the server's last ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TxStatus {
    /// `I`: no transaction.
    Idle,
    /// `T`: inside a transaction block.
    InTransaction,
    /// `E`: inside a failed transaction block.
    Failed,
}

impl TxStatus {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'I' => Some(Self::Idle),
            b'T' => Some(Self::InTransaction),
            b'E' => Some(Self::Failed),
            _ => None,
        }
    }
    fn to_byte(self) -> u8 {
        match self {
            Self::Idle => b'I',
            Self::InTransaction => b'T',
            Self::Failed => b'E',
        }
    }
}

/// How the anchor request of a [`Batch`] is recognised in the frontend stream.
#[derive(Debug, Clone)]
pub(crate) enum Anchor {
    /// The next request that starts with a Bind: the user's own request, when the batch
    /// holds all of the pool's statements.
    NextBind,
    /// A Bind of this prepared statement (its server-side name).
    Named(String),
    /// A Parse of the unnamed statement with exactly this text.
    Unnamed(&'static str),
}

impl Anchor {
    /// Whether a Bind or Parse body starts this anchor. `body` may be a prefix of the
    /// frame's body; `complete` says whether it is all of it.
    fn matches(&self, tag: u8, body: &[u8]) -> bool {
        match (self, tag) {
            (Self::NextBind, frame::front::BIND) => true,
            (Self::Named(name), frame::front::BIND) => frame::split_cstr(body)
                .and_then(|(_portal, rest)| frame::split_cstr(rest))
                .is_some_and(|(stmt, _)| stmt == name.as_bytes()),
            (Self::Unnamed(text), frame::front::PARSE) => frame::split_cstr(body)
                .filter(|(name, _)| name.is_empty())
                .and_then(|(_, rest)| frame::split_cstr(rest))
                .is_some_and(|(sql, _)| sql == text.as_bytes()),
            _ => false,
        }
    }

    /// How many body bytes decide [`matches`](Self::matches).
    fn decisive_len(&self) -> usize {
        match self {
            Self::NextBind => 0,
            Self::Named(name) => name.len() + 2 + 1,
            Self::Unnamed(text) => text.len() + 2 + 1,
        }
    }
}

/// What the session said about the request that follows the anchor.
const FOLLOWER_UNKNOWN: u8 = 0;
const FOLLOWER_COMING: u8 = 1;
const FOLLOWER_NONE: u8 = 2;

/// Whether the anchor's Sync was removed.
const MERGED_UNKNOWN: u8 = 0;
const MERGED_YES: u8 = 1;
const MERGED_NO: u8 = 2;

/// Statements of the pool's own around one anchor request, and what became of them.
#[derive(Debug)]
pub(crate) struct Batch {
    anchor: Anchor,
    before: Bytes,
    before_steps: u32,
    after: Bytes,
    after_steps: u32,
    merge: bool,
    follower: AtomicU8,
    merged: AtomicU8,
    before_done: AtomicU32,
    after_done: AtomicU32,
    matched: AtomicBool,
    /// The anchor (its Sync kept) had an error whose ReadyForQuery is still to come.
    anchor_errored: AtomicBool,
}

/// Builds the statements of a [`Batch`].
#[derive(Debug, Default)]
pub(crate) struct Statements {
    bytes: BytesMut,
    count: u32,
}

impl Statements {
    /// Empty, with room for `bytes` bytes of frames.
    pub(crate) fn with_capacity(bytes: usize) -> Self {
        Self {
            bytes: BytesMut::with_capacity(bytes),
            count: 0,
        }
    }

    /// How many bytes of frames it holds.
    pub(crate) fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Appends one statement, parsed unnamed (for a connection where the pool's
    /// statements are not prepared).
    pub(crate) fn push(&mut self, sql: &str) {
        frame::statement(&mut self.bytes, sql);
        self.count += 1;
    }

    /// Appends statements built before (the same ones in every batch, encoded once).
    pub(crate) fn push_all(&mut self, other: &Statements) {
        self.bytes.extend_from_slice(&other.bytes);
        self.count += other.count;
    }

    /// Appends one statement prepared at connect under `name`: no parse on the server.
    pub(crate) fn push_prepared(&mut self, name: &str) {
        frame::prepared_statement(&mut self.bytes, name);
        self.count += 1;
    }

    /// Appends one statement closed and prepared here under `name` (with these parameter
    /// type OIDs), bound to these text parameters: the statement's first use on the
    /// connection.
    pub(crate) fn push_parsed_bound<'a>(
        &mut self,
        name: &str,
        sql: &str,
        types: &[u32],
        params: impl ExactSizeIterator<Item = &'a str>,
    ) {
        frame::parsed_bound_statement(&mut self.bytes, name, sql, types, params);
        self.count += 1;
    }

    /// Appends one statement prepared at connect under `name`, bound to these text
    /// parameters.
    pub(crate) fn push_bound<'a>(
        &mut self,
        name: &str,
        params: impl ExactSizeIterator<Item = &'a str>,
    ) {
        frame::bound_statement(&mut self.bytes, name, params);
        self.count += 1;
    }
}

impl Batch {
    /// Statements `before` and `after` the anchor request; `merge` removes the anchor's
    /// Sync so that the next request runs in the same implicit transaction.
    pub(crate) fn new(anchor: Anchor, before: Statements, after: Statements, merge: bool) -> Self {
        Self {
            anchor,
            before_steps: before.count,
            before: before.bytes.freeze(),
            after_steps: after.count,
            after: after.bytes.freeze(),
            merge,
            follower: AtomicU8::new(FOLLOWER_UNKNOWN),
            merged: AtomicU8::new(MERGED_UNKNOWN),
            before_done: AtomicU32::new(0),
            after_done: AtomicU32::new(0),
            matched: AtomicBool::new(false),
            anchor_errored: AtomicBool::new(false),
        }
    }

    /// Whether every statement before the anchor completed (the server confirmed them).
    pub(crate) fn before_confirmed(&self) -> bool {
        self.matched.load(Ordering::Acquire)
            && self.before_done.load(Ordering::Acquire) == self.before_steps
    }

    /// Whether the layer found the anchor request and wrote the batch before it.
    pub(crate) fn matched(&self) -> bool {
        self.matched.load(Ordering::Acquire)
    }

    /// Whether every statement after the anchor completed.
    pub(crate) fn after_confirmed(&self) -> bool {
        self.matched.load(Ordering::Acquire)
            && self.after_done.load(Ordering::Acquire) == self.after_steps
    }
}

/// Flags of [`Shared::flags`].
const FLAG_STATEMENTS_LOST: u8 = 1;
const FLAG_SQL_PREPARED: u8 = 2;

/// One statement of the layer's own, sent at the next request boundary.
#[derive(Debug)]
pub(crate) struct OwnQuery {
    sql: Bytes,
    done: AtomicBool,
    failed: AtomicBool,
}

/// What the session and the stream share.
#[derive(Debug)]
pub(crate) struct Shared {
    status: AtomicU8,
    theirs_sent: AtomicU64,
    theirs_done: AtomicU64,
    /// Requests of tokio-postgres that had an error and await their ReadyForQuery.
    errored_open: AtomicU64,
    ours_sent: AtomicU64,
    ours_done: AtomicU64,
    backend_pid: AtomicI64,
    flags: AtomicU8,
    /// Merged batches whose anchor and next request were written apart (a multi-thread
    /// runtime ran the connection task between them): the layer held the Sync.
    held_syncs: AtomicU64,
    /// Batches whose anchor went out alone (the next request was never sent).
    unmerged: AtomicU64,
    parameters: Mutex<HashMap<String, String>>,
    pending: Mutex<VecDeque<Arc<Batch>>>,
    has_pending: AtomicBool,
    own: Mutex<VecDeque<Arc<OwnQuery>>>,
    has_own: AtomicBool,
    /// Statement texts whose server-side names the writer records from Parse frames
    /// (tokio-postgres does not make a statement's name public).
    learning: Mutex<Vec<(String, Option<String>)>>,
    has_learning: AtomicBool,
    /// The connection task, woken when the layer has something of its own to write.
    writer_waker: AtomicWaker,
    /// Woken whenever a ReadyForQuery is read, and when the stream is dropped.
    answered: tokio::sync::Notify,
    /// The stream is gone (the connection ended).
    closed: AtomicBool,
    /// Behind a transaction pooler (see [`WireHandle::behind_transaction_pooler`]).
    pooled: AtomicBool,
}

/// The session's handle on its connection's wire layer. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct WireHandle(pub(crate) Arc<Shared>);

impl WireHandle {
    pub(crate) fn new() -> Self {
        Self(Arc::new(Shared {
            status: AtomicU8::new(b'I'),
            theirs_sent: AtomicU64::new(0),
            theirs_done: AtomicU64::new(0),
            errored_open: AtomicU64::new(0),
            ours_sent: AtomicU64::new(0),
            ours_done: AtomicU64::new(0),
            backend_pid: AtomicI64::new(-1),
            flags: AtomicU8::new(0),
            held_syncs: AtomicU64::new(0),
            unmerged: AtomicU64::new(0),
            parameters: Mutex::new(HashMap::new()),
            pending: Mutex::new(VecDeque::new()),
            has_pending: AtomicBool::new(false),
            own: Mutex::new(VecDeque::new()),
            has_own: AtomicBool::new(false),
            learning: Mutex::new(Vec::new()),
            has_learning: AtomicBool::new(false),
            writer_waker: AtomicWaker::new(),
            answered: tokio::sync::Notify::new(),
            closed: AtomicBool::new(false),
            pooled: AtomicBool::new(false),
        }))
    }

    /// The status of the server's last ReadyForQuery.
    pub(crate) fn status(&self) -> TxStatus {
        TxStatus::from_byte(self.0.status.load(Ordering::Acquire)).unwrap_or(TxStatus::Failed)
    }

    /// Requests of tokio-postgres written and not yet answered, plus statements of the
    /// layer's own not yet answered.
    pub(crate) fn outstanding(&self) -> (u64, u64) {
        let s = &self.0;
        // The answered counts first: a request is counted written before it can be
        // answered, so a written count read after them is never below them. Read the
        // other way round, a request written and answered between the two loads (the
        // connection task runs on another thread) made the difference negative.
        let theirs_done = s.theirs_done.load(Ordering::Acquire);
        let ours_done = s.ours_done.load(Ordering::Acquire);
        let theirs = s.theirs_sent.load(Ordering::Acquire) - theirs_done;
        let ours = s.ours_sent.load(Ordering::Acquire) + self.own_queued() - ours_done;
        (theirs, ours)
    }

    fn own_queued(&self) -> u64 {
        if self.0.has_own.load(Ordering::Acquire) {
            self.0.own.lock().len() as u64
        } else {
            0
        }
    }

    /// How many requests of tokio-postgres were written so far.
    pub(crate) fn written(&self) -> u64 {
        self.0.theirs_sent.load(Ordering::Acquire)
    }

    /// How many requests of tokio-postgres have ended so far: answered, or past an error
    /// whose ReadyForQuery is still to come (the server sends an error at once, so a
    /// stream can end before its ReadyForQuery is read).
    pub(crate) fn ended(&self) -> u64 {
        self.0.theirs_done.load(Ordering::Acquire) + self.0.errored_open.load(Ordering::Acquire)
    }

    /// Whether every request written so far was answered (or the connection ended).
    pub(crate) fn is_settled(&self) -> bool {
        self.0.closed.load(Ordering::Acquire) || self.outstanding() == (0, 0)
    }

    /// Waits until every request written so far is answered.
    pub(crate) async fn settled(&self) {
        loop {
            let notified = self.0.answered.notified();
            if self.is_settled() {
                return;
            }
            notified.await;
        }
    }

    /// The process id the server announced in BackendKeyData, if any.
    pub(crate) fn backend_pid(&self) -> Option<i32> {
        i32::try_from(self.0.backend_pid.load(Ordering::Acquire)).ok()
    }

    /// A ParameterStatus value the server reported.
    pub(crate) fn parameter(&self, name: &str) -> Option<String> {
        self.0.parameters.lock().get(name).cloned()
    }

    /// Whether the server's last report of `name` is `value` (`None`: never reported),
    /// without copying it.
    pub(crate) fn parameter_is(&self, name: &str, value: Option<&str>) -> bool {
        self.0.parameters.lock().get(name).map(String::as_str) == value
    }

    /// Whether a command tag said the session's prepared statements may be gone
    /// (`DEALLOCATE`, `DISCARD ALL`).
    pub(crate) fn statements_lost(&self) -> bool {
        self.0.flags.load(Ordering::Acquire) & FLAG_STATEMENTS_LOST != 0
    }

    /// Whether a command tag said a SQL-level `PREPARE` ran; cleared by the call.
    pub(crate) fn take_sql_prepared(&self) -> bool {
        self.0.flags.fetch_and(!FLAG_SQL_PREPARED, Ordering::AcqRel) & FLAG_SQL_PREPARED != 0
    }

    /// How often a merged batch's anchor reached the layer without its follower (the
    /// Sync was then held until the follower came).
    pub(crate) fn held_syncs(&self) -> u64 {
        self.0.held_syncs.load(Ordering::Relaxed)
    }

    /// How often a batch's anchor went out alone.
    pub(crate) fn unmerged(&self) -> u64 {
        self.0.unmerged.load(Ordering::Relaxed)
    }

    /// Arms `batch`: the next anchor request written carries it.
    pub(crate) fn arm(&self, batch: Arc<Batch>) {
        let mut pending = self.0.pending.lock();
        pending.push_back(batch);
        self.0.has_pending.store(true, Ordering::Release);
    }

    /// Says whether the request after `batch`'s anchor was sent. Until this is said, a
    /// merged batch's Sync is held by the layer.
    pub(crate) fn follower(&self, batch: &Batch, sent: bool) {
        let word = if sent { FOLLOWER_COMING } else { FOLLOWER_NONE };
        batch.follower.store(word, Ordering::Release);
        self.0.writer_waker.wake();
    }

    /// Forgets `batch` if its anchor was never written (the anchor request failed before
    /// it was sent).
    pub(crate) fn disarm(&self, batch: &Arc<Batch>) {
        let mut pending = self.0.pending.lock();
        pending.retain(|b| !Arc::ptr_eq(b, batch));
        self.0
            .has_pending
            .store(!pending.is_empty(), Ordering::Release);
    }

    /// Starts recording the names under which the next Parse frames of these texts
    /// prepare them.
    pub(crate) fn learn_names<I: IntoIterator<Item = String>>(&self, texts: I) {
        let mut learning = self.0.learning.lock();
        learning.extend(texts.into_iter().map(|t| (t, None)));
        self.0.has_learning.store(true, Ordering::Release);
    }

    /// The recorded names, in the order of [`learn_names`](Self::learn_names); stops
    /// recording.
    pub(crate) fn learned_names(&self) -> Vec<Option<String>> {
        let mut learning = self.0.learning.lock();
        self.0.has_learning.store(false, Ordering::Release);
        std::mem::take(&mut *learning)
            .into_iter()
            .map(|(_, name)| name)
            .collect()
    }

    /// The connection goes through a transaction pooler: from the next frame on,
    /// statements tokio-postgres prepares by name go to the server unnamed, parsed again
    /// in each request that uses them (see [`unnamed`]), and a request waits until the
    /// one before it is answered.
    pub(crate) fn behind_transaction_pooler(&self) {
        self.0.pooled.store(true, Ordering::Release);
    }

    /// Sends `sql` as a simple query of the layer's own at the next request boundary;
    /// its replies are swallowed. Returns a handle to see whether the server answered.
    pub(crate) fn send_query(&self, sql: &str) -> Arc<OwnQuery> {
        let mut buf = BytesMut::new();
        frame::query(&mut buf, sql);
        let q = Arc::new(OwnQuery {
            sql: buf.freeze(),
            done: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        });
        self.0.own.lock().push_back(q.clone());
        self.0.has_own.store(true, Ordering::Release);
        self.0.writer_waker.wake();
        q
    }
}

impl Shared {
    fn pooled(&self) -> bool {
        self.pooled.load(Ordering::Acquire)
    }

    fn take_pending_if(&self, tag: u8, body: &[u8]) -> Option<Arc<Batch>> {
        let mut pending = self.pending.lock();
        let front = pending.front()?;
        if !front.anchor.matches(tag, body) {
            return None;
        }
        let batch = pending.pop_front();
        self.has_pending
            .store(!pending.is_empty(), Ordering::Release);
        batch
    }

    /// How many body bytes of a Bind or Parse frame the writer must see before it knows
    /// whether the frame matters (a batch's anchor, a statement whose name is learnt).
    fn probe_len(&self, tag: u8) -> Option<usize> {
        let mut want = None;
        if self.has_pending.load(Ordering::Acquire) {
            want = self.pending.lock().front().map(|b| b.anchor.decisive_len());
        }
        if tag == frame::front::PARSE && self.has_learning.load(Ordering::Acquire) {
            let longest = self.learning.lock().iter().map(|(t, _)| t.len()).max();
            // A name of up to 64 bytes (the server's identifier limit), two NULs.
            want = want.max(longest.map(|l| l + 66));
        }
        want
    }

    /// Records the statement name of a Parse body whose text is being learnt.
    fn learn_from(&self, body: &[u8]) {
        if !self.has_learning.load(Ordering::Acquire) {
            return;
        }
        let Some((name, rest)) = frame::split_cstr(body) else {
            return;
        };
        let Some((text, _)) = frame::split_cstr(rest) else {
            return;
        };
        let mut learning = self.learning.lock();
        if let Some(slot) = learning
            .iter_mut()
            .find(|(t, n)| n.is_none() && t.as_bytes() == text)
        {
            slot.1 = Some(String::from_utf8_lossy(name).into_owned());
        }
    }

    fn take_own(&self) -> Option<Arc<OwnQuery>> {
        if !self.has_own.load(Ordering::Acquire) {
            return None;
        }
        let mut own = self.own.lock();
        let q = own.pop_front();
        self.has_own.store(!own.is_empty(), Ordering::Release);
        q
    }
}
