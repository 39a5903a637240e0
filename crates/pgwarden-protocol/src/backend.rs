//! Messages from the server: decoding the ones the proxy looks at, building the ones it sends.

use bytes::{BufMut, BytesMut};

use crate::cursor::Cursor;
use crate::error::ProtocolError;
use crate::error_response::ErrorFields;
use crate::frame::{put_cstr, put_message};

/// The transaction status in ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TxStatus {
    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication<'a> {
    Ok,
    CleartextPassword,
    Md5Password([u8; 4]),
    Sasl(Vec<&'a str>),
    SaslContinue(&'a [u8]),
    SaslFinal(&'a [u8]),
    /// Kerberos, GSS, SSPI: not supported by the proxy.
    Unsupported(i32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage<'a> {
    Authentication(Authentication<'a>),
    BackendKeyData {
        pid: i32,
        secret: i32,
    },
    /// In the client's encoding (a value may not be UTF-8): see [`Cursor::cstr_lossy`].
    ParameterStatus {
        name: std::borrow::Cow<'a, str>,
        value: std::borrow::Cow<'a, str>,
    },
    ReadyForQuery(TxStatus),
    ErrorResponse(ErrorFields<'a>),
    NoticeResponse(ErrorFields<'a>),
    CommandComplete(&'a str),
    ParseComplete,
    BindComplete,
    CloseComplete,
    NoData,
    EmptyQueryResponse,
    PortalSuspended,
    CopyInResponse,
    CopyOutResponse,
    CopyBothResponse,
    CopyData(&'a [u8]),
    CopyDone,
    NotificationResponse {
        pid: i32,
        channel: &'a str,
        payload: &'a str,
    },
    /// RowDescription, DataRow, ParameterDescription, NegotiateProtocolVersion, FunctionCallResponse:
    /// forwarded as they are.
    Other(u8),
}

impl<'a> BackendMessage<'a> {
    pub fn parse(tag: u8, body: &'a [u8]) -> Result<Self, ProtocolError> {
        let empty = |what, msg| Cursor::new(body, what).finish().map(|_| msg);
        Ok(match tag {
            b'R' => BackendMessage::Authentication(parse_auth(body)?),
            b'K' => {
                let mut c = Cursor::new(body, "BackendKeyData message");
                let (pid, secret) = (c.i32()?, c.i32()?);
                c.finish()?;
                BackendMessage::BackendKeyData { pid, secret }
            }
            b'S' => {
                let mut c = Cursor::new(body, "ParameterStatus message");
                let (name, value) = (c.cstr_lossy()?, c.cstr_lossy()?);
                c.finish()?;
                BackendMessage::ParameterStatus { name, value }
            }
            b'Z' => {
                let mut c = Cursor::new(body, "ReadyForQuery message");
                let status = match c.u8()? {
                    b'I' => TxStatus::Idle,
                    b'T' => TxStatus::InTransaction,
                    b'E' => TxStatus::Failed,
                    other => {
                        return Err(ProtocolError::Invalid {
                            what: "ReadyForQuery message",
                            detail: format!("transaction status 0x{other:02x}"),
                        })
                    }
                };
                c.finish()?;
                BackendMessage::ReadyForQuery(status)
            }
            b'E' => BackendMessage::ErrorResponse(ErrorFields::parse(body)?),
            b'N' => BackendMessage::NoticeResponse(ErrorFields::parse(body)?),
            b'C' => {
                let mut c = Cursor::new(body, "CommandComplete message");
                let tag = c.cstr()?;
                c.finish()?;
                BackendMessage::CommandComplete(tag)
            }
            b'1' => empty("ParseComplete message", BackendMessage::ParseComplete)?,
            b'2' => empty("BindComplete message", BackendMessage::BindComplete)?,
            b'3' => empty("CloseComplete message", BackendMessage::CloseComplete)?,
            b'n' => empty("NoData message", BackendMessage::NoData)?,
            b'I' => empty(
                "EmptyQueryResponse message",
                BackendMessage::EmptyQueryResponse,
            )?,
            b's' => empty("PortalSuspended message", BackendMessage::PortalSuspended)?,
            b'c' => empty("CopyDone message", BackendMessage::CopyDone)?,
            b'G' => BackendMessage::CopyInResponse,
            b'H' => BackendMessage::CopyOutResponse,
            b'W' => BackendMessage::CopyBothResponse,
            b'd' => BackendMessage::CopyData(body),
            b'A' => {
                let mut c = Cursor::new(body, "NotificationResponse message");
                let pid = c.i32()?;
                let (channel, payload) = (c.cstr()?, c.cstr()?);
                c.finish()?;
                BackendMessage::NotificationResponse {
                    pid,
                    channel,
                    payload,
                }
            }
            b'T' | b'D' | b't' | b'v' | b'V' => BackendMessage::Other(tag),
            other => return Err(ProtocolError::UnknownMessage(other)),
        })
    }
}

fn parse_auth(body: &[u8]) -> Result<Authentication<'_>, ProtocolError> {
    const WHAT: &str = "authentication request";
    let mut c = Cursor::new(body, WHAT);
    let auth = match c.i32()? {
        0 => Authentication::Ok,
        3 => Authentication::CleartextPassword,
        5 => Authentication::Md5Password(c.bytes(4)?.try_into().expect("4 bytes")),
        10 => {
            let mut mechs = Vec::new();
            loop {
                let m = c.cstr()?;
                if m.is_empty() {
                    break;
                }
                mechs.push(m);
            }
            Authentication::Sasl(mechs)
        }
        11 => Authentication::SaslContinue(c.rest()),
        12 => Authentication::SaslFinal(c.rest()),
        other => Authentication::Unsupported(other),
    };
    if !matches!(auth, Authentication::Unsupported(_)) {
        c.finish()?;
    }
    Ok(auth)
}

pub fn put_auth_ok(buf: &mut BytesMut) {
    put_message(buf, b'R', |b| b.put_i32(0));
}

pub fn put_auth_cleartext(buf: &mut BytesMut) {
    put_message(buf, b'R', |b| b.put_i32(3));
}

pub fn put_auth_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    put_message(buf, b'R', |b| {
        b.put_i32(5);
        b.put_slice(&salt);
    });
}

pub fn put_auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    put_message(buf, b'R', |b| {
        b.put_i32(10);
        for m in mechanisms {
            put_cstr(b, m);
        }
        b.put_u8(0);
    });
}

pub fn put_auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    put_message(buf, b'R', |b| {
        b.put_i32(11);
        b.put_slice(data);
    });
}

pub fn put_auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    put_message(buf, b'R', |b| {
        b.put_i32(12);
        b.put_slice(data);
    });
}

pub fn put_backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    put_message(buf, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

pub fn put_parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    put_message(buf, b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

pub fn put_ready_for_query(buf: &mut BytesMut, status: TxStatus) {
    put_message(buf, b'Z', |b| b.put_u8(status.byte()));
}

pub fn put_command_complete(buf: &mut BytesMut, tag: &str) {
    put_message(buf, b'C', |b| put_cstr(b, tag));
}

pub fn put_parse_complete(buf: &mut BytesMut) {
    put_message(buf, b'1', |_| {});
}

pub fn put_bind_complete(buf: &mut BytesMut) {
    put_message(buf, b'2', |_| {});
}

pub fn put_close_complete(buf: &mut BytesMut) {
    put_message(buf, b'3', |_| {});
}

/// ParameterDescription: the parameter type OIDs of a described statement.
pub fn put_parameter_description(buf: &mut BytesMut, oids: &[u32]) {
    put_message(buf, b't', |b| {
        b.put_i16(i16::try_from(oids.len()).expect("few parameters"));
        for o in oids {
            b.put_u32(*o);
        }
    });
}

pub fn put_no_data(buf: &mut BytesMut) {
    put_message(buf, b'n', |_| {});
}

pub fn put_empty_query_response(buf: &mut BytesMut) {
    put_message(buf, b'I', |_| {});
}

/// NegotiateProtocolVersion: the newest minor version we support and the options we ignore.
pub fn put_negotiate_protocol_version(buf: &mut BytesMut, minor: i32, unsupported: &[&str]) {
    put_message(buf, b'v', |b| {
        b.put_i32(minor);
        b.put_i32(i32::try_from(unsupported.len()).expect("few options"));
        for o in unsupported {
            put_cstr(b, o);
        }
    });
}

/// OID of `text`, the type of every column the proxy's own result sets have.
pub const TEXT_OID: u32 = 25;
/// OID of `int8`.
pub const INT8_OID: u32 = 20;

/// A RowDescription of text-format columns, each `(name, type oid)`.
pub fn put_row_description(buf: &mut BytesMut, columns: &[(&str, u32)]) {
    put_message(buf, b'T', |b| {
        b.put_i16(i16::try_from(columns.len()).expect("few columns"));
        for (name, oid) in columns {
            put_cstr(b, name);
            b.put_u32(0); // table oid
            b.put_i16(0); // column number
            b.put_u32(*oid);
            b.put_i16(if *oid == INT8_OID { 8 } else { -1 });
            b.put_i32(-1); // type modifier
            b.put_i16(0); // text format
        }
    });
}

/// A DataRow of text values (`None` is NULL).
pub fn put_data_row(buf: &mut BytesMut, values: &[Option<&str>]) {
    put_message(buf, b'D', |b| {
        b.put_i16(i16::try_from(values.len()).expect("few columns"));
        for v in values {
            match v {
                None => b.put_i32(-1),
                Some(s) => {
                    b.put_i32(i32::try_from(s.len()).expect("small values"));
                    b.put_slice(s.as_bytes());
                }
            }
        }
    });
}

/// The first column of a DataRow body (after the type and length) as text, if it is present,
/// not NULL and UTF-8; `None` for anything else, malformed bodies included.
pub fn first_text(body: &[u8]) -> Option<&str> {
    let count = i16::from_be_bytes(body.get(0..2)?.try_into().ok()?);
    if count < 1 {
        return None;
    }
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    let len = usize::try_from(len).ok()?;
    std::str::from_utf8(body.get(6..6 + len)?).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn first_text_of_a_data_row() {
        let mut b = bytes::BytesMut::new();
        super::put_data_row(&mut b, &[Some("0/3000148"), Some("x")]);
        assert_eq!(super::first_text(&b[5..]), Some("0/3000148"));
        let mut null = bytes::BytesMut::new();
        super::put_data_row(&mut null, &[None]);
        assert_eq!(super::first_text(&null[5..]), None);
        for bad in [
            &b""[..],
            b"\0",
            b"\0\x01\0\0\0\x09abc",
            b"\0\0",
            b"\xff\xff",
        ] {
            assert_eq!(super::first_text(bad), None, "{bad:?}");
        }
    }

    use super::*;
    use crate::error_response::ErrorReport;
    use crate::frame::{decode_message, split, MAX_MESSAGE};
    use crate::sqlstate::SqlState;

    #[test]
    fn every_built_message_decodes() {
        let mut buf = BytesMut::new();
        put_auth_ok(&mut buf);
        put_auth_cleartext(&mut buf);
        put_auth_md5(&mut buf, [1, 2, 3, 4]);
        put_auth_sasl(&mut buf, &["SCRAM-SHA-256"]);
        put_auth_sasl_continue(&mut buf, b"r=abc");
        put_auth_sasl_final(&mut buf, b"v=xyz");
        put_backend_key_data(&mut buf, 7, -9);
        put_parameter_status(&mut buf, "TimeZone", "UTC");
        put_ready_for_query(&mut buf, TxStatus::InTransaction);
        put_command_complete(&mut buf, "SELECT 1");
        put_parse_complete(&mut buf);
        put_bind_complete(&mut buf);
        put_close_complete(&mut buf);
        put_no_data(&mut buf);
        put_empty_query_response(&mut buf);
        put_row_description(&mut buf, &[("a", TEXT_OID), ("b", INT8_OID)]);
        put_data_row(&mut buf, &[Some("x"), None]);
        put_negotiate_protocol_version(&mut buf, 0, &["_pq_.x"]);
        ErrorReport::error(SqlState::QUERY_CANCELED, "canceled").put_notice(&mut buf);
        let mut msgs = Vec::new();
        let mut frames = Vec::new();
        while let Some(f) = decode_message(&mut buf, MAX_MESSAGE).expect("valid") {
            frames.push(f);
        }
        for f in &frames {
            let (tag, body) = split(f);
            msgs.push(BackendMessage::parse(tag, body).expect("valid"));
        }
        assert_eq!(msgs[0], BackendMessage::Authentication(Authentication::Ok));
        assert_eq!(
            msgs[1],
            BackendMessage::Authentication(Authentication::CleartextPassword)
        );
        assert_eq!(
            msgs[2],
            BackendMessage::Authentication(Authentication::Md5Password([1, 2, 3, 4]))
        );
        assert_eq!(
            msgs[3],
            BackendMessage::Authentication(Authentication::Sasl(vec!["SCRAM-SHA-256"]))
        );
        assert_eq!(
            msgs[4],
            BackendMessage::Authentication(Authentication::SaslContinue(b"r=abc"))
        );
        assert_eq!(
            msgs[5],
            BackendMessage::Authentication(Authentication::SaslFinal(b"v=xyz"))
        );
        assert_eq!(
            msgs[6],
            BackendMessage::BackendKeyData { pid: 7, secret: -9 }
        );
        assert_eq!(
            msgs[7],
            BackendMessage::ParameterStatus {
                name: "TimeZone".into(),
                value: "UTC".into()
            }
        );
        assert_eq!(
            msgs[8],
            BackendMessage::ReadyForQuery(TxStatus::InTransaction)
        );
        assert_eq!(msgs[9], BackendMessage::CommandComplete("SELECT 1"));
        assert_eq!(
            &msgs[10..15],
            &[
                BackendMessage::ParseComplete,
                BackendMessage::BindComplete,
                BackendMessage::CloseComplete,
                BackendMessage::NoData,
                BackendMessage::EmptyQueryResponse
            ]
        );
        assert_eq!(msgs[15], BackendMessage::Other(b'T'));
        assert_eq!(msgs[16], BackendMessage::Other(b'D'));
        assert_eq!(msgs[17], BackendMessage::Other(b'v'));
        let BackendMessage::NoticeResponse(n) = &msgs[18] else {
            panic!("{:?}", msgs[18])
        };
        assert_eq!(n.code(), Some(SqlState::QUERY_CANCELED));
    }

    #[test]
    fn malformed_server_messages_are_errors() {
        let cases: &[(u8, &[u8])] = &[
            (b'Z', b"X"),
            (b'Z', b""),
            (b'K', b"\0\0\0\x01"),
            (b'R', b"\0\0\0\x05\x01\x02"),
            (b'R', b"\0\0\0\x0aSCRAM-SHA-256\0"),
            (b'S', b"name\0"),
            (b'1', b"x"),
            (b'?', b""),
        ];
        for (tag, body) in cases {
            assert!(
                BackendMessage::parse(*tag, body).is_err(),
                "{} {:?}",
                *tag as char,
                body
            );
        }
    }
}
