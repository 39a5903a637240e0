//! Through the proxy, against real PostgreSQL.

mod common;

use std::time::Duration;

use common::setup;
use tokio_postgres::error::SqlState;

#[tokio::test]
async fn simple_and_extended_queries_work() {
    let s = setup(0, "").await;
    let c = s.app().await;
    c.batch_execute("CREATE TABLE t (id int primary key, v text); INSERT INTO t VALUES (1, 'one')")
        .await
        .expect("simple protocol");
    let row = c
        .query_one("SELECT v FROM t WHERE id = $1", &[&1i32])
        .await
        .expect("extended protocol");
    assert_eq!(row.get::<_, String>(0), "one");
    let rows = c
        .query("SELECT generate_series(1, 10000)", &[])
        .await
        .expect("many rows");
    assert_eq!(rows.len(), 10000);
    let err = c.batch_execute("SELECT 1/0").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO));
    // The session is still usable after an error.
    assert_eq!(
        c.query_one("SELECT 2", &[])
            .await
            .expect("after error")
            .get::<_, i32>(0),
        2
    );
}

#[tokio::test]
async fn transaction_mode_shares_servers_between_transactions_not_within() {
    let s = setup(0, "default_pool_size = 1").await;
    let (a, b) = (s.app().await, s.app().await);
    let pid_a: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("a")
        .get(0);
    let pid_b: i32 = b
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("b")
        .get(0);
    assert_eq!(pid_a, pid_b, "one server, shared between clients");

    // Inside a transaction the client keeps its server; the other waits for it.
    a.batch_execute("BEGIN").await.expect("begin");
    a.batch_execute("CREATE TEMP TABLE only_in_this_tx (x int) ON COMMIT DROP")
        .await
        .expect("temp");
    let waiting = tokio::spawn(async move {
        b.query_one("SELECT 1", &[])
            .await
            .map(|r| r.get::<_, i32>(0))
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiting.is_finished(),
        "b must wait while a's transaction holds the only server"
    );
    a.batch_execute("INSERT INTO only_in_this_tx VALUES (1); COMMIT")
        .await
        .expect("same server in tx");
    assert_eq!(
        waiting.await.expect("join").expect("b after a committed"),
        1
    );
}
