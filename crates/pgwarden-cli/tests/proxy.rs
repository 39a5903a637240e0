//! `pgwarden proxy -c FILE` as a process: serving, SIGHUP reload (good and bad config), SIGTERM
//! with a running transaction.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pgwarden_testkit::ports::free_ports;
use pgwarden_testkit::{eventually, Cluster};
use tokio_postgres::{Client, NoTls};

const PASSWORD: &str = "app-secret";

fn config(cluster: &Cluster, port: u16, proxy: &str) -> String {
    format!(
        "{}\n[proxy]\nlisten = \"127.0.0.1:{port}\"\nadmin_users = [\"app\"]\n{proxy}\n[[proxy.users]]\nname = \"app\"\npassword = \"{PASSWORD}\"\n",
        cluster.config_toml()
    )
}

struct Proc {
    child: Child,
    stderr: mpsc::Receiver<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), sig).expect("signal the proxy");
    }

    /// Waits for a log line containing `needle`.
    fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(line) = self.stderr.recv_timeout(Duration::from_millis(100)) {
                if line.contains(needle) {
                    return line;
                }
            }
        }
        panic!("no log line with {needle:?}");
    }
}

fn start(path: &std::path::Path) -> Proc {
    let mut child = common::pgwarden()
        .args(["proxy", "-c", path.to_str().expect("utf-8")])
        .env("PGWARDEN_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pgwarden proxy");
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        BufReader::new(err)
            .lines()
            .map_while(Result::ok)
            .for_each(|l| drop(tx.send(l)))
    });
    Proc { child, stderr: rx }
}

async fn connect(port: u16, db: &str) -> Result<Client, tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={port} user=app password={PASSWORD} dbname={db} connect_timeout=5"
        ),
        NoTls,
    )
    .await?;
    tokio::spawn(conn);
    Ok(c)
}

async fn pool_size(console: &Client) -> String {
    let msgs = console
        .simple_query("SHOW CONFIG")
        .await
        .expect("show config");
    msgs.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r)
                if r.get("key") == Some("default_pool_size") =>
            {
                r.get("value").map(str::to_string)
            }
            _ => None,
        })
        .expect("default_pool_size row")
}

/// A cluster with role and database `app`, and a `pgwarden proxy` process in front of it with
/// `proxy_toml` in its `[proxy]` section, listening. Returns the config file and the port too.
async fn cluster_and_proxy(proxy_toml: &str) -> (Cluster, std::path::PathBuf, u16, Proc) {
    let cluster = Cluster::builder().build().await;
    cluster
        .execute(0, &format!("CREATE ROLE app LOGIN PASSWORD '{PASSWORD}'"))
        .await;
    cluster.execute(0, "CREATE DATABASE app OWNER app").await;
    let port = free_ports(1)[0];
    let path = cluster.dir().join("proxy.toml");
    std::fs::write(&path, config(&cluster, port, proxy_toml)).expect("write");
    let proxy = start(&path);
    proxy.wait_log("proxy listening");
    (cluster, path, port, proxy)
}

#[tokio::test]
async fn sighup_reloads_and_sigterm_lets_the_running_transaction_finish() {
    let (cluster, path, port, proxy) = cluster_and_proxy("default_pool_size = 5").await;
    let console = connect(port, "pgwarden").await.expect("admin console");
    let app = connect(port, "app").await.expect("app");
    app.batch_execute("CREATE TABLE t (x int)")
        .await
        .expect("create");
    assert_eq!(pool_size(&console).await, "5");

    // SIGHUP with a good config applies it; clients stay connected.
    std::fs::write(&path, config(&cluster, port, "default_pool_size = 7")).expect("write");
    proxy.signal(Signal::SIGHUP);
    proxy.wait_log("config reloaded");
    assert_eq!(pool_size(&console).await, "7");
    // SIGHUP with a bad one is refused with its errors; the running config stays.
    std::fs::write(&path, config(&cluster, port, "default_pool_size = -1")).expect("write");
    proxy.signal(Signal::SIGHUP);
    let line = proxy.wait_log("config reload rejected");
    assert!(line.contains("proxy.default_pool_size"), "{line}");
    assert_eq!(pool_size(&console).await, "7");
    app.batch_execute("SELECT 1")
        .await
        .expect("app still connected");

    // SIGTERM: no new clients, the running transaction commits, then the process exits 0.
    app.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .expect("begin");
    proxy.signal(Signal::SIGTERM);
    eventually(Duration::from_secs(5), "new clients refused", || async {
        connect(port, "app").await.is_err().then_some(())
    })
    .await;
    app.batch_execute("INSERT INTO t VALUES (2); COMMIT")
        .await
        .expect("the transaction finishes after SIGTERM");
    let mut proxy = proxy;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = proxy.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    let n: i64 = cluster
        .client_db(0, "app")
        .await
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 2);
}

/// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("field")
}

/// Large results are streamed through, not buffered whole per connection, and the buffers they
/// grew are given back: eight concurrent 100 MB rows leave the proxy near its idle size.
#[tokio::test]
async fn large_results_are_streamed_and_their_buffers_given_back() {
    let (_cluster, _path, port, proxy) = cluster_and_proxy("default_pool_size = 8").await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        let c = connect(port, "app").await.expect("app");
        c.batch_execute("SELECT 1").await.expect("warm");
        clients.push(c);
    }
    let pid = proxy.child.id();
    let idle = status_kib(pid, "VmRSS");
    let runs = clients.into_iter().map(|c| async move {
        let row = c
            .query_one("SELECT repeat('x', 100 * 1024 * 1024)", &[])
            .await
            .expect("a 100 MB row");
        assert_eq!(row.get::<_, &str>(0).len(), 100 << 20);
        c
    });
    let clients = futures::future::join_all(runs).await;
    let peak = status_kib(pid, "VmHWM");
    let after = status_kib(pid, "VmRSS");
    // 800 MB went through. Buffered whole, the peak was 1.66 GB and 838 MB stayed.
    assert!(peak < 200 * 1024, "peak RSS {peak} KiB (idle {idle} KiB)");
    assert!(
        after < 2 * idle + 16 * 1024,
        "RSS after {after} KiB (idle {idle} KiB)"
    );
    for c in &clients {
        c.batch_execute("SELECT 1").await.expect("still serving");
    }
}

/// A proxy started before its etcd answers listens at once, says it waits for the store, and
/// refuses a client with 57P03 and the reason within a bound rather than hanging or exiting.
#[tokio::test]
async fn a_proxy_whose_store_does_not_answer_listens_and_refuses_with_a_reason() {
    let cluster = Cluster::builder().build().await;
    let ports = free_ports(2);
    let path = cluster.dir().join("proxy.toml");
    std::fs::write(
        &path,
        config(
            &cluster,
            ports[0],
            &format!(
                "query_wait_timeout = \"1s\"\n[dcs]\nendpoints = [\"127.0.0.1:{}\"]\ntimeout = \"1s\"\n",
                ports[1]
            ),
        ),
    )
    .expect("write");
    let mut proxy = start(&path);
    proxy.wait_log("proxy listening");
    assert!(proxy
        .wait_log("waiting for the store")
        .contains(&ports[1].to_string()));
    // The login already needs a primary (its parameters are the server's).
    let asked = Instant::now();
    let e = connect(ports[0], "app").await.expect_err("no primary");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW),
        "{e}"
    );
    let message = e.as_db_error().map(|d| d.message().to_string());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("no primary is available")),
        "{e:?}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(8),
        "{:?}",
        asked.elapsed()
    );
    assert!(
        proxy.child.try_wait().expect("wait").is_none(),
        "the proxy goes on"
    );
}
