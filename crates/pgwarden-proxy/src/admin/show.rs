//! `SHOW ...` on the admin console.

use std::time::SystemTime;

use pgwarden_config::Config;

use super::Reply;
use crate::registry::{unix_micros, ClientState, ServerState};
use crate::Shared;

/// Averages in `SHOW STATS` cover this many seconds.
pub const STATS_PERIOD_SECS: u64 = 15;

const TEXT: u32 = 25;
const INT8: u32 = 20;

/// A result set: columns (name, type OID) and rows of text values.
pub struct Table {
    pub columns: Vec<(&'static str, u32)>,
    pub rows: Vec<Vec<Option<String>>>,
    pub notices: Vec<String>,
}

impl Table {
    fn new(columns: &[(&'static str, u32)]) -> Table {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
            notices: Vec::new(),
        }
    }

    fn push(&mut self, row: Vec<Option<String>>) {
        debug_assert_eq!(row.len(), self.columns.len());
        self.rows.push(row);
    }
}

fn s(v: impl ToString) -> Option<String> {
    Some(v.to_string())
}

/// `2026-01-01 12:00:00 UTC`, as PgBouncer shows times.
fn time(t: SystemTime) -> Option<String> {
    let iso = humantime::format_rfc3339_seconds(t).to_string();
    Some(format!(
        "{} UTC",
        iso.trim_end_matches('Z').replace('T', " ")
    ))
}

fn time_us(us: u64) -> Option<String> {
    time(SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(us))
}

/// `None` for an unknown item.
pub fn show(what: &str, shared: &Shared) -> Option<Reply> {
    let table = match what {
        "help" => return Some(help()),
        "pools" => pools(shared),
        "clients" => clients(shared),
        "servers" => servers(shared),
        "stats" => stats(shared),
        "nodes" => nodes(shared),
        "routes" => routes(shared),
        "leader" => leader(shared),
        "config" => config(&shared.config()),
        "version" => {
            let mut t = Table::new(&[("version", TEXT)]);
            t.push(vec![s(format!("pgwarden {}", env!("CARGO_PKG_VERSION")))]);
            t
        }
        _ => return None,
    };
    Some(Reply::Table(table))
}

fn help() -> Reply {
    Reply::Done {
        tag: "SHOW",
        notices: vec![[
            "Console usage",
            "\tSHOW HELP|POOLS|CLIENTS|SERVERS|STATS|NODES|ROUTES|LEADER|CONFIG|VERSION",
            "\tRELOAD",
            "\tPAUSE [<db>]",
            "\tRESUME [<db>]",
            "\tKILL <db>",
            "\tSHUTDOWN",
        ]
        .join("\n")],
    }
}

fn pools(shared: &Shared) -> Table {
    let mut t = Table::new(&[
        ("database", TEXT),
        ("user", TEXT),
        ("cl_active", INT8),
        ("cl_waiting", INT8),
        ("sv_active", INT8),
        ("sv_idle", INT8),
        ("sv_used", INT8),
        ("sv_tested", INT8),
        ("sv_login", INT8),
        ("maxwait", INT8),
        ("maxwait_us", INT8),
        ("pool_mode", TEXT),
        ("pool_size", INT8),
        ("paused", TEXT),
        ("node", TEXT),
    ]);
    let clients = shared.clients.all();
    let now = unix_micros(SystemTime::now());
    let mode = shared.config().proxy.pool_mode;
    let leader = shared.topology.routing().view.leader.clone();
    for p in shared.pools() {
        // Clients holding a server count on that server's node; the others on the leader's.
        let held: std::collections::HashSet<u64> = p.servers.all().iter().map(|sv| sv.id).collect();
        let mine = clients.iter().filter(|c| {
            let server = c.server.load(std::sync::atomic::Ordering::Relaxed);
            c.database == p.key.database
                && c.user == p.key.user
                && if server != 0 {
                    held.contains(&server)
                } else {
                    leader.as_ref() == Some(&p.key.node)
                }
        });
        let (mut active, mut waiting, mut maxwait) = (0, 0, 0u64);
        for c in mine {
            match c.state() {
                ClientState::Waiting => {
                    waiting += 1;
                    maxwait = maxwait.max(now.saturating_sub(c.request_us()));
                }
                _ => active += 1,
            }
        }
        t.push(vec![
            s(&p.key.database),
            s(&p.key.user),
            s(active),
            s(waiting),
            s(p.active_count()),
            s(p.idle_count()),
            s(0),
            s(0),
            s(p.warming()),
            s(maxwait / 1_000_000),
            s(maxwait % 1_000_000),
            s(mode),
            s(p.size()),
            s(if p.is_paused() { "yes" } else { "no" }),
            s(&p.key.node),
        ]);
    }
    t
}

/// `SHOW CLIENTS` and `SHOW SERVERS` share PgBouncer's columns.
const CONNECTION_COLUMNS: &[(&str, u32)] = &[
    ("type", TEXT),
    ("user", TEXT),
    ("database", TEXT),
    ("state", TEXT),
    ("addr", TEXT),
    ("port", INT8),
    ("local_addr", TEXT),
    ("local_port", INT8),
    ("connect_time", TEXT),
    ("request_time", TEXT),
    ("wait", INT8),
    ("wait_us", INT8),
    ("close_needed", INT8),
    ("ptr", TEXT),
    ("link", TEXT),
    ("remote_pid", INT8),
    ("tls", TEXT),
    ("application_name", TEXT),
];

fn clients(shared: &Shared) -> Table {
    let mut t = Table::new(CONNECTION_COLUMNS);
    let now = unix_micros(SystemTime::now());
    for c in shared.clients.all() {
        let waited = match c.state() {
            ClientState::Waiting => now.saturating_sub(c.request_us()),
            _ => 0,
        };
        let link = c.server.load(std::sync::atomic::Ordering::Relaxed);
        t.push(vec![
            s("C"),
            s(&c.user),
            s(&c.database),
            s(match c.state() {
                ClientState::Waiting => "waiting",
                _ => "active",
            }),
            s(c.addr.ip()),
            s(c.addr.port()),
            c.local.map(|a| a.ip().to_string()),
            c.local.map(|a| a.port().to_string()),
            time(c.connected),
            time_us(c.request_us()),
            s(waited / 1_000_000),
            s(waited % 1_000_000),
            s(i32::from(c.kill.reason().is_some())),
            s(format!("c{}", c.id)),
            (link != 0).then(|| format!("s{link}")),
            s(0),
            s(if c.tls { "TLS" } else { "" }),
            s(&c.application_name),
        ]);
    }
    t
}

fn servers(shared: &Shared) -> Table {
    let mut t = Table::new(CONNECTION_COLUMNS);
    for p in shared.pools() {
        for sv in p.servers.all() {
            let link = sv.client.load(std::sync::atomic::Ordering::Relaxed);
            let (host, port) = sv.addr.rsplit_once(':').unwrap_or((&sv.addr, ""));
            t.push(vec![
                s("S"),
                s(&p.key.user),
                s(&p.key.database),
                s(match sv.state() {
                    ServerState::Active => "active",
                    ServerState::Idle => "idle",
                }),
                s(host.trim_matches(['[', ']'])),
                s(port),
                sv.local.map(|a| a.ip().to_string()),
                sv.local.map(|a| a.port().to_string()),
                time(sv.connected),
                time_us(sv.request_us.load(std::sync::atomic::Ordering::Relaxed)),
                s(0),
                s(0),
                s(i32::from(
                    sv.close_needed.load(std::sync::atomic::Ordering::Relaxed),
                )),
                s(format!("s{}", sv.id)),
                (link != 0).then(|| format!("c{link}")),
                s(sv.pid),
                s(""),
                s("pgwarden"),
            ]);
        }
    }
    t
}

fn stats(shared: &Shared) -> Table {
    let mut t = Table::new(&[
        ("database", TEXT),
        ("user", TEXT),
        ("total_xact_count", INT8),
        ("total_query_count", INT8),
        ("total_received", INT8),
        ("total_sent", INT8),
        ("total_xact_time", INT8),
        ("total_query_time", INT8),
        ("total_wait_time", INT8),
        ("total_wait_timeouts", INT8),
        ("avg_xact_count", INT8),
        ("avg_query_count", INT8),
        ("avg_recv", INT8),
        ("avg_sent", INT8),
        ("avg_xact_time", INT8),
        ("avg_query_time", INT8),
        ("avg_wait_time", INT8),
    ]);
    for p in shared.pools() {
        let now = p.stats.sample();
        let (prev, last) = p.samples();
        let secs = last.at.duration_since(prev.at).as_secs_f64();
        let per_sec = |a: u64, b: u64| {
            if secs > 0.0 {
                ((b - a) as f64 / secs) as u64
            } else {
                0
            }
        };
        let per = |a: u64, b: u64, n: u64| (b - a).checked_div(n).unwrap_or(0);
        let xacts = last.transactions - prev.transactions;
        let queries = last.queries - prev.queries;
        let checkouts = last.checkouts - prev.checkouts;
        t.push(vec![
            s(&p.key.database),
            s(&p.key.user),
            s(now.transactions),
            s(now.queries),
            s(now.bytes_received),
            s(now.bytes_sent),
            s(now.xact_micros),
            s(now.query_micros),
            s(now.wait_micros),
            s(p.stats
                .wait_timeouts
                .load(std::sync::atomic::Ordering::Relaxed)),
            s(per_sec(prev.transactions, last.transactions)),
            s(per_sec(prev.queries, last.queries)),
            s(per_sec(prev.bytes_received, last.bytes_received)),
            s(per_sec(prev.bytes_sent, last.bytes_sent)),
            s(per(prev.xact_micros, last.xact_micros, xacts)),
            s(per(prev.query_micros, last.query_micros, queries)),
            s(per(prev.wait_micros, last.wait_micros, checkouts)),
        ]);
    }
    t.notices.push(format!(
        "averages are over the last {STATS_PERIOD_SECS} s; times in microseconds"
    ));
    t
}

fn nodes(shared: &Shared) -> Table {
    let mut t = Table::new(&[
        ("name", TEXT),
        ("host", TEXT),
        ("port", INT8),
        ("role", TEXT),
        ("timeline", INT8),
        ("lsn", TEXT),
        ("replay_lag_bytes", INT8),
        ("epoch", INT8),
        ("writes", TEXT),
        ("reads", TEXT),
        ("banned_until", TEXT),
        ("failures", INT8),
        ("replayed_lsn", TEXT),
        ("in_flight", INT8),
        ("latency_us", INT8),
        ("routed_reads", INT8),
        ("routed_writes", INT8),
        ("probes", INT8),
        ("agent_reason", TEXT),
        ("agent_reason_code", TEXT),
    ]);
    let routing = shared.topology.routing();
    let view = shared.topology.view();
    let config = shared.config();
    shared.nodes.observe(&view, &config.proxy.routing);
    let pools = shared.pools();
    let now = std::time::Instant::now();
    for n in &view.nodes {
        let leads = crate::router::still_leads(&routing, &n.id, view.epoch);
        let state = shared.nodes.get(&n.id);
        let health = state.health();
        let mine: Vec<_> = pools.iter().filter(|p| p.key.node == n.id).collect();
        let in_flight: usize = mine.iter().map(|p| p.active_count()).sum();
        let measured: Vec<u64> = mine
            .iter()
            .map(|p| p.latency_us())
            .filter(|l| *l > 0)
            .collect();
        let latency =
            (!measured.is_empty()).then(|| measured.iter().sum::<u64>() / measured.len() as u64);
        let reads = match n.role {
            pgwarden_cluster::status::Role::Replica => match state.out(now) {
                None => "in rotation".to_string(),
                Some(crate::router::Out::Banned) => "banned".to_string(),
                Some(crate::router::Out::Lagging) => match (state.lag(), n.replay_lag_seconds) {
                    (Some(l), Some(s)) => {
                        format!("out: lag {} ({s:.1} s)", pgwarden_core::ByteSize(l))
                    }
                    (Some(l), None) => format!("out: lag {}", pgwarden_core::ByteSize(l)),
                    (None, _) => "out: lag unknown".to_string(),
                },
            },
            pgwarden_cluster::status::Role::Primary if leads => {
                match config.proxy.routing.primary_reads {
                    pgwarden_config::PrimaryReads::Never => "never".to_string(),
                    pgwarden_config::PrimaryReads::Fallback => "fallback".to_string(),
                    pgwarden_config::PrimaryReads::Always => "always".to_string(),
                }
            }
            _ => "no".to_string(),
        };
        let banned_until = health.banned_until.filter(|t| *t > now).map(|t| {
            let left = t - now;
            format!("in {}", pgwarden_core::format_duration(left))
        });
        let ld = std::sync::atomic::Ordering::Relaxed;
        t.push(vec![
            s(&n.id),
            s(&n.host),
            s(n.port),
            s(match n.role {
                pgwarden_cluster::status::Role::Primary => "primary",
                pgwarden_cluster::status::Role::Replica => "replica",
                pgwarden_cluster::status::Role::Down => "down",
            }),
            n.timeline.map(|x| x.to_string()),
            n.lsn.map(|x| x.to_string()),
            n.replay_lag_bytes.map(|x| x.to_string()),
            s(view.epoch),
            s(if leads { "yes" } else { "no" }),
            s(reads),
            banned_until,
            s(state.failures.load(ld)),
            (state.replayed().0 > 0).then(|| state.replayed().to_string()),
            s(in_flight),
            latency.map(|l| l.to_string()),
            s(state.reads.load(ld)),
            s(state.writes.load(ld)),
            s(state.probes.load(ld)),
            n.reason.clone(),
            n.reason_code.clone(),
        ]);
    }
    if let crate::router::Route::Unavailable(why) =
        crate::router::route(&routing, crate::router::Request::WRITE)
    {
        t.notices
            .push(format!("writes are not routed anywhere: {why}"));
    }
    for why in &view.refused {
        t.notices.push(format!("primary not followed: {why}"));
    }
    t
}

/// What the router decided, by kind and reason: one row per (decision, reason).
fn routes(shared: &Shared) -> Table {
    let mut t = Table::new(&[("decision", TEXT), ("reason", TEXT), ("count", INT8)]);
    let r = &shared.nodes.routes;
    let ld = std::sync::atomic::Ordering::Relaxed;
    let mut row = |d: &str, why: &str, n: u64| t.push(vec![s(d), s(why), s(n)]);
    row("read", "classified a read", r.reads.load(ld));
    row(
        "read",
        "a read-only transaction",
        r.read_only_transactions.load(ld),
    );
    for (why, n) in r.write_reasons() {
        row("primary", why, n);
    }
    for (why, n) in shared.nodes.primary_reads() {
        row("read on the primary", why.as_str(), n);
    }
    row(
        "held",
        "a write pipelined behind reads on a replica",
        r.held_writes.load(ld),
    );
    row(
        "replayed",
        "reads sent again after their replica was lost",
        r.replayed_reads.load(ld),
    );
    row(
        "probe",
        "session reads that asked a replica for its position",
        r.floor_probes.load(ld),
    );
    row(
        "lookup",
        "function names looked up in the catalog",
        r.function_lookups.load(ld),
    );
    let cached: usize = shared
        .pools()
        .iter()
        .map(|p| p.common.functions.len())
        .max()
        .unwrap_or(0);
    row(
        "cache",
        "function names known (largest pool group)",
        cached as u64,
    );
    let g = pgwarden_sql::grammar::stats();
    row(
        "grammar",
        "queries parsed by PostgreSQL's grammar",
        g.parses,
    );
    row("grammar", "of which reads after all", g.reads);
    row("grammar", "of which unparsable", g.unparsable);
    row("grammar", "answers from the grammar's cache", g.cache_hits);
    t
}

/// Where writes go now, and why nowhere when they go nowhere: one row, then a row per primary
/// that is not followed (`pgwarden status` reads it).
fn leader(shared: &Shared) -> Table {
    let mut t = Table::new(&[
        ("leader", TEXT),
        ("epoch", INT8),
        ("view_age_ms", INT8),
        ("writes", TEXT),
        ("reason", TEXT),
    ]);
    let routing = shared.topology.routing();
    let view = shared.topology.view();
    let (writes, reason) = match crate::router::route(&routing, crate::router::Request::WRITE) {
        crate::router::Route::Node(..) => ("routed", None),
        crate::router::Route::Unavailable(why) => ("refused", Some(why.to_string())),
    };
    t.push(vec![
        routing.view.leader.as_ref().map(|l| l.to_string()),
        s(routing.view.epoch),
        s(view.checked_at.elapsed().as_millis()),
        s(writes),
        reason,
    ]);
    for why in &view.refused {
        t.push(vec![None, None, None, s("not followed"), s(why)]);
    }
    t
}

fn config(c: &Config) -> Table {
    let mut t = Table::new(&[("key", TEXT), ("value", TEXT), ("changeable", TEXT)]);
    let p = &c.proxy;
    let d = |x: std::time::Duration| pgwarden_core::format_duration(x);
    let rows: Vec<(&str, String, bool)> = vec![
        ("listen", p.listen.to_string(), false),
        ("workers", p.workers.to_string(), false),
        ("pool_mode", p.pool_mode.to_string(), false),
        ("default_pool_size", p.default_pool_size.to_string(), true),
        ("min_pool_size", p.min_pool_size.to_string(), true),
        ("max_client_conn", p.max_client_conn.to_string(), true),
        (
            "max_pending_logins",
            p.max_pending_logins.to_string(),
            false,
        ),
        ("login_timeout", d(p.login_timeout), true),
        ("server_connect_timeout", d(p.server_connect_timeout), true),
        ("query_wait_timeout", d(p.query_wait_timeout), true),
        ("server_idle_timeout", d(p.server_idle_timeout), true),
        ("server_lifetime", d(p.server_lifetime), true),
        (
            "idle_transaction_timeout",
            p.idle_transaction_timeout.map_or("0s".into(), d),
            true,
        ),
        (
            "query_timeout",
            p.query_timeout.map_or("0s".into(), d),
            true,
        ),
        ("shutdown_timeout", d(p.shutdown_timeout), true),
        (
            "max_prepared_statements",
            p.max_prepared_statements.to_string(),
            false,
        ),
        ("admin_users", p.admin_users.join(","), true),
        (
            "client_tls.mode",
            format!("{:?}", p.client_tls.mode).to_lowercase(),
            false,
        ),
        (
            "auth.method",
            format!("{:?}", p.auth.method).to_lowercase(),
            true,
        ),
        ("auth.rules", p.auth.rules.len().to_string(), true),
        (
            "users",
            c.users
                .iter()
                .map(|u| u.name.as_str())
                .collect::<Vec<_>>()
                .join(","),
            true,
        ),
        ("max_view_age", d(p.max_view_age), false),
        ("monitor.interval", d(c.monitor.interval), false),
        (
            "monitor.follow_promotions",
            c.monitor.follow_promotions.to_string(),
            false,
        ),
    ];
    for (k, v, changeable) in rows {
        t.push(vec![s(k), s(v), s(if changeable { "yes" } else { "no" })]);
    }
    t
}
