//! The Oracle backend's errors, and how driver errors map onto them.

use std::fmt;

/// The Oracle error number of an end-user token the database refused (ORA-52601).
pub const ORA_END_USER_TOKEN_REFUSED: usize = 52_601;
/// The Oracle error number of a database-access token the database refused (ORA-52602).
pub const ORA_DATABASE_TOKEN_REFUSED: usize = 52_602;

/// Why an Oracle operation, connect or context failed.
///
/// No variant carries a token, key or password: the refused-token variants deliberately
/// drop the server's message, and the context variants name sizes, never contents.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OracleError {
    /// Deep Data Security needs TLS: the connect descriptor has an address whose protocol
    /// is not `tcps`, or the driver found the transport not encrypted.
    #[error("an end-user security context requires the TCPS protocol (TLS) on every address")]
    TcpsRequired,
    /// The server did not negotiate Deep Data Security (it is not Oracle AI Database 26ai,
    /// or the feature is off).
    #[error("the database does not support Oracle Deep Data Security")]
    DeepSecUnsupported,
    /// The encoded context is larger than the protocol carries.
    #[error("the encoded end-user security context is {size} bytes, more than the {max} allowed")]
    ContextTooLarge {
        /// Its encoded size in bytes.
        size: usize,
        /// The limit in bytes (65,535).
        max: usize,
    },
    /// The driver refused the context's contents (an empty identity or token). ctxpool's
    /// own validation makes this unreachable for contexts built with
    /// [`SecurityContext::builder`](crate::SecurityContext::builder).
    #[error("the driver refused the end-user security context: {0}")]
    InvalidContext(&'static str),
    /// The database refused the end-user token or identity (ORA-52601). The call did not
    /// run; the connection stays usable once the context is cleared.
    #[error("the database refused the end-user token (ORA-52601)")]
    EndUserTokenRefused,
    /// The database refused the database-access token (ORA-52602). The call did not run;
    /// the connection stays usable once the context is cleared.
    #[error("the database refused the database-access token (ORA-52602)")]
    DatabaseTokenRefused,
    /// The connection configuration is incomplete or invalid.
    #[error("invalid Oracle configuration: {0}")]
    Config(&'static str),
    /// Any other driver or database error. (The driver's error type does not implement
    /// `std::error::Error`, so it is shown, not chained as a source.)
    #[error("{0}")]
    Driver(oracledb::Error),
    /// The connection is gone: an earlier blocking call on it panicked, or it was closed.
    #[error("the Oracle connection is no longer usable")]
    Lost,
    /// The blocking task running the call panicked; the connection was dropped with it.
    #[error("the blocking task running an Oracle call panicked")]
    BlockingPanicked,
    /// The blocking task was cancelled (the runtime is shutting down).
    #[error("the blocking task running an Oracle call was cancelled")]
    BlockingCancelled,
}

/// What an error means for the connection it happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Severity {
    /// The call failed; the connection is fine.
    Call,
    /// The connection is closed or unusable: discard it.
    Fatal,
}

/// ORA- numbers after which the session is gone: end-of-file on the channel, not
/// connected, session killed, idle time exceeded, TNS lost contact, session shut down.
const FATAL_ORA: &[usize] = &[
    28, 1012, 2396, 3113, 3114, 3135, 12_537, 12_547, 12_570, 12_572,
];

impl OracleError {
    /// Maps a driver error onto the typed variants.
    pub fn from_driver(e: oracledb::Error) -> Self {
        use oracledb::ErrorKind as K;
        match e.kind() {
            K::EndUserSecurityContextRequiresTcps => Self::TcpsRequired,
            K::UnsupportedDeepDataSecurityFeature => Self::DeepSecUnsupported,
            K::InvalidEndUserSecurityContextLength(size) => Self::ContextTooLarge {
                size: *size,
                max: crate::context::MAX_ENCODED_LEN,
            },
            // The driver's messages here are fixed strings; keep ours fixed too.
            K::InvalidEndUserSecurityContext(_) => {
                Self::InvalidContext("an identity part or the database-access token is empty")
            }
            K::DbError(db) => match classify_ora(db.code()) {
                Some(mapped) => mapped,
                None => Self::Driver(e),
            },
            _ => Self::Driver(e),
        }
    }

    /// The ORA- number of a database error, if this is one.
    pub fn ora_code(&self) -> Option<usize> {
        match self {
            Self::EndUserTokenRefused => Some(ORA_END_USER_TOKEN_REFUSED),
            Self::DatabaseTokenRefused => Some(ORA_DATABASE_TOKEN_REFUSED),
            Self::Driver(e) => match e.kind() {
                oracledb::ErrorKind::DbError(db) => Some(db.code()),
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether the database refused the context (either token): the call did not run
    /// and the connection is still usable.
    pub fn is_context_refused(&self) -> bool {
        matches!(self, Self::EndUserTokenRefused | Self::DatabaseTokenRefused)
    }

    /// What the error means for the connection.
    pub(crate) fn severity(&self) -> Severity {
        use oracledb::ErrorKind as K;
        match self {
            Self::Lost | Self::BlockingPanicked | Self::BlockingCancelled => Severity::Fatal,
            Self::Driver(e) => match e.kind() {
                K::DeadConnection
                | K::NotConnected
                | K::UnableToRecover
                | K::StreamOperation
                | K::TlsOperation
                | K::LockPoisoned => Severity::Fatal,
                K::DbError(db) if FATAL_ORA.contains(&db.code()) => Severity::Fatal,
                _ => Severity::Call,
            },
            _ => Severity::Call,
        }
    }
}

/// The typed error an ORA- number maps to, if it has one of its own.
pub(crate) fn classify_ora(code: usize) -> Option<OracleError> {
    match code {
        ORA_END_USER_TOKEN_REFUSED => Some(OracleError::EndUserTokenRefused),
        ORA_DATABASE_TOKEN_REFUSED => Some(OracleError::DatabaseTokenRefused),
        _ => None,
    }
}

/// Whether an ORA- number means the session is gone.
#[cfg(test)]
pub(crate) fn is_fatal_ora(code: usize) -> bool {
    FATAL_ORA.contains(&code)
}

impl From<oracledb::Error> for OracleError {
    fn from(e: oracledb::Error) -> Self {
        Self::from_driver(e)
    }
}

/// A redacted stand-in for secrets in `Debug` output.
pub(crate) struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn driver(kind_source: std::io::Error) -> oracledb::Error {
        oracledb::Error::from(kind_source)
    }

    #[test]
    fn refused_tokens_map_to_their_own_variants() {
        assert!(matches!(
            classify_ora(52_601),
            Some(OracleError::EndUserTokenRefused)
        ));
        assert!(matches!(
            classify_ora(52_602),
            Some(OracleError::DatabaseTokenRefused)
        ));
        assert!(classify_ora(1).is_none());
        assert!(classify_ora(52_600).is_none());
        assert!(OracleError::EndUserTokenRefused.is_context_refused());
        assert!(OracleError::DatabaseTokenRefused.is_context_refused());
        assert_eq!(OracleError::EndUserTokenRefused.ora_code(), Some(52_601));
        assert_eq!(OracleError::DatabaseTokenRefused.ora_code(), Some(52_602));
        // A refusal is a failed call, not a lost connection.
        assert_eq!(OracleError::EndUserTokenRefused.severity(), Severity::Call);
        assert_eq!(OracleError::DatabaseTokenRefused.severity(), Severity::Call);
    }

    #[test]
    fn fatal_ora_numbers() {
        for code in [28, 1012, 3113, 3114, 3135, 12_572] {
            assert!(is_fatal_ora(code), "{code}");
        }
        for code in [1, 942, 1403, 52_601, 52_602] {
            assert!(!is_fatal_ora(code), "{code}");
        }
    }

    #[test]
    fn driver_context_errors_map_to_typed_variants() {
        // The driver's context builder is the only public way to get these kinds.
        let too_large = oracledb::EndUserSecurityContext::new(
            oracledb::EndUserIdentity::Token("t".repeat(70_000)),
            "d".into(),
        )
        .err()
        .unwrap();
        match OracleError::from_driver(too_large) {
            OracleError::ContextTooLarge { size, max } => {
                assert!(size > 70_000);
                assert_eq!(max, 65_535);
            }
            other => panic!("{other:?}"),
        }
        let empty = oracledb::EndUserSecurityContext::new(
            oracledb::EndUserIdentity::Token("secret-token".into()),
            String::new(),
        )
        .err()
        .unwrap();
        let mapped = OracleError::from_driver(empty);
        assert!(matches!(mapped, OracleError::InvalidContext(_)));
        assert!(!format!("{mapped} {mapped:?}").contains("secret-token"));
    }

    #[test]
    fn io_failures_are_fatal_timeouts_are_not() {
        let reset = driver(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(OracleError::from_driver(reset).severity(), Severity::Fatal);
        // The driver recovers from a call timeout (break + reset) or reports
        // UnableToRecover; the timeout itself leaves the connection usable.
        let timeout = driver(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert_eq!(OracleError::from_driver(timeout).severity(), Severity::Call);
        assert_eq!(OracleError::Lost.severity(), Severity::Fatal);
        assert_eq!(OracleError::BlockingPanicked.severity(), Severity::Fatal);
        assert_eq!(OracleError::TcpsRequired.severity(), Severity::Call);
    }

    #[test]
    fn messages_name_no_secret() {
        for e in [
            OracleError::TcpsRequired,
            OracleError::DeepSecUnsupported,
            OracleError::ContextTooLarge {
                size: 70_000,
                max: 65_535,
            },
            OracleError::EndUserTokenRefused,
            OracleError::DatabaseTokenRefused,
            OracleError::Lost,
        ] {
            let text = format!("{e} {e:?}");
            assert!(!text.is_empty());
            assert!(!text.to_lowercase().contains("secret"));
        }
        assert!(
            OracleError::EndUserTokenRefused
                .to_string()
                .contains("ORA-52601")
        );
        assert!(
            OracleError::DatabaseTokenRefused
                .to_string()
                .contains("ORA-52602")
        );
    }
}
