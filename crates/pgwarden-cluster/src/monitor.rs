//! The monitor actor: probes every node each `monitor.interval` and publishes a [`ClusterView`]
//! over a `watch` channel. Consumers (the proxy, the status API) hold the receiver and never
//! poll nodes themselves. It keeps one connection per node between probes (see
//! [`crate::probe::Prober`]).

use std::sync::Arc;
use std::time::Instant;

use pgwarden_config::Config;
use tokio::sync::watch;

use crate::status::{ClusterStatus, NodeDetail, Role};

/// One node as consumers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub role: Role,
    pub timeline: Option<u32>,
    /// Replay lag behind the primary in bytes (replicas, when known).
    pub replay_lag_bytes: Option<u64>,
}

/// A snapshot of the cluster.
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// Goes up by one every time the primary changes (including to and from "none"): a consumer
    /// that sees a new epoch drops every connection made under the old one.
    pub epoch: u64,
    /// Index into `nodes` of the node that takes writes.
    pub primary: Option<usize>,
    pub nodes: Vec<NodeView>,
    pub checked_at: Instant,
    /// The full status behind this view.
    pub status: Arc<ClusterStatus>,
}

impl ClusterView {
    pub fn primary(&self) -> Option<&NodeView> {
        self.primary.map(|i| &self.nodes[i])
    }

    /// Derives a view from a status; `previous` carries the epoch forward.
    pub fn from_status(status: ClusterStatus, previous: Option<&ClusterView>) -> ClusterView {
        let nodes: Vec<NodeView> = status
            .nodes
            .iter()
            .map(|n| {
                let (timeline, replay_lag_bytes) = match &n.detail {
                    NodeDetail::Primary { timeline, .. } => (Some(*timeline), None),
                    NodeDetail::Replica {
                        timeline,
                        lag_bytes,
                        ..
                    } => (*timeline, lag_bytes.replay),
                    NodeDetail::Down {} => (None, None),
                };
                NodeView {
                    name: n.name.clone(),
                    host: n.host.clone(),
                    port: n.port,
                    role: n.role,
                    timeline,
                    replay_lag_bytes,
                }
            })
            .collect();
        let primary = choose_primary(&nodes);
        let epoch = match previous {
            None => 1,
            Some(prev) => {
                let before = prev.primary().map(|p| (&p.name, p.timeline));
                let now = primary.map(|i| (&nodes[i].name, nodes[i].timeline));
                if before == now {
                    prev.epoch
                } else {
                    prev.epoch + 1
                }
            }
        };
        ClusterView {
            epoch,
            primary,
            nodes,
            checked_at: Instant::now(),
            status: Arc::new(status),
        }
    }
}

/// The node that takes writes: the only primary, or with several (a promoted standby next to a
/// not yet fenced old primary) the one on the newest timeline, which is the promoted one. Two
/// primaries on the same timeline cannot be told apart: none is chosen.
pub fn choose_primary(nodes: &[NodeView]) -> Option<usize> {
    let primaries: Vec<usize> = (0..nodes.len())
        .filter(|&i| nodes[i].role == Role::Primary)
        .collect();
    match primaries.as_slice() {
        [] => None,
        [one] => Some(*one),
        many => {
            let newest = many.iter().map(|&i| nodes[i].timeline).max()?;
            let on_newest: Vec<usize> = many
                .iter()
                .copied()
                .filter(|&i| nodes[i].timeline == newest)
                .collect();
            (on_newest.len() == 1).then(|| on_newest[0])
        }
    }
}

/// Starts the monitor on the current runtime. The first view is published before this returns;
/// the task ends when every receiver is dropped.
pub async fn spawn(config: Arc<Config>) -> watch::Receiver<Arc<ClusterView>> {
    let mut prober = crate::probe::Prober::default();
    let first = Arc::new(ClusterView::from_status(
        crate::check_with(&mut prober, &config).await,
        None,
    ));
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(config.monitor.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; the first view is already out
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = tick.tick() => {}
            }
            let status = crate::check_with(&mut prober, &config).await;
            let previous = tx.borrow().clone();
            let view = ClusterView::from_status(status, Some(&previous));
            if view.epoch != previous.epoch {
                tracing::info!(
                    epoch = view.epoch,
                    primary = view.primary().map(|p| p.name.as_str()).unwrap_or("none"),
                    "primary changed"
                );
            }
            if tx.send(Arc::new(view)).is_err() {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, role: Role, timeline: Option<u32>) -> NodeView {
        NodeView {
            name: name.into(),
            host: "h".into(),
            port: 1,
            role,
            timeline,
            replay_lag_bytes: None,
        }
    }

    #[test]
    fn primary_choice() {
        use Role::*;
        let cases: Vec<(Vec<NodeView>, Option<usize>)> = vec![
            (
                vec![node("a", Primary, Some(1)), node("b", Replica, Some(1))],
                Some(0),
            ),
            (
                vec![node("a", Down, None), node("b", Replica, Some(1))],
                None,
            ),
            (
                vec![node("a", Primary, Some(1)), node("b", Primary, Some(2))],
                Some(1),
            ),
            (
                vec![node("a", Primary, Some(3)), node("b", Primary, Some(2))],
                Some(0),
            ),
            (
                vec![node("a", Primary, Some(2)), node("b", Primary, Some(2))],
                None,
            ),
        ];
        for (nodes, want) in cases {
            assert_eq!(choose_primary(&nodes), want, "{nodes:?}");
        }
    }
}
