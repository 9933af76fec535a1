// Run (from the crate root, stable Rust with cargo-fuzz 0.13):
//   RUSTC_BOOTSTRAP=1 cargo fuzz run parse_token -- -max_total_time=300
//
// Feeds arbitrary text as an end-user token to `TokenValidator::validate`, whose JWKS URL
// points at a closed loopback port: every input is parsed (header, claims, algorithm,
// kid), and well-formed ones reach the key lookup, which fails. Checks, a panic being a
// bug: validation never panics and never accepts; its error text stays under 1 KiB and
// never follows the token (see `look_alike`).

#![no_main]

use std::sync::OnceLock;

use ctxpool::providers::validation::{TokenValidator, ValidationConfig};
use libfuzzer_sys::fuzz_target;
use secrecy::SecretString;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

fn validator() -> &'static TokenValidator {
    static V: OnceLock<TokenValidator> = OnceLock::new();
    V.get_or_init(|| {
        // Port 9 (discard) on loopback: closed here, so a JWKS fetch fails at once.
        TokenValidator::new(ValidationConfig::new(
            "https://issuer.example",
            vec!["api://db".to_owned()],
            "http://127.0.0.1:9/jwks",
        ))
        .expect("a valid configuration")
    })
}

/// Shifts every ASCII letter and digit (`a`→`b`, `z`→`a`, `9`→`0`), keeping the shape.
fn look_alike(token: &str) -> String {
    token
        .chars()
        .map(|c| match c {
            'a'..='y' | 'A'..='Y' | '0'..='8' => char::from(c as u8 + 1),
            'z' => 'a',
            'Z' => 'A',
            '9' => '0',
            other => other,
        })
        .collect()
}

fn shown(token: &str) -> String {
    match runtime().block_on(validator().validate(&SecretString::from(token.to_owned()))) {
        Ok(v) => panic!("accepted a token with no key to verify it: {v:?}"),
        Err(e) => format!("{e} {e:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let text = shown(token);
    assert!(text.len() < 1024, "{} bytes", text.len());
    // A leak makes the error text follow the token: the look-alike shows up in its own
    // error too. A token that merely copies the library's fixed wording does not.
    if token.len() >= 12 && text.contains(token) {
        let alike = look_alike(token);
        assert!(!shown(&alike).contains(&alike), "the token shows in {text:?}");
    }
});
