//! A real HA cluster for fault tests: etcd, one `pgwarden agent` process per node (each
//! talking to etcd through its own fault proxy), `pgwarden proxy` following the store, and a
//! writer through the proxy that logs every acknowledged insert.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pgwarden_dcs::etcd::{EtcdKv, EtcdOptions};
use pgwarden_dcs::ClusterStore;
use pgwarden_ha::MemberState;
use pgwarden_testkit::etcd::Etcd;
use pgwarden_testkit::fault::{Fault, FaultProxy};
use pgwarden_testkit::ports::free_ports;
use pgwarden_testkit::{eventually, SUPERUSER_PASSWORD};
use tokio_postgres::NoTls;

pub struct Node {
    pub name: String,
    pub pg_port: u16,
    pub api_port: u16,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub etcd_link: FaultProxy,
    pub agent: Option<Child>,
}

pub struct Ha {
    pub dir: tempfile::TempDir,
    pub etcd: Etcd,
    pub nodes: Vec<Node>,
    pub proxy_port: u16,
    pub proxy: Option<Child>,
    base: String,
}

/// One acknowledged (or failed) write.
#[derive(Debug, Clone)]
pub struct Ack {
    pub id: i64,
    /// When the insert was sent, and when its acknowledgement came.
    pub sent: Instant,
    pub at: Instant,
    /// The PostgreSQL port of the server that took it.
    pub port: i32,
    /// That server's `pg_postmaster_start_time()`, seconds since the epoch.
    pub started: f64,
}

#[derive(Debug, Default)]
pub struct Log {
    pub acks: Vec<Ack>,
    /// Failed writes: when each was sent (or tried, without a connection), and why.
    pub errors: Vec<(Instant, String)>,
    /// New connections after the first (the proxy ended the session, or could not be reached).
    pub reconnects: usize,
}

pub struct Writer {
    pub log: Arc<Mutex<Log>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    pub fn stop(self) -> Log {
        self.task.abort();
        std::mem::take(&mut *self.log.lock().expect("log"))
    }

    pub fn acked(&self) -> usize {
        self.log.lock().expect("log").acks.len()
    }
}

impl Ha {
    /// `nodes` agents with `agent_toml` in `[agent]` and `node_toml(i)` appended to node i.
    pub async fn start(nodes: usize, agent_toml: &str, node_toml: &dyn Fn(usize) -> String) -> Ha {
        let dir = tempfile::Builder::new()
            .prefix("pgwarden-ha-")
            .tempdir()
            .expect("tempdir");
        let env = pgwarden_postgres::PgEnv::discover(None, "postgres").expect("binaries");
        env.run_as.create_dir(dir.path(), 0o755).expect("chown");
        spawn_reaper();
        let etcd = Etcd::start().await;
        let ports = free_ports(nodes * 2 + 1);
        let proxy_port = ports[nodes * 2];
        let mut base = format!(
            "cluster = \"ha\"\n[postgres]\nsuperuser_password = \"{SUPERUSER_PASSWORD}\"\n\
             replication_password = \"{}\"\nparameters = {{ fsync = false, shared_buffers = \"16MB\" }}\n\
             [agent]\n{agent_toml}\n\
             [proxy]\nlisten = \"127.0.0.1:{proxy_port}\"\nserver_connect_timeout = \"20s\"\nadmin_users = [\"postgres\"]\n\
             [[proxy.users]]\nname = \"postgres\"\npassword = \"{SUPERUSER_PASSWORD}\"\n",
            pgwarden_testkit::REPLICATION_PASSWORD
        );
        let mut list = Vec::new();
        for i in 0..nodes {
            let name = format!("n{}", i + 1);
            let data_dir = dir.path().join(&name);
            base.push_str(&format!(
                "[[nodes]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {}\ndata_dir = \"{}\"\napi = \"127.0.0.1:{}\"\n{}\n",
                ports[2 * i],
                data_dir.display(),
                ports[2 * i + 1],
                node_toml(i)
            ));
            list.push((name, ports[2 * i], ports[2 * i + 1], data_dir));
        }
        let mut ha = Ha {
            etcd,
            nodes: Vec::new(),
            proxy_port,
            proxy: None,
            base,
            dir,
        };
        for (name, pg_port, api_port, data_dir) in list {
            let etcd_link = FaultProxy::start(ha.etcd.client_addr()).await;
            let config = ha.dir.path().join(format!("{name}.toml"));
            std::fs::write(
                &config,
                ha.config_with(&format!("127.0.0.1:{}", etcd_link.port())),
            )
            .expect("write config");
            ha.nodes.push(Node {
                name,
                pg_port,
                api_port,
                data_dir,
                config,
                etcd_link,
                agent: None,
            });
        }
        // n1 first, so that it bootstraps and leads: the tests know who the leader is.
        ha.start_agent(0);
        let store = ha.store().await;
        eventually(
            Duration::from_secs(60),
            "n1 takes the leader key",
            || async { store.leader().await.ok()?.map(|_| ()) },
        )
        .await;
        for i in 1..nodes {
            ha.start_agent(i);
        }
        let proxy_config = ha.dir.path().join("proxy.toml");
        std::fs::write(&proxy_config, ha.config_with(&ha.etcd.endpoint())).expect("write");
        ha.proxy = Some(spawn(
            &["proxy", "-c", path(&proxy_config)],
            &ha.log("proxy"),
        ));
        ha
    }

    fn config_with(&self, endpoint: &str) -> String {
        format!(
            "{}\n[dcs]\nendpoints = [\"{endpoint}\"]\nnamespace = \"test\"\n",
            self.base
        )
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    pub fn start_agent(&mut self, i: usize) {
        let log = self.log(&self.nodes[i].name);
        let n = &mut self.nodes[i];
        n.agent = Some(spawn(
            &["agent", "-c", path(&n.config), "--node", &n.name],
            &log,
        ));
    }

    pub fn agent_pid(&self, i: usize) -> i32 {
        self.nodes[i].agent.as_ref().expect("agent running").id() as i32
    }

    /// The postmaster's PID from its `postmaster.pid`.
    pub fn postmaster_pid(&self, i: usize) -> Option<i32> {
        let text = std::fs::read_to_string(self.nodes[i].data_dir.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    pub fn signal_agent(&self, i: usize, sig: Signal) {
        kill(Pid::from_raw(self.agent_pid(i)), sig).expect("signal the agent");
    }

    /// `sig` to the agent and every process under it (its postmaster and the backends), all
    /// started by this test.
    pub fn signal_tree(&self, i: usize, sig: Signal) {
        for pid in descendants(self.agent_pid(i)) {
            let _ = kill(Pid::from_raw(pid), sig);
        }
    }

    /// SIGKILL of agent `i`, then until its PostgreSQL has died with it (parent-death signal)
    /// and been reaped.
    pub async fn kill_agent_and_postgres(&mut self, i: usize) {
        let pm = self.postmaster_pid(i).expect("postmaster");
        self.kill_agent(i);
        eventually(
            Duration::from_secs(40),
            "postgres died with its agent",
            || async { kill(Pid::from_raw(pm), None).is_err().then_some(()) },
        )
        .await;
    }

    /// SIGKILL of the agent process, reaped.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn link(&self, i: usize, fault: Fault) {
        self.nodes[i].etcd_link.set(fault);
    }

    pub async fn store(&self) -> ClusterStore<EtcdKv> {
        let kv = EtcdKv::connect(&EtcdOptions {
            endpoints: vec![self.etcd.endpoint()],
            timeout: Duration::from_secs(2),
            ..EtcdOptions::default()
        })
        .await
        .expect("etcd");
        ClusterStore::new(kv, "test", "ha")
    }

    /// The leader (node index, epoch) once it is writable and `replicas` others stream from
    /// it on its timeline, under an epoch of at least `min_epoch`.
    pub async fn settled(
        &self,
        replicas: usize,
        min_epoch: u64,
        timeout: Duration,
    ) -> (usize, u64) {
        let store = self.store().await;
        eventually(timeout, "a leader with its replicas streaming", || async {
            let leader = store.leader().await.ok()??;
            if leader.epoch.0 < min_epoch {
                return None;
            }
            let members = store.members::<MemberState>().await.ok()?;
            let lead = members.iter().find(|m| {
                m.node == leader.node && m.state.primary && m.state.epoch == Some(leader.epoch.0)
            })?;
            let streaming = members
                .iter()
                .filter(|m| {
                    m.state.role == "replica"
                        && m.state.streaming
                        && m.state.timeline == lead.state.timeline
                })
                .count();
            (streaming >= replicas).then(|| (self.index(leader.node.as_str()), leader.epoch.0))
        })
        .await
    }

    pub fn index(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .expect("a node")
    }

    pub async fn member(&self, i: usize) -> Option<MemberState> {
        let store = self.store().await;
        let members = store.members::<MemberState>().await.ok()?;
        members
            .into_iter()
            .find(|m| m.node.as_str() == self.nodes[i].name)
            .map(|m| m.state)
    }

    /// A connection straight to node `i`'s PostgreSQL.
    pub async fn direct(&self, i: usize) -> Option<tokio_postgres::Client> {
        connect(self.nodes[i].pg_port).await
    }

    /// A connection through the proxy.
    pub async fn proxied(&self) -> Option<tokio_postgres::Client> {
        connect(self.proxy_port).await
    }

    /// Creates the writer's table through the proxy and starts one autocommit insert every
    /// `every`, each with the next id, logging what was acknowledged by which server.
    pub async fn writer(&self, every: Duration) -> Writer {
        let port = self.proxy_port;
        writer_to(move || connect(port), every, None).await
    }

    /// Every acknowledged id is on node `i`; the ids missing are returned.
    pub async fn lost(&self, i: usize, log: &Log) -> Vec<i64> {
        let c = self.direct(i).await.expect("connect to the leader");
        let rows = c.query("SELECT id FROM w", &[]).await.expect("read w");
        let have: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
        log.acks
            .iter()
            .map(|a| a.id)
            .filter(|id| !have.contains(id))
            .collect()
    }

    /// `pgwarden status --json` with the store configured: (exit code, document).
    pub fn status(&self) -> (i32, serde_json::Value) {
        let path = self.dir.path().join("proxy.toml");
        let (code, v, _) = super::status_json(&path);
        (code, v)
    }

    pub fn agent_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log(&self.nodes[i].name)).unwrap_or_default()
    }
}

impl Log {
    /// The longest time between two acknowledged writes after `from`.
    pub fn longest_gap_after(&self, from: Instant) -> Duration {
        let mut last = from;
        let mut gap = Duration::ZERO;
        for a in self.acks.iter().filter(|a| a.at >= from) {
            gap = gap.max(a.at - last);
            last = a.at;
        }
        gap
    }

    /// Once a server acknowledged a write after another, the earlier one never acknowledges
    /// again (no two writers, as the clients saw it).
    pub fn writers_in_order(&self) -> Result<(), String> {
        let mut seen: Vec<i32> = Vec::new();
        for a in &self.acks {
            match seen.iter().position(|p| *p == a.port) {
                Some(pos) if pos + 1 != seen.len() => {
                    return Err(format!(
                        "write {} acknowledged by port {} after port {} had taken over",
                        a.id,
                        a.port,
                        seen[seen.len() - 1]
                    ))
                }
                Some(_) => {}
                None => seen.push(a.port),
            }
        }
        Ok(())
    }
}

impl Drop for Ha {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The agents' own account of what happened, for the failure's reader.
            for (i, n) in self.nodes.iter().enumerate() {
                let log = self.agent_log(i);
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("--- {} (last lines) ---", n.name);
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
                let server = server_log(&n.data_dir);
                let tail: Vec<&str> = server.lines().rev().take(30).collect();
                eprintln!("--- {} postgres (last lines) ---", n.name);
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
            let proxy = std::fs::read_to_string(self.log("proxy")).unwrap_or_default();
            eprintln!("--- proxy ---\n{proxy}");
        }
        if let Some(mut p) = self.proxy.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.agent.take() {
                // A stopped agent must be continued to die; its server goes with it.
                let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGCONT);
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Servers of killed agents got their parent-death signal; wait until they are gone so
        // the directory can be removed.
        for n in &self.nodes {
            let pid_file = n.data_dir.join("postmaster.pid");
            let deadline = Instant::now() + Duration::from_secs(10);
            while pid_file.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// The newest file of a data directory's `log/` (its server's log), or nothing.
fn server_log(data_dir: &std::path::Path) -> String {
    let newest = std::fs::read_dir(data_dir.join("log"))
        .into_iter()
        .flatten()
        .flatten()
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
    newest
        .and_then(|e| std::fs::read_to_string(e.path()).ok())
        .unwrap_or_default()
}

/// Servers of killed agents are orphaned to this process (a subreaper: this machine's init
/// reaps late, and a zombie postmaster's PID keeps its socket lock file "in use"): reap them.
pub fn spawn_reaper() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        pgwarden_postgres::become_subreaper();
        std::thread::spawn(|| loop {
            pgwarden_postgres::reap_orphans(&[]);
            std::thread::sleep(Duration::from_millis(100));
        });
    });
}

/// `root` and every process below it.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((pid, ppid));
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// The writer, connecting with `connect` (again after an error that ends the connection):
/// one autocommit insert every `every`, each with the next id, every outcome logged. With
/// `give_up`, an insert unanswered that long fails and the connection is dropped (what an
/// application's timeout does; a frozen server never answers).
pub async fn writer_to<F, Fut>(connect: F, every: Duration, give_up: Option<Duration>) -> Writer
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Option<tokio_postgres::Client>> + Send,
{
    let c = eventually(Duration::from_secs(60), "the cluster takes clients", || {
        connect()
    })
    .await;
    c.batch_execute("CREATE TABLE IF NOT EXISTS w (id bigint PRIMARY KEY)")
        .await
        .expect("create table");
    let log = Arc::new(Mutex::new(Log::default()));
    let l = log.clone();
    let task = tokio::spawn(async move {
        let mut client = Some(c);
        let mut id = 0i64;
        loop {
            tokio::time::sleep(every).await;
            id += 1;
            if client.as_ref().map_or(true, |c| c.is_closed()) {
                l.lock().expect("log").reconnects += 1;
                client = connect().await;
            }
            let Some(c) = client.as_ref() else {
                l.lock()
                    .expect("log")
                    .errors
                    .push((Instant::now(), "cannot connect".into()));
                continue;
            };
            let sent = Instant::now();
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
            let insert = c.query_one(
                "INSERT INTO w VALUES ($1) RETURNING inet_server_port(), \
                 extract(epoch FROM pg_postmaster_start_time())::float8",
                &params,
            );
            let r = match give_up {
                Some(t) => tokio::time::timeout(t, insert).await,
                None => Ok(insert.await),
            };
            let now = Instant::now();
            let mut log = l.lock().expect("log");
            let Ok(r) = r else {
                client = None;
                log.errors
                    .push((sent, format!("no answer within {give_up:?}")));
                continue;
            };
            match r {
                Ok(row) => log.acks.push(Ack {
                    id,
                    sent,
                    at: now,
                    port: row.get(0),
                    started: row.get(1),
                }),
                Err(e) => {
                    if e.as_db_error().is_some_and(|d| d.code().code() == "25006") {
                        // Reached a read-only server (a client without a proxy): find the
                        // primary again.
                        client = None;
                    }
                    log.errors
                        .push((sent, pgwarden_testkit::cluster::describe(&e)))
                }
            }
        }
    });
    Writer { log, task }
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn spawn(args: &[&str], log: &std::path::Path) -> Child {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    super::pgwarden()
        .args(args)
        .env("PGWARDEN_LOG", "info")
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("start pgwarden")
}

/// The proxy's admin console at `port`.
pub async fn console(port: u16) -> Option<tokio_postgres::Client> {
    connect_db(port, "pgwarden").await
}

pub async fn connect(port: u16) -> Option<tokio_postgres::Client> {
    connect_db(port, "postgres").await
}

/// A connection as the superuser to `db` at `port` (bounded to 5 s).
pub async fn connect_db(port: u16, db: &str) -> Option<tokio_postgres::Client> {
    let (c, conn) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={port} user=postgres password={SUPERUSER_PASSWORD} dbname={db} connect_timeout=5"
            ),
            NoTls,
        ),
    )
    .await
    .ok()?
    .ok()?;
    tokio::spawn(conn);
    Some(c)
}
