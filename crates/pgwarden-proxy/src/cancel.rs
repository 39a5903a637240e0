//! Cancel requests.
//!
//! Each client gets its own BackendKeyData from the proxy. While a client holds a server
//! connection, its slot names that server's key. A cancel request is forwarded only to that
//! server, and counts as in flight until the server has taken it; a session clears its slot
//! before giving the server back to the pool, and waits for cancels in flight first (both under
//! the slot's lock, so neither misses the other). So a cancel never reaches a server that has
//! since been handed to another client. A cancel that comes while the client waits for a
//! server ends the wait: its query fails with 57014, as a running one would.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use pgwarden_protocol::startup;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::server::{BackendKey, Target};

/// A server a cancel can be sent to: where it is and its key.
pub type ServerRef = (Arc<Target>, BackendKey);

#[derive(Default)]
pub struct CancelSlot {
    server: Mutex<Option<ServerRef>>,
    /// Cancels taken from `server` and not yet delivered.
    in_flight: AtomicUsize,
    delivered: Notify,
    /// The session is waiting for a server: a cancel then ends the wait (the query is answered
    /// with 57014 as PostgreSQL would), instead of letting it run once a server frees up.
    waiting: AtomicBool,
    requested: AtomicBool,
    wake: Notify,
}

impl CancelSlot {
    /// The session starts waiting for a server; a cancel from before does not count.
    pub fn begin_wait(&self) {
        self.requested.store(false, Ordering::SeqCst);
        self.waiting.store(true, Ordering::SeqCst);
    }

    pub fn end_wait(&self) {
        self.waiting.store(false, Ordering::SeqCst);
    }

    /// Names the server now running the client's queries (None: none). Waits while a cancel
    /// is being forwarded to the previous one.
    pub async fn set_server(&self, server: Option<ServerRef>) {
        if let Err(server) = self.try_set_server(server) {
            self.set_server_after_cancels(server).await;
        }
    }

    /// [`CancelSlot::set_server`] without waiting: nearly always no cancel is in flight. `Err`
    /// gives the server back when one is; then `set_server` must be awaited.
    pub fn try_set_server(&self, server: Option<ServerRef>) -> Result<(), Option<ServerRef>> {
        let mut s = self.server.lock().expect("cancel slot lock");
        if self.in_flight.load(Ordering::SeqCst) == 0 {
            *s = server;
            Ok(())
        } else {
            Err(server)
        }
    }

    async fn set_server_after_cancels(&self, server: Option<ServerRef>) {
        loop {
            let delivered = self.delivered.notified();
            {
                let mut s = self.server.lock().expect("cancel slot lock");
                if self.in_flight.load(Ordering::SeqCst) == 0 {
                    *s = server;
                    return;
                }
            }
            delivered.await;
        }
    }

    /// Completes when a cancel arrives during the wait.
    pub async fn cancelled(&self) {
        loop {
            let woken = self.wake.notified();
            if self.requested.swap(false, Ordering::SeqCst) {
                return;
            }
            woken.await;
        }
    }
}

struct Entry {
    secret: i32,
    slot: Arc<CancelSlot>,
}

#[derive(Default)]
pub struct CancelMap {
    entries: Mutex<HashMap<i32, Entry>>,
}

/// Removes the session's entry when the session ends.
pub struct Registration<'a> {
    map: &'a CancelMap,
    pub pid: i32,
    pub secret: i32,
    pub slot: Arc<CancelSlot>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.map
            .entries
            .lock()
            .expect("cancel map lock")
            .remove(&self.pid);
    }
}

impl CancelMap {
    /// A fresh (pid, secret) pair for a new session.
    pub fn register(&self) -> Registration<'_> {
        let mut rng = rand::thread_rng();
        let mut entries = self.entries.lock().expect("cancel map lock");
        let pid = loop {
            let pid = rng.gen_range(1..i32::MAX);
            if !entries.contains_key(&pid) {
                break pid;
            }
        };
        let secret = rng.gen();
        let slot = Arc::new(CancelSlot::default());
        entries.insert(
            pid,
            Entry {
                secret,
                slot: slot.clone(),
            },
        );
        Registration {
            map: self,
            pid,
            secret,
            slot,
        }
    }

    /// Forwards a client's cancel request to the server currently running its query, if any.
    pub async fn cancel(&self, pid: i32, secret: i32, timeout: Duration) {
        let slot = {
            let entries = self.entries.lock().expect("cancel map lock");
            match entries.get(&pid) {
                Some(e) if e.secret == secret => e.slot.clone(),
                _ => {
                    tracing::debug!(pid, "cancel request with an unknown key ignored");
                    return;
                }
            }
        };
        let to = {
            let server = slot.server.lock().expect("cancel slot lock");
            match server.as_ref() {
                Some(to) => {
                    slot.in_flight.fetch_add(1, Ordering::SeqCst);
                    Some(to.clone())
                }
                None => {
                    if slot.waiting.load(Ordering::SeqCst) {
                        slot.requested.store(true, Ordering::SeqCst);
                        slot.wake.notify_waiters();
                    }
                    None
                }
            }
        };
        let Some((target, key)) = to else {
            return;
        };
        // Delivered (or given up) however this ends, even if this task is dropped.
        let _in_flight = InFlight(&slot);
        let sent = tokio::time::timeout(timeout, send_cancel(&target, key)).await;
        if sent.is_err() {
            tracing::warn!(server = %target.addr(), "cancel request timed out");
        }
    }
}

/// A cancel counted in its slot's `in_flight` until dropped.
struct InFlight<'a>(&'a CancelSlot);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.delivered.notify_waiters();
        }
    }
}

/// Cancels what the server connection with `key` runs (the proxy's own decision, e.g.
/// `query_timeout`), waiting at most `timeout`.
pub async fn cancel_server(target: &Target, key: BackendKey, timeout: Duration) {
    if tokio::time::timeout(timeout, send_cancel(target, key))
        .await
        .is_err()
    {
        tracing::warn!(server = %target.addr(), "cancel request timed out");
    }
}

/// Sends a CancelRequest and waits for the server to close the connection, which it does once it
/// has signalled the backend.
async fn send_cancel(target: &Target, key: BackendKey) {
    let Ok(mut s) = TcpStream::connect((target.host.as_str(), target.port)).await else {
        return;
    };
    let mut buf = BytesMut::new();
    startup::put_cancel_request(&mut buf, key.pid, key.secret);
    if s.write_all(&buf).await.is_ok() {
        let mut sink = [0u8; 64];
        while let Ok(n) = s.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    }
}
