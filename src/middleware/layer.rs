//! [`IdentityLayer`]: the builder of the configuration, and the [`Layer`] that wraps
//! services with it.

use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use super::service::{Config, IdentityService};
use crate::token_check::TokenCheck;

/// The [`Layer`] that wraps services in [`IdentityService`].
#[derive(Clone, Default)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct IdentityLayer {
    config: Arc<Config>,
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
    /// [`DEFAULT_MAX_CREDENTIAL_LEN`](super::DEFAULT_MAX_CREDENTIAL_LEN) bytes, without
    /// token validation.
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
        IdentityService::new(inner, Arc::clone(&self.config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::middleware::CredentialOptions;

    #[test]
    fn configuring_a_cloned_layer_leaves_the_original_alone() {
        let a = IdentityLayer::new();
        let b = a.clone().cookie_name("who").max_credential_len(10);
        assert_eq!(a.config.options, CredentialOptions::default());
        assert_eq!(b.config.options.cookie_name, "who");
        assert_eq!(b.config.options.max_len, 10);
    }
}
