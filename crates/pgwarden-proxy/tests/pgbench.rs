//! pgbench (libpq) through the proxy.

mod common;

use common::{pgbench, setup};

fn assert_all_done(text: &str, total: u32) {
    let want = format!("number of transactions actually processed: {total}/{total}");
    assert!(text.contains(&want), "{want:?} not in:\n{text}");
    assert!(
        text.contains("number of failed transactions: 0 "),
        "failures in:\n{text}"
    );
}

#[tokio::test]
async fn transaction_mode_simple_and_extended_with_more_clients_than_servers() {
    let s = setup(0, "default_pool_size = 4").await;
    // pgbench -i loads its tables with COPY through the proxy.
    let init = pgbench(&s, &["-i", "-s", "1", "-q"]).await;
    assert!(init.contains("done"), "{init}");
    let c = s.app().await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM pgbench_accounts", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 100_000);
    for mode in ["simple", "extended"] {
        let out = pgbench(&s, &["-M", mode, "-c", "16", "-j", "2", "-t", "100"]).await;
        assert_all_done(&out, 1600);
    }
    // 16 clients shared at most 4 server connections.
    let servers: i64 = c
        .query_one("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'", &[])
        .await
        .expect("count")
        .get(0);
    assert!(servers <= 4, "{servers} server connections for a pool of 4");
}

#[tokio::test]
async fn session_mode_runs_prepared_statements() {
    let s = setup(0, "pool_mode = \"session\"\ndefault_pool_size = 4").await;
    pgbench(&s, &["-i", "-s", "1", "-q"]).await;
    let out = pgbench(&s, &["-M", "prepared", "-c", "4", "-j", "2", "-t", "200"]).await;
    assert_all_done(&out, 800);
}

#[tokio::test]
async fn transaction_mode_runs_prepared_statements() {
    let s = setup(0, "default_pool_size = 4").await;
    pgbench(&s, &["-i", "-s", "1", "-q"]).await;
    let out = pgbench(&s, &["-M", "prepared", "-c", "16", "-j", "2", "-t", "100"]).await;
    assert_all_done(&out, 1600);
    // The default TPC-B-like script: several statements per transaction, prepared once each.
    let out = pgbench(
        &s,
        &["-M", "prepared", "-c", "8", "-j", "2", "-t", "50", "-N"],
    )
    .await;
    assert_all_done(&out, 400);
}
