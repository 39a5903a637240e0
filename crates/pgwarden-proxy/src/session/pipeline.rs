//! The messages in flight on one server connection: rewriting named statements, tracking what
//! statements do to session state, and the proxy's own queries.
//!
//! Every client message that expects an answer has an entry in a queue, in order; so has every
//! message the proxy adds (a Parse before a Bind, a Close to evict, a query restoring session
//! state) and every answer the proxy gives itself (ParseComplete for a statement the server
//! already has, CloseComplete, a DEALLOCATE's CommandComplete). Server responses are matched
//! to the front of the queue. After an error in an extended-protocol batch the server skips
//! everything up to Sync; the queue drops those entries too and undoes what they registered.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use pgwarden_protocol::backend::{self, BackendMessage, TxStatus};
use pgwarden_protocol::frame::split;
use pgwarden_protocol::frontend::{self, FrontendMessage, Target};
use pgwarden_protocol::SqlState;
use pgwarden_sql::{classify, classify_query, Effect};

use super::retry::{is_stale_plan, Batches};
use super::state::SessionState;
use crate::error::ProxyError;
use crate::prepared::{deallocate, Deallocate, Statement, StatementCache};
use crate::server::ServerConn;

/// A client's own statement names.
pub type ClientStatements = HashMap<String, Arc<Statement>>;

/// What to undo if a message never takes effect.
#[derive(Debug)]
enum Undo {
    Unregister(String),
    Reregister(String, Arc<Statement>),
    ServerForget(String),
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
    statement_effects: HashMap<String, Effect>,
    portal_effects: HashMap<String, Effect>,
    /// Unanswered extended-protocol batches, for sending one again (transaction mode).
    batches: Batches,
    /// Statements of ours whose plan went stale, to close once the batch is over.
    stale: Vec<String>,
    /// The server is in COPY FROM STDIN mode and the client has not ended it yet: a Sync sent
    /// now is ignored by the server.
    copy_in: bool,
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
    /// Nothing in flight and no half-sent batch: the server can be given back.
    pub fn settled(&self) -> bool {
        self.queue.is_empty() && !self.in_batch
    }

    /// Sends a query of the proxy's own (restoring session state) ahead of what follows.
    pub fn send_internal(&mut self, sql: &str, conn: &mut ServerConn) {
        frontend::put_query(&mut conn.framed.wbuf, sql);
        self.queue.push_back(Pending::Internal { error: None });
    }

    /// Sends a client message to `conn`, rewritten as needed.
    pub fn send(
        &mut self,
        frame: &Bytes,
        conn: &mut ServerConn,
        cx: &mut Context<'_>,
    ) -> Result<(), ProxyError> {
        let (tag, body) = split(frame);
        match tag {
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => self.in_batch = true,
            b'S' => self.in_batch = false,
            b'Q' | b'F' | b'd' | b'c' | b'f' => {}
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

    /// After a Bind or statement Describe of `stmt` failed with a stale plan: sends the batch
    /// again if `retry` allows (see there) and returns true; false means the error goes to the
    /// client.
    fn retry_stale_plan(
        &mut self,
        failed: u8,
        stmt: &Statement,
        conn: &mut ServerConn,
        cx: &mut Context<'_>,
    ) -> Result<bool, ProxyError> {
        // The failed batch must be the last thing in flight: its Sync ends the queue.
        let ends = |p: &Pending| {
            matches!(
                p,
                Pending::Forward {
                    tag: b'S' | b'Q' | b'F',
                    ..
                }
            )
        };
        let sync_last = matches!(self.queue.back(), Some(Pending::Forward { tag: b'S', .. }))
            && self.queue.iter().filter(|p| ends(p)).count() == 1;
        if cx.capacity == 0 || !sync_last {
            return Ok(false);
        }
        let Some(retry) = self
            .batches
            .take_retry(failed, conn.status == TxStatus::Idle)
        else {
            return Ok(false);
        };
        tracing::info!(statement = %stmt.server_name, "cached plan went stale; preparing it again and retrying once");
        // The server skips to the failed batch's Sync; its ReadyForQuery is ours.
        while let Some(p) = self.queue.pop_front() {
            if ends(&p) {
                break;
            }
            self.skipped(p, conn, cx.statements);
        }
        self.queue.push_back(Pending::SwallowReady);
        self.close_on_server(&stmt.server_name, conn);
        for (i, frame) in retry.frames.iter().enumerate() {
            self.send(frame, conn, cx)?;
            if i == 0 && failed == b'D' {
                // The failed Describe got as far as its ParameterDescription.
                let describe = self.queue.pop_back().expect("the Describe just queued");
                self.queue.push_back(Pending::SwallowTag(b't'));
                self.queue.push_back(describe);
            }
        }
        self.batches.mark_retried();
        Ok(true)
    }

    /// Closes one of our statements on `conn` (its answer swallowed); the next use prepares it
    /// again.
    fn close_on_server(&mut self, server_name: &str, conn: &mut ServerConn) {
        frontend::put_close(&mut conn.framed.wbuf, Target::Statement, server_name);
        conn.prepared.remove(server_name);
        self.queue.push_back(Pending::Swallow {
            expect: b'3',
            undo: vec![],
            parsed: None,
        });
    }

    fn send_query(
        &mut self,
        frame: &Bytes,
        body: &[u8],
        conn: &mut ServerConn,
        cx: &mut Context<'_>,
    ) -> Result<(), ProxyError> {
        let FrontendMessage::Query(sql) =
            FrontendMessage::parse(b'Q', body).map_err(client_protocol)?
        else {
            unreachable!("a Q frame parses as a Query");
        };
        let mut effects = classify_query(sql);
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

    fn note_statement(&mut self, name: &str, query: &str) {
        match classify(query) {
            Effect::None => {
                if !self.statement_effects.is_empty() {
                    self.statement_effects.remove(name);
                }
            }
            e => {
                self.statement_effects.insert(name.to_string(), e);
            }
        }
    }

    fn send_parse(
        &mut self,
        frame: &Bytes,
        body: &[u8],
        conn: &mut ServerConn,
        cx: &mut Context<'_>,
    ) -> Result<(), ProxyError> {
        let FrontendMessage::Parse {
            name,
            query,
            param_types,
        } = FrontendMessage::parse(b'P', body).map_err(client_protocol)?
        else {
            unreachable!("a P frame parses as a Parse");
        };
        self.note_statement(name, query);
        if cx.capacity == 0 || name.is_empty() {
            self.forward_as_is(b'P', frame, conn);
            return Ok(());
        }
        if let Some(existing) = cx.statements.get(name).cloned() {
            // Already exists for this client: let the server raise 42P05 with its own
            // semantics (transaction aborted, batch skipped).
            self.ensure(conn, &existing, cx.capacity);
            frontend::put_parse(
                &mut conn.framed.wbuf,
                &existing.server_name,
                query,
                param_types,
            );
            self.queue.push_back(Pending::forward(b'P'));
            return Ok(());
        }
        let stmt = cx.cache.get_or_insert(query, param_types);
        cx.statements.insert(name.to_string(), stmt.clone());
        let mut undo = vec![Undo::Unregister(name.to_string())];
        if conn.prepared.has(&stmt.server_name) {
            self.queue.push_back(Pending::Inject {
                response: response(backend::put_parse_complete),
                undo,
            });
        } else {
            self.evict(conn, cx.capacity, &stmt.server_name);
            frontend::put_parse(&mut conn.framed.wbuf, &stmt.server_name, query, param_types);
            conn.prepared.insert(&stmt.server_name);
            undo.push(Undo::ServerForget(stmt.server_name.clone()));
            self.queue.push_back(Pending::Forward {
                tag: b'P',
                undo,
                stmt: Some(stmt),
                effects: vec![],
            });
        }
        Ok(())
    }

    fn send_bind(
        &mut self,
        frame: &Bytes,
        body: &[u8],
        conn: &mut ServerConn,
        cx: &mut Context<'_>,
    ) -> Result<(), ProxyError> {
        if cx.capacity == 0 && self.statement_effects.is_empty() && self.portal_effects.is_empty() {
            self.forward_as_is(b'B', frame, conn);
            return Ok(());
        }
        let FrontendMessage::Bind(b) =
            FrontendMessage::parse(b'B', body).map_err(client_protocol)?
        else {
            unreachable!("a B frame parses as a Bind");
        };
        match self.statement_effects.get(b.statement) {
            Some(e) => {
                self.portal_effects.insert(b.portal.to_string(), e.clone());
            }
            None => {
                self.portal_effects.remove(b.portal);
            }
        }
        if cx.capacity == 0 || b.statement.is_empty() {
            self.forward_as_is(b'B', frame, conn);
            return Ok(());
        }
        let stmt = cx.statements.get(b.statement).cloned();
        let name = match &stmt {
            Some(stmt) => {
                self.ensure(conn, stmt, cx.capacity);
                stmt.server_name.as_str()
            }
            // Unknown: the server answers 26000 naming the client's statement.
            None => b.statement,
        };
        frontend::put_bind(&mut conn.framed.wbuf, b.portal, name, b.rest);
        self.queue.push_back(Pending::Forward {
            tag: b'B',
            undo: vec![],
            stmt,
            effects: vec![],
        });
        Ok(())
    }

    fn send_execute(
        &mut self,
        frame: &Bytes,
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

    fn send_describe(
        &mut self,
        frame: &Bytes,
        body: &[u8],
        conn: &mut ServerConn,
        cx: &mut Context<'_>,
    ) -> Result<(), ProxyError> {
        match FrontendMessage::parse(b'D', body).map_err(client_protocol)? {
            FrontendMessage::Describe {
                target: Target::Statement,
                name,
            } if !name.is_empty() => {
                let stmt = cx.statements.get(name).cloned();
                let server_name = match &stmt {
                    Some(stmt) => {
                        self.ensure(conn, stmt, cx.capacity);
                        stmt.server_name.as_str()
                    }
                    None => name,
                };
                frontend::put_describe(&mut conn.framed.wbuf, Target::Statement, server_name);
                self.queue.push_back(Pending::Forward {
                    tag: b'D',
                    undo: vec![],
                    stmt,
                    effects: vec![],
                });
            }
            _ => self.forward_as_is(b'D', frame, conn),
        }
        Ok(())
    }

    fn send_close(
        &mut self,
        frame: &Bytes,
        body: &[u8],
        conn: &mut ServerConn,
        cx: &mut Context<'_>,
    ) -> Result<(), ProxyError> {
        let FrontendMessage::Close { target, name } =
            FrontendMessage::parse(b'C', body).map_err(client_protocol)?
        else {
            unreachable!("a C frame parses as a Close");
        };
        match target {
            Target::Statement => self.statement_effects.remove(name),
            Target::Portal => self.portal_effects.remove(name),
        };
        if cx.capacity == 0 || target == Target::Portal || name.is_empty() {
            self.forward_as_is(b'C', frame, conn);
            return Ok(());
        }
        // The server keeps the statement for other clients; only this client's name goes.
        let undo = match cx.statements.remove(name) {
            Some(stmt) => vec![Undo::Reregister(name.to_string(), stmt)],
            None => vec![],
        };
        self.queue.push_back(Pending::Inject {
            response: response(backend::put_close_complete),
            undo,
        });
        Ok(())
    }

    /// While no server is attached (so the client is outside any transaction): answers what
    /// needs no server and returns true; false means `frame` needs a server. Answered here: a
    /// named Parse of a statement some server has already accepted, a Close of a statement,
    /// `DEALLOCATE` of the client's statements, Flush, and a Sync (nothing before it went to a
    /// server, so the status is idle).
    pub fn answer_detached(
        &mut self,
        frame: &Bytes,
        cx: &mut Context<'_>,
        client_out: &mut BytesMut,
    ) -> bool {
        debug_assert!(
            self.settled(),
            "answering locally with a server exchange in flight"
        );
        let (tag, body) = split(frame);
        match tag {
            b'S' => backend::put_ready_for_query(client_out, TxStatus::Idle),
            b'H' => {}
            // Only a DEALLOCATE is answered here among simple queries: one byte tells.
            b'Q' if !matches!(
                body.iter().find(|b| !b.is_ascii_whitespace()),
                Some(b'd' | b'D')
            ) =>
            {
                return false
            }
            b'P' | b'C' | b'Q' if cx.capacity > 0 => match FrontendMessage::parse(tag, body) {
                Ok(FrontendMessage::Parse {
                    name,
                    query,
                    param_types,
                }) if !name.is_empty() && !cx.statements.contains_key(name) => {
                    let stmt = cx.cache.get_or_insert(query, param_types);
                    if !stmt.is_validated() {
                        return false;
                    }
                    self.note_statement(name, query);
                    cx.statements.insert(name.to_string(), stmt);
                    backend::put_parse_complete(client_out);
                }
                Ok(FrontendMessage::Close {
                    target: Target::Statement,
                    name,
                }) if !name.is_empty() => {
                    self.statement_effects.remove(name);
                    cx.statements.remove(name);
                    backend::put_close_complete(client_out);
                }
                Ok(FrontendMessage::Query(sql)) => {
                    let tag = match deallocate(sql) {
                        Some(Deallocate::One(name)) if cx.statements.remove(name).is_some() => {
                            "DEALLOCATE"
                        }
                        Some(Deallocate::All) => {
                            cx.statements.clear();
                            "DEALLOCATE ALL"
                        }
                        _ => return false,
                    };
                    backend::put_command_complete(client_out, tag);
                    backend::put_ready_for_query(client_out, TxStatus::Idle);
                }
                _ => return false,
            },
            _ => return false,
        }
        true
    }

    fn forward_as_is(&mut self, tag: u8, frame: &Bytes, conn: &mut ServerConn) {
        conn.framed.wbuf.extend_from_slice(frame);
        if answers(tag) {
            self.queue.push_back(Pending::forward(tag));
        }
    }

    /// Makes sure `conn` has `stmt`, sending our own Parse if not.
    fn ensure(&mut self, conn: &mut ServerConn, stmt: &Arc<Statement>, capacity: usize) {
        if conn.prepared.has(&stmt.server_name) {
            return;
        }
        self.evict(conn, capacity, &stmt.server_name);
        frontend::put_parse(
            &mut conn.framed.wbuf,
            &stmt.server_name,
            &stmt.query,
            &stmt.param_types,
        );
        conn.prepared.insert(&stmt.server_name);
        self.queue.push_back(Pending::Swallow {
            expect: b'1',
            undo: vec![Undo::ServerForget(stmt.server_name.clone())],
            parsed: Some(stmt.clone()),
        });
    }

    fn evict(&mut self, conn: &mut ServerConn, capacity: usize, keep: &str) {
        if let Some(victim) = conn.prepared.evict_for(capacity, keep) {
            frontend::put_close(&mut conn.framed.wbuf, Target::Statement, &victim);
            self.queue.push_back(Pending::Swallow {
                expect: b'3',
                undo: vec![],
                parsed: None,
            });
        }
    }

    /// Handles one server message: what reaches the client goes into `client_out`.
    pub fn receive(
        &mut self,
        frame: &Bytes,
        conn: &mut ServerConn,
        cx: &mut Context<'_>,
        client_out: &mut BytesMut,
    ) -> Result<(), ProxyError> {
        self.emit_injects(conn.status, client_out);
        let (tag, body) = split(frame);
        if let Some(Pending::Internal { .. }) = self.queue.front() {
            return self.receive_internal(tag, body, frame, conn, client_out);
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
                let status =
                    match BackendMessage::parse(tag, body).map_err(ProxyError::ServerProtocol)? {
                        BackendMessage::ReadyForQuery(status) => status,
                        _ => unreachable!("a Z frame parses as ReadyForQuery"),
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
                        break;
                    }
                    self.skipped(p, conn, cx.statements);
                }
                for name in std::mem::take(&mut self.stale) {
                    self.close_on_server(&name, conn);
                }
                client_out.extend_from_slice(frame);
            }
            b'E' => {
                if let Some((failed, stmt)) = self.stale_statement(body) {
                    if self.retry_stale_plan(failed, &stmt, conn, cx)? {
                        return Ok(());
                    }
                    // Not retried: drop it from this server once the batch is over, so the
                    // client's next use (or its new Parse) prepares it fresh.
                    self.stale.push(stmt.server_name.clone());
                }
                cx.session.error();
                client_out.extend_from_slice(frame);
                if is_fatal(body) {
                    // The server is closing this connection: the client's session ends with it,
                    // as it would without a proxy.
                    conn.broken = true;
                    return Err(ProxyError::ServerFatal);
                }
                match self.queue.front() {
                    // A simple query (or function call) goes on to its ReadyForQuery.
                    Some(Pending::Forward {
                        tag: b'Q' | b'F', ..
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

    /// The failed message's statement and type, if the error is a stale plan of ours.
    fn stale_statement(&self, error_body: &[u8]) -> Option<(u8, Arc<Statement>)> {
        match self.queue.front() {
            Some(Pending::Forward {
                tag: t @ (b'B' | b'D'),
                stmt: Some(stmt),
                ..
            }) if is_stale_plan(error_body) => Some((*t, stmt.clone())),
            _ => None,
        }
    }

    /// A response to the message at the front of the queue.
    fn receive_response(&mut self, tag: u8, frame: &Bytes, client_out: &mut BytesMut) {
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
            Some(Pending::Forward {
                tag: sent,
                stmt: parsed,
                ..
            }) => {
                let done = completes(*sent, tag);
                client_out.extend_from_slice(frame);
                if done {
                    if let (Some(stmt), b'1') = (parsed, tag) {
                        stmt.mark_validated();
                    }
                    self.queue.pop_front();
                }
            }
            _ => client_out.extend_from_slice(frame),
        }
    }

    /// A response to our own query: swallowed, but parameters are tracked and an error ends
    /// the session once the query is over.
    fn receive_internal(
        &mut self,
        tag: u8,
        body: &[u8],
        frame: &Bytes,
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
    pub fn emit_injects(&mut self, status: TxStatus, client_out: &mut BytesMut) {
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
