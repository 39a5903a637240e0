//! The agent API's mutating calls and its authentication.
//!
//! - `POST /switchover` — body `{"leader": "n1", "candidate": "n2", "scheduled_at":
//!   "2026-12-05T14:00:00Z", "force": false, "drain": "2s"}`, every field optional (`to` is
//!   taken for `candidate` too; `leader`, if given, must be the leader). Checked exactly as
//!   `pgwarden switchover` checks it (412 with the reason when refused, nothing written), then
//!   followed to its end: 200 and the switchover's JSON when done, 503 when it failed or did not
//!   end in time, 202 when scheduled for later. 400 for a body that does not parse.
//! - `POST /failover` — body `{"candidate": "n2"}`: a manual failover while nobody leads (412
//!   while a leader holds the key), followed until the candidate leads.
//! - `POST /restart`, `/reinit` — of this agent's node (a re-clone never of the leader),
//!   followed until carried out: 200 and the member state.
//!
//! Mutating calls need HTTP basic authentication with `[agent.api] username/password` (401
//! without or with wrong ones); with none configured they are refused (403). Reads need it only
//! with `auth_reads`.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use pgwarden_config::{Config, Secret};
use pgwarden_dcs::{ClusterStore, Kv, NodeAction, SwitchoverPhase};
use serde::Deserialize;

use crate::operate::{self, OperateError, Request};
use crate::status::SwitchoverStatus;

/// What the mutating calls act through.
pub struct Operator<K: Kv> {
    pub store: Arc<ClusterStore<K>>,
    pub config: Arc<Config>,
    /// Failsafe confirmations this member gave (read by its agent's decisions).
    pub acks: Arc<crate::failsafe::Acks>,
    /// The node whose agent serves the API (`/restart` and `/reinit` act on it).
    pub node: String,
}

/// A path that changes the cluster when posted to.
pub fn is_mutating(path: &str) -> bool {
    matches!(
        path.trim_end_matches('/'),
        "/switchover" | "/failover" | "/restart" | "/reinit"
    )
}

/// `PATCH /config` changes the dynamic settings (`GET /config` reads them).
pub fn is_config_change(method: &str, path: &str) -> bool {
    method == "PATCH" && path.trim_end_matches('/') == "/config"
}

/// `GET /config`: the dynamic settings in the store (`stored`, TOML) and those in effect
/// (`effective`, TOML, the file's with the store's over them).
pub async fn show_config<K: Kv>(op: &Operator<K>) -> (u16, String) {
    let stored = match op.store.dynamic_config().await {
        Ok(d) => d.map(|d| d.value).unwrap_or_default(),
        Err(e) => {
            return json(
                503,
                serde_json::json!({ "error": format!("the store: {e}") }),
            )
        }
    };
    match pgwarden_config::dynamic::apply(&op.config, &stored) {
        Ok(c) => json(
            200,
            serde_json::json!({ "stored": stored, "effective": pgwarden_config::dynamic::render(&c) }),
        ),
        Err(e) => json(
            409,
            serde_json::json!({ "stored": stored, "error": format!("refused by the checks: {e}") }),
        ),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ConfigPatch {
    /// `{"agent.synchronous_mode": "on", "postgres.parameters.work_mem": "64MB"}`.
    set: std::collections::BTreeMap<String, serde_json::Value>,
    unset: Vec<String>,
}

/// `PATCH /config`: as `pgwarden edit-config`, body `{"set": {KEY: VALUE}, "unset": [KEY]}`:
/// 200 with the new `stored` text, 412 with every problem (nothing written), 409 when the
/// settings changed meanwhile.
pub async fn edit_config<K: Kv>(body: &str, op: &Operator<K>) -> (u16, String) {
    let patch: ConfigPatch = match serde_json::from_str(body) {
        Ok(p) => p,
        Err(e) => {
            return json(
                400,
                serde_json::json!({ "error": format!("the body: {e}") }),
            )
        }
    };
    let set: Vec<(String, String)> = patch
        .set
        .into_iter()
        // JSON's scalars are TOML's (a JSON string is a TOML basic string).
        .map(|(k, v)| (k, v.to_string()))
        .collect();
    let (old, revision) = match op.store.dynamic_config().await {
        Ok(Some(d)) => (d.value, d.revision),
        Ok(None) => (String::new(), 0),
        Err(e) => {
            return json(
                503,
                serde_json::json!({ "error": format!("the store: {e}") }),
            )
        }
    };
    let new = match pgwarden_config::dynamic::edit(&old, &set, &patch.unset)
        .and_then(|t| pgwarden_config::dynamic::apply(&op.config, &t).map(|_| t))
    {
        Ok(t) => t,
        Err(e) => return json(412, serde_json::json!({ "error": e.to_string() })),
    };
    match op.store.put_dynamic_config(&new, revision).await {
        Ok(true) => json(200, serde_json::json!({ "stored": new })),
        Ok(false) => json(
            409,
            serde_json::json!({ "error": "the settings changed meanwhile" }),
        ),
        Err(e) => json(
            503,
            serde_json::json!({ "error": format!("the store: {e}") }),
        ),
    }
}

/// An answer: its status and JSON body.
fn json(status: u16, v: serde_json::Value) -> (u16, String) {
    (status, v.to_string())
}

/// The `Authorization` header value for HTTP basic authentication.
pub fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// The header an agent (or a proxy) sends to the other agents: `[agent.api]`'s credentials.
pub fn peer_authorization(config: &Config) -> Option<String> {
    config
        .agent
        .api
        .credentials
        .as_ref()
        .map(|(u, p)| basic(u, p.expose()))
}

/// Whether the `Authorization` header carries `credentials` (HTTP basic). `Err` is the
/// status and JSON body to answer.
pub fn authorize(
    authorization: Option<&str>,
    credentials: Option<&(String, Secret)>,
) -> Result<(), (u16, String)> {
    let error = |status: u16, text: &str| Err(json(status, serde_json::json!({ "error": text })));
    let Some((user, password)) = credentials else {
        return error(
            403,
            "mutating calls need credentials: set [agent.api] username and password",
        );
    };
    let given = authorization
        .and_then(|h| h.trim().strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok());
    let ok = given
        .as_deref()
        .and_then(|g| g.split_once(':'))
        .is_some_and(|(u, p)| {
            // Both compared in full, whatever the first mismatch.
            let user_ok = same(u.as_bytes(), user.as_bytes());
            let password_ok = same(p.as_bytes(), password.expose().as_bytes());
            user_ok & password_ok
        });
    if ok {
        Ok(())
    } else {
        error(
            401,
            "authentication required (HTTP basic, [agent.api] credentials)",
        )
    }
}

/// Equality that takes the same time wherever the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
    }
    diff == 0
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct SwitchoverBody {
    leader: Option<String>,
    candidate: Option<String>,
    to: Option<String>,
    scheduled_at: Option<String>,
    force: bool,
    drain: Option<String>,
}

/// `POST /switchover`'s body as a request (`now`: for a relative time, none here).
pub fn parse_switchover(body: &str) -> Result<Request, String> {
    let b: SwitchoverBody = if body.trim().is_empty() {
        SwitchoverBody::default()
    } else {
        serde_json::from_str(body).map_err(|e| format!("the body: {e}"))?
    };
    let to = match (b.candidate, b.to) {
        (Some(c), Some(t)) if c != t => {
            return Err("candidate and to name different members".into())
        }
        (c, t) => c.or(t),
    };
    let at_ms = match b.scheduled_at {
        None => None,
        Some(s) => {
            let t = humantime::parse_rfc3339_weak(&s)
                .map_err(|e| format!("scheduled_at: {e} (an RFC 3339 time)"))?;
            let ms = t
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| "scheduled_at: before 1970".to_string())?;
            Some(ms.as_millis() as u64)
        }
    };
    let drain = match b.drain {
        None => operate::DEFAULT_DRAIN,
        Some(d) => pgwarden_core::parse_duration(&d).map_err(|e| format!("drain: {e}"))?,
    };
    Ok(Request {
        leader: b.leader,
        to,
        at_ms,
        force: b.force,
        drain,
    })
}

/// Answers a mutating call (already authorised).
pub async fn handle<K: Kv>(
    method: &str,
    path: &str,
    body: &str,
    op: &Operator<K>,
) -> (u16, String) {
    if method != "POST" {
        return json(
            405,
            serde_json::json!({ "error": format!("{path} takes POST") }),
        );
    }
    match path.trim_end_matches('/') {
        "/switchover" => {}
        "/failover" => return failover(body, op).await,
        "/restart" => return node_request(NodeAction::Restart, op).await,
        "/reinit" => return node_request(NodeAction::Reinit, op).await,
        _ => return json(404, serde_json::json!({ "error": "not found" })),
    }
    let req = match parse_switchover(body) {
        Ok(r) => r,
        Err(e) => return json(400, serde_json::json!({ "error": e })),
    };
    let sw = match operate::request_switchover(&op.store, &op.config, &req).await {
        Ok(sw) => sw,
        Err(OperateError::Store(e)) => {
            return json(
                503,
                serde_json::json!({ "error": format!("the store: {e}") }),
            )
        }
        Err(e) => return json(412, serde_json::json!({ "error": e.to_string() })),
    };
    let body = |sw: &pgwarden_dcs::Switchover| {
        serde_json::to_string(&SwitchoverStatus::of(sw)).expect("a switchover serialises")
    };
    if sw.at_ms.is_some_and(|at| at > crate::switchover::unix_ms()) {
        return (202, body(&sw));
    }
    let bound = operate::follow_bound(&op.config, req.drain);
    match operate::wait_switchover(&op.store, sw.requested_ms, bound).await {
        Some(done) if done.phase == SwitchoverPhase::Done => (200, body(&done)),
        Some(failed) => (503, body(&failed)),
        None => json(
            503,
            serde_json::json!({ "error": format!(
                "the switchover did not end within {}",
                pgwarden_core::format_duration(bound)
            ) }),
        ),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FailoverBody {
    candidate: Option<String>,
    to: Option<String>,
}

/// `POST /failover`: a manual failover to `candidate` (or `to`), followed until it leads.
async fn failover<K: Kv>(body: &str, op: &Operator<K>) -> (u16, String) {
    let b: FailoverBody = match serde_json::from_str(body) {
        Ok(b) => b,
        Err(e) => {
            return json(
                400,
                serde_json::json!({ "error": format!("the body: {e}") }),
            )
        }
    };
    let Some(to) = b.candidate.or(b.to) else {
        return json(400, serde_json::json!({ "error": "candidate: required" }));
    };
    match operate::request_failover(&op.store, &to).await {
        Ok(_) => {}
        Err(OperateError::Store(e)) => {
            return json(
                503,
                serde_json::json!({ "error": format!("the store: {e}") }),
            )
        }
        Err(e) => return json(412, serde_json::json!({ "error": e.to_string() })),
    }
    match operate::wait_until(&op.store, FOLLOW, |s| operate::leads(s, &to)).await {
        Some(epoch) => json(200, serde_json::json!({ "leader": to, "epoch": epoch })),
        None => json(
            503,
            serde_json::json!({ "error": format!("{to} did not lead in time") }),
        ),
    }
}

/// `POST /restart`, `/reinit`: of this agent's node, followed until carried out.
async fn node_request<K: Kv>(action: NodeAction, op: &Operator<K>) -> (u16, String) {
    let before = match operate::request_node(&op.store, &op.config, &op.node, action).await {
        Ok(before) => before,
        Err(OperateError::Store(e)) => {
            return json(
                503,
                serde_json::json!({ "error": format!("the store: {e}") }),
            )
        }
        Err(e) => return json(412, serde_json::json!({ "error": e.to_string() })),
    };
    let bound = match action {
        NodeAction::Restart => FOLLOW,
        NodeAction::Reinit => Duration::from_secs(3600),
    };
    match operate::wait_until(&op.store, bound, |s| {
        operate::request_done(s, &op.node, action, before)
    })
    .await
    {
        Some(m) => (
            200,
            serde_json::to_string(&m).expect("a member state serialises"),
        ),
        None => json(
            503,
            serde_json::json!({ "error": "not carried out in time" }),
        ),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FailsafeBody {
    leader: String,
    epoch: u64,
}

/// `/failsafe`. `POST` (from a leader that cannot reach the store, body `{"leader", "epoch"}`):
/// 200 when this member confirms (failsafe on, its own last round could not read the store,
/// it runs no primary) and records it, 409 with the reason otherwise. `GET` (from a proxy):
/// 200 `{"leader", "epoch", "fence_in_ms"}` while this node leads in failsafe, 503 otherwise.
pub fn failsafe<K: Kv>(
    method: &str,
    body: &str,
    view: &crate::api::ApiView,
    op: &Operator<K>,
) -> (u16, String) {
    if method != "POST" {
        return match view.failsafe {
            Some((epoch, fences_at)) => json(
                200,
                serde_json::json!({
                    "leader": op.node,
                    "epoch": epoch,
                    "fence_in_ms": fences_at.saturating_duration_since(std::time::Instant::now()).as_millis() as u64,
                }),
            ),
            None => json(
                503,
                serde_json::json!({ "error": "not leading in failsafe" }),
            ),
        };
    }
    if !op.config.agent.failsafe {
        return json(
            409,
            serde_json::json!({ "error": "failsafe is off here (agent.failsafe)" }),
        );
    }
    let b: FailsafeBody = match serde_json::from_str(body) {
        Ok(b) => b,
        Err(e) => {
            return json(
                400,
                serde_json::json!({ "error": format!("the body: {e}") }),
            )
        }
    };
    let primary = view.member.state == "running" && view.member.primary;
    if !crate::failsafe::may_confirm(view.store_reachable, primary) {
        let why = if primary {
            "this member runs a primary"
        } else {
            "this member can reach the store"
        };
        return json(409, serde_json::json!({ "error": why }));
    }
    op.acks.record(pgwarden_core::NodeId::new(&b.leader));
    tracing::info!(leader = %b.leader, epoch = b.epoch, "failsafe: confirmed the leader");
    json(
        200,
        serde_json::json!({ "confirmed": b.leader, "epoch": b.epoch }),
    )
}

/// How long a call follows what it asked for.
const FOLLOW: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization() {
        let creds = ("ops".to_string(), Secret::new("s3cret"));
        let good = basic("ops", "s3cret");
        let (wrong, longer, user) = (
            basic("ops", "s3creT"),
            basic("ops", "s3cret!"),
            basic("root", "s3cret"),
        );
        #[rustfmt::skip]
        type Case<'a> = (&'a str, Option<&'a str>, Option<&'a (String, Secret)>, Result<(), u16>);
        let cases: Vec<Case> = vec![
            ("the right pair", Some(&good), Some(&creds), Ok(())),
            ("no header", None, Some(&creds), Err(401)),
            ("a wrong password", Some(&wrong), Some(&creds), Err(401)),
            ("a longer password", Some(&longer), Some(&creds), Err(401)),
            ("a wrong user", Some(&user), Some(&creds), Err(401)),
            ("not basic", Some("Bearer x"), Some(&creds), Err(401)),
            ("not base64", Some("Basic !!!"), Some(&creds), Err(401)),
            (
                "nothing configured: refused whatever is sent",
                Some(&good),
                None,
                Err(403),
            ),
        ];
        for (what, header, c, want) in cases {
            assert_eq!(authorize(header, c).map_err(|(s, _)| s), want, "{what}");
        }
    }

    #[test]
    fn switchover_bodies() {
        let r = parse_switchover(
            r#"{"leader": "n1", "candidate": "n2", "scheduled_at": "2026-12-05T14:00:00Z", "force": true, "drain": "5s"}"#,
        )
        .expect("parses");
        assert_eq!(r.leader.as_deref(), Some("n1"));
        assert_eq!(r.to.as_deref(), Some("n2"));
        assert_eq!(r.at_ms, Some(1_796_479_200_000));
        assert!(r.force);
        assert_eq!(r.drain, Duration::from_secs(5));
        let empty = parse_switchover("").expect("an empty body");
        assert_eq!((empty.to, empty.at_ms, empty.force), (None, None, false));
        assert_eq!(empty.drain, operate::DEFAULT_DRAIN);
        assert_eq!(
            parse_switchover(r#"{"to": "n3"}"#)
                .expect("to")
                .to
                .as_deref(),
            Some("n3")
        );
        for (body, phrase) in [
            ("{", "the body"),
            (r#"{"candidate": "n2", "to": "n3"}"#, "different members"),
            (r#"{"scheduled_at": "soon"}"#, "scheduled_at"),
            (r#"{"drain": "forever"}"#, "drain"),
            (r#"{"master": "n1"}"#, "unknown field"),
        ] {
            let e = parse_switchover(body).expect_err(body);
            assert!(e.contains(phrase), "{body}: {e}");
        }
    }

    #[test]
    fn which_calls_mutate() {
        for p in [
            "/switchover",
            "/switchover/",
            "/failover",
            "/restart",
            "/reinit",
        ] {
            assert!(is_mutating(p), "{p}");
        }
        for p in ["/primary", "/cluster", "/health", "/"] {
            assert!(!is_mutating(p), "{p}");
        }
    }
}
