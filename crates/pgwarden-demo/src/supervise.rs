//! Supervising the demo's postmasters in the foreground.

use std::collections::HashSet;
use std::time::Duration;

use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use pgwarden_postgres::{log_tail, StopMode};
use tokio::signal::unix::{signal, SignalKind};

use crate::bootstrap::RunningNode;
use crate::DemoError;

const TICK: Duration = Duration::from_millis(250);
/// Fast shutdown gets this long before immediate shutdown; the whole stop stays within 10 s.
const STOP_TIMEOUT: Duration = Duration::from_secs(4);

/// Become a child subreaper: PostgreSQL backends orphaned by a killed postmaster are reparented
/// to us (and reaped here) rather than to an init that may never reap them.
pub fn enable_subreaper() {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::debug!(error = %e, "cannot become a child subreaper");
    }
}

/// Watches the nodes until SIGINT or SIGTERM. A node that dies is reported once; restarting it and
/// failing over are the HA agent's job, not the demo's.
pub async fn supervise(nodes: &mut [RunningNode]) -> Result<(), DemoError> {
    let mut term = signal(SignalKind::terminate()).map_err(DemoError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DemoError::Signals)?;
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping the cluster"); return Ok(()); }
            _ = int.recv() => { tracing::info!("SIGINT: stopping the cluster"); return Ok(()); }
            _ = tick.tick() => check(nodes),
        }
    }
}

fn check(nodes: &mut [RunningNode]) {
    for n in nodes.iter_mut().filter(|n| !n.reported_dead) {
        if let Some(status) = n.postmaster.try_wait() {
            n.reported_dead = true;
            let role = if n.primary { "primary" } else { "standby" };
            tracing::error!(
                node = %n.instance.name,
                role,
                %status,
                log = %log_tail(&n.instance.data_dir, 3),
                "node died; it is not restarted (restart and failover come with the HA agent)"
            );
        }
    }
    let ours: HashSet<i32> = nodes.iter().map(|n| n.postmaster.pid() as i32).collect();
    reap_orphans(&ours);
}

/// Reaps exited children that are not our postmasters (those are reaped by their `Postmaster`).
fn reap_orphans(ours: &HashSet<i32>) {
    loop {
        let peek = waitid(
            Id::All,
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        );
        let pid = match peek {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(status) => match status.pid() {
                Some(pid) => pid,
                None => return,
            },
        };
        if ours.contains(&pid.as_raw()) {
            // Ours: its Postmaster reaps it on the next tick, which then lets us see the rest.
            return;
        }
        let _ = waitpid(pid, Some(WaitPidFlag::WNOHANG));
    }
}

/// Stops every node in parallel: fast shutdown, immediate after a few seconds.
pub async fn stop_all(nodes: Vec<RunningNode>) {
    let stops = nodes.into_iter().map(|mut n| async move {
        let status = n.postmaster.stop(StopMode::Fast, STOP_TIMEOUT).await;
        tracing::info!(node = %n.instance.name, %status, "stopped");
    });
    futures::future::join_all(stops).await;
    reap_remaining(Duration::from_secs(2)).await;
}

/// After the postmasters are gone, their logger processes may still be finishing: as their
/// subreaper we reap them, so none is left a zombie once we exit.
async fn reap_remaining(timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match waitpid(Option::<nix::unistd::Pid>::None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {
                if tokio::time::Instant::now() >= deadline {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(_) => {}
            Err(_) => return, // ECHILD: no children left
        }
    }
}
