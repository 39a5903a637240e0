//! Users not in `[[proxy.users]]`: their stored secret is looked up on the server with
//! `proxy.auth.auth_query`, run as `proxy.auth.auth_user` (itself a listed user) in the
//! database the client asks for, through an ordinary pool for that user. Results, including
//! "no such user", are kept for a short while so a burst of logins costs one query.
//!
//! A SCRAM verifier found this way lets the client log in with SCRAM and the proxy log into the
//! server by SCRAM pass-through; an md5 hash works with md5.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pgwarden_config::{Config, Secret, UserConfig};
use pgwarden_protocol::scram::Verifier;

use super::checkout::Checkout;
use crate::error::ProxyError;
use crate::server::{query_with_param, Credential};
use crate::Shared;

/// How long a looked-up secret (or its absence) is trusted.
const TTL: Duration = Duration::from_secs(10);
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// (database, user) -> when looked up, and the secret found (`None`: no such user).
type Entries = HashMap<(String, String), (Instant, Option<String>)>;

#[derive(Default)]
pub struct AuthQueryCache {
    entries: Mutex<Entries>,
}

impl AuthQueryCache {
    fn get(&self, key: &(String, String)) -> Option<Option<String>> {
        let entries = self.entries.lock().expect("auth cache lock");
        entries
            .get(key)
            .filter(|(at, _)| at.elapsed() < TTL)
            .map(|(_, secret)| secret.clone())
    }

    fn put(&self, key: (String, String), secret: Option<String>) {
        let mut entries = self.entries.lock().expect("auth cache lock");
        entries.retain(|_, (at, _)| at.elapsed() < TTL);
        entries.insert(key, (Instant::now(), secret));
    }
}

/// The user as the server knows it, or `None` (no `auth_user` configured, or no such user).
pub async fn lookup(
    shared: &Shared,
    config: &Config,
    database: &str,
    user: &str,
) -> Result<Option<UserConfig>, ProxyError> {
    let auth = &config.proxy.auth;
    let Some(auth_user) = &auth.auth_user else {
        return Ok(None);
    };
    let key = (database.to_string(), user.to_string());
    let secret = match shared.auth_cache.get(&key) {
        Some(s) => s,
        None => {
            let s = query(shared, config, auth_user, database, user).await?;
            shared.auth_cache.put(key, s.clone());
            s
        }
    };
    Ok(secret.map(|s| UserConfig {
        name: user.to_string(),
        password: Secret::new(s),
        pool_size: None,
    }))
}

async fn query(
    shared: &Shared,
    config: &Config,
    auth_user: &str,
    database: &str,
    user: &str,
) -> Result<Option<String>, ProxyError> {
    let listed = config
        .users
        .iter()
        .find(|u| u.name == auth_user)
        .ok_or_else(|| {
            ProxyError::AuthQuery(format!(
                "auth_user \"{auth_user}\" is not in [[proxy.users]]"
            ))
        })?;
    let password = listed.password.expose();
    if Verifier::parse(password).is_some() {
        return Err(ProxyError::AuthQuery(format!(
            "auth_user \"{auth_user}\" needs a plaintext (or md5) password to log into the server"
        )));
    }
    let group = shared.group(
        database,
        auth_user,
        Credential::Password(password.to_string()),
        config,
    );
    let mut checkout = Checkout::new(
        &group,
        &shared.topology,
        config.proxy.server_connect_timeout,
    );
    let mut lease = checkout.acquire().await?;
    let result = query_with_param(
        &mut lease.conn,
        &config.proxy.auth.auth_query,
        user,
        QUERY_TIMEOUT,
    )
    .await;
    let usage = Default::default();
    match &result {
        Ok(_) if !lease.conn.broken => checkout.release(lease, &usage, std::time::Instant::now()),
        _ => lease.discard(&usage),
    }
    match result? {
        Ok(rows) => Ok(rows
            .into_iter()
            .next()
            .and_then(|row| row.into_iter().nth(1).flatten())
            .filter(|s| !s.is_empty())),
        Err((code, message)) => Err(ProxyError::AuthQuery(format!(
            "auth_query failed ({code}): {message}"
        ))),
    }
}
