//! Frames of the PostgreSQL protocol (version 3): the header reader both directions share,
//! and the few messages the layer writes itself.
//!
//! A typed frame is one tag byte, then a big-endian `i32` length that counts itself and the
//! body but not the tag. The very first frontend messages (StartupMessage, SSLRequest) have
//! no tag: just the length and the body.

use std::io;

use bytes::{BufMut, BytesMut};

/// Frontend tags the layer acts on.
pub(crate) mod front {
    pub(crate) const BIND: u8 = b'B';
    pub(crate) const COPY_DATA: u8 = b'd';
    pub(crate) const COPY_DONE: u8 = b'c';
    pub(crate) const COPY_FAIL: u8 = b'f';
    pub(crate) const EXECUTE: u8 = b'E';
    pub(crate) const PARSE: u8 = b'P';
    pub(crate) const QUERY: u8 = b'Q';
    pub(crate) const SYNC: u8 = b'S';
    pub(crate) const TERMINATE: u8 = b'X';
}

/// Backend tags the layer acts on.
pub(crate) mod back {
    pub(crate) const BACKEND_KEY_DATA: u8 = b'K';
    pub(crate) const BIND_COMPLETE: u8 = b'2';
    pub(crate) const COMMAND_COMPLETE: u8 = b'C';
    pub(crate) const EMPTY_QUERY: u8 = b'I';
    pub(crate) const ERROR: u8 = b'E';
    pub(crate) const NOTICE: u8 = b'N';
    pub(crate) const PARAMETER_STATUS: u8 = b'S';
    pub(crate) const PARSE_COMPLETE: u8 = b'1';
    pub(crate) const PORTAL_SUSPENDED: u8 = b's';
    pub(crate) const READY_FOR_QUERY: u8 = b'Z';
}

/// The request codes of untyped frontend messages that the server answers with one byte.
pub(crate) const SSL_REQUEST: u32 = 80_877_103;
pub(crate) const GSSENC_REQUEST: u32 = 80_877_104;

/// The largest frame the server accepts or sends (1 GiB, PostgreSQL's own limit).
const MAX_FRAME: usize = 1 << 30;

/// A frame header read a byte at a time across arbitrary chunk boundaries.
#[derive(Debug, Default)]
pub(crate) struct Header {
    bytes: [u8; 5],
    have: usize,
}

/// A complete header: the tag (0 for an untyped message) and the body length.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Head {
    pub(crate) tag: u8,
    pub(crate) body: usize,
}

impl Header {
    /// Feeds bytes from `input` until the header of a frame (`typed` or not) is complete.
    /// Returns how many bytes it took and the header once complete.
    pub(crate) fn feed(&mut self, input: &[u8], typed: bool) -> io::Result<(usize, Option<Head>)> {
        let want = if typed { 5 } else { 4 };
        if self.have == 0 && typed {
            // The common case, a whole header in the input: read it in place.
            if let Some(&[tag, a, b, c, d]) = input.get(..5) {
                let len = u32::from_be_bytes([a, b, c, d]) as usize;
                return Self::typed_head(tag, len).map(|head| (5, Some(head)));
            }
        }
        let take = (want - self.have).min(input.len());
        self.bytes[self.have..self.have + take].copy_from_slice(&input[..take]);
        self.have += take;
        if self.have < want {
            return Ok((take, None));
        }
        self.have = 0;
        let (tag, len) = if typed {
            (self.bytes[0], &self.bytes[1..5])
        } else {
            (0, &self.bytes[0..4])
        };
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if typed {
            return Self::typed_head(tag, len).map(|head| (take, Some(head)));
        }
        Self::checked_len(len)?;
        Ok((take, Some(Head { tag, body: len - 4 })))
    }

    fn typed_head(tag: u8, len: usize) -> io::Result<Head> {
        // Tag 0 stands for "untyped" in `Head` (and no message has it): a typed frame
        // with it would lose its tag when copied through.
        if tag == 0 {
            return Err(protocol("a frame with tag 0"));
        }
        Self::checked_len(len)?;
        Ok(Head { tag, body: len - 4 })
    }

    fn checked_len(len: usize) -> io::Result<()> {
        if !(4..=MAX_FRAME).contains(&len) {
            return Err(protocol("a frame length out of range"));
        }
        Ok(())
    }

    /// Whether no byte of a header is held (the input is at a frame boundary).
    pub(crate) fn is_empty(&self) -> bool {
        self.have == 0
    }

    /// The bytes of the header as read (to copy it through).
    pub(crate) fn encode(head: Head, out: &mut BytesMut) {
        if head.tag != 0 {
            out.put_u8(head.tag);
        }
        out.put_u32((head.body + 4) as u32);
    }
}

/// The error every protocol violation becomes: the connection is then unusable.
pub(crate) fn protocol(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("ctxpool wire layer: {what}"),
    )
}

/// Appends a typed frame with `body`.
fn frame(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_u32(0);
    body(out);
    let len = (out.len() - at) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

/// Parse (unnamed) + Bind (unnamed portal, no parameters) + Execute: one statement of ours,
/// whose replies are ParseComplete, BindComplete, any rows and one completion.
pub(crate) fn statement(out: &mut BytesMut, sql: &str) {
    frame(out, b'P', |b| {
        cstr(b, "");
        cstr(b, sql);
        b.put_i16(0);
    });
    frame(out, front::BIND, |b| {
        cstr(b, "");
        cstr(b, "");
        b.put_i16(0);
        b.put_i16(0);
        b.put_i16(0);
    });
    frame(out, front::EXECUTE, |b| {
        cstr(b, "");
        b.put_i32(0);
    });
}

/// Close of the named statement `name` (not an error when there is none), Parse of it
/// with these parameter type OIDs, Bind (unnamed portal) with these text parameters and
/// Execute: a statement of ours prepared on its first use, whose replies are CloseComplete,
/// ParseComplete, BindComplete, any rows and one completion. The Close makes a retry after
/// a batch that failed once the statement was parsed start from nothing, rather than fail
/// on a name already taken or leave a statement per failure behind.
pub(crate) fn parsed_bound_statement<'a>(
    out: &mut BytesMut,
    name: &str,
    sql: &str,
    types: &[u32],
    params: impl ExactSizeIterator<Item = &'a str>,
) {
    frame(out, b'C', |b| {
        b.put_u8(b'S');
        cstr(b, name);
    });
    frame(out, b'P', |b| {
        cstr(b, name);
        cstr(b, sql);
        b.put_i16(i16::try_from(types.len()).unwrap_or(i16::MAX));
        for oid in types {
            b.put_u32(*oid);
        }
    });
    bound_statement(out, name, params);
}

/// Bind (unnamed portal, no parameters) of the prepared statement `name` + Execute: a
/// statement of ours prepared at connect, whose replies are BindComplete, any rows and
/// one completion.
pub(crate) fn prepared_statement(out: &mut BytesMut, name: &str) {
    frame(out, front::BIND, |b| {
        cstr(b, "");
        cstr(b, name);
        b.put_i16(0);
        b.put_i16(0);
        b.put_i16(0);
    });
    frame(out, front::EXECUTE, |b| {
        cstr(b, "");
        b.put_i32(0);
    });
}

/// Bind (unnamed portal) of the prepared statement `name` with these parameters, all in
/// text format, + Execute.
pub(crate) fn bound_statement<'a>(
    out: &mut BytesMut,
    name: &str,
    params: impl ExactSizeIterator<Item = &'a str>,
) {
    frame(out, front::BIND, |b| {
        cstr(b, "");
        cstr(b, name);
        b.put_i16(0);
        b.put_i16(i16::try_from(params.len()).unwrap_or(i16::MAX));
        for p in params {
            b.put_i32(i32::try_from(p.len()).unwrap_or(i32::MAX));
            b.put_slice(p.as_bytes());
        }
        b.put_i16(0);
    });
    frame(out, front::EXECUTE, |b| {
        cstr(b, "");
        b.put_i32(0);
    });
}

/// A Sync frame.
pub(crate) fn sync(out: &mut BytesMut) {
    frame(out, front::SYNC, |_| {});
}

/// A simple Query frame.
pub(crate) fn query(out: &mut BytesMut, sql: &str) {
    frame(out, front::QUERY, |b| cstr(b, sql));
}

/// A ReadyForQuery frame with `status`.
pub(crate) fn ready(out: &mut BytesMut, status: u8) {
    frame(out, back::READY_FOR_QUERY, |b| b.put_u8(status));
}

/// The SQLSTATE of the error the layer gives a request that the server skipped because
/// an earlier message of the same batch failed (PostgreSQL's "commands ignored until end
/// of transaction block").
pub(crate) const SKIPPED_SQLSTATE: &str = "25P02";

/// An ErrorResponse for a request the server skipped.
pub(crate) fn skipped_error(out: &mut BytesMut) {
    frame(out, back::ERROR, |b| {
        b.put_u8(b'S');
        cstr(b, "ERROR");
        b.put_u8(b'V');
        cstr(b, "ERROR");
        b.put_u8(b'C');
        cstr(b, SKIPPED_SQLSTATE);
        b.put_u8(b'M');
        cstr(
            b,
            "ctxpool: statement not run: an earlier statement of its batch (the session \
             reset or the security context) failed",
        );
        b.put_u8(0);
    });
}

/// The value of one field of an ErrorResponse or NoticeResponse body.
pub(crate) fn error_field(body: &[u8], code: u8) -> Option<&[u8]> {
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            return None;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        if field == code {
            return Some(&tail[..end]);
        }
        rest = &tail[end + 1..];
    }
    None
}

/// The first NUL-terminated string of `body` and what follows it.
pub(crate) fn split_cstr(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = body.iter().position(|&b| b == 0)?;
    Some((&body[..end], &body[end + 1..]))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn header_across_chunks() {
        let mut h = Header::default();
        let bytes = [b'Z', 0, 0, 0, 5];
        let mut got = None;
        for b in bytes {
            let (n, head) = h.feed(&[b], true).unwrap();
            assert_eq!(n, 1);
            got = head.or(got);
        }
        let head = got.unwrap();
        assert_eq!((head.tag, head.body), (b'Z', 1));
    }

    #[test]
    fn bad_lengths_are_refused() {
        let mut h = Header::default();
        assert!(h.feed(&[b'Z', 0, 0, 0, 3], true).is_err());
        let mut h = Header::default();
        assert!(h.feed(&[b'Z', 0x7f, 0, 0, 0], true).is_err());
    }

    #[test]
    fn error_fields() {
        let mut out = BytesMut::new();
        skipped_error(&mut out);
        let body = &out[5..];
        assert_eq!(error_field(body, b'C'), Some(&b"25P02"[..]));
        assert_eq!(error_field(body, b'S'), Some(&b"ERROR"[..]));
        assert_eq!(error_field(body, b'D'), None);
    }
}
