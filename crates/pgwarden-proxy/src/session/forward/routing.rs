//! The relay's routing work: what the next checkout is for, the commit positions of
//! `session` consistency, batches judged on their way to a held server (the proxy's own
//! settings are in `settings`).

use std::time::{Duration, Instant};

use pgwarden_config::PoolMode;
use pgwarden_protocol::backend::TxStatus;

use super::{Client, Forwarder};
use crate::error::ProxyError;
use crate::framed::Flow;
use crate::pool::Lease;
use crate::session::checkout::Want;
use crate::session::pipeline::ClientStatements;
use crate::session::route::{self as session_route, Class, Override, SessionRoute};

impl Forwarder<'_> {
    /// Whether batches sent on the held server are classified on the way: on a replica (a
    /// write must wait for another server), and on the primary while nothing has written yet
    /// in `session` consistency (a write there sets the commit position to learn).
    pub(super) fn watches_batches(&self, route: &SessionRoute, c: &Client) -> bool {
        match &self.checkout.held {
            Some(h) if h.replica => c.session.pinned().is_none(),
            // A read that landed on the primary: a write behind it sets the floor.
            Some(_) => {
                matches!(self.checkout.want, Want::Read(_))
                    && !route.wrote
                    && route.consistency == pgwarden_config::Consistency::Session
                    && self.mode == PoolMode::Transaction
            }
            None => false,
        }
    }

    /// Decides what the next checkout is for, from the batch at the front of the client's
    /// buffer; returns function names whose volatility the primary should be asked about.
    pub(super) fn prepare_route(&mut self, c: &Client, route: &mut SessionRoute) -> Vec<String> {
        self.checkout.want = Want::Write;
        route.wrote = true;
        let Some(nodes) = self.checkout.nodes() else {
            return Vec::new();
        };
        let config = self.me_config();
        let routing = &config.proxy.routing;
        let stats = &nodes.routes;
        if self.mode == PoolMode::Session || !routing.read_write_split {
            // Every read goes where the writes go: no floor to keep.
            route.wrote = false;
            return Vec::new();
        }
        if route.over == Override::Primary {
            stats.write("pgwarden.route = primary");
            return Vec::new();
        }
        let common = &self.checkout.group.common;
        let (class, hint) = session_route::front_batch(
            &self.client.rbuf,
            &c.statements,
            &c.session,
            &common.functions,
            &routing.read_only_functions,
            route.over,
        );
        if hint == Some(pgwarden_sql::route::Hint::Primary) {
            stats.write("a pgwarden:primary hint");
            return Vec::new();
        }
        match class {
            Class::Read | Class::ReadOnlyTransaction => {
                let counter = if class == Class::Read {
                    &stats.reads
                } else {
                    &stats.read_only_transactions
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let (leader, epoch) = self.checkout.leader();
                let read = route.read(
                    routing,
                    nodes,
                    leader.as_ref(),
                    epoch,
                    hint == Some(pgwarden_sql::route::Hint::Replica),
                );
                self.checkout.want = Want::Read(read);
                route.wrote = false;
                Vec::new()
            }
            Class::Write { why, lookup } => {
                stats.write(why);
                if !lookup.is_empty() {
                    stats
                        .function_lookups
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                lookup
            }
        }
    }

    pub(super) fn me_config(&self) -> std::sync::Arc<pgwarden_config::Config> {
        self.checkout
            .shared()
            .map(|s| s.config())
            .expect("routing runs with the shared state")
    }

    /// A server was checked out as routed: the catalog is asked about new function names (on
    /// the primary), and a read's node is remembered for monotonic reads.
    pub(super) async fn routed(
        &mut self,
        route: &mut SessionRoute,
        l: &mut Lease,
        lookup: &[String],
    ) {
        let replica = self.checkout.held.as_ref().is_some_and(|h| h.replica);
        if !lookup.is_empty() && !replica {
            let functions = &self.checkout.group.common.functions;
            if let Err(e) = functions.look_up(&mut l.conn, lookup).await {
                tracing::debug!(error = %e, "function lookup failed");
            }
        }
        if matches!(self.checkout.want, Want::Read(_))
            && route.consistency == pgwarden_config::Consistency::Session
        {
            route.last_read = Some((l.pool.key.node.clone(), std::time::Instant::now()));
        }
    }

    /// `lsn`, read on the primary at `at` after the session's last write committed, is the
    /// session's floor from now on.
    pub(super) fn record_floor(
        &self,
        route: &mut SessionRoute,
        l: &Lease,
        lsn: pgwarden_core::Lsn,
        at: Instant,
    ) {
        route.wrote = false;
        if route.epoch != Some(l.conn.epoch) {
            // The first commit under a new leader: its position is the whole floor.
            route.epoch = Some(l.conn.epoch);
            route.floor = lsn;
        }
        route.floor = route.floor.max(lsn);
        route.floor_unknown = false;
        route.last_read = None;
        if let Some(nodes) = self.checkout.nodes() {
            nodes.get(&l.pool.key.node).probed(lsn, at, false);
        }
    }

    /// After a transaction that may have written, in `session` consistency: its commit position
    /// (at or past it) becomes the session's floor, read on its own server before it goes back.
    pub(super) async fn commit_position(
        &mut self,
        route: &mut SessionRoute,
        l: &mut Lease,
    ) -> Result<(), ProxyError> {
        route.wrote = false;
        if route.consistency != pgwarden_config::Consistency::Session
            || self.checkout.held.as_ref().is_some_and(|h| h.replica)
            || self.checkout.nodes().is_none()
        {
            return Ok(());
        }
        // Before the client has its answer: its next read must not be routed before the
        // floor is known, and the server is not given back before the client is answered (a
        // client waiting on the pool must not overtake it).
        let at = std::time::Instant::now();
        let lsn =
            crate::server::query_lsn(&mut l.conn, crate::server::INSERT_LSN, POSITION_TIMEOUT)
                .await
                .ok()
                .flatten();
        match lsn {
            Some(lsn) => self.record_floor(route, l, lsn, at),
            None => {
                tracing::debug!(
                    session = self.me.id,
                    "commit position unknown: reads go to the primary until the next commit"
                );
                route.floor_unknown = true;
            }
        }
        Ok(())
    }
}

/// Whether a client message may start a COPY: a query or Parse whose text says `copy` anywhere,
/// or a Bind of a named statement whose text does (a false alarm only costs a round trip).
pub(super) fn may_copy(frame: &[u8], statements: &ClientStatements) -> bool {
    let says_copy = |t: &[u8]| t.windows(4).any(|w| w.eq_ignore_ascii_case(b"copy"));
    match frame[0] {
        b'Q' | b'P' => says_copy(&frame[5..]),
        b'B' => {
            let body = &frame[5..];
            let Some(portal_end) = body.iter().position(|&c| c == 0) else {
                return true;
            };
            let rest = &body[portal_end + 1..];
            let Some(name_end) = rest.iter().position(|&c| c == 0) else {
                return true;
            };
            std::str::from_utf8(&rest[..name_end])
                .ok()
                .and_then(|n| statements.get(n))
                .is_some_and(|st| says_copy(&st.query))
        }
        _ => false,
    }
}

/// How long reading a commit position may take.
pub(super) const POSITION_TIMEOUT: Duration = Duration::from_secs(2);

/// What classifying a batch on its way needs: the catalog's answers, the configured read-only
/// functions, and the counters (`None`: not counted).
#[derive(Clone, Copy)]
pub(super) struct Judge<'a> {
    pub(super) functions: &'a crate::functions::Functions,
    pub(super) allowed: &'a [String],
    pub(super) nodes: Option<&'a crate::nodes::Nodes>,
}

/// Whether the batch at the front of `rest` may go to the held server: on a replica, a batch
/// that is not a read waits (the server goes back once settled, and the batch is routed anew);
/// inside a transaction everything goes where the transaction is. On the primary, a write is
/// noted (its commit position is to be read).
pub(super) fn batch_flow(
    held: Option<&crate::session::checkout::Held>,
    c: &mut Client,
    route: &mut SessionRoute,
    rest: &[u8],
    status: TxStatus,
    judge: &Judge<'_>,
) -> Flow {
    let Judge {
        functions,
        allowed,
        nodes,
    } = *judge;
    let Some(held) = held else {
        return Flow::Next;
    };
    if c.front_judged {
        // The batch the checkout was routed by: already judged, where it is going.
        return Flow::Next;
    }
    if status != TxStatus::Idle && held.replica {
        return Flow::Next;
    }
    let (class, _) = session_route::front_batch(
        rest,
        &c.statements,
        &c.session,
        functions,
        allowed,
        route.over,
    );
    match class {
        Class::Read | Class::ReadOnlyTransaction => Flow::Next,
        Class::Write { .. } if held.replica => {
            if let Some(n) = nodes {
                n.routes
                    .held_writes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Flow::Hold
        }
        Class::Write { .. } => {
            route.wrote = true;
            Flow::Next
        }
    }
}
