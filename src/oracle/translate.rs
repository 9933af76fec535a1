//! ctxpool's [`SecurityContext`] → the driver's `EndUserSecurityContext`.
//!
//! Two steps, both pure: [`plan`] lays the context out in the driver's terms (which
//! identity variant, which optional parts), and [`translate`] has the driver validate and
//! encode it to OSON, the bytes it piggybacks on every call. The split lets tests look at
//! the first step's output, since the driver's encoded form is opaque.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use oracledb::{JsonValue, OracleNumber};
use secrecy::ExposeSecret;
use serde_json::Value;

use super::error::{OracleError, Redacted};
use crate::context::{MAX_ENCODED_LEN, SecurityContext};

/// A context translated and encoded for the driver, ready to be set on a connection.
///
/// Cheap to clone. Its `Debug` shows only whose context it is.
#[derive(Clone)]
pub struct DriverContext {
    encoded: Arc<oracledb::EndUserSecurityContext>,
    summary: Arc<str>,
}

impl DriverContext {
    /// The driver's context (cloned: the driver takes it by value).
    pub fn to_driver(&self) -> oracledb::EndUserSecurityContext {
        (*self.encoded).clone()
    }

    /// Whose context this is, without secrets (e.g. `user "alice"`, `token user`).
    pub fn summary(&self) -> &str {
        &self.summary
    }
}

impl fmt::Debug for DriverContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DriverContext")
            .field("end_user", &self.summary)
            .field("encoded", &Redacted)
            .finish()
    }
}

/// The driver's identity variant, before encoding.
#[derive(Clone, PartialEq)]
pub(crate) enum PlannedIdentity {
    Token(String),
    DatabaseUser { name: String, key: Option<String> },
}

/// A context laid out in the driver's terms. Holds secrets: `Debug` redacts them.
#[derive(Clone)]
pub(crate) struct Plan {
    pub(crate) identity: PlannedIdentity,
    pub(crate) database_access_token: String,
    /// `None` when the context has no data roles: the payload then omits the field,
    /// as python-oracledb does.
    pub(crate) data_roles: Option<Vec<String>>,
    /// `None` when the context has no attributes. Keys are `schema.context` names, each
    /// value the JSON object of its attribute/value pairs.
    pub(crate) attributes: Option<HashMap<String, JsonValue>>,
}

impl fmt::Debug for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let identity: &dyn fmt::Debug = match &self.identity {
            PlannedIdentity::Token(_) => &"Token(<redacted>)",
            PlannedIdentity::DatabaseUser { name, .. } => name,
        };
        f.debug_struct("Plan")
            .field("identity", identity)
            .field("database_access_token", &Redacted)
            .field("data_roles", &self.data_roles)
            .field(
                "attributes",
                &self
                    .attributes
                    .as_ref()
                    .map(|a| a.keys().collect::<Vec<_>>()),
            )
            .finish()
    }
}

/// Lays `context` out in the driver's terms. Never fails: ctxpool validated it.
pub(crate) fn plan(context: &SecurityContext) -> Plan {
    let id = context.identity();
    let identity = match (id.token_secret(), id.name()) {
        (Some(token), _) => PlannedIdentity::Token(token.expose_secret().to_owned()),
        (None, name) => PlannedIdentity::DatabaseUser {
            name: name.unwrap_or_default().to_owned(),
            key: id.key_secret().map(|k| k.expose_secret().to_owned()),
        },
    };
    let roles = context.data_roles();
    let attrs = context.attributes();
    Plan {
        identity,
        database_access_token: context.database_access_token().expose_secret().to_owned(),
        data_roles: (!roles.is_empty()).then(|| roles.to_vec()),
        attributes: (!attrs.is_empty()).then(|| {
            attrs
                .as_json()
                .iter()
                .map(|(key, pairs)| (key.clone(), json_value(pairs)))
                .collect()
        }),
    }
}

/// serde JSON → the driver's JSON. Validated attributes hold only objects of strings,
/// numbers and booleans; the rest is mapped anyway so that this never fails.
///
/// Integers become Oracle `NUMBER`s (exact), other numbers `BINARY_DOUBLE` (the driver's
/// `NUMBER` parser takes no exponent and at most 40 digits, so a float's text cannot be
/// handed to it safely).
fn json_value(value: &Value) -> JsonValue {
    match value {
        Value::Null => JsonValue::Null,
        Value::Bool(b) => JsonValue::Boolean(*b),
        Value::String(s) => JsonValue::String(s.clone()),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                JsonValue::Number(OracleNumber::from(i))
            } else if let Some(u) = n.as_u64() {
                JsonValue::Number(OracleNumber::from(u))
            } else {
                JsonValue::BinaryDouble(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::Array(items) => JsonValue::JsonArray(items.iter().map(json_value).collect()),
        Value::Object(map) => JsonValue::JsonObject(
            map.iter()
                .map(|(k, v)| (k.clone(), json_value(v)))
                .collect(),
        ),
    }
}

/// Encodes a plan with the driver's own builder, so the driver's validation and its
/// 65,535-byte limit on the encoded payload apply exactly as they would on a direct call.
pub(crate) fn encode(plan: Plan, summary: &str) -> Result<DriverContext, OracleError> {
    let identity = match plan.identity {
        PlannedIdentity::Token(token) => oracledb::EndUserIdentity::Token(token),
        PlannedIdentity::DatabaseUser { name, key } => {
            oracledb::EndUserIdentity::DatabaseUser { name, key }
        }
    };
    let mut builder =
        oracledb::EndUserSecurityContext::builder(identity, plan.database_access_token);
    if let Some(roles) = plan.data_roles {
        builder = builder.data_roles(roles);
    }
    if let Some(attributes) = plan.attributes {
        builder = builder.attributes(attributes);
    }
    let encoded = builder.build().map_err(OracleError::from_driver)?;
    Ok(DriverContext {
        encoded: Arc::new(encoded),
        summary: Arc::from(summary),
    })
}

/// Translates a ctxpool context into the driver's, encoded and checked against the
/// driver's size limit. Pure (no I/O); fails with [`OracleError::ContextTooLarge`] when
/// the driver's encoding exceeds 65,535 bytes.
pub fn translate(context: &SecurityContext) -> Result<DriverContext, OracleError> {
    // ctxpool measures its own JSON encoding against the same limit at build time; the
    // driver's OSON encoding differs in size, so the driver's check is the one that counts.
    debug_assert!(context.encoded_len() <= MAX_ENCODED_LEN);
    encode(plan(context), &context.identity().to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::EndUserIdentity;
    use serde_json::json;

    fn ctx(identity: EndUserIdentity) -> crate::context::SecurityContextBuilder {
        SecurityContext::builder(identity, "db-token-SECRET")
    }

    #[test]
    fn token_identity() {
        let c = ctx(EndUserIdentity::token("eu-token-SECRET"))
            .build()
            .unwrap();
        let p = plan(&c);
        assert!(p.identity == PlannedIdentity::Token("eu-token-SECRET".into()));
        assert_eq!(p.database_access_token, "db-token-SECRET");
        assert_eq!(p.data_roles, None);
        assert!(p.attributes.is_none());
        let d = translate(&c).unwrap();
        assert_eq!(d.summary(), "token user");
    }

    #[test]
    fn named_identity_without_and_with_key() {
        let c = ctx(EndUserIdentity::named("alice", None)).build().unwrap();
        assert!(
            plan(&c).identity
                == PlannedIdentity::DatabaseUser {
                    name: "alice".into(),
                    key: None
                }
        );
        translate(&c).unwrap();

        let c = ctx(EndUserIdentity::named("alice", Some("key-SECRET".into())))
            .build()
            .unwrap();
        assert!(
            plan(&c).identity
                == PlannedIdentity::DatabaseUser {
                    name: "alice".into(),
                    key: Some("key-SECRET".into())
                }
        );
        assert_eq!(translate(&c).unwrap().summary(), "user \"alice\"");
    }

    #[test]
    fn data_roles_keep_their_order() {
        let c = ctx(EndUserIdentity::named("bob", None))
            .data_roles(["hr_manager", "hr_employee"])
            .build()
            .unwrap();
        assert_eq!(
            plan(&c).data_roles,
            Some(vec!["hr_manager".to_string(), "hr_employee".to_string()])
        );
        translate(&c).unwrap();
    }

    #[test]
    fn attributes_become_named_contexts_of_typed_values() {
        let c = ctx(EndUserIdentity::named("dana", None))
            .attributes(json!({
                "hr.hcm_context": {"emp_id": 3, "org_id": 5, "big": u64::MAX, "neg": -7,
                                    "ratio": 0.5, "huge": 1e300, "name": "Dana", "admin": false},
                "hr.other": {"x": "y"}
            }))
            .build()
            .unwrap();
        let attrs = plan(&c).attributes.unwrap();
        assert_eq!(attrs.len(), 2);
        let JsonValue::JsonObject(hcm) = &attrs["hr.hcm_context"] else {
            panic!("not an object")
        };
        let number = |k: &str| match &hcm[k] {
            JsonValue::Number(n) => n.to_string(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(number("emp_id"), "3");
        assert_eq!(number("org_id"), "5");
        assert_eq!(number("big"), u64::MAX.to_string());
        assert_eq!(number("neg"), "-7");
        assert!(matches!(hcm["ratio"], JsonValue::BinaryDouble(r) if r == 0.5));
        assert!(matches!(hcm["huge"], JsonValue::BinaryDouble(r) if r == 1e300));
        assert!(matches!(&hcm["name"], JsonValue::String(s) if s == "Dana"));
        assert!(matches!(hcm["admin"], JsonValue::Boolean(false)));
        translate(&c).unwrap();
    }

    #[test]
    fn debug_of_plan_and_context_redacts_secrets() {
        let c = ctx(EndUserIdentity::named("alice", Some("key-SECRET".into())))
            .attributes(json!({"hr.ctx": {"ssn": "123-SECRET"}}))
            .build()
            .unwrap();
        let text = format!("{:?} {:?}", plan(&c), translate(&c).unwrap());
        assert!(!text.contains("SECRET"), "{text}");
        assert!(text.contains("alice"));
        let t = ctx(EndUserIdentity::token("eu-token-SECRET"))
            .build()
            .unwrap();
        let text = format!("{:?} {:?}", plan(&t), translate(&t).unwrap());
        assert!(!text.contains("SECRET"), "{text}");
    }

    /// A token context padded so that ctxpool's JSON encoding is exactly `json_len` bytes.
    fn padded_token(json_len: usize) -> Result<SecurityContext, crate::ContextError> {
        let probe = ctx(EndUserIdentity::token("x")).build()?;
        let pad = json_len - probe.encoded_len() + 1;
        ctx(EndUserIdentity::token("x".repeat(pad))).build()
    }

    #[test]
    fn the_limit_agrees_with_the_drivers() {
        // Both limits are 65,535 bytes, but of different encodings: ctxpool measures its
        // JSON when the context is built, the driver its OSON payload when translating.
        // One byte more than the largest context ctxpool builds is refused by ctxpool:
        assert!(matches!(
            padded_token(MAX_ENCODED_LEN + 1),
            Err(crate::ContextError::TooLarge { max: 65_535, .. })
        ));
        // Near the limit the driver's encoding of a token context is a few bytes larger,
        // so the driver's check is the one that bites first, and translation reports it
        // as the typed error, at attach time, before any I/O.
        let max = padded_token(MAX_ENCODED_LEN).unwrap();
        assert_eq!(max.encoded_len(), MAX_ENCODED_LEN);
        assert!(matches!(
            translate(&max),
            Err(OracleError::ContextTooLarge { max: 65_535, size }) if size > 65_535
        ));
        // Find the driver's boundary: the largest padding it accepts. At one byte more it
        // refuses with exactly 65,536 bytes, i.e. its limit is 65,535 inclusive, as ours.
        let fits = |len: usize| translate(&padded_token(len).unwrap()).is_ok();
        let mut len = MAX_ENCODED_LEN;
        while !fits(len) {
            len -= 1;
            assert!(
                len > MAX_ENCODED_LEN - 64,
                "the encodings differ by more than 64 bytes"
            );
        }
        match translate(&padded_token(len + 1).unwrap()) {
            Err(OracleError::ContextTooLarge { size, max }) => {
                assert_eq!((size, max), (65_536, 65_535));
            }
            other => panic!("{other:?}"),
        }
        // And the driver's own builder, given the same parts directly, agrees.
        let direct = |pad: usize| {
            let probe = padded_token(pad).unwrap();
            let p = plan(&probe);
            let PlannedIdentity::Token(t) = p.identity else {
                unreachable!()
            };
            oracledb::EndUserSecurityContext::new(
                oracledb::EndUserIdentity::Token(t),
                p.database_access_token,
            )
            .is_ok()
        };
        assert!(direct(len));
        assert!(!direct(len + 1));
    }

    #[test]
    fn a_context_the_driver_finds_too_large_is_a_typed_error() {
        // ctxpool's JSON measure and the driver's OSON encoding differ: many tiny
        // attributes cost more in OSON (a field name, a node and an offset each).
        let c = tests_support::too_large_for_driver();
        assert!(c.encoded_len() <= MAX_ENCODED_LEN);
        match translate(&c) {
            Err(OracleError::ContextTooLarge { size, max }) => {
                assert_eq!(max, 65_535);
                assert!(size > max);
            }
            other => panic!("{other:?}"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests_support {
    use super::*;
    use crate::EndUserIdentity;

    /// A context ctxpool accepts (its JSON is within 65,535 bytes) whose driver encoding
    /// is over the limit.
    pub(crate) fn too_large_for_driver() -> SecurityContext {
        for n in (1_000..9_000).step_by(100) {
            let pairs: serde_json::Map<String, Value> =
                (0..n).map(|i| (format!("a{i}"), Value::from(1))).collect();
            let Ok(c) = SecurityContext::builder(EndUserIdentity::named("u", None), "t")
                .attributes(serde_json::json!({"s.c": pairs}))
                .build()
            else {
                break;
            };
            if matches!(translate(&c), Err(OracleError::ContextTooLarge { .. })) {
                return c;
            }
        }
        panic!("every context ctxpool accepts also fits the driver's limit");
    }
}
