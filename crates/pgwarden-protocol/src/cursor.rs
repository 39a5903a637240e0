//! Reading a message body.

use crate::error::ProtocolError;

/// A read position in a message body; every read checks bounds and names what it was reading.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn truncated(&self) -> ProtocolError {
        ProtocolError::Truncated { what: self.what }
    }

    pub fn u8(&mut self) -> Result<u8, ProtocolError> {
        let (&b, rest) = self.buf.split_first().ok_or_else(|| self.truncated())?;
        self.buf = rest;
        Ok(b)
    }

    pub fn i16(&mut self) -> Result<i16, ProtocolError> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    pub fn i32(&mut self) -> Result<i32, ProtocolError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let b = self.bytes(N)?;
        Ok(b.try_into().expect("bytes(N) returns N bytes"))
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(self.truncated());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// A NUL-terminated string, without its NUL.
    pub fn cstr_bytes(&mut self) -> Result<&'a [u8], ProtocolError> {
        let end = find_nul(self.buf).ok_or(ProtocolError::Unterminated { what: self.what })?;
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    /// A NUL-terminated UTF-8 string.
    pub fn cstr(&mut self) -> Result<&'a str, ProtocolError> {
        let b = self.cstr_bytes()?;
        std::str::from_utf8(b).map_err(|_| ProtocolError::InvalidUtf8 { what: self.what })
    }

    /// A NUL-terminated string in whatever encoding the peer uses (PostgreSQL sends and takes
    /// text in the client's `client_encoding`): UTF-8 as is, anything else with replacement
    /// characters (for display and comparison, never to send back).
    pub fn cstr_lossy(&mut self) -> Result<std::borrow::Cow<'a, str>, ProtocolError> {
        Ok(String::from_utf8_lossy(self.cstr_bytes()?))
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// Fails if anything is left.
    pub fn finish(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::TrailingBytes {
                what: self.what,
                extra: self.buf.len(),
            })
        }
    }

    /// A count that must not be negative and must fit in what is left at `min_each` bytes apiece
    /// (so a forged count cannot make the caller reserve a huge vector).
    pub fn count(&mut self, min_each: usize) -> Result<usize, ProtocolError> {
        let n = self.i16()?;
        if n < 0 {
            return Err(ProtocolError::Invalid {
                what: self.what,
                detail: format!("negative count {n}"),
            });
        }
        let n = n as usize;
        if n.saturating_mul(min_each) > self.buf.len() {
            return Err(self.truncated());
        }
        Ok(n)
    }
}

/// The index of the first NUL byte: eight bytes at a time (a query text is scanned for its
/// terminator on every message, so this is on the hot path).
pub fn find_nul(b: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut at = 0;
    while let Some(eight) = b.get(at..at + 8) {
        let x = u64::from_le_bytes(eight.try_into().expect("eight bytes"));
        // Nonzero exactly when some byte of x is zero (the classic test: a borrow can only
        // start at a zero byte, so the lowest flagged byte is a true zero).
        let zero = x.wrapping_sub(ONES) & !x & HIGH;
        if zero != 0 {
            return Some(at + (zero.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    b[at..].iter().position(|&c| c == 0).map(|i| at + i)
}

#[cfg(test)]
mod tests {
    use super::find_nul;

    #[test]
    fn find_nul_agrees_with_a_byte_search() {
        // Fill bytes that trip naive word-at-a-time tests (0x01 after a zero, 0x80, 0xff).
        for fill in [b'a', 0x01, 0x80, 0xff] {
            for len in 0..40 {
                let mut b = vec![fill; len];
                assert_eq!(find_nul(&b), None, "fill {fill:#x} len {len}");
                for first in 0..len {
                    b.iter_mut().for_each(|c| *c = fill);
                    b[first] = 0;
                    // A second zero later, and 0x01s right after the first, change nothing.
                    if first + 1 < len {
                        b[first + 1] = 0x01;
                    }
                    if first + 5 < len {
                        b[first + 5] = 0;
                    }
                    assert_eq!(find_nul(&b), Some(first), "fill {fill:#x} len {len}");
                }
            }
        }
    }
}
