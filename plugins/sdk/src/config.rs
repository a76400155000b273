use crate::Verdict;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use std::fmt;
use std::str::FromStr;

/// Parses a policy's JSON config into `T`; an empty config reads as `{}`. The error names
/// the problem and where, ready to return from [`crate::Policy::init`].
pub fn parse_config<T: DeserializeOwned>(config: &str) -> Result<T, String> {
    let text = if config.trim().is_empty() {
        "{}"
    } else {
        config
    };
    serde_json::from_str(text).map_err(|e| format!("invalid policy config: {e}"))
}

/// A rate with a burst: `"100/s"`, `"6000/m"`, `"50/h"`, optionally `"100/s burst 500"`.
/// Without an explicit burst the bucket holds one second's worth (at least 1).
///
/// Deserializes from that string form.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Tokens added per second.
    pub per_second: f64,
    /// Bucket size: how many may pass at once after a quiet period.
    pub burst: u32,
}

impl Limit {
    /// A limit of `per_second` with a given burst.
    pub fn new(per_second: f64, burst: u32) -> Self {
        Self {
            per_second,
            burst: burst.max(1),
        }
    }

    /// The same limit scaled by `factor` (burst scaled too, at least 1).
    pub fn scaled(self, factor: f64) -> Self {
        let burst = (f64::from(self.burst) * factor).ceil();
        Self::new(
            self.per_second * factor,
            burst.clamp(1.0, f64::from(u32::MAX)) as u32,
        )
    }
}

impl FromStr for Limit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid rate {s:?}: expected like \"100/s\", \"6000/m\" or \"100/s burst 500\""
            )
        };
        let (rate, burst) = match s.split_once("burst") {
            Some((r, b)) => (r.trim(), Some(b.trim().parse::<u32>().map_err(|_| bad())?)),
            None => (s.trim(), None),
        };
        let (n, unit) = rate.split_once('/').ok_or_else(bad)?;
        let n: f64 = n.trim().parse().map_err(|_| bad())?;
        let secs = match unit.trim() {
            "s" | "sec" | "second" => 1.0,
            "m" | "min" | "minute" => 60.0,
            "h" | "hour" => 3600.0,
            _ => return Err(bad()),
        };
        if !n.is_finite() || n <= 0.0 {
            return Err(bad());
        }
        let per_second = n / secs;
        let burst = burst.unwrap_or_else(|| per_second.ceil().min(f64::from(u32::MAX)) as u32);
        Ok(Limit::new(per_second, burst))
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s burst {}", self.per_second, self.burst)
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a policy does with a message over its limit, as written in config:
/// `"shed"`, `"forward"`, `{"delay_ms": 250}` or
/// `{"divert": {"exchange": "", "routing_key": "overflow.celery"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Refuse the message.
    #[default]
    Shed,
    /// Let it through (count only).
    Forward,
    /// Hold the producer for up to so many milliseconds.
    DelayMs(u64),
    /// Publish elsewhere.
    Divert {
        /// Target exchange.
        #[serde(default)]
        exchange: String,
        /// Target routing key.
        routing_key: String,
    },
}

impl Action {
    /// The verdict for this action; `reason` is only built when shedding.
    pub fn verdict(&self, reason: impl FnOnce() -> String) -> Verdict {
        match self {
            Action::Shed => Verdict::Shed(reason()),
            Action::Forward => Verdict::Forward,
            Action::DelayMs(ms) => Verdict::delay_ms(*ms),
            Action::Divert {
                exchange,
                routing_key,
            } => Verdict::divert(exchange.clone(), routing_key.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_with_units_and_bursts() {
        assert_eq!("100/s".parse::<Limit>().unwrap(), Limit::new(100.0, 100));
        assert_eq!("60/m".parse::<Limit>().unwrap(), Limit::new(1.0, 1));
        assert_eq!("0.5/s".parse::<Limit>().unwrap(), Limit::new(0.5, 1));
        assert_eq!(
            "10/s burst 50".parse::<Limit>().unwrap(),
            Limit::new(10.0, 50)
        );
        assert!("10".parse::<Limit>().is_err());
        assert!("-1/s".parse::<Limit>().is_err());
        assert!("1/fortnight".parse::<Limit>().is_err());
    }

    #[test]
    fn empty_config_reads_as_empty_object() {
        #[derive(Debug, serde::Deserialize)]
        struct C {
            #[serde(default)]
            x: u32,
        }
        assert_eq!(parse_config::<C>("").unwrap().x, 0);
        assert!(parse_config::<C>("{\"x\": \"no\"}")
            .unwrap_err()
            .contains("invalid policy config"));
    }

    #[test]
    fn actions_read_from_json() {
        let a: Vec<Action> = serde_json::from_str(
            r#"["shed", "forward", {"delay_ms": 250}, {"divert": {"routing_key": "overflow"}}]"#,
        )
        .unwrap();
        assert_eq!(a[2].verdict(String::new), Verdict::delay_ms(250));
        assert_eq!(a[3].verdict(String::new), Verdict::divert("", "overflow"));
        assert_eq!(a[0].verdict(|| "why".into()), Verdict::shed("why"));
    }
}
