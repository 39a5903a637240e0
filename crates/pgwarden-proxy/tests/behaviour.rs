//! Errors, limits, cancellation and failover, through the proxy against real PostgreSQL.

mod common;

use std::time::{Duration, Instant};

use common::{setup, APP_PASSWORD};
use pgwarden_testkit::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::error::SqlState;

fn code(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(|c| c.code())
}

#[tokio::test]
async fn authentication_failures_have_the_right_sqlstate() {
    let s = setup(0, "").await;
    let e = s
        .try_connect("app", "wrong", "app")
        .await
        .expect_err("wrong password refused");
    assert_eq!(code(&e), Some("28P01"), "{e:?}");
    let e = s
        .try_connect("nobody", "x", "app")
        .await
        .expect_err("unknown user refused");
    assert_eq!(
        code(&e),
        Some("28P01"),
        "an unknown user fails like a wrong password: {e:?}"
    );
    let e = s
        .try_connect("app", APP_PASSWORD, "no_such_db")
        .await
        .expect_err("unknown db refused");
    assert_eq!(code(&e), Some("3D000"), "{e:?}");
    // Still serving.
    s.app()
        .await
        .batch_execute("SELECT 1")
        .await
        .expect("a good login works");
}

#[tokio::test]
async fn md5_authentication() {
    let s = setup(0, "[proxy.auth]\nmethod = \"md5\"").await;
    s.app()
        .await
        .batch_execute("SELECT 1")
        .await
        .expect("md5 login");
    let e = s
        .try_connect("app", "wrong", "app")
        .await
        .expect_err("refused");
    assert_eq!(code(&e), Some("28P01"));
}

#[tokio::test]
async fn waiting_for_a_server_is_bounded_by_query_wait_timeout() {
    let s = setup(0, "default_pool_size = 1\nquery_wait_timeout = \"300ms\"").await;
    let a = s.app().await;
    let b = s.app().await;
    a.batch_execute("BEGIN")
        .await
        .expect("a holds the only server");
    let started = Instant::now();
    let e = b.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), Some("53300"), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    a.batch_execute("COMMIT").await.expect("a is unaffected");
}

#[tokio::test]
async fn max_client_conn_refuses_cleanly() {
    let s = setup(0, "max_client_conn = 1").await;
    let first = s.app().await;
    let e = s
        .try_connect("app", APP_PASSWORD, "app")
        .await
        .expect_err("second client refused");
    assert_eq!(code(&e), Some("53300"), "{e:?}");
    first
        .batch_execute("SELECT 1")
        .await
        .expect("the first client is unaffected");
    drop(first);
    eventually(Duration::from_secs(5), "a slot frees up", || async {
        s.try_connect("app", APP_PASSWORD, "app")
            .await
            .ok()
            .map(|_| ())
    })
    .await;
}

#[tokio::test]
async fn cancel_reaches_the_running_query_only() {
    let s = setup(0, "default_pool_size = 2").await;
    let a = s.app().await;
    let token = a.cancel_token();
    let running = tokio::spawn(async move { a.batch_execute("SELECT pg_sleep(30)").await });
    s.running("SELECT pg_sleep(30)").await;
    let started = Instant::now();
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("send cancel");
    let e = running.await.expect("join").unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED));
    assert!(started.elapsed() < Duration::from_secs(5));

    // A cancel from a client with no query running touches nobody else's query.
    let idle = s.app().await;
    let idle_token = idle.cancel_token();
    let busy = s.app().await;
    let work = tokio::spawn(async move { busy.batch_execute("SELECT pg_sleep(0.5)").await });
    s.running("SELECT pg_sleep(0.5)").await;
    idle_token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("send cancel");
    work.await
        .expect("join")
        .expect("the other client's query is not cancelled");
    idle.batch_execute("SELECT 1")
        .await
        .expect("the idle client still works");
}

#[tokio::test]
async fn writes_follow_a_promotion() {
    let mut s = setup(1, "server_connect_timeout = \"5s\"").await;
    // Where writes go: a read would be served by the replica.
    let port = |c: tokio_postgres::Client| async move {
        c.query_one("/* pgwarden:primary */ SELECT inet_server_port()", &[])
            .await
            .ok()
            .map(|r| r.get::<_, i32>(0))
    };
    assert_eq!(
        port(s.app().await).await,
        Some(i32::from(s.cluster.port(0)))
    );
    s.cluster.wait_replayed(1).await;
    s.cluster.stop_node(0).await;
    s.cluster.execute(1, "SELECT pg_promote()").await;
    let n2 = i32::from(s.cluster.port(1));
    eventually(
        Duration::from_secs(15),
        "new sessions go to the promoted node",
        || async {
            let c = s.try_connect("app", APP_PASSWORD, "app").await.ok()?;
            (port(c).await == Some(n2)).then_some(())
        },
    )
    .await;
    let c = s.app().await;
    c.batch_execute("CREATE TABLE after_failover (x int)")
        .await
        .expect("writes work on the new primary");
}

#[tokio::test]
async fn no_primary_is_a_clear_error_not_a_hang() {
    let mut s = setup(0, "server_connect_timeout = \"500ms\"").await;
    s.cluster.stop_node(0).await;
    eventually(
        Duration::from_secs(10),
        "monitor sees no primary",
        || async { s.shared.topology.view().leader.is_none().then_some(()) },
    )
    .await;
    let started = Instant::now();
    let e = s
        .try_connect("app", APP_PASSWORD, "app")
        .await
        .expect_err("refused");
    assert_eq!(code(&e), Some("57P03"), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    sock.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut out)).await;
    out
}

#[tokio::test]
async fn garbage_gets_a_protocol_error_and_others_are_unaffected() {
    let s = setup(0, "").await;
    let c = s.app().await;
    for junk in [
        &b"\x00\x00\x00\x08\x00\x02\x00\x00"[..],    // protocol 2.0
        b"\xff\xff\xff\xff",                         // negative length
        b"\x00\x01\x00\x00\x00\x03\x00\x00",         // 65536-byte startup packet
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",        // not PostgreSQL at all
        b"\x00\x00\x00\x0c\x00\x03\x00\x00user\x00", // unterminated parameters
    ] {
        let answer = raw(s.addr, junk).await;
        assert_eq!(answer.first(), Some(&b'E'), "{junk:?} -> {answer:?}");
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.contains("08P01") || text.contains("0A000"),
            "{junk:?} -> {text}"
        );
    }
    c.batch_execute("SELECT 1")
        .await
        .expect("the other client never noticed");
}

/// SSLRequest, its answer, then a second SSLRequest and all that follows until the close.
async fn two_ssl_requests(addr: std::net::SocketAddr) -> (u8, String) {
    let ssl_request = [0u8, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    sock.write_all(&ssl_request).await.expect("write");
    let mut answer = [0u8; 1];
    sock.read_exact(&mut answer).await.expect("answer");
    sock.write_all(&ssl_request).await.expect("write again");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut rest)).await;
    (answer[0], String::from_utf8_lossy(&rest).into_owned())
}

#[tokio::test]
async fn a_second_ssl_request_is_refused_as_postgres_refuses_it() {
    let s = setup(0, "").await;
    let direct = std::net::SocketAddr::from(([127, 0, 0, 1], s.cluster.port(0)));
    let (pg_answer, pg_rest) = two_ssl_requests(direct).await;
    let (answer, rest) = two_ssl_requests(s.addr).await;
    assert_eq!(answer, pg_answer, "the first is declined alike");
    for text in [&pg_rest, &rest] {
        assert!(text.starts_with('E') && text.contains("0A000"), "{text:?}");
        assert!(
            text.contains("unsupported frontend protocol 1234.5679"),
            "{text:?}"
        );
    }
}

#[tokio::test]
async fn query_timeout_ends_a_query_the_server_does_not_answer() {
    let s = setup(0, "query_timeout = \"500ms\"").await;
    let c = s.app().await;
    let started = Instant::now();
    let e = c
        .batch_execute("SELECT pg_sleep(30)")
        .await
        .expect_err("ended by query_timeout");
    assert!(
        e.code() == Some(&SqlState::QUERY_CANCELED) || e.is_closed(),
        "{e:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // The server that ran it was closed, not pooled: the query is gone from the server too.
    let admin = s.cluster.client(0).await;
    eventually(
        Duration::from_secs(10),
        "the sleeping backend is gone",
        || {
            let admin = &admin;
            async move {
                let n: i64 = admin
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'",
                        &[],
                    )
                    .await
                    .ok()?
                    .get(0);
                (n == 0).then_some(())
            }
        },
    )
    .await;
    // Other queries are unaffected.
    s.app()
        .await
        .batch_execute("SELECT 1")
        .await
        .expect("served");
}

/// Sockets that connect and send nothing hold only login slots, for at most `login_timeout`:
/// logged-in clients keep their room, and the console stays reachable even with every login
/// slot and every client slot taken.
#[tokio::test]
async fn silent_sockets_do_not_lock_out_logins_and_the_console_keeps_a_reserve() {
    let s = setup(
        0,
        "max_client_conn = 2\nmax_pending_logins = 20\nlogin_timeout = \"1s\"\nadmin_users = [\"app\"]",
    )
    .await;
    let admin = |s: &common::Setup| {
        let conninfo = s.conninfo("app", APP_PASSWORD, "pgwarden");
        async move {
            let (c, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            c.simple_query("SHOW VERSION").await?;
            Ok::<_, tokio_postgres::Error>(c)
        }
    };
    // More silent sockets than max_client_conn: logins still work.
    let mut silent = Vec::new();
    for _ in 0..10 {
        silent.push(
            tokio::net::TcpStream::connect(s.addr)
                .await
                .expect("connect"),
        );
    }
    let a = s.app().await;
    let b = s.app().await;
    // max_client_conn counts logged-in clients: a third is refused, the console is not.
    let e = s
        .try_connect("app", APP_PASSWORD, "app")
        .await
        .expect_err("max_client_conn");
    assert_eq!(code(&e), Some("53300"), "{e:?}");
    let _console = admin(&s).await.expect("the console has a reserve");
    // Every login slot taken (20 silent sockets): the console still answers, through the
    // overflow slots, which lead nowhere else.
    for _ in 0..10 {
        silent.push(
            tokio::net::TcpStream::connect(s.addr)
                .await
                .expect("connect"),
        );
    }
    admin(&s)
        .await
        .expect("the console while every login slot is busy");
    let e = s
        .try_connect("app", APP_PASSWORD, "app")
        .await
        .expect_err("no login slot");
    assert_eq!(code(&e), Some("53300"), "{e:?}");
    // The silent sockets are closed after login_timeout, and logins work again.
    let started = Instant::now();
    for mut sock in silent {
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut buf)).await;
        assert!(
            r.is_ok(),
            "a silent socket still open after {:?}",
            started.elapsed()
        );
    }
    drop((a, b));
    eventually(Duration::from_secs(5), "logins work again", || async {
        s.try_connect("app", APP_PASSWORD, "app")
            .await
            .ok()
            .map(|_| ())
    })
    .await;
}

/// `[[proxy.auth.rules]]`: trust for one user from the local address, reject for a database,
/// SCRAM (the default method) for the rest.
#[tokio::test]
async fn auth_rules_pick_the_method_per_login() {
    let s = setup(
        0,
        "[[proxy.auth.rules]]\ndatabase = \"postgres\"\nmethod = \"reject\"\n\
         [[proxy.auth.rules]]\nuser = \"app\"\naddress = \"127.0.0.1/32\"\nmethod = \"trust\"\n",
    )
    .await;
    let c = s
        .try_connect("app", "not-the-password", "app")
        .await
        .expect("trusted from 127.0.0.1");
    c.batch_execute("SELECT 1").await.expect("served");
    let e = s
        .try_connect("app", APP_PASSWORD, "postgres")
        .await
        .expect_err("rejected");
    assert_eq!(code(&e), Some("28000"), "{e:?}");
    assert!(
        format!("{e:?}").contains("no proxy.auth rule admits"),
        "{e:?}"
    );
    // Another user falls through to the default method and its password check.
    let e = s
        .try_connect("someone", "x", "app")
        .await
        .expect_err("not trusted");
    assert_eq!(code(&e), Some("28P01"), "{e:?}");
}
