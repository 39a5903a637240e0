use std::path::Path;
use std::time::Duration;

use pgwarden_config::{Config, ConfigError, ReplicationMode};

const GOOD: &str = r#"
cluster = "main"
[postgres]
os_user = "postgres"
superuser = "postgres"
superuser_password = "s3cret"
replication_user = "replicator"
replication_password = "r3pl"
parameters = { shared_buffers = "128MB", max_connections = 200, fsync = true }
[replication]
mode = "quorum"
sync_count = 1
[monitor]
interval = "500ms"
lag_medium = "1MB"
lag_high = "16MB"
[[nodes]]
name = "n1"
host = "127.0.0.1"
port = 55432
data_dir = "data/n1"
[[nodes]]
name = "n2"
host = "127.0.0.1"
port = 55433
data_dir = "/abs/n2"
"#;

fn errors(text: &str) -> Vec<String> {
    match Config::from_toml(text, Path::new("/etc/pgwarden")) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e.lines(),
    }
}

#[test]
fn a_good_file_validates_into_typed_values() {
    let c = Config::from_toml(GOOD, Path::new("/etc/pgwarden")).expect("valid");
    assert_eq!(c.cluster, "main");
    assert_eq!(c.replication.mode, ReplicationMode::Quorum);
    assert_eq!(c.monitor.interval, Duration::from_millis(500));
    assert_eq!(c.monitor.lag_high.bytes(), 16 << 20);
    assert_eq!(
        c.nodes[0].data_dir.as_deref(),
        Some(Path::new("/etc/pgwarden/data/n1"))
    );
    assert_eq!(c.nodes[1].data_dir.as_deref(), Some(Path::new("/abs/n2")));
    assert_eq!(c.postgres.parameters["max_connections"], "200");
    assert_eq!(c.postgres.parameters["fsync"], "on");
    assert_eq!(c.postgres.superuser_password.expose(), "s3cret");
    assert!(
        !format!("{c:?}").contains("s3cret"),
        "passwords must not appear in Debug output"
    );
}

#[test]
fn several_mistakes_are_all_reported_with_their_paths() {
    let text = r#"
cluster = "main"
colour = "blue"
[postgres]
superuser_password = "x"
replication_password = "y"
parameters = { port = 5 }
[replication]
mode = "eventually"
sync_count = 0
[monitor]
interval = "10"
lag_medium = "huge"
lag_hgih = "1GB"
[[nodes]]
name = "n1"
port = 70000
[[nodes]]
name = "N-2"
port = "5433"
"#;
    let errs = errors(text);
    let expect = [
        "colour: unknown key",
        "monitor.lag_hgih: unknown key",
        "postgres.parameters.port: is set by pgwarden",
        "replication.mode: unknown replication mode \"eventually\"",
        "replication.sync_count: must be >= 1",
        "monitor.interval: invalid duration \"10\"",
        "monitor.lag_medium: invalid size \"huge\"",
        "nodes[0].port: 70000 is not a valid port",
        "nodes[1].name: \"N-2\" is not a valid node name",
        "nodes[1].port: invalid type: string \"5433\", expected i64",
    ];
    for want in expect {
        assert!(
            errs.iter().any(|e| e.starts_with(want)),
            "missing error starting with {want:?} in:\n{}",
            errs.join("\n")
        );
    }
    assert_eq!(
        errs.len(),
        expect.len(),
        "unexpected extra errors:\n{}",
        errs.join("\n")
    );
}

#[test]
fn missing_required_fields_and_conflicts() {
    let errs = errors(
        r#"
[postgres]
superuser_password = "a"
superuser_password_file = "/nonexistent"
[[nodes]]
host = "h"
"#,
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("postgres.superuser_password: give either")),
        "{errs:?}"
    );
    assert!(
        errs.iter().any(|e| e == "nodes[0].name: is required"),
        "{errs:?}"
    );
    assert!(
        errs.iter().any(|e| e == "nodes[0].port: is required"),
        "{errs:?}"
    );

    let errs = errors("[[nodes]]\nname = \"n1\"\nport = 5432\n");
    assert!(
        errs.iter()
            .any(|e| e.starts_with("postgres.superuser_password: is required")),
        "{errs:?}"
    );

    let errs = errors("[postgres]\nsuperuser_password = \"x\"\n");
    assert!(
        errs.iter().any(|e| e.starts_with("nodes: at least one")),
        "{errs:?}"
    );
}

#[test]
fn duplicates_thresholds_and_sync_count_are_checked() {
    let errs = errors(
        r#"
[postgres]
superuser_password = "x"
replication_password = "y"
[replication]
mode = "sync"
sync_count = 2
[monitor]
lag_medium = "100MB"
lag_high = "10MB"
[[nodes]]
name = "n1"
port = 5432
data_dir = "/d1"
[[nodes]]
name = "n1"
port = 5432
data_dir = "/d2"
"#,
    );
    for want in [
        "nodes[1].name: duplicate node name \"n1\"",
        "nodes[1].port: 127.0.0.1:5432 is already used",
        "replication.sync_count: is 2 but the cluster has only 1 standby",
        "monitor.lag_high: (10.0 MiB) must be greater than monitor.lag_medium (100.0 MiB)",
    ] {
        assert!(
            errs.iter().any(|e| e.starts_with(want)),
            "missing {want:?} in {errs:?}"
        );
    }
}

#[test]
fn password_files_are_read_relative_to_the_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("su.pw"), "from-file\n").expect("write");
    let text =
        "[postgres]\nsuperuser_password_file = \"su.pw\"\n[[nodes]]\nname = \"n1\"\nport = 5432\n";
    let c = Config::from_toml(text, dir.path()).expect("valid");
    assert_eq!(c.postgres.superuser_password.expose(), "from-file");
}

#[test]
fn a_missing_bin_dir_is_reported() {
    let errs = errors(
        "[postgres]\nbin_dir = \"/nonexistent/bin\"\nsuperuser_password = \"x\"\n[[nodes]]\nname = \"n1\"\nport = 5432\n",
    );
    assert_eq!(
        errs,
        vec!["postgres.bin_dir: /nonexistent/bin does not contain the postgres binary".to_string()]
    );
}

#[test]
fn toml_syntax_errors_name_the_line() {
    let err = Config::from_toml("cluster = \"main\"\n[nodes\n", Path::new("/")).unwrap_err();
    assert!(matches!(err, ConfigError::Syntax(_)));
    let line = err.to_string();
    assert!(line.starts_with("TOML error at line 2"), "{line}");
    assert!(!line.contains('\n'));
}

const NODE: &str =
    "[postgres]\nsuperuser_password = \"x\"\n[[nodes]]\nname = \"n1\"\nport = 5432\n";

#[test]
fn proxy_defaults_when_absent() {
    let c = Config::from_toml(NODE, Path::new("/")).expect("valid");
    let p = &c.proxy;
    assert_eq!(p.listen.to_string(), "127.0.0.1:6432");
    assert_eq!(p.pool_mode, pgwarden_config::PoolMode::Transaction);
    assert_eq!(
        (p.default_pool_size, p.min_pool_size, p.max_client_conn),
        (20, 0, 1000)
    );
    assert_eq!(p.query_wait_timeout, Duration::from_secs(30));
    assert_eq!(p.idle_transaction_timeout, None);
    assert_eq!(p.max_prepared_statements, 200);
    assert_eq!(p.client_tls.mode, pgwarden_config::TlsMode::Disable);
    assert_eq!(p.auth.method, pgwarden_config::AuthMethod::ScramSha256);
    assert_eq!(
        p.auth.auth_query,
        "SELECT usename, passwd FROM pg_shadow WHERE usename = $1"
    );
}

#[test]
fn the_proxy_section_from_the_docs_validates() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("cert.pem"), "x").expect("write");
    std::fs::write(dir.path().join("key.pem"), "x").expect("write");
    let text = format!(
        r#"{NODE}
[proxy]
listen = "0.0.0.0:7432"
workers = 2
pool_mode = "session"
default_pool_size = 10
min_pool_size = 2
max_client_conn = 500
server_connect_timeout = "1s"
query_wait_timeout = "5s"
server_idle_timeout = "1m"
server_lifetime = "30m"
idle_transaction_timeout = "10s"
max_prepared_statements = 100
admin_users = ["admin"]
[proxy.client_tls]
mode = "require"
cert = "cert.pem"
key = "key.pem"
[proxy.auth]
method = "md5"
auth_user = "pgwarden_auth"
[[proxy.users]]
name = "pgwarden_auth"
password = "a"
[[proxy.users]]
name = "app"
password = "SCRAM-SHA-256$4096:c2FsdA==$AAAA:BBBB"
pool_size = 5
"#
    );
    let c = Config::from_toml(&text, dir.path()).expect("valid");
    let p = &c.proxy;
    assert_eq!(p.listen.to_string(), "0.0.0.0:7432");
    assert_eq!(
        (p.workers, p.pool_mode),
        (2, pgwarden_config::PoolMode::Session)
    );
    assert_eq!(p.idle_transaction_timeout, Some(Duration::from_secs(10)));
    assert_eq!(
        p.client_tls.cert.as_deref(),
        Some(dir.path().join("cert.pem").as_path())
    );
    assert_eq!(p.auth.auth_user.as_deref(), Some("pgwarden_auth"));
    assert_eq!(c.users[1].pool_size, Some(5));
}

#[test]
fn proxy_mistakes_are_all_reported() {
    let text = format!(
        r#"{NODE}
[proxy]
listen = "localhost"
pool_mode = "statement"
default_pool_size = 0
min_pool_size = 50
query_wait_timeout = "0s"
admin_users = "admin"
[proxy.client_tls]
mode = "require"
cert = "/nonexistent.pem"
[proxy.auth]
method = "password"
auth_user = "ghost"
auth_query = "SELECT 1"
[[proxy.users]]
name = "app"
"#
    );
    let errs = errors(&text);
    let expect = [
        "proxy.listen: \"localhost\" is not an address:port",
        "proxy.pool_mode: unknown pool mode \"statement\"",
        "proxy.default_pool_size: 0 is out of range",
        "proxy.min_pool_size: (50) must not exceed proxy.default_pool_size",
        "proxy.query_wait_timeout: must be greater than 0",
        "proxy.admin_users: invalid type: string \"admin\", expected a sequence",
        "proxy.client_tls.cert: /nonexistent.pem does not exist",
        "proxy.client_tls.key: is required when proxy.client_tls.mode is not disable",
        "proxy.auth.method: unknown method \"password\"",
        "proxy.auth.auth_user: \"ghost\" must be listed in [[proxy.users]]",
        "proxy.auth.auth_query: must take the user name as $1",
        "proxy.users[0].password: is required",
    ];
    for want in expect {
        assert!(
            errs.iter().any(|e| e.starts_with(want)),
            "missing {want:?} in:\n{}",
            errs.join("\n")
        );
    }
    assert_eq!(
        errs.len(),
        expect.len(),
        "unexpected extra errors:\n{}",
        errs.join("\n")
    );
}

#[test]
fn auth_rules_decide_per_user_database_and_address() {
    use pgwarden_config::AuthMethod::*;
    let text = format!(
        "{GOOD}\n[proxy.auth]\nmethod = \"scram-sha-256\"\n\
         [[proxy.auth.rules]]\nuser = \"monitor\"\naddress = \"127.0.0.1/32\"\nmethod = \"trust\"\n\
         [[proxy.auth.rules]]\nuser = \"monitor\"\nmethod = \"reject\"\n\
         [[proxy.auth.rules]]\ndatabase = \"legacy\"\naddress = \"10.0.0.0/8\"\nmethod = \"md5\"\n\
         [[proxy.auth.rules]]\naddress = \"::1\"\nmethod = \"trust\"\n"
    );
    let c = Config::from_toml(&text, Path::new("/etc/pgwarden")).expect("valid");
    let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
    let auth = &c.proxy.auth;
    let cases = [
        ("monitor", "app", "127.0.0.1", Some(Trust)),
        // An IPv4 client seen on an IPv6 socket is the same client.
        ("monitor", "app", "::ffff:127.0.0.1", Some(Trust)),
        ("monitor", "app", "192.168.1.5", None),
        ("app", "legacy", "10.1.2.3", Some(Md5)),
        ("app", "legacy", "11.1.2.3", Some(ScramSha256)),
        ("app", "app", "::1", Some(Trust)),
        ("app", "app", "127.0.0.1", Some(ScramSha256)),
    ];
    for (user, db, from, want) in cases {
        assert_eq!(
            auth.method_for(user, db, ip(from)),
            want,
            "{user} {db} {from}"
        );
    }
}

#[test]
fn bad_auth_rules_are_reported_with_their_paths() {
    let text = format!(
        "{GOOD}\n[[proxy.auth.rules]]\naddress = \"300.0.0.1/8\"\nmethod = \"trust\"\n\
         [[proxy.auth.rules]]\nuser = \"x\"\n\
         [[proxy.auth.rules]]\naddress = \"10.0.0.0/33\"\nmethod = \"password\"\n\
         [proxy.auth]\nmethod = \"reject\"\n"
    );
    let got = errors(&text);
    for want in [
        "proxy.auth.rules[0].address",
        "proxy.auth.rules[1].method: is required",
        "proxy.auth.rules[2].address",
        "proxy.auth.rules[2].method: unknown method \"password\"",
        "proxy.auth.method: unknown method \"reject\"",
    ] {
        assert!(got.iter().any(|l| l.starts_with(want)), "{want}: {got:?}");
    }
}

#[test]
fn agent_and_dcs_sections_validate() {
    let c = Config::from_toml(GOOD, Path::new("/etc/pgwarden")).expect("valid");
    assert!(c.dcs.is_none(), "no [dcs]: no HA store");
    assert_eq!(c.agent.ttl, Duration::from_secs(7));
    assert_eq!(c.nodes[0].priority, 1);
    let text = format!(
        "{GOOD}api = \"127.0.0.1:8009\"\npriority = 5\nnofailover = true\nnosync = true\n\
         [agent]\nttl = \"10s\"\nloop_wait = \"2s\"\nsynchronous_mode = \"strict\"\nrejoin = \"clone\"\n\
         maximum_lag_on_failover = \"unlimited\"\non_postgres_crash = \"failover\"\n\
         [agent.api]\nusername = \"ops\"\npassword = \"s3cret\"\nauth_reads = true\n\
         [dcs]\nendpoints = [\"127.0.0.1:2379\", \"http://10.0.0.2:2379\"]\nnamespace = \"prod\"\n"
    );
    let c = Config::from_toml(&text, Path::new("/etc/pgwarden")).expect("valid");
    let n2 = &c.nodes[1];
    assert_eq!(n2.api, Some("127.0.0.1:8009".parse().expect("addr")));
    assert_eq!((n2.priority, n2.nofailover, n2.nosync), (5, true, true));
    assert_eq!(c.agent.ttl, Duration::from_secs(10));
    assert_eq!(
        c.agent.synchronous_mode,
        pgwarden_config::SynchronousMode::Strict
    );
    assert_eq!(c.agent.rejoin, pgwarden_config::RejoinMode::Clone);
    assert_eq!(c.agent.maximum_lag_on_failover, None);
    let (user, password) = c.agent.api.credentials.clone().expect("credentials");
    assert_eq!((user.as_str(), password.expose()), ("ops", "s3cret"));
    assert!(c.agent.api.auth_reads);
    let dcs = c.dcs.expect("dcs");
    assert_eq!(dcs.endpoints.len(), 2);
    assert_eq!(dcs.namespace, "prod");
    assert_eq!(dcs.timeout, Duration::from_secs(1), "agent.retry_timeout");
}

#[test]
fn agent_and_dcs_mistakes_are_all_reported() {
    let text = format!(
        "{GOOD}api = \"nowhere\"\npriority = -1\n\
         [agent]\nttl = \"3s\"\nloop_wait = \"0s\"\nsynchronous_mode = \"sometimes\"\nrejoin = \"pray\"\n\
         maximum_lag_on_failover = \"lots\"\nbogus = 1\n\
         [dcs]\nendpoints = [\"etcd\"]\nnamespace = \"a/b\"\nusername = \"root\"\n"
    );
    let got = errors(&text);
    for want in [
        "nodes[1].api: \"nowhere\" is not an address",
        "nodes[1].priority: -1 must be between 0 and 1000",
        "agent.ttl: (3s) must be at least loop_wait + 2 * retry_timeout + fence_margin (5s)",
        "agent.loop_wait: must be greater than 0",
        "agent.synchronous_mode: unknown value \"sometimes\": expected off, on, strict",
        "agent.rejoin: unknown value \"pray\"",
        "agent.maximum_lag_on_failover:",
        "agent.bogus: unknown key",
        "dcs.endpoints[0]: \"etcd\" is not host:port",
        "dcs.namespace: must not contain '/'",
        "dcs.username: dcs.username and dcs.password must be given together",
    ] {
        assert!(
            got.iter().any(|l| l.starts_with(want)),
            "missing {want:?} in {got:#?}"
        );
    }
}

#[test]
fn agent_api_credentials_come_in_pairs() {
    let c = Config::from_toml(GOOD, Path::new("/etc/pgwarden")).expect("valid");
    assert_eq!(
        c.agent.api.credentials, None,
        "none: mutating calls are refused"
    );
    assert!(!c.agent.api.auth_reads);
    for (section, want) in [
        (
            "username = \"ops\"",
            "agent.api.password: is required with agent.api.username",
        ),
        (
            "password = \"x\"",
            "agent.api.username: is required with agent.api.password",
        ),
        (
            "username = \"a:b\"\npassword = \"x\"",
            "agent.api.username: must be non-empty and contain no ':'",
        ),
        (
            "auth_reads = true",
            "agent.api.auth_reads: needs agent.api.username and agent.api.password",
        ),
        ("auth_reads = \"yes\"", "agent.api.auth_reads:"),
        (
            "password = \"x\"\npassword_file = \"/p\"\nusername = \"u\"",
            "agent.api.password: give either",
        ),
        ("token = 1", "agent.api.token: unknown key"),
    ] {
        let got = errors(&format!("{GOOD}[agent.api]\n{section}\n"));
        assert!(
            got.iter().any(|l| l.starts_with(want)),
            "{section}: missing {want:?} in {got:#?}"
        );
    }
}

#[test]
fn routing_settings_validate_with_defaults() {
    use pgwarden_config::{Balance, Consistency, PrimaryReads};
    let c = Config::from_toml(GOOD, Path::new("/etc/pgwarden")).expect("valid");
    let r = &c.proxy.routing;
    assert!(r.read_write_split);
    assert_eq!(
        r.max_replica_lag_time, None,
        "time lag is not checked unless set"
    );
    assert_eq!(r.consistency, Consistency::Session);
    assert_eq!(r.balance, Balance::Latency);
    assert_eq!(r.primary_reads, PrimaryReads::Fallback);
    assert_eq!(c.nodes[0].weight, 100);
    let text = format!(
        "{GOOD}weight = 300\n[proxy.routing]\nconsistency = \"eventual\"\nbalance = \"weighted\"\nprimary_reads = \"never\"\nmax_replica_lag = \"1MB\"\nmax_replica_lag_time = \"5s\"\nlag_hysteresis = 0.25\nread_only_functions = [\"My_Func\"]\ntransaction_routing = \"primary\"\n"
    );
    let c = Config::from_toml(&text, Path::new("/etc/pgwarden")).expect("valid");
    let r = &c.proxy.routing;
    assert_eq!(c.nodes[1].weight, 300);
    assert_eq!(r.consistency, Consistency::Eventual);
    assert_eq!(r.balance, Balance::Weighted);
    assert_eq!(r.primary_reads, PrimaryReads::Never);
    assert_eq!(r.max_replica_lag.bytes(), 1 << 20);
    assert_eq!(
        r.max_replica_lag_time,
        Some(std::time::Duration::from_secs(5))
    );
    assert_eq!(r.lag_return_percent, 25);
    assert_eq!(r.read_only_functions, vec!["my_func".to_string()]);
}

#[test]
fn routing_mistakes_are_all_reported() {
    let text = format!(
        "{GOOD}weight = -1\n[proxy.routing]\nconsistency = \"linearizable\"\nbalance = \"fastest\"\nprimary_reads = \"sometimes\"\nmax_replica_lag = \"lots\"\nmax_replica_lag_time = \"soon\"\nlag_hysteresis = 1.5\nread_only_functions = [\"s.f\"]\ntransaction_routing = \"first_statement\"\nban_after = 0\nban_time = \"10s\"\nmax_ban_time = \"1s\"\nsurprise = 1\n"
    );
    let errs = errors(&text);
    let expect = [
        "nodes[1].weight: -1 must be between 0 and 10000",
        "proxy.routing.consistency: unknown value \"linearizable\": expected one of eventual, session, strong",
        "proxy.routing.balance: unknown value \"fastest\"",
        "proxy.routing.primary_reads: unknown value \"sometimes\"",
        "proxy.routing.max_replica_lag:",
        "proxy.routing.max_replica_lag_time:",
        "proxy.routing.lag_hysteresis: 1.5 must be between 0.01 and 1",
        "proxy.routing.read_only_functions[0]: must be a function name without a schema",
        "proxy.routing.transaction_routing: \"first_statement\" is not offered",
        "proxy.routing.ban_after: 0 is out of range",
        "proxy.routing.max_ban_time: must not be shorter than proxy.routing.ban_time",
        "proxy.routing.surprise: unknown key",
    ];
    for want in expect {
        assert!(
            errs.iter().any(|e| e.starts_with(want)),
            "missing {want:?} in:\n{}",
            errs.join("\n")
        );
    }
    assert_eq!(
        errs.len(),
        expect.len(),
        "extra errors:\n{}",
        errs.join("\n")
    );
}
