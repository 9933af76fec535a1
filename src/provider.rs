//! The token-provider interface (SPI): turning an end-user identity into a full context.
//!
//! A pool built with a [`ContextProvider`] completes
//! [`acquire_as(identity)`](crate::Pool::acquire_as): the provider fetches the
//! database-access token (client credentials or on-behalf-of) and adds its configured data
//! roles and attributes, which a [`ContextRequest`] may override per request. The trait is
//! object-safe so that any identity provider can be plugged in.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::context::{ContextError, EndUserIdentity, SecurityContext};

/// What a provider is asked to complete: an identity, with optional per-request data roles
/// and attributes that take precedence over the provider's configuration.
///
/// Inside an [`EndUserScope`](crate::scope::EndUserScope), [`scope::current`](crate::scope::current)
/// returns the request the scope describes, and a provider-configured pool's
/// [`get`](crate::Pool::get) acquires with it.
#[derive(Clone, Debug)]
pub struct ContextRequest {
    /// The end user.
    pub identity: EndUserIdentity,
    /// Data roles for this request, replacing the configured ones.
    pub data_roles: Option<Vec<String>>,
    /// Attributes for this request, replacing the configured ones.
    pub attributes: Option<Value>,
    /// Data roles the pool adds to whatever the provider completes, for a scoped
    /// elevation ([`scope::with_data_roles`](crate::scope::with_data_roles)). Providers
    /// need not look at it: the pool applies it after completion, and the backend's
    /// allow-list still decides whether the elevated context may be attached.
    pub extra_data_roles: Vec<String>,
    /// When the pool stops waiting for the provider (its apply timeout), set by the pool
    /// before it calls the provider: a provider that retries fits its attempts and backoff
    /// before it, so that its own error (what was tried, what failed last) reaches the
    /// caller instead of a bare timeout. An earlier deadline set by the caller is kept.
    pub deadline: Option<tokio::time::Instant>,
    /// Evidence that the identity's token was already verified for this request, e.g. by
    /// the tower layer's token check, so that the provider need not verify it again. A
    /// provider uses only evidence it recognises as its own validator's.
    pub verification: Option<Verification>,
}

/// Evidence of an earlier token verification, opaque to the core: whoever verified
/// stores what it verified, and only a provider that knows the type can read it back.
#[derive(Clone)]
pub struct Verification(Arc<dyn Any + Send + Sync>);

impl Verification {
    /// Wraps `evidence`.
    pub fn new<T: Any + Send + Sync>(evidence: T) -> Self {
        Self(Arc::new(evidence))
    }

    /// The evidence, if it is a `T`.
    pub fn downcast_ref<T: Any>(&self) -> Option<&T> {
        self.0.downcast_ref()
    }
}

impl fmt::Debug for Verification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The evidence may hold claims: personal data.
        f.write_str("Verification(..)")
    }
}

impl ContextRequest {
    /// A request for `identity` with the provider's configured roles and attributes.
    pub fn new(identity: EndUserIdentity) -> Self {
        Self {
            identity,
            data_roles: None,
            attributes: None,
            extra_data_roles: Vec::new(),
            deadline: None,
            verification: None,
        }
    }

    /// Data roles for this request, replacing the provider's configured ones.
    pub fn data_roles<I, S>(mut self, roles: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.data_roles = Some(roles.into_iter().map(Into::into).collect());
        self
    }

    /// Attributes for this request, replacing the provider's configured ones.
    pub fn attributes(mut self, attributes: impl Into<Value>) -> Self {
        self.attributes = Some(attributes.into());
        self
    }

    /// Data roles added to the completed context (see
    /// [`extra_data_roles`](Self::extra_data_roles)).
    pub fn extra_data_roles<I, S>(mut self, roles: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_data_roles = roles.into_iter().map(Into::into).collect();
        self
    }
}

impl From<EndUserIdentity> for ContextRequest {
    fn from(identity: EndUserIdentity) -> Self {
        Self::new(identity)
    }
}

/// Completes end-user identities into security contexts.
#[async_trait]
pub trait ContextProvider: Send + Sync + 'static {
    /// Builds the security context for `request`: fetch (or take from cache) a
    /// database-access token, add data roles and attributes. Must fail, never degrade to a
    /// broader or an empty context.
    async fn security_context(
        &self,
        request: &ContextRequest,
    ) -> Result<SecurityContext, ProviderError>;
}

/// Why a provider could not complete a context. Never carries a token, an assertion, a
/// secret or an identity provider's response body.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// The identity provider refused the request (an HTTP 4xx other than 429): wrong or
    /// unknown client, disabled grant, bad assertion. Not retried; fixing it takes a
    /// change of configuration or of the user's token.
    #[error("the identity provider refused the token request (HTTP {status}, {})", describe_code(.code.as_deref()))]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The OAuth `error` code, e.g. `invalid_client`; `None` when the answer had none
        /// (some identity providers answer a wrong secret with a bare 403).
        code: Option<String>,
    },
    /// The identity provider could not be reached or answered unusably (HTTP 5xx, 429,
    /// transport errors, timeouts, malformed answers); the message says what was tried.
    #[error("the identity provider is unavailable: {0}")]
    Unavailable(String),
    /// The identity provider's TLS certificate failed a check (named in the message): no
    /// retry can pass until the trust roots or the server's certificate change.
    #[error("the identity provider's TLS certificate was refused: {0}")]
    Certificate(String),
    /// The end user's token was refused by validation.
    #[error("the end-user token is not valid: {0}")]
    InvalidToken(String),
    /// The completed context did not validate.
    #[error("the completed security context is not valid: {0}")]
    Context(#[from] ContextError),
    /// Any other failure of a custom provider.
    #[error("the context provider failed: {0}")]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

fn describe_code(code: Option<&str>) -> String {
    match code {
        Some(code) => format!("error `{code}`"),
        None => "no OAuth error code".to_owned(),
    }
}

/// A provider that completes every request with a fixed database-access token. Meant for
/// tests and examples; real deployments fetch tokens from an identity provider.
#[derive(Clone)]
pub struct StaticTokenProvider {
    token: secrecy::SecretString,
}

impl StaticTokenProvider {
    /// Completes every identity with `database_access_token`.
    pub fn new(database_access_token: impl Into<String>) -> Self {
        Self {
            token: secrecy::SecretString::from(database_access_token.into()),
        }
    }
}

impl fmt::Debug for StaticTokenProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StaticTokenProvider(<redacted>)")
    }
}

#[async_trait]
impl ContextProvider for StaticTokenProvider {
    async fn security_context(
        &self,
        request: &ContextRequest,
    ) -> Result<SecurityContext, ProviderError> {
        use secrecy::ExposeSecret;
        let mut builder = SecurityContext::builder(
            request.identity.clone(),
            self.token.expose_secret().to_owned(),
        );
        if let Some(roles) = &request.data_roles {
            builder = builder.data_roles(roles.iter().cloned());
        }
        if let Some(attributes) = &request.attributes {
            builder = builder.attributes(attributes.clone());
        }
        Ok(builder.build()?)
    }
}
