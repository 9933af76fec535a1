//! The pool's invariant as a property, against a live PostgreSQL cluster (the live twin of
//! `tests/no_bleed.rs`): every statement observes exactly its acquirer's context (the rows
//! Row-Level Security lets through, `current_user`, `ctxpool.end_user`), and a plain
//! handle's session equals a fresh connection's after every release, whatever the exit
//! path: a normal drop, cancellation after any number of polls, a panic, statement and
//! stream errors, a failed COMMIT, raw `BEGIN`/`COMMIT`/`ROLLBACK`, forgotten transactions,
//! result streams outliving their handles, session changes in user SQL (`SET ROLE`,
//! `set_config` in disguise, temporary tables, cursors, advisory locks, prepared
//! statements), and backends terminated while checked out or idle. The runner and the
//! soundness argument of its checks are in `tests/support/property.rs`;
//! `tests/postgres_property_sabotage.rs` shows it fails when the pool's safety is broken.
//!
//! One throwaway cluster serves every case; each case gets a fresh pool. `PROPTEST_CASES`
//! sets the case count (default 500).

#[path = "support/property.rs"]
mod property;
mod support;

use proptest::prelude::ProptestConfig;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500)
}

#[test]
fn no_context_bleeds_across_checkouts_on_postgres() {
    let env = property::Env::start();
    eprintln!("a fresh session of the login: {:?}", env.fresh());
    let config = ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        max_shrink_iters: 1000,
        ..ProptestConfig::default()
    };
    let outcome = property::run(&env, config, 3);
    eprintln!(
        "{} schedules run (shrinking included) in {:.1?}",
        outcome.ran, outcome.elapsed
    );
    drop(env);
    if let Err(e) = outcome.result {
        panic!(
            "schedule {:?} failed first; shrunk: {e}",
            outcome.first_failure
        );
    }
}
