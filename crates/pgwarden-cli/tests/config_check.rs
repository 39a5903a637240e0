//! `pgwarden config check`.

mod common;

use common::run;

fn write(dir: &std::path::Path, text: &str) -> String {
    let p = dir.join("pgwarden.toml");
    std::fs::write(&p, text).expect("write config");
    p.to_string_lossy().into_owned()
}

#[test]
fn a_valid_file_prints_ok() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        "cluster = \"main\"\n[postgres]\nsuperuser_password = \"x\"\n[[nodes]]\nname = \"n1\"\nport = 5432\n",
    );
    let r = run(&["config", "check", "-c", &path]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "ok\n"), "{}", r.stderr);
}

#[test]
fn every_mistake_is_reported_on_its_own_line_with_its_path_and_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        r#"
cluster = "main"
[postgres]
superuser_password = "x"
bin_dir = "/nonexistent/bin"
[replication]
mode = "semi-sync"
[monitor]
interval = "fast"
[[nodes]]
name = "n1"
port = 99999
nmae = "typo"
"#,
    );
    let r = run(&["config", "check", "-c", &path]);
    assert_eq!(r.code, 2);
    assert!(r.stdout.is_empty());
    for want in [
        "nodes[0].nmae: unknown key",
        "postgres.bin_dir: /nonexistent/bin does not contain the postgres binary",
        "replication.mode: unknown replication mode \"semi-sync\"",
        "monitor.interval: invalid duration \"fast\"",
        "nodes[0].port: 99999 is not a valid port",
    ] {
        let line = format!("{path}: {want}");
        assert!(
            r.stderr.lines().any(|l| l.starts_with(&line)),
            "missing {line:?} in:\n{}",
            r.stderr
        );
    }
    assert!(
        r.stderr.starts_with(&format!("{path}: 5 errors")),
        "{}",
        r.stderr
    );
}

#[test]
fn the_config_is_found_through_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        "[postgres]\nsuperuser_password = \"x\"\n[[nodes]]\nname = \"n1\"\nport = 5432\n",
    );
    let out = common::pgwarden()
        .args(["config", "check"])
        .env("PGWARDEN_CONFIG", &path)
        .current_dir("/")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    let out = common::pgwarden()
        .args(["config", "check"])
        .env_remove("PGWARDEN_CONFIG")
        .current_dir(dir.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "./pgwarden.toml is the default");
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(run(&["status", "--bogus"]).code, 2);
    assert_eq!(run(&["demo", "--replication", "sometimes"]).code, 2);
}

#[test]
fn list_without_a_store_says_so_in_one_line_and_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        "cluster = \"main\"\n[postgres]\nsuperuser_password = \"x\"\n[[nodes]]\nname = \"n1\"\nport = 5432\n",
    );
    let r = run(&["list", "-c", &path]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("no [dcs]"), "{}", r.stderr);
}
