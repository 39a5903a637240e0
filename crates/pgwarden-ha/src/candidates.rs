//! Who may take the leader lease when nobody holds it.
//!
//! Only fresh, running standbys that may fail over are candidates: never a `nofailover`
//! member, never one whose last report is older than the bound. In asynchronous mode never one
//! further behind the last known leader position than `maximum_lag_on_failover` (the limit
//! bounds the acknowledged commits a failover loses). In synchronous mode only a member of the
//! recorded synchronous set, however far behind: it holds every acknowledged commit, so what it
//! lacks was never acknowledged, and refusing it would leave the cluster without a writer until
//! a person acts. Among the candidates the highest received WAL position wins, then the highest
//! priority, then the name. Every member that is not the winner gets its reason, so a blocked
//! failover says why.
//!
//! Positions are what the caller observed: the agent asks the other members directly before it
//! runs, so a stale published position cannot win.

use std::fmt;
use std::time::Duration;

use pgwarden_core::{format_duration, ByteSize, Lsn, NodeId};

/// One member as observed for the election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub node: NodeId,
    /// How long ago its state was last confirmed.
    pub age: Duration,
    /// Its PostgreSQL runs as a standby.
    pub standby_running: bool,
    /// The WAL it has received (flushed), if known.
    pub received: Option<Lsn>,
    /// The timeline it is on, if known.
    pub timeline: Option<u32>,
    /// Higher is preferred among equal positions.
    pub priority: u32,
    pub nofailover: bool,
}

/// The election's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// A member not heard from for this long is not a candidate.
    pub fresh_within: Duration,
    /// `maximum_lag_on_failover`: bytes behind `leader_position` a candidate may be.
    pub maximum_lag: Option<u64>,
    /// The last position the leader published; without one, lag is not checked.
    pub leader_position: Option<Lsn>,
    /// The timeline the leader was on: a member on an older one missed its promotion (an
    /// old primary, or a standby that never followed it) and may not run.
    pub leader_timeline: Option<u32>,
    /// Synchronous mode: only these may be promoted.
    pub synchronous_set: Option<Vec<NodeId>>,
}

/// Why a member is not the one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Excluded {
    NoFailover,
    Stale {
        age: Duration,
        bound: Duration,
    },
    NotRunning,
    NoPosition,
    Lagging {
        behind: u64,
        maximum: u64,
    },
    NotSynchronous,
    OlderTimeline {
        theirs: u32,
        leader: u32,
    },
    /// Eligible, but another is ahead (position, then priority, then name).
    Behind {
        winner: NodeId,
    },
}

impl Excluded {
    /// A stable, machine-readable code (see [`crate::decide::Reason::code`]).
    pub fn code(&self) -> &'static str {
        match self {
            Excluded::NoFailover => "nofailover",
            Excluded::Stale { .. } => "stale",
            Excluded::NotRunning => "not_running",
            Excluded::NoPosition => "no_position",
            Excluded::Lagging { .. } => "lagging",
            Excluded::NotSynchronous => "not_synchronous",
            Excluded::OlderTimeline { .. } => "older_timeline",
            Excluded::Behind { .. } => "behind",
        }
    }
}

impl fmt::Display for Excluded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Excluded::NoFailover => write!(f, "tagged nofailover"),
            Excluded::Stale { age, bound } => write!(
                f,
                "last heard from {} ago (more than {})",
                format_duration(tenths(*age)),
                format_duration(*bound)
            ),
            Excluded::NotRunning => write!(f, "its PostgreSQL is not running as a standby"),
            Excluded::NoPosition => write!(f, "its received WAL position is unknown"),
            Excluded::Lagging { behind, maximum } => write!(
                f,
                "{} behind the leader's last position (maximum_lag_on_failover {})",
                ByteSize(*behind),
                ByteSize(*maximum)
            ),
            Excluded::NotSynchronous => write!(
                f,
                "not in the synchronous set (it may lack acknowledged commits)"
            ),
            Excluded::OlderTimeline { theirs, leader } => write!(
                f,
                "on timeline {theirs}, older than the last leader's {leader} (it missed a promotion)"
            ),
            Excluded::Behind { winner } => write!(f, "{winner} is ahead of it"),
        }
    }
}

/// `d` to a tenth of a second, for people.
pub(crate) fn tenths(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64 / 100 * 100)
}

/// The outcome: the one that may run (if any) and why each other member may not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranking {
    pub winner: Option<NodeId>,
    pub excluded: Vec<(NodeId, Excluded)>,
}

impl Ranking {
    /// Why `node` may not run; `None` when it is the winner.
    pub fn why_not(&self, node: &NodeId) -> Option<&Excluded> {
        self.excluded
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, e)| e)
    }
}

fn exclusion(c: &Candidate, rules: &Rules) -> Option<Excluded> {
    if c.nofailover {
        return Some(Excluded::NoFailover);
    }
    if c.age > rules.fresh_within {
        return Some(Excluded::Stale {
            age: c.age,
            bound: rules.fresh_within,
        });
    }
    if !c.standby_running {
        return Some(Excluded::NotRunning);
    }
    let Some(received) = c.received else {
        return Some(Excluded::NoPosition);
    };
    if let Some(set) = &rules.synchronous_set {
        if !set.contains(&c.node) {
            return Some(Excluded::NotSynchronous);
        }
    }
    if let (Some(theirs), Some(leader)) = (c.timeline, rules.leader_timeline) {
        if theirs < leader {
            return Some(Excluded::OlderTimeline { theirs, leader });
        }
    }
    // A member of the synchronous set lacks no acknowledged commit, whatever its lag.
    let synchronous = rules.synchronous_set.is_some();
    if let (false, Some(maximum), Some(leader)) =
        (synchronous, rules.maximum_lag, rules.leader_position)
    {
        let behind = leader.bytes_since(received);
        if behind > maximum {
            return Some(Excluded::Lagging { behind, maximum });
        }
    }
    None
}

/// Ranks `members` under `rules`.
pub fn rank(members: &[Candidate], rules: &Rules) -> Ranking {
    let mut excluded = Vec::new();
    let mut eligible: Vec<&Candidate> = Vec::new();
    for c in members {
        match exclusion(c, rules) {
            Some(why) => excluded.push((c.node.clone(), why)),
            None => eligible.push(c),
        }
    }
    // Highest position, then highest priority, then the first name.
    eligible.sort_by(|a, b| {
        b.received
            .cmp(&a.received)
            .then(b.priority.cmp(&a.priority))
            .then(a.node.cmp(&b.node))
    });
    let winner = eligible.first().map(|c| c.node.clone());
    if let Some(w) = &winner {
        for c in eligible.iter().skip(1) {
            excluded.push((c.node.clone(), Excluded::Behind { winner: w.clone() }));
        }
    }
    Ranking { winner, excluded }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn m(name: &str, received: Option<u64>, priority: u32) -> Candidate {
        Candidate {
            node: NodeId::new(name),
            age: S,
            standby_running: true,
            received: received.map(Lsn),
            timeline: Some(2),
            priority,
            nofailover: false,
        }
    }

    fn rules() -> Rules {
        Rules {
            fresh_within: 10 * S,
            maximum_lag: Some(1 << 20),
            leader_position: Some(Lsn(100 << 20)),
            leader_timeline: Some(2),
            synchronous_set: None,
        }
    }

    #[test]
    fn who_may_run() {
        let mb = |n: u64| Some((100 << 20) - (n << 20));
        let stale = Candidate {
            age: 30 * S,
            ..m("n2", mb(0), 1)
        };
        let nofail = Candidate {
            nofailover: true,
            ..m("n2", mb(0), 9)
        };
        let stopped = Candidate {
            standby_running: false,
            ..m("n2", mb(0), 1)
        };
        let sync = |names: &[&str]| Rules {
            synchronous_set: Some(names.iter().map(|n| NodeId::new(n)).collect()),
            ..rules()
        };
        let no_leader_position = Rules {
            leader_position: None,
            ..rules()
        };
        let no_limit = Rules {
            maximum_lag: None,
            ..rules()
        };
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<Candidate>, Rules, Option<&str>)> = vec![
            ("the furthest ahead wins", vec![m("n2", mb(1), 1), m("n3", mb(0), 1)], rules(), Some("n3")),
            ("equal positions: priority", vec![m("n2", mb(0), 1), m("n3", mb(0), 5)], rules(), Some("n3")),
            ("equal positions and priority: name", vec![m("n3", mb(0), 1), m("n2", mb(0), 1)], rules(), Some("n2")),
            ("position before priority", vec![m("n2", mb(0), 1), m("n3", mb(1), 9)], rules(), Some("n2")),
            ("nofailover never runs", vec![nofail.clone(), m("n3", mb(1), 1)], rules(), Some("n3")),
            ("only nofailover members: nobody", vec![nofail], rules(), None),
            ("a stale member does not run", vec![stale.clone(), m("n3", mb(1), 1)], rules(), Some("n3")),
            ("a standby that is not running does not", vec![stopped, m("n3", mb(1), 1)], rules(), Some("n3")),
            ("an unknown position does not", vec![m("n2", None, 9), m("n3", mb(1), 1)], rules(), Some("n3")),
            ("beyond maximum_lag_on_failover: nobody", vec![m("n2", mb(2), 1), m("n3", mb(3), 1)], rules(), None),
            ("at maximum_lag_on_failover: allowed", vec![m("n2", mb(1), 1)], rules(), Some("n2")),
            ("no leader position known: lag not checked", vec![m("n2", mb(50), 1)], no_leader_position, Some("n2")),
            ("no maximum: lag not checked", vec![m("n2", mb(50), 1)], no_limit, Some("n2")),
            ("synchronous: only the set, even if behind", vec![m("n2", mb(0), 1), m("n3", mb(1), 1)], sync(&["n3"]), Some("n3")),
            ("synchronous: a member of the set beyond maximum_lag_on_failover still runs (its lag was never acknowledged)", vec![m("n2", mb(50), 1), m("n3", mb(0), 1)], sync(&["n2"]), Some("n2")),
            ("synchronous set empty: nobody", vec![m("n2", mb(0), 1)], sync(&[]), None),
            ("synchronous member stale: nobody", vec![stale, m("n3", mb(0), 1)], sync(&["n2"]), None),
            ("nobody at all", vec![], rules(), None),
            ("an old primary on an older timeline, though ahead", vec![Candidate { timeline: Some(1), ..m("n1", mb(0), 9) }, m("n2", mb(1), 1)], rules(), Some("n2")),
            ("only older timelines: nobody", vec![Candidate { timeline: Some(1), ..m("n1", mb(0), 1) }], rules(), None),
            ("a newer timeline is fine", vec![Candidate { timeline: Some(3), ..m("n1", mb(0), 1) }], rules(), Some("n1")),
        ];
        for (what, members, rules, want) in cases {
            let r = rank(&members, &rules);
            assert_eq!(r.winner.as_ref().map(|n| n.as_str()), want, "{what}: {r:?}");
            // Everyone but the winner is accounted for.
            assert_eq!(
                r.excluded.len() + usize::from(r.winner.is_some()),
                members.len(),
                "{what}"
            );
        }
    }

    #[test]
    fn a_blocked_election_says_why() {
        let r = rank(
            &[
                m("n2", Some(90 << 20), 1),
                Candidate {
                    nofailover: true,
                    ..m("n3", Some(100 << 20), 1)
                },
            ],
            &rules(),
        );
        assert_eq!(r.winner, None);
        let why = |n: &str| r.why_not(&NodeId::new(n)).expect("excluded").to_string();
        assert_eq!(
            why("n2"),
            "10.0 MiB behind the leader's last position (maximum_lag_on_failover 1.0 MiB)"
        );
        assert_eq!(why("n3"), "tagged nofailover");
        let r = rank(
            &[m("n2", Some(100 << 20), 1), m("n3", Some(100 << 20), 1)],
            &rules(),
        );
        assert_eq!(r.why_not(&NodeId::new("n2")), None, "the winner");
        assert_eq!(
            r.why_not(&NodeId::new("n3")).expect("n3").to_string(),
            "n2 is ahead of it"
        );
    }
}
