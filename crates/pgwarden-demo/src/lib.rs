//! `pgwarden demo`: a local HA cluster for a newcomer, supervised in the foreground.
//!
//! An HA agent runs per node: by default all in this process on the in-process store; with
//! `--dcs etcd`, a local etcd and one `pgwarden agent` process per node, so a node can be killed
//! for real. The agents build the cluster (the first initialises `n1`, the others clone from the
//! leader); the demo creates the `app` database and role and writes `DIR/pgwarden.toml` (mode
//! 0600) with every password. Later runs reuse what is in `DIR` and never initialise again. The
//! proxy follows the store and serves clients on `--proxy-port` in transaction mode. The
//! process stays in the foreground and prints what happens (a server that dies, a failover, how
//! long the cluster took to heal); on SIGINT/SIGTERM it stops the proxy, then the agents, which
//! stop their nodes.
//!
//! # Layout
//! - [`layout`] — the demo directory, its generated config and pid file.
//! - [`bootstrap`] — the agents (in this process, or as processes with etcd) and the roles.
//! - [`supervise`] — watching the store and printing what changed.

pub mod bootstrap;
pub mod layout;
pub mod supervise;

use std::path::PathBuf;
use std::sync::Arc;

use pgwarden_config::ReplicationMode;

/// The first node's port when `--port-base` is not given.
pub const DEFAULT_PORT_BASE: u16 = 55432;
/// The proxy's port when `--proxy-port` is not given.
pub const DEFAULT_PROXY_PORT: u16 = 6432;

/// `pgwarden demo` arguments. Ports left `None` take the defaults on a first run and the
/// existing demo's on a later one.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub dir: PathBuf,
    pub nodes: usize,
    pub port_base: Option<u16>,
    pub replication: ReplicationMode,
    pub proxy_port: Option<u16>,
    /// The agents' store: `None` keeps the demo's (in-process unless its config has `[dcs]`).
    pub dcs: Option<Dcs>,
}

/// `--dcs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dcs {
    /// Every agent in the demo's process, on the in-process store.
    Memory,
    /// A local etcd and one `pgwarden agent` process per node.
    Etcd,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Postgres(#[from] pgwarden_postgres::PgError),
    #[error(transparent)]
    Config(#[from] pgwarden_config::ConfigError),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a demo is already running in {} (pid {pid})", dir.display())]
    AlreadyRunning { dir: PathBuf, pid: i32 },
    #[error("{} exists but is not a pgwarden demo directory (no pgwarden.toml); refusing to touch it", .0.display())]
    NotADemoDir(PathBuf),
    #[error("ports {first}-{last} do not fit below 65536; use a smaller --port-base")]
    PortsOutOfRange { first: u16, last: usize },
    #[error("port {port} on 127.0.0.1 is in use ({what}); choose another with {option}")]
    PortInUse {
        port: u16,
        what: &'static str,
        option: &'static str,
    },
    #[error("the demo in {} runs its nodes on ports {first}-{last}; --port-base {asked} would need a new cluster: leave --port-base out, or remove this one first (pgwarden demo --destroy --dir {})", dir.display(), dir.display())]
    PortsFixed {
        dir: PathBuf,
        first: u16,
        last: u16,
        asked: u16,
    },
    #[error("{0}")]
    Cluster(String),
    #[error("cannot wait for signals: {0}")]
    Signals(#[source] std::io::Error),
    #[error("the proxy cannot start on {listen}: {source} (choose another port with --proxy-port, or edit [proxy] in the config)")]
    ProxyListen {
        listen: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl DemoError {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> DemoError {
        let path = path.into();
        move |source| DemoError::Io { what, path, source }
    }
}

/// Runs the demo until SIGINT or SIGTERM.
pub async fn run(opts: &DemoOptions) -> Result<(), DemoError> {
    let layout = layout::Layout::new(&opts.dir)?;
    let _pid_file = layout.claim()?;
    let config = Arc::new(layout.load_or_create(opts)?);
    pgwarden_postgres::become_subreaper();
    let mut stop = supervise::stop_signal()?;
    let start = async {
        if config.dcs.is_some() {
            bootstrap::processes(&config, layout.dir(), layout::etcd_ports(&config)).await
        } else {
            bootstrap::in_process(&config).await
        }
    };
    // Interrupted this early, the agents started so far go with this process (their servers
    // and agent processes have a parent-death signal).
    let (mut agents, store) = tokio::select! {
        r = start => r?,
        _ = stop.changed() => {
            return Err(DemoError::Cluster("interrupted while the agents started".into()))
        }
    };
    // A signal while the cluster comes up stops it as cleanly as one later.
    let result = tokio::select! {
        r = serve(&config, &layout, &store, &mut agents, stop.clone()) => r,
        _ = stop.changed() => Ok(()),
    };
    agents.stop().await;
    result
}

/// Once the cluster is ready: the roles, the proxy, and the watch until a signal.
async fn serve(
    config: &Arc<pgwarden_config::Config>,
    layout: &layout::Layout,
    store: &bootstrap::Store,
    agents: &mut bootstrap::Agents,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), DemoError> {
    let leader = bootstrap::ready(store, config.nodes.len()).await?;
    bootstrap::set_up_roles(config, &leader).await?;
    let listen = config.proxy.listen;
    let view = store
        .view(config.agent.loop_wait, config.agent.fence_margin)
        .await;
    let proxy = pgwarden_proxy::Proxy::bind(config.clone(), view)
        .await
        .map_err(|source| DemoError::ProxyListen { listen, source })?;
    // SIGHUP (a closed terminal, `kill -HUP`) reloads the proxy's config, as for `pgwarden
    // proxy`; it does not end the demo.
    let reloader = tokio::spawn(pgwarden_proxy::reload_on_sighup(proxy.shared()));
    let (stop_proxy, stopped) = tokio::sync::oneshot::channel::<()>();
    let proxy_task = tokio::spawn(proxy.serve(async move {
        let _ = stopped.await;
    }));
    println!("{}", layout::connection_info(config, &leader));
    println!(
        "Try a failover: kill -9 the leader's postgres (its pid is the first line of {}/postmaster.pid){}",
        config
            .node(&leader)
            .and_then(|n| n.data_dir.as_ref())
            .map_or(String::new(), |d| d.display().to_string()),
        if config.dcs.is_some() {
            ", or its agent (pid above)"
        } else {
            ""
        }
    );
    println!(
        "pgwarden demo ready: config={}",
        layout.config_path().display()
    );
    let result = supervise::supervise(store, agents, &mut stop).await;
    reloader.abort();
    // Clients first, then the agents (and with them the nodes).
    let _ = stop_proxy.send(());
    if tokio::time::timeout(PROXY_STOP, proxy_task).await.is_err() {
        tracing::warn!("the proxy did not stop within {PROXY_STOP:?}");
    }
    result
}

/// How long the proxy gets to finish running transactions when the demo stops; the nodes'
/// shutdown follows, all within the 10 s a stop may take.
const PROXY_STOP: std::time::Duration = std::time::Duration::from_secs(3);

/// Stops the demo in `opts.dir` (its supervisor and any node still running) and removes the dir.
pub async fn destroy(opts: &DemoOptions) -> Result<(), DemoError> {
    let layout = layout::Layout::new(&opts.dir)?;
    if !layout.dir().exists() {
        println!(
            "nothing to destroy: {} does not exist",
            layout.dir().display()
        );
        return Ok(());
    }
    layout.destroy().await?;
    println!("destroyed {}", layout.dir().display());
    Ok(())
}
