//! The agent's decision: a pure function from what one agent observed (its own PostgreSQL, its
//! lease, the store, the other members) to what it does next, or why it does nothing.
//!
//! The driver observes, calls [`decide`], carries the actions out and observes again, at once
//! when it acted and otherwise after `loop_wait` or the next event (a store change, the
//! postmaster's exit). A step that takes several actions across ticks (bootstrap, failover,
//! rejoin) is therefore a sequence of decisions, each from a fresh observation, so a lost race
//! or a failed step is seen and undone by the next one.
//!
//! Safety rules, in the order they are checked:
//! 1. **Fence first.** A node whose PostgreSQL is (or is becoming) a writable primary stops it at
//!    once when it no longer knows itself the leader: another node holds the key, or its own
//!    lease has not been renewed for `ttl - fence_margin` by its own monotonic clock (so it
//!    stops before the store could grant the key to anyone else).
//! 2. **Start writable only under the lease.** `StartPrimary` and `Promote` are only decided for
//!    the holder of the leader key.
//! 3. **Elect by the rules of [`crate::candidates`]**, with positions the candidate asked its
//!    peers for directly.

use std::time::Duration;

use pgwarden_core::{Epoch, Lsn, NodeId};

use crate::candidates::{self, Candidate, Excluded, Ranking};
use crate::switchover;

/// Monotonic time since an arbitrary origin (the agent's start).
pub type Tick = Duration;

/// `synchronous_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    #[default]
    Off,
    /// Synchronous standbys from the healthy members; none left → writes go on asynchronously.
    On,
    /// As `on`, but never fewer synchronous standbys than asked: writes wait instead.
    Strict,
}

/// `rejoin`: what an old primary does when another node leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rejoin {
    /// `pg_rewind` from the leader; if that fails, clone again.
    #[default]
    Rewind,
    /// Clone again (a new base backup).
    Clone,
    /// Wait for a person.
    Manual,
}

/// `on_postgres_crash`: what the leader does when its PostgreSQL exits unasked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnCrash {
    /// Restart in place as primary on the same timeline within `primary_restart_timeout`.
    #[default]
    Restart,
    /// Release the lease at once so a replica takes over.
    Failover,
}

/// The rules an agent decides by (from `[agent]` and the cluster's settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub ttl: Duration,
    pub loop_wait: Duration,
    /// Fence this long before the lease could expire.
    pub fence_margin: Duration,
    pub primary_restart_timeout: Duration,
    pub on_crash: OnCrash,
    pub maximum_lag_on_failover: Option<u64>,
    pub synchronous_mode: SyncMode,
    pub rejoin: Rejoin,
    /// A standby that has not streamed from the leader for this long, on an older timeline,
    /// has diverged and rejoins (rewinds) as an old primary would.
    pub diverged_after: Duration,
}

/// This node's PostgreSQL as the driver found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pg {
    /// No data directory (or an empty one).
    Missing,
    /// A data directory and no server running. `standby`: it has `standby.signal`.
    Stopped {
        standby: bool,
    },
    /// Spawned, not accepting connections yet.
    Starting {
        as_primary: bool,
    },
    Running(Running),
}

/// A running server's own answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    /// `pg_is_in_recovery()` is false.
    pub primary: bool,
    /// The timeline it is on. A standby also counts the newest history file in its `pg_wal`
    /// (a standby that has begun to follow a new leader is on the new timeline for the election).
    pub timeline: u32,
    /// The timeline of the WAL it holds, not counting history files: a standby whose WAL
    /// receiver fetched a new leader's history but cannot follow it (its WAL goes past the fork)
    /// is still on the old one here.
    pub data_timeline: u32,
    /// Primary: its current WAL position. Standby: the WAL it received (flushed).
    pub lsn: Lsn,
    /// Standby: the node its `primary_conninfo` names, if one of the members.
    pub upstream: Option<NodeId>,
    /// Standby: since when its WAL receiver has not been streaming (`None`: it streams).
    pub not_streaming_since: Option<Tick>,
}

/// The leader key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderKey {
    pub node: NodeId,
    pub epoch: Epoch,
    /// Bound to this agent's current lease (false for a key left by an earlier run of it).
    pub ours: bool,
}

/// What the store said in this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    pub leader: Option<LeaderKey>,
    /// The last epoch ever granted (`None`: the cluster never had a leader).
    pub last_epoch: Option<Epoch>,
    pub initialized_by: Option<NodeId>,
    /// The last position the leader recorded, and who it was.
    pub last_leader: Option<(NodeId, Lsn)>,
    /// The timeline the last leader recorded.
    pub last_leader_timeline: Option<u32>,
    /// The leader's timeline, from its published state.
    pub leader_timeline: Option<u32>,
    /// The leader published that its roles exist (a clone can log in).
    pub leader_ready: bool,
    /// Synchronous mode: the members that may be promoted.
    pub synchronous_set: Option<Vec<NodeId>>,
    /// Maintenance mode: no automatic action (see [`paused`]).
    pub paused: bool,
    /// A planned switchover, running or finished.
    pub switchover: Option<switchover::Plan>,
    /// An operator's request to this node (`pgwarden restart` / `reinit`).
    pub request: Option<pgwarden_dcs::NodeAction>,
    /// A manual failover (`pgwarden failover --to`): the member to promote while nobody
    /// leads, and whether it has waited past its bound (then the ordinary rules apply).
    pub failover: Option<(NodeId, bool)>,
}

/// Everything one decision is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub node: NodeId,
    pub now: Tick,
    pub pg: Pg,
    /// Since when this node's PostgreSQL has not been running (`None`: it runs, or it was
    /// never started by this agent).
    pub pg_down_since: Option<Tick>,
    /// `None`: the store could not be read this round.
    pub store: Option<Store>,
    /// When the last successful renewal of this agent's lease was sent.
    pub renewed_at: Option<Tick>,
    /// Every member (this one included) as the election sees it.
    pub candidates: Vec<Candidate>,
    /// The leader's agent API and PostgreSQL both refused connections, twice.
    pub leader_gone: bool,
    /// The last rewind of this data directory failed.
    pub rewind_failed: bool,
    /// The leader of a due switchover: its target, asked on its API.
    pub switchover_target: Option<switchover::Target>,
    /// A stopped primary's data directory that shut down cleanly: its last checkpoint (read
    /// only when a switchover names this node its old leader).
    pub shut_down_at: Option<Lsn>,
    /// Failsafe mode: the leader this member confirmed within `ttl` (it takes nothing over).
    pub failsafe_ack: Option<NodeId>,
    /// Failsafe mode: this leader's last round had every other member's confirmation.
    pub failsafe_confirmed: bool,
}

/// One step for the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Take the `initialize` key (the first agent bootstraps).
    ClaimInitialize,
    /// `initdb` a new cluster (only for the holder of `initialize`, only once).
    Initdb,
    /// A new base backup from the leader through this node's slot.
    Clone {
        from: NodeId,
    },
    /// Take the leader key: it is absent and this node may lead.
    TakeLeader,
    /// Take the key from a leader whose processes are gone.
    TakeOver {
        from: NodeId,
    },
    /// The key names this node but is bound to a lease from an earlier run of this agent.
    AdoptLeader,
    ReleaseLeader,
    /// Start PostgreSQL as a primary (the key is held).
    StartPrimary,
    /// Start PostgreSQL as a standby of `upstream` (`None`: keep its configured upstream).
    StartStandby {
        upstream: Option<NodeId>,
    },
    /// Create the other members' slots here, then promote.
    Promote,
    /// Point the running standby at `upstream` by reload.
    Follow {
        upstream: NodeId,
    },
    /// Stop PostgreSQL at once: it must not take another write.
    Fence,
    /// Stop PostgreSQL if it runs, `pg_rewind` from the leader, and make it its standby.
    Rewind {
        from: NodeId,
    },
    /// Empty the data directory and clone again.
    Reclone {
        from: NodeId,
    },
    /// The leader's housekeeping: slots for the other members, its position in the store.
    Lead,
    /// A switchover is due: record that it drains, so the proxies hold new transactions.
    BeginSwitchover {
        to: NodeId,
    },
    /// The drain is over: checkpoint, stop cleanly, record where, give up the key.
    HandOver {
        to: NodeId,
    },
    /// A switchover's target, while the leader drains (synchronous mode): name the
    /// synchronous standbys it will have now, so its promotion needs no reload.
    PrepareTakeOver,
    /// The target leads: record the switchover done.
    FinishSwitchover,
    /// Record the switchover failed, and why.
    FailSwitchover {
        why: String,
    },
    /// Stop PostgreSQL cleanly and start it again in the same role (an operator's request).
    Restart,
    /// Empty the data directory and clone again (an operator's request: kept while paused).
    Reinit {
        from: NodeId,
    },
    /// Delete this node's request, carried out (or moot).
    DoneWithRequest,
    /// Delete the manual failover request: a leader leads.
    DoneWithFailover,
}

mod reason;
pub use reason::Reason;

/// The role this node has after the decision, as published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Replica,
    /// Neither: no data, stopped, fenced or rejoining.
    Down,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub actions: Vec<Action>,
    pub role: Role,
    /// Why it does not act (or not more).
    pub waiting: Option<Reason>,
}

impl Decision {
    pub(crate) fn act(role: Role, actions: Vec<Action>) -> Self {
        Decision {
            actions,
            role,
            waiting: None,
        }
    }

    pub(crate) fn wait(role: Role, why: Reason) -> Self {
        Decision {
            actions: Vec::new(),
            role,
            waiting: Some(why),
        }
    }
}

/// The next step for the agent that observed `o`.
pub fn decide(o: &Observation, s: &Settings) -> Decision {
    let d = decide_active(o, s);
    let d = if o.store.as_ref().is_some_and(|st| st.paused) {
        paused(o, d)
    } else {
        d
    };
    match &o.failsafe_ack {
        Some(leader) if leader != &o.node => confirmed_a_leader(d, leader),
        _ => d,
    }
}

/// Failsafe mode: this member told `leader` it leads on without the store, so for `ttl` it
/// takes no key and promotes nothing, whatever the store says when it comes back.
fn confirmed_a_leader(d: Decision, leader: &NodeId) -> Decision {
    let total = d.actions.len();
    let actions: Vec<Action> = d
        .actions
        .into_iter()
        .filter(|a| {
            !matches!(
                a,
                Action::TakeLeader | Action::TakeOver { .. } | Action::Promote
            )
        })
        .collect();
    if actions.len() == total {
        return Decision { actions, ..d };
    }
    Decision {
        actions,
        role: d.role,
        waiting: Some(Reason::ConfirmedFailsafe {
            leader: leader.clone(),
        }),
    }
}

/// Maintenance mode (`pgwarden pause`): the decision without what would change what runs.
/// Kept: fencing (never two writers, paused or not), binding the key to this run's lease, and
/// a running primary's keeping of the key and housekeeping, so that it stays the leader the
/// proxy writes to. Held back: starts, restarts, promotions, take-overs, rejoins, clones. A
/// crashed PostgreSQL stays down, reported.
fn paused(o: &Observation, d: Decision) -> Decision {
    let primary = matches!(&o.pg, Pg::Running(r) if r.primary);
    // A manual failover is an operator's act, the one way out of a paused cluster whose
    // leader is gone.
    let asked = o
        .store
        .as_ref()
        .and_then(|s| s.failover.as_ref())
        .is_some_and(|(to, expired)| to == &o.node && !expired);
    let total = d.actions.len();
    let actions: Vec<Action> = d
        .actions
        .into_iter()
        .filter(|a| match a {
            Action::Fence
            | Action::AdoptLeader
            | Action::FinishSwitchover
            | Action::FailSwitchover { .. }
            | Action::Restart
            | Action::Reinit { .. }
            | Action::DoneWithRequest
            | Action::DoneWithFailover => true,
            Action::TakeLeader | Action::Lead => primary || asked,
            Action::Promote => asked,
            _ => false,
        })
        .collect();
    let role = if actions.contains(&Action::Fence) {
        Role::Down
    } else {
        match &o.pg {
            Pg::Running(r) if r.primary && d.role == Role::Leader => Role::Leader,
            Pg::Running(r) if !r.primary => Role::Replica,
            _ => Role::Down,
        }
    };
    Decision {
        waiting: Some(Reason::Paused {
            would: d.waiting.map(Box::new),
            held_back: total - actions.len(),
        }),
        actions,
        role,
    }
}

fn decide_active(o: &Observation, s: &Settings) -> Decision {
    if let Some(d) = fence(o, s) {
        return d;
    }
    let Some(store) = &o.store else {
        return unreachable_store(o, s);
    };
    let holds = store.leader.as_ref().is_some_and(|l| l.node == o.node);
    let other = store
        .leader
        .as_ref()
        .filter(|l| l.node != o.node)
        .map(|l| l.node.clone());
    if holds && !lease_fresh(o, s) {
        // Rule 2: the key may be about to go; nothing writable starts under it.
        return Decision::wait(Role::Down, Reason::LeaseStale);
    }
    if holds && store.leader.as_ref().is_some_and(|l| !l.ours) && o.pg != Pg::Missing {
        // An earlier run of this agent led: bind the key to this run's lease, keeping the epoch.
        return Decision::act(Role::Down, vec![Action::AdoptLeader]);
    }
    if let Some(d) = requested(o, store, holds, other.clone()) {
        return d;
    }
    match &o.pg {
        Pg::Missing if holds => Decision::act(Role::Down, vec![Action::ReleaseLeader]),
        Pg::Missing => missing(o, store, other),
        Pg::Stopped { standby } => stopped(o, s, store, *standby, holds, other),
        Pg::Starting { as_primary: true } if holds && lost_the_lead(o, s) => {
            Decision::act(Role::Down, vec![Action::Fence, Action::ReleaseLeader])
        }
        Pg::Starting { .. } => Decision::wait(Role::Down, Reason::Starting),
        Pg::Running(r) if r.primary => running_primary(o, store, holds, other),
        Pg::Running(r) => running_standby(o, s, store, r, holds, other),
    }
}

/// An operator's request to this node: the request is deleted first, so that one that fails
/// (a clone that breaks off) is not retried forever; the ordinary decisions then repair what
/// is left (a missing data directory is cloned).
fn requested(
    o: &Observation,
    store: &Store,
    holds: bool,
    other: Option<NodeId>,
) -> Option<Decision> {
    use pgwarden_dcs::NodeAction;
    let action = store.request?;
    let done = Action::DoneWithRequest;
    Some(match (action, &o.pg) {
        (NodeAction::Restart, Pg::Running(r)) => {
            let role = match (holds, r.primary) {
                (true, true) => Role::Leader,
                (_, false) => Role::Replica,
                (false, true) => Role::Down,
            };
            Decision::act(role, vec![done, Action::Restart])
        }
        // Nothing runs to restart: the ordinary decisions start it.
        (NodeAction::Restart, _) => Decision::act(Role::Down, vec![done]),
        // The leader's data is the cluster's: never emptied (the command refuses it too).
        (NodeAction::Reinit, _) if holds => Decision::act(Role::Down, vec![done]),
        (NodeAction::Reinit, _) => match other {
            Some(from) if store.leader_ready => {
                Decision::act(Role::Down, vec![done, Action::Reinit { from }])
            }
            _ => Decision::wait(Role::Down, Reason::ReinitWaits),
        },
    })
}

/// A manual failover while nobody leads: its target takes the key and promotes whatever the
/// election's rules say (the operator chose it); the others wait for it.
fn manual_failover(o: &Observation, store: &Store, role: Role) -> Option<Decision> {
    let (to, false) = store.failover.clone()? else {
        return None;
    };
    Some(match &o.pg {
        Pg::Running(r) if !r.primary && to == o.node => {
            Decision::act(role, vec![Action::TakeLeader, Action::Promote])
        }
        _ => Decision::wait(role, Reason::FailoverTo { to }),
    })
}

/// Rule 1: a server that is or may become writable stops when its lease may be gone.
fn fence(o: &Observation, s: &Settings) -> Option<Decision> {
    let writable = match &o.pg {
        Pg::Running(r) => r.primary,
        Pg::Starting { as_primary } => *as_primary,
        Pg::Missing | Pg::Stopped { .. } => false,
    };
    if !writable {
        return None;
    }
    let lease_may_be_gone = !lease_fresh(o, s);
    let someone_else = o
        .store
        .as_ref()
        .and_then(|st| st.leader.as_ref())
        .is_some_and(|l| l.node != o.node);
    (lease_may_be_gone || someone_else).then(|| Decision::act(Role::Down, vec![Action::Fence]))
}

/// This agent's lease was renewed less than `ttl - fence_margin` ago.
fn lease_fresh(o: &Observation, s: &Settings) -> bool {
    o.renewed_at
        .is_some_and(|at| o.now.saturating_sub(at) + s.fence_margin < s.ttl)
}

fn unreachable_store(o: &Observation, s: &Settings) -> Decision {
    match &o.pg {
        Pg::Running(r) if r.primary && o.failsafe_confirmed => {
            Decision::wait(Role::Leader, Reason::Failsafe)
        }
        Pg::Running(r) if r.primary => {
            // Not fenced yet (rule 1 ran): it keeps writing until the margin.
            let since = o.renewed_at.map_or(Duration::ZERO, |at| o.now - at);
            Decision::wait(
                Role::Leader,
                Reason::FencingIn {
                    after: s.ttl.saturating_sub(s.fence_margin + since),
                },
            )
        }
        Pg::Running(_) => Decision::wait(Role::Replica, Reason::StoreUnreachable),
        // A standby's data directory may start read-only without the store.
        Pg::Stopped { standby: true } => {
            Decision::act(Role::Down, vec![Action::StartStandby { upstream: None }])
        }
        _ => Decision::wait(Role::Down, Reason::StoreUnreachable),
    }
}

fn missing(o: &Observation, store: &Store, other: Option<NodeId>) -> Decision {
    if let Some(leader) = other {
        if !store.leader_ready {
            // Its replication role may not exist yet: a clone now fails to log in.
            return Decision::wait(Role::Down, Reason::LeaderNotReady { leader });
        }
        return Decision::act(Role::Down, vec![Action::Clone { from: leader }]);
    }
    match &store.initialized_by {
        None => Decision::act(Role::Down, vec![Action::ClaimInitialize]),
        Some(by) if by == &o.node && store.last_epoch.is_none() => {
            Decision::act(Role::Down, vec![Action::Initdb])
        }
        Some(_) if store.last_epoch.is_some() => {
            Decision::wait(Role::Down, Reason::NeverInitdbAgain)
        }
        Some(by) => Decision::wait(Role::Down, Reason::WaitingForInitialize { by: by.clone() }),
    }
}

fn stopped(
    o: &Observation,
    s: &Settings,
    store: &Store,
    standby: bool,
    holds: bool,
    other: Option<NodeId>,
) -> Decision {
    if holds {
        if standby {
            // Promoted on the next round, once it runs.
            return Decision::act(Role::Down, vec![Action::StartStandby { upstream: None }]);
        }
        if lost_the_lead(o, s) {
            return Decision::act(Role::Down, vec![Action::ReleaseLeader]);
        }
        return Decision::act(Role::Leader, vec![Action::StartPrimary]);
    }
    if let Some(leader) = other {
        if standby {
            return Decision::act(
                Role::Down,
                vec![Action::StartStandby {
                    upstream: Some(leader),
                }],
            );
        }
        if let Some(d) = switchover::clean_rejoin(o, store, &leader) {
            return d;
        }
        return rejoin(o, s, leader);
    }
    // Nobody leads.
    if let Some(d) = manual_failover(o, store, Role::Down) {
        return d;
    }
    if let Some(d) = switchover::without_leader(o, store) {
        return d;
    }
    if !standby && may_lead_again(o, store) && !lost_the_lead(o, s) {
        return Decision::act(Role::Down, vec![Action::TakeLeader]);
    }
    // Run as a standby: the election counts it once it runs.
    Decision::act(Role::Down, vec![Action::StartStandby { upstream: None }])
}

/// The leader's PostgreSQL went down under this agent and may not come back as primary: it is
/// configured to hand over, or it did not restart within `primary_restart_timeout`.
fn lost_the_lead(o: &Observation, s: &Settings) -> bool {
    o.pg_down_since.is_some_and(|t| {
        s.on_crash == OnCrash::Failover || o.now.saturating_sub(t) >= s.primary_restart_timeout
    })
}

/// A stopped primary's data may lead without a promotion when nobody can have led after it:
/// it bootstrapped the cluster and nobody ever led, or it was the last leader.
fn may_lead_again(o: &Observation, store: &Store) -> bool {
    match (&store.last_leader, store.last_epoch) {
        (Some((last, _)), _) => last == &o.node,
        (None, None) => store.initialized_by.as_ref() == Some(&o.node),
        (None, Some(_)) => false,
    }
}

fn rejoin(o: &Observation, s: &Settings, leader: NodeId) -> Decision {
    let action = match s.rejoin {
        Rejoin::Manual => return Decision::wait(Role::Down, Reason::RejoinIsManual { leader }),
        Rejoin::Rewind if !o.rewind_failed => Action::Rewind { from: leader },
        Rejoin::Rewind | Rejoin::Clone => Action::Reclone { from: leader },
    };
    Decision::act(Role::Down, vec![action])
}

fn running_primary(o: &Observation, store: &Store, holds: bool, other: Option<NodeId>) -> Decision {
    if holds {
        if store.failover.is_some() {
            return Decision::act(Role::Leader, vec![Action::DoneWithFailover, Action::Lead]);
        }
        if let Some(d) = switchover::as_leader(o, store, o.switchover_target.as_ref()) {
            return d;
        }
        return Decision::act(Role::Leader, vec![Action::Lead]);
    }
    debug_assert!(
        other.is_none(),
        "rule 1 fences a primary under another leader"
    );
    if may_lead_again(o, store) {
        // The key lapsed under a primary that still renews (or the cluster is new): nobody can
        // be further ahead, so it takes the key again rather than forcing a promotion elsewhere.
        return Decision::act(Role::Leader, vec![Action::TakeLeader, Action::Lead]);
    }
    Decision::act(Role::Down, vec![Action::Fence])
}

fn running_standby(
    o: &Observation,
    s: &Settings,
    store: &Store,
    r: &Running,
    holds: bool,
    other: Option<NodeId>,
) -> Decision {
    if holds {
        return Decision::act(Role::Leader, vec![Action::Promote, Action::Lead]);
    }
    if let Some(leader) = other {
        if o.leader_gone {
            return elect(o, s, store, Some(leader));
        }
        if r.upstream.as_ref() != Some(&leader) {
            return Decision::act(Role::Replica, vec![Action::Follow { upstream: leader }]);
        }
        if s.synchronous_mode != SyncMode::Off && switchover::is_draining_to(o, store) {
            return Decision::act(Role::Replica, vec![Action::PrepareTakeOver]);
        }
        let Some(since) = r.not_streaming_since else {
            return Decision::act(Role::Replica, Vec::new());
        };
        let waited = o.now.saturating_sub(since);
        // By the WAL it holds: a history file fetched from the leader does not make it able
        // to follow (its WAL may go past the fork, as an asynchronous standby's may when a
        // synchronous one behind it is promoted).
        let older = store.leader_timeline.is_some_and(|tl| tl > r.data_timeline);
        if older && waited >= s.diverged_after {
            // It cannot follow the new timeline: rewind (or clone) as an old primary would.
            return rejoin(o, s, leader);
        }
        return Decision::wait(
            Role::Replica,
            Reason::NotStreaming {
                leader,
                since: waited,
            },
        );
    }
    if let Some(d) = manual_failover(o, store, Role::Replica) {
        return d;
    }
    if let Some(d) = switchover::without_leader(o, store) {
        return d;
    }
    elect(o, s, store, None)
}

/// No (live) leader: run if this node is the one the rules pick.
fn elect(o: &Observation, s: &Settings, store: &Store, gone: Option<NodeId>) -> Decision {
    let rules = candidates::Rules {
        fresh_within: s.loop_wait * 2 + s.loop_wait / 2,
        maximum_lag: s.maximum_lag_on_failover,
        leader_position: store.last_leader.as_ref().map(|(_, lsn)| *lsn),
        leader_timeline: store.last_leader_timeline,
        synchronous_set: match s.synchronous_mode {
            SyncMode::Off => None,
            SyncMode::On | SyncMode::Strict => {
                Some(store.synchronous_set.clone().unwrap_or_default())
            }
        },
    };
    let members: Vec<Candidate> = o
        .candidates
        .iter()
        .filter(|c| Some(&c.node) != gone.as_ref())
        .cloned()
        .collect();
    let Ranking { winner, excluded } = candidates::rank(&members, &rules);
    match winner {
        Some(w) if w == o.node => {
            let take = match gone {
                Some(from) => Action::TakeOver { from },
                None => Action::TakeLeader,
            };
            Decision::act(Role::Replica, vec![take])
        }
        Some(_) => {
            let why = excluded
                .into_iter()
                .find(|(n, _)| n == &o.node)
                .map(|(_, e)| e)
                .unwrap_or(Excluded::NotRunning);
            Decision::wait(Role::Replica, Reason::NotElected(why))
        }
        None => Decision::wait(Role::Replica, Reason::NoCandidate(excluded)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const NOW: Tick = Duration::from_secs(100);
    const MB: u64 = 1 << 20;

    fn settings() -> Settings {
        Settings {
            ttl: 7 * S,
            loop_wait: S,
            fence_margin: 2 * S,
            primary_restart_timeout: 5 * S,
            on_crash: OnCrash::Restart,
            maximum_lag_on_failover: Some(MB),
            synchronous_mode: SyncMode::Off,
            rejoin: Rejoin::Rewind,
            diverged_after: 10 * S,
        }
    }

    fn n(name: &str) -> NodeId {
        NodeId::new(name)
    }

    fn primary() -> Pg {
        Pg::Running(Running {
            primary: true,
            timeline: 1,
            data_timeline: 1,
            lsn: Lsn(100 * MB),
            upstream: None,
            not_streaming_since: None,
        })
    }

    fn standby(upstream: Option<&str>) -> Pg {
        Pg::Running(Running {
            primary: false,
            timeline: 1,
            data_timeline: 1,
            lsn: Lsn(100 * MB),
            upstream: upstream.map(n),
            not_streaming_since: None,
        })
    }

    fn not_streaming(since: Tick, timeline: u32) -> Pg {
        Pg::Running(Running {
            primary: false,
            timeline,
            data_timeline: timeline,
            lsn: Lsn(100 * MB),
            upstream: Some(n("n1")),
            not_streaming_since: Some(since),
        })
    }

    /// A standby of n1 on timeline 1 whose receiver fetched timeline 2's history file, and
    /// has not streamed since `since`.
    fn fetched_history(since: Tick) -> Pg {
        match not_streaming(since, 1) {
            Pg::Running(r) => Pg::Running(Running { timeline: 2, ..r }),
            other => other,
        }
    }

    /// A store where `leader` leads (its key bound to its agent's current lease).
    fn store(leader: Option<&str>) -> Store {
        Store {
            leader: leader.map(|l| LeaderKey {
                node: n(l),
                epoch: Epoch(3),
                ours: true,
            }),
            last_epoch: Some(Epoch(3)),
            initialized_by: Some(n("n1")),
            last_leader: Some((n("n1"), Lsn(100 * MB))),
            last_leader_timeline: Some(1),
            leader_timeline: Some(1),
            leader_ready: true,
            synchronous_set: None,
            paused: false,
            switchover: None,
            request: None,
            failover: None,
        }
    }

    fn new_cluster() -> Store {
        Store {
            leader: None,
            last_epoch: None,
            initialized_by: None,
            last_leader: None,
            last_leader_timeline: None,
            leader_timeline: None,
            leader_ready: false,
            synchronous_set: None,
            paused: false,
            switchover: None,
            request: None,
            failover: None,
        }
    }

    fn cand(name: &str, mb_behind: u64) -> Candidate {
        Candidate {
            node: n(name),
            age: Duration::ZERO,
            standby_running: true,
            received: Some(Lsn((100 - mb_behind) * MB)),
            timeline: Some(1),
            priority: 1,
            nofailover: false,
        }
    }

    /// Node `node` with `pg`, seeing `store`; renewed half a second ago; n2 and n3 as
    /// equal standbys in the election.
    fn obs(node: &str, pg: Pg, store: Option<Store>) -> Observation {
        Observation {
            node: n(node),
            now: NOW,
            pg,
            pg_down_since: None,
            store,
            renewed_at: Some(NOW - S / 2),
            candidates: vec![cand("n2", 0), cand("n3", 0)],
            leader_gone: false,
            rewind_failed: false,
            switchover_target: None,
            shut_down_at: None,
            failsafe_ack: None,
            failsafe_confirmed: false,
        }
    }

    use Action::*;

    /// What, observed, under, decided actions, a phrase of the reason.
    type Case<'a> = (
        &'a str,
        Observation,
        &'a Settings,
        Vec<Action>,
        Option<&'a str>,
    );

    /// A switchover from n1 to n2 at `stage`.
    fn planned(stage: switchover::Stage) -> impl Fn(&mut Observation) {
        move |o: &mut Observation| {
            o.store.as_mut().expect("store").switchover = Some(switchover::Plan {
                from: n("n1"),
                to: n("n2"),
                stage: stage.clone(),
            })
        }
    }

    fn target(f: impl Fn(&mut switchover::Target)) -> impl Fn(&mut Observation) {
        move |o: &mut Observation| {
            let mut t = switchover::Target {
                node: n("n2"),
                standby_running: true,
                streaming: true,
                received: Some(Lsn(99 * MB)),
                timeline: Some(1),
                nofailover: false,
            };
            f(&mut t);
            o.switchover_target = Some(t);
        }
    }

    #[test]
    fn reason_codes_are_stable() {
        let lagging = Excluded::Lagging {
            behind: 2,
            maximum: 1,
        };
        #[rustfmt::skip]
        let cases = [
            (Reason::NotElected(lagging), "not_elected.lagging"),
            (Reason::NotElected(Excluded::NotSynchronous), "not_elected.not_synchronous"),
            (Reason::NoCandidate(Vec::new()), "no_candidate"),
            (Reason::Paused { would: None, held_back: 1 }, "paused"),
            (Reason::Draining { to: n("n2") }, "switchover_draining"),
            (Reason::CatchingUp { from: n("n1"), lsn: Lsn(1) }, "switchover_catching_up"),
            (Reason::FailoverTo { to: n("n3") }, "manual_failover"),
        ];
        for (reason, code) in cases {
            assert_eq!(reason.code(), code, "{reason}");
        }
    }

    #[test]
    fn switchover_decisions() {
        use switchover::Stage::*;
        let s = settings();
        let synchronous = Settings {
            synchronous_mode: SyncMode::On,
            ..settings()
        };
        let with = |fs: &[&dyn Fn(&mut Observation)], o: Observation| {
            let mut o = o;
            for f in fs {
                f(&mut o);
            }
            o
        };
        let stopped = |expired| Stopped {
            lsn: Lsn(100 * MB),
            timeline: 1,
            expired,
        };
        let past = |o: &mut Observation| {
            if let Pg::Running(r) = &mut o.pg {
                r.lsn = Lsn(100 * MB + 40);
            }
        };
        let at_stop = |o: &mut Observation| o.shut_down_at = Some(Lsn(100 * MB));
        let elsewhere = |o: &mut Observation| o.shut_down_at = Some(Lsn(100 * MB + 8));
        let ok = target(|_| {});
        let paused = |o: &mut Observation| o.store.as_mut().expect("store").paused = true;
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            ("scheduled: the leader just leads", with(&[&planned(Scheduled)], obs("n1", primary(), Some(store(Some("n1"))))), &s, vec![Lead], None),
            ("due, the target fit: begin", with(&[&planned(Due), &ok], obs("n1", primary(), Some(store(Some("n1"))))), &s, vec![Lead, BeginSwitchover { to: n("n2") }], None),
            ("due, a lagging target is waited for (checked when asked)", with(&[&planned(Due), &target(|t| t.received = Some(Lsn(MB)))], obs("n1", primary(), Some(store(Some("n1"))))), &s, vec![Lead, BeginSwitchover { to: n("n2") }], None),
            ("due, the target stopped streaming: fail", with(&[&planned(Due), &target(|t| t.streaming = false)], obs("n1", primary(), Some(store(Some("n1"))))), &s, vec![FailSwitchover { why: "n2 is not streaming from the leader, so it cannot catch up".into() }, Lead], None),
            ("due, the target did not answer: fail", with(&[&planned(Due)], obs("n1", primary(), Some(store(Some("n1"))))), &s, vec![FailSwitchover { why: "n2's PostgreSQL is not running as a standby".into() }, Lead], None),
            ("due, the target turned nofailover: fail", with(&[&planned(Due), &target(|t| t.nofailover = true)], obs("n1", primary(), Some(store(Some("n1"))))), &s, vec![FailSwitchover { why: "n2 is tagged nofailover".into() }, Lead], None),
            ("draining: lead and wait, saying why", with(&[&planned(Draining { done: false })], obs("n1", primary(), Some(store(Some("n1"))))), &s, vec![Lead], Some("new transactions are held")),
            ("drained: hand over", with(&[&planned(Draining { done: true })], obs("n1", primary(), Some(store(Some("n1"))))), &s, vec![HandOver { to: n("n2") }], None),
            ("asked of n1, n3 leads: fail", with(&[&planned(Due)], obs("n3", primary(), Some(store(Some("n3"))))), &s, vec![FailSwitchover { why: "it was asked of n1, and n3 leads now".into() }, Lead], None),
            ("synchronous: the target prepares while the leader drains", with(&[&planned(Draining { done: false })], obs("n2", standby(Some("n1")), Some(store(Some("n1"))))), &synchronous, vec![PrepareTakeOver], None),
            ("asynchronous: nothing to prepare", with(&[&planned(Draining { done: false })], obs("n2", standby(Some("n1")), Some(store(Some("n1"))))), &s, vec![], None),
            ("synchronous: another standby does not prepare", with(&[&planned(Draining { done: false })], obs("n3", standby(Some("n1")), Some(store(Some("n1"))))), &synchronous, vec![], None),
            ("the target leads: done", with(&[&planned(stopped(false))], obs("n2", primary(), Some(store(Some("n2"))))), &s, vec![FinishSwitchover, Lead], None),
            ("someone else leads after the stop: failed", with(&[&planned(stopped(true))], obs("n1", primary(), Some(store(Some("n1"))))), &s, vec![FailSwitchover { why: "n2 did not take over after n1 stopped; n1 leads".into() }, Lead], None),
            ("over: nothing more", with(&[&planned(Over { stopped_at: None })], obs("n2", primary(), Some(store(Some("n2"))))), &s, vec![Lead], None),
            // Without a leader, after the stop.
            ("the target past the stop takes the key and promotes", with(&[&planned(stopped(false)), &past], obs("n2", standby(Some("n1")), Some(store(None)))), &s, vec![TakeLeader, Promote], None),
            ("the target at the checkpoint's start has not received it all: waits", with(&[&planned(stopped(false))], obs("n2", standby(Some("n1")), Some(store(None)))), &s, vec![], Some("receiving up to n1's last position")),
            ("the target on another timeline waits", with(&[&planned(stopped(false)), &past, &|o: &mut Observation| if let Pg::Running(r) = &mut o.pg { r.timeline = 2 }], obs("n2", standby(Some("n1")), Some(store(None)))), &s, vec![], Some("receiving up to")),
            ("the target's control file still on the old timeline: it takes the key", with(&[&planned(stopped(false)), &past, &|o: &mut Observation| if let Pg::Running(r) = &mut o.pg { r.data_timeline = 0 }], obs("n2", standby(Some("n1")), Some(store(None)))), &s, vec![TakeLeader, Promote], None),
            ("another standby does not run for the key", with(&[&planned(stopped(false)), &past], obs("n3", standby(Some("n1")), Some(store(None)))), &s, vec![], Some("n2 takes over")),
            ("the old leader does not take the key back", with(&[&planned(stopped(false))], obs("n1", Pg::Stopped { standby: false }, Some(store(None)))), &s, vec![], Some("n2 takes over")),
            ("expired: the ordinary election", with(&[&planned(stopped(true))], obs("n2", standby(Some("n1")), Some(store(None)))), &s, vec![TakeLeader], None),
            ("expired: the old leader may lead again", with(&[&planned(stopped(true))], obs("n1", Pg::Stopped { standby: false }, Some(store(None)))), &s, vec![TakeLeader], None),
            ("paused: the target does not take the key", with(&[&planned(stopped(false)), &past, &paused], obs("n2", standby(Some("n1")), Some(store(None)))), &s, vec![], Some("held back")),
            ("paused: no drain begins", with(&[&planned(Due), &ok, &paused], obs("n1", primary(), Some(store(Some("n1"))))), &s, vec![Lead], Some("1 held back")),
            // Operators' requests.
            ("restart asked of a replica", with(&[&|o: &mut Observation| o.store.as_mut().expect("store").request = Some(pgwarden_dcs::NodeAction::Restart)], obs("n2", standby(Some("n1")), Some(store(Some("n1"))))), &s, vec![DoneWithRequest, Restart], None),
            ("restart asked of the leader: in place", with(&[&|o: &mut Observation| o.store.as_mut().expect("store").request = Some(pgwarden_dcs::NodeAction::Restart)], obs("n1", primary(), Some(store(Some("n1"))))), &s, vec![DoneWithRequest, Restart], None),
            ("restart asked of a stopped node: the ordinary start", with(&[&|o: &mut Observation| o.store.as_mut().expect("store").request = Some(pgwarden_dcs::NodeAction::Restart)], obs("n2", Pg::Stopped { standby: true }, Some(store(Some("n1"))))), &s, vec![DoneWithRequest], None),
            ("reinit of a replica: clone again from the leader", with(&[&|o: &mut Observation| o.store.as_mut().expect("store").request = Some(pgwarden_dcs::NodeAction::Reinit)], obs("n2", standby(Some("n1")), Some(store(Some("n1"))))), &s, vec![DoneWithRequest, Reinit { from: n("n1") }], None),
            ("reinit of the leader: never", with(&[&|o: &mut Observation| o.store.as_mut().expect("store").request = Some(pgwarden_dcs::NodeAction::Reinit)], obs("n1", primary(), Some(store(Some("n1"))))), &s, vec![DoneWithRequest], None),
            ("reinit without a leader waits", with(&[&|o: &mut Observation| o.store.as_mut().expect("store").request = Some(pgwarden_dcs::NodeAction::Reinit)], obs("n2", standby(Some("n1")), Some(store(None)))), &s, vec![], Some("waiting for a leader to clone from")),
            ("paused: a reinit is still carried out", with(&[&paused, &|o: &mut Observation| o.store.as_mut().expect("store").request = Some(pgwarden_dcs::NodeAction::Reinit)], obs("n2", standby(Some("n1")), Some(store(Some("n1"))))), &s, vec![DoneWithRequest, Reinit { from: n("n1") }], Some("paused")),
            ("a fenced leader is fenced before any request", with(&[&|o: &mut Observation| o.store.as_mut().expect("store").request = Some(pgwarden_dcs::NodeAction::Restart)], obs("n2", primary(), Some(store(Some("n1"))))), &s, vec![Fence], None),
            // Failsafe mode.
            ("failsafe: a confirmed leader without the store leads on", with(&[&|o: &mut Observation| o.failsafe_confirmed = true], obs("n1", primary(), None)), &s, vec![], Some("failsafe: the store is unreachable and every member confirmed")),
            ("failsafe: unconfirmed, the fence is counted down", obs("n1", primary(), None), &s, vec![], Some("fencing in")),
            ("failsafe: past the deadline even a confirmed leader fences", with(&[&|o: &mut Observation| { o.failsafe_confirmed = true; o.renewed_at = Some(NOW - 5 * S); }], obs("n1", primary(), None)), &s, vec![Fence], None),
            ("failsafe: a member that confirmed takes no key when the store is back", with(&[&|o: &mut Observation| o.failsafe_ack = Some(n("n1"))], obs("n2", standby(Some("n1")), Some(store(None)))), &s, vec![], Some("failsafe: confirmed that n1 leads on")),
            ("failsafe: nor takes over a leader that looks gone", with(&[&|o: &mut Observation| { o.failsafe_ack = Some(n("n1")); o.leader_gone = true; }], obs("n2", standby(Some("n1")), Some(store(Some("n1"))))), &s, vec![], Some("failsafe")),
            ("failsafe: the confirmed leader itself may take its key again", with(&[&|o: &mut Observation| o.failsafe_ack = Some(n("n1"))], obs("n1", primary(), Some(store(None)))), &s, vec![TakeLeader, Lead], None),
            ("failsafe: a confirmation does not stop a standby following", with(&[&|o: &mut Observation| o.failsafe_ack = Some(n("n1"))], obs("n2", standby(None), Some(store(Some("n1"))))), &s, vec![Follow { upstream: n("n1") }], None),
            // Manual failover.
            ("manual failover: its target promotes, whatever the election says", with(&[&|o: &mut Observation| { o.store.as_mut().expect("store").failover = Some((n("n3"), false)); o.candidates = vec![cand("n2", 0), cand("n3", 5)]; }], obs("n3", standby(Some("n1")), Some(store(None)))), &s, vec![TakeLeader, Promote], None),
            ("paused: a manual failover is still carried out", with(&[&paused, &|o: &mut Observation| o.store.as_mut().expect("store").failover = Some((n("n3"), false))], obs("n3", standby(Some("n1")), Some(store(None)))), &s, vec![TakeLeader, Promote], Some("paused")),
            ("manual failover: the others wait", with(&[&|o: &mut Observation| o.store.as_mut().expect("store").failover = Some((n("n3"), false))], obs("n2", standby(Some("n1")), Some(store(None)))), &s, vec![], Some("manual failover: n3 takes over")),
            ("manual failover: the old primary does not take the key back", with(&[&|o: &mut Observation| o.store.as_mut().expect("store").failover = Some((n("n3"), false))], obs("n1", Pg::Stopped { standby: false }, Some(store(None)))), &s, vec![], Some("n3 takes over")),
            ("manual failover past its bound: the ordinary election", with(&[&|o: &mut Observation| o.store.as_mut().expect("store").failover = Some((n("n3"), true))], obs("n2", standby(Some("n1")), Some(store(None)))), &s, vec![TakeLeader], None),
            ("a leader deletes the manual failover", with(&[&|o: &mut Observation| o.store.as_mut().expect("store").failover = Some((n("n3"), false))], obs("n3", primary(), Some(store(Some("n3"))))), &s, vec![DoneWithFailover, Lead], None),
            // The old leader's rejoin.
            ("stopped exactly where the target took over: a standby, no rewind", with(&[&planned(stopped(false)), &at_stop], obs("n1", Pg::Stopped { standby: false }, Some(store(Some("n2"))))), &s, vec![StartStandby { upstream: Some(n("n2")) }], None),
            ("the same once done", with(&[&planned(Over { stopped_at: Some(Lsn(100 * MB)) }), &at_stop], obs("n1", Pg::Stopped { standby: false }, Some(store(Some("n2"))))), &s, vec![StartStandby { upstream: Some(n("n2")) }], None),
            ("its data moved since the stop: rewind", with(&[&planned(Over { stopped_at: Some(Lsn(100 * MB)) }), &elsewhere], obs("n1", Pg::Stopped { standby: false }, Some(store(Some("n2"))))), &s, vec![Rewind { from: n("n2") }], None),
            ("not shut down cleanly: rewind", with(&[&planned(Over { stopped_at: Some(Lsn(100 * MB)) })], obs("n1", Pg::Stopped { standby: false }, Some(store(Some("n2"))))), &s, vec![Rewind { from: n("n2") }], None),
            ("a third node leads: rewind", with(&[&planned(Over { stopped_at: Some(Lsn(100 * MB)) }), &at_stop], obs("n1", Pg::Stopped { standby: false }, Some(store(Some("n3"))))), &s, vec![Rewind { from: n("n3") }], None),
            ("a failed one that never stopped: rewind", with(&[&planned(Over { stopped_at: None }), &at_stop], obs("n1", Pg::Stopped { standby: false }, Some(store(Some("n2"))))), &s, vec![Rewind { from: n("n2") }], None),
        ];
        for (what, o, s, actions, reason) in cases {
            let d = decide(&o, s);
            assert_eq!(d.actions, actions, "{what}");
            match reason {
                Some(phrase) => {
                    let text = d
                        .waiting
                        .as_ref()
                        .map(|r| r.to_string())
                        .unwrap_or_default();
                    assert!(text.contains(phrase), "{what}: {text:?} lacks {phrase:?}");
                }
                None => assert_eq!(d.waiting, None, "{what}"),
            }
        }
    }

    #[test]
    fn decisions() {
        let s = settings();
        let with = |f: &dyn Fn(&mut Observation), o: Observation| {
            let mut o = o;
            f(&mut o);
            o
        };
        let crashed =
            |after: u32| move |o: &mut Observation| o.pg_down_since = Some(NOW - after * S);
        let renewed = |ago_ms: u64| {
            move |o: &mut Observation| o.renewed_at = Some(NOW - Duration::from_millis(ago_ms))
        };
        let old_key = |o: &mut Observation| {
            if let Some(l) = o.store.as_mut().and_then(|s| s.leader.as_mut()) {
                l.ours = false;
            }
        };
        let gone = |o: &mut Observation| o.leader_gone = true;
        let ahead_n3 = |o: &mut Observation| o.candidates = vec![cand("n2", 1), cand("n3", 0)];
        let failover = Settings {
            on_crash: OnCrash::Failover,
            ..settings()
        };
        let manual = Settings {
            rejoin: Rejoin::Manual,
            ..settings()
        };
        let clone = Settings {
            rejoin: Rejoin::Clone,
            ..settings()
        };
        let synchronous = Settings {
            synchronous_mode: SyncMode::On,
            ..settings()
        };
        let sync_set = |names: &[&str]| {
            let names: Vec<NodeId> = names.iter().map(|x| n(x)).collect();
            move |o: &mut Observation| {
                o.store.as_mut().expect("store").synchronous_set = Some(names.clone())
            }
        };
        let no_last_leader = |o: &mut Observation| {
            let st = o.store.as_mut().expect("store");
            st.last_leader = None;
        };
        let paused = |o: Observation| {
            with(
                &|o: &mut Observation| o.store.as_mut().expect("store").paused = true,
                o,
            )
        };
        let initialised_by = |who: &'static str| {
            move |o: &mut Observation| {
                o.store.as_mut().expect("store").initialized_by = Some(n(who))
            }
        };
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            // Bootstrap.
            ("a new cluster: claim initialize", obs("n1", Pg::Missing, Some(new_cluster())), &s, vec![ClaimInitialize], None),
            ("the claimer runs initdb", with(&initialised_by("n1"), obs("n1", Pg::Missing, Some(new_cluster()))), &s, vec![Initdb], None),
            ("the others wait for it", with(&initialised_by("n1"), obs("n2", Pg::Missing, Some(new_cluster()))), &s, vec![], Some("waiting for n1 to initialise")),
            ("after initdb the claimer takes the key", with(&initialised_by("n1"), obs("n1", Pg::Stopped { standby: false }, Some(new_cluster()))), &s, vec![TakeLeader], None),
            ("then starts as primary", obs("n1", Pg::Stopped { standby: false }, Some(store(Some("n1")))), &s, vec![StartPrimary], None),
            ("a replica clones from the leader", obs("n2", Pg::Missing, Some(store(Some("n1")))), &s, vec![Clone { from: n("n1") }], None),
            ("a leader without its roles yet: the clone waits", with(&|o: &mut Observation| o.store.as_mut().expect("store").leader_ready = false, obs("n2", Pg::Missing, Some(store(Some("n1"))))), &s, vec![], Some("waiting for leader n1 to be ready")),
            ("never initdb again once a leader existed", obs("n1", Pg::Missing, Some(store(None))), &s, vec![], Some("already exists")),
            ("no data and holding the key: release it", obs("n1", Pg::Missing, Some(store(Some("n1")))), &s, vec![ReleaseLeader], None),
            ("a cloned standby starts following the leader", obs("n2", Pg::Stopped { standby: true }, Some(store(Some("n1")))), &s, vec![StartStandby { upstream: Some(n("n1")) }], None),
            ("starting: wait", obs("n2", Pg::Starting { as_primary: false }, Some(store(Some("n1")))), &s, vec![], Some("starting")),
            // Leading.
            ("the leader leads", obs("n1", primary(), Some(store(Some("n1")))), &s, vec![Lead], None),
            ("at the fence margin: fence", with(&renewed(5000), obs("n1", primary(), Some(store(Some("n1"))))), &s, vec![Fence], None),
            ("just inside the margin: lead", with(&renewed(4900), obs("n1", primary(), Some(store(Some("n1"))))), &s, vec![Lead], None),
            ("never renewed: fence", with(&|o: &mut Observation| o.renewed_at = None, obs("n1", primary(), Some(store(Some("n1"))))), &s, vec![Fence], None),
            ("another node holds the key: fence", obs("n1", primary(), Some(store(Some("n2")))), &s, vec![Fence], None),
            ("store unreachable, lease fresh: keep writing", obs("n1", primary(), None), &s, vec![], Some("fencing in 4s 500ms")),
            ("store unreachable past the margin: fence", with(&renewed(5500), obs("n1", primary(), None)), &s, vec![Fence], None),
            ("a primary starting after the margin: fence", with(&renewed(6000), obs("n1", Pg::Starting { as_primary: true }, None)), &s, vec![Fence], None),
            ("key lapsed under the last leader: take it again", obs("n1", primary(), Some(store(None))), &s, vec![TakeLeader, Lead], None),
            ("key lapsed, another was the last leader: fence", with(&no_last_leader, obs("n2", primary(), Some(store(None)))), &s, vec![Fence], None),
            ("an earlier run's key is adopted before starting", with(&old_key, obs("n1", Pg::Stopped { standby: false }, Some(store(Some("n1"))))), &s, vec![AdoptLeader], None),
            // The leader's PostgreSQL crashed.
            ("crashed: restart in place", with(&crashed(1), obs("n1", Pg::Stopped { standby: false }, Some(store(Some("n1"))))), &s, vec![StartPrimary], None),
            ("crashed past primary_restart_timeout: release", with(&crashed(5), obs("n1", Pg::Stopped { standby: false }, Some(store(Some("n1"))))), &s, vec![ReleaseLeader], None),
            ("restart still starting past the timeout: fence and release", with(&crashed(6), obs("n1", Pg::Starting { as_primary: true }, Some(store(Some("n1"))))), &s, vec![Fence, ReleaseLeader], None),
            ("restart starting within the timeout: wait", with(&crashed(2), obs("n1", Pg::Starting { as_primary: true }, Some(store(Some("n1"))))), &s, vec![], Some("starting")),
            ("on_postgres_crash = failover: release at once", with(&crashed(0), obs("n1", Pg::Stopped { standby: false }, Some(store(Some("n1"))))), &failover, vec![ReleaseLeader], None),
            ("released after a crash: not taken again", with(&crashed(6), obs("n1", Pg::Stopped { standby: false }, Some(store(None)))), &s, vec![StartStandby { upstream: None }], None),
            ("a stopped last leader with no key: take it", obs("n1", Pg::Stopped { standby: false }, Some(store(None))), &s, vec![TakeLeader], None),
            ("holding the key on standby data: start, then promote", obs("n2", Pg::Stopped { standby: true }, Some(store(Some("n2")))), &s, vec![StartStandby { upstream: None }], None),
            // Replicas.
            ("a replica follows", obs("n2", standby(Some("n1")), Some(store(Some("n1")))), &s, vec![], None),
            ("a new leader: repoint", obs("n2", standby(Some("n1")), Some(store(Some("n3")))), &s, vec![Follow { upstream: n("n3") }], None),
            ("an unknown upstream: repoint", obs("n2", standby(None), Some(store(Some("n1")))), &s, vec![Follow { upstream: n("n1") }], None),
            ("store unreachable: a replica stays", obs("n2", standby(Some("n1")), None), &s, vec![], Some("unreachable")),
            ("store unreachable: a stopped standby starts read-only", obs("n2", Pg::Stopped { standby: true }, None), &s, vec![StartStandby { upstream: None }], None),
            ("store unreachable: a stopped primary stays down", obs("n1", Pg::Stopped { standby: false }, None), &s, vec![], Some("unreachable")),
            ("store unreachable: no data, nothing", obs("n2", Pg::Missing, None), &s, vec![], Some("unreachable")),
            ("holding the key as a standby: promote", obs("n2", standby(Some("n1")), Some(store(Some("n2")))), &s, vec![Promote, Lead], None),
            // Elections.
            ("no leader: the winner takes the key", obs("n2", standby(Some("n1")), Some(store(None))), &s, vec![TakeLeader], None),
            ("no leader: the other waits with its reason", obs("n3", standby(Some("n1")), Some(store(None))), &s, vec![], Some("n2 is ahead")),
            ("further ahead wins", with(&ahead_n3, obs("n3", standby(Some("n1")), Some(store(None)))), &s, vec![TakeLeader], None),
            ("behind: the loser waits", with(&ahead_n3, obs("n2", standby(Some("n1")), Some(store(None)))), &s, vec![], Some("n3 is ahead")),
            ("all too far behind: nobody", with(&|o: &mut Observation| o.candidates = vec![cand("n2", 2), cand("n3", 3)], obs("n2", standby(Some("n1")), Some(store(None)))), &s, vec![], Some("maximum_lag_on_failover")),
            ("nofailover: not this one", with(&|o: &mut Observation| o.candidates = vec![Candidate { nofailover: true, ..cand("n2", 0) }, cand("n3", 1)], obs("n2", standby(Some("n1")), Some(store(None)))), &s, vec![], Some("nofailover")),
            ("a peer that stopped answering does not block", with(&|o: &mut Observation| o.candidates = vec![cand("n2", 1), Candidate { age: 10 * S, ..cand("n3", 0) }], obs("n2", standby(Some("n1")), Some(store(None)))), &s, vec![TakeLeader], None),
            ("synchronous: only the recorded set", with(&sync_set(&["n3"]), obs("n2", standby(Some("n1")), Some(store(None)))), &synchronous, vec![], Some("not in the synchronous set")),
            ("holding the key with a lease past the margin: no start", with(&renewed(5000), obs("n1", Pg::Stopped { standby: false }, Some(store(Some("n1"))))), &s, vec![], Some("not been renewed")),
            ("synchronous: the recorded one runs though behind", with(&|o: &mut Observation| { sync_set(&["n3"])(o); o.candidates = vec![cand("n2", 0), cand("n3", 1)]; }, obs("n3", standby(Some("n1")), Some(store(None)))), &synchronous, vec![TakeLeader], None),
            ("an old primary restarted first does not win on an older timeline", with(&|o: &mut Observation| { o.store.as_mut().expect("store").last_leader_timeline = Some(2); o.candidates = vec![Candidate { timeline: Some(1), ..cand("n2", 0) }]; }, obs("n2", standby(None), Some(store(None)))), &s, vec![], Some("older than the last leader's 2")),
            ("synchronous, nothing recorded: nobody", obs("n2", standby(Some("n1")), Some(store(None))), &synchronous, vec![], Some("not in the synchronous set")),
            // Process death of the leader.
            ("the leader's processes are gone: take over", with(&gone, obs("n2", standby(Some("n1")), Some(store(Some("n1"))))), &s, vec![TakeOver { from: n("n1") }], None),
            ("gone, but another is ahead: wait", with(&|o: &mut Observation| { gone(o); ahead_n3(o); }, obs("n2", standby(Some("n1")), Some(store(Some("n1"))))), &s, vec![], Some("n3 is ahead")),
            ("gone leader does not count as a candidate", with(&|o: &mut Observation| { gone(o); o.candidates = vec![cand("n1", 0), cand("n2", 1)]; }, obs("n2", standby(Some("n1")), Some(store(Some("n1"))))), &s, vec![TakeOver { from: n("n1") }], None),
            // Rejoin.
            ("an old primary under a new leader rewinds", obs("n1", Pg::Stopped { standby: false }, Some(store(Some("n2")))), &s, vec![Rewind { from: n("n2") }], None),
            ("a failed rewind: clone again", with(&|o: &mut Observation| o.rewind_failed = true, obs("n1", Pg::Stopped { standby: false }, Some(store(Some("n2"))))), &s, vec![Reclone { from: n("n2") }], None),
            ("rejoin = clone", obs("n1", Pg::Stopped { standby: false }, Some(store(Some("n2")))), &clone, vec![Reclone { from: n("n2") }], None),
            ("rejoin = manual: wait and say so", obs("n1", Pg::Stopped { standby: false }, Some(store(Some("n2")))), &manual, vec![], Some("manual")),
            ("a standby that cannot follow the new timeline rewinds", with(&|o: &mut Observation| o.store.as_mut().expect("store").leader_timeline = Some(2), obs("n3", not_streaming(NOW - 10 * S, 1), Some(store(Some("n1"))))), &s, vec![Rewind { from: n("n1") }], None),
            ("not streaming briefly: wait", with(&|o: &mut Observation| o.store.as_mut().expect("store").leader_timeline = Some(2), obs("n3", not_streaming(NOW - 2 * S, 1), Some(store(Some("n1"))))), &s, vec![], Some("not streaming from n1 for 2s")),
            ("not streaming on the leader's timeline: not diverged, and says so", obs("n3", not_streaming(NOW - 30 * S, 1), Some(store(Some("n1")))), &s, vec![], Some("not streaming from n1 for 30s")),
            ("the leader's history fetched, the WAL still on the old timeline: it rewinds", with(&|o: &mut Observation| o.store.as_mut().expect("store").leader_timeline = Some(2), obs("n3", fetched_history(NOW - 10 * S), Some(store(Some("n1"))))), &s, vec![Rewind { from: n("n1") }], None),
            // Maintenance mode: nothing that changes what runs, fencing kept.
            ("paused: the leader keeps leading", paused(obs("n1", primary(), Some(store(Some("n1"))))), &s, vec![Lead], Some("paused")),
            ("paused: a crashed leader stays down, reported", paused(with(&crashed(1), obs("n1", Pg::Stopped { standby: false }, Some(store(Some("n1")))))), &s, vec![], Some("1 held back")),
            ("paused: past the margin the leader still fences", paused(with(&renewed(5000), obs("n1", primary(), Some(store(Some("n1")))))), &s, vec![Fence], Some("paused")),
            ("paused: a primary under another leader is still fenced", paused(obs("n2", primary(), Some(store(Some("n1"))))), &s, vec![Fence], Some("paused")),
            ("paused: a gone leader is not taken over", paused(with(&gone, obs("n2", standby(Some("n1")), Some(store(Some("n1")))))), &s, vec![], Some("held back")),
            ("paused: with no leader no standby takes the key", paused(obs("n2", standby(None), Some(store(None)))), &s, vec![], Some("paused")),
            ("paused: a standby under the key is not promoted", paused(obs("n2", standby(None), Some(store(Some("n2"))))), &s, vec![], Some("held back")),
            ("paused: a standby of another upstream is not repointed", paused(obs("n2", standby(Some("n3")), Some(store(Some("n1"))))), &s, vec![], Some("held back")),
            ("paused: a stopped standby is not started", paused(obs("n2", Pg::Stopped { standby: true }, Some(store(Some("n1"))))), &s, vec![], Some("held back")),
            ("paused: an old key is still adopted", paused(with(&old_key, obs("n1", primary(), Some(store(Some("n1")))))), &s, vec![AdoptLeader], Some("paused")),
        ];
        assert!(cases.len() >= 40, "{} cases", cases.len());
        for (what, o, s, actions, reason) in cases {
            let d = decide(&o, s);
            assert_eq!(d.actions, actions, "{what}: {d:?}");
            match (reason, &d.waiting) {
                (None, None) => {}
                (Some(want), Some(got)) => {
                    let got = got.to_string();
                    assert!(got.contains(want), "{what}: reason {got:?} lacks {want:?}");
                }
                (want, got) => panic!("{what}: reason {got:?}, wanted {want:?}"),
            }
        }
    }

    /// Rule 2 over every combination: a decision never starts or promotes a writable server
    /// unless this node holds the leader key, and never keeps one running past the margin.
    #[test]
    fn never_writable_without_the_key() {
        let pgs = [
            Pg::Missing,
            Pg::Stopped { standby: false },
            Pg::Stopped { standby: true },
            Pg::Starting { as_primary: true },
            Pg::Starting { as_primary: false },
            primary(),
            standby(Some("n1")),
            standby(None),
        ];
        let paused = |mut st: Store| {
            st.paused = true;
            Some(st)
        };
        let stores = [
            None,
            Some(store(None)),
            Some(store(Some("n1"))),
            Some(store(Some("n2"))),
            Some(new_cluster()),
            paused(store(None)),
            paused(store(Some("n1"))),
            paused(store(Some("n2"))),
        ];
        for pg in &pgs {
            for st in &stores {
                for renewed in [None, Some(NOW - S), Some(NOW - 6 * S)] {
                    for down in [None, Some(NOW - S), Some(NOW - 10 * S)] {
                        let mut o = obs("n1", pg.clone(), st.clone());
                        o.renewed_at = renewed;
                        o.pg_down_since = down;
                        let d = decide(&o, &settings());
                        let holds = st
                            .as_ref()
                            .and_then(|s| s.leader.as_ref())
                            .is_some_and(|l| l.node == o.node);
                        let lease_ok = renewed.is_some_and(|r| NOW - r + 2 * S < 7 * S);
                        for a in &d.actions {
                            if matches!(a, StartPrimary | Promote) {
                                assert!(holds && lease_ok, "{a:?} without the key: {o:?}");
                            }
                        }
                        let writable = matches!(pg, Pg::Running(r) if r.primary)
                            || matches!(pg, Pg::Starting { as_primary: true });
                        if writable
                            && (!lease_ok
                                || st
                                    .as_ref()
                                    .and_then(|s| s.leader.as_ref())
                                    .is_some_and(|l| l.node != o.node))
                        {
                            assert_eq!(d.actions.first(), Some(&Fence), "{o:?}: {d:?}");
                        }
                    }
                }
            }
        }
    }
}
