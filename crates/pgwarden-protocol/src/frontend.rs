//! Messages from the client.

use bytes::{BufMut, BytesMut};

use crate::cursor::Cursor;
use crate::error::ProtocolError;
use crate::frame::{put_cstr, put_cstr_bytes, put_message};

/// What a Describe or Close names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Statement,
    Portal,
}

impl Target {
    fn parse(b: u8, what: &'static str) -> Result<Target, ProtocolError> {
        match b {
            b'S' => Ok(Target::Statement),
            b'P' => Ok(Target::Portal),
            other => Err(ProtocolError::Invalid {
                what,
                detail: format!("unknown target type 0x{other:02x}"),
            }),
        }
    }

    fn byte(self) -> u8 {
        match self {
            Target::Statement => b'S',
            Target::Portal => b'P',
        }
    }
}

/// A Bind: the names the proxy may rewrite, and the rest (formats, parameters, result formats),
/// validated but kept as bytes so it is forwarded as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    pub rest: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendMessage<'a> {
    /// Query texts are in the client's `client_encoding`, which need not be UTF-8.
    Query(&'a [u8]),
    Parse {
        name: &'a str,
        query: &'a [u8],
        /// `count:i16` then `count` OIDs, as on the wire.
        param_types: &'a [u8],
    },
    Bind(Bind<'a>),
    Describe {
        target: Target,
        name: &'a str,
    },
    Execute {
        portal: &'a str,
        max_rows: i32,
    },
    Close {
        target: Target,
        name: &'a str,
    },
    Sync,
    Flush,
    Terminate,
    CopyData(&'a [u8]),
    CopyDone,
    CopyFail(&'a str),
    /// `p`: PasswordMessage, SASLInitialResponse or SASLResponse; which one depends on the
    /// authentication request it answers (see [`parse_sasl_initial`]).
    Password(&'a [u8]),
    FunctionCall(&'a [u8]),
}

impl<'a> FrontendMessage<'a> {
    /// Decodes the body of a message with tag `tag`.
    pub fn parse(tag: u8, body: &'a [u8]) -> Result<Self, ProtocolError> {
        let msg = match tag {
            b'Q' => {
                let mut c = Cursor::new(body, "Query message");
                let q = c.cstr_bytes()?;
                c.finish()?;
                FrontendMessage::Query(q)
            }
            b'P' => {
                let mut c = Cursor::new(body, "Parse message");
                let name = c.cstr()?;
                let query = c.cstr_bytes()?;
                let param_types = c.rest();
                check_param_types(param_types)?;
                FrontendMessage::Parse {
                    name,
                    query,
                    param_types,
                }
            }
            b'B' => FrontendMessage::Bind(parse_bind(body)?),
            b'D' => {
                let mut c = Cursor::new(body, "Describe message");
                let target = Target::parse(c.u8()?, "Describe message")?;
                let name = c.cstr()?;
                c.finish()?;
                FrontendMessage::Describe { target, name }
            }
            b'E' => {
                let mut c = Cursor::new(body, "Execute message");
                let portal = c.cstr()?;
                let max_rows = c.i32()?;
                c.finish()?;
                FrontendMessage::Execute { portal, max_rows }
            }
            b'C' => {
                let mut c = Cursor::new(body, "Close message");
                let target = Target::parse(c.u8()?, "Close message")?;
                let name = c.cstr()?;
                c.finish()?;
                FrontendMessage::Close { target, name }
            }
            b'S' => empty(body, "Sync message", FrontendMessage::Sync)?,
            b'H' => empty(body, "Flush message", FrontendMessage::Flush)?,
            b'X' => empty(body, "Terminate message", FrontendMessage::Terminate)?,
            b'c' => empty(body, "CopyDone message", FrontendMessage::CopyDone)?,
            b'd' => FrontendMessage::CopyData(body),
            b'f' => {
                let mut c = Cursor::new(body, "CopyFail message");
                let m = c.cstr()?;
                c.finish()?;
                FrontendMessage::CopyFail(m)
            }
            b'p' => FrontendMessage::Password(body),
            b'F' => FrontendMessage::FunctionCall(body),
            other => return Err(ProtocolError::UnknownMessage(other)),
        };
        Ok(msg)
    }
}

fn empty<'a>(
    body: &[u8],
    what: &'static str,
    msg: FrontendMessage<'a>,
) -> Result<FrontendMessage<'a>, ProtocolError> {
    Cursor::new(body, what).finish()?;
    Ok(msg)
}

fn parse_bind(body: &[u8]) -> Result<Bind<'_>, ProtocolError> {
    let mut c = Cursor::new(body, BIND);
    let portal = c.cstr()?;
    let statement = c.cstr()?;
    let rest = c.rest();
    check_bind_rest(rest)?;
    Ok(Bind {
        portal,
        statement,
        rest,
    })
}

const BIND: &str = "Bind message";

/// Checks what follows a Bind's portal and statement names: parameter formats, parameters and
/// result formats, exactly filling the message.
pub fn check_bind_rest(rest: &[u8]) -> Result<(), ProtocolError> {
    // The well-formed case without the cursor's bookkeeping (this runs for every unprepared
    // query); anything else goes through the cursor, which says what is wrong.
    if bind_rest_ok(rest) {
        return Ok(());
    }
    check_bind_rest_with_cursor(rest)
}

/// [`check_bind_rest`]'s answer, without the error.
fn bind_rest_ok(r: &[u8]) -> bool {
    let i16_at = |at: usize| r.get(at..at + 2).map(|b| i16::from_be_bytes([b[0], b[1]]));
    let Some(formats @ 0..) = i16_at(0) else {
        return false;
    };
    // `n` format codes from `at`, each 0 or 1: where they end.
    let codes = |at: usize, n: i16| {
        (0..n).try_fold(at, |at, _| {
            matches!(i16_at(at), Some(0 | 1)).then_some(at + 2)
        })
    };
    let Some(mut at) = codes(2, formats) else {
        return false;
    };
    let Some(params @ 0..) = i16_at(at) else {
        return false;
    };
    at += 2;
    if formats > 1 && formats != params {
        return false;
    }
    for _ in 0..params {
        let Some(len) = r
            .get(at..at + 4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        else {
            return false;
        };
        at += 4;
        match len {
            -1 => {}
            0.. => {
                at += len as usize;
                if at > r.len() {
                    return false;
                }
            }
            _ => return false,
        }
    }
    let Some(results @ 0..) = i16_at(at) else {
        return false;
    };
    codes(at + 2, results) == Some(r.len())
}

fn check_bind_rest_with_cursor(rest: &[u8]) -> Result<(), ProtocolError> {
    let mut r = Cursor::new(rest, BIND);
    let formats = r.count(2)?;
    for _ in 0..formats {
        format_code(r.i16()?)?;
    }
    let params = r.count(4)?;
    if formats > 1 && formats != params {
        return Err(ProtocolError::Invalid {
            what: BIND,
            detail: format!("{formats} parameter formats for {params} parameters"),
        });
    }
    for _ in 0..params {
        let len = r.i32()?;
        match len {
            -1 => {}
            n if n < 0 => {
                return Err(ProtocolError::Invalid {
                    what: BIND,
                    detail: format!("parameter length {n}"),
                })
            }
            n => {
                r.bytes(n as usize)?;
            }
        }
    }
    let results = r.count(2)?;
    for _ in 0..results {
        format_code(r.i16()?)?;
    }
    r.finish()
}

fn format_code(f: i16) -> Result<(), ProtocolError> {
    if f == 0 || f == 1 {
        Ok(())
    } else {
        Err(ProtocolError::Invalid {
            what: "Bind message",
            detail: format!("format code {f}"),
        })
    }
}

/// A SASLInitialResponse: the mechanism and the client-first message (`None` if absent).
/// Checks the parameter-type list that ends a Parse body: `count:i16`, then `count` OIDs, and
/// nothing after.
pub fn check_param_types(param_types: &[u8]) -> Result<(), ProtocolError> {
    let mut t = Cursor::new(param_types, "Parse message");
    let n = t.count(4)?;
    t.bytes(n * 4)?;
    t.finish()
}

pub fn parse_sasl_initial(body: &[u8]) -> Result<(&str, Option<&[u8]>), ProtocolError> {
    let mut c = Cursor::new(body, "SASLInitialResponse message");
    let mechanism = c.cstr()?;
    let len = c.i32()?;
    let data = match len {
        -1 => None,
        n if n < 0 => {
            return Err(ProtocolError::Invalid {
                what: "SASLInitialResponse message",
                detail: format!("length {n}"),
            })
        }
        n => Some(c.bytes(n as usize)?),
    };
    c.finish()?;
    Ok((mechanism, data))
}

/// A cleartext or md5 PasswordMessage: the password string.
pub fn parse_password(body: &[u8]) -> Result<&str, ProtocolError> {
    let mut c = Cursor::new(body, "password message");
    let p = c.cstr()?;
    c.finish()?;
    Ok(p)
}

/// `sql` in the client's encoding (see [`FrontendMessage::Query`]).
pub fn put_query(buf: &mut BytesMut, sql: impl AsRef<[u8]>) {
    put_message(buf, b'Q', |b| put_cstr_bytes(b, sql.as_ref()));
}

/// `query` in the client's encoding (see [`FrontendMessage::Query`]).
pub fn put_parse(buf: &mut BytesMut, name: &str, query: &[u8], param_types: &[u8]) {
    put_message(buf, b'P', |b| {
        put_cstr(b, name);
        put_cstr_bytes(b, query);
        if param_types.is_empty() {
            b.put_i16(0);
        } else {
            b.put_slice(param_types);
        }
    });
}

/// A Bind with (possibly rewritten) names and the original formats and parameters.
pub fn put_bind(buf: &mut BytesMut, portal: &str, statement: &str, rest: &[u8]) {
    put_message(buf, b'B', |b| {
        put_cstr(b, portal);
        put_cstr(b, statement);
        b.put_slice(rest);
    });
}

pub fn put_describe(buf: &mut BytesMut, target: Target, name: &str) {
    put_message(buf, b'D', |b| {
        b.put_u8(target.byte());
        put_cstr(b, name);
    });
}

pub fn put_execute(buf: &mut BytesMut, portal: &str, max_rows: i32) {
    put_message(buf, b'E', |b| {
        put_cstr(b, portal);
        b.put_i32(max_rows);
    });
}

pub fn put_close(buf: &mut BytesMut, target: Target, name: &str) {
    put_message(buf, b'C', |b| {
        b.put_u8(target.byte());
        put_cstr(b, name);
    });
}

pub fn put_sync(buf: &mut BytesMut) {
    put_message(buf, b'S', |_| {});
}

pub fn put_flush(buf: &mut BytesMut) {
    put_message(buf, b'H', |_| {});
}

pub fn put_copy_data(buf: &mut BytesMut, data: &[u8]) {
    put_message(buf, b'd', |b| b.extend_from_slice(data));
}

pub fn put_copy_done(buf: &mut BytesMut) {
    put_message(buf, b'c', |_| {});
}

pub fn put_terminate(buf: &mut BytesMut) {
    put_message(buf, b'X', |_| {});
}

pub fn put_password(buf: &mut BytesMut, password: &str) {
    put_message(buf, b'p', |b| put_cstr(b, password));
}

pub fn put_sasl_initial(buf: &mut BytesMut, mechanism: &str, data: &[u8]) {
    put_message(buf, b'p', |b| {
        put_cstr(b, mechanism);
        b.put_i32(i32::try_from(data.len()).expect("SASL messages are small"));
        b.put_slice(data);
    });
}

pub fn put_sasl_response(buf: &mut BytesMut, data: &[u8]) {
    put_message(buf, b'p', |b| b.put_slice(data));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_message, split, MAX_MESSAGE};

    fn decode(buf: &BytesMut) -> Vec<bytes::Bytes> {
        let mut b = buf.clone();
        let mut out = Vec::new();
        while let Some(f) = decode_message(&mut b, MAX_MESSAGE).expect("valid frame") {
            out.push(f);
        }
        assert!(b.is_empty());
        out
    }

    fn bind_rest(params: &[Option<&[u8]>]) -> Vec<u8> {
        let mut r = vec![0, 1, 0, 0]; // one format code: text
        r.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            match p {
                None => r.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    r.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    r.extend_from_slice(v);
                }
            }
        }
        r.extend_from_slice(&[0, 1, 0, 1]); // one result format: binary
        r
    }

    #[test]
    fn the_quick_bind_check_agrees_with_the_cursor() {
        let mut cases: Vec<Vec<u8>> = vec![
            vec![0, 0, 0, 0, 0, 0],
            vec![0, 1, 0, 1, 0, 1, 0, 0, 0, 2, b'4', b'2', 0, 0],
            vec![
                0, 2, 0, 0, 0, 1, 0, 2, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1, 0, 1,
            ],
            vec![0, 2, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0],
            vec![0, 1, 0, 2, 0, 0, 0, 0],
            vec![0, 0, 0, 1, 0xff, 0xff, 0xff, 0xfe, 0, 0],
            vec![0, 0, 0, 1, 0x7f, 0xff, 0xff, 0xff, 0, 0],
            vec![0x80, 0, 0, 0, 0, 0],
            vec![0, 0, 0, 0, 0, 0, 9],
            vec![0, 0, 0, 0, 0],
        ];
        // Every prefix and every one-byte change of the well-formed ones, too.
        for base in cases.clone() {
            for n in 0..base.len() {
                cases.push(base[..n].to_vec());
                for v in [0u8, 1, 2, 0x7f, 0x80, 0xff] {
                    let mut m = base.clone();
                    m[n] = v;
                    cases.push(m);
                }
            }
        }
        let mut ok = 0;
        for c in &cases {
            let quick = bind_rest_ok(c);
            assert_eq!(quick, check_bind_rest_with_cursor(c).is_ok(), "{c:?}");
            assert_eq!(quick, check_bind_rest(c).is_ok(), "{c:?}");
            ok += usize::from(quick);
        }
        assert!(ok > 20 && ok < cases.len() - 20, "{ok} of {}", cases.len());
    }

    #[test]
    fn every_message_round_trips() {
        let rest = bind_rest(&[Some(b"42"), None]);
        let types = [0u8, 1, 0, 0, 0, 23];
        let mut buf = BytesMut::new();
        put_query(&mut buf, "SELECT 1");
        put_parse(&mut buf, "s1", b"SELECT $1", &types);
        put_bind(&mut buf, "p1", "s1", &rest);
        put_describe(&mut buf, Target::Portal, "p1");
        put_execute(&mut buf, "p1", 0);
        put_close(&mut buf, Target::Statement, "s1");
        put_sync(&mut buf);
        put_flush(&mut buf);
        put_terminate(&mut buf);
        put_password(&mut buf, "secret");
        let frames = decode(&buf);
        let msgs: Vec<FrontendMessage<'_>> = frames
            .iter()
            .map(|f| {
                let (tag, body) = split(f);
                FrontendMessage::parse(tag, body).expect("valid message")
            })
            .collect();
        assert_eq!(
            msgs,
            vec![
                FrontendMessage::Query(b"SELECT 1"),
                FrontendMessage::Parse {
                    name: "s1",
                    query: b"SELECT $1",
                    param_types: &types
                },
                FrontendMessage::Bind(Bind {
                    portal: "p1",
                    statement: "s1",
                    rest: &rest
                }),
                FrontendMessage::Describe {
                    target: Target::Portal,
                    name: "p1"
                },
                FrontendMessage::Execute {
                    portal: "p1",
                    max_rows: 0
                },
                FrontendMessage::Close {
                    target: Target::Statement,
                    name: "s1"
                },
                FrontendMessage::Sync,
                FrontendMessage::Flush,
                FrontendMessage::Terminate,
                FrontendMessage::Password(b"secret\0"),
            ]
        );
        assert_eq!(parse_password(b"secret\0"), Ok("secret"));
    }

    #[test]
    fn sasl_initial_response() {
        let mut buf = BytesMut::new();
        put_sasl_initial(&mut buf, "SCRAM-SHA-256", b"n,,n=,r=abc");
        let f = &decode(&buf)[0];
        assert_eq!(
            parse_sasl_initial(split(f).1),
            Ok(("SCRAM-SHA-256", Some(&b"n,,n=,r=abc"[..])))
        );
        assert!(parse_sasl_initial(b"SCRAM-SHA-256\0\x00\x00\x00\x10abc").is_err());
        assert!(parse_sasl_initial(b"SCRAM-SHA-256\0\xff\xff\xff\xfe").is_err());
    }

    #[test]
    fn malformed_bodies_are_rejected() {
        let cases: &[(u8, &[u8])] = &[
            (b'Q', b"SELECT 1"),                                       // no NUL
            (b'Q', b"SELECT 1\0extra"),                                // trailing bytes
            (b'S', b"x"),                                              // Sync with a body
            (b'D', b"Xname\0"),                                        // bad target
            (b'E', b"p\0\0\0"),                                        // short max_rows
            (b'P', b"s\0q\0\x00\x02\0\0\0\x17"),                       // 2 types, 1 present
            (b'P', b"s\0q\0\xff\xff"),                                 // negative count
            (b'B', b"\0\0\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00"),   // parameter length -2
            (b'B', b"\0\0\x00\x01\x00\x07\x00\x00\x00\x00"),           // format code 7
            (b'B', b"\0\0\x00\x02\x00\x00\x00\x00\x00\x03"),           // 2 formats, 3 params
            (b'B', b"\0\0\x00\x00\x00\x01\x00\x00\x00\x10ab\x00\x00"), // param longer than message
            (b'Z', b""),                                               // not a frontend message
        ];
        for (tag, body) in cases {
            assert!(
                FrontendMessage::parse(*tag, body).is_err(),
                "{} {:?}",
                *tag as char,
                body
            );
        }
    }

    #[test]
    fn forged_counts_do_not_allocate() {
        // 32767 parameters claimed, none present: rejected by the count check before any loop.
        let body = b"\0\0\x00\x00\x7f\xff";
        assert!(matches!(
            parse_bind(body),
            Err(ProtocolError::Truncated { .. })
        ));
    }
}
