//! `bench/failover.sh`: failover of pgwarden and of Patroni, side by side, on this machine.
//!
//! For each fault (kill-postgres, kill-node, freeze, partition-from-etcd) and each system, a
//! 3-node cluster on a real etcd takes a writer (one autocommit insert every 15 ms with an
//! increasing id, every outcome logged) while the fault is injected into the leader at a random
//! phase, `--runs` times. pgwarden's writer goes through `pgwarden proxy`; Patroni's connects
//! as libpq's `target_session_attrs=read-write` over the three hosts would, gives up on an insert
//! unanswered for 1 s, and reconnects on any error.
//!
//! RTO = fault → the first acknowledged write sent after the fault by a server that could not
//! have taken it before: another node, or a postmaster started after the fault. Failed writes
//! are split into those in flight when the fault struck (sent before its injection finished:
//! signalling a process tree takes a few ms) and those sent after it ("errors": what a client
//! between transactions sees; each run prints them with their cause); reconnects = sessions the writer had to open again;
//! lost = acknowledged ids missing on the final leader; non-leader acks
//! = runs in which a server acknowledged a write after another had taken over.
//!
//! Usage: `cargo bench -p pgwarden-cli --bench failover -- [--runs N] [--patroni-runs M]
//! [--only pgwarden|pgwarden-sync|patroni] [--fault kill-postgres|kill-node|freeze|partition|switchover]`.
//!
//! `switchover` is no fault: a planned switchover to the next member (`pgwarden switchover
//! --to`, `patronictl switchover --candidate --force`); its RTO is the write gap, from the
//! command's start to the first write the new leader acknowledged.
//! `pgwarden (sync on)` is pgwarden with `synchronous_mode = "on"`, where no acknowledged write
//! may be lost.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::ha::{descendants, Ha, Log, Writer};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pgwarden_testkit::etcd::Etcd;
use pgwarden_testkit::fault::{Fault, FaultProxy};
use pgwarden_testkit::ports::free_ports;
use pgwarden_testkit::{eventually, SUPERUSER_PASSWORD};

const WRITE_EVERY: Duration = Duration::from_millis(15);
const HEAL: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    KillPostgres,
    KillNode,
    Freeze,
    Partition,
    /// Not a fault: a planned switchover to the next member (`pgwarden switchover --to`,
    /// `patronictl switchover --candidate --force`).
    Switchover,
}

const KINDS: [Kind; 5] = [
    Kind::KillPostgres,
    Kind::KillNode,
    Kind::Freeze,
    Kind::Partition,
    Kind::Switchover,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::KillPostgres => "kill-postgres",
            Kind::KillNode => "kill-node",
            Kind::Freeze => "freeze",
            Kind::Partition => "partition",
            Kind::Switchover => "switchover",
        }
    }
}

/// One scenario's results.
#[derive(Default)]
struct Row {
    rto: Vec<Duration>,
    /// Failed writes sent before the fault (in flight when it struck) and after it (a client
    /// between transactions).
    in_flight: usize,
    errors: usize,
    /// Sessions the writer had to open again.
    reconnects: usize,
    lost: usize,
    non_leader: usize,
    timeline_bumps: usize,
    failed_runs: usize,
}

/// What a benchmark needs from a cluster.
trait Cluster {
    async fn leader(&self) -> (usize, u16);
    async fn inject(&mut self, kind: Kind, node: usize);
    async fn heal(&mut self, kind: Kind, node: usize);
    /// Whether the cluster settled (a leader, its replicas streaming) within [`HEAL`].
    async fn settled(&self) -> bool;
    async fn timeline(&self, node: usize) -> Option<i64>;
    async fn lost(&self, node: usize, log: &Log) -> usize;
    async fn writer(&self) -> Writer;
    fn loop_wait(&self) -> Duration;
}

struct PgwardenCluster(Ha, Option<Child>);

/// Waits for a switchover command started by `inject` and says how it ended if it failed.
fn finish_command(child: Option<Child>, what: &str) {
    if let Some(c) = child {
        match c.wait_with_output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "  {what} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("  {what}: {e}"),
        }
    }
}

/// A command run in the background, its output kept for [`finish_command`].
fn background(cmd: &mut std::process::Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the switchover command")
}

impl Cluster for PgwardenCluster {
    async fn leader(&self) -> (usize, u16) {
        let (i, _) = self.0.settled(0, 1, HEAL).await;
        (i, self.0.nodes[i].pg_port)
    }
    async fn inject(&mut self, kind: Kind, i: usize) {
        match kind {
            Kind::KillPostgres => {
                if let Some(pid) = self.0.postmaster_pid(i) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            Kind::KillNode => {
                // As one unit: stop everything first, then kill.
                self.0.signal_tree(i, Signal::SIGSTOP);
                self.0.signal_tree(i, Signal::SIGKILL);
                self.0.kill_agent(i);
            }
            Kind::Freeze => self.0.signal_tree(i, Signal::SIGSTOP),
            Kind::Partition => self.0.link(i, Fault::Blackhole),
            Kind::Switchover => {
                let to = format!("n{}", (i + 1) % self.0.nodes.len() + 1);
                let config = self.0.dir.path().join("proxy.toml");
                self.1 = Some(background(
                    common::pgwarden()
                        .args(["switchover", "--to", &to, "-c"])
                        .arg(&config),
                ));
            }
        }
    }
    async fn heal(&mut self, kind: Kind, i: usize) {
        match kind {
            Kind::KillPostgres => {}
            Kind::KillNode => self.0.start_agent(i),
            Kind::Freeze => self.0.signal_tree(i, Signal::SIGCONT),
            Kind::Partition => self.0.link(i, Fault::Pass),
            Kind::Switchover => {
                let child = self.1.take();
                tokio::task::spawn_blocking(move || finish_command(child, "pgwarden switchover"))
                    .await
                    .expect("wait");
            }
        }
    }
    async fn settled(&self) -> bool {
        self.0.settled(2, 1, HEAL).await;
        true
    }
    async fn timeline(&self, i: usize) -> Option<i64> {
        timeline(self.0.nodes[i].pg_port).await
    }
    async fn lost(&self, i: usize, log: &Log) -> usize {
        self.0.lost(i, log).await.len()
    }
    async fn writer(&self) -> Writer {
        self.0.writer(WRITE_EVERY).await
    }
    fn loop_wait(&self) -> Duration {
        Duration::from_secs(1)
    }
}

/// Patroni (Debian `patroni`) on the same etcd and PostgreSQL: three members on 127.0.0.1,
/// each reaching etcd through its own fault proxy.
struct Patroni {
    dir: tempfile::TempDir,
    _etcd: Etcd,
    links: Vec<FaultProxy>,
    pg_ports: Vec<u16>,
    api_ports: Vec<u16>,
    agents: Vec<Option<Child>>,
    timing: (u64, u64, u64),
    /// A running `patronictl switchover`.
    command: Option<Child>,
}

impl Patroni {
    async fn start(timing: (u64, u64, u64)) -> Patroni {
        let dir = tempfile::Builder::new()
            .prefix("pgwarden-patroni-")
            .tempdir()
            .expect("tempdir");
        let env = pgwarden_postgres::PgEnv::discover(None, "postgres").expect("binaries");
        env.run_as.create_dir(dir.path(), 0o755).expect("chown");
        let etcd = Etcd::start().await;
        let ports = free_ports(6);
        let mut p = Patroni {
            dir,
            _etcd: etcd,
            links: Vec::new(),
            pg_ports: ports[..3].to_vec(),
            api_ports: ports[3..].to_vec(),
            agents: vec![None, None, None],
            timing,
            command: None,
        };
        for _ in 0..3 {
            p.links.push(FaultProxy::start(p._etcd.client_addr()).await);
        }
        for i in 0..3 {
            let cfg = p.config(i);
            let path = p.dir.path().join(format!("n{}.yml", i + 1));
            env.run_as
                .write_file(&path, &cfg, 0o600)
                .expect("write config");
        }
        p.start_agent(0);
        eventually(HEAL, "Patroni's n1 leads", || async {
            http_status(p.api_ports[0], "/primary")
                .await
                .filter(|s| *s == 200)
        })
        .await;
        p.start_agent(1);
        p.start_agent(2);
        p
    }

    fn config(&self, i: usize) -> String {
        let (ttl, loop_wait, retry) = self.timing;
        let data = self.dir.path().join(format!("n{}", i + 1));
        format!(
            "scope: bench\nname: n{n}\n\
             restapi:\n  listen: 127.0.0.1:{api}\n  connect_address: 127.0.0.1:{api}\n\
             etcd3:\n  hosts: 127.0.0.1:{etcd}\n  use_proxies: true\n\
             bootstrap:\n  dcs:\n    ttl: {ttl}\n    loop_wait: {loop_wait}\n    retry_timeout: {retry}\n\
             \x20   maximum_lag_on_failover: 1048576\n    postgresql:\n      use_pg_rewind: true\n      use_slots: true\n\
             \x20     parameters:\n        wal_log_hints: 'on'\n        fsync: 'off'\n        shared_buffers: 16MB\n\
             \x20 initdb:\n  - encoding: UTF8\n  - data-checksums\n\
             postgresql:\n  listen: 127.0.0.1:{pg}\n  connect_address: 127.0.0.1:{pg}\n\
             \x20 data_dir: {data}\n  bin_dir: /usr/lib/postgresql/15/bin\n  pgpass: {dir}/pgpass-n{n}\n\
             \x20 authentication:\n    superuser:\n      username: postgres\n      password: {pw}\n\
             \x20   replication:\n      username: replicator\n      password: {rpw}\n\
             \x20 parameters:\n    unix_socket_directories: /tmp\n\
             \x20 pg_hba:\n  - local all all trust\n  - host all all 127.0.0.1/32 md5\n\
             \x20 - host replication replicator 127.0.0.1/32 md5\n",
            n = i + 1,
            api = self.api_ports[i],
            etcd = self.links[i].port(),
            pg = self.pg_ports[i],
            data = data.display(),
            dir = self.dir.path().display(),
            pw = SUPERUSER_PASSWORD,
            rpw = pgwarden_testkit::REPLICATION_PASSWORD,
        )
    }

    fn start_agent(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("patroni-n{}.log", i + 1)))
            .expect("log");
        let mut cmd = std::process::Command::new("patroni");
        cmd.arg(self.dir.path().join(format!("n{}.yml", i + 1)))
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        as_postgres(&mut cmd);
        self.agents[i] = Some(cmd.spawn().expect("start patroni (Debian package patroni)"));
    }

    fn tree(&self, i: usize) -> Vec<i32> {
        let mut pids = self.agents[i]
            .as_ref()
            .map(|c| descendants(c.id() as i32))
            .unwrap_or_default();
        // Patroni's postgres is its child, but make sure of the postmaster's own tree.
        if let Some(pm) = postmaster_pid(&self.dir.path().join(format!("n{}", i + 1))) {
            for p in descendants(pm) {
                if !pids.contains(&p) {
                    pids.push(p);
                }
            }
        }
        pids
    }
}

impl Drop for Patroni {
    fn drop(&mut self) {
        for i in 0..3 {
            for p in self.tree(i) {
                let _ = kill(Pid::from_raw(p), Signal::SIGCONT);
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            if let Some(mut c) = self.agents[i].take() {
                let _ = c.wait();
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        pgwarden_postgres::reap_orphans(&[]);
    }
}

impl Cluster for Patroni {
    async fn leader(&self) -> (usize, u16) {
        eventually(HEAL, "a Patroni primary", || async {
            for i in 0..3 {
                if http_status(self.api_ports[i], "/primary").await == Some(200) {
                    return Some((i, self.pg_ports[i]));
                }
            }
            None
        })
        .await
    }
    async fn inject(&mut self, kind: Kind, i: usize) {
        match kind {
            Kind::KillPostgres => {
                let dir = self.dir.path().join(format!("n{}", i + 1));
                if let Some(pm) = postmaster_pid(&dir) {
                    let _ = kill(Pid::from_raw(pm), Signal::SIGSTOP);
                    let _ = kill(Pid::from_raw(pm), Signal::SIGKILL);
                }
            }
            Kind::KillNode => {
                let tree = self.tree(i);
                for p in &tree {
                    let _ = kill(Pid::from_raw(*p), Signal::SIGSTOP);
                }
                for p in &tree {
                    let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
                }
                if let Some(mut c) = self.agents[i].take() {
                    let _ = c.wait();
                }
            }
            Kind::Freeze => {
                for p in self.tree(i) {
                    let _ = kill(Pid::from_raw(p), Signal::SIGSTOP);
                }
            }
            Kind::Partition => self.links[i].set(Fault::Blackhole),
            Kind::Switchover => {
                let config = self.dir.path().join("n1.yml");
                let (from, to) = (format!("n{}", i + 1), format!("n{}", (i + 1) % 3 + 1));
                let mut cmd = std::process::Command::new("patronictl");
                cmd.arg("-c").arg(&config).args([
                    "switchover",
                    "--leader",
                    &from,
                    "--candidate",
                    &to,
                    "--force",
                ]);
                as_postgres(&mut cmd);
                self.command = Some(background(&mut cmd));
            }
        }
    }
    async fn heal(&mut self, kind: Kind, i: usize) {
        match kind {
            Kind::KillPostgres => {}
            Kind::KillNode => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                pgwarden_postgres::reap_orphans(&[]);
                self.start_agent(i);
            }
            Kind::Freeze => {
                for p in self.tree(i) {
                    let _ = kill(Pid::from_raw(p), Signal::SIGCONT);
                }
            }
            Kind::Partition => self.links[i].set(Fault::Pass),
            Kind::Switchover => {
                let child = self.command.take();
                tokio::task::spawn_blocking(move || finish_command(child, "patronictl switchover"))
                    .await
                    .expect("wait");
            }
        }
    }
    async fn settled(&self) -> bool {
        within(HEAL, || async {
            let mut primaries = 0;
            let mut replicas = 0;
            for i in 0..3 {
                pgwarden_postgres::reap_orphans(&[]);
                match (
                    http_status(self.api_ports[i], "/primary").await,
                    http_status(self.api_ports[i], "/replica").await,
                ) {
                    (Some(200), _) => primaries += 1,
                    (_, Some(200)) => {
                        let lag = replica_streaming(self.pg_ports[i]).await;
                        if lag {
                            replicas += 1;
                        }
                    }
                    _ => {}
                }
            }
            (primaries == 1 && replicas == 2).then_some(())
        })
        .await
        .is_some()
    }
    async fn timeline(&self, i: usize) -> Option<i64> {
        timeline(self.pg_ports[i]).await
    }
    async fn lost(&self, i: usize, log: &Log) -> usize {
        lost_on(self.pg_ports[i], log).await
    }
    async fn writer(&self) -> Writer {
        let ports = self.pg_ports.clone();
        // Without a proxy, a frozen primary holds the connection until SIGCONT: the writer
        // gives up on an insert after 1 s and reconnects, as HAProxy's `shutdown-sessions`
        // or an application's timeout would.
        common::ha::writer_to(
            move || multi_host(ports.clone()),
            WRITE_EVERY,
            Some(Duration::from_secs(1)),
        )
        .await
    }
    fn loop_wait(&self) -> Duration {
        Duration::from_secs(self.timing.1)
    }
}

/// Runs `cmd` as the `postgres` OS user when root (Patroni's files are that user's).
fn as_postgres(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let pg = nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .expect("the postgres user");
    cmd.current_dir("/");
    if nix::unistd::geteuid().is_root() {
        cmd.uid(pg.uid.as_raw()).gid(pg.gid.as_raw());
    }
}

fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

async fn http_status(port: u16, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let go = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        let text = String::from_utf8_lossy(&out);
        text.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), go)
        .await
        .ok()
        .flatten()
}

/// What libpq does for `host=a,b,c target_session_attrs=read-write connect_timeout=2`: each
/// host in turn, the whole attempt (startup and login included) bounded by 2 s, the first that
/// is not in recovery. (tokio-postgres's `connect_timeout` bounds only the socket connect, so a
/// frozen first host would stall its multi-host connect for good.)
async fn multi_host(ports: Vec<u16>) -> Option<tokio_postgres::Client> {
    for port in ports {
        let conn = format!(
            "host=127.0.0.1 port={port} user=postgres password={SUPERUSER_PASSWORD} \
             dbname=postgres"
        );
        let attempt = async {
            let (c, conn) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
                .await
                .ok()?;
            tokio::spawn(conn);
            let standby: bool = c
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .ok()?
                .get(0);
            (!standby).then_some(c)
        };
        if let Ok(Some(c)) = tokio::time::timeout(Duration::from_secs(2), attempt).await {
            return Some(c);
        }
    }
    None
}

async fn timeline(port: u16) -> Option<i64> {
    let c = common::ha::connect(port).await?;
    let row = c
        .query_one(
            "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int8",
            &[],
        )
        .await
        .ok()?;
    Some(row.get(0))
}

async fn replica_streaming(port: u16) -> bool {
    let Some(c) = common::ha::connect(port).await else {
        return false;
    };
    c.query_one(
        "SELECT COALESCE((SELECT status = 'streaming' FROM pg_stat_wal_receiver), false)",
        &[],
    )
    .await
    .is_ok_and(|r| r.get::<_, bool>(0))
}

async fn lost_on(port: u16, log: &Log) -> usize {
    let Some(c) = common::ha::connect(port).await else {
        return log.acks.len();
    };
    let rows = c.query("SELECT id FROM w", &[]).await.unwrap_or_default();
    let have: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    log.acks.iter().filter(|a| !have.contains(&a.id)).count()
}

/// Runs `runs` faults of `kind` on `cluster`, one at a time, each once the cluster has settled.
async fn scenario<C: Cluster>(cluster: &mut C, kind: Kind, runs: usize) -> Row {
    let mut row = Row::default();
    if !cluster.settled().await {
        eprintln!("  the cluster never settled");
        row.failed_runs = runs;
        return row;
    }
    let w = cluster.writer().await;
    let mut faults = Vec::new();
    for run in 0..runs {
        if !cluster.settled().await {
            // Not healed from the last run: the rest are not run.
            eprintln!("  not healed after run {run}; the remaining runs are skipped");
            row.failed_runs += runs - run;
            break;
        }
        let (leader, port) = cluster.leader().await;
        let timeline_before = cluster.timeline(leader).await;
        // Some writes, then the fault at a random phase of the agents' loop.
        let phase = cluster.loop_wait().mul_f64(rand::random::<f64>());
        tokio::time::sleep(Duration::from_secs(2) + phase).await;
        let (errors_before, reconnects_before) = {
            let log = w.log.lock().expect("log");
            (log.errors.len(), log.reconnects)
        };
        let fault = Instant::now();
        faults.push(fault);
        let fault_wall = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        cluster.inject(kind, leader).await;
        // Signalling a process tree takes a few ms: a write sent before the last signal was on
        // its way to a server that was then stopped or killed, i.e. in flight at the fault.
        let struck = Instant::now();
        let recovered = eventually(HEAL, "a write acknowledged after the fault", || async {
            let log = w.log.lock().expect("log");
            log.acks
                .iter()
                .find(|a| a.sent >= fault && (i32::from(port) != a.port || a.started > fault_wall))
                .map(|a| a.at - fault)
        });
        let rto = tokio::time::timeout(HEAL, recovered).await;
        match rto {
            Ok(rto) => row.rto.push(rto),
            Err(_) => row.failed_runs += 1,
        }
        cluster.heal(kind, leader).await;
        if !cluster.settled().await {
            continue;
        }
        let (now_leader, _) = cluster.leader().await;
        if kind == Kind::KillPostgres && now_leader == leader {
            if let (Some(a), Some(b)) = (timeline_before, cluster.timeline(leader).await) {
                if b > a {
                    row.timeline_bumps += 1;
                }
            }
        }
        {
            let log = w.log.lock().expect("log");
            let new = &log.errors[errors_before..];
            let in_flight = new.iter().filter(|(sent, _)| *sent < struck).count();
            row.in_flight += in_flight;
            row.errors += new.len() - in_flight;
            row.reconnects += log.reconnects - reconnects_before;
        }
        let errors: Vec<String> = {
            let log = w.log.lock().expect("log");
            log.errors[errors_before..]
                .iter()
                .map(|(sent, why)| {
                    let at = if *sent >= struck {
                        format!("+{:.3}s", (*sent - struck).as_secs_f64())
                    } else {
                        format!("-{:.3}s", (struck - *sent).as_secs_f64())
                    };
                    format!("{at} {why}")
                })
                .collect()
        };
        eprintln!(
            "  {} run {}/{runs}: rto {:?}{}",
            kind.name(),
            run + 1,
            row.rto.last(),
            if errors.is_empty() {
                String::new()
            } else {
                format!(
                    "; failed writes (sent relative to the fault): {}",
                    errors.join(" | ")
                )
            }
        );
    }
    let log = w.stop();
    let (leader, _) = cluster.leader().await;
    row.lost = cluster.lost(leader, &log).await;
    row.non_leader = non_leader_runs(&log, &faults);
    row
}

/// Runs in which a server acknowledged a write after another had taken over: per run, the
/// acknowledgements from just before its fault to the next fault (leadership may come back to
/// a node in a later run, which is no second writer).
fn non_leader_runs(log: &Log, faults: &[Instant]) -> usize {
    let before = Duration::from_secs(1);
    (0..faults.len())
        .filter(|&r| {
            let (from, to) = (faults[r], faults.get(r + 1).copied());
            let window = Log {
                acks: log
                    .acks
                    .iter()
                    .filter(|a| a.at + before >= from && to.map_or(true, |t| a.at < t))
                    .cloned()
                    .collect(),
                ..Log::default()
            };
            window.writers_in_order().is_err()
        })
        .count()
}

/// `f` until it gives a value, or `None` after `limit` (a bench goes on; a test would panic).
async fn within<F, Fut, T>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn pct(v: &[Duration], p: f64) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    Some(v[i])
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.2}", d.as_secs_f64()))
}

fn header() -> String {
    format!(
        "{:<22} {:<14} {:>5} {:>8} {:>8} {:>8} {:>9} {:>7} {:>10} {:>5} {:>10} {:>9} {:>7}",
        "system",
        "fault",
        "runs",
        "p50 s",
        "p99 s",
        "max s",
        "in flight",
        "errors",
        "reconnects",
        "lost",
        "non-leader",
        "tl bumps",
        "no RTO"
    )
}

fn row_line(system: &str, kind: Kind, r: &Row) -> String {
    format!(
        "{:<22} {:<14} {:>5} {:>8} {:>8} {:>8} {:>9} {:>7} {:>10} {:>5} {:>10} {:>9} {:>7}",
        system,
        kind.name(),
        r.rto.len() + r.failed_runs,
        secs(pct(&r.rto, 0.5)),
        secs(pct(&r.rto, 0.99)),
        secs(r.rto.iter().max().copied()),
        r.in_flight,
        r.errors,
        r.reconnects,
        r.lost,
        r.non_leader,
        r.timeline_bumps,
        r.failed_runs
    )
}

fn print_table(rows: &[(String, Kind, Row)]) {
    println!("{}", header());
    for (system, kind, r) in rows {
        println!("{}", row_line(system, *kind, r));
    }
    // Ratios of p50 against each Patroni configuration.
    for kind in KINDS {
        let p50 = |sys: &str| {
            rows.iter()
                .find(|(s, k, _)| s == sys && *k == kind)
                .and_then(|(_, _, r)| pct(&r.rto, 0.5))
        };
        if let Some(ours) = p50("pgwarden") {
            for peer in ["patroni (defaults)", "patroni (10/2/3)"] {
                if let Some(theirs) = p50(peer) {
                    println!(
                        "{:<14} pgwarden p50 / {peer} p50 = {:.2}",
                        kind.name(),
                        ours.as_secs_f64() / theirs.as_secs_f64()
                    );
                }
            }
        }
    }
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let runs: usize = arg("--runs").and_then(|s| s.parse().ok()).unwrap_or(20);
    let patroni_runs: usize = arg("--patroni-runs")
        .and_then(|s| s.parse().ok())
        .unwrap_or(runs);
    let only = arg("--only");
    let fault = arg("--fault");
    let kinds: Vec<Kind> = KINDS
        .into_iter()
        .filter(|k| fault.as_deref().map_or(true, |f| f == k.name()))
        .collect();
    if kinds.is_empty() {
        eprintln!(
            "--fault must be one of: {}",
            KINDS.map(|k| k.name()).join(", ")
        );
        std::process::exit(2);
    }
    common::ha::spawn_reaper();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut rows = Vec::new();
        for (name, only_as, agent) in [
            ("pgwarden", "pgwarden", ""),
            (
                "pgwarden (sync on)",
                "pgwarden-sync",
                "synchronous_mode = \"on\"",
            ),
        ] {
            if only.as_deref().is_some_and(|o| o != only_as) {
                continue;
            }
            for &kind in &kinds {
                eprintln!("{name}, {}:", kind.name());
                let mut c = PgwardenCluster(Ha::start(3, agent, &|_| String::new()).await, None);
                let row = scenario(&mut c, kind, runs).await;
                eprintln!("{}", row_line(name, kind, &row));
                rows.push((name.to_string(), kind, row));
            }
        }
        if only.as_deref().map_or(true, |o| o == "patroni") {
            for (name, timing) in [
                ("patroni (10/2/3)", (10, 2, 3)),
                ("patroni (defaults)", (30, 10, 10)),
            ] {
                for &kind in &kinds {
                    eprintln!("{name}, {}:", kind.name());
                    let mut c = Patroni::start(timing).await;
                    let row = scenario(&mut c, kind, patroni_runs).await;
                    eprintln!("{}", row_line(name, kind, &row));
                    rows.push((name.to_string(), kind, row));
                }
            }
        }
        print_table(&rows);
    });
}
