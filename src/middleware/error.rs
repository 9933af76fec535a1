//! [`CredentialError`]: why the layer answers a request itself, and the answer it gives.

use http::{HeaderValue, Response, StatusCode, header};

/// Why a request's credential was refused. Never carries the credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// The identity cookie is neither a token nor a `{"name": …, "key": …}` object.
    #[error("the identity cookie is malformed")]
    MalformedCookie,
    /// Several identity cookies with different values.
    #[error("the request carries several different identity cookies")]
    ConflictingCookies,
    /// The `Authorization` header says `Bearer` but carries no well-formed token.
    #[error("the Authorization header is malformed")]
    MalformedAuthorization,
    /// More than one `Authorization` header.
    #[error("the request carries several Authorization headers")]
    SeveralAuthorizations,
    /// The identity cookie and the bearer token name different end users.
    #[error("the identity cookie and the Authorization header disagree")]
    ConflictingCredentials,
    /// A credential is longer than the configured limit.
    #[error("the credential is longer than {max} bytes")]
    TooLarge {
        /// The limit in bytes.
        max: usize,
    },
    /// The end-user token did not pass validation.
    #[error("the end-user token is not valid")]
    InvalidToken,
    /// The token could not be validated now (the issuer's keys are unreachable).
    #[error("the end-user token cannot be validated now")]
    ValidationUnavailable,
}

impl CredentialError {
    /// The HTTP status the middleware answers with: 400 for a malformed request, 401 for a
    /// bearer credential that is malformed or invalid, 503 when validation is unavailable.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedAuthorization | Self::InvalidToken => StatusCode::UNAUTHORIZED,
            Self::ValidationUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::MalformedCookie
            | Self::ConflictingCookies
            | Self::SeveralAuthorizations
            | Self::ConflictingCredentials
            | Self::TooLarge { .. } => StatusCode::BAD_REQUEST,
        }
    }

    /// A stable, machine-readable code for the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MalformedCookie => "malformed_identity_cookie",
            Self::ConflictingCookies => "conflicting_identity_cookies",
            Self::MalformedAuthorization => "malformed_authorization",
            Self::SeveralAuthorizations => "several_authorization_headers",
            Self::ConflictingCredentials => "conflicting_credentials",
            Self::TooLarge { .. } => "credential_too_large",
            Self::InvalidToken => "invalid_token",
            Self::ValidationUnavailable => "token_validation_unavailable",
        }
    }
}

/// The short JSON answer to a refused credential: `{"error": code, "message": …}` with the
/// error's status and, for a 401, the bearer challenge. Never an echo of the credential.
pub(super) fn refusal<B: From<String>>(error: &CredentialError) -> Response<B> {
    tracing::debug!(code = error.code(), "ctxpool: request credential refused");
    let body = serde_json::json!({ "error": error.code(), "message": error.to_string() });
    let mut response = Response::new(B::from(body.to_string()));
    *response.status_mut() = error.status();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if error.status() == StatusCode::UNAUTHORIZED {
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
