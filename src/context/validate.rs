//! Checks shared by identities, tokens, roles and attributes.
//!
//! Everything here treats its input as hostile: it bounds lengths before looking further,
//! and reports the field, never the value.

use super::error::{ContextError, Field};

/// The longest data role, attribute context or attribute name, in bytes.
pub const MAX_IDENTIFIER_LEN: usize = 128;

/// Non-empty, not white space only, no control character.
pub(crate) fn text(s: &str, field: Field) -> Result<(), ContextError> {
    if s.trim().is_empty() {
        return Err(ContextError::Empty(field));
    }
    if s.chars().any(char::is_control) {
        return Err(ContextError::ControlCharacter(field));
    }
    Ok(())
}

/// [`text`] for a secret; kept apart so that call sites say which inputs are secrets.
pub(crate) fn secret_text(s: &str, field: Field) -> Result<(), ContextError> {
    text(s, field)
}

pub(crate) fn max_len(s: &str, field: Field, max: usize) -> Result<(), ContextError> {
    if s.len() > max {
        return Err(ContextError::TooLong {
            field,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

/// A simple identifier: `[A-Za-z_][A-Za-z0-9_$]*`, at most [`MAX_IDENTIFIER_LEN`] bytes.
///
/// This is the intersection of what PostgreSQL accepts in a custom setting name and what
/// Oracle accepts unquoted, so that a context built once is valid on every backend.
pub(crate) fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        && s.len() <= MAX_IDENTIFIER_LEN
}

/// A qualified `schema.context` attribute key: two identifiers joined by one dot.
pub(crate) fn is_qualified_key(s: &str) -> bool {
    match s.split_once('.') {
        Some((schema, context)) => is_identifier(schema) && is_identifier(context),
        None => false,
    }
}

/// Counts what is written to it; lets us measure encodings of secrets without keeping them.
pub(crate) struct ByteCounter(pub(crate) usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
