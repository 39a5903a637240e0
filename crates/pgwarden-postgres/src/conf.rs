//! The configuration files pgwarden writes into a data directory.
//!
//! `postgresql.conf` from initdb is kept and gets one `include 'pgwarden.conf'` line; pgwarden's
//! cluster-wide settings live in `pgwarden.conf`, followed by the user's `parameters`, which win.
//! Both files are copied to standbys by pg_basebackup, so nothing node-specific goes in them: port,
//! cluster_name, listen_addresses and the socket directory are passed on the `postgres` command line.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Which standbys must confirm commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncStandbys {
    None,
    /// `FIRST k (names)`: the first k connected in list order are synchronous.
    First(u32, Vec<String>),
    /// `ANY k (names)`: any k of them (quorum commit).
    Any(u32, Vec<String>),
}

impl SyncStandbys {
    /// The value of `synchronous_standby_names`.
    pub fn setting(&self) -> String {
        let list = |names: &[String]| {
            names
                .iter()
                .map(|n| format!("\"{n}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            SyncStandbys::None => String::new(),
            SyncStandbys::First(k, names) => format!("FIRST {k} ({})", list(names)),
            SyncStandbys::Any(k, names) => format!("ANY {k} ({})", list(names)),
        }
    }
}

/// Cluster-wide settings for `pgwarden.conf`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_wal_senders: u32,
    pub max_replication_slots: u32,
    pub wal_keep_size: String,
    pub sync: SyncStandbys,
    /// The user's extra settings, in PostgreSQL's text form; they come last and so win.
    pub parameters: BTreeMap<String, String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_wal_senders: 10,
            max_replication_slots: 10,
            wal_keep_size: "128MB".to_string(),
            sync: SyncStandbys::None,
            parameters: BTreeMap::new(),
        }
    }
}

impl Settings {
    /// The text of `pgwarden.conf`.
    pub fn render(&self) -> String {
        let mut s = String::from(
            "# Written by pgwarden; edits are overwritten. Put your own settings in\n\
             # postgres.parameters in pgwarden.toml.\n",
        );
        let mut set = |k: &str, v: &str| {
            let _ = writeln!(s, "{k} = {}", conf_literal(v));
        };
        set("wal_level", "replica");
        set("max_wal_senders", &self.max_wal_senders.to_string());
        set(
            "max_replication_slots",
            &self.max_replication_slots.to_string(),
        );
        set("hot_standby", "on");
        set("hot_standby_feedback", "on");
        set("wal_log_hints", "on");
        set("wal_keep_size", &self.wal_keep_size);
        set("wal_receiver_status_interval", "1s");
        // A standby whose upstream went away (a failover) tries again after 1 s, not 5 s.
        set("wal_retrieve_retry_interval", "1s");
        set("password_encryption", "scram-sha-256");
        set("synchronous_standby_names", &self.sync.setting());
        set("logging_collector", "on");
        set("log_directory", "log");
        set("log_filename", "postgresql-%a.log");
        set("log_truncate_on_rotation", "on");
        set("log_rotation_age", "1d");
        set("log_line_prefix", "%m [%p] %q%u@%d ");
        set("log_connections", "off");
        for (k, v) in &self.parameters {
            set(k, v);
        }
        s
    }
}

/// `pg_hba.conf`: SCRAM for every client and for replication by `replication_user`.
pub fn hba(replication_user: &str) -> String {
    format!(
        "# Written by pgwarden.\n\
         # TYPE  DATABASE     USER  ADDRESS  METHOD\n\
         local   all          all            scram-sha-256\n\
         host    all          all   all      scram-sha-256\n\
         local   replication  {u}            scram-sha-256\n\
         host    replication  {u}   all      scram-sha-256\n",
        u = hba_word(replication_user)
    )
}

/// A `postgresql.conf` string literal.
pub fn conf_literal(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

/// A value inside a libpq conninfo string.
pub fn conninfo_value(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn hba_word(w: &str) -> String {
    if w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        w.to_string()
    } else {
        format!("\"{}\"", w.replace('"', "\"\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_standby_names() {
        let names = vec!["n2".to_string(), "n3".to_string()];
        assert_eq!(
            SyncStandbys::First(1, names.clone()).setting(),
            "FIRST 1 (\"n2\", \"n3\")"
        );
        assert_eq!(
            SyncStandbys::Any(2, names).setting(),
            "ANY 2 (\"n2\", \"n3\")"
        );
        assert_eq!(SyncStandbys::None.setting(), "");
    }

    #[test]
    fn user_parameters_come_last_and_are_quoted() {
        let mut st = Settings::default();
        st.parameters.insert("work_mem".into(), "64MB".into());
        st.parameters
            .insert("application_name".into(), "it's".into());
        let text = st.render();
        assert!(text.contains("wal_level = 'replica'\n"));
        assert!(text.contains("application_name = 'it''s'\n"));
        let wal = text.find("wal_level").expect("wal_level");
        let user = text.find("work_mem").expect("work_mem");
        assert!(user > wal);
    }

    #[test]
    fn quoting() {
        assert_eq!(conninfo_value("pa ss'\\"), "'pa ss\\'\\\\'");
        assert_eq!(
            hba("replicator").lines().nth(4).expect("line"),
            "local   replication  replicator            scram-sha-256"
        );
        assert!(hba("rep user").contains("\"rep user\""));
    }
}
