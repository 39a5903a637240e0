//! The routing classification table (`route_cases.txt`), against a stub catalog: `f_volatile`
//! is volatile, names starting `my_` or `not_looked_up` have not been looked up, every other
//! name is not volatile. The proxy's `routing` test runs each `read` case on a real standby.

use pgwarden_sql::route::{self, Decision, Kind, TxnMode, Volatility};

/// The cases: (expected, sql, line).
pub fn cases() -> Vec<(String, String, usize)> {
    include_str!("route_cases.txt")
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.starts_with('#') && !l.trim().is_empty())
        .map(|(i, l)| {
            let (want, sql) = l.split_once('\t').expect("expected<TAB>sql");
            (want.to_string(), sql.to_string(), i + 1)
        })
        .collect()
}

fn mode(prefix: &str, m: TxnMode) -> String {
    let ro = match m.read_only {
        Some(true) => "-ro",
        Some(false) => "-rw",
        None => "",
    };
    let ser = if m.serializable { "+ser" } else { "" };
    format!("{prefix}{ro}{ser}")
}

fn label(sql: &str) -> String {
    let r = route::classify(sql);
    let lookup = |f: &str| {
        if f == "f_volatile" {
            Some(Volatility::Volatile)
        } else if f.starts_with("my_") || f.starts_with("not_looked_up") {
            None
        } else {
            Some(Volatility::NotVolatile)
        }
    };
    match r.kind {
        Kind::Begin(m) => mode("begin", m),
        Kind::SetTransaction(m) => mode("settxn", m),
        Kind::Anywhere => "anywhere".into(),
        Kind::Write(_) => "write".into(),
        Kind::Read => match r.decide(|_| false, lookup) {
            Decision::Read => "read".into(),
            Decision::Write(_) => "write".into(),
            Decision::Unknown(_) => "unknown".into(),
        },
    }
}

#[test]
fn every_case_is_classified_as_expected() {
    let cases = cases();
    assert!(cases.len() >= 150, "{} cases", cases.len());
    let wrong: Vec<String> = cases
        .iter()
        .filter_map(|(want, sql, line)| {
            let got = label(sql);
            (got != *want).then(|| format!("line {line}: {sql:?}: want {want}, got {got}"))
        })
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn function_definitions_invalidate_the_catalog_answers() {
    for sql in [
        "CREATE FUNCTION g() RETURNS int LANGUAGE sql AS $$SELECT 1$$",
        "CREATE OR REPLACE FUNCTION g() RETURNS int LANGUAGE sql AS $$SELECT 1$$",
        "ALTER FUNCTION g() VOLATILE",
        "DROP FUNCTION g()",
        "CREATE PROCEDURE p() LANGUAGE sql AS $$SELECT 1$$",
        "SELECT 1; DROP FUNCTION g()",
    ] {
        assert!(route::classify(sql).changes_functions, "{sql}");
    }
    assert!(!route::classify("SELECT 'drop function g()'").changes_functions);
}
