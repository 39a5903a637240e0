//! The demo directory: `pgwarden.toml`, `demo.pid`, and one data directory per node.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pgwarden_config::Config;
use rand::distributions::{Alphanumeric, DistString};

use crate::{DemoError, DemoOptions};

pub struct Layout {
    dir: PathBuf,
}

/// Removes `demo.pid` when the demo ends.
pub struct PidFile(PathBuf);

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Layout {
    pub fn new(dir: &Path) -> Result<Self, DemoError> {
        let dir = std::path::absolute(dir).map_err(DemoError::io("cannot resolve", dir))?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("pgwarden.toml")
    }

    fn pid_path(&self) -> PathBuf {
        self.dir.join("demo.pid")
    }

    /// Creates the directory if needed and records this process as the demo running in it.
    pub fn claim(&self) -> Result<PidFile, DemoError> {
        if self.dir.exists() && !self.config_path().exists() && !is_empty_dir(&self.dir) {
            return Err(DemoError::NotADemoDir(self.dir.clone()));
        }
        std::fs::create_dir_all(&self.dir).map_err(DemoError::io("cannot create", &self.dir))?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o755))
            .map_err(DemoError::io("cannot set permissions on", &self.dir))?;
        if let Some(pid) = self.running_supervisor() {
            return Err(DemoError::AlreadyRunning {
                dir: self.dir.clone(),
                pid,
            });
        }
        let path = self.pid_path();
        std::fs::write(&path, format!("{}\n", std::process::id()))
            .map_err(DemoError::io("cannot write", &path))?;
        Ok(PidFile(path))
    }

    fn running_supervisor(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.pid_path())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        (pid != std::process::id() as i32 && alive(pid)).then_some(pid)
    }

    /// Loads `pgwarden.toml`, writing it first (mode 0600, fresh passwords) on the first run,
    /// once every port it names is known to be free. A later run keeps the nodes' ports (a
    /// standby's `primary_conninfo` names its primary's) and takes a new `--proxy-port`.
    pub fn load_or_create(&self, opts: &DemoOptions) -> Result<Config, DemoError> {
        let path = self.config_path();
        if path.exists() {
            return self.reuse(opts);
        }
        {
            let base = opts.port_base.unwrap_or(crate::DEFAULT_PORT_BASE);
            let proxy_port = opts.proxy_port.unwrap_or(crate::DEFAULT_PROXY_PORT);
            // Nodes, then their agents' APIs, then etcd's client and peer ports.
            let last = base as usize + ports_used(opts.nodes) - 1;
            if last > u16::MAX as usize {
                return Err(DemoError::PortsOutOfRange { first: base, last });
            }
            for port in base..=last as u16 {
                ensure_free(port, "a node's, agent's or etcd's port", "--port-base")?;
            }
            ensure_free(proxy_port, "the proxy's port", "--proxy-port")?;
            let text = generate_config(opts, base, proxy_port);
            let tmp = self.dir.join("pgwarden.toml.tmp");
            std::fs::write(&tmp, &text).map_err(DemoError::io("cannot write", &tmp))?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                .map_err(DemoError::io("cannot set permissions on", &tmp))?;
            std::fs::rename(&tmp, &path).map_err(DemoError::io("cannot write", &path))?;
        }
        self.ensure_dcs(opts)
    }

    /// `--dcs etcd` puts a `[dcs]` section naming the demo's etcd into the config; a demo
    /// whose config has one runs on etcd from then on.
    fn ensure_dcs(&self, opts: &DemoOptions) -> Result<Config, DemoError> {
        let path = self.config_path();
        let config = Config::load(&path)?;
        match (opts.dcs, config.dcs.is_some()) {
            (Some(crate::Dcs::Etcd), false) => {
                let (client, _) = etcd_ports(&config);
                let mut text =
                    std::fs::read_to_string(&path).map_err(DemoError::io("cannot read", &path))?;
                text.push_str(&format!(
                    "\n# The demo's own etcd (pgwarden demo --dcs etcd).\n[dcs]\nendpoints = [\"127.0.0.1:{client}\"]\nnamespace = \"pgwarden\"\n"
                ));
                self.write(&text)?;
                Ok(Config::load(&path)?)
            }
            (Some(crate::Dcs::Memory), true) => Err(DemoError::Cluster(format!(
                "this demo runs on etcd ({} has a [dcs] section); remove it to use the in-process store",
                path.display()
            ))),
            _ => Ok(config),
        }
    }

    /// A demo made before the HA agents has no agent API addresses: each node gets the port
    /// after the nodes' (the file is rewritten, without its comments).
    fn add_agent_apis(&self, config: &Config) -> Result<(), DemoError> {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).map_err(DemoError::io("cannot read", &path))?;
        let mut doc: toml::Table = text
            .parse()
            .map_err(|e| DemoError::Cluster(format!("{}: {e}", path.display())))?;
        let base = config
            .nodes
            .first()
            .map_or(crate::DEFAULT_PORT_BASE, |n| n.port);
        let count = config.nodes.len();
        if let Some(nodes) = doc.get_mut("nodes").and_then(|n| n.as_array_mut()) {
            for (i, n) in nodes.iter_mut().enumerate() {
                if let Some(t) = n.as_table_mut() {
                    let port = base as usize + count + i;
                    t.entry("api")
                        .or_insert_with(|| toml::Value::String(format!("127.0.0.1:{port}")));
                }
            }
        }
        let text = toml::to_string(&doc)
            .map_err(|e| DemoError::Cluster(format!("cannot write {}: {e}", path.display())))?;
        tracing::info!("added agent API addresses to {}", path.display());
        self.write(&text)
    }

    fn write(&self, text: &str) -> Result<(), DemoError> {
        let path = self.config_path();
        let tmp = self.dir.join("pgwarden.toml.tmp");
        std::fs::write(&tmp, text).map_err(DemoError::io("cannot write", &tmp))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(DemoError::io("cannot set permissions on", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(DemoError::io("cannot write", &path))
    }

    fn reuse(&self, opts: &DemoOptions) -> Result<Config, DemoError> {
        let path = self.config_path();
        let mut config = Config::load(&path)?;
        if config.nodes.iter().any(|n| n.api.is_none()) {
            self.add_agent_apis(&config)?;
            config = Config::load(&path)?;
        }
        let first = config.nodes.first().map_or(0, |n| n.port);
        let last = config.nodes.last().map_or(0, |n| n.port);
        if let Some(asked) = opts.port_base.filter(|&b| b != first) {
            return Err(DemoError::PortsFixed {
                dir: self.dir.clone(),
                first,
                last,
                asked,
            });
        }
        let current = config.proxy.listen;
        let Some(port) = opts.proxy_port.filter(|&p| p != current.port()) else {
            return self.ensure_dcs(opts);
        };
        ensure_free(port, "the proxy's port", "--proxy-port")?;
        let text = std::fs::read_to_string(&path).map_err(DemoError::io("cannot read", &path))?;
        let old = format!("listen = \"{current}\"");
        let new = format!("listen = \"127.0.0.1:{port}\"");
        let tmp = self.dir.join("pgwarden.toml.tmp");
        std::fs::write(&tmp, text.replacen(&old, &new, 1))
            .map_err(DemoError::io("cannot write", &tmp))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(DemoError::io("cannot set permissions on", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(DemoError::io("cannot write", &path))?;
        tracing::info!(port, "the proxy's port changed (--proxy-port)");
        self.ensure_dcs(opts)
    }

    /// Stops the supervisor (which stops its nodes), then any postmaster still running from a
    /// data directory here, then removes the directory.
    pub async fn destroy(&self) -> Result<(), DemoError> {
        let config_path = self.config_path();
        if !config_path.exists() && !is_empty_dir(&self.dir) {
            return Err(DemoError::NotADemoDir(self.dir.clone()));
        }
        if let Some(pid) = self.running_supervisor() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            wait_gone(pid, Duration::from_secs(15)).await;
        }
        if let Ok(config) = Config::load(&config_path) {
            for node in &config.nodes {
                let Some(dir) = &node.data_dir else { continue };
                if let Some(pid) = postmaster_pid(dir).filter(|&p| alive(p)) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
                    if !wait_gone(pid, Duration::from_secs(10)).await {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                        wait_gone(pid, Duration::from_secs(5)).await;
                    }
                }
            }
        }
        std::fs::remove_dir_all(&self.dir).map_err(DemoError::io("cannot remove", &self.dir))
    }
}

/// Whether `port` can be listened on at 127.0.0.1 now.
fn ensure_free(port: u16, what: &'static str, option: &'static str) -> Result<(), DemoError> {
    match std::net::TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            Err(DemoError::PortInUse { port, what, option })
        }
        // Anything else (no permission for a low port, ...) shows when the server starts.
        Err(_) => Ok(()),
    }
}

fn generate_config(opts: &DemoOptions, port_base: u16, proxy_port: u16) -> String {
    let pw = || Alphanumeric.sample_string(&mut rand::thread_rng(), 24);
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut s = format!(
        "# A local demo cluster, written by `pgwarden demo`. Holds passwords: keep it 0600.\n\
         cluster = \"demo\"\n\n\
         [postgres]\nos_user = \"postgres\"\nsuperuser = \"postgres\"\nsuperuser_password = {}\n\
         replication_user = \"replicator\"\nreplication_password = {}\n\
         parameters = {{ shared_buffers = \"128MB\", max_connections = 100 }}\n\n\
         [replication]\nmode = \"{}\"\nsync_count = 1\n\n\
         [monitor]\ninterval = \"1s\"\ntimeout = \"2s\"\nlag_medium = \"10MB\"\nlag_high = \"100MB\"\n",
        q(&pw()),
        q(&pw()),
        opts.replication,
    );
    s.push_str(
        "\n# The HA agents' rules (the defaults, spelled out).\n[agent]\nttl = \"7s\"\nloop_wait = \"1s\"\n\
         retry_timeout = \"1s\"\nfence_margin = \"2s\"\nprimary_restart_timeout = \"5s\"\n",
    );
    for i in 0..opts.nodes {
        s.push_str(&format!(
            "\n[[nodes]]\nname = \"n{n}\"\nhost = \"127.0.0.1\"\nport = {port}\ndata_dir = \"n{n}\"\napi = \"127.0.0.1:{api}\"\n",
            n = i + 1,
            port = port_base as usize + i,
            api = port_base as usize + opts.nodes + i
        ));
    }
    s.push_str(&format!(
        "\n[proxy]\nlisten = \"127.0.0.1:{port}\"\npool_mode = \"transaction\"\n\
         # In the demo the app user may use the admin console (database `pgwarden`) too.\n\
         admin_users = [\"admin\", \"app\"]\n\
         \n[[proxy.users]]\nname = \"app\"\npassword = {app}\n\
         \n[[proxy.users]]\nname = \"admin\"\npassword = {admin}\n",
        port = proxy_port,
        app = q(&pw()),
        admin = q(&pw()),
    ));
    s
}

/// How to connect, for the newcomer.
pub fn connection_info(config: &Config, primary: &str) -> String {
    let mut out = String::from("Connect:\n");
    let app = config.users.iter().find(|u| u.name == "app");
    for n in &config.nodes {
        let role = if n.name == primary {
            "primary, read-write"
        } else {
            "standby, read-only"
        };
        if let Some(app) = app {
            out.push_str(&format!(
                "  {} ({role}): postgresql://app:{}@{}/app\n",
                n.name,
                app.password.expose(),
                n.address()
            ));
        }
    }
    if let Some(p) = config.node(primary) {
        out.push_str(&format!(
            "  superuser: postgresql://{}:{}@{}/postgres\n",
            config.postgres.superuser,
            config.postgres.superuser_password.expose(),
            p.address()
        ));
    }
    let proxy = config.proxy.listen;
    if let Some(app) = app {
        out.push_str(&format!(
            "  proxy ({} pooling, writes to the primary): postgresql://app:{}@{proxy}/app\n",
            config.proxy.pool_mode,
            app.password.expose(),
        ));
    }
    if let Some(admin) = config
        .users
        .iter()
        .find(|u| config.proxy.admin_users.contains(&u.name))
    {
        out.push_str(&format!(
            "  proxy admin console: postgresql://{}:{}@{proxy}/pgwarden (SHOW POOLS, SHOW HELP)\n",
            admin.name,
            admin.password.expose(),
        ));
    }
    if let Some(src) = &config.source {
        out.push_str(&format!("Status: pgwarden status -c {}\n", src.display()));
    }
    out
}

/// How many ports from `--port-base` a demo of `nodes` nodes takes.
fn ports_used(nodes: usize) -> usize {
    nodes * 2 + 2
}

/// The demo etcd's client and peer ports: after the nodes' and the agents'.
pub fn etcd_ports(config: &Config) -> (u16, u16) {
    let base = config
        .nodes
        .first()
        .map_or(crate::DEFAULT_PORT_BASE, |n| n.port);
    let client = base + (config.nodes.len() * 2) as u16;
    (client, client + 1)
}

fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|mut d| d.next().is_none())
        .unwrap_or(false)
}

fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` runs (a zombie, which only waits for its parent to reap it, does not).
fn alive(pid: i32) -> bool {
    if pid <= 0 || kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => true,
    }
}

async fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    !alive(pid)
}
