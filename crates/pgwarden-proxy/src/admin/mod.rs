//! The admin console: a client of an `admin_users` user on the database `pgwarden` talks to the
//! proxy itself, with simple queries:
//!
//! `SHOW HELP | POOLS | CLIENTS | SERVERS | STATS | NODES | LEADER | CONFIG | VERSION`, `RELOAD`,
//! `PAUSE [db]`, `RESUME [db]`, `KILL db`, `SHUTDOWN`.
//!
//! Columns follow PgBouncer's where a column means the same thing. `SET` is accepted and
//! ignored (drivers send it at login). The extended protocol is refused.

mod show;

use std::sync::Arc;

use crate::tls::ClientStream;
use pgwarden_protocol::backend::{self, TxStatus};
use pgwarden_protocol::error_response::{ErrorReport, Severity};
use pgwarden_protocol::frame::{split, MAX_MESSAGE};
use pgwarden_protocol::frontend::FrontendMessage;
use pgwarden_protocol::SqlState;

use crate::error::ProxyError;
use crate::framed::Framed;
use crate::registry::{ClientInfo, KillReason};
use crate::Shared;

pub use show::STATS_PERIOD_SECS;

/// A parsed console command.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Show(String),
    Reload,
    Pause(Option<String>),
    Resume(Option<String>),
    Kill(String),
    Shutdown,
    Set,
    Empty,
}

/// Parses one console statement (case-insensitive, an optional trailing `;`).
pub fn parse(sql: &str) -> Result<Command, String> {
    let text = sql.trim().trim_end_matches(';').trim();
    let words: Vec<&str> = text.split_whitespace().collect();
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let name = |w: &str| w.trim_matches('"').to_string();
    let cmd = match upper
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] => Command::Empty,
        ["SHOW", what] => Command::Show(what.to_ascii_lowercase()),
        ["RELOAD"] => Command::Reload,
        ["PAUSE"] => Command::Pause(None),
        ["PAUSE", _] => Command::Pause(Some(name(words[1]))),
        ["RESUME"] => Command::Resume(None),
        ["RESUME", _] => Command::Resume(Some(name(words[1]))),
        ["KILL", _] => Command::Kill(name(words[1])),
        ["SHUTDOWN"] => Command::Shutdown,
        ["SET", ..] => Command::Set,
        _ => {
            return Err(format!(
                "unknown admin command: {text}; SHOW HELP lists them"
            ))
        }
    };
    Ok(cmd)
}

/// What a command returns.
pub enum Reply {
    Table(show::Table),
    Done {
        tag: &'static str,
        notices: Vec<String>,
    },
    Error {
        code: SqlState,
        message: String,
        detail: Option<String>,
    },
}

fn error(code: SqlState, message: impl Into<String>) -> Reply {
    Reply::Error {
        code,
        message: message.into(),
        detail: None,
    }
}

async fn execute(cmd: Command, shared: &Shared) -> Reply {
    match cmd {
        Command::Empty => Reply::Done {
            tag: "",
            notices: vec![],
        },
        Command::Set => Reply::Done {
            tag: "SET",
            notices: vec![],
        },
        Command::Show(what) => match show::show(&what, shared) {
            Some(Reply::Done { tag, notices }) => Reply::Done { tag, notices },
            Some(r) => r,
            None => error(
                SqlState::SYNTAX_ERROR,
                format!("unknown SHOW item: {what}; SHOW HELP lists them"),
            ),
        },
        Command::Reload => match shared.reload() {
            Ok(restart) => Reply::Done {
                tag: "RELOAD",
                notices: restart
                    .into_iter()
                    .map(|s| format!("changed setting needs a restart to take effect: {s}"))
                    .collect(),
            },
            Err(e) => Reply::Error {
                code: SqlState::CONFIG_FILE_ERROR,
                message: "the new config is invalid; the running config stays".into(),
                detail: Some(e.lines().join("\n")),
            },
        },
        Command::Pause(db) => {
            if let Some(d) = &db {
                if d == crate::ADMIN_DATABASE {
                    return error(
                        SqlState::FEATURE_NOT_SUPPORTED,
                        "cannot pause the admin console",
                    );
                }
            }
            shared.pools.pause(db.as_deref()).await;
            Reply::Done {
                tag: "PAUSE",
                notices: vec![],
            }
        }
        Command::Resume(db) => {
            shared.pools.resume(db.as_deref());
            Reply::Done {
                tag: "RESUME",
                notices: vec![],
            }
        }
        Command::Kill(db) => {
            if db == crate::ADMIN_DATABASE {
                return error(
                    SqlState::FEATURE_NOT_SUPPORTED,
                    "cannot kill the admin console",
                );
            }
            let n = shared.kill(&db);
            Reply::Done {
                tag: "KILL",
                notices: vec![format!(
                    "ended {n} client(s) of database \"{db}\"; it stays paused until RESUME"
                )],
            }
        }
        Command::Shutdown => {
            shared.shutdown.raise(KillReason::Shutdown);
            Reply::Done {
                tag: "SHUTDOWN",
                notices: vec![],
            }
        }
    }
}

fn notice(message: &str) -> ErrorReport<'_> {
    ErrorReport::new(Severity::Notice, SqlState::SUCCESSFUL_COMPLETION, message)
}

fn write_reply(out: &mut bytes::BytesMut, reply: Reply) {
    match reply {
        Reply::Table(t) => {
            let columns: Vec<(&str, u32)> = t.columns.iter().map(|(n, o)| (*n, *o)).collect();
            backend::put_row_description(out, &columns);
            for row in &t.rows {
                let values: Vec<Option<&str>> = row.iter().map(|v| v.as_deref()).collect();
                backend::put_data_row(out, &values);
            }
            for n in &t.notices {
                notice(n).put_notice(out);
            }
            backend::put_command_complete(out, "SHOW");
        }
        Reply::Done { tag, notices } => {
            for n in &notices {
                notice(n).put_notice(out);
            }
            if tag.is_empty() {
                backend::put_empty_query_response(out);
            } else {
                backend::put_command_complete(out, tag);
            }
        }
        Reply::Error {
            code,
            message,
            detail,
        } => {
            let mut e = ErrorReport::error(code, &message);
            if let Some(d) = &detail {
                e = e.detail(d);
            }
            e.put_error(out);
        }
    }
}

/// Serves one console client until it leaves.
pub async fn run(
    client: &mut Framed<ClientStream>,
    shared: &Arc<Shared>,
    me: &ClientInfo,
) -> Result<(), ProxyError> {
    // After an error in the extended protocol, skip to Sync as a server would.
    let mut skipping = false;
    loop {
        let frame = tokio::select! {
            f = client.read_frame(MAX_MESSAGE) => f?,
            _ = me.kill.raised(KillReason::Shutdown) => return Err(ProxyError::ShuttingDown),
        };
        let (tag, body) = split(&frame);
        match tag {
            b'X' => return Ok(()),
            b'Q' => {
                let sql =
                    match FrontendMessage::parse(tag, body).map_err(ProxyError::ClientProtocol)? {
                        FrontendMessage::Query(q) => String::from_utf8_lossy(q).into_owned(),
                        _ => unreachable!("a Q frame parses as a Query"),
                    };
                // One command per query; several statements are refused as PgBouncer does.
                let reply = if pgwarden_sql::split(&sql).len() > 1 {
                    error(
                        SqlState::SYNTAX_ERROR,
                        "the admin console takes one command per query",
                    )
                } else {
                    match parse(&sql) {
                        Ok(cmd) => execute(cmd, shared).await,
                        Err(e) => error(SqlState::SYNTAX_ERROR, e),
                    }
                };
                write_reply(&mut client.wbuf, reply);
                backend::put_ready_for_query(&mut client.wbuf, TxStatus::Idle);
            }
            b'S' => {
                skipping = false;
                backend::put_ready_for_query(&mut client.wbuf, TxStatus::Idle);
            }
            b'H' => {}
            _ if skipping => {}
            _ => {
                skipping = true;
                ErrorReport::error(
                    SqlState::FEATURE_NOT_SUPPORTED,
                    "the admin console supports only simple queries",
                )
                .put_error(&mut client.wbuf);
            }
        }
        client.flush().await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        assert_eq!(parse("show pools;"), Ok(Command::Show("pools".into())));
        assert_eq!(parse("  SHOW  Stats "), Ok(Command::Show("stats".into())));
        assert_eq!(parse("PAUSE"), Ok(Command::Pause(None)));
        assert_eq!(parse("pause app"), Ok(Command::Pause(Some("app".into()))));
        assert_eq!(
            parse("RESUME \"App\""),
            Ok(Command::Resume(Some("App".into())))
        );
        assert_eq!(parse("KILL app"), Ok(Command::Kill("app".into())));
        assert_eq!(parse("reload"), Ok(Command::Reload));
        assert_eq!(parse("SHUTDOWN"), Ok(Command::Shutdown));
        assert_eq!(parse("SET application_name = 'psql'"), Ok(Command::Set));
        assert_eq!(parse(";"), Ok(Command::Empty));
        assert!(parse("KILL").is_err());
        assert!(parse("DROP TABLE x").is_err());
        assert!(parse("SHOW").is_err());
    }
}
