//! `[agent]` and `[dcs]`: the HA agents' rules and their consensus store.

use std::path::Path;
use std::time::Duration;

use pgwarden_core::{format_duration, ByteSize};

use crate::file::{FileAgent, FileAgentApi, FileDcs};
use crate::model::*;
use crate::validate::{password, resolve, Errors};

pub(crate) fn agent(e: &mut Errors, f: FileAgent, base: &Path) -> AgentConfig {
    let d = AgentConfig::default();
    let positive = |e: &mut Errors, key: &str, field, default: Duration| {
        let path = format!("agent.{key}");
        let v = e.duration(&path, field, default);
        if v.is_zero() {
            e.push(&path, "must be greater than 0");
            return default;
        }
        v
    };
    let ttl = positive(e, "ttl", f.ttl, d.ttl);
    let loop_wait = positive(e, "loop_wait", f.loop_wait, d.loop_wait);
    let retry_timeout = positive(e, "retry_timeout", f.retry_timeout, d.retry_timeout);
    let fence_margin = positive(e, "fence_margin", f.fence_margin, d.fence_margin);
    let primary_restart_timeout = e.duration(
        "agent.primary_restart_timeout",
        f.primary_restart_timeout,
        d.primary_restart_timeout,
    );
    let needed = loop_wait + retry_timeout * 2 + fence_margin;
    if needed > ttl {
        e.push(
            "agent.ttl",
            format!(
                "({}) must be at least loop_wait + 2 * retry_timeout + fence_margin ({}): the leader must be able to renew twice and still fence itself before its lease runs out",
                format_duration(ttl),
                format_duration(needed)
            ),
        );
    }
    let on_postgres_crash = choice(
        e,
        "agent.on_postgres_crash",
        f.on_postgres_crash,
        &[
            ("restart", OnPostgresCrash::Restart),
            ("failover", OnPostgresCrash::Failover),
        ],
        d.on_postgres_crash,
    );
    let maximum_lag_on_failover =
        match e.get("agent.maximum_lag_on_failover", f.maximum_lag_on_failover) {
            None => d.maximum_lag_on_failover,
            Some(s) if s == "off" || s == "unlimited" => None,
            Some(s) => match s.parse::<ByteSize>() {
                Ok(v) => Some(v),
                Err(err) => {
                    e.push(
                        "agent.maximum_lag_on_failover",
                        format!("{err} (or \"unlimited\")"),
                    );
                    d.maximum_lag_on_failover
                }
            },
        };
    let synchronous_mode = choice(
        e,
        "agent.synchronous_mode",
        f.synchronous_mode,
        &[
            ("off", SynchronousMode::Off),
            ("on", SynchronousMode::On),
            ("strict", SynchronousMode::Strict),
        ],
        d.synchronous_mode,
    );
    let rejoin = choice(
        e,
        "agent.rejoin",
        f.rejoin,
        &[
            ("rewind", RejoinMode::Rewind),
            ("clone", RejoinMode::Clone),
            ("manual", RejoinMode::Manual),
        ],
        d.rejoin,
    );
    AgentConfig {
        ttl,
        loop_wait,
        retry_timeout,
        fence_margin,
        primary_restart_timeout,
        on_postgres_crash,
        maximum_lag_on_failover,
        synchronous_mode,
        rejoin,
        failsafe: e.get("agent.failsafe", f.failsafe).unwrap_or(d.failsafe),
        api: agent_api(e, f.api, base),
    }
}

fn agent_api(e: &mut Errors, f: FileAgentApi, base: &Path) -> AgentApiConfig {
    let username = e.get("agent.api.username", f.username);
    let password = password(e, "agent.api.password", f.password, f.password_file, base);
    let auth_reads = e.get("agent.api.auth_reads", f.auth_reads).unwrap_or(false);
    let credentials = match (username, password) {
        (Some(u), Some(p)) if !u.is_empty() && !u.contains(':') => Some((u, p)),
        (Some(_), Some(_)) => {
            e.push("agent.api.username", "must be non-empty and contain no ':'");
            None
        }
        (Some(_), None) => {
            e.push(
                "agent.api.password",
                "is required with agent.api.username (or agent.api.password_file)",
            );
            None
        }
        (None, Some(_)) => {
            e.push("agent.api.username", "is required with agent.api.password");
            None
        }
        (None, None) => None,
    };
    if auth_reads
        && credentials.is_none()
        && !e.list.iter().any(|x| x.path.starts_with("agent.api."))
    {
        e.push(
            "agent.api.auth_reads",
            "needs agent.api.username and agent.api.password",
        );
    }
    AgentApiConfig {
        credentials,
        auth_reads,
    }
}

fn choice<T: Copy>(
    e: &mut Errors,
    path: &str,
    field: Option<crate::file::Field<String>>,
    options: &[(&str, T)],
    default: T,
) -> T {
    let Some(s) = e.get(path, field) else {
        return default;
    };
    if let Some((_, v)) = options.iter().find(|(name, _)| *name == s) {
        return *v;
    }
    let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
    e.push(
        path,
        format!("unknown value \"{s}\": expected {}", names.join(", ")),
    );
    default
}

pub(crate) fn dcs(e: &mut Errors, f: FileDcs, base: &Path, agent: &AgentConfig) -> DcsConfig {
    let endpoints = e.required("dcs.endpoints", f.endpoints).unwrap_or_default();
    if endpoints.is_empty() && !e.list.iter().any(|x| x.path == "dcs.endpoints") {
        e.push("dcs.endpoints", "must name at least one etcd endpoint");
    }
    for (i, ep) in endpoints.iter().enumerate() {
        let hostport = ep
            .strip_prefix("http://")
            .or_else(|| ep.strip_prefix("https://"))
            .unwrap_or(ep);
        let port_ok = hostport
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !port_ok {
            e.push(
                format!("dcs.endpoints[{i}]"),
                format!("\"{ep}\" is not host:port (optionally with http:// or https://)"),
            );
        }
    }
    let namespace = e.non_empty("dcs.namespace", f.namespace, "pgwarden");
    if namespace.contains('/') {
        e.push("dcs.namespace", "must not contain '/'");
    }
    let timeout = e.duration("dcs.timeout", f.timeout, agent.retry_timeout);
    if timeout.is_zero() {
        e.push("dcs.timeout", "must be greater than 0");
    }
    let start_wait = e.duration("dcs.start_wait", f.start_wait, Duration::from_secs(60));
    let username = e.get("dcs.username", f.username);
    let password = password(e, "dcs.password", f.password, f.password_file, base);
    if username.is_some() != password.is_some()
        && !e.list.iter().any(|x| x.path.starts_with("dcs.password"))
    {
        e.push(
            "dcs.username",
            "dcs.username and dcs.password must be given together",
        );
    }
    let mut file = |key: &str, field| {
        let path = format!("dcs.{key}");
        e.get(&path, field).map(|s: String| {
            let p = resolve(base, &s);
            if !p.is_file() {
                e.push(&path, format!("{} does not exist", p.display()));
            }
            p
        })
    };
    let ca_file = file("ca_file", f.ca_file);
    let cert_file = file("cert_file", f.cert_file);
    let key_file = file("key_file", f.key_file);
    if cert_file.is_some() != key_file.is_some() {
        e.push(
            "dcs.cert_file",
            "dcs.cert_file and dcs.key_file must be given together",
        );
    }
    DcsConfig {
        endpoints,
        namespace,
        timeout,
        start_wait,
        username,
        password,
        ca_file,
        cert_file,
        key_file,
    }
}
