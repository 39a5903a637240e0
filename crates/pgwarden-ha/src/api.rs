//! The agent's HTTP API: `GET /health`, `/primary` and `/replica`, so that a load balancer and
//! the other agents can ask a node directly. Any method is answered like GET (HAProxy's
//! `option httpchk` sends OPTIONS); HEAD gets no body.
//!
//! - `/health`: 200 while its PostgreSQL runs, 503 otherwise; the body is the member state.
//! - `/primary` (also `/leader`, `/read-write`): 200 only while this node holds the current
//!   lease and its PostgreSQL accepts writes.
//! - `/replica`: 200 on a running standby whose WAL receiver streams.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::member::MemberState;

/// What the API answers from, published by the agent's loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiView {
    pub member: MemberState,
    /// Holds the leader key, with a fresh lease, and its PostgreSQL accepts writes.
    pub writable_leader: bool,
}

const READ_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_REQUEST: usize = 8192;

/// Serves `view` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, view: watch::Receiver<Arc<ApiView>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let view = view.borrow().clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &view).await {
                tracing::debug!(error = %e, "API request failed");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, view: &ApiView) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let head = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.len() > MAX_REQUEST {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if head.is_err() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&buf);
    let mut words = text.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or("/"));
    let path = target.split('?').next().unwrap_or("/");
    let (status, body) = respond(path, view);
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    let body = if method == "HEAD" {
        String::new()
    } else {
        body
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The status and JSON body for `path`.
pub fn respond(path: &str, view: &ApiView) -> (u16, String) {
    let m = &view.member;
    let ok = match path.trim_end_matches('/') {
        "" | "/health" => m.state == "running",
        "/primary" | "/leader" | "/read-write" | "/master" => view.writable_leader,
        "/replica" => m.state == "running" && !m.primary && m.streaming,
        _ => return (404, "{\"error\":\"not found\"}".to_string()),
    };
    let body = serde_json::to_string(m).expect("member state serialises");
    (if ok { 200 } else { 503 }, body)
}

/// Asks the agent at `addr` for its state (`GET /health`), within `timeout`.
pub async fn fetch_state(addr: &str, timeout: Duration) -> Option<MemberState> {
    let fetch = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        let text = String::from_utf8(out).ok()?;
        let (_, body) = text.split_once("\r\n\r\n")?;
        serde_json::from_str(body).ok()
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
            },
            writable_leader,
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
        for (path, v, want) in cases {
            assert_eq!(respond(path, v).0, want, "{path} on {:?}", v.member);
        }
    }

    #[tokio::test]
    async fn served_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (_tx, rx) = watch::channel(Arc::new(view("running", false, true, false)));
        let server = tokio::spawn(serve(listener, rx));
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
        server.abort();
    }
}
