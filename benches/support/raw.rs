//! A minimal PostgreSQL wire client for the piggyback bench's physical limit: one TCP
//! connection, trust authentication only, named statements prepared once, and requests
//! written as one buffer of Bind/Execute pairs ended by a single Sync. No pool, no
//! statement cache, no row type: what any client must at least do for the same work.

use std::net::SocketAddr;

use bytes::{Buf, BufMut, BytesMut};
use postgres_protocol::IsNull;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The type OID of `text`, for the parameters of the statements prepared here.
const TEXT_OID: u32 = 25;
/// Format code of binary values (what tokio-postgres asks for, too).
const BINARY: i16 = 1;
/// Format code of text values.
const TEXT: i16 = 0;

/// One connection speaking the extended query protocol.
pub struct RawConn {
    stream: TcpStream,
    out: BytesMut,
    input: BytesMut,
}

/// What the server answered up to ReadyForQuery: per completed command, the first column
/// of each of its rows (NULL as an empty string).
pub type Reply = Vec<Vec<String>>;

impl RawConn {
    /// Connects and logs in as `user` to `database` (the server must trust the login).
    pub async fn connect(addr: SocketAddr, user: &str, database: &str) -> Self {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        stream.set_nodelay(true).expect("TCP_NODELAY");
        let mut conn = Self {
            stream,
            out: BytesMut::with_capacity(1024),
            input: BytesMut::with_capacity(8192),
        };
        frontend::startup_message([("user", user), ("database", database)], &mut conn.out)
            .expect("a startup message");
        conn.flush().await;
        conn.read_reply().await;
        conn
    }

    /// Prepares `sql` as the named statement `name`, its `params` parameters all text.
    pub fn parse(&mut self, name: &str, sql: &str, params: usize) {
        frontend::parse(
            name,
            sql,
            std::iter::repeat_n(TEXT_OID, params),
            &mut self.out,
        )
        .expect("a Parse message");
    }

    /// Binds the named statement to the unnamed portal with these text parameters and
    /// executes it, asking for binary results.
    pub fn bind_execute<'a>(
        &mut self,
        statement: &str,
        params: impl IntoIterator<Item = &'a [u8]>,
    ) {
        frontend::bind(
            "",
            statement,
            [TEXT],
            params,
            |value: &[u8], buf: &mut BytesMut| {
                buf.put_slice(value);
                Ok(IsNull::No)
            },
            [BINARY],
            &mut self.out,
        )
        .unwrap_or_else(|_| panic!("a Bind message for {statement}"));
        frontend::execute("", 0, &mut self.out).expect("an Execute message");
    }

    /// Ends what was queued with one Sync, sends it and reads the answer up to
    /// ReadyForQuery. Panics on an ErrorResponse.
    pub async fn sync(&mut self) -> Reply {
        frontend::sync(&mut self.out);
        self.flush().await;
        self.read_reply().await
    }

    async fn flush(&mut self) {
        self.stream
            .write_all(&self.out)
            .await
            .expect("writing to the server");
        self.out.clear();
    }

    /// Reads messages up to and including ReadyForQuery.
    async fn read_reply(&mut self) -> Reply {
        let mut reply = Vec::new();
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (tag, mut body) = self.frame().await;
            match tag {
                // DataRow: the first column only.
                b'D' => {
                    let columns = body.get_i16();
                    let value = if columns == 0 {
                        String::new()
                    } else {
                        match body.get_i32() {
                            len if len < 0 => String::new(),
                            len => String::from_utf8_lossy(&body[..len as usize]).into_owned(),
                        }
                    };
                    rows.push(value);
                }
                // CommandComplete.
                b'C' => reply.push(std::mem::take(&mut rows)),
                // Authentication: only AuthenticationOk is understood.
                b'R' => {
                    let code = body.get_i32();
                    assert_eq!(code, 0, "the raw client knows only trust authentication");
                }
                b'E' => error = Some(error_message(&body)),
                b'Z' => break,
                // ParseComplete, BindComplete, ParameterStatus, BackendKeyData, notices…
                _ => {}
            }
        }
        if let Some(message) = error {
            panic!("the server answered an error: {message}");
        }
        reply
    }

    /// The next message: its tag and body.
    async fn frame(&mut self) -> (u8, BytesMut) {
        self.fill(5).await;
        let len = u32::from_be_bytes([self.input[1], self.input[2], self.input[3], self.input[4]])
            as usize;
        self.fill(1 + len).await;
        let mut frame = self.input.split_to(1 + len);
        let tag = frame[0];
        frame.advance(5);
        (tag, frame)
    }

    /// Reads until the input buffer holds at least `n` bytes.
    async fn fill(&mut self, n: usize) {
        while self.input.len() < n {
            let read = self
                .stream
                .read_buf(&mut self.input)
                .await
                .expect("reading from the server");
            assert!(read > 0, "the server closed the connection");
        }
    }
}

/// The `M` (message) field of an ErrorResponse body, with its `C` (SQLSTATE).
fn error_message(body: &[u8]) -> String {
    let mut code = "";
    let mut message = "";
    for field in body.split(|b| *b == 0) {
        if let Some((&kind, text)) = field.split_first() {
            let text = std::str::from_utf8(text).unwrap_or("?");
            match kind {
                b'C' => code = text,
                b'M' => message = text,
                _ => {}
            }
        }
    }
    format!("{code}: {message}")
}
