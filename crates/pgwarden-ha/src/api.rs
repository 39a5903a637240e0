//! The agent's HTTP API, so that a load balancer and the other agents can ask a node directly;
//! the health checks are Patroni's (a load balancer configured for Patroni works unchanged).
//! Any method is answered like GET (HAProxy's `option httpchk` sends OPTIONS); HEAD gets no
//! body. Every answer's body is the member state (JSON, [`MemberState`]).
//!
//! - `/health` (also `/`): 200 while its PostgreSQL runs, 503 otherwise.
//! - `/primary` (also `/leader`, `/read-write`, `/master`): 200 only while this node holds the
//!   current lease and its PostgreSQL accepts writes.
//! - `/replica`: 200 on a running standby whose WAL receiver streams; `?lag=10MB` (or bytes)
//!   also needs its replay lag known and at most that.
//! - `/read-only`: `/primary` or `/replica` (with `?lag=` for a standby).
//! - `/sync` and `/async`: `/replica` for a standby in the synchronous set, or not in it.
//! - `/readiness`: `/primary` or `/replica` (`?lag=`): whether it should get traffic.
//! - `/liveness`: 200 while the agent's loop has published within three rounds.
//! - `/cluster`: the cluster as this agent last read it from the store, the document
//!   `pgwarden list --json` prints ([`crate::status::HaStatus`]); 503 when it could not read it.
//!
//! A `lag` that is not a size is 400. Anything else is 404.
//!
//! `/history` is the store's history of outages (JSON, oldest first: [`pgwarden_dcs::Event`]).
//!
//! `POST /switchover` (and the authentication every mutating call needs, and reads with
//! `[agent.api] auth_reads`) are in [`crate::api_write`].

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use pgwarden_dcs::Kv;

use crate::api_write::{self, authorize, is_mutating, Operator};
use crate::member::MemberState;

/// What the API answers from, published by the agent's loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiView {
    pub member: MemberState,
    /// Holds the leader key, with a fresh lease, and its PostgreSQL accepts writes.
    pub writable_leader: bool,
    /// In the synchronous set the store names.
    pub synchronous: bool,
    /// When the loop published it, and how long after that the agent still counts as alive.
    pub published: std::time::Instant,
    pub live_for: Duration,
    /// The cluster as this agent last read it from the store (`GET /cluster`).
    pub cluster: crate::status::HaStatus,
    /// Its last round read the store.
    pub store_reachable: bool,
    /// Failsafe mode: it leads without the store, every other member having confirmed; its
    /// epoch, and when it fences unless confirmed again.
    pub failsafe: Option<(u64, std::time::Instant)>,
}

const READ_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_REQUEST: usize = 8192;

/// Serves `view` on `listener` until the task is dropped; mutating calls act through `op`.
pub async fn serve<K: Kv>(
    listener: TcpListener,
    view: watch::Receiver<Arc<ApiView>>,
    op: Arc<Operator<K>>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let view = view.borrow().clone();
        let op = op.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &view, &op).await {
                tracing::debug!(error = %e, "API request failed");
            }
        });
    }
}

/// One request: its line, the headers the API reads, and its body.
struct HttpRequest {
    method: String,
    target: String,
    authorization: Option<String>,
    body: String,
}

/// Reads a request within [`READ_TIMEOUT`] (`None`: it did not come whole, or was too large).
async fn read_request(stream: &mut TcpStream) -> Option<HttpRequest> {
    let read = async {
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 1024];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > MAX_REQUEST {
                return None;
            }
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                // HTTP/1.0 without a blank line: what came is the head.
                break buf.len();
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.lines();
        let mut words = lines.next().unwrap_or("").split_whitespace();
        let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or("/"));
        let (mut length, mut authorization) = (0usize, None);
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().ok()?,
                "authorization" => authorization = Some(value.trim().to_string()),
                _ => {}
            }
        }
        if length > MAX_REQUEST {
            return None;
        }
        while buf.len() < head_end + length {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let end = (head_end + length).min(buf.len());
        Some(HttpRequest {
            method: method.to_string(),
            target: target.to_string(),
            authorization,
            body: String::from_utf8_lossy(&buf[head_end..end]).into_owned(),
        })
    };
    tokio::time::timeout(READ_TIMEOUT, read)
        .await
        .ok()
        .flatten()
}

async fn answer<K: Kv>(
    mut stream: TcpStream,
    view: &ApiView,
    op: &Operator<K>,
) -> std::io::Result<()> {
    let Some(req) = read_request(&mut stream).await else {
        return Ok(());
    };
    let path = req
        .target
        .split_once('?')
        .map_or(req.target.as_str(), |(p, _)| p);
    let auth = &op.config.agent.api;
    if path.trim_end_matches('/') == "/failsafe" {
        // Between agents (and proxies): authenticated whenever credentials are configured.
        let (status, body) = match auth.credentials.as_ref() {
            Some(c) => match authorize(req.authorization.as_deref(), Some(c)) {
                Err(refused) => refused,
                Ok(()) => api_write::failsafe(&req.method, &req.body, view, op),
            },
            None => api_write::failsafe(&req.method, &req.body, view, op),
        };
        return write_response(&mut stream, &req.method, status, &body).await;
    }
    let patch = api_write::is_config_change(&req.method, path);
    let mutating = patch || (req.method != "GET" && req.method != "HEAD" && is_mutating(path));
    let read = || async {
        if path.trim_end_matches('/') == "/config" {
            api_write::show_config(op).await
        } else if path.trim_end_matches('/') == "/history" {
            match op.store.history().await {
                Ok(events) => (
                    200,
                    serde_json::to_string(&events).expect("events serialise"),
                ),
                Err(e) => (
                    503,
                    serde_json::json!({ "error": e.to_string() }).to_string(),
                ),
            }
        } else {
            respond(&req.target, view, std::time::Instant::now())
        }
    };
    let (status, body) = if mutating || auth.auth_reads {
        match authorize(req.authorization.as_deref(), auth.credentials.as_ref()) {
            Err(refused) => refused,
            Ok(()) if patch => api_write::edit_config(&req.body, op).await,
            Ok(()) if mutating => api_write::handle(&req.method, path, &req.body, op).await,
            Ok(()) => read().await,
        }
    } else {
        read().await
    };
    write_response(&mut stream, &req.method, status, &body).await
}

async fn write_response(
    stream: &mut TcpStream,
    method: &str,
    status: u16,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        412 => "Precondition Failed",
        501 => "Not Implemented",
        _ => "Service Unavailable",
    };
    let body = if method == "HEAD" { "" } else { body };
    let challenge = if status == 401 {
        "WWW-Authenticate: Basic realm=\"pgwarden\"\r\n"
    } else {
        ""
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n{challenge}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The status and JSON body for `target` (a path with its query) at `now`.
pub fn respond(target: &str, view: &ApiView, now: std::time::Instant) -> (u16, String) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut lag = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == "lag" {
            match value.parse::<pgwarden_core::ByteSize>() {
                Ok(v) => lag = Some(v.bytes()),
                Err(e) => {
                    let body = serde_json::json!({ "error": format!("lag: {e}") });
                    return (400, body.to_string());
                }
            }
        }
    }
    if path.trim_end_matches('/') == "/cluster" {
        let body = serde_json::to_string(&view.cluster).expect("cluster status serialises");
        return (
            if view.cluster.error.is_none() {
                200
            } else {
                503
            },
            body,
        );
    }
    let m = &view.member;
    let replica = m.state == "running"
        && !m.primary
        && m.streaming
        && lag.map_or(true, |max| m.replay_lag_bytes.is_some_and(|l| l <= max));
    let ok = match path.trim_end_matches('/') {
        "" | "/health" => m.state == "running",
        "/primary" | "/leader" | "/read-write" | "/master" => view.writable_leader,
        "/replica" => replica,
        "/read-only" | "/readiness" => view.writable_leader || replica,
        "/sync" => replica && view.synchronous,
        "/async" => replica && !view.synchronous,
        "/liveness" => now.saturating_duration_since(view.published) <= view.live_for,
        _ => return (404, "{\"error\":\"not found\"}".to_string()),
    };
    let body = serde_json::to_string(m).expect("member state serialises");
    (if ok { 200 } else { 503 }, body)
}

/// Asks the agent at `addr` for its state (`GET /health`), within `timeout`.
pub async fn fetch_state(addr: &str, timeout: Duration) -> Option<MemberState> {
    let (_, body) = get(addr, "/health", timeout).await?;
    serde_json::from_str(&body).ok()
}

/// `GET target` of the agent at `addr` within `timeout`: the status and the body.
pub async fn get(addr: &str, target: &str, timeout: Duration) -> Option<(u16, String)> {
    call(addr, "GET", target, None, "", timeout).await
}

/// `method target` of the agent at `addr` with an `Authorization` header and a JSON body, within
/// `timeout`: the status and the body.
pub async fn call(
    addr: &str,
    method: &str,
    target: &str,
    authorization: Option<&str>,
    body: &str,
    timeout: Duration,
) -> Option<(u16, String)> {
    let fetch = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let auth = authorization.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
        let request = format!(
            "{method} {target} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(request.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        let text = String::from_utf8(out).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, body.to_string()))
    };
    tokio::time::timeout(timeout, fetch).await.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(state: &str, primary: bool, streaming: bool, writable_leader: bool) -> ApiView {
        ApiView {
            member: MemberState {
                role: if writable_leader { "leader" } else { "replica" }.into(),
                state: state.into(),
                primary,
                timeline: Some(1),
                lsn: Some("0/3000000".into()),
                streaming,
                lag_bytes: None,
                replay_lsn: None,
                replay_lag_bytes: None,
                replay_lag_ms: None,
                epoch: None,
                ready: false,
                host: "127.0.0.1".into(),
                port: 5432,
                api: None,
                priority: 1,
                nofailover: false,
                nosync: false,
                reason: None,
                reason_code: None,
                started_ms: None,
            },
            writable_leader,
            synchronous: false,
            published: std::time::Instant::now(),
            live_for: Duration::from_secs(3),
            cluster: crate::status::HaStatus::unreadable("not read yet".into()),
            store_reachable: true,
            failsafe: None,
        }
    }

    #[test]
    fn endpoints_answer_by_role() {
        let leader = view("running", true, false, true);
        // A primary that lost the lease (or is fenced) is not /primary.
        let deposed = view("running", true, false, false);
        let replica = view("running", false, true, false);
        let lagging = view("running", false, false, false);
        let down = view("stopped", false, false, false);
        #[rustfmt::skip]
        let cases = [
            ("/primary", &leader, 200), ("/leader", &leader, 200), ("/read-write", &leader, 200),
            ("/primary", &deposed, 503), ("/primary", &replica, 503), ("/primary", &down, 503),
            ("/replica", &replica, 200), ("/replica", &lagging, 503), ("/replica", &leader, 503),
            ("/replica", &down, 503), ("/health", &leader, 200), ("/health", &replica, 200),
            ("/health", &down, 503), ("/", &replica, 200), ("/nope", &leader, 404),
        ];
        let now = std::time::Instant::now();
        for (path, v, want) in cases {
            assert_eq!(respond(path, v, now).0, want, "{path} on {:?}", v.member);
        }
    }

    #[test]
    fn load_balancer_checks_with_lag_sync_and_liveness() {
        let leader = view("running", true, false, true);
        let mut near = view("running", false, true, false);
        near.member.replay_lag_bytes = Some(1 << 20);
        let mut far = near.clone();
        far.member.replay_lag_bytes = Some(100 << 20);
        let mut unknown = near.clone();
        unknown.member.replay_lag_bytes = None;
        let mut sync = near.clone();
        sync.synchronous = true;
        let down = view("stopped", false, false, false);
        let mut stuck = near.clone();
        stuck.published = std::time::Instant::now() - Duration::from_secs(10);
        #[rustfmt::skip]
        let cases = [
            ("/replica?lag=10MB", &near, 200), ("/replica?lag=10MB", &far, 503),
            ("/replica?lag=10485760", &near, 200), ("/replica?lag=1048575", &near, 503),
            ("/replica?lag=10MB", &unknown, 503), ("/replica", &unknown, 200),
            ("/replica?lag=lots", &near, 400), ("/replica?other=1&lag=1GB", &far, 200),
            ("/read-only", &leader, 200), ("/read-only", &far, 200),
            ("/read-only?lag=10MB", &far, 503), ("/read-only", &down, 503),
            ("/readiness", &leader, 200), ("/readiness?lag=10MB", &near, 200),
            ("/readiness", &down, 503),
            ("/sync", &sync, 200), ("/sync", &near, 503), ("/async", &near, 200),
            ("/async", &sync, 503), ("/sync", &leader, 503),
            ("/liveness", &near, 200), ("/liveness", &down, 200), ("/liveness", &stuck, 503),
            ("/cluster", &near, 503),
        ];
        let now = std::time::Instant::now();
        for (target, v, want) in cases {
            assert_eq!(respond(target, v, now).0, want, "{target} on {v:?}");
        }
        let mut read = near.clone();
        read.cluster.error = None;
        read.cluster.leader = Some("n1".into());
        let (status, body) = respond("/cluster", &read, now);
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["leader"], "n1", "{v}");
    }

    #[tokio::test]
    async fn served_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (_tx, rx) = watch::channel(Arc::new(view("running", false, true, false)));
        let server = tokio::spawn(serve(listener, rx, operator("")));
        let got = fetch_state(&addr, Duration::from_secs(2))
            .await
            .expect("state");
        assert!(got.streaming);
        let mut s = TcpStream::connect(&addr).await.expect("connect");
        s.write_all(b"OPTIONS /primary HTTP/1.0\r\n\r\n")
            .await
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        assert!(out.starts_with("HTTP/1.1 503"), "{out}");
        // A mutating call without credentials configured: refused before any store call.
        let (status, body) = call(
            &addr,
            "POST",
            "/switchover",
            None,
            "{}",
            Duration::from_secs(2),
        )
        .await
        .expect("answer");
        assert_eq!(status, 403, "{body}");
        server.abort();
    }

    /// An operator over an in-process store, with `api` as the `[agent.api]` section.
    fn operator(api: &str) -> Arc<Operator<pgwarden_dcs::memory::MemoryKv>> {
        let text = format!(
            "[postgres]\nsuperuser_password = \"x\"\n[[nodes]]\nname = \"n1\"\nhost = \"127.0.0.1\"\nport = 5432\n[agent.api]\n{api}\n"
        );
        let config = pgwarden_config::Config::from_toml(&text, std::path::Path::new("/"))
            .unwrap_or_else(|e| panic!("config: {e}"));
        Arc::new(Operator {
            store: Arc::new(pgwarden_dcs::ClusterStore::new(
                pgwarden_dcs::memory::MemoryKv::new(),
                "t",
                "main",
            )),
            config: Arc::new(config),
            node: "n1".into(),
            acks: Default::default(),
        })
    }

    #[tokio::test]
    async fn reads_need_the_credentials_only_with_auth_reads() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (_tx, rx) = watch::channel(Arc::new(view("running", false, true, false)));
        let op = operator("username = \"ops\"\npassword = \"pw\"\nauth_reads = true");
        let server = tokio::spawn(serve(listener, rx, op));
        let t = Duration::from_secs(2);
        let (status, _) = call(&addr, "GET", "/replica", None, "", t)
            .await
            .expect("answer");
        assert_eq!(status, 401);
        let good = "Basic b3BzOnB3"; // ops:pw
        let (status, _) = call(&addr, "GET", "/replica", Some(good), "", t)
            .await
            .expect("answer");
        assert_eq!(status, 200);
        let (status, body) = call(&addr, "POST", "/nothing", Some(good), "{}", t)
            .await
            .expect("answer");
        assert_eq!(status, 404, "{body}");
        let (status, body) = call(&addr, "POST", "/reinit", Some(good), "", t)
            .await
            .expect("answer");
        assert_eq!(status, 412, "no leader to clone from: {body}");
        let (status, body) = call(&addr, "POST", "/failover", Some(good), "{}", t)
            .await
            .expect("answer");
        assert_eq!(status, 400, "{body}");
        let (status, body) = call(&addr, "POST", "/switchover", Some(good), "{\"to\": 1}", t)
            .await
            .expect("answer");
        assert_eq!(status, 400, "{body}");
        // Failsafe: off in this config, so no confirmation; and this node does not lead in it.
        let body = r#"{"leader": "n2", "epoch": 3}"#;
        let (status, answer) = call(&addr, "POST", "/failsafe", Some(good), body, t)
            .await
            .expect("answer");
        assert_eq!(status, 409, "{answer}");
        let (status, _) = call(&addr, "POST", "/failsafe", None, body, t)
            .await
            .expect("answer");
        assert_eq!(
            status, 401,
            "credentials configured: needed between agents too"
        );
        let (status, _) = call(&addr, "GET", "/failsafe", Some(good), "", t)
            .await
            .expect("answer");
        assert_eq!(status, 503);
        // PATCH /config: checked, written, shown by GET /config.
        let patch = r#"{"set": {"agent.rejoin": "clone", "postgres.parameters.work_mem": "64MB"}}"#;
        let (status, body) = call(&addr, "PATCH", "/config", Some(good), patch, t)
            .await
            .expect("answer");
        assert_eq!(status, 200, "{body}");
        let (status, body) = call(&addr, "GET", "/config", Some(good), "", t)
            .await
            .expect("answer");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(r#"rejoin = \"clone\""#), "{body}");
        let (status, body) = call(
            &addr,
            "PATCH",
            "/config",
            Some(good),
            r#"{"set": {"agent.ttl": "9s"}}"#,
            t,
        )
        .await
        .expect("answer");
        assert_eq!(status, 412, "{body}");
        assert!(body.contains("agent.ttl: not a dynamic setting"), "{body}");
        let (status, _) = call(&addr, "PATCH", "/config", None, patch, t)
            .await
            .expect("answer");
        assert_eq!(status, 401);
        // An empty store: nobody leads, so the request is refused with the reason.
        let (status, body) = call(&addr, "POST", "/switchover", Some(good), "{}", t)
            .await
            .expect("answer");
        assert_eq!(status, 412, "{body}");
        assert!(body.contains("no member holds the leader key"), "{body}");
        server.abort();
    }
}
