//! Protocol adapters. Each adapter turns wire frames into [`crate::policy::Message`] views and
//! verdicts back into wire frames; everything protocol-neutral lives in `policy/` and `quota/`.

pub mod amqp;
pub mod redis;

/// Wire protocols sluice can sit in front of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// AMQP 0-9-1 (RabbitMQ, Amazon MQ, LavinMQ).
    #[serde(rename = "amqp091")]
    Amqp091,
    /// Redis RESP2/RESP3 (Celery's Redis transport: list pushes and PUBLISH).
    Redis,
}

impl Protocol {
    /// The name used in config files and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Amqp091 => "amqp091",
            Protocol::Redis => "redis",
        }
    }
}
