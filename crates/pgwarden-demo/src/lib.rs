//! `pgwarden demo`: a local replicated cluster for a newcomer, supervised in the foreground.
//!
//! The first run builds a primary `n1` and standbys `n2`, ... streaming from it, creates the `app`
//! database and role, and writes `DIR/pgwarden.toml` (mode 0600) with every password. Later runs
//! reuse what is in `DIR`: they start what is stopped and never initialise again. The proxy
//! serves clients on `--proxy-port` in transaction mode. The process stays in the foreground,
//! reports nodes that die, and on SIGINT/SIGTERM stops the proxy, then every node.
//!
//! # Layout
//! - [`layout`] — the demo directory, its generated config and pid file.
//! - [`bootstrap`] — building, cloning and starting the nodes.
//! - [`supervise`] — watching the postmasters, reaping orphans, shutting down.

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
    let config = layout.load_or_create(opts)?;
    supervise::enable_subreaper();
    let nodes = bootstrap::bring_up(&config).await;
    let mut nodes = match nodes {
        Ok(n) => n,
        Err((started, e)) => {
            supervise::stop_all(started).await;
            return Err(e);
        }
    };
    let primary = nodes
        .iter()
        .find(|n| n.primary)
        .map(|n| n.instance.name.clone())
        .unwrap_or_default();
    let config = Arc::new(config);
    let listen = config.proxy.listen;
    let view = pgwarden_cluster::monitor::spawn(config.clone()).await;
    let proxy = match pgwarden_proxy::Proxy::bind(config.clone(), view).await {
        Ok(p) => p,
        Err(source) => {
            supervise::stop_all(nodes).await;
            return Err(DemoError::ProxyListen { listen, source });
        }
    };
    // SIGHUP (a closed terminal, `kill -HUP`) reloads the proxy's config, as for `pgwarden
    // proxy`; it no longer ends the demo.
    let reloader = tokio::spawn(pgwarden_proxy::reload_on_sighup(proxy.shared()));
    let (stop_proxy, stopped) = tokio::sync::oneshot::channel::<()>();
    let proxy_task = tokio::spawn(proxy.serve(async move {
        let _ = stopped.await;
    }));
    println!("{}", layout::connection_info(&config, &primary));
    println!(
        "pgwarden demo ready: config={}",
        layout.config_path().display()
    );
    let result = supervise::supervise(&mut nodes).await;
    reloader.abort();
    // Clients first, then the nodes.
    let _ = stop_proxy.send(());
    if tokio::time::timeout(PROXY_STOP, proxy_task).await.is_err() {
        tracing::warn!("the proxy did not stop within {PROXY_STOP:?}");
    }
    supervise::stop_all(nodes).await;
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
