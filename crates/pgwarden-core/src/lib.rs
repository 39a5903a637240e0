//! Shared plumbing for every pgwarden crate.
//!
//! Owns the small value types that config, services and the CLI agree on, and nothing that knows
//! about a particular service.
//!
//! # Layout
//! - [`size`] — [`ByteSize`], sizes written as `"16MB"` in config and shown as `16.0 MiB`.
//! - [`duration`] — parsing durations written as `"500ms"`, `"10s"`, `"1h"`.
//! - [`lsn`] — [`Lsn`], a PostgreSQL WAL position (`0/3000148`) with byte arithmetic.
//! - [`id`] — [`NodeId`] and [`Epoch`], the leader term used as a fencing token.

pub mod duration;
pub mod id;
pub mod lsn;
pub mod size;

pub use duration::{format_duration, parse_duration};
pub use id::{Epoch, NodeId};
pub use lsn::Lsn;
pub use size::ByteSize;
