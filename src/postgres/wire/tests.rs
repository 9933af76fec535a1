//! Tests of the wire layer: the framing of both directions under arbitrary chunking, and
//! batches (the pool's statements around an anchor request) with what tokio-postgres gets
//! back for them.
//!
//! The frames are built here by hand, not with `frame.rs`, so that the layer is checked
//! against the protocol rather than against itself. A [`Script`] is an exchange cut into
//! segments with the causality of a real one (a reply comes after its request; requests
//! wait for the start-up to finish); [`drive`] feeds it through a [`Writer`] and a
//! [`Reader`] in chunks of random sizes, interleaving the two directions at random.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Buf, BytesMut};
use proptest::prelude::*;

use super::reader::Reader;
use super::writer::Writer;
use super::{Anchor, Batch, SKIPPED_SQLSTATE, Statements, TxStatus, WireHandle, frame};

// ---------------------------------------------------------------------------------------
// Frames, by hand.
// ---------------------------------------------------------------------------------------

fn typed(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn untyped(body: &[u8]) -> Vec<u8> {
    let mut out = u32::try_from(body.len() + 4)
        .unwrap()
        .to_be_bytes()
        .to_vec();
    out.extend_from_slice(body);
    out
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

/// Frontend messages.
mod fe {
    use super::{cstr, typed, untyped};

    pub(super) fn ssl_request() -> Vec<u8> {
        untyped(&80_877_103u32.to_be_bytes())
    }

    pub(super) fn startup() -> Vec<u8> {
        let mut body = 196_608u32.to_be_bytes().to_vec();
        for s in [
            "user",
            "hr_app",
            "database",
            "hr",
            "client_encoding",
            "UTF8",
        ] {
            cstr(&mut body, s);
        }
        body.push(0);
        untyped(&body)
    }

    pub(super) fn password(pw: &str) -> Vec<u8> {
        let mut body = Vec::new();
        cstr(&mut body, pw);
        typed(b'p', &body)
    }

    pub(super) fn parse(name: &str, sql: &str) -> Vec<u8> {
        parse_typed(name, sql, &[])
    }

    /// A Close of the named statement.
    pub(super) fn close_statement(name: &str) -> Vec<u8> {
        let mut body = vec![b'S'];
        cstr(&mut body, name);
        typed(b'C', &body)
    }

    /// A Parse declaring these parameter type OIDs.
    pub(super) fn parse_typed(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
        let mut body = Vec::new();
        cstr(&mut body, name);
        cstr(&mut body, sql);
        body.extend_from_slice(&i16::try_from(types.len()).unwrap().to_be_bytes());
        for oid in types {
            body.extend_from_slice(&oid.to_be_bytes());
        }
        typed(b'P', &body)
    }

    /// A Bind with text parameters and no result formats.
    pub(super) fn bind(portal: &str, stmt: &str, params: &[&[u8]]) -> Vec<u8> {
        let mut body = Vec::new();
        cstr(&mut body, portal);
        cstr(&mut body, stmt);
        body.extend_from_slice(&0i16.to_be_bytes());
        body.extend_from_slice(&i16::try_from(params.len()).unwrap().to_be_bytes());
        for p in params {
            body.extend_from_slice(&i32::try_from(p.len()).unwrap().to_be_bytes());
            body.extend_from_slice(p);
        }
        body.extend_from_slice(&0i16.to_be_bytes());
        typed(b'B', &body)
    }

    pub(super) fn describe(kind: u8, name: &str) -> Vec<u8> {
        let mut body = vec![kind];
        cstr(&mut body, name);
        typed(b'D', &body)
    }

    pub(super) fn execute(portal: &str) -> Vec<u8> {
        let mut body = Vec::new();
        cstr(&mut body, portal);
        body.extend_from_slice(&0i32.to_be_bytes());
        typed(b'E', &body)
    }

    pub(super) fn sync() -> Vec<u8> {
        typed(b'S', &[])
    }

    pub(super) fn query(sql: &str) -> Vec<u8> {
        let mut body = Vec::new();
        cstr(&mut body, sql);
        typed(b'Q', &body)
    }

    /// One statement of the pool's own as the layer writes it: unnamed Parse, Bind,
    /// Execute.
    pub(super) fn ours(sql: &str) -> Vec<u8> {
        [parse("", sql), bind("", "", &[]), execute("")].concat()
    }
}

/// Backend messages.
mod be {
    use super::{cstr, typed};

    pub(super) fn auth(code: i32) -> Vec<u8> {
        typed(b'R', &code.to_be_bytes())
    }

    pub(super) fn parameter(name: &str, value: &str) -> Vec<u8> {
        let mut body = Vec::new();
        cstr(&mut body, name);
        cstr(&mut body, value);
        typed(b'S', &body)
    }

    pub(super) fn key_data(pid: i32, key: i32) -> Vec<u8> {
        let mut body = pid.to_be_bytes().to_vec();
        body.extend_from_slice(&key.to_be_bytes());
        typed(b'K', &body)
    }

    pub(super) fn ready(status: u8) -> Vec<u8> {
        typed(b'Z', &[status])
    }

    pub(super) fn parse_complete() -> Vec<u8> {
        typed(b'1', &[])
    }

    pub(super) fn close_complete() -> Vec<u8> {
        typed(b'3', &[])
    }

    pub(super) fn bind_complete() -> Vec<u8> {
        typed(b'2', &[])
    }

    pub(super) fn parameter_description() -> Vec<u8> {
        typed(b't', &0i16.to_be_bytes())
    }

    pub(super) fn no_data() -> Vec<u8> {
        typed(b'n', &[])
    }

    pub(super) fn row_description() -> Vec<u8> {
        let mut body = 1i16.to_be_bytes().to_vec();
        cstr(&mut body, "v");
        body.extend_from_slice(&0i32.to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes());
        body.extend_from_slice(&25i32.to_be_bytes());
        body.extend_from_slice(&(-1i16).to_be_bytes());
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes());
        typed(b'T', &body)
    }

    /// A one-column row whose value is `width` bytes (so that rows span chunks).
    pub(super) fn data_row(seed: usize, width: usize) -> Vec<u8> {
        let mut body = 1i16.to_be_bytes().to_vec();
        body.extend_from_slice(&i32::try_from(width).unwrap().to_be_bytes());
        body.extend((0..width).map(|i| (seed + i) as u8));
        typed(b'D', &body)
    }

    pub(super) fn complete(tag: &str) -> Vec<u8> {
        let mut body = Vec::new();
        cstr(&mut body, tag);
        typed(b'C', &body)
    }

    pub(super) fn empty_query() -> Vec<u8> {
        typed(b'I', &[])
    }

    fn fields(severity: &str, code: &str, message: &str) -> Vec<u8> {
        let mut body = Vec::new();
        for (f, v) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', code),
            (b'M', message),
        ] {
            body.push(f);
            cstr(&mut body, v);
        }
        body.push(0);
        body
    }

    pub(super) fn error(code: &str, message: &str) -> Vec<u8> {
        typed(b'E', &fields("ERROR", code, message))
    }

    pub(super) fn notice(message: &str) -> Vec<u8> {
        typed(b'N', &fields("WARNING", "25P01", message))
    }

    pub(super) fn notification(channel: &str, payload: &str) -> Vec<u8> {
        let mut body = 4242i32.to_be_bytes().to_vec();
        cstr(&mut body, channel);
        cstr(&mut body, payload);
        typed(b'A', &body)
    }
}

/// The layer's "not run" error, which the reader gives a request the server skipped.
fn skipped() -> Vec<u8> {
    let mut out = BytesMut::new();
    frame::skipped_error(&mut out);
    out.to_vec()
}

/// A typed byte stream cut into frames: `(tag, body)`.
fn frames(mut bytes: &[u8]) -> Vec<(char, Vec<u8>)> {
    let mut out = Vec::new();
    while bytes.len() >= 5 {
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        out.push((char::from(bytes[0]), bytes[5..1 + len].to_vec()));
        bytes = &bytes[1 + len..];
    }
    assert!(bytes.is_empty(), "a partial frame at the end");
    out
}

/// The tags of a typed byte stream, for readable failures.
fn tags(bytes: &[u8]) -> String {
    frames(bytes).into_iter().map(|(t, _)| t).collect()
}

/// The SQLSTATE of an ErrorResponse body.
fn sqlstate(body: &[u8]) -> Option<String> {
    frame::error_field(body, b'C').map(|c| String::from_utf8_lossy(c).into_owned())
}

// ---------------------------------------------------------------------------------------
// Scripts and the driver.
// ---------------------------------------------------------------------------------------

/// An exchange cut into segments. A frontend segment may be written once `after`
/// backend segments were read whole (the client waited for them); a backend segment may
/// be read once `after` frontend segments were written whole (the server answers what
/// it received).
#[derive(Debug, Default)]
struct Script {
    front: Vec<(Vec<u8>, usize)>,
    back: Vec<(Vec<u8>, usize)>,
}

impl Script {
    fn front(&mut self, bytes: Vec<u8>, after_back: usize) -> usize {
        assert!(!bytes.is_empty());
        self.front.push((bytes, after_back));
        self.front.len() - 1
    }

    fn back(&mut self, bytes: Vec<u8>, after_front: usize) -> usize {
        assert!(!bytes.is_empty());
        self.back.push((bytes, after_front));
        self.back.len() - 1
    }

    fn front_bytes(&self) -> Vec<u8> {
        self.front
            .iter()
            .flat_map(|(b, _)| b.iter().copied())
            .collect()
    }

    fn back_bytes(&self) -> Vec<u8> {
        self.back
            .iter()
            .flat_map(|(b, _)| b.iter().copied())
            .collect()
    }
}

/// How the bytes are cut: chunk sizes (cycled), and which direction goes next when both
/// may (cycled).
#[derive(Debug, Clone)]
struct Chunking {
    sizes: Vec<usize>,
    front_first: Vec<bool>,
}

impl Chunking {
    /// Every direction in as few chunks as causality allows, the frontend first.
    fn whole() -> Self {
        Self {
            sizes: vec![usize::MAX],
            front_first: vec![true],
        }
    }

    fn bytewise() -> Self {
        Self {
            sizes: vec![1],
            front_first: vec![true, false],
        }
    }
}

fn ends(segs: &[(Vec<u8>, usize)]) -> Vec<usize> {
    segs.iter()
        .scan(0, |at, (b, _)| {
            *at += b.len();
            Some(*at)
        })
        .collect()
}

/// How many segments end at or before `pos`.
fn done(ends: &[usize], pos: usize) -> usize {
    ends.iter().take_while(|&&e| e <= pos).count()
}

/// How far a direction may go now: to the end of the last segment, from the first one
/// not yet done, whose prerequisite holds; never past a segment in `stops`.
fn limit(
    segs: &[(Vec<u8>, usize)],
    ends: &[usize],
    done: usize,
    other_done: usize,
    stops: &[usize],
) -> usize {
    let mut lim = if done == 0 { 0 } else { ends[done - 1] };
    for (k, (_, after)) in segs.iter().enumerate().skip(done) {
        if *after > other_done {
            break;
        }
        lim = ends[k];
        if stops.contains(&k) {
            break;
        }
    }
    lim
}

/// What the layer put out.
#[derive(Debug)]
struct Run {
    to_server: Vec<u8>,
    to_client: Vec<u8>,
}

/// Feeds `script` through a writer and a reader sharing `handle`, as a [`WireStream`]
/// would: the writer's idle work before and after each chunk (`poll_write` and
/// `poll_flush`). `hook(k)` runs once frontend segment `k` in `stops` is written whole,
/// before anything else goes.
///
/// [`WireStream`]: super::WireStream
fn drive(
    script: &Script,
    chunking: &Chunking,
    handle: &WireHandle,
    stops: &[usize],
    mut hook: impl FnMut(usize),
) -> Run {
    let shared = &*handle.0;
    let mut writer = Writer::new();
    let mut reader = Reader::new();
    let front = script.front_bytes();
    let back = script.back_bytes();
    let front_ends = ends(&script.front);
    let back_ends = ends(&script.back);
    let mut to_server = BytesMut::new();
    let mut to_client = BytesMut::new();
    let (mut f, mut b) = (0usize, 0usize);
    let mut sizes = chunking.sizes.iter().copied().cycle();
    let mut front_first = chunking.front_first.iter().copied().cycle();
    loop {
        let f_done = done(&front_ends, f);
        let b_done = done(&back_ends, b);
        let f_lim = limit(&script.front, &front_ends, f_done, b_done, stops);
        let b_lim = limit(&script.back, &back_ends, b_done, f_done, &[]);
        let (can_f, can_b) = (f < f_lim, b < b_lim);
        let go_front = match (can_f, can_b) {
            (false, false) => break,
            (true, false) => true,
            (false, true) => false,
            (true, true) => front_first.next().unwrap(),
        };
        let size = sizes.next().unwrap().max(1);
        if go_front {
            let end = f.saturating_add(size).min(f_lim);
            writer.idle_work(&mut to_server, &mut reader, shared);
            writer
                .process(&front[f..end], &mut to_server, &mut reader, shared)
                .expect("the writer refused a well-formed stream");
            f = end;
            for k in f_done..done(&front_ends, f) {
                if stops.contains(&k) {
                    hook(k);
                }
            }
            writer.idle_work(&mut to_server, &mut reader, shared);
        } else {
            let end = b.saturating_add(size).min(b_lim);
            reader
                .process(&back[b..end], &mut to_client, shared)
                .expect("the reader refused a well-formed stream");
            b = end;
        }
    }
    assert_eq!(
        (f, b),
        (front.len(), back.len()),
        "the script deadlocked: a segment waits for one that never comes"
    );
    writer.idle_work(&mut to_server, &mut reader, shared);
    // Behind a transaction pooler a request waits for the one before it: bytes stay held
    // back while a request is unanswered.
    if !shared.pooled() || reader.all_answered() {
        assert_eq!(
            writer.flushable(&to_server, &reader),
            to_server.len(),
            "the writer still holds bytes back"
        );
    }
    Run {
        to_server: to_server.to_vec(),
        to_client: to_client.to_vec(),
    }
}

fn chunking() -> impl Strategy<Value = Chunking> {
    let size = prop_oneof![6 => 1usize..8, 3 => 1usize..64, 1 => 1usize..4096];
    (
        prop::collection::vec(size, 1..24),
        prop::collection::vec(any::<bool>(), 1..24),
    )
        .prop_map(|(sizes, front_first)| Chunking { sizes, front_first })
}

fn status() -> impl Strategy<Value = u8> {
    prop_oneof![Just(b'I'), Just(b'T'), Just(b'E')]
}

fn tx_status(b: u8) -> TxStatus {
    match b {
        b'I' => TxStatus::Idle,
        b'T' => TxStatus::InTransaction,
        _ => TxStatus::Failed,
    }
}

/// `default` cases (the project's property tests run 10,000), or `PROPTEST_CASES`.
fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Pass-through: requests of tokio-postgres with no batch armed.
// ---------------------------------------------------------------------------------------

/// Statement names and texts close to the anchors of the batch tests (prefixes,
/// extensions), so that the probe's decision is exercised on near misses.
const NAMES: [&str; 5] = ["", "s70", "s", "s7x", "S7"];
const TEXTS: [&str; 4] = [
    "SELECT ctxpool_sync($1) ",
    "SELECT ctxpool_sync($",
    "SELECT name FROM hr.employees WHERE id = $1",
    "SET application_name = 'x'",
];
/// Command tags, some of which the reader acts on.
const TAGS: [&str; 7] = [
    "SELECT 3",
    "INSERT 0 1",
    "DEALLOCATE ALL",
    "DEALLOCATE s1",
    "DISCARD ALL",
    "PREPARE",
    "SET",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Bind, Execute, Sync (a statement prepared earlier); with a Parse first if `true`.
    Extended(bool),
    /// Parse, Describe of the statement, Sync (`prepare`).
    Prepare,
    /// A simple Query.
    Simple,
    /// Close of the statement, Sync (a `Statement` dropped).
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// A CommandComplete with `TAGS[i]`.
    Complete(usize),
    /// An ErrorResponse after the rows.
    Fail,
    /// EmptyQueryResponse (a simple Query of nothing).
    Empty,
}

/// One request of tokio-postgres and the server's answer to it.
#[derive(Debug, Clone)]
struct Req {
    kind: Kind,
    pick: usize,
    rows: usize,
    width: usize,
    end: End,
    notice: bool,
    param: Option<usize>,
    notify: bool,
    status: u8,
}

fn req() -> impl Strategy<Value = Req> {
    let kind = prop_oneof![
        any::<bool>().prop_map(Kind::Extended),
        Just(Kind::Prepare),
        Just(Kind::Simple),
        Just(Kind::Close),
    ];
    let end = prop_oneof![
        4 => (0..TAGS.len()).prop_map(End::Complete),
        1 => Just(End::Fail),
        1 => Just(End::Empty),
    ];
    (
        (kind, 0usize..64, 0usize..4, 0usize..300, end),
        (
            any::<bool>(),
            prop::option::of(0usize..100),
            any::<bool>(),
            status(),
        ),
    )
        .prop_map(
            |((kind, pick, rows, width, end), (notice, param, notify, status))| Req {
                kind,
                pick,
                rows,
                width,
                // Only a simple Query of nothing answers EmptyQueryResponse.
                end: if end == End::Empty && kind != Kind::Simple {
                    End::Complete(0)
                } else {
                    end
                },
                notice,
                param,
                notify,
                status,
            },
        )
}

impl Req {
    fn name(&self) -> &'static str {
        NAMES[self.pick % NAMES.len()]
    }

    fn text(&self) -> &'static str {
        TEXTS[self.pick % TEXTS.len()]
    }

    fn front(&self) -> Vec<u8> {
        let execute = || {
            vec![
                fe::bind("", self.name(), &[b"42", b"x"]),
                fe::execute(""),
                fe::sync(),
            ]
        };
        match self.kind {
            Kind::Extended(false) => cat(&execute()),
            Kind::Extended(true) => {
                let mut parts = vec![fe::parse(self.name(), self.text())];
                parts.extend(execute());
                cat(&parts)
            }
            Kind::Prepare => cat(&[
                fe::parse(self.name(), self.text()),
                fe::describe(b'S', self.name()),
                fe::sync(),
            ]),
            Kind::Simple => fe::query(self.text()),
            Kind::Close => cat(&[fe::close_statement(self.name()), fe::sync()]),
        }
    }

    fn back(&self) -> Vec<u8> {
        let mut parts = Vec::new();
        if self.notice {
            parts.push(be::notice("a notice of the request"));
        }
        match self.kind {
            Kind::Extended(parse) => {
                if parse {
                    parts.push(be::parse_complete());
                }
                parts.push(be::bind_complete());
                self.rows_and_end(&mut parts);
            }
            Kind::Prepare => {
                if self.end == End::Fail {
                    parts.push(be::error("42P01", "relation does not exist"));
                } else {
                    parts.push(be::parse_complete());
                    parts.push(be::parameter_description());
                    parts.push(if self.rows == 0 {
                        be::no_data()
                    } else {
                        be::row_description()
                    });
                }
            }
            Kind::Close => parts.push(be::close_complete()),
            Kind::Simple => {
                if self.end == End::Empty {
                    parts.push(be::empty_query());
                } else {
                    parts.push(be::row_description());
                    self.rows_and_end(&mut parts);
                }
            }
        }
        if let Some(v) = self.param {
            parts.push(be::parameter("application_name", &format!("app{v}")));
        }
        if self.notify {
            parts.push(be::notification("jobs", "a payload"));
        }
        parts.push(be::ready(self.status));
        cat(&parts)
    }

    fn rows_and_end(&self, parts: &mut Vec<Vec<u8>>) {
        for r in 0..self.rows {
            parts.push(be::data_row(r, self.width));
        }
        parts.push(match self.end {
            End::Complete(t) => be::complete(TAGS[t]),
            End::Fail => be::error("22012", "division by zero"),
            End::Empty => be::empty_query(),
        });
    }

    /// The command tag the server completed the request with, if any (a Prepare has
    /// none).
    fn tag(&self) -> Option<&'static str> {
        match (self.kind, self.end) {
            (Kind::Prepare | Kind::Close, _) => None,
            (_, End::Complete(t)) => Some(TAGS[t]),
            _ => None,
        }
    }
}

/// A whole session: start-up, then requests, of which the first `answered` get replies.
#[derive(Debug, Clone)]
struct Exchange {
    ssl: bool,
    password: bool,
    pid: i32,
    reqs: Vec<Req>,
    answered: usize,
}

fn exchange() -> impl Strategy<Value = Exchange> {
    (
        any::<bool>(),
        any::<bool>(),
        any::<i32>(),
        prop::collection::vec(req(), 0..10),
        0usize..12,
    )
        .prop_map(|(ssl, password, pid, reqs, answered)| Exchange {
            ssl,
            password,
            pid,
            answered: answered.min(reqs.len()),
            reqs,
        })
}

/// The start-up of every script: SSLRequest refused, a password round, the server's
/// parameters, BackendKeyData, ReadyForQuery `I`. Returns how many backend segments
/// requests must wait for.
fn startup(script: &mut Script, ssl: bool, password: bool, pid: i32) -> usize {
    if ssl {
        let f = script.front(fe::ssl_request(), 0);
        script.back(b"N".to_vec(), f + 1);
    }
    let f = script.front(fe::startup(), script.back.len());
    if password {
        script.back(be::auth(3), f + 1);
        let f = script.front(fe::password("secret"), script.back.len());
        script.back(be::auth(0), f + 1);
    } else {
        script.back(be::auth(0), f + 1);
    }
    let front_done = script.front.len();
    script.back(
        cat(&[
            be::parameter("server_version", "17.2"),
            be::parameter("application_name", "initial"),
            be::key_data(pid, 0x5eed),
            be::notice("a notice during start-up"),
            be::ready(b'I'),
        ]),
        front_done,
    );
    script.back.len()
}

impl Exchange {
    fn script(&self) -> Script {
        let fronts: Vec<Vec<u8>> = self.reqs.iter().map(Req::front).collect();
        let backs: Vec<Vec<u8>> = self.reqs.iter().map(Req::back).collect();
        self.script_of(fronts, backs)
    }

    /// The script with these frontend bytes and server answers, one per request.
    fn script_of(&self, fronts: Vec<Vec<u8>>, backs: Vec<Vec<u8>>) -> Script {
        let mut script = Script::default();
        let started = startup(&mut script, self.ssl, self.password, self.pid);
        let fronts: Vec<usize> = fronts
            .into_iter()
            .map(|bytes| script.front(bytes, started))
            .collect();
        for (back, f) in backs.into_iter().zip(fronts).take(self.answered) {
            script.back(back, f + 1);
        }
        script
    }

    /// What the server sees, request by request, when statements go unnamed (see
    /// `super::unnamed`), and what it answers: a named statement's text is parsed into
    /// the unnamed statement in every request that binds it, that Parse answered first.
    fn unnamed(&self) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let mut texts: HashMap<&str, &str> = HashMap::new();
        let (mut fronts, mut backs) = (Vec::new(), Vec::new());
        for r in &self.reqs {
            let (name, text) = (r.name(), r.text());
            let bind = || fe::bind("", "", &[b"42", b"x"]);
            let mut back = r.back();
            let front = match r.kind {
                _ if name.is_empty() => r.front(),
                Kind::Extended(parse) => {
                    let known = texts.get(name).copied();
                    if parse {
                        texts.insert(name, text);
                    } else if known.is_some() {
                        back = cat(&[be::parse_complete(), back]);
                    }
                    match (parse, known) {
                        (false, None) => r.front(),
                        (false, Some(known)) => {
                            cat(&[fe::parse("", known), bind(), fe::execute(""), fe::sync()])
                        }
                        (true, _) => {
                            cat(&[fe::parse("", text), bind(), fe::execute(""), fe::sync()])
                        }
                    }
                }
                Kind::Prepare => {
                    texts.insert(name, text);
                    cat(&[fe::parse("", text), fe::describe(b'S', ""), fe::sync()])
                }
                Kind::Close if texts.remove(name).is_some() => {
                    cat(&[fe::close_statement(""), fe::sync()])
                }
                Kind::Close | Kind::Simple => r.front(),
            };
            fronts.push(front);
            backs.push(back);
        }
        (fronts, backs)
    }

    /// The session state the script implies once it ran.
    fn implied(&self) -> Implied {
        let answered = &self.reqs[..self.answered];
        let tags = || answered.iter().filter_map(Req::tag);
        Implied {
            outstanding: ((self.reqs.len() - self.answered) as u64, 0),
            status: answered
                .last()
                .map_or(TxStatus::Idle, |r| tx_status(r.status)),
            pid: Some(self.pid),
            application_name: answered
                .iter()
                .rev()
                .find_map(|r| r.param)
                .map_or_else(|| "initial".to_owned(), |v| format!("app{v}")),
            statements_lost: tags().any(|t| t.starts_with("DEALLOCATE") || t == "DISCARD ALL"),
            sql_prepared: tags().any(|t| t == "PREPARE"),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Implied {
    outstanding: (u64, u64),
    status: TxStatus,
    pid: Option<i32>,
    application_name: String,
    statements_lost: bool,
    sql_prepared: bool,
}

fn observed(handle: &WireHandle) -> Implied {
    Implied {
        outstanding: handle.outstanding(),
        status: handle.status(),
        pid: handle.backend_pid(),
        application_name: handle.parameter("application_name").unwrap_or_default(),
        statements_lost: handle.statements_lost(),
        sql_prepared: handle.take_sql_prepared(),
    }
}

proptest! {
    #![proptest_config(config(10_000))]

    /// With no batch armed, both directions come out byte for byte as they went in, for
    /// every chunking and interleaving, and the handle ends in the state the script
    /// implies (answered requests, last status, pid, parameters, command tags).
    #[test]
    fn pass_through_under_any_chunking(ex in exchange(), cut in chunking()) {
        let script = ex.script();
        for chunking in [cut, Chunking::whole()] {
            let handle = WireHandle::new();
            let run = drive(&script, &chunking, &handle, &[], |_| {});
            prop_assert!(run.to_server == script.front_bytes(), "frontend changed");
            prop_assert!(run.to_client == script.back_bytes(), "backend changed");
            prop_assert_eq!(observed(&handle), ex.implied());
            prop_assert!(!handle.is_settled() || ex.answered == ex.reqs.len());
        }
    }
}

proptest! {
    #![proptest_config(config(10_000))]

    /// With statements going unnamed (behind a transaction pooler), no statement name
    /// reaches the server: it sees exactly what the request-level model says (each
    /// named statement parsed into the unnamed one by every request that binds or
    /// describes it), tokio-postgres gets the server's answers without the ParseCompletes
    /// of the layer's own Parses, byte for byte, and the handle ends in the state the
    /// script implies; under any chunking and interleaving.
    #[test]
    fn named_statements_go_unnamed_under_any_chunking(ex in exchange(), cut in chunking()) {
        let (server_fronts, server_backs) = ex.unnamed();
        let expected = ex.script_of(server_fronts, server_backs.clone());
        let fronts: Vec<Vec<u8>> = ex.reqs.iter().map(Req::front).collect();
        let script = ex.script_of(fronts, server_backs);
        for chunking in [cut, Chunking::whole()] {
            let handle = WireHandle::new();
            handle.behind_transaction_pooler();
            let run = drive(&script, &chunking, &handle, &[], |_| {});
            prop_assert!(run.to_server == expected.front_bytes(), "frontend not as modelled");
            prop_assert!(run.to_client == ex.script().back_bytes(), "backend changed");
            prop_assert_eq!(observed(&handle), ex.implied());
        }
    }
}

/// A writer and a reader past the start-up, driven by hand.
struct Started {
    handle: WireHandle,
    writer: Writer,
    reader: Reader,
    to_server: BytesMut,
    to_client: BytesMut,
    /// What the server answered to the start-up.
    startup_back: Vec<u8>,
}

impl Started {
    /// Started, as behind a transaction pooler if `pooled`, the start-up's ReadyForQuery
    /// saying `status`.
    fn new(pooled: bool, status: u8) -> Self {
        let handle = WireHandle::new();
        if pooled {
            handle.behind_transaction_pooler();
        }
        let (mut writer, mut reader) = (Writer::new(), Reader::new());
        let (mut to_server, mut to_client) = (BytesMut::new(), BytesMut::new());
        let startup_back = cat(&[be::auth(0), be::key_data(7, 7), be::ready(status)]);
        writer
            .process(&fe::startup(), &mut to_server, &mut reader, &handle.0)
            .unwrap();
        reader
            .process(&startup_back, &mut to_client, &handle.0)
            .unwrap();
        Self {
            handle,
            writer,
            reader,
            to_server,
            to_client,
            startup_back,
        }
    }
}

/// Behind a transaction pooler, a request written while an earlier one awaits its
/// ReadyForQuery is held back until that comes, each in its turn, its place kept while
/// the bytes before it drain. (A follower merged with its anchor is one request with it:
/// the live PgBouncer tests run those.)
#[test]
fn behind_a_pooler_a_request_waits_for_the_one_before() {
    let Started {
        handle,
        mut writer,
        mut reader,
        mut to_server,
        mut to_client,
        ..
    } = Started::new(true, b'I');
    let shared = &*handle.0;
    let started = to_server.len();
    let first = cat(&[fe::bind("", "", &[]), fe::execute(""), fe::sync()]);
    let second = fe::query("SELECT 2");
    let third = cat(&[fe::close_statement(""), fe::sync()]);
    for req in [&first, &second, &third] {
        writer
            .process(req, &mut to_server, &mut reader, shared)
            .unwrap();
    }
    // All of it is buffered, in order; only the first request may go.
    assert_eq!(
        to_server.to_vec(),
        cat(&[fe::startup(), first.clone(), second.clone(), third.clone()])
    );
    assert_eq!(writer.flushable(&to_server, &reader), started + first.len());
    let answer_first = cat(&[
        be::bind_complete(),
        be::complete("SELECT 0"),
        be::ready(b'I'),
    ]);
    reader
        .process(&answer_first, &mut to_client, shared)
        .unwrap();
    assert_eq!(
        writer.flushable(&to_server, &reader),
        started + first.len() + second.len()
    );
    // Drained up to there: the third still waits, at its new place.
    writer.drained(started + first.len());
    to_server.advance(started + first.len());
    assert_eq!(writer.flushable(&to_server, &reader), second.len());
    let answer_second = cat(&[be::complete("SELECT 0"), be::ready(b'I')]);
    reader
        .process(&answer_second, &mut to_client, shared)
        .unwrap();
    assert_eq!(writer.flushable(&to_server, &reader), to_server.len());
    assert!(!writer.gated());
}

/// COPY FROM STDIN: the data goes after the Sync of its request, which the server
/// ignores; the one after CopyDone is answered. The data is no request of its own: it is
/// not registered, and behind a pooler it is not held back.
#[test]
fn copy_in_data_belongs_to_its_request() {
    for pooled in [false, true] {
        let Started {
            handle,
            mut writer,
            mut reader,
            mut to_server,
            mut to_client,
            startup_back,
        } = Started::new(pooled, b'T');
        let shared = &*handle.0;
        let copy = cat(&[fe::bind("", "", &[]), fe::execute(""), fe::sync()]);
        let data = cat(&[
            typed(b'd', b"1\n"),
            typed(b'd', b"2\n"),
            typed(b'c', b""),
            fe::sync(),
        ]);
        writer
            .process(&copy, &mut to_server, &mut reader, shared)
            .unwrap();
        let copy_in_response = typed(b'G', &[0, 0, 1, 0, 0]);
        let first = cat(&[be::bind_complete(), copy_in_response]);
        reader.process(&first, &mut to_client, shared).unwrap();
        writer
            .process(&data, &mut to_server, &mut reader, shared)
            .unwrap();
        writer.idle_work(&mut to_server, &mut reader, shared);
        assert_eq!(
            writer.flushable(&to_server, &reader),
            to_server.len(),
            "pooled: {pooled}"
        );
        assert_eq!(handle.outstanding(), (1, 0), "one request: pooled {pooled}");
        let last = cat(&[be::complete("COPY 2"), be::ready(b'T')]);
        reader.process(&last, &mut to_client, shared).unwrap();
        assert_eq!(to_server.to_vec(), cat(&[fe::startup(), copy, data]));
        assert_eq!(to_client.to_vec(), cat(&[startup_back, first, last]));
        assert_eq!(handle.outstanding(), (0, 0), "answered: pooled {pooled}");
    }
}

#[test]
fn pass_through_byte_by_byte() {
    let reqs = (0..6)
        .map(|i| Req {
            kind: [Kind::Extended(true), Kind::Prepare, Kind::Simple][i % 3],
            pick: i,
            rows: i % 3,
            width: 7,
            end: End::Complete(i % TAGS.len()),
            notice: i % 2 == 0,
            param: Some(i),
            notify: true,
            status: b"ITE"[i % 3],
        })
        .collect::<Vec<_>>();
    let ex = Exchange {
        ssl: true,
        password: true,
        pid: 31337,
        answered: 4,
        reqs,
    };
    let script = ex.script();
    let handle = WireHandle::new();
    let run = drive(&script, &Chunking::bytewise(), &handle, &[], |_| {});
    assert_eq!(run.to_server, script.front_bytes());
    assert_eq!(run.to_client, script.back_bytes());
    assert_eq!(observed(&handle), ex.implied());
    assert_eq!(handle.outstanding(), (2, 0));
    assert_eq!(handle.backend_pid(), Some(31337));
    assert!(!handle.is_settled());
}

// ---------------------------------------------------------------------------------------
// Batches.
// ---------------------------------------------------------------------------------------

/// The anchors: a prepared context statement (`Anchor::Named`), or an unnamed Parse of
/// a fixed text (`Anchor::Unnamed`).
const ANCHOR_NAME: &str = "s7";
const ANCHOR_SQL: &str = "SELECT ctxpool_sync($1)";

/// What the session said about the request after the anchor, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Word {
    /// `follower(true)` before the anchor is written.
    Sent,
    /// `follower(false)` before the anchor is written.
    NotSent,
    /// Never said: the layer holds the Sync until the next request arrives.
    Unsaid,
    /// Said `false` only after the anchor's Sync reached the layer (held, then released).
    LateNotSent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Follower {
    /// Bind, Execute, Sync of a prepared statement.
    Extended,
    /// A simple Query (the writer then appends a Sync of its own).
    Simple,
    /// No request after the anchor.
    Absent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fail {
    Nothing,
    Before(usize),
    Anchor,
    After(usize),
    Follower,
}

/// One statement of the pool's own and what the server says to it besides completing.
#[derive(Debug, Clone)]
struct Ours {
    sql: &'static str,
    /// How the layer writes it.
    prepared: Form,
    rows: usize,
    notice: bool,
    param: bool,
}

/// How a statement of the pool's own is written.
#[derive(Debug, Clone, Copy)]
enum Form {
    /// Parsed unnamed (`Statements::push`).
    Unnamed,
    /// Prepared at connect under this name (`Statements::push_prepared`): Bind and
    /// Execute only.
    Prepared(&'static str),
    /// Prepared under this name in the batch itself, then bound to one text parameter
    /// (`Statements::push_parsed_bound`): the first use of a context statement.
    ParsedNamed(&'static str),
}

/// Names of the pool's statements prepared at connect.
const OUR_NAMES: [&str; 3] = ["ctxpool_r0", "ctxpool_r1", "ctxpool_r2"];

impl Ours {
    fn push_to(&self, statements: &mut Statements) {
        match self.prepared {
            Form::Prepared(name) => statements.push_prepared(name),
            Form::Unnamed => statements.push(self.sql),
            Form::ParsedNamed(name) => {
                statements.push_parsed_bound(name, self.sql, &[25], ["a text"].into_iter());
            }
        }
    }

    /// The statement as the layer writes it.
    fn front(&self) -> Vec<u8> {
        match self.prepared {
            Form::Prepared(name) => [fe::bind("", name, &[]), fe::execute("")].concat(),
            Form::Unnamed => fe::ours(self.sql),
            Form::ParsedNamed(name) => [
                fe::close_statement(name),
                fe::parse_typed(name, self.sql, &[25]),
                fe::bind("", name, &[b"a text"]),
                fe::execute(""),
            ]
            .concat(),
        }
    }
}

const OUR_SQL: [&str; 4] = [
    "RESET ALL",
    "RESET ROLE",
    "COMMIT",
    "SELECT ctxpool.check()",
];

fn ours() -> impl Strategy<Value = Ours> {
    (
        0..OUR_SQL.len(),
        prop::option::of((0..OUR_NAMES.len(), any::<bool>())),
        0usize..3,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(i, prepared, rows, notice, param)| Ours {
            sql: OUR_SQL[i],
            prepared: match prepared {
                None => Form::Unnamed,
                Some((n, false)) => Form::Prepared(OUR_NAMES[n]),
                Some((n, true)) => Form::ParsedNamed(OUR_NAMES[n]),
            },
            rows,
            notice,
            param,
        })
}

#[derive(Debug, Clone)]
struct BatchCase {
    unnamed: bool,
    /// The anchor is the next request that starts with a Bind (the user's own request,
    /// the batch holding the pool's statements); `unnamed` is then false.
    next_bind: bool,
    before: Vec<Ours>,
    after: Vec<Ours>,
    merge: bool,
    word: Word,
    follower: Follower,
    fail: Fail,
    /// How many replies precede an error (ParseComplete, BindComplete, …).
    fail_at: usize,
    anchor_rows: usize,
    /// The statuses of the server's ReadyForQuery messages, in order (cycled).
    statuses: Vec<u8>,
    pre: Vec<Req>,
    post: Vec<Req>,
}

fn batch_case() -> impl Strategy<Value = BatchCase> {
    let word = prop_oneof![
        3 => Just(Word::Sent),
        1 => Just(Word::NotSent),
        1 => Just(Word::Unsaid),
        1 => Just(Word::LateNotSent),
    ];
    let follower = prop_oneof![
        2 => Just(Follower::Extended),
        2 => Just(Follower::Simple),
        1 => Just(Follower::Absent),
    ];
    let fail = prop_oneof![
        3 => Just(Fail::Nothing),
        1 => (0usize..3).prop_map(Fail::Before),
        1 => Just(Fail::Anchor),
        1 => (0usize..3).prop_map(Fail::After),
        1 => Just(Fail::Follower),
    ];
    (
        (
            any::<bool>(),
            prop::collection::vec(ours(), 0..4),
            prop::collection::vec(ours(), 0..3),
            prop::bool::weighted(0.8),
            word,
            follower,
            prop::bool::weighted(0.3),
        ),
        (
            fail,
            0usize..4,
            0usize..3,
            prop::collection::vec(status(), 1..6),
            prop::collection::vec(req(), 0..3),
            prop::collection::vec(req(), 0..3),
        ),
    )
        .prop_map(
            |(
                (unnamed, before, after, merge, word, follower, next_bind),
                (fail, fail_at, anchor_rows, statuses, pre, post),
            )| {
                let mut case = BatchCase {
                    unnamed,
                    next_bind,
                    before,
                    after,
                    merge,
                    word,
                    follower,
                    fail,
                    fail_at,
                    anchor_rows,
                    statuses,
                    pre,
                    post,
                };
                case.normalize();
                case
            },
        )
}

impl BatchCase {
    /// Keeps the case one a session can produce.
    fn normalize(&mut self) {
        if self.next_bind {
            // Armed right before the user's request: nothing of the handle comes between.
            self.unnamed = false;
            self.pre.clear();
        }
        // A session that says a follower is coming (or says nothing) sends one.
        if self.merge
            && self.follower == Follower::Absent
            && matches!(self.word, Word::Sent | Word::Unsaid)
        {
            self.word = Word::NotSent;
        }
        self.fail = match self.fail {
            Fail::Before(k) if k >= self.before.len() => Fail::Nothing,
            Fail::After(k) if k >= self.after.len() => Fail::Nothing,
            Fail::Follower if self.follower == Follower::Absent => Fail::Nothing,
            f => f,
        };
    }

    fn merged(&self) -> bool {
        self.merge
            && self.follower != Follower::Absent
            && matches!(self.word, Word::Sent | Word::Unsaid)
    }

    fn batch(&self) -> Batch {
        let mut before = Statements::default();
        for s in &self.before {
            s.push_to(&mut before);
        }
        let mut after = Statements::default();
        for s in &self.after {
            s.push_to(&mut after);
        }
        assert_eq!(before.count as usize, self.before.len());
        assert_eq!(after.count as usize, self.after.len());
        let anchor = if self.unnamed {
            Anchor::Unnamed(ANCHOR_SQL)
        } else if self.next_bind {
            Anchor::NextBind
        } else {
            Anchor::Named(ANCHOR_NAME.to_owned())
        };
        Batch::new(anchor, before, after, self.merge)
    }

    /// The anchor request as tokio-postgres writes it, without its Sync.
    fn anchor_front(&self) -> Vec<u8> {
        let params: [&[u8]; 2] = [b"hr_employee", br#"{"emp_id":3}"#];
        if self.unnamed {
            cat(&[
                fe::parse("", ANCHOR_SQL),
                fe::bind("", "", &params),
                fe::describe(b'P', ""),
                fe::execute(""),
            ])
        } else {
            cat(&[fe::bind("", ANCHOR_NAME, &params), fe::execute("")])
        }
    }

    /// The anchor's replies up to its completion, or up to `fail_at` of them and an
    /// error.
    fn anchor_back(&self, fail: bool) -> Vec<u8> {
        let mut head = if self.unnamed {
            vec![
                be::parse_complete(),
                be::bind_complete(),
                be::row_description(),
            ]
        } else {
            vec![be::bind_complete()]
        };
        if fail {
            head.truncate(self.fail_at);
            head.push(be::error("42704", "role \"hr_employee\" does not exist"));
            return cat(&head);
        }
        for r in 0..self.anchor_rows {
            head.push(be::data_row(r, 3));
        }
        head.push(be::complete("SELECT 1"));
        cat(&head)
    }

    fn follower_front(&self) -> Option<Vec<u8>> {
        match self.follower {
            Follower::Extended => Some(cat(&[
                fe::bind("", "s3", &[b"42"]),
                fe::execute(""),
                fe::sync(),
            ])),
            Follower::Simple => Some(fe::query("SELECT name FROM hr.employees")),
            Follower::Absent => None,
        }
    }

    /// The follower's replies before its ReadyForQuery.
    fn follower_back(&self) -> Vec<u8> {
        let fail = self.fail == Fail::Follower;
        let mut parts = Vec::new();
        match self.follower {
            Follower::Extended => parts.push(be::bind_complete()),
            Follower::Simple if !fail => parts.push(be::row_description()),
            _ => {}
        }
        if fail {
            parts.push(be::error("42501", "permission denied for table employees"));
        } else {
            parts.push(be::data_row(9, 5));
            parts.push(be::complete("SELECT 1"));
        }
        cat(&parts)
    }

    /// A statement of ours answered (`Ok`), or failed after `fail_at` replies (`Err`):
    /// the server's bytes, and what of them tokio-postgres sees.
    fn our_back(&self, s: &Ours, failed: bool) -> (Vec<u8>, Vec<u8>) {
        let mut head = match s.prepared {
            Form::Prepared(_) => vec![be::bind_complete()],
            Form::Unnamed => vec![be::parse_complete(), be::bind_complete()],
            Form::ParsedNamed(_) => vec![
                be::close_complete(),
                be::parse_complete(),
                be::bind_complete(),
            ],
        };
        if failed {
            head.truncate(self.fail_at);
            head.push(be::error("0A000", "a statement of ours failed"));
            return (cat(&head), Vec::new());
        }
        let mut passed = Vec::new();
        if s.notice {
            // COMMIT outside a transaction warns; the warning is swallowed with the rest.
            head.push(be::notice("there is no transaction in progress"));
        }
        for r in 0..s.rows {
            head.push(be::data_row(r, 4));
        }
        if s.param {
            // RESET ALL reports the parameters it changed: those pass to tokio-postgres,
            // which keeps the session's parameters too.
            let p = be::parameter("application_name", "reset");
            passed.extend_from_slice(&p);
            head.push(p);
        }
        head.push(be::complete(s.sql));
        (cat(&head), passed)
    }
}

/// A built batch case: the script, what each side must see, what the batch and the
/// handle must say afterwards.
struct Built {
    script: Script,
    stops: Vec<usize>,
    to_server: Vec<u8>,
    to_client: Vec<u8>,
    status: TxStatus,
    before_done: u32,
    after_done: u32,
    held: u64,
    unmerged: u64,
}

impl BatchCase {
    /// Builds the script and, from the protocol, what each side sees. The server runs
    /// the merged stream: on an error it skips everything (a simple Query too) up to the
    /// next Sync, which it answers. tokio-postgres sees one reply per request: the
    /// anchor's replies and a ReadyForQuery `T` of the layer's when the Sync was removed;
    /// a skipped request gets the batch's first error if no request got it yet, else the
    /// layer's 25P02 error, and a ReadyForQuery.
    fn build(&self) -> Built {
        let merged = self.merged();
        let mut statuses = self.statuses.iter().copied().cycle();
        let mut last_status = b'I';
        let mut next_ready = |last: &mut u8| {
            let s = statuses.next().unwrap();
            *last = s;
            s
        };
        let mut script = Script::default();
        let started = startup(&mut script, false, false, 4711);
        let mut to_server = script.front_bytes();
        let mut to_client = script.back_bytes();
        let mut stops = Vec::new();

        for r in &self.pre {
            let f = script.front(r.front(), started);
            to_server.extend(r.front());
            let mut r = r.clone();
            r.status = next_ready(&mut last_status);
            script.back(r.back(), f + 1);
            to_client.extend(r.back());
        }

        // The frontend: the batch's statements around the anchor, whose Sync goes (or
        // becomes ours, after the `after` statements).
        let anchor = self.anchor_front();
        let a = script.front(cat(&[anchor.clone(), fe::sync()]), started);
        if self.word == Word::LateNotSent {
            stops.push(a);
        }
        for s in &self.before {
            to_server.extend(s.front());
        }
        to_server.extend(&anchor);
        for s in &self.after {
            to_server.extend(s.front());
        }
        if !merged {
            to_server.extend(fe::sync());
        }
        let follower = self.follower_front().map(|bytes| {
            to_server.extend(&bytes);
            if merged && self.follower == Follower::Simple {
                to_server.extend(fe::sync());
            }
            script.front(bytes, started)
        });

        // The backend.
        let mut back = Vec::new();
        let mut skip = false;
        let mut stored: Option<Vec<u8>> = None;
        let give = |stored: &mut Option<Vec<u8>>, out: &mut Vec<u8>| {
            out.extend(stored.take().unwrap_or_else(skipped));
        };
        let mut before_done = 0;
        for (k, s) in self.before.iter().enumerate() {
            if skip {
                continue;
            }
            let failed = self.fail == Fail::Before(k);
            let (server, passed) = self.our_back(s, failed);
            back.extend(&server);
            to_client.extend(passed);
            if failed {
                stored = Some(frames_tail(&server));
                skip = true;
            } else {
                before_done += 1;
            }
        }
        if skip {
            give(&mut stored, &mut to_client);
        } else {
            let failed = self.fail == Fail::Anchor;
            let replies = self.anchor_back(failed);
            back.extend(&replies);
            to_client.extend(&replies);
            skip = failed;
        }
        if merged {
            to_client.extend(be::ready(b'T'));
        }
        let mut after_done = 0;
        for (k, s) in self.after.iter().enumerate() {
            if skip {
                continue;
            }
            let failed = self.fail == Fail::After(k);
            let (server, passed) = self.our_back(s, failed);
            back.extend(&server);
            to_client.extend(passed);
            if failed {
                stored = Some(frames_tail(&server));
                skip = true;
            } else {
                after_done += 1;
            }
        }
        if merged {
            match self.follower {
                Follower::Extended => {
                    if skip {
                        give(&mut stored, &mut to_client);
                    } else {
                        let replies = self.follower_back();
                        back.extend(&replies);
                        to_client.extend(&replies);
                    }
                    let z = be::ready(next_ready(&mut last_status));
                    back.extend(&z);
                    to_client.extend(&z);
                }
                Follower::Simple => {
                    if skip {
                        // The server skips the Query too; the Sync of ours ends the skip.
                        let status = next_ready(&mut last_status);
                        back.extend(be::ready(status));
                        give(&mut stored, &mut to_client);
                        to_client.extend(be::ready(status));
                    } else {
                        let replies = cat(&[
                            self.follower_back(),
                            be::ready(next_ready(&mut last_status)),
                        ]);
                        back.extend(&replies);
                        to_client.extend(&replies);
                        // The Sync of ours: answered, swallowed.
                        back.extend(be::ready(next_ready(&mut last_status)));
                    }
                }
                Follower::Absent => unreachable!("a merged batch has a follower"),
            }
            script.back(back, follower.unwrap() + 1);
        } else {
            // The anchor's Sync (ours, after the `after` statements) ends any skip; an
            // error of an `after` statement is then given to nobody: the pool reads it
            // from `after_confirmed`.
            let z = be::ready(next_ready(&mut last_status));
            back.extend(&z);
            to_client.extend(&z);
            script.back(back, a + 1);
            if let Some(f) = follower {
                let mut replies = self.follower_back();
                replies.extend(be::ready(next_ready(&mut last_status)));
                to_client.extend(&replies);
                script.back(replies, f + 1);
            }
        }

        for r in &self.post {
            let f = script.front(r.front(), started);
            to_server.extend(r.front());
            let mut r = r.clone();
            r.status = next_ready(&mut last_status);
            script.back(r.back(), f + 1);
            to_client.extend(r.back());
        }

        let held = self.merge && matches!(self.word, Word::Unsaid | Word::LateNotSent);
        Built {
            script,
            stops,
            to_server,
            to_client,
            status: tx_status(last_status),
            before_done,
            after_done,
            held: u64::from(held),
            unmerged: u64::from(self.merge && !merged),
        }
    }

    /// Runs the case under `chunking` and checks everything it implies.
    fn check(&self, chunking: &Chunking) -> Result<(), TestCaseError> {
        let built = self.build();
        let handle = WireHandle::new();
        let batch = Arc::new(self.batch());
        handle.arm(batch.clone());
        match self.word {
            Word::Sent => handle.follower(&batch, true),
            Word::NotSent => handle.follower(&batch, false),
            Word::Unsaid | Word::LateNotSent => {}
        }
        let run = drive(&built.script, chunking, &handle, &built.stops, |_| {
            handle.follower(&batch, false);
        });
        prop_assert_eq!(
            tags(&run.to_server[fe::startup().len()..]),
            tags(&built.to_server[fe::startup().len()..])
        );
        prop_assert!(run.to_server == built.to_server, "frontend bytes differ");
        prop_assert_eq!(tags(&run.to_client), tags(&built.to_client));
        prop_assert!(run.to_client == built.to_client, "backend bytes differ");
        prop_assert_eq!(handle.outstanding(), (0, 0));
        prop_assert_eq!(handle.status(), built.status);
        prop_assert_eq!(handle.backend_pid(), Some(4711));
        prop_assert!(batch.matched.load(Ordering::Acquire));
        prop_assert_eq!(batch.before_done.load(Ordering::Acquire), built.before_done);
        prop_assert_eq!(batch.after_done.load(Ordering::Acquire), built.after_done);
        prop_assert_eq!(
            batch.before_confirmed(),
            built.before_done as usize == self.before.len()
        );
        prop_assert_eq!(
            batch.after_confirmed(),
            built.after_done as usize == self.after.len()
        );
        prop_assert_eq!(
            batch.merged.load(Ordering::Acquire) == super::MERGED_YES,
            self.merged()
        );
        prop_assert_eq!(handle.held_syncs(), built.held);
        prop_assert_eq!(handle.unmerged(), built.unmerged);
        Ok(())
    }
}

/// The last frame of a typed byte stream, whole (the error a failed statement ended
/// with).
fn frames_tail(bytes: &[u8]) -> Vec<u8> {
    let (tag, body) = frames(bytes).pop().unwrap();
    typed(tag as u8, &body)
}

proptest! {
    #![proptest_config(config(10_000))]

    /// Every batch a session can arm, every failure point, every chunking: the server
    /// gets the batch's statements around the anchor and the Sync as the word said;
    /// tokio-postgres gets one reply per request, the same bytes for every chunking.
    #[test]
    fn batches_under_any_chunking(case in batch_case(), cut in chunking()) {
        case.check(&cut)?;
        case.check(&Chunking::whole())?;
    }
}

/// A named anchor, two statements before it and one after, merged unless `word` says
/// otherwise; `fail` and `follower` as given.
fn basic(fail: Fail, follower: Follower, word: Word) -> BatchCase {
    let stmt = |sql| Ours {
        sql,
        prepared: Form::Unnamed,
        rows: 0,
        notice: false,
        param: false,
    };
    let mut case = BatchCase {
        unnamed: false,
        next_bind: false,
        before: vec![stmt("RESET ALL"), stmt("RESET ROLE")],
        after: vec![stmt("COMMIT")],
        merge: true,
        word,
        follower,
        fail,
        fail_at: 2,
        anchor_rows: 1,
        statuses: vec![b'I'],
        pre: Vec::new(),
        post: Vec::new(),
    };
    case.normalize();
    case
}

fn check_bytewise(case: &BatchCase) {
    case.check(&Chunking::bytewise()).unwrap();
    case.check(&Chunking::whole()).unwrap();
}

/// The client's view after the start-up, as frames.
fn client_frames(case: &BatchCase) -> Vec<(char, Vec<u8>)> {
    let built = case.build();
    let all = frames(&built.to_client);
    let z = all.iter().position(|(t, _)| *t == 'Z').unwrap();
    all[z + 1..].to_vec()
}

#[test]
fn merged_batch_success() {
    let case = basic(Fail::Nothing, Follower::Extended, Word::Sent);
    check_bytewise(&case);
    let built = case.build();
    // The server: the statements before, the anchor without its Sync, the statement
    // after, the follower with its Sync.
    let want = cat(&[
        fe::ours("RESET ALL"),
        fe::ours("RESET ROLE"),
        fe::bind("", ANCHOR_NAME, &[b"hr_employee", br#"{"emp_id":3}"#]),
        fe::execute(""),
        fe::ours("COMMIT"),
        fe::bind("", "s3", &[b"42"]),
        fe::execute(""),
        fe::sync(),
    ]);
    assert!(built.to_server.ends_with(&want));
    // tokio-postgres: the anchor's replies and a ReadyForQuery of ours, then the
    // follower's replies and the server's ReadyForQuery.
    let seen: String = client_frames(&case).iter().map(|(t, _)| *t).collect();
    assert_eq!(seen, "2DCZ2DCZ");
}

#[test]
fn merged_batch_error_before_the_anchor() {
    let case = basic(Fail::Before(1), Follower::Extended, Word::Sent);
    check_bytewise(&case);
    let seen = client_frames(&case);
    let t: String = seen.iter().map(|(t, _)| *t).collect();
    assert_eq!(t, "EZEZ");
    // The anchor gets the server's error, the follower the layer's "not run".
    assert_eq!(sqlstate(&seen[0].1).as_deref(), Some("0A000"));
    assert_eq!(seen[1].1, b"T");
    assert_eq!(sqlstate(&seen[2].1).as_deref(), Some(SKIPPED_SQLSTATE));
}

#[test]
fn merged_batch_error_in_the_anchor() {
    let case = basic(Fail::Anchor, Follower::Extended, Word::Sent);
    check_bytewise(&case);
    let seen = client_frames(&case);
    let t: String = seen.iter().map(|(t, _)| *t).collect();
    assert_eq!(t, "2EZEZ");
    assert_eq!(sqlstate(&seen[1].1).as_deref(), Some("42704"));
    assert_eq!(sqlstate(&seen[3].1).as_deref(), Some(SKIPPED_SQLSTATE));
}

#[test]
fn merged_batch_error_after_the_anchor_goes_to_the_follower() {
    let case = basic(Fail::After(0), Follower::Extended, Word::Sent);
    check_bytewise(&case);
    let seen = client_frames(&case);
    let t: String = seen.iter().map(|(t, _)| *t).collect();
    assert_eq!(t, "2DCZEZ");
    assert_eq!(sqlstate(&seen[4].1).as_deref(), Some("0A000"));
}

#[test]
fn merged_batch_simple_query_follower() {
    let case = basic(Fail::Nothing, Follower::Simple, Word::Sent);
    check_bytewise(&case);
    let built = case.build();
    // The writer puts a Sync of its own after the Query.
    assert!(built.to_server.ends_with(&cat(&[
        fe::query("SELECT name FROM hr.employees"),
        fe::sync()
    ])));
    // The server answers the Query and the Sync (two ReadyForQuery); the second is
    // swallowed.
    let server_zs = frames(&built.script.back_bytes())
        .iter()
        .filter(|(t, _)| *t == 'Z')
        .count();
    assert_eq!(server_zs, 1 + 2, "start-up, the Query, the Sync of ours");
    let t: String = client_frames(&case).iter().map(|(t, _)| *t).collect();
    assert_eq!(t, "2DCZTDCZ");
}

#[test]
fn merged_batch_simple_query_follower_skipped() {
    let case = basic(Fail::Before(0), Follower::Simple, Word::Sent);
    check_bytewise(&case);
    let built = case.build();
    // One ReadyForQuery for the whole batch: the server skipped the Query.
    let server_zs = frames(&built.script.back_bytes())
        .iter()
        .filter(|(t, _)| *t == 'Z')
        .count();
    assert_eq!(server_zs, 1 + 1);
    let seen = client_frames(&case);
    let t: String = seen.iter().map(|(t, _)| *t).collect();
    assert_eq!(t, "EZEZ");
    assert_eq!(sqlstate(&seen[2].1).as_deref(), Some(SKIPPED_SQLSTATE));
}

#[test]
fn batch_without_follower_keeps_a_sync() {
    let case = basic(Fail::Nothing, Follower::Extended, Word::NotSent);
    check_bytewise(&case);
    let built = case.build();
    let want = cat(&[
        fe::bind("", ANCHOR_NAME, &[b"hr_employee", br#"{"emp_id":3}"#]),
        fe::execute(""),
        fe::ours("COMMIT"),
        fe::sync(),
        fe::bind("", "s3", &[b"42"]),
    ]);
    assert!(
        built
            .to_server
            .windows(want.len())
            .any(|w| w == want.as_slice())
    );
    // The anchor gets the server's ReadyForQuery; the next request is on its own.
    let t: String = client_frames(&case).iter().map(|(t, _)| *t).collect();
    assert_eq!(t, "2DCZ2DCZ");
    assert_eq!(built.unmerged, 1);
}

#[test]
fn held_sync_released_by_the_follower_or_by_the_word() {
    for word in [Word::Unsaid, Word::LateNotSent] {
        for fail in [Fail::Nothing, Fail::Before(0), Fail::Anchor] {
            let case = basic(fail, Follower::Extended, word);
            check_bytewise(&case);
            assert_eq!(case.build().held, 1);
        }
    }
}

#[test]
fn unnamed_anchor_with_near_miss_requests_around() {
    let mut case = basic(Fail::Nothing, Follower::Simple, Word::Sent);
    case.unnamed = true;
    let near = |pick| Req {
        kind: Kind::Extended(true),
        pick,
        rows: 1,
        width: 2,
        end: End::Complete(0),
        notice: false,
        param: None,
        notify: false,
        status: b'I',
    };
    // "SELECT ctxpool_sync($1) " and "SELECT ctxpool_sync($": a longer and a shorter
    // text than the anchor's, both unnamed-parsable.
    case.pre = vec![near(0), near(5)];
    case.post = vec![near(5), near(0)];
    check_bytewise(&case);
}

// ---------------------------------------------------------------------------------------
// Statements of the layer's own.
// ---------------------------------------------------------------------------------------

#[test]
fn own_query_goes_at_the_next_boundary_and_is_swallowed() {
    for fails in [false, true] {
        let handle = WireHandle::new();
        let shared = &*handle.0;
        let mut writer = Writer::new();
        let mut reader = Reader::new();
        let mut to_server = BytesMut::new();
        let mut to_client = BytesMut::new();
        let startup_back = cat(&[be::auth(0), be::key_data(7, 7), be::ready(b'I')]);
        writer
            .process(&fe::startup(), &mut to_server, &mut reader, shared)
            .unwrap();
        reader
            .process(&startup_back, &mut to_client, shared)
            .unwrap();
        let req = cat(&[fe::bind("", "s1", &[]), fe::execute(""), fe::sync()]);
        let (head, tail) = req.split_at(7);
        writer
            .process(head, &mut to_server, &mut reader, shared)
            .unwrap();
        let own = handle.send_query("ROLLBACK");
        // Inside a request: nothing of ours yet.
        writer.idle_work(&mut to_server, &mut reader, shared);
        assert_eq!(to_server.len(), fe::startup().len() + head.len());
        assert_eq!(handle.outstanding(), (1, 1));
        writer
            .process(tail, &mut to_server, &mut reader, shared)
            .unwrap();
        writer.idle_work(&mut to_server, &mut reader, shared);
        assert_eq!(
            to_server.to_vec(),
            cat(&[fe::startup(), req.clone(), fe::query("ROLLBACK")])
        );
        let theirs = cat(&[
            be::bind_complete(),
            be::complete("SELECT 0"),
            be::ready(b'T'),
        ]);
        let ours = if fails {
            cat(&[be::error("25P01", "no transaction"), be::ready(b'I')])
        } else {
            cat(&[
                be::notice("there is no transaction in progress"),
                be::complete("ROLLBACK"),
                be::ready(b'I'),
            ])
        };
        for b in cat(&[theirs.clone(), ours]) {
            reader.process(&[b], &mut to_client, shared).unwrap();
        }
        assert_eq!(to_client.to_vec(), cat(&[startup_back, theirs]));
        assert_eq!(handle.outstanding(), (0, 0));
        assert_eq!(
            own.done.load(Ordering::Acquire) && !own.failed.load(Ordering::Acquire),
            !fails
        );
        assert_eq!(handle.status(), TxStatus::Idle);
    }
}

// ---------------------------------------------------------------------------------------
// The stream over a socket-like pipe.
// ---------------------------------------------------------------------------------------

/// The whole [`WireStream`](super::WireStream) over a 7-byte pipe, read through a 3-byte
/// buffer: partial writes and reads do not change the bytes.
#[tokio::test]
async fn stream_over_a_narrow_pipe() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let ex = Exchange {
        ssl: false,
        password: false,
        pid: 99,
        answered: 3,
        reqs: (0..3)
            .map(|i| Req {
                kind: [Kind::Extended(true), Kind::Simple, Kind::Prepare][i],
                pick: i,
                rows: 2,
                width: 40,
                end: End::Complete(0),
                notice: true,
                param: None,
                notify: false,
                status: b'T',
            })
            .collect(),
    };
    let (client_io, mut server_io) = tokio::io::duplex(7);
    let handle = WireHandle::new();
    let mut stream = super::WireStream::new(client_io, handle.clone());
    let startup_front = fe::startup();
    let startup_back = cat(&[
        be::auth(0),
        be::key_data(99, 1),
        be::parameter("application_name", "initial"),
        be::ready(b'I'),
    ]);
    let requests: Vec<u8> = ex.reqs.iter().flat_map(Req::front).collect();
    let replies: Vec<u8> = ex.reqs.iter().flat_map(Req::back).collect();

    let server = {
        let (startup_front, startup_back) = (startup_front.clone(), startup_back.clone());
        let (requests, replies) = (requests.clone(), replies.clone());
        tokio::spawn(async move {
            let mut got = vec![0; startup_front.len()];
            server_io.read_exact(&mut got).await.unwrap();
            assert_eq!(got, startup_front);
            server_io.write_all(&startup_back).await.unwrap();
            let mut got = vec![0; requests.len()];
            server_io.read_exact(&mut got).await.unwrap();
            assert_eq!(got, requests);
            server_io.write_all(&replies).await.unwrap();
        })
    };

    async fn read_n(stream: &mut (impl AsyncReadExt + Unpin), n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 3];
        while out.len() < n {
            let k = stream.read(&mut buf).await.unwrap();
            assert_ne!(k, 0, "end of stream");
            out.extend_from_slice(&buf[..k]);
        }
        out
    }

    stream.write_all(&startup_front).await.unwrap();
    stream.flush().await.unwrap();
    assert_eq!(read_n(&mut stream, startup_back.len()).await, startup_back);
    for chunk in requests.chunks(5) {
        stream.write_all(chunk).await.unwrap();
    }
    stream.flush().await.unwrap();
    assert_eq!(handle.outstanding(), (3, 0));
    assert_eq!(read_n(&mut stream, replies.len()).await, replies);
    server.await.unwrap();
    assert_eq!(observed(&handle), ex.implied());
    assert!(handle.is_settled());
    drop(stream);
    assert!(handle.is_settled());
}

// ---------------------------------------------------------------------------------------
// The handle's counters read from another thread.
// ---------------------------------------------------------------------------------------

/// `outstanding()` read while the connection's task writes and answers requests: the
/// answered count must never be read ahead of the written count (an overflow panics a
/// debug build; a release build reports about 2^64 requests in flight).
#[test]
fn outstanding_read_concurrently_never_underflows() {
    let handle = WireHandle::new();
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let handle = handle.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let shared = &*handle.0;
            let mut writer = Writer::new();
            let mut reader = Reader::new();
            let mut sink = BytesMut::new();
            writer
                .process(&fe::startup(), &mut sink, &mut reader, shared)
                .unwrap();
            reader.process(&be::ready(b'I'), &mut sink, shared).unwrap();
            let sync = fe::sync();
            let ready = be::ready(b'I');
            let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1500);
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                for _ in 0..1000 {
                    writer
                        .process(&sync, &mut sink, &mut reader, shared)
                        .unwrap();
                    reader.process(&ready, &mut sink, shared).unwrap();
                    sink.clear();
                }
            }
        })
    };
    let mut reads = 0u64;
    while !worker.is_finished() {
        let (theirs, ours) = handle.outstanding();
        // Read while answers arrive, the count may be a little high (requests answered
        // between the loads), never "negative".
        assert!(
            theirs < 1 << 40 && ours == 0,
            "outstanding() = ({theirs}, {ours})"
        );
        reads += 1;
    }
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();
    assert!(reads > 0);
}

/// A batch's anchor cut across two writes while earlier bytes still wait for a narrow
/// pipe: the stream drains what it may while the anchor is being recognised, and the
/// batch's statements must still go right before the anchor.
#[tokio::test]
async fn stream_anchor_cut_across_writes_behind_buffered_bytes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    for cut in [3, 7, 12, 20] {
        let (client_io, mut server_io) = tokio::io::duplex(8);
        let handle = WireHandle::new();
        let mut stream = super::WireStream::new(client_io, handle.clone());
        let startup_back = cat(&[be::auth(0), be::ready(b'I')]);
        let server = {
            let startup_back = startup_back.clone();
            tokio::spawn(async move {
                let mut got = vec![0; fe::startup().len()];
                server_io.read_exact(&mut got).await.unwrap();
                server_io.write_all(&startup_back).await.unwrap();
                let mut got = Vec::new();
                server_io.read_to_end(&mut got).await.unwrap();
                got
            })
        };
        stream.write_all(&fe::startup()).await.unwrap();
        stream.flush().await.unwrap();
        let mut got = vec![0; startup_back.len()];
        stream.read_exact(&mut got).await.unwrap();

        let mut before = Statements::default();
        before.push("RESET ALL");
        let batch = Arc::new(Batch::new(
            Anchor::Named(ANCHOR_NAME.to_owned()),
            before,
            Statements::default(),
            false,
        ));
        handle.arm(batch.clone());
        let plain = fe::query("SELECT 'a request written before the anchor'");
        let anchor = cat(&[
            fe::bind("", ANCHOR_NAME, &[b"hr_employee"]),
            fe::execute(""),
        ]);
        let whole = cat(&[anchor.clone(), fe::sync()]);
        let (head, tail) = whole.split_at(cut);
        // One write: the request and the anchor's first bytes. The pipe takes 8 bytes.
        stream
            .write_all(&cat(&[plain.clone(), head.to_vec()]))
            .await
            .unwrap();
        tokio::task::yield_now().await;
        stream.write_all(tail).await.unwrap();
        stream.shutdown().await.unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .expect("the server got everything")
            .unwrap();
        // What the server read after the start-up.
        let want = cat(&[plain, fe::ours("RESET ALL"), anchor, fe::sync()]);
        assert!(
            got == want,
            "cut at {cut}: the server got\n{got:?}\nnot\n{want:?}"
        );
        assert!(batch.matched.load(Ordering::Acquire));
    }
}

// ---------------------------------------------------------------------------------------
// Input no server or client sends: refused, or passed through unchanged.
// ---------------------------------------------------------------------------------------

/// Feeds `front` then `back` (each byte by byte, then whole) and checks that what the
/// layer accepts comes out unchanged.
fn accepted_is_unchanged(front: &[u8], back: &[u8]) {
    for bytewise in [true, false] {
        let handle = WireHandle::new();
        let shared = &*handle.0;
        let mut writer = Writer::new();
        let mut reader = Reader::new();
        let mut to_server = BytesMut::new();
        let mut to_client = BytesMut::new();
        let step = if bytewise { 1 } else { usize::MAX };
        let front_ok = front
            .chunks(step.min(front.len().max(1)))
            .try_for_each(|c| writer.process(c, &mut to_server, &mut reader, shared))
            .is_ok();
        let back_ok = back
            .chunks(step.min(back.len().max(1)))
            .try_for_each(|c| reader.process(c, &mut to_client, shared))
            .is_ok();
        if front_ok {
            assert_eq!(to_server.to_vec(), front, "frontend changed");
        }
        if back_ok {
            assert_eq!(to_client.to_vec(), back, "backend changed");
        }
    }
}

/// No message of the protocol has tag 0, which the frame reader uses for "untyped".
#[test]
fn a_frame_with_tag_zero_is_refused_or_kept() {
    let zero = [0u8, 0, 0, 0, 4];
    accepted_is_unchanged(&cat(&[fe::startup(), zero.to_vec()]), &zero);
    let started = cat(&[be::auth(0), be::ready(b'I')]);
    accepted_is_unchanged(&fe::startup(), &cat(&[started, zero.to_vec()]));
}

/// The server sent part of a frame before the client's SSLRequest reached the layer:
/// the byte answering the request must not jump ahead of that frame.
#[test]
fn an_ssl_answer_behind_a_partial_header_keeps_its_place() {
    let handle = WireHandle::new();
    let shared = &*handle.0;
    let mut writer = Writer::new();
    let mut reader = Reader::new();
    let mut to_server = BytesMut::new();
    let mut to_client = BytesMut::new();
    let notice = be::notice("unasked");
    let (head, tail) = notice.split_at(2);
    reader.process(head, &mut to_client, shared).unwrap();
    writer
        .process(&fe::ssl_request(), &mut to_server, &mut reader, shared)
        .unwrap();
    let rest = cat(&[tail.to_vec(), b"N".to_vec()]);
    if reader.process(&rest, &mut to_client, shared).is_ok() {
        assert_eq!(to_client.to_vec(), cat(&[notice, b"N".to_vec()]));
    }
}
