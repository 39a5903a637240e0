//! The proxy: a PostgreSQL wire-protocol pooler in front of the cluster's primary.
//!
//! Clients authenticate against the proxy (`[[proxy.users]]`), then share pooled server
//! connections per (database, user) in transaction or session mode. Where writes go comes from
//! the monitor's [`pgwarden_cluster::monitor::ClusterView`] snapshots; the proxy never polls nodes
//! itself. Each client gets its own cancel key, and cancels reach only the server running that
//! client's query.
//!
//! # Layout
//! - [`framed`] — sockets with read/write buffers, speaking whole frames.
//! - `session` — one client: startup, authentication, relaying (`session/{startup,auth,forward}.rs`).
//! - [`server`] — server connections and their login (SCRAM, md5, cleartext; SCRAM pass-through).
//! - [`pool`] — per-(database, user) pools: FIFO waits with a bound, reuse checks, recycling.
//! - [`prepared`] — named statements shared across server connections (cache, per-server LRU).
//! - [`cancel`] — the cancel map.
//! - [`topology`] — the current primary and epoch, from the monitor.
//! - [`error`] — [`ProxyError`] and what clients are told.

pub mod cancel;
pub mod error;
pub mod framed;
pub mod pool;
pub mod prepared;
pub mod server;
mod session;
pub mod topology;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use pgwarden_config::Config;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use error::ProxyError;
use pool::{Pool, PoolKey, PoolSettings};
use server::{Credential, Login};
use topology::Topology;

/// State every session shares.
pub struct Shared {
    config: RwLock<Arc<Config>>,
    pub topology: Topology,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    pub cancels: cancel::CancelMap,
    clients: Arc<Semaphore>,
    verifiers: session::VerifierCache,
}

impl Shared {
    pub fn config(&self) -> Arc<Config> {
        self.config.read().expect("config lock").clone()
    }

    /// The pool for (database, user), made on first use with the credential the first client
    /// authenticated with.
    fn pool(
        &self,
        database: &str,
        user: &str,
        size: Option<u32>,
        credential: Credential,
        config: &Config,
    ) -> Arc<Pool> {
        let key = PoolKey {
            database: database.to_string(),
            user: user.to_string(),
        };
        let mut pools = self.pools.lock().expect("pools lock");
        pools
            .entry(key.clone())
            .or_insert_with(|| {
                let p = &config.proxy;
                Pool::new(
                    key,
                    Login {
                        user: user.to_string(),
                        database: database.to_string(),
                        application_name: "pgwarden".to_string(),
                        credential,
                    },
                    PoolSettings {
                        size: size.unwrap_or(p.default_pool_size),
                        connect_timeout: p.server_connect_timeout,
                        wait_timeout: p.query_wait_timeout,
                        idle_timeout: p.server_idle_timeout,
                        lifetime: p.server_lifetime,
                    },
                )
            })
            .clone()
    }

    pub fn pools(&self) -> Vec<Arc<Pool>> {
        let mut v: Vec<_> = self
            .pools
            .lock()
            .expect("pools lock")
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }
}

/// A bound, not yet serving proxy.
pub struct Proxy {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Starts the cluster monitor and binds `proxy.listen`.
    pub async fn bind(config: Arc<Config>) -> std::io::Result<Proxy> {
        let rx = pgwarden_cluster::monitor::spawn(config.clone()).await;
        let listener = TcpListener::bind(config.proxy.listen).await?;
        let shared = Arc::new(Shared {
            clients: Arc::new(Semaphore::new(config.proxy.max_client_conn as usize)),
            config: RwLock::new(config),
            topology: Topology::new(rx),
            pools: Mutex::new(HashMap::new()),
            cancels: cancel::CancelMap::default(),
            verifiers: Default::default(),
        });
        Ok(Proxy { listener, shared })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Accepts clients until `shutdown` completes.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) {
        let shared = self.shared;
        let reaper = tokio::spawn(reap_idle(shared.clone()));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((socket, peer)) => accept(socket, peer, &shared),
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        reaper.abort();
    }
}

fn accept(socket: tokio::net::TcpStream, peer: SocketAddr, shared: &Arc<Shared>) {
    let shared = shared.clone();
    match shared.clients.clone().try_acquire_owned() {
        Ok(permit) => {
            tokio::spawn(async move {
                session::run(socket, peer, shared).await;
                drop(permit);
            });
        }
        Err(_) => {
            let max = shared.config().proxy.max_client_conn;
            tokio::spawn(async move {
                let mut client = framed::Framed::new(socket, framed::Side::Client);
                // Read the startup packet first so the client is ready to read our answer.
                let _ = tokio::time::timeout(Duration::from_secs(5), client.read_startup()).await;
                session::report_fatal(&mut client, &ProxyError::TooManyClients(max)).await;
            });
        }
    }
}

async fn reap_idle(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        for pool in shared.pools() {
            pool.reap_idle();
        }
    }
}
