//! The end user a security context speaks for.

use std::fmt;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};

use super::error::{ContextError, Field};
use super::validate;

/// The longest end-user name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// Who the end user is: the analogue of python-oracledb's `end_user_identity`.
///
/// Either an IAM end-user token (users managed in an identity provider), or a user of the
/// application's own store: a name plus an optional server-side lookup key.
///
/// Tokens and keys are secrets: `Debug` and `Display` never show them, and they are wiped
/// from memory when the last clone is dropped. Construction never fails; the identity is
/// validated when a [`SecurityContext`](super::SecurityContext) is built from it, or by
/// [`EndUserIdentity::validate`].
///
/// ```
/// use ctxpool::EndUserIdentity;
///
/// let iam_user = EndUserIdentity::token("eyJhbGciOi...");
/// let app_user = EndUserIdentity::named("alice", Some("lookup-key".into()));
/// assert_eq!(format!("{iam_user:?}"), "EndUserIdentity::Token(<redacted>)");
/// assert_eq!(app_user.name(), Some("alice"));
/// ```
#[derive(Clone)]
pub struct EndUserIdentity(Repr);

#[derive(Clone)]
enum Repr {
    Token(SecretString),
    Named {
        name: Arc<str>,
        key: Option<SecretString>,
    },
}

/// Which kind of identity an [`EndUserIdentity`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentityKind {
    /// An IAM end-user token.
    Token,
    /// An application-store user name, with or without a key.
    Named,
}

impl EndUserIdentity {
    /// An end user managed in IAM, identified by their token.
    pub fn token(token: impl Into<String>) -> Self {
        Self(Repr::Token(SecretString::from(token.into())))
    }

    /// An end user of the application's own user store: a name and an optional security
    /// context lookup key.
    pub fn named(name: impl Into<String>, key: Option<String>) -> Self {
        Self(Repr::Named {
            name: Arc::from(name.into()),
            key: key.map(SecretString::from),
        })
    }

    /// Which kind of identity this is.
    pub fn kind(&self) -> IdentityKind {
        match self.0 {
            Repr::Token(_) => IdentityKind::Token,
            Repr::Named { .. } => IdentityKind::Named,
        }
    }

    /// The application-store user name; `None` for a token identity.
    ///
    /// A name is not a secret; it may appear in logs.
    pub fn name(&self) -> Option<&str> {
        match &self.0 {
            Repr::Token(_) => None,
            Repr::Named { name, .. } => Some(name),
        }
    }

    /// The IAM token; `None` for a named identity.
    pub fn token_secret(&self) -> Option<&SecretString> {
        match &self.0 {
            Repr::Token(t) => Some(t),
            Repr::Named { .. } => None,
        }
    }

    /// The lookup key of a named identity, if it has one.
    pub fn key_secret(&self) -> Option<&SecretString> {
        match &self.0 {
            Repr::Token(_) => None,
            Repr::Named { key, .. } => key.as_ref(),
        }
    }

    /// Checks the identity: non-empty, not white space only, no control character, a name of
    /// at most [`MAX_NAME_LEN`] bytes.
    pub fn validate(&self) -> Result<(), ContextError> {
        match &self.0 {
            Repr::Token(t) => validate::secret_text(t.expose_secret(), Field::EndUserToken),
            Repr::Named { name, key } => {
                validate::text(name, Field::EndUserName)?;
                validate::max_len(name, Field::EndUserName, MAX_NAME_LEN)?;
                match key {
                    Some(k) => validate::secret_text(k.expose_secret(), Field::EndUserKey),
                    None => Ok(()),
                }
            }
        }
    }

    /// Compares two identities, secrets included.
    pub(crate) fn same_as(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Repr::Token(a), Repr::Token(b)) => a.expose_secret() == b.expose_secret(),
            (Repr::Named { name: a, key: ka }, Repr::Named { name: b, key: kb }) => {
                a == b
                    && ka.as_ref().map(ExposeSecret::expose_secret)
                        == kb.as_ref().map(ExposeSecret::expose_secret)
            }
            _ => false,
        }
    }
}

impl PartialEq for EndUserIdentity {
    fn eq(&self, other: &Self) -> bool {
        self.same_as(other)
    }
}

impl Eq for EndUserIdentity {}

impl fmt::Debug for EndUserIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Token(_) => f.write_str("EndUserIdentity::Token(<redacted>)"),
            Repr::Named { name, key } => f
                .debug_struct("EndUserIdentity::Named")
                .field("name", name)
                .field("key", &key.as_ref().map(|_| "<redacted>"))
                .finish(),
        }
    }
}

impl fmt::Display for EndUserIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Token(_) => f.write_str("token user"),
            Repr::Named { name, .. } => write!(f, "user {name:?}"),
        }
    }
}
