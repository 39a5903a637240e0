//! The first packet a client sends.

use std::borrow::Cow;

use bytes::{BufMut, BytesMut};

use crate::cursor::Cursor;
use crate::error::ProtocolError;
use crate::frame::{put_cstr, put_sized};

pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// Protocol 3.0.
pub const PROTOCOL_3_0: u32 = 3 << 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket<'a> {
    Startup(StartupParams<'a>),
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, secret: i32 },
}

/// A StartupMessage's parameters (`user`, `database`, `options`, `application_name`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupParams<'a> {
    /// The requested minor version of protocol 3 (a server answers > 0 with
    /// NegotiateProtocolVersion).
    pub minor: u16,
    /// Names and values; every one UTF-8 except an `application_name` that is not, which comes
    /// cleaned as PostgreSQL cleans any application name (see [`application_name`]).
    pub params: Vec<(&'a str, Cow<'a, str>)>,
}

impl<'a> StartupParams<'a> {
    /// The last value given for `key` (PostgreSQL takes the last, too).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_ref())
    }

    pub fn user(&self) -> Option<&str> {
        self.get("user").filter(|u| !u.is_empty())
    }

    /// `database`, defaulting to the user name as PostgreSQL does.
    pub fn database(&self) -> Option<&str> {
        self.get("database")
            .filter(|d| !d.is_empty())
            .or_else(|| self.user())
    }

    /// Protocol options (`_pq_.*`) the client asked for; we support none of them.
    pub fn protocol_options(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.params
            .iter()
            .filter(|(k, _)| k.starts_with("_pq_."))
            .map(|(k, _)| *k)
    }
}

/// Parses a whole packet from [`crate::frame::decode_startup`] (length word included).
pub fn parse(packet: &[u8]) -> Result<StartupPacket<'_>, ProtocolError> {
    let mut c = Cursor::new(packet, "startup packet");
    c.i32()?; // length, already checked by the framer
    let code = c.u32()?;
    match code {
        SSL_REQUEST_CODE => {
            c.finish()?;
            Ok(StartupPacket::SslRequest)
        }
        GSSENC_REQUEST_CODE => {
            c.finish()?;
            Ok(StartupPacket::GssEncRequest)
        }
        CANCEL_REQUEST_CODE => {
            let mut c = Cursor::new(c.rest(), "cancel request");
            let pid = c.i32()?;
            let secret = c.i32()?;
            c.finish()?;
            Ok(StartupPacket::Cancel { pid, secret })
        }
        _ => {
            let (major, minor) = ((code >> 16) as u16, (code & 0xffff) as u16);
            if major != 3 {
                return Err(ProtocolError::UnsupportedProtocol { major, minor });
            }
            let mut params = Vec::new();
            loop {
                let key = c.cstr()?;
                if key.is_empty() {
                    break;
                }
                let value = if key == "application_name" {
                    application_name(c.cstr_bytes()?)
                } else {
                    Cow::Borrowed(c.cstr()?)
                };
                params.push((key, value));
            }
            c.finish()?;
            Ok(StartupPacket::Startup(StartupParams { minor, params }))
        }
    }
}

/// An `application_name` as sent, if UTF-8 (the proxy cleans it later, as PostgreSQL does); if
/// not (a client whose encoding is not UTF-8), cleaned now with [`clean_ascii`]. PostgreSQL
/// takes any bytes here, so the login must not fail.
pub fn application_name(value: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(value) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(clean_ascii(value)),
    }
}

/// What PostgreSQL 15 does to an application name: each byte outside printable ASCII becomes
/// `?` (so a two-byte character becomes `??`).
pub fn clean_ascii(value: &[u8]) -> String {
    value
        .iter()
        .map(|&b| {
            if (b' '..=b'~').contains(&b) {
                b as char
            } else {
                '?'
            }
        })
        .collect()
}

/// A StartupMessage for protocol 3.0.
pub fn put_startup(buf: &mut BytesMut, params: &[(&str, &str)]) {
    put_sized(buf, |b| {
        b.put_u32(PROTOCOL_3_0);
        for (k, v) in params {
            put_cstr(b, k);
            put_cstr(b, v);
        }
        b.put_u8(0);
    });
}

pub fn put_ssl_request(buf: &mut BytesMut) {
    put_sized(buf, |b| b.put_u32(SSL_REQUEST_CODE));
}

pub fn put_cancel_request(buf: &mut BytesMut, pid: i32, secret: i32) {
    put_sized(buf, |b| {
        b.put_u32(CANCEL_REQUEST_CODE);
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::decode_startup;

    fn one(bytes: &BytesMut) -> bytes::Bytes {
        let mut b = bytes.clone();
        decode_startup(&mut b).expect("valid").expect("whole")
    }

    #[test]
    fn round_trips() {
        let mut buf = BytesMut::new();
        put_startup(
            &mut buf,
            &[("user", "app"), ("database", "db"), ("options", "-c x=1")],
        );
        let f = one(&buf);
        let StartupPacket::Startup(p) = parse(&f).expect("valid") else {
            panic!("not a startup")
        };
        assert_eq!(
            (p.user(), p.database(), p.get("options")),
            (Some("app"), Some("db"), Some("-c x=1"))
        );
        assert_eq!(p.minor, 0);

        let mut buf = BytesMut::new();
        put_cancel_request(&mut buf, 42, -7);
        assert_eq!(
            parse(&one(&buf)),
            Ok(StartupPacket::Cancel {
                pid: 42,
                secret: -7
            })
        );
        let mut buf = BytesMut::new();
        put_ssl_request(&mut buf);
        assert_eq!(parse(&one(&buf)), Ok(StartupPacket::SslRequest));
    }

    #[test]
    fn database_defaults_to_user() {
        let mut buf = BytesMut::new();
        put_startup(&mut buf, &[("user", "app")]);
        let f = one(&buf);
        let StartupPacket::Startup(p) = parse(&f).expect("valid") else {
            panic!()
        };
        assert_eq!(p.database(), Some("app"));
    }

    #[test]
    fn malformed_packets_are_errors() {
        let packet = |body: &[u8]| {
            let mut v = ((body.len() + 4) as i32).to_be_bytes().to_vec();
            v.extend_from_slice(body);
            v
        };
        let mut v3 = PROTOCOL_3_0.to_be_bytes().to_vec();
        // Missing final terminator.
        v3.extend_from_slice(b"user\0app\0");
        assert!(matches!(
            parse(&packet(&v3)),
            Err(ProtocolError::Truncated { .. } | ProtocolError::Unterminated { .. })
        ));
        // Key without value.
        let mut bad = PROTOCOL_3_0.to_be_bytes().to_vec();
        bad.extend_from_slice(b"user\0");
        assert!(parse(&packet(&bad)).is_err());
        // Trailing garbage after the terminator.
        let mut trailing = PROTOCOL_3_0.to_be_bytes().to_vec();
        trailing.extend_from_slice(b"user\0app\0\0xyz");
        assert!(matches!(
            parse(&packet(&trailing)),
            Err(ProtocolError::TrailingBytes { .. })
        ));
        // Invalid UTF-8 (anywhere but in application_name, below).
        let mut utf = PROTOCOL_3_0.to_be_bytes().to_vec();
        utf.extend_from_slice(b"user\0\xff\xfe\0\0");
        assert!(matches!(
            parse(&packet(&utf)),
            Err(ProtocolError::InvalidUtf8 { .. })
        ));
        let mut latin1 = PROTOCOL_3_0.to_be_bytes().to_vec();
        latin1.extend_from_slice(b"user\0u\0application_name\0caf\xe9 \xe0 la\0\0");
        let latin1 = packet(&latin1);
        let Ok(StartupPacket::Startup(p)) = parse(&latin1) else {
            panic!("a Latin-1 application_name is accepted")
        };
        assert_eq!(p.get("application_name"), Some("caf? ? la"));
        let mut utf8 = PROTOCOL_3_0.to_be_bytes().to_vec();
        utf8.extend_from_slice("user\0u\0application_name\0café\0\0".as_bytes());
        let utf8 = packet(&utf8);
        let Ok(StartupPacket::Startup(p)) = parse(&utf8) else {
            panic!("valid")
        };
        assert_eq!(p.get("application_name"), Some("café"), "UTF-8 as sent");
        // Protocol 2 and a cancel request of the wrong size.
        assert!(matches!(
            parse(&packet(&(2u32 << 16).to_be_bytes())),
            Err(ProtocolError::UnsupportedProtocol { major: 2, minor: 0 })
        ));
        let mut cancel = CANCEL_REQUEST_CODE.to_be_bytes().to_vec();
        cancel.extend_from_slice(&[0, 0, 0, 1]);
        assert!(parse(&packet(&cancel)).is_err());
    }

    #[test]
    fn newer_minor_versions_and_protocol_options_are_reported() {
        let mut body = (PROTOCOL_3_0 | 2).to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0u\0_pq_.compression\0on\0\0");
        let mut v = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        v.extend_from_slice(&body);
        let StartupPacket::Startup(p) = parse(&v).expect("valid") else {
            panic!()
        };
        assert_eq!(p.minor, 2);
        assert_eq!(
            p.protocol_options().collect::<Vec<_>>(),
            ["_pq_.compression"]
        );
    }
}
