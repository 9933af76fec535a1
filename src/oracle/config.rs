//! Connect parameters for the Oracle backend.

use std::fmt;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::error::{OracleError, Redacted};

/// How the pool's one least-privileged database login connects.
///
/// Deep Data Security only works over TLS, so the connect string must resolve to
/// addresses that all use `tcps`; [`OracleConfig::driver_config`] refuses anything else
/// with [`OracleError::TcpsRequired`] before any connection is attempted.
///
/// `Debug` redacts the password and the wallet password.
#[derive(Clone)]
pub struct OracleConfig {
    /// The database user the pool logs in as (least privileged).
    pub user: String,
    /// Its password.
    pub password: SecretString,
    /// An Easy Connect string (`tcps://host:1522/service`), a full descriptor, or a
    /// `tnsnames.ora` alias (looked up in [`config_dir`](Self::config_dir)).
    pub connect_string: String,
    /// Where `tnsnames.ora` is, for an alias connect string.
    pub config_dir: Option<String>,
    /// The directory holding the wallet (`ewallet.pem`), for mutual TLS or a private CA.
    pub wallet_location: Option<String>,
    /// The wallet's password, if it is encrypted.
    pub wallet_password: Option<SecretString>,
    /// The longest a single database round trip may take before the driver interrupts
    /// it. Bounds how long a blocking thread can be held. `None`: no limit.
    pub call_timeout: Option<Duration>,
    /// The longest the TCP/TLS connect may take.
    pub transport_connect_timeout: Option<Duration>,
}

impl OracleConfig {
    /// A configuration with the required parts; the rest unset.
    pub fn new(
        user: impl Into<String>,
        password: impl Into<String>,
        connect_string: impl Into<String>,
    ) -> Self {
        Self {
            user: user.into(),
            password: SecretString::from(password.into()),
            connect_string: connect_string.into(),
            config_dir: None,
            wallet_location: None,
            wallet_password: None,
            call_timeout: None,
            transport_connect_timeout: None,
        }
    }

    /// Sets the wallet directory and, if the wallet is encrypted, its password.
    pub fn wallet(mut self, location: impl Into<String>, password: Option<String>) -> Self {
        self.wallet_location = Some(location.into());
        self.wallet_password = password.map(SecretString::from);
        self
    }

    /// Sets where `tnsnames.ora` is.
    pub fn config_dir(mut self, dir: impl Into<String>) -> Self {
        self.config_dir = Some(dir.into());
        self
    }

    /// Sets the per-round-trip call timeout.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = Some(timeout);
        self
    }

    /// Sets the transport connect timeout.
    pub fn transport_connect_timeout(mut self, timeout: Duration) -> Self {
        self.transport_connect_timeout = Some(timeout);
        self
    }

    /// Checks the configuration and builds the driver's. Parses the connect string (an
    /// alias is looked up in `tnsnames.ora`, a file read) and refuses any address that is
    /// not `tcps`. Opens no connection.
    pub fn driver_config(&self) -> Result<oracledb::Config, OracleError> {
        if self.user.trim().is_empty() {
            return Err(OracleError::Config("the user is empty"));
        }
        if self.password.expose_secret().is_empty() {
            return Err(OracleError::Config("the password is empty"));
        }
        if self.connect_string.trim().is_empty() {
            return Err(OracleError::Config("the connect string is empty"));
        }
        let mut config = oracledb::Config::default();
        if let Some(dir) = &self.config_dir {
            config = config.set_config_dir(dir);
        }
        config = config
            .set_credentials(&self.user, self.password.expose_secret())
            .set_connect_string(&self.connect_string)
            .map_err(OracleError::from_driver)?;
        check_tcps(&config.get_connect_descriptor())?;
        if let Some(location) = &self.wallet_location {
            config = config.set_wallet_location(location.clone());
        }
        if let Some(password) = &self.wallet_password {
            config = config.set_wallet_password(password.expose_secret());
        }
        if let Some(timeout) = self.transport_connect_timeout {
            config = config.set_transport_connect_timeout(Some(timeout));
        }
        Ok(config)
    }
}

impl fmt::Debug for OracleConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OracleConfig")
            .field("user", &self.user)
            .field("password", &Redacted)
            .field("connect_string", &self.connect_string)
            .field("config_dir", &self.config_dir)
            .field("wallet_location", &self.wallet_location)
            .field(
                "wallet_password",
                &self.wallet_password.as_ref().map(|_| Redacted),
            )
            .field("call_timeout", &self.call_timeout)
            .field("transport_connect_timeout", &self.transport_connect_timeout)
            .finish()
    }
}

/// Every `(PROTOCOL=…)` of a full descriptor (as the driver renders it) must be `tcps`,
/// and there must be at least one.
pub(crate) fn check_tcps(descriptor: &str) -> Result<(), OracleError> {
    const KEY: &str = "(PROTOCOL=";
    let upper = descriptor.to_ascii_uppercase();
    let mut addresses = 0;
    let mut rest = upper.as_str();
    while let Some(at) = rest.find(KEY) {
        rest = &rest[at + KEY.len()..];
        let value = rest.split(')').next().unwrap_or_default().trim();
        if value != "TCPS" {
            return Err(OracleError::TcpsRequired);
        }
        addresses += 1;
    }
    if addresses == 0 {
        return Err(OracleError::TcpsRequired);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tcps_easy_connect_is_accepted() {
        let cfg = OracleConfig::new("hr_app", "pw", "tcps://db.example.com:1522/hr");
        let driver = cfg.driver_config().unwrap();
        assert!(driver.get_connect_descriptor().contains("(PROTOCOL=tcps)"));
    }

    #[test]
    fn non_tcps_is_refused_before_connecting() {
        for cs in [
            "db.example.com:1521/hr",
            "tcp://db.example.com:1521/hr",
            "(DESCRIPTION=(ADDRESS=(PROTOCOL=tcp)(HOST=h)(PORT=1521))(CONNECT_DATA=(SERVICE_NAME=s)))",
            // One plain address among TLS ones is enough to refuse: failover would
            // silently drop TLS.
            "(DESCRIPTION=(ADDRESS_LIST=(ADDRESS=(PROTOCOL=tcps)(HOST=a)(PORT=1522))\
             (ADDRESS=(PROTOCOL=tcp)(HOST=b)(PORT=1521)))(CONNECT_DATA=(SERVICE_NAME=s)))",
        ] {
            let cfg = OracleConfig::new("hr_app", "pw", cs);
            assert!(
                matches!(cfg.driver_config(), Err(OracleError::TcpsRequired)),
                "{cs}"
            );
        }
    }

    #[test]
    fn full_tcps_descriptor_is_accepted() {
        let cs = "(DESCRIPTION=(ADDRESS_LIST=(ADDRESS=(PROTOCOL=TCPS)(HOST=a)(PORT=1522))\
                  (ADDRESS=(PROTOCOL=tcps)(HOST=b)(PORT=1522)))(CONNECT_DATA=(SERVICE_NAME=s)))";
        OracleConfig::new("hr_app", "pw", cs)
            .driver_config()
            .unwrap();
    }

    #[test]
    fn check_tcps_on_rendered_descriptors() {
        assert!(check_tcps("(ADDRESS=(PROTOCOL=tcps)(HOST=h)(PORT=1))").is_ok());
        assert!(check_tcps("(ADDRESS=(PROTOCOL=tcp)(HOST=h)(PORT=1))").is_err());
        assert!(check_tcps("").is_err());
        assert!(check_tcps("(PROTOCOL=").is_err());
    }

    #[test]
    fn missing_parts_are_typed_errors() {
        for cfg in [
            OracleConfig::new("", "pw", "tcps://h:1522/s"),
            OracleConfig::new("u", "", "tcps://h:1522/s"),
            OracleConfig::new("u", "pw", " "),
        ] {
            assert!(matches!(cfg.driver_config(), Err(OracleError::Config(_))));
        }
    }

    #[test]
    fn debug_redacts_passwords() {
        let cfg = OracleConfig::new("hr_app", "pw-SECRET", "tcps://h:1522/s")
            .wallet("/wallet", Some("wallet-SECRET".into()));
        let text = format!("{cfg:?}");
        assert!(!text.contains("SECRET"), "{text}");
        assert!(text.contains("hr_app") && text.contains("/wallet"));
    }
}
