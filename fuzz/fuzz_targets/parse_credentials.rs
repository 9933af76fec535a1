// Run (from the crate root, on stable Rust, cargo-fuzz 0.13):
//   RUSTC_BOOTSTRAP=1 cargo fuzz run parse_credentials -- -max_total_time=300
//
// Feeds arbitrary `Cookie` and `Authorization` headers to the middleware's credential
// reader (`ctxpool::middleware::identity_from_headers`) and checks (a panic is a bug):
// - it never panics, whatever the bytes;
// - an accepted token is a non-empty RFC 7235 token68 within the size limit, and an
//   accepted name validates;
// - an error's Display is short (< 128 bytes) and never contains a header value of at
//   least 8 bytes that the input carried (no echo of credentials).
#![no_main]

use arbitrary::Arbitrary;
use ctxpool::context::IdentityKind;
use ctxpool::middleware::{CredentialOptions, identity_from_headers};
use http::header::{AUTHORIZATION, COOKIE};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use secrecy::ExposeSecret;

#[derive(Arbitrary, Debug)]
struct Input {
    cookies: Vec<Vec<u8>>,
    authorizations: Vec<Vec<u8>>,
    small_limit: bool,
}

fuzz_target!(|input: Input| {
    let mut headers = HeaderMap::new();
    let mut values: Vec<Vec<u8>> = Vec::new();
    for (name, list) in [(COOKIE, &input.cookies), (AUTHORIZATION, &input.authorizations)] {
        for raw in list.iter().take(4) {
            if let Ok(value) = HeaderValue::from_bytes(raw) {
                headers.append(name.clone(), value);
                values.push(raw.clone());
            }
        }
    }
    let mut options = CredentialOptions::default();
    if input.small_limit {
        options.max_len = 16;
    }
    match identity_from_headers(&headers, &options) {
        Ok(None) => {}
        Ok(Some(identity)) => match identity.kind() {
            IdentityKind::Token => {
                let token = identity.token_secret().expect("a token identity").expose_secret();
                assert!(!token.is_empty() && token.len() <= options.max_len);
                assert!(token.bytes().all(|b| b.is_ascii_alphanumeric()
                    || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'=')));
            }
            _ => identity.validate().expect("an accepted name validates"),
        },
        Err(e) => {
            let shown = format!("{e} {e:?}");
            assert!(shown.len() < 256, "{shown}");
            for v in values.iter().filter(|v| v.len() >= 8) {
                let v = String::from_utf8_lossy(v);
                assert!(!shown.contains(v.as_ref()), "echoed a header value: {shown}");
            }
        }
    }
});
