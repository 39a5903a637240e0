//! psycopg 3 (libpq) through the proxy: pipeline mode and server-side prepared statements with
//! `prepare_threshold=0`, in transaction mode. The cases are in `python/psycopg_suite.py`;
//! `./dev test` installs psycopg.

mod common;

use common::{setup, APP_PASSWORD};

#[tokio::test]
async fn psycopg_pipelines_and_prepared_statements() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import psycopg"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        _ => panic!(
            "psycopg 3 is not installed for python3: `python3 -m pip install 'psycopg[binary]'` (./dev test does this)"
        ),
    }
    // With a replica: reads are split off to it (session consistency).
    let s = setup(1, "default_pool_size = 4").await;
    let owner = format!(
        "host=127.0.0.1 port={} user={} password={} dbname=app",
        s.cluster.port(0),
        pgwarden_testkit::SUPERUSER,
        pgwarden_testkit::SUPERUSER_PASSWORD
    );
    let dsn = format!(
        "host=127.0.0.1 port={} user=app password={APP_PASSWORD} dbname=app",
        s.addr.port()
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/psycopg_suite.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .env("PGWARDEN_DSN", dsn)
        .env("PGWARDEN_ADMIN_DSN", owner)
        .output()
        .await
        .expect("run python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "psycopg suite failed:\n{text}");
    assert_eq!(
        text.matches("\nok ").count() + usize::from(text.starts_with("ok ")),
        6,
        "{text}"
    );
    let replica = s.shared.nodes.get(&pgwarden_core::NodeId::new("n2"));
    assert!(
        replica.reads.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "some of the suite's reads ran on the replica"
    );
}
