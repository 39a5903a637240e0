//! SQL connections for set-up work, and quoting.

use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use crate::error::PgError;

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct ConnectSpec<'a> {
    pub host: &'a str,
    pub port: u16,
    pub user: &'a str,
    pub password: &'a str,
    pub dbname: &'a str,
    pub application_name: &'a str,
    pub timeout: Duration,
}

impl ConnectSpec<'_> {
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Connects over TCP; the connection task is spawned on the current runtime and ends when the
/// returned client is dropped.
pub async fn connect(spec: &ConnectSpec<'_>) -> Result<Client, PgError> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(spec.host)
        .port(spec.port)
        .user(spec.user)
        .password(spec.password)
        .dbname(spec.dbname)
        .application_name(spec.application_name)
        .connect_timeout(spec.timeout);
    let addr = spec.addr();
    let (client, conn) = tokio::time::timeout(spec.timeout, cfg.connect(NoTls))
        .await
        .map_err(|_| PgError::ConnectTimeout {
            addr: addr.clone(),
            timeout: spec.timeout,
        })?
        .map_err(|source| PgError::Connect { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "set-up connection closed");
        }
    });
    Ok(client)
}

/// A SQL string literal (standard_conforming_strings is on in every supported version).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A SQL identifier, always quoted.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Set-up statements run before any standby is attached; in `sync`/`quorum` mode their commits
/// would wait forever for one. They commit locally instead.
async fn commit_locally(client: &Client, addr: &str) -> Result<(), PgError> {
    client
        .batch_execute("SET synchronous_commit = local")
        .await
        .map_err(|source| query_error(addr, source))
}

/// Creates or updates a login role. The password is sent as a SCRAM verifier computed here, so
/// the plaintext never reaches the server or its logs.
pub async fn ensure_role(
    client: &Client,
    addr: &str,
    name: &str,
    password: &str,
    attributes: &str,
) -> Result<(), PgError> {
    commit_locally(client, addr).await?;
    let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
    let exists = client
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
        .await
        .map_err(|source| query_error(addr, source))?
        .is_some();
    let verb = if exists { "ALTER" } else { "CREATE" };
    let sql = format!(
        "{verb} ROLE {} WITH LOGIN {attributes} PASSWORD {}",
        quote_ident(name),
        quote_literal(&verifier)
    );
    client
        .batch_execute(&sql)
        .await
        .map_err(|source| query_error(addr, source))
}

/// Creates a database owned by `owner` unless it exists.
pub async fn ensure_database(
    client: &Client,
    addr: &str,
    name: &str,
    owner: &str,
) -> Result<(), PgError> {
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .map_err(|source| query_error(addr, source))?
        .is_some();
    if !exists {
        commit_locally(client, addr).await?;
        let sql = format!(
            "CREATE DATABASE {} OWNER {}",
            quote_ident(name),
            quote_ident(owner)
        );
        client
            .batch_execute(&sql)
            .await
            .map_err(|source| query_error(addr, source))?;
    }
    Ok(())
}

pub(crate) fn query_error(addr: &str, source: tokio_postgres::Error) -> PgError {
    PgError::Query {
        addr: addr.to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
