//! The relay's routing work: what the next checkout is for, the commit positions of
//! `session` consistency, batches judged on their way to a held server, and the proxy's own
//! settings (`pgwarden.route`, `pgwarden.consistency`).

use std::time::{Duration, Instant};

use pgwarden_config::PoolMode;
use pgwarden_protocol::backend::{self, TxStatus};
use pgwarden_protocol::error_response::ErrorReport;
use pgwarden_protocol::frame::{message_len, MAX_MESSAGE};

use super::{Client, Forwarder};
use crate::error::ProxyError;
use crate::framed::Flow;
use crate::pool::Lease;
use crate::session::checkout::{Checkout, Want};
use crate::session::pipeline::ClientStatements;
use crate::session::route::{self as session_route, Class, Override, ProxySetting, SessionRoute};

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

/// Answers `SET`, `RESET` or `SHOW` of `pgwarden.route` / `pgwarden.consistency`.
pub(super) fn answer_proxy_setting(
    setting: ProxySetting,
    route: &mut SessionRoute,
    checkout: &Checkout<'_>,
    out: &mut bytes::BytesMut,
) {
    run_setting(setting, route, checkout, out, true);
    backend::put_ready_for_query(out, TxStatus::Idle);
}

/// The same as a whole extended-protocol batch of unnamed messages (Parse, Bind, Describe,
/// Execute, Sync; what psycopg sends for `execute("SET pgwarden.route = ...")`): answered by
/// the proxy when the batch is complete at the front of `buf`. Returns its length.
pub(super) fn answer_extended_setting(
    buf: &[u8],
    route: &mut SessionRoute,
    checkout: &Checkout<'_>,
    out: &mut bytes::BytesMut,
) -> Option<usize> {
    let frame_at = |at: usize| -> Option<(u8, &[u8], usize)> {
        let n = message_len(&buf[at..], MAX_MESSAGE).ok()??;
        Some((buf[at], &buf[at + 5..at + n], n))
    };
    let (tag, body, mut at) = frame_at(0)?;
    if tag != b'P' || body.first() != Some(&0) {
        return None;
    }
    let query = &body[1..];
    let query = &query[..query.iter().position(|&c| c == 0)?];
    let setting = session_route::proxy_setting(query)?;
    // The rest must be unnamed Bind / Describe / Execute / Flush up to a Sync.
    let mut steps = Vec::new();
    loop {
        let (tag, body, n) = frame_at(at)?;
        at += n;
        match tag {
            b'B' if body.starts_with(b"\0\0") => steps.push(b'2'),
            b'D' if body == b"P\0" || body == b"S\0" => steps.push(b'n'),
            b'E' if body.first() == Some(&0) => steps.push(b'E'),
            b'H' => {}
            b'S' => break,
            _ => return None,
        }
    }
    let show = matches!(setting, ProxySetting::Show(_));
    backend::put_parse_complete(out);
    for step in steps {
        match step {
            b'2' => backend::put_bind_complete(out),
            b'n' if show => {
                let ProxySetting::Show(name) = &setting else {
                    unreachable!("show")
                };
                backend::put_row_description(out, &[(&format!("pgwarden.{name}"), 25)]);
            }
            b'n' => backend::put_no_data(out),
            _ => {
                if !run_setting(setting.clone(), route, checkout, out, false) {
                    // An error: the rest of the batch is skipped, as a server skips it.
                    break;
                }
            }
        }
    }
    backend::put_ready_for_query(out, TxStatus::Idle);
    Some(at)
}

/// Applies a proxy setting and writes its answer (a SHOW's row description too when
/// `describe`); false on an invalid value (its error written).
pub(super) fn run_setting(
    setting: ProxySetting,
    route: &mut SessionRoute,
    checkout: &Checkout<'_>,
    out: &mut bytes::BytesMut,
    describe: bool,
) -> bool {
    let default_consistency = checkout
        .shared()
        .map(|s| s.config().proxy.routing.consistency)
        .unwrap_or(pgwarden_config::Consistency::Session);
    let invalid = |out: &mut bytes::BytesMut, name: &str, value: &str, expected: &str| {
        ErrorReport::error(
            pgwarden_protocol::SqlState::INVALID_PARAMETER_VALUE,
            &format!("invalid value for parameter \"pgwarden.{name}\": \"{value}\" (expected {expected})"),
        )
        .put_error(out);
    };
    match setting {
        ProxySetting::Set("route", v) => match Override::parse(&v) {
            Some(o) => {
                route.over = o;
                backend::put_command_complete(out, "SET");
            }
            None => {
                invalid(out, "route", &v, "auto, primary or replica");
                return false;
            }
        },
        ProxySetting::Set(_, v) => match pgwarden_config::Consistency::parse(&v) {
            Some(k) => {
                route.consistency = k;
                backend::put_command_complete(out, "SET");
            }
            None => {
                invalid(out, "consistency", &v, "eventual, session or strong");
                return false;
            }
        },
        ProxySetting::Reset(name) => {
            if name == "route" {
                route.over = Override::Auto;
            } else {
                route.consistency = default_consistency;
            }
            backend::put_command_complete(out, "RESET");
        }
        ProxySetting::Show(name) => {
            let full = format!("pgwarden.{name}");
            let value = if name == "route" {
                route.over.as_str()
            } else {
                route.consistency.as_str()
            };
            if describe {
                backend::put_row_description(out, &[(&full, 25)]);
            }
            backend::put_data_row(out, &[Some(value)]);
            backend::put_command_complete(out, "SHOW");
        }
    }
    true
}
