// Run (from the crate root, on stable Rust, cargo-fuzz 0.13):
//   RUSTC_BOOTSTRAP=1 cargo fuzz run build_context -- -max_total_time=620
// (RUSTC_BOOTSTRAP=1 lets stable rustc accept the nightly-only -Z flags cargo-fuzz passes;
// AddressSanitizer works with the stable toolchain's runtime, so no `--sanitizer none`.)
// Reproduce a crash: RUSTC_BOOTSTRAP=1 cargo fuzz run build_context fuzz/artifacts/build_context/<file>
// Minimize it:       RUSTC_BOOTSTRAP=1 cargo fuzz tmin build_context fuzz/artifacts/build_context/<file>
//
// Builds a `SecurityContext` from arbitrary parts, optionally copies it with one `with_*`
// method, and checks (a panic is a bug):
// - building and copying never panic;
// - on Ok: `encoded_len() <= MAX_ENCODED_LEN` and equals the length of the documented JSON
//   encoding; every data role is a non-empty `[A-Za-z_][A-Za-z0-9_$]*`; flattened attributes
//   contain no NUL; the attributes are what `Attributes::from_json` makes of the input; a
//   `with_*` copy changes only its own part;
// - on Err: the error's Display is non-empty and shorter than 512 bytes;
// - `Debug`/`Display` of contexts and errors never show a secret (end-user token, end-user
//   key, database-access token) of at least 8 characters that does not occur in the
//   non-secret inputs. To rule out coincidences (a secret that spells part of the fixed
//   text), a suspected leak is confirmed by re-running with every secret replaced by a
//   look-alike (same bytes per character, same white space, control and JSON-escaped
//   characters, so validation and sizes are unchanged): it is a leak only if the secret
//   occurs more often in the real output than in the look-alike run's output.
#![no_main]

use arbitrary::Arbitrary;
use ctxpool::context::{Attributes, MAX_ENCODED_LEN};
use ctxpool::{ContextError, EndUserIdentity, SecurityContext};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

#[derive(Debug, Arbitrary)]
enum IdentityInput {
    Token(String),
    Named { name: String, key: Option<String> },
}

#[derive(Debug, Arbitrary)]
enum AttrValue {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Null,
    Nested,
}

#[derive(Debug, Arbitrary)]
enum AttributesInput {
    /// JSON text; attributes are skipped if it does not parse.
    Json(String),
    /// `[(schema.context key, [(attribute name, value)])]`.
    Structured(Vec<(String, Vec<(String, AttrValue)>)>),
}

#[derive(Debug, Arbitrary)]
enum CopyInput {
    None,
    DataRoles(Vec<String>),
    Attributes(AttributesInput),
    DatabaseAccessToken(String),
}

#[derive(Debug, Arbitrary)]
struct Input {
    identity: IdentityInput,
    database_access_token: String,
    /// `(c, n)` appends `n` copies of `c` to the database-access token, so that small inputs
    /// can reach (and cross) `MAX_ENCODED_LEN`.
    token_padding: Option<(char, u16)>,
    data_roles: Vec<String>,
    attributes: Option<AttributesInput>,
    copy: CopyInput,
}

impl AttrValue {
    fn to_json(&self) -> Value {
        match self {
            Self::Str(s) => Value::String(s.clone()),
            Self::Int(i) => json!(i),
            Self::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Self::Bool(b) => Value::Bool(*b),
            Self::Null => Value::Null,
            Self::Nested => json!({"nested": {"value": 1}}),
        }
    }
}

impl AttributesInput {
    /// The JSON value to pass, or `None` to skip attributes (unparsable JSON text).
    fn to_json(&self) -> Option<Value> {
        match self {
            Self::Json(text) => serde_json::from_str(text).ok(),
            Self::Structured(contexts) => {
                let mut outer = Map::new();
                for (key, pairs) in contexts {
                    let inner: Map<String, Value> =
                        pairs.iter().map(|(name, v)| (name.clone(), v.to_json())).collect();
                    outer.insert(key.clone(), Value::Object(inner));
                }
                Some(Value::Object(outer))
            }
        }
    }

    /// Every non-secret text this input contributes: the raw text plus decoded strings.
    fn texts(&self, out: &mut Vec<String>) {
        if let Self::Json(text) = self {
            out.push(text.clone());
        }
        if let Some(v) = self.to_json() {
            collect_strings(&v, out);
        }
    }
}

fn collect_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Number(n) => out.push(n.to_string()),
        Value::Array(items) => items.iter().for_each(|i| collect_strings(i, out)),
        Value::Object(map) => {
            for (k, v) in map {
                out.push(k.clone());
                collect_strings(v, out);
            }
        }
        Value::Null | Value::Bool(_) => {}
    }
}

/// The secrets of an input, after `map` (identity or look-alike).
struct Secrets {
    identity_token: Option<String>,
    identity_key: Option<String>,
    database_access_token: String,
    copy_token: Option<String>,
}

impl Secrets {
    fn of(input: &Input, map: fn(&str) -> String) -> Self {
        let mut token = input.database_access_token.clone();
        if let Some((c, n)) = input.token_padding {
            token.extend(std::iter::repeat_n(c, usize::from(n)));
        }
        let (identity_token, identity_key) = match &input.identity {
            IdentityInput::Token(t) => (Some(map(t)), None),
            IdentityInput::Named { key, .. } => (None, key.as_deref().map(map)),
        };
        Self {
            identity_token,
            identity_key,
            database_access_token: map(&token),
            copy_token: match &input.copy {
                CopyInput::DatabaseAccessToken(t) => Some(map(t)),
                _ => None,
            },
        }
    }

    fn labelled(&self) -> Vec<(&'static str, &str)> {
        let mut v = vec![("database-access token", self.database_access_token.as_str())];
        if let Some(t) = &self.identity_token {
            v.push(("end-user token", t));
        }
        if let Some(k) = &self.identity_key {
            v.push(("end-user key", k));
        }
        if let Some(t) = &self.copy_token {
            v.push(("database-access token given to with_database_access_token", t));
        }
        v
    }
}

/// Replaces every character that validation and JSON escaping do not single out by another
/// of the same UTF-8 length, so the look-alike validates and encodes to the same size.
fn look_alike(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_whitespace() || c.is_control() || c == '"' || c == '\\' {
                return c;
            }
            match c.len_utf8() {
                1 => {
                    let mut d = c as u8;
                    loop {
                        d = if d >= b'~' { b'!' } else { d + 1 };
                        if d != b'"' && d != b'\\' {
                            break char::from(d);
                        }
                    }
                }
                2 => if c == 'é' { 'ß' } else { 'é' },
                3 => if c == '€' { '漢' } else { '€' },
                _ => if c == '😀' { '😁' } else { '😀' },
            }
        })
        .collect()
}

fn same(s: &str) -> String {
    s.to_owned()
}

fn check_error(e: &ContextError, stage: &str) {
    let text = e.to_string();
    assert!(!text.is_empty(), "{stage}: empty error Display ({e:?})");
    assert!(text.len() < 512, "{stage}: error Display is {} bytes: {text}", text.len());
}

/// The size of the documented encoding, recomputed from the parts.
fn expected_encoded_len(ctx: &SecurityContext, input: &Input, secrets: &Secrets, token: &str) -> usize {
    let end_user = match &input.identity {
        IdentityInput::Token(_) => json!({"token": secrets.identity_token}),
        IdentityInput::Named { name, .. } => json!({"name": name, "key": secrets.identity_key}),
    };
    let doc = json!({
        "end_user": end_user,
        "database_access_token": token,
        "data_roles": ctx.data_roles(),
        "attributes": ctx.attributes().as_json(),
    });
    serde_json::to_vec(&doc).map_or(usize::MAX, |v| v.len())
}

fn check_context(ctx: &SecurityContext, input: &Input, secrets: &Secrets, token: &str, stage: &str) {
    let len = ctx.encoded_len();
    assert!(len <= MAX_ENCODED_LEN, "{stage}: encoded_len {len} > {MAX_ENCODED_LEN}");
    let expected = expected_encoded_len(ctx, input, secrets, token);
    assert_eq!(len, expected, "{stage}: encoded_len differs from the documented encoding");
    for role in ctx.data_roles() {
        let mut chars = role.chars();
        let ok = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
        assert!(ok, "{stage}: invalid data role accepted: {role:?}");
    }
    for (name, value) in ctx.attributes().flattened() {
        assert!(!name.contains('\0') && !value.contains('\0'), "{stage}: NUL in attribute {name:?} = {value:?}");
    }
}

/// Builds (and copies) the context from `input` with its secrets given by `secrets`; runs the
/// structural checks if `check`; returns every rendered `Debug`/`Display` text.
fn exercise(input: &Input, secrets: &Secrets, check: bool) -> Vec<String> {
    let mut rendered = Vec::new();
    let identity = match &input.identity {
        IdentityInput::Token(_) => EndUserIdentity::token(secrets.identity_token.clone().unwrap_or_default()),
        IdentityInput::Named { name, .. } => EndUserIdentity::named(name.clone(), secrets.identity_key.clone()),
    };
    let attributes = input.attributes.as_ref().and_then(AttributesInput::to_json);
    let mut builder = SecurityContext::builder(identity, secrets.database_access_token.clone())
        .data_roles(input.data_roles.iter().cloned());
    if let Some(v) = attributes.clone() {
        builder = builder.attributes(v);
    }
    let ctx = match builder.build() {
        Ok(ctx) => ctx,
        Err(e) => {
            if check {
                check_error(&e, "build");
            }
            rendered.push(format!("{e}"));
            rendered.push(format!("{e:?}"));
            return rendered;
        }
    };
    if check {
        check_context(&ctx, input, secrets, &secrets.database_access_token, "build");
        assert_eq!(ctx.data_roles(), input.data_roles.as_slice(), "build: data roles changed");
        let from_json = attributes.map_or_else(|| Ok(Attributes::new()), Attributes::from_json);
        assert_eq!(from_json.as_ref(), Ok(ctx.attributes()), "build: attributes differ from Attributes::from_json");
    }
    rendered.push(format!("{ctx:?}"));
    rendered.push(format!("{ctx}"));

    let mut token = secrets.database_access_token.as_str();
    let copied = match &input.copy {
        CopyInput::None => return rendered,
        CopyInput::DataRoles(roles) => ctx.with_data_roles(roles.iter().cloned()),
        CopyInput::Attributes(a) => match a.to_json() {
            Some(v) => ctx.with_attributes(v),
            None => return rendered,
        },
        CopyInput::DatabaseAccessToken(_) => {
            let t = secrets.copy_token.as_deref().unwrap_or_default();
            token = t;
            ctx.with_database_access_token(t.to_owned())
        }
    };
    match copied {
        Ok(copy) => {
            if check {
                check_context(&copy, input, secrets, token, "copy");
                assert_eq!(copy.identity(), ctx.identity(), "copy: identity changed");
                match &input.copy {
                    CopyInput::DataRoles(roles) => {
                        assert_eq!(copy.data_roles(), roles.as_slice(), "copy: data roles not replaced");
                        assert_eq!(copy.attributes(), ctx.attributes(), "copy: attributes changed");
                    }
                    CopyInput::Attributes(_) => {
                        assert_eq!(copy.data_roles(), ctx.data_roles(), "copy: data roles changed");
                    }
                    _ => {
                        assert_eq!(copy.data_roles(), ctx.data_roles(), "copy: data roles changed");
                        assert_eq!(copy.attributes(), ctx.attributes(), "copy: attributes changed");
                    }
                }
            }
            rendered.push(format!("{copy:?}"));
            rendered.push(format!("{copy}"));
        }
        Err(e) => {
            if check {
                check_error(&e, "copy");
            }
            rendered.push(format!("{e}"));
            rendered.push(format!("{e:?}"));
        }
    }
    rendered
}

fn occurrences(texts: &[String], needle: &str) -> usize {
    texts.iter().map(|t| t.matches(needle).count()).sum()
}

fuzz_target!(|input: Input| {
    let secrets = Secrets::of(&input, same);
    let rendered = exercise(&input, &secrets, true);

    // Non-secret inputs: a secret spelled by one of them may legitimately show.
    let mut public: Vec<String> = input.data_roles.clone();
    if let IdentityInput::Named { name, .. } = &input.identity {
        public.push(name.clone());
    }
    if let Some(a) = &input.attributes {
        a.texts(&mut public);
    }
    match &input.copy {
        CopyInput::DataRoles(roles) => public.extend(roles.iter().cloned()),
        CopyInput::Attributes(a) => a.texts(&mut public),
        CopyInput::None | CopyInput::DatabaseAccessToken(_) => {}
    }

    let suspects: Vec<(&str, &str)> = secrets
        .labelled()
        .into_iter()
        .filter(|(_, s)| s.chars().count() >= 8)
        .filter(|(_, s)| !public.iter().any(|p| p.contains(s)))
        .filter(|(_, s)| rendered.iter().any(|r| r.contains(s)))
        .collect();
    if suspects.is_empty() {
        return;
    }
    // Confirm against the look-alike run: the output must not depend on the secrets.
    let shadow = exercise(&input, &Secrets::of(&input, look_alike), false);
    for (label, secret) in suspects {
        let real = occurrences(&rendered, secret);
        let fake = occurrences(&shadow, secret);
        assert!(
            real <= fake,
            "the {label} {secret:?} leaks into Debug/Display output: {rendered:#?}"
        );
    }
});
