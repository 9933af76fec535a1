//! The throwaway PostgreSQL cluster and PgBouncer harness (`ctxpool_testkit::PgCluster`).
//!
//! Needs PostgreSQL and PgBouncer installed (`apt-get install -y postgresql pgbouncer`);
//! without them the test fails, saying so.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ctxpool_testkit::{ClusterError, PgBouncer, PgCluster};

/// Starts a cluster or fails the test with the harness's message (which names the
/// install command when PostgreSQL is missing).
fn start_cluster() -> PgCluster {
    let started = Instant::now();
    match PgCluster::start() {
        Ok(cluster) => {
            eprintln!(
                "cluster on port {} started in {:?}",
                cluster.port(),
                started.elapsed()
            );
            cluster
        }
        Err(e) => panic!("cannot start a throwaway PostgreSQL cluster: {e}"),
    }
}

/// Runs `psql` against `url` directly, as a client would.
fn psql_url(url: &str, sql: &str) -> String {
    let output = Command::new("psql")
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", url, "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap_or_else(|e| panic!("cannot run psql (apt-get install -y postgresql): {e}"));
    assert!(
        output.status.success(),
        "psql {url} -c {sql:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn cluster_survives_restart_and_serves_through_pgbouncer() {
    let cluster = start_cluster();
    assert_eq!(cluster.host(), "127.0.0.1");
    assert_eq!(cluster.superuser(), "postgres");
    assert_eq!(
        cluster.url("alice", "app"),
        format!("postgres://alice@127.0.0.1:{}/app", cluster.port())
    );

    assert_eq!(cluster.psql("postgres", "select 1").unwrap(), "1\n");
    cluster
        .psql(
            "postgres",
            "create table t (id int primary key, name text);
             insert into t values (1, 'one'), (2, 'two');",
        )
        .unwrap();
    assert_eq!(
        cluster
            .psql("postgres", "select id, name from t order by id")
            .unwrap(),
        "1|one\n2|two\n"
    );

    // A failing statement is an error that carries psql's message.
    match cluster.psql("postgres", "select * from missing_table") {
        Err(ClusterError::Command { stderr, .. }) => {
            assert!(stderr.contains("missing_table"), "{stderr}")
        }
        other => panic!("expected a psql failure, got {other:?}"),
    }

    // Restart keeps the port and the data.
    let port = cluster.port();
    cluster.restart().unwrap();
    assert_eq!(cluster.port(), port);
    assert_eq!(
        cluster.psql("postgres", "select count(*) from t").unwrap(),
        "2\n"
    );

    // Stop, then resume.
    cluster.stop().unwrap();
    assert!(cluster.psql("postgres", "select 1").is_err());
    cluster.resume().unwrap();
    assert_eq!(
        cluster
            .psql("postgres", "select name from t where id = 2")
            .unwrap(),
        "two\n"
    );

    // The superuser and another login role through PgBouncer in transaction mode.
    cluster
        .psql(
            "postgres",
            "create role app_user login; grant select on t to app_user;",
        )
        .unwrap();
    let bouncer = PgBouncer::start(&cluster, "transaction", 4).unwrap();
    assert_ne!(bouncer.port(), cluster.port());
    assert_eq!(
        psql_url(&bouncer.url("postgres", "postgres"), "select 2"),
        "2\n"
    );
    assert_eq!(
        psql_url(
            &bouncer.url("app_user", "postgres"),
            "select current_user, count(*) from t"
        ),
        "app_user|2\n"
    );
    // Directly, too.
    assert_eq!(
        psql_url(&cluster.url("app_user", "postgres"), "select 3"),
        "3\n"
    );

    drop(bouncer);
    drop(cluster);
}

#[test]
fn unknown_pool_mode_is_rejected() {
    let cluster = start_cluster();
    match PgBouncer::start(&cluster, "sometimes", 4) {
        Err(ClusterError::InvalidArgument(msg)) => assert!(msg.contains("sometimes"), "{msg}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

// ---- nothing outlives a killed test process ------------------------------------------

/// Set in the child process of the leak tests: the test then starts a cluster and a
/// PgBouncer, reports them on standard output, and waits to be killed.
const LEAK_CHILD_ENV: &str = "CTXPOOL_PG_CLUSTER_LEAK_CHILD";
/// The marker of the child's report line.
const LEAK_REPORT: &str = "ctxpool-leak-report\t";
/// How long the servers may take to go away once the child is dead.
const CLEANUP_DEADLINE: Duration = Duration::from_secs(60);

/// What the child started: the temporary directories and the server pids.
#[derive(Debug)]
struct Started {
    pg_dir: PathBuf,
    postmaster: u32,
    bouncer_dir: PathBuf,
    bouncer: u32,
}

/// How the parent ends the child.
#[derive(Debug, Clone, Copy)]
enum Death {
    /// `SIGKILL` to the child alone (`kill -9`, the OOM killer).
    Kill,
    /// `SIGINT` to the child's whole process group, as a terminal's Ctrl-C does to the
    /// foreground process group of `cargo test` (PgBouncer, its child, is in it too).
    CtrlC,
}

#[test]
fn killing_the_test_process_does_not_leave_postgresql_running() {
    if std::env::var_os(LEAK_CHILD_ENV).is_some() {
        leak_child();
    } else {
        kill_child_and_check_cleanup(
            "killing_the_test_process_does_not_leave_postgresql_running",
            Death::Kill,
        );
    }
}

#[test]
fn interrupting_the_test_run_does_not_leave_postgresql_running() {
    if std::env::var_os(LEAK_CHILD_ENV).is_some() {
        leak_child();
    } else {
        kill_child_and_check_cleanup(
            "interrupting_the_test_run_does_not_leave_postgresql_running",
            Death::CtrlC,
        );
    }
}

/// The child: starts a cluster and a PgBouncer, reports them, and sleeps (if nobody kills
/// it, it drops them normally after a while).
fn leak_child() {
    let cluster = start_cluster();
    let bouncer = PgBouncer::start(&cluster, "session", 2).unwrap();
    let data = PathBuf::from(
        cluster
            .psql("postgres", "show data_directory")
            .unwrap()
            .trim(),
    );
    let postmaster = first_pid(&data.join("postmaster.pid"));
    let config = psql_url(&bouncer.url("postgres", "pgbouncer"), "show config");
    let pidfile = config
        .lines()
        .find_map(|l| l.strip_prefix("pidfile|"))
        .and_then(|rest| rest.split('|').next())
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no pidfile in PgBouncer's config:\n{config}"));
    let bouncer_pid = first_pid(&pidfile);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{LEAK_REPORT}{}\t{postmaster}\t{}\t{bouncer_pid}",
        data.parent().unwrap().display(),
        pidfile.parent().unwrap().display(),
    )
    .unwrap();
    out.flush().unwrap();
    drop(out);
    std::thread::sleep(Duration::from_secs(120));
    drop(bouncer);
    drop(cluster);
}

/// Runs this very test in a child process (the env var makes it [`leak_child`]), ends it
/// as `death` says, so that no `Drop` runs, and waits, within a deadline, until the
/// servers are gone and their directories removed.
fn kill_child_and_check_cleanup(test_name: &str, death: Death) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(LEAK_CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Death::CtrlC = death {
        // A process group of its own that plays the terminal's foreground group.
        cmd.process_group(0);
    }
    let mut child = cmd.spawn().unwrap();
    let report = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        // After libtest's `test <name> ... ` on the same line.
        .find_map(|line| {
            line.split_once(LEAK_REPORT)
                .map(|(_, report)| report.to_owned())
        });
    let Some(report) = report else {
        let status = child.wait().unwrap();
        panic!("the child exited ({status}) without reporting what it started");
    };
    let fields: Vec<&str> = report.split('\t').collect();
    assert_eq!(fields.len(), 4, "{report}");
    let started = Started {
        pg_dir: PathBuf::from(fields[0]),
        postmaster: fields[1].parse().unwrap(),
        bouncer_dir: PathBuf::from(fields[2]),
        bouncer: fields[3].parse().unwrap(),
    };
    assert!(started.pg_dir.is_dir(), "{started:?}");
    assert!(started.bouncer_dir.is_dir(), "{started:?}");
    assert!(alive(started.postmaster), "{started:?}");
    assert!(alive(started.bouncer), "{started:?}");

    let expected_signal = match death {
        Death::Kill => {
            child.kill().unwrap();
            9
        }
        Death::CtrlC => {
            let group = format!("-{}", child.id());
            let status = Command::new("kill")
                .args(["-INT", "--", &group])
                .status()
                .unwrap();
            assert!(status.success(), "kill -INT -- {group}: {status}");
            2
        }
    };
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(expected_signal), "{status}");

    let started_at = Instant::now();
    loop {
        let left = leftovers(&started);
        if left.is_empty() {
            eprintln!(
                "{death:?}: everything cleaned up {:?} after the child died",
                started_at.elapsed()
            );
            return;
        }
        if started_at.elapsed() > CLEANUP_DEADLINE {
            // Do not leak ourselves.
            for pid in [started.postmaster, started.bouncer] {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            let _ = std::fs::remove_dir_all(&started.pg_dir);
            let _ = std::fs::remove_dir_all(&started.bouncer_dir);
            panic!("{death:?}: still there {CLEANUP_DEADLINE:?} after the child died: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What of `started` is still there.
fn leftovers(started: &Started) -> Vec<String> {
    let mut left = Vec::new();
    if alive(started.postmaster) {
        left.push(format!("postmaster {}", started.postmaster));
    }
    if alive(started.bouncer) {
        left.push(format!("pgbouncer {}", started.bouncer));
    }
    for dir in [&started.pg_dir, &started.bouncer_dir] {
        if dir.exists() {
            left.push(dir.display().to_string());
        }
    }
    left
}

/// Whether process `pid` exists and is not a zombie (an orphan's zombie is reaped by
/// init, or by no one in a container whose init does not reap).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// The pid on the first line of a pidfile.
fn first_pid(pidfile: &Path) -> u32 {
    let text = std::fs::read_to_string(pidfile)
        .unwrap_or_else(|e| panic!("reading {}: {e}", pidfile.display()));
    text.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {}: {text:?}", pidfile.display()))
}
