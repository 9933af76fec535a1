//! The provider a pool is configured with: `end_user_sec_params` + a token source + the
//! cache, completing end-user identities into security contexts.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};

use crate::context::SecurityContext;
use crate::provider::{ContextProvider, ContextRequest, ProviderError};

use super::cache::{CacheKey, CacheOptions, TokenCache};
use super::config::{AuthFlow, ConfigError, EndUserSecParams};
use super::token_source::{HttpOptions, HttpTokenSource, TokenSource};
use super::validation::TokenValidator;

/// Completes identities the way python-oracledb's `end_user_sec_provider` plug-in does, and
/// right where it goes wrong: the cache hits, on-behalf-of works after a fetch, and a
/// `(name, key)` identity is accepted (with client credentials; on-behalf-of needs the end
/// user's token as its assertion).
///
/// The configured `data_roles` and `attributes` apply unless the request carries its own.
/// An explicit [`SecurityContext`] passed to `acquire_as` never reaches the provider.
pub struct EndUserSecProvider {
    params: EndUserSecParams,
    source: Arc<dyn TokenSource>,
    cache: TokenCache,
    validation: Validation,
}

/// What the provider does with an end user's token before using it.
enum Validation {
    /// Verify it: the default once a validator is set.
    With(TokenValidator),
    /// Refuse token identities: no validator was set and validation was not waived.
    Required,
    /// Trust it: for a database that verifies tokens itself (Oracle Deep Data Security).
    Waived,
}

impl fmt::Debug for EndUserSecProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndUserSecProvider")
            .field("params", &self.params)
            .field("cached_tokens", &self.cache.len())
            .finish_non_exhaustive()
    }
}

impl EndUserSecProvider {
    /// A provider fetching tokens over HTTPS as `params` say, with default timeouts,
    /// retries and cache. If the block has `token_validation`, end users' tokens are
    /// verified with a validator built from it (trusting the block's TLS roots).
    pub fn new(params: EndUserSecParams) -> Result<Self, ConfigError> {
        Self::with_http_options(params, HttpOptions::default())
    }

    /// [`new`](Self::new) with HTTP options set in code, which take precedence over the
    /// block's extension keys.
    pub fn with_http_options(
        params: EndUserSecParams,
        options: HttpOptions,
    ) -> Result<Self, ConfigError> {
        let validator = match params.token_validation() {
            Some(config) => {
                let mut config = config.clone();
                config.trust_roots = match &options.trust_roots {
                    Some(roots) => roots.clone(),
                    None => params.trust_roots()?,
                };
                Some(TokenValidator::new(config).map_err(ConfigError::TokenValidation)?)
            }
            None => None,
        };
        let source = HttpTokenSource::new(&params, options)?;
        let provider = Self::with_source(params, Arc::new(source), CacheOptions::default());
        Ok(match validator {
            Some(validator) => provider.with_validator(validator),
            None => provider,
        })
    }

    /// A provider with its own token source (another identity provider, a test double) and
    /// cache options.
    pub fn with_source(
        params: EndUserSecParams,
        source: Arc<dyn TokenSource>,
        cache: CacheOptions,
    ) -> Self {
        Self {
            params,
            source,
            cache: TokenCache::new(cache),
            validation: Validation::Required,
        }
    }

    /// Verifies end-user tokens before anything else (required for token identities unless
    /// [waived](Self::without_token_validation)): a token that fails validation is an
    /// error from `acquire_as`, before any token request and any SQL. PostgreSQL cannot
    /// check tokens itself, so a pool in front of it should always set this for token
    /// identities. The token's role claim (through the validator's allow-list) gives the
    /// data roles unless the request names its own. Replaces a validator from the block's
    /// `token_validation`.
    ///
    /// Give the tower layer a clone of the same validator: a token the layer verified
    /// reaches the provider with its evidence and is not verified a second time.
    pub fn with_validator(mut self, validator: TokenValidator) -> Self {
        self.validation = Validation::With(validator);
        self
    }

    /// The validator end users' tokens are verified with, if any: hand a clone to the
    /// tower layer ([`IdentityLayer::token_check`](crate::middleware::IdentityLayer::token_check)).
    pub fn validator(&self) -> Option<&TokenValidator> {
        match &self.validation {
            Validation::With(validator) => Some(validator),
            _ => None,
        }
    }

    /// Uses end-user tokens without verifying them. Only for a database that verifies them
    /// itself; without this or a [validator](Self::with_validator), token identities are
    /// refused (fail closed). Named identities need no validation either way.
    pub fn without_token_validation(mut self) -> Self {
        self.validation = Validation::Waived;
        self
    }

    /// The configuration.
    pub fn params(&self) -> &EndUserSecParams {
        &self.params
    }

    /// The token cache.
    pub fn cache(&self) -> &TokenCache {
        &self.cache
    }

    /// The database-access token for `request`, from the cache or the identity provider.
    async fn database_access_token(
        &self,
        request: &ContextRequest,
    ) -> Result<SecretString, ProviderError> {
        let p = &self.params;
        let provider = p.spi_type().as_str();
        match p.auth_flow() {
            AuthFlow::ClientCredentials => {
                let key = CacheKey::client_credentials(
                    provider,
                    p.authority(),
                    p.client_id(),
                    p.scopes(),
                );
                self.cache
                    .get_or_fetch(&key, || async {
                        let t = self.source.fetch(None, request.deadline).await?;
                        Ok((t.token, t.expires_in))
                    })
                    .await
            }
            AuthFlow::OnBehalfOf => {
                let assertion = request.identity.token_secret().ok_or_else(|| {
                    ProviderError::InvalidToken(
                        "on-behalf-of needs the end user's token as its assertion".into(),
                    )
                })?;
                let key = CacheKey::on_behalf_of(
                    provider,
                    p.authority(),
                    p.client_id(),
                    p.scopes(),
                    assertion,
                );
                self.cache
                    .get_or_fetch(&key, || async {
                        let t = self.source.fetch(Some(assertion), request.deadline).await?;
                        Ok((t.token, t.expires_in))
                    })
                    .await
            }
        }
    }
}

#[async_trait]
impl ContextProvider for EndUserSecProvider {
    async fn security_context(
        &self,
        request: &ContextRequest,
    ) -> Result<SecurityContext, ProviderError> {
        // A token that fails validation never reaches the identity provider or the database.
        let validated = match (&self.validation, request.identity.token_secret()) {
            (Validation::With(validator), Some(token)) => {
                // Verified once per request: the layer's evidence, if it is this
                // validator's and for this token, stands.
                match validator.already_verified(request.verification.as_ref(), token) {
                    Some(validated) => Some(validated),
                    None => Some(validator.validate(token).await?),
                }
            }
            (Validation::Required, Some(_)) => {
                return Err(ProviderError::InvalidToken(
                    "end-user tokens need a validator (or validation waived explicitly)".into(),
                ));
            }
            _ => None,
        };
        let token = self.database_access_token(request).await?;
        let mut builder =
            SecurityContext::builder(request.identity.clone(), token.expose_secret().to_owned());
        // Per-request roles and attributes replace the configured ones.
        let claimed = validated
            .as_ref()
            .map(|v| v.data_roles.as_slice())
            .filter(|r| !r.is_empty());
        match (&request.data_roles, claimed, self.params.data_roles()) {
            (Some(roles), _, _) => builder = builder.data_roles(roles.iter().cloned()),
            (None, Some(roles), _) | (None, None, Some(roles)) => {
                builder = builder.data_roles(roles.iter().cloned());
            }
            (None, None, None) => {}
        }
        match (&request.attributes, self.params.attributes()) {
            (Some(attributes), _) => builder = builder.attributes(attributes.clone()),
            (None, Some(attributes)) => builder = builder.attributes(attributes.clone()),
            (None, None) => {}
        }
        Ok(builder.build()?)
    }
}
