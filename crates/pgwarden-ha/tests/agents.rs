//! Agents in one process on the in-process store, against real PostgreSQL: bootstrap, a
//! crashed primary restarted in place, an agent's death failed over, the old primary rejoining.

use std::sync::Arc;
use std::time::Duration;

use pgwarden_config::Config;
use pgwarden_core::NodeId;
use pgwarden_dcs::memory::MemoryKv;
use pgwarden_dcs::ClusterStore;
use pgwarden_ha::{Agent, MemberState};
use pgwarden_testkit::{eventually, ports::free_ports};
use tokio::sync::watch;

const BOOT: Duration = Duration::from_secs(90);
const FAILOVER: Duration = Duration::from_secs(30);

struct Ha {
    _dir: tempfile::TempDir,
    config: Arc<Config>,
    kv: MemoryKv,
    agents: Vec<Option<Running>>,
}

struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Ha {
    async fn start(nodes: usize, extra: &str) -> Ha {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::Builder::new()
            .prefix("pgwarden-ha-")
            .tempdir()
            .expect("temp dir");
        let env = pgwarden_postgres::PgEnv::discover(None, "postgres").expect("binaries");
        env.run_as.create_dir(dir.path(), 0o755).expect("chown");
        let ports = free_ports(nodes * 2);
        let mut toml = format!(
            "cluster = \"test\"\n[postgres]\nsuperuser_password = \"{}\"\nreplication_password = \"{}\"\n\
             parameters = {{ fsync = false, shared_buffers = \"16MB\" }}\n{extra}\n",
            pgwarden_testkit::SUPERUSER_PASSWORD,
            pgwarden_testkit::REPLICATION_PASSWORD
        );
        for i in 0..nodes {
            toml.push_str(&format!(
                "[[nodes]]\nname = \"n{}\"\nhost = \"127.0.0.1\"\nport = {}\ndata_dir = \"{}\"\napi = \"127.0.0.1:{}\"\n",
                i + 1,
                ports[2 * i],
                dir.path().join(format!("n{}", i + 1)).display(),
                ports[2 * i + 1]
            ));
        }
        let config = Arc::new(Config::from_toml(&toml, dir.path()).expect("config"));
        let mut ha = Ha {
            _dir: dir,
            config,
            kv: MemoryKv::new(),
            agents: Vec::new(),
        };
        for i in 0..nodes {
            let a = ha.spawn(i).await;
            ha.agents.push(Some(a));
        }
        ha
    }

    async fn spawn(&self, i: usize) -> Running {
        let store = ClusterStore::new(self.kv.clone(), "pgwarden", "test");
        let agent = Agent::new(self.config.clone(), &format!("n{}", i + 1), store)
            .await
            .expect("agent");
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            agent.run(rx).await.expect("agent run");
        });
        Running { stop, task }
    }

    fn store(&self) -> ClusterStore<MemoryKv> {
        ClusterStore::new(self.kv.clone(), "pgwarden", "test")
    }

    async fn members(&self) -> Vec<(String, MemberState)> {
        self.store()
            .members::<MemberState>()
            .await
            .expect("members")
            .into_iter()
            .map(|m| (m.node.to_string(), m.state))
            .collect()
    }

    /// The leader once it is writable and every other live agent streams from it.
    async fn settled(&self, replicas: usize, min_epoch: u64, what: &str) -> (usize, u64) {
        eventually(BOOT, what, || async {
            let leader = self.store().leader().await.expect("leader")?;
            if leader.epoch.0 < min_epoch {
                return None;
            }
            let members = self.members().await;
            let lead = members
                .iter()
                .find(|(n, s)| n == leader.node.as_str() && s.primary && s.role == "leader")?;
            let streaming = members
                .iter()
                .filter(|(_, s)| {
                    s.role == "replica" && s.streaming && s.timeline == lead.1.timeline
                })
                .count();
            (streaming == replicas).then(|| (index(&leader.node), leader.epoch.0))
        })
        .await
    }

    async fn client(&self, i: usize) -> tokio_postgres::Client {
        let n = &self.config.nodes[i];
        pgwarden_postgres::sql::connect(&pgwarden_postgres::sql::ConnectSpec {
            host: &n.host,
            port: n.port,
            user: "postgres",
            password: pgwarden_testkit::SUPERUSER_PASSWORD,
            dbname: "postgres",
            application_name: "test",
            timeout: Duration::from_secs(5),
        })
        .await
        .expect("connect")
    }

    async fn timeline(&self, i: usize) -> i64 {
        let c = self.client(i).await;
        c.query_one("SELECT timeline_id::int8 FROM pg_control_checkpoint()", &[])
            .await
            .expect("timeline")
            .get(0)
    }

    fn postmaster_pid(&self, i: usize) -> i32 {
        let dir = self.config.nodes[i].data_dir.as_ref().expect("data dir");
        let text = std::fs::read_to_string(dir.join("postmaster.pid")).expect("postmaster.pid");
        text.lines()
            .next()
            .expect("pid line")
            .trim()
            .parse()
            .expect("pid")
    }

    /// The agent's task aborted: it and its PostgreSQL are gone at once.
    fn kill_agent(&mut self, i: usize) {
        let a = self.agents[i].take().expect("running");
        a.task.abort();
        drop(a.stop);
    }
}

impl Drop for Ha {
    fn drop(&mut self) {
        for a in self.agents.iter_mut().flatten() {
            let _ = a.stop.send(true);
            a.task.abort();
        }
    }
}

fn index(n: &NodeId) -> usize {
    n.as_str()[1..].parse::<usize>().expect("nN") - 1
}

async fn count(c: &tokio_postgres::Client) -> i64 {
    c.query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("count")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_crash_restart_failover_and_rejoin() {
    let mut ha = Ha::start(3, "").await;
    let (leader, epoch) = ha.settled(2, 1, "one leader, two streaming replicas").await;
    let c = ha.client(leader).await;
    c.batch_execute(
        "CREATE TABLE t (id int primary key); INSERT INTO t SELECT generate_series(1, 100)",
    )
    .await
    .expect("write");
    let timeline = ha.timeline(leader).await;

    // 1. The leader's postmaster killed: restarted in place, same epoch, same timeline.
    let killed = ha.postmaster_pid(leader);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(killed),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill postmaster");
    let (again, same_epoch) = eventually(FAILOVER, "the leader restarted in place", || async {
        let l = ha.store().leader().await.expect("leader")?;
        let i = index(&l.node);
        let dir = ha.config.nodes[i].data_dir.clone().expect("dir");
        let pid = std::fs::read_to_string(dir.join("postmaster.pid")).ok()?;
        if pid.lines().next()?.trim() == killed.to_string() {
            return None;
        }
        let members = ha.members().await;
        let s = members.iter().find(|(n, _)| n == l.node.as_str())?;
        (s.1.primary && s.1.state == "running").then_some((i, l.epoch.0))
    })
    .await;
    assert_eq!(
        (again, same_epoch),
        (leader, epoch),
        "no failover for a crash"
    );
    assert_eq!(ha.timeline(leader).await, timeline, "no timeline bump");
    assert_eq!(count(&ha.client(leader).await).await, 100);

    // 2. The leader's agent dies (and its PostgreSQL with it): a replica takes over.
    ha.kill_agent(leader);
    let (new_leader, new_epoch) = ha
        .settled(
            1,
            epoch + 1,
            "a new leader and the other replica following it",
        )
        .await;
    assert_ne!(new_leader, leader);
    assert_eq!(new_epoch, epoch + 1);
    let c = ha.client(new_leader).await;
    assert_eq!(
        count(&c).await,
        100,
        "every committed row is on the new leader"
    );
    c.execute("INSERT INTO t VALUES (101)", &[])
        .await
        .expect("write on the new leader");

    // 3. The old primary's agent comes back: it rejoins as a replica of the new leader.
    let back = ha.spawn(leader).await;
    ha.agents[leader] = Some(back);
    let (l, e) = ha.settled(2, new_epoch, "the old primary rejoined").await;
    assert_eq!(
        (l, e),
        (new_leader, new_epoch),
        "the rejoin did not move the lead"
    );
    let old = ha.client(leader).await;
    eventually(
        FAILOVER,
        "the old primary replays the new leader's write",
        || async { (count(&old).await == 101).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_publishes_what_it_has_replayed_apart_from_what_it_has_received() {
    let ha = Ha::start(2, "").await;
    let (leader, _) = ha.settled(1, 1, "one leader, one streaming replica").await;
    let replica = 1 - leader;
    let name = ha.config.nodes[replica].name.clone();
    let standby = ha.client(replica).await;
    let primary = ha.client(leader).await;
    primary
        .batch_execute("CREATE TABLE t (id int)")
        .await
        .expect("write");
    eventually(FAILOVER, "the table on the replica", || async {
        standby
            .query_opt("SELECT 1 FROM pg_class WHERE relname = 't'", &[])
            .await
            .expect("read")
            .map(|_| ())
    })
    .await;
    standby
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .expect("pause replay");
    primary
        .batch_execute("INSERT INTO t SELECT generate_series(1, 1000)")
        .await
        .expect("write");
    let paused = eventually(
        FAILOVER,
        "the replica received more than it replayed",
        || {
            let (ha, name) = (&ha, &name);
            async move {
                let members = ha.members().await;
                let s = members.into_iter().find(|(n, _)| n == name)?.1;
                let received: pgwarden_core::Lsn = s.lsn.as_deref()?.parse().ok()?;
                let replayed: pgwarden_core::Lsn = s.replay_lsn.as_deref()?.parse().ok()?;
                (received > replayed && s.replay_lag_bytes? > 0 && s.replay_lag_ms? >= 1000)
                    .then_some(replayed)
            }
        },
    )
    .await;
    standby
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .expect("resume replay");
    eventually(FAILOVER, "the replica caught up, and says so", || {
        let (ha, name) = (&ha, &name);
        async move {
            let members = ha.members().await;
            let s = members.into_iter().find(|(n, _)| n == name)?.1;
            let replayed: pgwarden_core::Lsn = s.replay_lsn.as_deref()?.parse().ok()?;
            (replayed > paused && s.replay_lag_ms == Some(0)).then_some(())
        }
    })
    .await;
}
