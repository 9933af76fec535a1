//! Statements prepared by name, sent unnamed: for a connection behind a transaction
//! pooler (PgBouncer), where each transaction may run on another server connection.
//!
//! tokio-postgres prepares every statement of `prepare`, `prepare_cached` and `query`
//! with a `&str` under a name (`s0`, `s1`, …, counted per process) in one request, and
//! binds it in later ones. Behind a transaction pooler the later request may reach a
//! server connection where that name does not exist (an error), or where another client
//! process left a statement of the same name (its query runs instead of yours). So on
//! such a connection the writer sends no name to the server at all: a named Parse becomes
//! a Parse of the unnamed statement, and its text is kept; each Bind or statement
//! Describe of that name is sent as a Parse of the kept text followed by the same frame
//! for the unnamed statement, inside the same request; a Close of that name closes the
//! unnamed statement and forgets the text. Every request thus carries what it needs and
//! meets no statement another client made. The Parse this adds is answered by a
//! ParseComplete tokio-postgres does not expect; the reader swallows it (see
//! [`Expect`](super::reader::Expect)), and an error in it is the request's error.

use std::collections::HashMap;

use bytes::{BufMut, BytesMut};

use super::frame::{self, front};

/// The Describe and Close frames.
const DESCRIBE: u8 = b'D';
const CLOSE: u8 = b'C';
/// The target kind of a Describe or Close that names a statement (not a portal).
const STATEMENT: u8 = b'S';

/// The statements of one connection prepared by name, as the writer keeps them.
#[derive(Debug, Default)]
pub(crate) struct Unnamed {
    /// Per statement name, the body of its Parse after the name (text, parameter types).
    texts: HashMap<Vec<u8>, Vec<u8>>,
    /// Which of them the server's unnamed statement holds now, in the current request.
    holds: Option<Vec<u8>>,
}

impl Unnamed {
    /// Whether frames with this tag go through [`rewrite`](Self::rewrite).
    pub(crate) fn rewrites(tag: u8) -> bool {
        matches!(tag, front::PARSE | front::BIND | DESCRIBE | CLOSE)
    }

    /// The server's unnamed statement may no longer hold the text last parsed into it:
    /// a request starts (the previous one's may be on another server connection by now),
    /// or statements of the pool's own, unnamed Parses among them, are written next.
    pub(crate) fn forget_held(&mut self) {
        self.holds = None;
    }

    /// Writes the frame `tag` with `body` to `out`, named statements made unnamed.
    /// Returns how many Parse frames it added (each answered by a ParseComplete that no
    /// request of tokio-postgres expects). A frame it cannot read goes as it came: the
    /// server refuses it.
    pub(crate) fn rewrite(&mut self, tag: u8, body: &[u8], out: &mut BytesMut) -> u32 {
        match tag {
            front::PARSE => self.parse(body, out),
            front::BIND => self.bind(body, out),
            DESCRIBE | CLOSE => self.target(tag, body, out),
            _ => {
                whole(tag, body, out);
                0
            }
        }
    }

    fn parse(&mut self, body: &[u8], out: &mut BytesMut) -> u32 {
        match frame::split_cstr(body) {
            Some((name, rest)) if !name.is_empty() => {
                write(front::PARSE, &[b"\0", rest], out);
                self.texts.insert(name.to_vec(), rest.to_vec());
                self.holds = Some(name.to_vec());
            }
            _ => {
                whole(front::PARSE, body, out);
                self.holds = None;
            }
        }
        0
    }

    fn bind(&mut self, body: &[u8], out: &mut BytesMut) -> u32 {
        let Some((portal, rest)) = frame::split_cstr(body) else {
            whole(front::BIND, body, out);
            return 0;
        };
        let Some((name, params)) = frame::split_cstr(rest) else {
            whole(front::BIND, body, out);
            return 0;
        };
        if name.is_empty() || !self.texts.contains_key(name) {
            whole(front::BIND, body, out);
            return 0;
        }
        let added = self.hold(name, out);
        write(front::BIND, &[portal, b"\0\0", params], out);
        added
    }

    fn target(&mut self, tag: u8, body: &[u8], out: &mut BytesMut) -> u32 {
        let named = match body.split_first() {
            Some((&STATEMENT, rest)) => frame::split_cstr(rest)
                .map(|(name, _)| name)
                .filter(|name| !name.is_empty() && self.texts.contains_key(*name)),
            _ => None,
        };
        let Some(name) = named else {
            whole(tag, body, out);
            return 0;
        };
        let name = name.to_vec();
        let added = if tag == CLOSE {
            // Closing the unnamed statement is harmless, and answered as tokio-postgres
            // expects; the name is gone for good.
            self.texts.remove(&name);
            0
        } else {
            self.hold(&name, out)
        };
        write(tag, &[&[STATEMENT], b"\0"], out);
        added
    }

    /// Makes the unnamed statement hold `name`'s text: a Parse, unless it already does.
    fn hold(&mut self, name: &[u8], out: &mut BytesMut) -> u32 {
        if self.holds.as_deref() == Some(name) {
            return 0;
        }
        let Some(text) = self.texts.get(name) else {
            return 0;
        };
        write(front::PARSE, &[b"\0", text], out);
        self.holds = Some(name.to_vec());
        1
    }
}

/// Writes a frame whose body is `parts` in order.
fn write(tag: u8, parts: &[&[u8]], out: &mut BytesMut) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.put_u8(tag);
    out.put_u32((len + 4) as u32);
    for part in parts {
        out.put_slice(part);
    }
}

fn whole(tag: u8, body: &[u8], out: &mut BytesMut) {
    write(tag, &[body], out);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn frames(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut rest = bytes;
        let mut all = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            all.push((rest[0], rest[5..1 + len].to_vec()));
            rest = &rest[1 + len..];
        }
        all
    }

    fn parse_body(name: &str, sql: &str) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        b.extend_from_slice(sql.as_bytes());
        b.push(0);
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&25u32.to_be_bytes());
        b
    }

    fn bind_body(portal: &str, name: &str) -> Vec<u8> {
        let mut b = Vec::new();
        for s in [portal, name] {
            b.extend_from_slice(s.as_bytes());
            b.push(0);
        }
        // One text parameter "x", binary results.
        b.extend_from_slice(&[0, 1, 0, 0, 0, 1, 0, 0, 0, 1, b'x', 0, 1, 0, 1]);
        b
    }

    fn target_body(kind: u8, name: &str) -> Vec<u8> {
        let mut b = vec![kind];
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        b
    }

    #[test]
    fn no_name_reaches_the_server_and_each_request_parses_what_it_binds() {
        let mut u = Unnamed::default();
        let mut out = BytesMut::new();
        // tokio-postgres's prepare: Parse s7, Describe S s7 (Sync between requests).
        assert_eq!(u.rewrite(b'P', &parse_body("s7", "SELECT $1"), &mut out), 0);
        assert_eq!(u.rewrite(b'D', &target_body(b'S', "s7"), &mut out), 0);
        u.forget_held();
        // A later request binds it twice: one Parse added, before the first Bind.
        assert_eq!(u.rewrite(b'B', &bind_body("", "s7"), &mut out), 1);
        assert_eq!(u.rewrite(b'B', &bind_body("", "s7"), &mut out), 0);
        u.forget_held();
        // A Describe of it in a new request parses it first.
        assert_eq!(u.rewrite(b'D', &target_body(b'S', "s7"), &mut out), 1);
        assert_eq!(u.rewrite(b'C', &target_body(b'S', "s7"), &mut out), 0);
        u.forget_held();
        // Closed: a Bind of the name now goes as it came (the server refuses it).
        assert_eq!(u.rewrite(b'B', &bind_body("", "s7"), &mut out), 0);
        let got = frames(&out);
        let unnamed_parse = parse_body("", "SELECT $1");
        let expected: Vec<(u8, Vec<u8>)> = vec![
            (b'P', unnamed_parse.clone()),
            (b'D', target_body(b'S', "")),
            (b'P', unnamed_parse.clone()),
            (b'B', bind_body("", "")),
            (b'B', bind_body("", "")),
            (b'P', unnamed_parse),
            (b'D', target_body(b'S', "")),
            (b'C', target_body(b'S', "")),
            (b'B', bind_body("", "s7")),
        ];
        assert_eq!(got, expected);
    }

    #[test]
    fn unnamed_and_portal_frames_pass_unchanged() {
        let mut u = Unnamed::default();
        let mut out = BytesMut::new();
        let inputs = [
            (b'P', parse_body("", "SELECT 1")),
            (b'B', bind_body("p1", "")),
            (b'D', target_body(b'P', "p1")),
            (b'C', target_body(b'P', "p1")),
            (b'D', target_body(b'S', "unknown")),
            (b'B', b"no terminator".to_vec()),
        ];
        for (tag, body) in &inputs {
            assert_eq!(u.rewrite(*tag, body, &mut out), 0);
        }
        assert_eq!(frames(&out), inputs.to_vec());
    }

    #[test]
    fn statements_of_the_pool_in_between_make_the_next_bind_parse_again() {
        let mut u = Unnamed::default();
        let mut out = BytesMut::new();
        u.rewrite(b'P', &parse_body("s1", "SELECT $1"), &mut out);
        u.forget_held();
        assert_eq!(u.rewrite(b'B', &bind_body("", "s1"), &mut out), 1);
        // A Parse of the unnamed statement by tokio-postgres replaces it, too.
        u.rewrite(b'P', &parse_body("", "SELECT 2"), &mut out);
        assert_eq!(u.rewrite(b'B', &bind_body("", "s1"), &mut out), 1);
    }
}
