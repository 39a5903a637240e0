//! [`Reason`]: why an agent does not act (or not more), as text for people and as a stable
//! code for machines; published with its member state.

use std::fmt;
use std::time::Duration;

use pgwarden_core::{format_duration, Lsn, NodeId};

use crate::candidates::Excluded;

/// Why an agent is not acting (published with its state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    StoreUnreachable,
    /// The key is held, but this agent's lease was not renewed within `ttl - fence_margin`.
    LeaseStale,
    /// This leader fences itself after this long unless it renews first.
    FencingIn {
        after: Duration,
    },
    WaitingForInitialize {
        by: NodeId,
    },
    /// No leader to clone from (or to follow) yet.
    NoLeader,
    /// A leader that has not yet published that a clone can log in.
    LeaderNotReady {
        leader: NodeId,
    },
    /// The cluster had a leader and this node has no data: it waits for one to clone from.
    NeverInitdbAgain,
    Starting,
    /// An election in which this node may not run.
    NotElected(Excluded),
    /// Nobody may run: each member's reason.
    NoCandidate(Vec<(NodeId, Excluded)>),
    RejoinIsManual {
        leader: NodeId,
    },
    /// A standby whose WAL receiver has not streamed from the leader for this long.
    NotStreaming {
        leader: NodeId,
        since: Duration,
    },
    /// The leader of a switchover waits for its clients' transactions to end.
    Draining {
        to: NodeId,
    },
    /// A manual failover names another member.
    FailoverTo {
        to: NodeId,
    },
    /// A re-clone was asked for and there is no leader to clone from.
    ReinitWaits,
    /// Failsafe mode: this member confirmed `leader` leads on without the store.
    ConfirmedFailsafe {
        leader: NodeId,
    },
    /// Failsafe mode: the store is unreachable and every member confirmed this leader.
    Failsafe,
    /// A switchover's old leader has stopped; `to` takes over.
    SwitchingOver {
        from: NodeId,
        to: NodeId,
    },
    /// A switchover's target waits to receive past the old leader's last position.
    CatchingUp {
        from: NodeId,
        lsn: Lsn,
    },
    /// Maintenance mode: what it would do, it does not.
    Paused {
        would: Option<Box<Reason>>,
        held_back: usize,
    },
}

impl Reason {
    /// A stable, machine-readable code for the reason (the text is for people and may change):
    /// `snake_case`, with the election's cause after a dot (`not_elected.lagging`).
    pub fn code(&self) -> String {
        let simple = match self {
            Reason::StoreUnreachable => "store_unreachable",
            Reason::LeaseStale => "lease_stale",
            Reason::FencingIn { .. } => "fencing_in",
            Reason::WaitingForInitialize { .. } => "waiting_for_initialize",
            Reason::NoLeader => "no_leader",
            Reason::LeaderNotReady { .. } => "leader_not_ready",
            Reason::NeverInitdbAgain => "never_initdb_again",
            Reason::Starting => "starting",
            Reason::NotElected(why) => return format!("not_elected.{}", why.code()),
            Reason::NoCandidate(_) => "no_candidate",
            Reason::RejoinIsManual { .. } => "rejoin_is_manual",
            Reason::NotStreaming { .. } => "not_streaming",
            Reason::Draining { .. } => "switchover_draining",
            Reason::FailoverTo { .. } => "manual_failover",
            Reason::ReinitWaits => "reinit_waits",
            Reason::ConfirmedFailsafe { .. } => "failsafe_confirmed_leader",
            Reason::Failsafe => "failsafe",
            Reason::SwitchingOver { .. } => "switchover_in_progress",
            Reason::CatchingUp { .. } => "switchover_catching_up",
            Reason::Paused { .. } => "paused",
        };
        simple.to_string()
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::StoreUnreachable => f.write_str("the consensus store is unreachable"),
            Reason::Draining { to } => write!(
                f,
                "switchover to {to}: new transactions are held while running ones finish"
            ),
            Reason::FailoverTo { to } => write!(f, "manual failover: {to} takes over"),
            Reason::ReinitWaits => {
                f.write_str("asked to re-clone: waiting for a leader to clone from")
            }
            Reason::ConfirmedFailsafe { leader } => write!(
                f,
                "failsafe: confirmed that {leader} leads on without the store; taking nothing over for ttl"
            ),
            Reason::Failsafe => f.write_str(
                "failsafe: the store is unreachable and every member confirmed this leader",
            ),
            Reason::SwitchingOver { from, to } => {
                write!(f, "switchover: {from} has stopped, {to} takes over")
            }
            Reason::CatchingUp { from, lsn } => write!(
                f,
                "switchover target: receiving up to {from}'s last position {lsn} before taking over"
            ),
            Reason::Paused { would, held_back } => {
                f.write_str("paused (pgwarden resume): no automatic action")?;
                if *held_back > 0 {
                    write!(f, "; {held_back} held back")?;
                }
                match would {
                    Some(r) => write!(f, "; otherwise: {r}"),
                    None => Ok(()),
                }
            }
            Reason::LeaseStale => f.write_str(
                "holding the leader key, but the lease has not been renewed within ttl - fence_margin",
            ),
            Reason::FencingIn { after } => write!(
                f,
                "the consensus store is unreachable; fencing in {} unless the lease is renewed",
                format_duration(crate::candidates::tenths(*after))
            ),
            Reason::WaitingForInitialize { by } => {
                write!(f, "waiting for {by} to initialise the cluster")
            }
            Reason::NoLeader => f.write_str("no leader to stream from"),
            Reason::LeaderNotReady { leader } => write!(
                f,
                "waiting for leader {leader} to be ready (its roles set up) before cloning"
            ),
            Reason::NeverInitdbAgain => f.write_str(
                "no data directory, and the cluster already exists: waiting for a leader to clone from",
            ),
            Reason::Starting => f.write_str("PostgreSQL is starting"),
            Reason::NotElected(why) => write!(f, "not running for leader: {why}"),
            Reason::NoCandidate(all) => {
                f.write_str("no member may take over:")?;
                for (i, (n, why)) in all.iter().enumerate() {
                    write!(f, "{} {n} {why}", if i == 0 { "" } else { ";" })?;
                }
                if all.is_empty() {
                    f.write_str(" no members")?;
                }
                Ok(())
            }
            Reason::RejoinIsManual { leader } => write!(
                f,
                "{leader} leads and rejoin = \"manual\": this old primary waits for an operator"
            ),
            Reason::NotStreaming { leader, since } => write!(
                f,
                "not streaming from {leader} for {}",
                format_duration(crate::candidates::tenths(*since))
            ),
        }
    }
}
