//! The monitor actor against a real cluster.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pgwarden_config::Config;
use pgwarden_core::Epoch;
use pgwarden_testkit::{eventually, Cluster};

#[tokio::test]
async fn follows_a_promotion_and_bumps_the_epoch_once() {
    let mut cluster = Cluster::builder()
        .replicas(1)
        .monitor("interval", "\"200ms\"")
        .build()
        .await;
    let config =
        Arc::new(Config::from_toml(&cluster.config_toml(), Path::new("/")).expect("config"));
    let mut rx = pgwarden_cluster::monitor::spawn(config).await;
    {
        let v = rx.borrow_and_update().clone();
        assert_eq!(v.leader.as_ref().map(|l| l.as_str()), Some("n1"));
        assert_eq!(v.epoch, Epoch(1));
        assert_eq!(v.nodes[1].replay_lag_bytes, Some(0));
    }

    // Promote n2 while n1 still runs: n2 is on the newer timeline and takes over.
    cluster.execute(1, "SELECT pg_promote()").await;
    let v = eventually(
        Duration::from_secs(10),
        "monitor follows the promotion",
        || {
            let rx = &rx;
            async move {
                let v = rx.borrow().clone();
                (v.leader.as_ref().map(|l| l.as_str()) == Some("n2")).then_some(v)
            }
        },
    )
    .await;
    assert_eq!(v.epoch, Epoch(2));
    assert_eq!(v.leader_node().and_then(|p| p.timeline), Some(2));
    assert!(
        v.refused.iter().any(|r| r.contains("deposed")),
        "the old primary, still up, is reported: {:?}",
        v.refused
    );

    // The old primary going away does not change who takes writes, so not the epoch either.
    cluster.stop_node(0).await;
    eventually(Duration::from_secs(10), "n1 seen down", || {
        let rx = &rx;
        async move { (rx.borrow().nodes[0].role == pgwarden_cluster::Role::Down).then_some(()) }
    })
    .await;
    let v = rx.borrow().clone();
    assert_eq!(
        (v.epoch, v.leader.as_ref().map(|l| l.as_str())),
        (Epoch(2), Some("n2"))
    );

    // Updates keep coming at the configured interval.
    rx.mark_unchanged();
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .expect("a new view")
        .expect("sender alive");
}

/// The monitor keeps one connection per node instead of logging in every round, and replaces
/// a kept connection that broke (the node restarted) within the same probe.
#[tokio::test]
async fn probes_reuse_one_connection_per_node_and_survive_a_restart() {
    let mut cluster = Cluster::builder().build().await;
    let config = Config::from_toml(&cluster.config_toml(), Path::new("/")).expect("config");
    let mut prober = pgwarden_cluster::probe::Prober::default();
    let monitor_backends = "SELECT count(*)::text, coalesce(min(pid), 0)::text \
        FROM pg_stat_activity WHERE application_name = 'pgwarden-monitor'";
    let mut pids = Vec::new();
    for _ in 0..3 {
        let samples = prober.probe_all(&config).await;
        assert!(
            matches!(
                samples[0],
                pgwarden_cluster::probe::NodeSample::Primary { .. }
            ),
            "{samples:?}"
        );
        let row = &cluster.query(0, monitor_backends).await[0];
        assert_eq!(row.get::<_, String>(0), "1", "one kept monitor connection");
        pids.push(row.get::<_, String>(1));
    }
    assert!(
        pids.windows(2).all(|w| w[0] == w[1]),
        "the same backend: {pids:?}"
    );

    cluster.stop_node(0).await;
    cluster.start_node(0).await;
    let samples = prober.probe_all(&config).await;
    assert!(
        matches!(
            samples[0],
            pgwarden_cluster::probe::NodeSample::Primary { .. }
        ),
        "a broken kept connection is replaced at once: {samples:?}"
    );
}
