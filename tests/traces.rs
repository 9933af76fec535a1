//! Traces of checkouts, applies and discards never show a secret.
//!
//! Its own test binary: tracing caches callsite interest process-wide, so a test thread
//! without a subscriber running at the same time could hide spans from this one.

use std::future::Future;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use ctxpool::provider::StaticTokenProvider;
use ctxpool::{
    ContextProvider, ContextRequest, EndUserIdentity, Pool, ProviderError, SecurityContext,
};
use ctxpool_testkit::{MemBackend, MemServer, Statement};

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

fn run<F: Future<Output = ()>>(f: impl FnOnce(()) -> F) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f(()));
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn traces_show_no_secret() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::NEW)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        run(|_| async {
            let server = MemServer::new();
            let pool = Pool::builder(MemBackend::new(server.clone()))
                .max_size(1)
                .provider(StaticTokenProvider::new("SECRET-db-token"))
                .build()
                .unwrap();
            let identity = EndUserIdentity::token("SECRET-user-token");
            let mut conn = pool.acquire_as(identity).await.unwrap();
            conn.execute(Statement::Begin).await.unwrap();
            drop(conn);
            let failing = Pool::builder(MemBackend::new(server))
                .provider(FailingProvider)
                .build()
                .unwrap();
            let named = EndUserIdentity::named("n", Some("SECRET-key".into()));
            assert!(failing.acquire_as(named).await.is_err());
            tracing::info!(pool = ?pool, "done");
        });
    });
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("ctxpool.acquire_as"),
        "spans were recorded: {text}"
    );
    assert!(text.contains("connection discarded"), "{text}");
    assert!(!text.contains("SECRET"), "a secret was traced: {text}");
}
