//! Patroni (Debian `patroni`) as the benchmark's peer: three members on 127.0.0.1 on their
//! own etcd, each through a fault proxy, driven by the same scenarios as pgwarden.

use super::*;

/// Patroni (Debian `patroni`) on the same etcd and PostgreSQL: three members on 127.0.0.1,
/// each reaching etcd through its own fault proxy.
pub struct Patroni {
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
    pub async fn start(timing: (u64, u64, u64)) -> Patroni {
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
