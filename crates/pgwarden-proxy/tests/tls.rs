//! TLS for clients: required, allowed, disabled; checked with psql (libpq + OpenSSL).

mod common;

use common::{setup, Setup, APP_PASSWORD};
use pgwarden_postgres::PgBinaries;

/// A self-signed certificate and key, written next to the cluster; returns the TOML for them.
fn tls_toml(dir: &std::path::Path, mode: &str) -> String {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("generate a certificate");
    let cert = dir.join("proxy-cert.pem");
    let key = dir.join("proxy-key.pem");
    std::fs::write(&cert, ck.cert.pem()).expect("write cert");
    std::fs::write(&key, ck.key_pair.serialize_pem()).expect("write key");
    format!(
        "[proxy.client_tls]\nmode = \"{mode}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    )
}

async fn setup_tls(mode: &str) -> Setup {
    // The files are read when the proxy starts, not after.
    let dir = tempfile::tempdir().expect("tempdir");
    setup(
        0,
        &format!("default_pool_size = 2\n{}", tls_toml(dir.path(), mode)),
    )
    .await
}

/// Runs `\conninfo` through psql with `sslmode`; Ok(conninfo output) or Err(stderr).
async fn psql(s: &Setup, sslmode: &str) -> Result<String, String> {
    let bins = PgBinaries::find(None).expect("PostgreSQL binaries");
    let conninfo = format!(
        "host=127.0.0.1 port={} user=app dbname=app sslmode={sslmode} connect_timeout=5",
        s.addr.port()
    );
    let out = tokio::process::Command::new(bins.program("psql"))
        .args([
            conninfo.as_str(),
            "-X",
            "-c",
            "\\conninfo",
            "-c",
            "SELECT 41 + 1",
        ])
        .env("PGPASSWORD", APP_PASSWORD)
        .output()
        .await
        .expect("run psql");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        assert!(stdout.contains("42"), "{stdout}");
        Ok(stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test]
async fn required_tls_refuses_plaintext_and_serves_tls() {
    let s = setup_tls("require").await;
    let out = psql(&s, "require").await.expect("TLS login");
    assert!(out.contains("SSL connection"), "{out}");
    let err = psql(&s, "disable").await.expect_err("plaintext refused");
    assert!(err.contains("TLS is required"), "{err}");
    // sslmode=prefer falls back to nothing: it uses TLS.
    let out = psql(&s, "prefer").await.expect("prefer uses TLS");
    assert!(out.contains("SSL connection"), "{out}");
}

#[tokio::test]
async fn allowed_tls_serves_both() {
    let s = setup_tls("allow").await;
    let out = psql(&s, "require").await.expect("TLS login");
    assert!(out.contains("SSL connection"), "{out}");
    let out = psql(&s, "disable").await.expect("plaintext login");
    assert!(!out.contains("SSL connection"), "{out}");
    // A driver that never asks for TLS works too.
    s.app()
        .await
        .batch_execute("SELECT 1")
        .await
        .expect("plaintext tokio-postgres");
}

#[tokio::test]
async fn disabled_tls_declines_the_request() {
    let s = setup(0, "").await;
    let err = psql(&s, "require").await.expect_err("no TLS offered");
    assert!(err.contains("does not support SSL"), "{err}");
    psql(&s, "prefer")
        .await
        .expect("prefer falls back to plaintext");
}

#[tokio::test]
async fn a_bad_certificate_is_a_clear_error_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, "not a certificate").expect("write");
    std::fs::write(&key, "not a key").expect("write");
    let cluster = pgwarden_testkit::Cluster::builder().build().await;
    let toml = format!(
        "{}\n[proxy]\nlisten = \"127.0.0.1:0\"\n[proxy.client_tls]\nmode = \"require\"\ncert = \"{}\"\nkey = \"{}\"\n[[proxy.users]]\nname = \"app\"\npassword = \"x\"\n",
        cluster.config_toml(),
        cert.display(),
        key.display()
    );
    let config =
        pgwarden_config::Config::from_toml(&toml, std::path::Path::new("/")).expect("valid toml");
    let (_tx, view) =
        tokio::sync::watch::channel(std::sync::Arc::new(pgwarden_proxy::ClusterView::empty()));
    let e = pgwarden_proxy::Proxy::bind(std::sync::Arc::new(config), view)
        .await
        .err()
        .expect("refused");
    assert!(
        e.to_string()
            .contains("proxy.client_tls.cert: no PEM certificate"),
        "{e}"
    );
}
