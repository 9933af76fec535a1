//! Fetching database-access tokens from Entra ID and OCI IAM token endpoints.
//!
//! [`HttpTokenSource`] speaks the three flows of the reference:
//!
//! | `spi_type`     | `auth_flow`          | request                                                  |
//! |----------------|----------------------|----------------------------------------------------------|
//! | `azure_tokens` | `client_credentials` | `POST {authority}/oauth2/v2.0/token`, secret in the form |
//! | `azure_tokens` | `on_behalf_of`       | same endpoint, JWT-bearer grant with the user's token    |
//! | `oci_tokens`   | `client_credentials` | `POST {authority}/oauth2/v1/token`, HTTP Basic auth      |
//!
//! OCI's HTTP Basic credentials are form-encoded before base64, as RFC 6749 §2.3.1 says, so
//! that a secret with `+`, `/`, `=` or `%` reaches the server as it is.
//!
//! Every request has a connect timeout and a per-attempt timeout and follows no redirects (a
//! redirect could carry the form, secret included, to another host). The certificate must
//! chain to the configured [`TrustRoots`].
//!
//! | answer                                   | error                             | retried |
//! |------------------------------------------|-----------------------------------|---------|
//! | HTTP 4xx (not 429), OAuth body or not    | [`ProviderError::Refused`]        | no      |
//! | HTTP 429, 5xx, timeout, connect, cut off | [`ProviderError::Unavailable`]    | yes     |
//! | certificate refused                      | [`ProviderError::Certificate`]    | no      |
//! | 2xx without a usable token               | [`ProviderError::Unavailable`]    | no      |
//!
//! Retries use exponential backoff with jitter and stop at `max_retries` or when the
//! deadline of the pool's apply timeout leaves no room for another attempt; each attempt's
//! timeout is cut to what remains, and the last error says how many attempts were made and
//! how the last one failed.
//!
//! The token's lifetime is `expires_in` when the response has it (RFC 6749 only recommends
//! it), else the `exp` of the token when it is a JWT, else
//! [`HttpOptions::default_lifetime`]; with none of them the token is used once and not
//! cached.
//!
//! Errors and logs carry at most the HTTP status and the OAuth `error` code (checked to be a
//! short identifier): never a response body, a token, an assertion or the client secret.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine;
use rand::Rng;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderValue, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use tokio::time::Instant;

pub use super::config::BasicAuthEncoding;
use super::config::{AuthFlow, ConfigError, EndUserSecParams, SpiType};
use super::http::{self, BodyError, Transport};
pub use super::http::{BuiltInRoots, TrustRoots, TrustRootsError};
use crate::ProviderError;

/// The longest OAuth `error` code reported; longer ones are replaced, not truncated.
const MAX_ERROR_CODE_LEN: usize = 64;
/// The code reported when the endpoint's `error` is not a short identifier: it could
/// otherwise echo request data (a token, an assertion) into our errors and logs.
const UNRECOGNIZED_ERROR_CODE: &str = "unrecognized_error";
/// The largest response body read; a token response is a few kilobytes.
const MAX_BODY_LEN: usize = 256 * 1024;
/// The OAuth grant type of the on-behalf-of flow.
const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// An attempt is not started with less time than this before the deadline: it could not
/// complete, and its timeout would only hide the previous attempt's failure.
const MIN_ATTEMPT: Duration = Duration::from_millis(100);
/// Kept free before the pool's deadline, so that the provider's error (what was tried)
/// reaches the caller before the pool's bare timeout does.
const DEADLINE_RESERVE: Duration = Duration::from_millis(50);

/// A database-access token and its lifetime as announced by the identity provider.
#[derive(Clone)]
pub struct AccessToken {
    /// The token.
    pub token: SecretString,
    /// The lifetime, counted from when the response was received: `expires_in`, else the
    /// JWT's `exp`, else the configured default; zero when none is known (not cached).
    pub expires_in: Duration,
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("token", &"<redacted>")
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

/// Fetches database-access tokens from an identity provider.
#[async_trait]
pub trait TokenSource: Send + Sync + 'static {
    /// Fetches a token. `assertion`: the end user's token for on-behalf-of, `None` for
    /// client credentials. `deadline`: when the caller stops waiting (the pool's apply
    /// timeout, see [`ContextRequest::deadline`](crate::ContextRequest::deadline)); a
    /// source that retries fits its attempts before it.
    async fn fetch(
        &self,
        assertion: Option<&SecretString>,
        deadline: Option<Instant>,
    ) -> Result<AccessToken, ProviderError>;
}

/// HTTP settings of an [`HttpTokenSource`]. Values set here take precedence over the
/// `end_user_sec_params` block's extension keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpOptions {
    /// Bound on establishing a connection (TCP and TLS). Default 3 s.
    pub connect_timeout: Duration,
    /// Bound on one attempt, from sending the request to reading the whole body; cut to
    /// what remains before the deadline. Default 4 s, so that under the pool's default
    /// apply timeout (10 s) a slow identity provider gets a second attempt.
    pub total_timeout: Duration,
    /// Retries after the first attempt, for 429, 5xx, transport errors and timeouts.
    /// Default 3.
    pub max_retries: u32,
    /// The backoff before the first retry; doubled for each further one. Default 100 ms.
    pub base_backoff: Duration,
    /// The longest backoff, and the cap on a server's `Retry-After`. Default 2 s.
    pub max_backoff: Duration,
    /// The roots the endpoint's certificate must chain to. `None`: the block's
    /// `tls_root_store` / `tls_ca_file`, else the webpki roots.
    pub trust_roots: Option<TrustRoots>,
    /// The lifetime assumed for a token whose response has no `expires_in` and which is
    /// not a JWT with an `exp`. `None`: the block's `default_token_lifetime`, else such a
    /// token is used once and not cached.
    pub default_lifetime: Option<Duration>,
    /// How OCI's HTTP Basic credentials are written. `None`: the block's
    /// `basic_auth_encoding`, else form-encoded as RFC 6749 §2.3.1 says.
    pub basic_auth_encoding: Option<BasicAuthEncoding>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            total_timeout: Duration::from_secs(4),
            max_retries: 3,
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            trust_roots: None,
            default_lifetime: None,
            basic_auth_encoding: None,
        }
    }
}

/// Which request to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Grant {
    EntraClientCredentials,
    EntraOnBehalfOf,
    OciClientCredentials,
}

/// A [`TokenSource`] that calls an Entra ID or OCI IAM token endpoint over HTTPS.
///
/// `Debug` shows the endpoint, client id and flow, never the secret.
pub struct HttpTokenSource {
    client: reqwest::Client,
    endpoint: reqwest::Url,
    grant: Grant,
    client_id: String,
    client_secret: SecretString,
    scope: String,
    options: HttpOptions,
    default_lifetime: Option<Duration>,
    basic_auth_encoding: BasicAuthEncoding,
}

impl fmt::Debug for HttpTokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpTokenSource")
            .field("endpoint", &self.endpoint.as_str())
            .field("grant", &self.grant)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("scope", &self.scope)
            .field("options", &self.options)
            .field("default_lifetime", &self.default_lifetime)
            .field("basic_auth_encoding", &self.basic_auth_encoding)
            .finish()
    }
}

/// The outcome of one failed attempt.
enum Failure {
    /// Worth another attempt, after `retry_after` if the server said so.
    Retryable {
        error: ProviderError,
        retry_after: Option<Duration>,
    },
    /// Final.
    Fatal(ProviderError),
}

impl Failure {
    fn transport(what: Transport, budget: Duration) -> Self {
        let message = match what {
            Transport::TimedOut => format!(
                "the token request timed out after {:.1} s",
                budget.as_secs_f64()
            ),
            Transport::Connect => "could not connect to the token endpoint".to_owned(),
            Transport::CutShort => "the token response was cut short".to_owned(),
            Transport::Certificate(check) => {
                return Self::Fatal(ProviderError::Certificate(check.to_owned()));
            }
            Transport::Builder => {
                return Self::Fatal(ProviderError::Unavailable(
                    "the token request could not be built".to_owned(),
                ));
            }
            Transport::Other => "the token request failed in transport".to_owned(),
        };
        Self::Retryable {
            error: ProviderError::Unavailable(message),
            retry_after: None,
        }
    }
}

impl HttpTokenSource {
    /// A token source for `params`' provider and flow.
    pub fn new(params: &EndUserSecParams, options: HttpOptions) -> Result<Self, ConfigError> {
        let (grant, path) = match (params.spi_type(), params.auth_flow()) {
            (SpiType::AzureTokens, AuthFlow::ClientCredentials) => {
                (Grant::EntraClientCredentials, "oauth2/v2.0/token")
            }
            (SpiType::AzureTokens, AuthFlow::OnBehalfOf) => {
                (Grant::EntraOnBehalfOf, "oauth2/v2.0/token")
            }
            (SpiType::OciTokens, AuthFlow::ClientCredentials) => {
                (Grant::OciClientCredentials, "oauth2/v1/token")
            }
            (spi_type @ SpiType::OciTokens, auth_flow @ AuthFlow::OnBehalfOf) => {
                return Err(ConfigError::UnsupportedFlow {
                    spi_type,
                    auth_flow,
                });
            }
        };
        let endpoint = format!("{}/{path}", params.authority().trim_end_matches('/'));
        let endpoint = reqwest::Url::parse(&endpoint).map_err(|_| ConfigError::Authority {
            reason: "does not form a valid token endpoint URL",
        })?;
        let roots = match &options.trust_roots {
            Some(roots) => roots.clone(),
            None => params.trust_roots()?,
        };
        let client = http::client(&roots, options.connect_timeout)
            .map_err(|reason| ConfigError::HttpClient { reason })?;
        let default_lifetime = options.default_lifetime.or(params.default_token_lifetime());
        let basic_auth_encoding = options
            .basic_auth_encoding
            .unwrap_or(params.basic_auth_encoding());
        Ok(Self {
            client,
            endpoint,
            grant,
            client_id: params.client_id().to_owned(),
            client_secret: params.client_credential().clone(),
            scope: params.scopes().join(" "),
            options,
            default_lifetime,
            basic_auth_encoding,
        })
    }

    /// The token endpoint this source calls.
    pub fn endpoint(&self) -> &str {
        self.endpoint.as_str()
    }

    /// One request, bounded by `budget`, and its classification.
    async fn attempt(
        &self,
        assertion: Option<&SecretString>,
        budget: Duration,
    ) -> Result<AccessToken, Failure> {
        let secret = self.client_secret.expose_secret();
        let mut form: Vec<(&str, &str)> = Vec::with_capacity(6);
        let mut request = self.client.post(self.endpoint.clone());
        match self.grant {
            Grant::EntraClientCredentials => {
                form.push(("grant_type", "client_credentials"));
                form.push(("client_id", &self.client_id));
                form.push(("client_secret", secret));
                form.push(("scope", &self.scope));
            }
            Grant::EntraOnBehalfOf => {
                let assertion = assertion
                    .map(ExposeSecret::expose_secret)
                    .filter(|a| !a.trim().is_empty())
                    .ok_or_else(|| {
                        Failure::Fatal(ProviderError::InvalidToken(
                            "the on_behalf_of flow needs the end user's token".to_owned(),
                        ))
                    })?;
                form.push(("grant_type", JWT_BEARER_GRANT));
                form.push(("client_id", &self.client_id));
                form.push(("client_secret", secret));
                form.push(("assertion", assertion));
                form.push(("scope", &self.scope));
                form.push(("requested_token_use", "on_behalf_of"));
            }
            Grant::OciClientCredentials => {
                request = request.header(
                    AUTHORIZATION,
                    basic_credentials(&self.client_id, secret, self.basic_auth_encoding),
                );
                form.push(("grant_type", "client_credentials"));
                form.push(("scope", &self.scope));
            }
        }
        let response = request
            .header(ACCEPT, "application/json")
            .timeout(budget)
            .form(&form)
            .send()
            .await
            .map_err(|e| Failure::transport(http::classify(&e), budget))?;

        let status = response.status();
        let retry_after = retry_after(&response);
        let body = match http::read_bounded(response, MAX_BODY_LEN).await {
            Ok(body) => body,
            Err(BodyError::TooLarge) => {
                return Err(Failure::Fatal(ProviderError::Unavailable(
                    "the token response is too large".to_owned(),
                )));
            }
            Err(BodyError::Transport(what)) => return Err(Failure::transport(what, budget)),
        };

        if status.is_success() {
            return parse_token(&body, self.default_lifetime).map_err(Failure::Fatal);
        }
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Err(Failure::Retryable {
                error: ProviderError::Unavailable(format!(
                    "the token endpoint answered HTTP {}",
                    status.as_u16()
                )),
                retry_after,
            });
        }
        if status.is_client_error() {
            // A refusal whether or not the body is an OAuth error: some identity providers
            // answer a wrong secret with a bare 403, and no retry changes a refusal.
            return Err(Failure::Fatal(ProviderError::Refused {
                status: status.as_u16(),
                code: oauth_error_code(&body),
            }));
        }
        // Redirects are not followed (see `new`), and 1xx never reaches us.
        Err(Failure::Fatal(ProviderError::Unavailable(format!(
            "the token endpoint answered HTTP {}",
            status.as_u16()
        ))))
    }

    /// The backoff before retry number `retry` (0-based): exponential, capped, with
    /// "equal jitter" (half fixed, half random) so that clients refused together do not
    /// retry together, yet never retry immediately.
    fn backoff(&self, retry: u32) -> Duration {
        let exponential = self
            .options
            .base_backoff
            .saturating_mul(2u32.saturating_pow(retry.min(31)));
        let capped = exponential.min(self.options.max_backoff);
        let half = capped / 2;
        let jitter_nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(rand::rng().random_range(0..=jitter_nanos))
    }
}

#[async_trait]
impl TokenSource for HttpTokenSource {
    async fn fetch(
        &self,
        assertion: Option<&SecretString>,
        deadline: Option<Instant>,
    ) -> Result<AccessToken, ProviderError> {
        let started = Instant::now();
        let end = deadline.map(|d| {
            let reserve = DEADLINE_RESERVE.min(d.saturating_duration_since(started) / 10);
            d.checked_sub(reserve).unwrap_or(d)
        });
        let mut attempts: u32 = 0;
        loop {
            let remaining = end.map(|end| end.saturating_duration_since(Instant::now()));
            let budget = remaining.map_or(self.options.total_timeout, |r| {
                r.min(self.options.total_timeout)
            });
            attempts += 1;
            let failure = match self.attempt(assertion, budget).await {
                Ok(token) => return Ok(token),
                Err(failure) => failure,
            };
            let (error, retry_after) = match failure {
                Failure::Fatal(error) => {
                    tracing::warn!(endpoint = %self.endpoint, %error, attempts, "token request failed");
                    return Err(error);
                }
                Failure::Retryable { error, retry_after } => (error, retry_after),
            };
            let give_up = |why: &str| {
                let error = exhausted(attempts, started.elapsed(), &error, why);
                tracing::warn!(endpoint = %self.endpoint, %error, attempts, "token request failed");
                error
            };
            if attempts > self.options.max_retries {
                return Err(give_up(""));
            }
            // A server's Retry-After is honoured up to `max_backoff`: a longer wait would
            // hold the acquiring task beyond what the pool's caller configured, and
            // failing lets the caller decide.
            let delay = retry_after
                .map(|d| d.min(self.options.max_backoff))
                .unwrap_or_else(|| self.backoff(attempts - 1));
            if let Some(end) = end
                && Instant::now() + delay + MIN_ATTEMPT > end
            {
                return Err(give_up(
                    "; no time left for another attempt before the pool's apply timeout",
                ));
            }
            tracing::debug!(
                endpoint = %self.endpoint,
                %error,
                retry = attempts,
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "retrying token request"
            );
            tokio::time::sleep(delay).await;
        }
    }
}

/// The error after the last attempt: the count, the time taken, and how the last one
/// failed.
fn exhausted(attempts: u32, elapsed: Duration, last: &ProviderError, why: &str) -> ProviderError {
    let last = match last {
        ProviderError::Unavailable(message) => message.clone(),
        other => other.to_string(),
    };
    if attempts == 1 {
        return ProviderError::Unavailable(format!("{last}{why}"));
    }
    ProviderError::Unavailable(format!(
        "{attempts} attempts in {:.1} s, last: {last}{why}",
        elapsed.as_secs_f64()
    ))
}

/// The HTTP Basic credentials of RFC 6749 §2.3.1: client id and secret each
/// form-encoded (`application/x-www-form-urlencoded`), joined by `:`, then base64. Without
/// the form-encoding a `+` in the secret arrives as a space and a `%` as a broken escape
/// at a server that decodes as the RFC says; `Raw` is for servers that do not.
fn basic_credentials(client_id: &str, secret: &str, encoding: BasicAuthEncoding) -> HeaderValue {
    let encode = |s: &str| match encoding {
        BasicAuthEncoding::Form => form_urlencoded::byte_serialize(s.as_bytes()).collect(),
        BasicAuthEncoding::Raw => s.to_owned(),
    };
    let pair = format!("{}:{}", encode(client_id), encode(secret));
    let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
    // Base64 text is always a valid header value.
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Basic"));
    // Kept out of HTTP/2 header compression tables and marked for redaction.
    value.set_sensitive(true);
    value
}

/// `Retry-After` in seconds; the HTTP-date form is ignored (computed backoff applies).
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let value = response.headers().get(RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Extracts `access_token` and the lifetime from a success response. The parser's own
/// errors are not kept: they may quote the body.
fn parse_token(
    body: &[u8],
    default_lifetime: Option<Duration>,
) -> Result<AccessToken, ProviderError> {
    let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(body) else {
        return Err(ProviderError::Unavailable(
            "the token response is not a JSON object".to_owned(),
        ));
    };
    let token = match map.remove("access_token") {
        Some(Value::String(token)) if !token.trim().is_empty() => SecretString::from(token),
        _ => {
            return Err(ProviderError::Unavailable(
                "token response without access_token".to_owned(),
            ));
        }
    };
    let expires_in = match map.get("expires_in") {
        // Optional (RFC 6749 §5.1 only recommends it); but when sent it must be usable.
        None | Some(Value::Null) => jwt_lifetime(token.expose_secret())
            .or(default_lifetime)
            .unwrap_or(Duration::ZERO),
        Some(value) => {
            let seconds = match value {
                Value::Number(n) => n.as_u64(),
                // Some providers send the number as a string.
                Value::String(s) => s.trim().parse::<u64>().ok(),
                _ => None,
            };
            match seconds {
                Some(seconds) if seconds > 0 => Duration::from_secs(seconds),
                _ => {
                    return Err(ProviderError::Unavailable(
                        "token response with an invalid expires_in".to_owned(),
                    ));
                }
            }
        }
    };
    Ok(AccessToken { token, expires_in })
}

/// The time left until the `exp` of `token`, if it is a JWT with one. Only the lifetime is
/// taken from the unverified claims: the database checks the token itself.
fn jwt_lifetime(token: &str) -> Option<Duration> {
    let claims = crate::jwt::unverified_claims(token)?;
    let exp = claims.get("exp")?.as_u64()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    exp.checked_sub(now).map(Duration::from_secs)
}

/// The OAuth `error` code of an error response, if it is a short identifier. Anything
/// else is replaced by a fixed code: the field is server-controlled and could echo the
/// request.
fn oauth_error_code(body: &[u8]) -> Option<String> {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    let Some(Value::String(code)) = map.get("error") else {
        return None;
    };
    let well_formed = !code.is_empty()
        && code.len() <= MAX_ERROR_CODE_LEN
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    Some(if well_formed {
        code.clone()
    } else {
        UNRECOGNIZED_ERROR_CODE.to_owned()
    })
}
