//! The cluster snapshot `pgwarden status` shows, and its stable JSON schema.

use std::time::SystemTime;

use pgwarden_config::{Config, MonitorConfig};
use pgwarden_core::Lsn;
use serde::Serialize;

use crate::probe::{NodeSample, PerfSample, WalSender};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Replica,
    Down,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum LagLevel {
    Low,
    Medium,
    High,
}

impl LagLevel {
    pub fn of(bytes: u64, monitor: &MonitorConfig) -> Self {
        if bytes >= monitor.lag_high.bytes() {
            LagLevel::High
        } else if bytes >= monitor.lag_medium.bytes() {
            LagLevel::Medium
        } else {
            LagLevel::Low
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LagLevel::Low => "LOW",
            LagLevel::Medium => "MEDIUM",
            LagLevel::High => "HIGH",
        }
    }
}

/// Bytes behind the primary's current LSN at each stage of replication.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LagBytes {
    /// WAL not yet sent by the primary's walsender.
    pub sent: Option<u64>,
    /// Not yet written by the standby.
    pub write: Option<u64>,
    /// Not yet flushed to the standby's disk.
    pub flush: Option<u64>,
    /// Not yet replayed (visible to queries on the standby).
    pub replay: Option<u64>,
}

/// Role-specific fields; flattened into the node object.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum NodeDetail {
    Primary {
        timeline: u32,
        lsn: String,
    },
    Replica {
        timeline: Option<u32>,
        receive_lsn: Option<String>,
        replay_lsn: Option<String>,
        lag_bytes: LagBytes,
        replay_lag_seconds: Option<f64>,
        lag_level: Option<LagLevel>,
        sync_state: Option<String>,
    },
    Down {},
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub role: Role,
    /// `running` (primary), the replication state (replica), the short connection error (down).
    pub state: String,
    #[serde(flatten)]
    pub detail: NodeDetail,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Performance {
    /// Client connections over all reachable nodes (the probe's own excluded).
    pub connections: i64,
    pub active_queries: i64,
    pub commits: i64,
    pub rollbacks: i64,
    /// Buffer hits / (hits + reads) over all reachable nodes; `null` before any block was read.
    pub cache_hit_ratio: Option<f64>,
    /// Size of every connectable database on the primary (or the first reachable node).
    pub database_size_bytes: i64,
    /// Walsenders on the primary.
    pub replication_connections: i64,
    /// Standbys currently `sync` or `quorum`.
    pub sync_replicas: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterStatus {
    pub cluster: String,
    pub checked_at: String,
    pub nodes: Vec<NodeStatus>,
    pub performance: Performance,
    /// Why the cluster is degraded, one line each (not part of `--json`'s schema).
    #[serde(skip)]
    pub warnings: Vec<String>,
}

impl ClusterStatus {
    /// Derives the snapshot from one sample per configured node (same order as `config.nodes`).
    pub fn build(config: &Config, samples: Vec<NodeSample>, at: SystemTime) -> Self {
        let primaries: Vec<usize> = samples
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, NodeSample::Primary { .. }))
            .map(|(i, _)| i)
            .collect();
        // With two primaries the one on the newest timeline, then furthest ahead, is the reference.
        let reference = primaries
            .iter()
            .copied()
            .max_by_key(|&i| match &samples[i] {
                NodeSample::Primary { timeline, lsn, .. } => (*timeline, *lsn),
                _ => (0, Lsn(0)),
            });
        let (primary_lsn, senders): (Option<Lsn>, &[WalSender]) =
            match reference.map(|i| &samples[i]) {
                Some(NodeSample::Primary { lsn, senders, .. }) => (Some(*lsn), senders),
                _ => (None, &[]),
            };
        let mut warnings = Vec::new();
        let nodes: Vec<NodeStatus> = config
            .nodes
            .iter()
            .zip(&samples)
            .map(|(node, sample)| {
                let sender = senders.iter().find(|s| s.application_name == node.name);
                let st = node_status(node, sample, primary_lsn, sender, &config.monitor);
                if let (Role::Replica, true) = (st.role, primary_lsn.is_some() && sender.is_none())
                {
                    warnings.push(format!(
                        "replica {} is not connected to the primary",
                        node.name
                    ));
                }
                if st.role == Role::Down {
                    warnings.push(format!(
                        "node {} is down: {}",
                        node.name,
                        st.error.as_deref().unwrap_or("unknown")
                    ));
                }
                st
            })
            .collect();
        match primaries.len() {
            0 => warnings.insert(0, "no primary: no node accepts writes".to_string()),
            1 => {}
            _ => {
                let names: Vec<&str> = primaries
                    .iter()
                    .map(|&i| config.nodes[i].name.as_str())
                    .collect();
                warnings.insert(
                    0,
                    format!(
                        "{} primaries: {} (split brain)",
                        names.len(),
                        names.join(", ")
                    ),
                );
            }
        }
        ClusterStatus {
            cluster: config.cluster.clone(),
            checked_at: humantime::format_rfc3339_seconds(at).to_string(),
            performance: performance(&samples, reference, senders),
            nodes,
            warnings,
        }
    }

    /// 0 when every node answers and there is exactly one primary; 1 when degraded.
    pub fn exit_code(&self) -> i32 {
        if self.warnings.is_empty() {
            0
        } else {
            1
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("status serialises")
    }
}

fn node_status(
    node: &pgwarden_config::NodeConfig,
    sample: &NodeSample,
    primary_lsn: Option<Lsn>,
    sender: Option<&WalSender>,
    monitor: &MonitorConfig,
) -> NodeStatus {
    let base = |role, state: String, detail, error| NodeStatus {
        name: node.name.clone(),
        host: node.host.clone(),
        port: node.port,
        role,
        state,
        detail,
        error,
    };
    match sample {
        NodeSample::Down(reason) => base(
            Role::Down,
            reason.kind.clone(),
            NodeDetail::Down {},
            Some(reason.message.clone()),
        ),
        NodeSample::Primary { lsn, timeline, .. } => base(
            Role::Primary,
            "running".into(),
            NodeDetail::Primary {
                timeline: *timeline,
                lsn: lsn.to_string(),
            },
            None,
        ),
        NodeSample::Replica {
            receive_lsn,
            replay_lsn,
            timeline,
            receiver_state,
            replay_delay_seconds,
            ..
        } => {
            let behind = |at: Option<Lsn>| Some(primary_lsn?.bytes_since(at?));
            let lag_bytes = match sender {
                Some(s) => LagBytes {
                    sent: behind(s.sent_lsn),
                    write: behind(s.write_lsn),
                    flush: behind(s.flush_lsn),
                    replay: behind(s.replay_lsn.or(*replay_lsn)),
                },
                // Not attached to the primary: judge by what the standby itself reports.
                None => LagBytes {
                    sent: None,
                    write: behind(*receive_lsn),
                    flush: behind(*receive_lsn),
                    replay: behind(*replay_lsn),
                },
            };
            let state = sender
                .map(|s| s.state.clone())
                .or_else(|| receiver_state.clone())
                .unwrap_or_else(|| "disconnected".into());
            let replay_lag_seconds = match (
                sender.and_then(|s| s.replay_lag_seconds),
                replay_delay_seconds,
            ) {
                (Some(a), Some(b)) => Some(a.max(*b)),
                (a, b) => a.or(*b),
            };
            base(
                Role::Replica,
                state,
                NodeDetail::Replica {
                    timeline: *timeline,
                    receive_lsn: receive_lsn.map(|l| l.to_string()),
                    replay_lsn: replay_lsn.map(|l| l.to_string()),
                    lag_level: lag_bytes.replay.map(|b| LagLevel::of(b, monitor)),
                    lag_bytes,
                    replay_lag_seconds,
                    sync_state: sender.map(|s| s.sync_state.clone()),
                },
                None,
            )
        }
    }
}

fn performance(
    samples: &[NodeSample],
    primary: Option<usize>,
    senders: &[WalSender],
) -> Performance {
    let perf_of = |s: &NodeSample| match s {
        NodeSample::Primary { perf, .. } | NodeSample::Replica { perf, .. } => Some(*perf),
        NodeSample::Down(_) => None,
    };
    let all: Vec<PerfSample> = samples.iter().filter_map(perf_of).collect();
    let sum = |f: fn(&PerfSample) -> i64| all.iter().map(f).sum::<i64>();
    let (hit, read) = (sum(|p| p.blocks_hit), sum(|p| p.blocks_read));
    let size_source = primary
        .and_then(|i| perf_of(&samples[i]))
        .or_else(|| all.first().copied());
    Performance {
        connections: sum(|p| p.connections),
        active_queries: sum(|p| p.active_queries),
        commits: sum(|p| p.commits),
        rollbacks: sum(|p| p.rollbacks),
        cache_hit_ratio: (hit + read > 0).then(|| hit as f64 / (hit + read) as f64),
        database_size_bytes: size_source.map_or(0, |p| p.database_size_bytes),
        replication_connections: senders.len() as i64,
        sync_replicas: senders
            .iter()
            .filter(|s| s.sync_state == "sync" || s.sync_state == "quorum")
            .count() as i64,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::probe::DownReason;

    fn config() -> Config {
        let text = r#"
cluster = "t"
[postgres]
superuser_password = "x"
[monitor]
lag_medium = "1MB"
lag_high = "10MB"
[[nodes]]
name = "n1"
port = 5432
[[nodes]]
name = "n2"
port = 5433
[[nodes]]
name = "n3"
port = 5434
"#;
        Config::from_toml(text, Path::new("/")).expect("valid")
    }

    const MB: u64 = 1 << 20;

    fn primary(lsn: u64, timeline: u32, senders: Vec<WalSender>) -> NodeSample {
        NodeSample::Primary {
            lsn: Lsn(lsn),
            timeline,
            history: None,
            senders,
            perf: PerfSample {
                connections: 3,
                commits: 10,
                blocks_hit: 90,
                blocks_read: 10,
                database_size_bytes: 1000,
                ..PerfSample::default()
            },
        }
    }

    fn replica(receive: u64, replay: u64) -> NodeSample {
        NodeSample::Replica {
            receive_lsn: Some(Lsn(receive)),
            replay_lsn: Some(Lsn(replay)),
            timeline: Some(1),
            receiver_state: Some("streaming".into()),
            replay_delay_seconds: Some(0.0),
            perf: PerfSample {
                connections: 1,
                commits: 5,
                blocks_hit: 10,
                ..PerfSample::default()
            },
        }
    }

    fn sender(name: &str, sent: u64, write: u64, flush: u64, replay: u64, sync: &str) -> WalSender {
        WalSender {
            application_name: name.into(),
            state: "streaming".into(),
            sent_lsn: Some(Lsn(sent)),
            write_lsn: Some(Lsn(write)),
            flush_lsn: Some(Lsn(flush)),
            replay_lsn: Some(Lsn(replay)),
            sync_state: sync.into(),
            replay_lag_seconds: Some(0.5),
        }
    }

    fn down() -> NodeSample {
        NodeSample::Down(DownReason {
            kind: "connection refused".into(),
            message: "refused".into(),
        })
    }

    fn replica_detail(s: &ClusterStatus, i: usize) -> (LagBytes, Option<LagLevel>, Option<String>) {
        match &s.nodes[i].detail {
            NodeDetail::Replica {
                lag_bytes,
                lag_level,
                sync_state,
                ..
            } => (*lag_bytes, *lag_level, sync_state.clone()),
            other => panic!("not a replica: {other:?}"),
        }
    }

    #[test]
    fn lag_is_measured_per_stage_against_the_primary() {
        let p = 100 * MB;
        let samples = vec![
            primary(
                p,
                1,
                vec![
                    sender("n2", p, p - MB, p - 2 * MB, p - 5 * MB, "sync"),
                    sender("n3", p, p, p, p, "potential"),
                ],
            ),
            replica(p - MB, p - 5 * MB),
            replica(p, p),
        ];
        let s = ClusterStatus::build(&config(), samples, SystemTime::UNIX_EPOCH);
        assert_eq!(s.exit_code(), 0, "{:?}", s.warnings);
        let (lag, level, sync) = replica_detail(&s, 1);
        assert_eq!(
            lag,
            LagBytes {
                sent: Some(0),
                write: Some(MB),
                flush: Some(2 * MB),
                replay: Some(5 * MB)
            }
        );
        assert_eq!(level, Some(LagLevel::Medium));
        assert_eq!(sync.as_deref(), Some("sync"));
        assert_eq!(replica_detail(&s, 2).1, Some(LagLevel::Low));
        assert_eq!(s.performance.sync_replicas, 1);
        assert_eq!(s.performance.replication_connections, 2);
        assert_eq!(s.performance.connections, 5);
        assert_eq!(s.performance.commits, 20);
        assert_eq!(s.performance.cache_hit_ratio, Some(110.0 / 120.0));
        assert_eq!(s.performance.database_size_bytes, 1000);
        assert_eq!(s.checked_at, "1970-01-01T00:00:00Z");
    }

    #[test]
    fn levels_follow_the_thresholds() {
        let c = config();
        for (bytes, level) in [
            (0, LagLevel::Low),
            (MB - 1, LagLevel::Low),
            (MB, LagLevel::Medium),
            (10 * MB - 1, LagLevel::Medium),
            (10 * MB, LagLevel::High),
        ] {
            assert_eq!(LagLevel::of(bytes, &c.monitor), level, "{bytes}");
        }
    }

    #[test]
    fn degraded_states_are_warned_and_exit_1() {
        let p = 10 * MB;
        let cases: Vec<(Vec<NodeSample>, &str)> = vec![
            (
                vec![
                    primary(p, 1, vec![sender("n2", p, p, p, p, "async")]),
                    replica(p, p),
                    down(),
                ],
                "node n3 is down",
            ),
            (vec![down(), replica(p, p), replica(p, p)], "no primary"),
            (
                vec![primary(p, 1, vec![]), primary(p, 2, vec![]), replica(p, p)],
                "2 primaries: n1, n2 (split brain)",
            ),
            (
                vec![
                    primary(p, 1, vec![sender("n2", p, p, p, p, "async")]),
                    replica(p, p),
                    replica(p, p),
                ],
                "replica n3 is not connected to the primary",
            ),
        ];
        for (samples, want) in cases {
            let s = ClusterStatus::build(&config(), samples, SystemTime::UNIX_EPOCH);
            assert_eq!(s.exit_code(), 1);
            assert!(
                s.warnings.iter().any(|w| w.starts_with(want)),
                "{want:?} not in {:?}",
                s.warnings
            );
        }
    }

    #[test]
    fn a_detached_replica_is_judged_by_its_own_positions() {
        let p = 20 * MB;
        let samples = vec![
            primary(p, 1, vec![]),
            replica(p - 2 * MB, p - 12 * MB),
            down(),
        ];
        let s = ClusterStatus::build(&config(), samples, SystemTime::UNIX_EPOCH);
        let (lag, level, sync) = replica_detail(&s, 1);
        assert_eq!(
            lag,
            LagBytes {
                sent: None,
                write: Some(2 * MB),
                flush: Some(2 * MB),
                replay: Some(12 * MB)
            }
        );
        assert_eq!(level, Some(LagLevel::High));
        assert_eq!(sync, None);
        assert_eq!(s.nodes[1].state, "streaming");
    }

    #[test]
    fn without_a_primary_lag_is_unknown() {
        let samples = vec![down(), replica(5, 5), replica(5, 5)];
        let s = ClusterStatus::build(&config(), samples, SystemTime::UNIX_EPOCH);
        let (lag, level, _) = replica_detail(&s, 1);
        assert_eq!(lag, LagBytes::default());
        assert_eq!(level, None);
    }

    #[test]
    fn json_matches_the_documented_schema() {
        let p = 0x300_0148;
        let samples = vec![
            primary(p, 1, vec![sender("n2", p, p, p, p, "async")]),
            replica(p, p),
            down(),
        ];
        let s = ClusterStatus::build(&config(), samples, SystemTime::UNIX_EPOCH);
        let v: serde_json::Value = serde_json::from_str(&s.to_json()).expect("json");
        let keys = |o: &serde_json::Value| {
            o.as_object()
                .expect("object")
                .keys()
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(&v), ["cluster", "checked_at", "nodes", "performance"]);
        assert_eq!(
            keys(&v["nodes"][0]),
            ["name", "host", "port", "role", "state", "timeline", "lsn", "error"]
        );
        assert_eq!(
            keys(&v["nodes"][1]),
            [
                "name",
                "host",
                "port",
                "role",
                "state",
                "timeline",
                "receive_lsn",
                "replay_lsn",
                "lag_bytes",
                "replay_lag_seconds",
                "lag_level",
                "sync_state",
                "error"
            ]
        );
        assert_eq!(
            keys(&v["nodes"][2]),
            ["name", "host", "port", "role", "state", "error"]
        );
        assert_eq!(v["nodes"][0]["lsn"], "0/3000148");
        assert_eq!(v["nodes"][1]["lag_bytes"]["replay"], 0);
        assert_eq!(v["nodes"][1]["lag_level"], "LOW");
        assert_eq!(v["nodes"][2]["role"], "down");
        assert_eq!(
            keys(&v["performance"]),
            [
                "connections",
                "active_queries",
                "commits",
                "rollbacks",
                "cache_hit_ratio",
                "database_size_bytes",
                "replication_connections",
                "sync_replicas"
            ]
        );
    }
}
