//! The cluster's history: one key per outage of the leader's writes (a failover, a switchover,
//! a restart in place), under `/<namespace>/<cluster>.history/`, beside the cluster's keys and
//! not under them, so that the agents' and proxies' reads of the cluster do not grow with it.
//! Written only by the leader that ended the outage, while it holds the key.

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterStore, Leader};
use crate::kv::{Compare, Kv, Op};
use crate::DcsError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A new leader after the old one failed (unplanned).
    Failover,
    /// A planned change of leader.
    Switchover,
    /// The leader's PostgreSQL crashed and was restarted in place (unplanned).
    Restart,
}

/// One outage of writes. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    /// When writes stopped, as far as it is known: a failover's is the old leader's last
    /// recorded round (so it may be up to `loop_wait` early), a switchover's the start of its
    /// drain, a restart's the crash as its agent saw it.
    pub down_ms: u64,
    /// When the new (or restarted) leader took writes.
    pub up_ms: u64,
    /// A failover: when the new leader took the key (the failure was detected and acted on);
    /// a switchover: when the old leader had stopped.
    #[serde(default)]
    pub detected_ms: Option<u64>,
    /// When the promotion finished (failover, switchover).
    #[serde(default)]
    pub promoted_ms: Option<u64>,
    pub from: Option<String>,
    pub to: String,
    pub epoch: u64,
    #[serde(default)]
    pub timeline: Option<u32>,
    /// WAL the new leader did not have of what the old leader last recorded: an upper bound
    /// of the acknowledged writes a failover lost (0 for a switchover; unknown if not asked).
    #[serde(default)]
    pub lost_bytes: Option<u64>,
}

impl Event {
    /// How long writes were unavailable.
    pub fn duration_ms(&self) -> u64 {
        self.up_ms.saturating_sub(self.down_ms)
    }
}

impl<K: Kv> ClusterStore<K> {
    fn history_prefix(&self) -> String {
        format!("{}.history/", self.key("").trim_end_matches('/'))
    }

    /// Records `e` if `held` still holds the leader key.
    pub async fn put_event(&self, held: &Leader, e: &Event) -> Result<bool, DcsError> {
        let key = format!("{}{:016}-{}", self.history_prefix(), e.up_ms, e.epoch);
        let value = self.encode("history", e)?;
        self.kv()
            .txn(
                vec![Compare {
                    key: self.key("leader"),
                    mod_revision: held.revision,
                }],
                vec![Op::Put {
                    key,
                    value,
                    lease: None,
                }],
            )
            .await
    }

    /// Every recorded event, oldest first. One that does not parse (a newer version's) is
    /// left out.
    pub async fn history(&self) -> Result<Vec<Event>, DcsError> {
        Ok(self
            .kv()
            .list(&self.history_prefix())
            .await?
            .iter()
            .filter_map(|e| Self::parse(e).ok())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryKv;
    use pgwarden_core::NodeId;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn events_are_kept_in_order_apart_from_the_cluster_keys_and_only_by_the_leader() {
        let s = ClusterStore::new(MemoryKv::new(), "pgwarden", "main");
        let lease = s.kv().grant(Duration::from_secs(10)).await.expect("lease");
        let held = s
            .take_leader(&NodeId::new("n2"), lease)
            .await
            .expect("take")
            .expect("n2 leads");
        let event = |up_ms, kind| Event {
            kind,
            down_ms: up_ms - 500,
            up_ms,
            detected_ms: None,
            promoted_ms: None,
            from: Some("n1".into()),
            to: "n2".into(),
            epoch: held.epoch.0,
            timeline: Some(2),
            lost_bytes: Some(0),
        };
        let (later, earlier) = (
            event(2_000_000, EventKind::Switchover),
            event(1_000_000, EventKind::Failover),
        );
        assert!(s.put_event(&held, &later).await.expect("put"));
        assert!(s.put_event(&held, &earlier).await.expect("put"));
        assert_eq!(
            s.history().await.expect("read"),
            vec![earlier.clone(), later]
        );
        assert_eq!(earlier.duration_ms(), 500);
        // Not under the cluster's keys: a snapshot does not read them.
        let snap = s.snapshot::<serde_json::Value>().await.expect("snapshot");
        assert!(snap.members.is_empty());
        assert!(s
            .kv()
            .list("/pgwarden/main/")
            .await
            .expect("list")
            .iter()
            .all(|e| !e.key.contains("history")));
        // A former leader cannot write.
        assert!(s.release_leader(&held).await.expect("release"));
        assert!(!s.put_event(&held, &earlier).await.expect("put"));
    }
}
