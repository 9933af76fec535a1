//! The end-user security context: identity, database-access token, data roles, attributes.

use std::fmt;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

use super::attributes::Attributes;
use super::error::{ContextError, Field};
use super::identity::EndUserIdentity;
use super::validate::{self, ByteCounter};

/// The largest encoded security context, in bytes (what Oracle's protocol carries).
pub const MAX_ENCODED_LEN: usize = 65_535;

/// An end user's security context: the analogue of python-oracledb's
/// `create_end_user_security_context`.
///
/// Built once per request with [`SecurityContext::builder`], then attached to a pooled
/// connection with [`Pool::acquire_as`](crate::Pool::acquire_as) or
/// [`Object::set_end_user_security_context`](crate::Object::set_end_user_security_context).
/// It is immutable and cheap to clone (one reference count); the `with_*` methods make a
/// copy with one part replaced.
///
/// ```
/// use ctxpool::{EndUserIdentity, SecurityContext};
/// use serde_json::json;
///
/// let ctx = SecurityContext::builder(EndUserIdentity::named("alice", None), "db-token")
///     .data_roles(["hr_role"])
///     .attributes(json!({"hr.hcm_context": {"emp_id": 3, "org_id": 5}}))
///     .build()?;
/// assert_eq!(ctx.data_roles(), ["hr_role"]);
/// // Secrets never show.
/// assert!(!format!("{ctx:?}").contains("db-token"));
/// # Ok::<(), ctxpool::ContextError>(())
/// ```
///
/// # Encoded size
/// [`encoded_len`](Self::encoded_len) is the size of the context as this JSON document,
/// which must not exceed [`MAX_ENCODED_LEN`]:
/// `{"end_user":{"token":…}|{"name":…,"key":…|null},"database_access_token":…,"data_roles":[…],"attributes":{…}}`.
#[derive(Clone)]
pub struct SecurityContext(Arc<Inner>);

struct Inner {
    identity: EndUserIdentity,
    database_access_token: SecretString,
    data_roles: Vec<String>,
    attributes: Attributes,
    encoded_len: usize,
}

/// Builds a [`SecurityContext`]; see [`SecurityContext::builder`].
#[must_use = "a builder does nothing until `build` is called"]
pub struct SecurityContextBuilder {
    identity: EndUserIdentity,
    database_access_token: SecretString,
    data_roles: Vec<String>,
    attributes: Option<Value>,
}

impl fmt::Debug for SecurityContextBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecurityContextBuilder")
            .field("identity", &self.identity)
            .field("database_access_token", &"<redacted>")
            .field("data_roles", &self.data_roles)
            .finish_non_exhaustive()
    }
}

impl SecurityContextBuilder {
    /// Additional data roles to enable for the end user.
    pub fn data_roles<I, S>(mut self, roles: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.data_roles = roles.into_iter().map(Into::into).collect();
        self
    }

    /// End-user context attributes: a JSON object of `schema.context` keys, each a JSON
    /// object of attribute/value pairs. Checked by [`build`](Self::build).
    pub fn attributes(mut self, attributes: impl Into<Value>) -> Self {
        self.attributes = Some(attributes.into());
        self
    }

    /// Validates every part and builds the context.
    pub fn build(self) -> Result<SecurityContext, ContextError> {
        self.identity.validate()?;
        check_access_token(&self.database_access_token)?;
        check_data_roles(&self.data_roles)?;
        let attributes = match self.attributes {
            Some(v) => Attributes::from_json(v)?,
            None => Attributes::new(),
        };
        SecurityContext::sized(Inner {
            identity: self.identity,
            database_access_token: self.database_access_token,
            data_roles: self.data_roles,
            attributes,
            encoded_len: 0,
        })
    }
}

fn check_access_token(token: &SecretString) -> Result<(), ContextError> {
    validate::secret_text(token.expose_secret(), Field::DatabaseAccessToken)
}

pub(crate) fn check_data_roles(roles: &[String]) -> Result<(), ContextError> {
    for (i, role) in roles.iter().enumerate() {
        let field = Field::DataRole(i);
        validate::max_len(role, field, validate::MAX_IDENTIFIER_LEN)?;
        if !validate::is_identifier(role) {
            return Err(ContextError::InvalidDataRole(field));
        }
        if names_role(&roles[..i], role) {
            return Err(ContextError::DuplicateDataRole(field));
        }
    }
    Ok(())
}

/// Whether `roles` holds `role`. Role names are SQL identifiers, which the databases fold
/// to one case: `HR_Manager` and `hr_manager` are the same role.
fn names_role(roles: &[String], role: &str) -> bool {
    roles.iter().any(|r| r.eq_ignore_ascii_case(role))
}

/// Appends to `roles`, in order, each of `extra` it does not hold yet (in any case): the
/// union of data roles that an elevation makes. Returns whether any role was added.
pub(crate) fn add_data_roles(
    roles: &mut Vec<String>,
    extra: impl IntoIterator<Item = String>,
) -> bool {
    let before = roles.len();
    for role in extra {
        if !names_role(roles, &role) {
            roles.push(role);
        }
    }
    roles.len() > before
}

impl SecurityContext {
    /// Starts a context for `identity`, authorised by `database_access_token` (an
    /// on-behalf-of or client-credentials token issued by your IAM).
    pub fn builder(
        identity: EndUserIdentity,
        database_access_token: impl Into<String>,
    ) -> SecurityContextBuilder {
        SecurityContextBuilder {
            identity,
            database_access_token: SecretString::from(database_access_token.into()),
            data_roles: Vec::new(),
            attributes: None,
        }
    }

    /// Measures the encoding and enforces [`MAX_ENCODED_LEN`].
    fn sized(mut inner: Inner) -> Result<Self, ContextError> {
        let mut counter = ByteCounter(0);
        // Serializing validated strings into a counter cannot fail.
        let _ = serde_json::to_writer(&mut counter, &Encoded(&inner));
        if counter.0 > MAX_ENCODED_LEN {
            return Err(ContextError::TooLarge {
                size: counter.0,
                max: MAX_ENCODED_LEN,
            });
        }
        inner.encoded_len = counter.0;
        Ok(Self(Arc::new(inner)))
    }

    fn copy_with(&self, change: impl FnOnce(&mut Inner)) -> Result<Self, ContextError> {
        let mut inner = Inner {
            identity: self.0.identity.clone(),
            database_access_token: self.0.database_access_token.clone(),
            data_roles: self.0.data_roles.clone(),
            attributes: self.0.attributes.clone(),
            encoded_len: 0,
        };
        change(&mut inner);
        Self::sized(inner)
    }

    /// A copy with the data roles replaced.
    pub fn with_data_roles<I, S>(&self, roles: I) -> Result<Self, ContextError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let roles: Vec<String> = roles.into_iter().map(Into::into).collect();
        check_data_roles(&roles)?;
        self.copy_with(|inner| inner.data_roles = roles)
    }

    /// A copy with the attributes replaced.
    pub fn with_attributes(&self, attributes: impl Into<Value>) -> Result<Self, ContextError> {
        let attributes = Attributes::from_json(attributes.into())?;
        self.copy_with(|inner| inner.attributes = attributes)
    }

    /// A copy with the database-access token replaced (after a refresh, say).
    pub fn with_database_access_token(
        &self,
        token: impl Into<String>,
    ) -> Result<Self, ContextError> {
        let token = SecretString::from(token.into());
        check_access_token(&token)?;
        self.copy_with(|inner| inner.database_access_token = token)
    }

    /// The end user.
    pub fn identity(&self) -> &EndUserIdentity {
        &self.0.identity
    }

    /// The database-access token.
    pub fn database_access_token(&self) -> &SecretString {
        &self.0.database_access_token
    }

    /// The additional data roles, in the order given.
    pub fn data_roles(&self) -> &[String] {
        &self.0.data_roles
    }

    /// The end-user context attributes.
    pub fn attributes(&self) -> &Attributes {
        &self.0.attributes
    }

    /// The size of the encoded context in bytes; at most [`MAX_ENCODED_LEN`].
    pub fn encoded_len(&self) -> usize {
        self.0.encoded_len
    }

    /// Whether both are the very same context object (one clone of the other).
    /// Cheaper than `==`, which compares every part.
    pub fn ptr_eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl PartialEq for SecurityContext {
    fn eq(&self, other: &Self) -> bool {
        self.ptr_eq(other)
            || (self.0.identity == other.0.identity
                && self.0.database_access_token.expose_secret()
                    == other.0.database_access_token.expose_secret()
                && self.0.data_roles == other.0.data_roles
                && self.0.attributes == other.0.attributes)
    }
}

impl Eq for SecurityContext {}

impl fmt::Debug for SecurityContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecurityContext")
            .field("identity", &self.0.identity)
            .field("database_access_token", &"<redacted>")
            .field("data_roles", &self.0.data_roles)
            .field("attributes", &self.0.attributes)
            .finish()
    }
}

impl fmt::Display for SecurityContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "security context of {} ({} data roles, {} attribute contexts)",
            self.0.identity,
            self.0.data_roles.len(),
            self.0.attributes.keys().count()
        )
    }
}

/// The documented JSON encoding, used only to measure the size.
struct Encoded<'a>(&'a Inner);

impl Serialize for Encoded<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct EndUser<'a>(&'a EndUserIdentity);
        impl Serialize for EndUser<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(None)?;
                match (self.0.token_secret(), self.0.name()) {
                    (Some(t), _) => m.serialize_entry("token", t.expose_secret())?,
                    (None, name) => {
                        m.serialize_entry("name", &name)?;
                        m.serialize_entry(
                            "key",
                            &self.0.key_secret().map(ExposeSecret::expose_secret),
                        )?;
                    }
                }
                m.end()
            }
        }
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("end_user", &EndUser(&self.0.identity))?;
        m.serialize_entry(
            "database_access_token",
            self.0.database_access_token.expose_secret(),
        )?;
        m.serialize_entry("data_roles", &self.0.data_roles)?;
        m.serialize_entry("attributes", self.0.attributes.as_json())?;
        m.end()
    }
}
