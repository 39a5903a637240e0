//! The agent's lease, kept alive by its own task so that a long action (a clone, a rewind)
//! does not let it lapse, and not kept alive for a leader whose loop has stopped turning.

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
}

impl Lease {
    pub fn id(&self) -> Option<LeaseId> {
        self.lock().id
    }

    pub fn renewed_at(&self) -> Option<Instant> {
        self.lock().renewed_at
    }

    /// The loop turned; `leading`: it leads (its lease then needs the loop alive).
    pub fn loop_turned(&self, leading: bool) {
        let mut s = self.lock();
        s.loop_at = Instant::now();
        s.leading = leading;
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
    loop_silence: Duration,
) -> (Arc<Lease>, tokio::task::JoinHandle<()>) {
    let lease = Arc::new(Lease {
        state: Mutex::new(State {
            id: None,
            renewed_at: None,
            loop_at: Instant::now(),
            leading: false,
        }),
    });
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
