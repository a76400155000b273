use std::time::Duration;

/// What to do with one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Pass to the next policy, or to the broker.
    Forward,
    /// Hold the producer's publishes for up to this long (millisecond resolution).
    Delay(Duration),
    /// Refuse the message, with a reason for logs and the client.
    Shed(String),
    /// Publish to another exchange and routing key instead.
    Divert {
        /// Target exchange ("" is the default exchange).
        exchange: String,
        /// Target routing key.
        routing_key: String,
    },
}

impl Verdict {
    /// `Shed` with a reason.
    pub fn shed(reason: impl Into<String>) -> Self {
        Verdict::Shed(reason.into())
    }

    /// `Divert` to an exchange and routing key.
    pub fn divert(exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        Verdict::Divert {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
        }
    }

    /// `Delay` of so many milliseconds.
    pub fn delay_ms(ms: u64) -> Self {
        Verdict::Delay(Duration::from_millis(ms))
    }

    /// True for [`Verdict::Forward`].
    pub fn is_forward(&self) -> bool {
        matches!(self, Verdict::Forward)
    }
}
