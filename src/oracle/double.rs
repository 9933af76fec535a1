//! A recording double of [`Session`] and the unit tests that drive the pooled connection,
//! the backend and the pool through it: ordering, discard rules, cancellation, refusals.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, MutexGuard};

use super::error::OracleError;
use super::session::{Params, Session};
use super::translate::DriverContext;
use super::{OracleBackend, OracleConnection};

/// What the double saw, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    Set(String),
    Clear,
    Execute(String),
    Query(String),
    Commit,
    Rollback,
    Ping,
    Raw,
    Closed,
}

#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub(crate) session: u64,
    pub(crate) op: Op,
    /// The context the driver held when the operation ran.
    pub(crate) under: Option<String>,
    pub(crate) thread: ThreadId,
}

/// A failure to script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fail {
    /// A call error; the connection is fine.
    Call,
    /// The connection dies (an I/O error).
    Fatal,
    /// The driver refuses to set any context: no TLS.
    NoTcps,
    /// The driver refuses to set any context: no Deep Data Security.
    NoDeepSec,
}

impl Fail {
    fn error(self) -> OracleError {
        match self {
            Self::Call => OracleError::Config("scripted call failure"),
            Self::Fatal => OracleError::from_driver(
                std::io::Error::from(std::io::ErrorKind::ConnectionReset).into(),
            ),
            Self::NoTcps => OracleError::TcpsRequired,
            Self::NoDeepSec => OracleError::DeepSecUnsupported,
        }
    }
}

#[derive(Default)]
struct State {
    log: Vec<Event>,
    next_id: u64,
    /// End users (summaries) whose token the "server" refuses (ORA-52601).
    refused: HashSet<String>,
    fail_set: Option<Fail>,
    fail_execute: Option<Fail>,
    fail_rollback: Option<Fail>,
    /// Statements with this text wait until the gate opens.
    gate_open: bool,
}

/// The shared script and log of every session a test's backend opens.
#[derive(Clone, Default)]
pub(crate) struct Script {
    state: Arc<(Mutex<State>, Condvar)>,
    /// Woken at every recorded event, for [`until`](Self::until).
    recorded: Arc<tokio::sync::Notify>,
}

impl Script {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.0.lock()
    }

    pub(crate) fn backend(&self) -> OracleBackend<Recorder> {
        let script = self.clone();
        OracleBackend::with_connector(move || {
            let mut s = script.lock();
            s.next_id += 1;
            Ok(Recorder {
                id: s.next_id,
                script: script.clone(),
                context: None,
            })
        })
    }

    pub(crate) fn log(&self) -> Vec<Event> {
        self.lock().log.clone()
    }

    /// The operations of one session, without the connect-time probe.
    pub(crate) fn ops(&self, session: u64) -> Vec<Op> {
        self.lock()
            .log
            .iter()
            .filter(|e| e.session == session)
            .map(|e| e.op.clone())
            .skip(2) // probe: Set, Clear
            .collect()
    }

    pub(crate) fn refuse(&self, who: &str) {
        self.lock().refused.insert(who.to_owned());
    }
    pub(crate) fn fail_set(&self, f: Option<Fail>) {
        self.lock().fail_set = f;
    }
    pub(crate) fn fail_execute(&self, f: Option<Fail>) {
        self.lock().fail_execute = f;
    }
    pub(crate) fn fail_rollback(&self, f: Option<Fail>) {
        self.lock().fail_rollback = f;
    }
    pub(crate) fn open_gate(&self) {
        self.lock().gate_open = true;
        self.state.1.notify_all();
    }

    fn wait_gate(&self) {
        let mut s = self.lock();
        while !s.gate_open {
            self.state.1.wait(&mut s);
        }
    }

    /// Waits (on the async side, without blocking it) until `pred` holds for the log,
    /// checking again at every recorded event. The deadline only turns a hang into a
    /// failure.
    pub(crate) async fn until(&self, pred: impl Fn(&[Event]) -> bool) {
        let wait = async {
            loop {
                // Registered before the check, so an event recorded in between wakes it.
                let recorded = self.recorded.notified();
                tokio::pin!(recorded);
                recorded.as_mut().enable();
                if pred(&self.lock().log) {
                    return;
                }
                recorded.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .is_err()
        {
            panic!("condition never held; log: {:?}", self.log());
        }
    }
}

/// The double: records every call with the context the "driver" holds at that moment.
pub(crate) struct Recorder {
    id: u64,
    script: Script,
    context: Option<String>,
}

impl Recorder {
    fn record(&self, op: Op) {
        let event = Event {
            session: self.id,
            op,
            under: self.context.clone(),
            thread: std::thread::current().id(),
        };
        self.script.lock().log.push(event);
        self.script.recorded.notify_waiters();
    }

    /// What the "server" says to a call: refuse a refused end user's context.
    fn server_check(&self) -> Result<(), OracleError> {
        match &self.context {
            Some(who) if self.script.lock().refused.contains(who) => {
                Err(OracleError::EndUserTokenRefused)
            }
            _ => Ok(()),
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.record(Op::Closed);
    }
}

impl Session for Recorder {
    type Raw = Recorder;
    type Row = String;

    fn set_context(&mut self, context: &DriverContext) -> Result<(), OracleError> {
        if let Some(f) = self.script.lock().fail_set {
            return Err(f.error());
        }
        self.context = Some(context.summary().to_owned());
        self.record(Op::Set(context.summary().to_owned()));
        Ok(())
    }

    fn clear_context(&mut self) -> Result<(), OracleError> {
        self.context = None;
        self.record(Op::Clear);
        Ok(())
    }

    fn execute(&mut self, sql: &str, _params: &Params) -> Result<u64, OracleError> {
        if sql == "BLOCK" {
            self.script.wait_gate();
        }
        self.record(Op::Execute(sql.to_owned()));
        self.server_check()?;
        if let Some(f) = self.script.lock().fail_execute {
            return Err(f.error());
        }
        Ok(1)
    }

    fn query(&mut self, sql: &str, _params: &Params) -> Result<Vec<String>, OracleError> {
        self.record(Op::Query(sql.to_owned()));
        self.server_check()?;
        Ok(vec![
            self.context.clone().unwrap_or_else(|| "(plain)".into()),
        ])
    }

    fn commit(&mut self) -> Result<(), OracleError> {
        self.record(Op::Commit);
        self.server_check()
    }

    fn rollback(&mut self) -> Result<(), OracleError> {
        // Decided before the call is recorded: a test that sees the call and then changes
        // the script must not change this call's outcome.
        let fail = self.script.lock().fail_rollback;
        self.record(Op::Rollback);
        match fail {
            Some(f) => Err(f.error()),
            None => Ok(()),
        }
    }

    fn ping(&mut self) -> Result<(), OracleError> {
        self.record(Op::Ping);
        self.server_check()
    }

    fn raw(&self) -> &Recorder {
        self.record(Op::Raw);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, Connection, DiscardReason};
    use crate::provider::{ContextProvider, ContextRequest, ProviderError};
    use crate::scope::EndUserScope;
    use crate::{EndUserIdentity, Pool, PoolError, SecurityContext};
    use serde_json::json;

    type TestPool = Pool<OracleBackend<Recorder>>;

    fn named(name: &str) -> SecurityContext {
        SecurityContext::builder(EndUserIdentity::named(name, None), "db-token-SECRET")
            .data_roles(["hr_employee"])
            .build()
            .unwrap()
    }

    fn pool(script: &Script, size: usize) -> TestPool {
        Pool::builder(script.backend())
            .max_size(size)
            .build()
            .unwrap()
    }

    fn alice() -> String {
        "user \"alice\"".to_string()
    }

    #[tokio::test]
    async fn every_call_sets_the_context_runs_and_clears_on_a_blocking_thread() {
        let script = Script::default();
        let pool = pool(&script, 1);
        let test_thread = std::thread::current().id();
        let mut conn = pool.acquire_as(&named("alice")).await.unwrap();
        // Attaching did nothing on the driver side.
        assert!(script.ops(1).is_empty());
        assert_eq!(
            conn.execute("INSERT 1", (1, "x".to_string()))
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            conn.query("SELECT 1 FROM dual", ()).await.unwrap(),
            [alice()]
        );
        conn.commit().await.unwrap();
        conn.ping().await.unwrap();
        conn.with_connection(|_raw| ()).await.unwrap();
        conn.set_end_user_security_context(&named("bob")).unwrap();
        conn.query("SELECT 2 FROM dual", ()).await.unwrap();
        conn.clear_end_user_security_context();
        assert_eq!(
            conn.query("SELECT 3 FROM dual", ()).await.unwrap(),
            ["(plain)"]
        );
        drop(conn);
        // with_connection counts as possibly open work: release rolls it back.
        script
            .until(|log| log.iter().any(|e| e.op == Op::Rollback))
            .await;
        let bob = "user \"bob\"".to_string();
        assert_eq!(
            script.ops(1),
            [
                Op::Set(alice()),
                Op::Execute("INSERT 1".into()),
                Op::Clear,
                Op::Set(alice()),
                Op::Query("SELECT 1 FROM dual".into()),
                Op::Clear,
                Op::Set(alice()),
                Op::Commit,
                Op::Clear,
                Op::Set(alice()),
                Op::Ping,
                Op::Clear,
                Op::Set(alice()),
                Op::Raw,
                Op::Clear,
                Op::Set(bob.clone()),
                Op::Query("SELECT 2 FROM dual".into()),
                Op::Clear,
                Op::Query("SELECT 3 FROM dual".into()),
                Op::Clear,
                Op::Clear,
                Op::Rollback,
            ]
        );
        // Each statement ran under exactly the context attached at the time.
        for e in script.log().iter().filter(|e| e.session == 1) {
            match &e.op {
                Op::Execute(_) | Op::Commit | Op::Ping | Op::Raw => {
                    assert_eq!(e.under, Some(alice()))
                }
                Op::Query(q) if q.contains('1') => assert_eq!(e.under, Some(alice())),
                Op::Query(q) if q.contains('2') => assert_eq!(e.under, Some(bob.clone())),
                Op::Query(_) => assert_eq!(e.under, None),
                _ => {}
            }
            // Never on the runtime's thread.
            assert_ne!(e.thread, test_thread, "{e:?}");
        }
    }

    #[tokio::test]
    async fn release_clears_then_rolls_back_without_context_before_reuse() {
        let script = Script::default();
        let pool = pool(&script, 1);
        let mut conn = pool.acquire_as(&named("alice")).await.unwrap();
        conn.execute("UPDATE t SET x = 1", ()).await.unwrap();
        assert!(conn.may_have_open_transaction());
        let test_thread = std::thread::current().id();
        drop(conn);
        // Release started the rollback on a blocking thread at once (row locks go now,
        // not at the next checkout)...
        script
            .until(|log| log.iter().any(|e| e.op == Op::Rollback))
            .await;
        let mut next = pool.get().await.unwrap();
        assert!(next.end_user_security_context().is_none());
        assert!(!next.may_have_open_transaction());
        assert_eq!(script.ops(1)[3..], [Op::Clear, Op::Rollback]);
        let rollback = script
            .log()
            .into_iter()
            .find(|e| e.op == Op::Rollback)
            .unwrap();
        // ...with the context cleared first, and off the runtime's thread.
        assert_eq!(rollback.under, None, "the rollback ran under a context");
        assert_ne!(rollback.thread, test_thread);
        // The same connection came back, with no context.
        assert_eq!(
            next.query("SELECT 1 FROM dual", ()).await.unwrap(),
            ["(plain)"]
        );
        assert_eq!(pool.status().size, 1);
    }

    #[tokio::test]
    async fn the_next_checkout_waits_for_the_release_rollback() {
        let script = Script::default();
        let pool = pool(&script, 1);
        let mut conn = pool.get().await.unwrap();
        conn.execute("INSERT 1", ()).await.unwrap();
        drop(conn);
        // Whether or not the rollback has run yet, the next holder gets the connection
        // only after it.
        let mut next = pool.get().await.unwrap();
        next.query("SELECT 1 FROM dual", ()).await.unwrap();
        let ops = script.ops(1);
        let rollback = ops.iter().position(|o| *o == Op::Rollback).unwrap();
        let query = ops.iter().position(|o| matches!(o, Op::Query(_))).unwrap();
        assert!(rollback < query, "{ops:?}");
    }

    #[tokio::test]
    async fn read_only_or_committed_connections_recycle_without_io() {
        let script = Script::default();
        let pool = pool(&script, 1);
        let mut conn = pool.acquire_as(&named("alice")).await.unwrap();
        conn.query("SELECT name FROM hr.employees", ())
            .await
            .unwrap();
        conn.execute("INSERT 1", ()).await.unwrap();
        conn.commit().await.unwrap();
        drop(conn);
        let before = script.log().len();
        let _next = pool.get().await.unwrap();
        assert_eq!(script.log().len(), before, "recycle did I/O");
    }

    #[tokio::test]
    async fn a_failed_rollback_discards_the_connection() {
        for fail in [Fail::Call, Fail::Fatal] {
            let script = Script::default();
            let pool = pool(&script, 1);
            let mut conn = pool.get().await.unwrap();
            conn.execute("INSERT 1", ()).await.unwrap();
            script.fail_rollback(Some(fail));
            drop(conn);
            script
                .until(|log| log.iter().any(|e| e.op == Op::Rollback))
                .await;
            script.fail_rollback(None);
            let mut next = pool.get().await.unwrap();
            next.query("SELECT 1 FROM dual", ()).await.unwrap();
            // A new session replaced the one whose rollback failed, which was closed.
            let last = script.log().last().cloned().unwrap();
            assert_eq!(last.session, 2, "{fail:?}");
            script
                .until(|log| log.iter().any(|e| e.session == 1 && e.op == Op::Closed))
                .await;
        }
    }

    #[tokio::test]
    async fn recycle_reports_the_discard_reason() {
        for (fail, reason) in [
            (None, None),
            (Some(Fail::Call), Some(DiscardReason::ResetFailed)),
            (Some(Fail::Fatal), Some(DiscardReason::Lost)),
        ] {
            let script = Script::default();
            let backend = script.backend();
            let mut conn: OracleConnection<Recorder> = backend.connect().await.unwrap();
            conn.execute("INSERT 1", ()).await.unwrap();
            script.fail_rollback(fail);
            // Recycle without a release first (as after a release outside a runtime):
            // it runs the reset itself.
            let verdict = backend.recycle(&mut conn).await;
            assert_eq!(verdict.err(), reason, "{fail:?}");
            assert_eq!(script.ops(1)[1..], [Op::Clear, Op::Clear, Op::Rollback]);
        }
    }

    #[tokio::test]
    async fn cancelled_while_running_means_discarded_never_reused() {
        let script = Script::default();
        let pool = pool(&script, 1);
        let mut conn = pool.acquire_as(&named("alice")).await.unwrap();
        // The call blocks on its thread; the runtime (current-thread) still runs timers.
        let cancelled =
            tokio::time::timeout(Duration::from_millis(30), conn.execute("BLOCK", ())).await;
        assert!(cancelled.is_err());
        assert!(conn.check_release() == Err(DiscardReason::InFlight));
        drop(conn);
        assert_eq!(
            pool.status().size,
            0,
            "the busy connection was not discarded"
        );
        // A new one is opened meanwhile; the old one is never handed out.
        let mut fresh = pool.get().await.unwrap();
        fresh.query("SELECT 1 FROM dual", ()).await.unwrap();
        script.open_gate();
        script
            .until(|log| log.iter().any(|e| e.session == 1 && e.op == Op::Closed))
            .await;
        let ops = script.ops(1);
        // The cancelled call finished under its own context, then cleared it.
        assert_eq!(
            ops,
            [
                Op::Set(alice()),
                Op::Execute("BLOCK".into()),
                Op::Clear,
                Op::Closed
            ]
        );
        assert!(
            script
                .log()
                .iter()
                .all(|e| e.session == 1 || e.session == 2)
        );
        drop(fresh);
    }

    #[tokio::test]
    async fn a_cancelled_call_that_finished_is_waited_for_and_rolled_back() {
        let script = Script::default();
        let pool = pool(&script, 1);
        let mut conn = pool.acquire_as(&named("alice")).await.unwrap();
        let cancelled =
            tokio::time::timeout(Duration::from_millis(30), conn.execute("BLOCK", ())).await;
        assert!(cancelled.is_err());
        script.open_gate();
        // The next call on the same handle waits for the abandoned one first.
        conn.query("SELECT 1 FROM dual", ()).await.unwrap();
        drop(conn);
        let _next = pool.get().await.unwrap();
        assert_eq!(
            script.ops(1),
            [
                Op::Set(alice()),
                Op::Execute("BLOCK".into()),
                Op::Clear,
                Op::Set(alice()),
                Op::Query("SELECT 1 FROM dual".into()),
                Op::Clear,
                Op::Clear,
                Op::Rollback,
            ]
        );
    }

    #[tokio::test]
    async fn released_after_a_cancelled_call_finished_is_reused_after_rollback() {
        let script = Script::default();
        let pool = pool(&script, 1);
        let mut conn = pool.acquire_as(&named("alice")).await.unwrap();
        let cancelled =
            tokio::time::timeout(Duration::from_millis(30), conn.execute("BLOCK", ())).await;
        assert!(cancelled.is_err());
        script.open_gate();
        // Wait for the abandoned call's task itself to finish (not only its last
        // operation), so that release finds the session back.
        tokio::time::timeout(Duration::from_secs(10), async {
            while !conn.call_finished() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the abandoned call never finished");
        drop(conn);
        let _next = pool.get().await.unwrap();
        assert_eq!(pool.status().size, 1);
        assert_eq!(script.ops(1)[3..], [Op::Clear, Op::Rollback]);
    }

    #[tokio::test]
    async fn a_refused_context_fails_the_call_and_the_connection_stays_usable() {
        let script = Script::default();
        script.refuse("user \"mallory\"");
        let pool = pool(&script, 1);
        let mut conn = pool.acquire_as(&named("mallory")).await.unwrap();
        let err = conn.query("SELECT 1 FROM dual", ()).await.unwrap_err();
        assert!(matches!(err, OracleError::EndUserTokenRefused), "{err:?}");
        assert!(err.is_context_refused());
        // Fail closed: still refused while the context is attached.
        assert!(conn.ping().await.unwrap_err().is_context_refused());
        conn.clear_end_user_security_context();
        assert_eq!(
            conn.query("SELECT 1 FROM dual", ()).await.unwrap(),
            ["(plain)"]
        );
        assert_eq!(conn.check_release(), Ok(()));
        drop(conn);
        let mut again = pool.acquire_as(&named("alice")).await.unwrap();
        assert_eq!(
            again.query("SELECT 1 FROM dual", ()).await.unwrap(),
            [alice()]
        );
        assert_eq!(pool.status().size, 1);
        assert!(script.log().iter().all(|e| e.session == 1));
    }

    #[tokio::test]
    async fn a_context_the_driver_will_not_set_fails_closed() {
        let script = Script::default();
        let pool = pool(&script, 1);
        let mut conn = pool.acquire_as(&named("alice")).await.unwrap();
        for (fail, expect) in [(Fail::NoTcps, "TCPS"), (Fail::NoDeepSec, "Deep Data")] {
            script.fail_set(Some(fail));
            let err = conn.execute("DELETE FROM t", ()).await.unwrap_err();
            assert!(err.to_string().contains(expect), "{err}");
        }
        script.fail_set(None);
        // The statement never ran, in particular not as the plain login.
        assert!(!script.ops(1).iter().any(|op| matches!(op, Op::Execute(_))));
        assert_eq!(conn.check_release(), Ok(()));
    }

    #[tokio::test]
    async fn the_connect_probe_refuses_servers_without_tls_or_deep_sec() {
        for (fail, ok) in [(Fail::NoTcps, false), (Fail::NoDeepSec, false)] {
            let script = Script::default();
            script.fail_set(Some(fail));
            let pool = pool(&script, 1);
            let err = pool.get().await.unwrap_err();
            match (fail, err) {
                (Fail::NoTcps, PoolError::Backend(OracleError::TcpsRequired))
                | (Fail::NoDeepSec, PoolError::Backend(OracleError::DeepSecUnsupported)) => {}
                (_, other) => panic!("{fail:?}: {other:?}"),
            }
            assert!(!ok);
            // The refused session is closed.
            script
                .until(|log| log.iter().any(|e| e.op == Op::Closed))
                .await;
        }
    }

    #[tokio::test]
    async fn a_lost_connection_is_discarded() {
        let script = Script::default();
        let pool = pool(&script, 1);
        let mut conn = pool.acquire_as(&named("alice")).await.unwrap();
        script.fail_execute(Some(Fail::Fatal));
        assert!(conn.execute("INSERT 1", ()).await.is_err());
        script.fail_execute(None);
        // Further calls on it fail without reaching the driver.
        assert!(matches!(
            conn.query("SELECT 1 FROM dual", ()).await,
            Err(OracleError::Lost)
        ));
        assert_eq!(conn.check_release(), Err(DiscardReason::Lost));
        drop(conn);
        assert_eq!(pool.status().size, 0);
        let mut next = pool.get().await.unwrap();
        next.query("SELECT 1 FROM dual", ()).await.unwrap();
        assert_eq!(script.log().last().unwrap().session, 2);
    }

    #[tokio::test]
    async fn a_call_error_keeps_the_connection() {
        let script = Script::default();
        let pool = pool(&script, 1);
        let mut conn = pool.get().await.unwrap();
        script.fail_execute(Some(Fail::Call));
        assert!(conn.execute("INSERT 1", ()).await.is_err());
        script.fail_execute(None);
        assert_eq!(conn.check_release(), Ok(()));
    }

    #[tokio::test]
    async fn a_panicking_closure_loses_the_connection() {
        let script = Script::default();
        let pool = pool(&script, 1);
        let mut conn = pool.get().await.unwrap();
        let err = conn
            .with_connection(|_raw| -> () { panic!("boom (expected by the test)") })
            .await
            .unwrap_err();
        assert!(matches!(err, OracleError::BlockingPanicked), "{err:?}");
        assert_eq!(conn.check_release(), Err(DiscardReason::Lost));
        drop(conn);
        assert_eq!(pool.status().size, 0);
    }

    #[tokio::test]
    async fn a_context_too_large_for_the_driver_is_refused_at_acquire_without_io() {
        let script = Script::default();
        let pool = pool(&script, 1);
        let big = super::super::translate::tests_support::too_large_for_driver();
        let err = pool.acquire_as(&big).await.unwrap_err();
        match err {
            PoolError::ContextRejected(e) => {
                let e = e.downcast::<OracleError>().unwrap();
                assert!(matches!(
                    *e,
                    OracleError::ContextTooLarge { max: 65_535, .. }
                ));
            }
            other => panic!("{other:?}"),
        }
        // Nothing reached the driver, and the connection went back to the pool.
        assert!(script.ops(1).is_empty());
        assert_eq!(pool.status().available, 1);
    }

    struct Directory;

    #[async_trait::async_trait]
    impl ContextProvider for Directory {
        async fn security_context(
            &self,
            request: &ContextRequest,
        ) -> Result<SecurityContext, ProviderError> {
            let mut b = SecurityContext::builder(request.identity.clone(), "db-token-SECRET")
                .data_roles(["hr_employee"]);
            if let Some(a) = &request.attributes {
                b = b.attributes(a.clone());
            }
            b.build().map_err(ProviderError::Context)
        }
    }

    #[tokio::test]
    async fn provider_and_scope_paths_work_unchanged() {
        let script = Script::default();
        let pool = Pool::builder(script.backend())
            .max_size(1)
            .provider(Directory)
            .build()
            .unwrap();
        // The provider completes an identity.
        let mut conn = pool
            .acquire_as(EndUserIdentity::named("alice", None))
            .await
            .unwrap();
        assert_eq!(
            conn.query("SELECT 1 FROM dual", ()).await.unwrap(),
            [alice()]
        );
        drop(conn);
        // Inside a request scope (what the tower middleware sets up), plain get acquires
        // as the scope's end user.
        let seen = EndUserScope::new(EndUserIdentity::named("carol", None))
            .attributes(json!({"hr.hcm_context": {"emp_id": 7}}))
            .run(async {
                let mut conn = pool.get().await.unwrap();
                conn.query("SELECT 1 FROM dual", ()).await.unwrap()
            })
            .await;
        assert_eq!(seen, ["user \"carol\""]);
        // Outside a scope: plain.
        let mut plain = pool.get().await.unwrap();
        assert_eq!(
            plain.query("SELECT 1 FROM dual", ()).await.unwrap(),
            ["(plain)"]
        );
    }

    #[tokio::test]
    async fn many_tasks_of_two_users_never_see_each_other() {
        let script = Script::default();
        let pool = pool(&script, 2);
        let mut tasks = Vec::new();
        for i in 0..40 {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                let (ctx, who) = match i % 3 {
                    0 => (Some(named("alice")), "user \"alice\""),
                    1 => (Some(named("bob")), "user \"bob\""),
                    _ => (None, "(plain)"),
                };
                let mut conn = match &ctx {
                    Some(c) => pool.acquire_as(c).await.unwrap(),
                    None => pool.get().await.unwrap(),
                };
                if i % 5 == 0 {
                    conn.execute("INSERT 1", ()).await.unwrap();
                }
                let seen = conn.query("SELECT 1 FROM dual", ()).await.unwrap();
                assert_eq!(seen, [who]);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // Every rollback ran without a context.
        assert!(
            script
                .log()
                .iter()
                .filter(|e| e.op == Op::Rollback)
                .all(|e| e.under.is_none())
        );
    }

    #[test]
    fn debug_of_a_connection_shows_no_secret() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let script = Script::default();
            let mut conn = script.backend().connect().await.unwrap();
            let ctx = SecurityContext::builder(
                EndUserIdentity::named("alice", Some("key-SECRET".into())),
                "db-token-SECRET",
            )
            .build()
            .unwrap();
            conn.attach_context(ctx).unwrap();
            let text = format!("{conn:?}");
            assert!(!text.contains("SECRET"), "{text}");
            assert!(text.contains("alice"));
        });
    }
}
