//! Validating end users' tokens before their context reaches the database.
//!
//! PostgreSQL cannot check a JWT itself: whatever the pool puts into the session is
//! trusted. So the pool checks the token first, with [`TokenValidator`]:
//!
//! - the signature, with a key from the issuer's JWKS, chosen by the header's `kid`;
//! - the algorithm: in the configured allow-list *and* matching the key's type. `none` and
//!   HMAC (`HS*`) are never accepted: a JWKS holds public keys, and an HMAC token "signed"
//!   with a public key is the classic algorithm-confusion forgery;
//! - `exp` and `nbf`, with a leeway for clock skew; `iss`; `aud`; a non-empty `sub`.
//!
//! The JWKS is fetched on first use and cached. A token with a `kid` not in the cache
//! triggers a refetch (the issuer may have rotated its keys), at most once per
//! [`ValidationConfig::jwks_min_refetch_interval`], so that tokens with made-up `kid`s
//! cannot turn the pool into an amplifier against the identity provider. A key set older
//! than [`ValidationConfig::jwks_max_age`] is refetched before it is used again, so that a
//! key the issuer removed stops being trusted; if that refetch fails, validation fails
//! (closed) until the endpoint answers.
//!
//! Errors never carry the token, a claim value or a response body: at most an algorithm
//! name (checked to be a short identifier) or an HTTP status.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{DecodingKey, Validation};
use parking_lot::{Mutex, RwLock};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::flight::{Flights, Turn};
use super::http::{self, BodyError, Transport, TrustRoots};
use crate::ProviderError;
use crate::provider::Verification;
use crate::token_check::{TokenCheck, TokenRefusal};

pub use jsonwebtoken::Algorithm;

/// The largest JWKS body read; real ones are a few kilobytes.
const MAX_JWKS_LEN: usize = 256 * 1024;
/// The longest header `alg` echoed into an error; longer or odd ones are replaced, since
/// the header is attacker-controlled text.
const MAX_ALG_LEN: usize = 16;
/// What an unprintable `alg` is reported as.
const UNRECOGNIZED_ALG: &str = "unrecognized";
/// Bound on connecting to the JWKS endpoint.
const JWKS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one JWKS request, body included.
const JWKS_TOTAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a token was refused, or a validator could not be built.
///
/// Never carries the token, a claim value or a response body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// Not a well-formed JWS compact token (three base64url parts, JSON header and claims,
    /// an `alg`, an `exp`), or longer than 64 KiB.
    #[error("the token is malformed")]
    Malformed,
    /// The header's algorithm is not allowed, or does not fit the key it names.
    #[error("the token's algorithm `{0}` is not allowed")]
    AlgorithmNotAllowed(String),
    /// The header has no `kid`, or one that is not in the JWKS, even after a refetch.
    #[error("the token's signing key is not in the issuer's key set")]
    UnknownKey,
    /// The signature does not verify.
    #[error("the token's signature does not verify")]
    BadSignature,
    /// `exp` is past, beyond the leeway.
    #[error("the token has expired")]
    Expired,
    /// `nbf` is ahead, beyond the leeway.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `iss` is missing or not the configured issuer.
    #[error("the token's issuer is not the expected one")]
    WrongIssuer,
    /// `aud` is missing or names none of the configured audiences.
    #[error("the token's audience is not an expected one")]
    WrongAudience,
    /// `sub` is missing, empty or not a string.
    #[error("the token has no subject")]
    MissingSubject,
    /// The JWKS could not be fetched or read.
    #[error("the issuer's key set is unavailable: {0}")]
    Jwks(String),
    /// The configuration is unusable.
    #[error("invalid token validation configuration: {0}")]
    Config(String),
}

impl From<ValidationError> for ProviderError {
    fn from(e: ValidationError) -> Self {
        ProviderError::InvalidToken(e.to_string())
    }
}

/// How tokens are validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationConfig {
    /// The expected `iss`, exactly.
    pub issuer: String,
    /// The accepted `aud` values; a token must name at least one. Must not be empty.
    pub audience: Vec<String>,
    /// The accepted algorithms. Default `[RS256, ES256]`. HMAC (`HS*`) is refused by
    /// [`TokenValidator::new`]; `none` cannot be expressed and is always refused.
    pub algorithms: Vec<Algorithm>,
    /// Tolerated clock skew for `exp` and `nbf` (whole seconds count). Default 60 s.
    pub leeway: Duration,
    /// Where the issuer's JWKS is: `https`, or `http` on a loopback address (tests).
    pub jwks_url: String,
    /// The claim holding the user's roles (an array of strings, or one string), e.g.
    /// `roles`. `None`: no data roles.
    pub role_claim: Option<String>,
    /// The roles a token may grant. Roles in the claim but not in this set are dropped
    /// silently, not an error: the token stays valid with fewer data roles, because
    /// identity providers put many roles into tokens that mean nothing to the database.
    pub allowed_roles: BTreeSet<String>,
    /// The shortest time between two JWKS fetches triggered by an unknown `kid`.
    /// Default 60 s.
    pub jwks_min_refetch_interval: Duration,
    /// How long a fetched key set is trusted before it is fetched again, even when every
    /// `kid` is known: a key the issuer removed stops verifying tokens within this time.
    /// Default 1 hour; at least `jwks_min_refetch_interval`.
    pub jwks_max_age: Duration,
    /// The roots the JWKS endpoint's certificate must chain to. Default: the webpki roots.
    /// A provider built from a block with `tls_root_store` / `tls_ca_file` uses those.
    pub trust_roots: TrustRoots,
}

impl ValidationConfig {
    /// A configuration with the defaults: `[RS256, ES256]`, 60 s leeway, no role claim,
    /// 60 s between refetches.
    pub fn new(
        issuer: impl Into<String>,
        audience: Vec<String>,
        jwks_url: impl Into<String>,
    ) -> Self {
        Self {
            issuer: issuer.into(),
            audience,
            algorithms: vec![Algorithm::RS256, Algorithm::ES256],
            leeway: Duration::from_secs(60),
            jwks_url: jwks_url.into(),
            role_claim: None,
            allowed_roles: BTreeSet::new(),
            jwks_min_refetch_interval: Duration::from_secs(60),
            jwks_max_age: Duration::from_secs(3600),
            trust_roots: TrustRoots::default(),
        }
    }

    /// Refuses an empty issuer or audience, an empty allow-list, HMAC algorithms, a
    /// maximum age below the refetch interval, and a JWKS URL that is neither `https` nor
    /// `http` on loopback (the same rule as the block's `authority`).
    pub(crate) fn check(&self) -> Result<reqwest::Url, ValidationError> {
        let config = self;
        if config.issuer.is_empty() {
            return Err(ValidationError::Config("the issuer is empty".into()));
        }
        if config.audience.is_empty() || config.audience.iter().any(String::is_empty) {
            return Err(ValidationError::Config(
                "the audience list is empty or has an empty entry".into(),
            ));
        }
        if config.jwks_max_age < config.jwks_min_refetch_interval {
            return Err(ValidationError::Config(
                "the JWKS maximum age is shorter than the minimum refetch interval".into(),
            ));
        }
        if config.algorithms.is_empty() {
            return Err(ValidationError::Config(
                "the algorithm allow-list is empty".into(),
            ));
        }
        if let Some(hmac) = config.algorithms.iter().find(|a| is_hmac(**a)) {
            // A JWKS holds public keys: allowing HMAC would let anyone holding the public
            // key mint tokens.
            return Err(ValidationError::Config(format!(
                "HMAC algorithm {hmac:?} is not allowed"
            )));
        }
        let jwks_url = reqwest::Url::parse(&config.jwks_url)
            .map_err(|_| ValidationError::Config("the JWKS URL is not a valid URL".into()))?;
        if !http::url_allowed(&jwks_url) {
            return Err(ValidationError::Config(
                "the JWKS URL must be https (or http on loopback)".into(),
            ));
        }
        Ok(jwks_url)
    }
}

/// What a valid token says. Holds no token, so `Debug` is safe.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedToken {
    /// The `sub` claim.
    pub subject: String,
    /// The roles of the role claim that are in [`ValidationConfig::allowed_roles`], in the
    /// claim's order, without duplicates.
    pub data_roles: Vec<String>,
    /// All claims.
    pub claims: Map<String, Value>,
}

/// A JWKS key, ready for verification.
struct CachedKey {
    key: DecodingKey,
    /// The algorithms this key's type can verify.
    algorithms: &'static [Algorithm],
    /// The JWK's own `alg`, if it pins one.
    pinned: Option<Algorithm>,
}

/// The cached JWKS and when it was fetched (`None`: never).
#[derive(Default)]
struct KeySet {
    keys: HashMap<String, CachedKey>,
    fetched_at: Option<Instant>,
}

impl KeySet {
    /// Whether the set may verify `kid` without a refetch.
    fn serves(&self, kid: &str, max_age: Duration) -> bool {
        self.fetched_at.is_some_and(|t| t.elapsed() < max_age) && self.keys.contains_key(kid)
    }
}

/// The fetch bookkeeping. Held briefly, never across the fetch itself.
#[derive(Default)]
struct FetchState {
    last_attempt: Option<Instant>,
    /// The last attempt's failure, reported to misses within the interval after it.
    last_error: Option<String>,
    /// The JWKS fetch in progress, if any: concurrent misses fetch once. One key set, so
    /// one flight, under the key `()`.
    flight: Flights<(), JwksOutcome>,
}

/// What a caller that misses the cached keys does next.
enum FetchTurn {
    /// The keys arrived meanwhile.
    Ready(Arc<KeySet>),
    /// Waits for the fetch in progress.
    Wait(super::flight::Waiter<JwksOutcome>),
    /// Fetches, then lands the outcome.
    Lead(super::flight::Leader<JwksOutcome>),
}

/// What the callers of one JWKS fetch receive: the fresh set, or a short reason.
type JwksOutcome = Result<Arc<KeySet>, String>;

/// Validates end-user tokens against an issuer's JWKS. `Send + Sync`, and cheap to clone:
/// clones share the key set and its fetches, so that one validator serves the tower layer
/// and the provider, and a token the layer verified is not verified again by the provider
/// (see [`ValidatedToken`] and [`ContextRequest::verification`](crate::ContextRequest::verification)).
#[derive(Clone)]
pub struct TokenValidator {
    shared: Arc<Shared>,
}

/// What the clones of a [`TokenValidator`] share.
struct Shared {
    config: ValidationConfig,
    jwks_url: reqwest::Url,
    client: reqwest::Client,
    keys: RwLock<Arc<KeySet>>,
    fetch: Mutex<FetchState>,
    /// Tokens verified, over all clones.
    verified: AtomicU64,
}

/// The evidence the tower layer's check leaves for the provider: which validator verified
/// which token (as a SHA-256 hash), and what it said.
struct Evidence {
    validator: Arc<Shared>,
    token_hash: [u8; 32],
    validated: ValidatedToken,
}

impl fmt::Debug for TokenValidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenValidator")
            .field("config", &self.shared.config)
            .field("cached_keys", &self.shared.cached_keys().keys.len())
            .finish_non_exhaustive()
    }
}

impl TokenValidator {
    /// A validator for `config`. Refuses an empty issuer or audience, an empty allow-list,
    /// HMAC algorithms and a JWKS URL that is neither `https` nor `http` on loopback.
    pub fn new(config: ValidationConfig) -> Result<Self, ValidationError> {
        Shared::new(config).map(|shared| Self {
            shared: Arc::new(shared),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ValidationConfig {
        &self.shared.config
    }

    /// Validates `token`: signature, algorithm, `exp`/`nbf` with leeway, `iss`, `aud`,
    /// `sub`. May fetch the JWKS (first use, or an unknown `kid`, rate-limited).
    pub async fn validate(&self, token: &SecretString) -> Result<ValidatedToken, ValidationError> {
        let validated = self.shared.validate(token).await?;
        self.shared.verified.fetch_add(1, Ordering::Relaxed);
        Ok(validated)
    }

    /// How many tokens this validator and its clones have verified successfully: with the
    /// layer and the provider sharing one validator, one per request.
    pub fn verified_count(&self) -> u64 {
        self.shared.verified.load(Ordering::Relaxed)
    }

    /// Validates `token` and returns the evidence for the provider as well.
    pub async fn verify_for_request(
        &self,
        token: &SecretString,
    ) -> Result<(ValidatedToken, Verification), ValidationError> {
        let validated = self.validate(token).await?;
        let evidence = Evidence {
            validator: Arc::clone(&self.shared),
            token_hash: Sha256::digest(token.expose_secret().as_bytes()).into(),
            validated: validated.clone(),
        };
        Ok((validated, Verification::new(evidence)))
    }

    /// What `verification` says about `token`, if this validator (or a clone) verified
    /// exactly this token and it has not expired since (beyond the leeway).
    pub fn already_verified(
        &self,
        verification: Option<&Verification>,
        token: &SecretString,
    ) -> Option<ValidatedToken> {
        let evidence = verification?.downcast_ref::<Evidence>()?;
        if !Arc::ptr_eq(&evidence.validator, &self.shared) {
            return None;
        }
        let hash: [u8; 32] = Sha256::digest(token.expose_secret().as_bytes()).into();
        if hash != evidence.token_hash {
            return None;
        }
        let exp = evidence.validated.claims.get("exp")?.as_u64()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs();
        (now <= exp.saturating_add(self.shared.config.leeway.as_secs()))
            .then(|| evidence.validated.clone())
    }
}

/// The check of the tower layer (`IdentityLayer::token_check`, feature `tower`): a valid
/// token passes with its evidence, so that a provider sharing this validator does not
/// verify it again; a JWKS that cannot be fetched makes the check unavailable rather than
/// the token invalid.
#[async_trait]
impl TokenCheck for TokenValidator {
    async fn check(&self, token: &SecretString) -> Result<Option<Verification>, TokenRefusal> {
        match self.verify_for_request(token).await {
            Ok((_, evidence)) => Ok(Some(evidence)),
            Err(ValidationError::Jwks(_)) => Err(TokenRefusal::Unavailable),
            Err(_) => Err(TokenRefusal::Invalid),
        }
    }
}

impl Shared {
    fn new(config: ValidationConfig) -> Result<Self, ValidationError> {
        let jwks_url = config.check()?;
        let client = http::client(&config.trust_roots, JWKS_CONNECT_TIMEOUT)
            .map_err(|e| ValidationError::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            config,
            jwks_url,
            client,
            keys: RwLock::new(Arc::new(KeySet::default())),
            fetch: Mutex::new(FetchState::default()),
            verified: AtomicU64::new(0),
        })
    }

    async fn validate(&self, token: &SecretString) -> Result<ValidatedToken, ValidationError> {
        let token = token.expose_secret();
        let header = parse_structure(token)?;
        let alg = self.allowed_algorithm(&header)?;
        let kid = match header.get("kid") {
            Some(Value::String(kid)) => kid.as_str(),
            Some(_) => return Err(ValidationError::Malformed),
            None => return Err(ValidationError::UnknownKey),
        };
        let keys = self.keys_with(kid).await?;
        let cached = keys.keys.get(kid).ok_or(ValidationError::UnknownKey)?;
        // The key type decides which algorithms it verifies, not the token: an RSA key
        // never verifies an ECDSA token and vice versa, whatever the header claims.
        if !cached.algorithms.contains(&alg) || cached.pinned.is_some_and(|p| p != alg) {
            return Err(ValidationError::AlgorithmNotAllowed(format!("{alg:?}")));
        }
        let claims = self.verify(token, alg, &cached.key)?;
        let subject = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(ValidationError::MissingSubject),
        };
        let data_roles = self.data_roles(&claims);
        Ok(ValidatedToken {
            subject,
            data_roles,
            claims,
        })
    }

    /// The header's algorithm, if it is allowed.
    fn allowed_algorithm(&self, header: &Map<String, Value>) -> Result<Algorithm, ValidationError> {
        let Some(Value::String(name)) = header.get("alg") else {
            return Err(ValidationError::Malformed);
        };
        let refused = || ValidationError::AlgorithmNotAllowed(printable_alg(name));
        // `none` and unknown names fail to parse; HMAC is refused here even if the
        // allow-list were to change, as a second line against algorithm confusion.
        let alg = Algorithm::from_str(name).map_err(|_| refused())?;
        if is_hmac(alg) || !self.config.algorithms.contains(&alg) {
            return Err(refused());
        }
        Ok(alg)
    }

    /// Verifies the signature and the registered claims.
    fn verify(
        &self,
        token: &str,
        alg: Algorithm,
        key: &DecodingKey,
    ) -> Result<Map<String, Value>, ValidationError> {
        let mut validation = Validation::new(alg);
        validation.leeway = self.config.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.set_issuer(&[self.config.issuer.as_str()]);
        validation.set_audience(&self.config.audience);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation)
            .map(|data| data.claims)
            .map_err(|e| match e.into_kind() {
                ErrorKind::InvalidSignature => ValidationError::BadSignature,
                ErrorKind::ExpiredSignature => ValidationError::Expired,
                ErrorKind::ImmatureSignature => ValidationError::NotYetValid,
                ErrorKind::InvalidIssuer => ValidationError::WrongIssuer,
                ErrorKind::InvalidAudience => ValidationError::WrongAudience,
                ErrorKind::MissingRequiredClaim(c) if c == "iss" => ValidationError::WrongIssuer,
                ErrorKind::MissingRequiredClaim(c) if c == "aud" => ValidationError::WrongAudience,
                ErrorKind::InvalidAlgorithm => {
                    ValidationError::AlgorithmNotAllowed(format!("{alg:?}"))
                }
                // A key the crypto backend rejects cannot verify anything.
                ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidEddsaKey
                | ErrorKind::InvalidRsaKey(_)
                | ErrorKind::InvalidKeyFormat => ValidationError::BadSignature,
                _ => ValidationError::Malformed,
            })
    }

    /// The role claim's roles that are allowed, deduplicated, in the claim's order.
    fn data_roles(&self, claims: &Map<String, Value>) -> Vec<String> {
        let Some(claim) = &self.config.role_claim else {
            return Vec::new();
        };
        let candidates: Vec<&str> = match claims.get(claim) {
            Some(Value::String(role)) => vec![role.as_str()],
            Some(Value::Array(roles)) => roles.iter().filter_map(Value::as_str).collect(),
            // Missing or of another type: no roles, like roles outside the allow-list.
            _ => Vec::new(),
        };
        let mut roles: Vec<String> = Vec::new();
        for role in candidates {
            if self.config.allowed_roles.contains(role) && !roles.iter().any(|r| r == role) {
                roles.push(role.to_owned());
            }
        }
        roles
    }

    /// A snapshot of the cached keys.
    fn cached_keys(&self) -> Arc<KeySet> {
        Arc::clone(&self.keys.read())
    }

    /// The key set, refetched if it lacks `kid` or is older than the maximum age, and the
    /// rate limit allows.
    async fn keys_with(&self, kid: &str) -> Result<Arc<KeySet>, ValidationError> {
        let max_age = self.config.jwks_max_age;
        loop {
            let keys = self.cached_keys();
            if keys.serves(kid, max_age) {
                return Ok(keys);
            }
            let leader = match self.next_fetch_turn(kid)? {
                FetchTurn::Ready(keys) => return Ok(keys),
                FetchTurn::Wait(waiter) => match waiter.outcome().await {
                    Some(outcome) => return outcome.map_err(ValidationError::Jwks),
                    // The fetching caller went away (cancelled): look again.
                    None => continue,
                },
                FetchTurn::Lead(leader) => leader,
            };
            let outcome = self.fetch_jwks().await.map(|fresh| {
                Arc::new(KeySet {
                    keys: fresh,
                    fetched_at: Some(Instant::now()),
                })
            });
            let mut state = self.fetch.lock();
            match &outcome {
                Ok(fresh) => {
                    state.last_error = None;
                    *self.keys.write() = Arc::clone(fresh);
                    tracing::debug!(keys = fresh.keys.len(), "fetched the JWKS");
                }
                Err(reason) => {
                    tracing::warn!(%reason, "fetching the JWKS failed");
                    state.last_error = Some(reason.clone());
                }
            }
            // After the keys are stored, under the fetch lock: a caller arriving later
            // finds them, every earlier waiter gets this outcome.
            state.flight.land(&(), leader, outcome.clone());
            drop(state);
            return outcome.map_err(ValidationError::Jwks);
        }
    }

    /// Decides, under the fetch lock, whether this caller has its keys after all, waits
    /// for the fetch in progress, is refused by the rate limit, or fetches.
    fn next_fetch_turn(&self, kid: &str) -> Result<FetchTurn, ValidationError> {
        let mut state = self.fetch.lock();
        // Another task may have fetched since this one looked.
        let keys = self.cached_keys();
        if keys.serves(kid, self.config.jwks_max_age) {
            return Ok(FetchTurn::Ready(keys));
        }
        // Since max age >= the interval, a stale set with a recent attempt means that
        // attempt failed: its error is the answer, never the stale keys. A fetch still in
        // progress is joined instead.
        if !state.flight.is_running(&())
            && let Some(last) = state.last_attempt
            && last.elapsed() < self.config.jwks_min_refetch_interval
        {
            return match &state.last_error {
                Some(reason) => Err(ValidationError::Jwks(reason.clone())),
                None => Err(ValidationError::UnknownKey),
            };
        }
        match state.flight.join(&()) {
            Turn::Wait(waiter) => Ok(FetchTurn::Wait(waiter)),
            Turn::Lead(leader) => {
                // Counted before the request so that a failing endpoint is rate-limited too.
                state.last_attempt = Some(Instant::now());
                Ok(FetchTurn::Lead(leader))
            }
        }
    }

    /// Fetches and parses the JWKS. The error is a short reason without the body.
    async fn fetch_jwks(&self) -> Result<HashMap<String, CachedKey>, String> {
        let response = self
            .client
            .get(self.jwks_url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .timeout(JWKS_TOTAL_TIMEOUT)
            .send()
            .await
            .map_err(|e| transport_reason(http::classify(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("HTTP {}", status.as_u16()));
        }
        let body = match http::read_bounded(response, MAX_JWKS_LEN).await {
            Ok(body) => body,
            Err(BodyError::TooLarge) => return Err("the response is too large".into()),
            Err(BodyError::Transport(what)) => return Err(transport_reason(what)),
        };
        parse_jwks(&body).ok_or_else(|| "the response is not a JWKS".to_owned())
    }
}

/// A transport failure, without the URL's query or anything from the response.
fn transport_reason(what: Transport) -> String {
    match what {
        Transport::TimedOut => "timed out".into(),
        Transport::Connect => "could not connect".into(),
        Transport::Certificate(check) => format!("TLS certificate refused: {check}"),
        Transport::CutShort => "the response was cut short".into(),
        Transport::Builder | Transport::Other => "transport error".into(),
    }
}

/// The usable signing keys of a JWKS body, by `kid`. `None` if it is not a JWKS at all;
/// single keys that are unusable (no `kid`, encryption keys, symmetric or unsupported key
/// types) are skipped so that one odd key does not take the others down.
fn parse_jwks(body: &[u8]) -> Option<HashMap<String, CachedKey>> {
    let set: Value = serde_json::from_slice(body).ok()?;
    let entries = set.get("keys")?.as_array()?;
    let mut keys = HashMap::new();
    for entry in entries {
        let Some(kid) = entry.get("kid").and_then(Value::as_str) else {
            continue;
        };
        if entry
            .get("use")
            .and_then(Value::as_str)
            .is_some_and(|u| u != "sig")
        {
            continue;
        }
        let kty = entry.get("kty").and_then(Value::as_str).unwrap_or_default();
        let crv = entry.get("crv").and_then(Value::as_str).unwrap_or_default();
        let algorithms: &'static [Algorithm] = match (kty, crv) {
            ("RSA", _) => &[
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
            ("EC", "P-256") => &[Algorithm::ES256],
            ("EC", "P-384") => &[Algorithm::ES384],
            ("OKP", "Ed25519") => &[Algorithm::EdDSA],
            // `oct` (symmetric) keys never belong in a public key set; others are
            // unsupported.
            _ => continue,
        };
        let pinned = match entry.get("alg").and_then(Value::as_str) {
            None => None,
            Some(name) => match Algorithm::from_str(name) {
                Ok(alg) if algorithms.contains(&alg) => Some(alg),
                // A key pinned to an algorithm its type cannot do is inconsistent: skip it.
                _ => continue,
            },
        };
        let Ok(jwk) = serde_json::from_value::<Jwk>(entry.clone()) else {
            continue;
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        keys.insert(
            kid.to_owned(),
            CachedKey {
                key,
                algorithms,
                pinned,
            },
        );
    }
    Some(keys)
}

/// Checks the compact structure (three base64url parts, JSON-object header and claims)
/// and returns the header, so that malformed tokens are told apart from forged ones.
fn parse_structure(token: &str) -> Result<Map<String, Value>, ValidationError> {
    crate::jwt::checked_header(token).ok_or(ValidationError::Malformed)
}

/// Whether `alg` is an HMAC algorithm.
fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// A header `alg` fit for an error message: short identifiers as they are, anything else
/// replaced.
fn printable_alg(name: &str) -> String {
    if !name.is_empty()
        && name.len() <= MAX_ALG_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        name.to_owned()
    } else {
        UNRECOGNIZED_ALG.to_owned()
    }
}
