//! The operator commands on the HA agents' store: pause / resume, switchover, failover,
//! restart and reinit, show-config / edit-config, history. Each checks and writes through
//! `pgwarden_ha::operate` and follows the outcome; exit 0 when done, 1 when refused or failed
//! (the reason on one line), 2 when the config or the store cannot be used.

use std::path::PathBuf;
use std::process::ExitCode;

use pgwarden_config::Config;

use super::{fail, load};

/// `pgwarden pause` / `pgwarden resume`: the store's maintenance flag.
pub(super) async fn pause_or_resume(config: Option<PathBuf>, pause: bool) -> ExitCode {
    let config = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if config.dcs.is_none() {
        return fail(
            "pause and resume act on the HA agents' store, and this config has no [dcs]",
            2,
        );
    }
    match pgwarden_ha::status::HaStatus::set_paused(&config, pause).await {
        Ok(()) if pause => {
            println!("paused: the agents take no automatic action until pgwarden resume");
            ExitCode::SUCCESS
        }
        Ok(()) => {
            println!("resumed: the agents act again");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("cannot write to the store: {e}"), 1),
    }
}

/// `pgwarden switchover`: checked and asked for in the store, then followed to its end (a
/// scheduled one is only asked for). Exit 0 when done, 1 when refused or failed, 2 when the
/// store cannot be used.
pub(super) async fn switchover(
    config: Option<PathBuf>,
    request: pgwarden_ha::operate::Request,
) -> ExitCode {
    use pgwarden_ha::operate::{self, OperateError};
    let config = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if config.dcs.is_none() {
        return fail(
            "switchover is carried out by the HA agents through their store, and this config has no [dcs]",
            2,
        );
    }
    let store = match pgwarden_ha::store::connect(&config).await {
        Ok(s) => s,
        Err(e) => return fail(&e.to_string(), 2),
    };
    let sw = match operate::request_switchover(&store, &config, &request).await {
        Ok(sw) => sw,
        Err(e @ OperateError::Store(_)) => return fail(&format!("cannot use the store: {e}"), 2),
        Err(e) => return fail(&e.to_string(), 1),
    };
    if let Some(at) = sw
        .at_ms
        .filter(|at| *at > pgwarden_ha::switchover::unix_ms())
    {
        let when = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(at),
        );
        println!(
            "switchover from {} to {} scheduled at {when}",
            sw.from, sw.to
        );
        return ExitCode::SUCCESS;
    }
    println!("switchover from {} to {}: asked", sw.from, sw.to);
    let bound = pgwarden_ha::operate::follow_bound(&config, request.drain);
    match operate::wait_switchover(&store, sw.requested_ms, bound).await {
        Some(done) if done.phase == pgwarden_dcs::SwitchoverPhase::Done => {
            let secs = |ms: Option<u64>| ms.map_or("?".into(), |ms| format!("{:.2}s", ms as f64 / 1000.0));
            println!(
                "switchover from {} to {}: done, epoch {}; writes held {}, {} transaction(s) cut at the stop",
                done.from,
                done.to,
                done.epoch.map_or("?".into(), |e| e.to_string()),
                secs(done.write_gap_ms()),
                done.cut_transactions.unwrap_or(0),
            );
            ExitCode::SUCCESS
        }
        Some(failed) => fail(
            &format!(
                "switchover from {} to {} failed: {}",
                failed.from,
                failed.to,
                failed.note.as_deref().unwrap_or("no reason recorded")
            ),
            1,
        ),
        None => fail(
            &format!(
                "switchover from {} to {} did not finish within {} (pgwarden list shows where it stands)",
                sw.from,
                sw.to,
                pgwarden_core::format_duration(bound)
            ),
            1,
        ),
    }
}

/// The config and a connection to its store, for the operator commands (`what` names the
/// command in the error).
async fn operator_store(
    config: Option<PathBuf>,
    what: &str,
) -> Result<
    (
        Config,
        pgwarden_dcs::ClusterStore<pgwarden_dcs::etcd::EtcdKv>,
    ),
    ExitCode,
> {
    let config = load(config)?;
    if config.dcs.is_none() {
        return Err(fail(
            &format!("{what} is carried out by the HA agents through their store, and this config has no [dcs]"),
            2,
        ));
    }
    match pgwarden_ha::store::connect(&config).await {
        Ok(s) => Ok((config, s)),
        Err(e) => Err(fail(&e.to_string(), 2)),
    }
}

/// `pgwarden show-config`: the store's dynamic settings, and what is in effect.
pub(super) async fn show_config(config: Option<PathBuf>) -> ExitCode {
    let (config, store) = match operator_store(config, "show-config").await {
        Ok(x) => x,
        Err(code) => return code,
    };
    let stored = match store.dynamic_config().await {
        Ok(d) => d.map(|d| d.value).unwrap_or_default(),
        Err(e) => return fail(&format!("cannot read the store: {e}"), 2),
    };
    println!("# in the store (pgwarden edit-config):");
    if stored.trim().is_empty() {
        println!("# (none: the file's settings are in effect)");
    } else {
        print!("{stored}");
    }
    match pgwarden_config::dynamic::apply(&config, &stored) {
        Ok(effective) => {
            println!("\n# in effect (the file's, with the store's over them):");
            print!("{}", pgwarden_config::dynamic::render(&effective));
            ExitCode::SUCCESS
        }
        Err(e) => fail(
            &format!("the store's dynamic settings do not pass the checks, and the agents refuse them: {e}"),
            1,
        ),
    }
}

/// `pgwarden edit-config`: the new settings checked against the file, written only if nobody
/// changed them meanwhile.
pub(super) async fn edit_config(
    config: Option<PathBuf>,
    set: &[(String, String)],
    unset: &[String],
) -> ExitCode {
    let (config, store) = match operator_store(config, "edit-config").await {
        Ok(x) => x,
        Err(code) => return code,
    };
    if set.is_empty() && unset.is_empty() {
        return fail("nothing to change: give --set KEY=VALUE or --unset KEY", 2);
    }
    let (old, revision) = match store.dynamic_config().await {
        Ok(Some(d)) => (d.value, d.revision),
        Ok(None) => (String::new(), 0),
        Err(e) => return fail(&format!("cannot read the store: {e}"), 2),
    };
    let new = match pgwarden_config::dynamic::edit(&old, set, unset) {
        Ok(t) => t,
        Err(e) => return fail(&format!("refused: {e}"), 1),
    };
    if let Err(e) = pgwarden_config::dynamic::apply(&config, &new) {
        let lines: Vec<String> = e.to_string().lines().map(String::from).collect();
        return fail(
            &format!("refused, nothing written: {}", lines.join("; ")),
            1,
        );
    }
    match store.put_dynamic_config(&new, revision).await {
        Ok(true) => {
            println!("# written; the agents apply it at their next round:");
            print!("{new}");
            ExitCode::SUCCESS
        }
        Ok(false) => fail(
            "the settings changed meanwhile; nothing written (run it again)",
            1,
        ),
        Err(e) => fail(&format!("cannot write to the store: {e}"), 2),
    }
}

/// `pgwarden failover --to NODE`: exit 0 once NODE leads, 1 when refused or not done in time.
pub(super) async fn failover(config: Option<PathBuf>, to: &str) -> ExitCode {
    use pgwarden_ha::operate::{self, OperateError};
    let (_config, store) = match operator_store(config, "failover").await {
        Ok(x) => x,
        Err(code) => return code,
    };
    match operate::request_failover(&store, to).await {
        Ok(_) => {}
        Err(e @ OperateError::Store(_)) => return fail(&format!("cannot use the store: {e}"), 2),
        Err(OperateError::Refused(r)) => return fail(&format!("failover refused: {r}"), 1),
        Err(e) => return fail(&e.to_string(), 1),
    }
    println!("failover to {to}: asked");
    let bound = std::time::Duration::from_secs(60);
    match operate::wait_until(&store, bound, |s| operate::leads(s, to)).await {
        Some(epoch) => {
            println!("failover to {to}: done, epoch {epoch}");
            ExitCode::SUCCESS
        }
        None => fail(
            &format!("{to} did not lead within 60s (pgwarden list shows why)"),
            1,
        ),
    }
}

/// `pgwarden restart NODE` / `pgwarden reinit NODE`: exit 0 once carried out.
pub(super) async fn node_request(
    config: Option<PathBuf>,
    node: &str,
    action: pgwarden_dcs::NodeAction,
) -> ExitCode {
    use pgwarden_ha::operate::{self, OperateError};
    let what = match action {
        pgwarden_dcs::NodeAction::Restart => "restart",
        pgwarden_dcs::NodeAction::Reinit => "reinit",
    };
    let (config, store) = match operator_store(config, what).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    let before = match operate::request_node(&store, &config, node, action).await {
        Ok(before) => before,
        Err(e @ OperateError::Store(_)) => return fail(&format!("cannot use the store: {e}"), 2),
        Err(OperateError::Refused(r)) => return fail(&format!("{what} refused: {r}"), 1),
        Err(e) => return fail(&e.to_string(), 1),
    };
    println!("{what} of {node}: asked");
    let bound = std::time::Duration::from_secs(match action {
        pgwarden_dcs::NodeAction::Restart => 120,
        pgwarden_dcs::NodeAction::Reinit => 3600,
    });
    match operate::wait_until(&store, bound, |s| {
        operate::request_done(s, node, action, before)
    })
    .await
    {
        Some(m) => {
            println!("{what} of {node}: done, {} {}", m.role, m.state);
            ExitCode::SUCCESS
        }
        None => fail(
            &format!(
                "{what} of {node} did not finish within {} (pgwarden list shows why)",
                pgwarden_core::format_duration(bound)
            ),
            1,
        ),
    }
}

/// `pgwarden history`: the store's events, and the report over a window.
pub(super) async fn history(
    config: Option<PathBuf>,
    json: bool,
    window: Option<std::time::Duration>,
) -> ExitCode {
    let (_config, store) = match operator_store(config, "history").await {
        Ok(x) => x,
        Err(code) => return code,
    };
    let events = match store.history().await {
        Ok(e) => e,
        Err(e) => return fail(&format!("cannot read the history: {e}"), 2),
    };
    let now = pgwarden_ha::switchover::unix_ms();
    let report = window.map(|w| {
        pgwarden_ha::history::report(&events, now.saturating_sub(w.as_millis() as u64), now)
    });
    if json {
        let doc = serde_json::json!({ "events": events, "availability": report });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).expect("history serialises")
        );
    } else {
        print!("{}", pgwarden_ha::history::render(&events));
        if let Some(r) = report {
            print!("{}", r.render());
        }
    }
    ExitCode::SUCCESS
}
