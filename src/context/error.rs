//! Errors of building a [`SecurityContext`](super::SecurityContext).

use std::fmt;

/// The part of a security context a validation error is about.
///
/// Errors name the field, never its value: identities, tokens and keys are secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Field {
    /// The end user's IAM token.
    EndUserToken,
    /// The application-store user name.
    EndUserName,
    /// The application-store user's security context lookup key.
    EndUserKey,
    /// The database-access token.
    DatabaseAccessToken,
    /// The data role at this position of the list.
    DataRole(usize),
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EndUserToken => f.write_str("end-user token"),
            Self::EndUserName => f.write_str("end-user name"),
            Self::EndUserKey => f.write_str("end-user key"),
            Self::DatabaseAccessToken => f.write_str("database-access token"),
            Self::DataRole(i) => write!(f, "data role #{i}"),
        }
    }
}

/// Why a security context could not be built.
///
/// Every variant names the offending field or key and never carries a secret value.
/// Attribute keys and names are not secret, but they come from outside: they are printed
/// escaped, at most [`MAX_ECHO`] bytes of each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ContextError {
    /// The field is empty or only white space.
    #[error("{0} is empty or white space only")]
    Empty(Field),
    /// The field contains a control character (NUL, newline, ...).
    #[error("{0} contains a control character")]
    ControlCharacter(Field),
    /// The field is longer than allowed.
    #[error("{field} is {len} bytes long, more than the {max} allowed")]
    TooLong {
        /// The field.
        field: Field,
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// A data role is not a valid role name.
    #[error(
        "{0} is not a valid role name (letters, digits, `_` and `$`, not starting with a digit)"
    )]
    InvalidDataRole(Field),
    /// The same data role is listed twice (compared case-insensitively).
    #[error("{0} repeats an earlier data role")]
    DuplicateDataRole(Field),
    /// `attributes` is not a JSON object of JSON objects.
    #[error("attributes must be a JSON object whose values are JSON objects")]
    AttributesNotObject,
    /// An attribute key is not a qualified `schema.context` name.
    #[error("attribute key \"{key}\" is not a qualified `schema.context` name")]
    InvalidAttributeKey {
        /// The key, escaped and shortened.
        key: String,
    },
    /// Two attribute keys differ only in case.
    #[error("attribute key \"{key}\" repeats another key (keys are case-insensitive)")]
    DuplicateAttributeKey {
        /// The key, escaped and shortened.
        key: String,
    },
    /// An attribute name inside a context is not a simple identifier.
    #[error("attribute \"{key}\".\"{attribute}\" does not have a valid name")]
    InvalidAttributeName {
        /// The `schema.context` key, shortened.
        key: String,
        /// The attribute name, shortened.
        attribute: String,
    },
    /// An attribute value is not a string, number or boolean, or is a string with a NUL.
    #[error("attribute \"{key}\".\"{attribute}\" must be a string, number or boolean, not {found}")]
    InvalidAttributeValue {
        /// The `schema.context` key, shortened.
        key: String,
        /// The attribute name, shortened.
        attribute: String,
        /// What was found instead.
        found: &'static str,
    },
    /// The encoded context is larger than [`MAX_ENCODED_LEN`](crate::context::MAX_ENCODED_LEN).
    #[error("the encoded security context is {size} bytes, more than the {max} allowed")]
    TooLarge {
        /// The encoded size in bytes.
        size: usize,
        /// The limit in bytes.
        max: usize,
    },
}

/// How many bytes of a hostile key or name an error keeps, after escaping.
pub const MAX_ECHO: usize = 64;

/// Escapes outside input for an error message and keeps at most [`MAX_ECHO`] bytes of the
/// escaped text: escaping can grow a character to ten bytes, so the bound applies after it.
pub(crate) fn echo(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let piece = c.escape_debug().to_string();
        if out.len() + piece.len() > MAX_ECHO {
            out.push('…');
            break;
        }
        out.push_str(&piece);
    }
    out
}
