//! The demo's nodes: an HA agent per node, in this process on the in-process store (the
//! default) or as `pgwarden agent` processes on a local etcd (`--dcs etcd`). The agents build
//! the cluster (the first initialises, the others clone); the demo then creates the `app`
//! role and database on the leader.

use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use pgwarden_config::Config;
use pgwarden_core::NodeId;
use pgwarden_dcs::etcd::EtcdKv;
use pgwarden_dcs::memory::MemoryKv;
use pgwarden_dcs::{ClusterStore, Kv};
use pgwarden_ha::MemberState;
use pgwarden_postgres::sql;
use tokio::sync::watch;

use crate::DemoError;

/// How long a first run may take to have every standby streaming.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// The agents, wherever they run.
pub enum Agents {
    InProcess {
        stop: watch::Sender<bool>,
        tasks: Vec<tokio::task::JoinHandle<()>>,
    },
    Processes {
        etcd: Child,
        agents: Vec<AgentProcess>,
    },
}

/// A `pgwarden agent` child, and how to start it again.
pub struct AgentProcess {
    pub node: String,
    pub child: Option<Child>,
    command: std::process::Command,
    /// When it was seen to exit.
    exited: Option<std::time::Instant>,
}

/// The store the demo (and its proxy) reads.
pub enum Store {
    Memory(ClusterStore<MemoryKv>),
    Etcd(Box<ClusterStore<EtcdKv>>),
}

/// Starts an agent per node in this process. On a later run the store is new: the node whose
/// data directory is a primary's is recorded as the one that initialised the cluster, so it
/// comes back as the leader without a promotion.
pub async fn in_process(config: &Arc<Config>) -> Result<(Agents, Store), DemoError> {
    let kv = MemoryKv::new();
    let store = pgwarden_ha::store::in_process(&kv, config);
    if let Some(primary) = existing_primary(config) {
        store.initialize(&primary).await.map_err(store_error)?;
    }
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    for (i, node) in config.nodes.iter().enumerate() {
        let agent = pgwarden_ha::Agent::new(
            config.clone(),
            &node.name,
            pgwarden_ha::store::in_process(&kv, config),
        )
        .await
        .map_err(|e| DemoError::Cluster(format!("node {}: {e}", node.name)))?;
        let rx = stopped.clone();
        let name = node.name.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = agent.run(rx).await {
                tracing::error!(node = %name, error = %e, "agent stopped");
            }
        }));
        if i == 0 {
            // The first node first: on a first run it initialises the cluster.
            wait_leader(&store).await?;
        }
    }
    Ok((Agents::InProcess { stop, tasks }, Store::Memory(store)))
}

/// Starts etcd and a `pgwarden agent` process per node; their logs go to `DIR/log/`.
pub async fn processes(
    config: &Arc<Config>,
    dir: &Path,
    etcd_ports: (u16, u16),
) -> Result<(Agents, Store), DemoError> {
    let log_dir = dir.join("log");
    std::fs::create_dir_all(&log_dir).map_err(DemoError::io("cannot create", &log_dir))?;
    let etcd = start_etcd(dir, etcd_ports, &log_dir)?;
    let store = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match pgwarden_ha::store::connect(config).await {
                Ok(s) => return s,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    })
    .await
    .map_err(|_| DemoError::Cluster("the local etcd did not answer within 30s".into()))?;
    if let Some(primary) = existing_primary(config) {
        store.initialize(&primary).await.map_err(store_error)?;
    }
    let exe = std::env::current_exe().map_err(DemoError::io("cannot find", "pgwarden"))?;
    let config_path = config.source.clone().unwrap_or_default();
    let mut agents = Vec::new();
    for (i, node) in config.nodes.iter().enumerate() {
        let log = log_dir.join(format!("agent-{}.log", node.name));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(DemoError::io("cannot open", &log))?;
        let err = file
            .try_clone()
            .map_err(DemoError::io("cannot open", &log))?;
        let mut command = std::process::Command::new(&exe);
        command
            .arg("agent")
            .arg("-c")
            .arg(&config_path)
            .arg("--node")
            .arg(&node.name)
            .env("PGWARDEN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err);
        // An agent outlives no demo: it stops its node cleanly when the demo goes.
        pgwarden_postgres::parent_death_signal(&mut command, nix::sys::signal::Signal::SIGTERM);
        let child = command
            .spawn()
            .map_err(DemoError::io("cannot start", &exe))?;
        println!(
            "agent {} running as pid {} (log: {})",
            node.name,
            child.id(),
            log.display()
        );
        agents.push(AgentProcess {
            node: node.name.clone(),
            child: Some(child),
            command,
            exited: None,
        });
        if i == 0 {
            wait_leader(&store).await?;
        }
    }
    Ok((
        Agents::Processes { etcd, agents },
        Store::Etcd(Box::new(store)),
    ))
}

fn start_etcd(dir: &Path, (client, peer): (u16, u16), log_dir: &Path) -> Result<Child, DemoError> {
    let data = dir.join("etcd");
    let log = log_dir.join("etcd.log");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(DemoError::io("cannot open", &log))?;
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut cmd = std::process::Command::new("etcd");
    pgwarden_postgres::parent_death_signal(&mut cmd, nix::sys::signal::Signal::SIGTERM);
    let child = cmd
        .arg("--name")
        .arg("demo")
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("demo={peer_url}")])
        .args(["--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(file.try_clone().map_err(DemoError::io("cannot open", &log))?)
        .stderr(file)
        .spawn()
        .map_err(|e| {
            DemoError::Cluster(format!(
                "cannot start etcd ({e}): --dcs etcd needs the etcd-server package (apt-get install etcd-server)"
            ))
        })?;
    println!(
        "etcd running as pid {} on {client_url} (data: {})",
        child.id(),
        data.display()
    );
    Ok(child)
}

/// The one initialised node whose data directory is not a standby's, if exactly one is.
fn existing_primary(config: &Config) -> Option<NodeId> {
    let primaries: Vec<&str> = config
        .nodes
        .iter()
        .filter(|n| {
            n.data_dir.as_ref().is_some_and(|d| {
                d.join("PG_VERSION").is_file() && !d.join("standby.signal").exists()
            })
        })
        .map(|n| n.name.as_str())
        .collect();
    match primaries.as_slice() {
        [one] => Some(NodeId::new(one)),
        _ => None,
    }
}

fn store_error(e: pgwarden_dcs::DcsError) -> DemoError {
    DemoError::Cluster(format!("the store: {e}"))
}

async fn wait_leader<K: Kv>(store: &ClusterStore<K>) -> Result<(), DemoError> {
    tokio::time::timeout(READY_TIMEOUT, async {
        loop {
            if let Ok(Some(_)) = store.leader().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .map_err(|_| DemoError::Cluster("no node took the lead".into()))
}

impl Store {
    pub async fn snapshot(
        &self,
    ) -> Result<pgwarden_dcs::Snapshot<MemberState>, pgwarden_dcs::DcsError> {
        match self {
            Store::Memory(s) => s.snapshot().await,
            Store::Etcd(s) => s.snapshot().await,
        }
    }

    /// The proxy's view of the cluster, from the store (see [`pgwarden_ha::view::spawn`]).
    pub async fn view(
        &self,
        refresh: Duration,
        margin: Duration,
    ) -> watch::Receiver<Arc<pgwarden_cluster::view::ClusterView>> {
        match self {
            Store::Memory(s) => {
                pgwarden_ha::view::spawn(Arc::new(s.clone()), refresh, margin).await
            }
            Store::Etcd(s) => {
                pgwarden_ha::view::spawn(Arc::new((**s).clone()), refresh, margin).await
            }
        }
    }
}

/// Waits until the leader is writable and every other node streams from it; returns the
/// leader's name.
pub async fn ready(store: &Store, nodes: usize) -> Result<String, DemoError> {
    tokio::time::timeout(READY_TIMEOUT, async {
        loop {
            if let Ok(s) = store.snapshot().await {
                if let Some(l) = &s.leader {
                    let lead = s.members.iter().find(|m| {
                        m.node == l.node && m.state.primary && m.state.epoch == Some(l.epoch.0)
                    });
                    let streaming = s
                        .members
                        .iter()
                        .filter(|m| m.state.role == "replica" && m.state.streaming)
                        .count();
                    if lead.is_some() && streaming + 1 >= nodes {
                        return l.node.to_string();
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .map_err(|_| {
        DemoError::Cluster(format!(
            "the cluster was not ready within {}s (a leader and every standby streaming)",
            READY_TIMEOUT.as_secs()
        ))
    })
}

/// The `app` role and database for every `[[proxy.users]]` entry, on the leader.
pub async fn set_up_roles(config: &Config, leader: &str) -> Result<(), DemoError> {
    let node = config
        .node(leader)
        .ok_or_else(|| DemoError::Cluster(format!("{leader} is not a node")))?;
    let spec =
        pgwarden_ha::agent::superuser(config, &node.host, node.port, Duration::from_secs(10));
    let client = sql::connect(&spec).await?;
    let addr = spec.addr();
    for user in &config.users {
        sql::ensure_role(&client, &addr, &user.name, user.password.expose(), "").await?;
        sql::ensure_database(&client, &addr, &user.name, &user.name).await?;
    }
    Ok(())
}

impl Agents {
    /// Agent processes that exited are reported, and started again `after` that.
    pub fn check(&mut self, after: Duration) -> Vec<String> {
        let Agents::Processes { agents, .. } = self else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for a in agents.iter_mut() {
            if let Some(c) = a.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    out.push(format!(
                        "{}: agent exited ({status}); starting it again in {}s",
                        a.node,
                        after.as_secs()
                    ));
                    a.child = None;
                    a.exited = Some(std::time::Instant::now());
                }
            } else if a.exited.is_some_and(|t| t.elapsed() >= after) {
                a.exited = None;
                match a.command.spawn() {
                    Ok(c) => {
                        out.push(format!("{}: agent started again as pid {}", a.node, c.id()));
                        a.child = Some(c);
                    }
                    Err(e) => out.push(format!("{}: cannot start its agent again: {e}", a.node)),
                }
            }
        }
        out
    }

    /// Stops every agent (each stops its PostgreSQL cleanly and gives up the lead), then etcd.
    pub async fn stop(self) {
        match self {
            Agents::InProcess { stop, tasks } => {
                let _ = stop.send(true);
                for t in tasks {
                    let _ = tokio::time::timeout(Duration::from_secs(12), t).await;
                }
            }
            Agents::Processes { mut etcd, agents } => {
                let agents: Vec<Child> = agents.into_iter().filter_map(|a| a.child).collect();
                for a in &agents {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(a.id() as i32),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
                for mut a in agents {
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
                    while a.try_wait().ok().flatten().is_none() {
                        if tokio::time::Instant::now() >= deadline {
                            let _ = a.kill();
                            let _ = a.wait();
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                let _ = etcd.kill();
                let _ = etcd.wait();
            }
        }
    }
}
