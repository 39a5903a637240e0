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

#[path = "failover/patroni.rs"]
mod patroni;
use patroni::Patroni;

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
