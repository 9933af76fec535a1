//! Security contexts: who the end user is and what the database should let them see.
//!
//! [`EndUserIdentity`] says who; [`SecurityContext`] adds the database-access token, data
//! roles and [`Attributes`], validated once at build time so that a backend never sees a
//! malformed context.

mod attributes;
mod error;
mod identity;
mod security_context;
mod validate;

pub use attributes::Attributes;
pub use error::{ContextError, Field, MAX_ECHO};
pub use identity::{EndUserIdentity, IdentityKind, MAX_NAME_LEN};
pub use security_context::{MAX_ENCODED_LEN, SecurityContext, SecurityContextBuilder};
pub(crate) use security_context::{add_data_roles, check_data_roles};
pub use validate::MAX_IDENTIFIER_LEN;
