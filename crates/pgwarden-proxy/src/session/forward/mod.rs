//! Relaying between a logged-in client and server connections.
//!
//! In transaction mode a server is taken when the client sends something that needs one and given
//! back at a ReadyForQuery that says idle, provided nothing sent is still unanswered, no
//! extended-protocol message has been sent since the last Sync (a pipeline is never split
//! between servers) and nothing pins the client to its server. Named prepared statements are
//! rewritten to the pool's own names (see `pipeline`). On every checkout the server is given
//! the client's settings (see `state`). In session mode the server stays until the client
//! leaves and statements are not rewritten.
//!
//! Every checkout goes through the router (see `checkout`). While a server is held, the relay
//! also watches the view: when the node it writes to no longer leads under the current epoch
//! (a new leader, none, or a stale view), the connection is cut at once, idle or
//! mid-transaction, in both pool modes; nothing the old leader answers after that reaches the
//! client. A server lost that way, or closed, failed or ended with FATAL under the client's
//! statements, ends the client's session (57P01 when fenced) only inside a transaction block,
//! in session mode or when pinned; otherwise the statements in flight fail with 08006 and the
//! session goes on without a server (see `pipeline::lost`).
//!
//! A session ends from outside through its kill signal: at shutdown a running transaction may
//! finish first; `KILL` ends it at once. A client idle inside a transaction for longer than
//! `idle_transaction_timeout` is ended and its server closed; so is one whose query has gone
//! unanswered for `query_timeout`.

use std::time::{Duration, Instant};

use crate::tls::ClientStream;
use bytes::Buf;
use pgwarden_config::PoolMode;
use pgwarden_protocol::backend::{self, TxStatus};
use pgwarden_protocol::error_response::ErrorReport;
use pgwarden_protocol::frame::{self, message_len, MAX_MESSAGE};

mod lost;
mod routing;
mod settings;

use super::checkout::{fenced, Checkout};
use super::pipeline::{ClientStatements, Context, Pipeline};
use super::route::{self as session_route, SessionRoute};
use super::state::SessionState;
use crate::cancel::CancelSlot;
use crate::error::ProxyError;
use crate::framed::{each_message_after, each_message_from, Flow, Framed};
use crate::pool::{Lease, Usage};
use crate::prepared::StatementCache;
use crate::registry::{ClientInfo, KillReason, KillWatch};
use crate::server::simple_query;
use routing::{batch_flow, may_copy, Judge};
use settings::{answer_extended_setting, answer_proxy_setting};

const RESET_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Forwarder<'a> {
    pub client: &'a mut Framed<ClientStream>,
    /// Routes and checks out every server (and says whether a held one may go on).
    pub checkout: Checkout<'a>,
    pub slot: &'a CancelSlot,
    pub mode: PoolMode,
    pub statement_capacity: usize,
    /// This client's registry entry (state for `SHOW CLIENTS`, kill signal).
    pub me: &'a ClientInfo,
    pub idle_transaction_timeout: Option<Duration>,
    pub query_timeout: Option<Duration>,
    /// Where reads go and what they must see, for this session.
    pub route: SessionRoute,
}

/// The client's state that outlives any one server connection.
struct Client {
    pipeline: Pipeline,
    statements: ClientStatements,
    session: SessionState,
    /// What the current checkout has done, for the pool's stats.
    usage: Usage,
    /// When the oldest unanswered query was sent, and when the current transaction began.
    query_started: Option<Instant>,
    xact_started: Option<Instant>,
    /// When the last ReadyForQuery came (the server is given back at about that time).
    ready_at: Option<Instant>,
    /// Bytes of a large server message still to pass straight on (see `stream_large`).
    streaming: usize,
    /// Its server was lost in the middle of an extended-protocol batch: the rest of the batch,
    /// up to its Sync, is skipped (see [`Forwarder::lose_server`]).
    skip_to_sync: bool,
    /// On a replica, outside a transaction: a copy of the reads sent since the checkout, sent
    /// again elsewhere if the replica is lost before it answers anything.
    replay: Option<Vec<u8>>,
    /// Reads sent again for the batch now in flight.
    replays: u8,
    /// The batch at the front was judged when the server was checked out for it: it is not
    /// judged again on the way (until it has been sent).
    front_judged: bool,
    /// The batch being sent may run a COPY (no position query may follow it: the server could
    /// be in copy mode).
    batch_copy: bool,
}

impl Client {
    /// A server message on its way to the client: queries and transactions are counted at
    /// ReadyForQuery.
    fn count_response(&mut self, frame: &[u8]) {
        self.usage.bytes_sent += frame.len() as u64;
        if frame[0] != b'Z' {
            return;
        }
        let now = Instant::now();
        self.ready_at = Some(now);
        self.usage.queries += 1;
        let query = self.query_started.take();
        let query_micros = query.map(|t| now.duration_since(t).as_micros() as u64);
        self.usage.query_micros += query_micros.unwrap_or(0);
        if frame.get(5) == Some(&b'I') {
            self.usage.transactions += 1;
            if let Some(t) = self.xact_started.take() {
                // A transaction of one query (the usual) took as long as its query.
                self.usage.xact_micros += match query_micros {
                    Some(q) if query == Some(t) => q,
                    _ => now.duration_since(t).as_micros() as u64,
                };
            }
        }
    }

    /// Client messages are about to go to the server (`known`: a clock reading from just now).
    fn count_sending(&mut self, known: Option<Instant>) {
        if self.query_started.is_none() {
            let now = known.unwrap_or_else(Instant::now);
            self.query_started = Some(now);
            self.xact_started.get_or_insert(now);
        }
    }

    fn cx<'a>(
        &'a mut self,
        cache: &'a crate::prepared::StatementCache,
        capacity: usize,
    ) -> (&'a mut Pipeline, Context<'a>) {
        (
            &mut self.pipeline,
            Context {
                statements: &mut self.statements,
                session: &mut self.session,
                cache,
                capacity,
            },
        )
    }
}

impl Forwarder<'_> {
    /// Runs until the client leaves (Ok) or something breaks (Err).
    pub async fn run(mut self, session: SessionState) -> Result<(), ProxyError> {
        let mut lease: Option<Lease> = None;
        let mut c = Client {
            pipeline: Pipeline::default(),
            statements: ClientStatements::default(),
            session,
            usage: Usage::default(),
            query_started: None,
            xact_started: None,
            ready_at: None,
            streaming: 0,
            skip_to_sync: false,
            replay: None,
            replays: 0,
            batch_copy: false,
            front_judged: false,
        };
        let mut route = std::mem::replace(
            &mut self.route,
            SessionRoute::new(&pgwarden_config::RoutingConfig::default()),
        );
        let result = self.relay(&mut lease, &mut c, &mut route).await;
        if let Some(l) = lease.take() {
            self.give_back(l, &mut c).await;
        }
        self.me.set_idle();
        result
    }

    fn capacity(&self) -> usize {
        match self.mode {
            PoolMode::Transaction => self.statement_capacity,
            PoolMode::Session => 0,
        }
    }

    async fn relay(
        &mut self,
        lease: &mut Option<Lease>,
        c: &mut Client,
        route: &mut SessionRoute,
    ) -> Result<(), ProxyError> {
        let capacity = self.capacity();
        let group = self.checkout.group;
        let cache: &StatementCache = &group.common.statements;
        let topology = self.checkout.topology;
        let me = self.me;
        // Registered once for the whole session, not once per wait.
        let mut shutdown = me.kill.watch(KillReason::Shutdown);
        let mut admin_kill = me.kill.watch(KillReason::Admin);
        let mut view_changed = topology.watch(self.checkout.generation());
        loop {
            // The checkout's clock reading, for the query it was made for.
            let mut checked_out = None;
            if lease.is_none() {
                // Idle: wait for the client to need a server (its message stays buffered).
                let tag = self.next_needing_server(c, route, &mut shutdown).await?;
                if tag == b'X' {
                    return Ok(());
                }
                let lookup = self.prepare_route(c, route);
                let now = self.checkout.now();
                let l = match now {
                    Some(l) => {
                        self.me.set_requested(l.at);
                        l
                    }
                    None => match self.wait_for_server(&mut shutdown).await {
                        Ok(l) => l,
                        Err(
                            e @ (ProxyError::CancelledWaiting
                            | ProxyError::Unavailable { .. }
                            | ProxyError::ServerIo(_)
                            | ProxyError::ServerClosed),
                        ) => {
                            // The statement fails; the session goes on (a client can retry
                            // once the cluster has a leader again). So it does when a new
                            // server connection broke during its login (a node dying).
                            tracing::debug!(session = self.me.id, error = %e, "statement refused");
                            self.answer_failed(&e).await?;
                            continue;
                        }
                        Err(e) => return Err(e),
                    },
                };
                // Cancels now go to this server (once any still being delivered to the last
                // one is through).
                let server = Some((l.conn.target.clone(), l.conn.key));
                if let Err(server) = self.slot.try_set_server(server) {
                    self.slot.set_server(server).await;
                }
                l.conn.info.set_active(self.me.id, self.me.request_us());
                self.me.set_active(l.conn.info.id);
                checked_out = Some(l.at);
                view_changed.seen(self.checkout.generation());
                let mut l = l;
                self.routed(route, &mut l, &lookup).await;
                c.front_judged = true;
                c.replay = self
                    .checkout
                    .held
                    .as_ref()
                    .is_some_and(|h| h.replica)
                    .then(Vec::new);
                let conn = &mut lease.insert(l).conn;
                if let Some(sql) = c.session.sync(&mut conn.applied) {
                    c.pipeline.send_internal(&sql, conn);
                }
            }
            let conn = &mut lease.as_mut().expect("a server is attached here").conn;
            // Everything the client has already sent goes to the server, handled where it lies
            // in the read buffer (taken out meanwhile). Terminate stops it.
            let mut rbuf = std::mem::take(&mut self.client.rbuf);
            // Express batches first (see `pipeline::express`): whole, in one copy.
            let mut express = 0;
            let watch_batches = self.watches_batches(route, c);
            let config = watch_batches.then(|| self.me_config());
            let functions = &group.common.functions;
            let allowed: &[String] = config
                .as_ref()
                .map_or(&[], |j| &j.proxy.routing.read_only_functions);
            let held = self.checkout.held.clone();
            // Commit positions are read in the same write as the batch, when they are needed.
            let positions = route.consistency == pgwarden_config::Consistency::Session
                && self.mode == PoolMode::Transaction
                && held.as_ref().is_some_and(|h| !h.replica)
                && c.session.pinned().is_none()
                && self.checkout.nodes().is_some();
            let judge = Judge {
                functions,
                allowed,
                nodes: self.checkout.nodes(),
            };
            while !c.session.is_dirty() {
                if watch_batches
                    && batch_flow(
                        held.as_ref(),
                        c,
                        route,
                        &rbuf[express..],
                        conn.status,
                        &Judge {
                            nodes: None,
                            ..judge
                        },
                    ) == Flow::Hold
                {
                    break;
                }
                let (pipeline, cx) = c.cx(cache, capacity);
                let n = pipeline.send_express(&rbuf[express..], conn, &cx);
                if n == 0 {
                    break;
                }
                express += n;
                c.front_judged = false;
                if positions && route.wrote && conn.status == TxStatus::Idle {
                    c.pipeline.send_position_query(conn);
                }
            }
            c.usage.bytes_received += express as u64;
            if let Some(r) = &mut c.replay {
                r.extend_from_slice(&rbuf[..express]);
            }
            let sent = each_message_from(
                &mut rbuf,
                express,
                ProxyError::ClientProtocol,
                |frame, rest| {
                    if frame[0] == b'X' {
                        return Ok(Flow::Stop);
                    }
                    if watch_batches && !c.pipeline.in_batch() {
                        let flow = batch_flow(held.as_ref(), c, route, rest, conn.status, &judge);
                        if flow == Flow::Hold {
                            return Ok(Flow::Hold);
                        }
                    }
                    if c.session.is_dirty() && c.pipeline.settled() && conn.status == TxStatus::Idle
                    {
                        if let Some(sql) = c.session.sync(&mut conn.applied) {
                            c.pipeline.send_internal(&sql, conn);
                        }
                    }
                    c.usage.bytes_received += frame.len() as u64;
                    if let Some(r) = &mut c.replay {
                        let names = matches!(frame[0], b'P') && frame.get(5) != Some(&0);
                        if names || matches!(frame[0], b'C' | b'F' | b'd' | b'c' | b'f') {
                            c.replay = None;
                        } else {
                            r.extend_from_slice(frame);
                        }
                    }
                    if positions && may_copy(frame, &c.statements) {
                        c.batch_copy = true;
                    }
                    let (pipeline, mut cx) = c.cx(cache, capacity);
                    pipeline.send(frame, conn, &mut cx)?;
                    // Behind an autocommit batch that may have written: its commit position,
                    // in the same write.
                    if matches!(frame[0], b'Q' | b'S') {
                        c.front_judged = false;
                    }
                    if positions && matches!(frame[0], b'Q' | b'S') {
                        if route.wrote
                            && !c.batch_copy
                            && conn.status == TxStatus::Idle
                            && !c.pipeline.in_batch()
                        {
                            c.pipeline.send_position_query(conn);
                        }
                        c.batch_copy = false;
                    }
                    Ok(Flow::Next)
                },
            );
            self.client.rbuf = rbuf;
            let sent = sent?;
            if sent == Flow::Stop {
                // Terminate: what was sent before it still goes.
                conn.framed.flush().await?;
                return Ok(());
            }
            if sent == Flow::Hold
                && c.pipeline.settled()
                && conn.framed.wbuf.is_empty()
                && conn.status == TxStatus::Idle
            {
                // A write for a replica with nothing in flight there: the replica goes back
                // now, and the write is routed anew.
                let l = lease.take().expect("a server is attached here");
                if let Err(unset) = self.slot.try_set_server(None) {
                    self.slot.set_server(unset).await;
                }
                c.replay = None;
                c.replays = 0;
                self.back_to_pool(l, c);
                continue;
            }
            c.pipeline.emit_injects(conn.status, &mut self.client.wbuf);
            // Writes are tried without a future first (`flush_now`): the socket nearly always
            // takes everything at once.
            if !conn.framed.wbuf.is_empty() {
                c.count_sending(checked_out);
                let flushed = match conn.framed.flush_now() {
                    Ok(false) => conn.framed.flush_rest().await,
                    other => other.map(|_| ()),
                };
                if let Err(e) = flushed {
                    self.lose_server(lease, c, e).await?;
                    continue;
                }
            }
            if !self.client.flush_now()? {
                self.client.flush_rest().await?;
            }
            // A query the server has not answered gets a bound, if configured.
            let query_deadline = match (self.query_timeout, c.query_started) {
                (Some(t), Some(sent)) if !c.pipeline.settled() => sent.checked_add(t),
                _ => None,
            };
            // A client idle inside a transaction holds its server: that gets a bound.
            // (Never both: one waits on the server, the other on the client.)
            let idle_in_tx = match self.idle_transaction_timeout {
                Some(t) if conn.status != TxStatus::Idle && c.pipeline.settled() => Some(t),
                _ => None,
            };
            let timer = match (query_deadline, idle_in_tx) {
                (Some(at), _) => Some((at, Timer::Query)),
                (None, Some(t)) => Some((Instant::now() + t, Timer::IdleInTransaction)),
                (None, None) => None,
            };
            let mut fired = None;
            let mut server_failed = None;
            // The view watch comes last: fencing does not depend on the order (the generation
            // is checked below after every wake-up), and a wake-up for the server's answer
            // then returns before polling it.
            tokio::select! {
                biased;
                r = conn.framed.fill() => server_failed = r.err(),
                r = self.client.fill() => r?,
                _ = &mut admin_kill => return Err(ProxyError::Killed),
                _ = sleep_until_or_never(timer.map(|(at, _)| at)) => fired = timer.map(|(_, t)| t),
                g = &mut view_changed => view_changed.seen(g),
            }
            if let Some(e) = server_failed {
                self.lose_server(lease, c, e).await?;
                continue;
            }
            if fired == Some(Timer::IdleInTransaction) {
                return Err(ProxyError::IdleInTransaction(
                    idle_in_tx.unwrap_or_default(),
                ));
            }
            if fired == Some(Timer::Query) {
                // The server may be gone or frozen: its query is cancelled (best effort, in the
                // background) and the connection closed, never pooled.
                let l = lease.take().expect("a server is attached here");
                tracing::info!(session = me.id, node = %l.pool.key.node, "query_timeout: cancelling the query and closing its server connection");
                let (target, key) = (l.conn.target.clone(), l.conn.key);
                tokio::spawn(async move {
                    crate::cancel::cancel_server(&target, key, RESET_TIMEOUT).await;
                });
                self.drop_server(l, c).await;
                return Err(ProxyError::QueryTimedOut(
                    self.query_timeout.unwrap_or_default(),
                ));
            }
            // Fencing: checked after every wake-up, before anything the server said is passed
            // on (one atomic load while the view is unchanged).
            if topology.generation() != self.checkout.generation() {
                let held = lease.as_ref().expect("a server is attached here");
                if !self.checkout.may_serve(held) {
                    let e = fenced(held);
                    tracing::info!(node = %held.pool.key.node, epoch = %held.conn.epoch, session = me.id, "the node no longer leads: cutting the session's server connection");
                    self.lose_server(lease, c, e).await?;
                    continue;
                }
            }
            let conn = &mut lease.as_mut().expect("a server is attached here").conn;
            // Server messages are handled where they lie in the read buffer (taken out of the
            // connection meanwhile).
            let mut rbuf = std::mem::take(&mut conn.framed.rbuf);
            // The rest of a large message being streamed goes on as it comes.
            if c.streaming > 0 {
                let k = c.streaming.min(rbuf.len());
                self.client.wbuf.extend_from_slice(&rbuf[..k]);
                c.usage.bytes_sent += k as u64;
                c.streaming -= k;
                if k == rbuf.len() {
                    rbuf.clear();
                } else {
                    rbuf.advance(k);
                }
            }
            // Answers that pass as they are (see `Pipeline::passing`) go in one copy.
            let passing = if c.streaming > 0 {
                0
            } else {
                c.pipeline.passing(&rbuf)
            };
            if passing > 0 {
                self.client.wbuf.extend_from_slice(&rbuf[..passing]);
                c.usage.bytes_sent += passing as u64;
            }
            let received =
                each_message_after(&mut rbuf, passing, ProxyError::ServerProtocol, |frame| {
                    let ours = c.pipeline.front_is_position();
                    let (pipeline, mut cx) = c.cx(cache, capacity);
                    pipeline.receive(frame, conn, &mut cx, &mut self.client.wbuf)?;
                    // Counted once handled: a FATAL error the client is not shown is not, nor
                    // are the answers to the proxy's position query.
                    if !ours {
                        c.count_response(frame);
                    }
                    Ok(false)
                });
            if !rbuf.is_empty() && c.streaming == 0 && received.is_ok() {
                if let Some(rest) = stream_large(&rbuf, c.pipeline.forwards_front()) {
                    // A large row or COPY chunk still arriving: passed on as it comes, not
                    // buffered whole (a 100 MB value costs a read's worth of memory).
                    self.client.wbuf.extend_from_slice(&rbuf);
                    c.usage.bytes_sent += rbuf.len() as u64;
                    c.streaming = rest;
                    rbuf.clear();
                }
            }
            conn.framed.rbuf = rbuf;
            if let Err(e @ ProxyError::ServerGone { .. }) = received {
                self.lose_server(lease, c, e).await?;
                continue;
            }
            if let Err(e) = received {
                // Whatever was passed on (e.g. the server's FATAL) reaches the client first.
                let _ = self.client.flush().await;
                return Err(e);
            }
            // The server goes back before the client is written to: its answer is complete and
            // buffered here, and the next client waiting for a server gets it a write sooner.
            if self.mode == PoolMode::Transaction
                && c.pipeline.settled()
                && conn.status == TxStatus::Idle
                && c.session.pinned().is_none()
            {
                let mut l = lease.take().expect("a server is attached here");
                if let Err(unset) = self.slot.try_set_server(None) {
                    self.slot.set_server(unset).await;
                }
                if route.wrote {
                    match c.pipeline.take_position() {
                        // Read after the checkout: `l.at` is earlier than the reading, so the
                        // sample is never taken for later than it is.
                        Some(lsn) => self.record_floor(route, &l, lsn, l.at),
                        None => self.commit_position(route, &mut l).await?,
                    }
                }
                c.replay = None;
                c.replays = 0;
                self.back_to_pool(l, c);
            }
            if !self.client.flush_now()? {
                self.client.flush_rest().await?;
            }
            // Buffers grown by a large message are given back once empty.
            self.client.shrink(LARGE_KEEP);
            if let Some(l) = lease.as_mut() {
                l.conn.framed.shrink(LARGE_KEEP);
            }
        }
    }

    /// Waits for a server (giving up if the session is told to end, or its query is cancelled,
    /// meanwhile); without one free at once (see [`Checkout::now`]).
    async fn wait_for_server(&mut self, shutdown: &mut KillWatch<'_>) -> Result<Lease, ProxyError> {
        self.me.set_waiting(Instant::now());
        self.slot.begin_wait();
        let l = tokio::select! {
            biased;
            l = self.checkout.acquire() => l,
            _ = shutdown => Err(self.killed()),
            _ = self.slot.cancelled() => Err(ProxyError::CancelledWaiting),
        };
        self.slot.end_wait();
        if l.is_err() {
            self.me.set_idle();
        }
        l
    }

    /// The query that waited for a server (the client's next message, still buffered) was
    /// cancelled, or no node can take it: it fails with `e` (57014, 57P03) and, in the
    /// extended protocol, the rest of its batch is skipped up to Sync, as on a server.
    async fn answer_failed(&mut self, e: &ProxyError) -> Result<(), ProxyError> {
        let frame = self.client.read_frame(MAX_MESSAGE).await?;
        ErrorReport::error(e.sqlstate(), &e.client_message()).put_error(&mut self.client.wbuf);
        if !matches!(frame[0], b'Q' | b'F') {
            loop {
                let f = self.client.read_frame(MAX_MESSAGE).await?;
                match f[0] {
                    b'S' => break,
                    b'X' => return Err(ProxyError::ClientClosed),
                    _ => {}
                }
            }
        }
        backend::put_ready_for_query(&mut self.client.wbuf, TxStatus::Idle);
        self.client.flush().await
    }

    /// The error that ends a session whose kill signal is raised.
    fn killed(&self) -> ProxyError {
        match self.me.kill.reason() {
            Some(KillReason::Admin) => ProxyError::Killed,
            _ => ProxyError::ShuttingDown,
        }
    }

    /// Reads client messages while no server is attached, answering those that need none (see
    /// [`Pipeline::answer_detached`]), until one needs a server (or is Terminate): that one is
    /// left complete at the front of the read buffer, and its type returned. A session told to
    /// end ends here, between transactions.
    async fn next_needing_server(
        &mut self,
        c: &mut Client,
        route: &mut SessionRoute,
        shutdown: &mut KillWatch<'_>,
    ) -> Result<u8, ProxyError> {
        let capacity = self.capacity();
        loop {
            if self.me.kill.reason().is_some() {
                self.client.flush().await?;
                return Err(self.killed());
            }
            let client = &mut *self.client;
            let Some(n) =
                message_len(&client.rbuf, MAX_MESSAGE).map_err(ProxyError::ClientProtocol)?
            else {
                if !client.wbuf.is_empty() {
                    client.flush().await?;
                }
                tokio::select! {
                    biased;
                    r = async {
                        client.wait_idle().await?;
                        client.fill().await
                    } => r?,
                    _ = &mut *shutdown => {}
                }
                continue;
            };
            let frame = &client.rbuf[..n];
            if c.skip_to_sync {
                // The rest of a batch whose server was lost: skipped, as a server skips the
                // rest of a failed batch, and its Sync answered.
                match frame[0] {
                    b'S' => {
                        c.skip_to_sync = false;
                        backend::put_ready_for_query(&mut client.wbuf, TxStatus::Idle);
                    }
                    b'X' => return Ok(b'X'),
                    _ => {}
                }
                client.rbuf.advance(n);
                continue;
            }
            if frame[0] == b'Q' {
                if let Some(setting) = session_route::proxy_setting(&frame[5..n - 1]) {
                    answer_proxy_setting(setting, route, &self.checkout, &mut client.wbuf);
                    client.rbuf.advance(n);
                    continue;
                }
            }
            if matches!(frame[0], b'P' | b'B' | b'C' | b'D') {
                if let Some(len) =
                    answer_extended_setting(&client.rbuf, route, &self.checkout, &mut client.wbuf)
                {
                    client.rbuf.advance(len);
                    continue;
                }
                if frame[0] == b'P' {
                    // A statement of the server's by a name the proxy held: the server's now.
                    route.forget_statement(&frame[5..n]);
                }
            }
            let local = self.mode == PoolMode::Transaction && {
                let (pipeline, mut cx) = c.cx(&self.checkout.group.common.statements, capacity);
                pipeline.answer_detached(frame, &mut cx, &mut client.wbuf)
            };
            if !local {
                return Ok(frame[0]);
            }
            client.rbuf.advance(n);
        }
    }

    /// Gives the server back between transactions (its cancel slot already cleared).
    fn back_to_pool(&mut self, lease: Lease, c: &mut Client) {
        self.me.set_idle();
        let now = c.ready_at.take().unwrap_or_else(Instant::now);
        let usage = std::mem::take(&mut c.usage);
        self.checkout.release(lease, &usage, now);
    }

    /// At the end of a session: a server in a clean state is pooled, reset first if the client
    /// had it to itself (session mode, or pinned); any other is closed, never returned dirty.
    async fn give_back(&mut self, mut lease: Lease, c: &mut Client) {
        self.slot.set_server(None).await;
        let usage = std::mem::take(&mut c.usage);
        let clean =
            c.pipeline.settled() && lease.conn.status == TxStatus::Idle && !lease.conn.broken;
        if !clean || !self.checkout.may_serve(&lease) {
            lease.discard(&usage);
            return;
        }
        if self.mode == PoolMode::Session || c.session.pinned().is_some() {
            let conn = &mut lease.conn;
            let reset = simple_query(conn, "DISCARD ALL", RESET_TIMEOUT).await;
            match reset {
                Ok(o) if o.error.is_none() => {
                    conn.prepared.clear();
                    conn.applied.clear();
                }
                other => {
                    tracing::debug!(outcome = ?other.map(|o| o.error), "server reset failed; closing it");
                    lease.discard(&usage);
                    return;
                }
            }
        }
        self.checkout.release(lease, &usage, Instant::now());
    }
}

/// Messages larger than this that are still arriving are streamed (see [`stream_large`]).
const STREAM_AT: usize = 64 * 1024;
/// Buffer space a session keeps between messages; a large message's is given back.
const LARGE_KEEP: usize = 256 * 1024;

/// With the start of a large DataRow or server CopyData at the front of `buf` that the
/// pipeline would only copy through (`forwarded`), the bytes of it not yet in `buf`.
fn stream_large(buf: &[u8], forwarded: bool) -> Option<usize> {
    if !forwarded || !matches!(buf.first(), Some(b'D' | b'd')) {
        return None;
    }
    let rest = frame::missing(buf)?;
    (rest > 0 && rest + buf.len() > STREAM_AT).then_some(rest)
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_or_never(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// What bounds a wait of the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    /// `query_timeout`: the server has not answered.
    Query,
    /// `idle_transaction_timeout`: the client sits inside a transaction.
    IdleInTransaction,
}
