//! One local data directory and the operations on it.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::conf::{self, Settings};
use crate::error::PgError;
use crate::exec;
use crate::process::Postmaster;
use crate::PgEnv;

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

/// Credentials a standby uses to stream from its upstream.
#[derive(Debug, Clone)]
pub struct ReplicationLogin<'a> {
    pub user: &'a str,
    pub password: &'a str,
}

/// A PostgreSQL instance managed on this host: a data directory and the node-specific settings
/// passed on the command line.
#[derive(Debug, Clone)]
pub struct Instance {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub data_dir: PathBuf,
    env: PgEnv,
    /// When false, initdb and pg_basebackup skip fsync (test clusters only).
    durable: bool,
    /// When true, the postmaster gets SIGQUIT (immediate shutdown) if the thread that started it
    /// dies, so a killed test or demo leaves no server behind.
    die_with_parent: bool,
}

/// Where the servers' Unix sockets go.
pub const SOCKET_DIR: &str = "/tmp";

const INCLUDE_LINE: &str = "include 'pgwarden.conf'\n";

impl Instance {
    pub fn new(env: PgEnv, name: &str, host: &str, port: u16, data_dir: &Path) -> Self {
        Self {
            name: name.to_string(),
            host: host.to_string(),
            port,
            data_dir: data_dir.to_path_buf(),
            env,
            durable: true,
            die_with_parent: false,
        }
    }

    /// Skips fsync in initdb and pg_basebackup: for throwaway test clusters only.
    pub fn non_durable(mut self) -> Self {
        self.durable = false;
        self
    }

    /// Ties the server's life to the starting thread's (see `prctl(PR_SET_PDEATHSIG)`): for
    /// processes that own their servers outright. The HA agent uses it on purpose: a server
    /// whose agent died must not go on taking writes while its lease runs out, so an agent's
    /// death is its server's death (and the replicas see both gone at once).
    pub fn die_with_parent(mut self) -> Self {
        self.die_with_parent = true;
        self
    }

    pub fn env(&self) -> &PgEnv {
        &self.env
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            host: self.host.clone(),
            port: self.port,
        }
    }

    pub fn is_initialised(&self) -> bool {
        self.data_dir.join("PG_VERSION").is_file()
    }

    pub fn is_standby(&self) -> bool {
        self.data_dir.join("standby.signal").exists()
    }

    /// Runs initdb: data checksums, SCRAM authentication, UTF8, C locale.
    pub async fn initdb(&self, superuser: &str, password: &str) -> Result<(), PgError> {
        if self.is_initialised() {
            return Err(PgError::AlreadyInitialised(self.data_dir.clone()));
        }
        self.env.run_as.create_dir(&self.data_dir, 0o700)?;
        // The password file must be readable by the PostgreSQL user and never left behind.
        let pw_dir = tempfile::Builder::new()
            .prefix("pgwarden-initdb")
            .tempdir()
            .map_err(PgError::io(
                "cannot create a temporary directory in",
                std::env::temp_dir(),
            ))?;
        self.env.run_as.chown(pw_dir.path())?;
        let pw_file = pw_dir.path().join("pw");
        self.env.run_as.write_file(&pw_file, password, 0o600)?;
        let data = self.data_dir.to_string_lossy();
        let pw_arg = format!("--pwfile={}", pw_file.display());
        let mut args = vec![
            "-D",
            &data,
            "-U",
            superuser,
            &pw_arg,
            "--auth=scram-sha-256",
            "--data-checksums",
            "--encoding=UTF8",
            "--locale=C",
        ];
        if !self.durable {
            args.push("--no-sync");
        }
        exec::run(
            &self.env.bins.program("initdb"),
            &args,
            &[],
            self.env.run_as,
            Duration::from_secs(120),
        )
        .await?;
        Ok(())
    }

    /// Writes `pgwarden.conf` and `pg_hba.conf` and makes `postgresql.conf` include the former.
    pub fn configure(&self, settings: &Settings, replication_user: &str) -> Result<(), PgError> {
        if !self.is_initialised() {
            return Err(PgError::NotInitialised(self.data_dir.clone()));
        }
        let run_as = self.env.run_as;
        run_as.write_file(
            &self.data_dir.join("pgwarden.conf"),
            &settings.render(),
            0o600,
        )?;
        run_as.write_file(
            &self.data_dir.join("pg_hba.conf"),
            &conf::hba(replication_user),
            0o600,
        )?;
        let main_conf = self.data_dir.join("postgresql.conf");
        let text =
            std::fs::read_to_string(&main_conf).map_err(PgError::io("cannot read", &main_conf))?;
        if !text.lines().any(|l| l.trim() == INCLUDE_LINE.trim()) {
            let mut text = text;
            if !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(INCLUDE_LINE);
            run_as.write_file(&main_conf, &text, 0o600)?;
        }
        Ok(())
    }

    /// Clones this instance from `upstream` with `pg_basebackup -X stream -c fast`, creating the
    /// physical replication slot `slot` on the upstream (or reusing it if it exists), and makes it
    /// a standby that streams from `upstream` through that slot.
    pub async fn clone_from(
        &self,
        upstream: &Endpoint,
        login: &ReplicationLogin<'_>,
        slot: &str,
        timeout: Duration,
    ) -> Result<(), PgError> {
        if self.is_initialised() {
            return Err(PgError::AlreadyInitialised(self.data_dir.clone()));
        }
        self.env.run_as.create_dir(&self.data_dir, 0o700)?;
        let result = self.base_backup(upstream, login, slot, true, timeout).await;
        let result = match result {
            Err(PgError::Command { stderr, .. }) if stderr.contains("already exists") => {
                self.empty_data_dir()?;
                self.base_backup(upstream, login, slot, false, timeout)
                    .await
            }
            other => other,
        };
        if let Err(e) = result {
            // Leave no half-copied directory behind: the next attempt would refuse it.
            let _ = self.empty_data_dir();
            return Err(e);
        }
        self.forget_upstream_files()?;
        self.follow(upstream, login, slot)
    }

    async fn base_backup(
        &self,
        upstream: &Endpoint,
        login: &ReplicationLogin<'_>,
        slot: &str,
        create_slot: bool,
        timeout: Duration,
    ) -> Result<(), PgError> {
        let data = self.data_dir.to_string_lossy();
        let port = upstream.port.to_string();
        let mut args = vec![
            "-D",
            &data,
            "-h",
            &upstream.host,
            "-p",
            &port,
            "-U",
            login.user,
            "-X",
            "stream",
            "-c",
            "fast",
            "-S",
            slot,
            "-w",
        ];
        if create_slot {
            args.push("-C");
        }
        if !self.durable {
            args.push("--no-sync");
        }
        exec::run(
            &self.env.bins.program("pg_basebackup"),
            &args,
            &[("PGPASSWORD", login.password), ("PGAPPNAME", &self.name)],
            self.env.run_as,
            timeout,
        )
        .await
        .map(|_| ())
    }

    /// Points this standby at `upstream`: `standby.signal`, `primary_conninfo` and
    /// `primary_slot_name` (in `postgresql.auto.conf`, where `ALTER SYSTEM` would put them).
    pub fn follow(
        &self,
        upstream: &Endpoint,
        login: &ReplicationLogin<'_>,
        slot: &str,
    ) -> Result<(), PgError> {
        let run_as = self.env.run_as;
        run_as.write_file(&self.data_dir.join("standby.signal"), "", 0o600)?;
        let conninfo = format!(
            "host={} port={} user={} password={} application_name={}",
            conf::conninfo_value(&upstream.host),
            upstream.port,
            conf::conninfo_value(login.user),
            conf::conninfo_value(login.password),
            conf::conninfo_value(&self.name),
        );
        let auto = self.data_dir.join("postgresql.auto.conf");
        let old = std::fs::read_to_string(&auto).unwrap_or_default();
        let mut text: String = old
            .lines()
            .filter(|l| {
                let key = l.split('=').next().unwrap_or("").trim();
                key != "primary_conninfo" && key != "primary_slot_name"
            })
            .map(|l| format!("{l}\n"))
            .collect();
        text.push_str(&format!(
            "primary_conninfo = {}\n",
            conf::conf_literal(&conninfo)
        ));
        text.push_str(&format!(
            "primary_slot_name = {}\n",
            conf::conf_literal(slot)
        ));
        run_as.write_file(&auto, &text, 0o600)
    }

    /// The `host` and `port` of this standby's `primary_conninfo`, if it has one.
    pub fn upstream(&self) -> Option<(String, u16)> {
        let text = std::fs::read_to_string(self.data_dir.join("postgresql.auto.conf")).ok()?;
        let line = text
            .lines()
            .find(|l| l.split('=').next().unwrap_or("").trim() == "primary_conninfo")?;
        let value = line.split_once('=')?.1;
        let word = |key: &str| {
            value
                .split_whitespace()
                .find_map(|w| w.trim_matches('\'').strip_prefix(&format!("{key}=")))
                .map(|v| v.trim_matches('\'').to_string())
        };
        Some((word("host")?, word("port")?.parse().ok()?))
    }

    /// Makes this stopped data directory a copy of `source`'s timeline with `pg_rewind`
    /// (which first finishes crash recovery if the server did not stop cleanly), then points
    /// it at `source` as a standby through `slot`.
    pub async fn rewind_from(
        &self,
        source: &Endpoint,
        superuser: &ReplicationLogin<'_>,
        replication: &ReplicationLogin<'_>,
        slot: &str,
        timeout: Duration,
    ) -> Result<(), PgError> {
        let data = self.data_dir.to_string_lossy();
        let server = format!(
            "host={} port={} user={} dbname=postgres",
            conf::conninfo_value(&source.host),
            source.port,
            conf::conninfo_value(superuser.user),
        );
        let target = format!("--target-pgdata={data}");
        let source_arg = format!("--source-server={server}");
        let mut args = vec![target.as_str(), source_arg.as_str()];
        if !self.durable {
            args.push("--no-sync");
        }
        exec::run(
            &self.env.bins.program("pg_rewind"),
            &args,
            &[
                ("PGPASSWORD", superuser.password),
                ("PGAPPNAME", &self.name),
            ],
            self.env.run_as,
            timeout,
        )
        .await?;
        self.forget_upstream_files()?;
        self.follow(source, replication, slot)
    }

    /// Removes everything in the data directory (before a new clone).
    pub fn remove_data(&self) -> Result<(), PgError> {
        if self.data_dir.is_dir() {
            self.empty_data_dir()?;
        }
        Ok(())
    }

    /// A base backup copies the upstream's logs and socket lock files; they are not ours.
    fn forget_upstream_files(&self) -> Result<(), PgError> {
        let log_dir = self.data_dir.join("log");
        if let Ok(entries) = std::fs::read_dir(&log_dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        if let Ok(entries) = std::fs::read_dir(&self.data_dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(".s.PGSQL.") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    fn empty_data_dir(&self) -> Result<(), PgError> {
        let entries = std::fs::read_dir(&self.data_dir)
            .map_err(PgError::io("cannot read", &self.data_dir))?;
        for e in entries.flatten() {
            let p = e.path();
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.map_err(PgError::io("cannot remove", &p))?;
        }
        Ok(())
    }

    /// Spawns `postgres` as a direct child. Node-specific settings go on its command line.
    /// Returns at once; call [`Postmaster::wait_ready`] to wait for connections to be accepted.
    pub fn spawn(&self) -> Result<Postmaster, PgError> {
        if !self.is_initialised() {
            return Err(PgError::NotInitialised(self.data_dir.clone()));
        }
        let log_dir = self.data_dir.join("log");
        self.env.run_as.create_dir(&log_dir, 0o700)?;
        let startup_log = log_dir.join("startup.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&startup_log)
            .map_err(PgError::io("cannot open", &startup_log))?;
        self.env.run_as.chown(&startup_log)?;
        let log_err = log
            .try_clone()
            .map_err(PgError::io("cannot open", &startup_log))?;
        let mut cmd = std::process::Command::new(self.env.bins.program("postgres"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-c")
            .arg(format!("port={}", self.port))
            .arg("-c")
            .arg(format!("cluster_name={}", self.name))
            .arg("-c")
            .arg(format!("listen_addresses={}", self.host))
            // Not in the data directory: pg_rewind copies every file there and fails on a
            // socket. `/tmp/.s.PGSQL.<port>` is PostgreSQL's own default.
            .arg("-c")
            .arg(format!("unix_socket_directories={SOCKET_DIR}"))
            .env("LC_ALL", "C")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        self.env.run_as.apply_std(&mut cmd);
        // Its own process group: a terminal's Ctrl-C reaches its owner, which stops it in
        // order, and orphaned backends are told apart from programs run and waited for.
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        if self.die_with_parent {
            set_parent_death_signal(&mut cmd);
        }
        let child = cmd.spawn().map_err(PgError::io(
            "cannot start",
            self.env.bins.program("postgres"),
        ))?;
        tracing::info!(node = %self.name, pid = child.id(), port = self.port, "postgres started");
        Ok(Postmaster::new(child, self.data_dir.clone()))
    }

    /// Spawns and waits until connections are accepted; on failure the server is stopped.
    pub async fn start(&self, timeout: Duration) -> Result<Postmaster, PgError> {
        let mut pm = self.spawn()?;
        if let Err(e) = pm.wait_ready(timeout).await {
            pm.stop(crate::StopMode::Immediate, Duration::from_secs(5))
                .await;
            return Err(e);
        }
        Ok(pm)
    }
}

/// The last `n` lines of the server's logs (startup output, then the newest log file), on one line.
pub fn log_tail(data_dir: &Path, n: usize) -> String {
    let log_dir = data_dir.join("log");
    let newest = std::fs::read_dir(&log_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("postgresql-"))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
    let mut text = std::fs::read_to_string(log_dir.join("startup.log")).unwrap_or_default();
    if let Some(e) = newest {
        text.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
    }
    let tail = exec::last_lines(&text, n);
    if tail.is_empty() {
        format!("(nothing in {})", log_dir.display())
    } else {
        tail
    }
}

fn set_parent_death_signal(cmd: &mut std::process::Command) {
    parent_death_signal(cmd, nix::sys::signal::Signal::SIGQUIT);
}

/// `cmd`'s process gets `signal` when the thread that starts it dies (`PR_SET_PDEATHSIG`),
/// and does not start at all if that thread is already gone.
#[allow(unsafe_code)]
pub fn parent_death_signal(cmd: &mut std::process::Command, signal: nix::sys::signal::Signal) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as i32;
    // SAFETY: the closure runs in the forked child before exec and only makes two syscalls
    // (prctl, getppid), both async-signal-safe; it allocates nothing and takes no locks. It runs
    // after the uid switch, which would otherwise clear the setting.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(signal)?;
            // The parent may have died between fork and prctl.
            if nix::unistd::getppid().as_raw() != parent {
                return Err(std::io::Error::other(
                    "parent exited before postgres started",
                ));
            }
            Ok(())
        });
    }
}
