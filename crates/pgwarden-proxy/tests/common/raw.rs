//! A client speaking the wire protocol message by message, for what drivers hide: exact
//! statement names, pipelines with a delayed Sync, ParameterStatus values, raw bytes.

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use pgwarden_protocol::backend::{Authentication, BackendMessage};
use pgwarden_protocol::frame::{decode_message, split, MAX_MESSAGE};
use pgwarden_protocol::frontend::{self, Target};
use pgwarden_protocol::scram::{self, ScramClient};
use pgwarden_protocol::startup;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Raw {
    stream: TcpStream,
    rbuf: BytesMut,
    /// Messages queued by the `put_*` helpers until `flush`.
    pub out: BytesMut,
    /// ParameterStatus values seen so far.
    pub params: Vec<(String, String)>,
    /// BackendKeyData: (pid, secret).
    pub key: Option<(i32, i32)>,
    /// The messages (`M` fields) of the NoticeResponses received during login.
    pub login_notices: Vec<String>,
}

/// A server message: its type and body.
pub type Msg = (u8, Bytes);

impl Raw {
    /// Logs in with SCRAM (or no password if the proxy trusts).
    pub async fn connect(
        addr: SocketAddr,
        user: &str,
        password: &str,
        db: &str,
        extra: &[(&str, &str)],
    ) -> Raw {
        let mut params = vec![("user", user), ("database", db)];
        params.extend_from_slice(extra);
        let mut packet = BytesMut::new();
        startup::put_startup(&mut packet, &params);
        Raw::connect_packet(addr, password, packet).await
    }

    /// Logs in with a startup packet of the caller's (bytes in any encoding).
    pub async fn connect_packet(addr: SocketAddr, password: &str, packet: BytesMut) -> Raw {
        let stream = TcpStream::connect(addr)
            .await
            .expect("connect to the proxy");
        let mut raw = Raw {
            stream,
            rbuf: BytesMut::new(),
            out: packet,
            params: Vec::new(),
            key: None,
            login_notices: Vec::new(),
        };
        raw.flush().await;
        let mut scram: Option<ScramClient> = None;
        loop {
            let (tag, body) = raw.recv().await;
            match BackendMessage::parse(tag, &body).expect("valid message") {
                BackendMessage::Authentication(Authentication::Sasl(_)) => {
                    let (c, first) =
                        ScramClient::new(scram::Credential::Password(password.to_string()));
                    frontend::put_sasl_initial(&mut raw.out, scram::MECHANISM, first.as_bytes());
                    scram = Some(c);
                    raw.flush().await;
                }
                BackendMessage::Authentication(Authentication::SaslContinue(data)) => {
                    let fin = scram
                        .as_mut()
                        .expect("SASL started")
                        .server_first(data)
                        .expect("server-first");
                    frontend::put_sasl_response(&mut raw.out, fin.as_bytes());
                    raw.flush().await;
                }
                BackendMessage::ParameterStatus { name, value } => {
                    raw.params.push((name.to_string(), value.to_string()))
                }
                BackendMessage::BackendKeyData { pid, secret } => raw.key = Some((pid, secret)),
                BackendMessage::ErrorResponse(e) => panic!("login failed: {:?}", e.message()),
                BackendMessage::ReadyForQuery(_) => return raw,
                BackendMessage::NoticeResponse(n) => raw
                    .login_notices
                    .push(n.message().unwrap_or_default().to_string()),
                _ => {}
            }
        }
    }

    /// The last value the server reported for `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub async fn flush(&mut self) {
        self.stream.write_all(&self.out).await.expect("write");
        self.out.clear();
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// The next server message; panics on EOF.
    pub async fn recv(&mut self) -> Msg {
        self.try_recv()
            .await
            .expect("the proxy closed the connection")
    }

    /// The next server message, or `None` at EOF.
    pub async fn try_recv(&mut self) -> Option<Msg> {
        loop {
            if let Some(frame) =
                decode_message(&mut self.rbuf, MAX_MESSAGE).expect("well-formed frame")
            {
                let (tag, body) = split(&frame);
                let body = Bytes::copy_from_slice(body);
                if tag == b'S' {
                    if let Ok(BackendMessage::ParameterStatus { name, value }) =
                        BackendMessage::parse(tag, &body)
                    {
                        self.params.push((name.to_string(), value.to_string()));
                    }
                }
                return Some((tag, body));
            }
            let n = tokio::time::timeout(
                std::time::Duration::from_secs(20),
                self.stream.read_buf(&mut self.rbuf),
            )
            .await
            .expect("an answer within 20 s")
            .ok()?;
            if n == 0 {
                return None;
            }
        }
    }

    /// Every message until the proxy closes the connection; `None` if it is still open after
    /// `within`.
    pub async fn until_closed(&mut self, within: std::time::Duration) -> Option<Vec<Msg>> {
        let mut all = Vec::new();
        let read_all = async {
            while let Some(m) = self.try_recv().await {
                all.push(m);
            }
        };
        tokio::time::timeout(within, read_all).await.ok()?;
        Some(all)
    }

    /// Messages up to and including the next ReadyForQuery, as their type letters plus the
    /// messages themselves.
    pub async fn until_ready(&mut self) -> (String, Vec<Msg>) {
        let mut tags = String::new();
        let mut msgs = Vec::new();
        loop {
            let m = self.recv().await;
            tags.push(m.0 as char);
            let done = m.0 == b'Z';
            msgs.push(m);
            if done {
                return (tags, msgs);
            }
        }
    }

    /// `sql` in the connection's client_encoding.
    pub fn query(&mut self, sql: impl AsRef<[u8]>) -> &mut Self {
        frontend::put_query(&mut self.out, sql);
        self
    }

    pub fn parse(&mut self, name: &str, sql: impl AsRef<[u8]>) -> &mut Self {
        frontend::put_parse(&mut self.out, name, sql.as_ref(), &[0, 0]);
        self
    }

    /// Bind with no parameters, text results.
    pub fn bind(&mut self, portal: &str, statement: &str) -> &mut Self {
        frontend::put_bind(&mut self.out, portal, statement, &[0, 0, 0, 0, 0, 0]);
        self
    }

    /// Bind with text parameters, text results.
    pub fn bind_params(&mut self, portal: &str, statement: &str, params: &[&[u8]]) -> &mut Self {
        let mut rest = vec![0, 0];
        rest.extend_from_slice(&(params.len() as u16).to_be_bytes());
        for p in params {
            rest.extend_from_slice(&(p.len() as u32).to_be_bytes());
            rest.extend_from_slice(p);
        }
        rest.extend_from_slice(&[0, 0]);
        frontend::put_bind(&mut self.out, portal, statement, &rest);
        self
    }

    pub fn describe_statement(&mut self, name: &str) -> &mut Self {
        frontend::put_describe(&mut self.out, Target::Statement, name);
        self
    }

    pub fn execute(&mut self, portal: &str) -> &mut Self {
        frontend::put_execute(&mut self.out, portal, 0);
        self
    }

    pub fn close_statement(&mut self, name: &str) -> &mut Self {
        frontend::put_close(&mut self.out, Target::Statement, name);
        self
    }

    pub fn sync(&mut self) -> &mut Self {
        frontend::put_sync(&mut self.out);
        self
    }
}

/// The text of the first column of every DataRow in `msgs`.
pub fn first_column(msgs: &[Msg]) -> Vec<Option<String>> {
    msgs.iter()
        .filter(|(t, _)| *t == b'D')
        .map(|(_, body)| {
            let len = i32::from_be_bytes(body[2..6].try_into().expect("4 bytes"));
            (len >= 0).then(|| String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned())
        })
        .collect()
}

/// The bytes of the first column of every DataRow in `msgs` (NULL as `None`).
pub fn first_column_bytes(msgs: &[Msg]) -> Vec<Option<Vec<u8>>> {
    msgs.iter()
        .filter(|(t, _)| *t == b'D')
        .map(|(_, body)| {
            let len = i32::from_be_bytes(body[2..6].try_into().expect("4 bytes"));
            (len >= 0).then(|| body[6..6 + len as usize].to_vec())
        })
        .collect()
}

/// The SQLSTATE of the first ErrorResponse in `msgs`.
pub fn error_code(msgs: &[Msg]) -> Option<String> {
    msgs.iter().find(|(t, _)| *t == b'E').and_then(|(t, body)| {
        match BackendMessage::parse(*t, body) {
            Ok(BackendMessage::ErrorResponse(e)) => e.code().map(|c| c.as_str().to_string()),
            _ => None,
        }
    })
}

/// Sends a CancelRequest for `key` to `addr`.
pub async fn cancel(addr: SocketAddr, key: (i32, i32)) {
    let mut s = TcpStream::connect(addr).await.expect("connect for cancel");
    let mut buf = BytesMut::new();
    startup::put_cancel_request(&mut buf, key.0, key.1);
    s.write_all(&buf).await.expect("send cancel");
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut sink)).await;
}
