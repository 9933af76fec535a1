//! TLS under the wire layer: the layer wraps the TLS stream, so that it reads plaintext.

use std::future::Future;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::tls::TlsConnect;

use super::WireStream;

/// A [`TlsConnect`] for a [`WireStream`]: starts TLS on the stream beneath the layer and
/// puts a fresh layer (same handle) over the TLS session.
pub(crate) struct WireTls<T>(pub(crate) T);

impl<S, T> TlsConnect<WireStream<S>> for WireTls<T>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: TlsConnect<S>,
    T::Future: Send + 'static,
{
    type Stream = WireStream<T::Stream>;
    type Error = T::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Stream, T::Error>> + Send>>;

    fn connect(self, stream: WireStream<S>) -> Self::Future {
        let (io, handle) = stream.into_parts();
        let tls = self.0.connect(io);
        Box::pin(async move { Ok(WireStream::new(tls.await?, handle)) })
    }
}
