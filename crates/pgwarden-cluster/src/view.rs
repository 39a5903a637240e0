//! [`ClusterView`]: the snapshot every consumer routes by. A view source (the monitor here; the
//! consensus store when agents run) publishes one over a `watch` channel; the proxy holds the
//! receiver and never polls nodes itself.

use std::sync::Arc;
use std::time::Instant;

use pgwarden_core::{Epoch, Lsn, NodeId};

use crate::status::{ClusterStatus, Role};

/// One node as consumers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub id: NodeId,
    pub host: String,
    pub port: u16,
    /// `Down` when the source could not reach it.
    pub role: Role,
    pub timeline: Option<u32>,
    /// A primary's current WAL position; a replica's last replayed one.
    pub lsn: Option<Lsn>,
    /// Replay lag behind the primary in bytes (replicas, when known).
    pub replay_lag_bytes: Option<u64>,
    /// Replay lag in seconds (replicas, when known): 0 when it has replayed all it received.
    pub replay_lag_seconds: Option<f64>,
    /// Why its agent does not act, as it publishes (the store's view; `None` from the monitor).
    pub reason: Option<String>,
    /// The same as a stable code (`paused`, `not_elected.lagging`, ...).
    pub reason_code: Option<String>,
}

/// A snapshot of the cluster.
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// The leader term (a fencing token): writes belong to (`leader`, `epoch`). When either
    /// changes, every connection made to the old leader is cut.
    pub epoch: Epoch,
    /// The node that takes writes, if any.
    pub leader: Option<NodeId>,
    pub nodes: Vec<NodeView>,
    /// When the source last confirmed this view: a consumer refuses writes once it is older
    /// than its bound (the source went silent).
    pub checked_at: Instant,
    /// Primaries that are not followed, and why (split brain, a promotion that lost writes).
    pub refused: Vec<String>,
    /// The full status behind this view, when the source is the monitor.
    pub status: Option<Arc<ClusterStatus>>,
    /// From this instant the leader may be about to fence itself (its lease is running out
    /// unrenewed): new transactions wait for a renewal or the next leader instead of starting
    /// on a server that may be stopped under them. Only the store, which knows the lease, sets it.
    pub writes_hold_from: Option<Instant>,
}

impl ClusterView {
    /// A view with nothing known yet (no leader).
    pub fn empty() -> ClusterView {
        ClusterView {
            epoch: Epoch(0),
            leader: None,
            nodes: Vec::new(),
            checked_at: Instant::now(),
            refused: Vec::new(),
            status: None,
            writes_hold_from: None,
        }
    }

    pub fn node(&self, id: &NodeId) -> Option<&NodeView> {
        self.nodes.iter().find(|n| &n.id == id)
    }

    /// The node that takes writes.
    pub fn leader_node(&self) -> Option<&NodeView> {
        self.leader.as_ref().and_then(|l| self.node(l))
    }
}
