//! The context-aware pool.
//!
//! [`Pool`] wraps a deadpool managed pool around a [`Backend`]. [`Pool::get`] hands out a
//! plain least-privileged connection; [`Pool::acquire_as`] one that runs under an end user's
//! [`SecurityContext`]. Handles are [`Object`]s; releasing one always clears its context.

mod config;
mod error;
mod manager;
pub mod metrics;
mod object;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use deadpool::Runtime;
use deadpool::managed;
use tracing::Instrument;

pub use config::{PoolConfig, QueueMode, Timeouts};
pub use deadpool::Status;
pub use deadpool::managed::{Metrics, RetainResult};
pub use error::{BuildError, PoolError, TimeoutType};
pub use object::{AttachError, Object};

use crate::backend::Backend;
use crate::context::{EndUserIdentity, SecurityContext, add_data_roles};
use crate::provider::{ContextProvider, ContextRequest, ProviderError};
use manager::{Manager, ManagerError};

/// Whom [`Pool::acquire_as`] acquires for.
#[derive(Clone, Debug)]
pub enum AcquireAs {
    /// A ready context: used as it is, whatever provider the pool has.
    Context(SecurityContext),
    /// An identity (with optional per-request roles and attributes) that the pool's
    /// [`ContextProvider`] completes.
    Request(ContextRequest),
}

impl From<SecurityContext> for AcquireAs {
    fn from(ctx: SecurityContext) -> Self {
        Self::Context(ctx)
    }
}

impl From<&SecurityContext> for AcquireAs {
    fn from(ctx: &SecurityContext) -> Self {
        Self::Context(ctx.clone())
    }
}

impl From<EndUserIdentity> for AcquireAs {
    fn from(identity: EndUserIdentity) -> Self {
        Self::Request(ContextRequest::new(identity))
    }
}

impl From<ContextRequest> for AcquireAs {
    fn from(request: ContextRequest) -> Self {
        Self::Request(request)
    }
}

/// An async pool of connections that run under their acquirer's security context.
///
/// Cheap to clone: clones share one pool.
pub struct Pool<B: Backend> {
    inner: managed::Pool<Manager<B>>,
    shared: Arc<Shared>,
}

struct Shared {
    config: PoolConfig,
    provider: Option<Arc<dyn ContextProvider>>,
    counters: metrics::Counters,
}

impl<B: Backend> Clone for Pool<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<B: Backend> fmt::Debug for Pool<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("config", &self.shared.config)
            .field("provider", &self.shared.provider.is_some())
            .field("status", &self.status())
            .finish()
    }
}

/// The deadpool timeouts of the fast path: take a free slot if there is one, never wait.
/// Create and recycle timeouts are applied by [`Manager`] itself.
const NO_WAIT: managed::Timeouts = managed::Timeouts {
    wait: Some(Duration::ZERO),
    create: None,
    recycle: None,
};

impl<B: Backend> Pool<B> {
    /// Starts building a pool over `backend`.
    pub fn builder(backend: B) -> PoolBuilder<B> {
        PoolBuilder {
            backend,
            config: PoolConfig::default(),
            provider: None,
        }
    }

    /// A connection for the current task's end user, else a plain least-privileged one.
    ///
    /// On a pool built with a [`ContextProvider`], inside an
    /// [`EndUserScope`](crate::scope::EndUserScope) that names an identity, this is
    /// [`acquire_as`](Self::acquire_as) with the scope's request, and fails closed like it.
    /// Everywhere else (no provider, no scope, a scope without identity) it is a plain
    /// connection with no security context, and no error for the lack of one: the
    /// reference's rule that a missing identity *or* a missing provider configuration gives
    /// a standard connection with default privileges.
    pub async fn get(&self) -> Result<Object<B>, PoolError<B::Error>> {
        if self.shared.provider.is_some() {
            if let Some(request) = crate::scope::current() {
                return self.acquire_as(request).await;
            }
        }
        let obj = self
            .checkout()
            .instrument(tracing::debug_span!("ctxpool.acquire"))
            .await?;
        self.shared.counters.acquired.increment(1);
        Ok(obj)
    }

    /// A connection that runs under an end user's security context.
    ///
    /// `who` is either a ready [`SecurityContext`] (explicit: it takes precedence over any
    /// provider configuration) or an [`EndUserIdentity`] / [`ContextRequest`] that the
    /// pool's [`ContextProvider`] completes first, before a connection is taken, so that
    /// no connection waits on a token fetch. Fails closed: without a provider, or when the
    /// provider fails or exceeds the apply timeout, this is an error and never a plain
    /// connection.
    pub async fn acquire_as(
        &self,
        who: impl Into<AcquireAs>,
    ) -> Result<Object<B>, PoolError<B::Error>> {
        let context = match who.into() {
            AcquireAs::Context(context) => context,
            AcquireAs::Request(request) => self.complete(&request).await?,
        };
        let mut obj = self
            .checkout()
            .instrument(tracing::debug_span!("ctxpool.acquire_as"))
            .await?;
        obj.attach(context)
            .map_err(|e| PoolError::ContextRejected(Box::new(e)))?;
        self.shared.counters.acquired_as.increment(1);
        self.shared.counters.contexts_applied.increment(1);
        Ok(obj)
    }

    /// Completes a request through the provider, under the apply timeout, then adds the
    /// request's elevated data roles.
    async fn complete(
        &self,
        request: &ContextRequest,
    ) -> Result<SecurityContext, PoolError<B::Error>> {
        let provider = self.shared.provider.as_ref().ok_or(PoolError::NoProvider)?;
        let apply = self.shared.config.timeouts.apply;
        // The provider learns when the pool stops waiting, so that its retries fit inside
        // the apply timeout (an earlier deadline of the caller's stays).
        let deadline = tokio::time::Instant::now().checked_add(apply);
        let request = match (request.deadline, deadline) {
            (Some(theirs), Some(ours)) if theirs <= ours => std::borrow::Cow::Borrowed(request),
            _ => {
                let mut owned = request.clone();
                owned.deadline = deadline;
                std::borrow::Cow::Owned(owned)
            }
        };
        let request = request.as_ref();
        let fetch = provider
            .security_context(request)
            .instrument(tracing::debug_span!("ctxpool.apply", identity = %request.identity));
        match tokio::time::timeout(apply, fetch).await {
            Ok(Ok(context)) => elevate(context, &request.extra_data_roles)
                .map_err(|e| PoolError::Provider(ProviderError::Context(e))),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "ctxpool: context provider failed");
                Err(PoolError::Provider(e))
            }
            Err(_) => {
                metrics::timed_out(TimeoutType::Apply);
                Err(PoolError::Timeout(TimeoutType::Apply))
            }
        }
    }

    /// Takes a connection: first without waiting (no timer armed), then under the wait
    /// timeout.
    async fn checkout(&self) -> Result<Object<B>, PoolError<B::Error>> {
        match self.inner.timeout_get(&NO_WAIT).await {
            Ok(obj) => return Ok(Object::new(obj)),
            Err(managed::PoolError::Timeout(managed::TimeoutType::Wait)) => {}
            Err(e) => return Err(map_error(e)),
        }
        let waiting = managed::Timeouts {
            wait: Some(self.shared.config.timeouts.wait),
            ..NO_WAIT
        };
        match self.inner.timeout_get(&waiting).await {
            Ok(obj) => Ok(Object::new(obj)),
            Err(e) => {
                let e = map_error(e);
                if let PoolError::Timeout(kind) = &e {
                    metrics::timed_out(*kind);
                }
                Err(e)
            }
        }
    }

    /// The pool's size, free connections and waiters.
    pub fn status(&self) -> Status {
        self.inner.status()
    }

    /// Changes the maximum size; idle connections beyond it are closed.
    pub fn resize(&self, max_size: usize) {
        self.inner.resize(max_size);
    }

    /// Closes the pool: waiters and later acquirers get [`PoolError::Closed`].
    pub fn close(&self) {
        self.inner.close();
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Keeps only the idle connections for which `predicate` is true; closes the others.
    pub fn retain(
        &self,
        mut predicate: impl FnMut(&B::Connection, Metrics) -> bool,
    ) -> RetainResult<B::Connection> {
        self.inner.retain(|conn, metrics| predicate(conn, metrics))
    }

    /// The configuration the pool was built with (`max_size` as built; see
    /// [`status`](Self::status) after a resize).
    pub fn config(&self) -> &PoolConfig {
        &self.shared.config
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.inner.manager().backend
    }

    /// Whether the pool has a context provider to complete identities.
    pub fn has_provider(&self) -> bool {
        self.shared.provider.is_some()
    }
}

/// `context` with `extra` data roles added after its own, skipping any it already has.
fn elevate(
    context: SecurityContext,
    extra: &[String],
) -> Result<SecurityContext, crate::context::ContextError> {
    if extra.is_empty() {
        return Ok(context);
    }
    let mut roles = context.data_roles().to_vec();
    if !add_data_roles(&mut roles, extra.iter().cloned()) {
        return Ok(context);
    }
    context.with_data_roles(roles)
}

fn map_error<E: std::error::Error + 'static>(
    e: managed::PoolError<ManagerError<E>>,
) -> PoolError<E> {
    match e {
        managed::PoolError::Timeout(managed::TimeoutType::Wait) => {
            PoolError::Timeout(TimeoutType::Wait)
        }
        managed::PoolError::Timeout(managed::TimeoutType::Create)
        | managed::PoolError::Backend(ManagerError::CreateTimeout) => {
            PoolError::Timeout(TimeoutType::Create)
        }
        managed::PoolError::Timeout(managed::TimeoutType::Recycle) => {
            PoolError::Timeout(TimeoutType::Recycle)
        }
        managed::PoolError::Backend(ManagerError::Backend(e)) => PoolError::Backend(e),
        managed::PoolError::Closed => PoolError::Closed,
        managed::PoolError::NoRuntimeSpecified => PoolError::Unexpected("no runtime specified"),
        managed::PoolError::PostCreateHook(_) => PoolError::Unexpected("post-create hook failed"),
    }
}

/// Builds a [`Pool`]; see [`Pool::builder`].
#[must_use = "a builder does nothing until `build` is called"]
pub struct PoolBuilder<B: Backend> {
    backend: B,
    config: PoolConfig,
    provider: Option<Arc<dyn ContextProvider>>,
}

impl<B: Backend> PoolBuilder<B> {
    /// Replaces the whole configuration. Takes deadpool's `PoolConfig` too, whose unset
    /// timeouts become ctxpool's finite defaults.
    pub fn config(mut self, config: impl Into<PoolConfig>) -> Self {
        self.config = config.into();
        self
    }

    /// Accepted for deadpool compatibility: ctxpool always runs on tokio.
    pub fn runtime(self, _runtime: Runtime) -> Self {
        self
    }

    /// Sets the wait timeout; `None` keeps the finite default.
    pub fn wait_timeout(mut self, timeout: Option<Duration>) -> Self {
        if let Some(t) = timeout {
            self.config.timeouts.wait = t;
        }
        self
    }

    /// Sets the create timeout; `None` keeps the finite default.
    pub fn create_timeout(mut self, timeout: Option<Duration>) -> Self {
        if let Some(t) = timeout {
            self.config.timeouts.create = t;
        }
        self
    }

    /// Sets the recycle timeout; `None` keeps the finite default.
    pub fn recycle_timeout(mut self, timeout: Option<Duration>) -> Self {
        if let Some(t) = timeout {
            self.config.timeouts.recycle = t;
        }
        self
    }

    /// The most connections the pool holds at once.
    pub fn max_size(mut self, max_size: usize) -> Self {
        self.config.max_size = max_size;
        self
    }

    /// All four timeouts.
    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.config.timeouts = timeouts;
        self
    }

    /// Which idle connection is handed out first.
    pub fn queue_mode(mut self, queue_mode: QueueMode) -> Self {
        self.config.queue_mode = queue_mode;
        self
    }

    /// The provider that completes identities passed to [`Pool::acquire_as`].
    pub fn provider(mut self, provider: impl ContextProvider) -> Self {
        self.provider = Some(Arc::new(provider));
        self
    }

    /// [`provider`](Self::provider) for a provider already shared.
    pub fn provider_arc(mut self, provider: Arc<dyn ContextProvider>) -> Self {
        self.provider = Some(provider);
        self
    }

    /// Checks the configuration and builds the pool. Opens no connection.
    pub fn build(self) -> Result<Pool<B>, BuildError> {
        let t = self.config.timeouts;
        if self.config.max_size == 0 {
            return Err(BuildError::ZeroMaxSize);
        }
        for (d, kind) in [
            (t.wait, TimeoutType::Wait),
            (t.create, TimeoutType::Create),
            (t.recycle, TimeoutType::Recycle),
            (t.apply, TimeoutType::Apply),
        ] {
            if d.is_zero() {
                return Err(BuildError::ZeroTimeout(kind));
            }
        }
        let manager = Manager {
            backend: self.backend,
            create_timeout: t.create,
            recycle_timeout: t.recycle,
        };
        let inner = managed::Pool::builder(manager)
            .max_size(self.config.max_size)
            .queue_mode(self.config.queue_mode)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|_| BuildError::Unexpected("deadpool refused the configuration"))?;
        Ok(Pool {
            inner,
            shared: Arc::new(Shared {
                config: self.config,
                provider: self.provider,
                counters: metrics::Counters::register(),
            }),
        })
    }
}
