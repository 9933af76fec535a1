//! Pool behaviour on the in-process backend: plain and contextual checkouts, precedence,
//! fail-closed paths, each timeout, discards by reason, and pool management.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ctxpool::pool::TimeoutType;
use ctxpool::{
    ContextProvider, ContextRequest, EndUserIdentity, Pool, PoolError, ProviderError,
    SecurityContext, Timeouts,
};
use ctxpool_testkit::{MemBackend, MemError, MemServer, Statement};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

// ---- helpers -------------------------------------------------------------------------

/// Counts counter increments by `name{labels}`.
#[derive(Default)]
struct Counters(Mutex<HashMap<String, Arc<AtomicU64>>>);

impl Counters {
    fn get(&self, name: &str) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }
}

impl Recorder for Counters {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = if labels.is_empty() {
            key.name().to_owned()
        } else {
            format!("{}{{{}}}", key.name(), labels.join(","))
        };
        let counter = self.0.lock().unwrap().entry(name).or_default().clone();
        Counter::from_arc(counter)
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// Runs `f` on a current-thread runtime with paused time (timeouts fire as soon as
/// everything is idle: no real waiting) and a recorder local to this thread.
fn run<F: Future<Output = ()>>(f: impl FnOnce(Arc<Counters>) -> F) -> Arc<Counters> {
    let counters = Arc::new(Counters::default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let recorder = counters.clone();
    metrics::with_local_recorder(&*recorder, || rt.block_on(f(counters.clone())));
    counters
}

fn pool(server: &MemServer, max_size: usize) -> Pool<MemBackend> {
    Pool::builder(MemBackend::new(server.clone()))
        .max_size(max_size)
        .build()
        .unwrap()
}

fn ctx(name: &str, roles: &[&str]) -> SecurityContext {
    SecurityContext::builder(EndUserIdentity::named(name, None), "db-token")
        .data_roles(roles.iter().copied())
        .build()
        .unwrap()
}

/// A provider that records what it was asked and answers with fixed roles.
struct RolesProvider {
    roles: Vec<String>,
    calls: AtomicU64,
}

#[async_trait]
impl ContextProvider for RolesProvider {
    async fn security_context(
        &self,
        req: &ContextRequest,
    ) -> Result<SecurityContext, ProviderError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let roles = req.data_roles.clone().unwrap_or_else(|| self.roles.clone());
        Ok(
            SecurityContext::builder(req.identity.clone(), "provider-token")
                .data_roles(roles)
                .build()?,
        )
    }
}

struct FailingProvider;

#[async_trait]
impl ContextProvider for FailingProvider {
    async fn security_context(&self, _: &ContextRequest) -> Result<SecurityContext, ProviderError> {
        Err(ProviderError::Refused {
            status: 400,
            code: Some("invalid_grant".into()),
        })
    }
}

struct HangingProvider;

#[async_trait]
impl ContextProvider for HangingProvider {
    async fn security_context(&self, _: &ContextRequest) -> Result<SecurityContext, ProviderError> {
        std::future::pending().await
    }
}

// ---- checkouts -----------------------------------------------------------------------

#[test]
fn get_is_plain_and_acquire_as_carries_the_context() {
    let counters = run(|_| async {
        let server = MemServer::new();
        let pool = pool(&server, 2);
        let mut plain = pool.get().await.unwrap();
        assert!(plain.end_user_security_context().is_none());
        let obs = plain.query().await.unwrap();
        assert_eq!((obs.end_user, obs.role), (None, None));
        drop(plain);

        let alice = ctx("alice", &["hr_role"]);
        let mut conn = pool.acquire_as(&alice).await.unwrap();
        assert_eq!(conn.end_user_security_context(), Some(&alice));
        let obs = conn.query().await.unwrap();
        assert_eq!(obs.end_user.as_deref(), Some("alice"));
        assert_eq!(obs.role.as_deref(), Some("hr_role"));

        // Set and clear cost no round trip; the change rides on the next statement.
        let flights = server.stats().flights;
        let bob = ctx("bob", &[]);
        conn.set_end_user_security_context(&bob).unwrap();
        conn.clear_end_user_security_context();
        conn.set_end_user_security_context(&bob).unwrap();
        assert_eq!(server.stats().flights, flights);
        assert_eq!(conn.query().await.unwrap().end_user.as_deref(), Some("bob"));
        assert_eq!(server.stats().flights, flights + 1);
        conn.clear_end_user_security_context();
        assert_eq!(conn.query().await.unwrap().end_user, None);
    });
    assert_eq!(counters.get("ctxpool_acquired_total"), 1);
    assert_eq!(counters.get("ctxpool_acquired_as_total"), 1);
    assert_eq!(counters.get("ctxpool_contexts_applied_total"), 3);
}

#[test]
fn release_clears_and_the_next_statement_resets_in_the_same_flight() {
    run(|_| async {
        let server = MemServer::new();
        let pool = pool(&server, 1);
        let mut conn = pool.acquire_as(ctx("alice", &["hr_role"])).await.unwrap();
        conn.query().await.unwrap();
        drop(conn);
        let before = server.stats();
        let mut conn = pool.get().await.unwrap();
        let obs = conn.query().await.unwrap();
        assert_eq!((obs.end_user, obs.role), (None, None));
        let after = server.stats();
        assert_eq!(
            after.flights - before.flights,
            1,
            "the reset costs no flight"
        );
        assert_eq!(after.statements - before.statements, 2, "reset + query");
        assert_eq!(after.connects, 1, "the connection was reused");
    });
}

#[test]
fn the_same_context_coming_back_costs_nothing() {
    run(|_| async {
        let server = MemServer::new();
        let pool = pool(&server, 1);
        let alice = ctx("alice", &[]);
        pool.acquire_as(&alice)
            .await
            .unwrap()
            .query()
            .await
            .unwrap();
        let mut conn = pool.acquire_as(&alice).await.unwrap();
        let before = server.stats().statements;
        conn.query().await.unwrap();
        // Released then re-acquired: the reset was never sent, so nothing is re-applied.
        assert_eq!(server.stats().statements - before, 1);
    });
}

#[test]
fn identities_need_a_provider_and_fail_closed() {
    run(|_| async {
        let server = MemServer::new();
        let pool = pool(&server, 2);
        let err = pool
            .acquire_as(EndUserIdentity::named("alice", None))
            .await
            .unwrap_err();
        assert!(matches!(err, PoolError::NoProvider), "{err}");
        assert_eq!(pool.status().size, 0, "no connection was taken");

        let failing = Pool::builder(MemBackend::new(server.clone()))
            .provider(FailingProvider)
            .build()
            .unwrap();
        let err = failing
            .acquire_as(EndUserIdentity::token("SECRET-user-token"))
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            PoolError::Provider(ProviderError::Refused { status: 400, .. })
        ));
        assert!(!format!("{err} {err:?}").contains("SECRET"));
        assert_eq!(failing.status().size, 0);
    });
}

#[test]
fn the_provider_completes_identities_and_explicit_contexts_win() {
    run(|_| async {
        let server = MemServer::new();
        let provider = Arc::new(RolesProvider {
            roles: vec!["configured".into()],
            calls: AtomicU64::new(0),
        });
        let pool = Pool::builder(MemBackend::new(server.clone()))
            .provider_arc(provider.clone())
            .build()
            .unwrap();
        let mut conn = pool
            .acquire_as(EndUserIdentity::named("carol", Some("k".into())))
            .await
            .unwrap();
        let obs = conn.query().await.unwrap();
        assert_eq!(obs.end_user.as_deref(), Some("carol"));
        assert_eq!(obs.data_roles, ["configured"]);
        drop(conn);

        // Per-request roles override the configured ones.
        let request =
            ContextRequest::new(EndUserIdentity::named("carol", None)).data_roles(["per_request"]);
        let mut conn = pool.acquire_as(request).await.unwrap();
        assert_eq!(conn.query().await.unwrap().data_roles, ["per_request"]);
        drop(conn);

        // An explicit context is used as is: the provider is not asked.
        let calls = provider.calls.load(Ordering::SeqCst);
        let mut conn = pool.acquire_as(ctx("dave", &["explicit"])).await.unwrap();
        assert_eq!(conn.query().await.unwrap().data_roles, ["explicit"]);
        assert_eq!(provider.calls.load(Ordering::SeqCst), calls);
    });
}

#[test]
fn inside_a_scope_get_acquires_as_the_scope_identity_on_a_provider_pool_only() {
    use ctxpool::scope::{self, EndUserScope};
    run(|counters| async move {
        let server = MemServer::new();
        let provider = Arc::new(RolesProvider {
            roles: vec!["configured".into()],
            calls: AtomicU64::new(0),
        });
        let plain_pool = pool(&server, 1);
        let pool = Pool::builder(MemBackend::new(server.clone()))
            .provider_arc(provider.clone())
            .build()
            .unwrap();

        // Outside a scope: plain, no error.
        assert_eq!(
            pool.get().await.unwrap().query().await.unwrap().end_user,
            None
        );
        let carol = EndUserIdentity::named("carol", None);
        EndUserScope::new(carol.clone())
            .run(async {
                let mut conn = pool.get().await.unwrap();
                let obs = conn.query().await.unwrap();
                assert_eq!(obs.end_user.as_deref(), Some("carol"));
                assert_eq!(obs.data_roles, ["configured"]);
                drop(conn);
                // A pool without a provider ignores the scope: a standard connection.
                let mut conn = plain_pool.get().await.unwrap();
                assert_eq!(conn.query().await.unwrap().end_user, None);
                drop(conn);
                // Explicit wins over the scope.
                let mut conn = pool.acquire_as(ctx("dave", &["explicit"])).await.unwrap();
                assert_eq!(
                    conn.query().await.unwrap().end_user.as_deref(),
                    Some("dave")
                );
                drop(conn);
                // Per-request roles set in the scope replace the configured ones; an
                // elevation adds to them for one future.
                scope::set_end_user_data_roles(["per_request"]).unwrap();
                let elevated = scope::with_data_roles(["extra"], async {
                    pool.get().await.unwrap().query().await.unwrap().data_roles
                })
                .unwrap()
                .await;
                assert_eq!(elevated, ["per_request", "extra"]);
                let mut conn = pool.get().await.unwrap();
                assert_eq!(conn.query().await.unwrap().data_roles, ["per_request"]);
            })
            .await;
        // An anonymous scope is plain, like no scope.
        EndUserScope::anonymous()
            .run(async {
                assert_eq!(
                    pool.get().await.unwrap().query().await.unwrap().end_user,
                    None
                );
            })
            .await;
        assert!(counters.get("ctxpool_acquired_as_total") >= 3);
    });
}

#[test]
fn inside_a_scope_get_fails_closed_when_the_provider_fails() {
    use ctxpool::scope::EndUserScope;
    run(|_| async {
        let server = MemServer::new();
        let pool = Pool::builder(MemBackend::new(server.clone()))
            .provider(FailingProvider)
            .build()
            .unwrap();
        let err = EndUserScope::new(EndUserIdentity::named("carol", None))
            .run(pool.get())
            .await
            .unwrap_err();
        assert!(matches!(err, PoolError::Provider(_)), "{err:?}");
        assert_eq!(pool.status().size, 0, "no connection was taken");
    });
}

#[test]
fn a_refused_context_never_runs_the_statement() {
    run(|_| async {
        let server = MemServer::new();
        server.refuse("mallory", true);
        let pool = pool(&server, 1);
        let mut conn = pool.acquire_as(ctx("mallory", &["admin"])).await.unwrap();
        assert_eq!(conn.query().await.unwrap_err(), MemError::ContextRefused);
        assert_eq!(conn.query().await.unwrap_err(), MemError::ContextRefused);
        conn.clear_end_user_security_context();
        assert_eq!(conn.query().await.unwrap().end_user, None);
    });
}

// ---- timeouts ------------------------------------------------------------------------

#[test]
fn each_timeout_has_its_own_error() {
    let counters = run(|_| async {
        let server = MemServer::new();
        let timeouts = Timeouts {
            wait: Duration::from_secs(1),
            create: Duration::from_secs(2),
            recycle: Duration::from_secs(3),
            apply: Duration::from_secs(4),
        };
        let pool = Pool::builder(MemBackend::new(server.clone()))
            .max_size(1)
            .timeouts(timeouts)
            .provider(HangingProvider)
            .build()
            .unwrap();

        let held = pool.get().await.unwrap();
        let err = pool.get().await.unwrap_err();
        assert!(
            matches!(err, PoolError::Timeout(TimeoutType::Wait)),
            "{err}"
        );
        drop(held);

        let err = pool
            .acquire_as(EndUserIdentity::named("a", None))
            .await
            .unwrap_err();
        assert!(
            matches!(err, PoolError::Timeout(TimeoutType::Apply)),
            "{err}"
        );

        // A recycle that hangs discards that connection; the acquirer gets a new one.
        server.hang_recycles(true);
        let conn = pool.get().await.unwrap();
        assert_eq!(server.stats().connects, 2);
        server.hang_recycles(false);
        drop(conn);

        pool.retain(|_, _| false);
        server.hang_connects(true);
        let err = pool.get().await.unwrap_err();
        assert!(
            matches!(err, PoolError::Timeout(TimeoutType::Create)),
            "{err}"
        );
        server.hang_connects(false);
        assert!(pool.get().await.is_ok());
    });
    assert_eq!(counters.get("ctxpool_timeouts_total{kind=wait}"), 1);
    assert_eq!(counters.get("ctxpool_timeouts_total{kind=apply}"), 1);
    assert_eq!(counters.get("ctxpool_timeouts_total{kind=recycle}"), 1);
    assert_eq!(counters.get("ctxpool_timeouts_total{kind=create}"), 1);
    assert_eq!(
        counters.get("ctxpool_discarded_total{reason=recycle_timeout}"),
        1
    );
}

#[test]
fn connect_failures_are_backend_errors_and_the_pool_recovers() {
    run(|_| async {
        let server = MemServer::new();
        let pool = pool(&server, 1);
        server.fail_connects(1);
        let err = pool.get().await.unwrap_err();
        assert!(matches!(err, PoolError::Backend(MemError::ConnectRefused)));
        assert_eq!(pool.status().size, 0, "a failed create takes no slot");
        assert!(pool.get().await.is_ok());
    });
}

// ---- release paths -------------------------------------------------------------------

#[test]
fn unsafe_releases_discard_and_count_the_reason() {
    let counters = run(|_| async {
        let server = MemServer::new();
        let pool = pool(&server, 1);

        // An open transaction.
        let mut conn = pool.acquire_as(ctx("a", &[])).await.unwrap();
        conn.execute(Statement::Begin).await.unwrap();
        drop(conn);
        assert_eq!(pool.status().size, 0);

        // An aborted transaction.
        let mut conn = pool.get().await.unwrap();
        conn.execute(Statement::Begin).await.unwrap();
        conn.execute(Statement::Fail).await.unwrap_err();
        drop(conn);

        // A lost connection.
        let conn = pool.get().await.unwrap();
        server.kill(conn.session_id());
        drop(conn);

        // A statement cancelled mid-flight.
        let mut conn = pool.get().await.unwrap();
        {
            let fut = conn.execute(Statement::Query);
            let mut fut = std::pin::pin!(fut);
            assert!(futures_poll_once(fut.as_mut()).await.is_none());
        }
        drop(conn);

        // A panic while holding the handle.
        let p = pool.clone();
        let joined = tokio::spawn(async move {
            let _conn = p.acquire_as(ctx("b", &[])).await.unwrap();
            panic!("deliberate");
        })
        .await;
        assert!(joined.unwrap_err().is_panic());

        // A clean release is kept.
        pool.get().await.unwrap().query().await.unwrap();
        assert_eq!(pool.status().size, 1);
        assert_eq!(server.stats().connects, 6);
        assert_eq!(server.stats().live_sessions, 1);
    });
    for reason in [
        "open_transaction",
        "failed_transaction",
        "lost",
        "in_flight",
        "panicked",
    ] {
        assert_eq!(
            counters.get(&format!("ctxpool_discarded_total{{reason={reason}}}")),
            1,
            "{reason}"
        );
    }
}

/// Polls once; `Some` if ready.
async fn futures_poll_once<F: Future>(fut: std::pin::Pin<&mut F>) -> Option<F::Output> {
    let mut fut = Some(fut);
    std::future::poll_fn(|cx| {
        let f = fut.as_mut().unwrap();
        std::task::Poll::Ready(match f.as_mut().poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

#[test]
fn dead_idle_connections_are_replaced_at_checkout() {
    let counters = run(|_| async {
        let server = MemServer::new();
        let pool = pool(&server, 2);
        let a = pool.get().await.unwrap();
        let b = pool.get().await.unwrap();
        drop((a, b));
        server.kill_all();
        let mut conn = pool.get().await.unwrap();
        assert!(conn.query().await.is_ok());
        assert!(pool.status().size <= 2);
    });
    assert!(counters.get("ctxpool_discarded_total{reason=lost}") >= 1);
}

// ---- management ----------------------------------------------------------------------

#[test]
fn status_resize_close_retain_take() {
    run(|_| async {
        let server = MemServer::new();
        let pool = pool(&server, 3);
        let conns: Vec<_> = futures_join3(&pool).await;
        let status = pool.status();
        assert_eq!((status.size, status.available, status.max_size), (3, 0, 3));
        drop(conns);
        assert_eq!(pool.status().available, 3);

        pool.resize(1);
        assert_eq!(pool.status().max_size, 1);
        assert_eq!(pool.status().size, 1);

        let removed = pool.retain(|_, _| false);
        assert_eq!(removed.removed.len(), 1);
        assert_eq!(pool.status().size, 0);

        let mut conn = pool.acquire_as(ctx("alice", &[])).await.unwrap();
        conn.query().await.unwrap();
        let mut raw = ctxpool::Object::take(conn);
        assert_eq!(pool.status().size, 0, "taken out of the pool");
        assert_eq!(
            raw.query().await.unwrap().end_user,
            None,
            "taken without the context"
        );

        pool.close();
        assert!(pool.is_closed());
        assert!(matches!(pool.get().await.unwrap_err(), PoolError::Closed));
    });
}

async fn futures_join3(pool: &Pool<MemBackend>) -> Vec<ctxpool::Object<MemBackend>> {
    let (a, b, c) = tokio::join!(pool.get(), pool.get(), pool.get());
    vec![a.unwrap(), b.unwrap(), c.unwrap()]
}

#[test]
fn builder_refuses_zero_sizes_and_timeouts() {
    let server = MemServer::new();
    let err = Pool::builder(MemBackend::new(server.clone()))
        .max_size(0)
        .build()
        .unwrap_err();
    assert_eq!(err, ctxpool::pool::BuildError::ZeroMaxSize);
    let err = Pool::builder(MemBackend::new(server))
        .timeouts(Timeouts {
            recycle: Duration::ZERO,
            ..Timeouts::default()
        })
        .build()
        .unwrap_err();
    assert_eq!(
        err,
        ctxpool::pool::BuildError::ZeroTimeout(TimeoutType::Recycle)
    );
}
