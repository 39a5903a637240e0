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
    /// NoticeResponse frames, whole.
    pub notices: Vec<bytes::Bytes>,
}

/// Runs `sql` and reads up to its ReadyForQuery within `timeout`. Rows are discarded. On an I/O
/// error or timeout the connection is marked broken.
pub async fn simple_query(
    conn: &mut ServerConn,
    sql: &str,
    timeout: Duration,
) -> Result<Outcome, ProxyError> {
    let r = tokio::time::timeout(timeout, run(conn, sql)).await;
    settle(conn, r, timeout)
}

/// A query of ours that failed or ran out of time leaves the connection in an unknown state:
/// it is marked broken.
fn settle<T>(
    conn: &mut ServerConn,
    r: Result<Result<T, ProxyError>, tokio::time::error::Elapsed>,
    timeout: Duration,
) -> Result<T, ProxyError> {
    let e = match r {
        Ok(Ok(o)) => return Ok(o),
        Ok(Err(e)) => e,
        Err(_) => ProxyError::QueryTimeout(timeout),
    };
    conn.broken = true;
    Err(e)
}

async fn run(conn: &mut ServerConn, sql: &str) -> Result<Outcome, ProxyError> {
    frontend::put_query(&mut conn.framed.wbuf, sql);
    conn.framed.flush().await?;
    let mut out = Outcome::default();
    loop {
        let frame = conn.framed.read_frame(MAX_MESSAGE).await?;
        let (tag, body) = split(&frame);
        if tag == b'N' {
            out.notices.push(bytes::Bytes::copy_from_slice(&frame[..]));
            continue;
        }
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

/// The proxy's WAL position queries.
pub const INSERT_LSN: &str = "SELECT pg_catalog.pg_current_wal_insert_lsn()::text";
pub const REPLAY_LSN: &str = "SELECT pg_catalog.pg_last_wal_replay_lsn()::text";

/// Runs one of the position queries: the position, `None` when the server gave none (an
/// error, NULL: not a standby), `Err` when the connection failed (marked broken).
pub async fn query_lsn(
    conn: &mut ServerConn,
    sql: &str,
    timeout: Duration,
) -> Result<Option<pgwarden_core::Lsn>, ProxyError> {
    let rows = query_rows(conn, sql, &[], timeout).await?;
    Ok(rows.ok().and_then(|rows| {
        rows.into_iter()
            .next()
            .and_then(|r| r.into_iter().next().flatten())
            .and_then(|s| s.parse().ok())
    }))
}

/// Rows of text values, or the server's error.
pub type Rows = Result<Vec<Vec<Option<String>>>, (SqlState, String)>;

/// Runs `sql` with one text parameter through the extended protocol and returns its rows (text
/// values) or the server's error, within `timeout`.
pub async fn query_with_param(
    conn: &mut ServerConn,
    sql: &str,
    param: &str,
    timeout: Duration,
) -> Result<Rows, ProxyError> {
    query_rows(conn, sql, &[param], timeout).await
}

/// Runs `sql` with text parameters through the extended protocol and returns its rows (text
/// values) or the server's error, within `timeout`.
pub async fn query_rows(
    conn: &mut ServerConn,
    sql: &str,
    params: &[&str],
    timeout: Duration,
) -> Result<Rows, ProxyError> {
    let r = tokio::time::timeout(timeout, run_with_params(conn, sql, params)).await;
    settle(conn, r, timeout)
}

async fn run_with_params(
    conn: &mut ServerConn,
    sql: &str,
    params: &[&str],
) -> Result<Rows, ProxyError> {
    use bytes::BufMut;
    let mut bind = bytes::BytesMut::new();
    bind.put_i16(0); // parameters in text
    bind.put_i16(params.len() as i16);
    for param in params {
        bind.put_i32(param.len() as i32);
        bind.put_slice(param.as_bytes());
    }
    bind.put_i16(0); // results in text
    let w = &mut conn.framed.wbuf;
    frontend::put_parse(w, "", sql.as_bytes(), &[0, 0]);
    frontend::put_bind(w, "", "", &bind);
    frontend::put_execute(w, "", 0);
    frontend::put_sync(w);
    conn.framed.flush().await?;
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let frame = conn.framed.read_frame(MAX_MESSAGE).await?;
        let (tag, body) = split(&frame);
        match tag {
            b'D' => rows.push(data_row(body).map_err(ProxyError::ServerProtocol)?),
            b'E' | b'Z' | b'S' => {
                match BackendMessage::parse(tag, body).map_err(ProxyError::ServerProtocol)? {
                    BackendMessage::ErrorResponse(e) => {
                        error.get_or_insert_with(|| {
                            (
                                e.code().unwrap_or(SqlState::INTERNAL_ERROR),
                                e.message().unwrap_or("error").to_string(),
                            )
                        });
                    }
                    BackendMessage::ParameterStatus { name, value } => {
                        conn.params.insert(name.to_string(), value.to_string());
                    }
                    BackendMessage::ReadyForQuery(status) => {
                        conn.status = status;
                        return Ok(match error {
                            Some(e) => Err(e),
                            None => Ok(rows),
                        });
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

/// A DataRow's values as text.
fn data_row(body: &[u8]) -> Result<Vec<Option<String>>, pgwarden_protocol::ProtocolError> {
    let bad = || pgwarden_protocol::ProtocolError::Invalid {
        what: "DataRow",
        detail: "truncated".into(),
    };
    let n = i16::from_be_bytes(body.get(0..2).ok_or_else(bad)?.try_into().expect("2 bytes"));
    let mut at = 2;
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = i32::from_be_bytes(
            body.get(at..at + 4)
                .ok_or_else(bad)?
                .try_into()
                .expect("4 bytes"),
        );
        at += 4;
        if len < 0 {
            out.push(None);
            continue;
        }
        let v = body.get(at..at + len as usize).ok_or_else(bad)?;
        out.push(Some(String::from_utf8_lossy(v).into_owned()));
        at += len as usize;
    }
    Ok(out)
}
