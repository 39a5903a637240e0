//! Who is connected: the clients (for `SHOW CLIENTS`, `KILL`, shutdown) and, per pool, the
//! server connections (for `SHOW SERVERS`). Entries remove themselves when dropped, so nothing
//! can be left behind by an early return.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

/// Why a session is being ended from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum KillReason {
    /// The proxy is shutting down: a running transaction may finish first.
    Shutdown = 1,
    /// `KILL` or the end of the shutdown grace period: at once.
    Admin = 2,
}

/// A level-triggered stop signal: once raised it stays raised (an admin kill outranks shutdown).
#[derive(Default)]
pub struct Kill {
    reason: AtomicU8,
    /// How many times it was raised: a [`KillWatch`] re-registers only after a raise.
    raises: AtomicU32,
    notify: Notify,
}

impl Kill {
    pub fn raise(&self, reason: KillReason) {
        self.reason.fetch_max(reason as u8, Ordering::SeqCst);
        self.raises.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn reason(&self) -> Option<KillReason> {
        match self.reason.load(Ordering::SeqCst) {
            0 => None,
            1 => Some(KillReason::Shutdown),
            _ => Some(KillReason::Admin),
        }
    }

    /// Completes once the signal is at least `min`.
    pub async fn raised(&self, min: KillReason) {
        self.watch(min).await
    }
}

impl Kill {
    /// Like [`Kill::raised`], for a loop that waits on the signal again and again in one task:
    /// the watch registers the task once and then, until the signal is raised, a poll is two
    /// atomic loads (no lock, no registering and unregistering per wait). It can be polled
    /// again after it completed (it completes again). It must stay in one task: the waker
    /// registered first is the one woken.
    pub fn watch(&self, min: KillReason) -> KillWatch<'_> {
        KillWatch {
            kill: self,
            min: min as u8,
            notified: Box::pin(self.notify.notified()),
            armed_at: None,
        }
    }
}

pub struct KillWatch<'a> {
    kill: &'a Kill,
    min: u8,
    notified: Pin<Box<Notified<'a>>>,
    /// The raise count when `notified` was registered (None: not registered).
    armed_at: Option<u32>,
}

impl Future for KillWatch<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let kill = self.kill;
        loop {
            // The Notified was made before this check, so a raise in between is not missed.
            if kill.reason.load(Ordering::SeqCst) >= self.min {
                return Poll::Ready(());
            }
            let raises = kill.raises.load(Ordering::SeqCst);
            if self.armed_at == Some(raises) {
                return Poll::Pending;
            }
            match self.notified.as_mut().poll(cx) {
                Poll::Ready(()) => self.notified.set(kill.notify.notified()),
                Poll::Pending => {
                    self.armed_at = Some(raises);
                    return Poll::Pending;
                }
            }
        }
    }
}

/// What a client is doing, for `SHOW CLIENTS` and `SHOW POOLS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ClientState {
    /// Logged in, no server.
    Idle = 0,
    /// Waiting for a server.
    Waiting = 1,
    /// Holding a server.
    Active = 2,
}

pub struct ClientInfo {
    pub id: u64,
    pub addr: SocketAddr,
    pub local: Option<SocketAddr>,
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub tls: bool,
    pub connected: SystemTime,
    state: AtomicU8,
    /// Unix microseconds when it last asked for a server (and, while waiting, since when).
    request_us: AtomicU64,
    /// The server it holds (its id), 0 if none.
    pub server: AtomicU64,
    pub kill: Kill,
}

pub fn unix_micros(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Unix microseconds of a monotonic reading, from one wall-clock reading taken at first use
/// (so the per-transaction request times need no wall-clock read).
pub fn instant_unix_micros(t: Instant) -> u64 {
    static ANCHOR: std::sync::OnceLock<(Instant, u64)> = std::sync::OnceLock::new();
    let (at, unix) = *ANCHOR.get_or_init(|| (Instant::now(), unix_micros(SystemTime::now())));
    match t.checked_duration_since(at) {
        Some(d) => unix + d.as_micros() as u64,
        None => unix.saturating_sub(at.duration_since(t).as_micros() as u64),
    }
}

impl ClientInfo {
    pub fn state(&self) -> ClientState {
        match self.state.load(Ordering::Relaxed) {
            1 => ClientState::Waiting,
            2 => ClientState::Active,
            _ => ClientState::Idle,
        }
    }

    /// Asked for a server at `at` and waits for one.
    pub fn set_waiting(&self, at: Instant) {
        self.set_requested(at);
        self.state
            .store(ClientState::Waiting as u8, Ordering::Relaxed);
    }

    /// Asked for a server at `at`.
    pub fn set_requested(&self, at: Instant) {
        self.request_us
            .store(instant_unix_micros(at), Ordering::Relaxed);
    }

    pub fn set_active(&self, server: u64) {
        self.server.store(server, Ordering::Relaxed);
        self.state
            .store(ClientState::Active as u8, Ordering::Relaxed);
    }

    pub fn set_idle(&self) {
        self.server.store(0, Ordering::Relaxed);
        self.state.store(ClientState::Idle as u8, Ordering::Relaxed);
    }

    pub fn request_us(&self) -> u64 {
        self.request_us.load(Ordering::Relaxed)
    }
}

/// Entries by id, each removed when its [`Entry`] is dropped.
pub struct Registry<T> {
    map: Arc<Mutex<BTreeMap<u64, Arc<T>>>>,
}

impl<T> Default for Registry<T> {
    fn default() -> Self {
        Registry {
            map: Arc::default(),
        }
    }
}

impl<T> Clone for Registry<T> {
    fn clone(&self) -> Self {
        Registry {
            map: self.map.clone(),
        }
    }
}

/// A registered value; dropping it removes it from its registry.
pub struct Entry<T> {
    pub info: Arc<T>,
    id: u64,
    map: Arc<Mutex<BTreeMap<u64, Arc<T>>>>,
}

impl<T> Drop for Entry<T> {
    fn drop(&mut self) {
        self.map.lock().expect("registry lock").remove(&self.id);
    }
}

impl<T> Registry<T> {
    fn insert(&self, id: u64, value: T) -> Entry<T> {
        let info = Arc::new(value);
        self.map
            .lock()
            .expect("registry lock")
            .insert(id, info.clone());
        Entry {
            info,
            id,
            map: self.map.clone(),
        }
    }

    pub fn all(&self) -> Vec<Arc<T>> {
        self.map
            .lock()
            .expect("registry lock")
            .values()
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.map.lock().expect("registry lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Every logged-in client.
#[derive(Default)]
pub struct Clients {
    next: AtomicU64,
    registry: Registry<ClientInfo>,
}

pub type ClientEntry = Entry<ClientInfo>;

pub struct NewClient {
    pub addr: SocketAddr,
    pub local: Option<SocketAddr>,
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub tls: bool,
}

impl Clients {
    pub fn register(&self, c: NewClient) -> ClientEntry {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let now = SystemTime::now();
        self.registry.insert(
            id,
            ClientInfo {
                id,
                addr: c.addr,
                local: c.local,
                user: c.user,
                database: c.database,
                application_name: c.application_name,
                tls: c.tls,
                connected: now,
                state: AtomicU8::new(ClientState::Idle as u8),
                request_us: AtomicU64::new(unix_micros(now)),
                server: AtomicU64::new(0),
                kill: Kill::default(),
            },
        )
    }

    pub fn all(&self) -> Vec<Arc<ClientInfo>> {
        self.registry.all()
    }

    pub fn len(&self) -> usize {
        self.registry.len()
    }

    pub fn is_empty(&self) -> bool {
        self.registry.is_empty()
    }

    /// Raises `reason` on every client `which` selects; returns how many.
    pub fn kill(&self, reason: KillReason, which: impl Fn(&ClientInfo) -> bool) -> usize {
        let all = self.all();
        let mut n = 0;
        for c in all.iter().filter(|c| which(c)) {
            c.kill.raise(reason);
            n += 1;
        }
        n
    }
}

/// What a server connection is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ServerState {
    Idle = 0,
    Active = 1,
}

pub struct ServerInfo {
    pub id: u64,
    pub addr: String,
    pub local: Option<SocketAddr>,
    pub pid: i32,
    pub connected: SystemTime,
    state: AtomicU8,
    /// The client holding it (its id), 0 if none.
    pub client: AtomicU64,
    /// Unix microseconds of its last checkout.
    pub request_us: AtomicU64,
    /// Set when it should be closed at its next release (e.g. its database was killed).
    pub close_needed: AtomicBool,
}

impl ServerInfo {
    pub fn state(&self) -> ServerState {
        match self.state.load(Ordering::Relaxed) {
            1 => ServerState::Active,
            _ => ServerState::Idle,
        }
    }

    /// Given to `client`, which asked for a server at `request_us` (Unix microseconds).
    pub fn set_active(&self, client: u64, request_us: u64) {
        self.client.store(client, Ordering::Relaxed);
        self.request_us.store(request_us, Ordering::Relaxed);
        self.state
            .store(ServerState::Active as u8, Ordering::Relaxed);
    }

    pub fn set_idle(&self) {
        self.client.store(0, Ordering::Relaxed);
        self.state.store(ServerState::Idle as u8, Ordering::Relaxed);
    }
}

/// The server connections of one pool.
pub type Servers = Registry<ServerInfo>;

pub type ServerEntry = Entry<ServerInfo>;

impl Registry<ServerInfo> {
    pub fn register(
        &self,
        id: u64,
        addr: String,
        local: Option<SocketAddr>,
        pid: i32,
    ) -> ServerEntry {
        let now = SystemTime::now();
        self.insert(
            id,
            ServerInfo {
                id,
                addr,
                local,
                pid,
                connected: now,
                state: AtomicU8::new(ServerState::Active as u8),
                client: AtomicU64::new(0),
                request_us: AtomicU64::new(unix_micros(now)),
                close_needed: AtomicBool::new(false),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn kill_is_level_triggered_and_admin_outranks_shutdown() {
        let k = Kill::default();
        assert_eq!(k.reason(), None);
        k.raise(KillReason::Shutdown);
        k.raised(KillReason::Shutdown).await; // already raised: returns at once
        let admin = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            k.raised(KillReason::Admin),
        )
        .await;
        assert!(admin.is_err(), "shutdown is not an admin kill");
        k.raise(KillReason::Admin);
        k.raise(KillReason::Shutdown); // never lowers
        assert_eq!(k.reason(), Some(KillReason::Admin));
        k.raised(KillReason::Admin).await;
    }

    #[tokio::test]
    async fn a_watch_wakes_on_a_raise_while_waiting_and_can_be_polled_again() {
        use std::time::Duration;
        let k = std::sync::Arc::new(Kill::default());
        let mut admin = k.watch(KillReason::Admin);
        let mut shutdown = k.watch(KillReason::Shutdown);
        // Pending (and registered) across several waits.
        for _ in 0..3 {
            let r = tokio::time::timeout(Duration::from_millis(10), &mut shutdown).await;
            assert!(r.is_err(), "nothing raised yet");
        }
        let k2 = k.clone();
        let raiser = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            k2.raise(KillReason::Shutdown);
        });
        tokio::time::timeout(Duration::from_secs(5), &mut shutdown)
            .await
            .expect("a raise while waiting wakes the watch");
        raiser.await.expect("raiser");
        // Completes again when polled again; a lower reason does not complete a higher watch.
        (&mut shutdown).await;
        let r = tokio::time::timeout(Duration::from_millis(20), &mut admin).await;
        assert!(r.is_err(), "shutdown is not an admin kill");
        k.raise(KillReason::Admin);
        tokio::time::timeout(Duration::from_secs(5), &mut admin)
            .await
            .expect("admin kill");
    }

    #[test]
    fn entries_leave_the_registry_when_dropped() {
        let clients = Clients::default();
        let e = clients.register(NewClient {
            addr: "127.0.0.1:1".parse().expect("addr"),
            local: None,
            user: "u".into(),
            database: "d".into(),
            application_name: String::new(),
            tls: false,
        });
        assert_eq!(clients.len(), 1);
        assert_eq!(clients.kill(KillReason::Admin, |c| c.database == "d"), 1);
        assert_eq!(e.info.kill.reason(), Some(KillReason::Admin));
        drop(e);
        assert!(clients.is_empty());
        let servers = Servers::default();
        let s = servers.register(7, "h:1".into(), None, 42);
        assert_eq!(servers.all().len(), 1);
        drop(s);
        assert!(servers.all().is_empty());
    }
}
