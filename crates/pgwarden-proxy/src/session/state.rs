//! A client's session state as the proxy keeps it: settings from its startup packet and from
//! `SET`, and whether something pins it to its server connection.
//!
//! Settings are kept as the SQL that makes them (`SET ...` as the client wrote it, or
//! `set_config(...)` for startup parameters). Each server connection records the settings the
//! proxy gave it ([`Applied`](crate::server::Applied)); on checkout [`SessionState::sync`] yields the SQL that turns the
//! connection's settings into the client's. A statement's effect counts only once its
//! transaction commits: effects wait in `pending` until `COMMIT` or an idle ReadyForQuery
//! without an error, and are dropped on `ROLLBACK`, an error, or `ROLLBACK TO` a savepoint
//! made before them.

use std::collections::BTreeMap;

use pgwarden_protocol::backend::TxStatus;
use pgwarden_sql::{Effect, Pin};

use crate::server::Applied;

#[derive(Debug)]
enum Pending {
    Effect(Effect),
    Savepoint(String),
}

#[derive(Debug, Default)]
pub struct SessionState {
    /// From the startup packet: what `RESET` returns to.
    startup: Applied,
    /// What the client's server connection should have: startup settings overlaid by committed
    /// `SET`s.
    want: Applied,
    pending: Vec<Pending>,
    /// An error since the last ReadyForQuery.
    failed: bool,
    /// The last ReadyForQuery said the transaction has failed: its COMMIT is a rollback.
    tx_failed: bool,
    pinned: Option<Pin>,
    /// The server connection may differ from the client's settings (a `RESET` of a startup
    /// parameter returned it to the login default): sync before the next statement.
    dirty: bool,
}

impl SessionState {
    /// `startup`: lower-case parameter name -> the SQL that sets it.
    pub fn new(startup: BTreeMap<String, String>) -> Self {
        let startup = Applied::from(startup);
        SessionState {
            want: startup.clone(),
            startup,
            ..Default::default()
        }
    }

    /// The SQL that makes the client's setting `name` (lower case), if it has one of its own.
    pub fn setting(&self, name: &str) -> Option<&str> {
        self.want.get(name).map(String::as_str)
    }

    pub fn pinned(&self) -> Option<Pin> {
        self.pinned
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// The SQL that gives a connection with `applied` settings this client's settings, if any
    /// is needed; `applied` is updated to what it will be.
    pub fn sync(&mut self, applied: &mut Applied) -> Option<String> {
        self.dirty = false;
        if applied.same(&mut self.want) {
            return None;
        }
        let mut sql = Vec::new();
        for name in applied.keys() {
            if !self.want.contains_key(name) {
                sql.push(format!("RESET {}", quote_name(name)));
            }
        }
        for (name, set) in self.want.iter() {
            if applied.get(name) != Some(set) {
                sql.push(set.clone());
            }
        }
        *applied = self.want.clone();
        Some(sql.join("; "))
    }

    /// A statement was sent: pins take hold at once (conservatively, even if it then fails).
    pub fn sent(&mut self, effect: &Effect) {
        if let Effect::Pin(p) = effect {
            self.pinned.get_or_insert(*p);
        }
    }

    /// A statement completed (its CommandComplete arrived) on the connection with `applied`.
    pub fn executed(&mut self, effect: &Effect, applied: &mut Applied) {
        match effect {
            Effect::Set { .. } | Effect::Reset { .. } | Effect::ResetAll | Effect::DiscardAll => {
                self.pending.push(Pending::Effect(effect.clone()))
            }
            Effect::Commit if self.tx_failed => self.pending.clear(),
            Effect::Commit => self.commit(applied),
            Effect::Rollback => self.pending.clear(),
            Effect::Savepoint(name) => self.pending.push(Pending::Savepoint(name.clone())),
            Effect::RollbackTo(name) => {
                if let Some(i) = self.savepoint(name) {
                    self.pending.truncate(i + 1);
                }
            }
            Effect::Release(name) => {
                if let Some(i) = self.savepoint(name) {
                    let later: Vec<Pending> = self.pending.drain(i..).collect();
                    self.pending.extend(
                        later
                            .into_iter()
                            .filter(|p| matches!(p, Pending::Effect(_))),
                    );
                }
            }
            Effect::None | Effect::Pin(_) => {}
        }
    }

    fn savepoint(&self, name: &str) -> Option<usize> {
        self.pending
            .iter()
            .rposition(|p| matches!(p, Pending::Savepoint(n) if n == name))
    }

    /// An ErrorResponse arrived.
    pub fn error(&mut self) {
        self.failed = true;
    }

    /// A ReadyForQuery arrived.
    pub fn ready(&mut self, status: TxStatus, applied: &mut Applied) {
        match status {
            TxStatus::Idle => {
                // Whatever is still pending ran in an implicit transaction, which an error undid.
                if self.failed {
                    self.pending.clear();
                } else {
                    self.commit(applied);
                }
                self.tx_failed = false;
            }
            TxStatus::InTransaction => self.tx_failed = false,
            TxStatus::Failed => self.tx_failed = true,
        }
        self.failed = false;
    }

    fn commit(&mut self, applied: &mut Applied) {
        if self.pending.is_empty() {
            return;
        }
        for p in std::mem::take(&mut self.pending) {
            let Pending::Effect(e) = p else { continue };
            match e {
                Effect::Set { name, sql } => {
                    let name = name.to_ascii_lowercase();
                    applied.insert(name.clone(), sql.clone());
                    self.want.insert(name, sql);
                }
                Effect::Reset { name } => {
                    let name = name.to_ascii_lowercase();
                    // The server went back to its login default, not to our startup value.
                    applied.remove(&name);
                    match self.startup.get(&name) {
                        Some(sql) => {
                            self.want.insert(name, sql.clone());
                            self.dirty = true;
                        }
                        None => {
                            self.want.remove(&name);
                        }
                    }
                }
                Effect::ResetAll | Effect::DiscardAll => {
                    applied.clear();
                    self.want.clone_from(&self.startup);
                    self.dirty |= !self.startup.is_empty();
                    if e == Effect::DiscardAll {
                        self.pinned = None;
                    }
                }
                _ => {}
            }
        }
    }
}

/// A setting's name as SQL: plain when it is a simple (possibly dotted) lower-case name.
fn quote_name(name: &str) -> String {
    name.split('.')
        .map(|part| {
            let plain = !part.is_empty()
                && part
                    .bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
                && !part.as_bytes()[0].is_ascii_digit();
            if plain {
                part.to_string()
            } else {
                format!("\"{}\"", part.replace('"', "\"\""))
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// A string as an `E''` literal, right whatever `standard_conforming_strings` is.
pub fn quote_literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// The SQL that sets a startup parameter.
pub fn startup_sql(name: &str, value: &str) -> String {
    format!(
        "SELECT pg_catalog.set_config({}, {}, false)",
        quote_literal(name),
        quote_literal(value)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str, value: &str) -> Effect {
        Effect::Set {
            name: name.into(),
            sql: format!("SET {name} = {value}"),
        }
    }

    fn run(s: &mut SessionState, applied: &mut Applied, effects: &[Effect], end: TxStatus) {
        for e in effects {
            s.sent(e);
            s.executed(e, applied);
        }
        s.ready(end, applied);
    }

    #[test]
    fn settings_follow_commit_and_rollback() {
        let mut s = SessionState::default();
        let mut a = Applied::new();
        run(&mut s, &mut a, &[set("a", "1")], TxStatus::Idle);
        assert_eq!(a.get("a").map(String::as_str), Some("SET a = 1"));
        // In a transaction: nothing counts until COMMIT.
        run(&mut s, &mut a, &[set("b", "2")], TxStatus::InTransaction);
        assert!(!a.contains_key("b"));
        run(&mut s, &mut a, &[Effect::Rollback], TxStatus::Idle);
        assert!(!a.contains_key("b"));
        run(
            &mut s,
            &mut a,
            &[set("b", "3"), Effect::Commit],
            TxStatus::Idle,
        );
        assert!(a.contains_key("b"));
        // An error in an implicit transaction undoes the query's SETs.
        s.sent(&set("c", "1"));
        s.executed(&set("c", "1"), &mut a);
        s.error();
        s.ready(TxStatus::Idle, &mut a);
        assert!(!a.contains_key("c"));
        // COMMIT of a failed transaction is a rollback.
        run(&mut s, &mut a, &[set("d", "1")], TxStatus::Failed);
        run(&mut s, &mut a, &[Effect::Commit], TxStatus::Idle);
        assert!(!a.contains_key("d"));
    }

    #[test]
    fn savepoints() {
        let mut s = SessionState::default();
        let mut a = Applied::new();
        let sp = |n: &str| Effect::Savepoint(n.into());
        run(
            &mut s,
            &mut a,
            &[
                set("a", "1"),
                sp("s"),
                set("b", "1"),
                Effect::RollbackTo("s".into()),
                set("c", "1"),
            ],
            TxStatus::InTransaction,
        );
        run(&mut s, &mut a, &[Effect::Commit], TxStatus::Idle);
        assert_eq!(a.keys().collect::<Vec<_>>(), ["a", "c"]);
        // Released savepoints keep their settings; ROLLBACK TO an outer one drops them.
        let mut s = SessionState::default();
        let mut a = Applied::new();
        run(
            &mut s,
            &mut a,
            &[
                sp("o"),
                sp("i"),
                set("x", "1"),
                Effect::Release("i".into()),
                Effect::Commit,
            ],
            TxStatus::Idle,
        );
        assert!(a.contains_key("x"));
        run(
            &mut s,
            &mut a,
            &[
                sp("o"),
                set("y", "1"),
                Effect::Release("o".into()),
                set("z", "1"),
            ],
            TxStatus::InTransaction,
        );
        run(&mut s, &mut a, &[Effect::Rollback], TxStatus::Idle);
        assert!(!a.contains_key("y") && !a.contains_key("z"));
    }

    #[test]
    fn sync_replays_differences_and_resets_leftovers() {
        let startup = BTreeMap::from([("timezone".to_string(), startup_sql("TimeZone", "UTC"))]);
        let mut s = SessionState::new(startup);
        // A connection another client left with its own settings.
        let mut a = Applied::from([
            ("search_path".to_string(), "SET search_path = x".to_string()),
            (
                "my.Setting".to_ascii_lowercase(),
                "SET my.setting = 1".to_string(),
            ),
        ]);
        let sql = s.sync(&mut a).expect("replay");
        assert_eq!(
            sql,
            "RESET my.setting; RESET search_path; SELECT pg_catalog.set_config(E'TimeZone', E'UTC', false)"
        );
        assert_eq!(s.sync(&mut a), None, "in sync now");
        run(&mut s, &mut a, &[set("search_path", "y")], TxStatus::Idle);
        assert_eq!(s.sync(&mut a), None);
        // RESET of a startup parameter: the server went to its default, the client expects UTC.
        run(
            &mut s,
            &mut a,
            &[Effect::Reset {
                name: "TimeZone".into(),
            }],
            TxStatus::Idle,
        );
        assert!(s.is_dirty());
        assert_eq!(
            s.sync(&mut a).as_deref(),
            Some("SELECT pg_catalog.set_config(E'TimeZone', E'UTC', false)")
        );
        run(&mut s, &mut a, &[Effect::ResetAll], TxStatus::Idle);
        assert!(a.is_empty() && s.is_dirty());
        assert_eq!(
            s.sync(&mut a).as_deref(),
            Some("SELECT pg_catalog.set_config(E'TimeZone', E'UTC', false)")
        );
        let mut fresh = SessionState::default();
        assert_eq!(fresh.sync(&mut Applied::new()), None);
    }

    #[test]
    fn pins_hold_until_discard_all() {
        let mut s = SessionState::default();
        let mut a = Applied::new();
        run(&mut s, &mut a, &[Effect::Pin(Pin::Listen)], TxStatus::Idle);
        assert_eq!(s.pinned(), Some(Pin::Listen));
        run(
            &mut s,
            &mut a,
            &[Effect::Pin(Pin::TempObject)],
            TxStatus::Idle,
        );
        assert_eq!(s.pinned(), Some(Pin::Listen), "the first reason is kept");
        run(&mut s, &mut a, &[Effect::DiscardAll], TxStatus::Idle);
        assert_eq!(s.pinned(), None);
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_literal("it's a \\ test"), "E'it''s a \\\\ test'");
        assert_eq!(quote_name("search_path"), "search_path");
        assert_eq!(quote_name("my.odd-name"), "my.\"odd-name\"");
    }
}
