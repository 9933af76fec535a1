//! Building and validating security contexts; secrets never show.

use ctxpool::context::{Attributes, ContextError, Field, MAX_ENCODED_LEN};
use ctxpool::{EndUserIdentity, SecurityContext};
use serde_json::json;

const TOKEN: &str = "SECRET-db-token-7f3a";
const USER_TOKEN: &str = "SECRET-user-token-91c2";
const KEY: &str = "SECRET-lookup-key-55e1";

fn alice() -> EndUserIdentity {
    EndUserIdentity::named("alice", Some(KEY.into()))
}

fn build(identity: EndUserIdentity, token: &str) -> Result<SecurityContext, ContextError> {
    SecurityContext::builder(identity, token).build()
}

#[test]
fn builds_the_reference_example() {
    let ctx = SecurityContext::builder(EndUserIdentity::token(USER_TOKEN), TOKEN)
        .data_roles(["hr_role"])
        .attributes(json!({"hr.hcm_context": {"emp_id": 3, "org_id": 5}}))
        .build()
        .unwrap();
    assert_eq!(ctx.data_roles(), ["hr_role"]);
    assert_eq!(ctx.attributes().get("hr.hcm_context").unwrap()["emp_id"], 3);
    let flat: Vec<_> = ctx.attributes().flattened().collect();
    assert_eq!(
        flat,
        [
            ("hr.hcm_context.emp_id".into(), "3".into()),
            ("hr.hcm_context.org_id".into(), "5".into())
        ]
    );
    assert!(ctx.encoded_len() > TOKEN.len() + USER_TOKEN.len());
}

#[test]
fn identity_and_token_must_be_real_text() {
    for (identity, field) in [
        (EndUserIdentity::token(""), Field::EndUserToken),
        (EndUserIdentity::token(" \t "), Field::EndUserToken),
        (EndUserIdentity::named("", None), Field::EndUserName),
        (EndUserIdentity::named("  ", None), Field::EndUserName),
        (
            EndUserIdentity::named("bob", Some(String::new())),
            Field::EndUserKey,
        ),
    ] {
        assert_eq!(
            build(identity, TOKEN).unwrap_err(),
            ContextError::Empty(field)
        );
    }
    assert_eq!(
        build(alice(), "   ").unwrap_err(),
        ContextError::Empty(Field::DatabaseAccessToken)
    );
    assert_eq!(
        build(alice(), "abc\0def").unwrap_err(),
        ContextError::ControlCharacter(Field::DatabaseAccessToken)
    );
    assert_eq!(
        build(EndUserIdentity::named("bob\nevil", None), TOKEN).unwrap_err(),
        ContextError::ControlCharacter(Field::EndUserName)
    );
    let long = "x".repeat(257);
    assert!(matches!(
        build(EndUserIdentity::named(long, None), TOKEN).unwrap_err(),
        ContextError::TooLong {
            field: Field::EndUserName,
            len: 257,
            max: 256
        }
    ));
}

#[test]
fn data_roles_are_identifiers_without_repeats() {
    let base = || SecurityContext::builder(alice(), TOKEN);
    for bad in ["", "1role", "hr-role", "hr role", "r\"; drop", "ä"] {
        assert_eq!(
            base().data_roles(["ok", bad]).build().unwrap_err(),
            ContextError::InvalidDataRole(Field::DataRole(1)),
            "{bad:?}"
        );
    }
    assert_eq!(
        base()
            .data_roles(["hr_role", "HR_ROLE"])
            .build()
            .unwrap_err(),
        ContextError::DuplicateDataRole(Field::DataRole(1))
    );
    assert!(matches!(
        base().data_roles(["r".repeat(129)]).build().unwrap_err(),
        ContextError::TooLong {
            field: Field::DataRole(0),
            ..
        }
    ));
    assert!(base().data_roles(["_r$1", "Reader"]).build().is_ok());
}

#[test]
fn attributes_are_checked() {
    let attrs = |v| Attributes::from_json(v).unwrap_err();
    assert_eq!(attrs(json!([1])), ContextError::AttributesNotObject);
    assert_eq!(
        attrs(json!({"hr.ctx": 3})),
        ContextError::AttributesNotObject
    );
    for key in ["hr", "hr.ctx.extra", ".ctx", "hr.", "1hr.ctx", "hr.c-tx"] {
        assert!(
            matches!(
                attrs(json!({key: {}})),
                ContextError::InvalidAttributeKey { .. }
            ),
            "{key}"
        );
    }
    assert!(matches!(
        attrs(json!({"hr.ctx": {}, "HR.CTX": {}})),
        ContextError::DuplicateAttributeKey { .. }
    ));
    assert!(matches!(
        attrs(json!({"hr.ctx": {"emp-id": 1}})),
        ContextError::InvalidAttributeName { .. }
    ));
    for (value, found) in [
        (json!(null), "null"),
        (json!([1]), "an array"),
        (json!({"a": 1}), "an object"),
        (json!("a\u{0}b"), "a string with a NUL character"),
    ] {
        assert_eq!(
            attrs(json!({"hr.ctx": {"a": value}})),
            ContextError::InvalidAttributeValue {
                key: "hr.ctx".into(),
                attribute: "a".into(),
                found
            }
        );
    }
    let ok = Attributes::from_json(json!({"hr.ctx": {"s": "x", "n": 1.5, "b": true}})).unwrap();
    let mut flat: Vec<_> = ok.flattened().collect();
    flat.sort();
    assert_eq!(
        flat,
        [
            ("hr.ctx.b".into(), "true".into()),
            ("hr.ctx.n".into(), "1.5".into()),
            ("hr.ctx.s".into(), "x".into())
        ]
    );
}

#[test]
fn hostile_keys_are_shortened_in_errors() {
    let key = format!("{}.x-", "k".repeat(10_000));
    let err = Attributes::from_json(json!({ key: {} })).unwrap_err();
    assert!(err.to_string().len() < 200, "{err}");
    // Characters that escape to many bytes each (found by the fuzz target's bound).
    let wide = "\u{E0001}".repeat(64);
    for attrs in [
        json!({ wide.clone(): {"a": 1} }),
        json!({"s.c": { wide.clone(): 1 }}),
    ] {
        let err = Attributes::from_json(attrs).unwrap_err().to_string();
        assert!(err.len() < 200, "{} bytes: {err}", err.len());
        assert!(!err.contains('\u{E0001}'), "printed escaped");
    }
}

#[test]
fn encoded_size_is_capped_at_65535() {
    let value = "v".repeat(MAX_ENCODED_LEN);
    let err = SecurityContext::builder(alice(), TOKEN)
        .attributes(json!({"hr.ctx": {"big": value}}))
        .build()
        .unwrap_err();
    assert!(matches!(
        err,
        ContextError::TooLarge {
            max: MAX_ENCODED_LEN,
            ..
        }
    ));

    // Just under the limit builds, one byte more does not.
    let probe = SecurityContext::builder(alice(), TOKEN)
        .attributes(json!({"hr.ctx": {"big": ""}}))
        .build()
        .unwrap();
    let room = MAX_ENCODED_LEN - probe.encoded_len();
    let fits = SecurityContext::builder(alice(), TOKEN)
        .attributes(json!({"hr.ctx": {"big": "v".repeat(room)}}))
        .build()
        .unwrap();
    assert_eq!(fits.encoded_len(), MAX_ENCODED_LEN);
    assert!(
        SecurityContext::builder(alice(), TOKEN)
            .attributes(json!({"hr.ctx": {"big": "v".repeat(room + 1)}}))
            .build()
            .is_err()
    );
}

#[test]
fn copies_replace_one_part_and_revalidate() {
    let ctx = SecurityContext::builder(alice(), TOKEN)
        .data_roles(["a"])
        .build()
        .unwrap();
    let clone = ctx.clone();
    assert!(clone.ptr_eq(&ctx));

    let roles = ctx.with_data_roles(["b", "c"]).unwrap();
    assert_eq!(roles.data_roles(), ["b", "c"]);
    assert_eq!(ctx.data_roles(), ["a"], "the original is unchanged");
    assert_ne!(roles, ctx);

    let attrs = ctx.with_attributes(json!({"s.c": {"k": 1}})).unwrap();
    assert_eq!(attrs.attributes().keys().collect::<Vec<_>>(), ["s.c"]);

    let token = ctx.with_database_access_token("other-token").unwrap();
    assert_ne!(token, ctx);
    assert_eq!(token.with_database_access_token(TOKEN).unwrap(), ctx);

    assert!(ctx.with_data_roles(["bad role"]).is_err());
    assert!(ctx.with_database_access_token("").is_err());
    assert!(ctx.with_attributes(json!({"nodot": {}})).is_err());
}

#[test]
fn secrets_never_show() {
    let ctx = SecurityContext::builder(EndUserIdentity::token(USER_TOKEN), TOKEN)
        .build()
        .unwrap();
    let named = SecurityContext::builder(alice(), TOKEN).build().unwrap();
    let builder = SecurityContext::builder(alice(), TOKEN);
    let shown = [
        format!("{ctx:?}"),
        format!("{ctx}"),
        format!("{named:?}"),
        format!("{named}"),
        format!("{builder:?}"),
        format!("{:?}", alice()),
        format!("{}", alice()),
        format!("{:?}", EndUserIdentity::token(USER_TOKEN)),
        // Errors about secrets name the field only.
        build(EndUserIdentity::token(format!("{USER_TOKEN}\n")), TOKEN)
            .unwrap_err()
            .to_string(),
        build(alice(), &format!("{TOKEN}\u{7}"))
            .unwrap_err()
            .to_string(),
        build(EndUserIdentity::named("a", Some(format!("{KEY}\0"))), TOKEN)
            .unwrap_err()
            .to_string(),
    ];
    for text in shown {
        assert!(!text.contains("SECRET"), "a secret shows in {text:?}");
    }
}

#[test]
fn contexts_are_send_sync_and_cheap() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<SecurityContext>();
    assert_send_sync::<EndUserIdentity>();
    assert_eq!(
        std::mem::size_of::<SecurityContext>(),
        std::mem::size_of::<usize>()
    );
}
