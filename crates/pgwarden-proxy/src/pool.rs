//! Server connection pools, one per (database, user).
//!
//! A pool's size is a semaphore: a client waits for a permit in FIFO order (tokio's semaphore is
//! fair) for at most `query_wait_timeout`, then takes an idle connection or opens one. Idle
//! connections are checked before reuse: cluster epoch, idle time, lifetime, and a non-blocking
//! peek for EOF or unsolicited data.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::error::ProxyError;
use crate::server::{self, Login, ServerConn};
use crate::topology::Topology;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    pub database: String,
    pub user: String,
}

#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub size: u32,
    pub connect_timeout: Duration,
    pub wait_timeout: Duration,
    pub idle_timeout: Duration,
    pub lifetime: Duration,
}

/// Counters for `SHOW STATS` / `SHOW POOLS`.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub checkouts: AtomicU64,
    pub connects: AtomicU64,
    pub wait_micros: AtomicU64,
    pub wait_timeouts: AtomicU64,
}

pub struct Pool {
    pub key: PoolKey,
    login: Login,
    settings: PoolSettings,
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<ServerConn>>,
    /// ParameterStatus values of the first server connection, shown to clients at login.
    params: Mutex<Option<BTreeMap<String, String>>>,
    pub stats: PoolStats,
    /// Named statements by text, shared by every server connection of the pool.
    pub statements: crate::prepared::StatementCache,
    /// Startup parameters tried on a server, and what it said.
    pub(crate) startup_checks: crate::session::StartupChecks,
}

/// A server connection checked out of a pool, with its permit.
pub struct Lease {
    pub conn: ServerConn,
    _permit: OwnedSemaphorePermit,
}

impl Pool {
    pub fn new(key: PoolKey, login: Login, settings: PoolSettings) -> Arc<Pool> {
        Arc::new(Pool {
            key,
            login,
            permits: Arc::new(Semaphore::new(settings.size as usize)),
            settings,
            idle: Mutex::new(Vec::new()),
            params: Mutex::new(None),
            stats: PoolStats::default(),
            statements: Default::default(),
            startup_checks: Default::default(),
        })
    }

    pub fn size(&self) -> u32 {
        self.settings.size
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().expect("pool lock").len()
    }

    pub fn available_permits(&self) -> usize {
        self.permits.available_permits()
    }

    pub fn params(&self) -> Option<BTreeMap<String, String>> {
        self.params.lock().expect("pool lock").clone()
    }

    /// Waits (FIFO, bounded) for a permit, then reuses or opens a server connection.
    pub async fn acquire(&self, topology: &Topology) -> Result<Lease, ProxyError> {
        // The semaphore is fair, so a free permit means nobody is queued: take it without
        // arming a timer.
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::Closed) => return Err(ProxyError::ShuttingDown),
            Err(TryAcquireError::NoPermits) => self.wait_for_permit().await?,
        };
        self.stats.checkouts.fetch_add(1, Ordering::Relaxed);
        let epoch = topology.epoch();
        while let Some(mut conn) = self.pop_idle() {
            if conn.epoch == epoch
                && conn.last_used.elapsed() < self.settings.idle_timeout
                && conn.is_reusable(self.settings.lifetime)
            {
                return Ok(Lease {
                    conn,
                    _permit: permit,
                });
            }
            tokio::spawn(server::close(conn));
        }
        let (target, epoch) = topology.wait_primary(self.settings.connect_timeout).await?;
        let conn =
            server::connect(&target, &self.login, epoch, self.settings.connect_timeout).await?;
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        self.params
            .lock()
            .expect("pool lock")
            .get_or_insert_with(|| conn.params.clone());
        Ok(Lease {
            conn,
            _permit: permit,
        })
    }

    async fn wait_for_permit(&self) -> Result<OwnedSemaphorePermit, ProxyError> {
        let started = Instant::now();
        let permit = tokio::time::timeout(
            self.settings.wait_timeout,
            self.permits.clone().acquire_owned(),
        )
        .await
        .map_err(|_| {
            self.stats.wait_timeouts.fetch_add(1, Ordering::Relaxed);
            ProxyError::WaitTimeout(self.settings.wait_timeout)
        })?
        .map_err(|_| ProxyError::ShuttingDown)?;
        self.stats
            .wait_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(permit)
    }

    fn pop_idle(&self) -> Option<ServerConn> {
        self.idle.lock().expect("pool lock").pop()
    }

    /// Returns a connection; one that is not reusable (or from an old epoch) is closed.
    pub fn release(&self, lease: Lease, current_epoch: u64) {
        let Lease { mut conn, _permit } = lease;
        conn.last_used = Instant::now();
        if conn.epoch == current_epoch && conn.is_reusable(self.settings.lifetime) {
            self.idle.lock().expect("pool lock").push(conn);
        } else {
            tokio::spawn(server::close(conn));
        }
    }

    /// Drops a connection whose state is unknown.
    pub fn discard(&self, lease: Lease) {
        tokio::spawn(server::close(lease.conn));
    }

    /// Closes idle connections past `server_idle_timeout` or their lifetime.
    pub fn reap_idle(&self) {
        let mut idle = self.idle.lock().expect("pool lock");
        let (keep, old): (Vec<_>, Vec<_>) = idle.drain(..).partition(|c| {
            c.last_used.elapsed() < self.settings.idle_timeout
                && c.created.elapsed() < self.settings.lifetime
        });
        *idle = keep;
        drop(idle);
        for c in old {
            tokio::spawn(server::close(c));
        }
    }
}
