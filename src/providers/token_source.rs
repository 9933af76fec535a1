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
//! Every request has a connect timeout and a total timeout and follows no redirects (a
//! redirect could carry the form, secret included, to another host). Failures that may pass
//! (HTTP 429, 5xx, transport errors, timeouts) are retried a bounded number of times with
//! exponential backoff and jitter; any other 4xx is final.
//!
//! Errors and logs carry at most the HTTP status and the OAuth `error` code (checked to be a
//! short identifier): never a response body, a token, an assertion or the client secret.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use super::config::{AuthFlow, ConfigError, EndUserSecParams, SpiType};
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

/// A database-access token and its lifetime as announced by the identity provider.
#[derive(Clone)]
pub struct AccessToken {
    /// The token.
    pub token: SecretString,
    /// The lifetime from the response's `expires_in`, counted from when it was received.
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
    /// client credentials.
    async fn fetch(&self, assertion: Option<&SecretString>) -> Result<AccessToken, ProviderError>;
}

/// HTTP settings of an [`HttpTokenSource`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpOptions {
    /// Bound on establishing a connection (TCP and TLS). Default 5 s.
    pub connect_timeout: Duration,
    /// Bound on one attempt, from sending the request to reading the whole body.
    /// Default 10 s.
    pub total_timeout: Duration,
    /// Retries after the first attempt, for 429, 5xx, transport errors and timeouts.
    /// Default 3.
    pub max_retries: u32,
    /// The backoff before the first retry; doubled for each further one. Default 100 ms.
    pub base_backoff: Duration,
    /// The longest backoff, and the cap on a server's `Retry-After`. Default 2 s.
    pub max_backoff: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            total_timeout: Duration::from_secs(10),
            max_retries: 3,
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
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
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(options.connect_timeout)
            // The form carries the secret: never replay it to wherever a redirect points.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ConfigError::HttpClient {
                reason: e.to_string(),
            })?;
        Ok(Self {
            client,
            endpoint,
            grant,
            client_id: params.client_id().to_owned(),
            client_secret: params.client_credential().clone(),
            scope: params.scopes().join(" "),
            options,
        })
    }

    /// The token endpoint this source calls.
    pub fn endpoint(&self) -> &str {
        self.endpoint.as_str()
    }

    /// One request and its classification.
    async fn attempt(&self, assertion: Option<&SecretString>) -> Result<AccessToken, Failure> {
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
                request = request.basic_auth(&self.client_id, Some(secret));
                form.push(("grant_type", "client_credentials"));
                form.push(("scope", &self.scope));
            }
        }
        let response = request
            .header(ACCEPT, "application/json")
            .timeout(self.options.total_timeout)
            .form(&form)
            .send()
            .await
            .map_err(transport_failure)?;

        let status = response.status();
        let retry_after = retry_after(&response);
        let body = read_body(response).await?;

        if status.is_success() {
            return parse_token(&body).map_err(Failure::Fatal);
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
            return Err(Failure::Fatal(match oauth_error_code(&body) {
                Some(code) => ProviderError::Refused {
                    status: status.as_u16(),
                    code,
                },
                None => ProviderError::Unavailable(format!(
                    "the token endpoint answered HTTP {} without an OAuth error",
                    status.as_u16()
                )),
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
    async fn fetch(&self, assertion: Option<&SecretString>) -> Result<AccessToken, ProviderError> {
        let mut retry = 0;
        loop {
            match self.attempt(assertion).await {
                Ok(token) => return Ok(token),
                Err(Failure::Fatal(error)) => {
                    tracing::warn!(endpoint = %self.endpoint, %error, "token request failed");
                    return Err(error);
                }
                Err(Failure::Retryable { error, retry_after }) => {
                    if retry >= self.options.max_retries {
                        tracing::warn!(
                            endpoint = %self.endpoint,
                            %error,
                            attempts = retry + 1,
                            "token request failed, no retries left"
                        );
                        return Err(error);
                    }
                    // A server's Retry-After is honoured up to `max_backoff`: a longer
                    // wait would hold the acquiring task beyond what the pool's caller
                    // configured, and failing lets the caller decide.
                    let delay = retry_after
                        .map(|d| d.min(self.options.max_backoff))
                        .unwrap_or_else(|| self.backoff(retry));
                    tracing::debug!(
                        endpoint = %self.endpoint,
                        %error,
                        retry = retry + 1,
                        delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        "retrying token request"
                    );
                    tokio::time::sleep(delay).await;
                    retry += 1;
                }
            }
        }
    }
}

/// Classifies a `reqwest` error without its Display, which may name the URL and, for
/// body errors, carry fragments of what was read.
fn transport_failure(error: reqwest::Error) -> Failure {
    let what = if error.is_timeout() {
        "the token request timed out"
    } else if error.is_connect() {
        "could not connect to the token endpoint"
    } else if error.is_body() || error.is_decode() {
        "the token response was cut short"
    } else if error.is_builder() {
        // Building the request cannot succeed on a retry.
        return Failure::Fatal(ProviderError::Unavailable(
            "the token request could not be built".to_owned(),
        ));
    } else {
        "the token request failed in transport"
    };
    Failure::Retryable {
        error: ProviderError::Unavailable(what.to_owned()),
        retry_after: None,
    }
}

/// `Retry-After` in seconds; the HTTP-date form is ignored (computed backoff applies).
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let value = response.headers().get(RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Reads the body up to [`MAX_BODY_LEN`].
async fn read_body(mut response: reqwest::Response) -> Result<Vec<u8>, Failure> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport_failure)? {
        if body.len() + chunk.len() > MAX_BODY_LEN {
            return Err(Failure::Fatal(ProviderError::Unavailable(
                "the token response is too large".to_owned(),
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Extracts `access_token` and `expires_in` from a success response. The parser's own
/// errors are not kept: they may quote the body.
fn parse_token(body: &[u8]) -> Result<AccessToken, ProviderError> {
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
    let seconds = match map.get("expires_in") {
        Some(Value::Number(n)) => n.as_u64(),
        // Some providers send the number as a string.
        Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    match seconds {
        Some(seconds) if seconds > 0 => Ok(AccessToken {
            token,
            expires_in: Duration::from_secs(seconds),
        }),
        _ => Err(ProviderError::Unavailable(
            "token response without a valid expires_in".to_owned(),
        )),
    }
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
