//! What a statement does to session state.
//!
//! The proxy remembers a client's settings and replays them on whichever server connection the
//! client gets next, so it must know which statements change settings. State it cannot move
//! between server connections *pins* the client to its connection instead.
//!
//! Recognised:
//! - `SET [SESSION] name {TO | =} ...` and the special forms `SET TIME ZONE`, `SET NAMES`,
//!   `SET SCHEMA`, `SET ROLE`, `SET SESSION AUTHORIZATION`, `SET XML OPTION`: [`Effect::Set`],
//!   replayed by running the same statement again. `SET LOCAL`, `SET TRANSACTION` and
//!   `SET CONSTRAINTS` last only until the transaction ends: no effect.
//! - `RESET name`, `RESET ALL`, `DISCARD ALL`.
//! - Transaction control (`COMMIT`, `ROLLBACK`, savepoints), which decides whether settings
//!   made inside a transaction stay.
//! - Pins ([`Pin`]): `LISTEN`; session-level advisory locks (`pg_advisory_lock`,
//!   `pg_advisory_lock_shared`, `pg_try_advisory_lock`, `pg_try_advisory_lock_shared`, also
//!   inside a `DO` block's text); temporary objects (`CREATE TEMP ...` other than tables
//!   `ON COMMIT DROP`, `SELECT ... INTO TEMP`, anything naming `pg_temp`);
//!   `DECLARE ... WITH HOLD`; SQL-level `PREPARE`; `LOAD`; `set_config(name, value, is_local)`
//!   unless `is_local` is literally true; `SET SESSION CHARACTERISTICS`.
//!
//! Not recognisable from the text: these same things done inside a function the statement
//! calls. A client that needs them should use session pooling.

use crate::lex::{split, Lexer, Token};

/// Why a client must keep its server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    Listen,
    AdvisoryLock,
    TempObject,
    HoldCursor,
    Prepare,
    Load,
    SetConfig,
    SessionCharacteristics,
    /// A setting made by a text that is not UTF-8 (a client whose `client_encoding` is not
    /// UTF8): replaying it on another server would need the client's bytes, which the
    /// proxy's state does not keep, so the setting stays on its server with the client.
    NonUtf8Setting,
}

impl Pin {
    pub fn describe(self) -> &'static str {
        match self {
            Pin::Listen => "LISTEN",
            Pin::AdvisoryLock => "a session advisory lock",
            Pin::TempObject => "a temporary object",
            Pin::HoldCursor => "a WITH HOLD cursor",
            Pin::Prepare => "SQL-level PREPARE",
            Pin::Load => "LOAD",
            Pin::SetConfig => "set_config(..., false)",
            Pin::SessionCharacteristics => "SET SESSION CHARACTERISTICS",
            Pin::NonUtf8Setting => "SET with text that is not UTF-8",
        }
    }
}

/// A statement's effect on the session state the proxy tracks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    None,
    /// Sets `name` (lower case); `sql` is the statement, which replays it.
    Set {
        name: String,
        sql: String,
    },
    Reset {
        name: String,
    },
    ResetAll,
    /// `DISCARD ALL`: settings reset, and everything else a session holds dropped.
    DiscardAll,
    Pin(Pin),
    /// `COMMIT`, `END` (with or without `AND CHAIN`): the transaction's settings stay.
    Commit,
    /// `ROLLBACK`, `ABORT`: the transaction's settings are undone.
    Rollback,
    /// `SAVEPOINT name`.
    Savepoint(String),
    /// `ROLLBACK TO [SAVEPOINT] name`: settings made since the savepoint are undone.
    RollbackTo(String),
    /// `RELEASE [SAVEPOINT] name`.
    Release(String),
}

const ADVISORY: &[&str] = &[
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];

/// The effect of each statement of a simple-protocol query string, in order; empty when no
/// statement has any (the common case, without allocating per statement).
pub fn classify_query(sql: &str) -> Vec<Effect> {
    if !might_matter(sql.as_bytes()) {
        return Vec::new();
    }
    classify_each(sql)
}

/// Every statement's effect, without the filter; empty when none has any.
fn classify_each(sql: &str) -> Vec<Effect> {
    let effects: Vec<Effect> = split(sql).into_iter().map(classify_statement).collect();
    if effects.iter().all(|e| *e == Effect::None) {
        Vec::new()
    } else {
        effects
    }
}

/// A cheap filter: false only when no statement in `sql` can have an effect. Every keyword and
/// function name the classifier acts on begins a word, where a word may also begin after `_`
/// or `.` (`pg_temp`, `pg_catalog.set_config`), so only word starts are compared.
fn might_matter(b: &[u8]) -> bool {
    if lone_plain_select(b) {
        return false;
    }
    // Eight bytes at a time: a bit per byte for "letter or digit" (SWAR: each byte a lane of a
    // u64, the lane's top bit the answer), so that word starts (a letter or digit after
    // something else) come out of a shift and a mask; only those are looked at one by one.
    let mut prev_alnum = 0u64; // the previous chunk's last lane, as lane 0's top bit
    let mut at = 0;
    while at < b.len() {
        let x = match b.get(at..at + 8) {
            Some(eight) => u64::from_le_bytes(eight.try_into().expect("eight bytes")),
            None => {
                // Zero is not alphanumeric: the short tail is padded with it.
                let mut lanes = [0u8; 8];
                lanes[..b.len() - at].copy_from_slice(&b[at..]);
                u64::from_le_bytes(lanes)
            }
        };
        let alnum = alnum_lanes(x);
        let mut starts = alnum & !((alnum << 8) | prev_alnum);
        while starts != 0 {
            let i = at + (starts.trailing_zeros() / 8) as usize;
            if BYTE_CLASS[b[i] as usize] & CANDIDATE != 0 && keyword_prefix_at(b, i) {
                return true;
            }
            starts &= starts - 1;
        }
        prev_alnum = alnum >> 56;
        at += 8;
    }
    false
}

/// Whether `b` is a single `SELECT` that cannot have an effect: it starts with `SELECT` and a
/// space, and has no `(` (so no function call), no `temp` in any case (`pg_temp`, `INTO TEMP`)
/// and nothing but spaces and `;` after its first `;`. For a statement that starts with SELECT
/// the classifier acts only on calls, `pg_temp` and `INTO TEMP` (`scan_calls`), so this is the
/// common read-only query decided in a few instructions per eight bytes. A byte in a string or
/// a comment counts too, which can only send a text to the full filter.
fn lone_plain_select(b: &[u8]) -> bool {
    // "select" in either case, then a space: the first eight bytes as one word.
    const SELECT: u64 = u64::from_le_bytes(*b"select\0\0");
    const SIX: u64 = 0x0000_ffff_ffff_ffff;
    let Some(first) = b.get(..8) else {
        return b.len() == 7 && b[..6].eq_ignore_ascii_case(b"select") && b[6] == b' ';
    };
    let w = u64::from_le_bytes(first.try_into().expect("eight bytes"));
    if (w | (LANES_ONE * 0x20)) & SIX != SELECT || !matches!(b[6], b' ' | b'\t' | b'\n' | b'\r') {
        return false;
    }
    // Eight bytes at a time from the space on; the last word is the last eight bytes, which
    // may overlap the one before (or "select" itself): bytes seen twice are harmless.
    let mut at = 6.min(b.len() - 8);
    loop {
        let x = u64::from_le_bytes(b[at..at + 8].try_into().expect("eight bytes"));
        // Whether any lane holds a byte is exact; which lanes is exact for the lowest one
        // only (a borrow can mark lanes above it), so marked lanes are checked byte by byte.
        if lanes_equal(x, b'(') != 0 {
            return false;
        }
        let mut ts = lanes_equal(x | (LANES_ONE * 0x20), b't');
        while ts != 0 {
            let i = at + (ts.trailing_zeros() / 8) as usize;
            if b.get(i..i + 4)
                .is_some_and(|w| w.eq_ignore_ascii_case(b"temp"))
            {
                return false;
            }
            ts &= ts - 1;
        }
        let semicolons = lanes_equal(x, b';');
        if semicolons != 0 {
            let i = at + (semicolons.trailing_zeros() / 8) as usize;
            return b[i + 1..]
                .iter()
                .all(|&c| c == b';' || c.is_ascii_whitespace());
        }
        if at + 8 == b.len() {
            return true;
        }
        at = (at + 8).min(b.len() - 8);
    }
}

/// The top bit of each byte lane of `x` that equals `byte` (exact for the lowest such lane; see
/// `lone_plain_select`), and none if no lane does.
fn lanes_equal(x: u64, byte: u8) -> u64 {
    let y = x ^ (LANES_ONE * byte as u64);
    y.wrapping_sub(LANES_ONE) & !y & LANES_HIGH
}

const LANES_HIGH: u64 = 0x8080_8080_8080_8080;
const LANES_ONE: u64 = 0x0101_0101_0101_0101;

/// The top bit of each byte lane of `x` set where that byte is an ASCII letter or digit.
fn alnum_lanes(x: u64) -> u64 {
    // 7-bit values, so the comparisons below never borrow across lanes.
    let v = x & !LANES_HIGH;
    // Top bit set where the lane's value is >= k (v and k below 0x80).
    let ge = |v: u64, k: u8| ((v | LANES_HIGH) - LANES_ONE * k as u64) & LANES_HIGH;
    let digit = ge(v, b'0') & !ge(v, b'9' + 1);
    let lower = v | (LANES_ONE * 0x20);
    let alpha = ge(lower, b'a') & !ge(lower, b'z' + 1);
    (digit | alpha) & !x & LANES_HIGH
}

/// Whether `b[at..]` begins with the first four letters (in either case) of a keyword the
/// classifier acts on (`set` and `end` are three letters long): the four bytes as one 32-bit
/// word, compared with the two three-letter ones and with the one four-letter prefix a perfect
/// hash picks, so three comparisons whatever the word. Four letters admit more than the whole words would (`settings`,
/// `temperature`): a false positive only costs a full classification.
#[inline(always)]
fn keyword_prefix_at(b: &[u8], at: usize) -> bool {
    const fn word(s: &[u8; 4]) -> u32 {
        u32::from_le_bytes(*s)
    }
    const THREE: u32 = 0x00ff_ffff;
    let w = match b.get(at..at + 4) {
        Some(four) => u32::from_le_bytes([four[0], four[1], four[2], four[3]]),
        None => {
            // Fewer than four bytes left: padded with spaces.
            let mut w = [b' '; 4];
            let rest = &b[at..];
            w[..rest.len()].copy_from_slice(rest);
            u32::from_le_bytes(w)
        }
    };
    // ASCII upper case to lower case; no other byte becomes a letter this way, and the space
    // padding stays a space.
    let w = w | 0x2020_2020;
    let three = w & THREE;
    three == word(b"set\0") & THREE
        || three == word(b"end\0") & THREE
        || FOUR_LETTER[four_letter_slot(w)] == w
}

/// The four-letter keyword prefixes, each in the slot `four_letter_slot` gives it (a perfect
/// hash: no two share a slot); empty slots hold 0, which no lower-cased word equals (every byte
/// of one has the 0x20 bit set).
static FOUR_LETTER: [u32; 16] = {
    const WORDS: [&[u8; 4]; 13] = [
        b"save", b"rese", b"roll", b"rele", b"disc", b"decl", b"list", b"load", b"prep", b"temp",
        b"advi", b"abor", b"comm",
    ];
    let mut table = [0u32; 16];
    let mut i = 0;
    while i < WORDS.len() {
        let w = u32::from_le_bytes(*WORDS[i]);
        let slot = four_letter_slot(w);
        assert!(
            table[slot] == 0,
            "two keywords share a slot: pick another multiplier"
        );
        table[slot] = w;
        i += 1;
    }
    table
};

const fn four_letter_slot(w: u32) -> usize {
    (w.wrapping_mul(0x20d1_eb7d) >> 28) as usize
}

const ALNUM: u8 = 1;
/// The first letter of a keyword `might_matter` looks for, in either case (ALNUM's bit shifted
/// left by one: see `might_matter`).
const CANDIDATE: u8 = ALNUM << 1;
static BYTE_CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        if b.is_ascii_alphanumeric() {
            t[c] |= ALNUM;
        }
        if matches!(
            b.to_ascii_lowercase(),
            b's' | b'r' | b'd' | b'l' | b'p' | b't' | b'a' | b'c' | b'e'
        ) {
            t[c] |= CANDIDATE;
        }
        c += 1;
    }
    t
};

/// The effect of one statement (no `;` separators), e.g. an extended-protocol Parse.
pub fn classify(stmt: &str) -> Effect {
    if !might_matter(stmt.as_bytes()) {
        return Effect::None;
    }
    classify_statement(stmt)
}

/// [`classify_query`] for a text in the client's encoding, which need not be UTF-8. Every
/// keyword is ASCII and every encoding PostgreSQL accepts from a client keeps ASCII bytes as
/// they are (in the multi-byte encodings SJIS, BIG5, GBK, UHC and GB18030 a second byte may
/// look like ASCII, which can only make the classifier see more than is there), so a text that
/// is not UTF-8 is classified byte by byte (each byte read as one Latin-1 character, keeping
/// names distinct); a setting it makes pins the client (see [`Pin::NonUtf8Setting`]).
pub fn classify_query_bytes(sql: &[u8]) -> Vec<Effect> {
    if !might_matter(sql) {
        return Vec::new();
    }
    match std::str::from_utf8(sql) {
        Ok(s) => classify_each(s),
        Err(_) => classify_each(&latin1(sql))
            .into_iter()
            .map(pin_settings)
            .collect(),
    }
}

/// [`classify`] for a text in the client's encoding (see [`classify_query_bytes`]).
pub fn classify_bytes(stmt: &[u8]) -> Effect {
    if !might_matter(stmt) {
        return Effect::None;
    }
    match std::str::from_utf8(stmt) {
        Ok(s) => classify_statement(s),
        Err(_) => pin_settings(classify_statement(&latin1(stmt))),
    }
}

fn latin1(b: &[u8]) -> String {
    b.iter().map(|&c| char::from(c)).collect()
}

fn pin_settings(e: Effect) -> Effect {
    match e {
        Effect::Set { .. } => Effect::Pin(Pin::NonUtf8Setting),
        other => other,
    }
}

fn classify_statement(stmt: &str) -> Effect {
    let mut toks = Lexer::new(stmt);
    let Some(first) = toks.next() else {
        return Effect::None;
    };
    let rest: Vec<Token<'_>> = toks.collect();
    let word = |i: usize, w: &str| rest.get(i).is_some_and(|t| t.is_word(w));
    if first.is_word("set") {
        return classify_set(stmt, &rest);
    }
    if first.is_word("reset") {
        return classify_reset(&rest);
    }
    if first.is_word("discard") {
        return if word(0, "all") {
            Effect::DiscardAll
        } else {
            Effect::None
        };
    }
    if first.is_word("commit") || first.is_word("end") {
        // COMMIT PREPARED finishes another transaction, not this one.
        return if word(0, "prepared") {
            Effect::None
        } else {
            Effect::Commit
        };
    }
    if first.is_word("rollback") || first.is_word("abort") {
        return classify_rollback(&rest);
    }
    if first.is_word("savepoint") {
        return rest
            .first()
            .and_then(Token::ident)
            .map_or(Effect::None, Effect::Savepoint);
    }
    if first.is_word("release") {
        let name = if word(0, "savepoint") {
            rest.get(1)
        } else {
            rest.first()
        };
        return name
            .and_then(Token::ident)
            .map_or(Effect::None, Effect::Release);
    }
    if first.is_word("listen") {
        return Effect::Pin(Pin::Listen);
    }
    if first.is_word("prepare") {
        // PREPARE TRANSACTION is two-phase commit, not a statement.
        return if word(0, "transaction") {
            Effect::None
        } else {
            Effect::Pin(Pin::Prepare)
        };
    }
    if first.is_word("load") {
        return Effect::Pin(Pin::Load);
    }
    if first.is_word("declare")
        && rest
            .windows(2)
            .any(|w| w[0].is_word("with") && w[1].is_word("hold"))
    {
        return Effect::Pin(Pin::HoldCursor);
    }
    // A temporary table dropped at commit leaves nothing behind.
    let drops_at_commit = || {
        rest.windows(3)
            .any(|w| w[0].is_word("on") && w[1].is_word("commit") && w[2].is_word("drop"))
    };
    if first.is_word("create") && creates_temp(&rest) && !drops_at_commit() {
        return Effect::Pin(Pin::TempObject);
    }
    if first.is_word("do") {
        // The body is a string; look inside it for session advisory locks.
        let lower = stmt.to_ascii_lowercase();
        if ADVISORY.iter().any(|f| contains_call(&lower, f)) {
            return Effect::Pin(Pin::AdvisoryLock);
        }
        return Effect::None;
    }
    scan_calls(&rest)
}

fn classify_set(stmt: &str, rest: &[Token<'_>]) -> Effect {
    let mut i = 0;
    if rest.first().is_some_and(|t| t.is_word("local")) {
        return Effect::None;
    }
    if rest.first().is_some_and(|t| t.is_word("session")) {
        i = 1;
        if rest.get(1).is_some_and(|t| t.is_word("characteristics")) {
            return Effect::Pin(Pin::SessionCharacteristics);
        }
    }
    let w = |k: usize, s: &str| rest.get(i + k).is_some_and(|t| t.is_word(s));
    let name = if w(0, "transaction") || w(0, "constraints") {
        return Effect::None;
    } else if w(0, "time") && w(1, "zone") {
        "timezone".to_string()
    } else if w(0, "names") {
        "client_encoding".to_string()
    } else if w(0, "schema") {
        "search_path".to_string()
    } else if w(0, "role") {
        "role".to_string()
    } else if w(0, "authorization") && i == 1 {
        "session_authorization".to_string()
    } else if w(0, "xml") && w(1, "option") {
        "xmloption".to_string()
    } else {
        match dotted_name(&rest[i.min(rest.len())..]) {
            Some(n) => n,
            None => return Effect::None, // malformed: the server will say so
        }
    };
    Effect::Set {
        name,
        sql: stmt.trim().to_string(),
    }
}

fn classify_rollback(rest: &[Token<'_>]) -> Effect {
    if rest.first().is_some_and(|t| t.is_word("prepared")) {
        return Effect::None;
    }
    let mut i = 0;
    if rest
        .first()
        .is_some_and(|t| t.is_word("work") || t.is_word("transaction"))
    {
        i = 1;
    }
    if !rest.get(i).is_some_and(|t| t.is_word("to")) {
        return Effect::Rollback;
    }
    i += 1;
    if rest.get(i).is_some_and(|t| t.is_word("savepoint")) {
        i += 1;
    }
    rest.get(i)
        .and_then(Token::ident)
        .map_or(Effect::None, Effect::RollbackTo)
}

fn classify_reset(rest: &[Token<'_>]) -> Effect {
    let w = |k: usize, s: &str| rest.get(k).is_some_and(|t| t.is_word(s));
    let name = if w(0, "all") {
        return Effect::ResetAll;
    } else if w(0, "transaction") {
        return Effect::None;
    } else if w(0, "time") && w(1, "zone") {
        "timezone".to_string()
    } else if w(0, "session") && w(1, "authorization") {
        "session_authorization".to_string()
    } else {
        match dotted_name(rest) {
            Some(n) => n,
            None => return Effect::None,
        }
    };
    Effect::Reset { name }
}

/// `a` or `a.b` (custom settings) at the start of `toks`.
fn dotted_name(toks: &[Token<'_>]) -> Option<String> {
    let mut name = toks.first()?.ident()?;
    let mut k = 1;
    while toks.get(k) == Some(&Token::Symbol(b'.')) {
        name.push('.');
        name.push_str(&toks.get(k + 1)?.ident()?);
        k += 2;
    }
    Some(name)
}

/// `CREATE [OR REPLACE] [GLOBAL | LOCAL] {TEMP | TEMPORARY} ...`, or a `pg_temp` name.
fn creates_temp(rest: &[Token<'_>]) -> bool {
    let lead = rest
        .iter()
        .take(5)
        .take_while(|t| !t.is_word("table") && !t.is_word("view") && !t.is_word("sequence"));
    lead.into_iter()
        .any(|t| t.is_word("temp") || t.is_word("temporary"))
        || rest.iter().any(|t| t.is_word("pg_temp"))
}

/// Pins from calls and clauses anywhere in a statement: advisory locks, `set_config` that is not
/// transaction-local, `INTO TEMP`, `pg_temp`.
fn scan_calls(toks: &[Token<'_>]) -> Effect {
    for (i, t) in toks.iter().enumerate() {
        let Token::Word(w) = t else { continue };
        let call = toks.get(i + 1) == Some(&Token::Symbol(b'('));
        if call && ADVISORY.iter().any(|f| w.eq_ignore_ascii_case(f)) {
            return Effect::Pin(Pin::AdvisoryLock);
        }
        if call && w.eq_ignore_ascii_case("set_config") && !third_arg_is_true(&toks[i + 2..]) {
            return Effect::Pin(Pin::SetConfig);
        }
        if w.eq_ignore_ascii_case("pg_temp")
            || (w.eq_ignore_ascii_case("into")
                && toks
                    .get(i + 1)
                    .is_some_and(|t| t.is_word("temp") || t.is_word("temporary")))
        {
            return Effect::Pin(Pin::TempObject);
        }
    }
    Effect::None
}

/// Whether the third argument of a call whose arguments start at `args` is literally true.
fn third_arg_is_true(args: &[Token<'_>]) -> bool {
    let mut depth = 0;
    let mut commas = 0;
    let mut third = Vec::new();
    for t in args {
        match t {
            Token::Symbol(b'(') => depth += 1,
            Token::Symbol(b')') if depth == 0 => break,
            Token::Symbol(b')') => depth -= 1,
            Token::Symbol(b',') if depth == 0 => {
                commas += 1;
                continue;
            }
            _ => {}
        }
        if commas == 2 {
            third.push(*t);
        }
    }
    match third.as_slice() {
        [Token::Word(w)] => w.eq_ignore_ascii_case("true"),
        [Token::Str(s)] => matches!(
            s.to_ascii_lowercase().as_str(),
            "'true'" | "'t'" | "'on'" | "'yes'" | "'1'"
        ),
        _ => false,
    }
}

fn contains_call(lower: &str, f: &str) -> bool {
    lower.match_indices(f).any(|(i, _)| {
        let after = lower[i + f.len()..].trim_start();
        let before_ok = lower[..i]
            .chars()
            .last()
            .map_or(true, |c| !c.is_ascii_alphanumeric() && c != '_');
        before_ok && after.starts_with('(')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str, sql: &str) -> Effect {
        Effect::Set {
            name: name.into(),
            sql: sql.into(),
        }
    }

    #[test]
    fn settings() {
        let cases = [
            (
                "SET search_path TO app, public",
                set("search_path", "SET search_path TO app, public"),
            ),
            (
                "set SESSION statement_timeout = '5s'",
                set("statement_timeout", "set SESSION statement_timeout = '5s'"),
            ),
            (
                "SET \"TimeZone\" = 'UTC'",
                set("TimeZone", "SET \"TimeZone\" = 'UTC'"),
            ),
            (
                "SET TIME ZONE 'Europe/Paris'",
                set("timezone", "SET TIME ZONE 'Europe/Paris'"),
            ),
            (
                "SET NAMES 'LATIN1'",
                set("client_encoding", "SET NAMES 'LATIN1'"),
            ),
            ("SET SCHEMA 'app'", set("search_path", "SET SCHEMA 'app'")),
            ("SET ROLE reporting", set("role", "SET ROLE reporting")),
            (
                "SET SESSION AUTHORIZATION bob",
                set("session_authorization", "SET SESSION AUTHORIZATION bob"),
            ),
            (
                "SET myapp.tenant = '42'",
                set("myapp.tenant", "SET myapp.tenant = '42'"),
            ),
            ("SET LOCAL search_path = x", Effect::None),
            ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", Effect::None),
            ("SET CONSTRAINTS ALL DEFERRED", Effect::None),
            (
                "RESET search_path",
                Effect::Reset {
                    name: "search_path".into(),
                },
            ),
            (
                "RESET TIME ZONE",
                Effect::Reset {
                    name: "timezone".into(),
                },
            ),
            (
                "RESET SESSION AUTHORIZATION",
                Effect::Reset {
                    name: "session_authorization".into(),
                },
            ),
            (
                "RESET ROLE",
                Effect::Reset {
                    name: "role".into(),
                },
            ),
            ("reset all", Effect::ResetAll),
            ("DISCARD ALL", Effect::DiscardAll),
            ("DISCARD PLANS", Effect::None),
            (
                "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
                Effect::Pin(Pin::SessionCharacteristics),
            ),
        ];
        for (sql, want) in cases {
            assert_eq!(classify(sql), want, "{sql}");
        }
    }

    #[test]
    fn pins() {
        let cases = [
            ("LISTEN jobs", Some(Pin::Listen)),
            ("SELECT pg_advisory_lock(1)", Some(Pin::AdvisoryLock)),
            (
                "select pg_catalog.pg_try_advisory_lock_shared(1, 2)",
                Some(Pin::AdvisoryLock),
            ),
            ("SELECT pg_advisory_xact_lock(1)", None),
            ("SELECT 'pg_advisory_lock(1)'", None),
            ("CREATE TEMP TABLE t (x int)", Some(Pin::TempObject)),
            (
                "create global temporary table t (x int)",
                Some(Pin::TempObject),
            ),
            (
                "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
                Some(Pin::TempObject),
            ),
            ("CREATE TABLE pg_temp.t (x int)", Some(Pin::TempObject)),
            ("CREATE TABLE temp_data (x int)", None),
            ("CREATE TEMP TABLE t (x int) ON COMMIT DROP", None),
            (
                "CREATE TEMP TABLE t (x int) ON COMMIT DELETE ROWS",
                Some(Pin::TempObject),
            ),
            ("SELECT * INTO TEMP t FROM x", Some(Pin::TempObject)),
            (
                "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
                Some(Pin::HoldCursor),
            ),
            ("DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", None),
            ("PREPARE q AS SELECT 1", Some(Pin::Prepare)),
            ("PREPARE TRANSACTION 'gid'", None),
            ("LOAD 'auto_explain'", Some(Pin::Load)),
            (
                "SELECT pg_catalog.set_config('search_path', '', false)",
                Some(Pin::SetConfig),
            ),
            ("SELECT set_config('a.b', 'x', true)", None),
            (
                "SELECT set_config('a.b', f(1, 2), is_local)",
                Some(Pin::SetConfig),
            ),
            (
                "DO $$BEGIN PERFORM pg_advisory_lock(7); END$$",
                Some(Pin::AdvisoryLock),
            ),
            ("DO $$BEGIN PERFORM pg_advisory_xact_lock(7); END$$", None),
            ("UPDATE t SET x = 1", None),
            ("SELECT 1", None),
        ];
        for (sql, want) in cases {
            assert_eq!(
                classify(sql),
                want.map_or(Effect::None, Effect::Pin),
                "{sql}"
            );
        }
    }

    #[test]
    fn transaction_control() {
        let cases = [
            ("COMMIT", Effect::Commit),
            ("end transaction", Effect::Commit),
            ("COMMIT AND CHAIN", Effect::Commit),
            ("COMMIT PREPARED 'x'", Effect::None),
            ("ROLLBACK", Effect::Rollback),
            ("abort", Effect::Rollback),
            ("ROLLBACK PREPARED 'x'", Effect::None),
            ("ROLLBACK TO s1", Effect::RollbackTo("s1".into())),
            (
                "ROLLBACK WORK TO SAVEPOINT \"S1\"",
                Effect::RollbackTo("S1".into()),
            ),
            ("SAVEPOINT S1", Effect::Savepoint("s1".into())),
            ("RELEASE SAVEPOINT s1", Effect::Release("s1".into())),
            ("release s1", Effect::Release("s1".into())),
        ];
        for (sql, want) in cases {
            assert_eq!(classify(sql), want, "{sql}");
        }
    }

    #[test]
    fn a_plain_select_is_decided_without_the_filter_and_never_wrongly() {
        let plain = [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
            "select\n* from t where a = 'x' ;; ",
            "SELECT 1",
            "SELECT ",
            "SeLeCt\t1;",
            "SELECT * FROM tasks WHERE state = 'settled'",
        ];
        for sql in plain {
            assert!(lone_plain_select(sql.as_bytes()), "{sql}");
        }
        let not_plain = [
            "SELECT pg_advisory_lock(1)",
            "SELECT * INTO TEMP t FROM x",
            "SELECT * INTO tEmPoRaRy t FROM x",
            "SELECT * FROM pg_temp.t",
            "SELECT 1; SET a.b = 1",
            "SELECT 1;x",
            "SELECT set_config ('a.b', 'x', false)",
            " SELECT 1",
            "SELECT",
            "SELECT(1)",
            "SELECT ;x",
            "select *  from t where x = 1 and y = 2 and z = 3 and w = pg_temp.f",
            "SELECTED",
            "WITH x AS (SELECT 1) SELECT 1",
        ];
        for sql in not_plain {
            assert!(!lone_plain_select(sql.as_bytes()), "{sql}");
        }
        // Every length, around the eight-byte words and the first eight bytes.
        for sql in plain.iter().chain(&not_plain) {
            for n in 0..=sql.len() {
                let text = &sql.as_bytes()[..n];
                if lone_plain_select(text) {
                    assert!(classify_each(&latin1(text)).is_empty(), "{sql} [..{n}]");
                }
            }
        }
        // Generated texts: whenever the shortcut says "no effect", the classifier agrees.
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15_u64);
        let pieces: [&[u8]; 22] = [
            b" ",
            b"x",
            b"temp",
            b"TeMp",
            b"pg_temp",
            b"into",
            b"(",
            b")",
            b";",
            b"set_config",
            b"pg_advisory_lock",
            b"'",
            b"\"",
            b"--",
            b"/*",
            b"*/",
            b"\n",
            b"t",
            b"\xe9",
            b"1",
            b"set",
            b"listen",
        ];
        let mut shortcut = 0;
        for _ in 0..20_000 {
            let mut text = b"SELECT ".to_vec();
            for _ in 0..(next() % 10) {
                text.extend_from_slice(pieces[(next() % pieces.len() as u64) as usize]);
            }
            if lone_plain_select(&text) {
                shortcut += 1;
                let slow = classify_each(&latin1(&text));
                assert!(
                    slow.is_empty(),
                    "{:?}: {slow:?}",
                    String::from_utf8_lossy(&text)
                );
            }
        }
        assert!(shortcut > 1_000, "the shortcut was taken {shortcut} times");
    }

    /// A small deterministic generator for test texts.
    fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    /// The filter one byte at a time, as the word-at-a-time one must behave.
    fn might_matter_bytewise(b: &[u8]) -> bool {
        let mut prev_alnum = false;
        for (i, &c) in b.iter().enumerate() {
            let class = BYTE_CLASS[c as usize];
            if class & CANDIDATE != 0 && !prev_alnum && keyword_prefix_at(b, i) {
                return true;
            }
            prev_alnum = class & ALNUM != 0;
        }
        false
    }

    #[test]
    fn the_word_at_a_time_filter_agrees_with_a_byte_at_a_time_one() {
        for c in 0..=255u8 {
            let lanes = alnum_lanes(u64::from_le_bytes([c; 8]));
            let want = if c.is_ascii_alphanumeric() {
                LANES_HIGH
            } else {
                0
            };
            assert_eq!(lanes, want, "byte {c:#x}");
        }
        // Keywords at every offset around the 8-byte chunk edges, after every kind of byte.
        let mut next = xorshift(0x2545_f491_4f6c_dd1d_u64);
        let pieces: [&[u8]; 12] = [
            b"set", b"SeT", b"xset", b"_set", b"9set", b"\xe9set", b"end", b" ", b"a", b"(",
            b"commit", b"\x80",
        ];
        for _ in 0..20_000 {
            let mut text = Vec::new();
            for _ in 0..(next() % 8) {
                text.extend_from_slice(pieces[(next() % pieces.len() as u64) as usize]);
            }
            assert_eq!(
                might_matter(&text),
                might_matter_bytewise(&text),
                "{:?}",
                String::from_utf8_lossy(&text)
            );
        }
        for pad in 0..16 {
            for kw in ["set", "end", "rollback", "savepoint", "pg_temp"] {
                let text = format!("{}{kw}", "x ".repeat(pad));
                assert!(might_matter(text.as_bytes()), "{text}");
                let glued = format!("{}{kw}", "x".repeat(pad + 1));
                assert_eq!(
                    might_matter(glued.as_bytes()),
                    might_matter_bytewise(glued.as_bytes()),
                    "{glued}"
                );
            }
        }
    }

    #[test]
    fn text_that_is_not_utf8_is_classified_and_its_settings_pin() {
        // Latin-1 bytes, as a client with client_encoding LATIN1 sends them.
        assert_eq!(
            classify_query_bytes(b"SELECT '\xe9'; SET application_name = '\xe9t\xe9'"),
            vec![Effect::None, Effect::Pin(Pin::NonUtf8Setting)]
        );
        assert_eq!(
            classify_bytes(b"LISTEN \"caf\xe9\""),
            Effect::Pin(Pin::Listen)
        );
        assert_eq!(
            classify_bytes(b"SAVEPOINT s\xe9"),
            Effect::Savepoint("s\u{e9}".into())
        );
        assert_eq!(classify_bytes(b"SELECT '\xe9'"), Effect::None);
        assert!(classify_query_bytes(b"SELECT '\xe9'").is_empty());
        // UTF-8 takes the usual way: a setting is replayed, not pinned.
        assert!(matches!(
            classify_bytes("SET application_name = 'été'".as_bytes()),
            Effect::Set { .. }
        ));
    }

    #[test]
    fn the_filter_passes_everything_the_classifier_acts_on() {
        let acted_on = [
            "SET a = 1",
            "reset a",
            "DISCARD ALL",
            "LISTEN x",
            "PREPARE q AS SELECT 1",
            "LOAD 'x'",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "CREATE TEMP TABLE t (x int)",
            "CREATE TEMPORARY TABLE t (x int)",
            "CREATE TABLE pg_temp.t (x int)",
            "SELECT * INTO TEMP t FROM x",
            "SELECT pg_advisory_lock(1)",
            "SELECT pg_catalog.set_config('a', 'b', false)",
            "SELECT(set_config('a', 'b', false))",
            "COMMIT",
            "END",
            "ROLLBACK",
            "ABORT",
            "SAVEPOINT s",
            "RELEASE s",
            "DO $$BEGIN PERFORM pg_advisory_lock(7); END$$",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            "sEt a=1",
        ];
        // Keywords in any case, also at the very end of the text.
        for sql in ["begin; select 1; end", "select 1;END", "x;set", "Se", "SeT"] {
            assert_eq!(might_matter(sql.as_bytes()), sql.len() > 2, "{sql}");
        }
        for sql in acted_on {
            assert!(might_matter(sql.as_bytes()), "{sql}");
            assert_ne!(classify(sql), Effect::None, "{sql}");
        }
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1",
            "UPDATE t SET x = 1",
            "INSERT INTO tempus VALUES (1)",
        ] {
            assert_eq!(classify(sql), Effect::None, "{sql}");
        }
        assert!(!might_matter(
            b"SELECT abalance FROM pgbench_accounts WHERE aid = 1"
        ));
        assert!(
            !might_matter(b"INSERT INTO offsets VALUES (1)"),
            "set inside a word is not a word start"
        );
    }

    #[test]
    fn queries() {
        assert!(classify_query("SELECT abalance FROM pgbench_accounts WHERE aid = 1;").is_empty());
        assert!(classify_query("UPDATE t SET x = 1; SELECT 2").is_empty());
        assert_eq!(
            classify_query("SELECT 1; SET a.b = 1; SELECT ';set c = 2'"),
            [Effect::None, set("a.b", "SET a.b = 1"), Effect::None]
        );
    }
}
