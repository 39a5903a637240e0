//! The messages in flight on one server connection, and the rewriting of named statements.
//!
//! Every client message that expects an answer has an entry in a queue, in order; so has every
//! message the proxy adds (a Parse before a Bind, a Close to evict) and every answer the proxy
//! gives itself (ParseComplete for a statement the server already has, CloseComplete). Server
//! responses are matched to the front of the queue. After an error in an extended-protocol
//! batch the server skips everything up to Sync; the queue drops those entries too and undoes
//! what they registered.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use pgwarden_protocol::backend::{self, BackendMessage, TxStatus};
use pgwarden_protocol::frame::split;
use pgwarden_protocol::frontend::{self, FrontendMessage, Target};

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
    /// A client message sent on; its responses go to the client. `parsed`: a Parse of one of
    /// our statements, validated when the server answers ParseComplete.
    Forward {
        tag: u8,
        undo: Vec<Undo>,
        parsed: Option<Arc<Statement>>,
    },
    /// Our own Parse ('1') or Close ('3'); the client must not see the answer.
    Swallow {
        expect: u8,
        undo: Vec<Undo>,
        parsed: Option<Arc<Statement>>,
    },
    /// An answer the proxy gives for a message it did not send on.
    Inject { response: Bytes, undo: Vec<Undo> },
}

impl Pending {
    fn forward(tag: u8) -> Pending {
        Pending::Forward {
            tag,
            undo: vec![],
            parsed: None,
        }
    }
}

#[derive(Debug, Default)]
pub struct Pipeline {
    queue: VecDeque<Pending>,
    /// Extended-protocol messages sent since the last Sync.
    in_batch: bool,
}

/// What the rewriting needs besides the message.
pub struct Context<'a> {
    pub statements: &'a mut ClientStatements,
    pub cache: &'a StatementCache,
    /// 0: statements are passed through unchanged.
    pub capacity: usize,
}

fn response(put: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut b = BytesMut::new();
    put(&mut b);
    b.freeze()
}

impl Pipeline {
    /// Nothing in flight and no half-sent batch: the server can be given back.
    pub fn settled(&self) -> bool {
        self.queue.is_empty() && !self.in_batch
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
            _ => {}
        }
        if cx.capacity == 0 || !matches!(tag, b'P' | b'B' | b'D' | b'C' | b'Q') {
            self.forward_as_is(tag, frame, conn);
            return Ok(());
        }
        let msg = FrontendMessage::parse(tag, body).map_err(ProxyError::ClientProtocol)?;
        let out = &mut conn.framed.wbuf;
        match msg {
            FrontendMessage::Parse {
                name,
                query,
                param_types,
            } if !name.is_empty() => {
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
                    self.queue.push_back(Pending::forward(tag));
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
                    frontend::put_parse(
                        &mut conn.framed.wbuf,
                        &stmt.server_name,
                        query,
                        param_types,
                    );
                    conn.prepared.insert(&stmt.server_name);
                    undo.push(Undo::ServerForget(stmt.server_name.clone()));
                    self.queue.push_back(Pending::Forward {
                        tag,
                        undo,
                        parsed: Some(stmt),
                    });
                }
            }
            FrontendMessage::Bind(b) if !b.statement.is_empty() => {
                let name = match cx.statements.get(b.statement).cloned() {
                    Some(stmt) => {
                        self.ensure(conn, &stmt, cx.capacity);
                        stmt.server_name.clone()
                    }
                    // Unknown: the server answers 26000 naming the client's statement.
                    None => b.statement.to_string(),
                };
                frontend::put_bind(&mut conn.framed.wbuf, b.portal, &name, b.rest);
                self.queue.push_back(Pending::forward(tag));
            }
            FrontendMessage::Describe {
                target: Target::Statement,
                name,
            } if !name.is_empty() => {
                let server_name = match cx.statements.get(name).cloned() {
                    Some(stmt) => {
                        self.ensure(conn, &stmt, cx.capacity);
                        stmt.server_name.clone()
                    }
                    None => name.to_string(),
                };
                frontend::put_describe(&mut conn.framed.wbuf, Target::Statement, &server_name);
                self.queue.push_back(Pending::forward(tag));
            }
            FrontendMessage::Close {
                target: Target::Statement,
                name,
            } if !name.is_empty() => {
                // The server keeps the statement for other clients; only this client's name goes.
                let undo = match cx.statements.remove(name) {
                    Some(stmt) => vec![Undo::Reregister(name.to_string(), stmt)],
                    None => vec![],
                };
                self.queue.push_back(Pending::Inject {
                    response: response(backend::put_close_complete),
                    undo,
                });
            }
            FrontendMessage::Query(sql) => {
                match deallocate(sql) {
                    Some(Deallocate::All) => {
                        cx.statements.clear();
                        conn.prepared.clear();
                        out.extend_from_slice(frame);
                    }
                    Some(Deallocate::Discard) => {
                        cx.statements.clear();
                        conn.prepared.clear();
                        out.extend_from_slice(frame);
                    }
                    Some(Deallocate::One(name)) => match cx.statements.remove(name) {
                        Some(stmt) => {
                            let sql = format!("DEALLOCATE {}", stmt.server_name);
                            conn.prepared.remove(&stmt.server_name);
                            frontend::put_query(out, &sql);
                        }
                        None => out.extend_from_slice(frame),
                    },
                    None => out.extend_from_slice(frame),
                }
                self.queue.push_back(Pending::forward(tag));
            }
            _ => self.forward_as_is(tag, frame, conn),
        }
        Ok(())
    }

    /// While no server is attached (so the client is outside any transaction): answers what
    /// needs no server and returns true; false means `frame` needs a server. Answered here: a
    /// named Parse of a statement some server has already accepted, a Close of a statement,
    /// Flush, and a Sync (nothing before it went to a server, so the status is idle).
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
            b'P' | b'C' if cx.capacity > 0 => match FrontendMessage::parse(tag, body) {
                Ok(FrontendMessage::Parse {
                    name,
                    query,
                    param_types,
                }) if !name.is_empty() && !cx.statements.contains_key(name) => {
                    let stmt = cx.cache.get_or_insert(query, param_types);
                    if !stmt.is_validated() {
                        return false;
                    }
                    cx.statements.insert(name.to_string(), stmt);
                    backend::put_parse_complete(client_out);
                }
                Ok(FrontendMessage::Close {
                    target: Target::Statement,
                    name,
                }) if !name.is_empty() => {
                    cx.statements.remove(name);
                    backend::put_close_complete(client_out);
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
        statements: &mut ClientStatements,
        client_out: &mut BytesMut,
    ) -> Result<(), ProxyError> {
        self.emit_injects(client_out);
        let (tag, body) = split(frame);
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
                if let BackendMessage::ReadyForQuery(status) =
                    BackendMessage::parse(tag, body).map_err(ProxyError::ServerProtocol)?
                {
                    conn.status = status;
                }
                // Everything up to and including the Sync/Query this answers is done.
                while let Some(p) = self.queue.pop_front() {
                    if matches!(
                        p,
                        Pending::Forward {
                            tag: b'S' | b'Q' | b'F',
                            ..
                        }
                    ) {
                        break;
                    }
                    self.skipped(p, conn, statements);
                }
                client_out.extend_from_slice(frame);
            }
            b'E' => {
                client_out.extend_from_slice(frame);
                match self.queue.front() {
                    // A simple query (or function call) goes on to its ReadyForQuery.
                    Some(Pending::Forward {
                        tag: b'Q' | b'F', ..
                    })
                    | None => {}
                    Some(_) => {
                        let failed = self.queue.pop_front().expect("front exists");
                        self.skipped(failed, conn, statements);
                        // The server now skips to Sync; so do we.
                        while let Some(p) = self.queue.front() {
                            if matches!(p, Pending::Forward { tag: b'S', .. }) {
                                break;
                            }
                            let p = self.queue.pop_front().expect("front exists");
                            self.skipped(p, conn, statements);
                        }
                    }
                }
            }
            _ => match self.queue.front() {
                Some(Pending::Swallow { expect, parsed, .. }) if *expect == tag => {
                    if let Some(stmt) = parsed {
                        stmt.mark_validated();
                    }
                    self.queue.pop_front();
                }
                Some(Pending::Forward {
                    tag: sent, parsed, ..
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
            },
        }
        self.emit_injects(client_out);
        Ok(())
    }

    /// Sends the proxy's own answers that are next in line.
    pub fn emit_injects(&mut self, client_out: &mut BytesMut) {
        while let Some(Pending::Inject { .. }) = self.queue.front() {
            if let Some(Pending::Inject { response, .. }) = self.queue.pop_front() {
                client_out.extend_from_slice(&response);
            }
        }
    }

    /// A message that failed or that the server skipped: undo what it registered.
    fn skipped(&mut self, p: Pending, conn: &mut ServerConn, statements: &mut ClientStatements) {
        let undo = match p {
            Pending::Forward { undo, .. }
            | Pending::Swallow { undo, .. }
            | Pending::Inject { undo, .. } => undo,
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
