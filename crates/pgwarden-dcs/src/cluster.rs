//! The HA keys of one cluster under `/<namespace>/<cluster>/`, and the operations the agents
//! use, for any [`Kv`].
//!
//! - `leader` — `{"node", "epoch"}`, bound to the leader's lease: it vanishes when the leader
//!   stops renewing. Taken only by a transaction that finds it absent.
//! - `epoch` — the last epoch granted, never deleted: every new leader gets one more, so an
//!   epoch is never given twice even when the leader key expired in between.
//! - `members/<node>` — each agent's published state, bound to its own lease.
//! - `initialize` — the node that bootstrapped the cluster (the first to take it).
//! - `last_leader` — `{"node", "epoch", "lsn", "timeline"}`, the leader's last recorded WAL
//!   position and timeline, not
//!   bound to a lease: it outlives the leader, so a failover can tell how far behind the
//!   candidates are. Written only while the writer holds the leader key.
//! - `sync` — the synchronous set: the members that may be promoted in synchronous mode.
//!   Written only while the writer holds the leader key.
//! - `config` — the dynamic settings (see [`crate::settings`]).
//! - `requests/<node>`, `failover` — operators' requests (see [`crate::requests`]).
//! - `switchover` — a planned change of leader and where it stands (see
//!   [`crate::switchover`]).

use pgwarden_core::{Epoch, Lsn, NodeId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::kv::{Compare, Entry, Kv, LeaseId, Op, Revision};
use crate::requests::{ManualFailover, NodeRequest, Stored};
use crate::switchover::StoredSwitchover;
use crate::DcsError;

/// The holder of the leader key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    pub node: NodeId,
    pub epoch: Epoch,
    /// The key's modification revision: releasing compares against it.
    pub revision: Revision,
    /// The lease the key is bound to.
    pub lease: Option<LeaseId>,
}

#[derive(Serialize, Deserialize)]
struct LastLeaderValue {
    node: String,
    epoch: u64,
    lsn: String,
    #[serde(default)]
    timeline: u32,
    #[serde(default)]
    at_ms: u64,
}

/// The leader's last recorded position (`last_leader`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastLeader {
    pub node: NodeId,
    pub epoch: Epoch,
    pub lsn: Lsn,
    /// 0 when a leader of an earlier version recorded it.
    pub timeline: u32,
    /// When it was recorded (Unix milliseconds; 0 when unknown).
    pub at_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct LeaderValue {
    node: String,
    epoch: u64,
}

/// A member's published state, as the agents define it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member<T> {
    pub node: NodeId,
    pub state: T,
}

/// Every key of the cluster at one revision.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot<T> {
    pub leader: Option<Leader>,
    pub last_epoch: Option<Epoch>,
    pub initialized_by: Option<NodeId>,
    pub last_leader: Option<LastLeader>,
    pub synchronous_set: Option<Vec<NodeId>>,
    /// Maintenance mode (`pgwarden pause`): the agents take no automatic action.
    pub paused: bool,
    /// The last switchover asked for, running or finished.
    pub switchover: Option<StoredSwitchover>,
    /// Operators' requests to single members, not yet carried out.
    pub requests: Vec<(NodeId, Stored<NodeRequest>)>,
    /// A manual failover asked for while nobody led.
    pub failover: Option<Stored<ManualFailover>>,
    /// The dynamic settings (`pgwarden edit-config`), as TOML text.
    pub dynamic: Option<Stored<String>>,
    pub members: Vec<Member<T>>,
}

/// Nothing: a store with no key of the cluster.
impl<T> Default for Snapshot<T> {
    fn default() -> Self {
        Snapshot {
            leader: None,
            last_epoch: None,
            initialized_by: None,
            last_leader: None,
            synchronous_set: None,
            paused: false,
            switchover: None,
            requests: Vec::new(),
            failover: None,
            dynamic: None,
            members: Vec::new(),
        }
    }
}

/// How many times a take retries when only the epoch counter moved under it.
const TAKE_TRIES: usize = 3;

#[derive(Clone)]
pub struct ClusterStore<K> {
    kv: K,
    prefix: String,
}

impl<K: Kv> ClusterStore<K> {
    pub fn new(kv: K, namespace: &str, cluster: &str) -> Self {
        let namespace = namespace.trim_matches('/');
        ClusterStore {
            kv,
            prefix: format!("/{namespace}/{cluster}/"),
        }
    }

    pub fn kv(&self) -> &K {
        &self.kv
    }

    pub(crate) fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    pub(crate) fn encode<T: Serialize>(&self, name: &str, value: &T) -> Result<Vec<u8>, DcsError> {
        serde_json::to_vec(value).map_err(|source| DcsError::BadValue {
            key: self.key(name),
            source,
        })
    }

    pub(crate) fn parse<T: DeserializeOwned>(e: &Entry) -> Result<T, DcsError> {
        serde_json::from_slice(&e.value).map_err(|source| DcsError::BadValue {
            key: e.key.clone(),
            source,
        })
    }

    /// The current leader, if the key is held.
    pub async fn leader(&self) -> Result<Option<Leader>, DcsError> {
        match self.kv.get(&self.key("leader")).await? {
            Some(e) => Self::leader_from(&e).map(Some),
            None => Ok(None),
        }
    }

    fn leader_from(e: &Entry) -> Result<Leader, DcsError> {
        let v: LeaderValue = Self::parse(e)?;
        Ok(Leader {
            node: NodeId::new(&v.node),
            epoch: Epoch(v.epoch),
            revision: e.mod_revision,
            lease: e.lease,
        })
    }

    /// Every key of the cluster in one read (one revision). A member whose state does not
    /// parse as `T` is left out (an agent of another version), not an error.
    pub async fn snapshot<T: DeserializeOwned>(&self) -> Result<Snapshot<T>, DcsError> {
        let mut snap = Snapshot::default();
        for e in self.kv.list(&self.prefix).await? {
            let name = &e.key[self.prefix.len()..];
            match name {
                "leader" => snap.leader = Some(Self::leader_from(&e)?),
                "epoch" => snap.last_epoch = Some(Epoch(Self::parse::<u64>(&e)?)),
                "initialize" => {
                    snap.initialized_by = Some(NodeId::new(&Self::parse::<String>(&e)?))
                }
                "last_leader" => snap.last_leader = Some(Self::last_leader_from(&e)?),
                "pause" => snap.paused = Self::parse::<bool>(&e)?,
                "switchover" => {
                    snap.switchover = Some(StoredSwitchover {
                        value: Self::parse(&e)?,
                        revision: e.mod_revision,
                    })
                }
                "config" => {
                    snap.dynamic = Some(Stored {
                        value: Self::parse(&e)?,
                        revision: e.mod_revision,
                    })
                }
                "failover" => {
                    snap.failover = Some(Stored {
                        value: Self::parse(&e)?,
                        revision: e.mod_revision,
                    })
                }
                _ if name.starts_with("requests/") => {
                    // A request an agent of another version wrote is left to it.
                    if let Ok(value) = Self::parse(&e) {
                        let node = NodeId::new(&name["requests/".len()..]);
                        snap.requests.push((
                            node,
                            Stored {
                                value,
                                revision: e.mod_revision,
                            },
                        ));
                    }
                }
                "sync" => {
                    let names: Vec<String> = Self::parse(&e)?;
                    snap.synchronous_set = Some(names.iter().map(|n| NodeId::new(n)).collect());
                }
                _ => {
                    if let Some(node) = name.strip_prefix("members/") {
                        if let Ok(state) = Self::parse(&e) {
                            snap.members.push(Member {
                                node: NodeId::new(node),
                                state,
                            });
                        }
                    }
                }
            }
        }
        Ok(snap)
    }

    /// Changes to the leader key (taken, released, expired).
    pub async fn watch_leader(&self) -> Result<watch::Receiver<Revision>, DcsError> {
        self.kv.watch(&self.key("leader")).await
    }

    /// The last epoch ever granted.
    pub async fn last_epoch(&self) -> Result<Option<Epoch>, DcsError> {
        match self.kv.get(&self.key("epoch")).await? {
            Some(e) => Ok(Some(Epoch(Self::parse::<u64>(&e)?))),
            None => Ok(None),
        }
    }

    /// Takes the key from `gone`, a leader whose processes are known dead, if it still holds
    /// it: the same transaction as [`ClusterStore::take_leader`] with the holder compared
    /// instead of absence.
    pub async fn take_over(
        &self,
        gone: &Leader,
        node: &NodeId,
        lease: LeaseId,
    ) -> Result<Option<Leader>, DcsError> {
        self.take(node, lease, gone.revision).await
    }

    /// Binds `held` (this node's key, left by an earlier run of its agent) to `lease`, keeping
    /// its epoch.
    pub async fn adopt_leader(&self, held: &Leader, lease: LeaseId) -> Result<bool, DcsError> {
        let key = self.key("leader");
        let value = serde_json::to_vec(&LeaderValue {
            node: held.node.to_string(),
            epoch: held.epoch.0,
        })
        .expect("a leader value serialises");
        self.kv
            .txn(
                vec![Compare {
                    key: key.clone(),
                    mod_revision: held.revision,
                }],
                vec![Op::Put {
                    key,
                    value,
                    lease: Some(lease),
                }],
            )
            .await
    }

    /// Writes `name` (a key not bound to a lease) if `held` still holds the leader key.
    pub(crate) async fn put_as_leader<T: Serialize>(
        &self,
        held: &Leader,
        name: &str,
        value: &T,
    ) -> Result<bool, DcsError> {
        let value = self.encode(name, value)?;
        self.kv
            .txn(
                vec![Compare {
                    key: self.key("leader"),
                    mod_revision: held.revision,
                }],
                vec![Op::Put {
                    key: self.key(name),
                    value,
                    lease: None,
                }],
            )
            .await
    }

    /// Records the leader's position; false if `held` no longer holds the key.
    pub async fn put_last_leader(
        &self,
        held: &Leader,
        lsn: Lsn,
        timeline: u32,
    ) -> Result<bool, DcsError> {
        let v = Self::last_leader_value(&LastLeader {
            node: held.node.clone(),
            epoch: held.epoch,
            lsn,
            timeline,
            at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        });
        self.put_as_leader(held, "last_leader", &v).await
    }

    pub(crate) fn last_leader_value(l: &LastLeader) -> impl Serialize {
        LastLeaderValue {
            node: l.node.to_string(),
            epoch: l.epoch.0,
            lsn: l.lsn.to_string(),
            timeline: l.timeline,
            at_ms: l.at_ms,
        }
    }

    pub async fn last_leader(&self) -> Result<Option<LastLeader>, DcsError> {
        match self.kv.get(&self.key("last_leader")).await? {
            Some(e) => Self::last_leader_from(&e).map(Some),
            None => Ok(None),
        }
    }

    fn last_leader_from(e: &Entry) -> Result<LastLeader, DcsError> {
        let v: LastLeaderValue = Self::parse(e)?;
        let lsn = v.lsn.parse::<Lsn>().map_err(|_| DcsError::BadValue {
            key: e.key.clone(),
            source: serde::de::Error::custom(format!("bad lsn {}", v.lsn)),
        })?;
        Ok(LastLeader {
            at_ms: v.at_ms,
            node: NodeId::new(&v.node),
            epoch: Epoch(v.epoch),
            lsn,
            timeline: v.timeline,
        })
    }

    /// Maintenance mode on or off for every agent (the `pause` key; an operator's command, not
    /// an agent's).
    pub async fn set_paused(&self, paused: bool) -> Result<(), DcsError> {
        let op = if paused {
            Op::Put {
                key: self.key("pause"),
                value: b"true".to_vec(),
                lease: None,
            }
        } else {
            Op::Delete {
                key: self.key("pause"),
            }
        };
        self.kv.txn(Vec::new(), vec![op]).await.map(|_| ())
    }

    /// Records the synchronous set; false if `held` no longer holds the key.
    pub async fn put_synchronous_set(
        &self,
        held: &Leader,
        set: &[NodeId],
    ) -> Result<bool, DcsError> {
        let names: Vec<&str> = set.iter().map(|n| n.as_str()).collect();
        self.put_as_leader(held, "sync", &names).await
    }

    pub async fn synchronous_set(&self) -> Result<Option<Vec<NodeId>>, DcsError> {
        let Some(e) = self.kv.get(&self.key("sync")).await? else {
            return Ok(None);
        };
        let names: Vec<String> = Self::parse(&e)?;
        Ok(Some(names.iter().map(|n| NodeId::new(n)).collect()))
    }

    /// Takes the leader key for `node`, bound to `lease`, if nobody holds it: the epoch is the
    /// last one granted plus one. `None`: someone else holds it (or took it first).
    pub async fn take_leader(
        &self,
        node: &NodeId,
        lease: LeaseId,
    ) -> Result<Option<Leader>, DcsError> {
        self.take(node, lease, 0).await
    }

    /// Takes the absent key again for `node` under `epoch`, the last epoch granted, when
    /// `node` held it last: a primary that went on writing under it (failsafe mode, while the
    /// store was unreachable and its lease lapsed) keeps its epoch, so the proxies need not cut
    /// its connections. Nobody else can have led since: the epoch counter has not moved.
    /// `None`: the key is held, or another epoch was granted.
    pub async fn retake_leader(
        &self,
        node: &NodeId,
        lease: LeaseId,
        epoch: Epoch,
    ) -> Result<Option<Leader>, DcsError> {
        let (leader_key, epoch_key) = (self.key("leader"), self.key("epoch"));
        let Some(counter) = self.kv.get(&epoch_key).await? else {
            return Ok(None);
        };
        if Self::parse::<u64>(&counter)? != epoch.0 {
            return Ok(None);
        }
        let value = serde_json::to_vec(&LeaderValue {
            node: node.to_string(),
            epoch: epoch.0,
        })
        .expect("a leader value serialises");
        let taken = self
            .kv
            .txn(
                vec![
                    Compare {
                        key: leader_key.clone(),
                        mod_revision: 0,
                    },
                    Compare {
                        key: epoch_key,
                        mod_revision: counter.mod_revision,
                    },
                ],
                vec![Op::Put {
                    key: leader_key,
                    value,
                    lease: Some(lease),
                }],
            )
            .await?;
        if !taken {
            return Ok(None);
        }
        let held = self.leader().await?;
        Ok(held.filter(|l| &l.node == node && l.epoch == epoch))
    }

    /// Takes the key if its modification revision is `expect` (0: absent).
    async fn take(
        &self,
        node: &NodeId,
        lease: LeaseId,
        expect: Revision,
    ) -> Result<Option<Leader>, DcsError> {
        let (leader_key, epoch_key) = (self.key("leader"), self.key("epoch"));
        for _ in 0..TAKE_TRIES {
            let current = self
                .kv
                .get(&leader_key)
                .await?
                .map_or(0, |e| e.mod_revision);
            if current != expect {
                return Ok(None);
            }
            let counter = self.kv.get(&epoch_key).await?;
            let (last, counter_revision) = match &counter {
                Some(e) => (Self::parse::<u64>(e)?, e.mod_revision),
                None => (0, 0),
            };
            let epoch = last + 1;
            let value = serde_json::to_vec(&LeaderValue {
                node: node.to_string(),
                epoch,
            })
            .expect("a leader value serialises");
            let taken = self
                .kv
                .txn(
                    vec![
                        Compare {
                            key: leader_key.clone(),
                            mod_revision: expect,
                        },
                        Compare {
                            key: epoch_key.clone(),
                            mod_revision: counter_revision,
                        },
                    ],
                    vec![
                        Op::Put {
                            key: epoch_key.clone(),
                            value: epoch.to_string().into_bytes(),
                            lease: None,
                        },
                        Op::Put {
                            key: leader_key.clone(),
                            value,
                            lease: Some(lease),
                        },
                    ],
                )
                .await?;
            if taken {
                let held = self.leader().await?;
                return Ok(held.filter(|l| &l.node == node && l.epoch == Epoch(epoch)));
            }
        }
        Ok(None)
    }

    /// Gives the leader key up if `held` is still the holder; returns whether it was.
    pub async fn release_leader(&self, held: &Leader) -> Result<bool, DcsError> {
        let key = self.key("leader");
        self.kv
            .txn(
                vec![Compare {
                    key: key.clone(),
                    mod_revision: held.revision,
                }],
                vec![Op::Delete { key }],
            )
            .await
    }

    /// Publishes `node`'s state, bound to its lease.
    pub async fn put_member<T: Serialize>(
        &self,
        node: &NodeId,
        state: &T,
        lease: LeaseId,
    ) -> Result<(), DcsError> {
        let value = serde_json::to_vec(state).map_err(|source| DcsError::BadValue {
            key: self.key(&format!("members/{node}")),
            source,
        })?;
        self.kv
            .txn(
                vec![],
                vec![Op::Put {
                    key: self.key(&format!("members/{node}")),
                    value,
                    lease: Some(lease),
                }],
            )
            .await
            .map(|_| ())
    }

    /// Every member that has published and whose lease lives, in name order.
    pub async fn members<T: DeserializeOwned>(&self) -> Result<Vec<Member<T>>, DcsError> {
        let prefix = self.key("members/");
        self.kv
            .list(&prefix)
            .await?
            .iter()
            .map(|e| {
                Ok(Member {
                    node: NodeId::new(&e.key[prefix.len()..]),
                    state: Self::parse(e)?,
                })
            })
            .collect()
    }

    /// Records `node` as the one that bootstraps the cluster, if nobody has; returns whether
    /// `node` is it (also when it had already taken the key).
    pub async fn initialize(&self, node: &NodeId) -> Result<bool, DcsError> {
        let key = self.key("initialize");
        let value = serde_json::to_vec(node.as_str()).expect("a name serialises");
        self.kv
            .txn(
                vec![Compare {
                    key: key.clone(),
                    mod_revision: 0,
                }],
                vec![Op::Put {
                    key,
                    value,
                    lease: None,
                }],
            )
            .await?;
        Ok(self.initialized_by().await?.as_ref() == Some(node))
    }

    /// The node that took `initialize`, if any.
    pub async fn initialized_by(&self) -> Result<Option<NodeId>, DcsError> {
        match self.kv.get(&self.key("initialize")).await? {
            Some(e) => Ok(Some(NodeId::new(&Self::parse::<String>(&e)?))),
            None => Ok(None),
        }
    }

    /// Changes anywhere in this cluster's keys (including expiries).
    pub async fn watch(&self) -> Result<watch::Receiver<Revision>, DcsError> {
        self.kv.watch(&self.prefix).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryKv;
    use std::time::Duration;

    fn store() -> ClusterStore<MemoryKv> {
        ClusterStore::new(MemoryKv::new(), "pgwarden", "main")
    }

    #[tokio::test(start_paused = true)]
    async fn one_leader_at_a_time_with_an_epoch_never_given_twice() {
        let s = store();
        let (n1, n2) = (NodeId::new("n1"), NodeId::new("n2"));
        let l1 = s.kv().grant(Duration::from_secs(10)).await.expect("lease");
        let l2 = s.kv().grant(Duration::from_secs(10)).await.expect("lease");
        let first = s
            .take_leader(&n1, l1)
            .await
            .expect("take")
            .expect("n1 leads");
        assert_eq!(first.epoch, Epoch(1));
        assert_eq!(s.take_leader(&n2, l2).await.expect("take"), None, "held");
        assert_eq!(s.leader().await.expect("leader").as_ref(), Some(&first));
        // Released: the next leader gets epoch 2.
        assert!(s.release_leader(&first).await.expect("release"));
        assert!(
            !s.release_leader(&first).await.expect("release"),
            "not twice"
        );
        let second = s
            .take_leader(&n2, l2)
            .await
            .expect("take")
            .expect("n2 leads");
        assert_eq!(second.epoch, Epoch(2));
        // A stale holder cannot release the new leader's key.
        assert!(!s.release_leader(&first).await.expect("release"));
        // Expired (n2 stops renewing): the key goes, the epoch stays counted.
        s.kv().keep_alive(l1).await.expect("n1 alive");
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(s.leader().await.expect("leader"), None);
        let l1b = s.kv().grant(Duration::from_secs(10)).await.expect("lease");
        let third = s
            .take_leader(&n1, l1b)
            .await
            .expect("take")
            .expect("n1 again");
        assert_eq!(third.epoch, Epoch(3));
    }

    /// A store that yields before every call, so concurrent takers interleave between their
    /// read and their transaction (the in-process store alone never yields).
    struct Yielding(MemoryKv);

    impl Kv for Yielding {
        async fn get(&self, key: &str) -> Result<Option<Entry>, DcsError> {
            tokio::task::yield_now().await;
            self.0.get(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<Entry>, DcsError> {
            tokio::task::yield_now().await;
            self.0.list(prefix).await
        }
        async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<bool, DcsError> {
            tokio::task::yield_now().await;
            self.0.txn(compares, ops).await
        }
        async fn grant(&self, ttl: Duration) -> Result<LeaseId, DcsError> {
            self.0.grant(ttl).await
        }
        async fn keep_alive(&self, lease: LeaseId) -> Result<(), DcsError> {
            self.0.keep_alive(lease).await
        }
        async fn time_to_live(&self, lease: LeaseId) -> Result<Option<Duration>, DcsError> {
            self.0.time_to_live(lease).await
        }
        async fn revoke(&self, lease: LeaseId) -> Result<(), DcsError> {
            self.0.revoke(lease).await
        }
        async fn watch(&self, prefix: &str) -> Result<watch::Receiver<Revision>, DcsError> {
            self.0.watch(prefix).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn racing_takes_elect_exactly_one() {
        let s = std::sync::Arc::new(ClusterStore::new(
            Yielding(MemoryKv::new()),
            "pgwarden",
            "main",
        ));
        let mut tasks = Vec::new();
        for i in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let node = NodeId::new(&format!("n{i}"));
                let lease = s.kv().grant(Duration::from_secs(10)).await.expect("lease");
                s.take_leader(&node, lease).await.expect("take")
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            if let Some(l) = t.await.expect("task") {
                winners.push(l);
            }
        }
        assert_eq!(winners.len(), 1, "{winners:?}");
        assert_eq!(winners[0].epoch, Epoch(1));
        // Written once: the losers' transactions found the key taken (not last-writer-wins).
        let key = s
            .kv()
            .get("/pgwarden/main/leader")
            .await
            .expect("get")
            .expect("held");
        assert_eq!(
            key.create_revision, key.mod_revision,
            "the leader key was overwritten"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn members_live_with_their_lease_and_initialize_is_taken_once() {
        let s = store();
        let (n1, n2) = (NodeId::new("n1"), NodeId::new("n2"));
        let l1 = s.kv().grant(Duration::from_secs(5)).await.expect("lease");
        let l2 = s.kv().grant(Duration::from_secs(30)).await.expect("lease");
        s.put_member(&n1, &serde_json::json!({"role": "primary"}), l1)
            .await
            .expect("put");
        s.put_member(&n2, &serde_json::json!({"role": "replica"}), l2)
            .await
            .expect("put");
        let all: Vec<Member<serde_json::Value>> = s.members().await.expect("members");
        assert_eq!(
            all.iter().map(|m| m.node.as_str()).collect::<Vec<_>>(),
            ["n1", "n2"]
        );
        assert_eq!(all[1].state["role"], "replica");
        tokio::time::sleep(Duration::from_secs(6)).await;
        let all: Vec<Member<serde_json::Value>> = s.members().await.expect("members");
        assert_eq!(all.len(), 1, "n1's lease expired");
        assert!(s.initialize(&n2).await.expect("init"));
        assert!(!s.initialize(&n1).await.expect("init"), "n2 took it");
        assert!(s.initialize(&n2).await.expect("init"), "still n2's");
        assert_eq!(s.initialized_by().await.expect("by"), Some(n2));
    }

    #[tokio::test(start_paused = true)]
    async fn take_over_adopt_and_leader_only_keys() {
        let s = store();
        let (n1, n2) = (NodeId::new("n1"), NodeId::new("n2"));
        let l1 = s.kv().grant(Duration::from_secs(10)).await.expect("lease");
        let l2 = s.kv().grant(Duration::from_secs(10)).await.expect("lease");
        let first = s.take_leader(&n1, l1).await.expect("take").expect("n1");
        assert_eq!(first.lease, Some(l1));
        assert!(s.put_last_leader(&first, Lsn(42), 1).await.expect("put"));
        assert!(s
            .put_synchronous_set(&first, std::slice::from_ref(&n2))
            .await
            .expect("put"));
        // A run of n1's agent with a new lease adopts the key, keeping the epoch.
        let l1b = s.kv().grant(Duration::from_secs(10)).await.expect("lease");
        assert!(s.adopt_leader(&first, l1b).await.expect("adopt"));
        let adopted = s.leader().await.expect("leader").expect("held");
        assert_eq!((adopted.epoch, adopted.lease), (Epoch(1), Some(l1b)));
        // The stale view of the key can neither write leader-only keys nor be taken over.
        assert!(!s.put_last_leader(&first, Lsn(43), 1).await.expect("put"));
        assert_eq!(s.take_over(&first, &n2, l2).await.expect("take over"), None);
        // Taken over from the current holder: the next epoch, and the old holder is locked out.
        let second = s
            .take_over(&adopted, &n2, l2)
            .await
            .expect("take over")
            .expect("n2");
        assert_eq!(second.epoch, Epoch(2));
        assert!(!s.put_synchronous_set(&adopted, &[]).await.expect("put"));
        assert!(!s.adopt_leader(&adopted, l1b).await.expect("adopt"));
        assert_eq!(
            s.last_leader()
                .await
                .expect("last")
                .map(|l| LastLeader { at_ms: 0, ..l }),
            Some(LastLeader {
                at_ms: 0,
                node: n1.clone(),
                epoch: Epoch(1),
                lsn: Lsn(42),
                timeline: 1
            })
        );
        assert_eq!(s.synchronous_set().await.expect("sync"), Some(vec![n2]));
        assert_eq!(s.last_epoch().await.expect("epoch"), Some(Epoch(2)));
        // Both outlive every lease.
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(s.leader().await.expect("leader"), None);
        assert!(s.last_leader().await.expect("last").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_bad_value_is_an_error_with_its_key() {
        let s = store();
        s.kv()
            .txn(
                vec![],
                vec![Op::Put {
                    key: "/pgwarden/main/leader".into(),
                    value: b"not json".to_vec(),
                    lease: None,
                }],
            )
            .await
            .expect("txn");
        let e = s.leader().await.expect_err("bad value");
        assert!(e.to_string().contains("/pgwarden/main/leader"), "{e}");
        assert!(!e.is_retryable());
    }
}
