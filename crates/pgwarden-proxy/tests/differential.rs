//! The differential suite (after PgDog's): every case runs against PostgreSQL directly and
//! through the proxy, over the simple protocol and the extended protocol with text and binary
//! results, and the two message streams must be the same: command tags, columns and type OIDs,
//! rows, errors, notices. Only ParameterStatus is left out (what the proxy reports at login and
//! what a direct session reports differ in `application_name`). Cases that create tables return
//! computed columns: each run's table has its own OID, which RowDescription carries.

mod common;

use bytes::{BufMut, BytesMut};
use common::raw::{Msg, Raw};
use common::{setup, APP_PASSWORD};
use pgwarden_protocol::frontend::{self, Target};

/// Which protocols a case runs over.
#[derive(Clone, Copy, PartialEq)]
enum Over {
    Both,
    Simple,
    Extended,
}

const CASES: &[(&str, Over, &[&str])] = &[
    ("SELECT 1::int2 AS a, 2::int4 AS b, 3::int8 AS c, 1.5::float4 AS d, 2.5::float8 AS e, 12.345::numeric(10,3) AS f, true AS g, false AS h", Over::Both, &[]),
    ("SELECT 'text'::text, 'vc'::varchar(10), 'c'::char(3), 'name'::name, '\\x0102ff'::bytea", Over::Both, &[]),
    ("SELECT '2026-01-01'::date, '12:34:56.789'::time, '12:34:56+02'::timetz, '2026-01-01 12:00:00'::timestamp, '2026-01-01 12:00:00+00'::timestamptz, interval '1 year 2 days 03:04:05'", Over::Both, &[]),
    ("SELECT '{1,2,NULL}'::int[], ARRAY['a', 'b'], '{\"k\": [1, 2]}'::json, '{\"k\": [1, 2]}'::jsonb, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid", Over::Both, &[]),
    ("SELECT '192.168.0.1/24'::inet, '10.0.0.0/8'::cidr, '08:00:2b:01:02:03'::macaddr, point(1, 2), '[1,5)'::int4range, B'101'", Over::Both, &[]),
    ("SELECT NULL::int AS n, NULL::text, NULL", Over::Both, &[]),
    ("SELECT * FROM (VALUES (1, 'a'), (2, NULL)) v(i, t)", Over::Both, &[]),
    ("SELECT generate_series(1, 5000) AS n", Over::Both, &[]),
    ("SELECT repeat('x', 2000000) AS big", Over::Both, &[]),
    ("SELECT 1/0", Over::Both, &[]),
    ("SELECT * FROM no_such_table", Over::Both, &[]),
    ("SELEC 1", Over::Both, &[]),
    ("SELECT 'abc'::int", Over::Both, &[]),
    ("DO $$BEGIN RAISE NOTICE 'hello %', 42; RAISE WARNING 'careful'; END$$", Over::Both, &[]),
    ("SELECT $1::int + 1 AS answer, $2::text AS t", Over::Extended, &["41", "param"]),
    ("SELECT $1::int", Over::Extended, &["not a number"]),
    ("BEGIN; CREATE TABLE diff_t (i int, t text); INSERT INTO diff_t VALUES (1, 'a'), (2, 'b') RETURNING i + 0 AS i; UPDATE diff_t SET t = 'c' WHERE i = 1; DELETE FROM diff_t WHERE i = 2; SELECT i + 0 AS i, t || '' AS t FROM diff_t; ROLLBACK", Over::Simple, &[]),
    ("SELECT 1; SELECT 2, 3; SELECT 'x'", Over::Simple, &[]),
    ("SELECT 1; SELECT 1/0; SELECT 3", Over::Simple, &[]),
    ("", Over::Simple, &[]),
    (";", Over::Simple, &[]),
    ("-- only a comment", Over::Simple, &[]),
    ("COPY (SELECT generate_series(1, 100), 'x') TO STDOUT", Over::Simple, &[]),
    ("COPY (SELECT 1, 'x') TO STDOUT (FORMAT binary)", Over::Simple, &[]),
    ("SHOW server_version_num", Over::Both, &[]),
    ("SELECT current_user, session_user, current_database()", Over::Both, &[]),
];

async fn simple(c: &mut Raw, sql: &str) -> Vec<Msg> {
    c.query(sql);
    c.flush().await;
    c.until_ready().await.1
}

async fn extended(c: &mut Raw, sql: &str, params: &[&str], binary: bool) -> Vec<Msg> {
    frontend::put_parse(&mut c.out, "", sql.as_bytes(), &[0, 0]);
    let mut bind = BytesMut::new();
    bind.put_i16(0);
    bind.put_i16(params.len() as i16);
    for p in params {
        bind.put_i32(p.len() as i32);
        bind.put_slice(p.as_bytes());
    }
    if binary {
        bind.put_i16(1);
        bind.put_i16(1);
    } else {
        bind.put_i16(0);
    }
    frontend::put_bind(&mut c.out, "", "", &bind);
    frontend::put_describe(&mut c.out, Target::Portal, "");
    c.execute("").sync();
    c.flush().await;
    c.until_ready().await.1
}

/// The stream without ParameterStatus, as (type, body) pairs.
fn comparable(msgs: Vec<Msg>) -> Vec<(char, Vec<u8>)> {
    msgs.into_iter()
        .filter(|(t, _)| *t != b'S')
        .map(|(t, b)| (t as char, b.to_vec()))
        .collect()
}

fn describe(msgs: &[(char, Vec<u8>)]) -> String {
    msgs.iter()
        .map(|(t, b)| format!("{t}:{}", String::from_utf8_lossy(&b[..b.len().min(120)])))
        .collect::<Vec<_>>()
        .join("\n  ")
}

#[tokio::test]
async fn direct_and_proxied_answers_are_the_same() {
    // Transaction mode with a replica: reads are split off to it, and still answer the same.
    for (mode, replicas) in [("transaction", 1), ("session", 0)] {
        let s = setup(
            replicas,
            &format!("pool_mode = \"{mode}\"\ndefault_pool_size = 2"),
        )
        .await;
        s.replicas_reported().await;
        let direct_addr = std::net::SocketAddr::from(([127, 0, 0, 1], s.cluster.port(0)));
        let mut direct = Raw::connect(direct_addr, "app", APP_PASSWORD, "app", &[]).await;
        let mut proxied = s.raw(&[]).await;
        let mut compared = 0;
        for &(sql, over, params) in CASES {
            let runs: &[(&str, Option<bool>)] = match over {
                Over::Both => &[
                    ("simple", None),
                    ("text", Some(false)),
                    ("binary", Some(true)),
                ],
                Over::Simple => &[("simple", None)],
                Over::Extended => &[("text", Some(false)), ("binary", Some(true))],
            };
            for &(how, binary) in runs {
                let (d, p) = match binary {
                    None => (
                        simple(&mut direct, sql).await,
                        simple(&mut proxied, sql).await,
                    ),
                    Some(b) => (
                        extended(&mut direct, sql, params, b).await,
                        extended(&mut proxied, sql, params, b).await,
                    ),
                };
                let (d, p) = (comparable(d), comparable(p));
                assert!(
                    d == p,
                    "{mode} mode, {how}: {sql}\ndirect:\n  {}\nproxy:\n  {}",
                    describe(&d),
                    describe(&p)
                );
                compared += 1;
            }
        }
        let expected: usize = CASES
            .iter()
            .map(|c| match c.1 {
                Over::Both => 3,
                Over::Simple => 1,
                Over::Extended => 2,
            })
            .sum();
        assert_eq!(compared, expected);
        if replicas > 0 {
            let replica = s.shared.nodes.get(&pgwarden_core::NodeId::new("n2"));
            assert!(
                replica.reads.load(std::sync::atomic::Ordering::Relaxed) > 0,
                "some of the cases ran on the replica: reads on the primary {:?}",
                s.shared.nodes.primary_reads(),
            );
        }
    }
}
