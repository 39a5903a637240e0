//! The cluster view from the store, for the proxy when agents run: the leader and epoch come
//! from the leader key, watched rather than polled (a refresh every `loop_wait` keeps the
//! view's `checked_at` current; when the store cannot be read it stops advancing, so the
//! proxy refuses writes once the view is older than `proxy.max_view_age`).
//!
//! The key holder is the leader only once it reports itself a running primary under that
//! epoch: while it is being promoted the view has no leader, and the proxy holds new
//! transactions instead of sending them to a server that is still read-only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwarden_cluster::view::{ClusterView, NodeView};
use pgwarden_cluster::Role;
use pgwarden_core::Epoch;
use pgwarden_dcs::{ClusterStore, Kv, Snapshot};
use tokio::sync::watch;

use crate::member::MemberState;

/// The view a store snapshot gives.
pub fn view_of(snap: &Snapshot<MemberState>, checked_at: Instant) -> ClusterView {
    let nodes: Vec<NodeView> = snap
        .members
        .iter()
        .map(|m| NodeView {
            id: m.node.clone(),
            host: m.state.host.clone(),
            port: m.state.port,
            role: match (m.state.state.as_str(), m.state.primary) {
                ("running", true) => Role::Primary,
                ("running", false) => Role::Replica,
                _ => Role::Down,
            },
            timeline: m.state.timeline,
            // A replica's is what it has replayed (what a read there sees), not what it has
            // received: unknown if its agent does not say.
            lsn: if m.state.primary {
                m.state.lsn.as_deref()
            } else {
                m.state.replay_lsn.as_deref()
            }
            .and_then(|l| l.parse().ok()),
            replay_lag_bytes: if m.state.primary {
                None
            } else {
                m.state.replay_lag_bytes
            },
            replay_lag_seconds: if m.state.primary {
                None
            } else {
                m.state.replay_lag_ms.map(|ms| ms as f64 / 1000.0)
            },
            reason: m.state.reason.clone(),
            reason_code: m.state.reason_code.clone(),
        })
        .collect();
    let mut refused = Vec::new();
    let leader = snap.leader.as_ref().and_then(|key| {
        let m = snap.members.iter().find(|m| m.node == key.node);
        let ready = m.is_some_and(|m| {
            m.state.primary && m.state.state == "running" && m.state.epoch == Some(key.epoch.0)
        });
        if !ready {
            refused.push(format!(
                "{} holds the leader key (epoch {}) but is not yet a writable primary",
                key.node, key.epoch
            ));
        }
        ready.then(|| key.node.clone())
    });
    ClusterView {
        epoch: snap.leader.as_ref().map_or(Epoch(0), |l| l.epoch),
        leader,
        nodes,
        checked_at,
        refused,
        status: None,
        writes_hold_from: None,
    }
}

/// How long before the leader could fence itself new transactions are held: room for the
/// short ones started just before to finish.
pub const HOLD_AHEAD: Duration = Duration::from_millis(500);

/// When new transactions should wait, given that the leader's lease had `left` at `now`: from
/// `HOLD_AHEAD` before its agent may fence (`fence_margin` before the lease runs out). The
/// agent fences at its own last renewal + `ttl - fence_margin`, never before etcd's deadline
/// minus `fence_margin`, and etcd's `left` is rounded down, so this is early, never late.
pub fn hold_from(now: Instant, left: Duration, fence_margin: Duration) -> Instant {
    now + left.saturating_sub(fence_margin + HOLD_AHEAD)
}

/// A view from the store now: its snapshot, and the leader lease's time left.
async fn read<K: Kv>(
    store: &ClusterStore<K>,
    fence_margin: Duration,
) -> Result<ClusterView, pgwarden_dcs::DcsError> {
    let snap = store.snapshot::<MemberState>().await?;
    let now = Instant::now();
    let mut view = view_of(&snap, now);
    if snap
        .switchover
        .as_ref()
        .is_some_and(|sw| crate::switchover::holds_writes(&sw.value, crate::switchover::unix_ms()))
    {
        // A switchover drains the leader: new transactions wait for the next leader, running
        // ones finish.
        view.writes_hold_from = Some(now);
        return Ok(view);
    }
    if let (Some(_), Some(lease)) = (&view.leader, snap.leader.as_ref().and_then(|l| l.lease)) {
        // Unknown (the call failed) holds nothing: a silent store makes the view stale instead.
        if let Ok(left) = store.kv().time_to_live(lease).await {
            view.writes_hold_from = Some(hold_from(now, left.unwrap_or_default(), fence_margin));
        }
    }
    Ok(view)
}

/// Follows the store: a new view on every change of the cluster's keys and at least every
/// `refresh`; writes are held from shortly before a leader whose lease runs out unrenewed
/// could fence itself (`fence_margin` before the lease's end), and while a switchover drains
/// the leader.
pub async fn spawn<K: Kv>(
    store: Arc<ClusterStore<K>>,
    refresh: Duration,
    fence_margin: Duration,
) -> watch::Receiver<Arc<ClusterView>> {
    let first = match read(&store, fence_margin).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the store: no leader until it answers");
            ClusterView::empty()
        }
    };
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(follow(store, refresh, fence_margin, None, tx));
    rx
}

/// The view of the etcd store of `[dcs]`, for a proxy that may start before etcd answers:
/// empty (no leader: writes are held, then refused) until the store first answers, then
/// followed as [`spawn`] does. [`follow`] reads once before it first waits.
pub fn spawn_etcd(config: Arc<pgwarden_config::Config>) -> watch::Receiver<Arc<ClusterView>> {
    let (tx, rx) = watch::channel(Arc::new(ClusterView::empty()));
    tokio::spawn(async move {
        let (_never, mut stop) = watch::channel(false);
        let store = tokio::select! {
            r = crate::store::connect_waiting(&config, None, &mut stop) => r,
            _ = tx.closed() => return,
        };
        let margin = config.agent.fence_margin;
        match store {
            Ok(Some(store)) => {
                let failsafe = config.agent.failsafe.then(|| FailsafeProbe::of(&config));
                follow(
                    Arc::new(store),
                    config.agent.loop_wait,
                    margin,
                    failsafe,
                    tx,
                )
                .await
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "no cluster view: writes are refused"),
        }
    });
    rx
}

/// Failsafe mode, for a proxy that cannot read the store: how to ask the leader it knew
/// whether it still leads without the store (`GET /failsafe` on its agent).
struct FailsafeProbe {
    apis: Vec<(pgwarden_core::NodeId, String)>,
    authorization: Option<String>,
}

impl FailsafeProbe {
    fn of(config: &pgwarden_config::Config) -> FailsafeProbe {
        FailsafeProbe {
            apis: config
                .nodes
                .iter()
                .filter_map(|n| Some((pgwarden_core::NodeId::new(&n.name), n.api?.to_string())))
                .collect(),
            authorization: crate::api_write::peer_authorization(config),
        }
    }

    /// The last view, fresh again, if its leader answers that it still leads under its epoch
    /// without the store: new transactions are held from shortly before it would fence.
    async fn confirm(&self, last: &ClusterView) -> Option<ClusterView> {
        let leader = last.leader.as_ref()?;
        let (_, api) = self.apis.iter().find(|(n, _)| n == leader)?;
        let (status, body) = crate::api::call(
            api,
            "GET",
            "/failsafe",
            self.authorization.as_deref(),
            "",
            Duration::from_millis(500),
        )
        .await?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let same = status == 200
            && v["leader"] == leader.as_str()
            && v["epoch"].as_u64() == Some(last.epoch.0);
        if !same {
            return None;
        }
        let now = Instant::now();
        let left = Duration::from_millis(v["fence_in_ms"].as_u64()?);
        let mut view = last.clone();
        view.checked_at = now;
        view.writes_hold_from = Some(now + left.saturating_sub(HOLD_AHEAD));
        Some(view)
    }
}

async fn follow<K: Kv>(
    store: Arc<ClusterStore<K>>,
    refresh: Duration,
    fence_margin: Duration,
    failsafe: Option<FailsafeProbe>,
    tx: watch::Sender<Arc<ClusterView>>,
) {
    let mut changes = store.watch().await.ok();
    loop {
        match read(&store, fence_margin).await {
            Ok(view) => {
                let previous = tx.borrow().clone();
                if previous.leader != view.leader || previous.epoch != view.epoch {
                    tracing::info!(
                        epoch = %view.epoch,
                        leader = view.leader.as_ref().map_or("none", |l| l.as_str()),
                        "leader changed"
                    );
                }
                if tx.send(Arc::new(view)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let last = tx.borrow().clone();
                let confirmed = match &failsafe {
                    Some(probe) => probe.confirm(&last).await,
                    None => None,
                };
                match confirmed {
                    Some(view) => {
                        tracing::info!(error = %e, leader = ?view.leader, "cannot read the store; failsafe: the leader confirms it leads on");
                        if tx.send(Arc::new(view)).is_err() {
                            return;
                        }
                    }
                    None => tracing::warn!(error = %e, "cannot read the store; the view ages"),
                }
            }
        }
        let changed = async {
            let alive = match changes.as_mut() {
                Some(w) => w.changed().await.is_ok(),
                None => false,
            };
            if !alive {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = tx.closed() => return,
            _ = changed => {}
            _ = tokio::time::sleep(refresh) => {}
        }
        if changes.as_ref().map_or(true, |w| w.has_changed().is_err()) {
            // Never made, or ended (the store restarted): watch again.
            changes = store.watch().await.ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwarden_core::NodeId;
    use pgwarden_dcs::{Leader, Member};

    #[test]
    fn writes_are_held_shortly_before_the_leader_may_fence() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        #[rustfmt::skip]
        let cases = [
            ("just renewed (ttl 7 s, margin 2 s)", ms(7000), ms(2000), ms(4500)),
            ("left rounded down to 5 s", ms(5000), ms(2000), ms(2500)),
            ("within the margin: now", ms(2000), ms(2000), ms(0)),
            ("gone: now", ms(0), ms(2000), ms(0)),
        ];
        for (what, left, margin, after) in cases {
            assert_eq!(hold_from(now, left, margin), now + after, "{what}");
        }
    }

    fn member(name: &str, primary: bool, epoch: Option<u64>) -> Member<MemberState> {
        Member {
            node: NodeId::new(name),
            state: MemberState {
                role: if primary { "leader" } else { "replica" }.into(),
                state: "running".into(),
                primary,
                timeline: Some(2),
                lsn: Some("0/3000000".into()),
                streaming: !primary,
                lag_bytes: Some(0),
                replay_lsn: (!primary).then(|| "0/2000000".into()),
                replay_lag_bytes: (!primary).then_some(0),
                replay_lag_ms: (!primary).then_some(0),
                epoch,
                ready: primary,
                host: "127.0.0.1".into(),
                port: 5432,
                api: None,
                priority: 1,
                nofailover: false,
                nosync: false,
                reason: None,
                reason_code: None,
                started_ms: None,
            },
        }
    }

    fn snap(
        leader: Option<(&str, u64)>,
        members: Vec<Member<MemberState>>,
    ) -> Snapshot<MemberState> {
        Snapshot {
            leader: leader.map(|(n, e)| Leader {
                node: NodeId::new(n),
                epoch: Epoch(e),
                revision: 1,
                lease: None,
            }),
            members,
            ..Snapshot::default()
        }
    }

    #[test]
    fn the_leader_is_the_key_holder_once_it_is_a_writable_primary() {
        let now = Instant::now();
        #[rustfmt::skip]
        let cases = [
            ("settled", snap(Some(("n1", 3)), vec![member("n1", true, Some(3)), member("n2", false, None)]), Some("n1"), 3),
            ("being promoted: still a standby", snap(Some(("n2", 4)), vec![member("n1", true, Some(3)), member("n2", false, None)]), None, 4),
            ("promoted but publishing the old epoch", snap(Some(("n2", 4)), vec![member("n2", true, Some(3))]), None, 4),
            ("a primary without the key is never the leader", snap(None, vec![member("n1", true, Some(3))]), None, 0),
            ("the holder has no member key", snap(Some(("n1", 3)), vec![]), None, 3),
        ];
        for (what, s, leader, epoch) in cases {
            let v = view_of(&s, now);
            assert_eq!(v.leader.as_ref().map(|l| l.as_str()), leader, "{what}");
            assert_eq!(v.epoch, Epoch(epoch), "{what}");
        }
    }

    #[test]
    fn a_replica_is_seen_at_the_position_it_has_replayed_not_received() {
        let mut behind = member("n2", false, None);
        behind.state.lsn = Some("0/3000000".into());
        behind.state.replay_lsn = Some("0/2000000".into());
        behind.state.replay_lag_bytes = Some(0x100_0000);
        behind.state.replay_lag_ms = Some(2500);
        behind.state.reason = Some("paused (pgwarden resume): no automatic action".into());
        let mut older = member("n3", false, None);
        older.state.replay_lsn = None;
        let s = snap(
            Some(("n1", 3)),
            vec![member("n1", true, Some(3)), behind, older],
        );
        let v = view_of(&s, Instant::now());
        assert_eq!(v.nodes[0].lsn, Some("0/3000000".parse().expect("lsn")));
        assert_eq!(v.nodes[1].lsn, Some("0/2000000".parse().expect("lsn")));
        assert_eq!(v.nodes[1].replay_lag_bytes, Some(0x100_0000));
        assert_eq!(v.nodes[1].replay_lag_seconds, Some(2.5));
        assert_eq!(
            v.nodes[1].reason.as_deref(),
            Some("paused (pgwarden resume): no automatic action"),
            "the agent's reason reaches the proxy"
        );
        assert_eq!(v.nodes[2].lsn, None, "an agent that does not say: unknown");
    }
}
