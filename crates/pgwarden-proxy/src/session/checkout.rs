//! How a session gets a server: the router picks the node from the current routing, then that
//! node's pool of the session's group hands out a connection fenced by the route's epoch. Every
//! checkout path goes through [`Checkout`] — the fast path without a future, waits, the login's
//! parameter checks and `auth_query` — so none can bypass the router.
//!
//! A connection opened while the view changed is checked again once it is logged in, and one
//! whose server says it is a standby (`in_hot_standby`, reported at login) never serves writes.
//!
//! A read ([`Want::Read`]) goes where [`router::choose_read`] says. A replica that must first
//! prove it has replayed the session's floor is asked (`pg_last_wal_replay_lsn()`) on the
//! connection checked out, again every millisecond up to `read_your_writes_wait`, by one session
//! at a time: the others waiting on that replica take their answers from its probes; one that fails
//! a checkout or a probe counts a failure (bans follow, see `nodes`) and the read is routed again
//! without it, so a dead replica costs a read no error.

use std::sync::Arc;
use std::time::Duration;

use pgwarden_cluster::status::Role;
use pgwarden_config::Config;
use pgwarden_core::{Epoch, Lsn, NodeId};
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::nodes::Nodes;
use crate::pool::{Lease, Pool, Usage};
use crate::pools::Group;
use crate::router::{self, Dice, Read, ReadRoute, Replica, Request, Route, Unavailable};
use crate::topology::{Routing, Topology};

/// What the next transaction needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// The leader.
    Write,
    /// A node that can serve this read.
    Read(Read),
}

/// The server held now, as routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub node: NodeId,
    /// Routed as a read to a replica: it serves reads only, and is not fenced by the leader.
    pub replica: bool,
}

/// The read side of routing: node states and the settings (read afresh for each read, so a
/// reload applies to running sessions).
pub struct Reads<'a> {
    pub nodes: &'a Nodes,
    pub shared: &'a crate::Shared,
}

pub struct Checkout<'a> {
    pub group: &'a Group,
    pub topology: &'a Topology,
    /// The longest wait for a node to route to.
    pub wait: Duration,
    routing: Arc<Routing>,
    /// The routed pool and epoch, for `routing`.
    routed: Option<(Arc<Pool>, Epoch)>,
    /// What the next checkout is for (a write unless the session says otherwise).
    pub want: Want,
    /// The server held, once checked out.
    pub held: Option<Held>,
    reads: Option<Reads<'a>>,
    turn: u64,
    /// The read target `now` chose but found no free connection on: `acquire` waits there
    /// rather than choosing again (which would skew every strategy toward warm pools).
    chosen: Option<ReadTarget>,
}

impl<'a> Checkout<'a> {
    pub fn new(group: &'a Group, topology: &'a Topology, wait: Duration) -> Self {
        Checkout {
            group,
            topology,
            wait,
            routing: topology.routing(),
            routed: None,
            want: Want::Write,
            held: None,
            reads: None,
            turn: rand::random(),
            chosen: None,
        }
    }

    /// Reads may be routed to replicas.
    pub fn with_reads(mut self, reads: Reads<'a>) -> Self {
        self.reads = Some(reads);
        self
    }

    /// The shared state, when reads are routed.
    pub fn shared(&self) -> Option<&'a crate::Shared> {
        self.reads.as_ref().map(|r| r.shared)
    }

    /// The node states, when reads are routed.
    pub fn nodes(&self) -> Option<&'a Nodes> {
        self.reads.as_ref().map(|r| r.nodes)
    }

    /// The current leader, as routed.
    pub fn leader(&mut self) -> (Option<NodeId>, Epoch) {
        self.refresh();
        (self.routing.view.leader.clone(), self.routing.view.epoch)
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
        if let Want::Read(read) = &self.want {
            let read = read.clone();
            self.chosen = None;
            return match self.read_target(&read, &[]) {
                Ok(ReadTarget::Replica {
                    pool,
                    proven: true,
                    node,
                }) => match pool.checkout_now(self.routing.view.epoch) {
                    Some(lease) => {
                        self.hold(&node, true);
                        Some(lease)
                    }
                    None => {
                        self.chosen = Some(ReadTarget::Replica {
                            pool,
                            node,
                            proven: true,
                        });
                        None
                    }
                },
                Ok(ReadTarget::Primary) => {
                    let lease = self.now_write();
                    if lease.is_none() {
                        self.chosen = Some(ReadTarget::Primary);
                    }
                    lease
                }
                Ok(other) => {
                    self.chosen = Some(other);
                    None
                }
                Err(_) => None,
            };
        }
        self.now_write()
    }

    #[inline]
    fn now_write(&mut self) -> Option<Lease> {
        let (pool, epoch) = self.target().ok()?;
        let lease = pool.checkout_now(epoch)?;
        let node = lease.pool.key.node.clone();
        self.hold(&node, false);
        Some(lease)
    }

    fn hold(&mut self, node: &NodeId, replica: bool) {
        match &mut self.held {
            Some(h) if h.node == *node && h.replica == replica => {}
            _ => {
                self.held = Some(Held {
                    node: node.clone(),
                    replica,
                })
            }
        }
        if let Some(r) = &self.reads {
            let state = r.nodes.get(node);
            let counter = if replica || matches!(self.want, Want::Read(_)) {
                &state.reads
            } else {
                &state.writes
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A server, waiting (bounded) for a node to route to and for a free connection.
    pub async fn acquire(&mut self) -> Result<Lease, ProxyError> {
        if let Want::Read(read) = &self.want {
            let read = read.clone();
            return self.acquire_read(&read).await;
        }
        let lease = self.acquire_write().await?;
        let node = lease.pool.key.node.clone();
        self.hold(&node, false);
        Ok(lease)
    }

    async fn acquire_write(&mut self) -> Result<Lease, ProxyError> {
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
        let lease = pool
            .try_acquire(epoch)
            .await?
            .and_then(|l| self.verified(l));
        if let Some(l) = &lease {
            let node = l.pool.key.node.clone();
            self.hold(&node, false);
        }
        Ok(lease)
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
        if self
            .held
            .as_ref()
            .is_some_and(|h| h.replica && h.node == lease.pool.key.node)
        {
            return router::serves_reads(&self.routing, &lease.pool.key.node);
        }
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

/// Where a read goes now.
enum ReadTarget {
    Replica {
        pool: Arc<Pool>,
        node: NodeId,
        proven: bool,
    },
    Primary,
}

/// How long a position probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Between probes of a replica that has not yet replayed a session's floor.
const PROBE_PAUSE: Duration = Duration::from_millis(1);
/// Probes asked back to back before they are paced by `PROBE_PAUSE`.
const QUICK_PROBES: u32 = 4;

impl Checkout<'_> {
    /// The target of `read`, leaving out `skip` (replicas that just failed it).
    fn read_target(&mut self, read: &Read, skip: &[NodeId]) -> Result<ReadTarget, Unavailable> {
        self.refresh();
        let Some(reads) = &self.reads else {
            return Ok(ReadTarget::Primary);
        };
        let view = self.topology.view();
        let config: Arc<Config> = reads.shared.config();
        reads.nodes.observe(&view, &config.proxy.routing);
        let now = std::time::Instant::now();
        let mut pools = Vec::new();
        let mut replicas = Vec::new();
        for n in &self.routing.view.nodes {
            if n.role != Role::Replica || skip.contains(&n.id) {
                continue;
            }
            let state = reads.nodes.get(&n.id);
            let pool = self.group.pool(n);
            replicas.push(Replica {
                id: n.id.clone(),
                weight: config
                    .nodes
                    .iter()
                    .find(|c| c.name == n.id.as_str())
                    .map_or(100, |c| c.weight),
                in_flight: pool.active_count() as u32,
                latency_us: pool.latency_us(),
                replayed: state.replayed(),
                out: state.out(now),
            });
            pools.push(pool);
        }
        self.turn = self.turn.wrapping_add(1);
        let dice = Dice {
            turn: self.turn,
            a: rand::random(),
            b: rand::random(),
        };
        match router::choose_read(&replicas, read, dice) {
            ReadRoute::Replica { index, proven } => Ok(ReadTarget::Replica {
                pool: pools.swap_remove(index),
                node: replicas.swap_remove(index).id,
                proven,
            }),
            ReadRoute::Primary(why) => {
                reads.nodes.count_primary_read(why);
                Ok(ReadTarget::Primary)
            }
            ReadRoute::NoReplica => Err(Unavailable::NoReplica),
        }
    }

    /// A server for a read: a replica as routed (proving it has replayed the floor when it
    /// must), else the primary; a replica that fails is left out and the read routed again.
    async fn acquire_read(&mut self, read: &Read) -> Result<Lease, ProxyError> {
        let started = Instant::now();
        let mut skip: Vec<NodeId> = Vec::new();
        loop {
            let chosen = self.chosen.take().filter(|_| skip.is_empty());
            let target = match chosen.map_or_else(|| self.read_target(read, &skip), Ok) {
                Ok(t) => t,
                Err(why) => {
                    self.wait_for_change(why, started).await?;
                    continue;
                }
            };
            let (pool, node, proven) = match target {
                ReadTarget::Primary => {
                    let lease = self.acquire_write().await?;
                    let node = lease.pool.key.node.clone();
                    self.hold(&node, false);
                    return Ok(lease);
                }
                ReadTarget::Replica { pool, node, proven } => (pool, node, proven),
            };
            let reads = self
                .reads
                .as_ref()
                .expect("replicas are routed only with reads");
            let state = reads.nodes.get(&node);
            let routing_config = reads.shared.config().proxy.routing.clone();
            let deadline = Instant::now() + routing_config.read_your_writes_wait;
            let mut proven = proven;
            let mut turn = None;
            if !proven {
                reads
                    .nodes
                    .routes
                    .floor_probes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // One session probes a replica at a time; the others wait for its answers.
                (proven, turn) = state.replayed_or_turn(read.floor, deadline).await;
                if !proven && turn.is_none() {
                    skip.push(node);
                    continue;
                }
            }
            let mut lease = match pool.acquire(self.routing.view.epoch).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!(node = %node, error = %e, "replica checkout failed; routing the read again");
                    state.failed(&routing_config);
                    skip.push(node);
                    continue;
                }
            };
            if proven {
                state.succeeded();
                self.hold(&node, true);
                return Ok(lease);
            }
            // Not known to have replayed the floor: asked, until it has or the wait is over.
            let mut asked = 0;
            let reached = loop {
                asked += 1;
                match probe_replay(&mut lease, &state).await {
                    Ok(Some(lsn)) => {
                        state.succeeded();
                        if lsn >= read.floor || state.replayed() >= read.floor {
                            break true;
                        }
                    }
                    Ok(None) => break false,
                    Err(e) => {
                        tracing::debug!(node = %node, error = %e, "replay position probe failed");
                        state.failed(&routing_config);
                        break false;
                    }
                }
                if Instant::now() + PROBE_PAUSE > deadline {
                    break false;
                }
                // A standby a moment behind usually catches up within a few round trips (the
                // timer's millisecond would be most of the wait): asked again at once, then
                // paced.
                if asked > QUICK_PROBES {
                    tokio::time::sleep(PROBE_PAUSE).await;
                }
            };
            drop(turn);
            if reached {
                self.hold(&node, true);
                return Ok(lease);
            }
            if lease.conn.broken {
                lease.discard(&Usage::default());
            } else {
                lease.release(false, &Usage::default());
            }
            skip.push(node);
        }
    }
}

/// Asks a replica's server where its replay is (recording it); `None` when it is not a standby.
async fn probe_replay(
    lease: &mut Lease,
    state: &crate::nodes::NodeState,
) -> Result<Option<Lsn>, ProxyError> {
    let at = std::time::Instant::now();
    let lsn =
        crate::server::query_lsn(&mut lease.conn, crate::server::REPLAY_LSN, PROBE_TIMEOUT).await?;
    if let Some(l) = lsn {
        state.probed(l, at, true);
    }
    Ok(lsn)
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
