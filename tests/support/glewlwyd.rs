//! Glewlwyd 2.7 (Debian's `glewlwyd` package), a second, independent OAuth 2 server whose
//! errors do not follow RFC 6749 (a bare 403 for a wrong secret), started by the test on
//! loopback with a throwaway SQLite database in a temporary folder, and killed on drop.
//!
//! Its API prefix is `oauth2` and its OAuth 2 plugin instance is named `v1`, so that the
//! token endpoint is `/oauth2/v1/token`: where the OCI token source looks for it.
#![allow(dead_code)]

use std::process::{Command, Stdio};

use serde_json::{Value, json};

use ctxpool_testkit::process::{Server, scratch_dir};

/// The Debian package's schema and default administrator (`admin` / `password`).
const SCHEMA: &str = "/usr/share/dbconfig-common/data/glewlwyd/install/sqlite3";
const INSTALL: &str = "apt-get install glewlwyd (or run `bash .ci/setup`)";

pub struct Glewlwyd {
    server: Server,
    pub port: u16,
    /// The administrator's session cookie.
    cookie: String,
}

impl Glewlwyd {
    /// The authority of the OCI shape: the server's root.
    pub fn authority(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the server, logs in as the administrator and creates the OAuth 2 plugin
    /// (client credentials only, 300 s tokens) and the scope `db`.
    pub async fn start() -> Self {
        if Command::new("glewlwyd").arg("--help").output().is_err()
            || !std::path::Path::new(SCHEMA).exists()
        {
            panic!("the Glewlwyd tests need Glewlwyd 2.7: {INSTALL}");
        }
        let dir = scratch_dir("glewlwyd").unwrap();
        let db = dir.join("glewlwyd.db");
        let schema = std::fs::File::open(SCHEMA).unwrap();
        let status = Command::new("sqlite3")
            .arg(&db)
            .stdin(schema)
            .stdout(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("sqlite3 ({e}): {INSTALL}"));
        assert!(status.success(), "sqlite3 could not create the database");
        // A port the OS picked, released for Glewlwyd (which takes a number only).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.join("glewlwyd.conf");
        std::fs::write(&config, config_text(port, &db, &dir)).unwrap();
        let server = Server::spawn(
            Command::new("glewlwyd")
                .arg(format!("--config-file={}", config.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            dir,
            "glewlwyd",
        )
        .unwrap_or_else(|e| panic!("{e}: {INSTALL}"));
        let mut server = Self {
            server,
            port,
            cookie: String::new(),
        };
        server.wait_ready().await;
        server.login().await;
        server
            .admin(
                "mod/plugin/",
                json!({
                    "module": "oauth2-glewlwyd", "name": "v1", "display_name": "OAuth2",
                    "parameters": {
                        "jwt-type": "sha", "jwt-key-size": "256",
                        "key": "ctxpool-test-signing-key-0123456789",
                        "access-token-duration": 300, "refresh-token-duration": 1_209_600,
                        "code-duration": 600, "refresh-token-rolling": false,
                        "auth-type-client-enabled": true, "auth-type-code-enabled": false,
                        "auth-type-implicit-enabled": false, "auth-type-password-enabled": false,
                        "auth-type-refresh-enabled": false, "auth-type-device-enabled": false,
                        "scope": [],
                    },
                }),
            )
            .await;
        server
            .admin(
                "scope/",
                json!({
                    "name": "db", "display_name": "db", "description": "the database",
                    "password_required": false, "scheme": {},
                }),
            )
            .await;
        server
    }

    /// A confidential client allowed `grants`.
    pub async fn client(&self, id: &str, secret: &str, grants: &[&str]) {
        self.admin(
            "client/",
            json!({
                "client_id": id, "name": id, "confidential": true, "password": secret,
                "enabled": true, "authorization_type": grants, "scope": ["db"],
                "redirect_uri": ["https://app.example/callback"],
            }),
        )
        .await;
    }

    /// Polls the API until it answers: readiness, not a sleep.
    async fn wait_ready(&mut self) {
        let url = format!("{}/oauth2/", self.authority());
        for _ in 0..500 {
            if reqwest::get(&url).await.is_ok() {
                return;
            }
            if let Some(status) = self.server.exited() {
                panic!("glewlwyd exited ({status}) before listening");
            }
            // The poll interval: a refused connect on loopback fails at once.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("glewlwyd did not answer on port {}", self.port);
    }

    async fn login(&mut self) {
        let response = reqwest::Client::new()
            .post(format!("{}/oauth2/auth/", self.authority()))
            .json(&json!({"username": "admin", "password": "password"}))
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "admin login: {}",
            response.status()
        );
        let cookie = response
            .headers()
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with("GLEWLWYD2_SESSION_ID="))
            .unwrap();
        self.cookie = cookie.split(';').next().unwrap().to_owned();
    }

    async fn admin(&self, path: &str, body: Value) {
        let response = reqwest::Client::new()
            .post(format!("{}/oauth2/{path}", self.authority()))
            .header(reqwest::header::COOKIE, &self.cookie)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
    }
}

fn config_text(port: u16, db: &std::path::Path, dir: &std::path::Path) -> String {
    format!(
        r#"port={port}
external_url="http://127.0.0.1:{port}"
api_prefix="oauth2"
static_files_path="{dir}/"
log_mode="console"
log_level="ERROR"
cookie_domain="127.0.0.1"
cookie_secure=0
session_key="GLEWLWYD2_SESSION_ID"
session_expiration=3600
admin_session_authentication="cookie"
profile_session_authentication="cookie"
login_api_enabled=true
admin_scope="g_admin"
profile_scope="g_profile"
user_module_path="/usr/lib/glewlwyd/user"
user_middleware_module_path="/usr/lib/glewlwyd/user_middleware"
client_module_path="/usr/lib/glewlwyd/client"
user_auth_scheme_module_path="/usr/lib/glewlwyd/scheme"
plugin_module_path="/usr/lib/glewlwyd/plugin"
use_secure_connection=false
secure_connection_key_file="/dev/null"
secure_connection_pem_file="/dev/null"
hash_algorithm="SHA512"
database = {{
  type = "sqlite3"
  path = "{db}"
}};
"#,
        dir = dir.display(),
        db = db.display(),
    )
}
