//! Per-request identity: the end user a task is working for.
//!
//! A web request is served by one task. Running that task's future inside an
//! [`EndUserScope`] makes the end user known to everything it calls: on a pool built with a
//! [`ContextProvider`](crate::ContextProvider), plain [`Pool::get`](crate::Pool::get) then
//! acquires *as that user*, so the service's SQL and its data-access layer need no change.
//! Outside any scope, or in a scope without an identity, `get` returns the plain
//! least-privileged connection, with no error.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use ctxpool::scope::{self, EndUserScope};
//! use ctxpool::EndUserIdentity;
//!
//! let alice = EndUserIdentity::named("alice", None);
//! EndUserScope::new(alice)
//!     .data_roles(["hr_employee"])
//!     .run(async {
//!         // Here `pool.get()` acquires as alice, with the data role hr_employee.
//!         assert_eq!(scope::current().unwrap().identity.name(), Some("alice"));
//!     })
//!     .await;
//! assert!(scope::current().is_none());
//! # });
//! ```
//!
//! # The rules
//! - **Task-local, never thread-local.** The identity belongs to the future passed to
//!   [`EndUserScope::run`] and to nothing else: concurrent requests on the same worker
//!   thread, or a request resumed on another thread, never see each other's identity.
//!   (python-oracledb keeps it per thread, so under asyncio concurrent requests share it.)
//! - **Nesting.** An inner scope replaces the outer one for its future only; when the inner
//!   future completes, is dropped or panics, the outer scope is back.
//! - **Spawned tasks do not inherit it.** `tokio::spawn(fut)` runs `fut` with no identity.
//!   To carry the identity into a task, wrap the future: `tokio::spawn(scope::carry(fut))`
//!   captures the current scope when `carry` is called.
//! - **Setters change the current scope only.** [`set_end_user_identity`],
//!   [`set_end_user_data_roles`] and [`set_end_user_attributes`] are the analogues of the
//!   python-oracledb functions of the same names; they change the innermost scope, and fail
//!   with [`ScopeError::NoScope`] outside one (there is no process-wide fallback to leak
//!   into).
//! - **Elevation is scoped.** [`with_data_roles`] runs one future with extra data roles (the
//!   analogue of `@RunWithDataRoles` in Oracle's Spring sample); the backend's allow-list
//!   still decides whether they may be enabled, and refuses the acquire otherwise.
//! - **Explicit wins.** [`Pool::acquire_as`](crate::Pool::acquire_as) uses what it is given,
//!   whatever the scope says.

use std::cell::RefCell;
use std::future::Future;

use serde_json::Value;

use crate::context::{Attributes, ContextError, EndUserIdentity, add_data_roles, check_data_roles};
use crate::provider::{ContextRequest, Verification};

tokio::task_local! {
    /// The innermost scope of the running task. A `RefCell` because the setters change it
    /// in place; borrows never span an `.await`.
    static CURRENT: RefCell<State>;
}

/// What a scope holds.
#[derive(Clone, Debug, Default)]
struct State {
    identity: Option<EndUserIdentity>,
    data_roles: Option<Vec<String>>,
    attributes: Option<Value>,
    extra_data_roles: Vec<String>,
    verification: Option<Verification>,
}

impl State {
    fn request(&self) -> Option<ContextRequest> {
        let identity = self.identity.clone()?;
        Some(ContextRequest {
            identity,
            data_roles: self.data_roles.clone(),
            attributes: self.attributes.clone(),
            extra_data_roles: self.extra_data_roles.clone(),
            deadline: None,
            verification: self.verification.clone(),
        })
    }
}

/// Why a scope operation was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScopeError {
    /// The calling task is not running inside an [`EndUserScope`].
    #[error("not inside an end-user scope (see ctxpool::scope)")]
    NoScope,
    /// The operation needs an end-user identity and the current scope has none.
    #[error("the current end-user scope has no identity")]
    NoIdentity,
    /// The identity, a data role or the attributes did not validate.
    #[error(transparent)]
    Context(#[from] ContextError),
}

/// A scope to run a future in, for one end user (or for none, so that a handler can set
/// the identity later with [`set_end_user_identity`]).
#[derive(Clone, Debug, Default)]
#[must_use = "a scope does nothing until `run` is called"]
pub struct EndUserScope {
    state: State,
}

impl EndUserScope {
    /// A scope for `identity`, with the provider's configured data roles and attributes.
    pub fn new(identity: EndUserIdentity) -> Self {
        Self {
            state: State {
                identity: Some(identity),
                ..State::default()
            },
        }
    }

    /// A scope with no identity yet: `get` gives plain connections until a setter names one.
    pub fn anonymous() -> Self {
        Self::default()
    }

    /// A scope for what `request` describes.
    pub fn from_request(request: ContextRequest) -> Self {
        Self {
            state: State {
                identity: Some(request.identity),
                data_roles: request.data_roles,
                attributes: request.attributes,
                extra_data_roles: request.extra_data_roles,
                verification: request.verification,
            },
        }
    }

    /// Data roles for this scope's requests, replacing the provider's configured ones.
    pub fn data_roles<I, S>(mut self, roles: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.state.data_roles = Some(roles.into_iter().map(Into::into).collect());
        self
    }

    /// Attributes for this scope's requests, replacing the provider's configured ones.
    pub fn attributes(mut self, attributes: impl Into<Value>) -> Self {
        self.state.attributes = Some(attributes.into());
        self
    }

    /// Evidence that the identity's token was verified (set by the tower layer after its
    /// token check), handed to the provider with each request of the scope.
    pub fn verification(mut self, verification: Verification) -> Self {
        self.state.verification = Some(verification);
        self
    }

    /// The identity this scope names, if any.
    pub fn identity(&self) -> Option<&EndUserIdentity> {
        self.state.identity.as_ref()
    }

    /// Runs `future` inside this scope. The scope ends with the future: when it completes,
    /// is dropped, or panics.
    pub fn run<F: Future>(self, future: F) -> impl Future<Output = F::Output> {
        CURRENT.scope(RefCell::new(self.state), future)
    }

    /// Runs the synchronous `f` inside this scope.
    pub fn run_sync<R>(self, f: impl FnOnce() -> R) -> R {
        CURRENT.sync_scope(RefCell::new(self.state), f)
    }
}

/// The request the current scope describes: `None` outside a scope or in a scope without
/// an identity.
pub fn current() -> Option<ContextRequest> {
    CURRENT
        .try_with(|state| state.borrow().request())
        .ok()
        .flatten()
}

/// Whether the calling task runs inside an [`EndUserScope`].
pub fn in_scope() -> bool {
    CURRENT.try_with(|_| ()).is_ok()
}

/// Changes the current scope in place.
fn update(change: impl FnOnce(&mut State)) -> Result<(), ScopeError> {
    CURRENT
        .try_with(|state| change(&mut state.borrow_mut()))
        .map_err(|_| ScopeError::NoScope)
}

/// Sets the end user of the current scope: the analogue of python-oracledb's
/// `set_end_user_identity`. The identity is validated here, so that a malformed one is an
/// error at the point it was set rather than at the next acquire.
pub fn set_end_user_identity(identity: EndUserIdentity) -> Result<(), ScopeError> {
    identity.validate()?;
    update(|state| {
        // Evidence about the previous identity's token says nothing about this one.
        state.verification = None;
        state.identity = Some(identity);
    })
}

/// Removes the end user from the current scope: `get` gives plain connections again.
pub fn clear_end_user_identity() -> Result<(), ScopeError> {
    update(|state| *state = State::default())
}

/// Sets the data roles of the current scope, replacing the provider's configured ones: the
/// analogue of `set_end_user_data_roles`.
pub fn set_end_user_data_roles<I, S>(roles: I) -> Result<(), ScopeError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let roles: Vec<String> = roles.into_iter().map(Into::into).collect();
    check_data_roles(&roles)?;
    update(|state| state.data_roles = Some(roles))
}

/// Sets the attributes of the current scope, replacing the provider's configured ones: the
/// analogue of `set_end_user_attributes`.
pub fn set_end_user_attributes(attributes: impl Into<Value>) -> Result<(), ScopeError> {
    let attributes = attributes.into();
    Attributes::from_json(attributes.clone())?;
    update(|state| state.attributes = Some(attributes))
}

/// Runs `future` with `roles` enabled in addition to the current user's data roles: a
/// scoped elevation, the analogue of `@RunWithDataRoles`. The current scope is captured
/// when this is called; the elevation ends with the future.
///
/// Fails at once outside a scope, in a scope without an identity, or for a malformed role
/// name. A well-formed role outside the backend's allow-list fails the acquire inside the
/// future ([`PoolError::ContextRejected`](crate::PoolError::ContextRejected)), before any
/// SQL runs.
pub fn with_data_roles<I, S, F>(
    roles: I,
    future: F,
) -> Result<impl Future<Output = F::Output>, ScopeError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
    F: Future,
{
    let roles: Vec<String> = roles.into_iter().map(Into::into).collect();
    check_data_roles(&roles)?;
    let mut state = CURRENT
        .try_with(|state| state.borrow().clone())
        .map_err(|_| ScopeError::NoScope)?;
    if state.identity.is_none() {
        return Err(ScopeError::NoIdentity);
    }
    add_data_roles(&mut state.extra_data_roles, roles);
    Ok(CURRENT.scope(RefCell::new(state), future))
}

/// Wraps `future` so that it runs in a copy of the current scope, wherever it is polled:
/// the way to hand the identity to a spawned task (`tokio::spawn(scope::carry(fut))`).
/// Outside a scope the copy is an empty one. Later setters in either task do not affect
/// the other.
pub fn carry<F: Future>(future: F) -> impl Future<Output = F::Output> {
    let state = CURRENT
        .try_with(|state| state.borrow().clone())
        .unwrap_or_default();
    CURRENT.scope(RefCell::new(state), future)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn named(name: &str) -> EndUserIdentity {
        EndUserIdentity::named(name, None)
    }

    fn current_name() -> Option<String> {
        current().and_then(|r| r.identity.name().map(str::to_owned))
    }

    #[tokio::test]
    async fn no_scope_means_no_identity_and_setters_refuse() {
        assert!(current().is_none());
        assert!(!in_scope());
        assert!(matches!(
            set_end_user_identity(named("alice")),
            Err(ScopeError::NoScope)
        ));
        assert!(matches!(
            set_end_user_data_roles(["r"]),
            Err(ScopeError::NoScope)
        ));
        assert!(matches!(
            with_data_roles(["r"], async {}),
            Err(ScopeError::NoScope)
        ));
    }

    #[tokio::test]
    async fn nested_scopes_restore_the_outer_one() {
        EndUserScope::new(named("alice"))
            .run(async {
                assert_eq!(current_name().as_deref(), Some("alice"));
                EndUserScope::new(named("bob"))
                    .run(async {
                        assert_eq!(current_name().as_deref(), Some("bob"));
                        set_end_user_identity(named("carol")).unwrap();
                        assert_eq!(current_name().as_deref(), Some("carol"));
                    })
                    .await;
                // The inner setter changed the inner scope only.
                assert_eq!(current_name().as_deref(), Some("alice"));
                EndUserScope::anonymous()
                    .run(async {
                        assert!(in_scope());
                        assert!(current().is_none());
                    })
                    .await;
                assert_eq!(current_name().as_deref(), Some("alice"));
            })
            .await;
        assert!(current().is_none());
    }

    #[tokio::test]
    async fn setters_fill_an_anonymous_scope() {
        EndUserScope::anonymous()
            .run(async {
                set_end_user_identity(named("alice")).unwrap();
                set_end_user_data_roles(["hr_employee"]).unwrap();
                set_end_user_attributes(serde_json::json!({"hr.ctx": {"emp_id": 3}})).unwrap();
                let request = current().unwrap();
                assert_eq!(request.data_roles.unwrap(), ["hr_employee"]);
                assert!(request.attributes.is_some());
                clear_end_user_identity().unwrap();
                assert!(current().is_none());
            })
            .await;
    }

    #[tokio::test]
    async fn setters_validate_before_changing_anything() {
        EndUserScope::new(named("alice"))
            .run(async {
                assert!(matches!(
                    set_end_user_identity(named("")),
                    Err(ScopeError::Context(_))
                ));
                assert!(matches!(
                    set_end_user_data_roles(["bad role; DROP"]),
                    Err(ScopeError::Context(_))
                ));
                assert!(matches!(
                    set_end_user_attributes(serde_json::json!([1, 2])),
                    Err(ScopeError::Context(_))
                ));
                let request = current().unwrap();
                assert_eq!(request.identity.name(), Some("alice"));
                assert!(request.data_roles.is_none() && request.attributes.is_none());
            })
            .await;
    }

    #[tokio::test]
    async fn spawned_tasks_do_not_inherit_unless_carried() {
        EndUserScope::new(named("alice"))
            .run(async {
                let plain = tokio::spawn(async { current_name() }).await.unwrap();
                assert_eq!(plain, None);
                let carried = tokio::spawn(carry(async {
                    // A setter in the carried task changes its copy only.
                    set_end_user_identity(named("mallory")).unwrap();
                    current_name()
                }))
                .await
                .unwrap();
                assert_eq!(carried.as_deref(), Some("mallory"));
                assert_eq!(current_name().as_deref(), Some("alice"));
            })
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_scopes_on_shared_threads_stay_apart() {
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                tokio::spawn(
                    EndUserScope::new(named(&format!("user{i}"))).run(async move {
                        for _ in 0..10 {
                            tokio::task::yield_now().await;
                            assert_eq!(current_name(), Some(format!("user{i}")));
                        }
                    }),
                )
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_panic_inside_a_scope_restores_the_outer_scope() {
        use futures_like::catch_unwind;
        EndUserScope::new(named("alice"))
            .run(async {
                let inner = EndUserScope::new(named("bob")).run(async {
                    assert_eq!(current_name().as_deref(), Some("bob"));
                    panic!("deliberate panic inside a scope");
                });
                assert!(catch_unwind(inner).await.is_err());
                assert_eq!(current_name().as_deref(), Some("alice"));
            })
            .await;
        // A task that panics inside a scope leaves nothing behind for the next task.
        let handle = tokio::spawn(EndUserScope::new(named("bob")).run(async {
            panic!("deliberate panic inside a spawned scope");
        }));
        assert!(handle.await.unwrap_err().is_panic());
        assert!(tokio::spawn(async { current() }).await.unwrap().is_none());
    }

    /// `catch_unwind` for a future, without a futures dependency.
    mod futures_like {
        use std::future::Future;
        use std::panic::{AssertUnwindSafe, catch_unwind as catch};
        use std::pin::pin;
        use std::task::Poll;

        pub async fn catch_unwind<F: Future>(
            future: F,
        ) -> Result<F::Output, Box<dyn std::any::Any + Send>> {
            let mut future = pin!(future);
            std::future::poll_fn(move |cx| {
                match catch(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
                    Ok(Poll::Pending) => Poll::Pending,
                    Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
                    Err(panic) => Poll::Ready(Err(panic)),
                }
            })
            .await
        }
    }

    #[tokio::test]
    async fn elevation_adds_roles_for_one_future() {
        EndUserScope::new(named("alice"))
            .data_roles(["hr_employee"])
            .run(async {
                let elevated = with_data_roles(["hr_manager"], async {
                    // Nested elevation adds, without repeating a role already elevated.
                    with_data_roles(["HR_MANAGER", "hr_auditor"], async {
                        current().unwrap().extra_data_roles
                    })
                    .unwrap()
                    .await
                })
                .unwrap()
                .await;
                assert_eq!(elevated, ["hr_manager", "hr_auditor"]);
                assert!(current().unwrap().extra_data_roles.is_empty());
                assert!(matches!(
                    with_data_roles(["not a role"], async {}),
                    Err(ScopeError::Context(_))
                ));
            })
            .await;
        EndUserScope::anonymous()
            .run(async {
                assert!(matches!(
                    with_data_roles(["hr_manager"], async {}),
                    Err(ScopeError::NoIdentity)
                ));
            })
            .await;
    }
}
