//! `pgwarden.toml`: the file schema and the validated runtime configuration.
//!
//! Two layers: [`file`] is what serde reads, with every leaf wrapped so that a wrong type is
//! recorded instead of aborting the parse; [`validate`] turns it into [`Config`], collecting every
//! problem with its field path (`nodes[1].port: must be between 1 and 65535`). Unknown keys are
//! errors too, all of them reported in the same pass.
//!
//! This crate reads the config file and the password files it names; it never reaches the network.
//!
//! # Layout
//! - [`file`] — the serde structs (`FileConfig` and its sections).
//! - [`model`] — the validated types ([`Config`], [`NodeConfig`], [`ReplicationMode`], ...).
//! - [`validate`] — file -> model, every error at once (`validate_proxy` for `[proxy]`,
//!   `validate_agent` for `[agent]` and `[dcs]`).
//! - [`error`] — [`ConfigError`] and [`FieldError`].

pub mod dynamic;
pub mod error;
pub mod file;
pub mod model;
pub mod validate;
mod validate_agent;
mod validate_proxy;

pub use error::{ConfigError, FieldError};
pub use model::{
    AgentConfig, AuthConfig, AuthMethod, AuthRule, Balance, Cidr, ClientTlsConfig, Config,
    Consistency, DcsConfig, FollowPromotions, MonitorConfig, NodeConfig, OnPostgresCrash, PoolMode,
    PostgresConfig, PrimaryReads, ProxyConfig, RejoinMode, ReplicationConfig, ReplicationMode,
    RoutingConfig, Secret, SynchronousMode, TlsMode, UserConfig,
};

use std::path::{Path, PathBuf};

/// The file name looked for in the working directory when no `-c` is given.
pub const DEFAULT_FILE: &str = "pgwarden.toml";
/// The environment variable naming the config file when no `-c` is given.
pub const ENV_VAR: &str = "PGWARDEN_CONFIG";

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::from_toml(&text, &base).map(|mut c| {
            c.source = Some(path.to_path_buf());
            c
        })
    }

    /// Parses and validates config text; relative paths in it are taken from `base_dir`.
    pub fn from_toml(text: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let (file, unknown) = file::parse(text)?;
        validate::validate(file, unknown, base_dir).map_err(ConfigError::Invalid)
    }
}

/// Which config file to use: the one given, else `$PGWARDEN_CONFIG`, else `./pgwarden.toml`.
pub fn resolve_path(given: Option<&Path>) -> PathBuf {
    if let Some(p) = given {
        return p.to_path_buf();
    }
    match std::env::var_os(ENV_VAR) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(DEFAULT_FILE),
    }
}
