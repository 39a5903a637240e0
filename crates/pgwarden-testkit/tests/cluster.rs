use std::time::{Duration, Instant};

use pgwarden_testkit::{eventually, Cluster};

#[tokio::test]
async fn a_row_written_on_the_primary_appears_on_both_standbys() {
    let t = Instant::now();
    let cluster = Cluster::builder().replicas(2).build().await;
    eprintln!("primary + 2 streaming standbys ready in {:?}", t.elapsed());
    assert_eq!(cluster.len(), 3);
    cluster
        .execute(
            0,
            "CREATE TABLE t (id int primary key, v text); INSERT INTO t VALUES (1, 'hello')",
        )
        .await;
    for i in 1..3 {
        let v = eventually(Duration::from_secs(10), "row replicated", || async {
            let client = cluster.client(i).await;
            let rows = client
                .query("SELECT v FROM t WHERE id = 1", &[])
                .await
                .ok()?;
            rows.first().map(|r| r.get::<_, String>(0))
        })
        .await;
        assert_eq!(v, "hello");
        // Standbys are read-only.
        let err = cluster
            .client(i)
            .await
            .batch_execute("INSERT INTO t VALUES (2, 'x')")
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
        );
    }
    // Each standby streams through its own physical slot.
    let slots = cluster
        .query(
            0,
            "SELECT slot_name::text FROM pg_replication_slots WHERE active ORDER BY 1",
        )
        .await;
    let names: Vec<String> = slots.iter().map(|r| r.get(0)).collect();
    assert_eq!(names, ["n2", "n3"]);
}

#[tokio::test]
async fn dropping_the_cluster_stops_postgres_and_removes_the_directory() {
    let cluster = Cluster::builder().replicas(1).build().await;
    let dir = cluster.dir().to_path_buf();
    let port = cluster.port(0);
    drop(cluster);
    assert!(!dir.exists(), "{} still exists", dir.display());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "postgres still listening"
    );
}

#[tokio::test]
async fn a_killed_node_restarts_and_catches_up() {
    let mut cluster = Cluster::builder().replicas(1).build().await;
    cluster.kill_node(1);
    cluster
        .execute(0, "CREATE TABLE k AS SELECT generate_series(1, 1000) AS x")
        .await;
    cluster.start_node(1).await;
    cluster.wait_streaming().await;
    cluster.wait_replayed(1).await;
    let n = cluster.query_text(1, "SELECT count(*)::text FROM k").await;
    assert_eq!(n.as_deref(), Some("1000"));
}

#[tokio::test]
async fn replay_can_be_paused_and_resumed() {
    let cluster = Cluster::builder().replicas(1).build().await;
    cluster.pause_replay(1).await;
    cluster.execute(0, "CREATE TABLE p AS SELECT 1 AS x").await;
    // Paused: the table does not appear on the standby even after its WAL arrived.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rows = cluster
        .query(1, "SELECT 1 FROM pg_class WHERE relname = 'p'")
        .await;
    assert!(rows.is_empty());
    cluster.resume_replay(1).await;
    cluster.wait_replayed(1).await;
    let rows = cluster
        .query(1, "SELECT 1 FROM pg_class WHERE relname = 'p'")
        .await;
    assert_eq!(rows.len(), 1);
}

/// Under root (as in CI) the testkit runs PostgreSQL as `postgres`; this re-runs a cluster test
/// from this same binary as the unprivileged `postgres` user, where no user switching happens.
/// When the suite itself runs unprivileged, every other test here already covers that case.
#[test]
fn the_testkit_works_for_an_ordinary_user() {
    use std::os::unix::process::CommandExt;
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let pg = nix::unistd::User::from_name("postgres")
        .expect("look up user")
        .expect("the postgres OS user exists");
    let exe = std::env::current_exe().expect("test binary path");
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "a_row_written_on_the_primary_appears_on_both_standbys",
            "--nocapture",
        ])
        .uid(pg.uid.as_raw())
        .gid(pg.gid.as_raw())
        .current_dir("/")
        .env("HOME", "/tmp")
        .output()
        .expect("run the test binary as postgres");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "as postgres:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("1 passed"),
        "the test did not run:\n{stdout}"
    );
}
