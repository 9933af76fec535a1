//! The backend direction: every reply is matched against what the writer said it sent.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{BufMut, BytesMut};

use super::frame::{self, Head, Header, back, protocol};
use super::{Batch, FLAG_SQL_PREPARED, FLAG_STATEMENTS_LOST, OwnQuery, Shared, TxStatus};

/// Which statements of a batch a step of ours belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    Before,
    After,
}

/// What the server will answer next, in the order the writer wrote it.
#[derive(Debug)]
pub(crate) enum Expect {
    /// The start-up exchange, up to its ReadyForQuery.
    Startup,
    /// A request of tokio-postgres answered by a real ReadyForQuery. `query` for a simple
    /// Query (which the server skips entirely while it skips to a Sync); `parses`: the
    /// Parse frames of the layer's own in it, whose ParseCompletes are swallowed (see
    /// [`Unnamed`](super::unnamed::Unnamed)).
    Theirs {
        query: bool,
        errored: bool,
        parses: u32,
    },
    /// One statement of ours inside a batch: replies swallowed up to its completion.
    Ours { batch: Arc<Batch>, part: Part },
    /// The anchor request of a batch: replies passed up to its completion; a
    /// ReadyForQuery of ours follows when its Sync was removed. `parses` as for `Theirs`.
    Anchor { batch: Arc<Batch>, parses: u32 },
    /// The real ReadyForQuery of an anchor whose Sync was kept.
    AnchorReady { batch: Arc<Batch> },
    /// A Sync or simple query of ours: everything swallowed up to its ReadyForQuery.
    OursReady { own: Option<Arc<OwnQuery>> },
}

/// Frames whose body the reader needs whole; everything else streams through.
fn collected(tag: u8) -> bool {
    matches!(
        tag,
        back::READY_FOR_QUERY
            | back::ERROR
            | back::COMMAND_COMPLETE
            | back::EMPTY_QUERY
            | back::PORTAL_SUSPENDED
            | back::BACKEND_KEY_DATA
            | back::PARAMETER_STATUS
            | back::PARSE_COMPLETE
            | back::BIND_COMPLETE
    )
}

/// The largest control frame the reader collects (an ErrorResponse with a long detail).
const MAX_COLLECTED: usize = 1 << 20;

#[derive(Debug)]
struct Current {
    head: Head,
    remaining: usize,
    /// The body is collected (into [`Reader::body`]); else it streams.
    collecting: bool,
    /// For a streamed frame: pass it on (else swallow).
    pass: bool,
}

/// The reader's state.
#[derive(Debug)]
pub(crate) struct Reader {
    header: Header,
    current: Option<Current>,
    /// The body of the frame being collected; one buffer for every frame, so that the
    /// short control frames of each reply cost no allocation.
    body: Vec<u8>,
    pub(crate) expects: VecDeque<Expect>,
    /// The server is skipping to the next Sync after an error in a batch; the error of
    /// ours that caused it, if not yet given to a request of tokio-postgres.
    skipping: Option<Option<Vec<u8>>>,
    /// One raw byte (the answer to SSLRequest) comes next.
    pub(crate) ssl_answer: bool,
    /// The startup's first ReadyForQuery was read.
    pub(crate) started: bool,
    /// How many entries of [`expects`](Self::expects) were answered in all: with its
    /// length, where an entry written now stands in the order of answers.
    pub(crate) popped: u64,
}

impl Reader {
    pub(crate) fn new() -> Self {
        let mut expects = VecDeque::new();
        expects.push_back(Expect::Startup);
        Self {
            header: Header::default(),
            current: None,
            body: Vec::new(),
            expects,
            skipping: None,
            ssl_answer: false,
            started: false,
            popped: 0,
        }
    }

    /// The next answered entry of [`expects`](Self::expects).
    fn pop(&mut self) -> Option<Expect> {
        let expect = self.expects.pop_front();
        self.popped += u64::from(expect.is_some());
        expect
    }

    /// Whether every entry registered so far was answered: no request awaits its reply.
    pub(crate) fn all_answered(&self) -> bool {
        self.expects.is_empty()
    }

    /// The position in the order of answers after the last entry registered so far.
    pub(crate) fn registered(&self) -> u64 {
        self.popped + self.expects.len() as u64
    }

    /// Whether a frame of ours is being swallowed (its notices too).
    fn swallowing(&self) -> bool {
        matches!(
            self.expects.front(),
            Some(Expect::Ours { .. } | Expect::OursReady { .. })
        )
    }

    /// The writer added `n` Parse frames of its own to the request it is writing (the
    /// last one registered).
    pub(crate) fn add_own_parses(&mut self, n: u32) {
        if let Some(Expect::Theirs { parses, .. } | Expect::Anchor { parses, .. }) =
            self.expects.back_mut()
        {
            *parses += n;
        }
    }

    /// A ParseComplete arrived: whether it answers a Parse of the layer's own inside the
    /// request now answered (it is then swallowed).
    fn own_parse_answered(&mut self) -> bool {
        match self.expects.front_mut() {
            Some(Expect::Theirs { parses, .. } | Expect::Anchor { parses, .. }) if *parses > 0 => {
                *parses -= 1;
                true
            }
            _ => false,
        }
    }

    /// Consumes all of `input`, appending what tokio-postgres must see to `out`.
    pub(crate) fn process(
        &mut self,
        mut input: &[u8],
        out: &mut BytesMut,
        shared: &Shared,
    ) -> io::Result<()> {
        while !input.is_empty() {
            // Only at a frame boundary: a byte taken out of a partial header would
            // reach tokio-postgres ahead of the header's first bytes.
            if self.ssl_answer && self.current.is_none() && self.header.is_empty() {
                // 'S' or 'N': the TLS wrapper takes over after 'S'; 'N' continues plain.
                out.put_u8(input[0]);
                input = &input[1..];
                self.ssl_answer = false;
                continue;
            }
            let Some(cur) = self.current.as_mut() else {
                let (n, head) = self.header.feed(input, true)?;
                input = &input[n..];
                if let Some(head) = head {
                    // A control frame whose body is all here is handled where it lies,
                    // not copied into `body` first: most replies arrive whole.
                    if collected(head.tag) && head.body <= input.len().min(MAX_COLLECTED) {
                        let (body, rest) = input.split_at(head.body);
                        input = rest;
                        self.on_frame(head, body, out, shared)?;
                        continue;
                    }
                    self.start(head, out);
                    if head.body == 0 {
                        self.finish(out, shared)?;
                    }
                }
                continue;
            };
            let n = cur.remaining.min(input.len());
            if cur.collecting {
                self.body.extend_from_slice(&input[..n]);
            } else if cur.pass {
                out.put_slice(&input[..n]);
            }
            cur.remaining -= n;
            input = &input[n..];
            if cur.remaining == 0 {
                self.finish(out, shared)?;
            }
        }
        Ok(())
    }

    fn start(&mut self, head: Head, out: &mut BytesMut) {
        let (collecting, pass) = if collected(head.tag) && head.body <= MAX_COLLECTED {
            self.body.clear();
            (true, false)
        } else {
            let pass = !(self.swallowing() || self.skipping.is_some() && head.tag != back::NOTICE);
            let pass = pass || head.tag == b'A';
            if pass {
                Header::encode(head, out);
            }
            (false, pass)
        };
        self.current = Some(Current {
            head,
            remaining: head.body,
            collecting,
            pass,
        });
    }

    /// A frame is complete.
    fn finish(&mut self, out: &mut BytesMut, shared: &Shared) -> io::Result<()> {
        let Some(cur) = self.current.take() else {
            return Ok(());
        };
        if !cur.collecting {
            return Ok(());
        }
        // Taken for the frame's handling and given back, so that its capacity stays.
        let body = std::mem::take(&mut self.body);
        let result = self.on_frame(cur.head, &body, out, shared);
        self.body = body;
        result
    }

    /// A collected frame is complete.
    fn on_frame(
        &mut self,
        head: Head,
        body: &[u8],
        out: &mut BytesMut,
        shared: &Shared,
    ) -> io::Result<()> {
        match head.tag {
            back::PARAMETER_STATUS => {
                if let Some((name, rest)) = frame::split_cstr(body) {
                    if let Some((value, _)) = frame::split_cstr(rest) {
                        shared.parameters.lock().insert(
                            String::from_utf8_lossy(name).into_owned(),
                            String::from_utf8_lossy(value).into_owned(),
                        );
                    }
                }
                pass(head, body, out);
            }
            back::BACKEND_KEY_DATA => {
                if body.len() >= 4 {
                    let pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    shared.backend_pid.store(i64::from(pid), Ordering::Release);
                }
                pass(head, body, out);
            }
            back::READY_FOR_QUERY => self.on_ready(head, body, out, shared)?,
            back::ERROR => self.on_error(head, body, out, shared)?,
            back::COMMAND_COMPLETE | back::EMPTY_QUERY | back::PORTAL_SUSPENDED => {
                self.on_completion(head, body, out, shared)?;
            }
            _ => {
                // ParseComplete, BindComplete.
                if head.tag == back::PARSE_COMPLETE && self.own_parse_answered() {
                    return Ok(());
                }
                if !self.swallowing() {
                    pass(head, body, out);
                }
            }
        }
        Ok(())
    }

    fn on_completion(
        &mut self,
        head: Head,
        body: &[u8],
        out: &mut BytesMut,
        shared: &Shared,
    ) -> io::Result<()> {
        match self.expects.front() {
            Some(Expect::Ours { batch, part }) => {
                let counter = match part {
                    Part::Before => &batch.before_done,
                    Part::After => &batch.after_done,
                };
                counter.fetch_add(1, Ordering::AcqRel);
                self.pop();
            }
            Some(Expect::OursReady { .. }) => {}
            Some(Expect::Anchor { .. }) => {
                pass(head, body, out);
                self.end_anchor(out, shared)?;
            }
            Some(Expect::Startup) => pass(head, body, out),
            Some(Expect::Theirs { .. }) => {
                if head.tag == back::COMMAND_COMPLETE {
                    note_tag(body, shared);
                }
                pass(head, body, out);
            }
            Some(Expect::AnchorReady { .. }) | None => {
                return Err(protocol("a command completion nobody asked for"));
            }
        }
        Ok(())
    }

    /// The anchor's replies are complete: its own ReadyForQuery follows (ours when its
    /// Sync was removed, else the server's).
    fn end_anchor(&mut self, out: &mut BytesMut, shared: &Shared) -> io::Result<()> {
        let Some(Expect::Anchor { batch, .. }) = self.pop() else {
            return Ok(());
        };
        match batch.merged.load(Ordering::Acquire) {
            super::MERGED_YES => {
                frame::ready(out, TxStatus::InTransaction.to_byte());
                shared.theirs_done.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }
            super::MERGED_NO => Ok(()),
            _ => Err(protocol("an anchor answered before its Sync was decided")),
        }
    }

    fn on_error(
        &mut self,
        head: Head,
        body: &[u8],
        out: &mut BytesMut,
        shared: &Shared,
    ) -> io::Result<()> {
        let fatal = matches!(
            frame::error_field(body, b'V').or_else(|| frame::error_field(body, b'S')),
            Some(b"FATAL" | b"PANIC")
        );
        if fatal {
            // The server is closing the session: let tokio-postgres see why.
            pass(head, body, out);
            return Ok(());
        }
        match self.expects.front() {
            Some(Expect::Ours { .. }) => {
                self.pop();
                let mut whole = Vec::with_capacity(body.len() + 5);
                whole.push(head.tag);
                whole.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
                whole.extend_from_slice(body);
                self.skipping = Some(Some(whole));
            }
            Some(Expect::OursReady { own }) => {
                if let Some(own) = own {
                    own.failed.store(true, Ordering::Release);
                }
            }
            Some(Expect::Anchor { batch, .. }) => {
                // The anchor is answered; the server now skips to the next Sync. When its
                // Sync was kept, the request (the user's own, a stream perhaps) is over
                // at this error, though its ReadyForQuery is still to come.
                if batch.merged.load(Ordering::Acquire) == super::MERGED_NO
                    && !batch.anchor_errored.swap(true, Ordering::AcqRel)
                {
                    shared.errored_open.fetch_add(1, Ordering::AcqRel);
                }
                pass(head, body, out);
                self.end_anchor(out, shared)?;
                self.skipping = Some(None);
            }
            Some(Expect::Theirs { .. }) => {
                // Its ReadyForQuery follows; a stream that ended in this error is over.
                if let Some(Expect::Theirs { errored, .. }) = self.expects.front_mut() {
                    if !*errored {
                        *errored = true;
                        shared.errored_open.fetch_add(1, Ordering::AcqRel);
                    }
                }
                pass(head, body, out);
            }
            Some(Expect::Startup) => pass(head, body, out),
            Some(Expect::AnchorReady { .. }) | None => {
                return Err(protocol("an error nobody asked for"));
            }
        }
        Ok(())
    }

    fn on_ready(
        &mut self,
        head: Head,
        body: &[u8],
        out: &mut BytesMut,
        shared: &Shared,
    ) -> io::Result<()> {
        let status = body
            .first()
            .copied()
            .and_then(TxStatus::from_byte)
            .ok_or_else(|| protocol("a ReadyForQuery without a status"))?;
        shared.status.store(status.to_byte(), Ordering::Release);
        self.started = true;
        let done = &shared.theirs_done;
        if let Some(mut stored) = self.skipping.take() {
            // The server skipped everything up to this Sync: answer each skipped request.
            loop {
                let Some(expect) = self.pop() else {
                    return Err(protocol("a ReadyForQuery nobody asked for"));
                };
                match expect {
                    Expect::Ours { .. } => {}
                    Expect::Anchor { batch, .. } => {
                        give_error(&mut stored, out);
                        if batch.merged.load(Ordering::Acquire) == super::MERGED_YES {
                            frame::ready(out, TxStatus::InTransaction.to_byte());
                            done.fetch_add(1, Ordering::AcqRel);
                        }
                    }
                    Expect::AnchorReady { batch } => {
                        close_anchor_errored(&batch, shared);
                        pass(head, body, out);
                        done.fetch_add(1, Ordering::AcqRel);
                        break;
                    }
                    Expect::Theirs {
                        query: true,
                        errored,
                        ..
                    } => {
                        close_errored(errored, shared);
                        give_error(&mut stored, out);
                        frame::ready(out, status.to_byte());
                        done.fetch_add(1, Ordering::AcqRel);
                    }
                    Expect::Theirs {
                        query: false,
                        errored,
                        ..
                    } => {
                        close_errored(errored, shared);
                        give_error(&mut stored, out);
                        pass(head, body, out);
                        done.fetch_add(1, Ordering::AcqRel);
                        break;
                    }
                    Expect::OursReady { own } => {
                        finish_own(own, shared);
                        break;
                    }
                    Expect::Startup => return Err(protocol("skipping during start-up")),
                }
            }
        } else {
            match self.pop() {
                Some(Expect::Theirs { errored, .. }) => {
                    close_errored(errored, shared);
                    pass(head, body, out);
                    done.fetch_add(1, Ordering::AcqRel);
                }
                Some(Expect::AnchorReady { batch }) => {
                    close_anchor_errored(&batch, shared);
                    pass(head, body, out);
                    done.fetch_add(1, Ordering::AcqRel);
                }
                Some(Expect::OursReady { own }) => finish_own(own, shared),
                Some(Expect::Startup) => pass(head, body, out),
                Some(Expect::Ours { .. } | Expect::Anchor { .. }) | None => {
                    return Err(protocol("a ReadyForQuery nobody asked for"));
                }
            }
        }
        shared.answered.notify_waiters();
        Ok(())
    }
}

/// An anchor whose Sync was kept is answered: if it had an error, it no longer counts as
/// ended early.
fn close_anchor_errored(batch: &Batch, shared: &Shared) {
    if batch.anchor_errored.swap(false, Ordering::AcqRel) {
        shared.errored_open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request that had an error is answered: it no longer counts as ended early.
fn close_errored(errored: bool, shared: &Shared) {
    if errored {
        shared.errored_open.fetch_sub(1, Ordering::AcqRel);
    }
}

fn finish_own(own: Option<Arc<OwnQuery>>, shared: &Shared) {
    if let Some(own) = own {
        own.done.store(true, Ordering::Release);
    }
    shared.ours_done.fetch_add(1, Ordering::AcqRel);
}

/// Gives a skipped request its error: the batch's own first error if no request has had
/// it yet, else the layer's "not run" error.
fn give_error(stored: &mut Option<Vec<u8>>, out: &mut BytesMut) {
    match stored.take() {
        Some(error) => out.put_slice(&error),
        None => frame::skipped_error(out),
    }
}

fn pass(head: Head, body: &[u8], out: &mut BytesMut) {
    Header::encode(head, out);
    out.put_slice(body);
}

/// Command tags that change what the session holds beyond what the pool tracks.
fn note_tag(body: &[u8], shared: &Shared) {
    let tag = frame::split_cstr(body).map_or(body, |(t, _)| t);
    if tag.starts_with(b"DEALLOCATE") || tag == b"DISCARD ALL" {
        shared
            .flags
            .fetch_or(FLAG_STATEMENTS_LOST, Ordering::AcqRel);
    } else if tag == b"PREPARE" {
        shared.flags.fetch_or(FLAG_SQL_PREPARED, Ordering::AcqRel);
    }
}
