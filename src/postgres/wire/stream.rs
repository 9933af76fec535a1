//! [`WireStream`]: the stream tokio-postgres reads and writes, over the socket or the TLS
//! stream.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::WireHandle;
use super::reader::Reader;
use super::writer::Writer;

/// How many bytes one read from the server takes at most.
const READ_CHUNK: usize = 16 * 1024;
/// Output buffered beyond this makes `poll_write` wait for the socket first.
const HIGH_WATER: usize = 64 * 1024;

/// The stream between tokio-postgres and the server; see the [module](super) docs.
pub(crate) struct WireStream<S> {
    io: S,
    handle: WireHandle,
    writer: Writer,
    reader: Reader,
    /// Bytes for the server, in order.
    to_server: BytesMut,
    /// Bytes for tokio-postgres, in order.
    to_client: BytesMut,
    chunk: Box<[u8]>,
    closed: ClosedOnDrop,
}

impl<S> WireStream<S> {
    /// Wraps `io`, a fresh connection (or a fresh TLS session on one).
    pub(crate) fn new(io: S, handle: WireHandle) -> Self {
        handle.0.closed.store(false, Ordering::Release);
        Self {
            io,
            writer: Writer::new(),
            reader: Reader::new(),
            to_server: BytesMut::new(),
            to_client: BytesMut::new(),
            chunk: vec![0; READ_CHUNK].into_boxed_slice(),
            closed: ClosedOnDrop {
                handle: handle.clone(),
                armed: true,
            },
            handle,
        }
    }

    /// The stream and the handle, for a TLS session to start on the stream. Only between
    /// the SSLRequest's answer and the start-up message, when nothing is buffered.
    pub(crate) fn into_parts(self) -> (S, WireHandle) {
        debug_assert!(self.to_server.is_empty() && self.to_client.is_empty());
        let Self { io, mut closed, .. } = self;
        closed.armed = false;
        (io, closed.handle.clone())
    }
}

/// Marks the connection ended when the stream is dropped: whoever waits for answers
/// must not wait for a connection that is gone.
struct ClosedOnDrop {
    handle: WireHandle,
    armed: bool,
}

impl Drop for ClosedOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.handle.0.closed.store(true, Ordering::Release);
            self.handle.0.answered.notify_waiters();
        }
    }
}

impl<S: AsyncWrite + Unpin> WireStream<S> {
    /// Writes what may go to the server now.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let ready = self.writer.flushable(&self.to_server, &self.reader);
            if ready == 0 {
                return Poll::Ready(Ok(()));
            }
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.to_server[..ready]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.to_server.advance(n);
            // The writer holds an offset into `to_server`; it must follow the advance.
            self.writer.drained(n);
        }
    }

    fn idle_work(&mut self) {
        self.writer
            .idle_work(&mut self.to_server, &mut self.reader, &self.handle.0);
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WireStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.handle.0.writer_waker.register(cx.waker());
        if this.to_server.len() >= HIGH_WATER {
            ready!(this.poll_drain(cx))?;
        }
        this.idle_work();
        this.writer
            .process(buf, &mut this.to_server, &mut this.reader, &this.handle.0)?;
        // Start sending at once; whatever the socket does not take now goes at flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.handle.0.writer_waker.register(cx.waker());
        this.idle_work();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WireStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.to_client.is_empty() {
                let n = this.to_client.len().min(buf.remaining());
                buf.put_slice(&this.to_client[..n]);
                this.to_client.advance(n);
                return Poll::Ready(Ok(()));
            }
            let mut chunk = ReadBuf::new(&mut this.chunk);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut chunk))?;
            let filled = chunk.filled();
            if filled.is_empty() {
                // End of stream.
                return Poll::Ready(Ok(()));
            }
            this.reader
                .process(filled, &mut this.to_client, &this.handle.0)?;
            if this.writer.gated() {
                // A request held back may go now: the connection task flushes when woken.
                this.handle.0.writer_waker.wake();
            }
        }
    }
}

impl<S: tokio_postgres::tls::TlsStream + Unpin> tokio_postgres::tls::TlsStream for WireStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        self.io.channel_binding()
    }
}
