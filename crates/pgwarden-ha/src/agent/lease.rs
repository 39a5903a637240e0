//! The agent's lease, kept alive by its own task so that a long action (a clone, a rewind)
//! does not let it lapse, and not kept alive for a leader whose loop has stopped turning.
//!
//! The fence guard is a third task: while the loop reports a writable server, it stops that
//! server (SIGQUIT, immediate shutdown) the moment the lease is `ttl - fence_margin` old by
//! this process's monotonic clock. It does not wait for the loop, whose store calls may each
//! take their whole timeout while the store is unreachable.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgwarden_dcs::{ClusterStore, DcsError, Kv, LeaseId};

/// Shared between the keeper task and the loop.
#[derive(Debug)]
pub struct Lease {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    id: Option<LeaseId>,
    /// When the last successful grant or renewal was sent.
    renewed_at: Option<Instant>,
    /// When the loop last finished a round, and whether it leads.
    loop_at: Instant,
    leading: bool,
    /// The PID of a postmaster that may take writes, to stop once the lease is too old.
    writable: Option<u32>,
    /// Failsafe mode: when every other member last confirmed (the time the request was sent)
    /// that none can reach the store and none leads. It counts as a renewal for the fence.
    confirmed_at: Option<Instant>,
}

impl Lease {
    pub fn id(&self) -> Option<LeaseId> {
        self.lock().id
    }

    /// The last renewal, or the last failsafe confirmation if later.
    pub fn renewed_at(&self) -> Option<Instant> {
        let s = self.lock();
        s.renewed_at.max(s.confirmed_at)
    }

    /// The last renewal of the lease in the store itself.
    pub fn renewed_in_store_at(&self) -> Option<Instant> {
        self.lock().renewed_at
    }

    /// Failsafe mode: every other member confirmed, in answer to a request sent at `at`.
    pub fn confirmed_by_peers(&self, at: Instant) {
        let mut s = self.lock();
        s.confirmed_at = s.confirmed_at.max(Some(at));
    }

    /// When the fence guard stops a writable server unless renewed or confirmed again.
    pub fn fences_at(&self, fence_after: Duration) -> Option<Instant> {
        self.renewed_at().map(|t| t + fence_after)
    }

    /// The loop turned; `leading`: it leads (its lease then needs the loop alive).
    pub fn loop_turned(&self, leading: bool) {
        let mut s = self.lock();
        s.loop_at = Instant::now();
        s.leading = leading;
    }

    /// The postmaster that may take writes now (`None`: none does).
    pub fn guard(&self, writable: Option<u32>) {
        self.lock().writable = writable;
    }

    /// The store said the lease is gone: a new one is granted.
    pub fn forget(&self, id: LeaseId) {
        let mut s = self.lock();
        if s.id == Some(id) {
            s.id = None;
            s.renewed_at = None;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Starts the keeper: grants a lease of `ttl`, renews it every `every`, retries quickly after
/// a failure. A leader's lease is not renewed once its loop has been silent for
/// `loop_silence` (the loop is stuck, so nothing fences its PostgreSQL: the lease must go).
pub fn spawn<K: Kv>(
    store: Arc<ClusterStore<K>>,
    ttl: Duration,
    every: Duration,
    fence_after: Duration,
) -> (Arc<Lease>, tokio::task::JoinHandle<()>) {
    let loop_silence = fence_after;
    let lease = Arc::new(Lease {
        state: Mutex::new(State {
            id: None,
            renewed_at: None,
            loop_at: Instant::now(),
            leading: false,
            writable: None,
            confirmed_at: None,
        }),
    });
    tokio::spawn(fence_guard(lease.clone(), fence_after));
    let shared = lease.clone();
    let task = tokio::spawn(async move {
        loop {
            let (id, stuck) = {
                let s = shared.lock();
                (s.id, s.leading && s.loop_at.elapsed() > loop_silence)
            };
            let sent = Instant::now();
            let result = match id {
                None => store.kv().grant(ttl).await.map(Some),
                Some(_) if stuck => {
                    tracing::error!(
                        "the agent's loop is stuck while leading: letting the lease run out"
                    );
                    Ok(None)
                }
                Some(id) => store.kv().keep_alive(id).await.map(|()| Some(id)),
            };
            let ok = match result {
                Ok(Some(new)) => {
                    let mut s = shared.lock();
                    s.id = Some(new);
                    s.renewed_at = Some(sent);
                    true
                }
                Ok(None) => false,
                Err(DcsError::LeaseGone(_)) => {
                    if let Some(id) = id {
                        tracing::warn!(
                            lease = id.0,
                            "the agent's lease expired; granting a new one"
                        );
                        shared.forget(id);
                    }
                    false
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the agent's lease");
                    false
                }
            };
            let pause = if ok {
                every
            } else {
                Duration::from_millis(200)
            };
            tokio::time::sleep(pause).await;
        }
    });
    (lease, task)
}

/// How often the guard looks: the bound on how late past `ttl - fence_margin` a fence comes.
const GUARD_TICK: Duration = Duration::from_millis(50);

/// Stops a writable server once the lease is older than `fence_after`; ends with the lease
/// (its only other owner, the agent, is gone).
async fn fence_guard(lease: Arc<Lease>, fence_after: Duration) {
    while Arc::strong_count(&lease) > 1 {
        tokio::time::sleep(GUARD_TICK).await;
        let mut s = lease.lock();
        let Some(pid) = s.writable else {
            continue;
        };
        let stale = s
            .renewed_at
            .max(s.confirmed_at)
            .map_or(true, |t| t.elapsed() >= fence_after);
        if stale {
            tracing::error!(
                pid,
                "fencing: the lease was not renewed in time; stopping postgres at once"
            );
            // Our own child, not yet reaped (only its Postmaster reaps it), so the PID is its.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGQUIT,
            );
            s.writable = None;
        }
    }
}
