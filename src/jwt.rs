//! Reading a JWS compact token (`header.claims.signature`) without verifying
//! it: the one decoder behind the PostgreSQL mapping (claims of an already trusted token),
//! the token validator (structure before the signature check) and the token source (the
//! lifetime of an access token whose response has no `expires_in`).
//!
//! Nothing here says a token is genuine; only [`crate::providers::validation`] does.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};

/// The longest token decoded. Real tokens are a few kilobytes; the bound caps the work an
/// unauthenticated caller can cause before any signature check.
pub(crate) const MAX_TOKEN_LEN: usize = 64 * 1024;

/// The header of `token` if it is a compact JWS: three base64url parts, header and claims
/// JSON objects, at most [`MAX_TOKEN_LEN`] long.
#[cfg_attr(not(feature = "providers"), allow(dead_code))]
pub(crate) fn checked_header(token: &str) -> Option<Map<String, Value>> {
    if token.len() > MAX_TOKEN_LEN {
        return None;
    }
    let mut split = token.split('.');
    let (Some(header), Some(claims), Some(signature), None) =
        (split.next(), split.next(), split.next(), split.next())
    else {
        return None;
    };
    object(claims)?;
    decode(signature)?;
    object(header)
}

/// The claims of `token`, decoded but not verified: the second part only, so that the
/// header and signature of an already trusted token are not judged here.
pub(crate) fn unverified_claims(token: &str) -> Option<Map<String, Value>> {
    if token.len() > MAX_TOKEN_LEN {
        return None;
    }
    object(token.split('.').nth(1)?)
}

/// One base64url part. Padding is tolerated: some issuers pad although RFC 7515 says not to.
fn decode(part: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).ok()
}

fn object(part: &str) -> Option<Map<String, Value>> {
    match serde_json::from_slice(&decode(part)?) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn enc(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[test]
    fn parts_and_refusals() {
        let h = enc(&serde_json::json!({"alg": "RS256"}));
        let c = enc(&serde_json::json!({"sub": "alice", "exp": 5}));
        let token = format!("{h}.{c}.c2ln");
        assert_eq!(checked_header(&token).unwrap()["alg"], "RS256");
        assert_eq!(unverified_claims(&token).unwrap()["sub"], "alice");
        assert!(unverified_claims(&format!("{h}=.{c}==.c2ln")).is_some());
        assert!(unverified_claims("a.b").is_none());
        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            &format!("{h}.bm90IGpzb24.c2ln"),
            &format!("{h}.{}.c2ln", enc(&serde_json::json!([1]))),
            &format!("{h}.{c}.!!"),
        ] {
            assert!(checked_header(bad).is_none(), "{bad}");
        }
        assert!(checked_header(&format!("{h}.{c}.{}", "A".repeat(MAX_TOKEN_LEN))).is_none());
    }
}
