//! What the tests' own servers (the kit's [`idp`](crate::idp), ctxpool's tests/support/glewlwyd.rs) share:
//! a scratch folder per run, and a child process that is killed, reaped and whose folder
//! is removed when the test is done with it.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};

/// A server process started by the test, with its scratch folder.
pub struct Server {
    child: Child,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Server {
    /// Starts `command`; `dir` is removed with the server. On failure the folder is
    /// removed at once and the error says what `what` is.
    pub fn spawn(command: &mut Command, dir: PathBuf, what: &str) -> Result<Self, String> {
        match command.spawn() {
            Ok(child) => Ok(Self { child, dir }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(format!("could not start {what}: {e}"))
            }
        }
    }

    /// The process, for its pipes.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// How the process ended, if it has: a server that exits before it listens failed.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

/// A new, empty scratch folder `ctxpool-{name}-{pid}-{nanos}` in the temporary directory:
/// its own for each run, so that runs side by side do not meet.
pub fn scratch_dir(name: &str) -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!(
        "ctxpool-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}
