//! `[proxy]` validation.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::file::{FileAuth, FileClientTls, FileProxy, FileRouting};
use crate::model::*;
use crate::validate::{resolve, Errors};

pub(crate) fn proxy(
    e: &mut Errors,
    f: FileProxy,
    base: &Path,
    users: &[UserConfig],
    monitor: &MonitorConfig,
) -> ProxyConfig {
    let listen = match e.get("proxy.listen", f.listen) {
        None => SocketAddr::from(([127, 0, 0, 1], 6432)),
        Some(s) => s.parse().unwrap_or_else(|_| {
            e.push(
                "proxy.listen",
                format!("\"{s}\" is not an address:port (e.g. \"127.0.0.1:6432\")"),
            );
            SocketAddr::from(([127, 0, 0, 1], 6432))
        }),
    };
    let workers = int(e, "proxy.workers", f.workers, 0, 0, 1024) as usize;
    let pool_mode = match e.get("proxy.pool_mode", f.pool_mode).as_deref() {
        None | Some("transaction") => PoolMode::Transaction,
        Some("session") => PoolMode::Session,
        Some(other) => {
            e.push(
                "proxy.pool_mode",
                format!("unknown pool mode \"{other}\": expected session or transaction"),
            );
            PoolMode::Transaction
        }
    };
    let default_pool_size = int(
        e,
        "proxy.default_pool_size",
        f.default_pool_size,
        20,
        1,
        100_000,
    ) as u32;
    let min_pool_size = int(e, "proxy.min_pool_size", f.min_pool_size, 0, 0, 100_000) as u32;
    if min_pool_size > default_pool_size {
        e.push(
            "proxy.min_pool_size",
            format!(
                "({min_pool_size}) must not exceed proxy.default_pool_size ({default_pool_size})"
            ),
        );
    }
    let max_client_conn = int(
        e,
        "proxy.max_client_conn",
        f.max_client_conn,
        1000,
        1,
        1_000_000,
    ) as u32;
    let max_pending_logins = int(
        e,
        "proxy.max_pending_logins",
        f.max_pending_logins,
        1000,
        1,
        1_000_000,
    ) as u32;
    let positive = |e: &mut Errors, path: &str, field, default| {
        let d = e.duration(path, field, default);
        if d.is_zero() {
            e.push(path, "must be greater than 0 (every wait has a bound)");
        }
        d
    };
    let login_timeout = positive(e, "proxy.login_timeout", f.login_timeout, secs(10));
    let server_connect_timeout = positive(
        e,
        "proxy.server_connect_timeout",
        f.server_connect_timeout,
        secs(3),
    );
    let query_wait_timeout = positive(
        e,
        "proxy.query_wait_timeout",
        f.query_wait_timeout,
        secs(30),
    );
    let server_idle_timeout = positive(
        e,
        "proxy.server_idle_timeout",
        f.server_idle_timeout,
        secs(600),
    );
    let server_lifetime = positive(e, "proxy.server_lifetime", f.server_lifetime, secs(3600));
    let idle_transaction_timeout = Some(e.duration(
        "proxy.idle_transaction_timeout",
        f.idle_transaction_timeout,
        Duration::ZERO,
    ))
    .filter(|d| !d.is_zero());
    let query_timeout = Some(e.duration("proxy.query_timeout", f.query_timeout, Duration::ZERO))
        .filter(|d| !d.is_zero());
    let shutdown_timeout = e.duration("proxy.shutdown_timeout", f.shutdown_timeout, secs(30));
    let max_prepared_statements = int(
        e,
        "proxy.max_prepared_statements",
        f.max_prepared_statements,
        200,
        0,
        100_000,
    ) as u32;
    // The monitor publishes a view every interval, a round taking up to its timeout.
    let monitor_pace = monitor.interval + monitor.timeout;
    let max_view_age = e.duration("proxy.max_view_age", f.max_view_age, monitor_pace + secs(2));
    if max_view_age <= monitor_pace {
        e.push(
            "proxy.max_view_age",
            format!(
                "({}) must be longer than monitor.interval + monitor.timeout ({}): the monitor publishes at that pace",
                pgwarden_core::format_duration(max_view_age),
                pgwarden_core::format_duration(monitor_pace)
            ),
        );
    }
    let admin_users = e
        .get("proxy.admin_users", f.admin_users)
        .unwrap_or_default();
    for (i, u) in admin_users.iter().enumerate() {
        if u.is_empty() {
            e.push(format!("proxy.admin_users[{i}]"), "must not be empty");
        }
    }
    ProxyConfig {
        listen,
        workers,
        pool_mode,
        default_pool_size,
        min_pool_size,
        max_client_conn,
        max_pending_logins,
        login_timeout,
        server_connect_timeout,
        query_wait_timeout,
        server_idle_timeout,
        server_lifetime,
        idle_transaction_timeout,
        query_timeout,
        shutdown_timeout,
        max_prepared_statements,
        max_view_age,
        admin_users,
        client_tls: client_tls(e, f.client_tls, base),
        auth: auth(e, f.auth, users),
        routing: routing(e, f.routing),
    }
}

/// One of `choices` (lower case), or the default with an error naming them.
fn choice<T: Copy>(
    e: &mut Errors,
    path: &str,
    field: Option<crate::file::Field<String>>,
    default: T,
    choices: &[(&str, T)],
) -> T {
    let Some(s) = e.get(path, field) else {
        return default;
    };
    match choices.iter().find(|(n, _)| n.eq_ignore_ascii_case(&s)) {
        Some((_, v)) => *v,
        None => {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            e.push(
                path,
                format!(
                    "unknown value \"{s}\": expected one of {}",
                    names.join(", ")
                ),
            );
            default
        }
    }
}

fn routing(e: &mut Errors, f: FileRouting) -> RoutingConfig {
    let d = RoutingConfig::default();
    let consistency = choice(
        e,
        "proxy.routing.consistency",
        f.consistency,
        d.consistency,
        &[
            ("eventual", Consistency::Eventual),
            ("session", Consistency::Session),
            ("strong", Consistency::Strong),
        ],
    );
    let balance = choice(
        e,
        "proxy.routing.balance",
        f.balance,
        d.balance,
        &[
            ("round_robin", Balance::RoundRobin),
            ("random", Balance::Random),
            ("weighted", Balance::Weighted),
            ("least_connections", Balance::LeastConnections),
            ("latency", Balance::Latency),
        ],
    );
    let primary_reads = choice(
        e,
        "proxy.routing.primary_reads",
        f.primary_reads,
        d.primary_reads,
        &[
            ("never", PrimaryReads::Never),
            ("fallback", PrimaryReads::Fallback),
            ("always", PrimaryReads::Always),
        ],
    );
    match e.get("proxy.routing.transaction_routing", f.transaction_routing).as_deref() {
        None | Some("primary") => {}
        Some("first_statement") => e.push(
            "proxy.routing.transaction_routing",
            "\"first_statement\" is not offered: moving a transaction to the primary at its first write would drop the locks and snapshot its reads took on the replica; declare read-only transactions (BEGIN READ ONLY, default_transaction_read_only) and they go to replicas",
        ),
        Some(other) => e.push(
            "proxy.routing.transaction_routing",
            format!("unknown value \"{other}\": expected primary"),
        ),
    }
    let lag_return_percent = match e.get("proxy.routing.lag_hysteresis", f.lag_hysteresis) {
        None => d.lag_return_percent,
        Some(v) if (0.01..=1.0).contains(&v) => (v * 100.0).round() as u32,
        Some(v) => {
            e.push(
                "proxy.routing.lag_hysteresis",
                format!("{v} must be between 0.01 and 1 (a replica returns below that fraction of max_replica_lag)"),
            );
            d.lag_return_percent
        }
    };
    let read_only_functions: Vec<String> = e
        .get("proxy.routing.read_only_functions", f.read_only_functions)
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.to_ascii_lowercase())
        .collect();
    for (i, name) in read_only_functions.iter().enumerate() {
        if name.is_empty() || name.contains('.') {
            e.push(
                format!("proxy.routing.read_only_functions[{i}]"),
                "must be a function name without a schema",
            );
        }
    }
    let ban_time = e.duration("proxy.routing.ban_time", f.ban_time, d.ban_time);
    let max_ban_time = e.duration("proxy.routing.max_ban_time", f.max_ban_time, d.max_ban_time);
    if ban_time.is_zero() {
        e.push("proxy.routing.ban_time", "must be greater than 0");
    }
    if max_ban_time < ban_time {
        e.push(
            "proxy.routing.max_ban_time",
            "must not be shorter than proxy.routing.ban_time",
        );
    }
    RoutingConfig {
        read_write_split: e
            .get("proxy.routing.read_write_split", f.read_write_split)
            .unwrap_or(d.read_write_split),
        consistency,
        balance,
        primary_reads,
        max_replica_lag: e.size(
            "proxy.routing.max_replica_lag",
            f.max_replica_lag,
            d.max_replica_lag,
        ),
        max_replica_lag_time: Some(e.duration(
            "proxy.routing.max_replica_lag_time",
            f.max_replica_lag_time,
            Duration::ZERO,
        ))
        .filter(|d| !d.is_zero()),
        lag_return_percent,
        read_only_functions,
        read_your_writes_wait: e.duration(
            "proxy.routing.read_your_writes_wait",
            f.read_your_writes_wait,
            d.read_your_writes_wait,
        ),
        ban_after: int(e, "proxy.routing.ban_after", f.ban_after, 3, 1, 1000) as u32,
        ban_time,
        max_ban_time,
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn int(
    e: &mut Errors,
    path: &str,
    field: Option<crate::file::Field<i64>>,
    default: i64,
    min: i64,
    max: i64,
) -> i64 {
    match e.get(path, field) {
        None => default,
        Some(v) if (min..=max).contains(&v) => v,
        Some(v) => {
            e.push(
                path,
                format!("{v} is out of range: must be between {min} and {max}"),
            );
            default
        }
    }
}

fn client_tls(e: &mut Errors, f: FileClientTls, base: &Path) -> ClientTlsConfig {
    let mode = match e.get("proxy.client_tls.mode", f.mode).as_deref() {
        None | Some("disable") => TlsMode::Disable,
        Some("allow") => TlsMode::Allow,
        Some("require") => TlsMode::Require,
        Some(other) => {
            e.push(
                "proxy.client_tls.mode",
                format!("unknown TLS mode \"{other}\": expected disable, allow or require"),
            );
            TlsMode::Disable
        }
    };
    let mut file = |key: &str, field| {
        let path = format!("proxy.client_tls.{key}");
        let p = e.get(&path, field).map(|s: String| resolve(base, &s));
        match &p {
            Some(p) if mode != TlsMode::Disable && !p.is_file() => {
                e.push(&path, format!("{} does not exist", p.display()));
            }
            None if mode != TlsMode::Disable => e.push(
                &path,
                "is required when proxy.client_tls.mode is not disable",
            ),
            _ => {}
        }
        p
    };
    let cert = file("cert", f.cert);
    let key = file("key", f.key);
    ClientTlsConfig { mode, cert, key }
}

fn auth_method(
    e: &mut Errors,
    path: &str,
    value: Option<&str>,
    reject: bool,
) -> Option<AuthMethod> {
    match value {
        None | Some("scram-sha-256") => Some(AuthMethod::ScramSha256),
        Some("md5") => Some(AuthMethod::Md5),
        Some("trust") => Some(AuthMethod::Trust),
        Some("reject") if reject => None,
        Some(other) => {
            let expected = if reject {
                "scram-sha-256, md5, trust or reject"
            } else {
                "scram-sha-256, md5 or trust"
            };
            e.push(
                path,
                format!("unknown method \"{other}\": expected {expected}"),
            );
            Some(AuthMethod::ScramSha256)
        }
    }
}

fn auth_rules(e: &mut Errors, list: Vec<crate::file::FileAuthRule>) -> Vec<AuthRule> {
    let mut rules = Vec::new();
    for (i, r) in list.into_iter().enumerate() {
        let p = |k: &str| format!("proxy.auth.rules[{i}].{k}");
        let all = |v: Option<String>| v.filter(|v| v != "all");
        let user = all(e.get(&p("user"), r.user));
        let database = all(e.get(&p("database"), r.database));
        let address = match all(e.get(&p("address"), r.address)) {
            None => None,
            Some(a) => {
                let cidr = Cidr::parse(&a);
                if cidr.is_none() {
                    e.push(
                        p("address"),
                        format!("\"{a}\" is not an address or range (e.g. \"127.0.0.1/32\", \"::1\", \"all\")"),
                    );
                }
                cidr
            }
        };
        let method = match e.get(&p("method"), r.method) {
            None => {
                e.push(
                    p("method"),
                    "is required (scram-sha-256, md5, trust or reject)",
                );
                None
            }
            Some(m) => auth_method(e, &p("method"), Some(&m), true),
        };
        rules.push(AuthRule {
            user,
            database,
            address,
            method,
        });
    }
    rules
}

fn auth(e: &mut Errors, f: FileAuth, users: &[UserConfig]) -> AuthConfig {
    let method = e.get("proxy.auth.method", f.method);
    let method = auth_method(e, "proxy.auth.method", method.as_deref(), false)
        .expect("reject is not allowed here");
    let rules = auth_rules(e, f.rules);
    let auth_user = e.get("proxy.auth.auth_user", f.auth_user);
    if let Some(u) = &auth_user {
        if !users.iter().any(|x| &x.name == u) {
            e.push(
                "proxy.auth.auth_user",
                format!("\"{u}\" must be listed in [[proxy.users]] with a password the proxy can log in with"),
            );
        }
    }
    let auth_query = e
        .get("proxy.auth.auth_query", f.auth_query)
        .unwrap_or_else(|| DEFAULT_AUTH_QUERY.to_string());
    if !auth_query.contains("$1") {
        e.push("proxy.auth.auth_query", "must take the user name as $1");
    }
    AuthConfig {
        method,
        rules,
        auth_user,
        auth_query,
    }
}
