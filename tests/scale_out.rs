//! Scale-out, live: pgpool-II in front of a primary and a streaming standby, a failover
//! under load with a multi-host URL, and a pool on a read replica. Every server is a
//! throwaway one the test kit starts on a free loopback port.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ctxpool::postgres::{ContextScope, MappingError, Pool};
use ctxpool::{PoolError, SecurityContext};
use ctxpool_testkit::{PgCluster, PgPool};
use support::*;

/// What a request saw, and where it ran: the end user the server held, the rows RLS let
/// through, the server's port and whether the transaction was read-only.
const SEEN_SQL: &str = "SELECT pg_catalog.current_setting('ctxpool.end_user', true), \
     (SELECT pg_catalog.string_agg(name, ',' ORDER BY name) FROM hr.employees), \
     pg_catalog.inet_server_port(), \
     pg_catalog.current_setting('transaction_read_only')";

/// Upper bound for a whole scenario: a pool that never recovers fails the test here.
const SCENARIO_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    end_user: Option<String>,
    rows: Option<String>,
    port: i32,
    read_only: bool,
}

/// A primary with the HR schema and a streaming standby of it.
fn pair() -> (PgCluster, PgCluster) {
    let primary = hr_cluster();
    let standby = PgCluster::start_standby(&primary).unwrap_or_else(|e| panic!("{e}"));
    (primary, standby)
}

/// Who asks, and what they must see: the end user and the rows.
struct Asker {
    who: Option<SecurityContext>,
    user: Option<&'static str>,
    rows: Option<&'static str>,
}

fn alice_asks() -> Asker {
    Asker {
        who: Some(alice()),
        user: Some("alice"),
        rows: Some("Alan"),
    }
}

fn bob_asks() -> Asker {
    Asker {
        who: Some(bob()),
        user: Some("bob"),
        rows: Some("Barbara,Edsger"),
    }
}

fn plain_asks() -> Asker {
    Asker {
        who: None,
        user: None,
        rows: None,
    }
}

impl Asker {
    /// Whether `s` is this asker's answer: its own end user and rows, nobody else's.
    fn sees_own(&self, s: &Seen) -> bool {
        s.end_user.as_deref() == self.user && s.rows.as_deref() == self.rows
    }
}

/// The end user as the server reports it: a custom setting reads `''` once reset.
fn user(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.is_empty())
}

async fn seen(client: &ctxpool::postgres::Client) -> Result<Seen, tokio_postgres::Error> {
    let rows = client.query_typed(SEEN_SQL, &[]).await?;
    let row = &rows[0];
    Ok(Seen {
        end_user: user(row.get(0)),
        rows: row.get(1),
        port: row.get(2),
        read_only: row.get::<_, String>(3) == "on",
    })
}

/// One request as `who`.
async fn request(pool: &Pool, who: &Option<SecurityContext>) -> Result<Seen, Failure> {
    let client = match who {
        Some(ctx) => pool.acquire_as(ctx).await,
        None => pool.get().await,
    }
    .map_err(Failure::Pool)?;
    seen(&client).await.map_err(Failure::Statement)
}

/// One request as `who` whose statement also calls `function('x')`.
async fn request_calling(
    pool: &Pool,
    who: &Option<SecurityContext>,
    function: &str,
) -> Result<Seen, Failure> {
    let client = match who {
        Some(ctx) => pool.acquire_as(ctx).await,
        None => pool.get().await,
    }
    .map_err(Failure::Pool)?;
    let sql = format!("{SEEN_SQL}, pg_catalog.{function}('x'::text)");
    let rows = client
        .query_typed(&sql, &[])
        .await
        .map_err(Failure::Statement)?;
    let row = &rows[0];
    Ok(Seen {
        end_user: user(row.get(0)),
        rows: row.get(1),
        port: row.get(2),
        read_only: row.get::<_, String>(3) == "on",
    })
}

#[derive(Debug)]
enum Failure {
    Pool(PoolError<ctxpool::postgres::Error>),
    Statement(tokio_postgres::Error),
}

/// A failure's kind, for counting: every failure must have one of these types.
fn kind(f: &Failure) -> String {
    use ctxpool::postgres::Error as E;
    match f {
        Failure::Pool(PoolError::Backend(E::Connect { .. })) => "connect refused".into(),
        Failure::Pool(PoolError::Backend(E::NoSuitableHost { .. })) => {
            "no read-write host (target_session_attrs)".into()
        }
        Failure::Pool(PoolError::Backend(E::ConnectTimeout { .. })) => "connect timeout".into(),
        Failure::Pool(PoolError::Backend(E::Postgres(e))) => format!("connect: {}", pg_kind(e)),
        Failure::Pool(PoolError::Timeout(t)) => format!("pool timeout: {}", t.as_str()),
        Failure::Pool(other) => format!("pool: {other}"),
        Failure::Statement(e) => format!("statement: {}", pg_kind(e)),
    }
}

fn pg_kind(e: &tokio_postgres::Error) -> String {
    match e.code() {
        Some(code) => format!("SQLSTATE {}", code.code()),
        None if e.is_closed() => "connection closed".into(),
        None => "connection lost".into(),
    }
}

fn mapping_error(e: &PoolError<ctxpool::postgres::Error>) -> Option<&MappingError> {
    match e {
        PoolError::ContextRejected(inner) => inner.downcast_ref::<MappingError>(),
        _ => None,
    }
}

// ---- pgpool-II ------------------------------------------------------------------------

/// With pgpool-II's defaults (load balancing on, disable_load_balance_on_write =
/// 'transaction'), the context statement is a write to pgpool-II (set_config is volatile)
/// and goes to the primary, while the read after it goes to the session's balancing node.
/// The pool sees that configuration at connect and refuses every context; plain
/// connections still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgpool_with_its_defaults_refuses_contexts() {
    let (primary, standby) = pair();
    // Equal weights: pgpool-II's default.
    let pgpool = PgPool::start(&primary, &standby, &[]).unwrap_or_else(|e| panic!("{e}"));
    let url = pgpool.url("hr_app", "hr");
    for scope in [ContextScope::Transaction, ContextScope::Session] {
        let pool = pool(&url, scope, 4);
        // Hold four connections at once, so that both balancing nodes are likely among
        // them; each is refused whatever its node.
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(pool.get().await.unwrap());
        }
        for c in &held {
            assert!(c.behind_proxy() && c.behind_pgpool());
            // Plain: no context, so no rows.
            assert_eq!(seen(c).await.unwrap().rows, None);
        }
        drop(held);
        for who in [alice(), bob()] {
            for _ in 0..4 {
                let e = pool.acquire_as(&who).await.map(|_| ()).unwrap_err();
                let text = e.to_string();
                assert!(
                    matches!(
                        mapping_error(&e),
                        Some(MappingError::ContextRoutedApart { why }) if why.contains("function lists are empty")
                    ),
                    "{text}"
                );
                assert!(
                    text.contains("write_function_list naming set_config"),
                    "{text}"
                );
            }
        }
    }
}

/// Why the refusal above is needed, shown on pgpool-II's own routing with all reads
/// weighted to the standby: in one session, the SELECT of set_config (what a context
/// statement is) runs on the primary, and the plain read after it on the standby, where
/// the setting does not exist. The pool refuses contexts there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgpool_sends_set_config_and_the_next_read_to_different_servers() {
    let (primary, standby) = pair();
    let pgpool = PgPool::start(
        &primary,
        &standby,
        &[("backend_weight0", "0"), ("backend_weight1", "1")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let url = pgpool.url("hr_app", "hr");
    let (raw, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let set = raw
        .query_one(
            "SELECT pg_catalog.set_config('ctxpool.end_user', 'alice', false), \
             pg_catalog.inet_server_port()",
            &[],
        )
        .await
        .unwrap();
    let read = raw
        .query_one(
            "SELECT pg_catalog.current_setting('ctxpool.end_user', true), \
             pg_catalog.inet_server_port()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(set.get::<_, i32>(1), i32::from(primary.port()));
    assert_eq!(read.get::<_, i32>(1), i32::from(standby.port()));
    // Even session-wide, the setting is not where the read ran.
    assert_eq!(read.get::<_, Option<String>>(0), None);
    drop(raw);
    let _ = conn.await;

    let refused = pool(&url, ContextScope::Transaction, 2);
    let e = refused.acquire_as(&alice()).await.map(|_| ()).unwrap_err();
    assert!(
        matches!(
            mapping_error(&e),
            Some(MappingError::ContextRoutedApart { .. })
        ),
        "{e}"
    );
    drop(refused);
    drop(pgpool);

    // Without pgpool-II's catalog look-ups, but balancing with its default
    // disable_load_balance_on_write: refused for the routing.
    let mut settings = NO_LOOKUPS.to_vec();
    settings.extend([("backend_weight0", "0"), ("backend_weight1", "1")]);
    let pgpool = PgPool::start(&primary, &standby, &settings).unwrap_or_else(|e| panic!("{e}"));
    let pool = pool(&pgpool.url("hr_app", "hr"), ContextScope::Transaction, 2);
    let e = pool.acquire_as(&alice()).await.map(|_| ()).unwrap_err();
    assert!(
        matches!(
            mapping_error(&e),
            Some(MappingError::ContextRoutedApart { why }) if why.contains("disable_load_balance_on_write")
        ),
        "{e}"
    );
}

/// The settings that keep pgpool-II from sending catalog queries of its own between the
/// client's statements (the README's "Behind poolers and replicas").
const NO_LOOKUPS: [(&str, &str); 3] = [
    (
        "write_function_list",
        "'nextval,setval,set_config,pg_catalog.set_config'",
    ),
    ("check_temp_table", "none"),
    ("check_unlogged_table", "off"),
];

/// Functions a request calls besides [`SEEN_SQL`]'s, one each, so that pgpool-II meets
/// names it has not seen before during the run.
const FRESH_FUNCTIONS: [&str; 12] = [
    "upper",
    "lower",
    "md5",
    "btrim",
    "initcap",
    "reverse",
    "ltrim",
    "rtrim",
    "quote_ident",
    "quote_literal",
    "length",
    "char_length",
];

/// The documented settings: no catalog look-ups of pgpool-II's own ([`NO_LOOKUPS`]), and
/// disable_load_balance_on_write = 'always' or load balancing off. Reads are weighted to
/// the standby, so a plain read goes there; every request under a context runs on the
/// primary with its own end user and rows, from 16 tasks interleaving two identities and
/// plain requests, each request calling a function pgpool-II may not have met yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgpool_with_the_documented_settings_keeps_each_context_with_its_statement() {
    let (primary, standby) = pair();
    let weights = [("backend_weight0", "0"), ("backend_weight1", "1")];
    for setting in [
        ("disable_load_balance_on_write", "'always'"),
        ("load_balance_mode", "off"),
    ] {
        let mut settings = weights.to_vec();
        settings.extend(NO_LOOKUPS);
        settings.push(setting);
        let pgpool = PgPool::start(&primary, &standby, &settings).unwrap_or_else(|e| panic!("{e}"));
        let pool = pool(&pgpool.url("hr_app", "hr"), ContextScope::Transaction, 4);
        let plain = seen(&pool.get().await.unwrap()).await.unwrap();
        let balanced = setting.0 == "disable_load_balance_on_write";
        // With balancing on, a plain read (no write before it) goes to the standby.
        let plain_port = if balanced {
            standby.port()
        } else {
            primary.port()
        };
        assert_eq!(plain.port, i32::from(plain_port), "{setting:?}");
        let wrong = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for t in 0..16usize {
            let (pool, wrong) = (pool.clone(), wrong.clone());
            let primary_port = i32::from(primary.port());
            tasks.push(tokio::spawn(async move {
                let askers = [alice_asks(), bob_asks(), plain_asks()];
                for i in 0..20usize {
                    let asker = &askers[(t + i) % 3];
                    let fresh = FRESH_FUNCTIONS[(t * 20 + i) % FRESH_FUNCTIONS.len()];
                    match request_calling(&pool, &asker.who, fresh).await {
                        Ok(s)
                            if asker.sees_own(&s)
                                && (asker.who.is_none()
                                    || (s.port == primary_port && !s.read_only)) => {}
                        other => wrong
                            .lock()
                            .unwrap()
                            .push(format!("task {t} request {i} {:?}: {other:?}", asker.user)),
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        {
            let wrong = wrong.lock().unwrap();
            assert!(
                wrong.is_empty(),
                "{setting:?}: {} wrong: {wrong:?}",
                wrong.len()
            );
        }
        // Accepted behind pgpool-II, not taken for something else.
        assert!(pool.acquire_as(&alice()).await.unwrap().behind_pgpool());
        drop(pool);
    }
}

/// A plain TCP forwarder (one server session per client connection) is no pooler: the
/// server sees the forwarder's port, and pgpool-II's `SHOW pool_status` is refused, so the
/// connection counts as direct and session scope stays available.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_forwarder_is_no_pooler() {
    let cluster = hr_cluster();
    let forwarder = ctxpool_testkit::FlightProxy::start(addr(&cluster), Duration::ZERO).unwrap();
    let url = format!("postgres://hr_app@{}/hr", forwarder.addr());
    let pool = pool(&url, ContextScope::Session, 1);
    let c = pool.acquire_as(&alice()).await.unwrap();
    assert!(!c.behind_proxy() && !c.behind_pgpool());
    assert!(alice_asks().sees_own(&seen(&c).await.unwrap()));
}

// ---- failover ---------------------------------------------------------------------------

/// One request's record in the failover run.
struct Record {
    phase: Phase,
    outcome: Result<Seen, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Sent before the primary was killed.
    Before,
    /// Sent after the kill, before the promotion completed.
    Switching,
    /// Sent after the promotion completed.
    After,
}

/// A pool on a multi-host URL with target_session_attrs=read-write, 16 tasks of two
/// identities under load; the primary is killed (immediate shutdown) and the standby
/// promoted. Every answer is checked against its requester: their own end user and rows,
/// from the primary of the moment (read-write). Errors are counted by kind, and each must
/// be one of the expected types. The pool recovers by itself: after the promotion, every
/// task gets 30 answers in a row. A task that failed waits for the promotion (no busy
/// loop while no primary exists); after it, a failure is retried at once, at most 200
/// times per task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_under_load_never_answers_under_a_wrong_or_missing_context() {
    let (primary, standby) = pair();
    let (p1, p2) = (primary.port(), standby.port());
    let url = format!(
        "postgres://hr_app@127.0.0.1:{p1},127.0.0.1:{p2}/hr?target_session_attrs=read-write&connect_timeout=5"
    );
    let pool = pool(&url, ContextScope::Transaction, 8);
    let primary = Arc::new(primary);
    let standby = Arc::new(standby);
    let phase = Arc::new(Mutex::new(Phase::Before));
    let (promoted_tx, promoted) = tokio::sync::watch::channel(false);
    let warmed = Arc::new(tokio::sync::Semaphore::new(0));
    let records = Arc::new(Mutex::new(Vec::<Record>::new()));
    let first_ok_after = Arc::new(Mutex::new(None::<Instant>));
    const TASKS: usize = 16;
    let run = async {
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let (pool, phase, records, warmed, first_ok_after) = (
                pool.clone(),
                phase.clone(),
                records.clone(),
                warmed.clone(),
                first_ok_after.clone(),
            );
            let mut promoted = promoted.clone();
            tasks.push(tokio::spawn(async move {
                let askers = [alice_asks(), bob_asks()];
                let (mut i, mut ok_after, mut failures_after) = (0usize, 0usize, 0usize);
                while ok_after < 30 {
                    i += 1;
                    let asker = &askers[(t + i) % 2];
                    let sent = *phase.lock().unwrap();
                    let outcome = request(&pool, &asker.who).await;
                    let failed = outcome.is_err();
                    let outcome = outcome.map_err(|f| kind(&f));
                    if let Ok(s) = &outcome {
                        assert!(asker.sees_own(s), "task {t} as {:?} saw {s:?}", asker.user);
                    }
                    records.lock().unwrap().push(Record {
                        phase: sent,
                        outcome,
                    });
                    if i == 10 {
                        warmed.add_permits(1);
                    }
                    if sent == Phase::After {
                        if failed {
                            ok_after = 0;
                            failures_after += 1;
                            assert!(failures_after < 200, "task {t}: the pool did not recover");
                        } else {
                            ok_after += 1;
                            first_ok_after
                                .lock()
                                .unwrap()
                                .get_or_insert_with(Instant::now);
                        }
                    } else if failed {
                        // No primary until the promotion: wait for it.
                        let _ = promoted.wait_for(|p| *p).await;
                    }
                }
            }));
        }
        // Kill the primary once every task has made ten requests.
        let _ = warmed.acquire_many(TASKS as u32).await.unwrap();
        *phase.lock().unwrap() = Phase::Switching;
        let killed_at = Instant::now();
        let p = primary.clone();
        tokio::task::spawn_blocking(move || p.kill().unwrap())
            .await
            .unwrap();
        let s = standby.clone();
        tokio::task::spawn_blocking(move || s.promote().unwrap())
            .await
            .unwrap();
        let promoted_at = Instant::now();
        *phase.lock().unwrap() = Phase::After;
        promoted_tx.send(true).unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        (killed_at, promoted_at)
    };
    let (killed_at, promoted_at) = tokio::time::timeout(SCENARIO_LIMIT, run)
        .await
        .expect("the failover scenario did not finish: the pool did not recover");
    let recovered_at = first_ok_after
        .lock()
        .unwrap()
        .expect("no answer after the promotion");

    let records = records.lock().unwrap();
    let mut answers: BTreeMap<(Phase, i32), usize> = BTreeMap::new();
    let mut errors: BTreeMap<(Phase, String), usize> = BTreeMap::new();
    for r in records.iter() {
        match &r.outcome {
            Ok(s) => {
                // Every answer from the primary of its moment, in a read-write session.
                assert!(!s.read_only, "{s:?}");
                *answers.entry((r.phase, s.port)).or_default() += 1;
            }
            Err(k) => *errors.entry((r.phase, k.clone())).or_default() += 1,
        }
    }
    let (old, new) = (i32::from(p1), i32::from(p2));
    eprintln!("failover: {} requests", records.len());
    for ((phase, port), n) in &answers {
        let server = if *port == old {
            "old primary"
        } else {
            "new primary"
        };
        eprintln!("  {phase:?}: {n} right answers from the {server}");
    }
    for ((phase, k), n) in &errors {
        eprintln!("  {phase:?}: {n} errors: {k}");
    }
    eprintln!(
        "  kill to promotion done: {:?}; promotion done to first answer: {:?}; kill to first answer: {:?}",
        promoted_at - killed_at,
        recovered_at.saturating_duration_since(promoted_at),
        recovered_at - killed_at
    );
    // Before the kill, only the old primary answered; after the promotion, only the new.
    assert!(answers.keys().all(|(ph, port)| match ph {
        Phase::Before => *port == old,
        Phase::After => *port == new,
        Phase::Switching => true,
    }));
    assert!(answers.keys().any(|(ph, _)| *ph == Phase::Before));
    // Every error is a typed failure of the switch, nothing else.
    let expected_kinds = [
        "connect refused",
        "no read-write host (target_session_attrs)",
        "connect: connection closed",
        "connect: SQLSTATE 57P01",
        "connect: SQLSTATE 57P03",
        "connect: connection lost",
        "statement: connection closed",
        "statement: connection lost",
        "statement: SQLSTATE 57P01",
        "statement: SQLSTATE 57P02",
    ];
    for (_, k) in errors.keys() {
        assert!(
            expected_kinds.contains(&k.as_str()),
            "unexpected error kind: {k}"
        );
    }
    let status = pool.status();
    assert_eq!(status.available, status.size);
}

// ---- read replicas ----------------------------------------------------------------------

/// A pool on the standby: target_session_attrs=read-only on a multi-host URL that also
/// names the primary (tokio-postgres 0.7 knows any, read-write and read-only; not
/// prefer-standby). Contexts apply there in both scopes (transaction-local and
/// session-wide settings work on a hot standby), RLS isolates 8 concurrent tasks of two
/// identities, and a write fails with SQLSTATE 25006 without harming the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_on_a_read_replica_applies_contexts_and_refuses_writes() {
    let (primary, standby) = pair();
    let url = format!(
        "postgres://hr_app@127.0.0.1:{},127.0.0.1:{}/hr?target_session_attrs=read-only",
        primary.port(),
        standby.port()
    );
    let prefer = url.replace("read-only", "prefer-standby");
    assert!(
        prefer.parse::<tokio_postgres::Config>().is_err(),
        "tokio-postgres now parses prefer-standby: update the README"
    );
    // A change on the primary reaches the replica's answers.
    primary
        .psql("hr", "UPDATE hr.employees SET name = 'Alan' WHERE id = 3")
        .unwrap();
    primary
        .wait_replayed(&standby, Duration::from_secs(20))
        .unwrap();
    for scope in [ContextScope::Transaction, ContextScope::Session] {
        let pool = pool(&url, scope, 4);
        let c = pool.get().await.unwrap();
        assert!(!c.behind_proxy());
        let s = seen(&c).await.unwrap();
        assert!(s.read_only && s.port == i32::from(standby.port()), "{s:?}");
        assert_eq!(c.parameter_status("in_hot_standby").as_deref(), Some("on"));
        drop(c);
        let wrong = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for t in 0..8usize {
            let (pool, wrong) = (pool.clone(), wrong.clone());
            tasks.push(tokio::spawn(async move {
                let askers = [alice_asks(), bob_asks(), plain_asks()];
                for i in 0..25usize {
                    let asker = &askers[(t + i) % 3];
                    match request(&pool, &asker.who).await {
                        Ok(s) if asker.sees_own(&s) && s.read_only => {}
                        other => wrong
                            .lock()
                            .unwrap()
                            .push(format!("{:?}: {other:?}", asker.user)),
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        {
            let wrong = wrong.lock().unwrap();
            assert!(
                wrong.is_empty(),
                "{scope:?}: {} wrong: {wrong:?}",
                wrong.len()
            );
        }

        // A write under bob's context (a manager may raise salaries on the primary).
        let c = pool.acquire_as(&bob()).await.unwrap();
        let e = c
            .execute(
                "UPDATE hr.employees SET salary = salary + 1 WHERE id = 4",
                &[],
            )
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION),
            "{e:?}"
        );
        // The same handle goes on under its context, and the next checkout under its own.
        assert!(bob_asks().sees_own(&seen(&c).await.unwrap()));
        drop(c);
        let c = pool.acquire_as(&alice()).await.unwrap();
        assert!(alice_asks().sees_own(&seen(&c).await.unwrap()));
    }
}
