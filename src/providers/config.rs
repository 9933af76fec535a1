//! `end_user_sec_params`: the identity-provider configuration of the reference's plug-in.
//!
//! The block names the token provider (`spi_type`), the OAuth flow (`auth_flow`), the
//! token endpoint's `authority`, the application's `client_id` and `client_credential`,
//! the `scopes` of the database-access token, and optional `data_roles` and `attributes`:
//!
//! ```
//! # fn main() -> Result<(), ctxpool::providers::config::ConfigError> {
//! use ctxpool::providers::config::{AuthFlow, EndUserSecParams, SpiType};
//!
//! let params = EndUserSecParams::from_json(r#"{
//!     "extra_auth_params": {
//!         "end_user_sec_params": {
//!             "spi_type": "azure_tokens",
//!             "auth_flow": "client_credentials",
//!             "authority": "https://login.microsoftonline.com/my-tenant",
//!             "client_id": "my-app",
//!             "client_credential": "my-secret",
//!             "scopes": "https://database.example.com/.default",
//!             "data_roles": ["hr_role"],
//!             "attributes": { "hr.hcm_context": { "emp_id": 3, "org_id": 5 } }
//!         }
//!     }
//! }"#)?;
//! assert_eq!(params.spi_type(), SpiType::AzureTokens);
//! assert_eq!(params.auth_flow(), AuthFlow::ClientCredentials);
//! assert!(!format!("{params:?}").contains("my-secret"));
//! # Ok(())
//! # }
//! ```
//!
//! The loaders accept the block bare, under `end_user_sec_params`, or under
//! `extra_auth_params.end_user_sec_params` (where the reference places it), and validate it
//! before returning: a loaded [`EndUserSecParams`] is always usable.
//!
//! # Extension keys
//!
//! These keys are not in the reference (python-oracledb) and are ignored by it; ctxpool
//! reads them. Values set in code ([`HttpOptions`](super::token_source::HttpOptions),
//! [`EndUserSecProvider::with_validator`](super::EndUserSecProvider::with_validator))
//! take precedence.
//!
//! | key                      | value                                                     |
//! |--------------------------|-----------------------------------------------------------|
//! | `tls_root_store`         | `"webpki"` (default), `"platform"` (the OS store; honours `SSL_CERT_FILE`), `"none"` |
//! | `tls_ca_file`            | path of a PEM bundle of extra roots (a private CA)        |
//! | `default_token_lifetime` | seconds assumed for a token without `expires_in` nor JWT `exp` |
//! | `basic_auth_encoding`    | `"form"` (default: RFC 6749 §2.3.1) or `"raw"`: how OCI's HTTP Basic credentials are written; `"raw"` for servers that do not form-decode them (Glewlwyd 2.7) |
//! | `token_validation`       | `{ "issuer", "audiences", "jwks_url", "role_claim", "allowed_roles", "leeway_seconds" }`: how end users' tokens are verified |
//!
//! Errors name the offending key and never contain the client credential: parse errors
//! keep only the parser's message, never the TOML source snippet the `toml` crate would
//! otherwise print.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::http::{self, BuiltInRoots, TrustRoots, TrustRootsError};
use super::validation::{ValidationConfig, ValidationError};
use crate::context::{Attributes, ContextError};

/// The key under which the reference nests the block.
const EXTRA_AUTH_PARAMS: &str = "extra_auth_params";
/// The block's own key.
const END_USER_SEC_PARAMS: &str = "end_user_sec_params";

/// Which identity provider issues the database-access tokens (`spi_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpiType {
    /// Microsoft Entra ID (`azure_tokens`).
    AzureTokens,
    /// OCI IAM (`oci_tokens`).
    OciTokens,
}

impl SpiType {
    /// The configuration value, e.g. `azure_tokens`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AzureTokens => "azure_tokens",
            Self::OciTokens => "oci_tokens",
        }
    }
}

impl fmt::Display for SpiType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The OAuth 2.0 grant used to obtain the database-access token (`auth_flow`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthFlow {
    /// The application's own credentials (`client_credentials`).
    ClientCredentials,
    /// A token for the end user, exchanged from the end user's token (`on_behalf_of`).
    OnBehalfOf,
}

impl AuthFlow {
    /// The configuration value, e.g. `on_behalf_of`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientCredentials => "client_credentials",
            Self::OnBehalfOf => "on_behalf_of",
        }
    }
}

impl fmt::Display for AuthFlow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why `end_user_sec_params` (or a token source built from it) was refused. Messages name
/// the offending key and never contain the client credential.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The text did not parse, a key is unknown or missing, or a value has the wrong type.
    #[error("end_user_sec_params is not valid: {reason}")]
    Invalid {
        /// The parser's message, which names the key.
        reason: String,
    },
    /// A required value is empty or white space only.
    #[error("end_user_sec_params key \"{key}\" is empty")]
    Empty {
        /// The key.
        key: &'static str,
    },
    /// A value contains a control character.
    #[error("end_user_sec_params key \"{key}\" contains a control character")]
    ControlCharacter {
        /// The key.
        key: &'static str,
    },
    /// The provider does not support the flow (OCI IAM supports client credentials only).
    #[error(
        "end_user_sec_params key \"auth_flow\": {auth_flow} is not supported by spi_type {spi_type}"
    )]
    UnsupportedFlow {
        /// The configured provider.
        spi_type: SpiType,
        /// The configured flow.
        auth_flow: AuthFlow,
    },
    /// The authority is not a usable token endpoint base URL.
    #[error("end_user_sec_params key \"authority\": {reason}")]
    Authority {
        /// Why; never the URL itself, which could carry credentials.
        reason: &'static str,
    },
    /// The attributes do not form a valid security-context attribute set.
    #[error("end_user_sec_params key \"attributes\": {0}")]
    Attributes(#[source] ContextError),
    /// The extra trust roots (`tls_ca_file`) could not be loaded.
    #[error("end_user_sec_params key \"tls_ca_file\": {0}")]
    TrustRoots(#[source] TrustRootsError),
    /// The token validation settings are unusable.
    #[error("end_user_sec_params key \"token_validation\": {0}")]
    TokenValidation(#[source] ValidationError),
    /// The HTTPS client for the token endpoint could not be built.
    #[error("could not build the HTTPS client for the token endpoint: {reason}")]
    HttpClient {
        /// Why.
        reason: String,
    },
}

/// The wire shape, kept private so that every public [`EndUserSecParams`] has passed
/// [`EndUserSecParams::validate`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParams {
    spi_type: SpiType,
    auth_flow: AuthFlow,
    authority: String,
    client_id: String,
    #[serde(deserialize_with = "secret_string")]
    client_credential: SecretString,
    #[serde(deserialize_with = "string_or_strings")]
    scopes: Vec<String>,
    #[serde(default)]
    data_roles: Option<Vec<String>>,
    #[serde(default)]
    attributes: Option<Value>,
    // Extension keys (see the module documentation).
    #[serde(default)]
    tls_root_store: Option<BuiltInRoots>,
    #[serde(default)]
    tls_ca_file: Option<String>,
    #[serde(default)]
    default_token_lifetime: Option<u64>,
    #[serde(default)]
    basic_auth_encoding: Option<BasicAuthEncoding>,
    #[serde(default)]
    token_validation: Option<RawValidation>,
}

/// How HTTP Basic client credentials are written (`basic_auth_encoding`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum BasicAuthEncoding {
    /// Client id and secret form-encoded, then base64 (RFC 6749 §2.3.1).
    #[default]
    Form,
    /// Client id and secret as they are, then base64: for servers that do not form-decode
    /// (Glewlwyd 2.7 compares the decoded text with the secret as it is).
    Raw,
}

/// The `token_validation` extension key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawValidation {
    issuer: String,
    #[serde(deserialize_with = "string_or_strings")]
    audiences: Vec<String>,
    jwks_url: String,
    #[serde(default)]
    role_claim: Option<String>,
    #[serde(default)]
    allowed_roles: Vec<String>,
    #[serde(default)]
    leeway_seconds: Option<u64>,
}

/// Wraps the credential at once; `secrecy` is built without its `serde` feature.
fn secret_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SecretString, D::Error> {
    String::deserialize(deserializer).map(SecretString::from)
}

/// `scopes` is a string in the reference's examples and a list in many deployments.
fn string_or_strings<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    // An untagged enum's own error ("did not match any variant") does not name the
    // expectation; say it, so that the message is actionable.
    match OneOrMany::deserialize(deserializer) {
        // OAuth scopes are space-delimited, so a single string may hold several.
        Ok(OneOrMany::One(scopes)) => Ok(scopes.split_whitespace().map(str::to_owned).collect()),
        Ok(OneOrMany::Many(scopes)) => Ok(scopes),
        Err(_) => Err(serde::de::Error::custom(
            "invalid type for `scopes`: expected a string or an array of strings",
        )),
    }
}

/// The `end_user_sec_params` block: which identity provider issues database-access
/// tokens, how, and which data roles and attributes complete the security context.
///
/// Built only by [`from_json`](Self::from_json) and [`from_toml`](Self::from_toml), which
/// validate it. `Debug` redacts the client credential and shows only attribute keys.
#[derive(Clone)]
pub struct EndUserSecParams {
    spi_type: SpiType,
    auth_flow: AuthFlow,
    authority: String,
    client_id: String,
    client_credential: SecretString,
    scopes: Vec<String>,
    data_roles: Option<Vec<String>>,
    attributes: Option<Value>,
    tls_root_store: BuiltInRoots,
    tls_ca_file: Option<String>,
    default_token_lifetime: Option<Duration>,
    basic_auth_encoding: BasicAuthEncoding,
    token_validation: Option<ValidationConfig>,
}

impl EndUserSecParams {
    /// Loads the block from JSON: bare, under `end_user_sec_params`, or under
    /// `extra_auth_params.end_user_sec_params`; then [validates](Self::validate) it.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        // serde_json's syntax errors give a position, never the input text.
        let value: Value = serde_json::from_str(text).map_err(|e| ConfigError::Invalid {
            reason: e.to_string(),
        })?;
        Self::from_value(value)
    }

    /// Loads the block from TOML: bare, as an `[end_user_sec_params]` table, or as an
    /// `[extra_auth_params.end_user_sec_params]` table; then [validates](Self::validate) it.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        // `toml::de::Error`'s Display quotes the offending source line, which may be the
        // credential's; keep only its message and the line number.
        let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            reason: toml_reason(&e, text),
        })?;
        // One validation path for both formats: TOML maps onto JSON losslessly for every
        // value the block accepts (dates would become objects and fail validation).
        let value = serde_json::to_value(table).map_err(|e| ConfigError::Invalid {
            reason: e.to_string(),
        })?;
        Self::from_value(value)
    }

    fn from_value(value: Value) -> Result<Self, ConfigError> {
        let block = unnest(value)?;
        match RawParams::deserialize(&block) {
            Ok(raw) => Self::from_raw(raw),
            Err(error) => Err(ConfigError::Invalid {
                reason: explain(&block, error),
            }),
        }
    }

    fn from_raw(raw: RawParams) -> Result<Self, ConfigError> {
        let params = Self {
            spi_type: raw.spi_type,
            auth_flow: raw.auth_flow,
            authority: raw.authority,
            client_id: raw.client_id,
            client_credential: raw.client_credential,
            scopes: raw.scopes,
            data_roles: raw.data_roles,
            attributes: raw.attributes,
            tls_root_store: raw.tls_root_store.unwrap_or_default(),
            tls_ca_file: raw.tls_ca_file,
            default_token_lifetime: raw
                .default_token_lifetime
                .filter(|s| *s > 0)
                .map(Duration::from_secs),
            basic_auth_encoding: raw.basic_auth_encoding.unwrap_or_default(),
            token_validation: match raw.token_validation {
                None => None,
                Some(v) => {
                    let mut config = ValidationConfig::new(v.issuer, v.audiences, v.jwks_url);
                    config.role_claim = v.role_claim;
                    config.allowed_roles = v.allowed_roles.into_iter().collect::<BTreeSet<_>>();
                    if let Some(leeway) = v.leeway_seconds {
                        config.leeway = Duration::from_secs(leeway);
                    }
                    Some(config)
                }
            },
        };
        if raw.default_token_lifetime == Some(0) {
            return Err(ConfigError::Invalid {
                reason: "key \"default_token_lifetime\": must be at least 1 second".to_owned(),
            });
        }
        params.validate()?;
        Ok(params)
    }

    /// Checks what serde cannot: the provider supports the flow, the authority is an
    /// `https` URL (`http` only for loopback hosts, for tests), `client_id`,
    /// `client_credential` and `scopes` are not empty, data roles are not empty, and the
    /// attributes form a valid attribute set. The loaders call it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.spi_type == SpiType::OciTokens && self.auth_flow == AuthFlow::OnBehalfOf {
            return Err(ConfigError::UnsupportedFlow {
                spi_type: self.spi_type,
                auth_flow: self.auth_flow,
            });
        }
        validate_authority(&self.authority)?;
        require_text("client_id", &self.client_id)?;
        require_text("client_credential", self.client_credential.expose_secret())?;
        if self.scopes.is_empty() {
            return Err(ConfigError::Empty { key: "scopes" });
        }
        for scope in &self.scopes {
            require_text("scopes", scope)?;
            // A scope with white space would split into several on the wire.
            if scope.chars().any(char::is_whitespace) {
                return Err(ConfigError::Invalid {
                    reason: "key \"scopes\": a scope in a list must not contain white space"
                        .to_owned(),
                });
            }
        }
        for role in self.data_roles.iter().flatten() {
            require_text("data_roles", role)?;
        }
        if let Some(attributes) = &self.attributes {
            Attributes::from_json(attributes.clone()).map_err(ConfigError::Attributes)?;
        }
        if let Some(path) = &self.tls_ca_file {
            require_text("tls_ca_file", path)?;
        }
        if let Some(v) = &self.token_validation {
            v.check().map_err(ConfigError::TokenValidation)?;
        }
        Ok(())
    }

    /// The trust roots of the `tls_root_store` and `tls_ca_file` extension keys (the PEM
    /// file is read here); the webpki roots when neither is set.
    pub fn trust_roots(&self) -> Result<TrustRoots, ConfigError> {
        let roots = TrustRoots::new(self.tls_root_store);
        match &self.tls_ca_file {
            Some(path) => roots.with_pem_file(path).map_err(ConfigError::TrustRoots),
            None => Ok(roots),
        }
    }

    /// The `basic_auth_encoding` extension key.
    pub fn basic_auth_encoding(&self) -> BasicAuthEncoding {
        self.basic_auth_encoding
    }

    /// The `default_token_lifetime` extension key.
    pub fn default_token_lifetime(&self) -> Option<Duration> {
        self.default_token_lifetime
    }

    /// The `token_validation` extension key, as a validator configuration (its trust roots
    /// not yet set: the provider gives it the block's).
    pub fn token_validation(&self) -> Option<&ValidationConfig> {
        self.token_validation.as_ref()
    }

    /// The identity provider.
    pub fn spi_type(&self) -> SpiType {
        self.spi_type
    }

    /// The OAuth flow.
    pub fn auth_flow(&self) -> AuthFlow {
        self.auth_flow
    }

    /// The token endpoint authority, e.g. `https://login.microsoftonline.com/<tenant>`.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The application's client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The application's client secret.
    pub fn client_credential(&self) -> &SecretString {
        &self.client_credential
    }

    /// The scopes of the database-access token (at least one).
    pub fn scopes(&self) -> &[String] {
        &self.scopes
    }

    /// The configured data roles, if any.
    pub fn data_roles(&self) -> Option<&[String]> {
        self.data_roles.as_deref()
    }

    /// The configured attributes, if any; valid for
    /// [`Attributes::from_json`](crate::context::Attributes::from_json).
    pub fn attributes(&self) -> Option<&Value> {
        self.attributes.as_ref()
    }
}

impl fmt::Debug for EndUserSecParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Attribute values may be personal data: show their keys only.
        let attribute_keys: Option<Vec<&String>> = self.attributes.as_ref().map(|a| match a {
            Value::Object(map) => map.keys().collect(),
            _ => Vec::new(),
        });
        f.debug_struct("EndUserSecParams")
            .field("spi_type", &self.spi_type)
            .field("auth_flow", &self.auth_flow)
            .field("authority", &self.authority)
            .field("client_id", &self.client_id)
            .field("client_credential", &"<redacted>")
            .field("scopes", &self.scopes)
            .field("data_roles", &self.data_roles)
            .field("attributes", &attribute_keys)
            .field("tls_root_store", &self.tls_root_store)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("default_token_lifetime", &self.default_token_lifetime)
            .field("basic_auth_encoding", &self.basic_auth_encoding)
            .field("token_validation", &self.token_validation)
            .finish()
    }
}

/// Takes the block out of `extra_auth_params` / `end_user_sec_params` wrappers, if any.
fn unnest(value: Value) -> Result<Value, ConfigError> {
    let Value::Object(mut map) = value else {
        return Err(ConfigError::Invalid {
            reason: "expected an object".to_owned(),
        });
    };
    let mut nested = false;
    if map.len() == 1 && map.contains_key(EXTRA_AUTH_PARAMS) {
        match map.remove(EXTRA_AUTH_PARAMS) {
            Some(Value::Object(inner)) => map = inner,
            _ => return Err(not_a_table(EXTRA_AUTH_PARAMS)),
        }
        nested = true;
    }
    if (nested || map.len() == 1) && map.contains_key(END_USER_SEC_PARAMS) {
        return match map.remove(END_USER_SEC_PARAMS) {
            Some(block @ Value::Object(_)) => Ok(block),
            _ => Err(not_a_table(END_USER_SEC_PARAMS)),
        };
    }
    if nested {
        return Err(ConfigError::Invalid {
            reason: "missing field `end_user_sec_params` in `extra_auth_params`".to_owned(),
        });
    }
    Ok(Value::Object(map))
}

/// serde's message for a failed block, prefixed with the key whose value failed: serde
/// names the key for unknown and missing fields but not for a value of the wrong type.
fn explain(block: &Value, error: serde_json::Error) -> String {
    let Value::Object(map) = block else {
        return error.to_string();
    };
    for (key, value) in map {
        let field_error = match key.as_str() {
            "spi_type" => SpiType::deserialize(value).err(),
            "auth_flow" => AuthFlow::deserialize(value).err(),
            "authority" | "client_id" => String::deserialize(value).err(),
            "client_credential" => secret_string(value).err(),
            "scopes" => string_or_strings(value).err(),
            "data_roles" => Option::<Vec<String>>::deserialize(value).err(),
            "tls_root_store" => BuiltInRoots::deserialize(value).err(),
            "tls_ca_file" => String::deserialize(value).err(),
            "default_token_lifetime" => u64::deserialize(value).err(),
            "basic_auth_encoding" => BasicAuthEncoding::deserialize(value).err(),
            "token_validation" => RawValidation::deserialize(value).err(),
            _ => None,
        };
        if let Some(field_error) = field_error {
            return format!("key \"{key}\": {field_error}");
        }
    }
    error.to_string()
}

fn not_a_table(key: &str) -> ConfigError {
    ConfigError::Invalid {
        reason: format!("`{key}` must be an object"),
    }
}

/// The TOML parser's message with a line number, without the quoted source line.
fn toml_reason(error: &toml::de::Error, text: &str) -> String {
    let message = error.message().trim_end();
    match error.span() {
        Some(span) => {
            let line = text
                .get(..span.start)
                .map_or(0, |before| before.matches('\n').count())
                + 1;
            format!("TOML parse error at line {line}: {message}")
        }
        None => format!("TOML parse error: {message}"),
    }
}

fn require_text(key: &'static str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        return Err(ConfigError::Empty { key });
    }
    if value.chars().any(char::is_control) {
        return Err(ConfigError::ControlCharacter { key });
    }
    Ok(())
}

fn validate_authority(authority: &str) -> Result<(), ConfigError> {
    let error = |reason| Err(ConfigError::Authority { reason });
    if authority.trim().is_empty() {
        return error("is empty");
    }
    let Ok(url) = reqwest::Url::parse(authority) else {
        return error("is not a URL");
    };
    if !url.username().is_empty() || url.password().is_some() {
        // Credentials belong in `client_id` / `client_credential`, never in a URL that
        // may be logged.
        return error("must not contain user information");
    }
    if url.query().is_some() || url.fragment().is_some() {
        return error("must not contain a query or a fragment");
    }
    if url.host().is_none() {
        return error("has no host");
    }
    match url.scheme() {
        _ if http::url_allowed(&url) => Ok(()),
        "http" => error("must use https (http is allowed for loopback hosts only)"),
        _ => error("must be an https URL"),
    }
}
