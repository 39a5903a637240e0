//! The cluster's store from `[dcs]`.

use std::time::{Duration, Instant};

use pgwarden_config::{Config, DcsConfig};
use pgwarden_dcs::etcd::{EtcdKv, EtcdOptions};
use pgwarden_dcs::{ClusterStore, DcsError, Kv};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no [dcs] section: the agents need an etcd cluster to agree through (the in-process store is only for agents in one process, as in pgwarden demo)")]
    NotConfigured,
    #[error("cannot read {path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach etcd at {endpoints}: {source}")]
    Unreachable {
        endpoints: String,
        #[source]
        source: DcsError,
    },
    #[error("cannot reach etcd at {endpoints} (waited {}, dcs.start_wait): {source}", pgwarden_core::format_duration(*.waited))]
    StillUnreachable {
        endpoints: String,
        waited: Duration,
        #[source]
        source: DcsError,
    },
}

/// Connects to the etcd of `[dcs]` and checks that it answers.
pub async fn connect(config: &Config) -> Result<ClusterStore<EtcdKv>, StoreError> {
    let dcs = config.dcs.as_ref().ok_or(StoreError::NotConfigured)?;
    let options = options(dcs)?;
    let endpoints = dcs.endpoints.join(", ");
    let unreachable = |source| StoreError::Unreachable {
        endpoints: endpoints.clone(),
        source,
    };
    let kv = EtcdKv::connect(&options).await.map_err(unreachable)?;
    // A lazy connection says nothing: one read proves the store answers.
    kv.get("/").await.map_err(unreachable)?;
    Ok(ClusterStore::new(kv, &dcs.namespace, &config.cluster))
}

/// What [`connect`] would refuse before it tries the network: no `[dcs]`, or a certificate
/// or key that cannot be read.
pub fn check(config: &Config) -> Result<(), StoreError> {
    options(config.dcs.as_ref().ok_or(StoreError::NotConfigured)?).map(|_| ())
}

/// How often a store that stays unreachable is named again in the log.
const WAITING_LOG_EVERY: Duration = Duration::from_secs(15);

/// [`connect`], waiting while the store is unreachable, up to `bound` (`None`: for as long as
/// it takes): a daemon started with etcd (a machine booting, an etcd member restarting, a host
/// too busy to answer within one call's timeout) waits for it, saying so, instead of exiting.
/// Nothing runs meanwhile: the agent starts no PostgreSQL before it has read the store.
/// Mistakes that waiting cannot mend (no `[dcs]`, an unreadable certificate) are returned at
/// once, and so is the last cause once `bound` has passed; `None` when `stop` turns true first.
pub async fn connect_waiting(
    config: &Config,
    bound: Option<Duration>,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<ClusterStore<EtcdKv>>, StoreError> {
    let pause = config.agent.loop_wait.min(Duration::from_secs(1));
    let started = Instant::now();
    let mut named: Option<Instant> = None;
    loop {
        if *stop.borrow() {
            return Ok(None);
        }
        let e = tokio::select! {
            r = connect(config) => match r {
                Ok(store) => {
                    if named.is_some() {
                        tracing::info!("the store answers");
                    }
                    return Ok(Some(store));
                }
                Err(e @ StoreError::Unreachable { .. }) => e,
                Err(e) => return Err(e),
            },
            _ = stop.wait_for(|s| *s) => return Ok(None),
        };
        if bound.is_some_and(|b| started.elapsed() >= b) {
            let StoreError::Unreachable { endpoints, source } = e else {
                return Err(e);
            };
            return Err(StoreError::StillUnreachable {
                endpoints,
                waited: started.elapsed(),
                source,
            });
        }
        if named.map_or(true, |at| at.elapsed() >= WAITING_LOG_EVERY) {
            tracing::warn!(error = %e, "waiting for the store");
            named = Some(Instant::now());
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => return Ok(None),
        }
    }
}

fn options(dcs: &DcsConfig) -> Result<EtcdOptions, StoreError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|source| StoreError::File {
            path: p.display().to_string(),
            source,
        })
    };
    let ca_pem = dcs.ca_file.as_deref().map(read).transpose()?;
    let identity_pem = match (&dcs.cert_file, &dcs.key_file) {
        (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
        _ => None,
    };
    Ok(EtcdOptions {
        endpoints: dcs.endpoints.clone(),
        user: dcs
            .username
            .clone()
            .zip(dcs.password.as_ref().map(|p| p.expose().to_string())),
        ca_pem,
        identity_pem,
        timeout: dcs.timeout,
    })
}

/// A store for agents that all live in this process (the demo).
pub fn in_process<K: Kv + Clone>(kv: &K, config: &Config) -> ClusterStore<K> {
    let namespace = config.dcs.as_ref().map_or("pgwarden", |d| &d.namespace);
    ClusterStore::new(kv.clone(), namespace, &config.cluster)
}
