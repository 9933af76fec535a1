//! Test-only P-256 signing keys and JWT helpers, shared by the token tests. Fixed pairs:
//! generating keys in a debug build would dominate the run time. Never used outside tests.
#![allow(dead_code)]

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

/// Test-only P-256 key pair A; never used outside these tests.
pub const EC_A_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgUUETQs3cm9E8qxOX
JtMI6crz9fhDBTg0sdgDNMnhTaShRANCAAQnpH5nYwNOJKFksUzHGR4PAMflqSiQ
JH5VYWO1ir4Y650bZz9wdGbKxkF8R/37fFO5A8jMTU5xZeu032EPSiZg
-----END PRIVATE KEY-----
";
pub const EC_A_X: &str = "J6R-Z2MDTiShZLFMxxkeDwDH5akokCR-VWFjtYq-GOs";
pub const EC_A_Y: &str = "nRtnP3B0ZsrGQXxH_ft8U7kDyMxNTnFl67TfYQ9KJmA";

/// Test-only P-256 key pair B; never used outside these tests.
pub const EC_B_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgrIuJ2kJudWR/m5eg
IRSKBnYW6m2rtAfdrgWSE1LSaz2hRANCAAQPBZQii9SSFx8566tVFyAd4+Fxo2FT
fgbTjHiAhFYEoAsujugVNo1hbqUrxVGYJUy4LjtGJgibozBZDV5bDWK1
-----END PRIVATE KEY-----
";
pub const EC_B_X: &str = "DwWUIovUkhcfOeurVRcgHePhcaNhU34G04x4gIRWBKA";
pub const EC_B_Y: &str = "Cy6O6BU2jWFupSvFUZglTLguO0YmCJujMFkNXlsNYrU";

/// The public JWK of an EC P-256 key.
pub fn ec_jwk(kid: &str, x: &str, y: &str) -> Value {
    json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "use": "sig", "alg": "ES256"})
}

/// A JWS signed with ES256 by `pem`, naming `kid`.
pub fn sign_es256(kid: &str, pem: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    let key = EncodingKey::from_ec_pem(pem.as_bytes()).expect("EC test key");
    encode(&header, claims, &key).expect("sign")
}
