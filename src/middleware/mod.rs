//! A tower middleware that runs each HTTP request as its end user (feature `tower`).
//!
//! [`IdentityLayer`] reads the end user from the request (the `identity` cookie first, else
//! `Authorization: Bearer …`) and runs the rest of the stack inside an
//! [`EndUserScope`] for that user. On a pool built with a
//! [`ContextProvider`](crate::ContextProvider), every `pool.get()` the handler makes then
//! acquires as the user: the analogue of python-oracledb's `EndUserSecMiddleware`, without
//! its per-thread identity.
//!
//! ```no_run
//! # #[cfg(feature = "postgres")]
//! # async fn doc(pool: ctxpool::postgres::Pool) {
//! use axum::{Router, routing::get, extract::State};
//! use ctxpool::middleware::IdentityLayer;
//!
//! async fn list(State(pool): State<ctxpool::postgres::Pool>) -> String {
//!     // Runs as the request's end user: the database's policies decide what comes back.
//!     let client = pool.get().await.unwrap();
//!     let rows = client.query("SELECT name FROM hr.employees", &[]).await.unwrap();
//!     format!("{} rows", rows.len())
//! }
//!
//! let app: Router = Router::new()
//!     .route("/employees", get(list))
//!     .with_state(pool)
//!     .layer(IdentityLayer::new());
//! # }
//! ```
//!
//! # What it answers itself
//! A request without a credential proceeds with no identity (plain least-privileged
//! connections). A request whose credential cannot be read never reaches the service and
//! never touches the database: it gets a short JSON body `{"error": code, "message": …}`
//! with 400 (malformed or oversize cookie, several conflicting credentials) or 401 (a
//! malformed bearer header, a token refused by the configured [`TokenCheck`]), never a 500
//! and never an echo of the credential.

mod credentials;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use http::{HeaderValue, Request, Response, header};
use secrecy::SecretString;
use tower_layer::Layer;
use tower_service::Service;

pub use credentials::{
    CredentialError, CredentialOptions, DEFAULT_COOKIE_NAME, DEFAULT_MAX_CREDENTIAL_LEN,
    identity_from_headers,
};

use crate::provider::Verification;
use crate::scope::EndUserScope;

/// Checks an end user's token before the request runs, so that an invalid token is a 401
/// before any database work. With feature `providers`,
/// [`TokenValidator`](crate::providers::validation::TokenValidator) implements it.
#[async_trait]
pub trait TokenCheck: Send + Sync + 'static {
    /// `Ok` if the token may be used, with evidence of the check if the checker leaves
    /// any: it reaches the pool's provider with the request
    /// ([`ContextRequest::verification`](crate::ContextRequest::verification)), so that a
    /// provider sharing the checker's validator does not verify the token again.
    async fn check(&self, token: &SecretString) -> Result<Option<Verification>, TokenRefusal>;
}

/// Why a [`TokenCheck`] refused a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenRefusal {
    /// The token is not valid: answered with 401.
    Invalid,
    /// The check cannot be made now (keys unreachable): answered with 503.
    Unavailable,
}

#[cfg(feature = "providers")]
#[async_trait]
impl TokenCheck for crate::providers::validation::TokenValidator {
    async fn check(&self, token: &SecretString) -> Result<Option<Verification>, TokenRefusal> {
        use crate::providers::validation::ValidationError;
        match self.verify_for_request(token).await {
            Ok((_, evidence)) => Ok(Some(evidence)),
            Err(ValidationError::Jwks(_)) => Err(TokenRefusal::Unavailable),
            Err(_) => Err(TokenRefusal::Invalid),
        }
    }
}

#[async_trait]
impl<T: TokenCheck + ?Sized> TokenCheck for Arc<T> {
    async fn check(&self, token: &SecretString) -> Result<Option<Verification>, TokenRefusal> {
        (**self).check(token).await
    }
}

/// The [`Layer`] that wraps services in [`IdentityService`].
#[derive(Clone, Default)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct IdentityLayer {
    config: Arc<Config>,
}

#[derive(Clone, Default)]
struct Config {
    options: CredentialOptions,
    token_check: Option<Arc<dyn TokenCheck>>,
}

impl fmt::Debug for IdentityLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityLayer")
            .field("options", &self.config.options)
            .field("token_check", &self.config.token_check.is_some())
            .finish()
    }
}

impl IdentityLayer {
    /// Reads the `identity` cookie and the `Authorization` header, credentials of at most
    /// [`DEFAULT_MAX_CREDENTIAL_LEN`] bytes, without token validation.
    pub fn new() -> Self {
        Self::default()
    }

    /// The configuration, copied first if a clone of this layer shares it.
    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// Reads the identity from this cookie instead of `identity`.
    pub fn cookie_name(mut self, name: impl Into<String>) -> Self {
        self.config_mut().options.cookie_name = name.into();
        self
    }

    /// Refuses credentials longer than `max_len` bytes (400).
    pub fn max_credential_len(mut self, max_len: usize) -> Self {
        self.config_mut().options.max_len = max_len;
        self
    }

    /// Checks end-user tokens before the request runs: a refused token is a 401 before
    /// any database work. Named (application-store) identities are not checked.
    pub fn token_check(mut self, check: impl TokenCheck) -> Self {
        self.config_mut().token_check = Some(Arc::new(check));
        self
    }
}

impl<S> Layer<S> for IdentityLayer {
    type Service = IdentityService<S>;

    fn layer(&self, inner: S) -> IdentityService<S> {
        IdentityService {
            inner,
            config: self.config.clone(),
        }
    }
}

/// Runs each request inside an [`EndUserScope`] for the end user it names; see the
/// [module documentation](self).
#[derive(Clone)]
pub struct IdentityService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S: fmt::Debug> fmt::Debug for IdentityService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityService")
            .field("inner", &self.inner)
            .field("options", &self.config.options)
            .finish()
    }
}

/// The future of [`IdentityService`]. Boxed: it awaits the token check, then the inner
/// service inside the scope.
pub type ResponseFuture<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for IdentityService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    ReqBody: Send + 'static,
    ResBody: From<String> + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The clone is not ready; the instance that was polled ready serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let config = self.config.clone();
        Box::pin(async move {
            let identity = match identity_from_headers(request.headers(), &config.options) {
                Ok(identity) => identity,
                Err(e) => return Ok(refuse(&e)),
            };
            let mut verification = None;
            if let (Some(check), Some(token)) = (
                &config.token_check,
                identity.as_ref().and_then(|i| i.token_secret()),
            ) {
                match check.check(token).await {
                    Ok(evidence) => verification = evidence,
                    Err(TokenRefusal::Invalid) => {
                        return Ok(refuse(&CredentialError::InvalidToken));
                    }
                    Err(TokenRefusal::Unavailable) => {
                        return Ok(refuse(&CredentialError::ValidationUnavailable));
                    }
                }
            }
            let scope = match (identity, verification) {
                (Some(identity), Some(evidence)) => {
                    EndUserScope::new(identity).verification(evidence)
                }
                (Some(identity), None) => EndUserScope::new(identity),
                (None, _) => EndUserScope::anonymous(),
            };
            // The inner `call` runs inside the scope too: some services do work there.
            scope.run(async move { inner.call(request).await }).await
        })
    }
}

/// The short JSON answer to a refused credential.
fn refuse<B: From<String>>(error: &CredentialError) -> Response<B> {
    tracing::debug!(code = error.code(), "ctxpool: request credential refused");
    let body = serde_json::json!({ "error": error.code(), "message": error.to_string() });
    let mut response = Response::new(B::from(body.to_string()));
    *response.status_mut() = error.status();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if error.status() == http::StatusCode::UNAUTHORIZED {
        let challenge = match error {
            CredentialError::InvalidToken => r#"Bearer error="invalid_token""#,
            _ => r#"Bearer error="invalid_request""#,
        };
        headers.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
    }
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A service that records the scope each request ran in.
    #[derive(Clone)]
    struct Echo(Arc<AtomicUsize>);

    impl Service<Request<()>> for Echo {
        type Response = Response<String>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Response<String>, Infallible>> + Send>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Request<()>) -> Self::Future {
            self.0.fetch_add(1, Ordering::SeqCst);
            // Read in `call`, before the future: the scope must already be there.
            let at_call = crate::scope::current().and_then(|r| r.identity.name().map(String::from));
            Box::pin(async move {
                let in_future =
                    crate::scope::current().and_then(|r| r.identity.name().map(String::from));
                assert_eq!(at_call, in_future);
                Ok(Response::new(in_future.unwrap_or_else(|| "-".into())))
            })
        }
    }

    async fn send(
        layer: &IdentityLayer,
        calls: &Arc<AtomicUsize>,
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        let mut svc = layer.layer(Echo(calls.clone()));
        let mut req = Request::new(());
        for (k, v) in headers {
            req.headers_mut().append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let res = svc.call(req).await.unwrap();
        (res.status().as_u16(), res.into_body())
    }

    struct RefuseAll;
    #[async_trait]
    impl TokenCheck for RefuseAll {
        async fn check(&self, _: &SecretString) -> Result<Option<Verification>, TokenRefusal> {
            Err(TokenRefusal::Invalid)
        }
    }

    #[tokio::test]
    async fn requests_run_in_their_own_scope() {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = IdentityLayer::new();
        assert_eq!(send(&layer, &calls, &[]).await, (200, "-".into()));
        assert_eq!(
            send(
                &layer,
                &calls,
                &[("cookie", r#"identity={"name":"alice"}"#)]
            )
            .await,
            (200, "alice".into())
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Nothing outlives the request.
        assert!(crate::scope::current().is_none());
    }

    #[tokio::test]
    async fn refused_credentials_never_reach_the_service() {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = IdentityLayer::new().token_check(RefuseAll);
        let (status, body) = send(&layer, &calls, &[("cookie", "identity={bad")]).await;
        assert_eq!(status, 400);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"], "malformed_identity_cookie");
        let (status, _) = send(&layer, &calls, &[("authorization", "Bearer a.b.c")]).await;
        assert_eq!(status, 401);
        // Named identities are not tokens: the check does not apply.
        let (status, _) = send(&layer, &calls, &[("cookie", r#"identity={"name":"bob"}"#)]).await;
        assert_eq!(status, 200);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn configuring_a_cloned_layer_leaves_the_original_alone() {
        let a = IdentityLayer::new();
        let b = a.clone().cookie_name("who").max_credential_len(10);
        assert_eq!(a.config.options, CredentialOptions::default());
        assert_eq!(b.config.options.cookie_name, "who");
        assert_eq!(b.config.options.max_len, 10);
    }
}
