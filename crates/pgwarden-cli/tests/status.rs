//! `pgwarden status` against real clusters from the testkit.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::{node, run, status_json};
use pgwarden_core::Lsn;
use pgwarden_testkit::{eventually, Cluster, ReplicationMode};

fn lsn(v: &serde_json::Value) -> Lsn {
    v.as_str().expect("lsn string").parse().expect("valid lsn")
}

#[tokio::test]
async fn reports_roles_timelines_and_lsns() {
    let cluster = Cluster::builder().replicas(2).build().await;
    cluster
        .execute(0, "CREATE TABLE t AS SELECT generate_series(1, 100) AS x")
        .await;
    cluster.wait_replayed(1).await;
    cluster.wait_replayed(2).await;
    let before: Lsn = cluster
        .query_text(0, "SELECT pg_current_wal_lsn()::text")
        .await
        .expect("lsn")
        .parse()
        .expect("lsn");
    let config = cluster.write_config();
    let (code, s, stderr) = status_json(&config);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert_eq!(s["cluster"], "test");
    assert!(s["checked_at"].as_str().expect("checked_at").ends_with('Z'));

    let n1 = node(&s, "n1");
    assert_eq!(n1["role"], "primary");
    assert_eq!(n1["state"], "running");
    assert_eq!(n1["timeline"], 1);
    assert_eq!(n1["port"], cluster.port(0));
    assert!(n1["error"].is_null());
    let primary_lsn = lsn(&n1["lsn"]);
    assert!(primary_lsn >= before, "{primary_lsn} < {before}");

    for name in ["n2", "n3"] {
        let n = node(&s, name);
        assert_eq!(n["role"], "replica", "{n}");
        assert_eq!(n["state"], "streaming", "{n}");
        assert_eq!(n["timeline"], 1);
        assert!(lsn(&n["replay_lsn"]) >= before, "{n}");
        assert!(lsn(&n["receive_lsn"]) >= lsn(&n["replay_lsn"]), "{n}");
        assert_eq!(n["lag_level"], "LOW");
        assert_eq!(n["sync_state"], "async");
        for stage in ["sent", "write", "flush", "replay"] {
            assert!(n["lag_bytes"][stage].is_u64(), "{stage} in {n}");
        }
    }
    let p = &s["performance"];
    assert_eq!(p["replication_connections"], 2);
    assert_eq!(p["sync_replicas"], 0);
    assert!(p["commits"].as_i64().expect("commits") > 0);
    assert!(p["database_size_bytes"].as_i64().expect("size") > 1_000_000);
    let ratio = p["cache_hit_ratio"].as_f64().expect("ratio");
    assert!((0.0..=1.0).contains(&ratio));

    // The table names every node and its role.
    let table = run(&["status", "-c", config.to_str().expect("path")]);
    assert_eq!(table.code, 0);
    for want in [
        "NODE",
        "n1",
        "primary",
        "n2",
        "replica",
        "streaming",
        "cache hit",
    ] {
        assert!(
            table.stdout.contains(want),
            "{want} missing from:\n{}",
            table.stdout
        );
    }
    assert!(
        !table.stdout.contains('\x1b'),
        "no colour when stdout is not a terminal"
    );
}

#[tokio::test]
async fn a_paused_standby_goes_medium_then_high_while_the_other_stays_low() {
    let cluster = Cluster::builder()
        .replicas(2)
        .monitor("lag_medium", "\"1MB\"")
        .monitor("lag_high", "\"8MB\"")
        .build()
        .await;
    let config = cluster.write_config();
    cluster.execute(0, "CREATE TABLE filler (v text)").await;
    cluster.wait_replayed(1).await;
    cluster.pause_replay(1).await;

    let fill = |kb: i32| {
        format!("INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, {kb})")
    };
    cluster.execute(0, &fill(2_000)).await; // ~2 MB of WAL
    let s = eventually(Duration::from_secs(15), "n2 MEDIUM, n3 LOW", || async {
        let (_, s, _) = status_json(&config);
        (node(&s, "n2")["lag_level"] == "MEDIUM" && node(&s, "n3")["lag_level"] == "LOW")
            .then_some(s)
    })
    .await;
    let n2 = node(&s, "n2");
    let replay = n2["lag_bytes"]["replay"].as_u64().expect("replay lag");
    assert!((1 << 20..8 << 20).contains(&replay), "replay lag {replay}");
    // WAL still arrives: only replay is behind.
    assert!(n2["lag_bytes"]["flush"].as_u64().expect("flush") < replay);

    cluster.execute(0, &fill(8_000)).await; // ~8 MB more
    let s = eventually(Duration::from_secs(15), "n2 HIGH, n3 LOW", || async {
        let (_, s, _) = status_json(&config);
        (node(&s, "n2")["lag_level"] == "HIGH" && node(&s, "n3")["lag_level"] == "LOW").then_some(s)
    })
    .await;
    assert!(
        node(&s, "n2")["replay_lag_seconds"]
            .as_f64()
            .expect("seconds")
            > 0.0
    );

    cluster.resume_replay(1).await;
    eventually(Duration::from_secs(15), "n2 back to LOW", || async {
        let (code, s, _) = status_json(&config);
        (code == 0 && node(&s, "n2")["lag_level"] == "LOW").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_stopped_node_is_down_with_its_error_and_exit_1() {
    let mut cluster = Cluster::builder().replicas(2).build().await;
    cluster.stop_node(2).await;
    let config = cluster.write_config();
    let (code, s, stderr) = status_json(&config);
    assert_eq!(code, 1);
    let n3 = node(&s, "n3");
    assert_eq!(n3["role"], "down");
    assert_eq!(n3["state"], "connection refused");
    assert!(
        n3["error"]
            .as_str()
            .expect("error text")
            .contains("refused"),
        "{n3}"
    );
    assert_eq!(node(&s, "n1")["role"], "primary");
    assert_eq!(node(&s, "n2")["role"], "replica");
    assert!(stderr.contains("warning: node n3 is down"), "{stderr}");
}

#[tokio::test]
async fn a_node_that_never_answers_does_not_stall_the_command() {
    let cluster = Cluster::builder().replicas(1).build().await;
    // Accepts TCP connections (in the backlog) but never speaks: only the probe timeout ends it.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let mut toml = cluster
        .config_toml()
        .replace("[monitor]\n", "[monitor]\ntimeout = \"500ms\"\n");
    toml.push_str(&format!(
        "\n[[nodes]]\nname = \"n9\"\nhost = \"127.0.0.1\"\nport = {port}\n"
    ));
    let config = cluster.dir().join("silent.toml");
    std::fs::write(&config, toml).expect("write config");

    let started = Instant::now();
    let (code, s, _) = status_json(&config);
    let took = started.elapsed();
    assert_eq!(code, 1);
    assert_eq!(node(&s, "n9")["role"], "down");
    assert_eq!(node(&s, "n9")["state"], "timeout");
    assert_eq!(node(&s, "n1")["role"], "primary");
    assert_eq!(node(&s, "n2")["role"], "replica");
    // Bounded by the 500ms probe timeout (plus process start), not by the dead node.
    assert!(took < Duration::from_secs(5), "status took {took:?}");
    drop(silent);
}

#[tokio::test]
async fn sync_mode_shows_one_sync_and_one_potential_standby() {
    let cluster = Cluster::builder()
        .replicas(2)
        .mode(ReplicationMode::Sync, 1)
        .build()
        .await;
    let config = cluster.write_config();
    // PostgreSQL assigns sync priorities a moment after a standby starts streaming.
    let s = eventually(Duration::from_secs(10), "n2 sync, n3 potential", || async {
        let (code, s, _) = status_json(&config);
        let states = [
            node(&s, "n2")["sync_state"].clone(),
            node(&s, "n3")["sync_state"].clone(),
        ];
        (code == 0 && states == ["sync", "potential"]).then_some(s)
    })
    .await;
    assert_eq!(s["performance"]["sync_replicas"], 1);
    // A commit is acknowledged by the sync standby.
    cluster
        .execute(0, "CREATE TABLE synced AS SELECT 1 AS x")
        .await;
}

#[tokio::test]
async fn quorum_mode_shows_quorum_standbys() {
    let cluster = Cluster::builder()
        .replicas(2)
        .mode(ReplicationMode::Quorum, 1)
        .build()
        .await;
    let config = cluster.write_config();
    let s = eventually(Duration::from_secs(10), "both standbys quorum", || async {
        let (code, s, _) = status_json(&config);
        (code == 0
            && node(&s, "n2")["sync_state"] == "quorum"
            && node(&s, "n3")["sync_state"] == "quorum")
            .then_some(s)
    })
    .await;
    assert_eq!(s["performance"]["sync_replicas"], 2);
}

#[tokio::test]
async fn two_primaries_are_a_warning_and_exit_1() {
    let cluster = Cluster::builder().replicas(1).build().await;
    cluster.execute(1, "SELECT pg_promote()").await;
    let config = cluster.write_config();
    let (code, s, stderr) = eventually(Duration::from_secs(10), "n2 promoted", || async {
        let r = status_json(&config);
        (node(&r.1, "n2")["role"] == "primary").then_some(r)
    })
    .await;
    assert_eq!(code, 1);
    assert_eq!(node(&s, "n1")["role"], "primary");
    // The promoted standby moved to timeline 2.
    assert_eq!(node(&s, "n2")["timeline"], 2);
    assert!(stderr.contains("2 primaries: n1, n2"), "{stderr}");
}

#[test]
fn a_missing_config_is_exit_2() {
    let r = run(&["status", "-c", "/nonexistent/pgwarden.toml"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("cannot read config file /nonexistent/pgwarden.toml"),
        "{}",
        r.stderr
    );
}

#[test]
fn without_a_config_status_says_how_to_give_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = common::pgwarden()
        .arg("status")
        .current_dir(dir.path())
        .env_remove("PGWARDEN_CONFIG")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("-c FILE") && stderr.contains("$PGWARDEN_CONFIG"),
        "{stderr}"
    );
}

#[test]
fn demo_help_lists_the_replication_modes() {
    let r = run(&["demo", "--help"]);
    assert_eq!(r.code, 0);
    assert!(
        r.stdout.contains("async, sync (FIRST 1) or quorum (ANY 1)"),
        "{}",
        r.stdout
    );
}

#[tokio::test]
async fn watch_redraws_every_interval_until_ctrl_c() {
    use std::io::{BufRead, BufReader};
    let cluster = Cluster::builder()
        .replicas(1)
        .monitor("interval", "\"200ms\"")
        .build()
        .await;
    let config = cluster.write_config();
    let mut child = common::pgwarden()
        .args(["status", "--watch", "-c", config.to_str().expect("path")])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start status --watch");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .for_each(|l| drop(tx.send(l)))
    });
    let mut headers = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while headers < 3 {
        assert!(Instant::now() < deadline, "only {headers} redraws");
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            headers += usize::from(line.starts_with("Cluster test at"));
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
}
