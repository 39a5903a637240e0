//! The HA agent: a pure decision core (observed state -> actions) and, with the next pieces of
//! the HA issue, the driver that executes them. Must not talk to clients.
//!
//! # Layout
//! - [`decide`] — the agent's decision: what one agent does next from what it observed, or
//!   why it does nothing (pure, table-tested).
//! - [`candidates`] — who may take the leader lease when nobody holds it, and why each other
//!   member may not (pure, table-tested).
//! - [`sync`] — managed synchronous replication: who is named, and the safe order of changes.

pub mod candidates;
pub mod decide;
pub mod sync;
