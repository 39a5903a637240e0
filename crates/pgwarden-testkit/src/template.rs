//! The initdb template: made once per machine, PostgreSQL version and template format, then
//! copied. Concurrent test processes race to build it; the first `rename` wins and the others
//! reuse its result.

use std::path::PathBuf;

use pgwarden_postgres::{Instance, PgEnv};

/// Bump when what the template contains changes.
const FORMAT: u32 = 1;

/// Returns the template directory, building it if needed.
pub async fn template(env: &PgEnv) -> PathBuf {
    let root = std::env::temp_dir().join(format!("pgwarden-testkit-{}", nix::unistd::geteuid()));
    let path = root.join(format!("template-pg{}-v{FORMAT}", env.bins.major));
    if path.join("PG_VERSION").is_file() {
        return path;
    }
    env.run_as
        .create_dir(&root, 0o755)
        .expect("create the testkit template root");
    let building = root.join(format!("building-{}-{}", std::process::id(), rand_suffix()));
    Instance::new(env.clone(), "template", "127.0.0.1", 0, &building)
        .non_durable()
        .initdb(crate::SUPERUSER, crate::SUPERUSER_PASSWORD)
        .await
        .expect("initdb for the testkit template");
    if std::fs::rename(&building, &path).is_err() {
        // Another process finished first; use its template.
        let _ = std::fs::remove_dir_all(&building);
    }
    assert!(
        path.join("PG_VERSION").is_file(),
        "template missing at {}",
        path.display()
    );
    path
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
