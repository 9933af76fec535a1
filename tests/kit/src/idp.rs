//! The identity provider of the token-provider tests and the README's doctests, started by
//! the test itself: the `oidc-provider` npm package run by Node.js
//! (`tests/idp/oidc/server.mjs`), on loopback,
//! on ports the OS picks, over http and over https with a private CA generated per run.
//!
//! One server per test binary ([`oidc`]). It exits when the test binary does: it watches
//! its stdin, which only this process holds.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::OnceLock;

use serde_json::{Value, json};

use crate::process::{Server, scratch_dir};

/// The secret of the OCI-shaped client: every character that Basic credentials must
/// form-encode (RFC 6749 §2.3.1).
pub const ODD_SECRET: &str = "a+b/c=d%e f";
pub const ENTRA_SECRET: &str = "entra-s3cret-value";
pub const SCOPE: &str = "https://db.example.com/.default";

/// A running oidc-provider.
pub struct Oidc {
    _server: Server,
    _stdin: ChildStdin,
    pub http_port: u16,
    pub https_port: u16,
    /// The private CA the https listener's certificate chains to, PEM.
    pub ca_pem: String,
    /// A PEM file with the CA, for `tls_ca_file`.
    pub ca_file: PathBuf,
}

impl Oidc {
    /// `http://127.0.0.1:port`.
    pub fn http(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// `https://localhost:port` (the certificate names `localhost` only).
    pub fn https(&self) -> String {
        format!("https://localhost:{}", self.https_port)
    }

    /// How many token requests reached `path` (e.g. `/oci/oauth2/v1/token`).
    pub async fn requests(&self, path: &str) -> u64 {
        let counts: Value = reqwest::get(format!("{}/test/requests", self.http()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        counts.get(path).and_then(Value::as_u64).unwrap_or(0)
    }

    /// A user token signed by the current user key.
    pub async fn user_token(&self, sub: &str, aud: &str, roles: &[&str]) -> String {
        let url = format!(
            "{}/test/user-token?sub={sub}&aud={aud}&roles={}",
            self.http(),
            roles.join(",")
        );
        let body: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        body["token"].as_str().unwrap().to_owned()
    }

    /// A new user-signing key; with `drop_old`, the older ones leave the JWKS.
    pub async fn rotate(&self, drop_old: bool) -> String {
        let url = format!(
            "{}/test/rotate{}",
            self.http(),
            if drop_old { "?drop=1" } else { "" }
        );
        let body: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        body["kid"].as_str().unwrap().to_owned()
    }

    /// The JWKS of user tokens.
    pub fn jwks_url(&self) -> String {
        format!("{}/test/jwks", self.http())
    }

    /// A `db.json` (the block under `extra_auth_params`) for Entra on-behalf-of against
    /// this server's tenant `tenant`, verifying end users' tokens for `audience`; the keys
    /// of `extra` (data roles, attributes) join the block. Written into a file of its own,
    /// removed with the returned guard.
    pub fn entra_obo_db_json(&self, tenant: &str, audience: &str, extra: Value) -> DbJson {
        let mut block = json!({
            "spi_type": "azure_tokens", "auth_flow": "on_behalf_of",
            "authority": format!("{}/{tenant}", self.http()),
            "client_id": "entra-app", "client_credential": ENTRA_SECRET, "scopes": SCOPE,
            "token_validation": {
                "issuer": self.http(), "audiences": audience, "jwks_url": self.jwks_url(),
                "role_claim": "roles", "allowed_roles": ["hr_employee", "hr_manager"],
            },
        });
        if let (Some(block), Value::Object(extra)) = (block.as_object_mut(), extra) {
            block.extend(extra);
        }
        let dir = scratch_dir("db-json").unwrap();
        let path = dir.join("db.json");
        let text = json!({"extra_auth_params": {"end_user_sec_params": block}}).to_string();
        std::fs::write(&path, text).unwrap();
        DbJson { dir, path }
    }
}

/// A `db.json` written by [`Oidc::entra_obo_db_json`], deleted on drop.
pub struct DbJson {
    dir: PathBuf,
    path: PathBuf,
}

impl DbJson {
    /// The file's path, as text.
    pub fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for DbJson {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The clients the server knows.
fn clients() -> Value {
    let obo = "urn:ietf:params:oauth:grant-type:jwt-bearer";
    let base = |id: &str, secret: &str, method: &str, grants: Value| {
        json!({
            "client_id": id, "client_secret": secret,
            "token_endpoint_auth_method": method, "grant_types": grants,
            "redirect_uris": [], "response_types": [], "scope": SCOPE,
        })
    };
    json!([
        base(
            "entra-app",
            ENTRA_SECRET,
            "client_secret_post",
            json!(["client_credentials", obo])
        ),
        base(
            "oci-app",
            ODD_SECRET,
            "client_secret_basic",
            json!(["client_credentials"])
        ),
        // Client credentials disabled: on-behalf-of only.
        base("obo-only", ENTRA_SECRET, "client_secret_post", json!([obo])),
    ])
}

/// The one server of this test binary, started on first use.
pub fn oidc() -> &'static Oidc {
    static IDP: OnceLock<Oidc> = OnceLock::new();
    IDP.get_or_init(|| start().unwrap_or_else(|e| panic!("{e}")))
}

fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../idp/oidc")
}

fn start() -> Result<Oidc, String> {
    let dir = oidc_dir();
    if Command::new("node").arg("--version").output().is_err() {
        return Err(
            "the IdP tests need Node.js (>= 20): `apt-get install nodejs npm`, \
                    then `npm ci --prefix tests/idp/oidc` (or run `bash .ci/setup`)"
                .into(),
        );
    }
    if !dir.join("node_modules/oidc-provider/package.json").exists() {
        return Err(format!(
            "the IdP tests need the oidc-provider package: run `npm ci --prefix {}` \
             (or `bash .ci/setup`)",
            dir.display()
        ));
    }
    let tmp = scratch_dir("idp")?;
    let (ca_pem, cert_pem, key_pem) = private_ca();
    let write = |name: &str, text: &str| {
        let path = tmp.join(name);
        std::fs::write(&path, text).map(|()| path)
    };
    let ca_file = write("ca.pem", &ca_pem).map_err(|e| e.to_string())?;
    let cert_file = write("server.pem", &cert_pem).map_err(|e| e.to_string())?;
    let key_file = write("server.key", &key_pem).map_err(|e| e.to_string())?;
    let mut server = Server::spawn(
        Command::new("node")
            .arg(dir.join("server.mjs"))
            .current_dir(&dir)
            .env("IDP_CLIENTS", clients().to_string())
            .env("IDP_TLS_CERT", &cert_file)
            .env("IDP_TLS_KEY", &key_file)
            .env("IDP_TMP", &tmp)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
        tmp,
        "node",
    )?;
    let stdin = server.child().stdin.take().ok_or("no stdin")?;
    let stdout = server.child().stdout.take().ok_or("no stdout")?;
    // Blocks until the server says it listens (or exits): readiness, not a sleep.
    let mut lines = BufReader::new(stdout).lines();
    let ports = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(json) = line.strip_prefix("ready ") {
                    break serde_json::from_str::<Value>(json).map_err(|e| e.to_string())?;
                }
            }
            // The server is killed and its folder removed as it drops.
            _ => {
                return Err("oidc-provider exited before listening (run \
                            `node tests/idp/oidc/server.mjs` to see why)"
                    .into());
            }
        }
    };
    // Keep draining stdout so that the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let port = |k: &str| {
        ports[k]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or(format!("no {k} port"))
    };
    Ok(Oidc {
        http_port: port("http")?,
        https_port: port("https")?,
        _server: server,
        _stdin: stdin,
        ca_pem,
        ca_file,
    })
}

/// A CA and a server certificate for `localhost` (only: `127.0.0.1` is the wrong name)
/// signed by it: (CA PEM,
/// server certificate PEM, server key PEM).
fn private_ca() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "ctxpool test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca_cert.pem(), leaf.pem(), key.serialize_pem())
}
