//! What the proxy knows of each node beyond the view: health (failures, bans with backoff),
//! whether a replica is in rotation (replay lag with hysteresis), the WAL position it has surely
//! replayed, and counters for `SHOW NODES`. Shared by every session; updated from the view (read
//! lazily, when a read is routed), from failed checkouts and from the proxy's own position
//! probes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use pgwarden_cluster::status::Role;
use pgwarden_cluster::view::ClusterView;
use pgwarden_config::RoutingConfig;
use pgwarden_core::{Lsn, NodeId};

use crate::router::{self, Out, PrimaryWhy};

/// Health as failures count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Health {
    /// Failures in a row since the last success or ban.
    pub failures: u32,
    /// Bans in a row (each twice as long as the one before), reset by a success.
    pub bans: u32,
    pub banned_until: Option<Instant>,
}

impl Health {
    /// After a failed checkout or probe at `now`: banned once `ban_after` failures came in a row,
    /// for `ban_time` doubled per ban before, at most `max_ban_time`.
    pub fn failed(self, now: Instant, ban_after: u32, ban_time: Duration, max: Duration) -> Health {
        let failures = self.failures + 1;
        if failures < ban_after {
            return Health { failures, ..self };
        }
        let factor = 1u32 << self.bans.min(16);
        let length = ban_time.saturating_mul(factor).min(max);
        Health {
            failures: 0,
            bans: self.bans + 1,
            banned_until: Some(now + length),
        }
    }

    /// After a success: failures forgotten; a ban still running stays.
    pub fn succeeded(self, now: Instant) -> Health {
        let banned = self.banned(now);
        Health {
            failures: 0,
            bans: if banned { self.bans } else { 0 },
            banned_until: if banned { self.banned_until } else { None },
        }
    }

    pub fn banned(&self, now: Instant) -> bool {
        self.banned_until.is_some_and(|t| now < t)
    }
}

/// One node.
pub struct NodeState {
    pub id: NodeId,
    health: Mutex<Health>,
    /// Whether it is in rotation for reads (`None`: no lag seen yet).
    rotation: Mutex<Option<bool>>,
    /// Its replay lag as last reported.
    lag: AtomicU64,
    /// The WAL position it has surely replayed.
    replayed: AtomicU64,
    /// Its timeline as last reported (`u64::MAX`: unknown): a new one (a rewind, a re-clone)
    /// makes what it had replayed before no longer a bound.
    timeline: AtomicU64,
    /// The last position a probe of ours read on it, and when: an upper bound of what any read
    /// there saw before that instant.
    probed: Mutex<Option<(Lsn, Instant)>>,
    /// A session is asking it for its replay position, for every session waiting on it.
    prober: AtomicBool,
    /// Woken when a probe has read its position, or the prober stops.
    advanced: tokio::sync::Notify,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub probes: AtomicU64,
    pub failures: AtomicU64,
}

impl NodeState {
    fn new(id: NodeId) -> NodeState {
        NodeState {
            id,
            health: Mutex::new(Health::default()),
            rotation: Mutex::new(None),
            lag: AtomicU64::new(u64::MAX),
            replayed: AtomicU64::new(0),
            timeline: AtomicU64::new(u64::MAX),
            probed: Mutex::new(None),
            prober: AtomicBool::new(false),
            advanced: tokio::sync::Notify::new(),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            probes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    pub fn health(&self) -> Health {
        *self.health.lock().expect("health lock")
    }

    pub fn lag(&self) -> Option<u64> {
        Some(self.lag.load(Ordering::Relaxed)).filter(|l| *l != u64::MAX)
    }

    pub fn in_rotation(&self) -> Option<bool> {
        *self.rotation.lock().expect("rotation lock")
    }

    pub fn replayed(&self) -> Lsn {
        Lsn(self.replayed.load(Ordering::Acquire))
    }

    /// Why it takes no reads now, if so.
    pub fn out(&self, now: Instant) -> Option<Out> {
        if self.health().banned(now) {
            return Some(Out::Banned);
        }
        (self.in_rotation() != Some(true)).then_some(Out::Lagging)
    }

    /// A checkout or probe failed.
    pub fn failed(&self, routing: &RoutingConfig) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut h = self.health.lock().expect("health lock");
        let was = h.banned(Instant::now());
        *h = h.failed(
            Instant::now(),
            routing.ban_after,
            routing.ban_time,
            routing.max_ban_time,
        );
        if !was && h.banned(Instant::now()) {
            tracing::warn!(node = %self.id, bans = h.bans, "node banned from reads after failures in a row");
        }
    }

    pub fn succeeded(&self) {
        let mut h = self.health.lock().expect("health lock");
        if h.failures > 0 || h.bans > 0 {
            *h = h.succeeded(Instant::now());
        }
    }

    /// A probe read `lsn` on it at `at`: as a replica, what it had replayed (`replay`); as the
    /// primary, where its WAL was.
    pub fn probed(&self, lsn: Lsn, at: Instant, replay: bool) {
        self.probes.fetch_add(1, Ordering::Relaxed);
        if replay {
            self.replayed.fetch_max(lsn.0, Ordering::AcqRel);
        }
        {
            let mut p = self.probed.lock().expect("probe lock");
            if p.is_none_or_older(at) {
                *p = Some((lsn, at));
            }
        }
        self.advanced.notify_waiters();
    }

    /// The turn to ask it for its position on behalf of every session waiting for it to replay
    /// theirs, if nobody has it: one session probes a replica at a time, the others wait for
    /// its answers ([`NodeState::replayed_or_turn`]).
    pub fn probe_turn(&self) -> Option<ProbeTurn<'_>> {
        self.prober
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            // Made only when taken: a turn dropped gives the turn back.
            .then(|| ProbeTurn(self))
    }

    /// Waits until it has surely replayed `floor` (true), or the turn to probe it is free
    /// (taken, and given), or `deadline` passes (false, no turn).
    pub async fn replayed_or_turn(
        &self,
        floor: Lsn,
        deadline: tokio::time::Instant,
    ) -> (bool, Option<ProbeTurn<'_>>) {
        loop {
            if self.replayed() >= floor {
                return (true, None);
            }
            if let Some(turn) = self.probe_turn() {
                return (false, Some(turn));
            }
            let woken = self.advanced.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            // Looked at again once registered: an answer or a release just before is not missed.
            if self.replayed() >= floor || !self.prober.load(Ordering::Acquire) {
                continue;
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return (self.replayed() >= floor, None);
            }
        }
    }

    /// The position of the last probe if it was taken after `t`.
    pub fn probed_after(&self, t: Instant) -> Option<Lsn> {
        let p = *self.probed.lock().expect("probe lock");
        p.filter(|(_, at)| *at > t).map(|(l, _)| l)
    }
}

/// The one session's turn to probe a node (see [`NodeState::probe_turn`]); given back, and
/// the waiters woken, when dropped.
pub struct ProbeTurn<'a>(&'a NodeState);

impl Drop for ProbeTurn<'_> {
    fn drop(&mut self) {
        self.0.prober.store(false, Ordering::Release);
        self.0.advanced.notify_waiters();
    }
}

trait OlderThan {
    fn is_none_or_older(&self, at: Instant) -> bool;
}

impl OlderThan for Option<(Lsn, Instant)> {
    fn is_none_or_older(&self, at: Instant) -> bool {
        match self {
            None => true,
            Some((_, t)) => *t <= at,
        }
    }
}

/// Every node, by name, and the view last taken in.
#[derive(Default)]
pub struct Nodes {
    map: RwLock<HashMap<NodeId, Arc<NodeState>>>,
    seen: Mutex<Option<Arc<ClusterView>>>,
    /// Reads sent to the primary, by why.
    primary_reads: Counts<PrimaryWhy>,
    /// Batches classified, by class, and writes by reason (`SHOW ROUTES`).
    pub routes: RouteStats,
}

/// Counters of the router's decisions.
#[derive(Default)]
pub struct RouteStats {
    pub reads: AtomicU64,
    pub read_only_transactions: AtomicU64,
    pub writes: AtomicU64,
    /// Writes held back on a replica until it was given back (pipelined behind reads).
    pub held_writes: AtomicU64,
    /// Reads sent again elsewhere after their replica was lost.
    pub replayed_reads: AtomicU64,
    /// Catalog lookups of function names.
    pub function_lookups: AtomicU64,
    /// Session reads that waited for a replica to replay their floor, and those that got it.
    pub floor_probes: AtomicU64,
    write_reasons: Counts<&'static str>,
}

impl RouteStats {
    pub fn write(&self, why: &'static str) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.write_reasons.bump(why);
    }

    pub fn write_reasons(&self) -> Vec<(&'static str, u64)> {
        self.write_reasons.sorted()
    }
}

/// Counts by key.
pub struct Counts<K>(Mutex<HashMap<K, u64>>);

impl<K> Default for Counts<K> {
    fn default() -> Self {
        Counts(Mutex::new(HashMap::new()))
    }
}

impl<K: std::hash::Hash + Eq + Ord + Copy> Counts<K> {
    pub fn bump(&self, key: K) {
        *self.0.lock().expect("counts lock").entry(key).or_default() += 1;
    }

    pub fn sorted(&self) -> Vec<(K, u64)> {
        let mut v: Vec<_> = self
            .0
            .lock()
            .expect("counts lock")
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        v.sort();
        v
    }
}

impl Nodes {
    pub fn get(&self, id: &NodeId) -> Arc<NodeState> {
        if let Some(n) = self.map.read().expect("nodes lock").get(id) {
            return n.clone();
        }
        self.map
            .write()
            .expect("nodes lock")
            .entry(id.clone())
            .or_insert_with(|| Arc::new(NodeState::new(id.clone())))
            .clone()
    }

    pub fn all(&self) -> Vec<Arc<NodeState>> {
        let mut v: Vec<_> = self
            .map
            .read()
            .expect("nodes lock")
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Takes in `view` unless it is the one taken in last: replay positions (a lower bound of
    /// where each replica is) and rotation by lag.
    pub fn observe(&self, view: &Arc<ClusterView>, routing: &RoutingConfig) {
        {
            let mut seen = self.seen.lock().expect("seen lock");
            if seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, view)) {
                return;
            }
            *seen = Some(view.clone());
        }
        for n in &view.nodes {
            if n.role != Role::Replica {
                continue;
            }
            let state = self.get(&n.id);
            let timeline = n.timeline.map_or(u64::MAX, u64::from);
            let before = state.timeline.swap(timeline, Ordering::AcqRel);
            if before != timeline && before != u64::MAX {
                // Rewound or re-cloned: only what the view says now holds.
                state
                    .replayed
                    .store(n.lsn.map_or(0, |l| l.0), Ordering::Release);
                *state.probed.lock().expect("probe lock") = None;
            }
            if let Some(lsn) = n.lsn {
                state.replayed.fetch_max(lsn.0, Ordering::AcqRel);
            }
            state
                .lag
                .store(n.replay_lag_bytes.unwrap_or(u64::MAX), Ordering::Relaxed);
            let mut rotation = state.rotation.lock().expect("rotation lock");
            let by_bytes = router::in_rotation(
                *rotation,
                n.replay_lag_bytes,
                routing.max_replica_lag.bytes(),
                routing.lag_return_percent,
            );
            // In time too when `max_replica_lag_time` is set (in milliseconds): both must hold.
            let by_time = routing.max_replica_lag_time.map_or(true, |max| {
                router::in_rotation(
                    *rotation,
                    n.replay_lag_seconds.map(|s| (s.max(0.0) * 1000.0) as u64),
                    max.as_millis() as u64,
                    routing.lag_return_percent,
                )
            });
            let next = by_bytes && by_time;
            if *rotation == Some(true) && !next {
                tracing::warn!(node = %n.id, lag_bytes = ?n.replay_lag_bytes, lag_seconds = ?n.replay_lag_seconds, "replica out of read rotation: replay lag past max_replica_lag or max_replica_lag_time");
            } else if *rotation == Some(false) && next {
                tracing::info!(node = %n.id, lag_bytes = ?n.replay_lag_bytes, lag_seconds = ?n.replay_lag_seconds, "replica back in read rotation");
            }
            *rotation = Some(next);
        }
    }

    pub fn count_primary_read(&self, why: PrimaryWhy) {
        self.primary_reads.bump(why);
    }

    pub fn primary_reads(&self) -> Vec<(PrimaryWhy, u64)> {
        self.primary_reads.sorted()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_session_probes_a_replica_and_the_others_take_its_answers() {
        let n = Arc::new(NodeState::new(NodeId::new("n2")));
        let soon = || tokio::time::Instant::now() + Duration::from_secs(5);
        let turn = n.probe_turn().expect("the first asker probes");
        assert!(n.probe_turn().is_none(), "one prober at a time");
        // A waiter is woken by the prober's answer that reaches its floor.
        let waiter = {
            let n = n.clone();
            tokio::spawn(async move {
                let (reached, turn) = n.replayed_or_turn(Lsn(200), soon()).await;
                (reached, turn.is_some())
            })
        };
        tokio::task::yield_now().await;
        n.probed(Lsn(100), Instant::now(), true);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "100 is not 200");
        n.probed(Lsn(250), Instant::now(), true);
        assert_eq!(waiter.await.expect("waiter"), (true, false));
        // One behind the answers gets the turn when the prober gives it up.
        let next = {
            let n = n.clone();
            tokio::spawn(async move {
                let (reached, turn) = n.replayed_or_turn(Lsn(900), soon()).await;
                (reached, turn.is_some())
            })
        };
        tokio::task::yield_now().await;
        drop(turn);
        assert_eq!(next.await.expect("next"), (false, true));
        // With the turn taken and no answer, the wait ends at its deadline.
        let _held = n.probe_turn().expect("free again");
        let short = tokio::time::Instant::now() + Duration::from_millis(20);
        let (reached, turn) = n.replayed_or_turn(Lsn(900), short).await;
        assert!(!reached && turn.is_none());
        assert!(tokio::time::Instant::now() >= short);
    }

    #[test]
    fn failures_ban_with_backoff() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let fail = |h: Health, at| h.failed(at, 3, s(2), s(10));
        let h = fail(fail(Health::default(), t0), t0);
        assert!(!h.banned(t0), "two failures: not yet");
        let h = fail(h, t0);
        assert!(
            h.banned(t0) && !h.banned(t0 + s(2)),
            "the third bans for 2 s"
        );
        let h = fail(fail(fail(h, t0 + s(2)), t0 + s(2)), t0 + s(2));
        assert_eq!(
            h.banned_until,
            Some(t0 + s(6)),
            "the next ban is twice as long"
        );
        let h = fail(fail(fail(h, t0 + s(6)), t0 + s(6)), t0 + s(6));
        assert_eq!(h.banned_until, Some(t0 + s(14)), "capped at max_ban_time");
        let during = h.succeeded(t0 + s(7));
        assert!(
            during.banned(t0 + s(7)),
            "a success does not lift a running ban"
        );
        let after = h.succeeded(t0 + s(15));
        assert_eq!(
            after,
            Health::default(),
            "after it, everything is forgotten"
        );
        let h = fail(fail(after, t0), t0);
        assert_eq!(h.succeeded(t0).failures, 0, "a success resets the count");
    }
}
