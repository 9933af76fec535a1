//! Hooks for the fuzz targets in `fuzz/`, built only under `--cfg fuzzing` (which
//! cargo-fuzz passes). Not an API: the wire layer's two directions driven by hand, without
//! a socket, as [`WireStream`](super::wire::WireStream) drives them.

use std::sync::Arc;

use bytes::{Buf, BytesMut};

use super::wire::reader::Reader;
use super::wire::writer::Writer;
use super::wire::{Anchor, Batch, Statements, TxStatus, WireHandle};

/// The text by which an unnamed anchor ([`BatchSpec::named`] `None`) is recognised.
pub const UNNAMED_ANCHOR: &str = "SELECT ctxpool_fuzz($1)";

/// One statement of the pool's own in a batch.
#[derive(Debug, Clone)]
pub enum OurStatement {
    /// Parsed unnamed from this text.
    Text(String),
    /// Prepared at connect under this name.
    Prepared(String),
    /// Prepared in the batch under this name from this text (one `text` parameter), then
    /// bound to this value.
    ParsedBound(String, String, String),
}

/// A batch to arm.
#[derive(Debug, Clone)]
pub struct BatchSpec {
    /// The anchor: a Bind of the prepared statement of this name; `None` for an unnamed
    /// Parse of [`UNNAMED_ANCHOR`].
    pub named: Option<String>,
    /// Statements written right before the anchor.
    pub before: Vec<OurStatement>,
    /// Statements written after the anchor, in place of its Sync.
    pub after: Vec<OurStatement>,
    /// Whether the anchor's Sync is removed when a follower comes.
    pub merge: bool,
}

/// The layer's two directions sharing one handle.
#[derive(Debug)]
pub struct WireFrames {
    handle: WireHandle,
    writer: Writer,
    reader: Reader,
    /// Bytes handed to the "socket" by [`drain`](Self::drain).
    sent: Vec<u8>,
    to_server: BytesMut,
    to_client: BytesMut,
    batch: Option<Arc<Batch>>,
    refused: bool,
}

impl Default for WireFrames {
    fn default() -> Self {
        Self::new()
    }
}

impl WireFrames {
    /// A fresh connection.
    pub fn new() -> Self {
        Self {
            handle: WireHandle::new(),
            writer: Writer::new(),
            reader: Reader::new(),
            sent: Vec::new(),
            to_server: BytesMut::new(),
            to_client: BytesMut::new(),
            batch: None,
            refused: false,
        }
    }

    /// Arms a batch: the next anchor written carries it.
    pub fn arm(&mut self, spec: &BatchSpec) {
        let statements = |list: &[OurStatement]| {
            let mut s = Statements::default();
            for st in list {
                match st {
                    OurStatement::Text(sql) => s.push(sql),
                    OurStatement::Prepared(name) => s.push_prepared(name),
                    OurStatement::ParsedBound(name, sql, param) => {
                        s.push_parsed_bound(name, sql, &[25], std::iter::once(param.as_str()));
                    }
                }
            }
            s
        };
        let anchor = match &spec.named {
            Some(name) => Anchor::Named(name.clone()),
            None => Anchor::Unnamed(UNNAMED_ANCHOR),
        };
        let batch = Arc::new(Batch::new(
            anchor,
            statements(&spec.before),
            statements(&spec.after),
            spec.merge,
        ));
        self.handle.arm(batch.clone());
        self.batch = Some(batch);
    }

    /// Says whether the request after the last armed batch's anchor was sent.
    pub fn follower(&self, sent: bool) {
        if let Some(batch) = &self.batch {
            self.handle.follower(batch, sent);
        }
    }

    /// Starts recording the names of the Parse frames of these texts.
    pub fn learn(&self, texts: Vec<String>) {
        self.handle.learn_names(texts);
    }

    /// Behaves as behind a transaction pooler from the next frame on: named statements
    /// go unnamed, and a request waits for the one before it.
    pub fn behind_transaction_pooler(&self) {
        self.handle.behind_transaction_pooler();
    }

    /// Queues a statement of the layer's own.
    pub fn send_query(&self, sql: &str) {
        self.handle.send_query(sql);
    }

    /// Bytes tokio-postgres writes, with the stream's idle work before (`poll_write`) and
    /// after (`poll_flush`). False once the layer refused its input: the connection ends
    /// there, and nothing more goes through in either direction.
    pub fn write(&mut self, chunk: &[u8]) -> bool {
        if self.refused {
            return false;
        }
        let shared = &*self.handle.0;
        let out = &mut self.to_server;
        self.writer.idle_work(out, &mut self.reader, shared);
        let result = self.writer.process(chunk, out, &mut self.reader, shared);
        self.writer.idle_work(out, &mut self.reader, shared);
        self.refused = result.is_err();
        !self.refused
    }

    /// Bytes the server sends. False once the layer refused its input.
    pub fn read(&mut self, chunk: &[u8]) -> bool {
        if self.refused {
            return false;
        }
        let result = self
            .reader
            .process(chunk, &mut self.to_client, &self.handle.0);
        self.refused = result.is_err();
        !self.refused
    }

    /// Hands up to `max` bytes of what may go to the server to the "socket", as the
    /// stream's drain does. Returns how many.
    pub fn drain(&mut self, max: usize) -> usize {
        let n = self
            .writer
            .flushable(&self.to_server, &self.reader)
            .min(max);
        self.sent.extend_from_slice(&self.to_server[..n]);
        self.to_server.advance(n);
        self.writer.drained(n);
        n
    }

    /// Everything the writer put out so far, drained or not (a frame still being
    /// recognised included).
    pub fn to_server(&self) -> Vec<u8> {
        [&self.sent[..], &self.to_server[..]].concat()
    }

    /// Everything the reader put out so far.
    pub fn to_client(&self) -> &[u8] {
        &self.to_client
    }

    /// Whether the layer refused its input.
    pub fn refused(&self) -> bool {
        self.refused
    }

    /// The handle's view: requests outstanding (theirs, ours), the last ReadyForQuery's
    /// status byte, the backend pid, whether everything written was answered.
    pub fn counters(&self) -> ((u64, u64), u8, Option<i32>, bool) {
        let status = match self.handle.status() {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        };
        (
            self.handle.outstanding(),
            status,
            self.handle.backend_pid(),
            self.handle.is_settled(),
        )
    }
}
