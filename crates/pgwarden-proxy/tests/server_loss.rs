//! A server lost under a client's statements, against real PostgreSQL (the backend ended by
//! `pg_terminate_backend`, which sends it FATAL 57P01 as a shutdown does). In transaction mode,
//! outside a transaction block, the statements in flight fail with 08006 and the session goes
//! on, its next transaction on another server; inside a block, or in session mode, the session
//! ends with its server as it would without a proxy.

mod common;

use common::raw::{error_code, first_column};
use common::{setup, Setup};

const SLEEP: &str = "SELECT pg_sleep(30)";

/// Ends the backend running `SLEEP` on node 0, once it runs.
async fn terminate(s: &Setup) {
    s.running(SLEEP).await;
    let admin = s.cluster.client(0).await;
    let n: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE state = 'active' AND starts_with(query, $1)",
            &[&SLEEP],
        )
        .await
        .expect("terminate")
        .get(0);
    assert_eq!(n, 1, "one backend runs the statement");
}

fn code(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(|c| c.code())
}

#[tokio::test]
async fn an_autocommit_statement_whose_server_dies_fails_and_the_session_goes_on() {
    let s = setup(0, "").await;
    let c = s.app().await;
    let plus_one = c.prepare("SELECT $1::int + 1").await.expect("prepare");
    c.batch_execute("SET application_name = 'survivor'")
        .await
        .expect("set");
    // Simple protocol.
    let (r, ()) = tokio::join!(c.batch_execute(SLEEP), terminate(&s));
    let e = r.expect_err("its server was ended");
    assert_eq!(code(&e), Some("08006"), "{e:?}");
    let message = e.as_db_error().map(|d| d.message()).unwrap_or_default();
    assert!(
        message.contains("the session goes on"),
        "says what happened: {message}"
    );
    assert!(!c.is_closed(), "the session outlives its server");
    // Extended protocol, with a named statement.
    let (r, ()) = tokio::join!(
        c.query_one("SELECT pg_sleep(30), $1::int", &[&1i32]),
        async { terminate(&s).await }
    );
    let e = r.expect_err("its server was ended");
    assert_eq!(code(&e), Some("08006"), "{e:?}");
    assert!(!c.is_closed());
    // The next transactions run on other servers, with the session's statement and settings.
    let two: i32 = c
        .query_one(&plus_one, &[&1i32])
        .await
        .expect("a statement prepared before")
        .get(0);
    assert_eq!(two, 2);
    let name: String = c
        .query_one("SHOW application_name", &[])
        .await
        .expect("show")
        .get(0);
    assert_eq!(name, "survivor", "the session's settings went with it");
}

#[tokio::test]
async fn pipelined_batches_each_fail_and_a_half_sent_batch_ends_at_its_sync() {
    let s = setup(0, "").await;
    let mut raw = s.raw(&[]).await;
    raw.parse("", SLEEP).bind("", "").execute("").sync();
    raw.parse("", "SELECT 2").bind("", "").execute("").sync();
    // A third batch without its Sync yet.
    raw.parse("", "SELECT 3").bind("", "").execute("");
    raw.flush().await;
    terminate(&s).await;
    for batch in 1..=2 {
        let (tags, msgs) = raw.until_ready().await;
        assert!(tags.ends_with("EZ"), "batch {batch}: {tags}");
        assert_eq!(error_code(&msgs).as_deref(), Some("08006"), "batch {batch}");
        assert_eq!(&msgs.last().expect("Z").1[..], b"I", "idle after it");
    }
    // The half-sent batch fails now; its messages up to Sync are skipped, and Sync answered.
    let m = raw.recv().await;
    assert_eq!(m.0, b'E', "{m:?}");
    raw.parse("", "SELECT 4").bind("", "").execute("").sync();
    raw.flush().await;
    let (tags, _) = raw.until_ready().await;
    assert_eq!(
        tags, "Z",
        "the rest of the failed batch is skipped up to its Sync"
    );
    raw.query("SELECT 42");
    raw.flush().await;
    let (_, msgs) = raw.until_ready().await;
    assert_eq!(first_column(&msgs), vec![Some("42".to_string())]);
}

#[tokio::test]
async fn inside_a_transaction_block_the_session_ends_with_its_server() {
    let s = setup(0, "").await;
    let c = s.app().await;
    c.batch_execute("BEGIN").await.expect("begin");
    let (r, ()) = tokio::join!(c.batch_execute(SLEEP), terminate(&s));
    let e = r.expect_err("its server was ended");
    // The server's FATAL, as without a proxy (or the closed connection, if read first).
    assert!(code(&e) == Some("57P01") || e.is_closed(), "{e:?}");
    let e = c
        .batch_execute("SELECT 1")
        .await
        .expect_err("its transaction cannot go on elsewhere");
    assert!(e.is_closed(), "{e:?}");
}

#[tokio::test]
async fn in_session_mode_the_session_ends_with_its_server() {
    let s = setup(0, "pool_mode = \"session\"").await;
    let c = s.app().await;
    let (r, ()) = tokio::join!(c.batch_execute(SLEEP), terminate(&s));
    r.expect_err("its server was ended");
    let e = c
        .batch_execute("SELECT 1")
        .await
        .expect_err("a session-mode client owns its server's session");
    assert!(e.is_closed(), "{e:?}");
}
