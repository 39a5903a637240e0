//! Splitting a byte stream into frames, and writing frames.
//!
//! A startup-phase packet is `length:i32 | body` (length counts itself); every later message is
//! `tag:u8 | length:i32 | body`. Lengths are checked against a limit as soon as the header is
//! buffered, so an oversized or negative length is an error at once, never a wait or an
//! allocation of the claimed size.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::ProtocolError;

/// PostgreSQL's own limit for a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET: usize = 10_000;
/// Limit for messages during authentication (PostgreSQL's `PQ_SMALL_MESSAGE_LIMIT`).
pub const MAX_AUTH_MESSAGE: usize = 10_000;
/// Limit for any message (PostgreSQL's `PQ_LARGE_MESSAGE_LIMIT`, 1 GiB - 1).
pub const MAX_MESSAGE: usize = 0x3fff_ffff;

/// The next whole startup packet (length word included), or `None` if more bytes are needed.
pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<Bytes>, ProtocolError> {
    let Some(header) = buf.get(..4) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes(header.try_into().expect("4 bytes"));
    if len < 8 {
        return Err(ProtocolError::BadLength { len: len.into() });
    }
    let len = len as usize;
    if len > MAX_STARTUP_PACKET {
        return Err(ProtocolError::TooLarge {
            len,
            max: MAX_STARTUP_PACKET,
        });
    }
    if buf.len() < len {
        return Ok(None);
    }
    Ok(Some(buf.split_to(len).freeze()))
}

/// The next whole tagged message (tag and length included), or `None` if more bytes are needed.
/// `max` bounds the length field (body plus the 4 length bytes).
pub fn decode_message(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, ProtocolError> {
    Ok(message_len(buf, max)?.map(|n| buf.split_to(n).freeze()))
}

/// The length (tag included) of the complete message at the front of `buf`, checked as
/// [`decode_message`] checks it, without taking it out: for reading messages in place.
pub fn message_len(buf: &[u8], max: usize) -> Result<Option<usize>, ProtocolError> {
    let Some(header) = buf.get(..5) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes(header[1..5].try_into().expect("4 bytes"));
    if len < 4 {
        return Err(ProtocolError::BadLength { len: len.into() });
    }
    let len = len as usize;
    if len > max {
        return Err(ProtocolError::TooLarge { len, max });
    }
    if buf.len() < len + 1 {
        return Ok(None);
    }
    Ok(Some(len + 1))
}

/// How many more bytes the message at the front of `buf` needs, if its header is buffered: lets
/// a reader size one read for a large message without trusting more than the checked length.
pub fn missing(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..5)?;
    let len = i32::from_be_bytes(header[1..5].try_into().expect("4 bytes"));
    let total = usize::try_from(len).ok()? + 1;
    Some(total.saturating_sub(buf.len()))
}

/// The tag and body of a frame produced by [`decode_message`].
pub fn split(frame: &[u8]) -> (u8, &[u8]) {
    debug_assert!(frame.len() >= 5, "a frame from decode_message");
    (frame[0], &frame[5..])
}

/// Writes one message: `tag`, a length, then what `body` writes; the length is patched in after.
pub fn put_message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    put_sized(buf, body);
}

/// Writes a length word and what `body` writes (a startup-phase packet when called directly).
pub fn put_sized(buf: &mut BytesMut, body: impl FnOnce(&mut BytesMut)) {
    let at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = i32::try_from(buf.len() - at).expect("messages we build stay far below 2 GiB");
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// A NUL-terminated string. Callers pass strings without interior NULs; one would end the string
/// early on the wire, so it is cut there rather than corrupting the message.
pub fn put_cstr(buf: &mut BytesMut, s: &str) {
    put_cstr_bytes(buf, s.as_bytes())
}

/// Bytes up to the first NUL (if any), then a NUL.
pub fn put_cstr_bytes(buf: &mut BytesMut, b: &[u8]) {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    buf.put_slice(&b[..end]);
    buf.put_u8(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_arrive_byte_by_byte() {
        let mut whole = BytesMut::new();
        put_message(&mut whole, b'Q', |b| put_cstr(b, "SELECT 1"));
        put_message(&mut whole, b'X', |_| {});
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for &byte in whole.iter() {
            buf.put_u8(byte);
            while let Some(f) = decode_message(&mut buf, MAX_MESSAGE).expect("valid") {
                frames.push(f);
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(split(&frames[0]), (b'Q', &b"SELECT 1\0"[..]));
        assert_eq!(split(&frames[1]), (b'X', &b""[..]));
        assert!(buf.is_empty());
    }

    #[test]
    fn lengths_are_checked_before_the_body_arrives() {
        // Claims 2 GiB; only the header is here. Must fail now, not wait for (or reserve) 2 GiB.
        let mut buf = BytesMut::from(&[b'Q', 0x7f, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            decode_message(&mut buf, MAX_MESSAGE),
            Err(ProtocolError::TooLarge {
                len: 0x7fff_ffff,
                max: MAX_MESSAGE
            })
        );
        let mut buf = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert_eq!(
            decode_message(&mut buf, MAX_MESSAGE),
            Err(ProtocolError::BadLength { len: 3 })
        );
        let mut buf = BytesMut::from(&[b'Q', 0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            decode_message(&mut buf, MAX_MESSAGE),
            Err(ProtocolError::BadLength { len: -1 })
        );
        let mut buf = BytesMut::from(&[0, 0, 0x27, 0x11][..]); // 10001
        assert!(matches!(
            decode_startup(&mut buf),
            Err(ProtocolError::TooLarge { .. })
        ));
        let mut buf = BytesMut::from(&[0, 0, 0, 7][..]);
        assert!(matches!(
            decode_startup(&mut buf),
            Err(ProtocolError::BadLength { len: 7 })
        ));
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn missing_counts_what_is_still_to_come() {
        let buf = [b'd', 0, 0, 0, 104, 1, 2, 3];
        assert_eq!(missing(&buf), Some(105 - 8));
        assert_eq!(missing(&buf[..3]), None);
    }

    #[test]
    fn interior_nul_is_cut() {
        let mut buf = BytesMut::new();
        put_cstr(&mut buf, "a\0b");
        assert_eq!(&buf[..], b"a\0");
    }
}
