//! Routing and fencing against real PostgreSQL: every checkout path goes where the view says; a
//! server connection to a node that no longer leads is cut at once, in both pool modes; a
//! promotion that lost writes is not followed; a stale view refuses writes.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::raw::{error_code, first_column};
use common::{create_app, start_proxy, Proxied};
use pgwarden_cluster::status::Role;
use pgwarden_cluster::view::{ClusterView, NodeView};
use pgwarden_core::{Epoch, NodeId};
use pgwarden_testkit::{eventually, Cluster};
use tokio::sync::watch;
use tokio_postgres::Client;

fn node(name: &str, port: u16, role: Role) -> NodeView {
    NodeView {
        id: NodeId::new(name),
        host: "127.0.0.1".into(),
        port,
        role,
        timeline: Some(1),
        lsn: None,
        replay_lag_bytes: None,
        replay_lag_seconds: None,
        reason: None,
        reason_code: None,
    }
}

/// Two separate primaries, `a` and `b`, each with the `app` role and database.
fn two_primaries(a: &Cluster, b: &Cluster, leader: &str, epoch: u64) -> Arc<ClusterView> {
    Arc::new(ClusterView {
        epoch: Epoch(epoch),
        leader: Some(NodeId::new(leader)),
        nodes: vec![
            node("a", a.port(0), Role::Primary),
            node("b", b.port(0), Role::Primary),
        ],
        ..ClusterView::empty()
    })
}

/// Two separate primaries and a proxy routed by a hand-made view that makes `b` the leader
/// under epoch 7 (the config names only cluster `a`: where traffic goes comes from the view).
async fn routed_to_b() -> (Cluster, Cluster, watch::Sender<Arc<ClusterView>>, Proxied) {
    let a = Cluster::builder().build().await;
    let b = Cluster::builder().build().await;
    create_app(&a, 0).await;
    create_app(&b, 0).await;
    let (tx, rx) = watch::channel(two_primaries(&a, &b, "b", 7));
    let p = start_proxy(&a, "routed", "", Some(rx)).await;
    (a, b, tx, p)
}

async fn port_of(c: &Client) -> Result<i32, tokio_postgres::Error> {
    Ok(c.query_one("SELECT inet_server_port()", &[]).await?.get(0))
}

async fn simple_port(c: &Client) -> String {
    let rows = c
        .simple_query("SELECT inet_server_port()")
        .await
        .expect("simple query");
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).expect("port").to_string()),
            _ => None,
        })
        .expect("a row")
}

/// The port answering an unnamed extended-protocol query (the express path), twice in one
/// pipelined write.
async fn express_ports(p: &Proxied) -> Vec<Option<String>> {
    let mut raw = p.raw().await;
    for _ in 0..2 {
        raw.parse("", "SELECT inet_server_port()")
            .bind("", "")
            .execute("")
            .sync();
    }
    raw.flush().await;
    let (_, first) = raw.until_ready().await;
    let (_, second) = raw.until_ready().await;
    let mut ports = first_column(&first);
    ports.extend(first_column(&second));
    ports
}

fn is_cut(e: &tokio_postgres::Error) -> bool {
    // The proxy ends the session with 57P01; a driver may report the closed connection
    // instead if it read the FATAL error before this query.
    e.code().map(|c| c.code()) == Some("57P01") || e.is_closed()
}

#[tokio::test]
async fn every_checkout_path_goes_where_the_view_says() {
    let (a, b, tx, p) = routed_to_b().await;
    let (pa, pb) = (i32::from(a.port(0)), i32::from(b.port(0)));

    let c = p.app().await;
    assert_eq!(port_of(&c).await.expect("named statement"), pb);
    assert_eq!(simple_port(&c).await, pb.to_string(), "simple query");
    assert_eq!(
        express_ports(&p).await,
        vec![Some(pb.to_string()), Some(pb.to_string())],
        "pipelined unnamed batches (express path)"
    );
    // A client inside a transaction on b, and one between transactions.
    let held = p.app().await;
    held.batch_execute("BEGIN; SELECT 1").await.expect("begin");

    tx.send(two_primaries(&a, &b, "a", 8)).expect("send view");
    let e = held
        .batch_execute("SELECT 1")
        .await
        .expect_err("the transaction on the deposed node is cut");
    assert!(is_cut(&e), "{e:?}");
    assert_eq!(
        port_of(&c)
            .await
            .expect("between transactions: not affected"),
        pa
    );
    assert_eq!(simple_port(&c).await, pa.to_string());
    assert_eq!(
        express_ports(&p).await,
        vec![Some(pa.to_string()), Some(pa.to_string())]
    );
    // Pools are per node: b's idle connections were closed when it stopped leading.
    eventually(Duration::from_secs(5), "b's idle servers closed", || {
        let shared = &p.shared;
        async move {
            shared
                .pools()
                .iter()
                .filter(|pool| pool.key.node.as_str() == "b")
                .all(|pool| pool.idle_count() == 0)
                .then_some(())
        }
    })
    .await;
}

/// Outside a transaction block the session outlives the cut: its statement in flight on the
/// deposed node fails with 08006, nothing that node answers reaches the client, and the next
/// statement runs on the new leader on the same client connection.
#[tokio::test]
async fn a_statement_in_flight_on_a_deposed_node_fails_and_the_session_goes_on() {
    let (a, b, tx, p) = routed_to_b().await;
    let c = p.app().await;
    let running = async {
        let admin = b.client_db(0, "app").await;
        eventually(
            Duration::from_secs(10),
            "the statement runs on b",
            || async {
                let n: i64 = admin
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
                     AND starts_with(query, 'SELECT pg_sleep(30), inet_server_port()')",
                        &[],
                    )
                    .await
                    .ok()?
                    .get(0);
                (n > 0).then_some(())
            },
        )
        .await;
        tx.send(two_primaries(&a, &b, "a", 8)).expect("send view");
    };
    let started = Instant::now();
    let (r, ()) = tokio::join!(
        c.query_one("SELECT pg_sleep(30), inet_server_port()", &[]),
        running
    );
    let e = r.expect_err("cut at the epoch change");
    assert_eq!(e.code().map(|c| c.code()), Some("08006"), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "cut at once, not when b answered"
    );
    assert!(!c.is_closed(), "the session goes on");
    assert_eq!(
        port_of(&c).await.expect("next statement"),
        i32::from(a.port(0))
    );
}

/// Promote the standby by hand while the old primary keeps running and taking writes.
#[tokio::test]
async fn a_promotion_cuts_held_connections_and_the_old_primary_takes_no_more_commits() {
    let cluster = Cluster::builder()
        .replicas(1)
        .monitor("interval", "\"200ms\"")
        .build()
        .await;
    create_app(&cluster, 0).await;
    let owner = cluster.client_db(0, "app").await;
    owner
        .batch_execute(
            "CREATE TABLE acked (id int PRIMARY KEY, port int); GRANT ALL ON acked TO app",
        )
        .await
        .expect("table");
    cluster.wait_replayed(1).await;
    let tx_proxy = start_proxy(&cluster, "tx", "", None).await;
    let session_proxy = start_proxy(&cluster, "session", "pool_mode = \"session\"", None).await;
    let (p1, p2) = (i32::from(cluster.port(0)), i32::from(cluster.port(1)));

    let session = session_proxy.app().await;
    assert_eq!(port_of(&session).await.expect("session mode"), p1);
    let in_tx = tx_proxy.app().await;
    in_tx
        .batch_execute("BEGIN; INSERT INTO acked VALUES (-1, inet_server_port())")
        .await
        .expect("open transaction");

    // A writer through the transaction-mode proxy: (sent at, acknowledging port).
    let acks: Arc<Mutex<Vec<(Instant, i32)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acks, stop, addr) = (acks.clone(), stop.clone(), tx_proxy.addr);
        tokio::spawn(async move {
            let started = Instant::now();
            let mut c: Option<Client> = None;
            let mut id = 0;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                if c.as_ref().map_or(true, |c| c.is_closed()) {
                    c = common::connect_app(addr).await.ok();
                }
                let Some(client) = &c else { continue };
                id += 1;
                let sent = Instant::now();
                let r = client
                    .query_one(
                        "INSERT INTO acked VALUES ($1, inet_server_port()) RETURNING port",
                        &[&id],
                    )
                    .await;
                if let Ok(row) = r {
                    acks.lock().expect("acks").push((sent, row.get(0)));
                }
            }
        })
    };
    eventually(Duration::from_secs(10), "the writer is writing", || {
        let acks = &acks;
        async move { (acks.lock().expect("acks").len() >= 20).then_some(()) }
    })
    .await;

    // pg_promote() returns once the promotion is done.
    cluster.execute(1, "SELECT pg_promote()").await;
    let promoted = Instant::now();
    let leads_n2 = |p: &Proxied| {
        p.shared
            .topology
            .routing()
            .view
            .leader
            .as_ref()
            .map(|l| l.as_str())
            == Some("n2")
    };
    eventually(Duration::from_secs(10), "both proxies follow n2", || {
        let ok = leads_n2(&tx_proxy) && leads_n2(&session_proxy);
        async move { ok.then_some(()) }
    })
    .await;
    let seen = Instant::now();
    // The next monitor round sees it (interval 200 ms); bounded loosely for a loaded machine.
    assert!(
        seen - promoted < Duration::from_secs(2),
        "followed after {:?}",
        seen - promoted
    );

    // Held connections to n1 were cut when the proxies saw the promotion.
    let e = port_of(&session).await.expect_err("session mode is cut");
    assert!(is_cut(&e), "{e:?}");
    let e = in_tx
        .batch_execute("COMMIT")
        .await
        .expect_err("the open transaction is cut");
    assert!(is_cut(&e), "{e:?}");
    let n1 = cluster.client_db(0, "app").await;
    let row = n1
        .query_one("SELECT count(*) FROM acked WHERE id = -1", &[])
        .await
        .expect("n1 still answers");
    assert_eq!(
        row.get::<_, i64>(0),
        0,
        "the COMMIT sent after the promotion never reached n1"
    );

    eventually(
        Duration::from_secs(10),
        "writes go on after the switch",
        || {
            let acks = &acks;
            async move {
                let n = acks
                    .lock()
                    .expect("acks")
                    .iter()
                    .filter(|(t, _)| *t > seen)
                    .count();
                (n >= 20).then_some(())
            }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");
    let acks = acks.lock().expect("acks").clone();
    let late: Vec<_> = acks.iter().filter(|(t, _)| *t > seen).collect();
    assert!(
        late.iter().all(|(_, port)| *port == p2),
        "every write sent after the proxy saw the promotion went to n2: {late:?}"
    );
    // New sessions in both modes reach n2.
    assert_eq!(port_of(&session_proxy.app().await).await.expect("new"), p2);
    assert_eq!(port_of(&tx_proxy.app().await).await.expect("new"), p2);
}

#[tokio::test]
async fn a_promotion_that_does_not_descend_from_the_leader_is_not_followed() {
    let mut cluster = Cluster::builder()
        .replicas(2)
        .monitor("interval", "\"200ms\"")
        .build()
        .await;
    create_app(&cluster, 0).await;
    cluster.wait_replayed(1).await;
    cluster.wait_replayed(2).await;
    let p = start_proxy(
        &cluster,
        "tx",
        "server_connect_timeout = \"1s\"\nadmin_users = [\"app\"]",
        None,
    )
    .await;
    let leader = |p: &Proxied| {
        p.shared
            .topology
            .routing()
            .view
            .leader
            .as_ref()
            .map(|l| l.as_str().to_string())
    };

    cluster.execute(1, "SELECT pg_promote()").await;
    eventually(Duration::from_secs(10), "the proxy follows n2", || {
        let l = leader(&p);
        async move { (l.as_deref() == Some("n2")).then_some(()) }
    })
    .await;
    let c = p.app().await;
    c.batch_execute(
        "CREATE TABLE on_n2 (x int); INSERT INTO on_n2 SELECT generate_series(1, 1000)",
    )
    .await
    .expect("writes to n2");
    let written = cluster
        .query_text(1, "SELECT pg_current_wal_lsn()::text")
        .await
        .expect("lsn");
    let written: pgwarden_core::Lsn = written.parse().expect("lsn");
    eventually(
        Duration::from_secs(10),
        "the proxy has seen n2's writes",
        || {
            let view = p.shared.topology.view();
            let seen = view.node(&NodeId::new("n2")).and_then(|n| n.lsn);
            async move { (seen >= Some(written)).then_some(()) }
        },
    )
    .await;

    // n3 is promoted too, from n1's timeline 1: it never had n2's writes.
    cluster.execute(2, "SELECT pg_promote()").await;
    eventually(Duration::from_secs(10), "n3 is refused", || {
        let view = p.shared.topology.view();
        let refused = view.refused.iter().any(|r| r.starts_with("n3"));
        async move { refused.then_some(()) }
    })
    .await;
    assert_eq!(leader(&p).as_deref(), Some("n2"), "n2 keeps the writes");
    assert_eq!(
        port_of(&c).await.expect("still served"),
        i32::from(cluster.port(1))
    );

    // Without n2, nobody that holds its writes is left: writes are refused, not sent to n3.
    cluster.stop_node(1).await;
    eventually(Duration::from_secs(10), "no leader", || {
        let l = leader(&p);
        async move { l.is_none().then_some(()) }
    })
    .await;
    let e = port_of(&c).await.expect_err("writes are refused");
    assert_eq!(e.code().map(|c| c.code()), Some("57P03"), "{e:?}");
    let text = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(text.contains("does not descend from n2"), "{text}");
    // `pgwarden status` shows it too: it asks the proxy (SHOW LEADER).
    let status_config = common::proxy_config(&cluster, "admin_users = [\"app\"]").replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{}\"", p.addr),
    );
    let status_config =
        pgwarden_config::Config::from_toml(&status_config, std::path::Path::new("/"))
            .expect("config");
    let status = pgwarden_cluster::check(&status_config).await;
    assert!(
        status
            .warnings
            .iter()
            .any(|w| w.contains("writes are refused") && w.contains("does not descend from n2")),
        "{:?}",
        status.warnings
    );
    assert_eq!(status.exit_code(), 1);
    let n3 = cluster.client_db(2, "app").await;
    assert!(
        n3.query("SELECT 1 FROM on_n2", &[]).await.is_err(),
        "n3 indeed lacks n2's writes"
    );
}

#[tokio::test]
async fn a_stale_view_refuses_writes_and_cuts_held_connections() {
    let a = Cluster::builder()
        .monitor("interval", "\"200ms\"")
        .monitor("timeout", "\"300ms\"")
        .build()
        .await;
    create_app(&a, 0).await;
    let fresh = || {
        Arc::new(ClusterView {
            epoch: Epoch(1),
            leader: Some(NodeId::new("n1")),
            nodes: vec![node("n1", a.port(0), Role::Primary)],
            ..ClusterView::empty()
        })
    };
    let (tx, rx) = watch::channel(fresh());
    let tx = Arc::new(tx);
    let feeding = Arc::new(AtomicBool::new(true));
    let feeder = {
        let (tx, feeding, view) = (tx.clone(), feeding.clone(), fresh());
        tokio::spawn(async move {
            while feeding.load(Ordering::Relaxed) {
                let _ = tx.send(view.clone());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let p = start_proxy(
        &a,
        "stale",
        "max_view_age = \"1s\"\nserver_connect_timeout = \"500ms\"",
        Some(rx),
    )
    .await;
    let held = p.app().await;
    held.batch_execute("BEGIN").await.expect("begin");
    let idle = p.app().await;
    idle.batch_execute("SELECT 1").await.expect("fresh view");

    // The source goes silent.
    feeding.store(false, Ordering::Relaxed);
    feeder.await.expect("feeder");
    let stopped = Instant::now();
    eventually(Duration::from_secs(5), "the view goes stale", || {
        let stale = p.shared.topology.routing().stale.is_some();
        async move { stale.then_some(()) }
    })
    .await;
    assert!(
        stopped.elapsed() >= Duration::from_millis(900),
        "not before its bound"
    );
    let e = held.batch_execute("SELECT 1").await.expect_err("cut");
    assert!(is_cut(&e), "{e:?}");
    let e = idle.batch_execute("SELECT 1").await.expect_err("refused");
    assert_eq!(e.code().map(|c| c.code()), Some("57P03"), "{e:?}");
    assert!(format!("{e:?}").contains("stale"), "{e:?}");

    // Heard again: writes go on.
    tx.send(fresh()).expect("send");
    eventually(Duration::from_secs(5), "fresh again", || {
        let fresh = p.shared.topology.routing().stale.is_none();
        async move { fresh.then_some(()) }
    })
    .await;
    idle.batch_execute("SELECT 1").await.expect("served again");
    let mut raw = p.raw().await;
    raw.query("SELECT 1");
    raw.flush().await;
    let (_, msgs) = raw.until_ready().await;
    assert_eq!(error_code(&msgs), None);
}

/// Every process of node `i` (its postmaster, read from `postmaster.pid`, and the postmaster's
/// children), stopped with SIGSTOP until dropped: a frozen machine, as far as PostgreSQL goes.
struct Frozen(Vec<nix::unistd::Pid>);

impl Frozen {
    fn node(cluster: &Cluster, i: usize) -> Frozen {
        use nix::sys::signal::{kill, Signal};
        let pid_file = cluster.node(i).data_dir.join("postmaster.pid");
        let text = std::fs::read_to_string(pid_file).expect("postmaster.pid");
        let pm: i32 = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("pid");
        let children =
            std::fs::read_to_string(format!("/proc/{pm}/task/{pm}/children")).unwrap_or_default();
        let mut pids: Vec<nix::unistd::Pid> = vec![nix::unistd::Pid::from_raw(pm)];
        pids.extend(
            children
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .map(nix::unistd::Pid::from_raw),
        );
        for p in &pids {
            kill(*p, Signal::SIGSTOP).expect("SIGSTOP");
        }
        Frozen(pids)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = nix::sys::signal::kill(*p, nix::sys::signal::Signal::SIGCONT);
        }
    }
}

/// A frozen primary (no failover): the monitor stops hearing from it within its timeout, and
/// clients holding a connection to it get an error instead of hanging for as long as it is frozen.
#[tokio::test]
async fn a_frozen_primary_does_not_make_clients_hang() {
    let cluster = Cluster::builder()
        .monitor("interval", "\"200ms\"")
        .monitor("timeout", "\"500ms\"")
        .build()
        .await;
    create_app(&cluster, 0).await;
    let p = start_proxy(
        &cluster,
        "session",
        "pool_mode = \"session\"\nserver_connect_timeout = \"500ms\"",
        None,
    )
    .await;
    let c = p.app().await;
    c.batch_execute("SELECT 1").await.expect("served");
    let frozen = Frozen::node(&cluster, 0);
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(20), c.batch_execute("SELECT 1")).await;
    let e = r
        .expect("no hang while the primary is frozen")
        .expect_err("cut");
    assert!(is_cut(&e), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "cut after {:?}",
        started.elapsed()
    );
    drop(frozen);
    eventually(Duration::from_secs(10), "served again once thawed", || {
        let addr = p.addr;
        async move {
            let c = common::connect_app(addr).await.ok()?;
            c.batch_execute("SELECT 1").await.ok()
        }
    })
    .await;
}
