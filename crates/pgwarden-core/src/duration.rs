//! Durations as written in config files: `"500ms"`, `"1s"`, `"10m"`, `"1h 30m"`.

use std::time::Duration;

/// Why a duration string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration \"{input}\": {reason} (e.g. \"500ms\", \"10s\", \"5m\")")]
pub struct DurationError {
    input: String,
    reason: String,
}

/// Parses a duration with a unit. A bare number is rejected: `"10"` could mean seconds or
/// milliseconds, and guessing wrong is how timeouts end up a thousand times too long.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let t = s.trim();
    let err = |reason: &str| DurationError {
        input: s.to_string(),
        reason: reason.to_string(),
    };
    if t.is_empty() {
        return Err(err("empty"));
    }
    if t.chars().all(|c| c.is_ascii_digit()) {
        return Err(err("a unit is required"));
    }
    humantime::parse_duration(t).map_err(|e| err(&e.to_string()))
}

/// Formats a duration compactly for messages (`500ms`, `3s`, `1m 30s`, `3s 2ms`): a measured
/// one is cut to milliseconds (to microseconds below one), never down to nanoseconds.
pub fn format_duration(d: Duration) -> String {
    let cut = if d >= Duration::from_millis(1) {
        Duration::from_millis(d.as_millis() as u64)
    } else {
        Duration::from_micros(d.as_micros() as u64)
    };
    humantime::format_duration(cut).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_bare_numbers_and_garbage() {
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn formats_compactly() {
        assert_eq!(format_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(format_duration(Duration::from_secs(90)), "1m 30s");
        assert_eq!(format_duration(Duration::new(3, 1_510_979)), "3s 1ms");
        assert_eq!(format_duration(Duration::from_nanos(2_500)), "2us");
    }
}
