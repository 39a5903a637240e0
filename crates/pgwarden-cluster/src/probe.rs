//! Raw facts about one node, read with a few SQL statements.

use std::time::Duration;

use pgwarden_config::{Config, NodeConfig};
use pgwarden_core::Lsn;
use tokio_postgres::{NoTls, Row};

/// What one probe of one node found.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeSample {
    Down(DownReason),
    Primary {
        lsn: Lsn,
        timeline: u32,
        /// The text of its timeline's history file (`None` on timeline 1, or if missing).
        history: Option<String>,
        senders: Vec<WalSender>,
        perf: PerfSample,
    },
    Replica {
        receive_lsn: Option<Lsn>,
        replay_lsn: Option<Lsn>,
        timeline: Option<u32>,
        /// `pg_stat_wal_receiver.status`, `None` when no WAL receiver runs.
        receiver_state: Option<String>,
        /// Age of the last replayed transaction while replay is behind; 0 when caught up.
        replay_delay_seconds: Option<f64>,
        perf: PerfSample,
    },
}

/// Why a node did not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownReason {
    /// Short form for the state column: `connection refused`, `timeout`, ...
    pub kind: String,
    /// The full message.
    pub message: String,
}

/// One row of the primary's `pg_stat_replication`.
#[derive(Debug, Clone, PartialEq)]
pub struct WalSender {
    pub application_name: String,
    pub state: String,
    pub sent_lsn: Option<Lsn>,
    pub write_lsn: Option<Lsn>,
    pub flush_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    pub sync_state: String,
    pub replay_lag_seconds: Option<f64>,
}

/// Activity counters of one node.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PerfSample {
    pub connections: i64,
    pub active_queries: i64,
    pub commits: i64,
    pub rollbacks: i64,
    pub blocks_hit: i64,
    pub blocks_read: i64,
    pub database_size_bytes: i64,
}

const ROLE_SQL: &str = "\
SELECT pg_is_in_recovery(),
       CASE WHEN NOT pg_is_in_recovery() THEN pg_current_wal_lsn()::text END,
       CASE WHEN NOT pg_is_in_recovery()
            THEN ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int8 END,
       pg_last_wal_receive_lsn()::text,
       pg_last_wal_replay_lsn()::text,
       (SELECT status FROM pg_stat_wal_receiver),
       COALESCE((SELECT received_tli::int8 FROM pg_stat_wal_receiver),
                (SELECT timeline_id::int8 FROM pg_control_checkpoint())),
       CASE WHEN NOT pg_is_in_recovery() THEN NULL
            WHEN pg_last_wal_receive_lsn() IS NOT NULL
                 AND pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0
            ELSE COALESCE(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0)
       END::float8,
       CASE WHEN NOT pg_is_in_recovery()
            THEN pg_read_file('pg_wal/' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)
                              || '.history', 0, 1048576, true) END";

const PERF_SQL: &str = "\
SELECT (SELECT count(*) FROM pg_stat_activity
         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()),
       (SELECT count(*) FROM pg_stat_activity
         WHERE backend_type = 'client backend' AND state = 'active' AND pid <> pg_backend_pid()),
       (SELECT COALESCE(sum(xact_commit), 0)::int8 FROM pg_stat_database),
       (SELECT COALESCE(sum(xact_rollback), 0)::int8 FROM pg_stat_database),
       (SELECT COALESCE(sum(blks_hit), 0)::int8 FROM pg_stat_database),
       (SELECT COALESCE(sum(blks_read), 0)::int8 FROM pg_stat_database),
       (SELECT COALESCE(sum(pg_database_size(oid)), 0)::int8 FROM pg_database WHERE datallowconn)";

const SENDERS_SQL: &str = "\
SELECT application_name, state, sent_lsn::text, write_lsn::text, flush_lsn::text,
       replay_lsn::text, sync_state, extract(epoch FROM replay_lag)::float8
  FROM pg_stat_replication";

/// Probes every node concurrently; each probe is bounded by `monitor.timeout`.
pub async fn probe_all(config: &Config) -> Vec<NodeSample> {
    let probes = config.nodes.iter().map(|n| probe(config, n));
    futures::future::join_all(probes).await
}

/// Probes one node within `monitor.timeout`, on a connection of its own.
pub async fn probe(config: &Config, node: &NodeConfig) -> NodeSample {
    probe_kept(config, node, &mut None).await
}

/// Probes that keep one connection per node from one round to the next (the monitor's),
/// instead of logging in every interval: a login costs the node a backend and both sides a
/// SCRAM exchange (4096 rounds of PBKDF2 each).
#[derive(Default)]
pub struct Prober {
    sessions: Vec<Option<Session>>,
}

struct Session {
    client: tokio_postgres::Client,
    conn: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl Prober {
    /// Probes every node concurrently, each bounded by `monitor.timeout`.
    pub async fn probe_all(&mut self, config: &Config) -> Vec<NodeSample> {
        self.sessions.resize_with(config.nodes.len(), || None);
        let probes = config
            .nodes
            .iter()
            .zip(self.sessions.iter_mut())
            .map(|(node, kept)| probe_kept(config, node, kept));
        futures::future::join_all(probes).await
    }
}

/// Probes `node` within `monitor.timeout`, on the kept connection if there is one and it
/// answers, else on a new one (kept for next time if the probe succeeds). A kept connection
/// that fails (the node restarted, say) is replaced within the same probe.
async fn probe_kept(config: &Config, node: &NodeConfig, kept: &mut Option<Session>) -> NodeSample {
    let timeout = config.monitor.timeout;
    let started = tokio::time::Instant::now();
    if let Some(s) = kept.take() {
        if !s.client.is_closed() {
            if let Ok(Ok(found)) = tokio::time::timeout(timeout, sample(&s.client)).await {
                *kept = Some(s);
                return found;
            }
        }
    }
    let left = timeout.saturating_sub(started.elapsed());
    let fresh = async {
        let s = connect(config, node, left).await?;
        let found = sample(&s.client).await?;
        Ok::<_, tokio_postgres::Error>((s, found))
    };
    match tokio::time::timeout(left, fresh).await {
        Ok(Ok((s, found))) => {
            *kept = Some(s);
            found
        }
        Ok(Err(e)) => NodeSample::Down(classify(&e)),
        Err(_) => NodeSample::Down(DownReason {
            kind: "timeout".into(),
            message: format!(
                "no answer from {} within {}",
                node.address(),
                pgwarden_core::format_duration(timeout)
            ),
        }),
    }
}

async fn connect(
    config: &Config,
    node: &NodeConfig,
    timeout: Duration,
) -> Result<Session, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&node.host)
        .port(node.port)
        .user(&config.postgres.superuser)
        .password(config.postgres.superuser_password.expose())
        .dbname("postgres")
        .application_name("pgwarden-monitor")
        .connect_timeout(timeout);
    let (client, conn) = cfg.connect(NoTls).await?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Session { client, conn })
}

async fn sample(client: &tokio_postgres::Client) -> Result<NodeSample, tokio_postgres::Error> {
    let role = client.query_one(ROLE_SQL, &[]).await?;
    let perf = perf(&client.query_one(PERF_SQL, &[]).await?)?;
    let in_recovery: bool = role.try_get(0)?;
    if in_recovery {
        return Ok(NodeSample::Replica {
            receive_lsn: lsn(&role, 3),
            replay_lsn: lsn(&role, 4),
            timeline: role.try_get::<_, Option<i64>>(6)?.map(|t| t as u32),
            receiver_state: role.try_get(5)?,
            replay_delay_seconds: role.try_get(7)?,
            perf,
        });
    }
    let senders = client
        .query(SENDERS_SQL, &[])
        .await?
        .iter()
        .map(|r| {
            Ok(WalSender {
                application_name: r.try_get::<_, Option<String>>(0)?.unwrap_or_default(),
                state: r.try_get::<_, Option<String>>(1)?.unwrap_or_default(),
                sent_lsn: lsn(r, 2),
                write_lsn: lsn(r, 3),
                flush_lsn: lsn(r, 4),
                replay_lsn: lsn(r, 5),
                sync_state: r.try_get::<_, Option<String>>(6)?.unwrap_or_default(),
                replay_lag_seconds: r.try_get(7)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()?;
    Ok(NodeSample::Primary {
        lsn: lsn(&role, 1).unwrap_or_default(),
        timeline: role.try_get::<_, Option<i64>>(2)?.unwrap_or(0) as u32,
        history: role.try_get(8)?,
        senders,
        perf,
    })
}

fn perf(r: &Row) -> Result<PerfSample, tokio_postgres::Error> {
    Ok(PerfSample {
        connections: r.try_get(0)?,
        active_queries: r.try_get(1)?,
        commits: r.try_get(2)?,
        rollbacks: r.try_get(3)?,
        blocks_hit: r.try_get(4)?,
        blocks_read: r.try_get(5)?,
        database_size_bytes: r.try_get(6)?,
    })
}

/// An LSN column; anything unexpected (a NULL, another type) is unknown.
fn lsn(r: &Row, i: usize) -> Option<Lsn> {
    r.try_get::<_, Option<String>>(i)
        .ok()
        .flatten()
        .and_then(|s| s.parse().ok())
}

/// A short, stable description of why a connection failed.
fn classify(e: &tokio_postgres::Error) -> DownReason {
    use std::error::Error as _;
    let kind = if let Some(db) = e.as_db_error() {
        match db.code().code() {
            "28P01" | "28000" => "authentication failed",
            "57P03" => "starting up",
            "53300" => "too many connections",
            _ => "error",
        }
    } else if let Some(io) = e.source().and_then(|s| s.downcast_ref::<std::io::Error>()) {
        match io.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused",
            std::io::ErrorKind::TimedOut => "timeout",
            _ => "unreachable",
        }
    } else if e.is_closed() {
        "connection closed"
    } else {
        "error"
    };
    let message = match e.source() {
        Some(src) => format!("{e}: {src}"),
        None => e.to_string(),
    };
    DownReason {
        kind: kind.to_string(),
        message,
    }
}
