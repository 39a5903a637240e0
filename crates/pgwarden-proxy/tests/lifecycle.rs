//! Shutdown with running transactions, idle-in-transaction timeouts, warm pools.

mod common;

use std::time::{Duration, Instant};

use common::raw::error_code;
use common::{setup, APP_PASSWORD};
use pgwarden_testkit::eventually;

async fn make_table(s: &common::Setup) {
    s.cluster
        .client_db(0, "app")
        .await
        .batch_execute("CREATE TABLE app_t (x int); GRANT ALL ON app_t TO app")
        .await
        .expect("create table");
}

async fn rows_in_table(s: &common::Setup) -> i64 {
    s.cluster
        .client_db(0, "app")
        .await
        .query_one("SELECT count(*) FROM app_t", &[])
        .await
        .expect("count")
        .get(0)
}

async fn app_backends(s: &common::Setup) -> i64 {
    s.cluster
        .client(0)
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
            &[],
        )
        .await
        .expect("count")
        .get(0)
}

#[tokio::test]
async fn shutdown_lets_running_transactions_finish_and_ends_idle_clients() {
    let mut s = setup(0, "shutdown_timeout = \"20s\"").await;
    make_table(&s).await;
    let a = s.app().await;
    a.batch_execute("BEGIN; INSERT INTO public.app_t VALUES (1)")
        .await
        .expect("begin");
    let idle = s.app().await;
    idle.batch_execute("SELECT 1")
        .await
        .expect("idle client works");
    let started = Instant::now();
    s.begin_shutdown();
    // No new clients.
    eventually(Duration::from_secs(5), "the listener closed", || async {
        s.try_connect("app", APP_PASSWORD, "app")
            .await
            .is_err()
            .then_some(())
    })
    .await;
    // The idle client is ended at once.
    eventually(Duration::from_secs(5), "the idle client ended", || async {
        idle.is_closed().then_some(())
    })
    .await;
    // The running transaction goes on and commits.
    a.batch_execute("INSERT INTO public.app_t VALUES (2); COMMIT")
        .await
        .expect("the transaction finishes during shutdown");
    // Then it is ended too, and the proxy stops well before the grace period.
    eventually(
        Duration::from_secs(5),
        "a ended after its transaction",
        || async { a.is_closed().then_some(()) },
    )
    .await;
    tokio::time::timeout(Duration::from_secs(5), s.stopped())
        .await
        .expect("the proxy stops once its clients are gone");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(rows_in_table(&s).await, 2, "the transaction committed");
}

#[tokio::test]
async fn a_transaction_running_past_the_grace_period_is_ended_and_rolled_back() {
    let mut s = setup(0, "shutdown_timeout = \"500ms\"").await;
    make_table(&s).await;
    let mut a = s.raw(&[]).await;
    a.query("BEGIN; INSERT INTO public.app_t VALUES (1)");
    a.flush().await;
    a.until_ready().await;
    let started = Instant::now();
    s.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(5), s.stopped())
        .await
        .expect("the proxy stops after the grace period");
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "stopped before the grace period"
    );
    let (tag, body) = a.recv().await;
    assert_eq!(tag, b'E');
    assert!(String::from_utf8_lossy(&body).contains("57P01"));
    eventually(
        Duration::from_secs(5),
        "the open transaction rolled back",
        || async {
            let busy = app_backends(&s).await;
            (rows_in_table(&s).await == 0 && busy == 0).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_client_idle_in_a_transaction_is_ended_and_its_server_freed() {
    let s = setup(
        0,
        "default_pool_size = 1\nidle_transaction_timeout = \"300ms\"",
    )
    .await;
    make_table(&s).await;
    let mut a = s.raw(&[]).await;
    a.query("BEGIN; INSERT INTO public.app_t VALUES (1)");
    a.flush().await;
    a.until_ready().await;
    let started = Instant::now();
    let (tag, msg) = a.recv().await;
    assert_eq!(tag, b'E');
    assert_eq!(error_code(&[(tag, msg)]).as_deref(), Some("25P03"));
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(a.try_recv().await.is_none(), "disconnected");
    // The only server is free again, and a's work was rolled back.
    let b = s.app().await;
    let n: i64 = b
        .query_one("SELECT count(*) FROM public.app_t", &[])
        .await
        .expect("b gets the server")
        .get(0);
    assert_eq!(n, 0);
    // A transaction that keeps working is not affected.
    b.batch_execute("BEGIN").await.expect("begin");
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        b.batch_execute("SELECT 1").await.expect("active, not idle");
    }
    b.batch_execute("COMMIT").await.expect("commit");
}

#[tokio::test]
async fn min_pool_size_keeps_warm_connections() {
    let s = setup(0, "default_pool_size = 5\nmin_pool_size = 3").await;
    s.app()
        .await
        .batch_execute("SELECT 1")
        .await
        .expect("first login");
    eventually(
        Duration::from_secs(10),
        "three server connections",
        || async { (app_backends(&s).await == 3).then_some(()) },
    )
    .await;
}
