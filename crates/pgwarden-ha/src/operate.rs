//! Operator commands on the store: asking for a switchover (checked before anything is
//! written) and following it to its end. Used by `pgwarden switchover` and the agents' API.

use std::time::Duration;

use pgwarden_config::Config;
use pgwarden_core::NodeId;
use pgwarden_dcs::{
    ClusterStore, Kv, Leader, ManualFailover, NodeAction, NodeRequest, Revision, Snapshot,
    Switchover,
};

use crate::member::MemberState;
use crate::switchover::{self, Leading, Refusal, Target};

/// What an operator asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Refuse unless this member leads (what the caller believes).
    pub leader: Option<String>,
    pub to: Option<String>,
    /// Unix milliseconds; `None`: at once.
    pub at_ms: Option<u64>,
    /// Skip the target's lag check (the leader waits for it to catch up, bounded).
    pub force: bool,
    /// How long the leader waits for running transactions before it stops anyway.
    pub drain: Duration,
}

/// The default drain: short enough that transactions held meanwhile by a proxy with the default
/// `server_connect_timeout` (3 s) still get a server.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum OperateError {
    #[error("switchover refused: {0}")]
    Refused(Refusal),
    #[error("{0}")]
    Store(String),
    #[error("the cluster changed while the switchover was being asked for (leader or switchover key); try again")]
    Raced,
}

/// The switchover to write for `req`, checked against `snap` (the published member states),
/// with the leader it is asked of and the switchover key's revision it replaces.
pub fn plan_request(
    snap: &Snapshot<MemberState>,
    req: &Request,
    maximum_lag: Option<u64>,
    ttl: Duration,
    now_ms: u64,
) -> Result<(Switchover, Leader, Revision), Refusal> {
    let leader = snap.leader.clone().ok_or(Refusal::NoLeader)?;
    if let Some(asked) = req.leader.as_deref().filter(|l| *l != leader.node.as_str()) {
        return Err(Refusal::LeaderChanged {
            asked: NodeId::new(asked),
            now: Some(leader.node.clone()),
        });
    }
    if snap.paused {
        return Err(Refusal::Paused);
    }
    let replaces = match &snap.switchover {
        Some(s) if switchover::under_way(&s.value, now_ms, ttl) => {
            return Err(Refusal::Running {
                from: s.value.from_node(),
                to: s.value.to_node(),
            })
        }
        Some(s) => s.revision,
        None => 0,
    };
    let state = |n: &NodeId| snap.members.iter().find(|m| &m.node == n).map(|m| &m.state);
    let leading = match state(&leader.node) {
        Some(m) if m.primary && m.state == "running" => Leading {
            node: leader.node.clone(),
            lsn: m.lsn.as_deref().and_then(|l| l.parse().ok()),
            timeline: m.timeline,
            maximum_lag,
        },
        _ => return Err(Refusal::NoLeader),
    };
    let members: Vec<Target> = snap
        .members
        .iter()
        .map(|m| Target::of(m.node.clone(), &m.state))
        .collect();
    let to = match &req.to {
        Some(name) => {
            let node = NodeId::new(name);
            let t = members
                .iter()
                .find(|t| t.node == node)
                .ok_or(Refusal::UnknownMember(node.clone()))?;
            switchover::check_target(t, &leading, req.force)?;
            node
        }
        None => switchover::choose_target(&members, &leading, req.force)?,
    };
    let sw = Switchover::requested(
        now_ms,
        &leader.node,
        &to,
        req.at_ms,
        req.drain.as_millis() as u64,
    );
    Ok((sw, leader, replaces))
}

/// Checks `req` against the store and writes it; returns what was written.
pub async fn request_switchover<K: Kv>(
    store: &ClusterStore<K>,
    config: &Config,
    req: &Request,
) -> Result<Switchover, OperateError> {
    // Positions are published once a round, so a target may look behind by a WAL segment the
    // leader just switched to: a lag refusal is confirmed on later rounds' states.
    let mut looks_behind = 0;
    let (sw, leader, replaces) = loop {
        let snap = store
            .snapshot::<MemberState>()
            .await
            .map_err(|e| OperateError::Store(e.to_string()))?;
        let maximum_lag = effective(config, &snap)
            .agent
            .maximum_lag_on_failover
            .map(|b| b.bytes());
        match plan_request(
            &snap,
            req,
            maximum_lag,
            config.agent.ttl,
            switchover::unix_ms(),
        ) {
            Ok(planned) => break planned,
            Err(Refusal::Lagging { .. }) if looks_behind < LAG_CONFIRMATIONS => {
                looks_behind += 1;
                tokio::time::sleep(config.agent.loop_wait).await;
            }
            Err(r) => return Err(OperateError::Refused(r)),
        }
    };
    match store.request_switchover(&sw, &leader, replaces).await {
        Ok(true) => Ok(sw),
        Ok(false) => Err(OperateError::Raced),
        Err(e) => Err(OperateError::Store(e.to_string())),
    }
}

/// `config` with the store's dynamic settings applied, as the agents apply them (the file's
/// alone when there are none, or they do not pass the checks).
pub fn effective(config: &Config, snap: &Snapshot<MemberState>) -> Config {
    snap.dynamic
        .as_ref()
        .and_then(|d| pgwarden_config::dynamic::apply(config, &d.value).ok())
        .unwrap_or_else(|| config.clone())
}

/// How many more rounds a target that looks too far behind is looked at again.
const LAG_CONFIRMATIONS: u32 = 2;

/// How long a caller follows a switchover: the drain, then room for the stop, the catch-up and
/// the promotion (the agents give up on the target after `ttl`).
pub fn follow_bound(config: &Config, drain: Duration) -> Duration {
    drain + config.agent.ttl * 2 + Duration::from_secs(30)
}

/// Follows the switchover asked for at `requested_ms` until it is done or failed, or `bound`
/// passes (`None`: it did not end in time, or another replaced it).
pub async fn wait_switchover<K: Kv>(
    store: &ClusterStore<K>,
    requested_ms: u64,
    bound: Duration,
) -> Option<Switchover> {
    wait_until(store, bound, |s| match &s.switchover {
        Some(x) if x.value.requested_ms != requested_ms => Some(None),
        Some(x) if x.value.phase.is_over() => Some(Some(x.value.clone())),
        _ => None,
    })
    .await
    .flatten()
}

/// Checks and writes a restart or re-clone request for `node`; returns when its PostgreSQL
/// had started before (for [`request_done`]).
pub async fn request_node<K: Kv>(
    store: &ClusterStore<K>,
    config: &Config,
    node: &str,
    action: NodeAction,
) -> Result<Option<u64>, OperateError> {
    if config.node(node).is_none() {
        return Err(OperateError::Refused(Refusal::UnknownMember(NodeId::new(
            node,
        ))));
    }
    let snap = store
        .snapshot::<MemberState>()
        .await
        .map_err(|e| OperateError::Store(e.to_string()))?;
    let before = started(&snap, node);
    if action == NodeAction::Reinit {
        match &snap.leader {
            None => return Err(OperateError::Refused(Refusal::NoLeader)),
            Some(l) if l.node.as_str() == node => {
                return Err(OperateError::Refused(Refusal::LeaderData(l.node.clone())))
            }
            Some(_) => {}
        }
    }
    let req = NodeRequest {
        action,
        requested_ms: switchover::unix_ms(),
    };
    store
        .request(node, &req)
        .await
        .map_err(|e| OperateError::Store(e.to_string()))?;
    Ok(before)
}

/// The manual failover to write: only while nobody holds the leader key, to a member that
/// runs as a standby.
pub fn plan_failover(
    snap: &Snapshot<MemberState>,
    to: &str,
    now_ms: u64,
) -> Result<ManualFailover, Refusal> {
    if let Some(l) = &snap.leader {
        return Err(Refusal::LeaderHolds(l.node.clone()));
    }
    let node = NodeId::new(to);
    let m = snap
        .members
        .iter()
        .find(|m| m.node == node)
        .ok_or_else(|| Refusal::UnknownMember(node.clone()))?;
    if m.state.state != "running" || m.state.primary {
        return Err(Refusal::NotStandby(node));
    }
    if m.state.nofailover {
        return Err(Refusal::NoFailover(node));
    }
    Ok(ManualFailover {
        to: to.to_string(),
        requested_ms: now_ms,
    })
}

/// Checks and writes a manual failover to `to`.
pub async fn request_failover<K: Kv>(
    store: &ClusterStore<K>,
    to: &str,
) -> Result<ManualFailover, OperateError> {
    let snap = store
        .snapshot::<MemberState>()
        .await
        .map_err(|e| OperateError::Store(e.to_string()))?;
    let f = plan_failover(&snap, to, switchover::unix_ms()).map_err(OperateError::Refused)?;
    match store.request_failover(&f).await {
        Ok(true) => Ok(f),
        Ok(false) => Err(OperateError::Raced),
        Err(e) => Err(OperateError::Store(e.to_string())),
    }
}

/// Waits until `check` holds of the store's snapshot, or `bound` passes.
pub async fn wait_until<K: Kv, T>(
    store: &ClusterStore<K>,
    bound: Duration,
    check: impl Fn(&Snapshot<MemberState>) -> Option<T>,
) -> Option<T> {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        if let Ok(s) = store.snapshot::<MemberState>().await {
            if let Some(t) = check(&s) {
                return Some(t);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Carried out: `node`'s request is gone and its PostgreSQL runs again, started anew (its
/// start time differs from `before`, read before the request: no clocks compared), and for a
/// re-clone, streams.
pub fn request_done(
    s: &Snapshot<MemberState>,
    node: &str,
    action: NodeAction,
    before: Option<u64>,
) -> Option<MemberState> {
    if s.requests.iter().any(|(n, _)| n.as_str() == node) {
        return None;
    }
    let m = s.members.iter().find(|m| m.node.as_str() == node)?;
    let up = m.state.state == "running"
        && m.state.started_ms.is_some()
        && m.state.started_ms != before
        && (action == NodeAction::Restart || m.state.streaming);
    up.then(|| m.state.clone())
}

/// When `node`'s PostgreSQL started, as it last published.
pub fn started(s: &Snapshot<MemberState>, node: &str) -> Option<u64> {
    s.members
        .iter()
        .find(|m| m.node.as_str() == node)
        .and_then(|m| m.state.started_ms)
}

/// `to` leads: it holds the key and runs as a primary under its epoch.
pub fn leads(s: &Snapshot<MemberState>, to: &str) -> Option<u64> {
    let l = s.leader.as_ref().filter(|l| l.node.as_str() == to)?;
    let m = s.members.iter().find(|m| m.node.as_str() == to)?;
    (m.state.primary && m.state.epoch == Some(l.epoch.0)).then_some(l.epoch.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwarden_core::Epoch;
    use pgwarden_dcs::{Member, StoredSwitchover, SwitchoverPhase};

    const MB: u64 = 1 << 20;

    fn member(
        name: &str,
        primary: bool,
        lsn_mb: u64,
        f: impl Fn(&mut MemberState),
    ) -> Member<MemberState> {
        let mut state = MemberState {
            role: if primary { "leader" } else { "replica" }.into(),
            state: "running".into(),
            primary,
            timeline: Some(1),
            lsn: Some(pgwarden_core::Lsn(lsn_mb * MB).to_string()),
            streaming: !primary,
            lag_bytes: None,
            replay_lsn: None,
            replay_lag_bytes: None,
            replay_lag_ms: None,
            epoch: primary.then_some(3),
            ready: primary,
            host: "127.0.0.1".into(),
            port: 5432,
            api: None,
            priority: 1,
            nofailover: false,
            nosync: false,
            reason: None,
            reason_code: None,
            started_ms: None,
        };
        f(&mut state);
        Member {
            node: NodeId::new(name),
            state,
        }
    }

    fn snap(members: Vec<Member<MemberState>>) -> Snapshot<MemberState> {
        Snapshot {
            leader: Some(Leader {
                node: NodeId::new("n1"),
                epoch: Epoch(3),
                revision: 7,
                lease: None,
            }),
            last_epoch: Some(Epoch(3)),
            members,
            ..Snapshot::default()
        }
    }

    fn cluster() -> Vec<Member<MemberState>> {
        vec![
            member("n1", true, 100, |_| {}),
            member("n2", false, 100, |_| {}),
            member("n3", false, 99, |_| {}),
        ]
    }

    fn req(to: Option<&str>, force: bool) -> Request {
        Request {
            leader: None,
            to: to.map(String::from),
            at_ms: None,
            force,
            drain: DEFAULT_DRAIN,
        }
    }

    fn running(phase: SwitchoverPhase, at_ms: u64) -> StoredSwitchover {
        let mut value =
            Switchover::requested(at_ms, &NodeId::new("n1"), &NodeId::new("n3"), None, 2000);
        value.phase = phase;
        value.draining_ms = Some(at_ms);
        value.stopped_ms = Some(at_ms);
        value.stopped_lsn = Some("0/10".into());
        value.stopped_timeline = Some(1);
        StoredSwitchover {
            value,
            revision: 42,
        }
    }

    #[test]
    fn manual_failovers() {
        let mut no_leader = snap(cluster());
        no_leader.leader = None;
        assert_eq!(
            plan_failover(&no_leader, "n3", 9).map(|f| f.to),
            Ok("n3".to_string())
        );
        let refused =
            |s: &Snapshot<MemberState>, to| plan_failover(s, to, 9).expect_err(to).to_string();
        assert!(refused(&snap(cluster()), "n2")
            .contains("n1 holds the leader key: use pgwarden switchover"));
        assert!(refused(&no_leader, "n9").contains("n9 is not a member"));
        assert!(refused(&no_leader, "n1").contains("n1's PostgreSQL is not running as a standby"));
        no_leader.members[2].state.state = "stopped".into();
        assert!(refused(&no_leader, "n3").contains("not running as a standby"));
    }

    #[test]
    fn requests() {
        let ttl = Duration::from_secs(7);
        let now = 1_000_000;
        let lag = Some(MB / 2);
        let with = |f: &dyn Fn(&mut Snapshot<MemberState>)| {
            let mut s = snap(cluster());
            f(&mut s);
            s
        };
        let edit = |name: &'static str, f: fn(&mut MemberState)| {
            move |s: &mut Snapshot<MemberState>| {
                for m in s.members.iter_mut().filter(|m| m.node.as_str() == name) {
                    f(&mut m.state);
                }
            }
        };
        type Case<'a> = (
            &'a str,
            Snapshot<MemberState>,
            Request,
            Result<(&'a str, Revision), &'a str>,
        );
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            ("named and fit", snap(cluster()), req(Some("n2"), false), Ok(("n2", 0))),
            ("unnamed: the one furthest ahead", snap(cluster()), req(None, false), Ok(("n2", 0))),
            ("unnamed, equal: by name", with(&edit("n3", |m| m.lsn = Some(pgwarden_core::Lsn(100 * MB).to_string()))), req(None, false), Ok(("n2", 0))),
            ("lagging beyond maximum_lag_on_failover", snap(cluster()), req(Some("n3"), false), Err("n3 is 1.0 MiB behind the leader")),
            ("lagging, forced", snap(cluster()), req(Some("n3"), true), Ok(("n3", 0))),
            ("no leader", with(&|s| s.leader = None), req(Some("n2"), false), Err("no member holds the leader key")),
            ("paused", with(&|s| s.paused = true), req(Some("n2"), false), Err("paused")),
            ("to the leader", snap(cluster()), req(Some("n1"), false), Err("n1 already leads")),
            ("to an unknown member", snap(cluster()), req(Some("n9"), false), Err("n9 is not a member")),
            ("to a nofailover member", with(&edit("n2", |m| m.nofailover = true)), req(Some("n2"), false), Err("nofailover")),
            ("to a stopped member", with(&edit("n2", |m| m.state = "stopped".into())), req(Some("n2"), false), Err("not running as a standby")),
            ("to one that does not stream", with(&edit("n2", |m| m.streaming = false)), req(Some("n2"), false), Err("not streaming")),
            ("to one on another timeline", with(&edit("n2", |m| m.timeline = Some(2))), req(Some("n2"), false), Err("on timeline 2, the leader on 1")),
            ("the named leader leads", snap(cluster()), Request { leader: Some("n1".into()), ..req(Some("n2"), false) }, Ok(("n2", 0))),
            ("another leads than the one named", snap(cluster()), Request { leader: Some("n3".into()), ..req(Some("n2"), false) }, Err("it was asked of n3, and n1 leads now")),
            ("nobody fit", with(&|s| { edit("n2", |m| m.streaming = false)(s); edit("n3", |m| m.nofailover = true)(s) }), req(None, false), Err("no member may take over: n2 is not streaming from the leader, so it cannot catch up; n3 is tagged nofailover")),
            ("one under way", with(&|s| s.switchover = Some(running(SwitchoverPhase::Draining, now))), req(Some("n2"), false), Err("from n1 to n3 is already under way")),
            ("a finished one is replaced", with(&|s| s.switchover = Some(running(SwitchoverPhase::Done, now))), req(Some("n2"), false), Ok(("n2", 42))),
            ("a stop nobody took over in time is replaced", with(&|s| s.switchover = Some(running(SwitchoverPhase::Stopped, now - 8000))), req(Some("n2"), false), Ok(("n2", 42))),
            ("a recent stop is under way", with(&|s| s.switchover = Some(running(SwitchoverPhase::Stopped, now - 1000))), req(Some("n2"), false), Err("already under way")),
        ];
        for (what, s, r, want) in cases {
            match (plan_request(&s, &r, lag, ttl, now), want) {
                (Ok((sw, leader, rev)), Ok((to, replaces))) => {
                    assert_eq!((sw.to.as_str(), rev), (to, replaces), "{what}");
                    assert_eq!((sw.from.as_str(), leader.revision), ("n1", 7), "{what}");
                    assert_eq!(sw.phase, SwitchoverPhase::Requested, "{what}");
                }
                (Err(got), Err(phrase)) => {
                    let got = got.to_string();
                    assert!(got.contains(phrase), "{what}: {got:?} lacks {phrase:?}");
                }
                (got, want) => panic!("{what}: got {got:?}, wanted {want:?}"),
            }
        }
    }
}
