//! The `switchover` key: a planned change of leader, requested by an operator, carried out by
//! the leader and finished by the new one. Not bound to a lease, so a switchover outlives the
//! agents that act on it and its record stays for the old leader's rejoin and for `history`.
//!
//! Who writes it, and under what condition (each write is one transaction):
//! - the operator's request, only while the leader it names holds the key (by revision) and no
//!   other switchover runs;
//! - the leader, while it holds the key: `draining`, then `stopped` in the same transaction
//!   that records its last position and deletes the leader key;
//! - the next leader, while it holds the key: `done` (it was the target) or `failed`.

use serde::{Deserialize, Serialize};

use pgwarden_core::{Lsn, NodeId};

use crate::cluster::{ClusterStore, LastLeader, Leader};
use crate::kv::{Compare, Kv, Op, Revision};
use crate::DcsError;

/// Where a switchover stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Asked for; the leader begins once it is due.
    Requested,
    /// The proxies hold new transactions; the leader waits for running ones to end.
    Draining,
    /// The old leader stopped cleanly at `stopped_lsn` and gave up the key; the target takes it
    /// once it has received everything up to there.
    Stopped,
    /// The target leads.
    Done,
    /// It did not happen (`note` says why); the cluster went on under some leader.
    Failed,
}

impl Phase {
    /// Its name, as stored.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Requested => "requested",
            Phase::Draining => "draining",
            Phase::Stopped => "stopped",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }

    /// Done or failed: a new switchover may be asked for.
    pub fn is_over(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed)
    }
}

/// The `switchover` key's value. Times are Unix milliseconds (wall clock: they are compared
/// across hosts only against bounds of seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switchover {
    /// When it was asked for: names it.
    pub requested_ms: u64,
    /// The leader when it was asked for.
    pub from: String,
    pub to: String,
    /// Not before this (`--at`); `None`: at once.
    #[serde(default)]
    pub at_ms: Option<u64>,
    /// How long the leader waits for running transactions to end before it stops anyway.
    pub drain_ms: u64,
    pub phase: Phase,
    #[serde(default)]
    pub draining_ms: Option<u64>,
    #[serde(default)]
    pub stopped_ms: Option<u64>,
    /// The old leader's shutdown checkpoint: the target must have received past it.
    #[serde(default)]
    pub stopped_lsn: Option<String>,
    #[serde(default)]
    pub stopped_timeline: Option<u32>,
    /// Client transactions still running when the drain ended (0: none was cut).
    #[serde(default)]
    pub cut_transactions: Option<u64>,
    #[serde(default)]
    pub finished_ms: Option<u64>,
    /// The new leader's epoch.
    #[serde(default)]
    pub epoch: Option<u64>,
    /// Why it failed.
    #[serde(default)]
    pub note: Option<String>,
}

impl Switchover {
    /// A new request, not begun.
    pub fn requested(
        requested_ms: u64,
        from: &NodeId,
        to: &NodeId,
        at_ms: Option<u64>,
        drain_ms: u64,
    ) -> Switchover {
        Switchover {
            requested_ms,
            from: from.to_string(),
            to: to.to_string(),
            at_ms,
            drain_ms,
            phase: Phase::Requested,
            draining_ms: None,
            stopped_ms: None,
            stopped_lsn: None,
            stopped_timeline: None,
            cut_transactions: None,
            finished_ms: None,
            epoch: None,
            note: None,
        }
    }

    pub fn from_node(&self) -> NodeId {
        NodeId::new(&self.from)
    }

    pub fn to_node(&self) -> NodeId {
        NodeId::new(&self.to)
    }

    pub fn stopped_at(&self) -> Option<Lsn> {
        self.stopped_lsn.as_deref().and_then(|l| l.parse().ok())
    }

    /// How long writes were held: from the start of the drain to the new leader (done only).
    pub fn write_gap_ms(&self) -> Option<u64> {
        match (self.phase, self.draining_ms, self.finished_ms) {
            (Phase::Done, Some(from), Some(to)) => Some(to.saturating_sub(from)),
            _ => None,
        }
    }
}

/// The key as read, with its revision (a request replaces a finished one by revision).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSwitchover {
    pub value: Switchover,
    pub revision: Revision,
}

impl<K: Kv> ClusterStore<K> {
    /// Asks for `sw` if `leader` (as read) still holds the key and the switchover key is still
    /// at `replaces` (0: absent; else the revision of a finished one). False: either changed.
    pub async fn request_switchover(
        &self,
        sw: &Switchover,
        leader: &Leader,
        replaces: Revision,
    ) -> Result<bool, DcsError> {
        let key = self.key("switchover");
        let value = self.encode("switchover", sw)?;
        self.kv()
            .txn(
                vec![
                    Compare {
                        key: self.key("leader"),
                        mod_revision: leader.revision,
                    },
                    Compare {
                        key: key.clone(),
                        mod_revision: replaces,
                    },
                ],
                vec![Op::Put {
                    key,
                    value,
                    lease: None,
                }],
            )
            .await
    }

    /// Writes the switchover's new state if `held` still holds the leader key.
    pub async fn update_switchover(
        &self,
        held: &Leader,
        sw: &Switchover,
    ) -> Result<bool, DcsError> {
        self.put_as_leader(held, "switchover", sw).await
    }

    /// The old leader's last step, in one transaction: the switchover `stopped` at its last
    /// position, that position as `last_leader`, and the leader key deleted, if `held` still
    /// holds it.
    pub async fn hand_over(
        &self,
        held: &Leader,
        sw: &Switchover,
        last: &LastLeader,
    ) -> Result<bool, DcsError> {
        let sw_value = self.encode("switchover", sw)?;
        let last_value = self.encode("last_leader", &Self::last_leader_value(last))?;
        self.kv()
            .txn(
                vec![Compare {
                    key: self.key("leader"),
                    mod_revision: held.revision,
                }],
                vec![
                    Op::Put {
                        key: self.key("switchover"),
                        value: sw_value,
                        lease: None,
                    },
                    Op::Put {
                        key: self.key("last_leader"),
                        value: last_value,
                        lease: None,
                    },
                    Op::Delete {
                        key: self.key("leader"),
                    },
                ],
            )
            .await
    }

    /// Withdraws the switchover if the key is still at `revision` (an operator's cancel of one
    /// not yet begun).
    pub async fn cancel_switchover(&self, revision: Revision) -> Result<bool, DcsError> {
        self.done_with("switchover", revision).await
    }

    /// Changes to the switchover key (asked for, moved on, withdrawn).
    pub async fn watch_switchover(
        &self,
    ) -> Result<tokio::sync::watch::Receiver<Revision>, DcsError> {
        self.kv().watch(&self.key("switchover")).await
    }

    pub async fn switchover(&self) -> Result<Option<StoredSwitchover>, DcsError> {
        match self.kv().get(&self.key("switchover")).await? {
            Some(e) => Ok(Some(StoredSwitchover {
                value: Self::parse(&e)?,
                revision: e.mod_revision,
            })),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryKv;
    use pgwarden_core::Epoch;
    use std::time::Duration;

    fn request(from: &str, to: &str) -> Switchover {
        Switchover::requested(1, &NodeId::new(from), &NodeId::new(to), None, 5000)
    }

    #[test]
    fn phase_names_are_the_stored_ones() {
        for p in [
            Phase::Requested,
            Phase::Draining,
            Phase::Stopped,
            Phase::Done,
            Phase::Failed,
        ] {
            assert_eq!(serde_json::to_value(p).expect("json"), p.name());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_switchover_is_asked_of_the_current_leader_and_handed_over_in_one_step() {
        let s = ClusterStore::new(MemoryKv::new(), "pgwarden", "main");
        let (n1, n2) = (NodeId::new("n1"), NodeId::new("n2"));
        let l1 = s.kv().grant(Duration::from_secs(10)).await.expect("lease");
        let held = s
            .take_leader(&n1, l1)
            .await
            .expect("take")
            .expect("n1 leads");
        let sw = request("n1", "n2");
        // A leader that no longer holds the key at that revision cannot be asked.
        let stale = Leader {
            revision: held.revision - 1,
            ..held.clone()
        };
        assert!(!s.request_switchover(&sw, &stale, 0).await.expect("txn"));
        assert!(s.request_switchover(&sw, &held, 0).await.expect("txn"));
        // Only one at a time: a second request expecting none is refused.
        assert!(!s.request_switchover(&sw, &held, 0).await.expect("txn"));
        let stored = s.switchover().await.expect("read").expect("there");
        assert_eq!(stored.value, sw);
        let snap = s.snapshot::<serde_json::Value>().await.expect("snapshot");
        assert_eq!(snap.switchover.as_ref().map(|x| &x.value), Some(&sw));

        let stopped = Switchover {
            phase: Phase::Stopped,
            stopped_lsn: Some("0/3000028".into()),
            stopped_timeline: Some(1),
            ..sw.clone()
        };
        let last = LastLeader {
            at_ms: 0,
            node: n1.clone(),
            epoch: held.epoch,
            lsn: "0/3000028".parse().expect("lsn"),
            timeline: 1,
        };
        assert!(s.hand_over(&held, &stopped, &last).await.expect("txn"));
        assert_eq!(s.leader().await.expect("read"), None, "the key is given up");
        assert_eq!(s.last_leader().await.expect("read"), Some(last.clone()));
        let read = s.switchover().await.expect("read").expect("there");
        assert_eq!(read.value.stopped_at(), Some(last.lsn));
        // Not twice: the key is gone, so a stale holder changes nothing.
        assert!(!s
            .hand_over(&held, &request("n1", "n2"), &last)
            .await
            .expect("txn"));
        assert_eq!(
            s.switchover()
                .await
                .expect("read")
                .expect("there")
                .value
                .phase,
            Phase::Stopped
        );

        // The target takes the key (epoch + 1) and finishes it.
        let l2 = s.kv().grant(Duration::from_secs(10)).await.expect("lease");
        let new = s
            .take_leader(&n2, l2)
            .await
            .expect("take")
            .expect("n2 leads");
        assert_eq!(new.epoch, Epoch(held.epoch.0 + 1));
        let done = Switchover {
            phase: Phase::Done,
            epoch: Some(new.epoch.0),
            ..read.value.clone()
        };
        assert!(
            !s.update_switchover(&held, &done).await.expect("txn"),
            "the old holder may not"
        );
        assert!(s.update_switchover(&new, &done).await.expect("txn"));
        // A finished one is replaced by revision; a cancel by a stale revision does nothing.
        let finished = s.switchover().await.expect("read").expect("there");
        assert!(!s
            .cancel_switchover(finished.revision - 1)
            .await
            .expect("txn"));
        assert!(s
            .request_switchover(&request("n2", "n1"), &new, finished.revision)
            .await
            .expect("txn"));
        let again = s.switchover().await.expect("read").expect("there");
        assert!(s.cancel_switchover(again.revision).await.expect("txn"));
        assert_eq!(s.switchover().await.expect("read"), None);
    }
}
