//! The proxy's own simple queries on a server connection it holds.

use std::time::Duration;

use pgwarden_protocol::backend::BackendMessage;
use pgwarden_protocol::frame::{split, MAX_MESSAGE};
use pgwarden_protocol::{frontend, SqlState};

use super::ServerConn;
use crate::error::ProxyError;

/// What a query of ours produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// ParameterStatus messages, in order (also recorded in the connection's `params`).
    pub reported: Vec<(String, String)>,
    /// The first error, if any.
    pub error: Option<(SqlState, String)>,
}

/// Runs `sql` and reads up to its ReadyForQuery within `timeout`. Rows are discarded. On an I/O
/// error or timeout the connection is marked broken.
pub async fn simple_query(
    conn: &mut ServerConn,
    sql: &str,
    timeout: Duration,
) -> Result<Outcome, ProxyError> {
    let r = tokio::time::timeout(timeout, run(conn, sql)).await;
    match r {
        Ok(Ok(o)) => Ok(o),
        Ok(Err(e)) => {
            conn.broken = true;
            Err(e)
        }
        Err(_) => {
            conn.broken = true;
            Err(ProxyError::QueryTimeout(timeout))
        }
    }
}

async fn run(conn: &mut ServerConn, sql: &str) -> Result<Outcome, ProxyError> {
    frontend::put_query(&mut conn.framed.wbuf, sql);
    conn.framed.flush().await?;
    let mut out = Outcome::default();
    loop {
        let frame = conn.framed.read_frame(MAX_MESSAGE).await?;
        let (tag, body) = split(&frame);
        if !matches!(tag, b'S' | b'E' | b'Z') {
            continue;
        }
        match BackendMessage::parse(tag, body).map_err(ProxyError::ServerProtocol)? {
            BackendMessage::ParameterStatus { name, value } => {
                conn.params.insert(name.to_string(), value.to_string());
                out.reported.push((name.to_string(), value.to_string()));
            }
            BackendMessage::ErrorResponse(e) => {
                out.error.get_or_insert_with(|| {
                    (
                        e.code().unwrap_or(SqlState::INTERNAL_ERROR),
                        e.message().unwrap_or("error").to_string(),
                    )
                });
            }
            BackendMessage::ReadyForQuery(status) => {
                conn.status = status;
                return Ok(out);
            }
            _ => {}
        }
    }
}
