//! Where a statement may run: on a hot standby, or only on the primary.
//!
//! Soundness is the contract: a statement classified [`Kind::Read`] must run on a standby
//! without the errors a standby gives writes (25006, "cannot execute ... during recovery").
//! Whatever is not recognised as a read is a write. The classifier works on the lexer's tokens,
//! so words inside strings, quoted identifiers, dollar quotes and comments never count, and it
//! is conservative where the grammar would be needed to tell: any `INSERT`, `UPDATE`, `DELETE`,
//! `MERGE` or `INTO` anywhere in a query (a data-modifying CTE at any depth, `SELECT INTO`), any
//! locking clause (`FOR UPDATE | NO KEY UPDATE | SHARE | KEY SHARE`), makes it a write. A column
//! that happens to be named `update` sends its query to the primary, which is safe.
//!
//! Function calls (a name followed by `(`) are returned in [`Route::calls`]: whether they make
//! the statement a write is the catalog's answer (`pg_proc.provolatile`), which the proxy looks
//! up and caches; [`Route::decide`] combines the two. A few built-ins are known without the
//! catalog ([`builtin`]): the write functions (`nextval`, advisory locks, `txid_current`, ...)
//! and the volatile functions that a standby runs (`random`, `pg_last_wal_replay_lsn`, ...).
//!
//! Not visible in the text, and therefore not seen: volatile functions called by a view, an
//! operator or a cast. A query that reaches one through a view is classified a read; the
//! `/* pgwarden:primary */` hint sends it to the primary.

use crate::lex::{split, Lexer, Token};

/// Whether a transaction is read-only and serializable, as a `BEGIN` or `SET TRANSACTION` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TxnMode {
    /// `READ ONLY` (true), `READ WRITE` (false), or not said (the session's default).
    pub read_only: Option<bool>,
    /// `ISOLATION LEVEL SERIALIZABLE`, which a standby refuses.
    pub serializable: bool,
}

/// What a statement is, for routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Runs on a standby (given that none of its calls is a write function).
    Read,
    /// Only on the primary; the reason, for statistics.
    Write(&'static str),
    /// `BEGIN`, `START TRANSACTION`.
    Begin(TxnMode),
    /// `SET TRANSACTION ...`.
    SetTransaction(TxnMode),
    /// Runs wherever the session is: settings (`SET`, `RESET`, `SHOW`... see [`Kind::Read`] for
    /// `SHOW`), transaction control, cursors, an empty query.
    Anywhere,
}

/// A routing hint in a leading comment: `/* pgwarden:primary */`, `/* pgwarden:replica */`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    Primary,
    Replica,
}

/// A statement's (or query string's) routing class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub kind: Kind,
    /// Functions it calls, as (lower-cased) unqualified names, without duplicates; only for a
    /// read (a write goes to the primary whatever it calls).
    pub calls: Vec<String>,
    pub hint: Option<Hint>,
    /// It creates, replaces, alters or drops a function or procedure: what the catalog said
    /// about function names may no longer hold.
    pub changes_functions: bool,
}

/// What the catalog says of a function name (any schema, any overload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Volatility {
    /// Some function of that name is `VOLATILE`.
    Volatile,
    /// Every function of that name is `STABLE` or `IMMUTABLE`, or there is none (the name is a
    /// type or a keyword: a query that really calls a missing function fails everywhere).
    NotVolatile,
}

/// The decision for a statement, with what is known of the functions it calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Read,
    Write(&'static str),
    /// A read whose calls include names the catalog has not been asked about yet: the primary,
    /// this time.
    Unknown(Vec<String>),
}

impl Route {
    fn of(kind: Kind) -> Route {
        Route {
            kind,
            calls: Vec::new(),
            hint: None,
            changes_functions: false,
        }
    }

    /// Whether a [`Kind::Read`] stays a read given its calls: a built-in write function or one
    /// the catalog (`lookup`) says is volatile makes it a write, unless `allowed` names it (the
    /// configured read-only functions). Other kinds come back as they are (a read for
    /// `Anywhere`, a write otherwise: the caller decides transactions).
    pub fn decide(
        &self,
        allowed: impl Fn(&str) -> bool,
        lookup: impl Fn(&str) -> Option<Volatility>,
    ) -> Decision {
        match self.kind {
            Kind::Read | Kind::Anywhere => {}
            Kind::Write(why) => return Decision::Write(why),
            Kind::Begin(_) | Kind::SetTransaction(_) => return Decision::Write("transaction"),
        }
        let mut unknown = Vec::new();
        for f in &self.calls {
            if allowed(f) {
                continue;
            }
            match builtin(f) {
                Some(Builtin::Writes) => return Decision::Write("write function"),
                Some(Builtin::StandbySafe) => continue,
                None => {}
            }
            match lookup(f) {
                Some(Volatility::Volatile) => return Decision::Write("volatile function"),
                Some(Volatility::NotVolatile) => {}
                None => unknown.push(f.clone()),
            }
        }
        if unknown.is_empty() {
            Decision::Read
        } else {
            Decision::Unknown(unknown)
        }
    }
}

/// What is known of a built-in function without asking the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// Writes, or fails on a standby.
    Writes,
    /// Volatile, yet a standby runs it.
    StandbySafe,
}

const WRITE_FUNCTIONS: &[&str] = &[
    "nextval",
    "setval",
    "lastval",
    "currval",
    "txid_current",
    "txid_current_if_assigned",
    "pg_current_xact_id",
    "pg_current_xact_id_if_assigned",
    "pg_notify",
    "pg_current_wal_lsn",
    "pg_current_wal_insert_lsn",
    "pg_current_wal_flush_lsn",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_logical_emit_message",
    "lo_create",
    "lo_creat",
    "lo_import",
    "lo_unlink",
    "lo_put",
    "lo_from_bytea",
    "set_config",
    "dblink",
    "dblink_exec",
];

const STANDBY_SAFE: &[&str] = &[
    "random",
    "random_normal",
    "setseed",
    "clock_timestamp",
    "timeofday",
    "gen_random_uuid",
    "uuid_generate_v4",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "pg_is_in_recovery",
    "pg_last_wal_replay_lsn",
    "pg_last_wal_receive_lsn",
    "pg_last_xact_replay_timestamp",
    "pg_is_wal_replay_paused",
    "pg_get_wal_replay_pause_state",
    "pg_backend_pid",
    "pg_cancel_backend",
    "pg_stat_clear_snapshot",
    "inet_server_port",
    "inet_server_addr",
    "inet_client_addr",
    "inet_client_port",
];

/// Built-in knowledge of `name` (lower case).
pub fn builtin(name: &str) -> Option<Builtin> {
    if WRITE_FUNCTIONS.contains(&name) || name.starts_with("pg_advisory") {
        return Some(Builtin::Writes);
    }
    if name.starts_with("pg_try_advisory") {
        return Some(Builtin::Writes);
    }
    STANDBY_SAFE.contains(&name).then_some(Builtin::StandbySafe)
}

/// Words followed by `(` that are grammar, not function calls.
const NOT_CALLS: &[&str] = &[
    "all",
    "and",
    "any",
    "array",
    "as",
    "between",
    "by",
    "case",
    "cast",
    "char",
    "character",
    "coalesce",
    "cube",
    "decimal",
    "distinct",
    "else",
    "exists",
    "extract",
    "filter",
    "float",
    "from",
    "greatest",
    "group",
    "grouping",
    "having",
    "in",
    "interval",
    "is",
    "join",
    "lateral",
    "least",
    "like",
    "limit",
    "not",
    "nullif",
    "numeric",
    "offset",
    "on",
    "or",
    "order",
    "over",
    "overlay",
    "partition",
    "position",
    "rollup",
    "row",
    "select",
    "sets",
    "some",
    "substring",
    "table",
    "then",
    "time",
    "timestamp",
    "trim",
    "union",
    "except",
    "intersect",
    "using",
    "values",
    "varchar",
    "when",
    "where",
    "window",
    "with",
    "within",
    "xmlelement",
    "xmlforest",
    "bit",
    "varbit",
    "recursive",
    "returning",
];

/// The routing class of a query string (one statement or several, `;`-separated): a write if
/// any statement is, a transaction start among others counted as a write.
pub fn classify(sql: &str) -> Route {
    let hint = leading_hint(sql);
    let statements = split(sql);
    let mut route = match statements.as_slice() {
        [] => Route::of(Kind::Anywhere),
        [one] => refine(sql, statement(one)),
        many => {
            let mut acc = Route::of(Kind::Anywhere);
            for s in many {
                let r = statement(s);
                acc.changes_functions |= r.changes_functions;
                match r.kind {
                    Kind::Write(_) => acc.kind = r.kind,
                    Kind::Begin(_) | Kind::SetTransaction(_) => {
                        if !matches!(acc.kind, Kind::Write(_)) {
                            acc.kind = Kind::Write("transaction in a multi-statement query");
                        }
                    }
                    Kind::Read => {
                        if acc.kind == Kind::Anywhere {
                            acc.kind = Kind::Read;
                        }
                        for c in r.calls {
                            if !acc.calls.contains(&c) {
                                acc.calls.push(c);
                            }
                        }
                    }
                    Kind::Anywhere => {}
                }
            }
            if matches!(acc.kind, Kind::Write(_)) {
                acc.calls.clear();
            }
            acc
        }
    };
    route.hint = hint;
    route
}

/// The reasons the lexer gives for a write that the grammar may refute: words it cannot tell
/// from names.
const REFUTABLE: &[&str] = &[DATA_MODIFYING, SELECT_INTO, LOCKING];
const DATA_MODIFYING: &str = "data-modifying statement in a query";
const SELECT_INTO: &str = "SELECT INTO";
const LOCKING: &str = "locking clause";

/// A one-statement query the lexer called a write for a word that may be a name: what
/// PostgreSQL's grammar says ([`grammar`](crate::grammar)). Any other route is sure as it is.
fn refine(sql: &str, route: Route) -> Route {
    let Kind::Write(why) = route.kind else {
        return route;
    };
    if !REFUTABLE.contains(&why) {
        return route;
    }
    match crate::grammar::verdict(sql) {
        crate::grammar::Verdict::Read(calls) => Route {
            kind: Kind::Read,
            calls,
            ..route
        },
        crate::grammar::Verdict::Write => route,
        crate::grammar::Verdict::Unparsable => Route {
            kind: Kind::Write("unparsable"),
            ..route
        },
    }
}

/// [`classify`] for a text in the client's encoding, which need not be UTF-8 (every word the
/// classifier acts on is ASCII; see `session::classify_query_bytes`).
pub fn classify_bytes(sql: &[u8]) -> Route {
    match std::str::from_utf8(sql) {
        Ok(s) => classify(s),
        Err(_) => classify(&sql.iter().map(|&c| char::from(c)).collect::<String>()),
    }
}

/// A `/* pgwarden:primary */` or `/* pgwarden:replica */` comment before anything else.
fn leading_hint(sql: &str) -> Option<Hint> {
    let rest = sql.trim_start().strip_prefix("/*")?;
    let body = rest[..rest.find("*/")?].trim();
    let word = body.strip_prefix("pgwarden:")?.trim();
    if word.eq_ignore_ascii_case("primary") {
        Some(Hint::Primary)
    } else if word.eq_ignore_ascii_case("replica") {
        Some(Hint::Replica)
    } else {
        None
    }
}

/// One statement.
fn statement(sql: &str) -> Route {
    let toks: Vec<Token<'_>> = Lexer::new(sql).collect();
    let Some(first) = toks.first() else {
        return Route::of(Kind::Anywhere);
    };
    let word = match first {
        Token::Word(w) => w.to_ascii_lowercase(),
        Token::Symbol(b'(') => return query(&toks),
        _ => return Route::of(Kind::Write("not a statement the classifier knows")),
    };
    let second = toks.get(1);
    let is2 = |w: &str| second.is_some_and(|t| t.is_word(w));
    let kind = match word.as_str() {
        "select" | "values" | "table" | "with" => return query(&toks),
        "show" => Kind::Read,
        "explain" => return explain(&toks),
        "copy" => return copy(&toks),
        "begin" | "start" => Kind::Begin(txn_mode(&toks[1..])),
        "set" if is2("transaction") => Kind::SetTransaction(txn_mode(&toks[2..])),
        "set" if is2("session") && toks.get(2).is_some_and(|t| t.is_word("characteristics")) => {
            Kind::Write("SET SESSION CHARACTERISTICS")
        }
        "set" | "reset" | "discard" | "deallocate" => Kind::Anywhere,
        "commit" | "rollback" | "end" | "abort" if is2("prepared") => {
            Kind::Write("two-phase commit")
        }
        "commit" | "rollback" | "end" | "abort" | "savepoint" | "release" => Kind::Anywhere,
        "fetch" | "move" | "close" => Kind::Anywhere,
        "declare" => return declare(&toks),
        "prepare" if is2("transaction") => Kind::Write("two-phase commit"),
        "prepare" => Kind::Write("SQL-level PREPARE"),
        "execute" => Kind::Write("EXECUTE of a statement the proxy cannot see"),
        "insert" | "update" | "delete" | "merge" | "truncate" => Kind::Write("DML"),
        "create" | "alter" | "drop" | "comment" | "grant" | "revoke" | "security" | "reassign"
        | "import" | "refresh" | "reindex" | "cluster" | "vacuum" | "analyze" | "analyse"
        | "checkpoint" | "load" => {
            let changes = toks
                .iter()
                .take(6)
                .any(|t| t.is_word("function") || t.is_word("procedure"));
            return Route {
                changes_functions: changes,
                ..Route::of(Kind::Write("DDL or maintenance"))
            };
        }
        "lock" => Kind::Write("LOCK"),
        "listen" | "unlisten" | "notify" => Kind::Write("LISTEN/NOTIFY"),
        "call" => Kind::Write("CALL"),
        "do" => Kind::Write("DO"),
        _ => Kind::Write("not a statement the classifier knows"),
    };
    Route::of(kind)
}

/// A query (`SELECT`, `VALUES`, `TABLE`, `WITH`, or parenthesized): a read unless some token
/// says otherwise.
fn query(toks: &[Token<'_>]) -> Route {
    let mut calls: Vec<String> = Vec::new();
    for (i, t) in toks.iter().enumerate() {
        let next = toks.get(i + 1);
        if let Token::Word(w) = t {
            let lw = w.to_ascii_lowercase();
            match lw.as_str() {
                "insert" | "update" | "delete" | "merge" => {
                    return Route::of(Kind::Write(DATA_MODIFYING))
                }
                "into" => return Route::of(Kind::Write(SELECT_INTO)),
                "for"
                    if next.is_some_and(|n| {
                        n.is_word("update")
                            || n.is_word("share")
                            || n.is_word("no")
                            || n.is_word("key")
                    }) =>
                {
                    return Route::of(Kind::Write(LOCKING))
                }
                _ => {}
            }
        }
        if next != Some(&Token::Symbol(b'(')) {
            continue;
        }
        let name = match t {
            Token::Word(w) => {
                let lw = w.to_ascii_lowercase();
                if NOT_CALLS.contains(&lw.as_str()) {
                    continue;
                }
                lw
            }
            Token::Quoted(q) => q.replace("\"\"", "\""),
            _ => continue,
        };
        if !calls.contains(&name) {
            calls.push(name);
        }
    }
    Route {
        calls,
        ..Route::of(Kind::Read)
    }
}

/// `EXPLAIN`: a read without `ANALYZE` (the statement is planned, not run); with it, the
/// statement's own class.
fn explain(toks: &[Token<'_>]) -> Route {
    let mut i = 1;
    let mut analyze = false;
    if toks.get(i) == Some(&Token::Symbol(b'(')) {
        // EXPLAIN (option [value], ...)
        let mut depth = 0;
        let mut last_option: Option<bool> = None;
        while let Some(t) = toks.get(i) {
            i += 1;
            match t {
                Token::Symbol(b'(') => depth += 1,
                Token::Symbol(b')') => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                Token::Word(w)
                    if w.eq_ignore_ascii_case("analyze") || w.eq_ignore_ascii_case("analyse") =>
                {
                    analyze = true;
                    last_option = Some(true);
                }
                Token::Word(w)
                    if last_option == Some(true)
                        && (w.eq_ignore_ascii_case("false") || w.eq_ignore_ascii_case("off")) =>
                {
                    analyze = false;
                }
                Token::Symbol(b',') => last_option = None,
                Token::Word(_) if last_option.is_none() => last_option = Some(false),
                Token::Number(n) if last_option == Some(true) && *n == "0" => analyze = false,
                _ => {}
            }
        }
    } else {
        while let Some(t) = toks.get(i) {
            if t.is_word("analyze") || t.is_word("analyse") {
                analyze = true;
            } else if !t.is_word("verbose") {
                break;
            }
            i += 1;
        }
    }
    let rest = &toks[i.min(toks.len())..];
    if !analyze {
        return Route::of(Kind::Read);
    }
    match rest.first() {
        Some(t)
            if t.is_word("select")
                || t.is_word("values")
                || t.is_word("table")
                || t.is_word("with") =>
        {
            query(rest)
        }
        Some(Token::Symbol(b'(')) => query(rest),
        _ => Route::of(Kind::Write("EXPLAIN ANALYZE of a write")),
    }
}

/// `COPY ... TO` reads (its query, if one, decides); `COPY ... FROM` writes.
fn copy(toks: &[Token<'_>]) -> Route {
    // COPY (query) TO ...: the query is the parenthesized part right after COPY.
    let mut inner = None;
    let mut from = 1;
    if toks.get(1) == Some(&Token::Symbol(b'(')) {
        let close = matching_paren(toks, 1);
        inner = Some(&toks[2..close.min(toks.len())]);
        from = close + 1;
    }
    let mut depth = 0;
    for t in toks.iter().skip(from) {
        match t {
            Token::Symbol(b'(') => depth += 1,
            Token::Symbol(b')') => depth -= 1,
            Token::Word(w) if depth == 0 && w.eq_ignore_ascii_case("from") => {
                return Route::of(Kind::Write("COPY FROM"))
            }
            Token::Word(w) if depth == 0 && w.eq_ignore_ascii_case("to") => {
                return match inner {
                    Some(q) => query(q),
                    None => Route::of(Kind::Read),
                };
            }
            _ => {}
        }
    }
    Route::of(Kind::Write("COPY"))
}

/// The index of the `)` closing the `(` at `open` (the length when it is not closed).
fn matching_paren(toks: &[Token<'_>], open: usize) -> usize {
    let mut depth = 0;
    for (i, t) in toks.iter().enumerate().skip(open) {
        match t {
            Token::Symbol(b'(') => depth += 1,
            Token::Symbol(b')') => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    toks.len()
}

/// `DECLARE name ... CURSOR ... FOR query`: the query's class (a cursor lives in its
/// transaction; `WITH HOLD` pins the session anyway).
fn declare(toks: &[Token<'_>]) -> Route {
    match toks.iter().position(|t| t.is_word("for")) {
        Some(i) => query(&toks[i + 1..]),
        None => Route::of(Kind::Write("DECLARE")),
    }
}

/// The mode words of `BEGIN` / `START TRANSACTION` / `SET TRANSACTION`.
fn txn_mode(toks: &[Token<'_>]) -> TxnMode {
    let mut m = TxnMode::default();
    for (i, t) in toks.iter().enumerate() {
        let next = toks.get(i + 1);
        if t.is_word("read") {
            if next.is_some_and(|n| n.is_word("only")) {
                m.read_only = Some(true);
            } else if next.is_some_and(|n| n.is_word("write")) {
                m.read_only = Some(false);
            }
        }
        if t.is_word("serializable") {
            m.serializable = true;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints() {
        for (sql, want) in [
            ("/* pgwarden:primary */ SELECT 1", Some(Hint::Primary)),
            ("  /*pgwarden:replica*/SELECT 1", Some(Hint::Replica)),
            ("/* pgwarden:REPLICA */ SELECT 1", Some(Hint::Replica)),
            ("/* pgwarden:elsewhere */ SELECT 1", None),
            ("/* other */ SELECT 1", None),
            ("SELECT 1 /* pgwarden:primary */", None),
            ("/* pgwarden:primary", None),
        ] {
            assert_eq!(classify(sql).hint, want, "{sql}");
        }
    }

    #[test]
    fn functions_decide_reads() {
        let r = classify("SELECT f(1), g(2), random(), nextval('s')");
        let none = |_: &str| false;
        assert_eq!(r.decide(none, |_| None), Decision::Write("write function"));
        let r = classify("SELECT f(1), g(2), random()");
        assert_eq!(
            r.decide(none, |_| None),
            Decision::Unknown(vec!["f".into(), "g".into()])
        );
        let known = |f: &str| {
            Some(if f == "g" {
                Volatility::Volatile
            } else {
                Volatility::NotVolatile
            })
        };
        assert_eq!(r.decide(none, known), Decision::Write("volatile function"));
        assert_eq!(r.decide(|f| f == "g", known), Decision::Read);
        assert_eq!(
            classify("SELECT nextval('s')").decide(|f| f == "nextval", |_| None),
            Decision::Read,
            "the configured allowlist wins"
        );
    }
}
