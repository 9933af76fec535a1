//! A throwaway PostgreSQL cluster and PgBouncer for tests and examples.
//!
//! [`PgCluster::start`] runs `initdb` into a fresh temporary directory and starts a server
//! that listens only on `127.0.0.1`, on a free port, with `trust` authentication and
//! durability switched off (`fsync`, `synchronous_commit` and `full_page_writes` are off):
//! it is fast and disposable, and dropping it stops the server and deletes everything.
//! [`PgBouncer::start`] puts a PgBouncer in front of such a cluster.
//!
//! Both need the PostgreSQL server and PgBouncer installed; on Debian or Ubuntu:
//! `apt-get install -y postgresql pgbouncer`. A missing program is reported as
//! [`ClusterError::NotInstalled`], whose message carries that command.
//!
//! PostgreSQL and PgBouncer refuse to run as root. When this process runs as root (as in
//! CI containers), the server programs run as the unprivileged OS user `postgres` (created
//! by the Debian package) and the temporary directories are handed to that user; `psql`
//! runs as the calling user.
//!
//! Everything here is synchronous (`std::process`); from async code, call it from
//! `tokio::task::spawn_blocking` or before the runtime starts.
//!
//! Nothing outlives this process, however it ends. A server started by `pg_ctl` runs in a
//! session of its own, so a process killed before it drops a [`PgCluster`] (`SIGKILL`, an
//! expired `timeout`, Ctrl-C during `cargo test`) would leave it running. So each
//! [`PgCluster`] and [`PgBouncer`] has a watchdog: a small `sh` process, in a process
//! group of its own (a Ctrl-C does not reach it) and deaf to `SIGHUP`, `SIGINT`,
//! `SIGQUIT` and `SIGTERM`, that waits for end-of-file on a pipe whose only writer is
//! this process. When this process exits, however it exits, the kernel closes that pipe;
//! the watchdog then stops the server (`pg_ctl stop -m immediate`, or `SIGKILL` for
//! PgBouncer) and deletes the temporary directory. Dropping the value cleans up first and
//! then closes the pipe, and waits for the watchdog, whose cleanup finds nothing left to
//! do. No process polls: the watchdog sleeps in `read` until the pipe closes.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The address both servers listen on.
pub(crate) const HOST: &str = "127.0.0.1";
/// The bootstrap superuser `initdb -U` creates.
pub(crate) const SUPERUSER: &str = "postgres";
/// The OS user the server programs run as when this process is root.
const SERVICE_USER: &str = "postgres";
/// How long `pg_ctl` waits for the server to start or stop, in seconds.
const PG_CTL_TIMEOUT_SECS: &str = "60";
/// How long to wait for PgBouncer to accept connections.
const BOUNCER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How many free ports to try when another process takes the chosen one first.
pub(crate) const PORT_ATTEMPTS: usize = 3;
/// How much of a log file an error quotes.
const LOG_TAIL_BYTES: u64 = 4096;

/// Errors of the throwaway cluster and PgBouncer harness.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// A required program is not installed.
    #[error(
        "`{program}` not found ({hint}); install PostgreSQL and PgBouncer with: \
         apt-get install -y postgresql pgbouncer"
    )]
    NotInstalled {
        /// The missing program.
        program: &'static str,
        /// Where it was looked for.
        hint: String,
    },
    /// pgpool-II is not installed.
    #[error("`pgpool` not found ({hint}); install pgpool-II with: apt-get install -y pgpool2")]
    PgpoolNotInstalled {
        /// Where it was looked for.
        hint: String,
    },
    /// This process runs as root, PostgreSQL refuses to, and the unprivileged OS user
    /// `postgres` to run it as does not exist.
    #[error(
        "running as root, which PostgreSQL refuses, and the OS user `postgres` to run the \
         server as was not found ({detail}); the Debian package creates it: \
         apt-get install -y postgresql"
    )]
    NoServiceUser {
        /// Why the lookup failed.
        detail: String,
    },
    /// An I/O operation of the harness itself failed.
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A program exited unsuccessfully.
    #[error("`{program}` failed ({status}):\n{stderr}")]
    Command {
        /// The program and its subcommand, e.g. `pg_ctl start`.
        program: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its standard error (and output), followed by the tail of the server log if
        /// there is one.
        stderr: String,
    },
    /// A server did not become ready in time.
    #[error("{what} not ready after {waited:?}; log tail:\n{log_tail}")]
    NotReady {
        /// The server that was waited for.
        what: &'static str,
        /// How long it was waited for.
        waited: Duration,
        /// The end of its log.
        log_tail: String,
    },
    /// An argument cannot be used (e.g. an unknown PgBouncer pool mode).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl ClusterError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        ClusterError::Io {
            context: context.into(),
            source,
        }
    }
}

// ---- the cluster ---------------------------------------------------------------------

/// A throwaway PostgreSQL cluster in a temporary directory.
///
/// It listens on `127.0.0.1` on a free port (see [`port`](Self::port)) and trusts every
/// local connection, so [`url`](Self::url) needs no password. Dropping it stops the server
/// (`pg_ctl stop -m immediate`) and deletes the directory; if this process dies without
/// dropping it, a watchdog process does the same (see the [module docs](self)).
#[derive(Debug)]
pub struct PgCluster {
    port: u16,
    data: PathBuf,
    log: PathBuf,
    pub(crate) bin: ServerBins,
    pub(crate) run_as: Option<RunAs>,
    // After the fields above, so that it is removed after `Drop::drop` stopped the server.
    dir: TempDir,
    // Last: once the server is stopped and the directory removed, its cleanup is a no-op.
    // Held for its `Drop` only.
    _watchdog: Watchdog,
}

impl PgCluster {
    /// A cluster not created yet: its temporary directory (named after `prefix`, owned by
    /// `run_as`) and the watchdog that stops a server there and deletes the directory if
    /// this process dies, spawned before anything runs in it so that nothing can outlive
    /// us. `what` names the server in the watchdog's messages.
    fn unstarted(
        what: &str,
        prefix: &str,
        run_as: Option<RunAs>,
    ) -> Result<PgCluster, ClusterError> {
        let bin = ServerBins::find()?;
        let dir = TempDir::create(prefix, run_as)?;
        let data = dir.path.join("data");
        let log = dir.path.join("postgres.log");
        let watchdog = Watchdog::spawn(
            what,
            CLUSTER_WATCHDOG,
            &[
                bin.pg_ctl.as_os_str(),
                data.as_os_str(),
                dir.path.as_os_str(),
            ],
            run_as,
        )?;
        Ok(PgCluster {
            port: 0,
            data,
            log,
            bin,
            run_as,
            dir,
            _watchdog: watchdog,
        })
    }

    /// Creates a cluster with `initdb` and starts it; returns once it accepts connections.
    ///
    /// # Errors
    /// [`ClusterError::NotInstalled`] if PostgreSQL is missing,
    /// [`ClusterError::NoServiceUser`] when running as root without a `postgres` OS user,
    /// [`ClusterError::Command`] if `initdb` or `pg_ctl start` fails.
    pub fn start() -> Result<PgCluster, ClusterError> {
        let started = Instant::now();
        let mut cluster = Self::unstarted("PostgreSQL", "ctxpool-pg", service_identity()?)?;
        cluster.initdb()?;
        cluster.write_hba()?;
        cluster.boot()?;
        tracing::debug!(
            port = cluster.port,
            dir = %cluster.dir.path.display(),
            elapsed = ?started.elapsed(),
            "PostgreSQL cluster started"
        );
        Ok(cluster)
    }

    /// Creates a streaming standby of `primary` and starts it; returns once it accepts
    /// (read-only) connections.
    ///
    /// The standby is a base backup of the primary (`pg_basebackup -X stream -R`, which
    /// writes `standby.signal` and a `primary_conninfo` pointing at the primary) in a
    /// temporary directory of its own, listening on its own free port on `127.0.0.1`. It
    /// runs as a hot standby: it answers read-only queries and replays the primary's
    /// changes as they stream in. [`promote`](Self::promote) turns it into a primary.
    /// Like any [`PgCluster`], dropping it stops it and deletes its directory.
    ///
    /// # Errors
    /// [`ClusterError::NotInstalled`] if `pg_basebackup` is missing,
    /// [`ClusterError::Command`] if the backup or the start fails.
    pub fn start_standby(primary: &PgCluster) -> Result<PgCluster, ClusterError> {
        let started = Instant::now();
        let run_as = primary.run_as;
        let mut standby = Self::unstarted("PostgreSQL standby", "ctxpool-pg-standby", run_as)?;
        let mut cmd = server_command(&standby.bin.pg_basebackup, &standby.dir.path, run_as);
        cmd.args(["-h", HOST, "-p"])
            .arg(primary.port.to_string())
            .args(["-U", SUPERUSER, "-D"])
            .arg(&standby.data)
            .args(["-X", "stream", "-R", "-c", "fast", "-w"]);
        run(cmd, "pg_basebackup".to_owned(), Some(&primary.log))?;
        // The backup carries the primary's ctxpool.conf; boot() writes the standby's own.
        standby.boot()?;
        tracing::debug!(
            port = standby.port,
            primary = primary.port,
            elapsed = ?started.elapsed(),
            "PostgreSQL standby started"
        );
        Ok(standby)
    }

    /// Promotes a standby to a primary (`pg_ctl promote -w`): returns once it accepts
    /// writes.
    ///
    /// # Errors
    /// [`ClusterError::Command`] if `pg_ctl` fails (e.g. the server is not a standby).
    pub fn promote(&self) -> Result<(), ClusterError> {
        self.pg_ctl("promote", &[], false)
    }

    /// Crashes the server: `pg_ctl stop -m immediate`, under which every server process
    /// quits at once, without a checkpoint, and clients see their connections drop.
    ///
    /// # Errors
    /// [`ClusterError::Command`] if `pg_ctl` fails (e.g. the server is not running).
    pub fn kill(&self) -> Result<(), ClusterError> {
        self.pg_ctl("stop", &["-m", "immediate"], false)
    }

    /// Waits until `standby` has replayed everything this primary wrote so far (polls
    /// the standby's replay position against this server's current WAL position).
    ///
    /// # Errors
    /// [`ClusterError::NotReady`] if it has not within `timeout`,
    /// [`ClusterError::Command`] if a query fails.
    pub fn wait_replayed(
        &self,
        standby: &PgCluster,
        timeout: Duration,
    ) -> Result<(), ClusterError> {
        let target = self.psql("postgres", "SELECT pg_catalog.pg_current_wal_lsn()")?;
        let target = target.trim().replace('\'', "");
        let check =
            format!("SELECT pg_catalog.pg_last_wal_replay_lsn() >= '{target}'::pg_catalog.pg_lsn");
        let started = Instant::now();
        let mut backoff = Duration::from_millis(5);
        loop {
            if standby.psql("postgres", &check)?.trim() == "t" {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                return Err(ClusterError::NotReady {
                    what: "standby replay",
                    waited: started.elapsed(),
                    log_tail: tail(&standby.log),
                });
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(100));
        }
    }

    /// Picks a free port, writes the configuration and starts the server, trying another
    /// port when the chosen one was taken meanwhile.
    fn boot(&mut self) -> Result<(), ClusterError> {
        let cluster = self;
        let mut attempt = 0;
        loop {
            attempt += 1;
            cluster.port = free_port()?;
            cluster.write_conf()?;
            let log_start = file_len(&cluster.log);
            match cluster.pg_ctl("start", &["-l"], true) {
                Ok(()) => break,
                Err(e) if attempt < PORT_ATTEMPTS && port_taken(&cluster.log, log_start) => {
                    tracing::debug!(port = cluster.port, error = %e, "port taken; retrying");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The port the server listens on (on [`host`](Self::host)).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address the server listens on: `127.0.0.1`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// The bootstrap superuser `initdb` created: `postgres`.
    pub fn superuser(&self) -> &str {
        SUPERUSER
    }

    /// A connection URL, `postgres://{user}@127.0.0.1:{port}/{dbname}`, without password
    /// (the cluster trusts local connections). `user` and `dbname` are inserted verbatim,
    /// so they must not need percent-encoding.
    pub fn url(&self, user: &str, dbname: &str) -> String {
        format!("postgres://{user}@{HOST}:{}/{dbname}", self.port)
    }

    /// Restarts the server (`pg_ctl restart -m fast`) on the same port, terminating every
    /// session; returns once it accepts connections again.
    ///
    /// # Errors
    /// [`ClusterError::Command`] if `pg_ctl` fails.
    pub fn restart(&self) -> Result<(), ClusterError> {
        self.pg_ctl("restart", &["-m", "fast", "-l"], true)
    }

    /// Stops the server (`pg_ctl stop -m fast`), terminating every session; start it again
    /// with [`resume`](Self::resume).
    ///
    /// # Errors
    /// [`ClusterError::Command`] if `pg_ctl` fails (e.g. the server is not running).
    pub fn stop(&self) -> Result<(), ClusterError> {
        self.pg_ctl("stop", &["-m", "fast"], false)
    }

    /// Starts the server again after [`stop`](Self::stop), on the same port; returns once
    /// it accepts connections.
    ///
    /// # Errors
    /// [`ClusterError::Command`] if `pg_ctl` fails (e.g. the server is already running).
    pub fn resume(&self) -> Result<(), ClusterError> {
        self.pg_ctl("start", &["-l"], true)
    }

    /// Starts the server again after [`stop`](Self::stop), on the same port, with every
    /// server process run under `wrapper`: the command and its arguments, to which the
    /// `postgres` executable and its own arguments are appended (for example
    /// `["valgrind", "--tool=callgrind", "--callgrind-out-file=…/callgrind.%p"]`; the
    /// backends are forked, so a tool that follows forks sees each of them). Returns once
    /// the server accepts connections, which under such a tool takes a while.
    ///
    /// # Errors
    /// [`ClusterError::Io`] if the wrapper script cannot be written,
    /// [`ClusterError::Command`] if `pg_ctl` fails.
    pub fn resume_wrapped(&self, wrapper: &[&str]) -> Result<(), ClusterError> {
        let postgres = self.bin.pg_ctl.with_file_name("postgres");
        let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let mut script = String::from("#!/bin/sh\n# Written by ctxpool's test harness.\nexec");
        for word in wrapper
            .iter()
            .copied()
            .chain([postgres.to_string_lossy().as_ref()])
        {
            script.push(' ');
            script.push_str(&quote(word));
        }
        script.push_str(" \"$@\"\n");
        let path = self.dir.path.join("postgres-wrapped");
        write_file(&path, &script, self.run_as)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .map_err(|e| ClusterError::io(format!("chmod {}", path.display()), e))?;
        let path = path.to_string_lossy().into_owned();
        self.pg_ctl("start", &["-p", &path, "-l"], true)
    }

    /// The cluster's temporary directory (its data directory is `data` inside it); the
    /// server's OS user may write there.
    pub fn dir(&self) -> &Path {
        &self.dir.path
    }

    /// Runs the script `sql` in database `dbname` as the superuser, with
    /// `psql -X -q -At -v ON_ERROR_STOP=1`, and returns its standard output: one line per
    /// row, columns separated by `|`, no headers or command tags. The script is sent on
    /// standard input, so it may hold several statements (each runs in its own transaction
    /// unless it says otherwise) and `psql` meta-commands.
    ///
    /// # Errors
    /// [`ClusterError::Command`], whose `stderr` holds psql's, if a statement fails.
    pub fn psql(&self, dbname: &str, sql: &str) -> Result<String, ClusterError> {
        let mut cmd = Command::new(&self.bin.psql);
        clear_pg_env(&mut cmd);
        cmd.args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", HOST, "-p"])
            .arg(self.port.to_string())
            .args(["-U", SUPERUSER, "-d", dbname, "-f", "-"])
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| ClusterError::io("spawning psql", e))?;
        let writer = child.stdin.take().map(|mut stdin| {
            let script = sql.to_owned();
            // A thread, so that a large script cannot deadlock against a full stdout pipe.
            // A write error means psql exited early; its status and stderr tell why.
            std::thread::spawn(move || {
                let _ = stdin.write_all(script.as_bytes());
            })
        });
        let output = child
            .wait_with_output()
            .map_err(|e| ClusterError::io("waiting for psql", e))?;
        if let Some(writer) = writer {
            let _ = writer.join();
        }
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(ClusterError::Command {
                program: "psql".to_owned(),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            })
        }
    }

    /// Runs `initdb`, with `--locale=C.UTF-8`, falling back to `--locale=C`.
    fn initdb(&self) -> Result<(), ClusterError> {
        let mut last = None;
        for locale in ["--locale=C.UTF-8", "--locale=C"] {
            if self.data.exists() {
                fs::remove_dir_all(&self.data)
                    .map_err(|e| ClusterError::io("removing a failed initdb's data", e))?;
            }
            let mut cmd = server_command(&self.bin.initdb, &self.dir.path, self.run_as);
            cmd.arg("-D").arg(&self.data).args([
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                locale,
                "-N",
            ]);
            match run(cmd, "initdb".to_owned(), None) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::debug!(locale, error = %e, "initdb failed");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| ClusterError::InvalidArgument("no locale to try".into())))
    }

    fn write_hba(&self) -> Result<(), ClusterError> {
        let hba = "# Written by ctxpool's test harness: trust local connections only.\n\
                   local all all trust\n\
                   host all all 127.0.0.1/32 trust\n\
                   local replication all trust\n\
                   host replication all 127.0.0.1/32 trust\n";
        write_file(&self.data.join("pg_hba.conf"), hba, self.run_as)
    }

    /// Writes the harness settings to `ctxpool.conf` and includes it from
    /// `postgresql.conf` (once).
    fn write_conf(&self) -> Result<(), ClusterError> {
        let socket_dir = self.dir.path.display().to_string().replace('\'', "''");
        let conf = format!(
            "# Written by ctxpool's test harness.\n\
             listen_addresses = '{HOST}'\n\
             port = {port}\n\
             unix_socket_directories = '{socket_dir}'\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             max_connections = 200\n\
             shared_buffers = 32MB\n\
             logging_collector = off\n",
            port = self.port,
        );
        write_file(&self.data.join("ctxpool.conf"), &conf, self.run_as)?;
        let main = self.data.join("postgresql.conf");
        let include = "include 'ctxpool.conf'";
        let current = fs::read_to_string(&main)
            .map_err(|e| ClusterError::io(format!("reading {}", main.display()), e))?;
        if !current.lines().any(|l| l.trim() == include) {
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(&main)
                .map_err(|e| ClusterError::io(format!("opening {}", main.display()), e))?;
            writeln!(f, "\n{include}")
                .map_err(|e| ClusterError::io(format!("writing {}", main.display()), e))?;
        }
        Ok(())
    }

    /// Runs `pg_ctl <action> -D <data> -w -t 60 -s <extra>`; `with_log` appends the log
    /// file path (for the `-l` in `extra`).
    fn pg_ctl(&self, action: &str, extra: &[&str], with_log: bool) -> Result<(), ClusterError> {
        let mut cmd = server_command(&self.bin.pg_ctl, &self.dir.path, self.run_as);
        cmd.arg(action)
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "-s"])
            .args(extra);
        if with_log {
            cmd.arg(&self.log);
        }
        run(cmd, format!("pg_ctl {action}"), Some(&self.log))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Best effort: the server may already be stopped, in which case this fails.
        let mut cmd = server_command(&self.bin.pg_ctl, &self.dir.path, self.run_as);
        cmd.arg("stop")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "-t", "10", "-s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match cmd.status() {
            Ok(status) if status.success() => {}
            _ => kill_postmaster(&self.data),
        }
        // Then `self.dir` removes the directory when dropped, and `self._watchdog`, dropped
        // last, lets the watchdog find nothing to clean up and waits for it.
    }
}

/// If a postmaster is still running in `data`, kills it (used when `pg_ctl stop` failed).
fn kill_postmaster(data: &Path) {
    let Ok(pidfile) = fs::read_to_string(data.join("postmaster.pid")) else {
        return;
    };
    let Some(pid) = pidfile
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<u32>().ok())
    else {
        return;
    };
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

// ---- PgBouncer -----------------------------------------------------------------------

/// A PgBouncer in front of a [`PgCluster`], in a temporary directory.
///
/// It listens on `127.0.0.1` on a free port and forwards every database name to the
/// cluster. Clients are not authenticated (`auth_type = trust`); users other than the
/// superuser are looked up in the cluster through `auth_query`, so any role that may log
/// in to the cluster may log in to the bouncer. Dropping it kills the process and deletes
/// the directory; if this process dies without dropping it, a watchdog process does the
/// same (see the [module docs](self)). Drop it before the cluster.
#[derive(Debug)]
pub struct PgBouncer {
    port: u16,
    child: Child,
    // After `child`, so that it is removed after `Drop::drop` killed the process.
    dir: TempDir,
    // Last: once the process is killed and the directory removed, its cleanup is a no-op.
    // An `Option` only so that a retry can move it out; always `Some` otherwise.
    watchdog: Option<Watchdog>,
}

impl PgBouncer {
    /// Starts PgBouncer in front of `cluster` with `pool_mode` (`"session"`,
    /// `"transaction"` or `"statement"`) and `default_pool_size` server connections per
    /// user and database; returns once it accepts connections.
    ///
    /// # Errors
    /// [`ClusterError::NotInstalled`] if PgBouncer is missing,
    /// [`ClusterError::InvalidArgument`] for an unknown pool mode,
    /// [`ClusterError::Command`] if it exits during startup,
    /// [`ClusterError::NotReady`] if it does not accept connections within 10 s.
    pub fn start(
        cluster: &PgCluster,
        pool_mode: &str,
        default_pool_size: u32,
    ) -> Result<PgBouncer, ClusterError> {
        if !matches!(pool_mode, "session" | "transaction" | "statement") {
            return Err(ClusterError::InvalidArgument(format!(
                "pool_mode {pool_mode:?}: expected \"session\", \"transaction\" or \"statement\""
            )));
        }
        let program = find_program(
            "pgbouncer",
            &[
                Path::new("/usr/sbin/pgbouncer"),
                Path::new("/usr/bin/pgbouncer"),
            ],
        )?;
        let run_as = cluster.run_as;
        let mut dir = TempDir::create("ctxpool-pgbouncer", run_as)?;
        let mut watchdog = Some(Watchdog::spawn(
            "PgBouncer",
            BOUNCER_WATCHDOG,
            &[dir.path.as_os_str()],
            run_as,
        )?);
        let log = dir.path.join("pgbouncer.log");
        let ini = dir.path.join("pgbouncer.ini");
        let userlist = dir.path.join("userlist.txt");
        write_file(&userlist, &format!("\"{SUPERUSER}\" \"\"\n"), run_as)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port()?;
            let conf = format!(
                "; Written by ctxpool's test harness.\n\
                 [databases]\n\
                 * = host={HOST} port={pg_port}\n\
                 \n\
                 [pgbouncer]\n\
                 listen_addr = {HOST}\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {userlist}\n\
                 auth_user = {SUPERUSER}\n\
                 auth_query = SELECT rolname, NULL::text FROM pg_catalog.pg_roles WHERE rolname = $1 AND rolcanlogin\n\
                 admin_users = {SUPERUSER}\n\
                 pool_mode = {pool_mode}\n\
                 default_pool_size = {default_pool_size}\n\
                 max_client_conn = 1000\n\
                 ignore_startup_parameters = extra_float_digits,options,application_name\n\
                 logfile = {log}\n\
                 pidfile = {pidfile}\n",
                pg_port = cluster.port,
                userlist = userlist.display(),
                log = log.display(),
                pidfile = dir.path.join("pgbouncer.pid").display(),
            );
            write_file(&ini, &conf, run_as)?;
            let out_path = dir.path.join("pgbouncer.out");
            let out = fs::File::create(&out_path)
                .map_err(|e| ClusterError::io(format!("creating {}", out_path.display()), e))?;
            let err = out
                .try_clone()
                .map_err(|e| ClusterError::io("duplicating a file handle", e))?;
            let log_start = file_len(&log);
            let mut cmd = server_command(&program, &dir.path, run_as);
            cmd.arg(&ini).stdout(out).stderr(err);
            let child = cmd
                .spawn()
                .map_err(|e| ClusterError::io("spawning pgbouncer", e))?;
            if let Some(watchdog) = &mut watchdog {
                watchdog.tell(&child.id().to_string());
            }
            let mut bouncer = PgBouncer {
                port,
                child,
                dir,
                watchdog: watchdog.take(),
            };
            match bouncer.wait_ready(&log, &out_path) {
                Ok(()) => {
                    tracing::debug!(port, pg_port = cluster.port, "PgBouncer started");
                    return Ok(bouncer);
                }
                Err(e) if attempt < PORT_ATTEMPTS && port_taken(&log, log_start) => {
                    tracing::debug!(port, error = %e, "port taken; retrying");
                    // Keep the directory and the watchdog: take them back, and let the
                    // process be reaped.
                    bouncer.kill();
                    dir = std::mem::replace(&mut bouncer.dir, TempDir::empty());
                    watchdog = bouncer.watchdog.take();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The port PgBouncer listens on (on `127.0.0.1`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL, `postgres://{user}@127.0.0.1:{port}/{dbname}`, without password.
    /// `user` and `dbname` are inserted verbatim, so they must not need percent-encoding.
    pub fn url(&self, user: &str, dbname: &str) -> String {
        format!("postgres://{user}@{HOST}:{}/{dbname}", self.port)
    }

    /// Polls until PgBouncer accepts a TCP connection, it exits, or the timeout passes.
    fn wait_ready(&mut self, log: &Path, out: &Path) -> Result<(), ClusterError> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let started = Instant::now();
        let mut backoff = Duration::from_millis(5);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    return Err(ClusterError::Command {
                        program: "pgbouncer".to_owned(),
                        status,
                        stderr: format!("{}{}", tail(out), tail(log)),
                    });
                }
                Ok(None) => {}
                Err(e) => return Err(ClusterError::io("polling pgbouncer", e)),
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(250)).is_ok() {
                return Ok(());
            }
            if started.elapsed() >= BOUNCER_READY_TIMEOUT {
                return Err(ClusterError::NotReady {
                    what: "pgbouncer",
                    waited: started.elapsed(),
                    log_tail: format!("{}{}", tail(out), tail(log)),
                });
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(100));
        }
    }

    /// Kills and reaps the process. The watchdog forgets its pid in between: after the
    /// kill, so that it is never without a process to kill while one runs, and before
    /// the reaping, after which the pid may be reused by an unrelated process.
    fn kill(&mut self) {
        let _ = self.child.kill();
        if let Some(watchdog) = &mut self.watchdog {
            watchdog.tell(FORGET_PID);
        }
        let _ = self.child.wait();
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.kill();
        // Then `self.dir` removes the directory when dropped, and `self.watchdog`, dropped
        // last, lets the watchdog find nothing to clean up and waits for it.
    }
}

// ---- the watchdog --------------------------------------------------------------------

/// The `sh` script of a cluster's watchdog; `$1` is `pg_ctl`, `$2` the data directory,
/// `$3` the temporary directory. After end-of-file on standard input it stops the server
/// (killing the postmaster if `pg_ctl` fails, as `Drop` does) and removes the directory.
/// If the directory reappears (an `initdb` or `pg_ctl start` orphaned by our death was
/// still writing to it), it tries again, a bounded number of times.
const CLUSTER_WATCHDOG: &str = r#"trap '' HUP INT QUIT TERM
while read -r line; do :; done
tries=0
while :; do
  if ! "$1" stop -D "$2" -m immediate -w -t 10 -s >/dev/null 2>&1; then
    pid=$(head -n 1 "$2/postmaster.pid" 2>/dev/null)
    case $pid in
      ''|*[!0-9]*) ;;
      *) kill -KILL "$pid" 2>/dev/null ;;
    esac
  fi
  rm -rf -- "$3" 2>/dev/null
  [ -e "$3" ] || exit 0
  tries=$((tries + 1))
  [ "$tries" -lt 10 ] || exit 1
  sleep 1
done
"#;

/// The `sh` script of a PgBouncer's watchdog; `$1` is the temporary directory. Each line
/// on standard input is the pid to kill, or [`FORGET_PID`]; after end-of-file it kills
/// the last pid it was given, if any, and removes the directory.
const BOUNCER_WATCHDOG: &str = r#"trap '' HUP INT QUIT TERM
pid=
while IFS= read -r line || [ -n "$line" ]; do
  case $line in
    ''|*[!0-9]*) pid= ;;
    *) pid=$line ;;
  esac
  line=
done
[ -z "$pid" ] || kill -KILL "$pid" 2>/dev/null
rm -rf -- "$1" 2>/dev/null
"#;

/// The line that tells a PgBouncer watchdog to forget the pid it was given.
const FORGET_PID: &str = "-";

/// A process that cleans up after this one when it dies without dropping the server.
///
/// Its standard input is a pipe whose only writer is [`stdin`](Self::stdin) (the pipe is
/// close-on-exec here, so no other child inherits it): it reads end-of-file when this
/// process drops the `Watchdog` or exits, however it exits, and then runs its cleanup.
/// It runs in a process group of its own, so that a Ctrl-C sent to the foreground process
/// group does not reach it, ignores the termination signals a shell or `timeout` sends,
/// and has no standard output or error, so that it holds no pipe of `cargo test` open.
#[derive(Debug)]
pub(crate) struct Watchdog {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Watchdog {
    /// Starts `sh -c script` with `args` as `$1`, `$2`, ..., as `run_as` if given (like
    /// the servers, so that `pg_ctl` accepts it and it may signal them).
    pub(crate) fn spawn(
        what: &str,
        script: &str,
        args: &[&OsStr],
        run_as: Option<RunAs>,
    ) -> Result<Watchdog, ClusterError> {
        let mut cmd = Command::new("sh");
        clear_pg_env(&mut cmd);
        cmd.arg("-c")
            .arg(script)
            .arg("ctxpool-watchdog")
            .args(args)
            // Not in a directory it is to remove.
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        if let Some(id) = run_as {
            cmd.uid(id.uid).gid(id.gid).env("HOME", "/");
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| ClusterError::io(format!("spawning the {what} watchdog"), e))?;
        let stdin = child.stdin.take();
        if stdin.is_none() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ClusterError::io(
                format!("spawning the {what} watchdog"),
                io::Error::other("no pipe to its standard input"),
            ));
        }
        Ok(Watchdog { child, stdin })
    }

    /// Sends the watchdog a line (best effort: it only fails if the watchdog is gone).
    pub(crate) fn tell(&mut self, line: &str) {
        if let Some(stdin) = &mut self.stdin {
            // One write of a few bytes: atomic on a pipe, so never half a line.
            let _ = stdin.write_all(format!("{line}\n").as_bytes());
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // End-of-file: the watchdog cleans up (nothing is left by now) and exits.
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

// ---- helpers -------------------------------------------------------------------------

/// A directory removed (best effort) on drop.
#[derive(Debug)]
pub(crate) struct TempDir {
    pub(crate) path: PathBuf,
}

impl TempDir {
    /// Creates `<temp>/<prefix>-<pid>-<counter>-<nanos>`, owned by `run_as` if given.
    pub(crate) fn create(prefix: &str, run_as: Option<RunAs>) -> Result<TempDir, ClusterError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "{prefix}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        fs::create_dir(&path)
            .map_err(|e| ClusterError::io(format!("creating {}", path.display()), e))?;
        let dir = TempDir { path };
        if let Some(id) = run_as {
            chown(&dir.path, id)?;
        }
        Ok(dir)
    }

    /// A placeholder that owns nothing.
    pub(crate) fn empty() -> TempDir {
        TempDir {
            path: PathBuf::new(),
        }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// The server programs, from the highest-versioned `/usr/lib/postgresql/*/bin`, else PATH.
#[derive(Debug)]
pub(crate) struct ServerBins {
    initdb: PathBuf,
    pg_ctl: PathBuf,
    pg_basebackup: PathBuf,
    pub(crate) psql: PathBuf,
}

impl ServerBins {
    pub(crate) fn find() -> Result<ServerBins, ClusterError> {
        let dir = pg_bin_dir();
        let server = |program: &'static str| -> Result<PathBuf, ClusterError> {
            match dir.as_ref().map(|d| d.join(program)) {
                Some(path) if is_executable(&path) => Ok(path),
                _ => find_program(program, &[]),
            }
        };
        let initdb = server("initdb")?;
        let pg_ctl = server("pg_ctl")?;
        let pg_basebackup = server("pg_basebackup")?;
        server("postgres")?; // pg_ctl runs it from its own directory or PATH.
        let mut psql_fallbacks = vec![PathBuf::from("/usr/bin/psql")];
        psql_fallbacks.extend(dir.map(|d| d.join("psql")));
        let fallbacks: Vec<&Path> = psql_fallbacks.iter().map(PathBuf::as_path).collect();
        let psql = find_program("psql", &fallbacks)?;
        Ok(ServerBins {
            initdb,
            pg_ctl,
            pg_basebackup,
            psql,
        })
    }
}

/// The `bin` directory of the highest PostgreSQL version under `/usr/lib/postgresql`.
fn pg_bin_dir() -> Option<PathBuf> {
    fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name
                .split('.')
                .map(|part| part.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = entry.path().join("bin");
            is_executable(&bin.join("postgres")).then_some((version, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

/// Finds `program` on PATH, then at `fallbacks`.
pub(crate) fn find_program(
    program: &'static str,
    fallbacks: &[&Path],
) -> Result<PathBuf, ClusterError> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .map(|dir| dir.join(program))
        .chain(fallbacks.iter().map(|p| p.to_path_buf()))
        .find(|p| is_executable(p))
        .ok_or_else(|| {
            let mut hint = String::from("looked on PATH");
            if program != "psql" && program != "pgbouncer" {
                hint.insert_str(0, "looked in /usr/lib/postgresql/*/bin, ");
            }
            for f in fallbacks {
                hint.push_str(&format!(", {}", f.display()));
            }
            ClusterError::NotInstalled { program, hint }
        })
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The OS identity the server programs run as.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunAs {
    uid: u32,
    gid: u32,
}

/// `Some(postgres user)` when this process runs as root, else `None` (run as ourselves).
fn service_identity() -> Result<Option<RunAs>, ClusterError> {
    if effective_uid()? != 0 {
        return Ok(None);
    }
    let lookup = |flag: &str| -> Result<u32, ClusterError> {
        let output = Command::new("id")
            .args([flag, SERVICE_USER])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| ClusterError::NoServiceUser {
                detail: format!("running `id`: {e}"),
            })?;
        let text = String::from_utf8_lossy(&output.stdout);
        match text.trim().parse() {
            Ok(id) if output.status.success() => Ok(id),
            _ => Err(ClusterError::NoServiceUser {
                detail: format!(
                    "`id {flag} {SERVICE_USER}`: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            }),
        }
    };
    let run_as = RunAs {
        uid: lookup("-u")?,
        gid: lookup("-g")?,
    };
    if run_as.uid == 0 {
        return Err(ClusterError::NoServiceUser {
            detail: format!("`{SERVICE_USER}` has uid 0"),
        });
    }
    Ok(Some(run_as))
}

/// This process's effective uid, from `/proc/self/status`, else `id -u`.
fn effective_uid() -> Result<u32, ClusterError> {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        // "Uid:\t<real>\t<effective>\t<saved>\t<fs>"
        let euid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|id| id.parse().ok());
        if let Some(euid) = euid {
            return Ok(euid);
        }
    }
    let output = Command::new("id")
        .arg("-u")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ClusterError::io("running `id -u`", e))?;
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .map_err(|_| ClusterError::io("parsing `id -u`", io::Error::other("not a number")))
}

/// A command for a server program: run as `run_as` (not through `runuser`, which would
/// stand between us and the process we must kill), in `dir`, without inherited `PG*`
/// variables, with standard input closed.
pub(crate) fn server_command(program: &Path, dir: &Path, run_as: Option<RunAs>) -> Command {
    let mut cmd = Command::new(program);
    clear_pg_env(&mut cmd);
    cmd.current_dir(dir).stdin(Stdio::null());
    if let Some(id) = run_as {
        // std drops supplementary groups when a root parent sets the uid.
        cmd.uid(id.uid).gid(id.gid).env("HOME", dir);
    }
    cmd
}

/// Removes inherited libpq variables (`PGHOST`, `PGDATA`, ...) that would redirect us.
fn clear_pg_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
}

/// Runs `cmd` to completion; on failure, the error quotes its output and `log`'s tail.
pub(crate) fn run(
    mut cmd: Command,
    program: String,
    log: Option<&Path>,
) -> Result<(), ClusterError> {
    let output = cmd
        .output()
        .map_err(|e| ClusterError::io(format!("running {program}"), e))?;
    if output.status.success() {
        return Ok(());
    }
    let mut stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    stderr.push_str(&String::from_utf8_lossy(&output.stdout));
    if let Some(log) = log {
        stderr.push_str(&format!("--- {} (tail) ---\n{}", log.display(), tail(log)));
    }
    Err(ClusterError::Command {
        program,
        status: output.status,
        stderr,
    })
}

/// Writes `contents` to `path` and hands it to `run_as`.
pub(crate) fn write_file(
    path: &Path,
    contents: &str,
    run_as: Option<RunAs>,
) -> Result<(), ClusterError> {
    fs::write(path, contents)
        .map_err(|e| ClusterError::io(format!("writing {}", path.display()), e))?;
    match run_as {
        Some(id) => chown(path, id),
        None => Ok(()),
    }
}

fn chown(path: &Path, id: RunAs) -> Result<(), ClusterError> {
    std::os::unix::fs::chown(path, Some(id.uid), Some(id.gid))
        .map_err(|e| ClusterError::io(format!("chown {}", path.display()), e))
}

/// A free TCP port on 127.0.0.1 (bound, read, released; another process may take it
/// before the server binds it, hence the retries).
pub(crate) fn free_port() -> Result<u16, ClusterError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| ClusterError::io("binding 127.0.0.1:0", e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| ClusterError::io("reading a bound port", e))
}

pub(crate) fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Whether `log`, past `from`, says the port was taken.
pub(crate) fn port_taken(log: &Path, from: u64) -> bool {
    read_from(log, from).contains("already in use")
}

/// The last few KiB of `path`, or a note that it could not be read.
pub(crate) fn tail(path: &Path) -> String {
    let from = file_len(path).saturating_sub(LOG_TAIL_BYTES);
    let text = read_from(path, from);
    if text.is_empty() {
        format!("({} is empty or missing)\n", path.display())
    } else {
        text
    }
}

fn read_from(path: &Path, from: u64) -> String {
    let mut bytes = Vec::new();
    let read = fs::File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(from))?;
        f.read_to_end(&mut bytes)
    });
    match read {
        Ok(_) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    }
}
