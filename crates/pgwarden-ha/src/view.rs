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
            lsn: m.state.lsn.as_deref().and_then(|l| l.parse().ok()),
            replay_lag_bytes: if m.state.primary {
                None
            } else {
                m.state.lag_bytes
            },
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
    }
}

/// Follows the store: a new view on every change of the cluster's keys and at least every
/// `refresh`.
pub async fn spawn<K: Kv>(
    store: Arc<ClusterStore<K>>,
    refresh: Duration,
) -> watch::Receiver<Arc<ClusterView>> {
    let first = match store.snapshot::<MemberState>().await {
        Ok(s) => view_of(&s, Instant::now()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the store: no leader until it answers");
            ClusterView::empty()
        }
    };
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(follow(store, refresh, tx));
    rx
}

/// The view of the etcd store of `[dcs]`, for a proxy that may start before etcd answers:
/// empty (no leader: writes are held, then refused) until the store first answers, then
/// followed as [`spawn`] does.
pub fn spawn_etcd(config: Arc<pgwarden_config::Config>) -> watch::Receiver<Arc<ClusterView>> {
    let (tx, rx) = watch::channel(Arc::new(ClusterView::empty()));
    tokio::spawn(async move {
        let (_never, mut stop) = watch::channel(false);
        let store = tokio::select! {
            r = crate::store::connect_waiting(&config, &mut stop) => r,
            _ = tx.closed() => return,
        };
        match store {
            Ok(Some(store)) => {
                if let Ok(s) = store.snapshot::<MemberState>().await {
                    tx.send_replace(Arc::new(view_of(&s, Instant::now())));
                }
                follow(Arc::new(store), config.agent.loop_wait, tx).await
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "no cluster view: writes are refused"),
        }
    });
    rx
}

async fn follow<K: Kv>(
    store: Arc<ClusterStore<K>>,
    refresh: Duration,
    tx: watch::Sender<Arc<ClusterView>>,
) {
    {
        let mut changes = store.watch().await.ok();
        loop {
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
            match store.snapshot::<MemberState>().await {
                Ok(s) => {
                    let view = view_of(&s, Instant::now());
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
                Err(e) => tracing::warn!(error = %e, "cannot read the store; the view ages"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwarden_core::NodeId;
    use pgwarden_dcs::{Leader, Member};

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
                epoch,
                ready: primary,
                host: "127.0.0.1".into(),
                port: 5432,
                api: None,
                priority: 1,
                nofailover: false,
                nosync: false,
                reason: None,
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
            last_epoch: None,
            initialized_by: None,
            last_leader: None,
            synchronous_set: None,
            members,
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
}
