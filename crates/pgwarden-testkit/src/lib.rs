//! Test-only: real PostgreSQL clusters in temporary directories on free ports.
//!
//! ```no_run
//! # async fn t() {
//! let cluster = pgwarden_testkit::Cluster::builder().replicas(2).build().await;
//! cluster.execute(0, "CREATE TABLE t (x int)").await;
//! cluster.wait_streaming().await;
//! # }
//! ```
//!
//! A cluster is a primary (`n1`) and standbys (`n2`, ...) built with `pgwarden-postgres`, the same
//! code the product uses. The initdb output is made once per machine and PostgreSQL version and
//! copied for every cluster. Dropping the cluster (also while a test panics) stops every
//! PostgreSQL process and removes the directory. Under root, PostgreSQL runs as `postgres`.
//!
//! Never a runtime dependency of the product.
//!
//! # Layout
//! - [`cluster`] — [`Cluster`], [`ClusterBuilder`] and the per-node helpers.
//! - [`template`] — the shared initdb template.
//! - [`etcd`] — [`etcd::Etcd`], a real etcd on free ports.
//! - [`fault`] — [`fault::FaultProxy`], a TCP proxy that cuts, blackholes or delays.
//! - [`ports`] — free TCP ports.
//! - [`wait`] — [`eventually`], the bounded retry every test uses instead of sleeping.

pub mod cluster;
pub mod etcd;
pub mod fault;
pub mod ports;
pub mod template;
pub mod wait;

pub use cluster::{Cluster, ClusterBuilder};
pub use pgwarden_config::ReplicationMode;
pub use wait::eventually;

/// The superuser every test cluster has.
pub const SUPERUSER: &str = "postgres";
/// Its password.
pub const SUPERUSER_PASSWORD: &str = "pgwarden-testkit";
/// The replication role.
pub const REPLICATION_USER: &str = "replicator";
pub const REPLICATION_PASSWORD: &str = "pgwarden-testkit-repl";
