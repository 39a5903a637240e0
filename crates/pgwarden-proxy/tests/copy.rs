//! COPY through the proxy: both directions, errors mid-COPY, and clients that vanish mid-COPY
//! (the server connection is closed, never handed to the next client dirty).

mod common;

use bytes::Bytes;
use common::setup;
use futures::{SinkExt, StreamExt};
use tokio_postgres::error::SqlState;

async fn make_table(s: &common::Setup) {
    s.cluster
        .client_db(0, "app")
        .await
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, name text); GRANT ALL ON items TO app",
        )
        .await
        .expect("table");
}

async fn count(c: &tokio_postgres::Client) -> i64 {
    c.query_one("SELECT count(*) FROM public.items", &[])
        .await
        .expect("count")
        .get(0)
}

#[tokio::test]
async fn copy_in_and_out_move_every_row() {
    let s = setup(0, "default_pool_size = 1").await;
    make_table(&s).await;
    let c = s.app().await;
    let sink = c
        .copy_in("COPY public.items FROM STDIN")
        .await
        .expect("copy in");
    futures::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..20_000 {
        data.push_str(&format!("{i}\tname {i}\n"));
    }
    // Several CopyData messages of different sizes.
    for chunk in data.as_bytes().chunks(7_777) {
        sink.send(Bytes::copy_from_slice(chunk))
            .await
            .expect("send");
    }
    assert_eq!(sink.finish().await.expect("finish"), 20_000);
    assert_eq!(count(&c).await, 20_000);
    let stream = c
        .copy_out("COPY (SELECT * FROM public.items ORDER BY id) TO STDOUT")
        .await
        .expect("copy out");
    futures::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.expect("chunk"));
    }
    assert_eq!(String::from_utf8(out).expect("utf-8"), data);
}

#[tokio::test]
async fn errors_mid_copy_leave_a_usable_connection() {
    let s = setup(0, "default_pool_size = 1").await;
    make_table(&s).await;
    let c = s.app().await;
    // Bad data: the server stops the COPY with an error.
    let sink = c
        .copy_in("COPY public.items FROM STDIN")
        .await
        .expect("copy in");
    futures::pin_mut!(sink);
    sink.send(Bytes::from_static(b"1\tok\nnot-a-number\tbad\n"))
        .await
        .expect("send");
    let e = sink.finish().await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(&SqlState::INVALID_TEXT_REPRESENTATION),
        "{e:?}"
    );
    assert_eq!(count(&c).await, 0, "the failed COPY wrote nothing");
    // The client gives up: dropping the sink sends CopyFail.
    let mut sink = Box::pin(
        c.copy_in("COPY public.items FROM STDIN")
            .await
            .expect("copy in"),
    );
    sink.send(Bytes::from_static(b"2\tok\n"))
        .await
        .expect("send");
    drop(sink);
    assert_eq!(count(&c).await, 0);
    // Another client gets the same (only) server, clean.
    let other = s.app().await;
    other
        .batch_execute("INSERT INTO public.items VALUES (3, 'after')")
        .await
        .expect("insert");
    assert_eq!(count(&other).await, 1);
}

#[tokio::test]
async fn a_client_that_disconnects_mid_copy_never_leaves_a_dirty_server() {
    let s = setup(0, "default_pool_size = 1").await;
    make_table(&s).await;
    // COPY FROM: some data, then the socket goes away.
    let mut raw = s.raw(&[]).await;
    raw.query("COPY public.items FROM STDIN");
    raw.flush().await;
    let (tag, _) = raw.recv().await;
    assert_eq!(tag, b'G', "CopyInResponse");
    let mut data = bytes::BytesMut::new();
    pgwarden_protocol::frontend::put_copy_data(&mut data, b"10\tpartial\n");
    raw.send_bytes(&data).await;
    drop(raw);
    // COPY TO of a big result, abandoned after the first message.
    let mut raw = s.raw(&[]).await;
    raw.query("COPY (SELECT g, repeat('x', 1000) FROM generate_series(1, 200000) g) TO STDOUT");
    raw.flush().await;
    let (tag, _) = raw.recv().await;
    assert_eq!(tag, b'H', "CopyOutResponse");
    drop(raw);
    // The only server slot serves the next client, with nothing half-done on it.
    let c = s.app().await;
    assert_eq!(count(&c).await, 0, "the abandoned COPY was not committed");
    let busy: i64 = s
        .cluster
        .client(0)
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND query LIKE 'COPY%' AND state <> 'idle'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(busy, 0, "a server still runs an abandoned COPY");
}

/// COPY FROM STDIN as drivers send an unprepared statement (Parse of the unnamed statement,
/// Bind, Execute, Sync), the same text again and again: the server ignores that Sync until the
/// COPY ends, and the client's next Sync is the one answered. A COPY is never one of the
/// batches passed whole (see `pipeline::express`), however often its text repeats.
#[tokio::test]
async fn unnamed_extended_copy_in_repeated() {
    let s = setup(0, "default_pool_size = 1").await;
    make_table(&s).await;
    let mut raw = s.raw(&[]).await;
    for (i, sql) in [
        "COPY public.items FROM STDIN",
        "COPY public.items FROM STDIN",
        "copy public.items FROM STDIN",
        "copy public.items FROM STDIN",
        "  Copy public.items FROM STDIN",
    ]
    .iter()
    .enumerate()
    {
        raw.parse("", sql).bind("", "").execute("").sync();
        raw.flush().await;
        let mut tags = String::new();
        for _ in 0..3 {
            tags.push(raw.recv().await.0 as char);
        }
        assert_eq!(tags, "12G", "round {i}: CopyInResponse");
        let mut data = bytes::BytesMut::new();
        pgwarden_protocol::frontend::put_copy_data(&mut data, format!("{i}\trow {i}\n").as_bytes());
        pgwarden_protocol::frontend::put_copy_done(&mut data);
        raw.send_bytes(&data).await;
        raw.sync();
        raw.flush().await;
        assert_eq!(
            raw.until_ready().await.0,
            "CZ",
            "round {i}: one ReadyForQuery"
        );
    }
    // Every row is in, and the one server is free for the next client.
    let c = s.app().await;
    assert_eq!(count(&c).await, 5);
}
