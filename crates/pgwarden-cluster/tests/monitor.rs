//! The monitor actor against a real cluster.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pgwarden_config::Config;
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
        assert_eq!(v.primary().map(|p| p.name.as_str()), Some("n1"));
        assert_eq!(v.epoch, 1);
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
                (v.primary().map(|p| p.name.as_str()) == Some("n2")).then_some(v)
            }
        },
    )
    .await;
    assert_eq!(v.epoch, 2);
    assert_eq!(v.primary().and_then(|p| p.timeline), Some(2));

    // The old primary going away does not change who takes writes, so not the epoch either.
    cluster.stop_node(0).await;
    eventually(Duration::from_secs(10), "n1 seen down", || {
        let rx = &rx;
        async move { (rx.borrow().nodes[0].role == pgwarden_cluster::Role::Down).then_some(()) }
    })
    .await;
    let v = rx.borrow().clone();
    assert_eq!((v.epoch, v.primary), (2, Some(1)));

    // Updates keep coming at the configured interval.
    rx.mark_unchanged();
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .expect("a new view")
        .expect("sender alive");
}
