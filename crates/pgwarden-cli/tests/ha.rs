//! Fault tests of the HA agents as processes: real etcd, `pgwarden agent` per node, the proxy
//! following the store, and a writer through it. Each checks that the cluster heals within a
//! loose bound, that no server acknowledged a write after another took over, and what was lost.

mod common;

use std::time::{Duration, Instant};

use common::ha::Ha;
use nix::sys::signal::Signal;
use pgwarden_testkit::eventually;
use pgwarden_testkit::fault::Fault;

const BOOT: Duration = Duration::from_secs(120);
/// Loose: a test, not a benchmark (bench/failover.sh measures).
const HEAL: Duration = Duration::from_secs(40);
const WRITE_EVERY: Duration = Duration::from_millis(15);

async fn wait_acks(w: &common::ha::Writer, more: usize) {
    let target = w.acked() + more;
    eventually(HEAL, "the writer makes progress", || async {
        (w.acked() >= target).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_primary_restarts_in_place() {
    let ha = Ha::start(3, "", &|_| String::new()).await;
    let (leader, epoch) = ha.settled(2, 1, BOOT).await;
    let (code, v) = ha.status();
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["ha"]["leader"], "n1", "{v}");
    assert_eq!(v["ha"]["epoch"], epoch, "{v}");
    // `pgwarden list` and each agent's `GET /cluster` give the same document.
    let config = ha.dir.path().join("proxy.toml");
    let r = common::run(&["list", "-c", config.to_str().expect("path"), "--json"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let listed: serde_json::Value = serde_json::from_str(&r.stdout).expect("list --json");
    assert_eq!(listed["leader"], "n1", "{listed}");
    assert_eq!(
        listed["members"].as_array().map(Vec::len),
        Some(3),
        "{listed}"
    );
    let replica = listed["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["role"] == "replica"))
        .expect("a replica");
    assert!(replica["replay_lsn"].is_string(), "{replica}");
    let api = format!("127.0.0.1:{}", ha.nodes[1].api_port);
    let (status, body) = pgwarden_ha::api::get(&api, "/cluster", Duration::from_secs(2))
        .await
        .expect("GET /cluster");
    assert_eq!(status, 200, "{body}");
    let cluster: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(cluster["leader"], "n1", "{cluster}");
    assert_eq!(cluster["epoch"], epoch, "{cluster}");
    let w = ha.writer(WRITE_EVERY).await;
    wait_acks(&w, 20).await;
    let pid = ha.postmaster_pid(leader).expect("postmaster");
    let fault = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
    wait_acks(&w, 50).await;
    let (l, e) = ha.settled(2, 1, HEAL).await;
    assert_eq!(
        (l, e),
        (leader, epoch),
        "restarted in place: same leader, same epoch"
    );
    let log = w.stop();
    log.writers_in_order().expect("one writer at a time");
    assert_eq!(
        ha.lost(leader, &log).await,
        Vec::<i64>::new(),
        "a crash loses no commit"
    );
    eprintln!(
        "write gap after the crash: {:?}, errors {:?}",
        log.longest_gap_after(fault),
        log.errors
    );
    one_error_and_the_same_session(&log);
    // The restart is an outage in the history, and counts in the availability.
    let history = history(&ha);
    let restarts: Vec<_> = history["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "restart")
        .collect();
    assert_eq!(restarts.len(), 1, "{history}");
    assert_eq!(restarts[0]["to"], "n1", "{history}");
    assert_eq!(history["availability"]["unplanned"], 1, "{history}");
    assert!(
        history["availability"]["mttr_ms"].as_u64().is_some(),
        "{history}"
    );
}

/// `pgwarden history --json --availability 1h`.
fn history(ha: &Ha) -> serde_json::Value {
    let config = ha.dir.path().join("proxy.toml");
    let r = common::run(&[
        "history",
        "-c",
        config.to_str().expect("path"),
        "--json",
        "--availability",
        "1h",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    serde_json::from_str(&r.stdout).expect("history --json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_fails_over_and_comes_back_as_a_replica() {
    let mut ha = Ha::start(3, "", &|_| String::new()).await;
    let (leader, epoch) = ha.settled(2, 1, BOOT).await;
    let w = ha.writer(WRITE_EVERY).await;
    wait_acks(&w, 20).await;
    let fault = Instant::now();
    // The agent alone is killed: its PostgreSQL dies with it (the design), so this is
    // process death of the node.
    ha.kill_agent_and_postgres(leader).await;
    let (new_leader, new_epoch) = ha.settled(1, epoch + 1, HEAL).await;
    assert_ne!(new_leader, leader);
    wait_acks(&w, 50).await;
    // The old node comes back while it cannot reach etcd: it waits for the store, saying so,
    // and starts no PostgreSQL (it would otherwise come up as the primary it was).
    let waits = |ha: &Ha| {
        ha.agent_log(leader)
            .matches("waiting for the store")
            .count()
    };
    let before = waits(&ha);
    ha.link(leader, Fault::Cut);
    ha.start_agent(leader);
    eventually(HEAL, "the restarted agent waits for the store", || async {
        (waits(&ha) > before).then_some(())
    })
    .await;
    assert!(
        common::ha::connect(ha.nodes[leader].pg_port)
            .await
            .is_none(),
        "no PostgreSQL before the store is read"
    );
    // Once the store answers, it rejoins as a replica of the new leader, on its timeline.
    ha.link(leader, Fault::Pass);
    let (l, e) = ha.settled(2, new_epoch, HEAL).await;
    assert_eq!((l, e), (new_leader, new_epoch));
    let log = w.stop();
    log.writers_in_order().expect("one writer at a time");
    let lost = ha.lost(new_leader, &log).await;
    eprintln!(
        "write gap {:?}, {} acknowledged writes lost (asynchronous), client errors {:?}",
        log.longest_gap_after(fault),
        lost.len(),
        log.errors
    );
    one_error_and_the_same_session(&log);
    let history = history(&ha);
    let failovers: Vec<_> = history["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "failover")
        .collect();
    assert_eq!(failovers.len(), 1, "{history}");
    assert_eq!(
        failovers[0]["from"],
        ha.nodes[leader].name.as_str(),
        "{history}"
    );
    assert_eq!(
        failovers[0]["to"],
        ha.nodes[new_leader].name.as_str(),
        "{history}"
    );
    assert_eq!(failovers[0]["epoch"], new_epoch, "{history}");
    assert!(failovers[0]["lost_bytes"].is_u64(), "{history}");
    let down =
        failovers[0]["up_ms"].as_u64().unwrap_or(0) - failovers[0]["down_ms"].as_u64().unwrap_or(0);
    assert!(
        down > 0 && down < 20_000,
        "writes unavailable {down} ms: {history}"
    );
}

/// An old primary that cannot be rewound (its WAL is gone, so pg_rewind cannot even finish its
/// crash recovery) is cloned again from the new leader and rejoins; nobody acts by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_primary_whose_rewind_fails_is_cloned_again() {
    let mut ha = Ha::start(3, "", &|_| String::new()).await;
    let (leader, epoch) = ha.settled(2, 1, BOOT).await;
    ha.kill_agent_and_postgres(leader).await;
    let (new_leader, new_epoch) = ha.settled(1, epoch + 1, HEAL).await;
    ha.direct(new_leader)
        .await
        .expect("new leader")
        .batch_execute("CREATE TABLE after_failover AS SELECT 7 AS x")
        .await
        .expect("a write on the new leader");
    let wal = ha.nodes[leader].data_dir.join("pg_wal");
    let mut removed = 0;
    for entry in std::fs::read_dir(&wal).expect("pg_wal") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
            std::fs::remove_file(&path).expect("remove a WAL segment");
            removed += 1;
        }
    }
    assert!(removed > 0, "the old primary had WAL segments");
    ha.start_agent(leader);
    let (l, e) = ha.settled(2, new_epoch, HEAL).await;
    assert_eq!((l, e), (new_leader, new_epoch), "the new leader stays");
    let x: i32 = eventually(
        HEAL,
        "the old primary has the new leader's data",
        || async {
            let c = ha.direct(leader).await?;
            c.query_one("SELECT x FROM after_failover", &[])
                .await
                .ok()
                .map(|r| r.get(0))
        },
    )
    .await;
    assert_eq!(x, 7);
    let log = ha.agent_log(leader);
    assert!(
        log.contains("action=Rewind") && log.contains("action=Reclone"),
        "a rewind was tried, then a new clone:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_is_replaced_and_rejoins() {
    let ha = Ha::start(3, "", &|_| String::new()).await;
    let (leader, epoch) = ha.settled(2, 1, BOOT).await;
    let w = ha.writer(WRITE_EVERY).await;
    wait_acks(&w, 20).await;
    ha.signal_tree(leader, Signal::SIGSTOP);
    let (new_leader, new_epoch) = ha.settled(1, epoch + 1, HEAL).await;
    assert_ne!(new_leader, leader);
    wait_acks(&w, 50).await;
    ha.signal_tree(leader, Signal::SIGCONT);
    // Woken, the old primary's agent finds its lease long gone: it fences before anything
    // else, then rejoins.
    let (l, _) = ha.settled(2, new_epoch, HEAL).await;
    assert_eq!(l, new_leader);
    wait_acks(&w, 20).await;
    let log = w.stop();
    log.writers_in_order()
        .expect("the old primary took no write after the promotion");
    assert!(
        ha.agent_log(leader).contains("fencing"),
        "the woken leader fenced itself:\n{}",
        ha.agent_log(leader)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_from_etcd_fences_itself_before_anyone_is_promoted() {
    let ha = Ha::start(3, "", &|_| String::new()).await;
    let (leader, epoch) = ha.settled(2, 1, BOOT).await;
    let direct = ha.direct(leader).await.expect("connect to the leader");
    direct
        .batch_execute("CREATE TABLE probe (x int)")
        .await
        .expect("create");
    let w = ha.writer(WRITE_EVERY).await;
    wait_acks(&w, 20).await;
    ha.link(leader, Fault::Blackhole);
    // Clients can still reach its PostgreSQL; the moment a new leader's epoch appears, the old
    // one must already refuse writes.
    let store = ha.store().await;
    eventually(HEAL, "a new epoch", || async {
        let l = store.leader().await.ok()??;
        (l.epoch.0 > epoch).then_some(())
    })
    .await;
    let late = direct.execute("INSERT INTO probe VALUES (1)", &[]).await;
    assert!(
        late.is_err(),
        "the old leader took a write after the new epoch"
    );
    let (new_leader, new_epoch) = ha.settled(1, epoch + 1, HEAL).await;
    assert_ne!(new_leader, leader);
    ha.link(leader, Fault::Pass);
    let (l, _) = ha.settled(2, new_epoch, HEAL).await;
    assert_eq!(l, new_leader, "healed: the old leader rejoined");
    wait_acks(&w, 20).await;
    let log = w.stop();
    log.writers_in_order().expect("one writer at a time");
    // The proxy saw the lease run out unrenewed and held new transactions before the fence
    // stopped the server: the writer, between transactions, saw no error at all.
    assert!(
        log.errors.is_empty(),
        "clients between transactions saw errors: {:?}",
        log.errors
    );
    assert_eq!(log.reconnects, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_blip_to_etcd_causes_no_failover() {
    let ha = Ha::start(3, "", &|_| String::new()).await;
    let (leader, epoch) = ha.settled(2, 1, BOOT).await;
    let w = ha.writer(WRITE_EVERY).await;
    wait_acks(&w, 20).await;
    // 3 s of silence between every agent and etcd, with the default ttl of 7 s.
    for i in 0..3 {
        ha.link(i, Fault::Blackhole);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..3 {
        ha.link(i, Fault::Pass);
    }
    // Past the lease's lifetime: had anything lapsed, a new epoch would be out by now.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (l, e) = ha.settled(2, 1, HEAL).await;
    assert_eq!((l, e), (leader, epoch), "no failover for a 3 s blip");
    wait_acks(&w, 20).await;
    let log = w.stop();
    assert!(
        log.errors.is_empty(),
        "clients saw errors: {:?}",
        log.errors
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_lost_by_every_agent_promotes_nobody_and_heals() {
    let ha = Ha::start(3, "", &|_| String::new()).await;
    let (_, epoch) = ha.settled(2, 1, BOOT).await;
    let w = ha.writer(WRITE_EVERY).await;
    wait_acks(&w, 20).await;
    for i in 0..3 {
        ha.link(i, Fault::Blackhole);
    }
    // The leader fences itself, the key lapses, and nobody can take it: past twice the lease,
    // no epoch has been granted.
    let store = ha.store().await;
    eventually(HEAL, "the leader key lapses", || async {
        store.leader().await.ok()?.is_none().then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(
        store.last_epoch().await.expect("epoch").map(|e| e.0),
        Some(epoch),
        "nobody was promoted"
    );
    for i in 0..3 {
        ha.link(i, Fault::Pass);
    }
    ha.settled(2, epoch + 1, HEAL).await;
    wait_acks(&w, 20).await;
    w.stop().writers_in_order().expect("one writer at a time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_member_may_take_over_and_each_says_why() {
    let ha = Ha::start(3, "maximum_lag_on_failover = \"1MB\"", &|i| {
        if i == 1 {
            "nofailover = true".into()
        } else {
            String::new()
        }
    })
    .await;
    let (leader, _) = ha.settled(2, 1, BOOT).await;
    assert_eq!(leader, 0);
    // n3 stops receiving; 40 MB more are written and reach n2 only. What the kernel holds
    // for n3 (n1's send buffer, n3's receive buffer: a few MB on loopback, delivered even
    // after n1 dies) still leaves it far more than 1 MB behind.
    ha.signal_tree(2, Signal::SIGSTOP);
    let c = ha.direct(0).await.expect("leader");
    c.batch_execute(
        "CREATE TABLE big AS SELECT repeat('x', 1000) AS pad FROM generate_series(1, 40000)",
    )
    .await
    .expect("write 40 MB");
    let target: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    eventually(
        HEAL,
        "n2 received it and the leader recorded it",
        || async {
            let n2 = ha.member(1).await?;
            let lsn: pgwarden_core::Lsn = n2.lsn?.parse().ok()?;
            let store = ha.store().await;
            let last = store.last_leader().await.ok()??.lsn;
            (lsn >= target.parse().ok()? && last >= target.parse().ok()?).then_some(())
        },
    )
    .await;
    let mut ha = ha;
    // Wholly gone before n3 wakes, or its WAL receiver would still fetch the rest.
    ha.kill_agent_and_postgres(0).await;
    ha.signal_tree(2, Signal::SIGCONT);
    let store = ha.store().await;
    let reasons = eventually(
        HEAL,
        "both replicas say why they do not take over",
        || async {
            let n2 = ha.member(1).await?.reason?;
            let n3 = ha.member(2).await?.reason?;
            (n2.contains("nofailover") && n3.contains("maximum_lag_on_failover"))
                .then_some((n2, n3))
        },
    )
    .await;
    eprintln!("reasons: {reasons:?}");
    // The dead leader's key lapses with its lease; nobody takes it, now or later.
    eventually(HEAL, "the dead leader's key lapses", || async {
        store.leader().await.ok()?.is_none().then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        store.leader().await.expect("leader").is_none(),
        "nobody may lead"
    );
    // `pgwarden status` shows it from the store, with each member's reason, and exits 1.
    let (code, v) = ha.status();
    assert_eq!(code, 1, "{v}");
    assert!(v["ha"]["leader"].is_null(), "{v}");
    let reason = |name: &str| {
        v["ha"]["members"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == name))
            .and_then(|m| m["reason"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    assert!(reason("n3").contains("maximum_lag_on_failover"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_mode_loses_no_acknowledged_commit() {
    let mut ha = Ha::start(3, "synchronous_mode = \"on\"", &|_| String::new()).await;
    let (leader, epoch) = ha.settled(2, 1, BOOT).await;
    let store = ha.store().await;
    eventually(HEAL, "a synchronous standby is recorded", || async {
        let set = store.synchronous_set().await.ok()??;
        (!set.is_empty()).then_some(())
    })
    .await;
    let w = ha.writer(Duration::from_millis(5)).await;
    wait_acks(&w, 50).await;
    ha.kill_agent(leader);
    let (new_leader, _) = ha.settled(1, epoch + 1, HEAL).await;
    wait_acks(&w, 50).await;
    let log = w.stop();
    log.writers_in_order().expect("one writer at a time");
    assert_eq!(
        ha.lost(new_leader, &log).await,
        Vec::<i64>::new(),
        "an acknowledged commit was lost"
    );
}

/// In synchronous mode the synchronous standby is promoted even when the asynchronous one
/// received more (WAL of commits not yet acknowledged). The asynchronous one's WAL then goes past
/// the new timeline's fork: it cannot follow, although it has fetched the new timeline's history,
/// and it rewinds and streams (found by the bench: such a standby had waited, silent, forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asynchronous_standby_ahead_of_the_promoted_one_rewinds_and_follows() {
    let mut ha = Ha::start(3, "synchronous_mode = \"on\"", &|_| String::new()).await;
    let (leader, epoch) = ha.settled(2, 1, BOOT).await;
    let store = ha.store().await;
    let sync = eventually(HEAL, "a synchronous standby is recorded", || async {
        let set = store.synchronous_set().await.ok()??;
        set.first().map(|n| ha.index(n.as_str()))
    })
    .await;
    let ahead = (0..3)
        .find(|&i| i != leader && i != sync)
        .expect("the other");
    let c = ha.direct(leader).await.expect("leader");
    let start: pgwarden_core::Lsn = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get::<_, String>(0)
        .parse()
        .expect("lsn");
    // The synchronous standby stops receiving; 40 MB are written, reach the asynchronous one,
    // and are never acknowledged (the commit waits for the stopped one). What the kernel
    // buffers for the stopped one is a few MB.
    ha.signal_tree(sync, Signal::SIGSTOP);
    let write = tokio::spawn(async move {
        c.batch_execute(
            "CREATE TABLE big AS SELECT repeat('x', 1000) AS pad FROM generate_series(1, 40000)",
        )
        .await
    });
    eventually(HEAL, "the asynchronous standby received 30 MB", || async {
        let lsn: pgwarden_core::Lsn = ha.member(ahead).await?.lsn?.parse().ok()?;
        (lsn.0 >= start.0 + (30 << 20)).then_some(())
    })
    .await;
    ha.kill_agent_and_postgres(leader).await;
    ha.signal_tree(sync, Signal::SIGCONT);
    assert!(
        write.await.expect("join").is_err(),
        "the commit was not acknowledged"
    );
    let (new_leader, _) = ha.settled(1, epoch + 1, HEAL).await;
    assert_eq!(
        new_leader, sync,
        "only the synchronous standby may be promoted"
    );
    assert!(
        ha.agent_log(ahead).contains("action=Rewind"),
        "{}",
        ha.agent_log(ahead)
    );
    // The table was never committed: the rewound standby follows the leader's history.
    let on_ahead = ha.direct(ahead).await.expect("the rewound standby");
    let found = on_ahead
        .query_one("SELECT to_regclass('big') IS NOT NULL", &[])
        .await
        .expect("query");
    assert!(!found.get::<_, bool>(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_synchronous_mode_waits_for_a_standby() {
    let mut ha = Ha::start(2, "synchronous_mode = \"strict\"", &|_| String::new()).await;
    ha.settled(1, 1, BOOT).await;
    let store = ha.store().await;
    eventually(HEAL, "n2 is the recorded synchronous standby", || async {
        let set = store.synchronous_set().await.ok()??;
        (set.len() == 1).then_some(())
    })
    .await;
    let w = ha.writer(WRITE_EVERY).await;
    wait_acks(&w, 20).await;
    ha.kill_agent(1);
    // With its only standby gone, strict mode acknowledges nothing...
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stalled = w.acked();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        w.acked() <= stalled + 1,
        "writes went on without a synchronous standby"
    );
    // ...until it is back.
    ha.start_agent(1);
    wait_acks(&w, 20).await;
    w.stop().writers_in_order().expect("one writer");
}

/// At most the statement running when the server died failed (the next ones waited for the
/// cluster), and the writer's session outlived its server.
fn one_error_and_the_same_session(log: &common::ha::Log) {
    assert!(
        log.errors.len() <= 1,
        "clients between transactions saw errors: {:?}",
        log.errors
    );
    assert_eq!(
        log.reconnects, 0,
        "the writer's session outlived its server"
    );
}

/// Reads through a proxy that follows the store: to the replicas the agents report, each read
/// seeing its own session's last write, before and after a failover.
#[tokio::test]
async fn reads_go_to_the_replicas_the_store_reports_and_see_their_writes_across_a_failover() {
    let mut ha = Ha::start(3, "", &|_| String::new()).await;
    let (leader, epoch) = ha.settled(2, 1, BOOT).await;
    let c = eventually(BOOT, "the proxy serves", || ha.proxied()).await;
    c.batch_execute(
        "CREATE TABLE counter (k int PRIMARY KEY, v int); INSERT INTO counter VALUES (1, 0)",
    )
    .await
    .expect("table through the proxy");
    let leader_port = i32::from(ha.nodes[leader].pg_port);
    // Once the agents have reported their replicas' lag, reads leave the leader.
    eventually(HEAL, "a read served by a replica", || async {
        let row = c.query_one("SELECT inet_server_port()", &[]).await.ok()?;
        (row.get::<_, i32>(0) != leader_port).then_some(())
    })
    .await;
    let on_replicas = read_your_writes(&c, 1, 200, leader_port).await;
    assert!(on_replicas > 0, "some reads ran on replicas");
    ha.kill_agent_and_postgres(leader).await;
    let (new_leader, _) = ha.settled(1, epoch + 1, HEAL).await;
    assert_ne!(new_leader, leader);
    // The same session goes on under the new leader (its floor from the old one starts over).
    eventually(
        HEAL,
        "the session writes through the new leader",
        || async {
            c.batch_execute("UPDATE counter SET v = 0 WHERE k = 1")
                .await
                .ok()
        },
    )
    .await;
    read_your_writes(&c, 1000, 100, leader_port).await;
    let fresh = eventually(HEAL, "a new session", || ha.proxied()).await;
    read_your_writes(&fresh, 2000, 50, leader_port).await;
}

/// `n` updates of the counter through `c`, each read back at once: every read must see its
/// write. Returns how many reads ran elsewhere than on `leader_port`.
async fn read_your_writes(c: &tokio_postgres::Client, from: i32, n: i32, leader_port: i32) -> i32 {
    let mut elsewhere = 0;
    for i in from..from + n {
        c.execute("UPDATE counter SET v = $1 WHERE k = 1", &[&i])
            .await
            .expect("update");
        let row = c
            .query_one("SELECT v, inet_server_port() FROM counter WHERE k = 1", &[])
            .await
            .expect("read");
        assert_eq!(
            row.get::<_, i32>(0),
            i,
            "a read that does not see its write"
        );
        elsewhere += i32::from(row.get::<_, i32>(1) != leader_port);
    }
    elsewhere
}

/// `pgwarden list --json` of the test cluster.
fn listed(ha: &Ha) -> serde_json::Value {
    let config = ha.dir.path().join("proxy.toml");
    let r = common::run(&["list", "-c", config.to_str().expect("path"), "--json"]);
    serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("list --json ({e}): {}{}", r.stdout, r.stderr))
}

fn member<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == name))
        .unwrap_or_else(|| panic!("{name} missing in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_agents_leave_a_crashed_primary_down_until_resumed() {
    let ha = Ha::start(3, "", &|_| String::new()).await;
    let (leader, epoch) = ha.settled(2, 1, BOOT).await;
    let name = ha.nodes[leader].name.clone();
    let config = ha.dir.path().join("proxy.toml");
    let config = config.to_str().expect("path");
    let r = common::run(&["pause", "-c", config]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    eventually(HEAL, "every member says it is paused", || async {
        let v = listed(&ha);
        let all = v["members"].as_array()?.iter().all(|m| {
            m["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("paused"))
                && m["reason_code"] == "paused"
        });
        (v["paused"] == true && all).then_some(())
    })
    .await;
    let r = common::run(&["status", "-c", config]);
    assert_eq!(r.code, 1, "paused is a warning: {}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("PAUSED"), "{}", r.stdout);

    let pid = ha.postmaster_pid(leader).expect("postmaster");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
    eventually(
        HEAL,
        "the crash reported, its restart held back",
        || async {
            let v = listed(&ha);
            let m = member(&v, &name);
            (m["state"] == "stopped" && m["reason"].as_str()?.contains("held back")).then_some(())
        },
    )
    .await;
    // The proxy's console gives each node's agent's reason.
    eventually(HEAL, "SHOW NODES says why the leader is down", || async {
        let console = common::ha::console(ha.proxy_port).await?;
        let rows = console.simple_query("SHOW NODES").await.ok()?;
        rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r)
                if r.get("name") == Some(name.as_str())
                    && r.get("agent_reason")
                        .is_some_and(|x| x.contains("held back"))
                    && r.get("agent_reason_code") == Some("paused") =>
            {
                Some(())
            }
            _ => None,
        })
    })
    .await;
    // Longer than primary_restart_timeout, nobody restarts it, promotes or takes the key.
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(8) {
        let v = listed(&ha);
        assert_eq!(v["leader"], name.as_str(), "the key stays: {v}");
        assert_eq!(v["epoch"], epoch, "no failover: {v}");
        assert_eq!(member(&v, &name)["state"], "stopped", "no restart: {v}");
        let primaries = v["members"]
            .as_array()
            .expect("members")
            .iter()
            .filter(|m| m["role"] == "leader")
            .count();
        assert_eq!(primaries, 0, "nobody promoted: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let r = common::run(&["resume", "-c", config]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let (again, same) = ha.settled(2, 1, HEAL).await;
    assert_eq!(
        (again, same),
        (leader, epoch),
        "resumed: restarted in place, no failover"
    );
    assert_eq!(listed(&ha)["paused"], false);
}

/// Failsafe mode: etcd stops answering everybody (frozen) for twice the lease under a write
/// load. The members confirm to each other over their APIs that none reaches the store, so the
/// leader keeps its primary, and the proxy, asking the leader, keeps writing to it: no client
/// error, one writer, and the same epoch when etcd is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failsafe_keeps_a_healthy_leader_writing_while_etcd_is_stopped() {
    let ha = Ha::start(3, "failsafe = true", &|_| String::new()).await;
    let (leader, epoch) = ha.settled(2, 1, BOOT).await;
    let w = ha.writer(WRITE_EVERY).await;
    wait_acks(&w, 20).await;
    let etcd = nix::unistd::Pid::from_raw(ha.etcd.pid() as i32);
    nix::sys::signal::kill(etcd, Signal::SIGSTOP).expect("stop etcd");
    let stopped = Instant::now();
    // The outage lasts twice the lease (7 s): without failsafe the leader would fence at 5 s.
    let before = w.acked();
    tokio::time::sleep(Duration::from_secs(14)).await;
    let during = w.acked() - before;
    nix::sys::signal::kill(etcd, Signal::SIGCONT).expect("continue etcd");
    let confirmed = ha
        .agent_log(leader)
        .matches("every member confirmed this leader")
        .count();
    assert!(
        confirmed >= 3,
        "the leader was confirmed each round: {confirmed}"
    );
    assert!(
        during as f64 >= 0.5 * stopped.elapsed().as_secs_f64() / WRITE_EVERY.as_secs_f64(),
        "writes went on while etcd was stopped: {during}"
    );
    let (l, e) = ha.settled(2, epoch, HEAL).await;
    assert_eq!(
        (l, e),
        (leader, epoch),
        "the same leader under the same epoch"
    );
    wait_acks(&w, 20).await;
    let log = w.stop();
    assert_eq!(log.errors, Vec::new(), "no client saw an error");
    assert_eq!(log.reconnects, 0);
    log.writers_in_order().expect("one writer");
    assert_eq!(ha.lost(leader, &log).await, Vec::<i64>::new());
}

/// Failsafe mode, any doubt: the leader alone is cut from etcd while the others reach it.
/// They refuse to confirm, so it fences itself at its deadline as without failsafe, and one of
/// them takes over: never two writers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failsafe_fences_a_leader_the_others_do_not_confirm() {
    let ha = Ha::start(3, "failsafe = true", &|_| String::new()).await;
    let (leader, epoch) = ha.settled(2, 1, BOOT).await;
    let w = ha.writer(WRITE_EVERY).await;
    wait_acks(&w, 20).await;
    ha.link(leader, Fault::Blackhole);
    let (new_leader, _) = ha.settled(1, epoch + 1, HEAL).await;
    assert_ne!(new_leader, leader);
    wait_acks(&w, 20).await;
    assert!(
        ha.agent_log(leader).contains("not every member confirmed"),
        "the others refused"
    );
    ha.link(leader, Fault::Pass);
    ha.settled(2, epoch + 1, HEAL).await;
    w.stop().writers_in_order().expect("one writer at a time");
}
