// Run (from the crate root, on stable Rust, cargo-fuzz 0.13):
//   RUSTC_BOOTSTRAP=1 cargo fuzz run parse_config -- -max_total_time=300
// Reproduce a crash: RUSTC_BOOTSTRAP=1 cargo fuzz run parse_config fuzz/artifacts/parse_config/<file>
// Minimize it:       RUSTC_BOOTSTRAP=1 cargo fuzz tmin parse_config fuzz/artifacts/parse_config/<file>
//
// Feeds arbitrary bytes (as text; invalid UTF-8 is fed as its lossy conversion) to
// `EndUserSecParams::from_json` and `EndUserSecParams::from_toml`, and checks (a panic is a
// bug):
// - neither loader panics;
// - on Err: the error's Display is shorter than 1 KiB;
// - the client credential never shows in the error's Display or Debug, nor in the loaded
//   params' Debug. The credentials looked for, each of at least 8 characters:
//   - if the input is valid JSON: every string value of a `client_credential` key (at any
//     depth), unless the same text occurs in a key or in another value (decoded), or
//     occurs in the raw input more often than as credential values;
//   - in any input: the text between the quotes of `client_credential = "…"` /
//     `client_credential: '…'` / `"client_credential": "…"` (no backslash or line break
//     inside), if it occurs only once in the input. This also covers TOML inputs, and so
//     the TOML parser's errors, which quote the offending source line.
//   A credential may spell part of the fixed message text ("not valid", "<redacted>"), so a
//   suspected leak is confirmed by re-running with the credential replaced by a look-alike
//   (same UTF-8 length per character, same white space, control characters, quotes and
//   backslashes, so parsing, validation and line numbers are unchanged): it is a leak only
//   if the credential occurs more often in the real output than in the look-alike run's.
#![no_main]

use ctxpool::providers::config::{ConfigError, EndUserSecParams};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const CREDENTIAL_KEY: &str = "client_credential";
/// Shorter credentials are too likely to occur in the fixed text by chance.
const MIN_CREDENTIAL_CHARS: usize = 8;
const MAX_DISPLAY_BYTES: usize = 1024;

#[derive(Clone, Copy, Debug)]
enum Loader {
    Json,
    Toml,
}

impl Loader {
    fn load(self, text: &str) -> Result<EndUserSecParams, ConfigError> {
        match self {
            Self::Json => EndUserSecParams::from_json(text),
            Self::Toml => EndUserSecParams::from_toml(text),
        }
    }
}

/// Loads `text` and returns every rendered text: the params' `Debug` on Ok, the error's
/// `Display` and `Debug` on Err. Checks the size of the error's Display if `check`.
fn render(loader: Loader, text: &str, check: bool) -> Vec<String> {
    match loader.load(text) {
        Ok(params) => vec![format!("{params:?}")],
        Err(error) => {
            let display = error.to_string();
            if check {
                assert!(
                    display.len() < MAX_DISPLAY_BYTES,
                    "{loader:?}: error Display is {} bytes (≥ 1 KiB), starting {:?}",
                    display.len(),
                    display.chars().take(200).collect::<String>()
                );
            }
            vec![display, format!("{error:?}")]
        }
    }
}

fn occurrences(texts: &[String], needle: &str) -> usize {
    texts.iter().map(|t| t.matches(needle).count()).sum()
}

/// Replaces every character that parsing and validation do not single out (white space,
/// control characters, quotes, backslash) by another of the same UTF-8 length, never by one
/// of those.
fn look_alike(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '\\') {
                return c;
            }
            match c.len_utf8() {
                1 => {
                    let mut d = c as u8;
                    loop {
                        d = if d >= b'~' { b'!' } else { d + 1 };
                        if !matches!(d, b'"' | b'\'' | b'\\') {
                            break char::from(d);
                        }
                    }
                }
                2 => {
                    if c == 'é' {
                        'ß'
                    } else {
                        'é'
                    }
                }
                3 => {
                    if c == '€' {
                        '漢'
                    } else {
                        '€'
                    }
                }
                _ => {
                    if c == '😀' {
                        '😁'
                    } else {
                        '😀'
                    }
                }
            }
        })
        .collect()
}

fn long_enough(s: &str) -> bool {
    s.chars().count() >= MIN_CREDENTIAL_CHARS
}

/// Every string value of a `client_credential` key, at any depth.
fn json_credentials(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (key, value) in map {
                if key == CREDENTIAL_KEY
                    && let Value::String(s) = value
                {
                    out.push(s.clone());
                }
                json_credentials(value, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|i| json_credentials(i, out)),
        _ => {}
    }
}

/// Every key, every string that is not a `client_credential` value, every number.
fn json_public(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (key, value) in map {
                out.push(key.clone());
                if key == CREDENTIAL_KEY && value.is_string() {
                    continue;
                }
                json_public(value, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|i| json_public(i, out)),
        Value::String(s) => out.push(s.clone()),
        Value::Number(n) => out.push(n.to_string()),
        Value::Bool(_) | Value::Null => {}
    }
}

/// Replaces the `client_credential` values equal to `credential` by `with`; returns how
/// many it replaced.
fn json_replace(v: &mut Value, credential: &str, with: &str) -> usize {
    let mut replaced = 0;
    match v {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                if key == CREDENTIAL_KEY && value.as_str() == Some(credential) {
                    *value = Value::String(with.to_owned());
                    replaced += 1;
                } else {
                    replaced += json_replace(value, credential, with);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                replaced += json_replace(item, credential, with);
            }
        }
        _ => {}
    }
    replaced
}

/// The values of `client_credential = "…"`-like assignments in the raw text.
fn textual_credentials(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (at, _) in text.match_indices(CREDENTIAL_KEY) {
        let rest = &text[at + CREDENTIAL_KEY.len()..];
        let rest = rest.strip_prefix(['"', '\'']).unwrap_or(rest);
        let rest = rest.trim_start_matches([' ', '\t']);
        let Some(rest) = rest.strip_prefix(['=', ':']) else {
            continue;
        };
        let rest = rest.trim_start_matches([' ', '\t']);
        let Some(quote) = rest.chars().next().filter(|c| matches!(c, '"' | '\'')) else {
            continue;
        };
        let rest = &rest[1..];
        let Some(end) = rest.find(quote) else {
            continue;
        };
        let value = &rest[..end];
        if !value.contains(['\\', '\n', '\r']) {
            found.push(value.to_owned());
        }
    }
    found
}

/// Asserts that `credential` does not leak into what `loader` renders for `text`, where
/// `shadow` is the same input with the credential replaced by `look`.
fn check_credential(loader: Loader, text: &str, credential: &str, shadow: &str, what: &str) {
    let rendered = render(loader, text, false);
    let real = occurrences(&rendered, credential);
    if real == 0 {
        return;
    }
    let fake = occurrences(&render(loader, shadow, false), credential);
    assert!(
        real <= fake,
        "{loader:?}: the client credential {credential:?} ({what}) leaks into the output: \
         {rendered:#?}"
    );
}

fn check(text: &str) {
    for loader in [Loader::Json, Loader::Toml] {
        render(loader, text, true);
    }

    // Credentials found by parsing the input as JSON.
    if let Ok(value @ Value::Object(_)) = serde_json::from_str::<Value>(text) {
        let mut credentials = Vec::new();
        json_credentials(&value, &mut credentials);
        let mut public = Vec::new();
        json_public(&value, &mut public);
        credentials.sort();
        credentials.dedup();
        for credential in credentials {
            if !long_enough(&credential) || public.iter().any(|p| p.contains(&credential)) {
                continue;
            }
            let look = look_alike(&credential);
            let mut shadow_value = value.clone();
            let as_credential = json_replace(&mut shadow_value, &credential, &look);
            if text.matches(credential.as_str()).count() > as_credential {
                // The text occurs elsewhere in the raw input (e.g. across syntax).
                continue;
            }
            // `from_json` depends on the parsed value only: re-serialize it.
            let Ok(shadow_json) = serde_json::to_string(&shadow_value) else {
                continue;
            };
            check_credential(Loader::Json, text, &credential, &shadow_json, "JSON value");
            // `from_toml` sees the raw text: replace in place, keeping line numbers.
            let shadow_raw = text.replace(credential.as_str(), &look);
            check_credential(Loader::Toml, text, &credential, &shadow_raw, "JSON value");
        }
    }

    // Credentials found by their look in the raw text (TOML or JSON).
    for credential in textual_credentials(text) {
        if !long_enough(&credential) || text.matches(credential.as_str()).count() != 1 {
            continue;
        }
        let shadow = text.replacen(credential.as_str(), &look_alike(&credential), 1);
        for loader in [Loader::Json, Loader::Toml] {
            check_credential(loader, text, &credential, &shadow, "assignment in the text");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    match std::str::from_utf8(data) {
        Ok(text) => check(text),
        Err(_) => check(&String::from_utf8_lossy(data)),
    }
});
