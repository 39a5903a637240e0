//! ErrorResponse and NoticeResponse: reading their fields and building them.

use bytes::{BufMut, BytesMut};

use crate::cursor::Cursor;
use crate::error::ProtocolError;
use crate::frame::{put_cstr, put_message};
use crate::sqlstate::SqlState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
    Panic,
    Warning,
    Notice,
    Debug,
    Info,
    Log,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Panic => "PANIC",
            Severity::Warning => "WARNING",
            Severity::Notice => "NOTICE",
            Severity::Debug => "DEBUG",
            Severity::Info => "INFO",
            Severity::Log => "LOG",
        }
    }
}

/// The fields of an ErrorResponse/NoticeResponse body, validated, read lazily.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorFields<'a> {
    raw: &'a [u8],
}

impl<'a> ErrorFields<'a> {
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new(body, "error fields");
        loop {
            if c.u8()? == 0 {
                break;
            }
            c.cstr_bytes()?;
        }
        c.finish()?;
        Ok(Self { raw: body })
    }

    /// Every `(field type, value)`; values that are not UTF-8 are skipped.
    pub fn iter(&self) -> impl Iterator<Item = (u8, &'a str)> + 'a {
        let mut c = Cursor::new(self.raw, "error fields");
        std::iter::from_fn(move || loop {
            let code = c.u8().ok().filter(|&b| b != 0)?;
            let value = c.cstr_bytes().ok()?;
            if let Ok(v) = std::str::from_utf8(value) {
                return Some((code, v));
            }
        })
    }

    pub fn get(&self, field: u8) -> Option<&'a str> {
        self.iter().find(|(c, _)| *c == field).map(|(_, v)| v)
    }

    pub fn code(&self) -> Option<SqlState> {
        self.get(b'C')
            .and_then(|c| SqlState::from_bytes(c.as_bytes()))
    }

    pub fn message(&self) -> Option<&'a str> {
        self.get(b'M')
    }

    /// The non-localised severity (`V`), else the localised one (`S`).
    pub fn severity(&self) -> Option<&'a str> {
        self.get(b'V').or_else(|| self.get(b'S'))
    }
}

/// An error or notice the proxy itself reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReport<'a> {
    pub severity: Severity,
    pub code: SqlState,
    pub message: &'a str,
    pub detail: Option<&'a str>,
    pub hint: Option<&'a str>,
}

impl<'a> ErrorReport<'a> {
    pub fn new(severity: Severity, code: SqlState, message: &'a str) -> Self {
        Self {
            severity,
            code,
            message,
            detail: None,
            hint: None,
        }
    }

    pub fn error(code: SqlState, message: &'a str) -> Self {
        Self::new(Severity::Error, code, message)
    }

    pub fn fatal(code: SqlState, message: &'a str) -> Self {
        Self::new(Severity::Fatal, code, message)
    }

    pub fn detail(mut self, detail: &'a str) -> Self {
        self.detail = Some(detail);
        self
    }

    pub fn hint(mut self, hint: &'a str) -> Self {
        self.hint = Some(hint);
        self
    }

    /// Writes it as an ErrorResponse (`E`).
    pub fn put_error(&self, buf: &mut BytesMut) {
        self.put(buf, b'E');
    }

    /// Writes it as a NoticeResponse (`N`).
    pub fn put_notice(&self, buf: &mut BytesMut) {
        self.put(buf, b'N');
    }

    fn put(&self, buf: &mut BytesMut, tag: u8) {
        put_message(buf, tag, |b| {
            let mut field = |code: u8, value: &str| {
                b.put_u8(code);
                put_cstr(b, value);
            };
            field(b'S', self.severity.as_str());
            field(b'V', self.severity.as_str());
            field(b'C', self.code.as_str());
            field(b'M', self.message);
            if let Some(d) = self.detail {
                field(b'D', d);
            }
            if let Some(h) = self.hint {
                field(b'H', h);
            }
            b.put_u8(0);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_message, split, MAX_MESSAGE};

    #[test]
    fn round_trips() {
        let mut buf = BytesMut::new();
        ErrorReport::fatal(
            SqlState::INVALID_PASSWORD,
            "password authentication failed for user \"app\"",
        )
        .hint("check pgwarden.toml")
        .put_error(&mut buf);
        let f = decode_message(&mut buf, MAX_MESSAGE)
            .expect("valid")
            .expect("whole");
        let (tag, body) = split(&f);
        assert_eq!(tag, b'E');
        let e = ErrorFields::parse(body).expect("valid");
        assert_eq!(e.code(), Some(SqlState::INVALID_PASSWORD));
        assert_eq!(e.severity(), Some("FATAL"));
        assert_eq!(
            e.message(),
            Some("password authentication failed for user \"app\"")
        );
        assert_eq!(e.get(b'H'), Some("check pgwarden.toml"));
        assert_eq!(e.get(b'D'), None);
    }

    #[test]
    fn malformed_fields_are_rejected() {
        for body in [&b""[..], b"Sx", b"SERROR\0", b"SERROR\0\0extra"] {
            assert!(ErrorFields::parse(body).is_err(), "{body:?}");
        }
        assert!(ErrorFields::parse(b"\0").is_ok());
    }
}
