//! Dynamic settings: what `pgwarden edit-config` keeps in the store and the agents apply at
//! runtime over their file's config. A TOML text with two tables:
//!
//! ```toml
//! [agent]                      # the decisions' rules
//! maximum_lag_on_failover = "16MB"
//! synchronous_mode = "on"
//! [postgres.parameters]        # PostgreSQL settings, applied by reload
//! work_mem = "64MB"
//! ```
//!
//! Validated exactly as the file is (the same checks, the same field paths). The lease's
//! timing (`ttl`, `loop_wait`, `retry_timeout`, `fence_margin`) and the API's credentials are
//! not dynamic: they change with the file and a restart of every agent, because a leader and
//! its replicas must agree on them at every moment.

use std::path::Path;

use crate::error::{ConfigError, FieldError};
use crate::file::{Field, FileAgent};
use crate::model::*;
use crate::validate::{parameter, Errors};

/// The `[agent]` keys `edit-config` may set.
pub const DYNAMIC_AGENT_KEYS: &[&str] = &[
    "primary_restart_timeout",
    "on_postgres_crash",
    "maximum_lag_on_failover",
    "synchronous_mode",
    "rejoin",
    "failsafe",
];

const TIMING_KEYS: &[&str] = &["ttl", "loop_wait", "retry_timeout", "fence_margin"];

/// `config` with the dynamic settings of `text` applied over it, or every problem with its
/// path. An empty text is `config` itself.
pub fn apply(config: &Config, text: &str) -> Result<Config, ConfigError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        ConfigError::Syntax(FieldError {
            path: "dynamic settings".into(),
            message: e.message().trim().to_string(),
        })
    })?;
    let mut e = Errors::default();
    let mut agent_overrides = toml::Table::new();
    let mut parameter_overrides = toml::Table::new();
    for (key, value) in table {
        match (key.as_str(), value) {
            ("agent", toml::Value::Table(t)) => agent_overrides = t,
            ("postgres", toml::Value::Table(t)) => {
                for (k, v) in t {
                    match (k.as_str(), v) {
                        ("parameters", toml::Value::Table(p)) => parameter_overrides = p,
                        (k, _) => e.push(
                            format!("postgres.{k}"),
                            "not a dynamic setting: only postgres.parameters are",
                        ),
                    }
                }
            }
            (k, _) => e.push(
                k,
                "not a dynamic setting: only [agent] rules and [postgres.parameters] are",
            ),
        }
    }
    let mut base = agent_table(&config.agent);
    for (k, v) in agent_overrides {
        let path = format!("agent.{k}");
        if TIMING_KEYS.contains(&k.as_str()) {
            e.push(
                path,
                "not a dynamic setting: the lease's timing changes only in the file, with every agent restarted",
            );
        } else if k == "api" {
            e.push(
                path,
                "not a dynamic setting: the API's credentials live in the file",
            );
        } else if DYNAMIC_AGENT_KEYS.contains(&k.as_str()) {
            base.insert(k, v);
        } else {
            e.push(path, "unknown key");
        }
    }
    let file_agent: FileAgent =
        toml::Value::Table(base)
            .try_into()
            .map_err(|err: toml::de::Error| {
                ConfigError::Syntax(FieldError {
                    path: "agent".into(),
                    message: err.message().trim().to_string(),
                })
            })?;
    let mut agent = crate::validate_agent::agent(&mut e, file_agent, Path::new("/"));
    agent.api = config.agent.api.clone();
    let mut parameters = config.postgres.parameters.clone();
    for (name, value) in parameter_overrides {
        if let Some(v) = parameter(&mut e, &name, Field::Ok(value)) {
            parameters.insert(name, v);
        }
    }
    if !e.list.is_empty() {
        return Err(ConfigError::Invalid(e.list));
    }
    let mut out = config.clone();
    out.agent = agent;
    out.postgres.parameters = parameters;
    Ok(out)
}

/// The dynamic settings `text` with `set` (`agent.NAME=VALUE`, `postgres.parameters.NAME=VALUE`;
/// a VALUE that is not TOML is a string) and `unset` (the same keys) applied: the new text.
/// Unchecked: [`apply`] checks it.
pub fn edit(text: &str, set: &[(String, String)], unset: &[String]) -> Result<String, ConfigError> {
    let syntax = |path: &str, message: String| {
        ConfigError::Syntax(FieldError {
            path: path.to_string(),
            message,
        })
    };
    let mut root: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| syntax("dynamic settings", e.message().trim().to_string()))?;
    let table_for = |key: &str| -> Result<(Vec<String>, String), ConfigError> {
        let parts: Vec<&str> = key.split('.').collect();
        match parts.as_slice() {
            ["agent", name] => Ok((vec!["agent".into()], name.to_string())),
            ["postgres", "parameters", name] => Ok((
                vec!["postgres".into(), "parameters".into()],
                name.to_string(),
            )),
            _ => Err(syntax(
                key,
                "not a dynamic setting: use agent.NAME or postgres.parameters.NAME".into(),
            )),
        }
    };
    fn table<'a>(root: &'a mut toml::Table, path: &[String]) -> &'a mut toml::Table {
        let mut t = root;
        for p in path {
            let entry = t
                .entry(p.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            t = entry.as_table_mut().expect("made a table");
        }
        t
    }
    for (key, raw) in set {
        let (path, name) = table_for(key)?;
        let value = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        table(&mut root, &path).insert(name, value);
    }
    for key in unset {
        let (path, name) = table_for(key)?;
        table(&mut root, &path).remove(&name);
    }
    // Empty tables say nothing.
    if let Some(toml::Value::Table(p)) = root.get_mut("postgres") {
        if p.get("parameters")
            .and_then(|t| t.as_table())
            .is_some_and(|t| t.is_empty())
        {
            p.remove("parameters");
        }
    }
    root.retain(|_, v| !v.as_table().is_some_and(|t| t.is_empty()));
    Ok(toml::to_string(&root).unwrap_or_default())
}

/// `[agent]` as the file would say it, for the checks to run over.
fn agent_table(a: &AgentConfig) -> toml::Table {
    let ms = |d: std::time::Duration| toml::Value::String(format!("{}ms", d.as_millis()));
    let mut t = toml::Table::new();
    t.insert("ttl".into(), ms(a.ttl));
    t.insert("loop_wait".into(), ms(a.loop_wait));
    t.insert("retry_timeout".into(), ms(a.retry_timeout));
    t.insert("fence_margin".into(), ms(a.fence_margin));
    t.insert(
        "primary_restart_timeout".into(),
        ms(a.primary_restart_timeout),
    );
    let name = |s: &str| toml::Value::String(s.into());
    t.insert(
        "on_postgres_crash".into(),
        name(match a.on_postgres_crash {
            OnPostgresCrash::Restart => "restart",
            OnPostgresCrash::Failover => "failover",
        }),
    );
    t.insert(
        "maximum_lag_on_failover".into(),
        match a.maximum_lag_on_failover {
            Some(b) => toml::Value::String(b.bytes().to_string()),
            None => name("unlimited"),
        },
    );
    t.insert(
        "synchronous_mode".into(),
        name(match a.synchronous_mode {
            SynchronousMode::Off => "off",
            SynchronousMode::On => "on",
            SynchronousMode::Strict => "strict",
        }),
    );
    t.insert(
        "rejoin".into(),
        name(match a.rejoin {
            RejoinMode::Rewind => "rewind",
            RejoinMode::Clone => "clone",
            RejoinMode::Manual => "manual",
        }),
    );
    t.insert("failsafe".into(), toml::Value::Boolean(a.failsafe));
    t
}

/// The dynamic settings of `config` as TOML (what `show-config` prints).
pub fn render(config: &Config) -> String {
    let mut agent = toml::Table::new();
    let a = &config.agent;
    let d = |d: std::time::Duration| toml::Value::String(pgwarden_core::format_duration(d));
    agent.insert(
        "primary_restart_timeout".into(),
        d(a.primary_restart_timeout),
    );
    for (k, v) in agent_table(a) {
        if DYNAMIC_AGENT_KEYS.contains(&k.as_str()) && k != "primary_restart_timeout" {
            agent.insert(k, v);
        }
    }
    if let Some(b) = a.maximum_lag_on_failover {
        // A size the file takes back (`16MB`, not `16.0 MiB`).
        let b = b.bytes();
        let text = match b {
            _ if b > 0 && b % (1 << 30) == 0 => format!("{}GB", b >> 30),
            _ if b > 0 && b % (1 << 20) == 0 => format!("{}MB", b >> 20),
            _ if b > 0 && b % (1 << 10) == 0 => format!("{}kB", b >> 10),
            _ => b.to_string(),
        };
        agent.insert("maximum_lag_on_failover".into(), toml::Value::String(text));
    }
    let mut postgres = toml::Table::new();
    let parameters: toml::Table = config
        .postgres
        .parameters
        .iter()
        .map(|(k, v)| (k.clone(), toml::Value::String(v.clone())))
        .collect();
    postgres.insert("parameters".into(), toml::Value::Table(parameters));
    let mut root = toml::Table::new();
    root.insert("agent".into(), toml::Value::Table(agent));
    root.insert("postgres".into(), toml::Value::Table(postgres));
    toml::to_string(&root).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        Config::from_toml(
            "[postgres]\nsuperuser_password = \"x\"\nparameters = { work_mem = \"4MB\" }\n\
             [[nodes]]\nname = \"n1\"\nhost = \"127.0.0.1\"\nport = 5432\n\
             [agent.api]\nusername = \"ops\"\npassword = \"pw\"\n",
            Path::new("/"),
        )
        .expect("base config")
    }

    #[test]
    fn edits_set_and_unset_keys() {
        let set = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let text = edit(
            "",
            &set(&[
                ("agent.synchronous_mode", "on"),
                ("agent.failsafe", "true"),
                ("postgres.parameters.work_mem", "64MB"),
                ("postgres.parameters.max_connections", "200"),
            ]),
            &[],
        )
        .expect("edit");
        let c = apply(&base(), &text).expect("valid");
        assert_eq!(c.agent.synchronous_mode, SynchronousMode::On);
        assert!(c.agent.failsafe, "true is a boolean, not a string");
        assert_eq!(c.postgres.parameters["max_connections"], "200");
        let text = edit(
            &text,
            &[],
            &[
                "postgres.parameters.work_mem".into(),
                "agent.failsafe".into(),
            ],
        )
        .expect("unset");
        let c = apply(&base(), &text).expect("valid");
        assert_eq!(
            c.postgres.parameters["work_mem"], "4MB",
            "back to the file's"
        );
        assert!(!c.agent.failsafe);
        let text = edit(
            &text,
            &[],
            &[
                "postgres.parameters.max_connections".into(),
                "agent.synchronous_mode".into(),
            ],
        )
        .expect("unset");
        assert_eq!(text.trim(), "", "nothing left: {text:?}");
        let err = edit("", &set(&[("proxy.listen", "x")]), &[])
            .expect_err("not dynamic")
            .to_string();
        assert!(err.contains("proxy.listen: not a dynamic setting"), "{err}");
    }

    #[test]
    fn dynamic_settings_apply_over_the_file_and_are_checked_as_it_is() {
        let c = base();
        let same = |a: &Config, b: &Config| {
            assert_eq!(a.agent, b.agent);
            assert_eq!(a.postgres.parameters, b.postgres.parameters);
        };
        same(&apply(&c, "").expect("empty"), &c);
        let new = apply(
            &c,
            "[agent]\nsynchronous_mode = \"on\"\nmaximum_lag_on_failover = \"16MB\"\nfailsafe = true\n\
             [postgres.parameters]\nwork_mem = \"64MB\"\nmax_connections = 200\n",
        )
        .expect("valid");
        assert_eq!(new.agent.synchronous_mode, SynchronousMode::On);
        assert_eq!(
            new.agent.maximum_lag_on_failover.map(|b| b.bytes()),
            Some(16 << 20)
        );
        assert!(new.agent.failsafe);
        assert_eq!(new.agent.ttl, c.agent.ttl, "timing untouched");
        assert_eq!(new.agent.api, c.agent.api, "credentials kept");
        assert_eq!(new.postgres.parameters["work_mem"], "64MB");
        assert_eq!(new.postgres.parameters["max_connections"], "200");
        // What show-config prints reads back to the same settings.
        same(&apply(&c, &render(&new)).expect("round trip"), &new);
        for (text, want) in [
            ("[agent]\nttl = \"10s\"", "agent.ttl: not a dynamic setting"),
            (
                "[agent]\nsynchronous_mode = \"sometimes\"",
                "agent.synchronous_mode: unknown value",
            ),
            (
                "[agent]\nmaximum_lag_on_failover = \"lots\"",
                "agent.maximum_lag_on_failover:",
            ),
            ("[agent]\nbogus = 1", "agent.bogus: unknown key"),
            (
                "[agent.api]\nusername = \"x\"",
                "agent.api: not a dynamic setting",
            ),
            (
                "[postgres.parameters]\nport = 5433",
                "postgres.parameters.port: is set by pgwarden",
            ),
            (
                "[postgres]\nsuperuser = \"x\"",
                "postgres.superuser: not a dynamic setting",
            ),
            ("[proxy]\nlisten = \"x\"", "proxy: not a dynamic setting"),
            ("[agent", "dynamic settings:"),
        ] {
            let err = apply(&c, text).expect_err(text).to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
