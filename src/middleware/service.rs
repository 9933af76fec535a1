//! [`IdentityService`]: reads each request's end user, checks its token, and runs the
//! inner service inside that user's scope.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::credentials::{CredentialOptions, identity_from_headers};
use super::error::{CredentialError, refusal};
use super::future::ResponseFuture;
use crate::scope::EndUserScope;
use crate::token_check::{TokenCheck, TokenRefusal};

/// What the layer and every service it made share: read per request, never changed once
/// a service holds it ([`IdentityLayer`](super::IdentityLayer) copies it on write).
#[derive(Clone, Default)]
pub(super) struct Config {
    pub(super) options: CredentialOptions,
    pub(super) token_check: Option<Arc<dyn TokenCheck>>,
}

/// Runs each request inside an [`EndUserScope`] for the end user it names; see the
/// [module documentation](super).
#[derive(Clone)]
pub struct IdentityService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> IdentityService<S> {
    pub(super) fn new(inner: S, config: Arc<Config>) -> Self {
        Self { inner, config }
    }
}

impl<S: fmt::Debug> fmt::Debug for IdentityService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityService")
            .field("inner", &self.inner)
            .field("options", &self.config.options)
            .finish()
    }
}

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
        let config = Arc::clone(&self.config);
        ResponseFuture::new(async move {
            let identity = match identity_from_headers(request.headers(), &config.options) {
                Ok(identity) => identity,
                Err(e) => return Ok(refusal(&e)),
            };
            let mut verification = None;
            if let (Some(check), Some(token)) = (
                &config.token_check,
                identity.as_ref().and_then(|i| i.token_secret()),
            ) {
                match check.check(token).await {
                    Ok(evidence) => verification = evidence,
                    Err(TokenRefusal::Invalid) => {
                        return Ok(refusal(&CredentialError::InvalidToken));
                    }
                    Err(TokenRefusal::Unavailable) => {
                        return Ok(refusal(&CredentialError::ValidationUnavailable));
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::middleware::IdentityLayer;
    use crate::provider::Verification;
    use async_trait::async_trait;
    use http::HeaderValue;
    use secrecy::SecretString;
    use std::convert::Infallible;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower_layer::Layer;

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
}
