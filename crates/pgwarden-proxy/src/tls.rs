//! TLS for clients (`proxy.client_tls`), with rustls: the acceptor made from the configured PEM
//! files, and the client stream that is plain or encrypted.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pgwarden_config::{ClientTlsConfig, TlsMode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, pki_types::CertificateDer, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Loads the certificate chain and key; `None` when TLS is off.
pub fn acceptor(config: &ClientTlsConfig) -> io::Result<Option<TlsAcceptor>> {
    if config.mode == TlsMode::Disable {
        return Ok(None);
    }
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("proxy.client_tls.{what}: {e}"),
        )
    };
    let (Some(cert), Some(key)) = (&config.cert, &config.key) else {
        return Err(bad("cert", &"a certificate and a key are required"));
    };
    let read = |what: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| bad(what, &format!("cannot read {}: {e}", path.display())))
    };
    let cert_pem = read("cert", cert)?;
    let key_pem = read("key", key)?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| bad("cert", &e))?;
    if certs.is_empty() {
        return Err(bad(
            "cert",
            &format!("no PEM certificate in {}", cert.display()),
        ));
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| bad("key", &e))?
        .ok_or_else(|| bad("key", &format!("no PEM private key in {}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("mode", &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad("key", &e))?;
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
}

/// A client's connection: plain, or TLS after an SSLRequest.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only while being upgraded.
    Upgrading,
}

impl crate::framed::TryWrite for ClientStream {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.try_write(buf),
            // TLS buffers records of its own: always through its writer.
            _ => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl ClientStream {
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// Runs the TLS handshake on a plain stream.
    pub async fn upgrade(&mut self, acceptor: &TlsAcceptor) -> io::Result<()> {
        let ClientStream::Plain(tcp) = std::mem::replace(self, ClientStream::Upgrading) else {
            return Err(io::Error::other("TLS requested twice"));
        };
        *self = ClientStream::Tls(Box::new(acceptor.accept(tcp).await?));
        Ok(())
    }
}

fn upgrading() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "connection is being upgraded to TLS",
    )
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            ClientStream::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            ClientStream::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            ClientStream::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            ClientStream::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }
}
