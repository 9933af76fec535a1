//! A tower middleware that runs each HTTP request as its end user (feature `tower`).
//!
//! [`IdentityLayer`] reads the end user from the request (the `identity` cookie first, else
//! `Authorization: Bearer …`) and runs the rest of the stack inside an
//! [`EndUserScope`](crate::scope::EndUserScope) for that user. On a pool built with a
//! [`ContextProvider`](crate::ContextProvider), every `pool.get()` the handler makes then
//! acquires as the user: the analogue of python-oracledb's `EndUserSecMiddleware`, without
//! its per-thread identity.
//!
//! ```
//! # #[cfg(feature = "postgres")]
//! # ctxpool_testkit::hr::on_hr_database(|url| async move {
//! # let mut cfg = ctxpool::postgres::Config::new();
//! # cfg.url = Some(url);
//! # let pool = cfg.create_pool(None, tokio_postgres::NoTls)?;
//! use axum::{Router, body::Body, extract::State, http::{Request, StatusCode}, routing::get};
//! use ctxpool::middleware::IdentityLayer;
//! use tower::ServiceExt;
//!
//! async fn list(State(pool): State<ctxpool::postgres::Pool>) -> Result<String, StatusCode> {
//!     // Runs as the request's end user: the database's policies decide what comes back.
//!     let client = pool.get().await.map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
//!     let rows = client.query("SELECT name FROM hr.employees", &[]).await
//!         .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
//!     Ok(format!("{} rows", rows.len()))
//! }
//!
//! let app: Router = Router::new()
//!     .route("/employees", get(list))
//!     .with_state(pool)
//!     .layer(IdentityLayer::new());
//!
//! // No credential: the plain login, which the policies show nothing.
//! let plain = app.clone().oneshot(Request::get("/employees").body(Body::empty())?).await?;
//! assert_eq!(plain.status(), StatusCode::OK);
//! // A credential that cannot be read is answered by the layer, before any database work.
//! let bad = Request::get("/employees").header("cookie", "identity=%zz").body(Body::empty())?;
//! assert_eq!(app.oneshot(bad).await?.status(), StatusCode::BAD_REQUEST);
//! # Ok(())
//! # });
//! ```
//!
//! # What it answers itself
//! A request without a credential proceeds with no identity (plain least-privileged
//! connections). A request whose credential cannot be read never reaches the service and
//! never touches the database: it gets a short JSON body `{"error": code, "message": …}`
//! with 400 (malformed or oversize cookie, several conflicting credentials) or 401 (a
//! malformed bearer header, a token refused by the configured [`TokenCheck`]) or 503 (the
//! check cannot be made now), never a 500 and never an echo of the credential.
//!
//! # Layout
//! One concept a file: `layer.rs` ([`IdentityLayer`], which builds the configuration),
//! `service.rs` ([`IdentityService`], which reads it per request), `future.rs`
//! ([`ResponseFuture`]), `credentials.rs` (reading the cookie and the header:
//! [`identity_from_headers`]), `error.rs` ([`CredentialError`] and the JSON answer). The
//! token check's interface, [`TokenCheck`], belongs to the core ([`crate::token_check`]):
//! the providers implement it without depending on this module.

mod credentials;
mod error;
mod future;
mod layer;
mod service;

pub use credentials::{
    CredentialOptions, DEFAULT_COOKIE_NAME, DEFAULT_MAX_CREDENTIAL_LEN, identity_from_headers,
};
pub use error::CredentialError;
pub use future::ResponseFuture;
pub use layer::IdentityLayer;
pub use service::IdentityService;
// Defined in the core, re-exported where the layer's users have always found them.
pub use crate::token_check::{TokenCheck, TokenRefusal};
