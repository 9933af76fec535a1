//! End-user context attributes: `{"schema.context": {"attribute": value, ...}, ...}`.

use std::fmt;

use serde_json::{Map, Value};

use super::error::{ContextError, echo};
use super::validate::{is_identifier, is_qualified_key};

/// Validated end-user context attributes.
///
/// As in the reference, keys are fully qualified `schema.context` names and each value is a
/// JSON object of attribute/value pairs:
///
/// ```
/// use ctxpool::context::Attributes;
/// use serde_json::json;
///
/// let attrs = Attributes::from_json(json!({"hr.hcm_context": {"emp_id": 3, "org_id": 5}}))?;
/// let flat: Vec<_> = attrs.flattened().collect();
/// assert_eq!(flat, [("hr.hcm_context.emp_id".to_string(), "3".to_string()),
///                   ("hr.hcm_context.org_id".to_string(), "5".to_string())]);
/// # Ok::<(), ctxpool::ContextError>(())
/// ```
///
/// Rules: keys are two identifiers joined by a dot and unique case-insensitively; attribute
/// names are identifiers (`[A-Za-z_][A-Za-z0-9_$]*`, at most 128 bytes); values are strings
/// (without NUL), numbers or booleans. `null`, arrays and nested objects are refused: a
/// policy must never have to guess what they mean.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Attributes(Map<String, Value>);

impl Attributes {
    /// No attributes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates a JSON value as attributes.
    pub fn from_json(value: Value) -> Result<Self, ContextError> {
        let Value::Object(map) = value else {
            return Err(ContextError::AttributesNotObject);
        };
        let mut seen: Vec<String> = Vec::with_capacity(map.len());
        for (key, context) in &map {
            if !is_qualified_key(key) {
                return Err(ContextError::InvalidAttributeKey { key: echo(key) });
            }
            let lower = key.to_ascii_lowercase();
            if seen.contains(&lower) {
                return Err(ContextError::DuplicateAttributeKey { key: echo(key) });
            }
            seen.push(lower);
            let Value::Object(pairs) = context else {
                return Err(ContextError::AttributesNotObject);
            };
            for (attribute, value) in pairs {
                if !is_identifier(attribute) {
                    return Err(ContextError::InvalidAttributeName {
                        key: echo(key),
                        attribute: echo(attribute),
                    });
                }
                let found = match value {
                    Value::String(s) if s.contains('\0') => Some("a string with a NUL character"),
                    Value::String(_) | Value::Number(_) | Value::Bool(_) => None,
                    Value::Null => Some("null"),
                    Value::Array(_) => Some("an array"),
                    Value::Object(_) => Some("an object"),
                };
                if let Some(found) = found {
                    return Err(ContextError::InvalidAttributeValue {
                        key: echo(key),
                        attribute: echo(attribute),
                        found,
                    });
                }
            }
        }
        Ok(Self(map))
    }

    /// Whether there are no attributes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `schema.context` keys.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// The attribute/value pairs of one `schema.context`.
    pub fn get(&self, key: &str) -> Option<&Map<String, Value>> {
        self.0.get(key).and_then(Value::as_object)
    }

    /// The attributes as JSON, exactly as given.
    pub fn as_json(&self) -> &Map<String, Value> {
        &self.0
    }

    /// Visits every attribute as its `schema.context` key, its name and its value: the
    /// parts of [`flattened`](Self::flattened), for a caller that writes them into a
    /// buffer of its own.
    pub(crate) fn each_flattened(&self, mut visit: impl FnMut(&str, &str, &Value)) {
        for (key, context) in &self.0 {
            for (attribute, value) in context.as_object().into_iter().flatten() {
                visit(key, attribute, value);
            }
        }
    }

    /// How many attributes [`flattened`](Self::flattened) yields.
    pub(crate) fn flattened_len(&self) -> usize {
        self.0
            .values()
            .map(|context| context.as_object().map_or(0, Map::len))
            .sum()
    }

    /// Every attribute as `("schema.context.attribute", text)`: strings as they are,
    /// numbers and booleans in their JSON spelling. This is the shape settings-based
    /// backends (PostgreSQL) expose to policies.
    pub fn flattened(&self) -> impl Iterator<Item = (String, String)> + '_ {
        self.0.iter().flat_map(|(key, context)| {
            context
                .as_object()
                .into_iter()
                .flatten()
                .map(move |(attribute, value)| {
                    // Built by hand, not by `format!`: this runs for every attribute of
                    // every checkout.
                    let mut name = String::with_capacity(key.len() + 1 + attribute.len());
                    name.push_str(key);
                    name.push('.');
                    name.push_str(attribute);
                    let text = match value {
                        Value::String(s) => s.clone(),
                        Value::Bool(true) => "true".to_owned(),
                        Value::Bool(false) => "false".to_owned(),
                        // A number (null, arrays and objects are refused at validation).
                        other => serde_json::to_string(other).unwrap_or_default(),
                    };
                    (name, text)
                })
        })
    }
}

impl TryFrom<Value> for Attributes {
    type Error = ContextError;
    fn try_from(value: Value) -> Result<Self, Self::Error> {
        Self::from_json(value)
    }
}

impl fmt::Debug for Attributes {
    /// Shows the keys only: attribute values may be personal data.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}
