//! The cluster model: nodes, roles, timelines, LSNs, lag per stage, and health.
//!
//! A probe connects to every node in parallel, each bounded by `monitor.timeout` so that a dead
//! node never stalls the rest, and [`status::ClusterStatus::build`] turns the samples into one
//! snapshot: who is primary, how far behind each replica is at each stage (sent, write, flush,
//! replay) measured against the primary's current LSN, lag levels, and the cluster's performance
//! figures. This crate never routes client traffic.
//!
//! # Layout
//! - [`probe`] — one node's raw facts ([`probe::NodeSample`]) from SQL, and probing all nodes.
//! - [`status`] — [`ClusterStatus`], the derived snapshot, its JSON schema and exit code.
//! - [`render`] — the human table.
//! - [`view`] — [`view::ClusterView`], the snapshot consumers route by (leader, epoch, nodes).
//! - [`leader`] — which primary takes writes: a promotion is followed only if it descends from
//!   the previous leader (pure, table-tested).
//! - [`monitor`] — the actor publishing views from probes over `watch`.
//! - [`proxy_view`] — what a running proxy says about where writes go, for `pgwarden status`.

pub mod leader;
pub mod monitor;
pub mod probe;
pub mod proxy_view;
pub mod render;
pub mod status;
pub mod view;

pub use status::{ClusterStatus, LagLevel, NodeStatus, Role};

/// Probes every configured node and builds the snapshot; a running proxy of this config is
/// asked where it sends writes (`SHOW LEADER`), and a refusal is one of the warnings.
pub async fn check(config: &pgwarden_config::Config) -> ClusterStatus {
    let (samples, proxy) = futures::join!(
        probe::probe_all(config),
        proxy_view::ask(config, config.monitor.timeout)
    );
    let mut status = ClusterStatus::build(config, samples, std::time::SystemTime::now());
    if let Some(p) = proxy {
        status.warnings.extend(p.warnings(config.proxy.listen));
    }
    status
}

/// [`check`] with connections kept from one call to the next.
pub async fn check_with(
    prober: &mut probe::Prober,
    config: &pgwarden_config::Config,
) -> ClusterStatus {
    let samples = prober.probe_all(config).await;
    ClusterStatus::build(config, samples, std::time::SystemTime::now())
}
