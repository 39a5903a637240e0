//! Read/write splitting against a real primary and hot standbys: where statements land
//! (`inet_server_port()`), the classification table run on a standby, overrides, read-only
//! transactions, balancing, lag rotation, a replica killed under reads, and read-your-writes.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{setup, start_proxy, Setup};
use pgwarden_testkit::{eventually, Cluster};
use tokio_postgres::{Client, SimpleQueryMessage};

/// The schema the classification table's cases use (see `route_cases.txt`), in `app`.
const SCHEMA: &str = "
    CREATE TABLE t (id int PRIMARY KEY, v text);
    CREATE TABLE u (id int, t_id int);
    INSERT INTO t VALUES (1, 'a'), (2, 'b');
    INSERT INTO u VALUES (1, 1);
    CREATE SEQUENCE s;
    CREATE VIEW vw AS SELECT * FROM t;
    CREATE FUNCTION f_stable(int) RETURNS int STABLE LANGUAGE sql AS 'SELECT $1';
    CREATE FUNCTION f_immutable(int) RETURNS int IMMUTABLE LANGUAGE sql AS 'SELECT $1';
    CREATE FUNCTION f_volatile(int) RETURNS int VOLATILE LANGUAGE sql
        AS 'INSERT INTO t VALUES ($1, ''x'') RETURNING id';
    CREATE TABLE kv (k int PRIMARY KEY, v int);
    GRANT ALL ON ALL TABLES IN SCHEMA public TO app;
    GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO app;
";

async fn with_schema(s: &Setup) {
    let admin = s.cluster.client_db(0, "app").await;
    admin.batch_execute(SCHEMA).await.expect("schema");
    for i in 1..s.cluster.len() {
        s.cluster.wait_replayed(i).await;
    }
}

/// The port of the server that ran `sql` (its first column is `inet_server_port()`), by the
/// simple protocol.
async fn port(c: &Client, sql: &str) -> u16 {
    match try_port(c, sql).await {
        Ok(p) => p,
        Err(e) => panic!("{sql}: {}", pgwarden_testkit::cluster::describe(&e)),
    }
}

async fn try_port(c: &Client, sql: &str) -> Result<u16, tokio_postgres::Error> {
    let rows = c.simple_query(sql).await?;
    Ok(rows
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(|p| p.parse::<u16>().expect("a port")),
            _ => None,
        })
        .expect("a row"))
}

/// Ports of `n` runs of `SELECT inet_server_port()`, counted.
async fn spread(c: &Client, n: usize) -> HashMap<u16, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        *counts
            .entry(port(c, "SELECT inet_server_port()").await)
            .or_default() += 1;
    }
    counts
}

fn routing(extra: &str) -> String {
    format!("[proxy.routing]\n{extra}\n")
}

#[tokio::test]
async fn every_read_case_of_the_table_runs_on_a_hot_standby() {
    let s = setup(1, "").await;
    with_schema(&s).await;
    let standby = s.cluster.client_db(1, "app").await;
    let cases = include_str!("../../pgwarden-sql/tests/route_cases.txt");
    let mut failed = Vec::new();
    let mut n = 0;
    for line in cases.lines().filter(|l| l.starts_with("read\t")) {
        let sql = &line["read\t".len()..];
        n += 1;
        let upper = sql.trim_start().to_ascii_uppercase();
        let r = if sql.contains('$') && sql.contains("$1") {
            standby.prepare(sql).await.map(|_| ())
        } else if upper.starts_with("COPY") {
            match standby.copy_out(sql).await {
                Ok(stream) => {
                    use futures::StreamExt;
                    let _ = stream.collect::<Vec<_>>().await;
                    Ok(())
                }
                Err(e) => Err(e),
            }
        } else if upper.starts_with("DECLARE") {
            standby
                .batch_execute(&format!("BEGIN READ ONLY; {sql}; ROLLBACK"))
                .await
        } else {
            standby.simple_query(sql).await.map(|_| ())
        };
        if let Err(e) = r {
            failed.push(format!(
                "{sql}: {}",
                pgwarden_testkit::cluster::describe(&e)
            ));
        }
    }
    assert!(n >= 100, "{n} read cases");
    assert!(
        failed.is_empty(),
        "read cases that fail on a standby:\n{}",
        failed.join("\n")
    );
    // The stub's volatile function really writes: a standby refuses it.
    let e = standby
        .simple_query("SELECT f_volatile(100)")
        .await
        .expect_err("a write function on a standby");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
    );
}

#[tokio::test]
async fn reads_go_to_replicas_and_everything_else_to_the_primary() {
    let s = setup(
        2,
        &routing("consistency = \"eventual\"\nbalance = \"round_robin\""),
    )
    .await;
    with_schema(&s).await;
    let primary = s.cluster.port(0);
    let replicas = [s.cluster.port(1), s.cluster.port(2)];
    let c = s.app().await;
    let counts = spread(&c, 20).await;
    assert_eq!(counts.get(&replicas[0]), Some(&10), "{counts:?}");
    assert_eq!(counts.get(&replicas[1]), Some(&10), "{counts:?}");
    // The extended protocol too.
    let p: i32 = c
        .query_one("SELECT inet_server_port()", &[])
        .await
        .expect("query")
        .get(0);
    assert!(replicas.contains(&(p as u16)));
    #[rustfmt::skip]
    let on_primary = [
        "INSERT INTO t VALUES (10, 'w') RETURNING inet_server_port()",
        "SELECT inet_server_port() FROM t FOR UPDATE",
        "WITH d AS (DELETE FROM t WHERE id = 10 RETURNING 1) SELECT inet_server_port() FROM d",
        "SELECT inet_server_port(), nextval('s')",
        "SELECT inet_server_port(), f_volatile(11)",
        "/* pgwarden:primary */ SELECT inet_server_port()",
        "SELECT inet_server_port(); SELECT 1; DELETE FROM t WHERE id = 11",
    ];
    for sql in on_primary {
        assert_eq!(port(&c, sql).await, primary, "{sql}");
    }
    // Write words that are names, as PostgreSQL's grammar shows: a replica.
    let p = port(
        &c,
        "SELECT inet_server_port() AS update, 1 AS insert, 2 AS into",
    )
    .await;
    assert!(replicas.contains(&p), "labels that look like writes: {p}");
    // A function the catalog says is stable: after the first call, a replica.
    port(&c, "SELECT inet_server_port(), f_stable(1)").await;
    let p = port(&c, "SELECT inet_server_port(), f_stable(1)").await;
    assert!(replicas.contains(&p), "a stable function reads: {p}");
    // Transactions: to the primary unless read-only.
    c.batch_execute("BEGIN").await.expect("begin");
    assert_eq!(port(&c, "SELECT inet_server_port()").await, primary);
    c.batch_execute("COMMIT").await.expect("commit");
    c.batch_execute("BEGIN READ ONLY").await.expect("begin");
    let first = port(&c, "SELECT inet_server_port()").await;
    assert!(
        replicas.contains(&first),
        "a read-only transaction on a replica"
    );
    assert_eq!(
        port(&c, "SELECT inet_server_port()").await,
        first,
        "stays there"
    );
    c.batch_execute("COMMIT").await.expect("commit");
    c.batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY")
        .await
        .expect("begin");
    assert_eq!(
        port(&c, "SELECT inet_server_port()").await,
        primary,
        "serializable"
    );
    c.batch_execute("COMMIT").await.expect("commit");
    c.batch_execute("SET default_transaction_read_only = on")
        .await
        .expect("set");
    c.batch_execute("BEGIN").await.expect("begin");
    assert!(replicas.contains(&port(&c, "SELECT inet_server_port()").await));
    c.batch_execute("COMMIT; RESET default_transaction_read_only")
        .await
        .expect("reset");
    // The session's override, answered by the proxy.
    c.batch_execute("SET pgwarden.route = 'primary'")
        .await
        .expect("set");
    assert_eq!(port(&c, "SELECT inet_server_port()").await, primary);
    let shown = c.simple_query("SHOW pgwarden.route").await.expect("show");
    assert!(
        matches!(&shown[..], [SimpleQueryMessage::RowDescription(_), SimpleQueryMessage::Row(r), ..] if r.get(0) == Some("primary"))
    );
    c.batch_execute("RESET pgwarden.route")
        .await
        .expect("reset");
    assert!(replicas.contains(&port(&c, "SELECT inet_server_port()").await));
    let e = c
        .batch_execute("SET pgwarden.route = 'sideways'")
        .await
        .expect_err("a bad value");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE)
    );
    // The replica override: a volatile function the client vouches for.
    c.batch_execute("SET pgwarden.route = 'replica'")
        .await
        .expect("set");
    assert!(replicas.contains(&port(&c, "SELECT inet_server_port(), random()").await));
    assert_eq!(
        port(
            &c,
            "INSERT INTO t VALUES (12, 'w') RETURNING inet_server_port()"
        )
        .await,
        primary,
        "a write by its text still goes to the primary"
    );
    // The startup option.
    let o = s.app_with("options='-c pgwarden.route=primary'").await;
    assert_eq!(port(&o, "SELECT inet_server_port()").await, primary);
    let e = s
        .try_app_with("options='-c pgwarden.consistency=psychic'")
        .await
        .expect_err("a bad startup value");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE)
    );
}

#[tokio::test]
async fn a_write_pipelined_behind_a_read_waits_for_the_primary() {
    let s = setup(1, &routing("consistency = \"eventual\"")).await;
    with_schema(&s).await;
    let mut raw = s.raw(&[]).await;
    raw.query("SELECT inet_server_port()");
    raw.query("INSERT INTO t VALUES (20, 'p') RETURNING inet_server_port()");
    raw.query("SELECT inet_server_port()");
    raw.flush().await;
    let mut ports = Vec::new();
    for _ in 0..3 {
        let (tags, messages) = raw.until_ready().await;
        let first = common::raw::first_column(&messages);
        let p = first
            .first()
            .cloned()
            .flatten()
            .unwrap_or_else(|| panic!("a row in {tags}"));
        ports.push(p.parse::<u16>().expect("port"));
    }
    // The read behind the write goes with it to the primary (where it sees the write).
    assert_eq!(
        ports,
        vec![s.cluster.port(1), s.cluster.port(0), s.cluster.port(0)]
    );
}

/// A proxy over `cluster` with `[proxy.routing]` settings and node weights.
async fn proxy_with(cluster: &Cluster, name: &str, settings: &str) -> common::Proxied {
    start_proxy(cluster, name, &routing(settings), None).await
}

#[tokio::test]
async fn each_balancing_strategy_spreads_reads_as_it_says() {
    let cluster = Cluster::builder()
        .replicas(2)
        .monitor("interval", "\"200ms\"")
        .build()
        .await;
    common::create_app(&cluster, 0).await;
    cluster.wait_replayed(1).await;
    cluster.wait_replayed(2).await;
    let (r1, r2) = (cluster.port(1), cluster.port(2));
    let n = 200;
    let share =
        |counts: &HashMap<u16, usize>, p: u16| *counts.get(&p).unwrap_or(&0) as f64 / n as f64;
    for balance in ["round_robin", "random", "least_connections", "latency"] {
        let p = proxy_with(
            &cluster,
            balance,
            &format!("consistency = \"eventual\"\nbalance = \"{balance}\""),
        )
        .await;
        let c = p.app().await;
        let counts = spread(&c, n).await;
        let (a, b) = (share(&counts, r1), share(&counts, r2));
        assert!(
            (a + b - 1.0).abs() < 1e-9,
            "{balance}: reads off the replicas: {counts:?}"
        );
        match balance {
            "round_robin" | "least_connections" => {
                assert!((a - 0.5).abs() <= 0.01, "{balance}: {counts:?}")
            }
            "random" => assert!(a > 0.3 && b > 0.3, "{balance}: {counts:?}"),
            // Latency: the replica that answers faster (which one is up to the machine).
            _ => assert!(a > 0.0 || b > 0.0, "{balance}: {counts:?}"),
        }
    }
    // Weighted, 3 to 1, from the node weights.
    let path = cluster.dir().join("weighted.toml");
    let toml = common::proxy_config(
        &cluster,
        &routing("consistency = \"eventual\"\nbalance = \"weighted\""),
    )
    .replacen(
        &format!("port = {r1}\n"),
        &format!("port = {r1}\nweight = 300\n"),
        1,
    );
    std::fs::write(&path, toml).expect("write");
    let config = Arc::new(pgwarden_config::Config::load(&path).expect("valid"));
    let view = pgwarden_cluster::monitor::spawn(config.clone()).await;
    let proxy = pgwarden_proxy::Proxy::bind(config, view)
        .await
        .expect("bind");
    let addr = proxy.local_addr().expect("addr");
    tokio::spawn(proxy.serve(std::future::pending::<()>()));
    let c = common::connect_app(addr).await.expect("connect");
    let counts = spread(&c, n).await;
    let a = share(&counts, r1);
    assert!((0.65..=0.85).contains(&a), "weighted 300:100: {counts:?}");
}

/// Two replicas serving eventual reads round robin with `lag` settings, then the first one's
/// replay paused: the setup, a client, the two replicas' ports.
async fn replay_paused_on_the_first_replica(lag: &str) -> (Setup, Client, u16, u16) {
    let s = setup(
        2,
        &routing(&format!(
            "consistency = \"eventual\"\nbalance = \"round_robin\"\n{lag}"
        )),
    )
    .await;
    with_schema(&s).await;
    let c = s.app().await;
    let (r1, r2) = (s.cluster.port(1), s.cluster.port(2));
    eventually(Duration::from_secs(10), "both replicas serve", || {
        let c = &c;
        async move { (spread(c, 10).await.len() == 2).then_some(()) }
    })
    .await;
    s.cluster.pause_replay(1).await;
    (s, c, r1, r2)
}

/// Resumes the first replica's replay and waits for it to serve reads again.
async fn back_once_caught_up(s: &Setup, c: &Client, r1: u16) {
    s.cluster.resume_replay(1).await;
    eventually(
        Duration::from_secs(20),
        "the replica back once caught up",
        || async move { spread(c, 6).await.contains_key(&r1).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn a_lagging_replica_leaves_rotation_and_comes_back_caught_up() {
    let (s, c, r1, r2) = replay_paused_on_the_first_replica("max_replica_lag = \"1MB\"").await;
    let admin = s.cluster.client_db(0, "app").await;
    admin
        .batch_execute(
            "CREATE TABLE filler AS SELECT repeat('x', 1000) AS x FROM generate_series(1, 4000)",
        )
        .await
        .expect("4 MB of WAL");
    eventually(
        Duration::from_secs(20),
        "the lagging replica out of rotation",
        || {
            let c = &c;
            async move {
                let counts = spread(c, 6).await;
                (!counts.contains_key(&r1) && counts.get(&r2) == Some(&6)).then_some(())
            }
        },
    )
    .await;
    let n1 = s
        .shared
        .nodes
        .all()
        .into_iter()
        .find(|n| n.id.as_str() == "n2")
        .expect("the node's state");
    assert_eq!(n1.in_rotation(), Some(false));
    back_once_caught_up(&s, &c, r1).await;
}

#[tokio::test]
async fn a_replica_behind_in_time_leaves_rotation_when_a_time_bound_is_set() {
    let (s, c, r1, r2) = replay_paused_on_the_first_replica(
        "max_replica_lag = \"1GB\"\nmax_replica_lag_time = \"1s\"",
    )
    .await;
    let admin = s.cluster.client_db(0, "app").await;
    // A few small writes: far from 1 GB behind, but more than a second old once unreplayed.
    eventually(
        Duration::from_secs(20),
        "the replica behind in time out of rotation",
        || {
            let (c, admin) = (&c, &admin);
            async move {
                admin
                    .batch_execute("INSERT INTO u VALUES (100, 100)")
                    .await
                    .expect("a write");
                let counts = spread(c, 6).await;
                (!counts.contains_key(&r1) && counts.get(&r2) == Some(&6)).then_some(())
            }
        },
    )
    .await;
    back_once_caught_up(&s, &c, r1).await;
}

#[tokio::test]
async fn a_replica_killed_under_reads_costs_autocommit_reads_no_error() {
    let mut s = setup(
        2,
        &routing("consistency = \"eventual\"\nbalance = \"round_robin\""),
    )
    .await;
    with_schema(&s).await;
    let (victim, survivor) = (s.cluster.port(1), s.cluster.port(2));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..4 {
        let c = s.app().await;
        let stop = stop.clone();
        readers.push(tokio::spawn(async move {
            let (mut ok, mut errors, mut after) = (0, Vec::new(), Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match try_port(&c, "SELECT inet_server_port()").await {
                    Ok(p) => {
                        ok += 1;
                        after.push(p);
                    }
                    Err(e) => errors.push(pgwarden_testkit::cluster::describe(&e)),
                }
            }
            (ok, errors, after)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.cluster.kill_node(1);
    let killed = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for r in readers {
        let (ok, errors, ports) = r.await.expect("reader");
        assert!(
            errors.is_empty(),
            "errors after the kill at {killed:?}: {errors:?}"
        );
        total += ok;
        // The last reads all went to the survivor.
        let tail = &ports[ports.len().saturating_sub(5)..];
        assert!(
            tail.iter().all(|p| *p == survivor),
            "{tail:?} (victim {victim})"
        );
    }
    assert!(total > 100, "{total} reads");
}

#[tokio::test]
async fn session_consistency_reads_every_write_even_with_a_delayed_replica() {
    let s = setup(
        2,
        &routing("consistency = \"session\"\nread_your_writes_wait = \"5ms\""),
    )
    .await;
    with_schema(&s).await;
    // Replica 1 applies WAL a second late; replica 2 keeps up.
    let delayed = s.cluster.client(1).await;
    let auto = s.cluster.node(1).data_dir.join("postgresql.auto.conf");
    let mut conf = std::fs::read_to_string(&auto).unwrap_or_default();
    conf.push_str("\nrecovery_min_apply_delay = '1s'\n");
    std::fs::write(&auto, conf).expect("write the standby's auto.conf");
    delayed
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload");
    let admin = s.cluster.client_db(0, "app").await;
    admin
        .batch_execute("INSERT INTO kv SELECT g, 0 FROM generate_series(1, 4) g")
        .await
        .expect("rows");
    let (p0, p1, p2) = (s.cluster.port(0), s.cluster.port(1), s.cluster.port(2));
    let mut workers = Vec::new();
    for k in 1..=4i32 {
        let c = s.app().await;
        workers.push(tokio::spawn(async move {
            let update = c
                .prepare("UPDATE kv SET v = $1 WHERE k = $2")
                .await
                .expect("prepare");
            let read = c
                .prepare("SELECT v, inet_server_port() FROM kv WHERE k = $1")
                .await
                .expect("prepare");
            let mut stale = 0;
            let mut landed: HashMap<i32, usize> = HashMap::new();
            for i in 1..=2500i32 {
                c.execute(&update, &[&i, &k]).await.expect("update");
                let row = c.query_one(&read, &[&k]).await.expect("read");
                let (v, at): (i32, i32) = (row.get(0), row.get(1));
                if v != i {
                    stale += 1;
                }
                *landed.entry(at).or_default() += 1;
            }
            (stale, landed)
        }));
    }
    let mut landed: HashMap<i32, usize> = HashMap::new();
    for w in workers {
        let (stale, l) = w.await.expect("worker");
        assert_eq!(stale, 0, "stale reads in session consistency");
        for (p, n) in l {
            *landed.entry(p).or_default() += n;
        }
    }
    let on = |p: u16| *landed.get(&i32::from(p)).unwrap_or(&0);
    assert_eq!(
        on(p1),
        0,
        "the delayed replica never serves a read it has not replayed: {landed:?}"
    );
    assert!(
        on(p2) > 5000,
        "most reads still on the replica that keeps up: {landed:?} (primary {p0})"
    );
}

#[tokio::test]
async fn routing_settings_and_weights_reload_for_running_sessions() {
    let s = setup(
        2,
        &routing("consistency = \"eventual\"\nbalance = \"weighted\""),
    )
    .await;
    s.replicas_reported().await;
    let (r1, r2) = (s.cluster.port(1), s.cluster.port(2));
    let c = s.app().await;
    let both = spread(&c, 40).await;
    assert!(both.contains_key(&r1) && both.contains_key(&r2), "{both:?}");
    // Weight 0 for the first replica: it takes no more reads, with no restart.
    let toml = std::fs::read_to_string(&s.config_path).expect("read");
    let weighted = toml.replacen(
        &format!("port = {r1}\n"),
        &format!("port = {r1}\nweight = 0\n"),
        1,
    );
    std::fs::write(&s.config_path, &weighted).expect("write");
    let restart = s.shared.reload().expect("a valid config");
    assert!(restart.is_empty(), "nothing needs a restart: {restart:?}");
    let after = spread(&c, 40).await;
    assert_eq!(after.get(&r2), Some(&40), "{after:?}");
    // Splitting off: the same session's reads go to the primary.
    std::fs::write(
        &s.config_path,
        weighted.replace(
            "[proxy.routing]\n",
            "[proxy.routing]\nread_write_split = false\n",
        ),
    )
    .expect("write");
    s.shared.reload().expect("a valid config");
    assert_eq!(spread(&c, 5).await.get(&s.cluster.port(0)), Some(&5));
}

#[tokio::test]
async fn the_proxy_settings_are_answered_in_the_extended_protocol_too() {
    let s = setup(1, &routing("consistency = \"eventual\"")).await;
    s.replicas_reported().await;
    let mut raw = s.raw(&[]).await;
    let unnamed = |raw: &mut common::raw::Raw, sql: &str| {
        raw.parse("", sql).bind("", "");
        pgwarden_protocol::frontend::put_describe(
            &mut raw.out,
            pgwarden_protocol::frontend::Target::Portal,
            "",
        );
        raw.execute("").sync();
    };
    unnamed(&mut raw, "SET pgwarden.route = 'primary'");
    raw.flush().await;
    let (tags, _) = raw.until_ready().await;
    assert_eq!(tags, "12nCZ", "answered as PostgreSQL answers a SET");
    unnamed(&mut raw, "SHOW pgwarden.route");
    raw.flush().await;
    let (tags, messages) = raw.until_ready().await;
    assert_eq!(tags, "12TDCZ");
    assert_eq!(
        common::raw::first_column(&messages),
        vec![Some("primary".to_string())]
    );
    unnamed(&mut raw, "SELECT inet_server_port()");
    raw.flush().await;
    let (_, messages) = raw.until_ready().await;
    assert_eq!(
        common::raw::first_column(&messages),
        vec![Some(s.cluster.port(0).to_string())],
        "the setting took effect"
    );
    unnamed(&mut raw, "SET pgwarden.consistency = 'nonsense'");
    raw.flush().await;
    let (tags, messages) = raw.until_ready().await;
    assert_eq!(tags, "12nEZ");
    assert_eq!(common::raw::error_code(&messages).as_deref(), Some("22023"));
}

#[tokio::test]
async fn a_driver_may_prepare_the_proxy_settings_as_named_statements() {
    let s = setup(1, &routing("consistency = \"eventual\"")).await;
    s.replicas_reported().await;
    let (primary, replica) = (s.cluster.port(0), s.cluster.port(1));
    let c = s.app().await;
    assert_eq!(extended_port(&c).await, replica);
    // tokio-postgres's execute: a named Parse and Describe, then Bind and Execute, then Close.
    c.execute("SET pgwarden.route = 'primary'", &[])
        .await
        .expect("set as a named statement");
    assert_eq!(extended_port(&c).await, primary, "the setting took effect");
    let show: String = c
        .query_one("SHOW pgwarden.route", &[])
        .await
        .expect("show")
        .get(0);
    assert_eq!(show, "primary");
    // Prepared once, run twice, and closed when dropped.
    let back = c
        .prepare("RESET pgwarden.route")
        .await
        .expect("prepare reset");
    c.execute(&back, &[]).await.expect("reset");
    assert_eq!(extended_port(&c).await, replica);
    c.execute("SET pgwarden.route TO primary", &[])
        .await
        .expect("set");
    c.execute(&back, &[]).await.expect("reset again");
    assert_eq!(extended_port(&c).await, replica);
    drop(back);
    let e = c
        .execute("SET pgwarden.consistency = 'nonsense'", &[])
        .await
        .expect_err("a bad value");
    assert_eq!(e.code().map(|c| c.code()), Some("22023"), "{e}");
    assert_eq!(extended_port(&c).await, replica, "the session goes on");
}

/// The port of the server that runs `SELECT inet_server_port()` as a prepared statement.
async fn extended_port(c: &Client) -> u16 {
    let row = c
        .query_one("SELECT inet_server_port()", &[])
        .await
        .expect("read");
    row.get::<_, i32>(0) as u16
}
