//! The live property of `tests/postgres_property.rs` must fail when the pool's safety is
//! switched off: with `ctxpool_testkit::sabotage::skip_reset` (no session reset) and with
//! `ignore_status` (connections taken back whatever their transaction status), each on
//! its own, the same runner must find a violation within a bounded number of cases and
//! shrink it. The switches are process-wide, hence a binary of their own; its tests take
//! turns on a lock.

#[path = "support/property.rs"]
mod property;
mod support;

use std::sync::Mutex;

use ctxpool_testkit::sabotage;
use proptest::prelude::ProptestConfig;
use proptest::test_runner::TestError;

/// A sabotage must be found within this many schedules.
const CASES: u32 = 200;

/// One sabotage at a time: the switches are process-wide.
static TURN: Mutex<()> = Mutex::new(());

/// Runs the property with the sabotage switched on by `switch(true)`; it must fail.
fn must_be_caught(name: &str, switch: fn(bool)) {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let env = property::Env::start();
    let config = ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        max_shrink_iters: 400,
        ..ProptestConfig::default()
    };
    switch(true);
    let outcome = property::run(&env, config, 3);
    switch(false);
    drop(env);
    eprintln!(
        "{name}: {} schedules run (shrinking included) in {:.1?}; the first failure was \
         schedule {:?}",
        outcome.ran, outcome.elapsed, outcome.first_failure
    );
    match outcome.result {
        Err(TestError::Fail(why, schedule)) => {
            eprintln!("{name}: caught; shrunk schedule:\n{schedule:#?}\nwhy: {why}");
        }
        Err(TestError::Abort(why)) => panic!("{name}: the runner aborted: {why}"),
        Ok(()) => panic!("{name}: no violation found in {CASES} schedules"),
    }
}

#[test]
fn skip_reset_is_caught() {
    must_be_caught("skip_reset", sabotage::skip_reset);
}

#[test]
fn ignore_status_is_caught() {
    must_be_caught("ignore_status", sabotage::ignore_status);
}
