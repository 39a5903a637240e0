//! The proxy: a PostgreSQL wire-protocol pooler in front of the cluster's primary.
//!
//! Clients authenticate against the proxy (`[[proxy.users]]`), then share pooled server
//! connections per (database, user) in transaction or session mode. Where writes go comes from
//! the monitor's [`pgwarden_cluster::monitor::ClusterView`] snapshots; the proxy never polls nodes
//! itself. Each client gets its own cancel key, and cancels reach only the server running that
//! client's query. Admin users reach a console on the database `pgwarden`.
//!
//! # Layout
//! - [`framed`] — sockets with read/write buffers, speaking whole frames.
//! - `session` — one client: startup, authentication, relaying, statement rewriting, session
//!   state (`session/{startup,auth,params,forward,pipeline,state}.rs`).
//! - [`admin`] — the admin console (`SHOW ...`, `PAUSE`, `RESUME`, `KILL`, `RELOAD`, `SHUTDOWN`).
//! - [`server`] — server connections and their login (SCRAM, md5, cleartext; SCRAM pass-through).
//! - [`pool`] — per-(database, user) pools: FIFO waits with a bound, reuse checks, recycling,
//!   pause, live resizing.
//! - [`prepared`] — named statements shared across server connections (cache, per-server LRU).
//! - [`registry`] — connected clients and server connections, and the signals that end sessions.
//! - [`tls`] — TLS for clients (rustls), and the client stream that is plain or encrypted.
//! - [`cancel`] — the cancel map.
//! - [`topology`] — the current primary and epoch, from the monitor.
//! - [`error`] — [`ProxyError`] and what clients are told.

pub mod admin;
pub mod cancel;
pub mod error;
pub mod framed;
pub mod pool;
pub mod prepared;
pub mod registry;
pub mod server;
mod session;
pub mod tls;
pub mod topology;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use pgwarden_config::{Config, ConfigError};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use error::ProxyError;
use pool::{Pool, PoolKey, PoolSettings};
use registry::{Kill, KillReason};
use server::{Credential, Login};
use topology::Topology;

/// The database name that reaches the admin console.
pub const ADMIN_DATABASE: &str = "pgwarden";

/// State every session shares.
pub struct Shared {
    config: RwLock<Arc<Config>>,
    pub topology: Topology,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    pub cancels: cancel::CancelMap,
    client_slots: Arc<Semaphore>,
    verifiers: session::VerifierCache,
    auth_cache: session::AuthQueryCache,
    pub clients: registry::Clients,
    server_ids: Arc<AtomicU64>,
    /// Databases paused by `PAUSE db` / `KILL db` (pools made later start paused too); `None`
    /// in the set's place means everything (`PAUSE`).
    paused: Mutex<Paused>,
    /// Raised by `SHUTDOWN`.
    pub shutdown: Kill,
    /// For clients' SSLRequests (`proxy.client_tls`; changing it needs a restart).
    tls: Option<tokio_rustls::TlsAcceptor>,
    started: Instant,
}

#[derive(Default)]
struct Paused {
    all: bool,
    databases: HashSet<String>,
}

impl Paused {
    fn covers(&self, db: &str) -> bool {
        self.all || self.databases.contains(db)
    }
}

fn pool_settings(config: &Config, size: Option<u32>) -> PoolSettings {
    let p = &config.proxy;
    PoolSettings {
        size: size.unwrap_or(p.default_pool_size),
        min_size: p.min_pool_size,
        connect_timeout: p.server_connect_timeout,
        wait_timeout: p.query_wait_timeout,
        idle_timeout: p.server_idle_timeout,
        lifetime: p.server_lifetime,
    }
}

impl Shared {
    pub fn config(&self) -> Arc<Config> {
        self.config.read().expect("config lock").clone()
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The pool for (database, user), made on first use; the credential of the latest login is
    /// what new server connections use.
    fn pool(
        &self,
        database: &str,
        user: &str,
        credential: Credential,
        config: &Config,
    ) -> Arc<Pool> {
        let key = PoolKey {
            database: database.to_string(),
            user: user.to_string(),
        };
        let mut pools = self.pools.lock().expect("pools lock");
        if let Some(p) = pools.get(&key) {
            p.set_credential(credential);
            return p.clone();
        }
        let size = config
            .users
            .iter()
            .find(|u| u.name == user)
            .and_then(|u| u.pool_size);
        let paused = self.paused.lock().expect("paused lock").covers(database);
        let pool = Pool::new(
            key.clone(),
            Login {
                user: user.to_string(),
                database: database.to_string(),
                application_name: "pgwarden".to_string(),
                credential,
            },
            pool_settings(config, size),
            self.server_ids.clone(),
            paused,
        );
        pools.insert(key, pool.clone());
        pool
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

    fn pools_of(&self, db: Option<&str>) -> Vec<Arc<Pool>> {
        self.pools()
            .into_iter()
            .filter(|p| db.is_none_or_eq(&p.key.database))
            .collect()
    }

    /// Holds new checkouts for `db` (or every database), then waits until no server of theirs is
    /// in use. Returns false if `db` has no pool and is not known.
    pub async fn pause(&self, db: Option<&str>) {
        {
            let mut p = self.paused.lock().expect("paused lock");
            match db {
                None => p.all = true,
                Some(d) => {
                    p.databases.insert(d.to_string());
                }
            }
        }
        let pools = self.pools_of(db);
        for p in &pools {
            p.set_paused(true);
        }
        while pools.iter().any(|p| p.active_count() > 0) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn resume(&self, db: Option<&str>) {
        {
            let mut p = self.paused.lock().expect("paused lock");
            match db {
                None => {
                    p.all = false;
                    p.databases.clear();
                }
                Some(d) => {
                    p.databases.remove(d);
                }
            }
        }
        let paused = self.paused.lock().expect("paused lock");
        for pool in self.pools() {
            pool.set_paused(paused.covers(&pool.key.database));
        }
    }

    pub fn is_paused(&self, db: &str) -> bool {
        self.paused.lock().expect("paused lock").covers(db)
    }

    /// `KILL db`: holds new checkouts for `db` until `RESUME`, ends its clients at once and
    /// closes its server connections. Returns how many clients were ended.
    pub fn kill(&self, db: &str) -> usize {
        self.paused
            .lock()
            .expect("paused lock")
            .databases
            .insert(db.to_string());
        let pools = self.pools_of(Some(db));
        for p in &pools {
            p.set_paused(true);
            for s in p.servers.all() {
                s.close_needed.store(true, Ordering::Relaxed);
            }
            p.close_idle();
        }
        self.clients.kill(KillReason::Admin, |c| c.database == db)
    }

    /// Re-reads the config file and applies it without dropping clients. An invalid config is
    /// rejected with its errors and the running one stays. Settings that need a restart are
    /// listed in the result.
    pub fn reload(&self) -> Result<Vec<String>, ConfigError> {
        let current = self.config();
        let Some(path) = current.source.clone() else {
            return Err(ConfigError::Invalid(vec![
                pgwarden_config::error::FieldError {
                    path: String::new(),
                    message: "the running config was not read from a file".into(),
                },
            ]));
        };
        let new = Arc::new(Config::load(&path)?);
        let mut needs_restart = Vec::new();
        if new.proxy.listen != current.proxy.listen {
            needs_restart.push("proxy.listen".to_string());
        }
        if new.proxy.workers != current.proxy.workers {
            needs_restart.push("proxy.workers".to_string());
        }
        if new.proxy.client_tls != current.proxy.client_tls {
            needs_restart.push("proxy.client_tls".to_string());
        }
        if new.nodes != current.nodes || new.monitor != current.monitor {
            needs_restart
                .push("nodes and monitor (the cluster monitor keeps its settings)".to_string());
        }
        for pool in self.pools() {
            let size = new
                .users
                .iter()
                .find(|u| u.name == pool.key.user)
                .and_then(|u| u.pool_size);
            pool.update(pool_settings(&new, size));
        }
        let old_max = current.proxy.max_client_conn;
        let new_max = new.proxy.max_client_conn;
        if new_max > old_max {
            self.client_slots.add_permits((new_max - old_max) as usize);
        } else if new_max < old_max {
            // Slots in use stay in use; only free ones are retired now.
            let forgotten = self
                .client_slots
                .forget_permits((old_max - new_max) as usize);
            if (forgotten as u32) < old_max - new_max {
                needs_restart.push(
                    "proxy.max_client_conn (lowered below the clients connected now)".to_string(),
                );
            }
        }
        *self.config.write().expect("config lock") = new;
        tracing::info!(config = %path.display(), "config reloaded");
        Ok(needs_restart)
    }
}

trait NoneOrEq {
    fn is_none_or_eq(&self, v: &str) -> bool;
}

impl NoneOrEq for Option<&str> {
    fn is_none_or_eq(&self, v: &str) -> bool {
        self.map_or(true, |x| x == v)
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
        let tls = tls::acceptor(&config.proxy.client_tls)?;
        let rx = pgwarden_cluster::monitor::spawn(config.clone()).await;
        let listener = TcpListener::bind(config.proxy.listen).await?;
        let shared = Arc::new(Shared {
            client_slots: Arc::new(Semaphore::new(config.proxy.max_client_conn as usize)),
            config: RwLock::new(config),
            topology: Topology::new(rx),
            pools: Mutex::new(HashMap::new()),
            cancels: cancel::CancelMap::default(),
            verifiers: Default::default(),
            auth_cache: Default::default(),
            clients: Default::default(),
            server_ids: Arc::new(AtomicU64::new(0)),
            paused: Mutex::new(Paused::default()),
            shutdown: Kill::default(),
            tls,
            started: Instant::now(),
        });
        Ok(Proxy { listener, shared })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Accepts clients until `shutdown` completes (or `SHUTDOWN`), then shuts down in order:
    /// stop accepting; end idle clients; let running transactions finish for up to
    /// `proxy.shutdown_timeout`; end whatever is left; close server connections.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) {
        let shared = self.shared;
        let maintenance = tokio::spawn(maintain(shared.clone()));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = shared.shutdown.raised(KillReason::Shutdown) => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((socket, peer)) => accept(socket, peer, &shared),
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(self.listener);
        let grace = shared.config().proxy.shutdown_timeout;
        let n = shared.clients.kill(KillReason::Shutdown, |_| true);
        tracing::info!(clients = n, grace = ?grace, "shutting down: no new clients; running transactions may finish");
        let started = Instant::now();
        while !shared.clients.is_empty() && started.elapsed() < grace {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !shared.clients.is_empty() {
            let n = shared.clients.kill(KillReason::Admin, |_| true);
            tracing::warn!(
                clients = n,
                "shutdown grace period over: ending the remaining sessions"
            );
            let deadline = Instant::now() + Duration::from_secs(2);
            while !shared.clients.is_empty() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        maintenance.abort();
        for pool in shared.pools() {
            pool.close_idle();
        }
        // Give the Terminate messages a moment to go out.
        tokio::time::sleep(Duration::from_millis(20)).await;
        tracing::info!(took = ?started.elapsed(), "proxy stopped");
    }
}

fn accept(socket: tokio::net::TcpStream, peer: SocketAddr, shared: &Arc<Shared>) {
    let shared = shared.clone();
    match shared.client_slots.clone().try_acquire_owned() {
        Ok(permit) => {
            tokio::spawn(async move {
                session::run(socket, peer, shared).await;
                drop(permit);
            });
        }
        Err(_) => {
            let max = shared.config().proxy.max_client_conn;
            tokio::spawn(async move {
                let mut client =
                    framed::Framed::new(tls::ClientStream::Plain(socket), framed::Side::Client);
                // Read the startup packet first so the client is ready to read our answer.
                let _ = tokio::time::timeout(Duration::from_secs(5), client.read_startup()).await;
                session::report_fatal(&mut client, &ProxyError::TooManyClients(max)).await;
            });
        }
    }
}

/// Once a second: recycle idle connections, warm pools up to `min_pool_size`, sample stats.
async fn maintain(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        n += 1;
        for pool in shared.pools() {
            pool.maintain(&shared.topology);
            if n % admin::STATS_PERIOD_SECS == 0 {
                pool.sample_stats();
            }
        }
    }
}
