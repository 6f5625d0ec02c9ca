//! Child processes owned by fixtures: output captured to a log file, killed
//! and reaped on drop so no test leaves a process behind.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

/// A spawned child whose stdout and stderr are appended to one log file.
/// Dropping it kills the process and waits for it (no zombies, no leaks).
#[derive(Debug)]
pub struct LoggedChild {
    child: Option<Child>,
    log_path: PathBuf,
}

impl LoggedChild {
    /// Spawns `cmd` with stdin closed and stdout/stderr appended to `log_path`.
    pub fn spawn(cmd: &mut Command, log_path: &Path) -> LoggedChild {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .unwrap_or_else(|e| panic!("open log file {}: {e}", log_path.display()));
        let log_err = log.try_clone().expect("clone log file handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        LoggedChild {
            child: Some(child),
            log_path: log_path.to_path_buf(),
        }
    }

    /// OS process id, if still owned.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` once the process has exited (reaping it), `None` while it runs.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        match self.child.as_mut() {
            Some(child) => child.try_wait().expect("try_wait on child"),
            None => None,
        }
    }

    /// Everything the process wrote so far (lossy UTF-8).
    pub fn logs(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// Kills the process (if still running) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // An error means the process already exited; wait() reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for LoggedChild {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads a file as lossy UTF-8; a missing file reads as "".
pub fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}
