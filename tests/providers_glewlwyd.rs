//! The OCI token source against Glewlwyd 2.7 (tests/support/glewlwyd.rs), an OAuth 2
//! server independent of oidc-provider whose errors do not follow RFC 6749: a wrong
//! secret or an unknown client is a bare 403. One server for the binary, in one test.
#![cfg(feature = "providers")]
#![allow(clippy::unwrap_used)]

#[path = "support/glewlwyd.rs"]
mod glewlwyd;

use std::time::Duration;

use ctxpool::ProviderError;
use ctxpool::providers::config::EndUserSecParams;
use ctxpool::providers::token_source::{HttpOptions, HttpTokenSource, TokenSource};
use serde_json::json;

fn source(spi: &str, authority: &str, client: &str, secret: &str) -> HttpTokenSource {
    with_block(spi, authority, client, secret, json!({}))
}

/// A source whose block has the `extra` keys too.
fn with_block(
    spi: &str,
    authority: &str,
    client: &str,
    secret: &str,
    extra: serde_json::Value,
) -> HttpTokenSource {
    let mut block = json!({
        "spi_type": spi, "auth_flow": "client_credentials", "authority": authority,
        "client_id": client, "client_credential": secret, "scopes": "db",
    });
    for (key, value) in extra.as_object().unwrap() {
        block[key] = value.clone();
    }
    let params = EndUserSecParams::from_json(&block.to_string()).unwrap();
    let options = HttpOptions {
        base_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        ..HttpOptions::default()
    };
    HttpTokenSource::new(&params, options).unwrap()
}

async fn refused(source: &HttpTokenSource) -> (u16, Option<String>) {
    let error = source.fetch(None, None).await.unwrap_err();
    let text = error.to_string();
    eprintln!("user sees: {text}");
    assert!(!text.contains("secret"), "{text}");
    match error {
        ProviderError::Refused { status, code } => (status, code),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn oci_client_credentials_and_off_spec_refusals() {
    let server = glewlwyd::Glewlwyd::start().await;
    server
        .client("oci-app", "plain-Secret-1", &["client_credentials"])
        .await;
    server
        .client("odd-app", "a+b/c=d%e f", &["client_credentials"])
        .await;
    server
        .client("code-only", "plain-Secret-1", &["code"])
        .await;
    let authority = server.authority();

    let token = source("oci_tokens", &authority, "oci-app", "plain-Secret-1")
        .fetch(None, None)
        .await
        .unwrap();
    assert_eq!(token.expires_in, Duration::from_secs(300));

    // A wrong secret and an unknown client: a bare 403 without an OAuth body is a
    // refusal, not an outage, and is not retried.
    assert_eq!(
        refused(&source("oci_tokens", &authority, "oci-app", "wrong")).await,
        (403, None)
    );
    assert_eq!(
        refused(&source("oci_tokens", &authority, "nobody", "x")).await,
        (403, None)
    );
    // Client credentials not allowed for the client.
    assert_eq!(
        refused(&source(
            "oci_tokens",
            &authority,
            "code-only",
            "plain-Secret-1"
        ))
        .await,
        (400, Some("authorization_type_invalid".to_owned()))
    );
    // Glewlwyd takes the Basic credentials without form-decoding them (RFC 6749 §2.3.1
    // says to form-encode them): a secret with `+ / = %` and a space, sent as the RFC
    // says, is refused by it, while oidc-provider accepts it (tests/providers_idp.rs).
    assert_eq!(
        refused(&source("oci_tokens", &authority, "odd-app", "a+b/c=d%e f")).await,
        (403, None)
    );
    // The extension key for such servers: the credentials as they are.
    let raw = json!({"basic_auth_encoding": "raw"});
    with_block("oci_tokens", &authority, "odd-app", "a+b/c=d%e f", raw)
        .fetch(None, None)
        .await
        .unwrap();
}
