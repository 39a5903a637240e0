//! Startup parameters: which ones become session settings, checking them against a server, and
//! the ParameterStatus values a client is shown at login.
//!
//! Server connections are opened with the pool's own login, so what a client asks for in its
//! startup packet (`client_encoding`, `DateStyle`, `options=-c search_path=...`, ...) becomes a
//! session setting the proxy replays (see `state`). Each (name, value) pair is tried once per
//! pool on a real server: a bad one fails the login with the server's own error, as it would
//! without the proxy, and the values the server reports for it are what the client is shown.
//! A login never waits for a server for this: when none is free, new values are shown as given
//! and the first checkout's replay checks them.

use std::collections::BTreeMap;
use std::time::Duration;

use super::checkout::Checkout;
use super::startup::Startup;
use super::state::startup_sql;
use crate::error::ProxyError;
use crate::pool::{Lease, Usage};
use crate::server::simple_query;

const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The settings a startup packet asks for, as (name, value), `options` expanded. `user`,
/// `database` and protocol options are not settings; replication connections are refused.
pub fn requested(start: &Startup) -> Result<Vec<(String, String)>, ProxyError> {
    let mut out = Vec::new();
    for (name, value) in &start.params {
        match name.as_str() {
            "user" | "database" => {}
            "replication" => {
                if !matches!(
                    value.to_ascii_lowercase().as_str(),
                    "false" | "off" | "no" | "0"
                ) {
                    return Err(ProxyError::Unsupported(
                        "replication connections are not supported through the proxy",
                    ));
                }
            }
            "options" => out.extend(parse_options(value)?),
            _ => out.push((name.clone(), value.clone())),
        }
    }
    Ok(out)
}

/// `-c name=value`, `-cname=value` and `--name=value`, split at unescaped whitespace with `\`
/// escaping the next character, as PostgreSQL reads the `options` startup parameter.
fn parse_options(options: &str) -> Result<Vec<(String, String)>, ProxyError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_ascii_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let bad = |w: &str| ProxyError::StartupOption(w.to_string());
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next().ok_or_else(|| bad(&w))?
        } else if let Some(s) = w.strip_prefix("-c").or_else(|| w.strip_prefix("--")) {
            s.to_string()
        } else {
            return Err(bad(&w));
        };
        let (name, value) = setting.split_once('=').ok_or_else(|| bad(&setting))?;
        if name.is_empty() {
            return Err(bad(&setting));
        }
        out.push((name.replace('-', "_"), value.to_string()));
    }
    Ok(out)
}

/// What PostgreSQL does to an `application_name`: cut to 63 bytes, then each byte outside
/// printable ASCII becomes `?`.
fn clean_application_name(v: &str) -> String {
    pgwarden_protocol::startup::clean_ascii(&v.as_bytes()[..v.len().min(63)])
}

/// The NOTICE PostgreSQL sends at login when it cuts an `application_name`.
fn truncation_notice(v: &str) -> Option<bytes::Bytes> {
    if v.len() <= 63 {
        return None;
    }
    let whole = pgwarden_protocol::startup::clean_ascii(v.as_bytes());
    let message = format!(
        "identifier \"{whole}\" will be truncated to \"{}\"",
        clean_application_name(v)
    );
    let mut out = bytes::BytesMut::new();
    pgwarden_protocol::error_response::ErrorReport::new(
        pgwarden_protocol::error_response::Severity::Notice,
        pgwarden_protocol::SqlState::NAME_TOO_LONG,
        &message,
    )
    .put_notice(&mut out);
    Some(out.freeze())
}

/// What a client is told at login and starts with.
pub struct LoggedIn {
    /// ParameterStatus values shown.
    pub shown: BTreeMap<String, String>,
    /// The settings its session starts with (lower-case name -> SQL).
    pub settings: BTreeMap<String, String>,
    /// NoticeResponse frames its startup parameters produced on a server.
    pub notices: Vec<bytes::Bytes>,
}

/// What the client is shown at login and the settings its session starts with. Checks pairs
/// this pool has not seen on a server, and learns the pool's server parameters on its first
/// login.
pub async fn login(
    checkout: &mut Checkout<'_>,
    requested: &[(String, String)],
) -> Result<LoggedIn, ProxyError> {
    let common = checkout.group.common.clone();
    let mut settings = BTreeMap::new();
    let mut unchecked = Vec::new();
    for (name, value) in requested {
        settings.insert(name.to_ascii_lowercase(), startup_sql(name, value));
        let pair = (name.to_ascii_lowercase(), value.clone());
        if pair.0 != "application_name" && common.startup_checks.get(&pair).is_none() {
            unchecked.push((name.clone(), pair));
        }
    }
    let mut shown = match common.params() {
        Some(p) if unchecked.is_empty() => p,
        // New values while every server is busy: a login does not wait for a server to check
        // them. They are shown as given and checked by the first checkout's replay instead (a
        // bad one then ends the session with the server's error).
        Some(p) => match checkout.try_acquire().await? {
            Some(lease) => check(checkout, lease, &unchecked).await?,
            None => p,
        },
        None => {
            let lease = checkout.acquire().await?;
            check(checkout, lease, &unchecked).await?
        }
    };
    let mut notices = Vec::new();
    for (name, value) in requested {
        let lower = name.to_ascii_lowercase();
        if lower == "application_name" {
            notices.extend(truncation_notice(value));
            shown.insert(
                "application_name".to_string(),
                clean_application_name(value),
            );
            continue;
        }
        match common.startup_checks.get(&(lower, value.clone())) {
            Some(Ok(accepted)) => {
                shown.extend(accepted.reported);
                notices.extend(accepted.notices);
            }
            Some(Err((code, message))) => return Err(ProxyError::ServerRefused { code, message }),
            // Not checked (no server was free, or the record is full): shown as given.
            None => {
                shown.insert(name.clone(), value.clone());
            }
        }
    }
    Ok(LoggedIn {
        shown,
        settings,
        notices,
    })
}

/// Sets each pair on one server connection, recording the outcomes; returns the server's
/// login parameters. The connection keeps the settings that worked (recorded as applied).
async fn check(
    checkout: &mut Checkout<'_>,
    mut lease: Lease,
    unchecked: &[(String, (String, String))],
) -> Result<BTreeMap<String, String>, ProxyError> {
    let common = checkout.group.common.clone();
    let baseline = common.params().unwrap_or_else(|| lease.conn.params.clone());
    let mut failure = None;
    for (name, pair) in unchecked {
        let sql = startup_sql(name, &pair.1);
        let outcome = match simple_query(&mut lease.conn, &sql, CHECK_TIMEOUT).await {
            Ok(o) => o,
            Err(e) => {
                lease.discard(&Usage::default());
                return Err(e);
            }
        };
        let checked = match outcome.error {
            None => {
                lease.conn.applied.insert(pair.0.clone(), sql);
                Ok(crate::pools::Accepted {
                    reported: outcome.reported,
                    notices: outcome.notices,
                })
            }
            Some(e) => {
                failure.get_or_insert_with(|| e.clone());
                Err(e)
            }
        };
        common.startup_checks.put(pair.clone(), checked);
    }
    checkout.release(lease, &Usage::default(), std::time::Instant::now());
    match failure {
        Some((code, message)) => Err(ProxyError::ServerRefused { code, message }),
        None => Ok(baseline),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn options_are_read_as_postgres_reads_them() {
        let got = parse_options(
            r"-c search_path=a,b  --statement-timeout=5s -cwork_mem=4MB -c my.v=x\ y",
        )
        .expect("valid");
        assert_eq!(
            got,
            pairs(&[
                ("search_path", "a,b"),
                ("statement_timeout", "5s"),
                ("work_mem", "4MB"),
                ("my.v", "x y")
            ])
        );
        for bad in ["-B 100", "-c", "-c novalue", "--=x"] {
            assert!(parse_options(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn requested_settings() {
        let start = Startup {
            user: "app".into(),
            database: "app".into(),
            params: pairs(&[
                ("user", "app"),
                ("database", "app"),
                ("client_encoding", "UTF8"),
                ("options", "-c TimeZone=UTC"),
                ("replication", "false"),
            ]),
        };
        assert_eq!(
            requested(&start).expect("ok"),
            pairs(&[("client_encoding", "UTF8"), ("TimeZone", "UTC")])
        );
        let repl = Startup {
            params: pairs(&[("replication", "database")]),
            ..start
        };
        assert!(requested(&repl).is_err());
    }

    #[test]
    fn application_names_are_cleaned_like_postgres_does() {
        assert_eq!(clean_application_name("psql"), "psql");
        assert_eq!(clean_application_name("héllo\n"), "h??llo?");
        assert_eq!(clean_application_name(&"x".repeat(100)).len(), 63);
    }
}
