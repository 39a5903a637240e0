//! The proxy: a PostgreSQL wire-protocol pooler and router in front of a cluster.
//!
//! Clients authenticate against the proxy (`[[proxy.users]]`), then share pooled server
//! connections per (node, database, user) in transaction or session mode. Where each
//! transaction goes is decided by one pure [`router`] from the [`ClusterView`] snapshots of a
//! view source passed in to [`Proxy::bind`] (the monitor, or the HA store); the proxy never
//! polls nodes itself. The view's epoch fences writes: a server connection to a node that no
//! longer leads under the current epoch is cut at once. Each client gets its own cancel key, and
//! cancels reach only the server running that client's query. Admin users reach a console on
//! the database `pgwarden`.
//!
//! # Layout
//! - [`framed`] — sockets with read/write buffers, speaking whole frames.
//! - `session` — one client: startup, authentication, relaying, statement rewriting, session
//!   state, what each batch needs from routing
//!   (`session/{startup,auth,params,checkout,route,forward,pipeline,state}.rs`).
//! - [`admin`] — the admin console (`SHOW ...`, `PAUSE`, `RESUME`, `KILL`, `RELOAD`, `SHUTDOWN`).
//! - [`server`] — server connections and their login (SCRAM, md5, cleartext; SCRAM pass-through).
//! - [`router`] — the pure decision of which node serves a transaction, and whether a held
//!   connection may go on serving.
//! - [`pools`] — pools by (database, user) and then node, with what a group shares; pause and
//!   kill by database.
//! - [`pool`] — one node's pool: FIFO waits with a bound, reuse checks, recycling, pause, live
//!   resizing.
//! - [`prepared`] — named statements shared across server connections (cache, per-server LRU).
//! - [`registry`] — connected clients and server connections, and the signals that end sessions.
//! - [`tls`] — TLS for clients (rustls), and the client stream that is plain or encrypted.
//! - [`cancel`] — the cancel map.
//! - [`nodes`] — what the proxy knows of each node beyond the view: bans, read rotation by lag,
//!   replayed positions, counters.
//! - [`topology`] — the proxy's reading of the view source: routing snapshot, freshness, the
//!   generation sessions watch.
//! - [`error`] — [`ProxyError`] and what clients are told.

pub mod admin;
pub mod cancel;
pub mod error;
pub mod framed;
pub mod functions;
pub mod nodes;
pub mod pool;
pub mod pools;
pub mod prepared;
pub mod registry;
pub mod router;
pub mod server;
mod session;
pub mod tls;
pub mod topology;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

pub use pgwarden_cluster::view::ClusterView;
use pgwarden_config::{Config, ConfigError};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

pub use error::ProxyError;
use pool::{Pool, PoolSettings};
use pools::{Group, Pools};
use registry::{Kill, KillReason};
use server::Credential;
use topology::Topology;

/// The database name that reaches the admin console.
pub const ADMIN_DATABASE: &str = "pgwarden";

/// Admin console sessions kept beyond `max_client_conn`, and connections that may still log
/// into the console while every login slot is busy: the console stays reachable under a flood.
pub const ADMIN_RESERVE: usize = 5;

/// State every session shares.
pub struct Shared {
    config: RwLock<Arc<Config>>,
    pub topology: Topology,
    pub pools: Pools,
    /// Health, read rotation and replay positions per node.
    pub nodes: nodes::Nodes,
    pub cancels: cancel::CancelMap,
    /// Logged-in clients (`max_client_conn`).
    client_slots: Arc<Semaphore>,
    /// Connections in startup or authentication (`max_pending_logins`).
    login_slots: Arc<Semaphore>,
    /// Admin console sessions beyond `max_client_conn`.
    admin_slots: Arc<Semaphore>,
    /// Connections taken while every login slot is busy: they may only log into the console.
    overflow_slots: Arc<Semaphore>,
    verifiers: session::VerifierCache,
    auth_cache: session::AuthQueryCache,
    pub clients: registry::Clients,
    /// Raised by `SHUTDOWN`.
    pub shutdown: Kill,
    /// For clients' SSLRequests (`proxy.client_tls`; changing it needs a restart).
    tls: Option<tokio_rustls::TlsAcceptor>,
    started: Instant,
}

/// A user's pool settings: the defaults with its own `pool_size`.
fn pool_settings(config: &Config, user: &str) -> PoolSettings {
    let p = &config.proxy;
    let size = config
        .users
        .iter()
        .find(|u| u.name == user)
        .and_then(|u| u.pool_size);
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

    /// The group of pools for (database, user), made on first use; the credential of the
    /// latest login is what new server connections use.
    fn group(
        &self,
        database: &str,
        user: &str,
        credential: Credential,
        config: &Config,
    ) -> Arc<Group> {
        self.pools
            .group(database, user, credential, pool_settings(config, user))
    }

    /// Every node's pool, in (node, database, user) order.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.pools.all()
    }

    /// `KILL db`: holds new checkouts for `db` until `RESUME`, ends its clients at once and
    /// closes its server connections. Returns how many clients were ended.
    pub fn kill(&self, db: &str) -> usize {
        self.pools.kill(db);
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
        let mut new = Config::load(&path)?;
        let needs_restart = keep_restart_only(&mut new, &current);
        let new = Arc::new(new);
        for group in self.pools.groups() {
            group.update(pool_settings(&new, &group.key().user));
        }
        let mut needs_restart = needs_restart;
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

/// Settings a reload cannot apply keep their running values in the new config (so `SHOW
/// CONFIG` shows what runs); their names are returned.
fn keep_restart_only(new: &mut Config, current: &Config) -> Vec<String> {
    let mut kept = Vec::new();
    macro_rules! keep {
        ($($field:ident).+, $name:expr) => {
            if new.$($field).+ != current.$($field).+ {
                new.$($field).+ = current.$($field).+.clone();
                kept.push($name.to_string());
            }
        };
    }
    keep!(proxy.listen, "proxy.listen");
    keep!(proxy.workers, "proxy.workers");
    keep!(proxy.pool_mode, "proxy.pool_mode");
    keep!(proxy.client_tls, "proxy.client_tls");
    keep!(
        proxy.max_prepared_statements,
        "proxy.max_prepared_statements"
    );
    keep!(proxy.max_view_age, "proxy.max_view_age");
    keep!(proxy.max_pending_logins, "proxy.max_pending_logins");
    // A node's read weight applies at once; the rest of [[nodes]] is the view source's.
    let weights_only = new.nodes.len() == current.nodes.len()
        && new.nodes.iter().zip(&current.nodes).all(|(n, c)| {
            pgwarden_config::NodeConfig {
                weight: c.weight,
                ..n.clone()
            } == *c
        });
    if !weights_only {
        keep!(nodes, "nodes (the view source keeps its nodes)");
    }
    keep!(monitor, "monitor (the view source keeps its settings)");
    kept
}

/// Runtime threads for `workers = 0` on a machine with `cores`: one per core on a host of its
/// own, a quarter of them (at least one) on a host that also runs the cluster's PostgreSQL,
/// which needs the rest. Measured on 2 cores next to PostgreSQL: one thread is at parity with
/// PgBouncer, two lose 10-16% of its tps and use up to 15% more CPU per transaction.
pub fn auto_workers(cores: usize, runs_postgres: bool) -> usize {
    if runs_postgres {
        (cores / 4).max(1)
    } else {
        cores.max(1)
    }
}

/// The runtime threads `config` asks for (`proxy.workers`, or [`auto_workers`] for 0); the host
/// runs PostgreSQL when a node has a `data_dir`.
pub fn worker_threads(config: &Config) -> usize {
    match config.proxy.workers {
        0 => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            auto_workers(cores, config.nodes.iter().any(|n| n.data_dir.is_some()))
        }
        n => n,
    }
}

/// A runtime with `threads` workers; one is a single-threaded scheduler, without the
/// work-stealing machinery.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match threads {
        0 | 1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    builder.enable_all().build()
}

/// A bound, not yet serving proxy.
pub struct Proxy {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Binds `proxy.listen`; routes by the views `view` brings (the monitor's, see
    /// [`pgwarden_cluster::monitor::spawn`], or another source's).
    pub async fn bind(
        config: Arc<Config>,
        view: watch::Receiver<Arc<ClusterView>>,
    ) -> std::io::Result<Proxy> {
        let tls = tls::acceptor(&config.proxy.client_tls)?;
        let listener = TcpListener::bind(config.proxy.listen).await?;
        let shared = Arc::new(Shared {
            client_slots: Arc::new(Semaphore::new(config.proxy.max_client_conn as usize)),
            login_slots: Arc::new(Semaphore::new(config.proxy.max_pending_logins as usize)),
            admin_slots: Arc::new(Semaphore::new(ADMIN_RESERVE)),
            overflow_slots: Arc::new(Semaphore::new(ADMIN_RESERVE)),
            topology: Topology::new(view, config.proxy.max_view_age),
            config: RwLock::new(config),
            pools: Pools::default(),
            nodes: nodes::Nodes::default(),
            cancels: cancel::CancelMap::default(),
            verifiers: Default::default(),
            auth_cache: Default::default(),
            clients: Default::default(),
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

/// A new connection takes a login slot until it is logged in; with none free, one of a few
/// overflow slots that lead only to the admin console; with none of those either, it is closed.
fn accept(socket: tokio::net::TcpStream, peer: SocketAddr, shared: &Arc<Shared>) {
    let pending = match shared.login_slots.clone().try_acquire_owned() {
        Ok(slot) => session::Pending {
            slot,
            admin_only: false,
        },
        Err(_) => match shared.overflow_slots.clone().try_acquire_owned() {
            Ok(slot) => session::Pending {
                slot,
                admin_only: true,
            },
            Err(_) => {
                tracing::debug!(client_addr = %peer, "every login slot is busy: connection closed");
                return;
            }
        },
    };
    tokio::spawn(session::run(socket, peer, shared.clone(), pending));
}

/// SIGHUP re-reads the config (as `RELOAD`); an invalid one is logged with its errors and the
/// running one stays. While this runs, SIGHUP no longer ends the process.
pub async fn reload_on_sighup(shared: Arc<Shared>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; use RELOAD on the admin console");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the config");
        match shared.reload() {
            Ok(restart) => {
                for s in restart {
                    tracing::warn!(setting = %s, "changed setting needs a restart to take effect");
                }
            }
            Err(e) => {
                tracing::error!(errors = %e.lines().join("; "), "config reload rejected; the running config stays");
            }
        }
    }
}

/// Once a second, and at once when the view changes: close idle connections that are old or
/// fenced out, warm the leader's pools up to `min_pool_size`, sample stats, and read the
/// leader's WAL position on an idle connection (a bound that lets `session` reads move between
/// replicas even when no session writes; see `session::route`).
async fn maintain(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    let mut seen = shared.topology.generation();
    loop {
        let ticked = tokio::select! {
            _ = tick.tick() => true,
            g = shared.topology.watch(seen) => {
                seen = g;
                false
            }
        };
        n += u64::from(ticked);
        let routing = shared.topology.routing();
        let mut sampled = false;
        for pool in shared.pools() {
            let leads = router::still_leads(&routing, &pool.key.node, routing.view.epoch);
            let serves = leads || router::serves_reads(&routing, &pool.key.node);
            pool.maintain(serves.then_some(routing.view.epoch), leads);
            if ticked && n % admin::STATS_PERIOD_SECS == 0 {
                pool.sample_stats();
            }
            if ticked && leads && !sampled {
                if let Some(lease) = pool.checkout_now(routing.view.epoch) {
                    sampled = true;
                    tokio::spawn(sample_leader_position(shared.clone(), lease));
                }
            }
        }
    }
}

/// Reads the leader's WAL position on an idle connection of its pool and records it.
async fn sample_leader_position(shared: Arc<Shared>, mut lease: pool::Lease) {
    let at = Instant::now();
    let lsn = server::query_lsn(&mut lease.conn, server::INSERT_LSN, Duration::from_secs(2)).await;
    if let Ok(Some(lsn)) = lsn {
        shared
            .nodes
            .get(&lease.pool.key.node)
            .probed(lsn, at, false);
    }
    if lease.conn.broken {
        lease.discard(&pool::Usage::default());
    } else {
        lease.release(false, &pool::Usage::default());
    }
}

#[cfg(test)]
mod tests {
    use super::auto_workers;

    #[test]
    fn automatic_worker_threads() {
        // (cores, runs PostgreSQL too, threads)
        for (cores, pg, want) in [
            (1, true, 1),
            (2, true, 1),
            (4, true, 1),
            (8, true, 2),
            (16, true, 4),
            (1, false, 1),
            (2, false, 2),
            (16, false, 16),
        ] {
            assert_eq!(
                auto_workers(cores, pg),
                want,
                "{cores} cores, postgres {pg}"
            );
        }
    }
}
