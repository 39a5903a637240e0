//! The one router: which node serves a client's next transaction, decided before every
//! checkout from the current [`Routing`] and what the session asks for. Every path that checks
//! out a server goes through [`route`], fast paths included. Pure: tested table by table.
//!
//! Today every transaction may write, so every route is the leader's. The same function answers
//! whether a server connection may keep serving ([`still_leads`]): the relay asks it whenever
//! the view changes, and cuts the connection when it may not.

use std::time::Duration;

use pgwarden_cluster::status::Role;
use pgwarden_core::{Epoch, NodeId};

use crate::topology::Routing;

/// What a session needs from its next server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The transaction may write (it must reach the leader of the current epoch).
    pub writes: bool,
}

impl Request {
    pub const WRITE: Request = Request { writes: true };
}

/// Where to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This node, fenced by this epoch.
    Node(NodeId, Epoch),
    /// Nowhere now; the session may wait for the view to change.
    Unavailable(Unavailable),
}

/// Why no node can take the transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// No node takes writes.
    NoLeader,
    /// Primaries exist but none is followed (split brain, a promotion that lost writes).
    Refused(String),
    /// The view source has been silent this long: its leader may have been deposed.
    Stale(Duration),
    /// The view names a leader that it also reports down.
    LeaderDown(NodeId),
    /// The leader's lease is running out unrenewed: it may fence itself any moment, so a new
    /// transaction waits for a renewal or the next leader rather than start there.
    LeaseEnding(NodeId),
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unavailable::NoLeader => write!(f, "no primary is available"),
            Unavailable::Refused(why) => write!(f, "writes are refused: {why}"),
            Unavailable::Stale(age) => write!(
                f,
                "writes are refused: the cluster view is stale (nothing heard for {})",
                pgwarden_core::format_duration(*age)
            ),
            Unavailable::LeaderDown(n) => write!(f, "the primary {n} is down"),
            Unavailable::LeaseEnding(n) => write!(
                f,
                "the primary {n} has not renewed its leader lease and may be fencing itself"
            ),
        }
    }
}

/// The node for a transaction.
pub fn route(r: &Routing, req: Request) -> Route {
    // Reads will be routed here too (the routing issue); today every transaction may write.
    let _ = req.writes;
    if let Some(age) = r.stale {
        return Route::Unavailable(Unavailable::Stale(age));
    }
    let view = &r.view;
    let Some(leader) = &view.leader else {
        return Route::Unavailable(match view.refused.first() {
            Some(why) => Unavailable::Refused(why.clone()),
            None => Unavailable::NoLeader,
        });
    };
    match view.node(leader) {
        Some(n) if n.role != Role::Down && r.lease_ending => {
            Route::Unavailable(Unavailable::LeaseEnding(n.id.clone()))
        }
        Some(n) if n.role != Role::Down => Route::Node(leader.clone(), view.epoch),
        Some(_) => Route::Unavailable(Unavailable::LeaderDown(leader.clone())),
        None => Route::Unavailable(Unavailable::NoLeader),
    }
}

/// Whether a connection opened to `node` under `epoch` for writes may go on serving.
pub fn still_leads(r: &Routing, node: &NodeId, epoch: Epoch) -> bool {
    r.stale.is_none() && r.view.leader.as_ref() == Some(node) && r.view.epoch == epoch
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwarden_cluster::view::{ClusterView, NodeView};
    use std::sync::Arc;

    fn node(name: &str, role: Role) -> NodeView {
        NodeView {
            id: NodeId::new(name),
            host: "127.0.0.1".into(),
            port: 5432,
            role,
            timeline: Some(1),
            lsn: None,
            replay_lag_bytes: None,
        }
    }

    fn routing(
        leader: Option<&str>,
        epoch: u64,
        nodes: Vec<NodeView>,
        refused: &[&str],
        stale: Option<u64>,
    ) -> Routing {
        Routing {
            generation: 1,
            view: Arc::new(ClusterView {
                epoch: Epoch(epoch),
                leader: leader.map(NodeId::new),
                nodes,
                refused: refused.iter().map(|s| s.to_string()).collect(),
                ..ClusterView::empty()
            }),
            stale: stale.map(Duration::from_secs),
            lease_ending: false,
        }
    }

    fn ending(r: Routing) -> Routing {
        Routing {
            lease_ending: true,
            ..r
        }
    }

    #[test]
    fn routes() {
        use Role::*;
        let up = || vec![node("n1", Primary), node("n2", Replica)];
        let to = |n: &str, e: u64| Route::Node(NodeId::new(n), Epoch(e));
        let no = Route::Unavailable;
        #[rustfmt::skip]
        let cases: Vec<(&str, Routing, Route)> = vec![
            ("the leader", routing(Some("n1"), 3, up(), &[], None), to("n1", 3)),
            ("a leader on another node", routing(Some("n2"), 4, vec![node("n1", Down), node("n2", Primary)], &[], None), to("n2", 4)),
            ("no leader", routing(None, 3, up(), &[], None), no(Unavailable::NoLeader)),
            ("no leader: a primary refused", routing(None, 3, up(), &["n2 does not descend"], None), no(Unavailable::Refused("n2 does not descend".into()))),
            ("a stale view refuses writes", routing(Some("n1"), 3, up(), &[], Some(7)), no(Unavailable::Stale(Duration::from_secs(7)))),
            ("a leader reported down", routing(Some("n1"), 3, vec![node("n1", Down)], &[], None), no(Unavailable::LeaderDown(NodeId::new("n1")))),
            ("a leader not among the nodes", routing(Some("n9"), 3, up(), &[], None), no(Unavailable::NoLeader)),
            ("a leader whose lease runs out: wait", ending(routing(Some("n1"), 3, up(), &[], None)), no(Unavailable::LeaseEnding(NodeId::new("n1")))),
            ("a stale view before an ending lease", ending(routing(Some("n1"), 3, up(), &[], Some(7))), no(Unavailable::Stale(Duration::from_secs(7)))),
            ("no leader before an ending lease", ending(routing(None, 3, up(), &[], None)), no(Unavailable::NoLeader)),
        ];
        for (what, r, want) in cases {
            assert_eq!(route(&r, Request::WRITE), want, "{what}");
        }
    }

    #[test]
    fn which_connections_may_go_on() {
        let n1 = NodeId::new("n1");
        let up = || vec![node("n1", Role::Primary)];
        #[rustfmt::skip]
        let cases: Vec<(&str, Routing, Epoch, bool)> = vec![
            ("same leader, same epoch", routing(Some("n1"), 3, up(), &[], None), Epoch(3), true),
            ("a new epoch on the same node", routing(Some("n1"), 4, up(), &[], None), Epoch(3), false),
            ("another leader", routing(Some("n2"), 3, up(), &[], None), Epoch(3), false),
            ("no leader", routing(None, 3, up(), &[], None), Epoch(3), false),
            ("a stale view", routing(Some("n1"), 3, up(), &[], Some(9)), Epoch(3), false),
            ("an ending lease: running transactions go on", ending(routing(Some("n1"), 3, up(), &[], None)), Epoch(3), true),
        ];
        for (what, r, epoch, want) in cases {
            assert_eq!(still_leads(&r, &n1, epoch), want, "{what}");
        }
    }
}
