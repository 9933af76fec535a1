//! The HTTP pieces the token source and the JWKS fetch share: which roots a TLS
//! certificate must chain to, the client both build, the bounded body read, what a
//! `reqwest` failure is called without its `Display` (which can name the URL and quote
//! what was read), and which URLs may be plain `http`.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The built-in root store a TLS certificate may chain to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum BuiltInRoots {
    /// The Mozilla roots compiled in (`webpki-roots`): the same on every machine.
    #[default]
    Webpki,
    /// The operating system's store, as `rustls-native-certs` reads it: `SSL_CERT_FILE`
    /// and `SSL_CERT_DIR` when set, else the platform's certificate files. This is how a
    /// corporate CA installed on the machine becomes trusted.
    Platform,
    /// None: only the extra roots are trusted.
    None,
}

impl BuiltInRoots {
    /// The configuration value (`tls_root_store`): `webpki`, `platform` or `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Webpki => "webpki",
            Self::Platform => "platform",
            Self::None => "none",
        }
    }
}

/// The roots a token endpoint's or JWKS endpoint's certificate must chain to: a built-in
/// store plus extra PEM roots (a private or corporate CA).
///
/// `Debug` shows the store and how many extra roots there are.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TrustRoots {
    built_in: BuiltInRoots,
    /// Each added PEM bundle as given; parsed once when added (so that errors surface
    /// there) and again by each client built, since reqwest's certificates are not
    /// comparable.
    extra: Vec<Arc<[u8]>>,
    extra_count: usize,
}

impl fmt::Debug for TrustRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustRoots")
            .field("built_in", &self.built_in)
            .field("extra_roots", &self.extra_count)
            .finish()
    }
}

/// Why extra roots were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrustRootsError {
    /// The PEM file could not be read.
    #[error("could not read the CA file: {0}")]
    Read(String),
    /// The text holds no certificate, or a certificate that does not parse.
    #[error("the CA bundle holds no usable PEM certificate")]
    NoCertificate,
}

impl TrustRoots {
    /// The given built-in store, without extra roots.
    pub fn new(built_in: BuiltInRoots) -> Self {
        Self {
            built_in,
            ..Self::default()
        }
    }

    /// Also trusts the certificates of a PEM bundle (one or more `CERTIFICATE` blocks).
    pub fn with_pem(mut self, pem: &[u8]) -> Result<Self, TrustRootsError> {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|_| TrustRootsError::NoCertificate)?;
        if certs.is_empty() {
            return Err(TrustRootsError::NoCertificate);
        }
        self.extra_count += certs.len();
        self.extra.push(Arc::from(pem));
        Ok(self)
    }

    /// Also trusts the certificates of the PEM file at `path`.
    pub fn with_pem_file(self, path: impl AsRef<std::path::Path>) -> Result<Self, TrustRootsError> {
        // The OS error names what failed (not found, permission), never the content.
        let pem = std::fs::read(path).map_err(|e| TrustRootsError::Read(e.kind().to_string()))?;
        self.with_pem(&pem)
    }

    /// The built-in store.
    pub fn built_in(&self) -> BuiltInRoots {
        self.built_in
    }

    /// How many extra root certificates are trusted.
    pub fn extra_roots(&self) -> usize {
        self.extra_count
    }
}

/// An HTTPS client that trusts `roots`, bounds connecting by `connect_timeout` and follows
/// no redirects: a token request carries the client secret and a JWKS must come from the
/// configured host, so neither is replayed to wherever a redirect points.
pub(crate) fn client(
    roots: &TrustRoots,
    connect_timeout: Duration,
) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(connect_timeout)
        .redirect(reqwest::redirect::Policy::none())
        // Both built-in stores are compiled in and reqwest enables both by default:
        // choose exactly one (or none).
        .tls_built_in_root_certs(roots.built_in != BuiltInRoots::None)
        .tls_built_in_webpki_certs(roots.built_in == BuiltInRoots::Webpki)
        .tls_built_in_native_certs(roots.built_in == BuiltInRoots::Platform);
    for pem in &roots.extra {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|_| "the CA bundle holds no usable PEM certificate".to_owned())?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    // The builder's message names the failing step (e.g. an empty platform store), not
    // a secret.
    builder.build().map_err(|e| e.to_string())
}

/// What went wrong in transport, named without `reqwest`'s `Display`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// The request's time bound passed.
    TimedOut,
    /// No connection (refused, reset before an answer, DNS, TLS handshake).
    Connect,
    /// The answer stopped before its end.
    CutShort,
    /// The server's certificate failed the named check. Never passes on a retry.
    Certificate(&'static str),
    /// The request could not be built. Never passes on a retry.
    Builder,
    /// Anything else.
    Other,
}

/// Classifies `error`, certificate failures first: reqwest reports them as connect errors.
pub(crate) fn classify(error: &reqwest::Error) -> Transport {
    if let Some(check) = certificate_check(error) {
        Transport::Certificate(check)
    } else if error.is_timeout() {
        Transport::TimedOut
    } else if error.is_connect() {
        Transport::Connect
    } else if error.is_body() || error.is_decode() {
        Transport::CutShort
    } else if error.is_builder() {
        Transport::Builder
    } else {
        Transport::Other
    }
}

/// The certificate check that failed, if a `rustls` certificate error is in the chain.
fn certificate_check(error: &(dyn StdError + 'static)) -> Option<&'static str> {
    let mut next = Some(error);
    while let Some(current) = next {
        if let Some(rustls_error) = current.downcast_ref::<rustls::Error>() {
            return describe(rustls_error);
        }
        // `io::Error::source` skips the error it wraps (it returns that error's source),
        // and the TLS stack nests io errors: step into them explicitly.
        next = match current.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as &(dyn StdError + 'static)),
            None => current.source(),
        };
    }
    None
}

fn describe(error: &rustls::Error) -> Option<&'static str> {
    use rustls::CertificateError as C;
    let rustls::Error::InvalidCertificate(certificate) = error else {
        return None;
    };
    Some(match certificate {
        C::UnknownIssuer => {
            "unknown issuer: the chain does not lead to a trusted root (trust the CA with \
             tls_ca_file or TrustRoots::with_pem, or the platform store with \
             tls_root_store = \"platform\")"
        }
        C::Expired | C::ExpiredContext { .. } => "the certificate has expired",
        C::NotValidYet | C::NotValidYetContext { .. } => "the certificate is not valid yet",
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            "the certificate is not valid for the endpoint's host name"
        }
        C::Revoked => "the certificate is revoked",
        C::BadSignature => "the certificate's signature does not verify",
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
            "the certificate is not meant for server authentication"
        }
        C::BadEncoding => "the certificate is malformed",
        _ => "the certificate was refused",
    })
}

/// Why a body could not be read whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// Longer than the bound.
    TooLarge,
    /// Transport failed while reading.
    Transport(Transport),
}

/// Reads the body, refusing more than `max` bytes (announced or received).
pub(crate) async fn read_bounded(
    mut response: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, BodyError> {
    if response
        .content_length()
        .is_some_and(|len| len > max as u64)
    {
        return Err(BodyError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| BodyError::Transport(classify(&e)))?
    {
        if body.len() + chunk.len() > max {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The one rule for which endpoint URLs are accepted, for the configuration and the
/// validator alike: `https` with a host, or `http` on a loopback host (tests, local
/// sidecars): `localhost` or any loopback address (`127.0.0.0/8`, `::1`).
pub(crate) fn url_allowed(url: &reqwest::Url) -> bool {
    match url.scheme() {
        "https" => url.host().is_some(),
        "http" => is_loopback(url),
        _ => false,
    }
}

/// Whether `url`'s host is `localhost` or a loopback address.
pub(crate) fn is_loopback(url: &reqwest::Url) -> bool {
    match url.host_str() {
        Some(host) if host.eq_ignore_ascii_case("localhost") => true,
        // The URL parser has already normalised IPv4 forms (`127.1`); IPv6 comes bracketed.
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}
