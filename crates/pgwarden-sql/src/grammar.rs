//! PostgreSQL's own grammar (libpg_query, through the `pg_query` crate), for the queries the
//! lexer cannot decide surely.
//!
//! The lexer calls a query a write whenever it sees `INSERT`, `UPDATE`, `DELETE`, `MERGE`,
//! `INTO` or a locking clause anywhere in it: safe, but a column named `update` or a label
//! `AS insert` sends a read to the primary. Those queries, and only those, are parsed here: the
//! parse tree says whether the words are statements or names. Everything else keeps the lexer's
//! answer, which is sure (a lexer read has none of those words; a lexer write for any other
//! reason is a write whatever the tree says). The answers are cached by exact text, bounded.
//!
//! Sound by construction: the tree is walked generically (every field of every node, through
//! its serialized form), so a data-modifying statement, an `INTO` or a locking clause anywhere
//! in it is found, and every function it calls is returned for the catalog to decide. A text
//! the grammar refuses stays a write.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use serde_json::Value;

/// How many texts the cache holds; past that it starts over (queries that need the grammar are
/// few, and a text is parsed again at worst).
const CACHE_TEXTS: usize = 4096;

/// Texts longer than this are not parsed: they stay writes (the lexer's answer).
const MAX_TEXT: usize = 64 * 1024;

/// What the grammar says of a query the lexer called a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// One `SELECT` that writes nothing itself; the functions it calls (lower-cased as the
    /// parser folds them, unqualified), for the catalog to decide.
    Read(Vec<String>),
    /// A write after all, or several statements, or not one `SELECT`.
    Write,
    /// The grammar refuses the text (or it is too long to parse): a write.
    Unparsable,
}

/// Counters, for the admin console.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Texts parsed.
    pub parses: u64,
    /// Answers given from the cache.
    pub cache_hits: u64,
    /// Parsed texts the grammar showed to be reads.
    pub reads: u64,
    /// Texts the grammar refused.
    pub unparsable: u64,
}

static PARSES: AtomicU64 = AtomicU64::new(0);
static HITS: AtomicU64 = AtomicU64::new(0);
static READS: AtomicU64 = AtomicU64::new(0);
static UNPARSABLE: AtomicU64 = AtomicU64::new(0);

/// The counters since the process started.
pub fn stats() -> Stats {
    Stats {
        parses: PARSES.load(Ordering::Relaxed),
        cache_hits: HITS.load(Ordering::Relaxed),
        reads: READS.load(Ordering::Relaxed),
        unparsable: UNPARSABLE.load(Ordering::Relaxed),
    }
}

fn cache() -> &'static Mutex<HashMap<Box<str>, Verdict>> {
    static CACHE: OnceLock<Mutex<HashMap<Box<str>, Verdict>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The grammar's verdict on `sql` (one query string), cached by text.
pub fn verdict(sql: &str) -> Verdict {
    if let Some(v) = cache().lock().unwrap_or_else(|e| e.into_inner()).get(sql) {
        HITS.fetch_add(1, Ordering::Relaxed);
        return v.clone();
    }
    let v = parse(sql);
    let mut c = cache().lock().unwrap_or_else(|e| e.into_inner());
    if c.len() >= CACHE_TEXTS {
        c.clear();
    }
    c.insert(sql.into(), v.clone());
    v
}

/// [`verdict`] without the cache.
fn parse(sql: &str) -> Verdict {
    if sql.len() > MAX_TEXT {
        return Verdict::Unparsable;
    }
    PARSES.fetch_add(1, Ordering::Relaxed);
    let tree = match pg_query::parse(sql) {
        Ok(r) => r,
        Err(_) => {
            UNPARSABLE.fetch_add(1, Ordering::Relaxed);
            return Verdict::Unparsable;
        }
    };
    let Ok(tree) = serde_json::to_value(&tree.protobuf) else {
        return Verdict::Write;
    };
    let v = judge(&tree);
    if matches!(v, Verdict::Read(_)) {
        READS.fetch_add(1, Ordering::Relaxed);
    }
    v
}

/// The verdict on a serialized parse result: `{"stmts": [{"stmt": {"node": {"SelectStmt":
/// ...}}}]}` for one `SELECT`.
fn judge(tree: &Value) -> Verdict {
    let stmts = match tree.get("stmts").and_then(Value::as_array) {
        Some(s) if s.len() == 1 => s,
        _ => return Verdict::Write,
    };
    let node = &stmts[0]["stmt"]["node"];
    if node.get("SelectStmt").is_none() {
        return Verdict::Write;
    }
    let mut calls = Vec::new();
    if writes(node, &mut calls) {
        Verdict::Write
    } else {
        Verdict::Read(calls)
    }
}

/// Whether anything under `v` writes; collects the names of the functions called on the way.
fn writes(v: &Value, calls: &mut Vec<String>) -> bool {
    match v {
        Value::Object(fields) => {
            for (key, child) in fields {
                match key.as_str() {
                    "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => return true,
                    "into_clause" if !child.is_null() => return true,
                    "locking_clause" if child.as_array().is_some_and(|l| !l.is_empty()) => {
                        return true
                    }
                    "FuncCall" => {
                        if let Some(name) = function_name(child) {
                            if !calls.contains(&name) {
                                calls.push(name);
                            }
                        }
                    }
                    _ => {}
                }
                if writes(child, calls) {
                    return true;
                }
            }
            false
        }
        Value::Array(items) => items.iter().any(|i| writes(i, calls)),
        _ => false,
    }
}

/// The unqualified name of a `FuncCall`: the last of its `funcname` strings.
fn function_name(call: &Value) -> Option<String> {
    let last = call.get("funcname")?.as_array()?.last()?;
    let name = last.get("node")?.get("String")?.get("sval")?.as_str()?;
    Some(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(calls: &[&str]) -> Verdict {
        Verdict::Read(calls.iter().map(|c| c.to_string()).collect())
    }

    #[test]
    fn the_tree_tells_names_from_statements() {
        for (sql, want) in [
            ("SELECT update FROM (SELECT 1 AS update) x", read(&[])),
            ("SELECT 1 AS insert, 2 AS delete, 3 AS into", read(&[])),
            ("SELECT merge, lower(\"update\") FROM t", read(&["lower"])),
            ("SELECT pg_catalog.Upper(update) FROM t", read(&["upper"])),
            ("SELECT \"MyFn\"(delete) FROM t", read(&["MyFn"])),
            ("SELECT * FROM t FOR UPDATE", Verdict::Write),
            ("SELECT * FROM (SELECT * FROM t FOR SHARE) x", Verdict::Write),
            ("SELECT * INTO t2 FROM t", Verdict::Write),
            (
                "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
                Verdict::Write,
            ),
            (
                "SELECT * FROM (WITH i AS (INSERT INTO t VALUES (1) RETURNING 1) SELECT * FROM i) s",
                Verdict::Write,
            ),
            (
                "WITH m AS (MERGE INTO t USING u ON true WHEN MATCHED THEN DELETE) SELECT 1",
                Verdict::Write,
            ),
            ("UPDATE t SET v = 1", Verdict::Write),
            ("SELECT 1; SELECT 2", Verdict::Write),
            ("SELECT update FROM", Verdict::Unparsable),
        ] {
            assert_eq!(parse(sql), want, "{sql}");
        }
    }

    #[test]
    fn answers_are_cached_by_text() {
        let sql = "SELECT 41 AS update /* answers_are_cached_by_text */";
        let before = stats();
        assert_eq!(verdict(sql), read(&[]));
        assert_eq!(verdict(sql), read(&[]));
        let after = stats();
        assert!(after.parses > before.parses);
        assert!(after.cache_hits > before.cache_hits);
    }
}
