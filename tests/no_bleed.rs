//! Property test of the pool's invariant against the in-process backend: every statement
//! observes exactly its acquirer's context, and nothing survives release, whatever the
//! exit path (normal drop, cancellation after any number of polls, panic, statement
//! errors, open or aborted transactions, user SQL changing the session, lost sessions).
//!
//! `PROPTEST_CASES` raises the case count (default 10,000).

use std::sync::{Arc, Mutex};

use ctxpool::{
    ContextRequest, EndUserIdentity, Pool, SecurityContext, provider::StaticTokenProvider,
};
use ctxpool_testkit::{MemBackend, MemError, MemServer, Observation, Statement};
use proptest::prelude::*;

#[path = "support/poll.rs"]
mod poll;
use poll::{DELIBERATE_PANIC, PollLimited, silence_deliberate_panics};

const IDENTITIES: usize = 4;
/// Identity 3 is refused by the server in schedules that say so.
const REFUSABLE: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    Query,
    Slow(u8),
    Set(usize),
    Clear,
    Begin,
    Commit,
    Rollback,
    Fail,
    SetRole,
    KillMine,
    KillSession(u8),
    Panic,
}

#[derive(Debug, Clone, Copy)]
enum Acquire {
    Plain,
    AsContext(usize),
    AsIdentity(usize),
}

#[derive(Debug, Clone)]
struct Task {
    acquire: Acquire,
    ops: Vec<Op>,
    /// Cancel the task after this many polls.
    poll_limit: Option<u16>,
}

#[derive(Debug, Clone)]
struct Schedule {
    max_size: usize,
    refuse: bool,
    latency: u8,
    tasks: Vec<Task>,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => Just(Op::Query),
        1 => (0u8..4).prop_map(Op::Slow),
        2 => (0..IDENTITIES).prop_map(Op::Set),
        1 => Just(Op::Clear),
        1 => Just(Op::Begin),
        1 => Just(Op::Commit),
        1 => Just(Op::Rollback),
        1 => Just(Op::Fail),
        1 => Just(Op::SetRole),
        1 => Just(Op::KillMine),
        1 => (0u8..12).prop_map(Op::KillSession),
        1 => Just(Op::Panic),
    ]
}

fn acquire() -> impl Strategy<Value = Acquire> {
    prop_oneof![
        Just(Acquire::Plain),
        (0..IDENTITIES).prop_map(Acquire::AsContext),
        (0..IDENTITIES).prop_map(Acquire::AsIdentity),
    ]
}

fn task() -> impl Strategy<Value = Task> {
    (
        acquire(),
        prop::collection::vec(op(), 0..10),
        prop_oneof![2 => Just(None), 3 => (0u16..48).prop_map(Some)],
    )
        .prop_map(|(acquire, ops, poll_limit)| Task {
            acquire,
            ops,
            poll_limit,
        })
}

fn schedule() -> impl Strategy<Value = Schedule> {
    (
        1usize..4,
        any::<bool>(),
        0u8..2,
        prop::collection::vec(task(), 1..9),
    )
        .prop_map(|(max_size, refuse, latency, tasks)| Schedule {
            max_size,
            refuse,
            latency,
            tasks,
        })
}

struct World {
    pool: Pool<MemBackend>,
    server: MemServer,
    contexts: Vec<SecurityContext>,
    max_size: usize,
    refuse: bool,
    violations: Mutex<Vec<String>>,
}

fn name(i: usize) -> String {
    format!("user{i}")
}

fn roles(i: usize) -> Vec<String> {
    vec![format!("role{i}"), "reader".to_owned()]
}

impl World {
    fn violation(&self, what: String) {
        self.violations.lock().unwrap().push(what);
    }

    fn check_size(&self, at: &str) {
        let status = self.pool.status();
        let live = self.server.stats().live_sessions;
        if status.size > self.max_size || live > self.max_size {
            self.violation(format!(
                "{at}: size {} / live sessions {live} > max_size {}",
                status.size, self.max_size
            ));
        }
    }

    /// Checks one statement's result against the context the handle should carry.
    fn check(
        &self,
        at: &str,
        result: &Result<Observation, MemError>,
        expected: Option<usize>,
        role_tampered: bool,
    ) {
        let refused = self.refuse && expected == Some(REFUSABLE);
        match result {
            Ok(obs) => {
                if refused {
                    self.violation(format!("{at}: a refused context ran a statement: {obs:?}"));
                    return;
                }
                let want_user = expected.map(name);
                let want_roles = expected.map(roles).unwrap_or_default();
                let want_role = want_roles.first().cloned();
                if obs.end_user != want_user || obs.data_roles != want_roles {
                    self.violation(format!(
                        "{at}: expected {want_user:?} {want_roles:?}, observed {obs:?}"
                    ));
                }
                if !role_tampered && obs.role != want_role {
                    self.violation(format!(
                        "{at}: expected role {want_role:?}, observed {obs:?}"
                    ));
                }
            }
            Err(MemError::ContextRefused) if !refused => {
                self.violation(format!(
                    "{at}: context refused for an accepted identity {expected:?}"
                ));
            }
            Err(_) => {}
        }
    }
}

async fn run_task(world: Arc<World>, index: usize, task: Task) {
    let at = |step: usize| format!("task {index} step {step}");
    let acquired = match task.acquire {
        Acquire::Plain => world.pool.get().await,
        Acquire::AsContext(i) => world.pool.acquire_as(&world.contexts[i]).await,
        Acquire::AsIdentity(i) => {
            let request =
                ContextRequest::new(EndUserIdentity::named(name(i), None)).data_roles(roles(i));
            world.pool.acquire_as(request).await
        }
    };
    let mut conn = match acquired {
        Ok(conn) => conn,
        Err(e) => return world.violation(format!("task {index}: acquire failed: {e}")),
    };
    world.check_size(&at(0));
    let mut expected = match task.acquire {
        Acquire::Plain => None,
        Acquire::AsContext(i) | Acquire::AsIdentity(i) => Some(i),
    };
    if conn
        .end_user_security_context()
        .map(|c| c.identity().name().map(str::to_owned))
        != expected.map(|i| Some(name(i)))
    {
        world.violation(format!("task {index}: handle carries the wrong context"));
    }
    for (step, op) in task.ops.into_iter().enumerate() {
        let statement = match op {
            Op::Set(i) => {
                conn.set_end_user_security_context(&world.contexts[i])
                    .unwrap();
                expected = Some(i);
                continue;
            }
            Op::Clear => {
                conn.clear_end_user_security_context();
                expected = None;
                continue;
            }
            Op::KillMine => {
                world.server.kill(conn.session_id());
                continue;
            }
            Op::KillSession(s) => {
                world.server.kill(u64::from(s));
                continue;
            }
            Op::Panic => std::panic::panic_any(DELIBERATE_PANIC),
            Op::Query => Statement::Query,
            Op::Slow(n) => Statement::Slow(usize::from(n)),
            Op::Begin => Statement::Begin,
            Op::Commit => Statement::Commit,
            Op::Rollback => Statement::Rollback,
            Op::Fail => Statement::Fail,
            Op::SetRole => Statement::SetRole("intruder".to_owned()),
        };
        let tampering = matches!(statement, Statement::SetRole(_));
        let result = conn.execute(statement).await;
        world.check(&at(step + 1), &result, expected, tampering);
        world.check_size(&at(step + 1));
    }
}

fn run_schedule(schedule: &Schedule) -> Result<(), TestCaseError> {
    silence_deliberate_panics();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let server = MemServer::new();
        server.set_latency_yields(usize::from(schedule.latency));
        if schedule.refuse {
            server.refuse(&name(REFUSABLE), true);
        }
        let pool = Pool::builder(MemBackend::new(server.clone()))
            .max_size(schedule.max_size)
            .provider(StaticTokenProvider::new("db-token"))
            .build()
            .unwrap();
        let contexts = (0..IDENTITIES)
            .map(|i| {
                SecurityContext::builder(EndUserIdentity::named(name(i), None), "db-token")
                    .data_roles(roles(i))
                    .build()
                    .unwrap()
            })
            .collect();
        let world = Arc::new(World {
            pool: pool.clone(),
            server: server.clone(),
            contexts,
            max_size: schedule.max_size,
            refuse: schedule.refuse,
            violations: Mutex::new(Vec::new()),
        });
        let handles: Vec<_> = schedule
            .tasks
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, task)| {
                let limit = task.poll_limit;
                let fut = run_task(world.clone(), i, task);
                tokio::spawn(async move {
                    match limit {
                        Some(left) => {
                            PollLimited::new(fut, left)
                            .await;
                        }
                        None => fut.await,
                    }
                })
            })
            .collect();
        for handle in handles {
            // A deliberate panic surfaces here as a JoinError; the pool must not care.
            let _ = handle.await;
        }

        let status = pool.status();
        prop_assert_eq!(status.available, status.size, "connections still checked out: {:?}", status);
        prop_assert!(status.size <= schedule.max_size);
        // Sessions killed while idle are still counted until recycle finds them dead.
        prop_assert!(server.stats().live_sessions <= status.size, "sessions leaked");

        // Every idle connection must come back plain, and run plain statements.
        let mut all = Vec::new();
        for _ in 0..schedule.max_size {
            all.push(pool.get().await.unwrap());
        }
        for conn in &mut all {
            prop_assert!(conn.end_user_security_context().is_none());
            let obs = conn.query().await;
            prop_assert!(
                matches!(&obs, Ok(o) if o.end_user.is_none() && o.role.is_none() && o.data_roles.is_empty()),
                "a released context survived: {:?}", obs
            );
        }
        prop_assert_eq!(server.stats().live_sessions, schedule.max_size, "dead sessions were handed out");
        drop(all);

        let violations = world.violations.lock().unwrap();
        prop_assert!(violations.is_empty(), "violations: {:#?}", *violations);
        Ok(())
    })
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn no_context_bleeds_across_checkouts(schedule in schedule()) {
        run_schedule(&schedule)?;
    }
}
