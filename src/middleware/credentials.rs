//! Reading the end user's credential out of request headers.
//!
//! Everything here is hostile input: lengths are bounded before parsing, the values are
//! never echoed into errors or logs, and every malformed shape is a typed error rather
//! than a guess.

use http::HeaderMap;
use http::header::{AUTHORIZATION, COOKIE};
use serde::Deserialize;

use super::error::CredentialError;
use crate::context::EndUserIdentity;

/// The cookie the reference's middleware reads.
pub const DEFAULT_COOKIE_NAME: &str = "identity";

/// The longest credential accepted by default (a cookie value or a bearer token), in bytes.
/// Entra ID and OCI access tokens are 1–4 KiB; 16 KiB leaves room for large group claims.
pub const DEFAULT_MAX_CREDENTIAL_LEN: usize = 16 * 1024;

/// Where to look for the credential and how much to accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialOptions {
    /// The cookie holding the identity. Default [`DEFAULT_COOKIE_NAME`].
    pub cookie_name: String,
    /// The longest credential accepted. Default [`DEFAULT_MAX_CREDENTIAL_LEN`].
    pub max_len: usize,
}

impl Default for CredentialOptions {
    fn default() -> Self {
        Self {
            cookie_name: DEFAULT_COOKIE_NAME.to_owned(),
            max_len: DEFAULT_MAX_CREDENTIAL_LEN,
        }
    }
}

/// The application-store form of the identity cookie.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NamedCookie {
    name: String,
    #[serde(default)]
    key: Option<String>,
}

/// The end user named by `headers`: the identity cookie first, else an
/// `Authorization: Bearer` token (scheme case-insensitive). `Ok(None)` when there is
/// neither; another `Authorization` scheme (`Basic`, …) is not an end-user credential and
/// is ignored.
///
/// The cookie holds either an end-user token or a JSON object `{"name": …, "key": …}`
/// (`key` optional) for users of the application's own store, optionally percent-encoded,
/// or double-quoted with backslash escapes as Python's `http.cookies` writes it. When both the cookie and a bearer token are present they must be the
/// same token, otherwise the request is ambiguous and refused.
pub fn identity_from_headers(
    headers: &HeaderMap,
    options: &CredentialOptions,
) -> Result<Option<EndUserIdentity>, CredentialError> {
    let cookie = identity_cookie(headers, options)?;
    let bearer = bearer_token(headers, options)?;
    match (cookie, bearer) {
        (None, None) => Ok(None),
        (Some(cookie), None) => parse_cookie(&cookie).map(Some),
        (None, Some(token)) => Ok(Some(EndUserIdentity::token(token))),
        (Some(cookie), Some(token)) => {
            let identity = parse_cookie(&cookie)?;
            // The same token in both places is one credential; anything else is two.
            match identity.token_secret() {
                Some(t) if secrecy::ExposeSecret::expose_secret(t) == token => Ok(Some(identity)),
                _ => Err(CredentialError::ConflictingCredentials),
            }
        }
    }
}

/// The raw value of the identity cookie, if any, across all `Cookie` headers.
fn identity_cookie(
    headers: &HeaderMap,
    options: &CredentialOptions,
) -> Result<Option<String>, CredentialError> {
    let mut found: Option<&str> = None;
    for header in headers.get_all(COOKIE) {
        // A cookie header that is not visible ASCII cannot hold our cookie in a form we
        // accept, but may hold others': only our own cookie's shape matters.
        let Ok(header) = header.to_str() else {
            if memchr_name(header.as_bytes(), options.cookie_name.as_bytes()) {
                return Err(CredentialError::MalformedCookie);
            }
            continue;
        };
        for pair in header.split(';') {
            let Some((name, value)) = pair.trim().split_once('=') else {
                continue;
            };
            if name.trim() != options.cookie_name {
                continue;
            }
            let value = value.trim();
            if value.len() > options.max_len {
                return Err(CredentialError::TooLarge {
                    max: options.max_len,
                });
            }
            match found {
                Some(earlier) if earlier != value => {
                    return Err(CredentialError::ConflictingCookies);
                }
                _ => found = Some(value),
            }
        }
    }
    Ok(found.map(str::to_owned))
}

/// Whether `name=` appears in a non-UTF-8 cookie header.
fn memchr_name(header: &[u8], name: &[u8]) -> bool {
    let needle: Vec<u8> = name.iter().copied().chain([b'=']).collect();
    header.windows(needle.len()).any(|w| w == needle.as_slice())
}

/// The bearer token of the single `Authorization` header, if it is a bearer credential.
fn bearer_token(
    headers: &HeaderMap,
    options: &CredentialOptions,
) -> Result<Option<String>, CredentialError> {
    let mut all = headers.get_all(AUTHORIZATION).iter();
    let Some(header) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(CredentialError::SeveralAuthorizations);
    }
    // Bound before looking: "Bearer " plus the token.
    if header.len() > options.max_len + "Bearer ".len() {
        return Err(CredentialError::TooLarge {
            max: options.max_len,
        });
    }
    let header = header
        .to_str()
        .map_err(|_| CredentialError::MalformedAuthorization)?;
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Ok(None);
    }
    let token = rest.trim_matches(' ');
    if !is_token68(token) {
        return Err(CredentialError::MalformedAuthorization);
    }
    Ok(Some(token.to_owned()))
}

/// RFC 7235 `token68`: what a bearer token may look like (JWS compact tokens included).
fn is_token68(s: &str) -> bool {
    let body = s.trim_end_matches('=');
    !body.is_empty()
        && body.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        })
}

/// The identity a cookie value names.
fn parse_cookie(raw: &str) -> Result<EndUserIdentity, CredentialError> {
    let unquoted = unquote(raw).ok_or(CredentialError::MalformedCookie)?;
    let decoded = percent_decode(&unquoted).ok_or(CredentialError::MalformedCookie)?;
    let identity = if decoded.starts_with('{') {
        let named: NamedCookie =
            serde_json::from_str(&decoded).map_err(|_| CredentialError::MalformedCookie)?;
        EndUserIdentity::named(named.name, named.key)
    } else if is_token68(&decoded) {
        EndUserIdentity::token(decoded)
    } else {
        return Err(CredentialError::MalformedCookie);
    };
    identity
        .validate()
        .map_err(|_| CredentialError::MalformedCookie)?;
    Ok(identity)
}

/// Removes the double quotes around a cookie value and their backslash escapes, as
/// Python's `http.cookies` writes them (Django and Flask set the reference's cookie so):
/// `"{\"name\": \"alice\"\054 \"key\": \"k\"}"`. `\ooo` is an octal byte, `\c` is `c`.
/// An unquoted value is returned as it is; `None` for a dangling escape or invalid UTF-8.
fn unquote(raw: &str) -> Option<String> {
    let Some(inner) = raw.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
        return Some(raw.to_owned());
    };
    let bytes = inner.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                let value = d.iter().fold(0u32, |v, b| v * 8 + u32::from(b - b'0'));
                out.push(u8::try_from(value).ok()?);
                i += 4;
            }
            None => {
                out.push(*bytes.get(i + 1)?);
                i += 2;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// `%XX` decoding into UTF-8; `None` for a bad escape or invalid UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_owned());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::context::IdentityKind;
    use http::HeaderValue;
    use secrecy::ExposeSecret;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn read(pairs: &[(&str, &str)]) -> Result<Option<EndUserIdentity>, CredentialError> {
        identity_from_headers(&headers(pairs), &CredentialOptions::default())
    }

    const JWT: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln";

    #[test]
    fn nothing_means_no_identity() {
        assert!(read(&[]).unwrap().is_none());
        assert!(
            read(&[("cookie", "session=abc; theme=dark")])
                .unwrap()
                .is_none()
        );
        // Other schemes are not end-user credentials.
        assert!(
            read(&[("authorization", "Basic dXNlcjpwYXNz")])
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn cookie_token_named_quoted_and_encoded() {
        let id = read(&[("cookie", &format!("a=1; identity={JWT}"))])
            .unwrap()
            .unwrap();
        assert_eq!(id.kind(), IdentityKind::Token);

        let id = read(&[("cookie", r#"identity={"name":"alice","key":"k1"}"#)])
            .unwrap()
            .unwrap();
        assert_eq!(id.name(), Some("alice"));
        assert!(id.key_secret().is_some());

        let id = read(&[("cookie", "identity=%7B%22name%22%3A%22bob%22%7D; other=x")])
            .unwrap()
            .unwrap();
        assert_eq!(id.name(), Some("bob"));
        assert!(id.key_secret().is_none());

        let id = read(&[("cookie", &format!("identity=\"{JWT}\""))])
            .unwrap()
            .unwrap();
        assert_eq!(id.kind(), IdentityKind::Token);

        // As Python's http.cookies (Django, Flask) quotes a JSON value.
        let python = r#"identity="{\"name\": \"alice\"\054 \"key\": \"k\\\\1\"}"; x=1"#;
        let id = read(&[("cookie", python)]).unwrap().unwrap();
        assert_eq!(id.name(), Some("alice"));
        let key = id.key_secret().map(|k| k.expose_secret().to_owned());
        assert_eq!(key.as_deref(), Some(r"k\1"));
        for bad in [
            r#"identity="\""#,
            r#"identity="{\777}""#,
            r#"identity="\377\376""#,
        ] {
            assert_eq!(
                read(&[("cookie", bad)]).map(|_| ()),
                Err(CredentialError::MalformedCookie),
                "{bad}"
            );
        }
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            let id = read(&[("authorization", &format!("{scheme} {JWT}"))])
                .unwrap()
                .unwrap();
            assert_eq!(id.kind(), IdentityKind::Token, "{scheme}");
        }
    }

    #[test]
    fn malformed_credentials_are_refused() {
        for (pairs, expected) in [
            (
                vec![("cookie", "identity={\"name\":1}")],
                CredentialError::MalformedCookie,
            ),
            (
                vec![("cookie", "identity={\"name\":\"a\",\"role\":\"admin\"}")],
                CredentialError::MalformedCookie,
            ),
            (
                vec![("cookie", "identity={\"name\":\"\"}")],
                CredentialError::MalformedCookie,
            ),
            (
                vec![("cookie", "identity={not json")],
                CredentialError::MalformedCookie,
            ),
            (
                vec![("cookie", "identity=")],
                CredentialError::MalformedCookie,
            ),
            (
                vec![("cookie", "identity=a b")],
                CredentialError::MalformedCookie,
            ),
            (
                vec![("cookie", "identity=%ZZ")],
                CredentialError::MalformedCookie,
            ),
            (
                vec![("cookie", "identity=%FF%FE")],
                CredentialError::MalformedCookie,
            ),
            (
                vec![("cookie", "identity=%7B%22name%22%3A%22a%0Ab%22%7D")],
                CredentialError::MalformedCookie,
            ),
            (
                vec![("cookie", "identity=a.b.c"), ("cookie", "identity=d.e.f")],
                CredentialError::ConflictingCookies,
            ),
            (
                vec![("cookie", "identity=a.b.c; identity=d.e.f")],
                CredentialError::ConflictingCookies,
            ),
            (
                vec![("authorization", "Bearer")],
                CredentialError::MalformedAuthorization,
            ),
            (
                vec![("authorization", "Bearer   ")],
                CredentialError::MalformedAuthorization,
            ),
            (
                vec![("authorization", "Bearer a,b")],
                CredentialError::MalformedAuthorization,
            ),
            (
                vec![("authorization", "Bearer a b")],
                CredentialError::MalformedAuthorization,
            ),
            (
                vec![
                    ("authorization", "Bearer a.b"),
                    ("authorization", "Bearer a.b"),
                ],
                CredentialError::SeveralAuthorizations,
            ),
            (
                vec![
                    ("cookie", "identity={\"name\":\"alice\"}"),
                    ("authorization", "Bearer a.b"),
                ],
                CredentialError::ConflictingCredentials,
            ),
            (
                vec![("cookie", "identity=x.y"), ("authorization", "Bearer a.b")],
                CredentialError::ConflictingCredentials,
            ),
        ] {
            assert_eq!(read(&pairs).map(|_| ()), Err(expected.clone()), "{pairs:?}");
        }
    }

    #[test]
    fn the_same_token_in_cookie_and_header_is_one_credential() {
        let id = read(&[
            ("cookie", &format!("identity={JWT}")),
            ("authorization", &format!("Bearer {JWT}")),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(id.kind(), IdentityKind::Token);
        // The same cookie twice is not a conflict.
        assert!(
            read(&[("cookie", "identity=a.b; identity=a.b")])
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn oversize_credentials_are_refused_before_parsing() {
        let big = "a".repeat(DEFAULT_MAX_CREDENTIAL_LEN + 1);
        let max = DEFAULT_MAX_CREDENTIAL_LEN;
        assert_eq!(
            read(&[("cookie", &format!("identity={big}"))]).map(|_| ()),
            Err(CredentialError::TooLarge { max })
        );
        assert_eq!(
            read(&[("authorization", &format!("Bearer {big}"))]).map(|_| ()),
            Err(CredentialError::TooLarge { max })
        );
        let at_limit = "a".repeat(DEFAULT_MAX_CREDENTIAL_LEN);
        assert!(read(&[("authorization", &format!("Bearer {at_limit}"))]).is_ok());
    }

    #[test]
    fn non_ascii_headers() {
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            HeaderValue::from_bytes(b"identity=\xff\xfe").unwrap(),
        );
        assert_eq!(
            identity_from_headers(&h, &CredentialOptions::default()).map(|_| ()),
            Err(CredentialError::MalformedCookie)
        );
        // Someone else's non-ASCII cookie is not our business.
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_bytes(b"theme=\xff").unwrap());
        assert!(
            identity_from_headers(&h, &CredentialOptions::default())
                .unwrap()
                .is_none()
        );
        let mut h = HeaderMap::new();
        h.append(
            AUTHORIZATION,
            HeaderValue::from_bytes(b"Bearer \xff").unwrap(),
        );
        assert_eq!(
            identity_from_headers(&h, &CredentialOptions::default()).map(|_| ()),
            Err(CredentialError::MalformedAuthorization)
        );
    }

    #[test]
    fn errors_never_echo_the_credential() {
        for e in [
            read(&[("cookie", "identity=secret-value%ZZ")]).unwrap_err(),
            read(&[("authorization", "Bearer secret-value,")]).unwrap_err(),
        ] {
            assert!(!format!("{e} {e:?}").contains("secret"), "{e:?}");
        }
    }
}
