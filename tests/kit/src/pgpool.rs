//! A throwaway pgpool-II in front of a primary and a streaming standby.
//!
//! [`PgPool::start`] writes its own `pgpool.conf` into a temporary directory and runs
//! `pgpool -n` (no daemon) there, listening on a free port on `127.0.0.1`, in streaming
//! replication mode with the two [`PgCluster`]s as backends 0 (the primary) and 1 (the
//! standby), with load balancing on, and without the PCP port's clients, the watchdog,
//! health checks or failover: a pooler that routes statements, nothing more. The system
//! service of the Debian package is never used.
//!
//! pgpool-II must be installed; on Debian or Ubuntu: `apt-get install -y pgpool2`. A
//! missing program is [`ClusterError::NotInstalled`].
//!
//! pgpool-II allocates a System V shared memory segment, which only its own shutdown
//! removes: dropping a [`PgPool`] asks it for a fast shutdown (`SIGINT`) and kills its
//! process group only if it has not exited in time. If this process dies without dropping
//! it, a watchdog process does the same (see [`crate::PgCluster`]'s module docs).

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt;

use crate::pg_cluster::{
    ClusterError, HOST, PORT_ATTEMPTS, PgCluster, SUPERUSER, TempDir, Watchdog, find_program,
    free_port, port_taken, server_command, tail, write_file,
};

/// How long to wait for pgpool-II to find its primary and accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a fast shutdown may take before the process group is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The line that tells the watchdog to forget the pid it was given.
const FORGET_PID: &str = "-";

/// The settings every harness pgpool-II gets; [`PgPool::start`]'s own come after them and
/// replace those of the same name.
const BASE_SETTINGS: &[(&str, &str)] = &[
    ("backend_clustering_mode", "'streaming_replication'"),
    ("load_balance_mode", "on"),
    ("enable_pool_hba", "off"),
    ("pool_passwd", "''"),
    ("num_init_children", "16"),
    ("max_pool", "1"),
    ("reserved_connections", "0"),
    ("sr_check_period", "0"),
    ("sr_check_user", "'postgres'"),
    ("sr_check_password", "''"),
    ("health_check_period", "0"),
    ("health_check_user", "'postgres'"),
    ("failover_on_backend_error", "off"),
    ("use_watchdog", "off"),
    ("memory_cache_enabled", "off"),
    ("log_destination", "'stderr'"),
    ("search_primary_node_timeout", "20"),
];

/// A pgpool-II in front of a primary and a standby, in a temporary directory.
///
/// Backend 0 is the primary and backend 1 the standby, with equal weights unless the
/// settings say otherwise (`backend_weight0`, `backend_weight1`). Clients are not
/// authenticated by pgpool-II (`enable_pool_hba = off`); the backends trust loopback
/// connections. Drop it before the clusters.
#[derive(Debug)]
pub struct PgPool {
    port: u16,
    child: Child,
    psql: std::path::PathBuf,
    // After `child`, so that it is removed after `Drop::drop` stopped the process.
    dir: TempDir,
    // Last: once the process is gone and the directory removed, its cleanup is a no-op.
    watchdog: Option<Watchdog>,
}

impl PgPool {
    /// Starts pgpool-II with `primary` and `standby` as its backends and `settings`
    /// (name, value as written in `pgpool.conf`, e.g. `("disable_load_balance_on_write",
    /// "'always'")`) over the harness's own; returns once it accepts connections and
    /// reports a primary and both backends up.
    ///
    /// # Errors
    /// [`ClusterError::NotInstalled`] if pgpool-II is missing,
    /// [`ClusterError::Command`] if it exits during startup,
    /// [`ClusterError::NotReady`] if it is not ready within 20 s.
    pub fn start(
        primary: &PgCluster,
        standby: &PgCluster,
        settings: &[(&str, &str)],
    ) -> Result<PgPool, ClusterError> {
        let program =
            find_program("pgpool", &[Path::new("/usr/sbin/pgpool")]).map_err(|e| match e {
                ClusterError::NotInstalled { hint, .. } => {
                    ClusterError::PgpoolNotInstalled { hint }
                }
                other => other,
            })?;
        let run_as = primary.run_as;
        let mut dir = TempDir::create("ctxpool-pgpool", run_as)?;
        let mut watchdog = Some(Watchdog::spawn(
            "pgpool-II",
            PGPOOL_WATCHDOG,
            &[dir.path.as_os_str()],
            run_as,
        )?);
        let conf = dir.path.join("pgpool.conf");
        let pcp = dir.path.join("pcp.conf");
        let log = dir.path.join("pgpool.log");
        write_file(&pcp, "", run_as)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port()?;
            let pcp_port = free_port()?;
            let text = config_text(&dir.path, port, pcp_port, primary, standby, settings);
            write_file(&conf, &text, run_as)?;
            let out = fs::File::create(&log)
                .map_err(|e| ClusterError::io(format!("creating {}", log.display()), e))?;
            let err = out
                .try_clone()
                .map_err(|e| ClusterError::io("duplicating a file handle", e))?;
            let mut cmd = server_command(&program, &dir.path, run_as);
            // -n: in the foreground; -D: no status file of an earlier run.
            cmd.args(["-n", "-D", "-f"])
                .arg(&conf)
                .arg("-F")
                .arg(&pcp)
                .stdout(out)
                .stderr(err)
                // A group of its own, so that its children can be killed with it.
                .process_group(0);
            let child = cmd
                .spawn()
                .map_err(|e| ClusterError::io("spawning pgpool", e))?;
            if let Some(watchdog) = &mut watchdog {
                watchdog.tell(&child.id().to_string());
            }
            let mut pgpool = PgPool {
                port,
                child,
                psql: primary.bin.psql.clone(),
                dir,
                watchdog: watchdog.take(),
            };
            match pgpool.wait_ready(&log) {
                Ok(()) => {
                    tracing::debug!(port, "pgpool-II started");
                    return Ok(pgpool);
                }
                Err(e) if attempt < PORT_ATTEMPTS && port_taken(&log, 0) => {
                    tracing::debug!(port, error = %e, "port taken; retrying");
                    // Keep the directory and the watchdog: take them back.
                    pgpool.stop();
                    dir = std::mem::replace(&mut pgpool.dir, TempDir::empty());
                    watchdog = pgpool.watchdog.take();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The port pgpool-II listens on (on `127.0.0.1`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL, `postgres://{user}@127.0.0.1:{port}/{dbname}`, without password.
    /// `user` and `dbname` are inserted verbatim, so they must not need percent-encoding.
    pub fn url(&self, user: &str, dbname: &str) -> String {
        format!("postgres://{user}@{HOST}:{}/{dbname}", self.port)
    }

    /// Runs `SHOW pool_nodes` through pgpool-II as the superuser and returns its rows,
    /// columns separated by `|` (node id, host, port, status, pg_status, weight, role, …).
    ///
    /// # Errors
    /// [`ClusterError::Command`] if psql fails.
    pub fn pool_nodes(&self) -> Result<Vec<String>, ClusterError> {
        let mut cmd = Command::new(&self.psql);
        cmd.args(["-X", "-q", "-At", "-h", HOST, "-p"])
            .arg(self.port.to_string())
            .args(["-U", SUPERUSER, "-d", "postgres", "-c", "SHOW pool_nodes"])
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::null());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") && key != "PGCONNECT_TIMEOUT" {
                cmd.env_remove(key);
            }
        }
        let output = cmd
            .output()
            .map_err(|e| ClusterError::io("running psql", e))?;
        if !output.status.success() {
            return Err(ClusterError::Command {
                program: "psql (SHOW pool_nodes)".to_owned(),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// Polls until pgpool-II reports a primary and every backend up, it exits, or the
    /// timeout passes.
    fn wait_ready(&mut self, log: &Path) -> Result<(), ClusterError> {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    return Err(ClusterError::Command {
                        program: "pgpool".to_owned(),
                        status,
                        stderr: tail(log),
                    });
                }
                Ok(None) => {}
                Err(e) => return Err(ClusterError::io("polling pgpool", e)),
            }
            if let Ok(rows) = self.pool_nodes() {
                let fields: Vec<Vec<&str>> = rows.iter().map(|r| r.split('|').collect()).collect();
                let up = fields.len() == 2 && fields.iter().all(|f| f.get(3) == Some(&"up"));
                let primary = fields.iter().any(|f| f.get(6) == Some(&"primary"));
                if up && primary {
                    return Ok(());
                }
            }
            if started.elapsed() >= READY_TIMEOUT {
                return Err(ClusterError::NotReady {
                    what: "pgpool",
                    waited: started.elapsed(),
                    log_tail: tail(log),
                });
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(100));
        }
    }

    /// Asks for a fast shutdown (`SIGINT`, after which pgpool-II removes its shared
    /// memory), kills the process group if it has not exited within [`STOP_TIMEOUT`],
    /// and reaps it. The watchdog forgets the pid before the reaping, after which the pid
    /// may be reused.
    fn stop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill")
            .args(["-INT", &pid])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let started = Instant::now();
        while !matches!(self.child.try_wait(), Ok(Some(_)) | Err(_)) {
            if started.elapsed() >= STOP_TIMEOUT {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(watchdog) = &mut self.watchdog {
            watchdog.tell(FORGET_PID);
        }
        let _ = self.child.wait();
    }
}

impl Drop for PgPool {
    fn drop(&mut self) {
        self.stop();
        // Then `self.dir` removes the directory, and `self.watchdog`, dropped last, finds
        // nothing left to clean up.
    }
}

/// The configuration file: the harness's settings, then `settings`, which replace those of
/// the same name.
fn config_text(
    dir: &Path,
    port: u16,
    pcp_port: u16,
    primary: &PgCluster,
    standby: &PgCluster,
    settings: &[(&str, &str)],
) -> String {
    let dir = dir.display().to_string().replace('\'', "''");
    let mut all: Vec<(String, String)> = BASE_SETTINGS
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    all.extend([
        ("listen_addresses".into(), format!("'{HOST}'")),
        ("port".into(), port.to_string()),
        ("unix_socket_directories".into(), format!("'{dir}'")),
        ("pcp_listen_addresses".into(), "''".into()),
        ("pcp_port".into(), pcp_port.to_string()),
        ("pcp_socket_dir".into(), format!("'{dir}'")),
        ("pid_file_name".into(), format!("'{dir}/pgpool.pid'")),
        ("logdir".into(), format!("'{dir}'")),
    ]);
    for (i, node) in [primary, standby].into_iter().enumerate() {
        all.extend([
            (format!("backend_hostname{i}"), format!("'{HOST}'")),
            (format!("backend_port{i}"), node.port().to_string()),
            (format!("backend_weight{i}"), "1".into()),
            (format!("backend_flag{i}"), "'DISALLOW_TO_FAILOVER'".into()),
        ]);
    }
    for (k, v) in settings {
        all.retain(|(name, _)| name != k);
        all.push(((*k).to_owned(), (*v).to_owned()));
    }
    let mut text = String::from("# Written by ctxpool's test harness.\n");
    for (k, v) in &all {
        text.push_str(&format!("{k} = {v}\n"));
    }
    text
}

/// The `sh` script of a pgpool-II watchdog; `$1` is the temporary directory. Each line on
/// standard input is the pid to stop, or [`FORGET_PID`]; after end-of-file it asks that
/// pid for a fast shutdown, kills its process group if it is still there after ten
/// seconds, and removes the directory.
const PGPOOL_WATCHDOG: &str = r#"trap '' HUP INT QUIT TERM
pid=
while IFS= read -r line || [ -n "$line" ]; do
  case $line in
    ''|*[!0-9]*) pid= ;;
    *) pid=$line ;;
  esac
  line=
done
if [ -n "$pid" ]; then
  kill -INT "$pid" 2>/dev/null
  tries=0
  while kill -0 "$pid" 2>/dev/null && [ "$tries" -lt 100 ]; do
    sleep 0.1
    tries=$((tries + 1))
  done
  kill -KILL -- "-$pid" 2>/dev/null
fi
rm -rf -- "$1" 2>/dev/null
"#;
