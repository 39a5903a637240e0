//! The cases that break poolers (`../shared/reference/poolers.md` §7b), those the other suites
//! do not already cover: pipelines with a delayed Sync and an error, the same statement name on
//! two clients, very large Parse and Bind messages, garbage after login and in SCRAM, cancels
//! under a saturated pool and between statements.

mod common;

use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use common::raw::{cancel, error_code, first_column, Msg, Raw};
use common::{setup, APP_PASSWORD};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Messages with their types as characters, ParameterStatus left out.
type Comparable = Vec<(char, Vec<u8>)>;

fn comparable(msgs: Vec<Msg>) -> Comparable {
    msgs.into_iter()
        .filter(|(t, _)| *t != b'S')
        .map(|(t, b)| (t as char, b.to_vec()))
        .collect()
}

/// P/B/D/E three times, the middle one failing, then (later) one Sync.
fn pipeline(c: &mut Raw) {
    for (name, sql) in [("p1", "SELECT 1"), ("p2", "SELECT 1/0"), ("p3", "SELECT 3")] {
        c.parse(name, sql).bind("", name);
        pgwarden_protocol::frontend::put_describe(
            &mut c.out,
            pgwarden_protocol::frontend::Target::Portal,
            "",
        );
        c.execute("");
    }
}

#[tokio::test]
async fn a_pipeline_with_an_error_and_a_delayed_sync_is_answered_as_postgres_answers_it() {
    let s = setup(0, "default_pool_size = 1").await;
    let direct_addr = std::net::SocketAddr::from(([127, 0, 0, 1], s.cluster.port(0)));
    let mut direct = Raw::connect(direct_addr, "app", APP_PASSWORD, "app", &[]).await;
    let mut proxied = s.raw(&[]).await;
    let other = s.app().await;
    let mut streams = Vec::new();
    for c in [&mut direct, &mut proxied] {
        pipeline(c);
        c.flush().await;
        // The Sync comes late; meanwhile the pipeline keeps its server (it is never split).
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.sync();
        c.flush().await;
        streams.push(comparable(c.until_ready().await.1));
    }
    assert_eq!(
        streams[0], streams[1],
        "direct and proxied pipelines differ"
    );
    let tags: String = streams[1].iter().map(|(t, _)| *t).collect();
    assert_eq!(
        tags, "12TDC1EZ",
        "first statement ran, the error, the rest skipped"
    );
    // While the proxied pipeline waited for its Sync, the only server was held.
    pipeline(&mut proxied);
    proxied.flush().await;
    let blocked = tokio::spawn(async move { other.batch_execute("SELECT 1").await.map(|_| other) });
    s.waiting(1).await;
    assert!(
        !blocked.is_finished(),
        "another client got the server in the middle of a pipeline"
    );
    proxied.sync();
    proxied.flush().await;
    proxied.until_ready().await;
    blocked
        .await
        .expect("join")
        .expect("runs once the pipeline is synced");
}

#[tokio::test]
async fn two_clients_with_the_same_statement_names_and_different_sql() {
    let s = setup(0, "default_pool_size = 1").await;
    let (mut a, mut b) = (s.raw(&[]).await, s.raw(&[]).await);
    a.parse("s1", "SELECT 'a'").sync();
    b.parse("s1", "SELECT 'b'").sync();
    for c in [&mut a, &mut b] {
        c.flush().await;
        c.until_ready().await;
    }
    async fn run(c: &mut Raw, name: &str) -> Vec<Option<String>> {
        c.bind("", name).execute("").sync();
        c.flush().await;
        first_column(&c.until_ready().await.1)
    }
    for _ in 0..3 {
        assert_eq!(run(&mut a, "s1").await, [Some("a".to_string())]);
        assert_eq!(run(&mut b, "s1").await, [Some("b".to_string())]);
    }
    // Name reuse after Close.
    a.close_statement("s1").parse("s1", "SELECT 'c'").sync();
    a.flush().await;
    assert_eq!(a.until_ready().await.0, "31Z");
    assert_eq!(run(&mut a, "s1").await, [Some("c".to_string())]);
    // DISCARD ALL drops a's statements, not b's.
    a.query("DISCARD ALL");
    a.flush().await;
    a.until_ready().await;
    a.bind("", "s1").execute("").sync();
    a.flush().await;
    assert_eq!(
        error_code(&a.until_ready().await.1).as_deref(),
        Some("26000")
    );
    assert_eq!(run(&mut b, "s1").await, [Some("b".to_string())]);
}

#[tokio::test]
async fn very_large_parse_and_bind_messages() {
    let s = setup(0, "").await;
    let mut c = s.raw(&[]).await;
    // A 300 kB query text (several times any read buffer).
    let padding = "x".repeat(300_000);
    c.parse("big", format!("SELECT length('{padding}')"))
        .bind("", "big")
        .execute("")
        .sync();
    c.flush().await;
    assert_eq!(
        first_column(&c.until_ready().await.1),
        [Some("300000".to_string())]
    );
    // A Bind with 20,000 parameters.
    let n = 20_000;
    let list: Vec<String> = (1..=n).map(|i| format!("${i}::int")).collect();
    c.parse(
        "many",
        format!("SELECT array_length(ARRAY[{}], 1)", list.join(",")),
    );
    let mut bind = BytesMut::new();
    bind.put_i16(0);
    bind.put_i16(n as i16);
    for i in 0..n {
        let v = i.to_string();
        bind.put_i32(v.len() as i32);
        bind.put_slice(v.as_bytes());
    }
    bind.put_i16(0);
    pgwarden_protocol::frontend::put_bind(&mut c.out, "", "many", &bind);
    c.execute("").sync();
    c.flush().await;
    assert_eq!(
        first_column(&c.until_ready().await.1),
        [Some(n.to_string())]
    );
}

#[tokio::test]
async fn garbage_after_login_ends_only_that_session() {
    let s = setup(0, "default_pool_size = 2").await;
    let bystander = s.app().await;
    let junk: [&[u8]; 5] = [
        b"z\x00\x00\x00\x04",                   // an unknown message type
        b"Q\x7f\xff\xff\xff",                   // claims 2 GB
        b"B\x00\x00\x00\x0dportal\x00\x00\x05", // a Bind cut short inside its frame
        b"B\x00\x00\x00\x08\x00\x00\x00\x05",   // the same, unnamed (a shorter path)
        b"Q\x00\x00\x00\x20SELECT 1",           // truncated, then EOF
    ];
    for bytes in junk {
        let mut c = s.raw(&[]).await;
        c.send_bytes(bytes).await;
        if bytes.ends_with(b"SELECT 1") {
            drop(c); // EOF in the middle of a frame
            continue;
        }
        let all = c
            .until_closed(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("{bytes:?}: the session did not end"));
        let code = error_code(&all);
        assert!(
            matches!(code.as_deref(), Some("08P01")),
            "{bytes:?}: {code:?} {all:?}"
        );
    }
    for _ in 0..3 {
        bystander
            .batch_execute("SELECT 1")
            .await
            .expect("the bystander never noticed");
        s.app()
            .await
            .batch_execute("SELECT 1")
            .await
            .expect("new clients are fine");
    }
}

/// The proxy skips decoding a Parse of the unnamed statement whose text it has just seen; a
/// malformed one with that text is still refused as a protocol violation.
#[tokio::test]
async fn a_malformed_repeat_of_the_last_parse_is_still_refused() {
    let s = setup(0, "").await;
    let mut c = s.raw(&[]).await;
    let sql = "SELECT 1";
    c.parse("", sql)
        .bind("", "")
        .execute("")
        .sync()
        .flush()
        .await;
    let (tags, msgs) = c.until_ready().await;
    assert_eq!(tags, "12DCZ", "{msgs:?}");
    // The same text, but the parameter type list claims 3 OIDs and carries one.
    let mut body = vec![0u8];
    body.extend_from_slice(sql.as_bytes());
    body.push(0);
    body.extend_from_slice(&3i16.to_be_bytes());
    body.extend_from_slice(&23u32.to_be_bytes());
    let mut frame = vec![b'P'];
    frame.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    c.send_bytes(&frame).await;
    let all = c
        .until_closed(Duration::from_secs(10))
        .await
        .expect("the session ends");
    assert_eq!(error_code(&all).as_deref(), Some("08P01"), "{all:?}");
}

#[tokio::test]
async fn garbage_in_scram_is_a_protocol_error() {
    let s = setup(0, "").await;
    let frame = |body: &[u8]| {
        let mut b = BytesMut::new();
        pgwarden_protocol::frame::put_message(&mut b, b'p', |m| m.extend_from_slice(body));
        b.to_vec()
    };
    let cases: Vec<(Vec<u8>, Option<Vec<u8>>)> = vec![
        // A mechanism and no data length.
        (frame(b"SCRAM-SHA-256\0"), None),
        // Data that is not a client-first message.
        (frame(b"SCRAM-SHA-256\0\0\0\0\x05xxxxx"), None),
        // A good client-first, then a client-final that is junk.
        (
            frame(b"SCRAM-SHA-256\0\0\0\0\x13n,,n=,r=abcdefghijk"),
            Some(frame(b"junk")),
        ),
    ];
    for (first, second) in cases {
        let mut tcp = tokio::net::TcpStream::connect(s.addr)
            .await
            .expect("connect");
        let mut startup = BytesMut::new();
        pgwarden_protocol::startup::put_startup(
            &mut startup,
            &[("user", "app"), ("database", "app")],
        );
        tcp.write_all(&startup).await.expect("startup");
        let mut buf = vec![0u8; 4096];
        let _ = tcp.read(&mut buf).await; // AuthenticationSASL
        tcp.write_all(&first).await.expect("write");
        if let Some(second) = second {
            let _ = tcp.read(&mut buf).await; // SASLContinue
            tcp.write_all(&second).await.expect("write");
        }
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.contains("08P01") || text.contains("28P01"),
            "{first:?}: {text}"
        );
    }
    s.app()
        .await
        .batch_execute("SELECT 1")
        .await
        .expect("still serving");
}

#[tokio::test]
async fn cancels_under_a_saturated_pool_and_between_statements() {
    let s = setup(0, "default_pool_size = 1").await;
    let mut a = s.raw(&[]).await;
    a.query("SELECT pg_sleep(30)");
    a.flush().await;
    s.running("SELECT pg_sleep(30)").await;
    // The pool is saturated: b waits for a's server.
    let b = s.app().await;
    let waiting = tokio::spawn(async move { b.batch_execute("SELECT 1").await });
    s.waiting(1).await;
    let started = Instant::now();
    cancel(s.addr, a.key.expect("key")).await;
    let (_, msgs) = a.until_ready().await;
    assert_eq!(error_code(&msgs).as_deref(), Some("57014"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cancel took {:?}",
        started.elapsed()
    );
    waiting
        .await
        .expect("join")
        .expect("b runs once a's query is cancelled");
    // A cancel while a is idle touches nothing and injects nothing into its stream.
    cancel(s.addr, a.key.expect("key")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.query("SELECT 1");
    a.flush().await;
    assert_eq!(
        a.until_ready().await.0,
        "TDCZ",
        "a stray message after an idle cancel"
    );
}

#[tokio::test]
async fn a_cancel_reaches_a_query_still_waiting_for_a_server() {
    let s = setup(0, "default_pool_size = 1").await;
    let mut holder = s.raw(&[]).await;
    holder.query("SELECT pg_sleep(30)");
    holder.flush().await;
    s.running("SELECT pg_sleep(30)").await;
    // b's query queues behind the only server; its cancel fails it at once, as a running
    // query's would (PostgreSQL's 57014), instead of letting it run later.
    let mut b = s.raw(&[]).await;
    for extended in [false, true] {
        if extended {
            b.parse("", "SELECT 1").bind("", "").execute("").sync();
        } else {
            b.query("SELECT 1");
        }
        b.flush().await;
        s.waiting(1).await;
        let started = Instant::now();
        cancel(s.addr, b.key.expect("key")).await;
        let (tags, msgs) = b.until_ready().await;
        assert_eq!(tags, "EZ", "extended: {extended}");
        assert_eq!(error_code(&msgs).as_deref(), Some("57014"));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
    }
    // The running query was not touched; cancelling it frees the server for b.
    cancel(s.addr, holder.key.expect("key")).await;
    assert_eq!(
        error_code(&holder.until_ready().await.1).as_deref(),
        Some("57014")
    );
    b.query("SELECT 42");
    b.flush().await;
    assert_eq!(
        first_column(&b.until_ready().await.1),
        [Some("42".to_string())]
    );
}

/// What drivers send for each unprepared query (Parse of the unnamed statement, Bind, Describe,
/// Execute, Sync), the same text again and again, pipelined several batches to a write, with
/// an error in the middle of a batch, an error raised by a Sync (a deferred constraint), a
/// Flush inside a batch, Describe of the statement and of the portal: the proxy passes such
/// batches whole (see `pipeline::express`), and answers exactly as PostgreSQL does.
#[tokio::test]
async fn repeated_unnamed_batches_are_answered_as_postgres_answers_them() {
    let s = setup(0, "default_pool_size = 1").await;
    s.deferred_table("express").await;
    let direct_addr = std::net::SocketAddr::from(([127, 0, 0, 1], s.cluster.port(0)));
    let mut direct = Raw::connect(direct_addr, "app", APP_PASSWORD, "app", &[]).await;
    let mut proxied = s.raw(&[]).await;
    let other = s.app().await;
    let divide = "SELECT 100 / $1::int AS q";
    let insert = "INSERT INTO express VALUES ($1::int, $1::int + 1000)";
    let batch = |c: &mut Raw, sql: &str, param: &[u8]| {
        c.parse("", sql).bind_params("", "", &[param]);
        pgwarden_protocol::frontend::put_describe(
            &mut c.out,
            pgwarden_protocol::frontend::Target::Portal,
            "",
        );
        c.execute("").sync();
    };
    let mut streams: Vec<Vec<Comparable>> = Vec::new();
    for c in [&mut direct, &mut proxied] {
        let mut answers = Vec::new();
        for round in 0..3 {
            // Four batches in one write, the third failing (at its Bind: the division by a
            // constant zero is folded while planning).
            for p in [b"5".as_slice(), b"4", b"0", b"2"] {
                batch(c, divide, p);
            }
            c.flush().await;
            for _ in 0..4 {
                answers.push(comparable(c.until_ready().await.1));
            }
            // Fails at its Sync (the row refers to one that never comes), with a good batch
            // behind it in the same write.
            batch(c, insert, format!("{round}").as_bytes());
            batch(c, divide, b"10");
            c.flush().await;
            answers.push(comparable(c.until_ready().await.1));
            answers.push(comparable(c.until_ready().await.1));
            // Describe of the statement, a Flush in the middle (answered before the Sync).
            c.parse("", divide).describe_statement("");
            pgwarden_protocol::frontend::put_flush(&mut c.out);
            c.flush().await;
            let mut early = Vec::new();
            for _ in 0..3 {
                early.push(c.recv().await);
            }
            answers.push(comparable(early));
            c.bind_params("", "", &[b"50"]).execute("").sync();
            c.flush().await;
            answers.push(comparable(c.until_ready().await.1));
        }
        streams.push(answers);
    }
    assert_eq!(streams[0], streams[1], "direct and proxied answers differ");
    let tags: Vec<String> = streams[1][..8]
        .iter()
        .map(|a| a.iter().map(|(t, _)| *t).collect())
        .collect();
    assert_eq!(
        tags,
        ["12TDCZ", "12TDCZ", "1EZ", "12TDCZ", "12nCEZ", "12TDCZ", "1tT", "2DCZ"],
        "answers of the first round"
    );
    // Every batch ended its transaction: the one server is free for another client.
    let n: i64 = other
        .query_one("SELECT count(*) FROM express", &[])
        .await
        .expect("the server is free")
        .get(0);
    assert_eq!(n, 0, "every insert failed at its commit");
}
