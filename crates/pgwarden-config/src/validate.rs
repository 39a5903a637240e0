//! File layer -> validated [`Config`], reporting every problem at once.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use pgwarden_core::{parse_duration, ByteSize};

use crate::error::FieldError;
use crate::file::{
    Field, FileConfig, FileMonitor, FileNode, FilePostgres, FileProxyUser, FileReplication,
};
use crate::model::*;

/// Settings pgwarden sets itself, per node or per cluster; a `parameters` entry for one of them
/// would silently lose, so it is an error instead.
const MANAGED_PARAMETERS: &[&str] = &[
    "port",
    "cluster_name",
    "listen_addresses",
    "unix_socket_directories",
    "data_directory",
    "hba_file",
    "ident_file",
    "config_file",
    "primary_conninfo",
    "primary_slot_name",
    "synchronous_standby_names",
    "wal_level",
    "hot_standby",
];

/// Collects errors while reading fields.
#[derive(Default)]
pub(crate) struct Errors {
    pub(crate) list: Vec<FieldError>,
}

impl Errors {
    pub(crate) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.list.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// The value of an optional field, recording a type error.
    pub(crate) fn get<T>(&mut self, path: &str, field: Option<Field<T>>) -> Option<T> {
        match field? {
            Field::Ok(v) => Some(v),
            Field::Bad(msg) => {
                self.push(path, msg);
                None
            }
        }
    }

    pub(crate) fn required<T>(&mut self, path: &str, field: Option<Field<T>>) -> Option<T> {
        if field.is_none() {
            self.push(path, "is required");
        }
        self.get(path, field)
    }

    pub(crate) fn non_empty(
        &mut self,
        path: &str,
        field: Option<Field<String>>,
        default: &str,
    ) -> String {
        match self.get(path, field) {
            Some(s) if s.trim().is_empty() => {
                self.push(path, "must not be empty");
                default.to_string()
            }
            Some(s) => s,
            None => default.to_string(),
        }
    }

    pub(crate) fn duration(
        &mut self,
        path: &str,
        field: Option<Field<String>>,
        default: Duration,
    ) -> Duration {
        match self.get(path, field) {
            None => default,
            Some(s) => match parse_duration(&s) {
                Ok(d) => d,
                Err(e) => {
                    self.push(path, e.to_string());
                    default
                }
            },
        }
    }

    pub(crate) fn size(
        &mut self,
        path: &str,
        field: Option<Field<String>>,
        default: ByteSize,
    ) -> ByteSize {
        match self.get(path, field) {
            None => default,
            Some(s) => match s.parse::<ByteSize>() {
                Ok(v) => v,
                Err(e) => {
                    self.push(path, e.to_string());
                    default
                }
            },
        }
    }
}

/// Validates the file layer. `unknown` holds the paths of keys serde did not recognise.
pub fn validate(
    mut file: FileConfig,
    unknown: Vec<String>,
    base_dir: &Path,
) -> Result<Config, Vec<FieldError>> {
    let mut e = Errors { list: Vec::new() };
    for path in unknown {
        e.push(path, "unknown key");
    }
    let cluster = e.non_empty("cluster", file.cluster, "main");
    if !is_simple_name(&cluster, true) {
        e.push("cluster", "may contain only letters, digits, '_' and '-'");
    }
    let nodes = nodes(&mut e, file.nodes, base_dir);
    let postgres = postgres(&mut e, file.postgres, base_dir, &nodes);
    let replication = replication(&mut e, file.replication, nodes.len());
    let monitor = monitor(&mut e, file.monitor);
    let users = users(&mut e, std::mem::take(&mut file.proxy.users));
    let proxy = crate::validate_proxy::proxy(&mut e, file.proxy, base_dir, &users, &monitor);
    let agent = crate::validate_agent::agent(&mut e, file.agent, base_dir);
    let dcs = file
        .dcs
        .map(|d| crate::validate_agent::dcs(&mut e, d, base_dir, &agent));
    if e.list.is_empty() {
        Ok(Config {
            cluster,
            postgres,
            replication,
            monitor,
            nodes,
            users,
            proxy,
            agent,
            dcs,
            source: None,
        })
    } else {
        Err(e.list)
    }
}

fn postgres(e: &mut Errors, f: FilePostgres, base: &Path, nodes: &[NodeConfig]) -> PostgresConfig {
    let bin_dir = e
        .get("postgres.bin_dir", f.bin_dir)
        .map(|s| resolve(base, &s));
    if let Some(dir) = &bin_dir {
        if !dir.join("postgres").is_file() {
            e.push(
                "postgres.bin_dir",
                format!("{} does not contain the postgres binary", dir.display()),
            );
        }
    }
    let os_user = e.non_empty("postgres.os_user", f.os_user, "postgres");
    let superuser = e.non_empty("postgres.superuser", f.superuser, "postgres");
    let replication_user = e.non_empty(
        "postgres.replication_user",
        f.replication_user,
        "replicator",
    );
    let superuser_password = password(
        e,
        "postgres.superuser_password",
        f.superuser_password,
        f.superuser_password_file,
        base,
    );
    if superuser_password.is_none()
        && !e
            .list
            .iter()
            .any(|x| x.path.starts_with("postgres.superuser_password"))
    {
        e.push(
            "postgres.superuser_password",
            "is required (or postgres.superuser_password_file)",
        );
    }
    let replication_password = password(
        e,
        "postgres.replication_password",
        f.replication_password,
        f.replication_password_file,
        base,
    );
    let manages_standbys = nodes.len() > 1 && nodes.iter().any(|n| n.data_dir.is_some());
    if manages_standbys
        && replication_password.is_none()
        && !e
            .list
            .iter()
            .any(|x| x.path.starts_with("postgres.replication_password"))
    {
        e.push(
            "postgres.replication_password",
            "is required when this host manages a replicated cluster (or postgres.replication_password_file)",
        );
    }
    let mut parameters = BTreeMap::new();
    for (name, value) in f.parameters {
        if let Some(v) = parameter(e, &name, value) {
            parameters.insert(name, v);
        }
    }
    PostgresConfig {
        bin_dir,
        os_user,
        superuser: superuser.clone(),
        superuser_password: superuser_password.unwrap_or_default(),
        replication_user,
        replication_password,
        parameters,
    }
}

/// A password given inline or by file, not both.
pub(crate) fn password(
    e: &mut Errors,
    path: &str,
    inline: Option<Field<String>>,
    file: Option<Field<String>>,
    base: &Path,
) -> Option<Secret> {
    let file_path = format!("{path}_file");
    let inline = e.get(path, inline);
    let file = e.get(&file_path, file);
    match (inline, file) {
        (Some(_), Some(_)) => {
            e.push(path, format!("give either {path} or {file_path}, not both"));
            None
        }
        (Some(p), None) if p.is_empty() => {
            e.push(path, "must not be empty");
            None
        }
        (Some(p), None) => Some(Secret::new(p)),
        (None, Some(f)) => {
            let full = resolve(base, &f);
            match std::fs::read_to_string(&full) {
                Ok(s) if s.trim_end_matches(['\n', '\r']).is_empty() => {
                    e.push(&file_path, format!("{} is empty", full.display()));
                    None
                }
                Ok(s) => Some(Secret::new(s.trim_end_matches(['\n', '\r']))),
                Err(err) => {
                    e.push(&file_path, format!("cannot read {}: {err}", full.display()));
                    None
                }
            }
        }
        (None, None) => None,
    }
}

/// One entry of `postgres.parameters` (from the file, or `pgwarden edit-config`): its value as
/// `postgresql.conf` takes it, or the errors under its path.
pub(crate) fn parameter(e: &mut Errors, name: &str, value: Field<toml::Value>) -> Option<String> {
    let path = format!("postgres.parameters.{name}");
    if !is_simple_name(name, false) || name.contains('-') {
        e.push(&path, "is not a valid PostgreSQL setting name");
        return None;
    }
    if MANAGED_PARAMETERS.contains(&name) {
        e.push(&path, "is set by pgwarden and cannot be overridden here");
        return None;
    }
    e.get(&path, Some(value))
        .and_then(|v| setting_text(e, &path, v))
}

/// A parameter value in the text form `postgresql.conf` takes.
fn setting_text(e: &mut Errors, path: &str, v: toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(if b { "on" } else { "off" }.to_string()),
        other => {
            e.push(
                path,
                format!(
                    "must be a string, number or boolean, not {}",
                    other.type_str()
                ),
            );
            None
        }
    }
}

fn replication(e: &mut Errors, f: FileReplication, node_count: usize) -> ReplicationConfig {
    let mode = match e.get("replication.mode", f.mode) {
        None => ReplicationMode::Async,
        Some(s) => s.parse().unwrap_or_else(|msg: String| {
            e.push("replication.mode", msg);
            ReplicationMode::Async
        }),
    };
    let sync_count = match e.get("replication.sync_count", f.sync_count) {
        None => 1,
        Some(n) if n < 1 => {
            e.push("replication.sync_count", "must be >= 1");
            1
        }
        Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
    };
    let standbys = node_count.saturating_sub(1);
    if mode != ReplicationMode::Async && node_count > 0 && sync_count as usize > standbys {
        e.push(
            "replication.sync_count",
            format!(
                "is {sync_count} but the cluster has only {standbys} standby(s): every commit would wait forever"
            ),
        );
    }
    ReplicationConfig { mode, sync_count }
}

fn monitor(e: &mut Errors, f: FileMonitor) -> MonitorConfig {
    let interval = e.duration("monitor.interval", f.interval, Duration::from_secs(1));
    if interval.is_zero() {
        e.push("monitor.interval", "must be greater than 0");
    }
    let timeout = e.duration("monitor.timeout", f.timeout, Duration::from_secs(2));
    if timeout.is_zero() {
        e.push("monitor.timeout", "must be greater than 0");
    }
    let lag_medium = e.size("monitor.lag_medium", f.lag_medium, ByteSize::mib(10));
    let lag_high = e.size("monitor.lag_high", f.lag_high, ByteSize::mib(100));
    if lag_medium >= lag_high {
        e.push(
            "monitor.lag_high",
            format!("({lag_high}) must be greater than monitor.lag_medium ({lag_medium})"),
        );
    }
    let follow_promotions = match e
        .get("monitor.follow_promotions", f.follow_promotions)
        .as_deref()
    {
        None | Some("descendant") => FollowPromotions::Descendant,
        Some("any") => FollowPromotions::Any,
        Some(other) => {
            e.push(
                "monitor.follow_promotions",
                format!("unknown value \"{other}\": expected descendant or any"),
            );
            FollowPromotions::Descendant
        }
    };
    MonitorConfig {
        interval,
        timeout,
        lag_medium,
        lag_high,
        follow_promotions,
    }
}

fn nodes(e: &mut Errors, list: Vec<FileNode>, base: &Path) -> Vec<NodeConfig> {
    if list.is_empty() {
        e.push("nodes", "at least one [[nodes]] entry is required");
    }
    let mut out = Vec::new();
    let mut names = HashSet::new();
    let mut addrs = HashSet::new();
    for (i, n) in list.into_iter().enumerate() {
        let p = |k: &str| format!("nodes[{i}].{k}");
        let name = e.required(&p("name"), n.name).unwrap_or_default();
        if !name.is_empty() && !is_node_name(&name) {
            e.push(
                p("name"),
                format!("\"{name}\" is not a valid node name: use 1-63 lowercase letters, digits and '_' (it becomes a replication slot name)"),
            );
        } else if !name.is_empty() && !names.insert(name.clone()) {
            e.push(p("name"), format!("duplicate node name \"{name}\""));
        }
        let host = e.non_empty(&p("host"), n.host, "127.0.0.1");
        let port = match e.required(&p("port"), n.port) {
            Some(v) if (1..=65535).contains(&v) => v as u16,
            Some(v) => {
                e.push(
                    p("port"),
                    format!("{v} is not a valid port: must be between 1 and 65535"),
                );
                0
            }
            None => 0,
        };
        if port != 0 && !addrs.insert((host.clone(), port)) {
            e.push(
                p("port"),
                format!("{host}:{port} is already used by another node"),
            );
        }
        let data_dir = match e.get(&p("data_dir"), n.data_dir) {
            Some(s) if s.trim().is_empty() => {
                e.push(p("data_dir"), "must not be empty");
                None
            }
            Some(s) => Some(resolve(base, &s)),
            None => None,
        };
        let api = e
            .get(&p("api"), n.api)
            .and_then(|s| match s.parse::<std::net::SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    e.push(
                        p("api"),
                        format!("\"{s}\" is not an address: expected ip:port, e.g. 127.0.0.1:8008"),
                    );
                    None
                }
            });
        if let Some(a) = api {
            if !addrs.insert((a.ip().to_string(), a.port())) {
                e.push(p("api"), format!("{a} is already used by another node"));
            }
        }
        let priority = match e.get(&p("priority"), n.priority) {
            None => 1,
            Some(v) if (0..=1000).contains(&v) => v as u32,
            Some(v) => {
                e.push(p("priority"), format!("{v} must be between 0 and 1000"));
                1
            }
        };
        let weight = match e.get(&p("weight"), n.weight) {
            None => 100,
            Some(v) if (0..=10_000).contains(&v) => v as u32,
            Some(v) => {
                e.push(p("weight"), format!("{v} must be between 0 and 10000"));
                100
            }
        };
        out.push(NodeConfig {
            name,
            host,
            port,
            data_dir,
            api,
            priority,
            nofailover: e.get(&p("nofailover"), n.nofailover).unwrap_or(false),
            nosync: e.get(&p("nosync"), n.nosync).unwrap_or(false),
            weight,
        });
    }
    out
}

fn users(e: &mut Errors, list: Vec<FileProxyUser>) -> Vec<UserConfig> {
    let mut names = HashSet::new();
    let mut out = Vec::new();
    for (i, u) in list.into_iter().enumerate() {
        let p = |k: &str| format!("proxy.users[{i}].{k}");
        let name = e.required(&p("name"), u.name).unwrap_or_default();
        if name.is_empty() && !e.list.iter().any(|x| x.path == p("name")) {
            e.push(p("name"), "must not be empty");
        } else if !name.is_empty() && !names.insert(name.clone()) {
            e.push(p("name"), format!("duplicate user \"{name}\""));
        }
        let password = e.required(&p("password"), u.password).unwrap_or_default();
        let pool_size = match e.get(&p("pool_size"), u.pool_size) {
            Some(n) if !(1..=100_000).contains(&n) => {
                e.push(p("pool_size"), "must be between 1 and 100000");
                None
            }
            other => other.map(|n| n as u32),
        };
        out.push(UserConfig {
            name,
            password: Secret::new(password),
            pool_size,
        });
    }
    out
}

pub(crate) fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn is_simple_name(s: &str, allow_dash: bool) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || (allow_dash && c == '-'))
}

/// Node names become replication slot names and `application_name`s: `[a-z0-9_]{1,63}`.
fn is_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}
