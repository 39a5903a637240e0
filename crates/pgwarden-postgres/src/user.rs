//! The OS user PostgreSQL runs as.
//!
//! PostgreSQL refuses to run as root. When pgwarden is root, every PostgreSQL program is started
//! with the uid/gid of `postgres.os_user` (supplementary groups dropped), and the directories
//! pgwarden creates for it are owned by that user. When pgwarden is an ordinary user, everything
//! runs as that user and no switching happens.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::unistd::{Gid, Uid, User};

use crate::error::PgError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunAs {
    /// Run as the current user.
    Current,
    /// Switch to this user (pgwarden is root).
    User { uid: u32, gid: u32 },
}

impl RunAs {
    pub fn for_os_user(name: &str) -> Result<Self, PgError> {
        if !Uid::effective().is_root() {
            return Ok(RunAs::Current);
        }
        let user = User::from_name(name)
            .ok()
            .flatten()
            .ok_or_else(|| PgError::NoSuchUser {
                user: name.to_string(),
            })?;
        Ok(RunAs::User {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        })
    }

    /// An existing data directory must belong to the user PostgreSQL runs as (it refuses to
    /// start otherwise, and pgwarden must not take over someone else's).
    pub fn check_owner(&self, dir: &Path) -> Result<(), PgError> {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::metadata(dir) else {
            return Ok(());
        };
        let want = match *self {
            RunAs::User { uid, .. } => uid,
            RunAs::Current => Uid::effective().as_raw(),
        };
        if meta.uid() == want {
            return Ok(());
        }
        Err(PgError::WrongOwner {
            path: dir.to_path_buf(),
            owner: meta.uid(),
            want,
        })
    }

    /// Sets uid/gid on a command that will run a PostgreSQL program.
    pub fn apply(&self, cmd: &mut tokio::process::Command) {
        if let RunAs::User { uid, gid } = *self {
            cmd.uid(uid).gid(gid);
        }
    }

    pub fn apply_std(&self, cmd: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        if let RunAs::User { uid, gid } = *self {
            cmd.uid(uid).gid(gid);
        }
    }

    /// Gives `path` to the PostgreSQL user (no-op when not switching).
    pub fn chown(&self, path: &Path) -> Result<(), PgError> {
        if let RunAs::User { uid, gid } = *self {
            nix::unistd::chown(path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))).map_err(
                |e| PgError::Io {
                    what: "cannot change the owner of",
                    path: path.to_path_buf(),
                    source: e.into(),
                },
            )?;
        }
        Ok(())
    }

    /// Creates `path` (and missing parents) owned by the PostgreSQL user with `mode`. Parents that
    /// already exist are left alone; parents created here get mode 0755 and the same owner, so the
    /// server can reach its directory.
    pub fn create_dir(&self, path: &Path, mode: u32) -> Result<(), PgError> {
        let mut missing = Vec::new();
        let mut p = Some(path);
        while let Some(dir) = p {
            if dir.exists() {
                break;
            }
            missing.push(dir);
            p = dir.parent();
        }
        for dir in missing.iter().rev() {
            std::fs::create_dir(dir).map_err(PgError::io("cannot create directory", *dir))?;
            self.chown(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .map_err(PgError::io("cannot set permissions on", *dir))?;
        }
        self.chown(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(PgError::io("cannot set permissions on", path))
    }

    /// Fails with a clear error when the PostgreSQL user could not reach `path` because an
    /// existing ancestor directory is not searchable by it (e.g. a data directory under /root).
    pub fn check_reachable(&self, path: &Path) -> Result<(), PgError> {
        use std::os::unix::fs::MetadataExt;
        let RunAs::User { uid, gid } = *self else {
            return Ok(());
        };
        for dir in path.ancestors().skip(1) {
            let Ok(meta) = std::fs::metadata(dir) else {
                continue;
            };
            let mode = meta.mode();
            let ok = if meta.uid() == uid {
                mode & 0o100 != 0
            } else if meta.gid() == gid {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            };
            if !ok {
                return Err(PgError::Unreachable {
                    path: path.to_path_buf(),
                    blocker: dir.to_path_buf(),
                });
            }
        }
        Ok(())
    }

    /// Writes a file owned by the PostgreSQL user with `mode`.
    pub fn write_file(&self, path: &Path, contents: &str, mode: u32) -> Result<(), PgError> {
        std::fs::write(path, contents).map_err(PgError::io("cannot write", path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(PgError::io("cannot set permissions on", path))?;
        self.chown(path)
    }
}
