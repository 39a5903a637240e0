//! The HA agent: a pure decision core (observed state -> actions), the driver that observes a
//! node and carries the decisions out, and its HTTP API. Must not talk to clients.
//!
//! # Layout
//! - [`decide`] — the agent's decision: what one agent does next from what it observed, or
//!   why it does nothing (pure, table-tested).
//! - [`candidates`] — who may take the leader lease when nobody holds it, and why each other
//!   member may not (pure, table-tested).
//! - [`switchover`] — planned switchover: the target's checks and each agent's part (pure).
//! - [`sync`] — managed synchronous replication: who is named, and the safe order of changes.
//! - [`agent`] — [`Agent`], the driver: owns its node's PostgreSQL, its lease and its member key.
//! - [`member`] — [`MemberState`], what an agent publishes.
//! - [`failsafe`] — failsafe mode: a leader kept while no member can reach the store.
//! - [`history`] — availability, MTTR and MTBF from the store's history (pure), and its table.
//! - [`operate`] — operator commands on the store: switchover requests, checked first.
//! - [`api_write`] — the API's mutating calls (`POST /switchover`) and its authentication.
//! - [`api`] — `GET /health`, `/primary`, `/replica`.
//! - [`store`] — the etcd store from `[dcs]`, or the in-process one.
//! - [`view`] — the proxy's cluster view from the store.
//! - [`status`] — the HA block of `pgwarden status`.

pub mod agent;
pub mod api;
pub mod api_write;
pub mod candidates;
pub mod decide;
pub mod failsafe;
pub mod history;
pub mod member;
pub mod operate;
pub mod status;
pub mod store;
pub mod switchover;
pub mod sync;
pub mod view;

pub use agent::{Agent, AgentError};
pub use member::MemberState;
