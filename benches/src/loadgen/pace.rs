//! When each message of a producer is due: the traffic shapes as schedules of offsets from the
//! start of the run. A producer sleeps until its next message is due (tokio timers tick in
//! milliseconds, so at high rates messages leave in small clumps, one per tick).

use std::time::Duration;

/// The time profile of the offered load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// A constant rate (or as fast as possible without `--rate`).
    Steady,
    /// The rate climbs linearly from a tenth of `--rate` to `--rate` over the run.
    Ramp,
    /// Bursts of `--burst-size` messages at once, spaced so the average is `--rate`.
    Burst,
    /// Celery task messages (protocol 2 headers, JSON body) at a steady rate.
    Celery,
}

/// The schedule of one producer.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// No pacing: publish as fast as the connection takes it.
    Unpaced,
    /// `rate` messages per second.
    Steady {
        /// Messages per second for this producer.
        rate: f64,
    },
    /// From `rate / 10` to `rate`, linearly in message index, over `n` messages.
    Ramp {
        /// Final rate (messages per second).
        rate: f64,
        /// Messages this producer sends.
        n: u64,
    },
    /// `size` messages at once every `size / rate` seconds.
    Burst {
        /// Average rate.
        rate: f64,
        /// Messages per burst.
        size: u64,
    },
}

impl Pace {
    /// The pace of one of `producers` producers sharing a total `rate` (if any) over `n`
    /// messages of its own.
    pub fn new(
        shape: Shape,
        rate: Option<f64>,
        producers: usize,
        n: u64,
        burst: u64,
    ) -> Result<Pace, String> {
        let per = |r: f64| r / producers.max(1) as f64;
        Ok(match (shape, rate) {
            (Shape::Steady | Shape::Celery, None) => Pace::Unpaced,
            (Shape::Steady | Shape::Celery, Some(r)) => Pace::Steady { rate: per(r) },
            (Shape::Ramp, Some(r)) => Pace::Ramp { rate: per(r), n },
            (Shape::Burst, Some(r)) => Pace::Burst {
                rate: per(r),
                size: (burst / producers.max(1) as u64).max(1),
            },
            (Shape::Ramp | Shape::Burst, None) => {
                return Err(format!("--shape {shape:?} needs --rate").to_lowercase())
            }
        })
    }

    /// When message `k` (0-based, of this producer) is due, from the start of the run.
    pub fn due(&self, k: u64) -> Option<Duration> {
        let secs = match *self {
            Pace::Unpaced => return None,
            Pace::Steady { rate } => k as f64 / rate,
            Pace::Ramp { rate, n } => {
                // rate(k) = r0 + (rate - r0) k / n; t(k) = ∫ dk / rate(k).
                let r0 = rate / 10.0;
                let slope = (rate - r0) / n.max(1) as f64;
                if slope <= 0.0 {
                    k as f64 / rate
                } else {
                    ((r0 + slope * k as f64) / r0).ln() / slope
                }
            }
            Pace::Burst { rate, size } => (k / size * size) as f64 / rate,
        };
        Some(Duration::from_secs_f64(secs.max(0.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_rate_is_shared_between_producers() {
        let p = Pace::new(Shape::Steady, Some(1000.0), 4, 100, 0).unwrap();
        assert_eq!(p.due(250), Some(Duration::from_secs(1)));
        assert_eq!(
            Pace::new(Shape::Steady, None, 4, 100, 0).unwrap().due(9),
            None
        );
    }

    #[test]
    fn ramp_ends_faster_than_it_starts() {
        let p = Pace::new(Shape::Ramp, Some(1000.0), 1, 10_000, 0).unwrap();
        let first = p.due(100).unwrap() - p.due(0).unwrap();
        let last = p.due(10_000).unwrap() - p.due(9_900).unwrap();
        assert!(first > last * 8, "{first:?} vs {last:?}");
    }

    #[test]
    fn bursts_leave_together_and_average_the_rate() {
        let p = Pace::new(Shape::Burst, Some(100.0), 1, 1000, 50).unwrap();
        assert_eq!(p.due(0), p.due(49));
        assert_eq!(p.due(50), Some(Duration::from_millis(500)));
        assert!(Pace::new(Shape::Burst, None, 1, 1000, 50).is_err());
    }
}
