//! `pgwarden agent` refuses what it cannot run with one line and a non-zero exit, never a hang.

mod common;

use std::time::{Duration, Instant};

use common::run;

fn config(dir: &std::path::Path, extra: &str) -> String {
    let data = dir.join("n1");
    let text = format!(
        "[postgres]\nsuperuser_password = \"x\"\n[[nodes]]\nname = \"n1\"\nport = 5432\n\
         data_dir = \"{}\"\napi = \"127.0.0.1:1\"\n{extra}",
        data.display()
    );
    let p = dir.join("pgwarden.toml");
    std::fs::write(&p, text).expect("write config");
    p.to_string_lossy().into_owned()
}

/// The cause: the one line of stderr that is not a log record. (On a busy machine the agent may
/// log that it waits for the store before it gets to the cause; that is a log, not the error.)
fn one_line(r: &common::Run) -> &str {
    let is_log = |l: &str| {
        l.get(..4)
            .is_some_and(|y| y.bytes().all(|b| b.is_ascii_digit()))
            && [" INFO ", " WARN ", " DEBUG "]
                .iter()
                .any(|lvl| l.contains(lvl))
    };
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !is_log(l)).collect();
    assert_eq!(lines.len(), 1, "{}", r.stderr);
    assert_eq!(
        r.stderr.lines().last(),
        Some(lines[0]),
        "the cause comes last: {}",
        r.stderr
    );
    lines[0]
}

#[test]
fn a_node_not_in_the_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = config(dir.path(), "");
    let r = run(&["agent", "-c", &path, "--node", "n9"]);
    assert_eq!(r.code, 2);
    assert!(
        one_line(&r).contains("\"n9\" is not in [[nodes]]"),
        "{}",
        r.stderr
    );
}

#[test]
fn no_store_configured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = config(dir.path(), "");
    let r = run(&["agent", "-c", &path, "--node", "n1"]);
    assert_eq!(r.code, 1);
    assert!(one_line(&r).contains("no [dcs] section"), "{}", r.stderr);
}

/// A store that does not answer is waited for (a daemon may start before its etcd), with its
/// address and cause in the log, and SIGTERM ends the wait cleanly. Nothing is started meanwhile.
#[test]
fn an_unreachable_store_is_waited_for_until_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = pgwarden_testkit::ports::free_ports(1)[0];
    let path = config(
        dir.path(),
        &format!("[dcs]\nendpoints = [\"127.0.0.1:{port}\"]\ntimeout = \"1s\"\n"),
    );
    let log = dir.path().join("agent.log");
    let mut agent = common::pgwarden()
        .args(["agent", "-c", &path, "--node", "n1"])
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start the agent");
    let started = Instant::now();
    let said = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("waiting for the store") || started.elapsed() > Duration::from_secs(20) {
            break text;
        }
        assert!(agent.try_wait().expect("wait").is_none(), "exited:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(said.contains("waiting for the store"), "{said}");
    assert!(said.contains(&format!("127.0.0.1:{port}")), "{said}");
    assert!(
        !dir.path().join("n1").exists(),
        "nothing is started: {said}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let asked = Instant::now();
    let status = loop {
        if let Some(s) = agent.try_wait().expect("wait") {
            break s;
        }
        assert!(asked.elapsed() < Duration::from_secs(10), "SIGTERM ignored");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

/// Past `dcs.start_wait` the agent gives up: exit 1, the cause on its last line, with how long
/// it waited.
#[test]
fn an_unreachable_store_past_start_wait_is_a_one_line_exit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = pgwarden_testkit::ports::free_ports(1)[0];
    let path = config(
        dir.path(),
        &format!(
            "[dcs]\nendpoints = [\"127.0.0.1:{port}\"]\ntimeout = \"1s\"\nstart_wait = \"2s\"\n"
        ),
    );
    let started = Instant::now();
    let r = run(&["agent", "-c", &path, "--node", "n1"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let last = r.stderr.lines().last().unwrap_or_default();
    assert!(last.contains("cannot reach etcd"), "{}", r.stderr);
    assert!(last.contains("dcs.start_wait"), "{}", r.stderr);
    assert!(
        started.elapsed() >= Duration::from_secs(2) && started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert!(!dir.path().join("n1").exists(), "nothing was started");
}

#[tokio::test]
async fn a_data_directory_owned_by_someone_else() {
    let etcd = pgwarden_testkit::etcd::Etcd::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let data = dir.path().join("n1");
    std::fs::create_dir(&data).expect("mkdir");
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: only root can make a directory someone else's");
        return;
    }
    // Owned by nobody (uid 65534), not by the PostgreSQL user.
    nix::unistd::chown(&data, Some(nix::unistd::Uid::from_raw(65534)), None)
        .expect("chown (the tests run as root)");
    let path = config(
        dir.path(),
        &format!("[dcs]\nendpoints = [\"{}\"]\n", etcd.endpoint()),
    );
    let r = run(&["agent", "-c", &path, "--node", "n1"]);
    assert_eq!(r.code, 1);
    assert!(
        one_line(&r).contains("is owned by uid 65534"),
        "{}",
        r.stderr
    );
}
