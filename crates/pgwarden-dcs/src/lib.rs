//! The consensus store the HA agents agree through: a small key-value trait with etcd's
//! semantics, its implementations, and the cluster's keys on top of it.
//!
//! Owns: [`Kv`] — revisions, leases with a TTL, multi-key compare-and-swap transactions,
//! watches — and [`ClusterStore`], the HA keys (the leader key bound to a lease with a
//! monotonic epoch, member keys, `initialize`). Must not know PostgreSQL.
//!
//! # Layout
//! - [`kv`] — the [`Kv`] trait and its types.
//! - [`memory`] — [`memory::MemoryKv`], valid only when every agent lives in one process (the
//!   demo): no consensus over the network is made here.
//! - [`etcd`] — [`etcd::EtcdKv`], the etcd v3 store, every call bounded by a timeout.
//! - [`cluster`] — [`ClusterStore`]: the keys and operations the agents use.
//! - [`history`] — the cluster's history of outages (failovers, switchovers, restarts).
//! - [`requests`] — restart and re-clone requests to one member, and manual failover.
//! - [`settings`] — the cluster's dynamic settings (`config`), as text.
//! - [`switchover`] — the `switchover` key: a planned change of leader and where it stands.
//! - [`error`] — [`DcsError`].

pub mod cluster;
pub mod error;
pub mod etcd;
pub mod history;
pub mod kv;
pub mod memory;
pub mod requests;
pub mod settings;
pub mod switchover;

pub use cluster::{ClusterStore, LastLeader, Leader, Member, Snapshot};
pub use error::DcsError;
pub use history::{Event, EventKind};
pub use kv::{Compare, Entry, Kv, LeaseId, Op, Revision};
pub use requests::{ManualFailover, NodeAction, NodeRequest, Stored};
pub use switchover::{Phase as SwitchoverPhase, StoredSwitchover, Switchover};
