//! The in-process store: etcd's semantics (revisions, leases, transactions, watches) over a map
//! behind one lock. Valid only when every agent lives in this process (the demo): it is not a
//! consensus protocol, and nothing else can reach it.
//!
//! Leases expire on time: a task sleeps until the next deadline and deletes the keys of every
//! lease past it, so watchers see an expiry without any other operation happening.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::kv::{Compare, Entry, Kv, LeaseId, Op, Revision};
use crate::DcsError;

struct Lease {
    ttl: Duration,
    deadline: Instant,
}

#[derive(Default)]
struct State {
    revision: Revision,
    keys: BTreeMap<String, Entry>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: i64,
    watchers: Vec<(String, watch::Sender<Revision>)>,
}

impl State {
    /// Deletes the keys of every lease past its deadline (one revision for all of them).
    fn expire(&mut self, now: Instant) {
        let gone: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        if !gone.is_empty() {
            self.end_leases(&gone);
        }
    }

    fn end_leases(&mut self, gone: &[LeaseId]) {
        for id in gone {
            self.leases.remove(id);
        }
        let doomed: Vec<String> = self
            .keys
            .values()
            .filter(|e| e.lease.is_some_and(|l| gone.contains(&l)))
            .map(|e| e.key.clone())
            .collect();
        if doomed.is_empty() {
            return;
        }
        self.revision += 1;
        for k in &doomed {
            self.keys.remove(k);
        }
        self.notify(&doomed);
    }

    fn notify(&mut self, touched: &[String]) {
        let revision = self.revision;
        self.watchers.retain(|(_, tx)| !tx.is_closed());
        for (prefix, tx) in &self.watchers {
            if touched.iter().any(|k| k.starts_with(prefix.as_str())) {
                tx.send_replace(revision);
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.leases.values().map(|l| l.deadline).min()
    }
}

/// The in-process store; clones share it.
#[derive(Clone)]
pub struct MemoryKv {
    state: Arc<Mutex<State>>,
    /// Wakes the expiry task when a deadline moves.
    deadlines: Arc<Notify>,
}

impl Default for MemoryKv {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryKv {
    /// A new empty store; its expiry task runs on the current runtime until every clone is
    /// dropped.
    pub fn new() -> MemoryKv {
        let kv = MemoryKv {
            state: Arc::default(),
            deadlines: Arc::default(),
        };
        let state = Arc::downgrade(&kv.state);
        let deadlines = kv.deadlines.clone();
        tokio::spawn(async move {
            loop {
                let next = {
                    let Some(state) = state.upgrade() else { return };
                    let mut s = state.lock().expect("store lock");
                    s.expire(Instant::now());
                    s.next_deadline()
                };
                let woken = deadlines.notified();
                match next {
                    Some(at) => tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = woken => {}
                    },
                    None => woken.await,
                }
            }
        });
        kv
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut s = self.state.lock().expect("store lock");
        s.expire(Instant::now());
        f(&mut s)
    }
}

impl Kv for MemoryKv {
    async fn get(&self, key: &str) -> Result<Option<Entry>, DcsError> {
        Ok(self.with(|s| s.keys.get(key).cloned()))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, DcsError> {
        Ok(self.with(|s| {
            s.keys
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(_, e)| e.clone())
                .collect()
        }))
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<bool, DcsError> {
        self.with(|s| {
            let holds = compares
                .iter()
                .all(|c| s.keys.get(&c.key).map_or(0, |e| e.mod_revision) == c.mod_revision);
            if !holds {
                return Ok(false);
            }
            for op in &ops {
                if let Op::Put { lease: Some(l), .. } = op {
                    if !s.leases.contains_key(l) {
                        return Err(DcsError::LeaseGone(l.0));
                    }
                }
            }
            s.revision += 1;
            let revision = s.revision;
            let mut touched = Vec::with_capacity(ops.len());
            for op in ops {
                match op {
                    Op::Put { key, value, lease } => {
                        let create_revision =
                            s.keys.get(&key).map_or(revision, |e| e.create_revision);
                        touched.push(key.clone());
                        s.keys.insert(
                            key.clone(),
                            Entry {
                                key,
                                value,
                                create_revision,
                                mod_revision: revision,
                                lease,
                            },
                        );
                    }
                    Op::Delete { key } => {
                        if s.keys.remove(&key).is_some() {
                            touched.push(key);
                        }
                    }
                }
            }
            s.notify(&touched);
            Ok(true)
        })
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, DcsError> {
        let id = self.with(|s| {
            s.next_lease += 1;
            let id = LeaseId(s.next_lease);
            s.leases.insert(
                id,
                Lease {
                    ttl,
                    deadline: Instant::now() + ttl,
                },
            );
            id
        });
        self.deadlines.notify_one();
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), DcsError> {
        self.with(|s| match s.leases.get_mut(&lease) {
            Some(l) => {
                l.deadline = Instant::now() + l.ttl;
                Ok(())
            }
            None => Err(DcsError::LeaseGone(lease.0)),
        })
    }

    async fn time_to_live(&self, lease: LeaseId) -> Result<Option<Duration>, DcsError> {
        // Whole seconds, rounded down, as etcd answers.
        Ok(self.with(|s| {
            s.leases.get(&lease).map(|l| {
                Duration::from_secs(
                    l.deadline
                        .saturating_duration_since(Instant::now())
                        .as_secs(),
                )
            })
        }))
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), DcsError> {
        self.with(|s| s.end_leases(&[lease]));
        self.deadlines.notify_one();
        Ok(())
    }

    async fn watch(&self, prefix: &str) -> Result<watch::Receiver<Revision>, DcsError> {
        Ok(self.with(|s| {
            let (tx, rx) = watch::channel(s.revision);
            s.watchers.push((prefix.to_string(), tx));
            rx
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str, lease: Option<LeaseId>) -> Op {
        Op::Put {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            lease,
        }
    }

    fn absent(key: &str) -> Compare {
        Compare {
            key: key.into(),
            mod_revision: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transactions_compare_revisions_and_write_at_once() {
        let kv = MemoryKv::new();
        assert!(kv
            .txn(
                vec![absent("/a")],
                vec![put("/a", "1", None), put("/b", "2", None)]
            )
            .await
            .expect("txn"));
        let a = kv.get("/a").await.expect("get").expect("a");
        let b = kv.get("/b").await.expect("get").expect("b");
        assert_eq!(
            a.mod_revision, b.mod_revision,
            "one revision per transaction"
        );
        // A stale comparison changes nothing.
        assert!(!kv
            .txn(vec![absent("/a")], vec![put("/b", "3", None)])
            .await
            .expect("txn"));
        assert_eq!(kv.get("/b").await.expect("get").expect("b").value, b"2");
        // The right revision does; the create revision stays.
        let current = Compare {
            key: "/a".into(),
            mod_revision: a.mod_revision,
        };
        assert!(kv
            .txn(
                vec![current],
                vec![put("/a", "9", None), Op::Delete { key: "/b".into() }]
            )
            .await
            .expect("txn"));
        let a2 = kv.get("/a").await.expect("get").expect("a");
        assert_eq!(
            (a2.create_revision, a2.value.as_slice()),
            (a.create_revision, &b"9"[..])
        );
        assert!(a2.mod_revision > a.mod_revision);
        assert!(kv.get("/b").await.expect("get").is_none());
        let listed: Vec<String> = kv
            .list("/")
            .await
            .expect("list")
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(listed, vec!["/a".to_string()]);
    }

    #[tokio::test(start_paused = true)]
    async fn leases_expire_on_time_unless_kept_alive_and_watchers_see_it() {
        let kv = MemoryKv::new();
        let lease = kv.grant(Duration::from_secs(10)).await.expect("grant");
        assert!(kv
            .txn(vec![], vec![put("/x/leader", "n1", Some(lease))])
            .await
            .expect("txn"));
        let mut w = kv.watch("/x/").await.expect("watch");
        w.borrow_and_update();
        // Kept alive at 6 s: still there at 12 s.
        tokio::time::sleep(Duration::from_secs(6)).await;
        kv.keep_alive(lease).await.expect("alive");
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(kv.get("/x/leader").await.expect("get").is_some());
        // Not renewed: gone at 16 s, and the watcher is woken without any other operation.
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("woken by the expiry")
            .expect("store alive");
        assert!(kv.get("/x/leader").await.expect("get").is_none());
        assert!(matches!(
            kv.keep_alive(lease).await,
            Err(DcsError::LeaseGone(_))
        ));
        // A put on a gone lease is refused, not written without one.
        assert!(matches!(
            kv.txn(vec![], vec![put("/x/leader", "n2", Some(lease))])
                .await,
            Err(DcsError::LeaseGone(_))
        ));
        // Revoking ends a lease at once.
        let other = kv.grant(Duration::from_secs(60)).await.expect("grant");
        kv.txn(vec![], vec![put("/x/m", "1", Some(other))])
            .await
            .expect("txn");
        kv.revoke(other).await.expect("revoke");
        assert!(kv.get("/x/m").await.expect("get").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn watchers_see_only_their_prefix() {
        let kv = MemoryKv::new();
        let mut mine = kv.watch("/c1/").await.expect("watch");
        mine.borrow_and_update();
        kv.txn(vec![], vec![put("/c2/leader", "n1", None)])
            .await
            .expect("txn");
        assert!(!mine.has_changed().expect("open"), "another cluster's key");
        kv.txn(vec![], vec![put("/c1/leader", "n1", None)])
            .await
            .expect("txn");
        assert!(mine.has_changed().expect("open"));
    }
}
