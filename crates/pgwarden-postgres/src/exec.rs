//! Running a PostgreSQL client program (initdb, pg_basebackup, ...) to completion.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::error::PgError;
use crate::RunAs;

/// Runs `program args` as `run_as` with `env`, bounded by `timeout`; stderr goes into the error.
pub(crate) async fn run(
    program: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    run_as: RunAs,
    timeout: Duration,
) -> Result<String, PgError> {
    let name = program
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(env.iter().copied())
        .env("LC_ALL", "C")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    run_as.apply(&mut cmd);
    tracing::debug!(program = %name, ?args, "running");
    let child = cmd.spawn().map_err(PgError::io("cannot run", program))?;
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| PgError::CommandTimeout {
            program: name.clone(),
            timeout,
        })?
        .map_err(PgError::io("cannot wait for", program))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(PgError::Command {
            program: name,
            status: out.status.to_string(),
            stderr: last_lines(&String::from_utf8_lossy(&out.stderr), 5),
        })
    }
}

/// The last `n` non-empty lines, joined with " | " so an error stays on one line.
pub(crate) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join(" | ")
}
