//! What an agent publishes about itself: in the store (its member key) and on its API.

use serde::{Deserialize, Serialize};

/// One member's state, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberState {
    /// `leader`, `replica` or `down`.
    pub role: String,
    /// `running`, `starting`, `stopped` or `missing` (no data directory).
    pub state: String,
    /// Its PostgreSQL runs and is not in recovery.
    pub primary: bool,
    pub timeline: Option<u32>,
    /// Primary: its current WAL position; standby: the WAL received (or replayed, if more).
    pub lsn: Option<String>,
    /// A standby's WAL receiver streams.
    pub streaming: bool,
    /// Bytes behind the leader's last recorded position.
    pub lag_bytes: Option<u64>,
    /// A standby's replayed position (what a read there sees; `lsn` may be ahead of it).
    #[serde(default)]
    pub replay_lsn: Option<String>,
    /// Bytes its replay is behind the leader's last recorded position.
    #[serde(default)]
    pub replay_lag_bytes: Option<u64>,
    /// Milliseconds its replay is behind: 0 when it has replayed all it received, else the age
    /// of the last transaction it replayed.
    #[serde(default)]
    pub replay_lag_ms: Option<u64>,
    /// The leader's epoch, on the leader.
    pub epoch: Option<u64>,
    /// On the leader: its roles exist, so a new member may clone from it.
    #[serde(default)]
    pub ready: bool,
    /// PostgreSQL's address.
    pub host: String,
    pub port: u16,
    /// The agent's API address.
    pub api: Option<String>,
    pub priority: u32,
    pub nofailover: bool,
    pub nosync: bool,
    /// Why it does not act, when it does not.
    pub reason: Option<String>,
    /// The same as a stable code (`paused`, `not_elected.lagging`, ...).
    #[serde(default)]
    pub reason_code: Option<String>,
    /// When its running PostgreSQL started (Unix milliseconds).
    #[serde(default)]
    pub started_ms: Option<u64>,
}
