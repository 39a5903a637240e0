//! Session state in transaction mode: each client's settings follow it from server connection
//! to server connection and never leak to another client; state that cannot move pins the
//! client to its server, which is reset before anyone else gets it.

mod common;

use std::time::Duration;

use common::raw::{error_code, first_column, first_column_bytes};
use common::{setup, APP_PASSWORD};
use pgwarden_testkit::eventually;
use tokio_postgres::Client;

async fn show(c: &Client, name: &str) -> String {
    c.query_one(&format!("SELECT current_setting('{name}', true)"), &[])
        .await
        .expect("current_setting")
        .get::<_, Option<String>>(0)
        .unwrap_or_default()
}

async fn pid(c: &Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0)
}

#[tokio::test]
async fn settings_follow_each_client_and_never_leak() {
    // One server shared by two clients: every statement of one runs where the other's ran.
    let s = setup(0, "default_pool_size = 1").await;
    let (a, b) = (s.app().await, s.app().await);
    assert_eq!(pid(&a).await, pid(&b).await);
    let work_mem = show(&b, "work_mem").await;
    let timeout = show(&b, "statement_timeout").await;
    a.batch_execute("SET statement_timeout = '1234ms'; SET search_path TO pg_catalog, public")
        .await
        .expect("set");
    for _ in 0..3 {
        assert_eq!(
            show(&b, "statement_timeout").await,
            timeout,
            "a's SET leaked to b"
        );
        assert_eq!(show(&a, "statement_timeout").await, "1234ms");
        assert_eq!(show(&a, "search_path").await, "pg_catalog, public");
        assert_eq!(show(&b, "search_path").await, "\"$user\", public");
    }
    // SET through the extended protocol (Parse/Bind/Execute of an unnamed statement).
    b.execute("SET work_mem = '7MB'", &[]).await.expect("set");
    assert_eq!(show(&a, "work_mem").await, work_mem);
    assert_eq!(show(&b, "work_mem").await, "7MB");

    // Not remembered: SET LOCAL, a rolled-back SET, a SET in a query that failed, a SET undone
    // by ROLLBACK TO. b runs in between each time, so a's next statement gets a's state
    // replayed onto the server.
    let undone = [
        "BEGIN; SET LOCAL work_mem = '9MB'; COMMIT",
        "BEGIN; SET work_mem = '10MB'; ROLLBACK",
        "BEGIN; SAVEPOINT sp; SET work_mem = '12MB'; ROLLBACK TO sp; COMMIT",
    ];
    for sql in undone {
        a.batch_execute(sql).await.expect(sql);
        b.batch_execute("SELECT 1").await.expect("b");
        assert_eq!(show(&a, "work_mem").await, work_mem, "after {sql}");
    }
    a.batch_execute("SET work_mem = '11MB'; SELECT 1/0")
        .await
        .expect_err("division by zero");
    b.batch_execute("SELECT 1").await.expect("b");
    assert_eq!(show(&a, "work_mem").await, work_mem);
    // A transaction's SET stays when it commits, across statements.
    a.batch_execute("BEGIN").await.expect("begin");
    a.batch_execute("SET work_mem = '13MB'").await.expect("set");
    a.batch_execute("COMMIT").await.expect("commit");
    b.batch_execute("SELECT 1").await.expect("b");
    assert_eq!(show(&a, "work_mem").await, "13MB");
    // RESET and RESET ALL.
    a.batch_execute("RESET work_mem").await.expect("reset");
    b.batch_execute("SELECT 1").await.expect("b");
    assert_eq!(show(&a, "work_mem").await, work_mem);
    a.batch_execute("RESET ALL").await.expect("reset all");
    b.batch_execute("SELECT 1").await.expect("b");
    assert_eq!(show(&a, "statement_timeout").await, timeout);
    assert_eq!(show(&b, "work_mem").await, "7MB", "b kept its own");
}

#[tokio::test]
async fn startup_parameters_belong_to_their_client() {
    let s = setup(0, "default_pool_size = 1").await;
    let a = s
        .app_with(
            "options='-c search_path=pg_catalog -c statement_timeout=4321' application_name=alpha",
        )
        .await;
    let b = s.app_with("application_name=beta").await;
    for _ in 0..3 {
        assert_eq!(show(&a, "statement_timeout").await, "4321ms");
        assert_eq!(show(&a, "search_path").await, "pg_catalog");
        assert_eq!(show(&a, "application_name").await, "alpha");
        assert_eq!(show(&b, "application_name").await, "beta");
        assert_ne!(show(&b, "statement_timeout").await, "4321ms");
    }
    // RESET goes back to the startup value, as it does without a proxy.
    a.batch_execute("SET statement_timeout = 1")
        .await
        .expect("set");
    a.batch_execute("RESET statement_timeout")
        .await
        .expect("reset");
    assert_eq!(show(&a, "statement_timeout").await, "4321ms");
    b.batch_execute("SELECT 1").await.expect("b");
    a.batch_execute("RESET ALL").await.expect("reset all");
    assert_eq!(show(&a, "search_path").await, "pg_catalog");
    // Bad startup settings fail the login with PostgreSQL's own error.
    let code = |e: tokio_postgres::Error| e.code().map(|c| c.code().to_string());
    let e = s
        .try_app_with("options='-c no_such_setting=1'")
        .await
        .expect_err("refused");
    assert_eq!(code(e).as_deref(), Some("42704"));
    let e = s
        .try_app_with("options='-c statement_timeout=banana'")
        .await
        .expect_err("refused");
    assert_eq!(code(e).as_deref(), Some("22023"));
    let e = s
        .try_app_with("options='-B 100'")
        .await
        .expect_err("refused");
    assert_eq!(code(e).as_deref(), Some("42601"));
    // The same bad value is refused again (from the pool's record, without a server).
    let e = s
        .try_app_with("options='-c statement_timeout=banana'")
        .await
        .expect_err("refused");
    assert_eq!(code(e).as_deref(), Some("22023"));
}

#[tokio::test]
async fn an_application_name_in_latin1_is_cleaned_as_postgres_does() {
    let s = setup(0, "default_pool_size = 1").await;
    let mut packet = bytes::BytesMut::new();
    let mut body = 196_608u32.to_be_bytes().to_vec();
    body.extend_from_slice(
        b"user\0app\0database\0app\0client_encoding\0LATIN1\0application_name\0caf\xe9\0\0",
    );
    packet.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    packet.extend_from_slice(&body);
    let mut c = common::raw::Raw::connect_packet(s.addr, common::APP_PASSWORD, packet).await;
    // PostgreSQL 15 replaces each byte outside printable ASCII with '?'.
    assert_eq!(c.param("application_name"), Some("caf?"));
    c.query("SHOW application_name");
    c.flush().await;
    let (tags, msgs) = c.until_ready().await;
    assert_eq!(tags, "TDCZ");
    assert_eq!(
        common::raw::first_column(&msgs),
        vec![Some("caf?".to_string())]
    );
}

#[tokio::test]
async fn clients_see_the_parameter_status_their_settings_give() {
    let s = setup(0, "default_pool_size = 1").await;
    let mut a = s
        .raw(&[
            ("DateStyle", "German"),
            ("TimeZone", "Europe/Paris"),
            ("application_name", "raw-ä"),
        ])
        .await;
    assert_eq!(
        a.param("DateStyle"),
        Some("German, DMY"),
        "normalised by the server"
    );
    assert_eq!(a.param("TimeZone"), Some("Europe/Paris"));
    assert_eq!(a.param("application_name"), Some("raw-??"));
    assert!(a.param("server_version").is_some());
    // Another client without them shares the server; a's statements still see a's settings,
    // and a is not told of the server changing back and forth.
    let b = s.app().await;
    for _ in 0..2 {
        b.batch_execute("SET TimeZone = 'UTC'").await.expect("b");
        a.query("SELECT current_setting('TimeZone'), current_setting('DateStyle')");
        a.flush().await;
        let (tags, msgs) = a.until_ready().await;
        assert_eq!(
            tags, "TDCZ",
            "no ParameterStatus for changes the client did not make"
        );
        assert_eq!(first_column(&msgs), [Some("Europe/Paris".to_string())]);
    }
    // A SET of its own is reported, as PostgreSQL does.
    a.query("SET DateStyle = ISO");
    a.flush().await;
    let (tags, _) = a.until_ready().await;
    assert_eq!(
        tags, "CSZ",
        "reported before ReadyForQuery, as PostgreSQL does"
    );
    assert_eq!(a.param("DateStyle"), Some("ISO, DMY"));
}

#[tokio::test]
async fn state_that_cannot_move_pins_the_client_until_it_leaves() {
    let s = setup(0, "default_pool_size = 2").await;
    let a = s.app().await;
    let others: Vec<Client> = futures::future::join_all((0..3).map(|_| s.app())).await;
    a.batch_execute("CREATE TEMP TABLE mine AS SELECT 1 AS x")
        .await
        .expect("temp table");
    let pinned = pid(&a).await;
    a.query_one("SELECT pg_advisory_lock(42)", &[])
        .await
        .expect("lock");
    for round in 0..5 {
        // The others share the one server left.
        futures::future::join_all(
            others
                .iter()
                .map(|o| o.batch_execute("SELECT pg_sleep(0.01)")),
        )
        .await;
        assert_eq!(
            pid(&a).await,
            pinned,
            "round {round}: a moved to another server"
        );
        let x: i32 = a
            .query_one("SELECT x FROM mine", &[])
            .await
            .expect("temp table")
            .get(0);
        assert_eq!(x, 1);
    }
    let taken: bool = others[0]
        .query_one("SELECT pg_try_advisory_lock(42)", &[])
        .await
        .expect("try")
        .get(0);
    assert!(!taken, "a still holds its lock");
    // When a leaves, its server is reset before it serves anyone else.
    drop(a);
    eventually(Duration::from_secs(10), "a's lock released", || async {
        let row = others[0]
            .query_one("SELECT pg_try_advisory_lock(42)", &[])
            .await
            .ok()?;
        row.get::<_, bool>(0).then_some(())
    })
    .await;
    let temp: i64 = others[1]
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname = 'mine' AND relpersistence = 't'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(temp, 0, "a's temp table is gone");
}

#[tokio::test]
async fn listen_in_transaction_mode_gets_its_notifications() {
    let s = setup(0, "default_pool_size = 2").await;
    let mut a = s.raw(&[]).await;
    a.query("LISTEN jobs");
    a.flush().await;
    let (tags, _) = a.until_ready().await;
    assert_eq!(tags, "CZ");
    let others: Vec<Client> = futures::future::join_all((0..3).map(|_| s.app())).await;
    for (i, o) in others.iter().enumerate() {
        o.batch_execute(&format!("NOTIFY jobs, 'n{i}'"))
            .await
            .expect("notify");
    }
    let mut payloads = Vec::new();
    while payloads.len() < 3 {
        let (tag, body) = a.recv().await;
        if tag == b'A' {
            // pid, channel, payload
            let parts: Vec<&[u8]> = body[4..].split(|&b| b == 0).collect();
            assert_eq!(parts[0], b"jobs");
            payloads.push(String::from_utf8_lossy(parts[1]).into_owned());
        }
    }
    payloads.sort();
    assert_eq!(payloads, ["n0", "n1", "n2"]);
}

#[tokio::test]
async fn deallocate_needs_no_server_and_never_fails_on_another_one() {
    let s = setup(0, "default_pool_size = 2").await;
    let mut a = s.raw(&[]).await;
    a.parse("st", "SELECT 1").sync();
    a.flush().await;
    assert_eq!(a.until_ready().await.0, "1Z");
    // Another client holds the server `st` was prepared on, inside a transaction: a's next
    // transaction gets the other server, which never saw `st`.
    let b = s.app().await;
    b.batch_execute("BEGIN").await.expect("begin");
    a.query("BEGIN");
    a.flush().await;
    assert_eq!(a.until_ready().await.0, "CZ");
    a.query("DEALLOCATE st");
    a.flush().await;
    let (tags, msgs) = a.until_ready().await;
    assert_eq!(tags, "CZ", "{:?}", error_code(&msgs));
    assert_eq!(
        msgs.last().map(|m| m.1[0]),
        Some(b'T'),
        "still in the transaction"
    );
    a.query("COMMIT");
    a.flush().await;
    a.until_ready().await;
    // Gone for this client only.
    a.bind("", "st").execute("").sync();
    a.flush().await;
    let (_, msgs) = a.until_ready().await;
    assert_eq!(error_code(&msgs).as_deref(), Some("26000"));
    b.batch_execute("COMMIT").await.expect("commit");
}

#[tokio::test]
async fn a_login_does_not_wait_for_a_busy_pool_to_check_its_parameters() {
    let s = setup(0, "default_pool_size = 1").await;
    let holder = s.app().await;
    holder
        .batch_execute("BEGIN")
        .await
        .expect("hold the only server");
    // New values, every server busy: the login goes through at once...
    let started = std::time::Instant::now();
    let mut fine = s
        .raw(&[("DateStyle", "German"), ("application_name", "late")])
        .await;
    let mut bad = s.raw(&[("options", "-c statement_timeout=banana")]).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(fine.param("DateStyle"), Some("German"), "shown as given");
    holder.batch_execute("COMMIT").await.expect("commit");
    // ...and the first checkout applies them, or ends the session with the server's error.
    fine.query("SELECT current_setting('DateStyle')");
    fine.flush().await;
    let (_, msgs) = fine.until_ready().await;
    assert_eq!(first_column(&msgs), [Some("German, DMY".to_string())]);
    bad.query("SELECT 1");
    bad.flush().await;
    let (tag, body) = bad.recv().await;
    assert_eq!(tag, b'E');
    assert_eq!(error_code(&[(tag, body)]).as_deref(), Some("22023"));
    assert!(bad.try_recv().await.is_none(), "the session ended");
}

#[tokio::test]
async fn a_client_encoding_other_than_utf8_works_and_its_settings_pin() {
    let s = setup(0, "default_pool_size = 2").await;
    let mut a = s.raw(&[("client_encoding", "LATIN1")]).await;
    assert_eq!(a.param("client_encoding"), Some("LATIN1"));
    let b = s.app().await;
    // Latin-1 bytes in a simple query, both ways.
    a.query(b"SELECT length('\xe9\xe8')::text || ' \xe9t\xe9'");
    a.flush().await;
    let (tags, msgs) = a.until_ready().await;
    assert_eq!(tags, "TDCZ");
    assert_eq!(first_column_bytes(&msgs), [Some(b"2 \xe9t\xe9".to_vec())]);
    // A named statement with Latin-1 text, used again after another client had the servers.
    for round in 0..3 {
        if round == 0 {
            a.parse("s1", b"SELECT 'caf\xe9'::text");
        }
        a.bind("", "s1").execute("").sync();
        a.flush().await;
        let (_, msgs) = a.until_ready().await;
        assert_eq!(error_code(&msgs), None, "round {round}");
        assert_eq!(first_column_bytes(&msgs), [Some(b"caf\xe9".to_vec())]);
        b.batch_execute("SELECT 1; SELECT 2").await.expect("b");
    }
    // A setting made in Latin-1 cannot be replayed from UTF-8 text: it keeps its server.
    a.query(b"SET my.v = 'caf\xe9'");
    a.flush().await;
    let (tags, _) = a.until_ready().await;
    assert_eq!(tags, "CZ");
    a.query("SELECT pg_backend_pid()");
    a.flush().await;
    let (_, msgs) = a.until_ready().await;
    let pinned = first_column(&msgs);
    for round in 0..3 {
        futures::future::join_all((0..2).map(|_| b.batch_execute("SELECT pg_sleep(0.01)"))).await;
        a.query("SELECT pg_backend_pid()")
            .query("SELECT current_setting('my.v')");
        a.flush().await;
        let (_, pid) = a.until_ready().await;
        let (_, value) = a.until_ready().await;
        assert_eq!(first_column(&pid), pinned, "round {round}: a moved");
        assert_eq!(first_column_bytes(&value), [Some(b"caf\xe9".to_vec())]);
    }
}

/// A NOTICE PostgreSQL sends at login (an application_name it cuts) reaches the client through
/// the proxy too, in both pool modes.
#[tokio::test]
async fn login_notices_reach_the_client_as_without_a_proxy() {
    let long = "x".repeat(100);
    for mode in ["transaction", "session"] {
        let s = setup(0, &format!("pool_mode = \"{mode}\"")).await;
        let direct = std::net::SocketAddr::from(([127, 0, 0, 1], s.cluster.port(0)));
        let extra = [("application_name", long.as_str())];
        let pg = common::raw::Raw::connect(direct, "app", APP_PASSWORD, "app", &extra).await;
        let proxied = s.raw(&extra).await;
        assert_eq!(pg.login_notices.len(), 1, "{:?}", pg.login_notices);
        assert_eq!(proxied.login_notices, pg.login_notices, "{mode}");
        assert_eq!(
            proxied.param("application_name"),
            pg.param("application_name")
        );
    }
}
