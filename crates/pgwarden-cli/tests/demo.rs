//! `pgwarden demo`: first run, SIGTERM, reuse, destroy, as root and as an ordinary user.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pgwarden_config::Config;
use pgwarden_testkit::ports::free_port_range;

struct Demo {
    child: Child,
    lines: mpsc::Receiver<String>,
    stdout: Vec<String>,
}

impl Demo {
    fn start(dir: &Path, extra: &[&str], user: Option<(u32, u32)>) -> Demo {
        let mut cmd = common::pgwarden();
        cmd.arg("demo").arg("--dir").arg(dir).args(extra);
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        if let Some((uid, gid)) = user {
            cmd.uid(uid).gid(gid).current_dir("/");
        }
        let mut child = cmd.spawn().expect("start pgwarden demo");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            BufReader::new(out)
                .lines()
                .map_while(Result::ok)
                .for_each(|l| drop(tx.send(l)))
        });
        std::thread::spawn(move || {
            BufReader::new(err)
                .lines()
                .map_while(Result::ok)
                .for_each(|l| drop(tx2.send(format!("stderr: {l}"))))
        });
        Demo {
            child,
            lines: rx,
            stdout: Vec::new(),
        }
    }

    /// Waits for the `ready` line and returns the config path it names.
    fn wait_ready(&mut self) -> PathBuf {
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                self.stdout.push(line.clone());
                if let Some(rest) = line.strip_prefix("pgwarden demo ready: config=") {
                    return PathBuf::from(rest.trim());
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.drain();
                panic!("demo exited early ({status}):\n{}", self.stdout.join("\n"));
            }
        }
        panic!("demo not ready in time:\n{}", self.stdout.join("\n"));
    }

    /// Waits (bounded) for an output line containing `text`.
    fn wait_line(&mut self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                self.stdout.push(line.clone());
                if line.contains(text) {
                    return;
                }
            }
        }
        panic!("no line with {text:?}:\n{}", self.stdout.join("\n"));
    }

    fn drain(&mut self) {
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(100)) {
            self.stdout.push(l);
        }
    }

    /// SIGTERM; returns the exit code and how long the stop took.
    fn terminate(&mut self) -> (i32, Duration) {
        self.stop_with(Signal::SIGTERM)
    }

    fn stop_with(&mut self, sig: Signal) -> (i32, Duration) {
        let started = Instant::now();
        kill(Pid::from_raw(self.child.id() as i32), sig).expect("signal demo");
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "demo ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        self.drain();
        (status.code().unwrap_or(-1), started.elapsed())
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
            let _ = self.child.wait();
        }
    }
}

/// A directory the PostgreSQL OS user can reach (tempdir is 0700 and root's under root).
fn demo_parent() -> tempfile::TempDir {
    let t = tempfile::Builder::new()
        .prefix("pgwarden-demo-test")
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    t
}

async fn proxy_client(config: &Config, port: u16) -> tokio_postgres::Client {
    let app = config
        .users
        .iter()
        .find(|u| u.name == "app")
        .expect("app user in config");
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user("app")
        .password(app.password.expose())
        .dbname("app")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect through the proxy");
    tokio::spawn(conn);
    client
}

async fn app_client(config: &Config, node: usize) -> tokio_postgres::Client {
    let app = config
        .users
        .iter()
        .find(|u| u.name == "app")
        .expect("app user in config");
    let n = &config.nodes[node];
    let (client, conn) = tokio_postgres::Config::new()
        .host(&n.host)
        .port(n.port)
        .user("app")
        .password(app.password.expose())
        .dbname("app")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect as app");
    tokio::spawn(conn);
    client
}

fn refused(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
}

#[tokio::test]
async fn first_run_sigterm_reuse_and_destroy() {
    let parent = demo_parent();
    let dir = parent.path().join("demo");
    // 3 nodes, their agents' APIs, etcd's two ports, then the proxy.
    let base = free_port_range(9);
    let port_arg = base.to_string();
    let proxy_port = base + 8;
    let proxy_arg = proxy_port.to_string();
    let args = [
        "--port-base",
        port_arg.as_str(),
        "--proxy-port",
        proxy_arg.as_str(),
    ];

    // First run: builds the cluster and prints connection strings.
    let mut demo = Demo::start(&dir, &args, None);
    let config_path = demo.wait_ready();
    assert_eq!(config_path, dir.join("pgwarden.toml"));
    let mode = std::fs::metadata(&config_path)
        .expect("config")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the config holds passwords");
    let config = Config::load(&config_path).expect("the demo writes a valid config");
    assert_eq!(config.nodes.len(), 3);
    assert!(config.postgres.replication_password.is_some());
    assert!(demo
        .stdout
        .iter()
        .any(|l| l.contains("postgresql://app:") && l.contains(&base.to_string())));

    assert!(demo
        .stdout
        .iter()
        .any(|l| l.contains("proxy (transaction pooling")
            && l.contains(&format!("@127.0.0.1:{proxy_port}/app"))));
    // Clients go through the proxy to the primary.
    let app = proxy_client(&config, proxy_port).await;
    app.batch_execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('survives restarts')")
        .await
        .expect("write as app through the proxy");
    // (A plain read would be served by a standby.)
    let served_by: i32 = app
        .query_one("/* pgwarden:primary */ SELECT inet_server_port()", &[])
        .await
        .expect("port")
        .get(0);
    assert_eq!(
        served_by,
        i32::from(base),
        "the proxy sends writes to the primary"
    );
    // SIGHUP (a closed terminal) reloads the config; the cluster keeps serving.
    kill(Pid::from_raw(demo.child.id() as i32), Signal::SIGHUP).expect("SIGHUP");
    demo.wait_line("config reloaded");
    assert!(
        demo.child.try_wait().expect("wait").is_none(),
        "the demo survives SIGHUP"
    );
    app.batch_execute("INSERT INTO kept VALUES ('after SIGHUP')")
        .await
        .expect("the proxy still serves after SIGHUP");
    let status = common::run(&[
        "status",
        "-c",
        config_path.to_str().expect("path"),
        "--json",
    ]);
    assert_eq!(status.code, 0, "{}\n{}", status.stdout, status.stderr);

    let (code, took) = demo.terminate();
    assert_eq!(code, 0, "{}", demo.stdout.join("\n"));
    assert!(took < Duration::from_secs(10), "stop took {took:?}");
    for p in base..base + 9 {
        assert!(refused(p), "port {p} still open after SIGTERM");
    }
    for n in &config.nodes {
        let pid_file = n
            .data_dir
            .as_ref()
            .expect("data dir")
            .join("postmaster.pid");
        assert!(
            !pid_file.exists(),
            "{} left behind: not a clean shutdown",
            pid_file.display()
        );
    }

    // Second run: reuses the cluster, same passwords, data still there (also on a standby).
    let before = std::fs::read_to_string(&config_path).expect("config");
    let mut demo = Demo::start(&dir, &args, None);
    demo.wait_ready();
    assert_eq!(
        std::fs::read_to_string(&config_path).expect("config"),
        before
    );
    assert!(
        !demo.stdout.iter().any(|l| l.contains("initialising")),
        "re-initialised:\n{}",
        demo.stdout.join("\n")
    );
    for node in [0, 2] {
        let rows = app_client(&config, node)
            .await
            .query("SELECT v FROM kept", &[])
            .await
            .expect("read");
        assert_eq!(rows[0].get::<_, String>(0), "survives restarts");
    }

    // --destroy stops the running demo and removes the directory.
    let r = common::run(&["demo", "--dir", dir.to_str().expect("path"), "--destroy"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!dir.exists());
    let deadline = Instant::now() + Duration::from_secs(20);
    while demo.child.try_wait().expect("wait").is_none() {
        assert!(
            Instant::now() < deadline,
            "demo still running after --destroy"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in base..base + 3 {
        assert!(refused(p), "port {p} still open after --destroy");
    }
}

#[tokio::test]
async fn runs_as_an_ordinary_user_with_quorum_replication() {
    let parent = demo_parent();
    let dir = parent.path().join("demo");
    // Under root, run the whole demo as the unprivileged `postgres` user; otherwise as ourselves.
    let user = if nix::unistd::geteuid().is_root() {
        let pg = nix::unistd::User::from_name("postgres")
            .expect("lookup")
            .expect("postgres user exists");
        std::fs::create_dir(&dir).expect("mkdir");
        nix::unistd::chown(&dir, Some(pg.uid), Some(pg.gid)).expect("chown");
        Some((pg.uid.as_raw(), pg.gid.as_raw()))
    } else {
        None
    };
    let base = free_port_range(7);
    let proxy = (base + 6).to_string();
    let base = base.to_string();
    let mut demo = Demo::start(
        &dir,
        &[
            "--port-base",
            &base,
            "--proxy-port",
            &proxy,
            "--nodes",
            "2",
            "--replication",
            "quorum",
        ],
        user,
    );
    let config_path = demo.wait_ready();
    let config = Config::load(&config_path).expect("config");
    assert_eq!(config.nodes.len(), 2);
    let data_dir = config.nodes[0].data_dir.clone().expect("data dir");
    if let Some((uid, _)) = user {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&data_dir).expect("data dir").uid(), uid);
    }
    let status = pgwarden_testkit::eventually(
        Duration::from_secs(10),
        "n2 is a quorum standby",
        || async {
            let r = common::run(&[
                "status",
                "-c",
                config_path.to_str().expect("path"),
                "--json",
            ]);
            let v: serde_json::Value = serde_json::from_str(&r.stdout).ok()?;
            (common::node(&v, "n2")["sync_state"] == "quorum").then_some(v)
        },
    )
    .await;
    assert_eq!(status["performance"]["sync_replicas"], 1);

    // A standby that dies is reported, and its agent starts it again.
    let n2_dir = config.nodes[1].data_dir.clone().expect("data dir");
    let pid: i32 = std::fs::read_to_string(n2_dir.join("postmaster.pid"))
        .expect("postmaster.pid")
        .lines()
        .next()
        .expect("pid line")
        .parse()
        .expect("pid");
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill n2");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(line) = demo.lines.recv_timeout(Duration::from_millis(100)) {
            demo.stdout.push(line.clone());
            if line.contains("n2: postgres running (was") {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "n2's death and restart not reported:\n{}",
            demo.stdout.join("\n")
        );
    }

    // SIGINT stops the demo as cleanly as SIGTERM.
    let (code, took) = demo.stop_with(Signal::SIGINT);
    assert_eq!(code, 0, "{}", demo.stdout.join("\n"));
    assert!(took < Duration::from_secs(10), "stop took {took:?}");
    assert!(refused(config.nodes[0].port));
}

#[test]
fn a_missing_binary_dir_is_a_one_line_error() {
    let parent = demo_parent();
    let dir = parent.path().join("demo");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::write(
        dir.join("pgwarden.toml"),
        "[postgres]\nbin_dir = \"/opt/nothing/bin\"\nsuperuser_password = \"x\"\n[[nodes]]\nname = \"n1\"\nport = 5999\ndata_dir = \"n1\"\n",
    )
    .expect("write");
    let r = common::run(&["demo", "--dir", dir.to_str().expect("path")]);
    assert_ne!(r.code, 0);
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{}", r.stderr);
    assert!(
        lines[0]
            .contains("postgres.bin_dir: /opt/nothing/bin does not contain the postgres binary"),
        "{}",
        lines[0]
    );
}

#[test]
fn refuses_a_directory_that_is_not_a_demo() {
    let parent = demo_parent();
    std::fs::write(parent.path().join("precious.txt"), "do not delete").expect("write");
    for args in [vec![], vec!["--destroy"]] {
        let mut all = vec!["demo", "--dir", parent.path().to_str().expect("path")];
        all.extend(args);
        let r = common::run(&all);
        assert_eq!(r.code, 1);
        assert!(
            r.stderr.contains("is not a pgwarden demo directory"),
            "{}",
            r.stderr
        );
    }
    assert!(parent.path().join("precious.txt").exists());
}

#[tokio::test]
async fn a_killed_demo_leaves_no_server_behind_and_the_next_run_recovers() {
    let parent = demo_parent();
    let dir = parent.path().join("demo");
    let base = free_port_range(7);
    let port_arg = base.to_string();
    let proxy_arg = (base + 6).to_string();
    let args = [
        "--port-base",
        port_arg.as_str(),
        "--proxy-port",
        proxy_arg.as_str(),
        "--nodes",
        "2",
    ];
    let mut demo = Demo::start(&dir, &args, None);
    let config_path = demo.wait_ready();
    let config = Config::load(&config_path).expect("config");
    app_client(&config, 0)
        .await
        .batch_execute("CREATE TABLE t AS SELECT 7 AS x")
        .await
        .expect("write");

    // SIGKILL: no chance to stop anything. The servers follow their parent (immediate shutdown).
    demo.child.kill().expect("kill demo");
    demo.child.wait().expect("reap demo");
    pgwarden_testkit::eventually(
        Duration::from_secs(20),
        "servers gone after the demo was killed",
        || async { (refused(base) && refused(base + 1)).then_some(()) },
    )
    .await;

    // The next run finds the crashed cluster, recovers it and keeps the data.
    let mut demo = Demo::start(&dir, &args, None);
    demo.wait_ready();
    let primary = app_client(&config, 0).await;
    let x: i32 = primary
        .query_one("SELECT x FROM t", &[])
        .await
        .expect("read on the primary")
        .get(0);
    assert_eq!(x, 7);
    // The standby may have lost the tail of the WAL stream in the kill: it catches up.
    let standby = app_client(&config, 1).await;
    pgwarden_testkit::eventually(Duration::from_secs(20), "the standby has t", || async {
        let row = standby.query_one("SELECT x FROM t", &[]).await.ok()?;
        (row.get::<_, i32>(0) == 7).then_some(())
    })
    .await;
    let (code, _) = demo.terminate();
    assert_eq!(code, 0);
}

/// A port in use is found before anything is written, and names the option that changes it; a
/// later run takes a new --proxy-port and refuses a new --port-base with the way out.
#[tokio::test]
async fn ports_in_use_fail_before_anything_is_built_and_reruns_take_a_new_proxy_port() {
    let parent = demo_parent();
    let dir = parent.path().join("demo");
    let base = free_port_range(10);
    let (port_arg, proxy_arg) = (base.to_string(), (base + 8).to_string());
    let taken = std::net::TcpListener::bind(("127.0.0.1", base + 1)).expect("hold a port");
    let r = common::run(&[
        "demo",
        "--dir",
        dir.to_str().expect("path"),
        "--port-base",
        &port_arg,
        "--proxy-port",
        &proxy_arg,
    ]);
    assert_eq!(r.code, 1);
    let want = format!("port {} on 127.0.0.1 is in use", base + 1);
    assert!(
        r.stderr.contains(&want) && r.stderr.contains("--port-base"),
        "{}",
        r.stderr
    );
    assert!(!dir.join("pgwarden.toml").exists(), "nothing was built");
    drop(taken);

    let args = [
        "--port-base",
        port_arg.as_str(),
        "--proxy-port",
        proxy_arg.as_str(),
    ];
    let mut demo = Demo::start(&dir, &args, None);
    demo.wait_ready();
    let (code, _) = demo.terminate();
    assert_eq!(code, 0);
    // Another proxy port: taken, and the proxy listens there.
    let new_proxy = (base + 9).to_string();
    let mut demo = Demo::start(&dir, &["--proxy-port", new_proxy.as_str()], None);
    let config_path = demo.wait_ready();
    let config = Config::load(&config_path).expect("config");
    assert_eq!(config.proxy.listen.port(), base + 9);
    let app = proxy_client(&config, base + 9).await;
    app.batch_execute("SELECT 1")
        .await
        .expect("served on the new port");
    let (code, _) = demo.terminate();
    assert_eq!(code, 0);
    // Another port base would need another cluster: refused, saying how.
    let other = (base + 100).to_string();
    let r = common::run(&[
        "demo",
        "--dir",
        dir.to_str().expect("path"),
        "--port-base",
        &other,
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("would need a new cluster") && r.stderr.contains("--destroy"),
        "{}",
        r.stderr
    );
}

/// `--dcs etcd`: a local etcd and an agent process per node. The leader's agent killed, the
/// cluster heals and says how long it took; the agent comes back and its node rejoins.
#[tokio::test]
async fn on_etcd_a_killed_leader_agent_heals_and_rejoins() {
    let parent = demo_parent();
    let dir = parent.path().join("demo");
    let base = free_port_range(9);
    let (port_arg, proxy_arg) = (base.to_string(), (base + 8).to_string());
    let args = [
        "--port-base",
        port_arg.as_str(),
        "--proxy-port",
        proxy_arg.as_str(),
        "--dcs",
        "etcd",
    ];
    let mut demo = Demo::start(&dir, &args, None);
    let config_path = demo.wait_ready();
    let config = Config::load(&config_path).expect("config");
    assert!(
        config.dcs.is_some(),
        "--dcs etcd records the store in the config"
    );
    let agent_pid: i32 = demo
        .stdout
        .iter()
        .find_map(|l| l.strip_prefix("agent n1 running as pid "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid for n1's agent:\n{}", demo.stdout.join("\n")));
    kill(Pid::from_raw(agent_pid), Signal::SIGKILL).expect("kill n1's agent");
    demo.wait_line("healed in");
    let app = proxy_client(&config, base + 8).await;
    let port: i32 = app
        .query_one("/* pgwarden:primary */ SELECT inet_server_port()", &[])
        .await
        .expect("the proxy serves the new leader")
        .get(0);
    assert_ne!(port, i32::from(base), "n1 is gone: another node leads");
    demo.wait_line("n1: agent started again");
    let (code, took) = demo.terminate();
    assert_eq!(code, 0, "{}", demo.stdout.join("\n"));
    assert!(took < Duration::from_secs(15), "stop took {took:?}");
    for p in base..base + 9 {
        assert!(refused(p), "port {p} still open after SIGTERM");
    }
}
