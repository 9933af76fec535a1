//! The [`Backend`] implementation: connections opened on blocking threads.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use super::config::OracleConfig;
use super::connection::{Closer, OracleConnection};
use super::error::OracleError;
use super::session::Session;
use super::translate::translate;
use crate::backend::{Backend, DiscardReason};
use crate::context::{EndUserIdentity, SecurityContext};

type Connect<S> = dyn Fn() -> Result<S, OracleError> + Send + Sync;

/// The Oracle backend: hand it to [`Pool::builder`](crate::Pool::builder).
///
/// Connecting runs on tokio's blocking pool. A new connection is checked for TLS and for
/// Deep Data Security before the pool accepts it (local checks in the driver, no extra
/// round trip), so a misconfigured pool fails at its first connect with
/// [`OracleError::TcpsRequired`] or [`OracleError::DeepSecUnsupported`], not at the first
/// end user's statement.
pub struct OracleBackend<S: Session = oracledb::Connection> {
    connect: Arc<Connect<S>>,
}

impl<S: Session> fmt::Debug for OracleBackend<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OracleBackend").finish_non_exhaustive()
    }
}

impl OracleBackend {
    /// A backend that connects with `config`. Checks the configuration now (TCPS on every
    /// address, credentials present); opens no connection.
    pub fn new(config: OracleConfig) -> Result<Self, OracleError> {
        let driver = config.driver_config()?;
        let call_timeout = config.call_timeout;
        Ok(Self::with_connector(move || {
            let conn = oracledb::connect(driver.clone()).map_err(OracleError::from_driver)?;
            if call_timeout.is_some() {
                conn.set_call_timeout(call_timeout)
                    .map_err(OracleError::from_driver)?;
            }
            Ok(conn)
        }))
    }
}

impl<S: Session> OracleBackend<S> {
    /// A backend whose connections come from `connect`, a blocking function run on
    /// tokio's blocking pool. For custom driver set-up, and for tests with a double.
    pub fn with_connector(
        connect: impl Fn() -> Result<S, OracleError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            connect: Arc::new(connect),
        }
    }
}

/// Sets and clears a throwaway context: the driver refuses it at once, without a round
/// trip, when the transport is not TLS or the server lacks Deep Data Security.
fn probe<S: Session>(session: &mut S) -> Result<(), OracleError> {
    let context = SecurityContext::builder(EndUserIdentity::named("ctxpool_probe", None), "probe")
        .build()
        .map_err(|_| OracleError::InvalidContext("the probe context"))?;
    let driver = translate(&context)?;
    let set = session.set_context(&driver);
    session.clear_context()?;
    set
}

impl<S: Session> Backend for OracleBackend<S> {
    type Connection = OracleConnection<S>;
    type Error = OracleError;

    async fn connect(&self) -> Result<OracleConnection<S>, OracleError> {
        let connect = self.connect.clone();
        // If the create timeout drops this future, the blocking connect still finishes;
        // the Closer then logs the session off on a blocking thread.
        let opened = tokio::task::spawn_blocking(move || {
            let mut session = Closer::new(connect()?);
            probe(&mut *session)?;
            Ok::<_, OracleError>(session)
        })
        .await;
        match opened {
            Ok(Ok(session)) => Ok(OracleConnection::new(session)),
            Ok(Err(e)) => Err(e),
            Err(e) if e.is_panic() => Err(OracleError::BlockingPanicked),
            Err(_) => Err(OracleError::BlockingCancelled),
        }
    }

    fn recycle(
        &self,
        conn: &mut OracleConnection<S>,
    ) -> impl Future<Output = Result<(), DiscardReason>> + Send {
        conn.recycle()
    }
}
