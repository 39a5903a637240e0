//! The admin console: SHOW, PAUSE/RESUME (also under pgbench), KILL, RELOAD, access control.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{proxy_config, setup, Setup, APP_PASSWORD};
use pgwarden_testkit::eventually;
use tokio_postgres::{Client, SimpleQueryMessage};

const ADMIN: &str = "admin_users = [\"app\"]";

type Row = HashMap<String, Option<String>>;

async fn admin(s: &Setup) -> Client {
    s.try_connect("app", APP_PASSWORD, "pgwarden")
        .await
        .expect("the admin console")
}

async fn rows(c: &Client, sql: &str) -> Vec<Row> {
    c.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_string(), r.get(i).map(str::to_string)))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn get<'a>(r: &'a Row, col: &str) -> &'a str {
    r.get(col)
        .unwrap_or_else(|| panic!("no column {col} in {r:?}"))
        .as_deref()
        .unwrap_or("")
}

fn app_pool(pools: &[Row]) -> &Row {
    pools
        .iter()
        .find(|r| get(r, "database") == "app")
        .unwrap_or_else(|| panic!("no pool for app in {pools:?}"))
}

fn code(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(|c| c.code())
}

#[tokio::test]
async fn show_reports_pools_clients_servers_stats_nodes_and_config() {
    let s = setup(0, &format!("default_pool_size = 2\n{ADMIN}")).await;
    let console = admin(&s).await;
    let a = s.app().await;
    for _ in 0..10 {
        a.batch_execute("SELECT 1").await.expect("query");
    }
    a.batch_execute("BEGIN").await.expect("begin");
    let b = s.app().await;
    b.batch_execute("BEGIN").await.expect("begin");
    // A third client waits: both servers are in transactions.
    let c = s.app().await;
    let waiting = tokio::spawn(async move { c.batch_execute("SELECT 1").await });
    eventually(Duration::from_secs(5), "a client waiting", || async {
        let pools = rows(&console, "SHOW POOLS").await;
        (get(app_pool(&pools), "cl_waiting") == "1").then_some(())
    })
    .await;
    let pools = rows(&console, "SHOW POOLS").await;
    let p = app_pool(&pools);
    assert_eq!(get(p, "cl_active"), "2");
    assert_eq!(get(p, "sv_active"), "2");
    assert_eq!(get(p, "pool_mode"), "transaction");
    assert_eq!(get(p, "pool_size"), "2");

    let clients = rows(&console, "SHOW CLIENTS").await;
    let app_clients: Vec<&Row> = clients
        .iter()
        .filter(|r| get(r, "database") == "app")
        .collect();
    assert_eq!(app_clients.len(), 3, "{clients:?}");
    assert_eq!(
        app_clients
            .iter()
            .filter(|r| get(r, "state") == "waiting")
            .count(),
        1
    );
    assert!(
        clients.iter().any(|r| get(r, "database") == "pgwarden"),
        "the console itself is a client"
    );
    let servers = rows(&console, "SHOW SERVERS").await;
    assert_eq!(servers.len(), 2, "{servers:?}");
    // Each active server is linked to the client holding it, and the other way round.
    for sv in &servers {
        assert_eq!(get(sv, "state"), "active");
        let holder = clients
            .iter()
            .find(|c| get(c, "ptr") == get(sv, "link"))
            .unwrap_or_else(|| panic!("server {sv:?} linked to no client"));
        assert_eq!(get(holder, "link"), get(sv, "ptr"));
        assert!(get(sv, "remote_pid").parse::<i32>().expect("pid") > 0);
    }

    a.batch_execute("COMMIT").await.expect("commit");
    waiting
        .await
        .expect("join")
        .expect("the waiting client ran");
    b.batch_execute("COMMIT").await.expect("commit");
    let stats = rows(&console, "SHOW STATS").await;
    let st = stats
        .iter()
        .find(|r| get(r, "database") == "app")
        .expect("app stats");
    let n = |col: &str| {
        get(st, col)
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("{col}: {st:?}"))
    };
    assert!(n("total_xact_count") >= 12, "{st:?}");
    assert!(n("total_query_count") >= 14, "{st:?}");
    assert!(n("total_received") > 0 && n("total_sent") > 0, "{st:?}");
    assert!(
        n("total_xact_time") > 0 && n("total_wait_time") > 0,
        "{st:?}"
    );

    let nodes = rows(&console, "SHOW NODES").await;
    assert_eq!(nodes.len(), 1);
    assert_eq!(get(&nodes[0], "role"), "primary");
    assert_eq!(get(&nodes[0], "writes"), "yes");
    let config = rows(&console, "SHOW CONFIG").await;
    let pool_size = config
        .iter()
        .find(|r| get(r, "key") == "default_pool_size")
        .expect("row");
    assert_eq!(get(pool_size, "value"), "2");
    assert_eq!(rows(&console, "SHOW VERSION").await.len(), 1);
    console.simple_query("SHOW HELP").await.expect("help");

    let e = console.simple_query("SHOW NONSENSE").await.unwrap_err();
    assert_eq!(code(&e), Some("42601"));
    let e = console.simple_query("DROP TABLE x").await.unwrap_err();
    assert_eq!(code(&e), Some("42601"));
    // The extended protocol is refused, and the console goes on working.
    let e = console.query("SHOW POOLS", &[]).await.unwrap_err();
    assert_eq!(code(&e), Some("0A000"), "{e:?}");
    assert!(!rows(&console, "SHOW POOLS").await.is_empty());
}

#[tokio::test]
async fn only_admin_users_reach_the_console() {
    let s = setup(0, "admin_users = [\"someone_else\"]").await;
    let e = s
        .try_connect("app", APP_PASSWORD, "pgwarden")
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some("28000"), "{e:?}");
    let e = s.try_connect("app", "wrong", "pgwarden").await.unwrap_err();
    assert_eq!(code(&e), Some("28P01"), "{e:?}");
}

#[tokio::test]
async fn pause_waits_for_running_transactions_then_holds_new_ones_until_resume() {
    let s = setup(0, &format!("default_pool_size = 2\n{ADMIN}")).await;
    let console = Arc::new(admin(&s).await);
    let a = s.app().await;
    a.batch_execute("BEGIN; SELECT 1").await.expect("begin");
    let pausing = {
        let console = console.clone();
        tokio::spawn(async move { console.simple_query("PAUSE app").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pausing.is_finished(),
        "PAUSE returned while a transaction was running"
    );
    a.batch_execute("SELECT 2; COMMIT")
        .await
        .expect("a finishes its transaction");
    tokio::time::timeout(Duration::from_secs(5), pausing)
        .await
        .expect("PAUSE returns once the transaction ended")
        .expect("join")
        .expect("pause");
    // New work waits; logging in still works.
    let b = s.app().await;
    let held = tokio::spawn(async move { b.batch_execute("SELECT 1").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "a query ran while paused");
    let pools = rows(&console, "SHOW POOLS").await;
    assert_eq!(get(app_pool(&pools), "paused"), "yes");
    console.simple_query("RESUME app").await.expect("resume");
    tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("runs after RESUME")
        .expect("join")
        .expect("query");
}

#[tokio::test]
async fn pause_and_resume_while_pgbench_runs_lose_nothing() {
    let s = setup(0, &format!("default_pool_size = 4\n{ADMIN}")).await;
    common::pgbench(&s, &["-i", "-s", "1", "-q"]).await;
    let bench = {
        let port = s.addr.port();
        tokio::spawn(async move {
            common::pgbench_at(port, &["-c", "8", "-j", "2", "-T", "4", "-S"]).await
        })
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let console = admin(&s).await;
    console
        .simple_query("PAUSE")
        .await
        .expect("pause everything");
    let pools = rows(&console, "SHOW POOLS").await;
    assert_eq!(
        get(app_pool(&pools), "sv_active"),
        "0",
        "paused with servers in use"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    console.simple_query("RESUME").await.expect("resume");
    let out = bench.await.expect("join");
    assert!(out.contains("number of failed transactions: 0 "), "{out}");
}

#[tokio::test]
async fn kill_ends_a_databases_clients_and_holds_it_until_resume() {
    let s = setup(0, &format!("default_pool_size = 2\n{ADMIN}")).await;
    let console = admin(&s).await;
    // A driver's startup parameters are checked on a server once per pool; have that done
    // before the database is held, so later logins need no server.
    s.app()
        .await
        .batch_execute("SELECT 1")
        .await
        .expect("warm up");
    let mut a = s.raw(&[]).await;
    a.query("BEGIN");
    a.flush().await;
    a.until_ready().await;
    console.simple_query("KILL app").await.expect("kill");
    // a is told why and disconnected.
    let (tag, body) = a.recv().await;
    assert_eq!(tag, b'E');
    assert!(
        String::from_utf8_lossy(&body).contains("57P01"),
        "{:?}",
        String::from_utf8_lossy(&body)
    );
    assert!(a.try_recv().await.is_none(), "still connected after KILL");
    eventually(Duration::from_secs(5), "a's server closed", || async {
        rows(&console, "SHOW SERVERS")
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    // The database is held until RESUME.
    let b = s.app().await;
    let held = tokio::spawn(async move { b.batch_execute("SELECT 1").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished());
    console.simple_query("RESUME app").await.expect("resume");
    held.await.expect("join").expect("works after RESUME");
    let e = console.simple_query("KILL pgwarden").await.unwrap_err();
    assert_eq!(code(&e), Some("0A000"));
}

#[tokio::test]
async fn reload_applies_a_valid_config_and_rejects_an_invalid_one() {
    let s = setup(0, &format!("default_pool_size = 2\n{ADMIN}")).await;
    let console = admin(&s).await;
    let a = s.app().await;
    a.batch_execute("SELECT 1").await.expect("a");
    // Invalid: every error is reported, the running config stays.
    let bad = proxy_config(
        &s.cluster,
        &format!("default_pool_size = 0\nquery_wait_timeout = \"soon\"\n{ADMIN}"),
    );
    std::fs::write(&s.config_path, bad).expect("write");
    let e = console.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(code(&e), Some("F0000"));
    let detail = e
        .as_db_error()
        .and_then(|d| d.detail())
        .unwrap_or_default()
        .to_string();
    assert!(detail.contains("proxy.default_pool_size"), "{detail}");
    assert!(detail.contains("proxy.query_wait_timeout"), "{detail}");
    let pools = rows(&console, "SHOW POOLS").await;
    assert_eq!(get(app_pool(&pools), "pool_size"), "2");
    // Valid: a bigger pool, applied to the running pool; connected clients stay.
    let good = proxy_config(&s.cluster, &format!("default_pool_size = 3\n{ADMIN}"));
    std::fs::write(&s.config_path, good).expect("write");
    console.simple_query("RELOAD").await.expect("reload");
    let pools = rows(&console, "SHOW POOLS").await;
    assert_eq!(get(app_pool(&pools), "pool_size"), "3");
    a.batch_execute("SELECT 1")
        .await
        .expect("a is still connected");
    // Three transactions at once now fit.
    let clients: Vec<Client> = futures::future::join_all((0..3).map(|_| s.app())).await;
    for c in &clients {
        tokio::time::timeout(Duration::from_secs(5), c.batch_execute("BEGIN"))
            .await
            .expect("a third server is available")
            .expect("begin");
    }
    for c in &clients {
        c.batch_execute("COMMIT").await.expect("commit");
    }
}

/// A reload that changes settings needing a restart keeps their running values: SHOW CONFIG
/// shows what runs, and the pool mode does not switch under the clients.
#[tokio::test]
async fn a_reload_keeps_settings_that_need_a_restart() {
    let s = setup(0, ADMIN).await;
    let console = admin(&s).await;
    let config_value = |rows: &[Row], key: &str| {
        rows.iter()
            .find(|r| r.get("key").cloned().flatten().as_deref() == Some(key))
            .and_then(|r| r.get("value").cloned().flatten())
            .unwrap_or_else(|| panic!("no {key} in SHOW CONFIG"))
    };
    let before = rows(&console, "SHOW CONFIG").await;
    let listen = config_value(&before, "listen");
    let changed = proxy_config(
        &s.cluster,
        &format!("pool_mode = \"session\"\ndefault_pool_size = 7\n{ADMIN}"),
    )
    .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"");
    std::fs::write(&s.config_path, changed).expect("write");
    console.simple_query("RELOAD").await.expect("reload");
    let after = rows(&console, "SHOW CONFIG").await;
    assert_eq!(
        config_value(&after, "listen"),
        listen,
        "listen still runs as before"
    );
    assert_eq!(config_value(&after, "pool_mode"), "transaction");
    assert_eq!(config_value(&after, "default_pool_size"), "7", "applied");
    let a = s.app().await;
    a.batch_execute("SELECT 1").await.expect("served");
    let pools = rows(&console, "SHOW POOLS").await;
    assert_eq!(get(app_pool(&pools), "pool_mode"), "transaction");
}
