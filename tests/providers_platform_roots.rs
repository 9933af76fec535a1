//! The platform's root store (`tls_root_store = "platform"`) honours `SSL_CERT_FILE`, as
//! the operating system's tools do. A binary of its own: it sets the variable for the
//! whole process before anything else runs.
#![cfg(feature = "providers")]
#![allow(clippy::unwrap_used)]

use ctxpool_testkit::idp;

use ctxpool::ProviderError;
use ctxpool::providers::config::EndUserSecParams;
use ctxpool::providers::token_source::{HttpOptions, HttpTokenSource, TokenSource};
use serde_json::json;

#[tokio::test]
async fn platform_roots_follow_ssl_cert_file() {
    let server = idp::oidc();
    let block = |store: &str| {
        EndUserSecParams::from_json(
            &json!({
                "spi_type": "oci_tokens", "auth_flow": "client_credentials",
                "authority": format!("{}/platform", server.https()),
                "client_id": "oci-app", "client_credential": idp::ODD_SECRET,
                "scopes": idp::SCOPE, "tls_root_store": store,
            })
            .to_string(),
        )
        .unwrap()
    };
    // SAFETY: the only test of this binary, on a current-thread runtime; the one other
    // thread (draining the IdP's output) never reads the environment.
    unsafe { std::env::set_var("SSL_CERT_FILE", &server.ca_file) };
    let platform = HttpTokenSource::new(&block("platform"), HttpOptions::default()).unwrap();
    platform.fetch(None, None).await.unwrap();
    // The webpki roots do not know the private CA.
    let webpki = HttpTokenSource::new(&block("webpki"), HttpOptions::default()).unwrap();
    let error = webpki.fetch(None, None).await.unwrap_err();
    assert!(matches!(error, ProviderError::Certificate(_)), "{error:?}");
}
