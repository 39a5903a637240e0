//! The HA agent: a pure decision core (observed state -> actions) and, with the next pieces of
//! the HA issue, the driver that executes them. Must not talk to clients.
//!
//! # Layout
//! - [`candidates`] — who may take the leader lease when nobody holds it, and why each other
//!   member may not (pure, table-tested).

pub mod candidates;
