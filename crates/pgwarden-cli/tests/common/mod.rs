#![allow(dead_code)]

pub mod ha;

use std::path::Path;
use std::process::{Command, Output};

pub fn pgwarden() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pgwarden"))
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(args: &[&str]) -> Run {
    let out: Output = pgwarden().args(args).output().expect("run pgwarden");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `pgwarden status -c CONFIG --json`, parsed.
pub fn status_json(config: &Path) -> (i32, serde_json::Value, String) {
    let r = run(&[
        "status",
        "-c",
        config.to_str().expect("utf-8 path"),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json is not JSON ({e}):\n{}\n{}",
            r.stdout, r.stderr
        )
    });
    (r.code, v, r.stderr)
}

pub fn node<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["nodes"]
        .as_array()
        .expect("nodes array")
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("node {name} missing in {status}"))
}

/// `pgwarden ARGS -c CONFIG` off the async runtime's threads (it blocks until pgwarden exits).
pub async fn run_with_config(config: &Path, args: &[&str]) -> Run {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.push("-c".into());
    all.push(config.to_str().expect("utf-8 path").into());
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        run(&refs)
    })
    .await
    .expect("run pgwarden")
}
