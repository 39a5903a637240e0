//! Planned switchover: who may be the target, and what each agent does at each stage. Pure;
//! [`crate::decide`] calls it and the driver carries the actions out.
//!
//! The stages, each a decision from a fresh observation:
//! 1. **Requested** (by `pgwarden switchover` or `POST /switchover`, refused with its reason
//!    by [`check_target`] before anything is written). Once due, the leader checks the target
//!    again, asked on its API, and begins ([`Action::BeginSwitchover`]) or fails it.
//! 2. **Draining.** The proxies see it in the store and hold new transactions; the leader
//!    waits until no client transaction runs on its server (after the hold had time to reach
//!    the proxies), or the drain's bound passes.
//! 3. **Hand-over** ([`Action::HandOver`]): a checkpoint, a clean (fast) shutdown — PostgreSQL
//!    then sends every byte of WAL to the connected standbys before it exits —, and one store
//!    transaction: `stopped` at the shutdown checkpoint, `last_leader` there, the leader key
//!    deleted.
//! 4. **The target** takes the key (epoch + 1) only once it has received past that checkpoint
//!    on the same timeline, so no acknowledged commit is lost, whatever the replication mode;
//!    then it promotes, as in a failover, and records the switchover `done`. The others wait
//!    for it for `ttl`; after that the ordinary election (or the old leader, which has every
//!    write) runs.
//! 5. **The old leader** starts as the new leader's standby without a rewind: its data stopped
//!    cleanly at exactly the point the target received.

use std::fmt;

use std::time::Duration;

use pgwarden_core::{ByteSize, Lsn, NodeId};
use pgwarden_dcs::{Switchover, SwitchoverPhase};

use crate::decide::{Action, Decision, Observation, Pg, Reason, Role, Store};
use crate::member::MemberState;

/// How long the leader keeps draining after it recorded the drain before it may find it done:
/// time for the proxies (watching the store) to hold new transactions.
pub const HOLD_PROPAGATION: Duration = Duration::from_millis(100);

/// A drain this long past its bound was abandoned: the proxies stop holding for it and a new
/// switchover may be asked for.
pub const ABANDONED_AFTER: Duration = Duration::from_secs(30);

/// Whether `sw` still runs at `now_ms` (a new one is refused meanwhile): not over, and not a
/// stop that nobody took over within `ttl`.
pub fn under_way(sw: &Switchover, now_ms: u64, ttl: Duration) -> bool {
    !matches!(
        plan_of(sw, now_ms, ttl, false).stage,
        Stage::Over { .. } | Stage::Stopped { expired: true, .. }
    )
}

/// Whether the proxies hold new transactions for `sw` at `now_ms`: while its leader drains.
pub fn holds_writes(sw: &Switchover, now_ms: u64) -> bool {
    sw.phase == SwitchoverPhase::Draining
        && !matches!(
            plan_of(sw, now_ms, Duration::ZERO, false).stage,
            Stage::Over { .. }
        )
}

/// The wall clock in Unix milliseconds (the switchover key's times).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The stage of `sw` at wall-clock `now_ms`. `drained`: the leader found no client
/// transaction running on its server (only the leader asks). A stopped switchover expires
/// `ttl` after the stop.
pub fn plan_of(sw: &Switchover, now_ms: u64, ttl: Duration, drained: bool) -> Plan {
    let since = |t: Option<u64>| Duration::from_millis(now_ms.saturating_sub(t.unwrap_or(0)));
    let stage = match sw.phase {
        SwitchoverPhase::Requested if sw.at_ms.is_some_and(|at| now_ms < at) => Stage::Scheduled,
        SwitchoverPhase::Requested => Stage::Due,
        SwitchoverPhase::Draining
            if since(sw.draining_ms) >= Duration::from_millis(sw.drain_ms) + ABANDONED_AFTER =>
        {
            // Its leader never handed over (it lost the key while stopping): nobody acts on it.
            Stage::Over { stopped_at: None }
        }
        SwitchoverPhase::Draining => {
            let waited = since(sw.draining_ms);
            Stage::Draining {
                done: (drained && waited >= HOLD_PROPAGATION)
                    || waited >= Duration::from_millis(sw.drain_ms),
            }
        }
        SwitchoverPhase::Stopped => match (sw.stopped_at(), sw.stopped_timeline) {
            (Some(lsn), Some(timeline)) => Stage::Stopped {
                lsn,
                timeline,
                expired: since(sw.stopped_ms) >= ttl,
            },
            _ => Stage::Over { stopped_at: None },
        },
        SwitchoverPhase::Done | SwitchoverPhase::Failed => Stage::Over {
            stopped_at: sw.stopped_at(),
        },
    };
    Plan {
        from: sw.from_node(),
        to: sw.to_node(),
        stage,
    }
}

/// A switchover as one agent sees it in a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub from: NodeId,
    pub to: NodeId,
    pub stage: Stage,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// Asked for, not due yet (`--at`).
    Scheduled,
    /// Asked for and due: the leader begins.
    Due,
    /// The proxies hold new transactions. `done`: no client transaction runs on the leader
    /// any more, or the drain's bound passed.
    Draining { done: bool },
    /// The old leader stopped cleanly at `lsn` on `timeline` and gave up the key. `expired`:
    /// the target has not taken it within `ttl`, so the others stop waiting for it.
    Stopped {
        lsn: Lsn,
        timeline: u32,
        expired: bool,
    },
    /// Done or failed; `stopped_at`: where the old leader stopped cleanly, if it did.
    Over { stopped_at: Option<Lsn> },
}

/// The target as observed (asked on its API, or as published).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub node: NodeId,
    /// Its PostgreSQL runs as a standby.
    pub standby_running: bool,
    /// Its WAL receiver streams.
    pub streaming: bool,
    pub received: Option<Lsn>,
    pub timeline: Option<u32>,
    pub nofailover: bool,
}

impl Target {
    /// A member as it published its state (or answered on its API).
    pub fn of(node: NodeId, m: &MemberState) -> Target {
        Target {
            node,
            standby_running: m.state == "running" && !m.primary,
            streaming: m.streaming,
            received: m.lsn.as_deref().and_then(|l| l.parse().ok()),
            timeline: m.timeline,
            nofailover: m.nofailover,
        }
    }
}

/// What a target is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leading {
    pub node: NodeId,
    pub lsn: Option<Lsn>,
    pub timeline: Option<u32>,
    /// `maximum_lag_on_failover` (`None`: unlimited); `force` skips it.
    pub maximum_lag: Option<u64>,
}

/// Why a switchover is refused (before anything is touched) or fails when due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NoLeader,
    Paused,
    Running {
        from: NodeId,
        to: NodeId,
    },
    UnknownMember(NodeId),
    IsLeader(NodeId),
    NoFailover(NodeId),
    NotStandby(NodeId),
    NotStreaming(NodeId),
    OtherTimeline {
        node: NodeId,
        theirs: Option<u32>,
        leader: Option<u32>,
    },
    Lagging {
        node: NodeId,
        behind: u64,
        maximum: u64,
    },
    /// No `--to`, and no member may be the target: each one's reason.
    NoTarget(Vec<Refusal>),
    /// A re-clone of the leader (its data is the cluster's).
    LeaderData(NodeId),
    /// A manual failover while a leader holds the key.
    LeaderHolds(NodeId),
    /// The leader named in the request no longer leads.
    LeaderChanged {
        asked: NodeId,
        now: Option<NodeId>,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoLeader => f.write_str("no member holds the leader key (use pgwarden failover)"),
            Refusal::Paused => f.write_str("the cluster is paused (pgwarden resume first)"),
            Refusal::Running { from, to } => {
                write!(f, "a switchover from {from} to {to} is already under way")
            }
            Refusal::UnknownMember(n) => write!(f, "{n} is not a member that publishes its state"),
            Refusal::IsLeader(n) => write!(f, "{n} already leads"),
            Refusal::NoFailover(n) => write!(f, "{n} is tagged nofailover"),
            Refusal::NotStandby(n) => write!(f, "{n}'s PostgreSQL is not running as a standby"),
            Refusal::NotStreaming(n) => {
                write!(f, "{n} is not streaming from the leader, so it cannot catch up")
            }
            Refusal::OtherTimeline {
                node,
                theirs,
                leader,
            } => write!(
                f,
                "{node} is on timeline {}, the leader on {}",
                theirs.map_or("?".into(), |t| t.to_string()),
                leader.map_or("?".into(), |t| t.to_string())
            ),
            Refusal::Lagging {
                node,
                behind,
                maximum,
            } => write!(
                f,
                "{node} is {} behind the leader (maximum_lag_on_failover {}; --force to wait for it to catch up)",
                ByteSize(*behind),
                ByteSize(*maximum)
            ),
            Refusal::NoTarget(all) => {
                f.write_str("no member may take over:")?;
                for (i, r) in all.iter().enumerate() {
                    write!(f, "{} {r}", if i == 0 { "" } else { ";" })?;
                }
                if all.is_empty() {
                    f.write_str(" the leader is the only member")?;
                }
                Ok(())
            }
            Refusal::LeaderData(n) => write!(
                f,
                "{n} leads and its data is the cluster's: switch over first, then re-clone it"
            ),
            Refusal::LeaderHolds(n) => write!(
                f,
                "{n} holds the leader key: use pgwarden switchover (a manual failover is for when nobody leads)"
            ),
            Refusal::LeaderChanged { asked, now } => write!(
                f,
                "it was asked of {asked}, and {} leads now",
                now.as_ref().map_or("nobody".to_string(), |n| n.to_string())
            ),
        }
    }
}

/// Whether `t` may take over from `leader` in a switchover. The target must be a streaming
/// standby on the leader's timeline that may fail over; with `force` it may lag (the leader
/// then waits for it to catch up, bounded).
pub fn check_target(t: &Target, leader: &Leading, force: bool) -> Result<(), Refusal> {
    let node = || t.node.clone();
    if t.node == leader.node {
        return Err(Refusal::IsLeader(node()));
    }
    if t.nofailover {
        return Err(Refusal::NoFailover(node()));
    }
    if !t.standby_running {
        return Err(Refusal::NotStandby(node()));
    }
    if !t.streaming {
        return Err(Refusal::NotStreaming(node()));
    }
    if t.timeline.is_none() || t.timeline != leader.timeline {
        return Err(Refusal::OtherTimeline {
            node: node(),
            theirs: t.timeline,
            leader: leader.timeline,
        });
    }
    if let (false, Some(maximum), Some(at), Some(got)) =
        (force, leader.maximum_lag, leader.lsn, t.received)
    {
        let behind = at.bytes_since(got);
        if behind > maximum {
            return Err(Refusal::Lagging {
                node: node(),
                behind,
                maximum,
            });
        }
    }
    Ok(())
}

/// The target for a switchover without `--to`: the eligible member furthest ahead (then by
/// name), or every member's reason.
pub fn choose_target(members: &[Target], leader: &Leading, force: bool) -> Result<NodeId, Refusal> {
    let mut why = Vec::new();
    let mut best: Option<&Target> = None;
    for t in members.iter().filter(|t| t.node != leader.node) {
        match check_target(t, leader, force) {
            Ok(()) => {
                if best.map_or(true, |b| (t.received, &b.node) > (b.received, &t.node)) {
                    best = Some(t);
                }
            }
            Err(r) => why.push(r),
        }
    }
    best.map(|t| t.node.clone()).ok_or(Refusal::NoTarget(why))
}

/// The leader's part: it holds the key and its PostgreSQL runs as a primary.
pub(crate) fn as_leader(
    o: &Observation,
    store: &Store,
    target: Option<&Target>,
) -> Option<Decision> {
    let plan = store.switchover.as_ref()?;
    let me = &o.node;
    let fail = |why: String| {
        Some(Decision::act(
            Role::Leader,
            vec![Action::FailSwitchover { why }, Action::Lead],
        ))
    };
    match &plan.stage {
        Stage::Over { .. } => None,
        Stage::Stopped { .. } if &plan.to == me => Some(Decision::act(
            Role::Leader,
            vec![Action::FinishSwitchover, Action::Lead],
        )),
        Stage::Stopped { .. } => fail(format!(
            "{} did not take over after {} stopped; {me} leads",
            plan.to, plan.from
        )),
        _ if &plan.from != me => fail(
            Refusal::LeaderChanged {
                asked: plan.from.clone(),
                now: Some(me.clone()),
            }
            .to_string(),
        ),
        Stage::Scheduled => None,
        Stage::Due => {
            let Pg::Running(r) = &o.pg else { return None };
            let leading = Leading {
                node: me.clone(),
                lsn: Some(r.lsn),
                timeline: Some(r.timeline),
                // Checked when it was asked for (or forced); now it only has to be able to
                // catch up, which the hand-over waits for.
                maximum_lag: None,
            };
            let checked = match target {
                Some(t) if t.node == plan.to => check_target(t, &leading, true),
                _ => Err(Refusal::NotStandby(plan.to.clone())),
            };
            match checked {
                Ok(()) => Some(Decision::act(
                    Role::Leader,
                    vec![
                        Action::Lead,
                        Action::BeginSwitchover {
                            to: plan.to.clone(),
                        },
                    ],
                )),
                Err(why) => fail(why.to_string()),
            }
        }
        Stage::Draining { done: true } => Some(Decision::act(
            Role::Leader,
            vec![Action::HandOver {
                to: plan.to.clone(),
            }],
        )),
        Stage::Draining { done: false } => Some(Decision {
            actions: vec![Action::Lead],
            role: Role::Leader,
            waiting: Some(Reason::Draining {
                to: plan.to.clone(),
            }),
        }),
    }
}

/// This node is the target of a switchover whose leader drains.
pub(crate) fn is_draining_to(o: &Observation, store: &Store) -> bool {
    store
        .switchover
        .as_ref()
        .is_some_and(|p| p.to == o.node && matches!(p.stage, Stage::Draining { .. }))
}

/// Nobody holds the key while a switchover's old leader has stopped: the target takes it once
/// it has received past the stop; the others (the old leader too) wait for it until `expired`.
pub(crate) fn without_leader(o: &Observation, store: &Store) -> Option<Decision> {
    let plan = store.switchover.as_ref()?;
    let Stage::Stopped {
        lsn,
        timeline,
        expired: false,
    } = &plan.stage
    else {
        return None;
    };
    let role = match &o.pg {
        Pg::Running(r) if !r.primary => Role::Replica,
        _ => Role::Down,
    };
    if plan.to != o.node {
        return Some(Decision::wait(
            role,
            Reason::SwitchingOver {
                from: plan.from.clone(),
                to: plan.to.clone(),
            },
        ));
    }
    match &o.pg {
        // Past the shutdown checkpoint, on its timeline: it holds every byte the leader wrote.
        // (The timeline counts the history files it fetched: the one its WAL is on may still
        // read older in its control file until its next restartpoint.)
        // It promotes in the same round, once the key is taken (a lost take stops there).
        Pg::Running(r) if !r.primary && r.timeline == *timeline && r.lsn > *lsn => Some(
            Decision::act(Role::Replica, vec![Action::TakeLeader, Action::Promote]),
        ),
        _ => Some(Decision::wait(
            role,
            Reason::CatchingUp {
                from: plan.from.clone(),
                lsn: *lsn,
            },
        )),
    }
}

/// The old leader of a switchover, stopped cleanly exactly where the target took over,
/// starts as its standby without a rewind.
pub(crate) fn clean_rejoin(o: &Observation, store: &Store, leader: &NodeId) -> Option<Decision> {
    let plan = store.switchover.as_ref()?;
    let stopped = match &plan.stage {
        Stage::Stopped { lsn, .. } => Some(*lsn),
        Stage::Over { stopped_at } => *stopped_at,
        _ => None,
    };
    let clean =
        plan.from == o.node && &plan.to == leader && stopped.is_some() && o.shut_down_at == stopped;
    clean.then(|| {
        Decision::act(
            Role::Down,
            vec![Action::StartStandby {
                upstream: Some(leader.clone()),
            }],
        )
    })
}
