//! What `pgwarden status` adds when agents run (`[dcs]`): the leader and its epoch from the
//! store, and each member's role, state, lag and the reason it would not act.

use std::fmt::Write as _;
use std::time::Duration;

use pgwarden_config::Config;
use pgwarden_core::ByteSize;
use pgwarden_dcs::Snapshot;
use serde::Serialize;

use crate::member::MemberState;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HaStatus {
    /// `null` while nobody holds the leader key.
    pub leader: Option<String>,
    pub epoch: Option<u64>,
    /// Synchronous mode: the members that may be promoted.
    pub synchronous_set: Option<Vec<String>>,
    /// Maintenance mode (`pgwarden pause`): the agents take no automatic action.
    pub paused: bool,
    /// The last switchover asked for, running or finished.
    pub switchover: Option<SwitchoverStatus>,
    pub members: Vec<HaMember>,
    /// Why the store could not be read.
    pub error: Option<String>,
}

/// A switchover as `list` and `/cluster` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SwitchoverStatus {
    pub from: String,
    pub to: String,
    /// `requested`, `draining`, `stopped`, `done` or `failed`.
    pub phase: String,
    /// Unix milliseconds: when it was asked for, and when it is due (`null`: at once).
    pub requested_ms: u64,
    pub at_ms: Option<u64>,
    /// Done: how long new transactions were held (from the drain to the new leader).
    pub write_gap_ms: Option<u64>,
    /// Client transactions still running when the old leader stopped.
    pub cut_transactions: Option<u64>,
    pub epoch: Option<u64>,
    /// Why it failed.
    pub note: Option<String>,
}

impl SwitchoverStatus {
    pub fn of(sw: &pgwarden_dcs::Switchover) -> SwitchoverStatus {
        SwitchoverStatus {
            from: sw.from.clone(),
            to: sw.to.clone(),
            phase: sw.phase.name().to_string(),
            requested_ms: sw.requested_ms,
            at_ms: sw.at_ms,
            write_gap_ms: sw.write_gap_ms(),
            cut_transactions: sw.cut_transactions,
            epoch: sw.epoch,
            note: sw.note.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HaMember {
    pub name: String,
    pub role: String,
    pub state: String,
    pub timeline: Option<u32>,
    pub lsn: Option<String>,
    pub lag_bytes: Option<u64>,
    pub replay_lsn: Option<String>,
    pub replay_lag_bytes: Option<u64>,
    pub replay_lag_ms: Option<u64>,
    /// Its agent's API address.
    pub api: Option<String>,
    pub reason: Option<String>,
    /// The reason as a stable code (`paused`, `not_elected.lagging`, ...).
    pub reason_code: Option<String>,
}

impl HaStatus {
    pub fn from_snapshot(s: &Snapshot<MemberState>) -> HaStatus {
        HaStatus {
            leader: s.leader.as_ref().map(|l| l.node.to_string()),
            epoch: s.leader.as_ref().map(|l| l.epoch.0),
            synchronous_set: s
                .synchronous_set
                .as_ref()
                .map(|set| set.iter().map(|n| n.to_string()).collect()),
            paused: s.paused,
            switchover: s
                .switchover
                .as_ref()
                .map(|x| SwitchoverStatus::of(&x.value)),
            members: s
                .members
                .iter()
                .map(|m| HaMember {
                    name: m.node.to_string(),
                    role: m.state.role.clone(),
                    state: m.state.state.clone(),
                    timeline: m.state.timeline,
                    lsn: m.state.lsn.clone(),
                    lag_bytes: m.state.lag_bytes,
                    replay_lsn: m.state.replay_lsn.clone(),
                    replay_lag_bytes: m.state.replay_lag_bytes,
                    replay_lag_ms: m.state.replay_lag_ms,
                    api: m.state.api.clone(),
                    reason: m.state.reason.clone(),
                    reason_code: m.state.reason_code.clone(),
                })
                .collect(),
            error: None,
        }
    }

    /// Reads the store of `config` (bounded by its timeout, plus connecting).
    pub async fn read(config: &Config) -> HaStatus {
        let read = async {
            let store = crate::store::connect(config)
                .await
                .map_err(|e| e.to_string())?;
            store
                .snapshot::<MemberState>()
                .await
                .map_err(|e| e.to_string())
        };
        let bound = config
            .dcs
            .as_ref()
            .map_or(Duration::from_secs(2), |d| d.timeout * 3);
        match tokio::time::timeout(bound, read).await {
            Ok(Ok(s)) => HaStatus::from_snapshot(&s),
            Ok(Err(e)) => HaStatus::unreadable(e),
            Err(_) => HaStatus::unreadable(format!(
                "the consensus store did not answer within {}",
                pgwarden_core::format_duration(bound)
            )),
        }
    }

    /// Turns maintenance mode on or off in the store of `config` (bounded like [`HaStatus::read`]).
    pub async fn set_paused(config: &Config, paused: bool) -> Result<(), String> {
        let write = async {
            let store = crate::store::connect(config)
                .await
                .map_err(|e| e.to_string())?;
            store.set_paused(paused).await.map_err(|e| e.to_string())
        };
        let bound = config
            .dcs
            .as_ref()
            .map_or(Duration::from_secs(2), |d| d.timeout * 3);
        match tokio::time::timeout(bound, write).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "the consensus store did not answer within {}",
                pgwarden_core::format_duration(bound)
            )),
        }
    }

    /// The status of a store that could not be read, and why.
    pub fn unreadable(error: String) -> HaStatus {
        HaStatus {
            leader: None,
            epoch: None,
            synchronous_set: None,
            paused: false,
            switchover: None,
            members: Vec::new(),
            error: Some(error),
        }
    }

    /// Why the cluster is degraded as HA sees it, one line each.
    pub fn warnings(&self, config: &Config) -> Vec<String> {
        if let Some(e) = &self.error {
            return vec![format!("cannot read the HA store: {e}")];
        }
        let mut out = Vec::new();
        if self.paused {
            out.push(
                "paused: the agents take no automatic action (no failover, no restart) until pgwarden resume"
                    .to_string(),
            );
        }
        if self.leader.is_none() {
            out.push("no node holds the leader key: writes are refused".to_string());
        }
        for n in &config.nodes {
            match self.members.iter().find(|m| m.name == n.name) {
                None => out.push(format!(
                    "{}: no agent is publishing (down or cut off)",
                    n.name
                )),
                Some(m) if m.role == "down" => out.push(format!(
                    "{}: {}{}",
                    m.name,
                    m.state,
                    m.reason
                        .as_ref()
                        .map_or(String::new(), |r| format!(" ({r})"))
                )),
                Some(_) => {}
            }
        }
        out
    }

    /// The text block under the status table.
    pub fn render(&self) -> String {
        let mut s = String::from("HA (from the store)\n");
        if self.paused {
            s.push_str("  PAUSED: no automatic action until `pgwarden resume`\n");
        }
        if let Some(e) = &self.error {
            let _ = writeln!(s, "  cannot read the store: {e}");
            return s;
        }
        let _ = writeln!(
            s,
            "  leader: {}  epoch: {}{}",
            self.leader.as_deref().unwrap_or("none"),
            self.epoch.map_or("-".to_string(), |e| e.to_string()),
            self.synchronous_set
                .as_ref()
                .map_or(String::new(), |set| format!(
                    "  synchronous set: [{}]",
                    set.join(", ")
                ))
        );
        if let Some(sw) = &self.switchover {
            let _ = writeln!(
                s,
                "  switchover {} -> {}: {}{}{}",
                sw.from,
                sw.to,
                sw.phase,
                sw.write_gap_ms
                    .map_or(String::new(), |ms| format!(", writes held {ms} ms")),
                sw.note
                    .as_ref()
                    .map_or(String::new(), |n| format!(" ({n})"))
            );
        }
        let _ = writeln!(
            s,
            "  {:<8} {:<8} {:<9} {:>3} {:>12} {:>10} {:>16}  reason",
            "member", "role", "state", "tl", "lsn", "lag", "replay lag"
        );
        for m in &self.members {
            let replay = match (m.replay_lag_bytes, m.replay_lag_ms) {
                (Some(b), Some(ms)) => format!("{} {:.1}s", ByteSize(b), ms as f64 / 1000.0),
                (Some(b), None) => ByteSize(b).to_string(),
                _ => "-".into(),
            };
            let _ = writeln!(
                s,
                "  {:<8} {:<8} {:<9} {:>3} {:>12} {:>10} {:>16}  {}",
                m.name,
                m.role,
                m.state,
                m.timeline.map_or("-".into(), |t| t.to_string()),
                m.lsn.as_deref().unwrap_or("-"),
                m.lag_bytes.map_or("-".into(), |b| ByteSize(b).to_string()),
                replay,
                m.reason.as_deref().unwrap_or("")
            );
        }
        s
    }
}
