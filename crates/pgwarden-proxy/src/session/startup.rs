//! The startup phase: SSLRequest/GSSENCRequest, CancelRequest, StartupMessage.

use crate::tls::ClientStream;
use bytes::BufMut;
use pgwarden_protocol::backend;
use pgwarden_protocol::startup::{self, StartupPacket};

use crate::error::ProxyError;
use crate::framed::Framed;
use tokio_rustls::TlsAcceptor;

fn p_is_ssl(packet: &[u8]) -> bool {
    matches!(startup::parse(packet), Ok(StartupPacket::SslRequest))
}

/// What the first packets asked for.
pub enum Start {
    Session(Startup),
    Cancel { pid: i32, secret: i32 },
}

/// A client's StartupMessage, owned.
#[derive(Debug, Clone)]
pub struct Startup {
    pub user: String,
    pub database: String,
    pub params: Vec<(String, String)>,
}

/// The request codes of SSLRequest and GSSENCRequest, as PostgreSQL names them in its error.
const SSL_REQUEST: u32 = (1234 << 16) | 5679;
const GSSENC_REQUEST: u32 = (1234 << 16) | 5680;

/// Reads packets until a StartupMessage or CancelRequest. An SSLRequest is accepted ('S', then
/// the TLS handshake) when `tls` is set, else declined ('N'); GSSENCRequest is always declined.
/// A declined client goes on in plaintext or gives up. As on PostgreSQL, each request may come
/// once (a GSSENCRequest also not after TLS was set up); a repeated one is refused with 0A000.
pub async fn read(
    client: &mut Framed<ClientStream>,
    tls: Option<&TlsAcceptor>,
) -> Result<Start, ProxyError> {
    let (mut ssl_done, mut gss_done) = (false, false);
    loop {
        let packet = client.read_startup().await?;
        match startup::parse(&packet).map_err(ProxyError::ClientProtocol)? {
            StartupPacket::SslRequest if ssl_done => {
                return Err(ProxyError::UnsupportedFrontendProtocol(SSL_REQUEST))
            }
            StartupPacket::GssEncRequest if gss_done => {
                return Err(ProxyError::UnsupportedFrontendProtocol(GSSENC_REQUEST))
            }
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                if !client.rbuf.is_empty() {
                    // Data sent before our answer could be injected by a man in the middle.
                    return Err(ProxyError::ClientProtocol(
                        pgwarden_protocol::ProtocolError::Invalid {
                            what: "startup",
                            detail: "unexpected data after an encryption request".into(),
                        },
                    ));
                }
                let ssl = p_is_ssl(&packet);
                match (tls, &client.io) {
                    (Some(acceptor), ClientStream::Plain(_)) if ssl => {
                        client.wbuf.put_u8(b'S');
                        client.flush().await?;
                        client
                            .io
                            .upgrade(acceptor)
                            .await
                            .map_err(ProxyError::ClientIo)?;
                        (ssl_done, gss_done) = (true, true);
                    }
                    _ => {
                        client.wbuf.put_u8(b'N');
                        client.flush().await?;
                        if ssl {
                            ssl_done = true;
                        } else {
                            gss_done = true;
                        }
                    }
                }
            }
            StartupPacket::Cancel { pid, secret } => return Ok(Start::Cancel { pid, secret }),
            StartupPacket::Startup(p) => {
                let options: Vec<&str> = p.protocol_options().collect();
                if p.minor > 0 || !options.is_empty() {
                    backend::put_negotiate_protocol_version(&mut client.wbuf, 0, &options);
                }
                let user = p.user().ok_or(ProxyError::NoUser)?.to_string();
                let database = p.database().unwrap_or(&user).to_string();
                let params = p
                    .params
                    .iter()
                    .filter(|(k, _)| !k.starts_with("_pq_."))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                return Ok(Start::Session(Startup {
                    user,
                    database,
                    params,
                }));
            }
        }
    }
}
