//! A running postmaster, spawned as a direct child so that its exit is seen (and reaped) at once.

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::PgError;
use crate::instance::log_tail;

/// How to ask PostgreSQL to shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// SIGTERM: wait for clients to disconnect.
    Smart,
    /// SIGINT: roll back open transactions, checkpoint, exit.
    Fast,
    /// SIGQUIT: exit at once; crash recovery on next start.
    Immediate,
}

impl StopMode {
    fn signal(self) -> Signal {
        match self {
            StopMode::Smart => Signal::SIGTERM,
            StopMode::Fast => Signal::SIGINT,
            StopMode::Immediate => Signal::SIGQUIT,
        }
    }
}

/// The postmaster of one data directory.
#[derive(Debug)]
pub struct Postmaster {
    child: Child,
    data_dir: PathBuf,
    exit: Option<ExitStatus>,
}

const POLL: Duration = Duration::from_millis(20);

impl Postmaster {
    pub(crate) fn new(child: Child, data_dir: PathBuf) -> Self {
        Self {
            child,
            data_dir,
            exit: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The exit status if the postmaster has exited (reaping it), without blocking.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            // An error here means the child was already reaped elsewhere; treat it as gone.
            self.exit = match self.child.try_wait() {
                Ok(status) => status,
                Err(_) => Some(ExitStatus::default()),
            };
        }
        self.exit
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Waits until the server accepts connections: `postmaster.pid` names this process and says
    /// `ready` (primary) or `standby` (hot standby open for reads).
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<(), PgError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Err(PgError::StartFailed {
                    data_dir: self.data_dir.clone(),
                    status: status.to_string(),
                    log: log_tail(&self.data_dir, 5),
                });
            }
            if pid_file_status(&self.data_dir, self.pid())
                .is_some_and(|s| s == "ready" || s == "standby")
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(PgError::StartTimeout {
                    data_dir: self.data_dir.clone(),
                    timeout,
                    log: log_tail(&self.data_dir, 5),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Sends the signal for `mode` (nothing if already exited).
    pub fn signal(&mut self, mode: StopMode) {
        self.send(mode.signal());
    }

    fn send(&mut self, sig: Signal) {
        if self.is_running() {
            let _ = kill(Pid::from_raw(self.pid() as i32), sig);
        }
    }

    /// Stops the server: `mode`, then immediate after `timeout`, then SIGKILL after 5 more seconds.
    pub async fn stop(&mut self, mode: StopMode, timeout: Duration) -> ExitStatus {
        for (sig, wait) in [
            (mode.signal(), timeout),
            (Signal::SIGQUIT, Duration::from_secs(5)),
            (Signal::SIGKILL, Duration::from_secs(5)),
        ] {
            self.send(sig);
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline {
                if let Some(status) = self.try_wait() {
                    return status;
                }
                tokio::time::sleep(POLL).await;
            }
            tracing::warn!(data_dir = %self.data_dir.display(), signal = ?sig, "postgres did not stop in time; escalating");
        }
        self.child.wait().unwrap_or_default()
    }

    /// The blocking form of [`Postmaster::stop`] for `Drop` impls and signal-less contexts.
    pub fn stop_blocking(&mut self, mode: StopMode, timeout: Duration) -> ExitStatus {
        for (sig, wait) in [
            (mode.signal(), timeout),
            (Signal::SIGKILL, Duration::from_secs(5)),
        ] {
            self.send(sig);
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline {
                if let Some(status) = self.try_wait() {
                    return status;
                }
                std::thread::sleep(POLL);
            }
        }
        self.child.wait().unwrap_or_default()
    }

    /// SIGKILL, as a crash would, and reap the process. Backends notice the postmaster's death
    /// and exit by themselves.
    pub fn kill(&mut self) -> ExitStatus {
        self.send(Signal::SIGKILL);
        let status = self.child.wait().unwrap_or_default();
        self.exit = Some(status);
        status
    }
}

/// The status word (line 8) of `postmaster.pid` if the file names `pid`.
fn pid_file_status(data_dir: &Path, pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let mut lines = text.lines();
    if lines.next()?.trim() != pid.to_string() {
        return None;
    }
    Some(lines.nth(6)?.trim().to_string())
}

/// Makes this process a child subreaper: PostgreSQL backends orphaned by a killed postmaster
/// are reparented to it (to be reaped by [`reap_orphans`]) rather than to an init that may
/// never reap them.
pub fn become_subreaper() {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::debug!(error = %e, "cannot become a child subreaper");
    }
}

/// Reaps this process's exited children that are PostgreSQL servers other than `keep` (a
/// postmaster that its [`Postmaster`] reaps itself, keeping its exit status): orphaned
/// backends and postmasters, which run in a process group of their own. Other children (a
/// `pg_basebackup` run by a tokio `Command`, `postgres -V`) are left to whoever waits for them. Another
/// agent's dead postmaster in the same process may be reaped here; its `Postmaster` then
/// reports it gone without a status.
pub fn reap_orphans(keep: &[u32]) {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if keep.contains(&pid) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split at the last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map_or("", |(_, c)| c);
        let mut fields = rest.split_whitespace();
        let (state, ppid) = (
            fields.next(),
            fields.next().and_then(|p| p.parse::<u32>().ok()),
        );
        let pgrp = fields.next().and_then(|p| p.parse::<i32>().ok());
        // Servers run in their own process group: a `postgres` in ours is a program this
        // process started and waits for itself (`postgres -V`).
        let ours = pgrp == Some(nix::unistd::getpgrp().as_raw());
        if state == Some("Z") && ppid == Some(me) && comm.starts_with("postgres") && !ours {
            let _ = nix::sys::wait::waitpid(
                Pid::from_raw(pid as i32),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
    }
}
