use std::path::PathBuf;
use std::time::Duration;

/// Why a PostgreSQL operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("PostgreSQL server binaries not found ({searched}); install the PostgreSQL server package (e.g. apt-get install postgresql-15) or set postgres.bin_dir")]
    BinariesNotFound { searched: String },
    #[error("{} does not contain the PostgreSQL server binary `postgres`", dir.display())]
    BadBinDir { dir: PathBuf },
    #[error("PostgreSQL {found} is not supported: pgwarden needs 15 or later")]
    UnsupportedVersion { found: u32 },
    #[error("OS user \"{user}\" does not exist: create it or set postgres.os_user")]
    NoSuchUser { user: String },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr}")]
    Command {
        program: String,
        status: String,
        stderr: String,
    },
    #[error("{program} did not finish within {}", pgwarden_core::format_duration(*timeout))]
    CommandTimeout { program: String, timeout: Duration },
    #[error("postgres in {} exited during startup ({status}); log: {log}", data_dir.display())]
    StartFailed {
        data_dir: PathBuf,
        status: String,
        log: String,
    },
    #[error("postgres in {} was not ready within {}; log: {log}", data_dir.display(), pgwarden_core::format_duration(*timeout))]
    StartTimeout {
        data_dir: PathBuf,
        timeout: Duration,
        log: String,
    },
    #[error("{} is owned by uid {owner}, not by the user PostgreSQL runs as (uid {want}); refusing to use it", path.display())]
    WrongOwner {
        path: PathBuf,
        owner: u32,
        want: u32,
    },
    #[error("{} is already initialised", .0.display())]
    AlreadyInitialised(PathBuf),
    #[error("{} is not an initialised data directory", .0.display())]
    NotInitialised(PathBuf),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("connecting to {addr} took longer than {}", pgwarden_core::format_duration(*timeout))]
    ConnectTimeout { addr: String, timeout: Duration },
    #[error("query on {addr} failed: {source}")]
    Query {
        addr: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("the PostgreSQL OS user cannot reach {}: {} is not searchable by it; choose a directory elsewhere (e.g. under /tmp or /var/lib)", path.display(), blocker.display())]
    Unreachable { path: PathBuf, blocker: PathBuf },
}

impl PgError {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> PgError {
        let path = path.into();
        move |source| PgError::Io { what, path, source }
    }
}
