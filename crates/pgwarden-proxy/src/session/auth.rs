//! Authenticating clients: SCRAM-SHA-256, md5 or trust, against `[[proxy.users]]`.
//!
//! A user the proxy does not know goes through the same exchange against a random secret and
//! fails the same way, so user names cannot be probed.

use pgwarden_config::{AuthMethod, UserConfig};
use pgwarden_protocol::backend;
use pgwarden_protocol::frame::{split, MAX_AUTH_MESSAGE};
use pgwarden_protocol::frontend;
use pgwarden_protocol::scram::{self, ScramServer, Verifier};
use pgwarden_protocol::{md5, ProtocolError};
use std::collections::HashMap;
use std::sync::Mutex;

use crate::tls::ClientStream;
use rand::RngCore;

use crate::error::ProxyError;
use crate::framed::Framed;
use crate::server::Credential;

/// How a configured password is stored.
enum Stored {
    Plain(String),
    Scram(Verifier),
    Md5(String),
}

fn stored(user: &UserConfig) -> Stored {
    let p = user.password.expose();
    if let Some(v) = Verifier::parse(p) {
        Stored::Scram(v)
    } else if md5::is_stored(p) {
        Stored::Md5(p.to_string())
    } else {
        Stored::Plain(p.to_string())
    }
}

/// SCRAM verifiers derived from plaintext passwords, per user: deriving one costs thousands of
/// hash rounds, so it is done once per (user, password), not at every login.
#[derive(Default)]
pub struct VerifierCache {
    by_user: Mutex<HashMap<String, (String, Verifier)>>,
}

impl VerifierCache {
    fn get(&self, user: &str, password: &str) -> Verifier {
        if let Some((p, v)) = self.by_user.lock().expect("verifier cache lock").get(user) {
            if p == password {
                return v.clone();
            }
        }
        let v = Verifier::generate(password);
        self.by_user
            .lock()
            .expect("verifier cache lock")
            .insert(user.to_string(), (password.to_string(), v.clone()));
        v
    }
}

/// Runs the exchange; on success returns what to log into servers with.
pub async fn authenticate(
    client: &mut Framed<ClientStream>,
    method: AuthMethod,
    name: &str,
    user: Option<&UserConfig>,
    verifiers: &VerifierCache,
) -> Result<Credential, ProxyError> {
    let failed = || ProxyError::AuthFailed(name.to_string());
    let stored = match user {
        Some(u) => stored(u),
        None => {
            // Unknown user: a secret nobody knows, so the exchange runs and fails like a wrong
            // password.
            run_exchange(
                client,
                method,
                name,
                Stored::Scram(Verifier::decoy()),
                verifiers,
            )
            .await?;
            return Err(failed());
        }
    };
    run_exchange(client, method, name, stored, verifiers)
        .await?
        .ok_or_else(failed)
}

/// `Ok(None)` is a failed login.
async fn run_exchange(
    client: &mut Framed<ClientStream>,
    method: AuthMethod,
    name: &str,
    stored: Stored,
    verifiers: &VerifierCache,
) -> Result<Option<Credential>, ProxyError> {
    match (method, stored) {
        (AuthMethod::Trust, Stored::Plain(p)) => Ok(Some(Credential::Password(p))),
        (AuthMethod::Trust, Stored::Md5(h)) => Ok(Some(Credential::Password(h))),
        (AuthMethod::Trust, Stored::Scram(_)) => Ok(Some(Credential::None)),
        (AuthMethod::Md5, Stored::Plain(p)) => {
            let ok = md5_exchange(client, &md5::stored(name, &p)).await?;
            Ok(ok.then_some(Credential::Password(p)))
        }
        (AuthMethod::Md5, Stored::Md5(h)) => {
            let ok = md5_exchange(client, &h).await?;
            Ok(ok.then_some(Credential::Password(h)))
        }
        // As in PostgreSQL: md5 with a SCRAM secret uses SCRAM.
        (AuthMethod::Md5 | AuthMethod::ScramSha256, Stored::Scram(v)) => {
            let server_key = v.server_key;
            Ok(scram_exchange(client, v)
                .await?
                .map(|client_key| Credential::ScramKeys {
                    client_key,
                    server_key,
                }))
        }
        (AuthMethod::ScramSha256, Stored::Plain(p)) => {
            let v = verifiers.get(name, &p);
            Ok(scram_exchange(client, v)
                .await?
                .map(|_| Credential::Password(p)))
        }
        // As in PostgreSQL: SCRAM cannot be done with an md5 secret.
        (AuthMethod::ScramSha256, Stored::Md5(_)) => {
            tracing::warn!(
                user = name,
                "user has an md5 password but the method is scram-sha-256"
            );
            Ok(None)
        }
    }
}

async fn read_password_message(
    client: &mut Framed<ClientStream>,
) -> Result<bytes::Bytes, ProxyError> {
    let frame = client.read_frame(MAX_AUTH_MESSAGE).await?;
    if frame[0] != b'p' {
        return Err(ProxyError::ClientProtocol(ProtocolError::Invalid {
            what: "authentication",
            detail: format!(
                "expected a password message, got message type 0x{:02x}",
                frame[0]
            ),
        }));
    }
    Ok(frame)
}

async fn md5_exchange(client: &mut Framed<ClientStream>, stored: &str) -> Result<bool, ProxyError> {
    let mut salt = [0u8; 4];
    rand::thread_rng().fill_bytes(&mut salt);
    backend::put_auth_md5(&mut client.wbuf, salt);
    client.flush().await?;
    let frame = read_password_message(client).await?;
    let (_, body) = split(&frame);
    let answer = frontend::parse_password(body).map_err(ProxyError::ClientProtocol)?;
    Ok(md5::verify(stored, salt, answer))
}

/// Returns the client's ClientKey on success.
async fn scram_exchange(
    client: &mut Framed<ClientStream>,
    verifier: Verifier,
) -> Result<Option<[u8; 32]>, ProxyError> {
    backend::put_auth_sasl(&mut client.wbuf, &[scram::MECHANISM]);
    client.flush().await?;
    let frame = read_password_message(client).await?;
    let (_, body) = split(&frame);
    let (mechanism, data) =
        frontend::parse_sasl_initial(body).map_err(ProxyError::ClientProtocol)?;
    if mechanism != scram::MECHANISM {
        return Err(ProxyError::ClientProtocol(ProtocolError::Invalid {
            what: "SASL authentication",
            detail: format!("unsupported mechanism \"{mechanism}\""),
        }));
    }
    let (server, server_first) = match ScramServer::start(verifier, data.unwrap_or_default()) {
        Ok(x) => x,
        Err(e) => return Err(scram_protocol(e)),
    };
    backend::put_auth_sasl_continue(&mut client.wbuf, server_first.as_bytes());
    client.flush().await?;
    let frame = read_password_message(client).await?;
    // A SASLResponse's body is the client-final message itself.
    let (_, final_msg) = split(&frame);
    match server.finish(final_msg) {
        Ok(ok) => {
            backend::put_auth_sasl_final(&mut client.wbuf, ok.server_final.as_bytes());
            Ok(Some(ok.client_key))
        }
        Err(scram::ScramError::BadProof) => Ok(None),
        Err(e) => Err(scram_protocol(e)),
    }
}

fn scram_protocol(e: scram::ScramError) -> ProxyError {
    ProxyError::ClientProtocol(ProtocolError::Invalid {
        what: "SCRAM exchange",
        detail: e.to_string(),
    })
}
