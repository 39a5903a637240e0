//! Operators' requests that one agent carries out: `requests/<node>` (restart its PostgreSQL,
//! or re-clone it) and `failover` (a manual failover to a named member when nobody leads).
//! Not bound to a lease; the agent that carries a request out deletes it.

use serde::{Deserialize, Serialize};

use crate::cluster::ClusterStore;
use crate::kv::{Compare, Kv, Op, Revision};
use crate::DcsError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeAction {
    /// Stop the node's PostgreSQL cleanly and start it again, in the same role.
    Restart,
    /// Empty the node's data directory and clone it again from the leader.
    Reinit,
}

/// `requests/<node>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRequest {
    pub action: NodeAction,
    pub requested_ms: u64,
}

/// `failover`: the member to promote while nobody holds the leader key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManualFailover {
    pub to: String,
    pub requested_ms: u64,
}

/// A request as read, with its revision (deleted by revision once carried out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored<T> {
    pub value: T,
    pub revision: Revision,
}

impl<K: Kv> ClusterStore<K> {
    /// Asks `node`'s agent for `req`, replacing any request of it not yet carried out.
    pub async fn request(&self, node: &str, req: &NodeRequest) -> Result<(), DcsError> {
        let name = format!("requests/{node}");
        let value = self.encode(&name, req)?;
        self.kv()
            .txn(
                Vec::new(),
                vec![Op::Put {
                    key: self.key(&name),
                    value,
                    lease: None,
                }],
            )
            .await
            .map(|_| ())
    }

    /// Asks for a manual failover if nobody holds the leader key; false if someone does.
    pub async fn request_failover(&self, f: &ManualFailover) -> Result<bool, DcsError> {
        let value = self.encode("failover", f)?;
        self.kv()
            .txn(
                vec![Compare {
                    key: self.key("leader"),
                    mod_revision: 0,
                }],
                vec![Op::Put {
                    key: self.key("failover"),
                    value,
                    lease: None,
                }],
            )
            .await
    }

    /// Deletes the key `name` (`requests/<node>` or `failover`) if it is still at `revision`.
    pub async fn done_with(&self, name: &str, revision: Revision) -> Result<bool, DcsError> {
        let key = self.key(name);
        self.kv()
            .txn(
                vec![Compare {
                    key: key.clone(),
                    mod_revision: revision,
                }],
                vec![Op::Delete { key }],
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryKv;
    use pgwarden_core::NodeId;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn requests_are_read_with_the_cluster_and_deleted_once_carried_out() {
        let s = ClusterStore::new(MemoryKv::new(), "pgwarden", "main");
        let restart = NodeRequest {
            action: NodeAction::Restart,
            requested_ms: 5,
        };
        s.request("n2", &restart).await.expect("put");
        let failover = ManualFailover {
            to: "n3".into(),
            requested_ms: 6,
        };
        assert!(
            s.request_failover(&failover).await.expect("txn"),
            "nobody leads"
        );
        let snap = s.snapshot::<serde_json::Value>().await.expect("snapshot");
        let (node, req) = snap.requests.first().cloned().expect("a request");
        assert_eq!((node.as_str(), &req.value), ("n2", &restart));
        assert_eq!(snap.failover.as_ref().map(|f| &f.value), Some(&failover));
        assert!(!s
            .done_with("requests/n2", req.revision - 1)
            .await
            .expect("txn"));
        assert!(s.done_with("requests/n2", req.revision).await.expect("txn"));
        let f = snap.failover.expect("failover");
        assert!(s.done_with("failover", f.revision).await.expect("txn"));
        let snap = s.snapshot::<serde_json::Value>().await.expect("snapshot");
        assert!(snap.requests.is_empty() && snap.failover.is_none());
        // With a leader, no manual failover is written.
        let lease = s.kv().grant(Duration::from_secs(10)).await.expect("lease");
        s.take_leader(&NodeId::new("n1"), lease)
            .await
            .expect("take")
            .expect("leads");
        assert!(!s.request_failover(&failover).await.expect("txn"));
    }
}
