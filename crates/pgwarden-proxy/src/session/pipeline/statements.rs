//! Named prepared statements in transaction mode: the client's names mapped to the pool's,
//! our own Parse before a Bind or Describe on a server that lacks the statement, LRU eviction,
//! and what the proxy answers without a server.

use std::sync::Arc;

use bytes::BytesMut;
use pgwarden_protocol::backend::{self, TxStatus};
use pgwarden_protocol::frame::split;
use pgwarden_protocol::frontend::{self, FrontendMessage, Target};
use pgwarden_sql::{classify_bytes, Effect};

use super::{client_protocol, response, Context, Pending, Pipeline, Undo};
use crate::error::ProxyError;
use crate::prepared::{deallocate, Deallocate, Statement};
use crate::server::ServerConn;

/// The longest query text remembered as the last one classified (a client keeps it while
/// idle, so it is bounded).
const REMEMBERED_TEXT: usize = 1024;

/// The query text last classified for session effects.
#[derive(Debug)]
pub(super) struct Classified {
    text: Vec<u8>,
    effect: Effect,
    /// No session effect and no COPY (so no copy sub-protocol either): a batch running only
    /// this text needs no tracking message by message (see `express`).
    pub(super) plain: bool,
}

impl Default for Classified {
    fn default() -> Self {
        Classified {
            text: Vec::new(),
            effect: Effect::None,
            plain: false,
        }
    }
}

impl Classified {
    /// Whether `rest` (what follows the name in a Parse: query, NUL, parameter types) is this
    /// text with well-formed parameter types.
    pub(super) fn parses(&self, rest: &[u8]) -> bool {
        let t = self.text.as_slice();
        rest.len() > t.len()
            && rest[t.len()] == 0
            && &rest[..t.len()] == t
            && frontend::check_param_types(&rest[t.len() + 1..]).is_ok()
    }
}

/// Whether the statement's first word is COPY, or it does not start with a word at all
/// (a comment, a parenthesis): either way it is not known not to be a COPY.
fn starts_copy(query: &[u8]) -> bool {
    let text = query.trim_ascii_start();
    let word = text
        .iter()
        .position(|b| !b.is_ascii_alphabetic())
        .unwrap_or(text.len());
    word == 0 || text[..word].eq_ignore_ascii_case(b"copy")
}

impl Pipeline {
    pub(super) fn note_statement(&mut self, name: &str, query: &[u8]) {
        // Drivers parse the same text over and over: the last one classified is remembered.
        let effect = match &self.last_classified {
            Some(last) if last.text == query => last.effect.clone(),
            _ => {
                let e = classify_bytes(query);
                if query.len() <= REMEMBERED_TEXT {
                    let last = self.last_classified.get_or_insert_with(Classified::default);
                    last.text.clear();
                    last.text.extend_from_slice(query);
                    last.effect = e.clone();
                    last.plain = e == Effect::None && !starts_copy(query);
                }
                e
            }
        };
        self.set_statement_effect(name, effect);
    }

    fn set_statement_effect(&mut self, name: &str, effect: Effect) {
        match effect {
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

    /// For the rest of a Parse of the unnamed statement (query, NUL, parameter types): the
    /// effect of the query if it is the text last classified and the parameter types are well
    /// formed, so the same text parsed again needs no decoding.
    fn remembered_effect(&self, rest: &[u8]) -> Option<Effect> {
        let last = self.last_classified.as_ref()?;
        last.parses(rest).then(|| last.effect.clone())
    }

    pub(super) fn send_parse(
        &mut self,
        frame: &[u8],
        body: &[u8],
        conn: &mut ServerConn,
        cx: &mut Context<'_>,
    ) -> Result<(), ProxyError> {
        // The unnamed statement again with the text of last time (what drivers do for each
        // unprepared query): passed on without decoding the text again (its parameter types
        // are still checked; anything malformed takes the full decoding below).
        if body.first() == Some(&0) {
            if let Some(effect) = self.remembered_effect(&body[1..]) {
                self.set_statement_effect("", effect);
                self.forward_as_is(b'P', frame, conn);
                return Ok(());
            }
        }
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
            self.put_our_parse(conn, &stmt, cx.capacity);
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

    pub(super) fn send_bind(
        &mut self,
        frame: &[u8],
        body: &[u8],
        conn: &mut ServerConn,
        cx: &mut Context<'_>,
    ) -> Result<(), ProxyError> {
        if cx.capacity == 0 && self.statement_effects.is_empty() && self.portal_effects.is_empty() {
            self.forward_as_is(b'B', frame, conn);
            return Ok(());
        }
        // The unnamed statement into the unnamed portal (what drivers send for each unprepared
        // query) with no effects known: nothing to rewrite or track, so only the rest of the
        // message is checked, not decoded.
        if body.starts_with(b"\0\0")
            && self.statement_effects.is_empty()
            && self.portal_effects.is_empty()
        {
            frontend::check_bind_rest(&body[2..]).map_err(client_protocol)?;
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
            None if !self.portal_effects.is_empty() => {
                self.portal_effects.remove(b.portal);
            }
            None => {}
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

    pub(super) fn send_describe(
        &mut self,
        frame: &[u8],
        body: &[u8],
        conn: &mut ServerConn,
        cx: &mut Context<'_>,
    ) -> Result<(), ProxyError> {
        // The unnamed portal or statement goes as it is: only a named statement is ours.
        if body == b"P\0" || body == b"S\0" {
            self.forward_as_is(b'D', frame, conn);
            return Ok(());
        }
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

    pub(super) fn send_close(
        &mut self,
        frame: &[u8],
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
        frame: &[u8],
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
            // A Parse of the unnamed statement always needs a server (its name comes first).
            b'P' if body.first() == Some(&0) => return false,
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

    /// Makes sure `conn` has `stmt`, sending our own Parse if not.
    pub(super) fn ensure(&mut self, conn: &mut ServerConn, stmt: &Arc<Statement>, capacity: usize) {
        if conn.prepared.has(&stmt.server_name) {
            return;
        }
        self.put_our_parse(conn, stmt, capacity);
        self.queue.push_back(Pending::Swallow {
            expect: b'1',
            undo: vec![Undo::ServerForget(stmt.server_name.clone())],
            parsed: Some(stmt.clone()),
        });
    }

    /// A Parse of `stmt` under our name on `conn` (its answer is the caller's to queue), after
    /// making room: a stale copy the server still has is closed, and the least recently used
    /// statement evicted if the connection is full.
    fn put_our_parse(&mut self, conn: &mut ServerConn, stmt: &Statement, capacity: usize) {
        self.close_if_stale(conn, &stmt.server_name);
        self.evict(conn, capacity, &stmt.server_name);
        frontend::put_parse(
            &mut conn.framed.wbuf,
            &stmt.server_name,
            &stmt.query,
            &stmt.param_types,
        );
        conn.prepared.insert(&stmt.server_name);
    }

    pub(super) fn evict(&mut self, conn: &mut ServerConn, capacity: usize, keep: &str) {
        if let Some(victim) = conn.prepared.evict_for(capacity, keep) {
            self.close_on_server(victim, conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::starts_copy;

    #[test]
    fn only_texts_that_start_with_another_word_are_known_not_to_be_a_copy() {
        for copy in [
            "COPY t FROM STDIN",
            "copy t to stdout",
            " \n\tCoPy t FROM STDIN",
            "COPY",
            // Not known: anything that does not start with a word.
            "/* hi */ COPY t FROM STDIN",
            "-- hi\nCOPY t FROM STDIN",
            "(SELECT 1)",
            "",
            "   ",
            "1",
        ] {
            assert!(starts_copy(copy.as_bytes()), "{copy:?}");
        }
        for other in [
            "SELECT 1",
            "select copy from t",
            "COPYRIGHT",
            "copying",
            "INSERT INTO copy VALUES (1)",
            "  WITH x AS (SELECT 1) SELECT * FROM x",
        ] {
            assert!(!starts_copy(other.as_bytes()), "{other:?}");
        }
    }
}
