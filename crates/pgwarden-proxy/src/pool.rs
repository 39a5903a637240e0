//! Server connection pools, one per (node, database, user); the caller names the node (see
//! `pools` and `router`) and the epoch its connections are fenced by.
//!
//! A pool's size is a semaphore: a client waits for a permit in FIFO order (tokio's semaphore is
//! fair) for at most `query_wait_timeout`, then takes an idle connection or opens one. Idle
//! connections are checked before reuse: the epoch asked for, idle time, lifetime, and after a spell
//! of idleness a non-blocking peek for EOF or unsolicited data. Settings are live: a reload
//! resizes the pool and changes its timeouts in place. A paused pool holds new checkouts.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgwarden_core::{Epoch, NodeId};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::error::ProxyError;
use crate::pools::Common;
use crate::registry::Servers;
use crate::server::{self, ServerConn, Target};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    pub node: NodeId,
    pub database: String,
    pub user: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolSettings {
    pub size: u32,
    pub min_size: u32,
    pub connect_timeout: Duration,
    pub wait_timeout: Duration,
    pub idle_timeout: Duration,
    pub lifetime: Duration,
}

/// Counters for `SHOW STATS` / `SHOW POOLS`; all totals since the pool was made.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub checkouts: AtomicU64,
    pub connects: AtomicU64,
    pub wait_micros: AtomicU64,
    pub wait_timeouts: AtomicU64,
    pub transactions: AtomicU64,
    pub queries: AtomicU64,
    /// Client to server.
    pub bytes_received: AtomicU64,
    /// Server to client.
    pub bytes_sent: AtomicU64,
    pub xact_micros: AtomicU64,
    pub query_micros: AtomicU64,
}

/// What one checkout did, added to the pool's stats when the server goes back.
#[derive(Debug, Default, Clone, Copy)]
pub struct Usage {
    pub transactions: u64,
    pub queries: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub xact_micros: u64,
    pub query_micros: u64,
}

/// The pool's totals at one moment, for averages over the last stats period.
#[derive(Debug, Clone, Copy)]
pub struct StatsSample {
    pub at: Instant,
    pub checkouts: u64,
    pub transactions: u64,
    pub queries: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub xact_micros: u64,
    pub query_micros: u64,
    pub wait_micros: u64,
}

impl PoolStats {
    pub fn sample(&self) -> StatsSample {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSample {
            at: Instant::now(),
            checkouts: l(&self.checkouts),
            transactions: l(&self.transactions),
            queries: l(&self.queries),
            bytes_received: l(&self.bytes_received),
            bytes_sent: l(&self.bytes_sent),
            xact_micros: l(&self.xact_micros),
            query_micros: l(&self.query_micros),
            wait_micros: l(&self.wait_micros),
        }
    }
}

/// The settings, readable on every checkout without a lock: one atomic per field (a reader
/// racing a reload may see some fields old and some new; each is valid either way). Writers
/// are serialised by `Pool::resize`.
struct LiveSettings {
    size: AtomicU32,
    min_size: AtomicU32,
    /// Nanoseconds.
    connect_timeout: AtomicU64,
    wait_timeout: AtomicU64,
    idle_timeout: AtomicU64,
    lifetime: AtomicU64,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl LiveSettings {
    fn new(s: PoolSettings) -> Self {
        let live = LiveSettings {
            size: AtomicU32::new(0),
            min_size: AtomicU32::new(0),
            connect_timeout: AtomicU64::new(0),
            wait_timeout: AtomicU64::new(0),
            idle_timeout: AtomicU64::new(0),
            lifetime: AtomicU64::new(0),
        };
        live.store(s);
        live
    }

    fn store(&self, s: PoolSettings) {
        let r = Ordering::Relaxed;
        self.size.store(s.size, r);
        self.min_size.store(s.min_size, r);
        self.connect_timeout.store(nanos(s.connect_timeout), r);
        self.wait_timeout.store(nanos(s.wait_timeout), r);
        self.idle_timeout.store(nanos(s.idle_timeout), r);
        self.lifetime.store(nanos(s.lifetime), r);
    }

    fn load(&self) -> PoolSettings {
        let r = Ordering::Relaxed;
        let d = |a: &AtomicU64| Duration::from_nanos(a.load(r));
        PoolSettings {
            size: self.size.load(r),
            min_size: self.min_size.load(r),
            connect_timeout: d(&self.connect_timeout),
            wait_timeout: d(&self.wait_timeout),
            idle_timeout: d(&self.idle_timeout),
            lifetime: d(&self.lifetime),
        }
    }
}

/// A connection idle longer than this is peeked at before reuse (one `recv` that finds
/// nothing). A server that died meanwhile (a crash, a killed node: its FATAL or EOF is waiting)
/// is then closed instead of failing the next client's statement. A pool that hands its
/// connections out faster than this skips the syscall.
const CHECK_AFTER_IDLE: Duration = Duration::from_millis(10);

pub struct Pool {
    pub key: PoolKey,
    pub target: Arc<Target>,
    /// What the pools of this (database, user) on every node share.
    pub common: Arc<Common>,
    settings: LiveSettings,
    /// Held while the settings change (resizing the semaphore goes with them).
    resize: Mutex<()>,
    permits: Arc<Semaphore>,
    /// Permits to retire as they come back after the pool shrank.
    owed: AtomicU32,
    /// Boxed so that a checkout or a release moves a pointer, not the whole connection.
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<ServerConn>>>,
    pub stats: PoolStats,
    pub servers: Servers,
    server_ids: Arc<AtomicU64>,
    paused: watch::Sender<bool>,
    /// Connections being opened to reach `min_pool_size`.
    warming: AtomicU32,
    /// The last two stats samples (previous, latest).
    samples: Mutex<(StatsSample, StatsSample)>,
    /// Moving average of query latency in microseconds (1/8 weight per checkout), for the
    /// `latency` balancing; 0 until measured.
    latency_us: AtomicU64,
    /// When it was last measured (microseconds since `created`).
    latency_at: AtomicU64,
    created: Instant,
}

/// A server connection checked out of a pool, with its permit.
pub struct Lease {
    pub conn: Box<ServerConn>,
    permit: OwnedSemaphorePermit,
    /// When it was checked out (one clock reading serves the checkout and the first query).
    pub at: Instant,
    pub pool: Arc<Pool>,
}

impl Lease {
    /// Gives the connection back: pooled if still good and `fenced_out` is false, else closed.
    pub fn release(self, fenced_out: bool, usage: &Usage) {
        self.release_at(fenced_out, usage, Instant::now())
    }

    /// [`Lease::release`] with the clock already read (at the server's last answer).
    pub fn release_at(self, fenced_out: bool, usage: &Usage, now: Instant) {
        let Lease {
            conn, permit, pool, ..
        } = self;
        pool.release_conn(conn, permit, fenced_out, usage, now)
    }

    /// Drops a connection whose state is unknown.
    pub fn discard(self, usage: &Usage) {
        let Lease {
            conn, permit, pool, ..
        } = self;
        pool.record(usage);
        tokio::spawn(server::close(conn));
        pool.give_back(permit);
    }
}

impl Pool {
    pub fn new(
        key: PoolKey,
        target: Target,
        common: Arc<Common>,
        settings: PoolSettings,
        server_ids: Arc<AtomicU64>,
        paused: bool,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            key,
            target: Arc::new(target),
            common,
            permits: Arc::new(Semaphore::new(settings.size as usize)),
            settings: LiveSettings::new(settings),
            resize: Mutex::new(()),
            owed: AtomicU32::new(0),
            idle: Mutex::new(Vec::new()),
            stats: PoolStats::default(),
            servers: Servers::default(),
            server_ids,
            paused: watch::Sender::new(paused),
            warming: AtomicU32::new(0),
            samples: Mutex::new((PoolStats::default().sample(), PoolStats::default().sample())),
            latency_us: AtomicU64::new(0),
            latency_at: AtomicU64::new(0),
            created: Instant::now(),
        })
    }

    /// Takes a stats sample; averages are computed over the last two.
    pub fn sample_stats(&self) {
        let now = self.stats.sample();
        let mut s = self.samples.lock().expect("samples lock");
        s.0 = s.1;
        s.1 = now;
    }

    /// The last two samples (previous, latest).
    pub fn samples(&self) -> (StatsSample, StatsSample) {
        *self.samples.lock().expect("samples lock")
    }

    /// Connections being opened for `min_pool_size`.
    pub fn warming(&self) -> u32 {
        self.warming.load(Ordering::Relaxed)
    }

    pub fn settings(&self) -> PoolSettings {
        self.settings.load()
    }

    /// Applies new settings: a bigger pool gets permits at once, a smaller one retires them as
    /// servers come back.
    pub fn update(&self, new: PoolSettings) {
        let _resizing = self.resize.lock().expect("pool resize lock");
        let s = self.settings.load();
        if new.size > s.size {
            let mut grow = new.size - s.size;
            // Cancel debts first.
            while grow > 0 {
                let owed = self.owed.load(Ordering::SeqCst);
                if owed == 0 {
                    break;
                }
                let take = owed.min(grow);
                if self
                    .owed
                    .compare_exchange(owed, owed - take, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    grow -= take;
                }
            }
            self.permits.add_permits(grow as usize);
        } else if new.size < s.size {
            let shrink = s.size - new.size;
            let forgotten = self.permits.forget_permits(shrink as usize) as u32;
            self.owed.fetch_add(shrink - forgotten, Ordering::SeqCst);
        }
        self.settings.store(new);
    }

    pub fn size(&self) -> u32 {
        self.settings().size
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().expect("pool lock").len()
    }

    /// Servers checked out now.
    pub fn active_count(&self) -> usize {
        (self.size() as usize).saturating_sub(self.permits.available_permits())
    }

    pub fn available_permits(&self) -> usize {
        self.permits.available_permits()
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.send_replace(paused);
    }

    /// Waits (FIFO, bounded) for a permit, then reuses or opens a server connection fenced by
    /// `epoch`.
    pub async fn acquire(self: &Arc<Self>, epoch: Epoch) -> Result<Lease, ProxyError> {
        let settings = self.settings();
        if self.is_paused() {
            self.wait_resumed(settings.wait_timeout).await?;
        }
        // The semaphore is fair, so a free permit means nobody is queued: take it without
        // arming a timer.
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::Closed) => return Err(ProxyError::ShuttingDown),
            Err(TryAcquireError::NoPermits) => self.wait_for_permit(settings.wait_timeout).await?,
        };
        self.lease(permit, epoch, settings).await
    }

    /// A server connection at once, if a permit is free, nobody waits and an idle connection
    /// is still good (the common case, without a future); `None`: take [`Pool::acquire`].
    pub fn checkout_now(self: &Arc<Self>, epoch: Epoch) -> Option<Lease> {
        if self.is_paused() {
            return None;
        }
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        let (conn, at) = self.take_idle(self.settings(), epoch)?;
        self.stats.checkouts.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            conn,
            permit,
            at,
            pool: self.clone(),
        })
    }

    /// An idle connection that is still good (closing those that are not), with the time it
    /// was checked at.
    fn take_idle(
        &self,
        settings: PoolSettings,
        epoch: Epoch,
    ) -> Option<(Box<ServerConn>, Instant)> {
        while let Some(mut conn) = self.pop_idle() {
            let now = Instant::now();
            let idle = now.saturating_duration_since(conn.last_used);
            let fresh = conn.epoch == epoch
                && idle < settings.idle_timeout
                && !conn.info.close_needed.load(Ordering::Relaxed)
                && conn.is_reusable(settings.lifetime, idle >= CHECK_AFTER_IDLE, now);
            if fresh {
                return Some((conn, now));
            }
            tokio::spawn(server::close(conn));
        }
        None
    }

    /// With a permit: an idle connection that is still good, else a new one.
    async fn lease(
        self: &Arc<Self>,
        permit: OwnedSemaphorePermit,
        epoch: Epoch,
        settings: PoolSettings,
    ) -> Result<Lease, ProxyError> {
        self.stats.checkouts.fetch_add(1, Ordering::Relaxed);
        if let Some((conn, at)) = self.take_idle(settings, epoch) {
            return Ok(Lease {
                conn,
                permit,
                at,
                pool: self.clone(),
            });
        }
        let conn = self.open(epoch, settings).await?;
        Ok(Lease {
            conn,
            permit,
            at: Instant::now(),
            pool: self.clone(),
        })
    }

    /// A server connection only if one is free right now (no waiting, not paused).
    pub async fn try_acquire(self: &Arc<Self>, epoch: Epoch) -> Result<Option<Lease>, ProxyError> {
        if self.is_paused() {
            return Ok(None);
        }
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return Ok(None);
        };
        self.lease(permit, epoch, self.settings()).await.map(Some)
    }

    /// Opens a new server connection to this pool's node.
    async fn open(
        &self,
        epoch: Epoch,
        settings: PoolSettings,
    ) -> Result<Box<ServerConn>, ProxyError> {
        let login = self.common.login();
        let id = self.server_ids.fetch_add(1, Ordering::Relaxed) + 1;
        let conn = server::connect(
            &self.target,
            &login,
            epoch,
            settings.connect_timeout,
            id,
            &self.servers,
        )
        .await?;
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        self.common.learn_params(&conn.params);
        Ok(conn)
    }

    async fn wait_for_permit(
        &self,
        wait_timeout: Duration,
    ) -> Result<OwnedSemaphorePermit, ProxyError> {
        let started = Instant::now();
        let permit = tokio::time::timeout(wait_timeout, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| {
                self.stats.wait_timeouts.fetch_add(1, Ordering::Relaxed);
                ProxyError::WaitTimeout(wait_timeout)
            })?
            .map_err(|_| ProxyError::ShuttingDown)?;
        self.stats
            .wait_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(permit)
    }

    /// While paused, checkouts wait for RESUME, bounded like any wait for a server.
    async fn wait_resumed(&self, wait_timeout: Duration) -> Result<(), ProxyError> {
        let started = Instant::now();
        let mut rx = self.paused.subscribe();
        let resumed = tokio::time::timeout(wait_timeout, rx.wait_for(|paused| !paused)).await;
        self.stats
            .wait_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        match resumed {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(ProxyError::ShuttingDown),
            Err(_) => {
                self.stats.wait_timeouts.fetch_add(1, Ordering::Relaxed);
                Err(ProxyError::WaitTimeout(wait_timeout))
            }
        }
    }

    fn pop_idle(&self) -> Option<Box<ServerConn>> {
        self.idle.lock().expect("pool lock").pop()
    }

    /// Returns a connection; one that is not reusable (or fenced out) is closed.
    fn release_conn(
        &self,
        mut conn: Box<ServerConn>,
        permit: OwnedSemaphorePermit,
        fenced_out: bool,
        usage: &Usage,
        now: Instant,
    ) {
        self.record(usage);
        conn.last_used = now;
        conn.info.set_idle();
        let lifetime = Duration::from_nanos(self.settings.lifetime.load(Ordering::Relaxed));
        if !fenced_out
            && !conn.info.close_needed.load(Ordering::Relaxed)
            && conn.is_reusable(lifetime, false, now)
        {
            self.idle.lock().expect("pool lock").push(conn);
        } else {
            tokio::spawn(server::close(conn));
        }
        self.give_back(permit);
    }

    fn give_back(&self, permit: OwnedSemaphorePermit) {
        let owed = self.owed.load(Ordering::SeqCst);
        if owed > 0
            && self
                .owed
                .compare_exchange(owed, owed - 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            permit.forget();
        }
    }

    /// Moving average of its queries' latency, in microseconds (0: none measured), halved for
    /// every half second since it was last measured: a node that lost the comparison once is
    /// tried again before long, and measured anew, rather than starved on an old figure.
    pub fn latency_us(&self) -> u64 {
        let l = self.latency_us.load(Ordering::Relaxed);
        let at = self.latency_at.load(Ordering::Relaxed);
        let now = self.created.elapsed().as_micros() as u64;
        let halvings = (now.saturating_sub(at) / 500_000).min(63);
        l >> halvings
    }

    fn record(&self, u: &Usage) {
        if let Some(sample) = u.query_micros.checked_div(u.queries) {
            let sample = sample.max(1);
            let old = self.latency_us.load(Ordering::Relaxed);
            let new = if old == 0 {
                sample
            } else {
                (old * 7 + sample) / 8
            };
            self.latency_us.store(new, Ordering::Relaxed);
            self.latency_at
                .store(self.created.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        let s = &self.stats;
        s.transactions.fetch_add(u.transactions, Ordering::Relaxed);
        s.queries.fetch_add(u.queries, Ordering::Relaxed);
        s.bytes_received
            .fetch_add(u.bytes_received, Ordering::Relaxed);
        s.bytes_sent.fetch_add(u.bytes_sent, Ordering::Relaxed);
        s.xact_micros.fetch_add(u.xact_micros, Ordering::Relaxed);
        s.query_micros.fetch_add(u.query_micros, Ordering::Relaxed);
    }

    /// Closes every idle connection (`KILL`, shutdown, or the leader changed).
    pub fn close_idle(&self) {
        let idle: Vec<Box<ServerConn>> = std::mem::take(&mut *self.idle.lock().expect("pool lock"));
        for c in idle {
            tokio::spawn(server::close(c));
        }
    }

    /// Closes idle connections past `server_idle_timeout` or their lifetime or not of `epoch`
    /// (`None`: this node serves nothing now), and, with `warm` (the leader), opens connections
    /// up to `min_pool_size`.
    pub fn maintain(self: &Arc<Self>, epoch: Option<Epoch>, warm: bool) {
        let settings = self.settings();
        let mut idle = self.idle.lock().expect("pool lock");
        let (keep, old): (Vec<_>, Vec<_>) = idle.drain(..).partition(|c| {
            Some(c.epoch) == epoch
                && c.last_used.elapsed() < settings.idle_timeout
                && c.created.elapsed() < settings.lifetime
        });
        *idle = keep;
        let have = idle.len() + self.active_count() + self.warming.load(Ordering::Relaxed) as usize;
        drop(idle);
        for c in old {
            tokio::spawn(server::close(c));
        }
        let want = (settings.min_size.min(settings.size) as usize).saturating_sub(have);
        let Some(epoch) = epoch.filter(|_| warm) else {
            return;
        };
        if want == 0 || self.common.params().is_none() || self.is_paused() {
            // Warm connections only for a pool that has logged in once (its credential works).
            return;
        }
        for _ in 0..want {
            self.warming.fetch_add(1, Ordering::Relaxed);
            let pool = self.clone();
            tokio::spawn(async move {
                match pool.open(epoch, settings).await {
                    Ok(conn) => {
                        conn.info.set_idle();
                        pool.idle.lock().expect("pool lock").push(conn);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, db = %pool.key.database, "warm connection failed")
                    }
                }
                pool.warming.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }
}
