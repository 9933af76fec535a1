//! The token providers against a real OpenID provider on loopback (oidc-provider, started
//! by tests/support/idp.rs): client credentials in the Entra and OCI shapes, on-behalf-of
//! per user, a secret that must be form-encoded, a private CA over https, refusals, key
//! rotation, and one verification per request shared by the layer and the provider.
#![cfg(feature = "providers")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ctxpool_testkit::idp;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ctxpool::providers::EndUserSecProvider;
use ctxpool::providers::config::EndUserSecParams;
use ctxpool::providers::token_source::{
    BuiltInRoots, HttpOptions, HttpTokenSource, TokenSource, TrustRoots,
};
use ctxpool::providers::validation::{TokenValidator, ValidationConfig, ValidationError};
use ctxpool::{ContextProvider, ContextRequest, EndUserIdentity, ProviderError};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use idp::{ENTRA_SECRET, ODD_SECRET, SCOPE, oidc};

/// An Entra-shaped authority of the test's own (`name`), and the path of its token
/// endpoint, whose requests the server counts.
fn entra(name: &str) -> (String, String) {
    (
        format!("{}/{name}", oidc().http()),
        format!("/{name}/oauth2/v2.0/token"),
    )
}

fn block(spi: &str, flow: &str, authority: String, client: &str, secret: &str) -> Value {
    json!({
        "spi_type": spi, "auth_flow": flow, "authority": authority,
        "client_id": client, "client_credential": secret, "scopes": SCOPE,
    })
}

fn params(value: &Value) -> EndUserSecParams {
    EndUserSecParams::from_json(&value.to_string()).unwrap()
}

fn fast() -> HttpOptions {
    HttpOptions {
        base_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        ..HttpOptions::default()
    }
}

/// The claims of a JWT, unverified (the tests only read what the IdP put in).
fn claims(token: &str) -> Value {
    use base64::Engine;
    let part = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn assert_no_secret(text: &str) {
    for secret in [ENTRA_SECRET, ODD_SECRET, "eyJ"] {
        assert!(!text.contains(secret), "leaked: {text}");
    }
}

/// Shows the error as the user sees it (for the note) and checks it leaks nothing.
fn shown(error: &ProviderError) -> String {
    let text = error.to_string();
    eprintln!("user sees: {text}");
    assert_no_secret(&text);
    assert_no_secret(&format!("{error:?}"));
    text
}

async fn acquire(provider: &EndUserSecProvider, identity: EndUserIdentity) -> String {
    let context = provider
        .security_context(&ContextRequest::new(identity))
        .await
        .unwrap();
    context.database_access_token().expose_secret().to_owned()
}

#[tokio::test]
async fn entra_client_credentials_a_300_s_token_is_cached() {
    let idp = oidc();
    let (authority, path) = entra("cc");
    let provider = EndUserSecProvider::with_http_options(
        params(&block(
            "azure_tokens",
            "client_credentials",
            authority,
            "entra-app",
            ENTRA_SECRET,
        )),
        fast(),
    )
    .unwrap();
    let before = idp.requests(&path).await;
    let mut tokens = Vec::new();
    for _ in 0..5 {
        tokens.push(acquire(&provider, EndUserIdentity::named("alice", None)).await);
    }
    // expires_in is 300 s: with the proportional defaults the cache hits.
    assert_eq!(idp.requests(&path).await - before, 1);
    assert!(tokens.iter().all(|t| t == &tokens[0]));
    let claims = claims(&tokens[0]);
    assert_eq!(claims["client_id"], "entra-app");
    assert_eq!(claims["aud"], "https://db.example.com");
}

#[tokio::test]
async fn oci_client_credentials_with_a_secret_of_plus_slash_equals_percent() {
    let source = oci("odd-secret", ODD_SECRET);
    let token = source.fetch(None, None).await.unwrap();
    assert_eq!(claims(token.token.expose_secret())["client_id"], "oci-app");
    assert_eq!(token.expires_in, Duration::from_secs(300));
}

/// An OCI-shaped client-credentials source for `oci-app` with `secret`, on a prefix of its
/// own.
fn oci(name: &str, secret: &str) -> HttpTokenSource {
    let authority = format!("{}/{name}", oidc().http());
    let value = block(
        "oci_tokens",
        "client_credentials",
        authority,
        "oci-app",
        secret,
    );
    HttpTokenSource::new(&params(&value), fast()).unwrap()
}

async fn refusal(name: &str, client: &str, secret: &str) -> ProviderError {
    let idp = oidc();
    let (authority, path) = entra(name);
    let path = path.as_str();
    let source = HttpTokenSource::new(
        &params(&block(
            "azure_tokens",
            "client_credentials",
            authority,
            client,
            secret,
        )),
        fast(),
    )
    .unwrap();
    let before = idp.requests(path).await;
    let error = source.fetch(None, None).await.unwrap_err();
    // A refusal is final: one request, no retry.
    assert_eq!(idp.requests(path).await - before, 1);
    error
}

/// A 401 `invalid_client` refusal, shown as the user sees it.
fn assert_invalid_client(error: &ProviderError) {
    assert!(
        matches!(error, ProviderError::Refused { status: 401, code: Some(c) } if c == "invalid_client"),
        "{error:?}"
    );
    shown(error);
}

#[tokio::test]
async fn wrong_secret_is_a_refusal_not_an_outage() {
    let error = refusal("wrong-secret", "entra-app", "wrong").await;
    assert_invalid_client(&error);
}

#[tokio::test]
async fn oci_wrong_secret_is_a_refusal() {
    // What the secret becomes when a server decodes `+` as a space: not the secret.
    let source = oci("oci-wrong-secret", "a b/c=d%e f");
    let error = source.fetch(None, None).await.unwrap_err();
    assert_invalid_client(&error);
}

#[tokio::test]
async fn unknown_client_is_refused() {
    let error = refusal("unknown-client", "nobody", "x").await;
    assert_invalid_client(&error);
}

#[tokio::test]
async fn disabled_grant_is_refused() {
    let error = refusal("disabled-grant", "obo-only", ENTRA_SECRET).await;
    assert!(
        matches!(
            &error,
            ProviderError::Refused {
                status: 400,
                code: Some(_)
            }
        ),
        "{error:?}"
    );
    shown(&error);
}

fn validation(idp: &idp::Oidc) -> Value {
    json!({
        "issuer": idp.http(), "audiences": "api://hr", "jwks_url": idp.jwks_url(),
        "role_claim": "roles", "allowed_roles": ["hr_employee", "hr_manager"],
        "leeway_seconds": 30,
    })
}

#[tokio::test]
async fn on_behalf_of_per_user_with_validation_from_the_block() {
    let idp = oidc();
    let mut value = block(
        "azure_tokens",
        "on_behalf_of",
        entra("obo").0,
        "entra-app",
        ENTRA_SECRET,
    );
    let path = entra("obo").1;
    value["token_validation"] = validation(idp);
    let provider = EndUserSecProvider::with_http_options(params(&value), fast()).unwrap();
    assert!(provider.validator().is_some());
    let alice = idp
        .user_token("alice", "api://hr", &["hr_manager", "other"])
        .await;
    let bob = idp.user_token("bob", "api://hr", &["hr_employee"]).await;
    let before = idp.requests(&path).await;
    let mut seen = Vec::new();
    for user in [&alice, &bob, &alice, &bob] {
        let request = ContextRequest::new(EndUserIdentity::token(user.clone()));
        let context = provider.security_context(&request).await.unwrap();
        let token = context.database_access_token().expose_secret().to_owned();
        seen.push((claims(&token)["sub"].clone(), context.data_roles().to_vec()));
    }
    assert_eq!(seen[0], (json!("alice"), vec!["hr_manager".to_owned()]));
    assert_eq!(seen[1], (json!("bob"), vec!["hr_employee".to_owned()]));
    assert_eq!(seen[0], seen[2]);
    // One exchange per user, then the cache.
    assert_eq!(idp.requests(&path).await - before, 2);

    // A token the validator refuses never reaches the token endpoint.
    let wrong_audience = idp.user_token("mallory", "api://other", &[]).await;
    let request = ContextRequest::new(EndUserIdentity::token(wrong_audience));
    let error = provider.security_context(&request).await.unwrap_err();
    assert!(matches!(error, ProviderError::InvalidToken(_)), "{error:?}");
    shown(&error);
    assert_eq!(idp.requests(&path).await - before, 2);
}

/// Forwards loopback connections to `target`, counting them: how many attempts a client
/// made, whatever happened in TLS.
async fn counting_proxy(target: u16) -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&count);
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut outbound) =
                    tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (port, count)
}

#[tokio::test]
async fn private_ca_over_https() {
    let idp = oidc();
    let (port, connections) = counting_proxy(idp.https_port).await;
    let authority = format!("https://localhost:{port}/oci");
    let value = block(
        "oci_tokens",
        "client_credentials",
        authority,
        "oci-app",
        ODD_SECRET,
    );

    // Without the CA: a certificate error naming the check, and no retry.
    let source = HttpTokenSource::new(&params(&value), fast()).unwrap();
    let error = source.fetch(None, None).await.unwrap_err();
    assert!(matches!(&error, ProviderError::Certificate(_)), "{error:?}");
    assert!(shown(&error).contains("unknown issuer"), "{error}");
    assert_eq!(connections.load(Ordering::SeqCst), 1);

    // With the CA given in code.
    let roots = TrustRoots::new(BuiltInRoots::Webpki)
        .with_pem(idp.ca_pem.as_bytes())
        .unwrap();
    let options = HttpOptions {
        trust_roots: Some(roots),
        ..fast()
    };
    let source = HttpTokenSource::new(&params(&value), options).unwrap();
    let token = source.fetch(None, None).await.unwrap();
    assert_eq!(claims(token.token.expose_secret())["client_id"], "oci-app");

    // With the CA in the block (extension key), and no built-in roots at all.
    let mut value = value;
    value["tls_ca_file"] = json!(idp.ca_file);
    value["tls_root_store"] = json!("none");
    let source = HttpTokenSource::new(&params(&value), fast()).unwrap();
    source.fetch(None, None).await.unwrap();

    // The certificate names localhost, not the address.
    value["authority"] = json!(format!("https://127.0.0.1:{}/oci", idp.https_port));
    let source = HttpTokenSource::new(&params(&value), fast()).unwrap();
    let error = source.fetch(None, None).await.unwrap_err();
    assert!(shown(&error).contains("host name"), "{error}");
}

#[tokio::test]
async fn key_rotation_new_keys_are_fetched_and_removed_keys_stop_verifying() {
    let idp = oidc();
    let mut config = ValidationConfig::new(idp.http(), vec!["api://hr".into()], idp.jwks_url());
    // Every validation may refetch: the test sees each rotation at once.
    config.jwks_min_refetch_interval = Duration::ZERO;
    config.jwks_max_age = Duration::ZERO;
    let validator = TokenValidator::new(config).unwrap();
    let old = SecretString::from(idp.user_token("alice", "api://hr", &[]).await);
    assert_eq!(validator.validate(&old).await.unwrap().subject, "alice");

    idp.rotate(false).await;
    let new = SecretString::from(idp.user_token("alice", "api://hr", &[]).await);
    assert_eq!(validator.validate(&new).await.unwrap().subject, "alice");
    assert!(validator.validate(&old).await.is_ok());

    idp.rotate(true).await;
    assert_eq!(
        validator.validate(&old).await.unwrap_err(),
        ValidationError::UnknownKey
    );
    let newest = SecretString::from(idp.user_token("alice", "api://hr", &[]).await);
    assert!(validator.validate(&newest).await.is_ok());
}

#[cfg(feature = "tower")]
#[tokio::test]
async fn the_layer_and_the_provider_verify_a_token_once() {
    use ctxpool::middleware::IdentityLayer;
    use tower::{Layer, Service, ServiceExt};

    let idp = oidc();
    let mut value = block(
        "azure_tokens",
        "on_behalf_of",
        entra("layer").0,
        "entra-app",
        ENTRA_SECRET,
    );
    value["token_validation"] = validation(idp);
    let provider = Arc::new(EndUserSecProvider::with_http_options(params(&value), fast()).unwrap());
    let validator = provider.validator().unwrap().clone();
    let layer = IdentityLayer::new().token_check(validator.clone());
    let inner = {
        let provider = Arc::clone(&provider);
        tower::service_fn(move |_: http::Request<()>| {
            let provider = Arc::clone(&provider);
            async move {
                let request = ctxpool::scope::current().unwrap();
                let context = provider.security_context(&request).await.unwrap();
                Ok::<_, std::convert::Infallible>(http::Response::new(
                    context.data_roles().join(","),
                ))
            }
        })
    };
    let mut service = layer.layer(inner);
    let token = idp.user_token("carol", "api://hr", &["hr_employee"]).await;
    let request = http::Request::builder()
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap();
    let response = service.ready().await.unwrap().call(request).await.unwrap();
    assert_eq!(response.into_body(), "hr_employee");
    assert_eq!(validator.verified_count(), 1);
}
