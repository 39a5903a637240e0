//! Named prepared statements in transaction mode.

mod common;

use common::raw::{error_code, first_column};
use common::setup;
use pgwarden_protocol::frontend::{self, Target};
use tokio_postgres::error::SqlState;

#[tokio::test]
async fn statements_survive_moving_between_servers() {
    // Two replicas, round robin: each statement is prepared on every node it runs on.
    let s = setup(
        2,
        "default_pool_size = 3\n[proxy.routing]\nbalance = \"round_robin\"\nconsistency = \"eventual\"",
    )
    .await;
    s.replicas_reported().await;
    let clients: Vec<_> = futures::future::join_all((0..6).map(|_| s.app())).await;
    // tokio-postgres names its statements s0, s1, ... per client: the same names with different
    // SQL on different clients.
    let mut stmts = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let sql = format!("SELECT $1::int + {i}");
        stmts.push(c.prepare(&sql).await.expect("prepare"));
    }
    for round in 0..20 {
        let work = clients
            .iter()
            .zip(&stmts)
            .enumerate()
            .map(|(i, (c, st))| async move {
                let v: i32 = c.query_one(st, &[&round]).await.expect("execute").get(0);
                assert_eq!(
                    v,
                    round + i as i32,
                    "client {i} ran someone else's statement"
                );
            });
        futures::future::join_all(work).await;
    }
    for n in ["n2", "n3"] {
        let node = s.shared.nodes.get(&pgwarden_core::NodeId::new(n));
        assert!(
            node.reads.load(std::sync::atomic::Ordering::Relaxed) > 0,
            "{n} ran some of the statements"
        );
    }
}

#[tokio::test]
async fn pipelines_with_an_error_in_the_middle() {
    let s = setup(0, "default_pool_size = 1").await;
    let c = s.app().await;
    let ok = c.prepare("SELECT $1::int * 2").await.expect("prepare");
    let bad = c.prepare("SELECT 1 / $1::int").await.expect("prepare");
    // Pipelined: tokio-postgres sends all three before reading.
    let (a, b, d) = tokio::join!(
        c.query_one(&ok, &[&21]),
        c.query_one(&bad, &[&0]),
        c.query_one(&ok, &[&5])
    );
    assert_eq!(a.expect("first").get::<_, i32>(0), 42);
    assert_eq!(b.unwrap_err().code(), Some(&SqlState::DIVISION_BY_ZERO));
    assert_eq!(d.expect("third, after the error").get::<_, i32>(0), 10);
    // A second client on the same single server has its own statements.
    let other = s.app().await;
    let st = other
        .prepare("SELECT 'other'::text")
        .await
        .expect("prepare");
    assert_eq!(
        other
            .query_one(&st, &[])
            .await
            .expect("run")
            .get::<_, String>(0),
        "other"
    );
    assert_eq!(
        c.query_one(&ok, &[&1])
            .await
            .expect("still works")
            .get::<_, i32>(0),
        2
    );
}

#[tokio::test]
async fn eviction_beyond_max_prepared_statements() {
    let s = setup(0, "default_pool_size = 1\nmax_prepared_statements = 2").await;
    let c = s.app().await;
    let stmts: Vec<_> = futures::future::join_all((0..5).map(|i| {
        let c = &c;
        async move {
            c.prepare(&format!("SELECT {i} + $1::int"))
                .await
                .expect("prepare")
        }
    }))
    .await;
    for round in 0..3 {
        for (i, st) in stmts.iter().enumerate() {
            let v: i32 = c.query_one(st, &[&round]).await.expect("execute").get(0);
            assert_eq!(v, i as i32 + round);
        }
    }
    let n: i64 = c
        .query_one("SELECT count(*) FROM pg_prepared_statements", &[])
        .await
        .expect("count")
        .get(0);
    assert!(n <= 2, "{n} statements prepared on a server capped at 2");
}

#[tokio::test]
async fn deallocate_and_unknown_statements() {
    let s = setup(0, "").await;
    let c = s.app().await;
    let st = c.prepare("SELECT 1").await.expect("prepare");
    c.batch_execute("DEALLOCATE ALL")
        .await
        .expect("deallocate all");
    let e = c.query(&st, &[]).await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(&SqlState::INVALID_SQL_STATEMENT_NAME),
        "{e:?}"
    );
    let again = c.prepare("SELECT 1").await.expect("prepare again");
    assert_eq!(
        c.query_one(&again, &[])
            .await
            .expect("run")
            .get::<_, i32>(0),
        1
    );
    // Dropping a Statement sends Close; the name can then be reused for different SQL.
    drop(again);
    let other = c.prepare("SELECT 2").await.expect("prepare after close");
    assert_eq!(
        c.query_one(&other, &[])
            .await
            .expect("run")
            .get::<_, i32>(0),
        2
    );
}

#[tokio::test]
async fn a_statement_the_server_rejected_is_never_answered_by_the_proxy() {
    let s = setup(0, "default_pool_size = 2").await;
    for _ in 0..2 {
        let c = s.app().await;
        let e = c.prepare("SELEC 1").await.unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::SYNTAX_ERROR), "{e:?}");
        let e = c.prepare("SELECT * FROM no_such_table").await.unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::UNDEFINED_TABLE), "{e:?}");
    }
    // Once the table exists the same text prepares; a later client's Parse is then answered
    // without a server and still executes correctly.
    s.app()
        .await
        .batch_execute("CREATE TABLE no_such_table (x int); INSERT INTO no_such_table VALUES (7)")
        .await
        .expect("create");
    for _ in 0..3 {
        let c = s.app().await;
        let st = c
            .prepare("SELECT * FROM no_such_table")
            .await
            .expect("prepare");
        assert_eq!(
            c.query_one(&st, &[]).await.expect("run").get::<_, i32>(0),
            7
        );
    }
}

/// What libpq's PQexecPrepared sends: Bind, Describe portal, Execute, Sync. Returns the message
/// types and the first column values.
async fn exec_prepared(
    c: &mut common::raw::Raw,
    name: &str,
) -> (String, Vec<Option<String>>, Option<String>) {
    c.bind("", name);
    frontend::put_describe(&mut c.out, Target::Portal, "");
    c.execute("").sync();
    c.flush().await;
    let (tags, msgs) = c.until_ready().await;
    (tags, first_column(&msgs), error_code(&msgs))
}

async fn shape_table(s: &common::Setup) -> tokio_postgres::Client {
    let admin = s.cluster.client_db(0, "app").await;
    admin
        .batch_execute(
            "CREATE TABLE shape (a int); INSERT INTO shape VALUES (1); GRANT ALL ON shape TO app",
        )
        .await
        .expect("table");
    admin
}

#[tokio::test]
async fn ddl_that_changes_a_result_type_is_retried_for_clients_that_describe() {
    let s = setup(0, "default_pool_size = 1").await;
    let admin = shape_table(&s).await;
    let mut c = s.raw(&[]).await;
    c.parse("st", "SELECT * FROM public.shape").sync();
    c.flush().await;
    c.until_ready().await;
    let (tags, rows, _) = exec_prepared(&mut c, "st").await;
    assert_eq!(
        (tags.as_str(), rows),
        ("2TDCZ", vec![Some("1".to_string())])
    );
    // Without the proxy the next execution fails with 0A000 "cached plan must not change
    // result type"; here it is prepared again and sent again, and the client sees the new
    // shape in the RowDescription it asked for.
    admin
        .batch_execute("ALTER TABLE shape ADD COLUMN b int DEFAULT 5")
        .await
        .expect("alter");
    let (tags, rows, err) = exec_prepared(&mut c, "st").await;
    assert_eq!(err, None);
    assert_eq!(tags, "2TDCZ");
    assert_eq!(rows, vec![Some("1".to_string())]);
    // Inside a transaction nothing is retried: the client gets PostgreSQL's error.
    admin
        .batch_execute("ALTER TABLE shape DROP COLUMN b")
        .await
        .expect("alter");
    c.query("BEGIN");
    c.flush().await;
    c.until_ready().await;
    let (_, _, err) = exec_prepared(&mut c, "st").await;
    assert_eq!(err.as_deref(), Some("0A000"));
    c.query("ROLLBACK");
    c.flush().await;
    c.until_ready().await;
    let (_, rows, err) = exec_prepared(&mut c, "st").await;
    assert_eq!(
        (err, rows),
        (None, vec![Some("1".to_string())]),
        "retried after the transaction"
    );
}

#[tokio::test]
async fn clients_that_decode_with_a_cached_description_get_the_error() {
    let s = setup(0, "default_pool_size = 1").await;
    let admin = shape_table(&s).await;
    let c = s.app().await;
    let other = s.app().await;
    let st = c
        .prepare("SELECT * FROM public.shape")
        .await
        .expect("prepare");
    assert_eq!(
        c.query_one(&st, &[]).await.expect("run").get::<_, i32>(0),
        1
    );
    admin
        .batch_execute("ALTER TABLE shape ADD COLUMN b int")
        .await
        .expect("alter");
    // Another client prepares the same text while the server still has the stale statement:
    // its Describe fails on the stale plan and is retried on a fresh one.
    let fresh = other
        .prepare("SELECT * FROM public.shape")
        .await
        .expect("prepare");
    assert_eq!(fresh.columns().len(), 2);
    assert_eq!(other.query_one(&fresh, &[]).await.expect("run").len(), 2);
    admin
        .batch_execute("ALTER TABLE shape ADD COLUMN c int")
        .await
        .expect("alter");
    // tokio-postgres does not describe the portal: rows of a new shape would be misread, so
    // the client gets PostgreSQL's error...
    let e = c.query_one(&st, &[]).await.unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{e:?}");
    // ...and, as without a proxy, preparing it again works (the stale one is gone).
    let st = c
        .prepare("SELECT * FROM public.shape")
        .await
        .expect("prepare again");
    assert_eq!(c.query_one(&st, &[]).await.expect("run").len(), 3);
}

/// `other` gets the pool's one server within query_wait_timeout.
async fn server_is_free(other: &tokio_postgres::Client) {
    let n: i64 = other
        .query_one("SELECT 1::int8", &[])
        .await
        .expect("the server is free for another client")
        .get(0);
    assert_eq!(n, 1);
}

/// The number of columns a RowDescription in `msgs` describes.
fn described_columns(msgs: &[common::raw::Msg]) -> Option<u16> {
    msgs.iter()
        .find(|(tag, _)| *tag == b'T')
        .map(|(_, body)| u16::from_be_bytes([body[0], body[1]]))
}

/// Bind and Execute of `st` with a Flush instead of a Sync (so never retried), read up to its
/// error, which must be the stale plan.
async fn stale_error_before_sync(c: &mut common::raw::Raw, st: &str) {
    c.bind("", st).execute("");
    frontend::put_flush(&mut c.out);
    c.flush().await;
    let m = c.recv().await;
    assert_eq!(m.0, b'E', "{m:?}");
    assert_eq!(
        error_code(std::slice::from_ref(&m)).as_deref(),
        Some("0A000")
    );
}

#[tokio::test]
async fn a_statement_is_fresh_whenever_it_is_prepared_again_after_its_stale_error() {
    let s = setup(0, "default_pool_size = 1\nquery_wait_timeout = \"3s\"").await;
    let admin = shape_table(&s).await;
    let mut c = s.raw(&[]).await;
    let other = s.app().await;
    let alter = |col: &'static str| {
        let admin = &admin;
        async move {
            admin
                .batch_execute(&format!("ALTER TABLE shape ADD COLUMN {col} int"))
                .await
                .expect("alter")
        }
    };
    c.parse("st", "SELECT * FROM public.shape")
        .bind("", "st")
        .execute("")
        .sync();
    c.flush().await;
    assert_eq!(c.until_ready().await.0, "12DCZ");

    // The error with its Sync, as tokio-postgres gets it: the client then idles, and the one
    // server is not held for it (the stale statement is closed with a Sync of the proxy's).
    alter("b").await;
    c.bind("", "st").execute("").sync();
    c.flush().await;
    let (_, msgs) = c.until_ready().await;
    assert_eq!(error_code(&msgs).as_deref(), Some("0A000"));
    server_is_free(&other).await;

    // A new Parse of the same text that reaches the proxy after the error but before the
    // batch's ReadyForQuery: the server's stale statement is closed before it is prepared again.
    c.bind("", "st").execute("").sync();
    c.flush().await;
    assert_eq!(
        c.until_ready().await.0,
        "2DCZ",
        "prepared again with two columns"
    );
    alter("c").await;
    stale_error_before_sync(&mut c, "st").await;
    c.sync().parse("st2", "SELECT * FROM public.shape");
    c.describe_statement("st2").sync();
    c.flush().await;
    assert_eq!(c.until_ready().await.0, "Z");
    let (tags, msgs) = c.until_ready().await;
    assert_eq!(tags, "1tTZ");
    assert_eq!(described_columns(&msgs), Some(3));

    // The same in the failed batch itself: the server skips the Close, Parse and Describe, and
    // the statement is still closed afterwards.
    alter("d").await;
    stale_error_before_sync(&mut c, "st2").await;
    c.parse("st3", "SELECT * FROM public.shape");
    c.describe_statement("st3").sync();
    c.flush().await;
    assert_eq!(c.until_ready().await.0, "Z", "skipped, as by PostgreSQL");
    c.parse("st3", "SELECT * FROM public.shape");
    c.describe_statement("st3").sync();
    c.flush().await;
    let (tags, msgs) = c.until_ready().await;
    assert_eq!(tags, "1tTZ");
    assert_eq!(described_columns(&msgs), Some(4));
    c.bind("", "st3").execute("").sync();
    c.flush().await;
    let (tags, msgs) = c.until_ready().await;
    assert_eq!((tags.as_str(), error_code(&msgs)), ("2DCZ", None));
    server_is_free(&other).await;
}

#[tokio::test]
async fn an_eviction_the_server_skipped_after_an_error_still_happens() {
    let s = setup(0, "default_pool_size = 1\nmax_prepared_statements = 1").await;
    let mut c = s.raw(&[]).await;
    // The server ends up with b only (a is evicted for it).
    c.parse("a", "SELECT 'a'::text")
        .parse("b", "SELECT 'b'::text")
        .sync();
    c.flush().await;
    assert_eq!(c.until_ready().await.0, "11Z");
    // Using a evicts b, but the Close goes after an error in the same batch: the server
    // skips it (and a's Parse).
    c.parse("", "SELECT 1 / 0").bind("", "").execute("");
    c.bind("", "a").execute("").sync();
    c.flush().await;
    let (tags, msgs) = c.until_ready().await;
    assert_eq!(
        (tags.as_str(), error_code(&msgs).as_deref()),
        ("1EZ", Some("22012"))
    );
    // b is prepared again without a clash with the server's old one.
    for (st, want) in [("b", "b"), ("a", "a"), ("b", "b")] {
        c.bind("", st).execute("").sync();
        c.flush().await;
        let (tags, msgs) = c.until_ready().await;
        assert_eq!(error_code(&msgs), None, "{st}");
        assert_eq!(
            (tags.as_str(), first_column(&msgs)),
            ("2DCZ", vec![Some(want.to_string())])
        );
    }
}

#[tokio::test]
async fn a_shared_statement_recovers_on_every_server() {
    let s = setup(0, "default_pool_size = 2").await;
    let admin = shape_table(&s).await;
    let (mut a, mut b) = (s.raw(&[]).await, s.raw(&[]).await);
    for c in [&mut a, &mut b] {
        c.parse("st", "SELECT * FROM public.shape").sync();
        c.flush().await;
        c.until_ready().await;
        c.query("BEGIN");
        c.flush().await;
        c.until_ready().await;
    }
    // Both servers prepare the (shared) statement, in two transactions at once.
    for c in [&mut a, &mut b] {
        assert_eq!(exec_prepared(c, "st").await.2, None);
    }
    for c in [&mut a, &mut b] {
        c.query("COMMIT");
        c.flush().await;
        c.until_ready().await;
    }
    admin
        .batch_execute("ALTER TABLE shape ADD COLUMN b int")
        .await
        .expect("alter");
    for _ in 0..3 {
        for c in [&mut a, &mut b] {
            let (_, rows, err) = exec_prepared(c, "st").await;
            assert_eq!((err, rows), (None, vec![Some("1".to_string())]));
        }
    }
}

#[tokio::test]
async fn errors_about_a_named_statement_name_the_clients_statement() {
    let s = setup(0, "").await;
    let direct_addr = std::net::SocketAddr::from(([127, 0, 0, 1], s.cluster.port(0)));
    let mut direct =
        common::raw::Raw::connect(direct_addr, "app", common::APP_PASSWORD, "app", &[]).await;
    let mut proxied = s.raw(&[]).await;
    let mut errors = Vec::new();
    for c in [&mut direct, &mut proxied] {
        c.parse("my_stmt", "SELECT $1::int").sync();
        c.flush().await;
        c.until_ready().await;
        // No parameters for a statement that takes one: PostgreSQL names the statement.
        c.bind("", "my_stmt").execute("").sync();
        c.flush().await;
        let (_, msgs) = c.until_ready().await;
        let error = msgs
            .into_iter()
            .find(|(t, _)| *t == b'E')
            .expect("an error");
        errors.push(String::from_utf8_lossy(&error.1).into_owned());
    }
    assert!(errors[0].contains("\"my_stmt\""), "{}", errors[0]);
    assert_eq!(
        errors[0], errors[1],
        "the proxy's error differs from PostgreSQL's"
    );
}

/// An error raised by a Sync itself (a deferred constraint checked at the implicit commit)
/// belongs to that Sync: a batch pipelined behind it is not taken as skipped, so its statement
/// stays prepared, and the next batch's answers are not mistaken for the failed one's.
#[tokio::test]
async fn an_error_at_sync_does_not_skip_the_next_batch() {
    let s = setup(0, "default_pool_size = 1").await;
    s.deferred_table("deferred").await;
    let mut c = s.raw(&[]).await;
    for round in 0..3 {
        // Fails at its Sync: the row refers to one that never comes.
        c.parse("", "INSERT INTO deferred VALUES (1, 2)")
            .bind("", "")
            .execute("")
            .sync();
        // Pipelined behind it, before any answer came back.
        let name = format!("later{round}");
        c.parse(&name, "SELECT 40 + $1::int")
            .sync()
            .bind_params("", &name, &[b"2"])
            .execute("")
            .sync();
        c.flush().await;
        let (tags, msgs) = c.until_ready().await;
        assert_eq!(tags, "12CEZ", "round {round}: the failing batch");
        assert_eq!(error_code(&msgs).as_deref(), Some("23503"));
        assert_eq!(c.until_ready().await.0, "1Z", "round {round}: the Parse");
        let (tags, msgs) = c.until_ready().await;
        assert_eq!(tags, "2DCZ", "round {round}: the Bind");
        assert_eq!(first_column(&msgs), vec![Some("42".to_string())]);
        // Still prepared in a batch of its own.
        c.bind_params("", &name, &[b"3"]).execute("").sync();
        c.flush().await;
        let (tags, msgs) = c.until_ready().await;
        assert_eq!(tags, "2DCZ", "round {round}: prepared still");
        assert_eq!(first_column(&msgs), vec![Some("43".to_string())]);
    }
}
