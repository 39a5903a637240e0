//! Finding the PostgreSQL server binaries.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::PgError;

/// Programs that must sit beside `postgres`.
const REQUIRED: &[&str] = &["postgres", "initdb", "pg_basebackup", "pg_ctl"];

/// The directory holding `postgres`, `initdb`, `pg_basebackup`, ... and their major version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBinaries {
    pub dir: PathBuf,
    pub major: u32,
}

impl PgBinaries {
    /// Uses `configured` if given; otherwise `postgres` on PATH, then `pg_config --bindir`, then the
    /// newest `/usr/lib/postgresql/*/bin` (Debian keeps server binaries off PATH).
    pub fn find(configured: Option<&Path>) -> Result<Self, PgError> {
        if let Some(dir) = configured {
            if !dir.join("postgres").is_file() {
                return Err(PgError::BadBinDir {
                    dir: dir.to_path_buf(),
                });
            }
            return Self::at(dir.to_path_buf());
        }
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path));
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            if out.status.success() {
                let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if !s.is_empty() {
                    candidates.push(PathBuf::from(s));
                }
            }
        }
        Self::search(candidates, Path::new("/usr/lib/postgresql"))
    }

    /// The first of `candidates`, then of `<versions_root>/<major>/bin` newest first, that holds
    /// the server programs.
    fn search(mut candidates: Vec<PathBuf>, versions_root: &Path) -> Result<Self, PgError> {
        candidates.extend(debian_bin_dirs(versions_root));
        // A PATH entry may hold symlinks to only some programs (/usr/local/bin/postgres ->
        // /usr/lib/postgresql/15/bin/postgres): follow `postgres` to its real directory.
        let found = candidates
            .into_iter()
            .filter_map(|d| std::fs::canonicalize(d.join("postgres")).ok())
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .find(|d| REQUIRED.iter().all(|prog| d.join(prog).is_file()));
        match found {
            Some(dir) => Self::at(dir),
            None => Err(PgError::BinariesNotFound {
                searched: format!(
                    "looked in PATH, pg_config --bindir and {}/*/bin",
                    versions_root.display()
                ),
            }),
        }
    }

    fn at(dir: PathBuf) -> Result<Self, PgError> {
        let postgres = dir.join("postgres");
        let out = Command::new(&postgres)
            .arg("--version")
            .output()
            .map_err(PgError::io("cannot run", &postgres))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let major = parse_major(&text).ok_or_else(|| PgError::Command {
            program: postgres.display().to_string(),
            status: out.status.to_string(),
            stderr: format!("unexpected version output: {}", text.trim()),
        })?;
        if major < 15 {
            return Err(PgError::UnsupportedVersion { found: major });
        }
        Ok(Self { dir, major })
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// `postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)` -> 15.
fn parse_major(version_output: &str) -> Option<u32> {
    let word = version_output
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    word.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// `/usr/lib/postgresql/<major>/bin`, newest first.
fn debian_bin_dirs(root: &Path) -> Vec<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    found.into_iter().map(|(_, p)| p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_major_versions() {
        assert_eq!(
            parse_major("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(parse_major("postgres (PostgreSQL) 17beta1"), Some(17));
        assert_eq!(parse_major("garbage"), None);
    }

    #[test]
    fn a_configured_dir_without_postgres_is_an_error() {
        let err = PgBinaries::find(Some(Path::new("/nonexistent/bin"))).unwrap_err();
        assert!(matches!(err, PgError::BadBinDir { .. }));
    }

    #[test]
    fn no_installation_is_a_one_line_error_saying_what_to_install() {
        let empty = tempfile::tempdir().expect("tempdir");
        let err = PgBinaries::search(vec![empty.path().to_path_buf()], empty.path()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, PgError::BinariesNotFound { .. }));
        assert!(!msg.contains('\n'));
        assert!(
            msg.contains(
                "install the PostgreSQL server package (e.g. apt-get install postgresql-15)"
            ),
            "{msg}"
        );
    }

    #[test]
    fn a_partial_install_is_skipped() {
        // postgres alone (as in /usr/local/bin here) is not enough: initdb and friends must sit beside it.
        let tmp = tempfile::tempdir().expect("tempdir");
        let partial = tmp.path().join("partial");
        std::fs::create_dir(&partial).expect("mkdir");
        std::fs::write(partial.join("postgres"), "").expect("write");
        let err = PgBinaries::search(vec![partial], tmp.path()).unwrap_err();
        assert!(matches!(err, PgError::BinariesNotFound { .. }));
    }

    #[test]
    fn debian_dirs_are_newest_first() {
        let tmp = tempfile::tempdir().expect("tempdir");
        for v in ["13", "16", "15", "notaversion"] {
            std::fs::create_dir_all(tmp.path().join(v).join("bin")).expect("mkdir");
        }
        let dirs = debian_bin_dirs(tmp.path());
        assert_eq!(dirs[0], tmp.path().join("16/bin"));
        assert_eq!(dirs.len(), 3);
    }
}
