//! The one router: which node serves a client's next transaction, decided before every
//! checkout from the current [`Routing`] and what the session asks for. Every path that checks
//! out a server goes through [`route`], fast paths included. Pure: tested table by table.
//!
//! A transaction that may write goes to the leader ([`route`]); one that only reads goes where
//! [`choose_read`] says: a replica in rotation that has replayed what the session must see,
//! picked by the balancing strategy, or the primary. The same module answers whether a server
//! connection may keep serving ([`still_leads`]): the relay asks it whenever the view changes,
//! and cuts the connection when it may not.

use std::time::Duration;

use pgwarden_cluster::status::Role;
use pgwarden_config::{Balance, Consistency, PrimaryReads};
use pgwarden_core::{Epoch, Lsn, NodeId};

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
    /// A read no replica can take, and `primary_reads = "never"`.
    NoReplica,
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
            Unavailable::NoReplica => write!(
                f,
                "no replica can take this read and primary_reads is \"never\""
            ),
            Unavailable::LeaseEnding(n) => write!(
                f,
                "the primary {n} is handing over (a switchover), or has not renewed its leader lease and may be fencing itself"
            ),
        }
    }
}

/// The node for a transaction that may write.
pub fn route(r: &Routing, req: Request) -> Route {
    debug_assert!(req.writes, "reads are routed by choose_read");
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

/// Whether `node` may serve reads under `r`: a replica of the view (a connection to it serves
/// reads while it is one; promoted, it serves them on as the primary).
pub fn serves_reads(r: &Routing, node: &NodeId) -> bool {
    r.view.node(node).is_some_and(|n| {
        n.role == Role::Replica || (n.role == Role::Primary && r.view.leader.as_ref() == Some(node))
    })
}

/// Whether a connection opened to `node` under `epoch` for writes may go on serving.
pub fn still_leads(r: &Routing, node: &NodeId, epoch: Epoch) -> bool {
    r.stale.is_none() && r.view.leader.as_ref() == Some(node) && r.view.epoch == epoch
}

/// A replica as a read sees it: its state from the view and the proxy's own measurements.
#[derive(Debug, Clone, PartialEq)]
pub struct Replica {
    pub id: NodeId,
    pub weight: u32,
    /// Server connections of this proxy busy on it now.
    pub in_flight: u32,
    /// Moving average of its transactions' latency, in microseconds (0: none measured yet).
    pub latency_us: u64,
    /// The WAL position it has surely replayed (the view's report or a probe of ours).
    pub replayed: Lsn,
    /// Why it is out of rotation, if it is.
    pub out: Option<Out>,
}

/// Why a replica takes no reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    /// Failures in a row banned it until its ban runs out.
    Banned,
    /// Its replay lag passed `max_replica_lag` and has not come back under the hysteresis mark.
    Lagging,
}

/// What one read asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub consistency: Consistency,
    pub primary_reads: PrimaryReads,
    pub balance: Balance,
    /// In `session` consistency, the WAL position a replica must have replayed (the session's
    /// last commit, and what it read before); `Lsn(0)` for none.
    pub floor: Lsn,
    /// Only this replica is known to be at or past what the session last read (its position
    /// since is not yet known): another one would need proof the session cannot have.
    pub only: Option<NodeId>,
    /// The client asked for a replica (`pgwarden:replica` hint, `pgwarden.route = replica`):
    /// consistency still holds, but the primary is never taken as one more candidate.
    pub replica_asked: bool,
}

/// Random draws and a rotation counter for the balancing strategies (the caller's, so that
/// choosing stays pure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dice {
    pub turn: u64,
    pub a: u64,
    pub b: u64,
}

/// Where a read goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadRoute {
    /// `replicas[index]`. `proven`: it has surely replayed the floor; otherwise the caller asks
    /// it first (`pg_last_wal_replay_lsn()`) and waits, bounded, for it to get there.
    Replica { index: usize, proven: bool },
    /// The primary, and why.
    Primary(PrimaryWhy),
    /// No node may take it (`primary_reads = "never"` and no replica can).
    NoReplica,
}

/// Why a read went to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PrimaryWhy {
    /// `consistency = "strong"`.
    Strong,
    /// No replica is in rotation.
    NoReplica,
    /// No replica has replayed what the session must see.
    Behind,
    /// `primary_reads = "always"` and the balancing picked it.
    Balanced,
}

impl PrimaryWhy {
    pub fn as_str(self) -> &'static str {
        match self {
            PrimaryWhy::Strong => "strong consistency",
            PrimaryWhy::NoReplica => "no replica in rotation",
            PrimaryWhy::Behind => "replicas behind the session",
            PrimaryWhy::Balanced => "balanced to the primary",
        }
    }
}

/// Where a read goes among `replicas` (every replica of the view that is up, in rotation or
/// not). The primary is taken when the consistency asks for it, when no replica in rotation can
/// serve the read (unless `primary_reads = "never"`), or as one more candidate under
/// `primary_reads = "always"`.
pub fn choose_read(replicas: &[Replica], read: &Read, dice: Dice) -> ReadRoute {
    let fallback = |why| match read.primary_reads {
        PrimaryReads::Never => ReadRoute::NoReplica,
        _ => ReadRoute::Primary(why),
    };
    if read.consistency == Consistency::Strong {
        return ReadRoute::Primary(PrimaryWhy::Strong);
    }
    let in_rotation: Vec<usize> = (0..replicas.len())
        .filter(|&i| replicas[i].out.is_none())
        .filter(|&i| read.only.as_ref().map_or(true, |o| *o == replicas[i].id))
        .collect();
    if in_rotation.is_empty() {
        let none_at_all = replicas.iter().all(|r| r.out.is_some());
        return fallback(if none_at_all || read.only.is_none() {
            PrimaryWhy::NoReplica
        } else {
            PrimaryWhy::Behind
        });
    }
    let session = read.consistency == Consistency::Session;
    let proven: Vec<usize> = in_rotation
        .iter()
        .copied()
        .filter(|&i| !session || replicas[i].replayed >= read.floor)
        .collect();
    let (pool, is_proven) = if !proven.is_empty() {
        (proven, true)
    } else {
        (in_rotation, false)
    };
    // Under "always" the primary is one more candidate, as if a replica that is never behind.
    if read.primary_reads == PrimaryReads::Always && !read.replica_asked && is_proven {
        let share = dice.b % (pool.len() as u64 + 1);
        if share == 0 {
            return ReadRoute::Primary(PrimaryWhy::Balanced);
        }
    }
    ReadRoute::Replica {
        index: pick(replicas, &pool, read.balance, dice),
        proven: is_proven,
    }
}

/// One of `pool` (indices into `replicas`, not empty) by the strategy.
fn pick(replicas: &[Replica], pool: &[usize], balance: Balance, dice: Dice) -> usize {
    let n = pool.len() as u64;
    match balance {
        Balance::RoundRobin => pool[(dice.turn % n) as usize],
        Balance::Random => pool[(dice.a % n) as usize],
        Balance::Weighted => {
            let total: u64 = pool.iter().map(|&i| u64::from(replicas[i].weight)).sum();
            if total == 0 {
                return pool[(dice.a % n) as usize];
            }
            let mut at = dice.a % total;
            for &i in pool {
                let w = u64::from(replicas[i].weight);
                if at < w {
                    return i;
                }
                at -= w;
            }
            unreachable!("the draw is below the total weight")
        }
        Balance::LeastConnections => {
            let least = pool
                .iter()
                .map(|&i| replicas[i].in_flight)
                .min()
                .unwrap_or(0);
            let ties: Vec<usize> = pool
                .iter()
                .copied()
                .filter(|&i| replicas[i].in_flight == least)
                .collect();
            ties[(dice.turn % ties.len() as u64) as usize]
        }
        Balance::Latency => {
            // Power of two choices: two at random, the one with the lower latency x load.
            let x = pool[(dice.a % n) as usize];
            let y = if n > 1 {
                // A second draw among the others.
                let k = (dice.a % n + 1 + dice.b % (n - 1)) % n;
                pool[k as usize]
            } else {
                x
            };
            let cost = |i: usize| {
                let r = &replicas[i];
                // Unmeasured: as good as the best, so that it gets measured.
                r.latency_us.max(1) * (u64::from(r.in_flight) + 1)
            };
            if cost(y) < cost(x) {
                y
            } else {
                x
            }
        }
    }
}

/// Whether a replica is in rotation after a view reports `lag` bytes: out past `max`, back in
/// only below `return_percent` of it; an unknown lag leaves it as it was (`was`; a replica
/// never seen with a known lag is out).
pub fn in_rotation(was: Option<bool>, lag: Option<u64>, max: u64, return_percent: u32) -> bool {
    match (lag, was) {
        (None, was) => was.unwrap_or(false),
        (Some(l), Some(true)) => l <= max,
        (Some(l), Some(false)) => {
            u128::from(l) * 100 < u128::from(max) * u128::from(return_percent)
        }
        (Some(l), None) => l <= max,
    }
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
            replay_lag_seconds: None,
            reason: None,
            reason_code: None,
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

    fn replica(name: &str, replayed: u64, out: Option<Out>) -> Replica {
        Replica {
            id: NodeId::new(name),
            weight: 100,
            in_flight: 0,
            latency_us: 0,
            replayed: pgwarden_core::Lsn(replayed),
            out,
        }
    }

    fn read(consistency: Consistency, primary_reads: PrimaryReads, floor: u64) -> Read {
        Read {
            consistency,
            primary_reads,
            balance: Balance::RoundRobin,
            floor: pgwarden_core::Lsn(floor),
            only: None,
            replica_asked: false,
        }
    }

    #[test]
    fn reads_go_to_replicas_that_can_serve_them() {
        use Consistency::*;
        use PrimaryReads::*;
        let two = || vec![replica("n2", 100, None), replica("n3", 200, None)];
        let at = |index, proven| ReadRoute::Replica { index, proven };
        let only = |r: Read, n: &str| Read {
            only: Some(NodeId::new(n)),
            ..r
        };
        let dice = Dice {
            turn: 0,
            a: 0,
            b: 0,
        };
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<Replica>, Read, ReadRoute)> = vec![
            ("eventual: any replica", two(), read(Eventual, Fallback, 0), at(0, true)),
            ("eventual ignores the floor", two(), read(Eventual, Fallback, 999), at(0, true)),
            ("strong: the primary", two(), read(Strong, Fallback, 0), ReadRoute::Primary(PrimaryWhy::Strong)),
            ("strong even under never", two(), read(Strong, Never, 0), ReadRoute::Primary(PrimaryWhy::Strong)),
            ("session: a replica past the floor", two(), read(Session, Fallback, 150), at(1, true)),
            ("session: at the floor is enough", two(), read(Session, Fallback, 200), at(1, true)),
            ("session: none past the floor, one to ask", two(), read(Session, Fallback, 300), at(0, false)),
            ("a banned replica is skipped", vec![replica("n2", 500, Some(Out::Banned)), replica("n3", 500, None)], read(Session, Fallback, 0), at(1, true)),
            ("a lagging replica is skipped", vec![replica("n2", 500, Some(Out::Lagging)), replica("n3", 500, None)], read(Eventual, Fallback, 0), at(1, true)),
            ("every replica out: the primary", vec![replica("n2", 500, Some(Out::Banned)), replica("n3", 500, Some(Out::Lagging))], read(Session, Fallback, 0), ReadRoute::Primary(PrimaryWhy::NoReplica)),
            ("no replica at all: the primary", vec![], read(Eventual, Fallback, 0), ReadRoute::Primary(PrimaryWhy::NoReplica)),
            ("no replica and never: nowhere", vec![], read(Eventual, Never, 0), ReadRoute::NoReplica),
            ("every replica out and never: nowhere", vec![replica("n2", 1, Some(Out::Banned))], read(Eventual, Never, 0), ReadRoute::NoReplica),
            ("monotonic: only the replica read last", two(), only(read(Session, Fallback, 0), "n3"), at(1, true)),
            ("monotonic: that replica out, the primary", vec![replica("n2", 900, None), replica("n3", 900, Some(Out::Lagging))], only(read(Session, Fallback, 0), "n3"), ReadRoute::Primary(PrimaryWhy::Behind)),
            ("monotonic: that replica gone, the primary", vec![replica("n2", 900, None)], only(read(Session, Fallback, 0), "n3"), ReadRoute::Primary(PrimaryWhy::Behind)),
            ("monotonic and never: nowhere", vec![replica("n2", 900, None)], only(read(Session, Never, 0), "n3"), ReadRoute::NoReplica),
            ("always: the primary is a candidate", two(), read(Eventual, Always, 0), ReadRoute::Primary(PrimaryWhy::Balanced)),
            ("always, but a replica asked for", two(), Read { replica_asked: true, ..read(Eventual, Always, 0) }, at(0, true)),
        ];
        for (what, replicas, r, want) in cases {
            assert_eq!(choose_read(&replicas, &r, dice), want, "{what}");
        }
        // Under "always" with the draw elsewhere, a replica.
        let r = read(Eventual, Always, 0);
        assert_eq!(
            choose_read(
                &two(),
                &r,
                Dice {
                    turn: 0,
                    a: 0,
                    b: 2
                }
            ),
            at(0, true)
        );
    }

    #[test]
    fn balancing_strategies_pick_as_they_say() {
        let mk = |w: [u32; 3], busy: [u32; 3], lat: [u64; 3]| -> Vec<Replica> {
            (0..3)
                .map(|i| Replica {
                    weight: w[i],
                    in_flight: busy[i],
                    latency_us: lat[i],
                    ..replica(&format!("n{i}"), 0, None)
                })
                .collect()
        };
        let pick_with = |rs: &[Replica], balance: Balance, dice: Dice| match choose_read(
            rs,
            &Read {
                balance,
                ..read(Consistency::Eventual, PrimaryReads::Fallback, 0)
            },
            dice,
        ) {
            ReadRoute::Replica { index, .. } => index,
            other => panic!("{other:?}"),
        };
        let flat = mk([100; 3], [0; 3], [0; 3]);
        // Round robin follows the turn.
        let rr: Vec<usize> = (0..6)
            .map(|t| {
                pick_with(
                    &flat,
                    Balance::RoundRobin,
                    Dice {
                        turn: t,
                        a: 0,
                        b: 0,
                    },
                )
            })
            .collect();
        assert_eq!(rr, vec![0, 1, 2, 0, 1, 2]);
        // Random follows the draw.
        assert_eq!(
            pick_with(
                &flat,
                Balance::Random,
                Dice {
                    turn: 0,
                    a: 5,
                    b: 0
                }
            ),
            2
        );
        // Weighted: draws below 100 the first, then 300 for the second, 100 for the third.
        let w = mk([100, 300, 100], [0; 3], [0; 3]);
        let weighted = |a| pick_with(&w, Balance::Weighted, Dice { turn: 0, a, b: 0 });
        assert_eq!(
            (
                weighted(0),
                weighted(99),
                weighted(100),
                weighted(399),
                weighted(400)
            ),
            (0, 0, 1, 1, 2)
        );
        // A zero weight never gets a read while another has weight.
        let z = mk([0, 100, 0], [0; 3], [0; 3]);
        assert!((0..50).all(|a| pick_with(&z, Balance::Weighted, Dice { turn: 0, a, b: 0 }) == 1));
        // Least connections: the least busy, ties in turn.
        let busy = mk([100; 3], [3, 1, 1], [0; 3]);
        let least = |t| {
            pick_with(
                &busy,
                Balance::LeastConnections,
                Dice {
                    turn: t,
                    a: 0,
                    b: 0,
                },
            )
        };
        assert_eq!((least(0), least(1), least(2)), (1, 2, 1));
        // Latency: of the two drawn, the cheaper by latency x (in flight + 1).
        let lat = mk([100; 3], [0, 0, 3], [500, 100, 100]);
        let p2c = |a, b| pick_with(&lat, Balance::Latency, Dice { turn: 0, a, b });
        assert_eq!(p2c(0, 0), 1, "n0 (500) against n1 (100)");
        assert_eq!(p2c(0, 1), 2, "n0 (500) against n2 (100 x 4 = 400)");
        assert_eq!(p2c(1, 0), 1, "n1 (100) against n2 (400)");
    }

    #[test]
    fn lag_takes_replicas_out_with_hysteresis() {
        let mb = 1 << 20;
        #[rustfmt::skip]
        let cases: Vec<(&str, Option<bool>, Option<u64>, bool)> = vec![
            ("new and caught up", None, Some(0), true),
            ("new and behind", None, Some(17 * mb), false),
            ("new, lag unknown", None, None, false),
            ("in, at the limit", Some(true), Some(16 * mb), true),
            ("in, past it", Some(true), Some(16 * mb + 1), false),
            ("out, below the limit but above the mark", Some(false), Some(9 * mb), false),
            ("out, at the mark", Some(false), Some(8 * mb), false),
            ("out, below the mark", Some(false), Some(8 * mb - 1), true),
            ("in, lag unknown: stays", Some(true), None, true),
            ("out, lag unknown: stays", Some(false), None, false),
        ];
        for (what, was, lag, want) in cases {
            assert_eq!(in_rotation(was, lag, 16 * mb, 50), want, "{what}");
        }
    }
}
