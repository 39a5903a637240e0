//! Opening a server connection and logging in.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwarden_core::Epoch;
use pgwarden_protocol::backend::{Authentication, BackendMessage};
use pgwarden_protocol::frame::{split, MAX_AUTH_MESSAGE, MAX_MESSAGE};
use pgwarden_protocol::scram::{self, ScramClient};
use pgwarden_protocol::{frontend, md5, startup, SqlState};
use tokio::net::TcpStream;

use super::{BackendKey, ServerConn, Target};
use crate::error::ProxyError;
use crate::framed::{Framed, Side};
use crate::registry::Servers;

/// How the proxy proves itself to a server.
#[derive(Clone)]
pub enum Credential {
    /// A plaintext password: works with SCRAM, md5 and cleartext.
    Password(String),
    /// SCRAM pass-through keys recovered from the client's own login.
    ScramKeys {
        client_key: [u8; 32],
        server_key: [u8; 32],
    },
    /// No secret: only a `trust` server accepts it.
    None,
}

/// Who to log in as.
#[derive(Clone)]
pub struct Login {
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub credential: Credential,
}

/// Connects and logs in within `timeout`.
pub async fn connect(
    target: &Target,
    login: &Login,
    epoch: Epoch,
    timeout: Duration,
    id: u64,
    registry: &Servers,
) -> Result<Box<ServerConn>, ProxyError> {
    let addr = target.addr();
    match tokio::time::timeout(timeout, connect_inner(target, login, epoch, id, registry)).await {
        Ok(r) => r,
        Err(_) => Err(ProxyError::ConnectTimeout { addr, timeout }),
    }
}

async fn connect_inner(
    target: &Target,
    login: &Login,
    epoch: Epoch,
    id: u64,
    registry: &Servers,
) -> Result<Box<ServerConn>, ProxyError> {
    let stream = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|source| ProxyError::Connect {
            addr: target.addr(),
            source,
        })?;
    stream.set_nodelay(true).map_err(ProxyError::ServerIo)?;
    let mut f = Framed::new(stream, Side::Server);
    startup::put_startup(
        &mut f.wbuf,
        &[
            ("user", &login.user),
            ("database", &login.database),
            ("application_name", &login.application_name),
        ],
    );
    f.flush().await?;
    authenticate(&mut f, login).await?;
    let mut params = BTreeMap::new();
    let mut key = BackendKey { pid: 0, secret: 0 };
    loop {
        let frame = f.read_frame(MAX_MESSAGE).await?;
        let (tag, body) = split(&frame);
        match BackendMessage::parse(tag, body).map_err(ProxyError::ServerProtocol)? {
            BackendMessage::ParameterStatus { name, value } => {
                params.insert(name.to_string(), value.to_string());
            }
            BackendMessage::BackendKeyData { pid, secret } => key = BackendKey { pid, secret },
            BackendMessage::ReadyForQuery(status) => {
                let now = Instant::now();
                let local = f.io.local_addr().ok();
                let entry = registry.register(id, target.addr(), local, key.pid);
                return Ok(Box::new(ServerConn {
                    info: entry.info.clone(),
                    entry,
                    framed: f,
                    target: Arc::new(target.clone()),
                    key,
                    params,
                    status,
                    epoch,
                    created: now,
                    retire_at: None,
                    last_used: now,
                    broken: false,
                    prepared: Default::default(),
                    applied: Default::default(),
                }));
            }
            BackendMessage::ErrorResponse(e) => return Err(refused(&e)),
            BackendMessage::NoticeResponse(_) => {}
            other => {
                return Err(ProxyError::ServerProtocol(
                    pgwarden_protocol::ProtocolError::Invalid {
                        what: "login",
                        detail: format!("unexpected {other:?}"),
                    },
                ))
            }
        }
    }
}

fn refused(e: &pgwarden_protocol::error_response::ErrorFields<'_>) -> ProxyError {
    ProxyError::ServerRefused {
        code: e.code().unwrap_or(SqlState::CONNECTION_FAILURE),
        message: e.message().unwrap_or("login refused").to_string(),
    }
}

async fn authenticate(f: &mut Framed<TcpStream>, login: &Login) -> Result<(), ProxyError> {
    let mut scram: Option<ScramClient> = None;
    loop {
        let frame = f.read_frame(MAX_AUTH_MESSAGE).await?;
        let (tag, body) = split(&frame);
        let auth = match BackendMessage::parse(tag, body).map_err(ProxyError::ServerProtocol)? {
            BackendMessage::Authentication(a) => a,
            BackendMessage::ErrorResponse(e) => return Err(refused(&e)),
            other => {
                return Err(ProxyError::ServerProtocol(
                    pgwarden_protocol::ProtocolError::Invalid {
                        what: "authentication",
                        detail: format!("unexpected {other:?}"),
                    },
                ))
            }
        };
        match auth {
            Authentication::Ok => return Ok(()),
            Authentication::CleartextPassword => {
                let Credential::Password(p) = &login.credential else {
                    return Err(ProxyError::UnsupportedServerAuth(
                        "cleartext password without a configured password".into(),
                    ));
                };
                frontend::put_password(&mut f.wbuf, p);
            }
            Authentication::Md5Password(salt) => {
                let Credential::Password(p) = &login.credential else {
                    return Err(ProxyError::UnsupportedServerAuth(
                        "md5 without a configured password".into(),
                    ));
                };
                let stored = if md5::is_stored(p) {
                    p.clone()
                } else {
                    md5::stored(&login.user, p)
                };
                frontend::put_password(&mut f.wbuf, &md5::response(&stored, salt));
            }
            Authentication::Sasl(mechs) => {
                if !mechs.contains(&scram::MECHANISM) {
                    return Err(ProxyError::UnsupportedServerAuth(mechs.join(", ")));
                }
                let cred = match &login.credential {
                    Credential::Password(p) => scram::Credential::Password(p.clone()),
                    Credential::ScramKeys {
                        client_key,
                        server_key,
                    } => scram::Credential::Keys {
                        client_key: *client_key,
                        server_key: *server_key,
                    },
                    Credential::None => {
                        return Err(ProxyError::UnsupportedServerAuth(
                            "SCRAM without a configured password".into(),
                        ))
                    }
                };
                let (client, first) = ScramClient::new(cred);
                frontend::put_sasl_initial(&mut f.wbuf, scram::MECHANISM, first.as_bytes());
                scram = Some(client);
            }
            Authentication::SaslContinue(data) => {
                let client = scram.as_mut().ok_or_else(|| unexpected("SASLContinue"))?;
                let fin = client
                    .server_first(data)
                    .map_err(|e| ProxyError::UnsupportedServerAuth(e.to_string()))?;
                frontend::put_sasl_response(&mut f.wbuf, fin.as_bytes());
            }
            Authentication::SaslFinal(data) => {
                let client = scram.as_ref().ok_or_else(|| unexpected("SASLFinal"))?;
                client
                    .server_final(data)
                    .map_err(|e| ProxyError::UnsupportedServerAuth(e.to_string()))?;
            }
            Authentication::Unsupported(code) => {
                return Err(ProxyError::UnsupportedServerAuth(format!(
                    "authentication request {code}"
                )))
            }
        }
        f.flush().await?;
    }
}

fn unexpected(what: &str) -> ProxyError {
    ProxyError::ServerProtocol(pgwarden_protocol::ProtocolError::Invalid {
        what: "authentication",
        detail: format!("unexpected {what}"),
    })
}

/// Sends Terminate and drops the connection.
pub async fn close(mut conn: Box<ServerConn>) {
    frontend::put_terminate(&mut conn.framed.wbuf);
    let _ = conn.framed.flush().await;
}
