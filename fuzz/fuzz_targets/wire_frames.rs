// Run (from the crate root, stable Rust with cargo-fuzz 0.13):
//   RUSTC_BOOTSTRAP=1 cargo fuzz run wire_frames -- -max_total_time=300
//
// Feeds arbitrary bytes through both directions of the PostgreSQL wire layer (the byte
// stream between tokio-postgres and the socket), cut into chunks and interleaved as the
// input says, with the stream's drain in between; optionally with a batch armed, names
// being learnt, statements of the layer's own queued, as behind a transaction pooler
// (named statements sent unnamed, a request held back until the one before is
// answered). Each direction is either raw bytes or typed frames whose lengths are right
// (so that the fuzzer gets past the framing).
// Checks, a panic being a bug:
// - nothing panics, whatever the input (the handle's counters included);
// - after a well-formed StartupMessage and whole frames, the server gets whole frames
//   whatever the layer inserts or removes;
// - with no batch armed, no statement of the layer's own and no pooler, what the layer
//   accepted came out unchanged and in order: a prefix of each direction's input, and all of it
//   when the input was whole frames after a well-formed StartupMessage.

#![no_main]

use arbitrary::Arbitrary;
use ctxpool::postgres::fuzzing::{BatchSpec, OurStatement, UNNAMED_ANCHOR, WireFrames};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Piece {
    Raw(Vec<u8>),
    /// A typed frame: the tag and the body, the length computed.
    Frame(u8, Vec<u8>),
    /// A frame the layer acts on, with a body of the fuzzer's.
    Known(KnownTag, Vec<u8>),
    /// SSLRequest, which the server answers with one raw byte.
    SslRequest,
}

/// Tags the layer reads (frontend and backend share the byte space).
#[derive(Arbitrary, Debug, Clone, Copy)]
enum KnownTag {
    Bind,
    Parse,
    Describe,
    Execute,
    Sync,
    Query,
    Ready,
    Error,
    Complete,
    ParseComplete,
    BindComplete,
    KeyData,
    Parameter,
    Notice,
}

impl KnownTag {
    fn byte(self) -> u8 {
        match self {
            Self::Bind => b'B',
            Self::Parse => b'P',
            Self::Describe => b'D',
            Self::Execute => b'E',
            Self::Sync => b'S',
            Self::Query => b'Q',
            Self::Ready => b'Z',
            Self::Error => b'E',
            Self::Complete => b'C',
            Self::ParseComplete => b'1',
            Self::BindComplete => b'2',
            Self::KeyData => b'K',
            Self::Parameter => b'S',
            Self::Notice => b'N',
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Step {
    Write(u16),
    Read(u16),
    Drain(u16),
    Follower(bool),
    OwnQuery,
}

#[derive(Arbitrary, Debug)]
enum Ours {
    Text(String),
    Prepared(String),
    /// Name, text and one text parameter.
    ParsedBound(String, String, String),
}

#[derive(Arbitrary, Debug)]
struct Spec {
    /// `None`: the unnamed anchor.
    named: Option<String>,
    before: Vec<Ours>,
    after: Vec<Ours>,
    merge: bool,
    /// Said before anything is written.
    follower: Option<bool>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// A well-formed StartupMessage first in the frontend direction.
    startup: bool,
    front: Vec<Piece>,
    back: Vec<Piece>,
    steps: Vec<Step>,
    batch: Option<Spec>,
    learn: Vec<String>,
    /// As behind a transaction pooler.
    pooled: bool,
}

fn startup_message() -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0fuzz\0\0");
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// The bytes of `pieces`, and whether they are whole typed frames.
fn bytes(pieces: &[Piece]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut whole = true;
    for p in pieces {
        let (tag, body) = match p {
            Piece::Raw(raw) => {
                out.extend_from_slice(raw);
                whole &= raw.is_empty();
                continue;
            }
            Piece::SslRequest => {
                out.extend_from_slice(&8u32.to_be_bytes());
                out.extend_from_slice(&80_877_103u32.to_be_bytes());
                whole = false;
                continue;
            }
            Piece::Frame(tag, body) => (*tag, body),
            Piece::Known(tag, body) => (tag.byte(), body),
        };
        out.push(tag);
        out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(body);
    }
    (out, whole)
}

/// Whether `bytes` is a sequence of whole typed frames.
fn frames_end(mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        let Some(len) = bytes.get(1..5) else {
            return false;
        };
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len < 4 || bytes.len() < 1 + len {
            return false;
        }
        bytes = &bytes[1 + len..];
    }
    true
}

fn ours(list: &[Ours]) -> Vec<OurStatement> {
    list.iter()
        .map(|o| match o {
            Ours::Text(t) => OurStatement::Text(t.clone()),
            Ours::Prepared(n) => OurStatement::Prepared(n.clone()),
            Ours::ParsedBound(n, t, p) => OurStatement::ParsedBound(n.clone(), t.clone(), p.clone()),
        })
        .collect()
}

fuzz_target!(|input: Input| {
    let (mut front, front_whole) = bytes(&input.front);
    if input.startup {
        front.splice(0..0, startup_message());
    }
    let (back, back_whole) = bytes(&input.back);

    let mut wire = WireFrames::new();
    if input.pooled {
        wire.behind_transaction_pooler();
    }
    if let Some(spec) = &input.batch {
        wire.arm(&BatchSpec {
            named: spec.named.clone(),
            before: ours(&spec.before),
            after: ours(&spec.after),
            merge: spec.merge,
        });
        if let Some(sent) = spec.follower {
            wire.follower(sent);
        }
    }
    if !input.learn.is_empty() {
        let mut texts = input.learn.clone();
        texts.push(UNNAMED_ANCHOR.to_owned());
        wire.learn(texts);
    }

    let mut own = false;
    let (mut f, mut b) = (0usize, 0usize);
    for step in &input.steps {
        match *step {
            Step::Write(n) => {
                let end = (f + usize::from(n).max(1)).min(front.len());
                wire.write(&front[f..end]);
                f = end;
            }
            Step::Read(n) => {
                let end = (b + usize::from(n).max(1)).min(back.len());
                wire.read(&back[b..end]);
                b = end;
            }
            Step::Drain(n) => {
                wire.drain(usize::from(n));
            }
            Step::Follower(sent) => wire.follower(sent),
            Step::OwnQuery => {
                own = true;
                wire.send_query("ROLLBACK");
            }
        }
        if wire.refused() {
            break;
        }
    }
    // What the steps left goes through too: the frontend first, then the backend.
    wire.write(&front[f..]);
    wire.read(&back[b..]);
    wire.drain(usize::MAX);
    let _ = wire.counters();
    if wire.refused() {
        return;
    }
    let to_server = wire.to_server();
    if input.startup && front_whole {
        // Whatever the layer adds or removes, the server gets whole frames.
        let startup = startup_message().len();
        assert!(
            frames_end(&to_server[startup..]),
            "the frontend is no longer whole frames: {to_server:?} from {front:?}"
        );
    }
    if input.batch.is_some() || own || input.pooled {
        return;
    }
    let to_client = wire.to_client();
    assert!(
        front.starts_with(&to_server),
        "the frontend came out changed: {to_server:?} from {front:?}"
    );
    assert!(
        back.starts_with(to_client),
        "the backend came out changed: {to_client:?} from {back:?}"
    );
    if input.startup && front_whole {
        assert_eq!(to_server.len(), front.len(), "the frontend was held back");
    }
    // After a StartupMessage the writer never sees an SSLRequest, so the reader never
    // takes a raw byte out of the frames.
    if input.startup && back_whole {
        assert_eq!(to_client.len(), back.len(), "the backend was held back");
    }
});
