#![allow(dead_code)]

pub mod raw;

use std::net::SocketAddr;
use std::sync::Arc;

use pgwarden_config::Config;
use pgwarden_testkit::Cluster;
use tokio::sync::oneshot;
use tokio_postgres::{Client, NoTls};

pub const APP_PASSWORD: &str = "app-secret";

pub struct Setup {
    pub cluster: Cluster,
    pub addr: SocketAddr,
    pub shared: Arc<pgwarden_proxy::Shared>,
    /// The config file the proxy was started from (RELOAD reads it again).
    pub config_path: std::path::PathBuf,
    stop: Option<oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<()>>,
}

/// A cluster with role and database `app`, and a proxy in front of it. `proxy_toml` is added to
/// the `[proxy]` section.
pub async fn setup(replicas: usize, proxy_toml: &str) -> Setup {
    let cluster = Cluster::builder()
        .replicas(replicas)
        .monitor("interval", "\"200ms\"")
        .build()
        .await;
    create_app(&cluster, 0).await;
    // The replicas have the role and database before any read can be routed to them.
    for i in 1..=replicas {
        cluster.wait_replayed(i).await;
    }
    let toml = proxy_config(&cluster, proxy_toml);
    let config_path = cluster.dir().join("proxy.toml");
    std::fs::write(&config_path, &toml).expect("write the proxy config");
    let config = Arc::new(Config::load(&config_path).expect("valid proxy config"));
    let view = pgwarden_cluster::monitor::spawn(config.clone()).await;
    let proxy = pgwarden_proxy::Proxy::bind(config, view)
        .await
        .expect("bind the proxy");
    let addr = proxy.local_addr().expect("address");
    let shared = proxy.shared();
    let (tx, rx) = oneshot::channel::<()>();
    let serving = tokio::spawn(proxy.serve(async move {
        let _ = rx.await;
    }));
    Setup {
        cluster,
        addr,
        shared,
        config_path,
        stop: Some(tx),
        serving: Some(serving),
    }
}

/// A proxy started on its own (see [`start_proxy`]); stops when dropped.
pub struct Proxied {
    pub addr: SocketAddr,
    pub shared: Arc<pgwarden_proxy::Shared>,
    _stop: oneshot::Sender<()>,
}

impl Proxied {
    /// The `app` user through this proxy.
    pub async fn app(&self) -> Client {
        connect_app(self.addr)
            .await
            .expect("connect through the proxy")
    }

    pub async fn raw(&self) -> raw::Raw {
        raw::Raw::connect(self.addr, "app", APP_PASSWORD, "app", &[]).await
    }
}

/// A proxy for `cluster` with `proxy_toml` in its `[proxy]` section, routing by the views of
/// `view` (the monitor's when `None`).
pub async fn start_proxy(
    cluster: &Cluster,
    name: &str,
    proxy_toml: &str,
    view: Option<tokio::sync::watch::Receiver<Arc<pgwarden_proxy::ClusterView>>>,
) -> Proxied {
    let path = cluster.dir().join(format!("{name}.toml"));
    std::fs::write(&path, proxy_config(cluster, proxy_toml)).expect("write the proxy config");
    let config = Arc::new(Config::load(&path).expect("valid proxy config"));
    let view = match view {
        Some(v) => v,
        None => pgwarden_cluster::monitor::spawn(config.clone()).await,
    };
    let proxy = pgwarden_proxy::Proxy::bind(config, view)
        .await
        .expect("bind the proxy");
    let (tx, rx) = oneshot::channel::<()>();
    let addr = proxy.local_addr().expect("address");
    let shared = proxy.shared();
    tokio::spawn(proxy.serve(async move {
        let _ = rx.await;
    }));
    Proxied {
        addr,
        shared,
        _stop: tx,
    }
}

/// The `app` user through the proxy at `addr`.
pub async fn connect_app(addr: SocketAddr) -> Result<Client, tokio_postgres::Error> {
    let conninfo = format!(
        "host=127.0.0.1 port={} user=app password={APP_PASSWORD} dbname=app connect_timeout=10",
        addr.port()
    );
    let (client, conn) = tokio_postgres::connect(&conninfo, NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Creates role and database `app` on node `i` of `cluster`.
pub async fn create_app(cluster: &Cluster, i: usize) {
    cluster
        .execute(
            i,
            &format!("CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'"),
        )
        .await;
    cluster.execute(i, "CREATE DATABASE app OWNER app").await;
}

/// The proxy's config: the cluster's, a `[proxy]` section with `proxy_toml` in it, and the
/// `app` user.
pub fn proxy_config(cluster: &Cluster, proxy_toml: &str) -> String {
    format!(
        "{}\n[proxy]\nlisten = \"127.0.0.1:0\"\n{proxy_toml}\n[[proxy.users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n",
        cluster.config_toml()
    )
}

impl Setup {
    /// Starts the shutdown (as SIGTERM would).
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for the proxy to have stopped (after `begin_shutdown` or SHUTDOWN).
    pub async fn stopped(&mut self) {
        if let Some(h) = self.serving.take() {
            h.await.expect("serve task");
        }
    }

    pub fn conninfo(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname={db} connect_timeout=10",
            self.addr.port()
        )
    }

    pub async fn try_connect(
        &self,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<Client, tokio_postgres::Error> {
        let (client, conn) =
            tokio_postgres::connect(&self.conninfo(user, password, db), NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// The `app` user with extra connection parameters (`options='-c ...'`, `application_name=...`).
    pub async fn try_app_with(&self, extra: &str) -> Result<Client, tokio_postgres::Error> {
        let conninfo = format!("{} {extra}", self.conninfo("app", APP_PASSWORD, "app"));
        let (client, conn) = tokio_postgres::connect(&conninfo, NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    pub async fn app_with(&self, extra: &str) -> Client {
        self.try_app_with(extra)
            .await
            .expect("connect through the proxy")
    }

    /// A raw-protocol client logged in as `app`.
    pub async fn raw(&self, extra: &[(&str, &str)]) -> raw::Raw {
        raw::Raw::connect(self.addr, "app", APP_PASSWORD, "app", extra).await
    }

    /// Creates table `name` in database `app` whose rows refer to one another through a
    /// deferred foreign key: a row inserted alone fails at its commit. Returns the owner's
    /// connection.
    pub async fn deferred_table(&self, name: &str) -> Client {
        let admin = self.cluster.client_db(0, "app").await;
        admin
            .batch_execute(&format!(
                "CREATE TABLE {name} (id int PRIMARY KEY, \
                 other int REFERENCES {name} DEFERRABLE INITIALLY DEFERRED); \
                 GRANT ALL ON {name} TO app"
            ))
            .await
            .expect("table");
        admin
    }

    pub async fn app(&self) -> Client {
        self.try_connect("app", APP_PASSWORD, "app")
            .await
            .expect("connect through the proxy")
    }
}

impl Setup {
    /// Waits until the view reports every replica of the cluster with a known replay lag (the
    /// proxy takes a replica into read rotation only then).
    pub async fn replicas_reported(&self) {
        let want = self.cluster.len() - 1;
        pgwarden_testkit::eventually(
            std::time::Duration::from_secs(10),
            "replicas reported with their lag",
            || {
                let view = self.shared.topology.view();
                let n = view
                    .nodes
                    .iter()
                    .filter(|n| {
                        n.role == pgwarden_cluster::status::Role::Replica
                            && n.replay_lag_bytes.is_some()
                    })
                    .count();
                async move { (n == want).then_some(()) }
            },
        )
        .await;
    }

    /// Waits until a query starting with `prefix` runs on node 0 (`pg_stat_activity`).
    pub async fn running(&self, prefix: &str) {
        let admin = self.cluster.client(0).await;
        let sql = "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND starts_with(query, $1)";
        pgwarden_testkit::eventually(std::time::Duration::from_secs(10), prefix, || {
            let admin = &admin;
            async move {
                let n: i64 = admin.query_one(sql, &[&prefix]).await.ok()?.get(0);
                (n > 0).then_some(())
            }
        })
        .await;
    }

    /// Waits until `n` clients of the proxy wait for a server.
    pub async fn waiting(&self, n: usize) {
        use pgwarden_proxy::registry::ClientState;
        pgwarden_testkit::eventually(
            std::time::Duration::from_secs(10),
            "clients waiting",
            || {
                let count = self
                    .shared
                    .clients
                    .all()
                    .iter()
                    .filter(|c| c.state() == ClientState::Waiting)
                    .count();
                async move { (count >= n).then_some(()) }
            },
        )
        .await;
    }
}

/// Runs pgbench (libpq) against the proxy of `s` as `app`; panics if pgbench fails.
pub async fn pgbench(s: &Setup, args: &[&str]) -> String {
    pgbench_at(s.addr.port(), args).await
}

pub async fn pgbench_at(port: u16, args: &[&str]) -> String {
    let bins = pgwarden_postgres::PgBinaries::find(None).expect("PostgreSQL binaries");
    let port = port.to_string();
    let out = tokio::process::Command::new(bins.program("pgbench"))
        .args(["-h", "127.0.0.1", "-p", &port, "-U", "app", "-n"])
        .args(args)
        .arg("app")
        .env("PGPASSWORD", APP_PASSWORD)
        .output()
        .await
        .expect("run pgbench");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}
