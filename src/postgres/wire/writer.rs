//! The frontend direction: every request tokio-postgres writes is registered with the
//! reader; a batch's statements are written around its anchor, whose Sync may be removed.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{BufMut, BytesMut};

use super::frame::{self, GSSENC_REQUEST, Head, Header, SSL_REQUEST, front};
use super::reader::{Expect, Part, Reader};
use super::unnamed::Unnamed;
use super::{
    Batch, FOLLOWER_COMING, FOLLOWER_NONE, FOLLOWER_UNKNOWN, MERGED_NO, MERGED_YES, Shared,
};

/// The largest untyped start-up message the writer accepts (PostgreSQL's own limit is
/// 10,000 bytes).
const MAX_STARTUP: usize = 10_000;

#[derive(Debug)]
struct Current {
    head: Head,
    remaining: usize,
    /// The body is collected whole (into [`Writer::body`]), for a frame [`Unnamed`]
    /// rewrites; else it streams through.
    collecting: bool,
}

/// A Bind or Parse frame held back (its start not yet flushable) until its first body
/// bytes say whether it is a batch's anchor.
#[derive(Debug)]
struct Probe {
    /// Where the frame starts in the output buffer.
    start: usize,
    tag: u8,
    want: usize,
    seen: Vec<u8>,
}

/// The writer's state.
#[derive(Debug)]
pub(crate) struct Writer {
    header: Header,
    /// False while the untyped start-up messages are written.
    typed: bool,
    /// The body of an untyped message, collected whole.
    untyped: Option<(Head, Vec<u8>)>,
    current: Option<Current>,
    /// The previous frame ended a request (or none was written yet).
    at_boundary: bool,
    /// The anchor request being written.
    anchor: Option<Arc<Batch>>,
    /// An anchor whose Sync was not written, waiting for the session to say whether a
    /// request follows.
    held: Option<Arc<Batch>>,
    /// A Sync was removed: the next request is the anchor's follower.
    follower_next: bool,
    /// The follower is a simple Query: a Sync of ours goes after it.
    sync_after_query: bool,
    probe: Option<Probe>,
    /// The statements prepared by name, for a connection whose statements go unnamed.
    unnamed: Unnamed,
    /// The body of the frame being collected; one buffer for every frame.
    body: Vec<u8>,
    /// Room for the start of an anchor frame while a batch goes in front of it.
    scratch: Vec<u8>,
    /// Behind a transaction pooler: requests written while an earlier one awaited its
    /// ReadyForQuery, held back until it came. Per request, where it starts in the output
    /// buffer and the reader's count of answers that lets it go (see [`gate`](Self::gate)).
    gates: VecDeque<(usize, u64)>,
}

impl Writer {
    pub(crate) fn new() -> Self {
        Self {
            header: Header::default(),
            typed: false,
            untyped: None,
            current: None,
            at_boundary: true,
            anchor: None,
            held: None,
            follower_next: false,
            sync_after_query: false,
            probe: None,
            unnamed: Unnamed::default(),
            body: Vec::new(),
            scratch: Vec::new(),
            gates: VecDeque::new(),
        }
    }

    /// How much of `out` may be written to the server now: everything before a frame
    /// that is still being recognised, and before a request held back until an earlier
    /// one is answered.
    pub(crate) fn flushable(&mut self, out: &BytesMut, reader: &Reader) -> usize {
        while self
            .gates
            .front()
            .is_some_and(|&(_, after)| reader.popped >= after)
        {
            self.gates.pop_front();
        }
        let probe = self.probe.as_ref().map_or(out.len(), |p| p.start);
        self.gates.front().map_or(probe, |&(at, _)| at.min(probe))
    }

    /// Whether bytes are held back until an earlier request is answered.
    pub(crate) fn gated(&self) -> bool {
        !self.gates.is_empty()
    }

    /// A request starts at the end of `out`. Behind a transaction pooler, it waits until
    /// every request before it is answered: PgBouncer before 1.21 hands the server
    /// connection to another client at the first ReadyForQuery that says idle, and a
    /// transaction already sent after it would run there, its replies reaching that
    /// other client.
    fn gate(&mut self, out: &BytesMut, reader: &Reader, shared: &Shared) {
        if shared.pooled() && reader.started && !reader.all_answered() {
            self.gates.push_back((out.len(), reader.registered()));
        }
    }

    /// `n` bytes were taken from the front of the output buffer (written to the server).
    /// A frame still being recognised keeps its place: its start moves with the buffer.
    /// `n` never exceeds [`flushable`](Self::flushable), so the start stays in bounds.
    pub(crate) fn drained(&mut self, n: usize) {
        if let Some(probe) = self.probe.as_mut() {
            probe.start -= n;
        }
        for (at, _) in &mut self.gates {
            *at -= n;
        }
    }

    /// Consumes all of `input`, appending what the server must see to `out`.
    pub(crate) fn process(
        &mut self,
        mut input: &[u8],
        out: &mut BytesMut,
        reader: &mut Reader,
        shared: &Shared,
    ) -> io::Result<()> {
        while !input.is_empty() {
            if !self.typed {
                input = self.untyped_bytes(input, out, reader)?;
                continue;
            }
            let Some(cur) = self.current.as_mut() else {
                let (n, head) = self.header.feed(input, true)?;
                input = &input[n..];
                if let Some(head) = head {
                    self.start(head, out, reader, shared);
                }
                continue;
            };
            let n = cur.remaining.min(input.len());
            if cur.collecting {
                self.body.extend_from_slice(&input[..n]);
            } else {
                out.put_slice(&input[..n]);
            }
            cur.remaining -= n;
            if let Some(probe) = self.probe.as_mut() {
                let take = (probe.want - probe.seen.len()).min(n);
                probe.seen.extend_from_slice(&input[..take]);
                if probe.seen.len() == probe.want {
                    self.decide(out, reader, shared);
                }
            }
            input = &input[n..];
            if self.current.as_ref().is_some_and(|c| c.remaining == 0) {
                self.end(out, reader, shared);
            }
        }
        Ok(())
    }

    /// The untyped start-up messages: SSLRequest (answered by one byte), StartupMessage.
    fn untyped_bytes<'a>(
        &mut self,
        input: &'a [u8],
        out: &mut BytesMut,
        reader: &mut Reader,
    ) -> io::Result<&'a [u8]> {
        let Some((head, body)) = self.untyped.as_mut() else {
            let (n, head) = self.header.feed(input, false)?;
            if let Some(head) = head {
                if head.body > MAX_STARTUP {
                    return Err(frame::protocol("a start-up message too long"));
                }
                self.untyped = Some((head, Vec::with_capacity(head.body)));
                if head.body == 0 {
                    self.end_untyped(out, reader)?;
                }
            }
            return Ok(&input[n..]);
        };
        let n = (head.body - body.len()).min(input.len());
        body.extend_from_slice(&input[..n]);
        if body.len() == head.body {
            self.end_untyped(out, reader)?;
        }
        Ok(&input[n..])
    }

    fn end_untyped(&mut self, out: &mut BytesMut, reader: &mut Reader) -> io::Result<()> {
        let Some((head, body)) = self.untyped.take() else {
            return Ok(());
        };
        let code = body
            .get(..4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .ok_or_else(|| frame::protocol("a start-up message without a code"))?;
        if code == SSL_REQUEST || code == GSSENC_REQUEST {
            reader.ssl_answer = true;
        } else {
            self.typed = true;
        }
        Header::encode(head, out);
        out.put_slice(&body);
        Ok(())
    }

    fn start(&mut self, head: Head, out: &mut BytesMut, reader: &mut Reader, shared: &Shared) {
        if !reader.started {
            // Authentication messages of the start-up exchange.
            Header::encode(head, out);
            self.begin_body(head, false, out, reader, shared);
            return;
        }
        if self.at_boundary
            && matches!(
                head.tag,
                front::COPY_DATA | front::COPY_DONE | front::COPY_FAIL
            )
        {
            // The data of a COPY FROM STDIN: the request before it goes on (the server
            // ignores the Sync tokio-postgres sent after its Execute, and answers the one
            // after CopyDone). Not a request of its own: nothing to register, nothing to
            // wait for.
            self.at_boundary = false;
        } else if self.at_boundary {
            self.at_boundary = false;
            self.unnamed.forget_held();
            if let Some(batch) = self.held.take() {
                // The follower arrived: the held Sync is dropped for good.
                self.resolve(batch, FOLLOWER_COMING, out, reader, shared);
            } else if !self.follower_next {
                // A request of its own, not one merged with the anchor before it.
                self.gate(out, reader, shared);
            }
            if std::mem::take(&mut self.follower_next) {
                self.sync_after_query = head.tag == front::QUERY;
                self.theirs(head.tag, reader, shared);
            } else if let Some(want) = (head.tag == front::BIND || head.tag == front::PARSE)
                .then(|| shared.probe_len(head.tag))
                .flatten()
            {
                self.probe = Some(Probe {
                    start: out.len(),
                    tag: head.tag,
                    want: want.min(head.body),
                    seen: Vec::new(),
                });
            } else {
                self.theirs(head.tag, reader, shared);
            }
        }
        if head.tag == front::SYNC && self.anchor.is_some() {
            self.anchor_sync(out, reader, shared);
            return;
        }
        let collect = Unnamed::rewrites(head.tag) && shared.pooled();
        if !collect {
            Header::encode(head, out);
        }
        self.begin_body(head, collect, out, reader, shared);
    }

    fn begin_body(
        &mut self,
        head: Head,
        collect: bool,
        out: &mut BytesMut,
        reader: &mut Reader,
        shared: &Shared,
    ) {
        if collect {
            self.body.clear();
        }
        self.current = Some(Current {
            head,
            remaining: head.body,
            collecting: collect,
        });
        if self.probe.as_ref().is_some_and(|p| p.want == 0) {
            self.decide(out, reader, shared);
        }
        if head.body == 0 {
            self.end(out, reader, shared);
        }
    }

    /// Registers a request of tokio-postgres with the reader.
    fn theirs(&mut self, tag: u8, reader: &mut Reader, shared: &Shared) {
        reader.expects.push_back(Expect::Theirs {
            query: tag == front::QUERY,
            errored: false,
            parses: 0,
        });
        shared.theirs_sent.fetch_add(1, Ordering::AcqRel);
    }

    /// A probed frame's first bytes are in: is it the pending batch's anchor?
    fn decide(&mut self, out: &mut BytesMut, reader: &mut Reader, shared: &Shared) {
        let Some(probe) = self.probe.take() else {
            return;
        };
        if probe.tag == front::PARSE {
            shared.learn_from(&probe.seen);
        }
        let Some(batch) = shared.take_pending_if(probe.tag, &probe.seen) else {
            self.theirs(probe.tag, reader, shared);
            return;
        };
        // The batch's statements go right before the anchor: what is written of the
        // anchor (its header and first bytes, a short run) moves behind them. Not by
        // `split_off`, which would turn the buffer into a shared one that reallocates.
        self.scratch.clear();
        self.scratch.extend_from_slice(&out[probe.start..]);
        out.truncate(probe.start);
        out.put_slice(&batch.before);
        out.put_slice(&self.scratch);
        // They may parse the unnamed statement.
        self.unnamed.forget_held();
        for _ in 0..batch.before_steps {
            reader.expects.push_back(Expect::Ours {
                batch: batch.clone(),
                part: Part::Before,
            });
        }
        reader.expects.push_back(Expect::Anchor {
            batch: batch.clone(),
            parses: 0,
        });
        shared.theirs_sent.fetch_add(1, Ordering::AcqRel);
        batch.matched.store(true, Ordering::Release);
        self.anchor = Some(batch);
    }

    fn end(&mut self, out: &mut BytesMut, reader: &mut Reader, shared: &Shared) {
        let Some(cur) = self.current.take() else {
            return;
        };
        if self.probe.is_some() {
            // A frame shorter than the anchor's decisive length.
            self.decide(out, reader, shared);
        }
        if cur.collecting {
            // After `decide`: the batch's statements go before the frame.
            let added = self.unnamed.rewrite(cur.head.tag, &self.body, out);
            reader.add_own_parses(added);
            return;
        }
        if !reader.started {
            return;
        }
        match cur.head.tag {
            front::QUERY => {
                self.at_boundary = true;
                if std::mem::take(&mut self.sync_after_query) {
                    // The server skips a simple Query while it skips to a Sync: this Sync
                    // ends the skip, and is answered even when nothing was skipped.
                    frame::sync(out);
                    reader.expects.push_back(Expect::OursReady { own: None });
                    shared.ours_sent.fetch_add(1, Ordering::AcqRel);
                }
            }
            front::SYNC | front::TERMINATE => self.at_boundary = true,
            _ => {}
        }
    }

    /// The anchor's Sync: the statements after the anchor, then the Sync kept or removed.
    fn anchor_sync(&mut self, out: &mut BytesMut, reader: &mut Reader, shared: &Shared) {
        let Some(batch) = self.anchor.take() else {
            return;
        };
        self.at_boundary = true;
        let word = if batch.merge {
            batch.follower.load(Ordering::Acquire)
        } else {
            FOLLOWER_NONE
        };
        if word == FOLLOWER_UNKNOWN {
            shared.held_syncs.fetch_add(1, Ordering::Relaxed);
            self.held = Some(batch);
            return;
        }
        self.resolve(batch, word, out, reader, shared);
    }

    /// Writes what follows an anchor once it is known whether a request follows it.
    fn resolve(
        &mut self,
        batch: Arc<Batch>,
        word: u8,
        out: &mut BytesMut,
        reader: &mut Reader,
        shared: &Shared,
    ) {
        out.put_slice(&batch.after);
        for _ in 0..batch.after_steps {
            reader.expects.push_back(Expect::Ours {
                batch: batch.clone(),
                part: Part::After,
            });
        }
        if word == FOLLOWER_COMING {
            batch.merged.store(MERGED_YES, Ordering::Release);
            self.follower_next = true;
        } else {
            if batch.merge {
                shared.unmerged.fetch_add(1, Ordering::Relaxed);
            }
            batch.merged.store(MERGED_NO, Ordering::Release);
            frame::sync(out);
            reader.expects.push_back(Expect::AnchorReady { batch });
        }
    }

    /// At a request boundary: settles a held Sync the session has decided on, and writes
    /// the layer's own queries.
    pub(crate) fn idle_work(&mut self, out: &mut BytesMut, reader: &mut Reader, shared: &Shared) {
        if !self.typed || !reader.started || self.current.is_some() || !self.at_boundary {
            return;
        }
        if let Some(batch) = self.held.take() {
            let word = batch.follower.load(Ordering::Acquire);
            match word {
                FOLLOWER_UNKNOWN => {
                    self.held = Some(batch);
                    return;
                }
                // Coming: its first frame comes through `process`. None: the Sync goes now.
                _ => self.resolve(batch, word, out, reader, shared),
            }
        }
        if self.follower_next || self.anchor.is_some() {
            return;
        }
        while let Some(own) = shared.take_own() {
            self.gate(out, reader, shared);
            out.put_slice(&own.sql);
            reader
                .expects
                .push_back(Expect::OursReady { own: Some(own) });
            shared.ours_sent.fetch_add(1, Ordering::AcqRel);
        }
    }
}
