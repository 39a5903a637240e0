//! The file layer: what serde reads from `pgwarden.toml`.
//!
//! Every leaf is a [`Field`], which accepts any TOML value and remembers a type mismatch instead of
//! failing, so that validation can report all problems at once. Keys serde does not know are
//! collected by `serde_ignored` with their paths.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use crate::error::{ConfigError, FieldError};

/// A leaf value: the typed value, or why the TOML value did not fit.
#[derive(Debug, Clone, PartialEq)]
pub enum Field<T> {
    Ok(T),
    Bad(String),
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = toml::Value::deserialize(d)?;
        Ok(match T::deserialize(value) {
            Ok(v) => Field::Ok(v),
            Err(e) => Field::Bad(e.message().trim().to_string()),
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FileConfig {
    pub cluster: Option<Field<String>>,
    pub postgres: FilePostgres,
    pub replication: FileReplication,
    pub monitor: FileMonitor,
    pub nodes: Vec<FileNode>,
    pub proxy: FileProxy,
    pub agent: FileAgent,
    pub dcs: Option<FileDcs>,
}

/// `[agent]`: the HA agents' rules.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FileAgent {
    pub ttl: Option<Field<String>>,
    pub loop_wait: Option<Field<String>>,
    pub retry_timeout: Option<Field<String>>,
    pub fence_margin: Option<Field<String>>,
    pub primary_restart_timeout: Option<Field<String>>,
    pub on_postgres_crash: Option<Field<String>>,
    pub maximum_lag_on_failover: Option<Field<String>>,
    pub synchronous_mode: Option<Field<String>>,
    pub rejoin: Option<Field<String>>,
    pub failsafe: Option<Field<bool>>,
    pub api: FileAgentApi,
}

/// `[agent.api]`: who may call the agents' HTTP API.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FileAgentApi {
    pub username: Option<Field<String>>,
    pub password: Option<Field<String>>,
    pub password_file: Option<Field<String>>,
    pub auth_reads: Option<Field<bool>>,
}

/// `[dcs]`: the consensus store.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FileDcs {
    pub endpoints: Option<Field<Vec<String>>>,
    pub namespace: Option<Field<String>>,
    pub timeout: Option<Field<String>>,
    pub start_wait: Option<Field<String>>,
    pub username: Option<Field<String>>,
    pub password: Option<Field<String>>,
    pub password_file: Option<Field<String>>,
    pub ca_file: Option<Field<String>>,
    pub cert_file: Option<Field<String>>,
    pub key_file: Option<Field<String>>,
}

/// `[proxy]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FileProxy {
    pub listen: Option<Field<String>>,
    pub workers: Option<Field<i64>>,
    pub pool_mode: Option<Field<String>>,
    pub default_pool_size: Option<Field<i64>>,
    pub min_pool_size: Option<Field<i64>>,
    pub max_client_conn: Option<Field<i64>>,
    pub max_pending_logins: Option<Field<i64>>,
    pub login_timeout: Option<Field<String>>,
    pub server_connect_timeout: Option<Field<String>>,
    pub query_wait_timeout: Option<Field<String>>,
    pub server_idle_timeout: Option<Field<String>>,
    pub server_lifetime: Option<Field<String>>,
    pub idle_transaction_timeout: Option<Field<String>>,
    pub query_timeout: Option<Field<String>>,
    pub shutdown_timeout: Option<Field<String>>,
    pub max_prepared_statements: Option<Field<i64>>,
    pub max_view_age: Option<Field<String>>,
    pub admin_users: Option<Field<Vec<String>>>,
    pub client_tls: FileClientTls,
    pub auth: FileAuth,
    pub users: Vec<FileProxyUser>,
    pub routing: FileRouting,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FileRouting {
    pub read_write_split: Option<Field<bool>>,
    pub consistency: Option<Field<String>>,
    pub balance: Option<Field<String>>,
    pub primary_reads: Option<Field<String>>,
    pub max_replica_lag: Option<Field<String>>,
    pub max_replica_lag_time: Option<Field<String>>,
    pub lag_hysteresis: Option<Field<f64>>,
    pub transaction_routing: Option<Field<String>>,
    pub read_only_functions: Option<Field<Vec<String>>>,
    pub read_your_writes_wait: Option<Field<String>>,
    pub ban_after: Option<Field<i64>>,
    pub ban_time: Option<Field<String>>,
    pub max_ban_time: Option<Field<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FileClientTls {
    pub mode: Option<Field<String>>,
    pub cert: Option<Field<String>>,
    pub key: Option<Field<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FileAuth {
    pub method: Option<Field<String>>,
    pub auth_user: Option<Field<String>>,
    pub auth_query: Option<Field<String>>,
    pub rules: Vec<FileAuthRule>,
}

/// `[[proxy.auth.rules]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FileAuthRule {
    pub user: Option<Field<String>>,
    pub database: Option<Field<String>>,
    pub address: Option<Field<String>>,
    pub method: Option<Field<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FileProxyUser {
    pub name: Option<Field<String>>,
    pub password: Option<Field<String>>,
    pub pool_size: Option<Field<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FilePostgres {
    pub bin_dir: Option<Field<String>>,
    pub os_user: Option<Field<String>>,
    pub superuser: Option<Field<String>>,
    pub superuser_password: Option<Field<String>>,
    pub superuser_password_file: Option<Field<String>>,
    pub replication_user: Option<Field<String>>,
    pub replication_password: Option<Field<String>>,
    pub replication_password_file: Option<Field<String>>,
    pub parameters: BTreeMap<String, Field<toml::Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FileReplication {
    pub mode: Option<Field<String>>,
    pub sync_count: Option<Field<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FileMonitor {
    pub interval: Option<Field<String>>,
    pub timeout: Option<Field<String>>,
    pub lag_medium: Option<Field<String>>,
    pub lag_high: Option<Field<String>>,
    pub follow_promotions: Option<Field<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FileNode {
    pub name: Option<Field<String>>,
    pub host: Option<Field<String>>,
    pub port: Option<Field<i64>>,
    pub data_dir: Option<Field<String>>,
    /// The node's agent API, `host:port`.
    pub api: Option<Field<String>>,
    pub priority: Option<Field<i64>>,
    pub nofailover: Option<Field<bool>>,
    pub nosync: Option<Field<bool>>,
    pub weight: Option<Field<i64>>,
}

/// Parses TOML text into the file layer plus the paths of every unknown key.
pub fn parse(text: &str) -> Result<(FileConfig, Vec<String>), ConfigError> {
    let de = toml::Deserializer::new(text);
    let mut unknown = Vec::new();
    let file = serde_ignored::deserialize(de, |path| unknown.push(format_path(&path)))
        .map_err(|e| ConfigError::Syntax(syntax_error(text, &e)))?;
    Ok((file, unknown))
}

fn syntax_error(text: &str, e: &toml::de::Error) -> FieldError {
    let message = e.message().trim().replace('\n', " ");
    let message = match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("TOML error at line {line}, column {col}: {message}")
        }
        None => format!("TOML error: {message}"),
    };
    FieldError {
        path: String::new(),
        message,
    }
}

/// `nodes[1].foo` rather than serde_ignored's `nodes.1.foo`.
fn format_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", format_path(parent)),
        Path::Map { parent, key } => {
            let p = format_path(parent);
            if p.is_empty() {
                key.to_string()
            } else {
                format!("{p}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => format_path(parent),
    }
}
