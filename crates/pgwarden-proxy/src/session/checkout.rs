//! How a session gets a server: the router picks the node from the current routing, then that
//! node's pool of the session's group hands out a connection fenced by the route's epoch. Every
//! checkout path goes through [`Checkout`] — the fast path without a future, waits, the login's
//! parameter checks and `auth_query` — so none can bypass the router.
//!
//! A connection opened while the view changed is checked again once it is logged in, and one
//! whose server says it is a standby (`in_hot_standby`, reported at login) never serves writes.

use std::sync::Arc;
use std::time::Duration;

use pgwarden_core::Epoch;
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::pool::{Lease, Pool, Usage};
use crate::pools::Group;
use crate::router::{self, Request, Route, Unavailable};
use crate::topology::{Routing, Topology};

pub struct Checkout<'a> {
    pub group: &'a Group,
    pub topology: &'a Topology,
    /// The longest wait for a node to route to.
    pub wait: Duration,
    routing: Arc<Routing>,
    /// The routed pool and epoch, for `routing`.
    routed: Option<(Arc<Pool>, Epoch)>,
}

impl<'a> Checkout<'a> {
    pub fn new(group: &'a Group, topology: &'a Topology, wait: Duration) -> Self {
        Checkout {
            group,
            topology,
            wait,
            routing: topology.routing(),
            routed: None,
        }
    }

    /// Takes the current routing if it changed (one atomic load when it did not).
    #[inline]
    fn refresh(&mut self) {
        if self.topology.generation() != self.routing.generation {
            self.routing = self.topology.routing();
            self.routed = None;
        }
    }

    /// The generation the session last acted on.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.routing.generation
    }

    /// The pool and epoch for the next transaction.
    #[inline]
    fn target(&mut self) -> Result<(&Arc<Pool>, Epoch), Unavailable> {
        self.refresh();
        if self.routed.is_none() {
            match router::route(&self.routing, Request::WRITE) {
                Route::Node(id, epoch) => {
                    let node = self
                        .routing
                        .view
                        .node(&id)
                        .expect("the router routes only to nodes of the view");
                    let pool = self.group.pool(node);
                    self.routed = Some((pool, epoch));
                }
                Route::Unavailable(why) => return Err(why),
            }
        }
        let (pool, epoch) = self.routed.as_ref().expect("routed above");
        Ok((pool, *epoch))
    }

    /// A server at once, if the routed node's pool has one free and good (no future).
    #[inline]
    pub fn now(&mut self) -> Option<Lease> {
        let (pool, epoch) = self.target().ok()?;
        pool.checkout_now(epoch)
    }

    /// A server, waiting (bounded) for a node to route to and for a free connection.
    pub async fn acquire(&mut self) -> Result<Lease, ProxyError> {
        let started = Instant::now();
        loop {
            match self.target() {
                Ok((pool, epoch)) => {
                    let pool = pool.clone();
                    match pool.acquire(epoch).await {
                        Ok(lease) => {
                            if let Some(lease) = self.verified(lease) {
                                return Ok(lease);
                            }
                        }
                        // The leader is restarting, or dead and about to be replaced: the
                        // client is between transactions, so it waits (bounded) for the view
                        // to move or the server to come back instead of getting the error.
                        Err(e) if passing(&e) && started.elapsed() < self.wait => {
                            self.pause_for_change(started).await;
                            if started.elapsed() >= self.wait {
                                return Err(e);
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(why) => self.wait_for_change(why, started).await?,
            }
        }
    }

    /// A server only if one is free now; `Ok(None)` when none is (or no node can be routed to).
    pub async fn try_acquire(&mut self) -> Result<Option<Lease>, ProxyError> {
        let Ok((pool, epoch)) = self.target() else {
            return Ok(None);
        };
        let pool = pool.clone();
        Ok(pool
            .try_acquire(epoch)
            .await?
            .and_then(|l| self.verified(l)))
    }

    /// The lease if it may serve writes now: the view did not move away from its node while it
    /// connected, and its server is not a standby. Otherwise it is closed.
    fn verified(&mut self, lease: Lease) -> Option<Lease> {
        let standby = lease
            .conn
            .params
            .get("in_hot_standby")
            .is_some_and(|v| v == "on");
        if standby {
            tracing::warn!(
                node = %lease.pool.key.node,
                epoch = %lease.conn.epoch,
                "the view names a standby as the leader; not writing to it"
            );
        }
        if standby || !self.may_serve(&lease) {
            lease.discard(&Usage::default());
            // Route again: to the next view's leader, or wait for it.
            self.routed = None;
            return None;
        }
        Some(lease)
    }

    /// Waits for the routing to change, up to the bound counted from `started`.
    async fn wait_for_change(
        &mut self,
        why: Unavailable,
        started: Instant,
    ) -> Result<(), ProxyError> {
        let deadline = started + self.wait;
        let unavailable = || ProxyError::Unavailable {
            why: why.clone(),
            waited: started.elapsed(),
        };
        let changed = self.topology.watch(self.routing.generation);
        match tokio::time::timeout_at(deadline, changed).await {
            Ok(_) => Ok(()),
            Err(_) => Err(unavailable()),
        }
    }

    /// Until the routing changes, [`RETRY_PAUSE`] has passed, or the bound counted from
    /// `started`, whichever is first.
    async fn pause_for_change(&mut self, started: Instant) {
        let until = (Instant::now() + RETRY_PAUSE).min(started + self.wait);
        let changed = self.topology.watch(self.routing.generation);
        let _ = tokio::time::timeout_at(until, changed).await;
        self.routed = None;
    }

    /// Whether the server held may go on serving writes under the current routing.
    #[inline]
    pub fn may_serve(&mut self, lease: &Lease) -> bool {
        self.refresh();
        if let Some((pool, epoch)) = &self.routed {
            if Arc::ptr_eq(pool, &lease.pool) && *epoch == lease.conn.epoch {
                return true;
            }
        }
        router::still_leads(&self.routing, &lease.pool.key.node, lease.conn.epoch)
    }

    /// Gives a server back (closed instead if it may no longer serve).
    pub fn release(&mut self, lease: Lease, usage: &Usage, now: std::time::Instant) {
        let fenced_out = !self.may_serve(&lease);
        lease.release_at(fenced_out, usage, now);
    }
}

/// How long a checkout pauses between attempts to reach a leader that refuses connections.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// A failure to reach the server that a restart or a failover ends: worth waiting out.
fn passing(e: &ProxyError) -> bool {
    match e {
        ProxyError::Connect { .. } | ProxyError::ConnectTimeout { .. } => true,
        ProxyError::ServerRefused { code, .. } => {
            *code == pgwarden_protocol::SqlState::CANNOT_CONNECT_NOW
        }
        _ => false,
    }
}

/// Why a connection is cut: the node it writes to no longer leads under `routing`.
pub fn fenced(lease: &Lease) -> ProxyError {
    ProxyError::Fenced {
        node: lease.pool.key.node.clone(),
        epoch: lease.conn.epoch,
    }
}
