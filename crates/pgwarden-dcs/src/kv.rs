//! The key-value primitives every store implements, with etcd's semantics: a global revision
//! that every write increases, per-key create and modification revisions, leases that delete
//! their keys when they expire, and transactions that apply only if every comparison holds.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

use crate::DcsError;

/// A store revision; 0 compares as "the key is absent".
pub type Revision = i64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

/// A key with its value and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    pub lease: Option<LeaseId>,
}

/// A transaction's condition: `key`'s modification revision is `mod_revision` (0: absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: String,
    pub mod_revision: Revision,
}

/// A transaction's write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

/// The store. Every call is bounded by the implementation's timeout.
pub trait Kv: Send + Sync + 'static {
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Entry>, DcsError>> + Send;

    /// Every key under `prefix`, in key order.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<Entry>, DcsError>> + Send;

    /// Applies `ops` at once if every comparison holds; returns whether it did.
    fn txn(
        &self,
        compares: Vec<Compare>,
        ops: Vec<Op>,
    ) -> impl Future<Output = Result<bool, DcsError>> + Send;

    /// A lease that lives `ttl` unless kept alive.
    fn grant(&self, ttl: Duration) -> impl Future<Output = Result<LeaseId, DcsError>> + Send;

    /// Renews a lease for its whole TTL; [`DcsError::LeaseGone`] once it has expired.
    fn keep_alive(&self, lease: LeaseId) -> impl Future<Output = Result<(), DcsError>> + Send;

    /// How long the lease has left unless renewed (`None`: gone). etcd answers in whole
    /// seconds, rounded down: the lease lives at least this long, and less than a second more.
    fn time_to_live(
        &self,
        lease: LeaseId,
    ) -> impl Future<Output = Result<Option<Duration>, DcsError>> + Send;

    /// Ends a lease now, deleting its keys.
    fn revoke(&self, lease: LeaseId) -> impl Future<Output = Result<(), DcsError>> + Send;

    /// The store's revision, changing whenever a key under `prefix` changes (including by a
    /// lease's expiry): consumers re-read on a change.
    fn watch(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<watch::Receiver<Revision>, DcsError>> + Send;
}
