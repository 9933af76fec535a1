//! End-user token validation (`ctxpool::providers::validation`) against a wiremock JWKS
//! endpoint on loopback. Keys are fixed test-only pairs embedded below: generating RSA keys
//! in a debug build would dominate the run time.
#![cfg(feature = "providers")]

use std::collections::BTreeSet;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ctxpool::ProviderError;
use ctxpool::providers::validation::{
    Algorithm, TokenValidator, ValidationConfig, ValidationError,
};
use jsonwebtoken::{EncodingKey, Header, encode, get_current_timestamp};
use secrecy::SecretString;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

#[path = "support/keys.rs"]
mod keys;
use keys::*;

const ISSUER: &str = "https://issuer.example.test/";
const AUDIENCE: &str = "ctxpool-tests";

/// Test-only RSA-2048 key pair; never used outside these tests.
const RSA_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDguC5N2Wax7Ggn
4wYY7Qh4CQ5Cbc/5Hds+jGfA4O7dC+B0rW3LrZMu3MSPcg1ywCu3qf1jZqymOUmM
1Bd7mt/QmVzEgMlduUF6VHEjIggR3cO+OVL7RxUIaFmtYzm6XrJHzDXJMeLQTrdW
wadp094OqlCAr0w3z/zZiT/vbdERKkseRDPXFGHi/qWZmJAt5SbdRs1rFbO8fqFI
40PvsrmmT3HScdYDHN6quL8NcjC0dDCIOv/jFHYauN6ZOvBw3JfxUveAUqXj5Dxk
lFTr7UZ41Sjvp087hHderGu0SkPVlX1VwkTwpar4s28E0FNuBR4CNyACGz/zEdfb
1OCGz4szAgMBAAECggEAZ0EZvZmUD1Lh9NnitldLmeQHUkyk0AGA+PeIwN5ZwuWv
J818cqb5xwGXq5WrSju0mrqX/DF0SRhvjC7z706VYoLlVkEaxV7XED92kL8VWCg+
xcwPLfhWWLuh4QKDxve2ETlqyVyLrE1O/qUSqJS6JqDpRofFjKubsdTXtMsP0kNx
IaNJfxJFjA/hAuNzAgDTWxlLONhuhGfsBVAeK0btKNzaU+Atqn2hBb/eDzLAfYWf
MVA2algYPsUyo9KS7ZzJA81iu0hPraHEQ1OGP8e1iw+rpuDiXyPG8NAH3I8otple
T4lp1srCTZhVI7XkcGq7onTxGa/buNyp1164Fto9KQKBgQD32Dalbu/oWYhwe2a/
vnjgG3Z/Hxs95e8Ho8ua6liiiAEkhFoTZVGggbAkE8rL/GHaN+gZo17nrmvn4/YT
v4XVrnaj3bptZhAjSZ75YjUSqOtwTTw0Eq82e9vz5sfHIdJ5IlEcpm/HLaYf1dkn
HuNp7IRYjG+J4xeTZQrJwn1/LQKBgQDoHSqliSwLTl2R7+9ea5lJrHYc2hsyHjkn
u9uV+602YSbNonj31mBKvS/ZW3aMK9mcPwDSUSqj0EFbHe1ERWifjceAoHxlbhA0
BzYxMueNTIX8fLxrRGScQvbjX5Q+eYKV8r/Xot2YKZkh9MPorbUQk9Gkhb0TbRsv
4c7CwIav3wKBgQCdNwXTAwAjv0eRMnYHA2fhoQoVsUGyjfyGOBybdDQtRWCULXCG
BSs2SY3WFMf7hWj856HPQZaeGEJSooQiGsdmuHiBkdEEPE3YVIcHYoiQAZ73acba
sU97nC32FVp8srO0K1SQe/NDwW0znI9XBXz0YBfDo7HNIcR+twWU3k6FMQKBgCE8
S+b4BT55Mhy7ZmL2tTQ/ZYosEMjUWwq9c2u+ZcbrkkrPgNK79328KSXOWuMnRDmD
K/LxfFGIeFM7rcWgyqJOAssAL8+2Osu4XKIez9kDpAvLMI+Lc3yMeh2Eig2ICJK/
94hA4cnv6uVZztN6S/rbr6EHJVOqw8HPa3OnbaGxAoGBAJsnaWk+Bmg80TEveQFC
7aoo+1P0UPkdJRQSzEgWjwfH4ObKl+dAzSDTqDMrfnmj5fTCxVFemZdF6AwV6O5x
5k6cUr8R8PMcNk+RYE18BCGJNQRnyaTS2wTA8n1CmnIhv4UBSkxOkq9cGdaQDjWv
F2Zp2ncd2470irgIK+jW3zcx
-----END PRIVATE KEY-----
";
const RSA_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA4LguTdlmsexoJ+MGGO0I
eAkOQm3P+R3bPoxnwODu3QvgdK1ty62TLtzEj3INcsArt6n9Y2aspjlJjNQXe5rf
0JlcxIDJXblBelRxIyIIEd3DvjlS+0cVCGhZrWM5ul6yR8w1yTHi0E63VsGnadPe
DqpQgK9MN8/82Yk/723RESpLHkQz1xRh4v6lmZiQLeUm3UbNaxWzvH6hSOND77K5
pk9x0nHWAxzeqri/DXIwtHQwiDr/4xR2GrjemTrwcNyX8VL3gFKl4+Q8ZJRU6+1G
eNUo76dPO4R3XqxrtEpD1ZV9VcJE8KWq+LNvBNBTbgUeAjcgAhs/8xHX29Tghs+L
MwIDAQAB
-----END PUBLIC KEY-----
";
const RSA_N: &str = "4LguTdlmsexoJ-MGGO0IeAkOQm3P-R3bPoxnwODu3QvgdK1ty62TLtzEj3INcsArt6n9Y2aspjlJjNQXe5rf0JlcxIDJXblBelRxIyIIEd3DvjlS-0cVCGhZrWM5ul6yR8w1yTHi0E63VsGnadPeDqpQgK9MN8_82Yk_723RESpLHkQz1xRh4v6lmZiQLeUm3UbNaxWzvH6hSOND77K5pk9x0nHWAxzeqri_DXIwtHQwiDr_4xR2GrjemTrwcNyX8VL3gFKl4-Q8ZJRU6-1GeNUo76dPO4R3XqxrtEpD1ZV9VcJE8KWq-LNvBNBTbgUeAjcgAhs_8xHX29Tghs-LMw";
const RSA_E: &str = "AQAB";

fn rsa_jwk(kid: &str) -> Value {
    json!({"kty": "RSA", "n": RSA_N, "e": RSA_E, "kid": kid, "use": "sig"})
}

/// A JWKS endpoint at `/jwks` serving `keys`, expecting `expected` requests if given.
async fn mount_jwks(server: &MockServer, keys: Vec<Value>, expected: Option<u64>) {
    let mock = Mock::given(method("GET"))
        .and(path("/jwks"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "keys": keys })));
    let mock = match expected {
        Some(n) => mock.expect(n),
        None => mock,
    };
    mock.mount(server).await;
}

fn config(server: &MockServer) -> ValidationConfig {
    let mut config = ValidationConfig::new(
        ISSUER,
        vec![AUDIENCE.to_owned()],
        format!("{}/jwks", server.uri()),
    );
    config.role_claim = Some("roles".to_owned());
    config.allowed_roles = BTreeSet::from(["reader".to_owned(), "writer".to_owned()]);
    config
}

fn new_validator(server: &MockServer) -> TokenValidator {
    TokenValidator::new(config(server)).expect("valid config")
}

fn now() -> i64 {
    i64::try_from(get_current_timestamp()).expect("timestamp fits")
}

/// Claims valid for an hour, for `alice`.
fn claims() -> Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": now(),
        "exp": now() + 3600,
        "roles": ["reader", "admin", "reader", "writer"],
    })
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn sign_rs256(kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    let key = EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).expect("RSA test key");
    encode(&header, claims, &key).expect("sign")
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

fn secret(token: &str) -> SecretString {
    SecretString::from(token.to_owned())
}

/// Validates a token that must be refused, and checks that neither the error's `Display`
/// nor its `Debug` (nor the pool-facing `ProviderError`) carries any part of the token.
async fn refused(validator: &TokenValidator, token: &str) -> ValidationError {
    let err = validator
        .validate(&secret(token))
        .await
        .expect_err("the token must be refused");
    let provider_error = ProviderError::from(err.clone());
    let rendered = format!("{err} {err:?} {provider_error} {provider_error:?}");
    for part in token.split('.').filter(|p| p.len() >= 8) {
        assert!(
            !rendered.contains(part),
            "error leaks the token: {rendered}"
        );
    }
    err
}

#[tokio::test]
async fn valid_token_gives_subject_and_allowed_roles() {
    let server = MockServer::start().await;
    mount_jwks(&server, vec![ec_jwk("ec-a", EC_A_X, EC_A_Y)], Some(1)).await;
    let validator = new_validator(&server);
    let token = sign_es256("ec-a", EC_A_PRIVATE_PEM, &claims());
    let valid = validator.validate(&secret(&token)).await.expect("valid");
    assert_eq!(valid.subject, "alice");
    // `admin` is not allowed: dropped, not an error; the duplicate `reader` appears once.
    assert_eq!(valid.data_roles, ["reader", "writer"]);
    assert_eq!(valid.claims["iss"], ISSUER);
    // The cached JWKS serves the second validation.
    validator.validate(&secret(&token)).await.expect("valid");
    assert!(!format!("{valid:?} {validator:?}").contains(&token));
}

#[tokio::test]
async fn rs256_token_is_accepted() {
    let server = MockServer::start().await;
    mount_jwks(&server, vec![rsa_jwk("rsa-1")], Some(1)).await;
    let validator = new_validator(&server);
    let token = sign_rs256("rsa-1", &claims());
    let valid = validator.validate(&secret(&token)).await.expect("valid");
    assert_eq!(valid.subject, "alice");
}

#[tokio::test]
async fn single_string_role_claim_and_no_role_claim() {
    let server = MockServer::start().await;
    mount_jwks(&server, vec![ec_jwk("ec-a", EC_A_X, EC_A_Y)], None).await;
    let validator = new_validator(&server);
    let token = sign_es256(
        "ec-a",
        EC_A_PRIVATE_PEM,
        &with(claims(), "roles", json!("writer")),
    );
    let valid = validator.validate(&secret(&token)).await.expect("valid");
    assert_eq!(valid.data_roles, ["writer"]);
    let mut no_roles = claims();
    no_roles.as_object_mut().expect("object").remove("roles");
    let token = sign_es256("ec-a", EC_A_PRIVATE_PEM, &no_roles);
    let valid = validator.validate(&secret(&token)).await.expect("valid");
    assert!(valid.data_roles.is_empty());
}

#[tokio::test]
async fn expired_and_not_yet_valid_are_refused() {
    let server = MockServer::start().await;
    mount_jwks(&server, vec![ec_jwk("ec-a", EC_A_X, EC_A_Y)], None).await;
    let validator = new_validator(&server);
    let expired = sign_es256(
        "ec-a",
        EC_A_PRIVATE_PEM,
        &with(claims(), "exp", json!(now() - 3600)),
    );
    assert_eq!(
        refused(&validator, &expired).await,
        ValidationError::Expired
    );
    let early = sign_es256(
        "ec-a",
        EC_A_PRIVATE_PEM,
        &with(claims(), "nbf", json!(now() + 3600)),
    );
    assert_eq!(
        refused(&validator, &early).await,
        ValidationError::NotYetValid
    );
}

#[tokio::test]
async fn within_leeway_is_accepted() {
    let server = MockServer::start().await;
    mount_jwks(&server, vec![ec_jwk("ec-a", EC_A_X, EC_A_Y)], None).await;
    let validator = new_validator(&server);
    // Default leeway: 60 s on either side.
    let just_expired = sign_es256(
        "ec-a",
        EC_A_PRIVATE_PEM,
        &with(claims(), "exp", json!(now() - 30)),
    );
    validator
        .validate(&secret(&just_expired))
        .await
        .expect("within leeway");
    let almost_valid = sign_es256(
        "ec-a",
        EC_A_PRIVATE_PEM,
        &with(claims(), "nbf", json!(now() + 30)),
    );
    validator
        .validate(&secret(&almost_valid))
        .await
        .expect("within leeway");
}

#[tokio::test]
async fn wrong_audience_issuer_and_missing_subject_are_refused() {
    let server = MockServer::start().await;
    mount_jwks(&server, vec![ec_jwk("ec-a", EC_A_X, EC_A_Y)], None).await;
    let validator = new_validator(&server);
    let sign = |c: &Value| sign_es256("ec-a", EC_A_PRIVATE_PEM, c);
    let wrong_aud = sign(&with(claims(), "aud", json!("someone-else")));
    assert_eq!(
        refused(&validator, &wrong_aud).await,
        ValidationError::WrongAudience
    );
    let mut no_aud = claims();
    no_aud.as_object_mut().expect("object").remove("aud");
    assert_eq!(
        refused(&validator, &sign(&no_aud)).await,
        ValidationError::WrongAudience
    );
    let wrong_iss = sign(&with(claims(), "iss", json!("https://evil.example.test/")));
    assert_eq!(
        refused(&validator, &wrong_iss).await,
        ValidationError::WrongIssuer
    );
    let mut no_iss = claims();
    no_iss.as_object_mut().expect("object").remove("iss");
    assert_eq!(
        refused(&validator, &sign(&no_iss)).await,
        ValidationError::WrongIssuer
    );
    let empty_sub = sign(&with(claims(), "sub", json!("")));
    assert_eq!(
        refused(&validator, &empty_sub).await,
        ValidationError::MissingSubject
    );
    let mut no_sub = claims();
    no_sub.as_object_mut().expect("object").remove("sub");
    assert_eq!(
        refused(&validator, &sign(&no_sub)).await,
        ValidationError::MissingSubject
    );
}

#[tokio::test]
async fn tampered_claims_fail_the_signature() {
    let server = MockServer::start().await;
    mount_jwks(&server, vec![ec_jwk("ec-a", EC_A_X, EC_A_Y)], None).await;
    let validator = new_validator(&server);
    let token = sign_es256("ec-a", EC_A_PRIVATE_PEM, &claims());
    let parts: Vec<&str> = token.split('.').collect();
    let forged_claims = b64(&with(claims(), "sub", json!("mallory")));
    let forged = format!("{}.{forged_claims}.{}", parts[0], parts[2]);
    assert_eq!(
        refused(&validator, &forged).await,
        ValidationError::BadSignature
    );
    // Key B's signature under key A's kid.
    let other_key = sign_es256("ec-a", EC_B_PRIVATE_PEM, &claims());
    assert_eq!(
        refused(&validator, &other_key).await,
        ValidationError::BadSignature
    );
}

#[tokio::test]
async fn alg_none_is_refused() {
    let server = MockServer::start().await;
    mount_jwks(&server, vec![ec_jwk("ec-a", EC_A_X, EC_A_Y)], None).await;
    let validator = new_validator(&server);
    for header in [
        json!({"alg": "none"}),
        json!({"alg": "none", "kid": "ec-a"}),
        json!({"alg": "None", "kid": "ec-a", "typ": "JWT"}),
    ] {
        let token = format!("{}.{}.", b64(&header), b64(&claims()));
        assert!(
            matches!(
                refused(&validator, &token).await,
                ValidationError::AlgorithmNotAllowed(_)
            ),
            "{header}"
        );
    }
}

#[tokio::test]
async fn hmac_signed_with_the_rsa_public_key_is_refused() {
    let server = MockServer::start().await;
    // The JWKS also offers a symmetric key: it must be ignored, never used as a secret.
    let oct = json!({"kty": "oct", "k": URL_SAFE_NO_PAD.encode(RSA_PUBLIC_PEM), "kid": "oct-1"});
    mount_jwks(&server, vec![rsa_jwk("rsa-1"), oct], None).await;
    let validator = new_validator(&server);
    for kid in ["rsa-1", "oct-1"] {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.to_owned());
        let key = EncodingKey::from_secret(RSA_PUBLIC_PEM.as_bytes());
        let forged = encode(&header, &claims(), &key).expect("sign");
        assert_eq!(
            refused(&validator, &forged).await,
            ValidationError::AlgorithmNotAllowed("HS256".to_owned())
        );
    }
    // Even an allow-list naming HS256 is refused at construction.
    let mut hmac = config(&server);
    hmac.algorithms.push(Algorithm::HS256);
    assert!(matches!(
        TokenValidator::new(hmac),
        Err(ValidationError::Config(_))
    ));
}

#[tokio::test]
async fn algorithm_must_fit_the_key_type_and_the_allow_list() {
    let server = MockServer::start().await;
    mount_jwks(
        &server,
        vec![rsa_jwk("rsa-1"), ec_jwk("ec-a", EC_A_X, EC_A_Y)],
        None,
    )
    .await;
    let validator = new_validator(&server);
    // An ES256 token naming the RSA key.
    let mismatched = sign_es256("rsa-1", EC_A_PRIVATE_PEM, &claims());
    assert_eq!(
        refused(&validator, &mismatched).await,
        ValidationError::AlgorithmNotAllowed("ES256".to_owned())
    );
    // RS256 valid in itself, but not in this allow-list.
    let mut es_only = config(&server);
    es_only.algorithms = vec![Algorithm::ES256];
    let es_only = TokenValidator::new(es_only).expect("valid config");
    let rs = sign_rs256("rsa-1", &claims());
    assert_eq!(
        refused(&es_only, &rs).await,
        ValidationError::AlgorithmNotAllowed("RS256".to_owned())
    );
}

#[tokio::test]
async fn unknown_kid_refetches_once_per_interval() {
    let server = MockServer::start().await;
    // The first validation's fetch, then one refetch for the first unknown kid.
    mount_jwks(&server, vec![ec_jwk("ec-a", EC_A_X, EC_A_Y)], Some(2)).await;
    let mut config = config(&server);
    config.jwks_min_refetch_interval = Duration::from_millis(300);
    let validator = TokenValidator::new(config).expect("valid config");
    let good = sign_es256("ec-a", EC_A_PRIVATE_PEM, &claims());
    validator.validate(&secret(&good)).await.expect("valid");
    tokio::time::sleep(Duration::from_millis(400)).await;

    let unknown = sign_es256("ec-nope", EC_A_PRIVATE_PEM, &claims());
    assert_eq!(
        refused(&validator, &unknown).await,
        ValidationError::UnknownKey
    );
    assert_eq!(server.received_requests().await.map(|r| r.len()), Some(2));

    // Within the interval: refused without asking the endpoint again.
    let unknown2 = sign_es256("ec-other", EC_A_PRIVATE_PEM, &claims());
    assert_eq!(
        refused(&validator, &unknown2).await,
        ValidationError::UnknownKey
    );
    assert_eq!(server.received_requests().await.map(|r| r.len()), Some(2));
    // Known keys keep working meanwhile.
    validator.validate(&secret(&good)).await.expect("valid");
    server.verify().await;
}

#[tokio::test]
async fn a_key_set_older_than_its_maximum_age_is_refetched_and_a_removed_key_stops_working() {
    let server = MockServer::start().await;
    mount_jwks(&server, vec![ec_jwk("ec-a", EC_A_X, EC_A_Y)], Some(1)).await;
    let mut config = config(&server);
    config.jwks_min_refetch_interval = Duration::from_millis(100);
    config.jwks_max_age = Duration::from_millis(200);
    let validator = TokenValidator::new(config).expect("valid config");
    let token_a = sign_es256("ec-a", EC_A_PRIVATE_PEM, &claims());
    validator.validate(&secret(&token_a)).await.expect("valid");
    // Within the maximum age the cached set serves.
    validator.validate(&secret(&token_a)).await.expect("valid");
    server.verify().await;

    // The issuer drops key A; once the set is older than its maximum age, it is fetched
    // again and tokens signed with A are refused.
    server.reset().await;
    mount_jwks(&server, vec![ec_jwk("ec-b", EC_B_X, EC_B_Y)], Some(1)).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        refused(&validator, &token_a).await,
        ValidationError::UnknownKey
    );
    server.verify().await;

    // A stale set whose refetch fails is not used: fail closed.
    server.reset().await;
    Mock::given(method("GET"))
        .and(path("/jwks"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&server)
        .await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let token_b = sign_es256("ec-b", EC_B_PRIVATE_PEM, &claims());
    assert!(matches!(
        refused(&validator, &token_b).await,
        ValidationError::Jwks(_)
    ));
}

#[test]
fn a_maximum_age_below_the_refetch_interval_is_refused() {
    let mut config =
        ValidationConfig::new(ISSUER, vec![AUDIENCE.into()], "https://idp.example/jwks");
    config.jwks_max_age = Duration::from_secs(1);
    config.jwks_min_refetch_interval = Duration::from_secs(2);
    assert!(matches!(
        TokenValidator::new(config),
        Err(ValidationError::Config(_))
    ));
}

#[tokio::test]
async fn jwks_rotation_is_picked_up() {
    let server = MockServer::start().await;
    mount_jwks(&server, vec![ec_jwk("ec-a", EC_A_X, EC_A_Y)], Some(1)).await;
    let mut config = config(&server);
    config.jwks_min_refetch_interval = Duration::ZERO;
    let validator = TokenValidator::new(config).expect("valid config");
    let token_a = sign_es256("ec-a", EC_A_PRIVATE_PEM, &claims());
    validator.validate(&secret(&token_a)).await.expect("valid");
    server.verify().await;

    server.reset().await;
    mount_jwks(&server, vec![ec_jwk("ec-b", EC_B_X, EC_B_Y)], Some(1)).await;
    let token_b = sign_es256("ec-b", EC_B_PRIVATE_PEM, &claims());
    let valid = validator
        .validate(&secret(&token_b))
        .await
        .expect("valid after rotation");
    assert_eq!(valid.subject, "alice");
    server.verify().await;
}

#[tokio::test]
async fn malformed_tokens_are_refused() {
    let server = MockServer::start().await;
    mount_jwks(&server, vec![ec_jwk("ec-a", EC_A_X, EC_A_Y)], Some(0)).await;
    let validator = new_validator(&server);
    let good = sign_es256("ec-a", EC_A_PRIVATE_PEM, &claims());
    let parts: Vec<&str> = good.split('.').collect();
    let not_json = URL_SAFE_NO_PAD.encode("definitely not json");
    let cases = [
        "garbage-that-is-no-token".to_owned(),
        String::new(),
        format!("{}.{}", parts[0], parts[1]),
        format!("{good}.extra"),
        format!("{not_json}.{}.{}", parts[1], parts[2]),
        format!("{}.{not_json}.{}", parts[0], parts[2]),
        format!("{}.{}.{}", parts[0], b64(&json!([1, 2])), parts[2]),
        format!("{}.{}.!!not-base64!!", parts[0], parts[1]),
        format!("{}.{}.{}", b64(&json!({"kid": "ec-a"})), parts[1], parts[2]),
        format!("{}.{}.{}", parts[0], "A".repeat(70 * 1024), parts[2]),
    ];
    for token in cases {
        assert_eq!(
            refused(&validator, &token).await,
            ValidationError::Malformed,
            "{token}"
        );
    }
    // Malformed tokens never cause a JWKS fetch.
    server.verify().await;
}

#[tokio::test]
async fn missing_kid_is_an_unknown_key() {
    let server = MockServer::start().await;
    mount_jwks(&server, vec![ec_jwk("ec-a", EC_A_X, EC_A_Y)], None).await;
    let validator = new_validator(&server);
    let key = EncodingKey::from_ec_pem(EC_A_PRIVATE_PEM.as_bytes()).expect("EC test key");
    let token = encode(&Header::new(Algorithm::ES256), &claims(), &key).expect("sign");
    assert_eq!(
        refused(&validator, &token).await,
        ValidationError::UnknownKey
    );
}

#[tokio::test]
async fn jwks_failure_is_reported_without_the_body() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/jwks"))
        .respond_with(ResponseTemplate::new(500).set_body_string("internal secret detail"))
        .expect(1)
        .mount(&server)
        .await;
    let validator = new_validator(&server);
    let token = sign_es256("ec-a", EC_A_PRIVATE_PEM, &claims());
    let err = refused(&validator, &token).await;
    assert_eq!(err, ValidationError::Jwks("HTTP 500".to_owned()));
    assert!(!format!("{err:?}").contains("secret detail"));
    // Rate-limited: the failure is reported again without a second request.
    assert_eq!(
        refused(&validator, &token).await,
        ValidationError::Jwks("HTTP 500".to_owned())
    );
    server.verify().await;

    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/jwks"))
        .respond_with(ResponseTemplate::new(200).set_body_string("<html>not a key set</html>"))
        .mount(&server)
        .await;
    let validator = new_validator(&server);
    let err = refused(&validator, &token).await;
    assert_eq!(
        err,
        ValidationError::Jwks("the response is not a JWKS".to_owned())
    );
}

#[tokio::test]
async fn maps_into_provider_error() {
    let e = ProviderError::from(ValidationError::Expired);
    assert!(matches!(e, ProviderError::InvalidToken(ref r) if r == "the token has expired"));
}

#[test]
fn config_is_checked_at_construction() {
    let base = || {
        ValidationConfig::new(
            ISSUER,
            vec![AUDIENCE.to_owned()],
            "https://issuer.example.test/jwks",
        )
    };
    assert_eq!(base().algorithms, [Algorithm::RS256, Algorithm::ES256]);
    assert_eq!(base().leeway, Duration::from_secs(60));
    assert_eq!(base().jwks_min_refetch_interval, Duration::from_secs(60));
    TokenValidator::new(base()).expect("https is fine");
    for url in [
        "http://127.0.0.1:8080/jwks",
        "http://localhost/jwks",
        "http://[::1]:9/jwks",
    ] {
        let mut c = base();
        c.jwks_url = url.to_owned();
        TokenValidator::new(c).expect("http on loopback is fine");
    }
    let cases: [fn(&mut ValidationConfig); 7] = [
        |c| c.jwks_url = "http://issuer.example.test/jwks".into(),
        |c| c.jwks_url = "ftp://127.0.0.1/jwks".into(),
        |c| c.jwks_url = "not a url".into(),
        |c| c.issuer.clear(),
        |c| c.audience.clear(),
        |c| c.algorithms.clear(),
        |c| c.algorithms = vec![Algorithm::HS512],
    ];
    for (i, change) in cases.iter().enumerate() {
        let mut c = base();
        change(&mut c);
        assert!(
            matches!(TokenValidator::new(c), Err(ValidationError::Config(_))),
            "case {i}"
        );
    }
}
