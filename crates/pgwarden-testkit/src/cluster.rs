//! Real PostgreSQL clusters for tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pgwarden_config::ReplicationMode;
use pgwarden_postgres::sql::{self, ConnectSpec};
use pgwarden_postgres::{
    Instance, PgEnv, Postmaster, ReplicationLogin, Settings, StopMode, SyncStandbys,
};
use tokio_postgres::{Client, Row};

use crate::{
    template, wait, REPLICATION_PASSWORD, REPLICATION_USER, SUPERUSER, SUPERUSER_PASSWORD,
};

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How a test cluster is built.
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    replicas: usize,
    mode: ReplicationMode,
    sync_count: u32,
    settings: BTreeMap<String, String>,
    monitor: Vec<(String, String)>,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self {
            replicas: 0,
            mode: ReplicationMode::Async,
            sync_count: 1,
            settings: BTreeMap::new(),
            monitor: Vec::new(),
        }
    }
}

impl ClusterBuilder {
    pub fn replicas(mut self, n: usize) -> Self {
        self.replicas = n;
        self
    }

    /// `sync` or `quorum` with `k` standbys required.
    pub fn mode(mut self, mode: ReplicationMode, k: u32) -> Self {
        self.mode = mode;
        self.sync_count = k;
        self
    }

    /// An extra `postgresql.conf` setting.
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.insert(name.to_string(), value.to_string());
        self
    }

    /// A `[monitor]` entry for the generated `pgwarden.toml` (value is TOML, e.g. `"\"1MB\""`).
    pub fn monitor(mut self, key: &str, toml_value: &str) -> Self {
        self.monitor.push((key.to_string(), toml_value.to_string()));
        self
    }

    /// Builds the primary, clones the standbys in parallel, starts them and waits until every
    /// standby streams.
    pub async fn build(self) -> Cluster {
        let started = Instant::now();
        let env = PgEnv::discover(None, "postgres").expect("PostgreSQL binaries for the testkit");
        let template = template::template(&env).await;
        let dir = tempfile::Builder::new()
            .prefix("pgwarden-test-")
            .tempdir()
            .expect("create a temporary directory");
        env.run_as
            .create_dir(dir.path(), 0o755)
            .expect("hand the temp dir to postgres");
        let ports = crate::ports::free_ports(self.replicas + 1);
        let instances: Vec<Instance> = ports
            .iter()
            .enumerate()
            .map(|(i, &port)| {
                let name = format!("n{}", i + 1);
                Instance::new(
                    env.clone(),
                    &name,
                    "127.0.0.1",
                    port,
                    &dir.path().join(&name),
                )
                .non_durable()
                .die_with_parent()
            })
            .collect();
        let mut cluster = Cluster {
            nodes: instances
                .iter()
                .map(|i| TestNode {
                    instance: i.clone(),
                    postmaster: None,
                })
                .collect(),
            builder: self,
            dir,
        };
        cluster.build_nodes(&template).await;
        tracing::info!(elapsed = ?started.elapsed(), "test cluster ready");
        cluster
    }
}

/// One node of a test cluster.
#[derive(Debug)]
pub struct TestNode {
    pub instance: Instance,
    postmaster: Option<Postmaster>,
}

/// A running test cluster: node 0 is the primary `n1`, nodes 1.. are standbys.
#[derive(Debug)]
pub struct Cluster {
    nodes: Vec<TestNode>,
    builder: ClusterBuilder,
    dir: tempfile::TempDir,
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    async fn build_nodes(&mut self, template: &Path) {
        let primary = self.nodes[0].instance.clone();
        copy_dir(template, &primary.data_dir);
        primary
            .configure(&self.settings(), REPLICATION_USER)
            .expect("configure the primary");
        let pm = primary
            .start(START_TIMEOUT)
            .await
            .expect("start the primary");
        self.nodes[0].postmaster = Some(pm);
        let client = self.client(0).await;
        sql::ensure_role(
            &client,
            "primary",
            REPLICATION_USER,
            REPLICATION_PASSWORD,
            "REPLICATION",
        )
        .await
        .expect("create the replication role");
        let upstream = primary.endpoint();
        let clones = self.nodes[1..].iter().map(|n| {
            let inst = n.instance.clone();
            let upstream = upstream.clone();
            async move {
                let login = ReplicationLogin {
                    user: REPLICATION_USER,
                    password: REPLICATION_PASSWORD,
                };
                inst.clone_from(&upstream, &login, &inst.name, Duration::from_secs(60))
                    .await
                    .unwrap_or_else(|e| panic!("clone {}: {e}", inst.name));
                inst.start(START_TIMEOUT)
                    .await
                    .unwrap_or_else(|e| panic!("start {}: {e}", inst.name))
            }
        });
        let pms = futures::future::join_all(clones).await;
        for (node, pm) in self.nodes[1..].iter_mut().zip(pms) {
            node.postmaster = Some(pm);
        }
        self.wait_streaming().await;
    }

    fn settings(&self) -> Settings {
        let names: Vec<String> = self.nodes[1..]
            .iter()
            .map(|n| n.instance.name.clone())
            .collect();
        let k = self.builder.sync_count;
        let sync = match self.builder.mode {
            ReplicationMode::Async => SyncStandbys::None,
            ReplicationMode::Sync => SyncStandbys::First(k, names),
            ReplicationMode::Quorum => SyncStandbys::Any(k, names),
        };
        let mut parameters = BTreeMap::from([
            ("fsync".to_string(), "off".to_string()),
            ("shared_buffers".to_string(), "32MB".to_string()),
            ("max_connections".to_string(), "50".to_string()),
        ]);
        parameters.extend(self.builder.settings.clone());
        Settings {
            sync,
            parameters,
            ..Settings::default()
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn node(&self, i: usize) -> &Instance {
        &self.nodes[i].instance
    }

    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].instance.port
    }

    /// A new superuser connection to node `i`'s database `postgres`.
    pub async fn client(&self, i: usize) -> Client {
        self.client_db(i, "postgres").await
    }

    pub async fn client_db(&self, i: usize, db: &str) -> Client {
        let n = &self.nodes[i].instance;
        sql::connect(&ConnectSpec {
            host: &n.host,
            port: n.port,
            user: SUPERUSER,
            password: SUPERUSER_PASSWORD,
            dbname: db,
            application_name: "pgwarden-testkit",
            timeout: Duration::from_secs(10),
        })
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", n.name))
    }

    pub async fn execute(&self, i: usize, sql: &str) {
        self.client(i)
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "on {}: {sql}: {}",
                    self.nodes[i].instance.name,
                    describe(&e)
                )
            });
    }

    pub async fn query(&self, i: usize, sql: &str) -> Vec<Row> {
        self.client(i)
            .await
            .query(sql, &[])
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "on {}: {sql}: {}",
                    self.nodes[i].instance.name,
                    describe(&e)
                )
            })
    }

    /// The first column of the first row, as text (`sql` should cast: `SELECT x::text`).
    pub async fn query_text(&self, i: usize, sql: &str) -> Option<String> {
        let rows = self.query(i, sql).await;
        rows.first().and_then(|r| r.get::<_, Option<String>>(0))
    }

    /// Waits until the primary sees every standby in `streaming` state.
    pub async fn wait_streaming(&self) {
        let want = (self.nodes.len() - 1) as i64;
        if want == 0 {
            return;
        }
        let client = self.client(0).await;
        wait::eventually(Duration::from_secs(30), "every standby streaming", || {
            let client = &client;
            async move {
                let n: i64 = client
                    .query_one(
                        "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                        &[],
                    )
                    .await
                    .ok()?
                    .get(0);
                (n == want).then_some(())
            }
        })
        .await;
    }

    /// Waits until standby `i` has replayed everything the primary has written so far.
    pub async fn wait_replayed(&self, i: usize) {
        let target = self
            .query_text(0, "SELECT pg_current_wal_lsn()::text")
            .await
            .expect("lsn");
        let client = self.client(i).await;
        let sql = format!("SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn");
        wait::eventually(
            Duration::from_secs(30),
            "standby replayed the primary's WAL",
            || {
                let (client, sql) = (&client, &sql);
                async move {
                    client
                        .query_one(sql.as_str(), &[])
                        .await
                        .ok()?
                        .get::<_, bool>(0)
                        .then_some(())
                }
            },
        )
        .await;
    }

    /// SIGKILL node `i`'s postmaster, as a crash would.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(pm) = self.nodes[i].postmaster.as_mut() {
            pm.kill();
        }
    }

    /// Fast shutdown of node `i`.
    pub async fn stop_node(&mut self, i: usize) {
        if let Some(pm) = self.nodes[i].postmaster.as_mut() {
            pm.stop(StopMode::Fast, Duration::from_secs(10)).await;
        }
    }

    /// Starts node `i` again after a stop or kill.
    pub async fn start_node(&mut self, i: usize) {
        let pm = self.nodes[i]
            .instance
            .start(START_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("restart node {i}: {e}"));
        self.nodes[i].postmaster = Some(pm);
    }

    pub async fn pause_replay(&self, i: usize) {
        let client = self.client(i).await;
        client
            .batch_execute("SELECT pg_wal_replay_pause()")
            .await
            .expect("pause replay");
        wait::eventually(Duration::from_secs(10), "replay paused", || {
            let client = &client;
            async move {
                let s: String = client
                    .query_one("SELECT pg_get_wal_replay_pause_state()", &[])
                    .await
                    .ok()?
                    .get(0);
                (s == "paused").then_some(())
            }
        })
        .await;
    }

    pub async fn resume_replay(&self, i: usize) {
        self.execute(i, "SELECT pg_wal_replay_resume()").await;
    }

    /// `pgwarden.toml` describing this cluster (monitor entries from the builder included).
    pub fn config_toml(&self) -> String {
        let mut s = format!(
            "cluster = \"test\"\n\n[postgres]\nos_user = \"postgres\"\nsuperuser = \"{SUPERUSER}\"\n\
             superuser_password = \"{SUPERUSER_PASSWORD}\"\nreplication_user = \"{REPLICATION_USER}\"\n\
             replication_password = \"{REPLICATION_PASSWORD}\"\n\n[replication]\nmode = \"{}\"\nsync_count = {}\n\n[monitor]\n",
            self.builder.mode, self.builder.sync_count
        );
        for (k, v) in &self.builder.monitor {
            s.push_str(&format!("{k} = {v}\n"));
        }
        for n in &self.nodes {
            let i = &n.instance;
            s.push_str(&format!(
                "\n[[nodes]]\nname = \"{}\"\nhost = \"{}\"\nport = {}\ndata_dir = {}\n",
                i.name,
                i.host,
                i.port,
                serde_json::to_string(&i.data_dir.to_string_lossy()).expect("string to json")
            ));
        }
        s
    }

    /// Writes [`Cluster::config_toml`] to `pgwarden.toml` in the cluster's directory.
    pub fn write_config(&self) -> PathBuf {
        let path = self.dir.path().join("pgwarden.toml");
        std::fs::write(&path, self.config_toml()).expect("write pgwarden.toml");
        path
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(pm) = n.postmaster.as_mut() {
                pm.stop_blocking(StopMode::Immediate, Duration::from_secs(5));
            }
        }
    }
}

/// `cp -a`: keeps owner and modes, which the data directory needs.
fn copy_dir(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("run cp");
    assert!(
        status.success(),
        "cp -a {} {} failed",
        from.display(),
        to.display()
    );
}

/// An error with the server's own message (tokio-postgres's Display says only "db error").
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => e.to_string(),
    }
}
