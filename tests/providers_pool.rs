//! A pool configured with `end_user_sec_params` completes identities end to end: a real
//! HTTP token endpoint on loopback, the token cache, and the pool's fail-closed paths.
#![cfg(feature = "providers")]

use ctxpool::providers::EndUserSecProvider;
use ctxpool::providers::config::EndUserSecParams;
use ctxpool::{ContextRequest, EndUserIdentity, Pool, PoolError, ProviderError, SecurityContext};
use ctxpool_testkit::{MemBackend, MemServer};
use serde_json::json;
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn params(server: &MockServer, flow: &str) -> EndUserSecParams {
    EndUserSecParams::from_json(
        &json!({"extra_auth_params": {"end_user_sec_params": {
            "spi_type": "azure_tokens",
            "auth_flow": flow,
            "authority": format!("{}/tenant", server.uri()),
            "client_id": "app",
            "client_credential": "SECRET-client",
            "scopes": "api://db/.default",
            "data_roles": ["hr_employee"],
            "attributes": {"hr.hcm_context": {"org_id": 5}}
        }}})
        .to_string(),
    )
    .unwrap()
}

fn pool(provider: EndUserSecProvider) -> (Pool<MemBackend>, MemServer) {
    let server = MemServer::new();
    let pool = Pool::builder(MemBackend::new(server.clone()))
        .max_size(2)
        .provider(provider)
        .build()
        .unwrap();
    (pool, server)
}

fn token_response(token: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({"access_token": token, "expires_in": 3600}))
}

#[tokio::test]
async fn client_credentials_complete_named_identities_and_the_cache_hits() {
    let idp = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/tenant/oauth2/v2.0/token"))
        .and(body_string_contains("grant_type=client_credentials"))
        .respond_with(token_response("SECRET-db-token"))
        .expect(1)
        .mount(&idp)
        .await;
    let (pool, _) = pool(EndUserSecProvider::new(params(&idp, "client_credentials")).unwrap());
    for name in ["alice", "bob", "alice"] {
        // A (name, key) identity goes through the provider (the reference rejects it).
        let mut conn = pool
            .acquire_as(EndUserIdentity::named(name, Some("key".into())))
            .await
            .unwrap();
        let ctx = conn.end_user_security_context().unwrap().clone();
        assert_eq!(ctx.data_roles(), ["hr_employee"], "configured roles");
        assert!(
            ctx.attributes().get("hr.hcm_context").is_some(),
            "configured attributes"
        );
        let seen = conn.query().await.unwrap();
        assert_eq!(seen.end_user.as_deref(), Some(name));
    }
    // Per-request roles replace the configured ones; an explicit context skips the provider.
    let request =
        ContextRequest::new(EndUserIdentity::named("carol", None)).data_roles(["hr_manager"]);
    let conn = pool.acquire_as(request).await.unwrap();
    assert_eq!(
        conn.end_user_security_context().unwrap().data_roles(),
        ["hr_manager"]
    );
    drop(conn);
    let explicit = SecurityContext::builder(EndUserIdentity::named("dave", None), "own-token")
        .build()
        .unwrap();
    let conn = pool.acquire_as(&explicit).await.unwrap();
    assert!(conn.end_user_security_context().unwrap().ptr_eq(&explicit));
    // `expect(1)`: one token request for all of them, verified when `idp` drops.
}

#[tokio::test]
async fn on_behalf_of_is_per_user_and_needs_the_users_token() {
    let idp = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_string_contains("assertion=user-one"))
        .and(body_string_contains("requested_token_use=on_behalf_of"))
        .respond_with(token_response("db-for-one"))
        .expect(1)
        .mount(&idp)
        .await;
    Mock::given(method("POST"))
        .and(body_string_contains("assertion=user-two"))
        .respond_with(token_response("db-for-two"))
        .expect(1)
        .mount(&idp)
        .await;
    // The token endpoint stands in for the identity provider: no validator here.
    let provider = EndUserSecProvider::new(params(&idp, "on_behalf_of"))
        .unwrap()
        .without_token_validation();
    let (pool, _) = pool(provider);
    let token_of = |c: &ctxpool::Object<MemBackend>| {
        use secrecy::ExposeSecret;
        c.end_user_security_context()
            .unwrap()
            .database_access_token()
            .expose_secret()
            .to_owned()
    };
    for (user, db) in [
        ("user-one", "db-for-one"),
        ("user-two", "db-for-two"),
        ("user-one", "db-for-one"),
    ] {
        let conn = pool.acquire_as(EndUserIdentity::token(user)).await.unwrap();
        assert_eq!(token_of(&conn), db);
    }
    let err = pool
        .acquire_as(EndUserIdentity::named("alice", None))
        .await
        .unwrap_err();
    assert!(
        matches!(err, PoolError::Provider(ProviderError::InvalidToken(_))),
        "{err}"
    );
}

#[tokio::test]
async fn a_refusing_identity_provider_fails_closed() {
    let idp = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_json(
            json!({"error": "invalid_client", "error_description": "SECRET-client is wrong"}),
        ))
        .expect(1)
        .mount(&idp)
        .await;
    let (pool, server) = pool(EndUserSecProvider::new(params(&idp, "client_credentials")).unwrap());
    let err = pool
        .acquire_as(EndUserIdentity::named("alice", None))
        .await
        .unwrap_err();
    match &err {
        PoolError::Provider(ProviderError::Refused { status, code }) => {
            assert_eq!((*status, code.as_deref()), (400, Some("invalid_client")));
        }
        other => panic!("{other}"),
    }
    assert!(!format!("{err} {err:?}").contains("SECRET"));
    assert_eq!(server.stats().connects, 0, "no connection was taken");
    // A plain connection is still available, with no error.
    assert!(pool.get().await.is_ok());
}

#[tokio::test]
async fn an_invalid_end_user_token_is_refused_before_any_request() {
    use ctxpool::providers::validation::{TokenValidator, ValidationConfig};
    let idp = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(token_response("db"))
        .expect(0)
        .mount(&idp)
        .await;
    let validator = TokenValidator::new(ValidationConfig::new(
        "https://issuer.example",
        vec!["api://db".to_owned()],
        format!("{}/jwks", idp.uri()),
    ))
    .unwrap();
    let provider = EndUserSecProvider::new(params(&idp, "on_behalf_of"))
        .unwrap()
        .with_validator(validator);
    let (pool, server) = pool(provider);
    let err = pool
        .acquire_as(EndUserIdentity::token("SECRET-not-a-jwt"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, PoolError::Provider(ProviderError::InvalidToken(_))),
        "{err}"
    );
    assert!(!format!("{err} {err:?}").contains("SECRET"));
    assert_eq!(server.stats().connects, 0);
    // `expect(0)`: no token request was made, verified when `idp` drops.
}

#[tokio::test]
async fn token_identities_need_a_validator_by_default() {
    let idp = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(token_response("db"))
        .expect(0)
        .mount(&idp)
        .await;
    let (pool, server) = pool(EndUserSecProvider::new(params(&idp, "on_behalf_of")).unwrap());
    let err = pool
        .acquire_as(EndUserIdentity::token("user-one"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, PoolError::Provider(ProviderError::InvalidToken(_))),
        "{err}"
    );
    assert_eq!(server.stats().connects, 0);
    // `expect(0)`: refused before any token request.
}

#[tokio::test]
async fn a_slow_identity_provider_is_retried_within_the_apply_timeout() {
    // A shape a real server cannot be made to send on demand: an answer slower than the
    // attempt timeout, every time.
    let idp = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(token_response("db").set_delay(std::time::Duration::from_secs(30)))
        .mount(&idp)
        .await;
    let options = ctxpool::providers::token_source::HttpOptions {
        total_timeout: std::time::Duration::from_millis(400),
        max_retries: 10,
        base_backoff: std::time::Duration::from_millis(1),
        max_backoff: std::time::Duration::from_millis(5),
        ..Default::default()
    };
    let provider =
        EndUserSecProvider::with_http_options(params(&idp, "client_credentials"), options).unwrap();
    let server = MemServer::new();
    let pool = Pool::builder(MemBackend::new(server.clone()))
        .max_size(1)
        .timeouts(ctxpool::Timeouts {
            apply: std::time::Duration::from_millis(1000),
            ..Default::default()
        })
        .provider(provider)
        .build()
        .unwrap();
    let err = pool
        .acquire_as(EndUserIdentity::named("alice", None))
        .await
        .unwrap_err();
    eprintln!("user sees: {err}");
    // The provider's own account, not the pool's bare Timeout(Apply): it knew the deadline.
    let PoolError::Provider(ProviderError::Unavailable(message)) = &err else {
        panic!("{err:?}");
    };
    assert!(message.contains("attempts in"), "{message}");
    assert!(
        message.contains("last: the token request timed out after"),
        "{message}"
    );
    assert!(message.contains("no time left"), "{message}");
    let requests = idp.received_requests().await.unwrap().len();
    assert!((2..=10).contains(&requests), "{requests} attempts");
}
