//! The proxy's own settings (`pgwarden.route`, `pgwarden.consistency`): `SET`, `RESET` and
//! `SHOW` of them answered by the proxy between transactions, as a simple query or as a whole
//! extended-protocol batch, with named prepared statements of them remembered in the session.

use pgwarden_protocol::backend::{self, TxStatus};
use pgwarden_protocol::error_response::ErrorReport;
use pgwarden_protocol::frame::{message_len, MAX_MESSAGE};

use crate::session::checkout::Checkout;
use crate::session::route::{self as session_route, Override, ProxySetting, SessionRoute};

/// Answers `SET`, `RESET` or `SHOW` of `pgwarden.route` / `pgwarden.consistency`.
pub(super) fn answer_proxy_setting(
    setting: ProxySetting,
    route: &mut SessionRoute,
    checkout: &Checkout<'_>,
    out: &mut bytes::BytesMut,
) {
    run_setting(setting, route, checkout, out, true);
    backend::put_ready_for_query(out, TxStatus::Idle);
}

/// One message of a batch the proxy answers, with the setting it concerns.
enum Step {
    Parse(Vec<u8>, ProxySetting),
    Bind,
    DescribeStatement(ProxySetting),
    DescribePortal(ProxySetting),
    Execute(ProxySetting),
    /// A Close of a named statement of the proxy's (`Some`), or of the unnamed portal.
    Close(Option<Vec<u8>>),
}

fn cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = b.iter().position(|&c| c == 0)?;
    Some((&b[..i], &b[i + 1..]))
}

/// The steps of the batch at the front of `buf` (up to its Sync) and its length, if every
/// message in it is about the proxy's settings: Parse of one (named or unnamed, no declared
/// parameter types), Bind of the unnamed portal to one, Describe, Execute of the unnamed
/// portal, Close, Flush. `known` is the session's named statements.
fn plan(buf: &[u8], known: &[(Vec<u8>, ProxySetting)]) -> Option<(Vec<Step>, usize)> {
    let mut names: Vec<(Vec<u8>, ProxySetting)> = known.to_vec();
    let mut unnamed: Option<ProxySetting> = None;
    let mut portal: Option<ProxySetting> = None;
    let mut steps = Vec::new();
    let mut ours = false;
    let mut at = 0;
    let find = |names: &[(Vec<u8>, ProxySetting)], unnamed: &Option<ProxySetting>, name: &[u8]| {
        if name.is_empty() {
            unnamed.clone()
        } else {
            names
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| s.clone())
        }
    };
    loop {
        let n = message_len(&buf[at..], MAX_MESSAGE).ok()??;
        let (tag, body) = (buf[at], &buf[at + 5..at + n]);
        at += n;
        match tag {
            b'P' => {
                let (name, rest) = cstr(body)?;
                let (query, types) = cstr(rest)?;
                if types != [0, 0] {
                    return None;
                }
                let setting = session_route::proxy_setting(query)?;
                if name.is_empty() {
                    unnamed = Some(setting.clone());
                } else {
                    names.retain(|(n, _)| n != name);
                    names.push((name.to_vec(), setting.clone()));
                }
                steps.push(Step::Parse(name.to_vec(), setting));
                ours = true;
            }
            b'B' => {
                let (portal_name, rest) = cstr(body)?;
                let (name, _) = cstr(rest)?;
                if !portal_name.is_empty() {
                    return None;
                }
                let setting = find(&names, &unnamed, name)?;
                portal = Some(setting.clone());
                steps.push(Step::Bind);
                ours = true;
            }
            b'D' => {
                let (name, _) = cstr(body.get(1..)?)?;
                match body[0] {
                    b'S' => steps.push(Step::DescribeStatement(find(&names, &unnamed, name)?)),
                    b'P' if name.is_empty() => steps.push(Step::DescribePortal(portal.clone()?)),
                    _ => return None,
                }
            }
            b'E' if body.first() == Some(&0) => steps.push(Step::Execute(portal.clone()?)),
            b'C' => {
                let (name, _) = cstr(body.get(1..)?)?;
                match body[0] {
                    b'S' if !name.is_empty() => {
                        find(&names, &unnamed, name)?;
                        names.retain(|(n, _)| n != name);
                        steps.push(Step::Close(Some(name.to_vec())));
                        ours = true;
                    }
                    b'P' if name.is_empty() => steps.push(Step::Close(None)),
                    _ => return None,
                }
            }
            b'H' => {}
            b'S' => break,
            _ => return None,
        }
    }
    ours.then_some((steps, at))
}

/// A whole extended-protocol batch about the proxy's settings at the front of `buf` (see
/// [`plan`]): psycopg's unnamed Parse, Bind, Describe, Execute, Sync for
/// `execute("SET pgwarden.route = ...")`, or tokio-postgres's named Parse and Describe, then
/// Bind and Execute, then Close, each up to a Sync. Answered by the proxy as a server would
/// (an invalid value is an error that skips the rest of the batch); returns its length.
pub(super) fn answer_extended_setting(
    buf: &[u8],
    route: &mut SessionRoute,
    checkout: &Checkout<'_>,
    out: &mut bytes::BytesMut,
) -> Option<usize> {
    let (steps, len) = plan(buf, &route.statements)?;
    let rows = |out: &mut bytes::BytesMut, s: &ProxySetting| match s {
        ProxySetting::Show(name) => {
            backend::put_row_description(out, &[(&format!("pgwarden.{name}"), backend::TEXT_OID)])
        }
        _ => backend::put_no_data(out),
    };
    for step in steps {
        match step {
            Step::Parse(name, setting) => {
                if !name.is_empty() {
                    route.statements.retain(|(n, _)| *n != name);
                    route.statements.push((name, setting));
                }
                backend::put_parse_complete(out);
            }
            Step::Bind => backend::put_bind_complete(out),
            Step::DescribeStatement(s) => {
                backend::put_parameter_description(out, &[]);
                rows(out, &s);
            }
            Step::DescribePortal(s) => rows(out, &s),
            Step::Execute(s) => {
                if !run_setting(s, route, checkout, out, false) {
                    // An error: the rest of the batch is skipped, as a server skips it.
                    break;
                }
            }
            Step::Close(name) => {
                if let Some(name) = name {
                    route.statements.retain(|(n, _)| *n != name);
                }
                backend::put_close_complete(out);
            }
        }
    }
    backend::put_ready_for_query(out, TxStatus::Idle);
    Some(len)
}

/// Applies a proxy setting and writes its answer (a SHOW's row description too when
/// `describe`); false on an invalid value (its error written).
pub(super) fn run_setting(
    setting: ProxySetting,
    route: &mut SessionRoute,
    checkout: &Checkout<'_>,
    out: &mut bytes::BytesMut,
    describe: bool,
) -> bool {
    let default_consistency = checkout
        .shared()
        .map(|s| s.config().proxy.routing.consistency)
        .unwrap_or(pgwarden_config::Consistency::Session);
    let invalid = |out: &mut bytes::BytesMut, name: &str, value: &str, expected: &str| {
        ErrorReport::error(
            pgwarden_protocol::SqlState::INVALID_PARAMETER_VALUE,
            &format!("invalid value for parameter \"pgwarden.{name}\": \"{value}\" (expected {expected})"),
        )
        .put_error(out);
    };
    match setting {
        ProxySetting::Set("route", v) => match Override::parse(&v) {
            Some(o) => {
                route.over = o;
                backend::put_command_complete(out, "SET");
            }
            None => {
                invalid(out, "route", &v, "auto, primary or replica");
                return false;
            }
        },
        ProxySetting::Set(_, v) => match pgwarden_config::Consistency::parse(&v) {
            Some(k) => {
                route.consistency = k;
                backend::put_command_complete(out, "SET");
            }
            None => {
                invalid(out, "consistency", &v, "eventual, session or strong");
                return false;
            }
        },
        ProxySetting::Reset(name) => {
            if name == "route" {
                route.over = Override::Auto;
            } else {
                route.consistency = default_consistency;
            }
            backend::put_command_complete(out, "RESET");
        }
        ProxySetting::Show(name) => {
            let full = format!("pgwarden.{name}");
            let value = if name == "route" {
                route.over.as_str()
            } else {
                route.consistency.as_str()
            };
            if describe {
                backend::put_row_description(out, &[(&full, 25)]);
            }
            backend::put_data_row(out, &[Some(value)]);
            backend::put_command_complete(out, "SHOW");
        }
    }
    true
}
