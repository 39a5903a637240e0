//! Named prepared statements in transaction mode.

mod common;

use common::setup;
use tokio_postgres::error::SqlState;

#[tokio::test]
async fn statements_survive_moving_between_servers() {
    let s = setup(0, "default_pool_size = 3").await;
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
