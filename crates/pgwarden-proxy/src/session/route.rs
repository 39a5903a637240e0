//! What a session's next batch needs from a server (see `router` for the choice itself): the
//! class of the batch at the front of the client's buffer, the session's overrides
//! (`pgwarden.route`, hints) and its consistency state (the floor its reads must see).
//!
//! A batch is a simple query, or extended-protocol messages up to a Sync. It is a read only if
//! every statement in it is (`pgwarden_sql::route`), with the catalog's word on the functions it
//! calls; a batch not yet wholly received, one that binds a statement the proxy cannot see, or
//! a function call message, is a write. A transaction goes to a replica only if it is read-only
//! (`BEGIN READ ONLY`, or `default_transaction_read_only` on) and not serializable (a standby
//! refuses serializable transactions).
//!
//! `session` consistency: each write transaction's commit position is read on its server
//! before the server goes back (`pg_current_wal_insert_lsn()`, a position at or past the
//! commit; in the same write as an autocommit batch), and becomes the session's floor; a read
//! goes only to a replica that has replayed the floor. Monotonic reads: after a read on node N
//! at time t, another node serves the session only once something has proved where N was after
//! t (a probe of N, or of the primary, taken after t); until then, N itself, or the primary. A
//! new leader epoch starts over: reads stay on the new leader until a position read on it
//! bounds the session's surviving writes.

use std::time::Instant;

use pgwarden_config::{Consistency, RoutingConfig};
use pgwarden_core::{Lsn, NodeId};
use pgwarden_protocol::frame::{message_len, MAX_MESSAGE};
use pgwarden_sql::route::{self, Decision, Hint, Kind, Route, TxnMode};

use super::pipeline::ClientStatements;
use super::state::SessionState;
use crate::functions::Functions;
use crate::nodes::Nodes;
use crate::router::Read;

/// `pgwarden.route`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Override {
    Auto,
    /// Everything to the primary.
    Primary,
    /// The client vouches that what it sends reads: statements the classifier sends to the
    /// primary only because of the functions they call, or transactions not declared
    /// read-only, go to a replica. Statements that write by their text still go to the primary.
    Replica,
}

impl Override {
    pub fn parse(s: &str) -> Option<Override> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(Override::Auto),
            "primary" => Some(Override::Primary),
            "replica" => Some(Override::Replica),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Override::Auto => "auto",
            Override::Primary => "primary",
            Override::Replica => "replica",
        }
    }
}

/// A session's routing state.
#[derive(Debug)]
pub struct SessionRoute {
    pub over: Override,
    pub consistency: Consistency,
    /// What its reads must see (`session` consistency): its last commit's position, raised by
    /// what it read.
    pub floor: Lsn,
    /// A commit whose position could not be read: reads go to the primary until the next one.
    pub floor_unknown: bool,
    /// The node of its last read and when it was routed, until bounded (see the module docs).
    pub last_read: Option<(NodeId, Instant)>,
    /// The server held may have written since its last position probe.
    pub wrote: bool,
    /// The leader epoch the floor belongs to: positions of an earlier leader's WAL say nothing
    /// of the next one's.
    pub epoch: Option<pgwarden_core::Epoch>,
    /// Named prepared statements of the proxy's settings (`SET pgwarden.route = ...` prepared
    /// by a driver), by client name: the proxy answers their Bind and Execute.
    pub statements: Vec<(Vec<u8>, ProxySetting)>,
}

impl SessionRoute {
    pub fn new(routing: &RoutingConfig) -> SessionRoute {
        SessionRoute {
            over: Override::Auto,
            consistency: routing.consistency,
            floor: Lsn(0),
            floor_unknown: false,
            last_read: None,
            wrote: false,
            epoch: None,
            statements: Vec::new(),
        }
    }

    /// Forgets a named statement of the proxy's when the client prepares another under its
    /// name (`body` is the Parse message's body).
    pub fn forget_statement(&mut self, body: &[u8]) {
        if self.statements.is_empty() {
            return;
        }
        if let Some((name, _)) = split_cstr(body) {
            if !name.is_empty() {
                self.statements.retain(|(n, _)| n != name);
            }
        }
    }

    /// The read request for the next read, resolving the monotonic bound if it can be.
    pub fn read(
        &mut self,
        routing: &RoutingConfig,
        nodes: &Nodes,
        leader: Option<&NodeId>,
        epoch: pgwarden_core::Epoch,
        replica_asked: bool,
    ) -> Read {
        let mut only = None;
        if self.epoch != Some(epoch) {
            if self.epoch.is_some() {
                // A new leader: the session's writes that survived are on it, at or below its
                // position now. Until a position read on it bounds them, reads stay on it.
                self.floor = Lsn(0);
                self.floor_unknown = false;
                self.last_read = leader.map(|l| (l.clone(), Instant::now()));
            }
            self.epoch = Some(epoch);
        }
        if self.consistency == Consistency::Session {
            if let Some((node, t)) = &self.last_read {
                let bound = nodes
                    .get(node)
                    .probed_after(*t)
                    .or_else(|| leader.and_then(|l| nodes.get(l).probed_after(*t)));
                match bound {
                    Some(b) => {
                        self.floor = self.floor.max(b);
                        self.last_read = None;
                    }
                    None => only = Some(node.clone()),
                }
            }
        }
        let consistency = if self.floor_unknown && self.consistency == Consistency::Session {
            Consistency::Strong
        } else {
            self.consistency
        };
        Read {
            consistency,
            primary_reads: routing.primary_reads,
            balance: routing.balance,
            floor: self.floor,
            only,
            replica_asked: replica_asked || self.over == Override::Replica,
        }
    }
}

/// The session's routing state at login: `pgwarden.route` and `pgwarden.consistency` among the
/// startup settings (`options=-c pgwarden.route=replica`) are the proxy's, taken out of what
/// goes to servers.
pub fn from_startup(
    requested: &mut Vec<(String, String)>,
    routing: &RoutingConfig,
) -> Result<SessionRoute, crate::error::ProxyError> {
    let mut route = SessionRoute::new(routing);
    let mut error = None;
    requested.retain(|(name, value)| {
        match name.to_ascii_lowercase().as_str() {
            "pgwarden.route" => match Override::parse(value) {
                Some(o) => route.over = o,
                None => {
                    error.get_or_insert(crate::error::ProxyError::BadSetting {
                        name: "pgwarden.route",
                        value: value.clone(),
                        expected: "auto, primary or replica",
                    });
                }
            },
            "pgwarden.consistency" => match Consistency::parse(value) {
                Some(k) => route.consistency = k,
                None => {
                    error.get_or_insert(crate::error::ProxyError::BadSetting {
                        name: "pgwarden.consistency",
                        value: value.clone(),
                        expected: "eventual, session or strong",
                    });
                }
            },
            _ => return true,
        }
        false
    });
    match error {
        Some(e) => Err(e),
        None => Ok(route),
    }
}

/// The class of a batch, for routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// Reads only (or statements that run anywhere).
    Read,
    /// Starts a read-only transaction a standby can run.
    ReadOnlyTransaction,
    /// Needs the primary; `lookup`: function names the catalog should be asked about.
    Write {
        why: &'static str,
        lookup: Vec<String>,
    },
}

/// What the front of `buf` is, with the hint of its first statement.
pub fn front_batch(
    buf: &[u8],
    statements: &ClientStatements,
    session: &SessionState,
    functions: &Functions,
    allowed: &[String],
    over: Override,
) -> (Class, Option<Hint>) {
    let mut at = 0;
    let mut combined: Option<Route> = None;
    let mut hint = None;
    let mut unnamed: Option<Route> = None;
    let write = |why| Class::Write {
        why,
        lookup: Vec::new(),
    };
    loop {
        let n = match message_len(&buf[at..], MAX_MESSAGE) {
            Ok(Some(n)) => n,
            _ => return (write("a batch not yet wholly received"), hint),
        };
        let (tag, body) = (buf[at], &buf[at + 5..at + n]);
        at += n;
        let r = match tag {
            b'Q' => {
                let text = body.strip_suffix(b"\0").unwrap_or(body);
                let r = route::classify_bytes(text);
                hint = r.hint;
                combine(&mut combined, r);
                break;
            }
            b'P' => {
                let Some((name, rest)) = split_cstr(body) else {
                    return (write("a malformed Parse"), hint);
                };
                let text = split_cstr(rest).map_or(rest, |(q, _)| q);
                let r = route::classify_bytes(text);
                if name.is_empty() {
                    unnamed = Some(r.clone());
                }
                Some(r)
            }
            b'B' => {
                let Some((_portal, rest)) = split_cstr(body) else {
                    return (write("a malformed Bind"), hint);
                };
                let Some((name, _)) = split_cstr(rest) else {
                    return (write("a malformed Bind"), hint);
                };
                if name.is_empty() {
                    match &unnamed {
                        Some(r) => Some(r.clone()),
                        None => return (write("a statement prepared in another batch"), hint),
                    }
                } else {
                    let Some(stmt) = std::str::from_utf8(name)
                        .ok()
                        .and_then(|n| statements.get(n))
                    else {
                        return (write("a statement the proxy does not know"), hint);
                    };
                    Some(stmt.route().clone())
                }
            }
            b'S' => break,
            b'E' | b'D' | b'C' | b'H' => None,
            _ => return (write("a message that is not a statement"), hint),
        };
        if let Some(r) = r {
            if hint.is_none() {
                hint = r.hint;
            }
            combine(&mut combined, r);
        }
    }
    let Some(r) = combined else {
        return (Class::Read, hint);
    };
    if r.changes_functions {
        // What the catalog said may no longer hold once this runs.
        functions.clear();
    }
    let class = match r.kind {
        Kind::Begin(mode) => transaction(mode, session, over),
        Kind::SetTransaction(_) | Kind::Anywhere => Class::Read,
        Kind::Write(why) => write(why),
        Kind::Read => match r.decide(|f| allowed.iter().any(|a| a == f), |f| functions.get(f)) {
            Decision::Read => Class::Read,
            Decision::Write(_) if over == Override::Replica || hint == Some(Hint::Replica) => {
                Class::Read
            }
            Decision::Write(why) => write(why),
            Decision::Unknown(names) if over == Override::Replica => {
                let _ = names;
                Class::Read
            }
            Decision::Unknown(names) => Class::Write {
                why: "a function the catalog has not been asked about",
                lookup: names,
            },
        },
    };
    (class, hint)
}

/// Folds one statement's route into a batch's: a write wins; a transaction start among other
/// statements is a write.
fn combine(acc: &mut Option<Route>, r: Route) {
    let Some(a) = acc else {
        *acc = Some(r);
        return;
    };
    match (a.kind, r.kind) {
        (Kind::Write(_), _) => {}
        (_, Kind::Write(_)) => a.kind = r.kind,
        (Kind::Begin(_) | Kind::SetTransaction(_), _) | (_, Kind::Begin(_)) => {
            a.kind = Kind::Write("a transaction in a batch with other statements")
        }
        (Kind::Anywhere, k) => {
            a.kind = k;
            a.calls.extend(r.calls);
        }
        (_, _) => a.calls.extend(r.calls),
    }
}

/// Where a transaction started by `BEGIN` with `mode` may run.
fn transaction(mode: TxnMode, session: &SessionState, over: Override) -> Class {
    let read_only = mode.read_only.unwrap_or_else(|| {
        session
            .setting("default_transaction_read_only")
            .is_some_and(says_on)
            || over == Override::Replica
    });
    let serializable = mode.serializable
        || session
            .setting("default_transaction_isolation")
            .is_some_and(|s| s.to_ascii_lowercase().contains("serializable"));
    if read_only && !serializable {
        Class::ReadOnlyTransaction
    } else if serializable && read_only {
        Class::Write {
            why: "a serializable transaction (a standby refuses them)",
            lookup: Vec::new(),
        }
    } else {
        Class::Write {
            why: "a transaction not declared read-only",
            lookup: Vec::new(),
        }
    }
}

/// Whether the SQL that sets a boolean setting sets it on.
fn says_on(sql: &str) -> bool {
    let v = sql
        .rsplit(['=', ' ', '(', ','])
        .find(|w| !w.trim().is_empty() && !w.trim().starts_with(')'))
        .unwrap_or("")
        .trim()
        .trim_matches(|c| c == '\'' || c == ')' || c == ';')
        .to_ascii_lowercase();
    matches!(v.as_str(), "on" | "true" | "yes" | "1" | "t")
        || sql.to_ascii_lowercase().contains("'on'")
        || sql.to_ascii_lowercase().contains("'true'")
}

fn split_cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = b.iter().position(|&c| c == 0)?;
    Some((&b[..i], &b[i + 1..]))
}

/// `SET pgwarden.route | pgwarden.consistency {= | TO} value`, `RESET` of one, or `SHOW` of one, as
/// a whole simple query: what the proxy answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxySetting {
    Set(&'static str, String),
    Reset(&'static str),
    Show(&'static str),
}

/// The proxy's own setting a simple query sets, resets or shows, if that is all it does.
pub fn proxy_setting(sql: &[u8]) -> Option<ProxySetting> {
    // On every query and Parse between transactions: no copy of the text unless it names one.
    if !sql.windows(9).any(|w| w.eq_ignore_ascii_case(b"pgwarden.")) {
        return None;
    }
    let text = std::str::from_utf8(sql).ok()?;
    let text = text.trim().trim_end_matches(';').trim();
    let toks: Vec<pgwarden_sql::lex::Token<'_>> = pgwarden_sql::lex::Lexer::new(text).collect();
    use pgwarden_sql::lex::Token;
    let name = |i: usize| -> Option<&'static str> {
        if !toks.get(i)?.is_word("pgwarden") || toks.get(i + 1)? != &Token::Symbol(b'.') {
            return None;
        }
        match toks.get(i + 2)? {
            t if t.is_word("route") => Some("route"),
            t if t.is_word("consistency") => Some("consistency"),
            _ => None,
        }
    };
    let first = toks.first()?;
    if first.is_word("show") && toks.len() == 4 {
        return name(1).map(ProxySetting::Show);
    }
    if first.is_word("reset") && toks.len() == 4 {
        return name(1).map(ProxySetting::Reset);
    }
    if first.is_word("set") {
        let mut i = 1;
        if toks.get(1).is_some_and(|t| t.is_word("session")) {
            i = 2;
        }
        let n = name(i)?;
        let op = toks.get(i + 3)?;
        if !(op == &Token::Symbol(b'=') || op.is_word("to")) || toks.len() != i + 5 {
            return None;
        }
        let value = match toks.get(i + 4)? {
            Token::Str(s) if s.starts_with('\'') => s[1..s.len() - 1].replace("''", "'"),
            Token::Word(w) => w.to_string(),
            _ => return None,
        };
        return Some(ProxySetting::Set(n, value));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_settings_are_recognised_whole() {
        use ProxySetting::*;
        for (sql, want) in [
            (
                "SET pgwarden.route = 'replica'",
                Some(Set("route", "replica".into())),
            ),
            (
                "set pgwarden.route to primary;",
                Some(Set("route", "primary".into())),
            ),
            (
                "SET SESSION pgwarden.consistency = 'eventual'",
                Some(Set("consistency", "eventual".into())),
            ),
            ("RESET pgwarden.route", Some(Reset("route"))),
            ("SHOW pgwarden.consistency", Some(Show("consistency"))),
            ("SET pgwarden.other = 'x'", None),
            ("SET pgwarden.route = 'replica'; SELECT 1", None),
            ("SET LOCAL pgwarden.route = 'replica'", None),
            ("SELECT 'SET pgwarden.route = 1'", None),
            ("SET work_mem = '1MB'", None),
        ] {
            assert_eq!(proxy_setting(sql.as_bytes()), want, "{sql}");
        }
    }

    #[test]
    fn boolean_settings_read_as_on() {
        for (sql, on) in [
            ("SET default_transaction_read_only = on", true),
            ("SET default_transaction_read_only TO 'on'", true),
            (
                "select pg_catalog.set_config('default_transaction_read_only', 'true', false)",
                true,
            ),
            ("SET default_transaction_read_only = off", false),
            (
                "select pg_catalog.set_config('default_transaction_read_only', 'off', false)",
                false,
            ),
        ] {
            assert_eq!(says_on(sql), on, "{sql}");
        }
    }
}
