//! The monitor actor: probes every node each `monitor.interval` and publishes a [`ClusterView`]
//! over a `watch` channel. Consumers (the proxy, the status API) hold the receiver and never
//! poll nodes themselves. It keeps one connection per node between probes (see
//! [`crate::probe::Prober`]).
//!
//! The leader is decided by [`crate::leader`]: a promoted node is followed only if it descends
//! from the leader followed before it. The epoch is the leader's timeline, so every monitor
//! watching the same cluster derives the same one.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use pgwarden_config::Config;
use pgwarden_core::{Epoch, NodeId};
use tokio::sync::watch;

use crate::leader::{self, Candidate, Followed};
use crate::probe::NodeSample;
use crate::status::{ClusterStatus, NodeDetail};
pub use crate::view::{ClusterView, NodeView};

/// What the monitor carries from one round to the next.
#[derive(Debug, Default, Clone)]
pub struct Lineage {
    /// The leader last followed (kept while nobody is).
    pub followed: Option<Followed>,
}

/// The primaries among the samples, in config order, with their index into the nodes.
fn candidates(config: &Config, samples: &[NodeSample]) -> Vec<(usize, Candidate)> {
    samples
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s {
            NodeSample::Primary {
                lsn,
                timeline,
                history,
                ..
            } => {
                let history = match (history, *timeline) {
                    (_, 0 | 1) => Ok(Vec::new()),
                    (Some(text), _) => leader::parse_history(text),
                    (None, t) => Err(format!("pg_wal/{t:08X}.history is missing")),
                };
                Some((
                    i,
                    Candidate {
                        name: config.nodes[i].name.clone(),
                        timeline: *timeline,
                        lsn: *lsn,
                        history,
                    },
                ))
            }
            _ => None,
        })
        .collect()
}

/// Derives a view from one round's samples and the lineage so far (updated in place).
pub fn view_of(
    config: &Config,
    samples: Vec<NodeSample>,
    lineage: &mut Lineage,
    at: SystemTime,
) -> ClusterView {
    let found = candidates(config, &samples);
    let primaries: Vec<Candidate> = found.iter().map(|(_, c)| c.clone()).collect();
    let decision = leader::decide(
        lineage.followed.as_ref(),
        &primaries,
        config.monitor.follow_promotions,
    );
    // Nobody is being promoted while every reachable replica streams.
    let settled = samples.iter().all(|s| match s {
        NodeSample::Replica { receiver_state, .. } => {
            receiver_state.as_deref() == Some("streaming")
        }
        NodeSample::Primary { .. } | NodeSample::Down(_) => true,
    });
    lineage.followed =
        leader::followed_after(lineage.followed.as_ref(), &primaries, &decision, settled);
    let leader = decision.leader.map(|i| NodeId::new(&primaries[i].name));
    let epoch = Epoch(
        lineage
            .followed
            .as_ref()
            .map_or(0, |f| u64::from(f.timeline)),
    );
    let status = ClusterStatus::build(config, samples, at);
    let nodes = status
        .nodes
        .iter()
        .map(|n| {
            let (timeline, lsn, replay_lag_bytes, replay_lag_seconds) = match &n.detail {
                NodeDetail::Primary { timeline, lsn } => {
                    (Some(*timeline), lsn.parse().ok(), None, None)
                }
                NodeDetail::Replica {
                    timeline,
                    replay_lsn,
                    lag_bytes,
                    replay_lag_seconds,
                    ..
                } => (
                    *timeline,
                    replay_lsn.as_deref().and_then(|l| l.parse().ok()),
                    lag_bytes.replay,
                    *replay_lag_seconds,
                ),
                NodeDetail::Down {} => (None, None, None, None),
            };
            NodeView {
                id: NodeId::new(&n.name),
                host: n.host.clone(),
                port: n.port,
                role: n.role,
                timeline,
                lsn,
                replay_lag_bytes,
                replay_lag_seconds,
                reason: None,
                reason_code: None,
            }
        })
        .collect();
    ClusterView {
        epoch,
        leader,
        nodes,
        checked_at: Instant::now(),
        refused: decision.refused,
        status: Some(Arc::new(status)),
        writes_hold_from: None,
    }
}

/// Starts the monitor on the current runtime. The first view is published before this returns;
/// the task ends when every receiver is dropped.
pub async fn spawn(config: Arc<Config>) -> watch::Receiver<Arc<ClusterView>> {
    let mut prober = crate::probe::Prober::default();
    let mut lineage = Lineage::default();
    let samples = prober.probe_all(&config).await;
    let first = view_of(&config, samples, &mut lineage, SystemTime::now());
    log_change(None, &first);
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(config.monitor.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; the first view is already out
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = tick.tick() => {}
            }
            let samples = prober.probe_all(&config).await;
            let view = view_of(&config, samples, &mut lineage, SystemTime::now());
            let previous = tx.borrow().clone();
            log_change(Some(&previous), &view);
            if tx.send(Arc::new(view)).is_err() {
                return;
            }
        }
    });
    rx
}

/// Logs a change of leader or of the reasons primaries are refused, once.
fn log_change(previous: Option<&ClusterView>, view: &ClusterView) {
    let leader = view.leader.as_ref().map_or("none", |l| l.as_str());
    let changed = previous.map_or(true, |p| p.leader != view.leader || p.epoch != view.epoch);
    if changed {
        tracing::info!(epoch = %view.epoch, leader, "leader changed");
    }
    if previous.map_or(true, |p| p.refused != view.refused) {
        for why in &view.refused {
            tracing::warn!(epoch = %view.epoch, leader, "primary not followed: {why}");
        }
    }
}
