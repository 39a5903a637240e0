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
            let last = base as usize + opts.nodes - 1;
            if last > u16::MAX as usize {
                return Err(DemoError::PortsOutOfRange { first: base, last });
            }
            for port in base..=last as u16 {
                ensure_free(port, "a node's port", "--port-base")?;
            }
            ensure_free(proxy_port, "the proxy's port", "--proxy-port")?;
            let text = generate_config(opts, base, proxy_port);
            let tmp = self.dir.join("pgwarden.toml.tmp");
            std::fs::write(&tmp, &text).map_err(DemoError::io("cannot write", &tmp))?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                .map_err(DemoError::io("cannot set permissions on", &tmp))?;
            std::fs::rename(&tmp, &path).map_err(DemoError::io("cannot write", &path))?;
        }
        Ok(Config::load(&path)?)
    }

    fn reuse(&self, opts: &DemoOptions) -> Result<Config, DemoError> {
        let path = self.config_path();
        let config = Config::load(&path)?;
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
            return Ok(config);
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
        Ok(Config::load(&path)?)
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
    for i in 0..opts.nodes {
        s.push_str(&format!(
            "\n[[nodes]]\nname = \"n{n}\"\nhost = \"127.0.0.1\"\nport = {port}\ndata_dir = \"n{n}\"\n",
            n = i + 1,
            port = port_base as usize + i
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
