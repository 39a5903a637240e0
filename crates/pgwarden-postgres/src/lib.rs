//! Running local PostgreSQL: finding its binaries, initdb, the config files a replicated cluster
//! needs, starting `postgres` as a supervised direct child, stopping it, cloning a standby with
//! `pg_basebackup`, and running every PostgreSQL program as the `postgres` OS user when pgwarden
//! itself runs as root.
//!
//! This crate carries out what it is told; it never decides which node should be a primary.
//!
//! # Layout
//! - [`bins`] — [`PgBinaries`], where the server programs are and which major version they are.
//! - [`user`] — [`RunAs`], the OS user PostgreSQL runs as, and directories created for it.
//! - [`conf`] — [`Settings`], the generated `pgwarden.conf`, `pg_hba.conf` and standby settings.
//! - [`instance`] — [`Instance`], one data directory: initdb, configure, clone, start.
//! - [`control`] — [`ControlData`]: how a stopped data directory last stopped (`pg_controldata`).
//! - [`process`] — [`Postmaster`], the running server: readiness, stop, kill, exit.
//! - [`sql`] — connecting with `tokio-postgres`, quoting, and the role set-up statements.
//! - [`error`] — [`PgError`].

pub mod bins;
pub mod conf;
pub mod control;
pub mod error;
pub mod instance;
pub mod process;
pub mod sql;
pub mod user;

mod exec;

pub use bins::PgBinaries;
pub use conf::{Settings, SyncStandbys};
pub use control::ControlData;
pub use error::PgError;
pub use instance::{log_tail, parent_death_signal, Endpoint, Instance, ReplicationLogin};
pub use process::{become_subreaper, reap_orphans, Postmaster, StopMode};
pub use user::RunAs;

/// Everything needed to run PostgreSQL programs on this host.
#[derive(Debug, Clone)]
pub struct PgEnv {
    pub bins: PgBinaries,
    pub run_as: RunAs,
}

impl PgEnv {
    /// Finds the binaries and resolves the OS user (only switched to when running as root).
    pub fn discover(bin_dir: Option<&std::path::Path>, os_user: &str) -> Result<Self, PgError> {
        Ok(Self {
            bins: PgBinaries::find(bin_dir)?,
            run_as: RunAs::for_os_user(os_user)?,
        })
    }
}
