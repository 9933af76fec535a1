//! `end_user_sec_params` loading and the HTTP token sources (Entra ID, OCI IAM) against a
//! local mock token endpoint.
#![cfg(feature = "providers")]
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ctxpool::ProviderError;
use ctxpool::providers::config::{AuthFlow, ConfigError, EndUserSecParams, SpiType};
use ctxpool::providers::token_source::{HttpOptions, HttpTokenSource, TokenSource};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use wiremock::matchers::{body_string_contains, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const SECRET: &str = "s3cr3t-Cl13nt-Credential";
const ASSERTION: &str = "eyJ-end-user-assertion-token";
const TOKEN: &str = "db-access-token-XYZ";

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

fn block(spi_type: &str, auth_flow: &str, authority: &str) -> serde_json::Value {
    json!({
        "spi_type": spi_type,
        "auth_flow": auth_flow,
        "authority": authority,
        "client_id": "my-app",
        "client_credential": SECRET,
        "scopes": "https://db.example.com/.default",
    })
}

fn entra_cc_json() -> serde_json::Value {
    block(
        "azure_tokens",
        "client_credentials",
        "https://login.microsoftonline.com/tenant",
    )
}

fn load_json(value: &serde_json::Value) -> Result<EndUserSecParams, ConfigError> {
    EndUserSecParams::from_json(&value.to_string())
}

/// Asserts that loading `value` fails with a message naming `key` and not the secret.
fn assert_json_error(value: &serde_json::Value, key: &str) -> ConfigError {
    let error = load_json(value).unwrap_err();
    let message = error.to_string();
    assert!(message.contains(key), "{message:?} does not name {key}");
    assert_no_secret(&message);
    assert_no_secret(&format!("{error:?}"));
    error
}

fn assert_no_secret(text: &str) {
    assert!(!text.contains(SECRET), "secret leaked: {text}");
    assert!(!text.contains(ASSERTION), "assertion leaked: {text}");
    assert!(!text.contains(TOKEN), "token leaked: {text}");
}

#[test]
fn json_bare_and_nested() {
    let bare = entra_cc_json();
    let nested = json!({ "end_user_sec_params": bare.clone() });
    let extra = json!({ "extra_auth_params": { "end_user_sec_params": bare.clone() } });
    for value in [&bare, &nested, &extra] {
        let params = load_json(value).unwrap();
        assert_eq!(params.spi_type(), SpiType::AzureTokens);
        assert_eq!(params.auth_flow(), AuthFlow::ClientCredentials);
        assert_eq!(
            params.authority(),
            "https://login.microsoftonline.com/tenant"
        );
        assert_eq!(params.client_id(), "my-app");
        assert_eq!(params.client_credential().expose_secret(), SECRET);
        assert_eq!(params.scopes(), ["https://db.example.com/.default"]);
        assert_eq!(params.data_roles(), None);
        assert_eq!(params.attributes(), None);
        assert_no_secret(&format!("{params:?}"));
    }
}

#[test]
fn json_full_block_with_roles_attributes_and_scope_list() {
    let mut value = entra_cc_json();
    value["auth_flow"] = json!("on_behalf_of");
    value["scopes"] = json!(["api://db/.default", "offline_access"]);
    value["data_roles"] = json!(["hr_role"]);
    value["attributes"] = json!({ "hr.hcm_context": { "emp_id": 3, "org_id": 5 } });
    let params = load_json(&value).unwrap();
    assert_eq!(params.auth_flow(), AuthFlow::OnBehalfOf);
    assert_eq!(params.scopes(), ["api://db/.default", "offline_access"]);
    assert_eq!(params.data_roles().unwrap(), ["hr_role"]);
    assert_eq!(
        params.attributes().unwrap(),
        &json!({ "hr.hcm_context": { "emp_id": 3, "org_id": 5 } })
    );
    let debug = format!("{params:?}");
    assert_no_secret(&debug);
    assert!(debug.contains("<redacted>"));
    // Attribute values may be personal data: Debug shows keys only.
    assert!(debug.contains("hr.hcm_context"));
    assert!(!debug.contains("emp_id"));
}

#[test]
fn space_separated_scope_string_is_split() {
    let mut value = entra_cc_json();
    value["scopes"] = json!("a/.default  b");
    assert_eq!(load_json(&value).unwrap().scopes(), ["a/.default", "b"]);
}

const TOML_BLOCK: &str = r#"
spi_type = "oci_tokens"
auth_flow = "client_credentials"
authority = "https://idcs-example.identity.oraclecloud.com"
client_id = "my-app"
client_credential = "s3cr3t-Cl13nt-Credential"
scopes = ["urn:opc:idm:__myscopes__"]
data_roles = ["hr_role"]

[attributes."hr.hcm_context"]
emp_id = 3
org_id = 5
"#;

#[test]
fn toml_bare_and_nested() {
    let nested = TOML_BLOCK
        .replace("[attributes.", "[end_user_sec_params.attributes.")
        .replacen('\n', "\n[end_user_sec_params]\n", 1);
    let extra = TOML_BLOCK
        .replace(
            "[attributes.",
            "[extra_auth_params.end_user_sec_params.attributes.",
        )
        .replacen('\n', "\n[extra_auth_params.end_user_sec_params]\n", 1);
    for text in [TOML_BLOCK, &nested, &extra] {
        let params = EndUserSecParams::from_toml(text).unwrap();
        assert_eq!(params.spi_type(), SpiType::OciTokens);
        assert_eq!(params.auth_flow(), AuthFlow::ClientCredentials);
        assert_eq!(params.client_credential().expose_secret(), SECRET);
        assert_eq!(params.scopes(), ["urn:opc:idm:__myscopes__"]);
        assert_eq!(params.data_roles().unwrap(), ["hr_role"]);
        assert_eq!(
            params.attributes().unwrap(),
            &json!({ "hr.hcm_context": { "emp_id": 3, "org_id": 5 } })
        );
        assert_no_secret(&format!("{params:?}"));
    }
    // A single scope string, as in the reference's examples.
    let single = TOML_BLOCK.replace(
        r#"scopes = ["urn:opc:idm:__myscopes__"]"#,
        r#"scopes = "urn:opc:idm:__myscopes__""#,
    );
    let params = EndUserSecParams::from_toml(&single).unwrap();
    assert_eq!(params.scopes(), ["urn:opc:idm:__myscopes__"]);
}

#[test]
fn toml_errors_name_the_key_and_never_quote_the_secret() {
    // A syntax error on the credential's own line: toml's Display would quote the line.
    let broken = TOML_BLOCK.replace(
        &format!(r#"client_credential = "{SECRET}""#),
        &format!(r#"client_credential = "{SECRET}"#),
    );
    let error = EndUserSecParams::from_toml(&broken).unwrap_err();
    assert!(matches!(error, ConfigError::Invalid { .. }), "{error:?}");
    assert_no_secret(&error.to_string());
    assert_no_secret(&format!("{error:?}"));

    let unknown = format!("{TOML_BLOCK}\n[extra]\nx = 1\n");
    let error = EndUserSecParams::from_toml(&unknown).unwrap_err();
    assert!(error.to_string().contains("extra"), "{error}");
    assert_no_secret(&error.to_string());

    let on_behalf = TOML_BLOCK.replace("\"client_credentials\"", "\"on_behalf_of\"");
    let error = EndUserSecParams::from_toml(&on_behalf).unwrap_err();
    assert!(matches!(error, ConfigError::UnsupportedFlow { .. }));
    assert!(error.to_string().contains("auth_flow"), "{error}");
    assert_no_secret(&error.to_string());
}

#[test]
fn json_errors_name_their_key() {
    let with = |key: &str, v: serde_json::Value| {
        let mut value = entra_cc_json();
        value[key] = v;
        value
    };
    let without = |key: &str| {
        let mut value = entra_cc_json();
        value.as_object_mut().unwrap().remove(key);
        value
    };

    assert_json_error(&with("spi_type", json!("google_tokens")), "spi_type");
    assert_json_error(&with("auth_flow", json!("password")), "auth_flow");
    let mut oci_obo = block(
        "oci_tokens",
        "on_behalf_of",
        "https://idcs-example.identity.oraclecloud.com",
    );
    assert!(matches!(
        assert_json_error(&oci_obo, "auth_flow"),
        ConfigError::UnsupportedFlow { .. }
    ));
    oci_obo["auth_flow"] = json!("client_credentials");
    load_json(&oci_obo).unwrap();

    for key in [
        "spi_type",
        "auth_flow",
        "authority",
        "client_id",
        "client_credential",
        "scopes",
    ] {
        assert_json_error(&without(key), key);
    }
    assert_json_error(&with("client_id", json!("  ")), "client_id");
    assert_json_error(&with("client_credential", json!("")), "client_credential");
    assert_json_error(&with("scopes", json!([])), "scopes");
    assert_json_error(&with("scopes", json!("")), "scopes");
    assert_json_error(&with("scopes", json!(["a", ""])), "scopes");
    assert_json_error(&with("scopes", json!(5)), "scopes");
    assert_json_error(&with("data_roles", json!([""])), "data_roles");
    assert_json_error(&with("data_roles", json!("hr_role")), "data_roles");
    assert_json_error(&with("attributes", json!(["x"])), "attributes");
    assert_json_error(
        &with("attributes", json!({ "nodot": { "a": 1 } })),
        "attributes",
    );
    assert_json_error(
        &with("attributes", json!({ "hr.ctx": { "a": { "nested": 1 } } })),
        "attributes",
    );
    // Wrong types and unknown keys come from serde, which names the key or the value.
    assert_json_error(&with("client_id", json!(5)), "client_id");
    assert_json_error(&with("client_credential", json!(5)), "client_credential");
    assert_json_error(&with("extra_key", json!(1)), "extra_key");
    assert_json_error(
        &json!({ "extra_auth_params": { "other": {} } }),
        "end_user_sec_params",
    );
    assert_json_error(&json!({ "extra_auth_params": 5 }), "extra_auth_params");
    assert!(load_json(&json!([1])).is_err());
    assert_no_secret(
        &EndUserSecParams::from_json(&format!("{{\"client_credential\": \"{SECRET}\""))
            .unwrap_err()
            .to_string(),
    );
}

#[test]
fn authority_must_be_https_except_loopback() {
    let cases = [
        ("http://login.microsoftonline.com/tenant", false),
        ("ftp://login.microsoftonline.com/tenant", false),
        ("not a url", false),
        ("", false),
        ("https://user:pw@login.example.com/tenant", false),
        ("https://login.example.com/tenant?x=1", false),
        ("https://login.example.com/tenant", true),
        ("http://127.0.0.1:8080/tenant", true),
        ("http://localhost:8080", true),
        ("http://[::1]:8080/", true),
        // One loopback rule for the block and the validator: any loopback address.
        ("http://127.0.0.2:8080/", true),
        ("http://127.0.0.1.example.com/", false),
        ("http://localhost.example.com/", false),
        ("http://[::2]:8080/", false),
    ];
    for (authority, ok) in cases {
        let value = block("azure_tokens", "client_credentials", authority);
        match load_json(&value) {
            Ok(_) => assert!(ok, "{authority} was accepted"),
            Err(error) => {
                assert!(!ok, "{authority} was refused: {error}");
                assert!(error.to_string().contains("authority"), "{error}");
                assert!(!error.to_string().contains("pw@"), "{error}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Token sources
// ---------------------------------------------------------------------------------------

fn fast_options() -> HttpOptions {
    HttpOptions {
        connect_timeout: Duration::from_secs(2),
        total_timeout: Duration::from_secs(5),
        max_retries: 3,
        base_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        ..HttpOptions::default()
    }
}

fn source(
    spi_type: &str,
    auth_flow: &str,
    authority: &str,
    options: HttpOptions,
) -> HttpTokenSource {
    let params = load_json(&block(spi_type, auth_flow, authority)).unwrap();
    HttpTokenSource::new(&params, options).unwrap()
}

fn entra(server: &MockServer, auth_flow: &str) -> HttpTokenSource {
    source(
        "azure_tokens",
        auth_flow,
        &format!("{}/tenant", server.uri()),
        fast_options(),
    )
}

fn token_body() -> serde_json::Value {
    json!({ "token_type": "Bearer", "access_token": TOKEN, "expires_in": 3599 })
}

fn assertion() -> SecretString {
    SecretString::from(ASSERTION)
}

/// Asserts that `error` is Unavailable and leaks nothing, and shows it as the user sees it.
fn assert_unavailable(error: &ProviderError) {
    eprintln!("user sees: {error}");
    assert!(matches!(error, ProviderError::Unavailable(_)), "{error:?}");
    assert_no_secret(&error.to_string());
    assert_no_secret(&format!("{error:?}"));
}

const ENTRA_PATH: &str = "/tenant/oauth2/v2.0/token";

#[tokio::test]
async fn entra_client_credentials_request_shape() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(ENTRA_PATH))
        .and(header("content-type", "application/x-www-form-urlencoded"))
        .and(body_string_contains("grant_type=client_credentials"))
        .and(body_string_contains("client_id=my-app"))
        .and(body_string_contains(format!("client_secret={SECRET}")))
        .and(body_string_contains(
            "scope=https%3A%2F%2Fdb.example.com%2F.default",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body()))
        .expect(1)
        .mount(&server)
        .await;
    let source = entra(&server, "client_credentials");
    assert_no_secret(&format!("{source:?}"));
    let token = source.fetch(None, None).await.unwrap();
    assert_eq!(token.token.expose_secret(), TOKEN);
    assert_eq!(token.expires_in, Duration::from_secs(3599));
    assert_no_secret(&format!("{token:?}"));
}

#[tokio::test]
async fn entra_on_behalf_of_request_shape() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(ENTRA_PATH))
        .and(body_string_contains(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer",
        ))
        .and(body_string_contains("client_id=my-app"))
        .and(body_string_contains(format!("client_secret={SECRET}")))
        .and(body_string_contains(format!("assertion={ASSERTION}")))
        .and(body_string_contains(
            "scope=https%3A%2F%2Fdb.example.com%2F.default",
        ))
        .and(body_string_contains("requested_token_use=on_behalf_of"))
        // expires_in as a numeric string, as some providers send it.
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({ "access_token": TOKEN, "expires_in": "120" })),
        )
        .expect(1)
        .mount(&server)
        .await;
    let source = entra(&server, "on_behalf_of");
    let token = source.fetch(Some(&assertion()), None).await.unwrap();
    assert_eq!(token.token.expose_secret(), TOKEN);
    assert_eq!(token.expires_in, Duration::from_secs(120));
}

#[tokio::test]
async fn entra_on_behalf_of_without_assertion_sends_nothing() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body()))
        .expect(0)
        .mount(&server)
        .await;
    let source = entra(&server, "on_behalf_of");
    for assertion in [None, Some(SecretString::from(" "))] {
        let error = source.fetch(assertion.as_ref(), None).await.unwrap_err();
        assert!(matches!(error, ProviderError::InvalidToken(_)), "{error:?}");
    }
}

#[tokio::test]
async fn oci_client_credentials_request_shape() {
    use base64_basic::encode;
    let server = MockServer::start().await;
    let basic = format!("Basic {}", encode(&format!("my-app:{SECRET}")));
    Mock::given(method("POST"))
        .and(path("/oauth2/v1/token"))
        .and(header("authorization", basic.as_str()))
        .and(body_string_contains("grant_type=client_credentials"))
        .and(body_string_contains(
            "scope=https%3A%2F%2Fdb.example.com%2F.default",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body()))
        .expect(1)
        .mount(&server)
        .await;
    let source = source(
        "oci_tokens",
        "client_credentials",
        &server.uri(),
        fast_options(),
    );
    let token = source.fetch(None, None).await.unwrap();
    assert_eq!(token.token.expose_secret(), TOKEN);
    assert_eq!(token.expires_in, Duration::from_secs(3599));
    // The secret goes in the header only, never in the form.
    let requests = server.received_requests().await.unwrap();
    let body = String::from_utf8(requests[0].body.clone()).unwrap();
    assert!(!body.contains(SECRET), "{body}");
    assert!(!body.contains("client_secret"), "{body}");
}

/// A tiny base64 encoder, so that the test needs no extra dependency.
mod base64_basic {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(input: &str) -> String {
        let bytes = input.as_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn known_vectors() {
        assert_eq!(encode("f"), "Zg==");
        assert_eq!(encode("fo"), "Zm8=");
        assert_eq!(encode("foo"), "Zm9v");
        assert_eq!(encode("user:pass"), "dXNlcjpwYXNz");
    }
}

async fn refused(status: u16, code: &str) {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(status).set_body_json(json!({
            "error": code,
            // Providers echo request details in descriptions: they must not surface.
            "error_description": format!("AADSTS: bad {SECRET} {ASSERTION} {TOKEN}"),
        })))
        .expect(1)
        .mount(&server)
        .await;
    let source = entra(&server, "on_behalf_of");
    let error = source.fetch(Some(&assertion()), None).await.unwrap_err();
    match &error {
        ProviderError::Refused { status: s, code: c } => {
            assert_eq!(*s, status);
            assert_eq!(c.as_deref(), Some(code));
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    assert_no_secret(&error.to_string());
    assert_no_secret(&format!("{error:?}"));
}

#[tokio::test]
async fn invalid_grant_is_refused_without_retry() {
    refused(400, "invalid_grant").await;
}

#[tokio::test]
async fn invalid_client_is_refused_without_retry() {
    refused(401, "invalid_client").await;
}

#[tokio::test]
async fn malformed_error_code_is_not_echoed() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(400).set_body_json(json!({ "error": format!("bad {SECRET}") })),
        )
        .expect(1)
        .mount(&server)
        .await;
    let error = entra(&server, "client_credentials")
        .fetch(None, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ProviderError::Refused { status: 400, code: Some(code) } if code == "unrecognized_error"),
        "{error:?}"
    );
    assert_no_secret(&format!("{error:?}"));
}

#[tokio::test]
async fn client_error_without_oauth_error_is_a_refusal_not_retried() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(404).set_body_string(format!("no {SECRET}")))
        .expect(1)
        .mount(&server)
        .await;
    let error = entra(&server, "client_credentials")
        .fetch(None, None)
        .await
        .unwrap_err();
    // Like Glewlwyd's bare 403 for a wrong secret: a refusal, not an outage.
    assert!(
        matches!(
            error,
            ProviderError::Refused {
                status: 404,
                code: None
            }
        ),
        "{error:?}"
    );
    assert_no_secret(&format!("{error} {error:?}"));
    assert!(error.to_string().contains("no OAuth error code"), "{error}");
}

#[tokio::test]
async fn too_many_requests_honours_retry_after_then_succeeds() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "0"))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body()))
        .expect(1)
        .mount(&server)
        .await;
    let token = entra(&server, "client_credentials")
        .fetch(None, None)
        .await
        .unwrap();
    assert_eq!(token.token.expose_secret(), TOKEN);
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn retry_after_is_capped_at_max_backoff() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).insert_header("Retry-After", "3600"))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body()))
        .mount(&server)
        .await;
    let started = std::time::Instant::now();
    entra(&server, "client_credentials")
        .fetch(None, None)
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn server_errors_are_retried_then_succeed() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).set_body_string(SECRET))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body()))
        .expect(1)
        .mount(&server)
        .await;
    let token = entra(&server, "client_credentials")
        .fetch(None, None)
        .await
        .unwrap();
    assert_eq!(token.token.expose_secret(), TOKEN);
}

#[tokio::test]
async fn server_errors_exhaust_the_retries() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(502))
        .expect(4) // the first attempt and max_retries = 3
        .mount(&server)
        .await;
    let error = entra(&server, "client_credentials")
        .fetch(None, None)
        .await
        .unwrap_err();
    assert_unavailable(&error);
    assert!(error.to_string().contains("502"), "{error}");
}

#[tokio::test]
async fn slow_response_times_out() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(token_body())
                .set_delay(Duration::from_secs(2)),
        )
        .expect(1)
        .mount(&server)
        .await;
    let options = HttpOptions {
        total_timeout: Duration::from_millis(200),
        max_retries: 0,
        ..fast_options()
    };
    let source = source(
        "azure_tokens",
        "client_credentials",
        &format!("{}/tenant", server.uri()),
        options,
    );
    let started = std::time::Instant::now();
    let error = source.fetch(None, None).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert_unavailable(&error);
    assert!(error.to_string().contains("timed out"), "{error}");
}

async fn unusable_success(template: ResponseTemplate, expected: &str) {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(template)
        .expect(1) // a malformed success is not retried
        .mount(&server)
        .await;
    let error = entra(&server, "client_credentials")
        .fetch(None, None)
        .await
        .unwrap_err();
    assert_unavailable(&error);
    assert!(error.to_string().contains(expected), "{error}");
}

#[tokio::test]
async fn truncated_or_non_json_body_is_unavailable() {
    unusable_success(
        ResponseTemplate::new(200).set_body_raw(
            format!(r#"{{"access_token": "{TOKEN}", "expires_in": 3"#),
            "application/json",
        ),
        "not a JSON object",
    )
    .await;
    unusable_success(
        ResponseTemplate::new(200).set_body_string(format!("<html>{TOKEN}</html>")),
        "not a JSON object",
    )
    .await;
}

#[tokio::test]
async fn missing_access_token_is_unavailable() {
    unusable_success(
        ResponseTemplate::new(200).set_body_json(json!({ "expires_in": 3600 })),
        "token response without access_token",
    )
    .await;
    unusable_success(
        ResponseTemplate::new(200).set_body_json(json!({ "access_token": 5, "expires_in": 3600 })),
        "token response without access_token",
    )
    .await;
}

#[tokio::test]
async fn missing_expires_in_takes_the_jwt_exp_or_the_default_or_is_not_cached() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let jwt = {
        use base64::Engine;
        let enc = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        format!(
            "{}.{}.c2ln",
            enc(json!({"alg": "RS256"})),
            enc(json!({"exp": now + 600}))
        )
    };
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_string_contains("client_id=jwt"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "access_token": jwt })))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "access_token": TOKEN })))
        .mount(&server)
        .await;
    let authority = format!("{}/tenant", server.uri());
    let mut value = block("azure_tokens", "client_credentials", &authority);
    value["client_id"] = json!("jwt");
    let from_jwt = HttpTokenSource::new(&load_json(&value).unwrap(), fast_options())
        .unwrap()
        .fetch(None, None)
        .await
        .unwrap();
    // Whole seconds, counted from a clock read a moment earlier.
    assert!(
        (Duration::from_secs(598)..=Duration::from_secs(600)).contains(&from_jwt.expires_in),
        "{from_jwt:?}"
    );
    let opaque = entra(&server, "client_credentials")
        .fetch(None, None)
        .await
        .unwrap();
    assert_eq!(
        opaque.expires_in,
        Duration::ZERO,
        "unknown: used, not cached"
    );
    let mut value = block("azure_tokens", "client_credentials", &authority);
    value["default_token_lifetime"] = json!(120);
    let from_block = HttpTokenSource::new(&load_json(&value).unwrap(), fast_options())
        .unwrap()
        .fetch(None, None)
        .await
        .unwrap();
    assert_eq!(from_block.expires_in, Duration::from_secs(120));
    let options = HttpOptions {
        default_lifetime: Some(Duration::from_secs(30)),
        ..fast_options()
    };
    let from_code = HttpTokenSource::new(&load_json(&value).unwrap(), options)
        .unwrap()
        .fetch(None, None)
        .await
        .unwrap();
    assert_eq!(from_code.expires_in, Duration::from_secs(30), "code wins");
}

#[tokio::test]
async fn invalid_expires_in_is_unavailable() {
    for body in [
        json!({ "access_token": TOKEN, "expires_in": "soon" }),
        json!({ "access_token": TOKEN, "expires_in": -5 }),
        json!({ "access_token": TOKEN, "expires_in": 0 }),
    ] {
        unusable_success(ResponseTemplate::new(200).set_body_json(body), "expires_in").await;
    }
}

#[tokio::test]
async fn connection_reset_is_unavailable_after_retries() {
    // Accepts connections and drops them at once, without answering.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    let options = HttpOptions {
        max_retries: 2,
        ..fast_options()
    };
    let source = source(
        "azure_tokens",
        "client_credentials",
        &format!("http://{address}/tenant"),
        options,
    );
    let error = source.fetch(None, None).await.unwrap_err();
    assert_unavailable(&error);
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn connection_refused_is_unavailable() {
    // Bind then drop, so that nothing listens on the port.
    let address = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let options = HttpOptions {
        max_retries: 1,
        ..fast_options()
    };
    let source = source(
        "oci_tokens",
        "client_credentials",
        &format!("http://{address}"),
        options,
    );
    let error = source.fetch(None, None).await.unwrap_err();
    assert_unavailable(&error);
    assert!(error.to_string().contains("connect"), "{error}");
}

#[tokio::test]
async fn body_cut_short_is_retried_then_unavailable() {
    use std::io::{Read, Write};
    // Announces a longer body than it sends, then closes: a truncated response.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            counter.fetch_add(1, Ordering::SeqCst);
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let partial = format!("{{\"access_token\": \"{TOKEN}\", \"exp");
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{partial}"
            );
            let _ = stream.flush();
        }
    });
    let options = HttpOptions {
        max_retries: 1,
        ..fast_options()
    };
    let source = source(
        "azure_tokens",
        "client_credentials",
        &format!("http://{address}/tenant"),
        options,
    );
    let error = source.fetch(None, None).await.unwrap_err();
    assert_unavailable(&error);
    assert!(error.to_string().contains("cut short"), "{error}");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[test]
fn extension_keys_are_checked_and_name_their_key() {
    let mut value = entra_cc_json();
    value["tls_root_store"] = json!("everything");
    assert_json_error(&value, "tls_root_store");
    let mut value = entra_cc_json();
    value["basic_auth_encoding"] = json!("base32");
    assert_json_error(&value, "basic_auth_encoding");
    let mut value = entra_cc_json();
    value["default_token_lifetime"] = json!(0);
    assert_json_error(&value, "default_token_lifetime");
    let mut value = entra_cc_json();
    value["token_validation"] = json!({"issuer": "https://i", "audiences": "a",
        "jwks_url": "http://idp.example.com/jwks"});
    assert_json_error(&value, "token_validation");
    let mut value = entra_cc_json();
    value["token_validation"] = json!({"issuer": "https://i", "audiences": "a",
        "jwks_url": "https://idp.example.com/jwks", "surprise": 1});
    assert_json_error(&value, "surprise");

    // Read when the provider is built: a missing CA file names the key, not its content.
    let mut value = entra_cc_json();
    value["tls_ca_file"] = json!("/nonexistent/ca.pem");
    let params = load_json(&value).unwrap();
    let error = HttpTokenSource::new(&params, HttpOptions::default()).unwrap_err();
    assert!(matches!(error, ConfigError::TrustRoots(_)), "{error:?}");
    assert!(error.to_string().contains("tls_ca_file"), "{error}");

    // Code takes precedence over the block.
    let options = HttpOptions {
        trust_roots: Some(Default::default()),
        ..HttpOptions::default()
    };
    HttpTokenSource::new(&params, options).unwrap();
}
