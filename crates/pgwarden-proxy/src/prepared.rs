//! Named prepared statements that survive moving between server connections.
//!
//! Every distinct (query text, parameter types) gets one server-side name of ours
//! (`pgwarden_<n>`) from a per-pool cache that compares the full text. Each client maps its own
//! names to cache entries; each server connection remembers which of our names it has prepared,
//! up to `max_prepared_statements`, evicting the least recently used. A client's Parse of a
//! statement the server already has is answered by the proxy; a Bind or Describe on a server
//! that lacks the statement gets our Parse inserted before it, whose answer the client never
//! sees.

use std::collections::HashMap;

/// The hasher of the per-statement maps, looked up several times per transaction: seeded per
/// process (keys may come from clients), several times cheaper than the default SipHash.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// A statement as the server knows it.
#[derive(Debug)]
pub struct Statement {
    pub server_name: String,
    /// In the encoding of the client that first parsed it (see `FrontendMessage::Query`).
    pub query: Bytes,
    /// `count:i16` and OIDs, as in the Parse message.
    pub param_types: Bytes,
    /// Set once a server has answered our Parse of it with ParseComplete: from then on a
    /// client's Parse of the same text can be answered without a server.
    validated: AtomicBool,
    /// Its routing class, classified once.
    route: std::sync::OnceLock<pgwarden_sql::route::Route>,
}

impl Statement {
    /// Its routing class (classified on first use).
    pub fn route(&self) -> &pgwarden_sql::route::Route {
        self.route
            .get_or_init(|| pgwarden_sql::route::classify_bytes(&self.query))
    }

    pub fn is_validated(&self) -> bool {
        self.validated.load(Ordering::Relaxed)
    }

    pub fn mark_validated(&self) {
        self.validated.store(true, Ordering::Relaxed);
    }
}

/// The per-pool cache of statements by exact text.
#[derive(Default)]
pub struct StatementCache {
    by_text: Mutex<FastMap<(Bytes, Bytes), Arc<Statement>>>,
    next: AtomicU64,
}

impl StatementCache {
    /// The entry for this exact text and parameter types, made if new.
    pub fn get_or_insert(&self, query: &[u8], param_types: &[u8]) -> Arc<Statement> {
        let key = (
            Bytes::copy_from_slice(query),
            Bytes::copy_from_slice(param_types),
        );
        let mut map = self.by_text.lock().expect("statement cache lock");
        map.entry(key)
            .or_insert_with_key(|(query, types)| {
                Arc::new(Statement {
                    server_name: format!("pgwarden_{}", self.next.fetch_add(1, Ordering::Relaxed)),
                    query: query.clone(),
                    param_types: types.clone(),
                    validated: AtomicBool::new(false),
                    route: std::sync::OnceLock::new(),
                })
            })
            .clone()
    }

    pub fn len(&self) -> usize {
        self.by_text.lock().expect("statement cache lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which of our statements one server connection has, with recency for eviction.
#[derive(Debug, Default)]
pub struct ServerStatements {
    names: FastMap<String, u64>,
    tick: u64,
}

impl ServerStatements {
    pub fn has(&mut self, name: &str) -> bool {
        self.tick += 1;
        let tick = self.tick;
        match self.names.get_mut(name) {
            Some(t) => {
                *t = tick;
                true
            }
            None => false,
        }
    }

    pub fn insert(&mut self, name: &str) {
        self.tick += 1;
        self.names.insert(name.to_string(), self.tick);
    }

    pub fn remove(&mut self, name: &str) {
        self.names.remove(name);
    }

    pub fn clear(&mut self) {
        self.names.clear();
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The least recently used name, if the set is at `cap`, removed from the set.
    pub fn evict_for(&mut self, cap: usize, keep: &str) -> Option<String> {
        if self.names.len() < cap {
            return None;
        }
        let victim = self
            .names
            .iter()
            .filter(|(n, _)| n.as_str() != keep)
            .min_by_key(|(_, &t)| t)
            .map(|(n, _)| n.clone())?;
        self.names.remove(&victim);
        Some(victim)
    }
}

/// What a `DEALLOCATE`/`DISCARD` in a simple query does to prepared statements.
#[derive(Debug, PartialEq, Eq)]
pub enum Deallocate<'a> {
    All,
    One(&'a str),
    Discard,
}

/// Recognises a simple query that is exactly one `DEALLOCATE [PREPARE] name|ALL` or
/// `DISCARD ALL` (an optional trailing `;`). Anything else is `None` (also a text that is not
/// UTF-8: the server gets it as it is).
pub fn deallocate(sql: &[u8]) -> Option<Deallocate<'_>> {
    // Nearly every query is something else: one byte tells.
    let first = sql.iter().find(|b| !b.is_ascii_whitespace());
    if !matches!(first, Some(b'd' | b'D')) {
        return None;
    }
    let sql = std::str::from_utf8(sql).ok()?;
    let s = sql.trim().trim_end_matches(';').trim_end();
    let mut words = s.split_whitespace();
    let first = words.next()?;
    if first.eq_ignore_ascii_case("discard") {
        let what = words.next()?;
        return (what.eq_ignore_ascii_case("all") && words.next().is_none())
            .then_some(Deallocate::Discard);
    }
    if !first.eq_ignore_ascii_case("deallocate") {
        return None;
    }
    let mut name = words.next()?;
    if name.eq_ignore_ascii_case("prepare") {
        name = words.next()?;
    }
    if words.next().is_some() {
        return None;
    }
    if name.eq_ignore_ascii_case("all") {
        Some(Deallocate::All)
    } else if name.starts_with('"') {
        None // quoted identifiers: left to the server
    } else {
        Some(Deallocate::One(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_compares_full_text() {
        let c = StatementCache::default();
        let a = c.get_or_insert(b"SELECT $1", &[0, 0]);
        let b = c.get_or_insert(b"SELECT $1", &[0, 0]);
        let other = c.get_or_insert(b"SELECT $1 ", &[0, 0]);
        let typed = c.get_or_insert(b"SELECT $1", &[0, 1, 0, 0, 0, 23]);
        assert!(Arc::ptr_eq(&a, &b));
        assert_ne!(a.server_name, other.server_name);
        assert_ne!(a.server_name, typed.server_name);
        assert_eq!(c.len(), 3);
        assert!(!a.is_validated());
        b.mark_validated();
        assert!(c.get_or_insert(b"SELECT $1", &[0, 0]).is_validated());
    }

    #[test]
    fn lru_eviction_spares_the_statement_in_use() {
        let mut s = ServerStatements::default();
        s.insert("a");
        s.insert("b");
        s.insert("c");
        assert!(s.has("a")); // a is now the most recent
        assert_eq!(s.evict_for(3, "x"), Some("b".to_string()));
        assert_eq!(s.evict_for(3, "x"), None);
        s.insert("d");
        assert_eq!(s.evict_for(3, "c"), Some("a".to_string()));
    }

    #[test]
    fn deallocate_forms() {
        assert_eq!(deallocate(b"DEALLOCATE ALL"), Some(Deallocate::All));
        assert_eq!(
            deallocate(b"deallocate prepare s1;"),
            Some(Deallocate::One("s1"))
        );
        assert_eq!(deallocate(b"  Deallocate s2 "), Some(Deallocate::One("s2")));
        assert_eq!(deallocate(b"DISCARD ALL"), Some(Deallocate::Discard));
        assert_eq!(deallocate(b"DISCARD PLANS"), None);
        assert_eq!(deallocate(b"DEALLOCATE a; SELECT 1"), None);
        assert_eq!(deallocate(b"SELECT 1"), None);
        assert_eq!(deallocate(b"DEALLOCATE \"Q\""), None);
    }
}
