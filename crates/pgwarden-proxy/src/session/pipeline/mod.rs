//! The messages in flight on one server connection: rewriting named statements, tracking what
//! statements do to session state, and the proxy's own queries.
//!
//! Every client message that expects an answer has an entry in a queue, in order; so has every
//! message the proxy adds (a Parse before a Bind, a Close to evict, a query restoring session
//! state) and every answer the proxy gives itself (ParseComplete for a statement the server
//! already has, CloseComplete, a DEALLOCATE's CommandComplete). Server responses are matched
//! to the front of the queue. After an error in an extended-protocol batch the server skips
//! everything up to Sync; the queue drops those entries too and undoes what they registered.
//!
//! - `statements` — named statements rewritten to the pool's (transaction mode), and what is
//!   answered without a server.
//! - `stale` — recovering from a stale plan.
//! - `express` — a whole batch of unnamed statements that needs no entry per message.

mod express;
mod lost;
mod stale;
mod statements;

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use pgwarden_protocol::backend::{self, BackendMessage, TxStatus};
use pgwarden_protocol::frame::split;
use pgwarden_protocol::frontend::{self, FrontendMessage};
use pgwarden_protocol::SqlState;
use pgwarden_sql::{classify_query_bytes, Effect};

use super::retry::Batches;
use super::state::SessionState;
use crate::error::ProxyError;
use crate::prepared::{deallocate, Deallocate, FastMap, Statement, StatementCache};
use crate::server::ServerConn;

/// A client's own statement names.
pub type ClientStatements = FastMap<String, Arc<Statement>>;

/// What to undo if a message never takes effect.
#[derive(Debug)]
enum Undo {
    Unregister(String),
    Reregister(String, Arc<Statement>),
    ServerForget(String),
    /// A Close of a stale statement that the server skipped: it is still to be closed.
    CloseLater(String),
}

#[derive(Debug)]
enum Pending {
    /// A client message sent on; its responses go to the client. `stmt`: the statement of ours
    /// it parses (validated when the server answers ParseComplete), binds or describes (dropped
    /// from the server when its plan turns out stale). `effects`: what the statements it runs
    /// do to session state, the next one last.
    Forward {
        tag: u8,
        undo: Vec<Undo>,
        stmt: Option<Arc<Statement>>,
        effects: Vec<Effect>,
    },
    /// Our own Parse ('1') or Close ('3'); the client must not see the answer.
    Swallow {
        expect: u8,
        undo: Vec<Undo>,
        parsed: Option<Arc<Statement>>,
    },
    /// An answer the proxy gives for a message it did not send on.
    Inject { response: Bytes, undo: Vec<Undo> },
    /// A simple query the proxy answers itself: CommandComplete with `tag`, then ReadyForQuery
    /// with the status the responses before it leave.
    InjectQuery { tag: &'static str },
    /// Our own query (restoring session state): everything up to its ReadyForQuery is
    /// swallowed; an error ends the session.
    Internal { error: Option<(SqlState, String)> },
    /// Our `pg_current_wal_insert_lsn()` after a client's batch (see `position`): its row is
    /// kept, everything up to its ReadyForQuery swallowed, an error ignored.
    Position {
        lsn: Option<pgwarden_core::Lsn>,
        /// `ends` when it was sent: it follows that many of the client's batches.
        after: u64,
    },
    /// The ReadyForQuery of a batch being sent again (see `retry`): not for the client.
    SwallowReady,
    /// One message of this type the client already has (a retried Describe's
    /// ParameterDescription, sent before its plan failed).
    SwallowTag(u8),
    /// Where the client ended a COPY FROM STDIN (CopyDone or CopyFail): answers nothing itself,
    /// but Syncs sent between the COPY and here are ignored by the server.
    CopyEnd,
}

impl Pending {
    /// Drops an answered entry. Nearly all are a plain Forward that owns nothing (vectors that
    /// never allocated, no statement): that one is forgotten, which frees nothing because
    /// there is nothing to free, and skips the general drop glue (a call per field, ~80
    /// instructions, five times per extended-protocol transaction).
    fn done(self) {
        match &self {
            Pending::Forward {
                undo,
                stmt: None,
                effects,
                ..
            } if undo.capacity() == 0 && effects.capacity() == 0 => std::mem::forget(self),
            _ => drop(self),
        }
    }

    fn forward(tag: u8) -> Pending {
        Pending::Forward {
            tag,
            undo: vec![],
            stmt: None,
            effects: vec![],
        }
    }
}

#[derive(Debug, Default)]
pub struct Pipeline {
    queue: VecDeque<Pending>,
    /// Extended-protocol messages sent since the last Sync.
    in_batch: bool,
    /// Session effects of the client's statements ("" = unnamed) and portals, for those that
    /// have one.
    statement_effects: FastMap<String, Effect>,
    portal_effects: FastMap<String, Effect>,
    /// Unanswered extended-protocol batches, for sending one again (transaction mode).
    batches: Batches,
    /// The query text last classified for session effects, and its effect.
    last_classified: Option<statements::Classified>,
    /// Statements of ours whose plan went stale on this server, to close once the batch is
    /// over (no longer in the server's `prepared`, but still on the server).
    stale: Vec<String>,
    /// The server is in COPY FROM STDIN mode and the client has not ended it yet: a Sync sent
    /// now is ignored by the server.
    copy_in: bool,
    /// The WAL position read by our last position query that ran outside a transaction (so
    /// after the client's batch before it had committed), until taken.
    position: Option<(pgwarden_core::Lsn, u64)>,
    /// The client's batches sent (each Query and Sync ends one).
    ends: u64,
}

/// The client's side of things, for sending and receiving.
pub struct Context<'a> {
    pub statements: &'a mut ClientStatements,
    pub session: &'a mut SessionState,
    pub cache: &'a StatementCache,
    /// 0: statements are passed through unchanged (session mode).
    pub capacity: usize,
}

fn response(put: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut b = BytesMut::new();
    put(&mut b);
    b.freeze()
}

fn client_protocol(e: pgwarden_protocol::ProtocolError) -> ProxyError {
    ProxyError::ClientProtocol(e)
}

impl Pipeline {
    /// The message at the front is a client's, whose answers go to the client as they are.
    pub fn forwards_front(&self) -> bool {
        matches!(self.queue.front(), Some(Pending::Forward { .. }))
    }

    /// Extended-protocol messages have been sent since the last Sync (or a COPY is under way):
    /// the next message is not the start of a batch.
    pub fn in_batch(&self) -> bool {
        self.in_batch || self.copy_in
    }

    /// Nothing in flight and no half-sent batch: the server can be given back.
    pub fn settled(&self) -> bool {
        self.queue.is_empty() && !self.in_batch
    }

    /// Sends `pg_current_wal_insert_lsn()` behind what the client sent, in the same write: its
    /// answer comes right behind the client's, with no round trip of its own. Only at a batch
    /// boundary.
    pub fn send_position_query(&mut self, conn: &mut ServerConn) {
        debug_assert!(!self.in_batch && !self.copy_in);
        frontend::put_query(&mut conn.framed.wbuf, crate::server::INSERT_LSN);
        self.queue.push_back(Pending::Position {
            lsn: None,
            after: self.ends,
        });
    }

    /// The position read right after the client's last batch, if that batch left no
    /// transaction open (so whatever it wrote had committed before the position was read).
    pub fn take_position(&mut self) -> Option<pgwarden_core::Lsn> {
        let (lsn, after) = self.position.take()?;
        (after == self.ends).then_some(lsn)
    }

    /// The message at the front is our position query's.
    pub fn front_is_position(&self) -> bool {
        matches!(self.queue.front(), Some(Pending::Position { .. }))
    }

    /// Sends a query of the proxy's own (restoring session state) ahead of what follows.
    pub fn send_internal(&mut self, sql: &str, conn: &mut ServerConn) {
        frontend::put_query(&mut conn.framed.wbuf, sql);
        self.queue.push_back(Pending::Internal { error: None });
    }

    /// Sends a client message to `conn`, rewritten as needed.
    pub fn send(
        &mut self,
        frame: &[u8],
        conn: &mut ServerConn,
        cx: &mut Context<'_>,
    ) -> Result<(), ProxyError> {
        let (tag, body) = split(frame);
        match tag {
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => self.in_batch = true,
            b'S' => {
                self.in_batch = false;
                self.ends += 1;
            }
            b'Q' => self.ends += 1,
            b'F' | b'd' | b'c' | b'f' => {}
            // Not a message a client may send now: refused here, as PostgreSQL would refuse it,
            // rather than passed to a server whose answer nothing waits for.
            other => {
                return Err(ProxyError::ClientProtocol(
                    pgwarden_protocol::ProtocolError::Invalid {
                        what: "message",
                        detail: format!("invalid frontend message type {other}"),
                    },
                ))
            }
        }
        match tag {
            b'c' | b'f' => {
                self.copy_in = false;
                conn.framed.wbuf.extend_from_slice(frame);
                self.queue.push_back(Pending::CopyEnd);
                return Ok(());
            }
            b'S' if self.copy_in => {
                // Ignored by the server in copy-in mode: no ReadyForQuery will answer it.
                conn.framed.wbuf.extend_from_slice(frame);
                return Ok(());
            }
            _ => {}
        }
        if cx.capacity > 0 {
            self.batches.sent(tag, frame);
        }
        match tag {
            b'Q' => self.send_query(frame, body, conn, cx),
            b'P' => self.send_parse(frame, body, conn, cx),
            b'B' => self.send_bind(frame, body, conn, cx),
            b'E' => self.send_execute(frame, body, conn, cx),
            b'D' if cx.capacity > 0 => self.send_describe(frame, body, conn, cx),
            b'C' => self.send_close(frame, body, conn, cx),
            _ => {
                self.forward_as_is(tag, frame, conn);
                Ok(())
            }
        }
    }

    fn send_query(
        &mut self,
        frame: &[u8],
        body: &[u8],
        conn: &mut ServerConn,
        cx: &mut Context<'_>,
    ) -> Result<(), ProxyError> {
        let FrontendMessage::Query(sql) =
            FrontendMessage::parse(b'Q', body).map_err(client_protocol)?
        else {
            unreachable!("a Q frame parses as a Query");
        };
        let mut effects = classify_query_bytes(sql);
        for e in &effects {
            cx.session.sent(e);
        }
        if cx.capacity > 0 {
            match deallocate(sql) {
                // Server-side statements belong to the pool: only the client's names go.
                Some(Deallocate::One(name)) if cx.statements.contains_key(name) => {
                    cx.statements.remove(name);
                    self.queue
                        .push_back(Pending::InjectQuery { tag: "DEALLOCATE" });
                    return Ok(());
                }
                Some(Deallocate::All) if cx.session.pinned().is_none() => {
                    cx.statements.clear();
                    self.queue.push_back(Pending::InjectQuery {
                        tag: "DEALLOCATE ALL",
                    });
                    return Ok(());
                }
                Some(Deallocate::All | Deallocate::Discard) => {
                    cx.statements.clear();
                    conn.prepared.clear();
                }
                _ => {}
            }
        }
        conn.framed.wbuf.extend_from_slice(frame);
        effects.reverse();
        self.queue.push_back(Pending::Forward {
            tag: b'Q',
            undo: vec![],
            stmt: None,
            effects,
        });
        Ok(())
    }

    fn send_execute(
        &mut self,
        frame: &[u8],
        body: &[u8],
        conn: &mut ServerConn,
        cx: &mut Context<'_>,
    ) -> Result<(), ProxyError> {
        let mut effects = Vec::new();
        if !self.portal_effects.is_empty() {
            if let FrontendMessage::Execute { portal, .. } =
                FrontendMessage::parse(b'E', body).map_err(client_protocol)?
            {
                if let Some(e) = self.portal_effects.get(portal) {
                    cx.session.sent(e);
                    effects.push(e.clone());
                }
            }
        }
        conn.framed.wbuf.extend_from_slice(frame);
        self.queue.push_back(Pending::Forward {
            tag: b'E',
            undo: vec![],
            stmt: None,
            effects,
        });
        Ok(())
    }

    fn forward_as_is(&mut self, tag: u8, frame: &[u8], conn: &mut ServerConn) {
        conn.framed.wbuf.extend_from_slice(frame);
        if answers(tag) {
            self.queue.push_back(Pending::forward(tag));
        }
    }

    /// Handles one server message: what reaches the client goes into `client_out`.
    pub fn receive(
        &mut self,
        frame: &[u8],
        conn: &mut ServerConn,
        cx: &mut Context<'_>,
        client_out: &mut BytesMut,
    ) -> Result<(), ProxyError> {
        // The bulk of a result: a DataRow answering a client's Execute or query goes straight
        // through (it completes nothing and changes nothing).
        if frame[0] == b'D' && matches!(self.queue.front(), Some(Pending::Forward { .. })) {
            client_out.extend_from_slice(frame);
            return Ok(());
        }
        // The other common answers to a client's message that touch no session state: passed
        // on, completing their entry where they do (as `receive_response` below would).
        // So is a CommandComplete of a statement that changes no session state.
        let plain_complete = || {
            matches!(
                self.queue.front(),
                Some(Pending::Forward { effects, .. }) if effects.is_empty()
            )
        };
        if (matches!(frame[0], b'1' | b'2' | b'T' | b't' | b'n' | b's' | b'I')
            || (frame[0] == b'C' && plain_complete()))
            && self.pass_forwarded(frame[0], frame, client_out)
        {
            if frame[0] == b'2' {
                self.batches.bound();
            }
            self.emit_injects(conn.status, client_out);
            return Ok(());
        }
        self.emit_injects(conn.status, client_out);
        let (tag, body) = split(frame);
        if let Some(Pending::Internal { .. }) = self.queue.front() {
            return self.receive_internal(tag, body, frame, conn, client_out);
        }
        if let Some(Pending::Position { lsn, .. }) = self.queue.front_mut() {
            match tag {
                b'A' => client_out.extend_from_slice(frame),
                b'D' => {
                    *lsn =
                        pgwarden_protocol::backend::first_text(body).and_then(|t| t.parse().ok());
                }
                b'Z' => {
                    let status = match body {
                        b"I" => TxStatus::Idle,
                        b"T" => TxStatus::InTransaction,
                        _ => TxStatus::Failed,
                    };
                    conn.status = status;
                    if let Some(Pending::Position { lsn, after }) = self.queue.pop_front() {
                        // Outside a transaction, the client's batch before it had committed.
                        if let (TxStatus::Idle, Some(lsn)) = (status, lsn) {
                            self.position = Some((lsn, after));
                        }
                    }
                }
                _ => {}
            }
            return Ok(());
        }
        match tag {
            // Asynchronous: notices, notifications, parameter changes.
            b'N' | b'A' => client_out.extend_from_slice(frame),
            b'S' => {
                if let BackendMessage::ParameterStatus { name, value } =
                    BackendMessage::parse(tag, body).map_err(ProxyError::ServerProtocol)?
                {
                    conn.params.insert(name.to_string(), value.to_string());
                }
                client_out.extend_from_slice(frame);
            }
            b'Z' => {
                let status = match body {
                    b"I" => TxStatus::Idle,
                    b"T" => TxStatus::InTransaction,
                    b"E" => TxStatus::Failed,
                    // Malformed: the decoder says how.
                    _ => match BackendMessage::parse(tag, body)
                        .map_err(ProxyError::ServerProtocol)?
                    {
                        BackendMessage::ReadyForQuery(status) => status,
                        _ => unreachable!("a Z frame parses as ReadyForQuery"),
                    },
                };
                conn.status = status;
                if matches!(self.queue.front(), Some(Pending::SwallowReady)) {
                    self.queue.pop_front();
                    return Ok(());
                }
                cx.session.ready(status, &mut conn.applied);
                // Everything up to and including the Sync/Query this answers is done.
                while let Some(p) = self.queue.pop_front() {
                    if let Pending::Forward {
                        tag: done @ (b'S' | b'Q' | b'F'),
                        ..
                    } = p
                    {
                        if done == b'S' {
                            self.batches.done();
                        }
                        p.done();
                        break;
                    }
                    self.skipped(p, conn, cx.statements);
                }
                if !self.stale.is_empty() {
                    self.close_stale(conn);
                }
                client_out.extend_from_slice(frame);
            }
            b'E' => {
                if is_fatal(body) && self.outlives_server(conn.status, cx.session, cx.capacity) {
                    // The server is closing this connection, but the client's session goes on
                    // (see `lost`): it is not shown the FATAL error.
                    conn.broken = true;
                    let e = pgwarden_protocol::error_response::ErrorFields::parse(body).ok();
                    return Err(ProxyError::ServerGone {
                        message: e
                            .and_then(|e| e.message())
                            .unwrap_or("FATAL error")
                            .to_string(),
                    });
                }
                if let Some((failed, stmt)) = self.stale_statement(body) {
                    if self.retry_stale_plan(failed, &stmt, conn, cx)? {
                        return Ok(());
                    }
                    // Not retried. The server keeps the stale statement until the batch is
                    // over (a Close now would be skipped with the rest of it): it is closed
                    // then, or just before this server is asked to prepare it again, which the
                    // client's next use or new Parse does, even if sent before that.
                    conn.prepared.remove(&stmt.server_name);
                    if !self.stale.contains(&stmt.server_name) {
                        self.stale.push(stmt.server_name.clone());
                    }
                }
                cx.session.error();
                match self.client_facing_error(body, cx.statements) {
                    Some(rewritten) => client_out.extend_from_slice(&rewritten),
                    None => client_out.extend_from_slice(frame),
                }
                if is_fatal(body) {
                    // The server is closing this connection: the client's session ends with it,
                    // as it would without a proxy.
                    conn.broken = true;
                    return Err(ProxyError::ServerFatal);
                }
                match self.queue.front() {
                    // A simple query (or function call) goes on to its ReadyForQuery; so does a
                    // Sync whose own implicit commit failed (a deferred constraint).
                    Some(Pending::Forward {
                        tag: b'Q' | b'F' | b'S',
                        ..
                    })
                    | None => {}
                    Some(_) => {
                        let failed = self.queue.pop_front().expect("front exists");
                        self.skipped(failed, conn, cx.statements);
                        // The server now skips to Sync; so do we.
                        while let Some(p) = self.queue.front() {
                            if matches!(p, Pending::Forward { tag: b'S', .. }) {
                                break;
                            }
                            let p = self.queue.pop_front().expect("front exists");
                            self.skipped(p, conn, cx.statements);
                        }
                    }
                }
            }
            b'C' => {
                if let Some(Pending::Forward { effects, .. }) = self.queue.front_mut() {
                    if let Some(e) = effects.pop() {
                        cx.session.executed(&e, &mut conn.applied);
                    }
                }
                self.receive_response(tag, frame, client_out);
            }
            b'G' => {
                self.copy_in_started();
                self.receive_response(tag, frame, client_out);
            }
            _ => {
                if tag == b'2' {
                    self.batches.bound();
                }
                self.receive_response(tag, frame, client_out)
            }
        }
        self.emit_injects(conn.status, client_out);
        Ok(())
    }

    /// An error about one of our statements names it as the server knows it (`pgwarden_N`);
    /// the client gets it with its own name instead. `None`: nothing to change.
    fn client_facing_error(&self, body: &[u8], statements: &ClientStatements) -> Option<Bytes> {
        let Some(Pending::Forward {
            tag: b'B' | b'D',
            stmt: Some(stmt),
            ..
        }) = self.queue.front()
        else {
            return None;
        };
        let quoted = format!("\"{}\"", stmt.server_name);
        let fields = pgwarden_protocol::error_response::ErrorFields::parse(body).ok()?;
        if !fields.iter().any(|(_, v)| v.contains(&quoted)) {
            return None;
        }
        let (client_name, _) = statements.iter().find(|(_, s)| Arc::ptr_eq(s, stmt))?;
        let mine = format!("\"{client_name}\"");
        let mut out = BytesMut::new();
        pgwarden_protocol::frame::put_message(&mut out, b'E', |b| {
            for (code, value) in fields.iter() {
                b.put_u8(code);
                pgwarden_protocol::frame::put_cstr(b, &value.replace(&quoted, &mine));
            }
            b.put_u8(0);
        });
        Some(out.freeze())
    }

    /// CopyInResponse to the query or Execute at the front: the server now ignores Syncs until
    /// the client's CopyDone/CopyFail, so those already queued will get no ReadyForQuery.
    fn copy_in_started(&mut self) {
        let end = self
            .queue
            .iter()
            .position(|p| matches!(p, Pending::CopyEnd))
            .unwrap_or(self.queue.len());
        let mut i = 1;
        let mut limit = end;
        while i < limit {
            if matches!(self.queue[i], Pending::Forward { tag: b'S', .. }) {
                self.queue.remove(i);
                limit -= 1;
            } else {
                i += 1;
            }
        }
        self.copy_in = end == self.queue.len();
    }

    /// A message answering the client's Forward entry at the front goes to the client, and
    /// completes the entry where it does (a ParseComplete also validates our statement). False:
    /// the front is not a Forward, and nothing was done.
    fn pass_forwarded(&mut self, tag: u8, frame: &[u8], client_out: &mut BytesMut) -> bool {
        let Some(Pending::Forward {
            tag: sent, stmt, ..
        }) = self.queue.front()
        else {
            return false;
        };
        let done = completes(*sent, tag);
        if done && tag == b'1' {
            if let Some(stmt) = stmt {
                stmt.mark_validated();
            }
        }
        client_out.extend_from_slice(frame);
        if done {
            if let Some(p) = self.queue.pop_front() {
                p.done();
            }
        }
        true
    }

    /// A response to the message at the front of the queue.
    fn receive_response(&mut self, tag: u8, frame: &[u8], client_out: &mut BytesMut) {
        match self.queue.front() {
            Some(Pending::SwallowTag(t)) if *t == tag => {
                self.queue.pop_front();
            }
            Some(Pending::Swallow { expect, parsed, .. }) if *expect == tag => {
                if let Some(stmt) = parsed {
                    stmt.mark_validated();
                }
                self.queue.pop_front();
            }
            _ => {
                if !self.pass_forwarded(tag, frame, client_out) {
                    client_out.extend_from_slice(frame);
                }
            }
        }
    }

    /// A response to our own query: swallowed, but parameters are tracked and an error ends
    /// the session once the query is over.
    fn receive_internal(
        &mut self,
        tag: u8,
        body: &[u8],
        frame: &[u8],
        conn: &mut ServerConn,
        client_out: &mut BytesMut,
    ) -> Result<(), ProxyError> {
        match tag {
            b'A' => client_out.extend_from_slice(frame),
            b'S' | b'E' | b'Z' => {
                match BackendMessage::parse(tag, body).map_err(ProxyError::ServerProtocol)? {
                    BackendMessage::ParameterStatus { name, value } => {
                        conn.params.insert(name.to_string(), value.to_string());
                    }
                    BackendMessage::ErrorResponse(e) => {
                        if let Some(Pending::Internal {
                            error: error @ None,
                        }) = self.queue.front_mut()
                        {
                            *error = Some((
                                e.code().unwrap_or(SqlState::INTERNAL_ERROR),
                                e.message().unwrap_or("error").to_string(),
                            ));
                        }
                    }
                    BackendMessage::ReadyForQuery(status) => {
                        conn.status = status;
                        if let Some(Pending::Internal {
                            error: Some((code, message)),
                        }) = self.queue.pop_front()
                        {
                            conn.broken = true;
                            return Err(ProxyError::RestoreFailed { code, message });
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        self.emit_injects(conn.status, client_out);
        Ok(())
    }

    /// Sends the proxy's own answers that are next in line.
    #[inline]
    pub fn emit_injects(&mut self, status: TxStatus, client_out: &mut BytesMut) {
        if matches!(
            self.queue.front(),
            Some(Pending::Inject { .. } | Pending::InjectQuery { .. } | Pending::CopyEnd)
        ) {
            self.emit_injects_now(status, client_out);
        }
    }

    fn emit_injects_now(&mut self, status: TxStatus, client_out: &mut BytesMut) {
        loop {
            match self.queue.front() {
                Some(Pending::Inject { response, .. }) => {
                    client_out.extend_from_slice(response);
                }
                Some(Pending::InjectQuery { tag }) => {
                    backend::put_command_complete(client_out, tag);
                    backend::put_ready_for_query(client_out, status);
                }
                Some(Pending::CopyEnd) => {}
                _ => return,
            }
            self.queue.pop_front();
        }
    }

    /// A message that failed or that the server skipped: undo what it registered.
    fn skipped(&mut self, p: Pending, conn: &mut ServerConn, statements: &mut ClientStatements) {
        let undo = match p {
            Pending::Forward { undo, .. }
            | Pending::Swallow { undo, .. }
            | Pending::Inject { undo, .. } => undo,
            Pending::InjectQuery { .. }
            | Pending::Internal { .. }
            | Pending::Position { .. }
            | Pending::SwallowReady
            | Pending::SwallowTag(_)
            | Pending::CopyEnd => return,
        };
        for u in undo {
            match u {
                Undo::Unregister(name) => {
                    statements.remove(&name);
                }
                Undo::Reregister(name, stmt) => {
                    statements.insert(name, stmt);
                }
                Undo::ServerForget(name) => conn.prepared.remove(&name),
                Undo::CloseLater(name) => self.stale.push(name),
            }
        }
    }
}

/// Whether an ErrorResponse body has severity FATAL or PANIC.
fn is_fatal(body: &[u8]) -> bool {
    match pgwarden_protocol::error_response::ErrorFields::parse(body) {
        Ok(e) => matches!(e.severity(), Some("FATAL" | "PANIC")),
        Err(_) => false,
    }
}

/// Whether a client message of type `tag` gets an answer of its own.
fn answers(tag: u8) -> bool {
    matches!(tag, b'Q' | b'F' | b'S' | b'P' | b'B' | b'D' | b'E' | b'C')
}

/// Whether server message `got` is the last answer to client message `sent`.
fn completes(sent: u8, got: u8) -> bool {
    match sent {
        b'P' => got == b'1',
        b'B' => got == b'2',
        b'C' => got == b'3',
        b'D' => got == b'T' || got == b'n',
        b'E' => matches!(got, b'C' | b'I' | b's'),
        _ => false,
    }
}
