//! The same scenarios against both stores: the in-process one and a real etcd started by the
//! testkit. What the agents rely on must hold for both.

use std::sync::Arc;
use std::time::Duration;

use pgwarden_core::{Epoch, NodeId};
use pgwarden_dcs::etcd::{EtcdKv, EtcdOptions};
use pgwarden_dcs::memory::MemoryKv;
use pgwarden_dcs::{ClusterStore, Kv, Member};
use pgwarden_testkit::etcd::Etcd;
use pgwarden_testkit::eventually;

const TTL: Duration = Duration::from_secs(2);

async fn scenarios<K: Kv>(store: ClusterStore<K>) {
    let (n1, n2) = (NodeId::new("n1"), NodeId::new("n2"));
    let mut changes = store.watch().await.expect("watch");
    changes.borrow_and_update();

    // One leader, epochs never given twice.
    let l1 = store.kv().grant(TTL).await.expect("lease");
    let l2 = store
        .kv()
        .grant(Duration::from_secs(30))
        .await
        .expect("lease");
    let first = store.take_leader(&n1, l1).await.expect("take").expect("n1");
    assert_eq!(first.epoch, Epoch(1));
    assert!(store.take_leader(&n2, l2).await.expect("take").is_none());
    assert!(
        changes.has_changed().expect("watching"),
        "the take was seen"
    );
    changes.borrow_and_update();

    // Members live with their lease.
    store
        .put_member(&n1, &serde_json::json!({"role": "primary"}), l1)
        .await
        .expect("member");
    store
        .put_member(&n2, &serde_json::json!({"role": "replica"}), l2)
        .await
        .expect("member");
    let members: Vec<Member<serde_json::Value>> = store.members().await.expect("members");
    assert_eq!(members.len(), 2);

    // n1 stops renewing: its leader key and member key go by themselves, and the watch sees it.
    tokio::time::timeout(Duration::from_secs(10), changes.changed())
        .await
        .expect("the expiry is seen without any other operation")
        .expect("watching");
    eventually(Duration::from_secs(10), "n1's lease expired", || {
        let store = &store;
        async move { store.leader().await.ok()?.is_none().then_some(()) }
    })
    .await;
    let members: Vec<Member<serde_json::Value>> = store.members().await.expect("members");
    assert_eq!(
        members.iter().map(|m| m.node.as_str()).collect::<Vec<_>>(),
        ["n2"]
    );
    assert!(
        store.kv().keep_alive(l1).await.is_err(),
        "the lease is gone"
    );
    assert_eq!(store.kv().time_to_live(l1).await.expect("ttl"), None);
    // A live lease has at most its TTL left, in whole seconds, and all of it after a renewal.
    store.kv().keep_alive(l2).await.expect("n2 renews");
    let left = store
        .kv()
        .time_to_live(l2)
        .await
        .expect("ttl")
        .expect("alive");
    assert!(
        left <= Duration::from_secs(30) && left >= Duration::from_secs(28),
        "{left:?}"
    );
    assert_eq!(left.subsec_nanos(), 0);

    // The next leader gets the next epoch; a release by a stale holder does nothing.
    let second = store.take_leader(&n2, l2).await.expect("take").expect("n2");
    assert_eq!(second.epoch, Epoch(2));
    assert!(!store.release_leader(&first).await.expect("release"));
    store.kv().keep_alive(l2).await.expect("n2 renews");
    assert!(store.release_leader(&second).await.expect("release"));
    assert!(store.leader().await.expect("leader").is_none());

    // initialize is taken once.
    assert!(store.initialize(&n2).await.expect("init"));
    assert!(!store.initialize(&n1).await.expect("init"));
    store.kv().revoke(l2).await.expect("revoke");
}

/// Takers on several threads at once: exactly one wins, and the key is written once.
async fn race<K: Kv>(store: Arc<ClusterStore<K>>) {
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let lease = store
                .kv()
                .grant(Duration::from_secs(30))
                .await
                .expect("lease");
            store
                .take_leader(&NodeId::new(&format!("r{i}")), lease)
                .await
                .expect("take")
        }));
    }
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.expect("task").is_some());
    }
    assert_eq!(winners, 1);
    let held = store.leader().await.expect("leader").expect("held");
    let raw = store
        .kv()
        .get("/pgwarden-test/race/leader")
        .await
        .expect("get")
        .expect("key");
    assert_eq!(raw.create_revision, raw.mod_revision, "written once");
    assert_eq!(held.revision, raw.mod_revision);
}

#[tokio::test]
async fn the_in_process_store() {
    scenarios(ClusterStore::new(MemoryKv::new(), "pgwarden-test", "main")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_store_races() {
    race(Arc::new(ClusterStore::new(
        MemoryKv::new(),
        "pgwarden-test",
        "race",
    )))
    .await;
}

#[tokio::test]
async fn etcd() {
    let etcd = Etcd::start().await;
    let kv = EtcdKv::connect(&EtcdOptions {
        endpoints: vec![etcd.endpoint()],
        timeout: Duration::from_secs(3),
        ..EtcdOptions::default()
    })
    .await
    .expect("connect to etcd");
    scenarios(ClusterStore::new(kv.clone(), "pgwarden-test", "main")).await;
    race(Arc::new(ClusterStore::new(
        kv.clone(),
        "pgwarden-test",
        "race",
    )))
    .await;

    // etcd gone: calls fail within their bound, as retryable errors, never hang.
    drop(etcd);
    let started = std::time::Instant::now();
    let e = kv
        .get("/pgwarden-test/main/leader")
        .await
        .expect_err("etcd is down");
    assert!(e.is_retryable(), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_unreachable_etcd_is_a_bounded_retryable_error() {
    let port = pgwarden_testkit::ports::free_ports(1)[0];
    let started = std::time::Instant::now();
    let r = EtcdKv::connect(&EtcdOptions {
        endpoints: vec![format!("127.0.0.1:{port}")],
        timeout: Duration::from_secs(1),
        ..EtcdOptions::default()
    })
    .await;
    match r {
        Err(e) => assert!(e.is_retryable(), "{e}"),
        // Connecting may be lazy: then the first call fails instead.
        Ok(kv) => {
            let e = kv.get("/x").await.expect_err("nothing listens");
            assert!(e.is_retryable(), "{e}");
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}
