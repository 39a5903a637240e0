//! The human form of [`ClusterStatus`]: an aligned table, coloured only when asked to.

use std::fmt::Write as _;

use pgwarden_core::ByteSize;

use crate::status::{ClusterStatus, LagLevel, NodeDetail, Role};

const HEADER: [&str; 14] = [
    "NODE", "ADDRESS", "ROLE", "STATE", "TL", "LSN", "RECEIVED", "SENT", "WRITE", "FLUSH",
    "REPLAY", "LAG", "LEVEL", "SYNC",
];

/// A cell's text and its colour (an ANSI SGR code), if any.
type Cell = (String, Option<&'static str>);

const GREEN: &str = "32";
const YELLOW: &str = "33";
const RED: &str = "31";
const BOLD: &str = "1";

pub fn table(status: &ClusterStatus, colour: bool) -> String {
    let mut rows: Vec<Vec<Cell>> =
        vec![HEADER.iter().map(|h| (h.to_string(), Some(BOLD))).collect()];
    rows.extend(status.nodes.iter().map(node_row));
    let widths: Vec<usize> = (0..HEADER.len())
        .map(|c| {
            rows.iter()
                .map(|r| r[c].0.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = format!("Cluster {} at {}\n", status.cluster, status.checked_at);
    for row in &rows {
        let mut line = String::new();
        for (c, (text, code)) in row.iter().enumerate() {
            let pad = widths[c] - text.chars().count();
            match code {
                Some(code) if colour => {
                    let _ = write!(line, "\x1b[{code}m{text}\x1b[0m");
                }
                _ => line.push_str(text),
            }
            if c + 1 < row.len() {
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let p = &status.performance;
    let ratio = p
        .cache_hit_ratio
        .map_or("-".to_string(), |r| format!("{:.2}%", r * 100.0));
    let _ = writeln!(
        out,
        "\nconnections {}  active queries {}  commits {}  rollbacks {}  cache hit {}  size {}  replication connections {}  sync replicas {}",
        p.connections,
        p.active_queries,
        p.commits,
        p.rollbacks,
        ratio,
        ByteSize(p.database_size_bytes.max(0) as u64),
        p.replication_connections,
        p.sync_replicas
    );
    for w in &status.warnings {
        if colour {
            let _ = writeln!(out, "\x1b[{RED}mwarning:\x1b[0m {w}");
        } else {
            let _ = writeln!(out, "warning: {w}");
        }
    }
    out
}

fn node_row(n: &crate::status::NodeStatus) -> Vec<Cell> {
    let plain = |s: String| (s, None);
    let dash = || ("-".to_string(), None);
    let bytes = |b: Option<u64>| b.map_or_else(dash, |b| plain(ByteSize(b).to_string()));
    let address = if n.host.contains(':') {
        format!("[{}]:{}", n.host, n.port)
    } else {
        format!("{}:{}", n.host, n.port)
    };
    let role = match n.role {
        Role::Primary => ("primary".to_string(), Some(GREEN)),
        Role::Replica => ("replica".to_string(), None),
        Role::Down => ("down".to_string(), Some(RED)),
    };
    let mut row = vec![
        plain(n.name.clone()),
        plain(address),
        role,
        plain(n.state.clone()),
    ];
    match &n.detail {
        NodeDetail::Primary { timeline, lsn } => {
            row.extend([plain(timeline.to_string()), plain(lsn.clone())]);
            row.extend((0..8).map(|_| dash()));
        }
        NodeDetail::Replica {
            timeline,
            receive_lsn,
            replay_lsn,
            lag_bytes,
            replay_lag_seconds,
            lag_level,
            sync_state,
        } => {
            let opt = |s: &Option<String>| s.clone().map_or_else(dash, plain);
            row.extend([
                timeline.map_or_else(dash, |t| plain(t.to_string())),
                opt(replay_lsn),
                opt(receive_lsn),
                bytes(lag_bytes.sent),
                bytes(lag_bytes.write),
                bytes(lag_bytes.flush),
                bytes(lag_bytes.replay),
                replay_lag_seconds.map_or_else(dash, |s| plain(format!("{s:.1}s"))),
                lag_level.map_or_else(dash, |l| {
                    let code = match l {
                        LagLevel::Low => GREEN,
                        LagLevel::Medium => YELLOW,
                        LagLevel::High => RED,
                    };
                    (l.as_str().to_string(), Some(code))
                }),
                opt(sync_state),
            ]);
        }
        NodeDetail::Down {} => row.extend((0..10).map(|_| dash())),
    }
    row
}
