//! Byte sizes as written in config files (`"16MB"`, `"1GB"`, `"512kB"`, `"100"`).
//!
//! Units follow PostgreSQL's own convention for settings: `kB`, `MB`, `GB` and `TB` are powers of
//! 1024, so `"16MB"` here means what `wal_keep_size = '16MB'` means to the server. `KiB`-style
//! spellings are accepted as synonyms.

use std::fmt;
use std::str::FromStr;

/// A size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// Why a size string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("empty size")]
    Empty,
    #[error(
        "invalid size \"{0}\": expected a number followed by B, kB, MB, GB or TB (e.g. \"16MB\")"
    )]
    Invalid(String),
    #[error("size \"{0}\" is too large")]
    Overflow(String),
}

impl ByteSize {
    pub const fn bytes(self) -> u64 {
        self.0
    }

    pub const fn mib(n: u64) -> Self {
        Self(n * 1024 * 1024)
    }
}

impl FromStr for ByteSize {
    type Err = SizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.is_empty() {
            return Err(SizeError::Empty);
        }
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        if num.is_empty() {
            return Err(SizeError::Invalid(s.to_string()));
        }
        let n: u64 = num
            .parse()
            .map_err(|_| SizeError::Overflow(s.to_string()))?;
        let mult: u64 = match unit.trim() {
            "" | "B" | "b" => 1,
            "kB" | "KB" | "k" | "K" | "KiB" => 1 << 10,
            "MB" | "M" | "MiB" => 1 << 20,
            "GB" | "G" | "GiB" => 1 << 30,
            "TB" | "T" | "TiB" => 1 << 40,
            _ => return Err(SizeError::Invalid(s.to_string())),
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| SizeError::Overflow(s.to_string()))
    }
}

impl fmt::Display for ByteSize {
    /// Human form: `512 B`, `1.5 KiB`, `16.0 MiB`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut v = self.0 as f64;
        let mut i = 0;
        while v >= 1024.0 && i + 1 < UNITS.len() {
            v /= 1024.0;
            i += 1;
        }
        if i == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{v:.1} {}", UNITS[i])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_postgres_style_units() {
        assert_eq!("16MB".parse::<ByteSize>(), Ok(ByteSize(16 << 20)));
        assert_eq!("512kB".parse::<ByteSize>(), Ok(ByteSize(512 << 10)));
        assert_eq!("1GB".parse::<ByteSize>(), Ok(ByteSize(1 << 30)));
        assert_eq!("100".parse::<ByteSize>(), Ok(ByteSize(100)));
        assert_eq!(" 2 GiB ".parse::<ByteSize>(), Ok(ByteSize(2 << 30)));
    }

    #[test]
    fn rejects_garbage_and_overflow() {
        assert!(matches!("".parse::<ByteSize>(), Err(SizeError::Empty)));
        assert!(matches!(
            "MB".parse::<ByteSize>(),
            Err(SizeError::Invalid(_))
        ));
        assert!(matches!(
            "12 parsecs".parse::<ByteSize>(),
            Err(SizeError::Invalid(_))
        ));
        assert!(matches!(
            "-5MB".parse::<ByteSize>(),
            Err(SizeError::Invalid(_))
        ));
        assert!(matches!(
            "99999999999999TB".parse::<ByteSize>(),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn displays_human_units() {
        assert_eq!(ByteSize(512).to_string(), "512 B");
        assert_eq!(ByteSize(1536).to_string(), "1.5 KiB");
        assert_eq!(ByteSize::mib(16).to_string(), "16.0 MiB");
    }
}
