//! Human units in config values: rates (`500/s`, `5MiB/s`), sizes (`16MiB`) and durations
//! (`250ms`, `2s`).

use std::time::Duration;

/// An amount per period, e.g. `500/s` or `5MiB/s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    /// Units (messages or bytes) allowed per `per`.
    pub amount: u64,
    /// The period.
    pub per: Duration,
}

impl Rate {
    /// Units per second, as a float (for display and lease sizing).
    pub fn per_second(&self) -> f64 {
        self.amount as f64 / self.per.as_secs_f64()
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{:?}", self.amount, self.per)
    }
}

/// Parse a duration: a number followed by `ms`, `s`, `m` or `h` (e.g. `250ms`, `1.5s`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("duration '{s}' needs a unit: ms, s, m or h"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("duration '{s}' does not start with a number"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit '{other}' in '{s}' (use ms, s, m or h)"
            ))
        }
    };
    // `try_`: a huge value (`99999999999999999999999h`) is finite but does not fit a Duration.
    Duration::try_from_secs_f64(secs).map_err(|_| format!("duration '{s}' is out of range"))
}

/// Parse a byte size: a number with an optional unit `B`, `KB`, `KiB`, `MB`, `MiB`, `GB`, `GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("size '{s}' does not start with a number"))?;
    let mult = match unit.trim() {
        "" | "B" => 1.0,
        "KB" | "kB" => 1e3,
        "KiB" => 1024.0,
        "MB" => 1e6,
        "MiB" => 1024.0 * 1024.0,
        "GB" => 1e9,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown size unit '{other}' in '{s}' (use B, KB, KiB, MB, MiB, GB or GiB)"
            ))
        }
    };
    let v = n * mult;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("size '{s}' is out of range"));
    }
    Ok(v as u64)
}

/// Parse a rate of messages (`500/s`, `30/m`, `10/100ms`) or, with `bytes`, of bytes (`5MiB/s`).
pub fn parse_rate(s: &str, bytes: bool) -> Result<Rate, String> {
    let (amount, per) = s
        .split_once('/')
        .ok_or_else(|| format!("rate '{s}' must look like '500/s' (amount/period)"))?;
    let amount = if bytes {
        parse_size(amount)?
    } else {
        amount
            .trim()
            .parse::<u64>()
            .map_err(|_| format!("rate '{s}': '{amount}' is not a whole number of messages"))?
    };
    let per = per.trim();
    let per = match per {
        "s" | "sec" => Duration::from_secs(1),
        "m" | "min" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => parse_duration(per).map_err(|e| format!("rate '{s}': {e}"))?,
    };
    if amount == 0 {
        return Err(format!(
            "rate '{s}' must be greater than zero (remove the limit instead)"
        ));
    }
    if per.is_zero() {
        return Err(format!("rate '{s}' has a zero period"));
    }
    Ok(Rate { amount, per })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates_sizes_and_durations() {
        assert_eq!(
            parse_rate("500/s", false).unwrap(),
            Rate {
                amount: 500,
                per: Duration::from_secs(1)
            }
        );
        assert_eq!(parse_rate("5MiB/s", true).unwrap().amount, 5 * 1024 * 1024);
        assert_eq!(
            parse_rate("10/100ms", false).unwrap().per,
            Duration::from_millis(100)
        );
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        assert!(parse_rate("500", false)
            .unwrap_err()
            .contains("amount/period"));
        assert!(parse_rate("fast/s", false)
            .unwrap_err()
            .contains("whole number"));
        assert!(parse_rate("0/s", false)
            .unwrap_err()
            .contains("greater than zero"));
        assert!(parse_duration("5").unwrap_err().contains("needs a unit"));
        assert!(parse_size("3XB").unwrap_err().contains("unknown size unit"));
    }

    #[test]
    fn durations_too_large_for_a_duration_are_errors_not_panics() {
        // Found by the `config` fuzz target: Duration::from_secs_f64 panicked on these.
        for s in [
            "99999999999999999999999h",
            "18446744073709551616s",
            "1e400s",
        ] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
        assert!(parse_rate("5/99999999999999999999999h", false)
            .unwrap_err()
            .contains("out of range"));
        assert_eq!(
            parse_duration("18446744073709549568s").unwrap(),
            Duration::from_secs(18446744073709549568)
        );
    }
}
