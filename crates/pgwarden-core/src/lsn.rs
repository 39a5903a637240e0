//! PostgreSQL WAL positions.

use std::fmt;
use std::str::FromStr;

/// A WAL position (`pg_lsn`): 64 bits shown as two hex halves, `0/3000148`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN \"{0}\": expected two hex numbers separated by '/' (e.g. 0/3000148)")]
pub struct LsnError(String);

impl Lsn {
    /// Bytes from `earlier` to `self`; zero when `earlier` is ahead (a replica can briefly report
    /// a position past the primary's sample taken a moment before).
    pub fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl FromStr for Lsn {
    type Err = LsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || LsnError(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(bad());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_postgres_format() {
        for s in ["0/3000148", "1/0", "FFFFFFFF/FFFFFFFF", "0/0"] {
            let lsn: Lsn = s.parse().expect("valid");
            assert_eq!(lsn.to_string(), s);
        }
        assert_eq!("0/10".parse::<Lsn>(), Ok(Lsn(16)));
        assert_eq!("1/0".parse::<Lsn>(), Ok(Lsn(1 << 32)));
    }

    #[test]
    fn rejects_malformed() {
        for s in ["", "0", "/1", "1/", "x/1", "0/123456789", "0/1/2"] {
            assert!(s.parse::<Lsn>().is_err(), "{s}");
        }
    }

    #[test]
    fn distance_saturates() {
        assert_eq!(Lsn(100).bytes_since(Lsn(40)), 60);
        assert_eq!(Lsn(40).bytes_since(Lsn(100)), 0);
    }
}
