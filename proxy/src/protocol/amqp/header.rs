//! Content header frames: body size up front, basic properties scanned lazily, only as far as
//! the property asked for (a Celery header frame is read without decoding its other fields).

use super::table::{self, RawValue};
use super::wire::{Reader, WireError};

/// The basic-class properties, in wire order (flag bit 15 first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Property {
    ContentType,
    ContentEncoding,
    Headers,
    DeliveryMode,
    Priority,
    CorrelationId,
    ReplyTo,
    Expiration,
    MessageId,
    Timestamp,
    Type,
    UserId,
    AppId,
    ClusterId,
}

impl Property {
    /// Every property in wire order.
    pub const ALL: [Property; 14] = [
        Property::ContentType,
        Property::ContentEncoding,
        Property::Headers,
        Property::DeliveryMode,
        Property::Priority,
        Property::CorrelationId,
        Property::ReplyTo,
        Property::Expiration,
        Property::MessageId,
        Property::Timestamp,
        Property::Type,
        Property::UserId,
        Property::AppId,
        Property::ClusterId,
    ];

    /// The property's name as used in configs and plugins (`app_id`, `content_type`…).
    pub fn name(self) -> &'static str {
        match self {
            Property::ContentType => "content_type",
            Property::ContentEncoding => "content_encoding",
            Property::Headers => "headers",
            Property::DeliveryMode => "delivery_mode",
            Property::Priority => "priority",
            Property::CorrelationId => "correlation_id",
            Property::ReplyTo => "reply_to",
            Property::Expiration => "expiration",
            Property::MessageId => "message_id",
            Property::Timestamp => "timestamp",
            Property::Type => "type",
            Property::UserId => "user_id",
            Property::AppId => "app_id",
            Property::ClusterId => "cluster_id",
        }
    }

    /// Look a property up by its config name.
    pub fn from_name(name: &str) -> Option<Property> {
        Property::ALL.into_iter().find(|p| p.name() == name)
    }

    fn flag(self) -> u16 {
        1 << (15 - self as u16)
    }
}

/// A property value, borrowing the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropValue<'a> {
    /// Short-string properties.
    Str(&'a [u8]),
    /// `delivery_mode`, `priority`.
    Octet(u8),
    /// `timestamp`.
    Timestamp(u64),
    /// `headers`: the table body without its length prefix.
    Table(&'a [u8]),
}

/// A content header, decoded only as far as its fixed fields.
#[derive(Debug, Clone, Copy)]
pub struct ContentHeader<'a> {
    /// Class id (60 for basic).
    pub class: u16,
    /// Total size of the body frames that follow.
    pub body_size: u64,
    flags: u16,
    props: &'a [u8],
}

impl<'a> ContentHeader<'a> {
    /// Decode the fixed fields of a content header payload.
    pub fn parse(payload: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(payload);
        let class = r.u16("content class")?;
        r.skip(2, "content weight")?;
        let body_size = r.u64("body size")?;
        let flags = r.u16("property flags")?;
        // Basic has 14 properties, so the continuation bit (bit 0) is never needed.
        Ok(ContentHeader {
            class,
            body_size,
            flags,
            props: r.rest(),
        })
    }

    /// Whether a property is present.
    pub fn has(&self, p: Property) -> bool {
        self.flags & p.flag() != 0
    }

    /// Read one property, skipping (not decoding) the ones before it.
    pub fn get(&self, wanted: Property) -> Result<Option<PropValue<'a>>, WireError> {
        if !self.has(wanted) {
            return Ok(None);
        }
        let mut r = Reader::new(self.props);
        for p in Property::ALL {
            if !self.has(p) {
                continue;
            }
            let v = read_prop(&mut r, p)?;
            if p == wanted {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// A short-string property as text (lossy UTF-8).
    pub fn get_str(&self, p: Property) -> Result<Option<std::borrow::Cow<'a, str>>, WireError> {
        Ok(match self.get(p)? {
            Some(PropValue::Str(s)) => Some(String::from_utf8_lossy(s)),
            Some(PropValue::Octet(o)) => Some(o.to_string().into()),
            Some(PropValue::Timestamp(t)) => Some(t.to_string().into()),
            Some(PropValue::Table(_)) | None => None,
        })
    }

    /// One entry of the `headers` table, found by the lazy scan.
    pub fn header(&self, key: &str) -> Result<Option<RawValue<'a>>, WireError> {
        match self.get(Property::Headers)? {
            Some(PropValue::Table(body)) => table::find(body, key),
            _ => Ok(None),
        }
    }

    /// Walk every property and the headers table: is the whole frame well formed?
    pub fn validate(&self) -> Result<(), WireError> {
        let mut r = Reader::new(self.props);
        for p in Property::ALL {
            if self.has(p) {
                if let PropValue::Table(body) = read_prop(&mut r, p)? {
                    table::validate(body)?;
                }
            }
        }
        Ok(())
    }
}

fn read_prop<'a>(r: &mut Reader<'a>, p: Property) -> Result<PropValue<'a>, WireError> {
    Ok(match p {
        Property::Headers => PropValue::Table(r.long_bytes("headers")?),
        Property::DeliveryMode | Property::Priority => PropValue::Octet(r.u8(p.name())?),
        Property::Timestamp => PropValue::Timestamp(r.u64("timestamp")?),
        _ => PropValue::Str(r.short_bytes(p.name())?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::amqp::oracle;
    use amq_protocol::frame::{AMQPContentHeader, AMQPFrame};
    use amq_protocol::protocol::BasicProperties;
    use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};

    fn celery_header() -> Vec<u8> {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("lang"),
            AMQPValue::LongString(LongString::from("py")),
        );
        headers.insert(
            ShortString::from("task"),
            AMQPValue::LongString(LongString::from("reports.rebuild")),
        );
        headers.insert(
            ShortString::from("id"),
            AMQPValue::LongString(LongString::from("6f1c-42")),
        );
        headers.insert(ShortString::from("retries"), AMQPValue::LongInt(0));
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_priority(0)
            .with_correlation_id("6f1c-42".into())
            .with_reply_to("reply.celery".into())
            .with_app_id("hotfix-svc".into());
        let wire = oracle::frame(&AMQPFrame::Header(
            1,
            AMQPContentHeader {
                class_id: 60,
                body_size: 2048,
                properties: props,
            },
        ));
        wire[7..wire.len() - 1].to_vec()
    }

    #[test]
    fn lazy_scan_reads_celery_task_and_app_id() {
        let payload = celery_header();
        let h = ContentHeader::parse(&payload).unwrap();
        assert_eq!(h.class, 60);
        assert_eq!(h.body_size, 2048);
        assert_eq!(
            h.header("task").unwrap().unwrap().as_text().unwrap(),
            "reports.rebuild"
        );
        assert_eq!(
            h.header("id").unwrap().unwrap().as_text().unwrap(),
            "6f1c-42"
        );
        assert_eq!(h.get_str(Property::AppId).unwrap().unwrap(), "hotfix-svc");
        assert_eq!(h.get_str(Property::UserId).unwrap(), None);
        assert_eq!(
            h.get(Property::DeliveryMode).unwrap(),
            Some(PropValue::Octet(2))
        );
        assert!(h.validate().is_ok());
    }

    #[test]
    fn truncated_properties_are_errors_not_panics() {
        let payload = celery_header();
        for cut in 0..payload.len() {
            let Ok(h) = ContentHeader::parse(&payload[..cut]) else {
                continue;
            };
            let _ = h.get(Property::AppId);
            let _ = h.header("task");
            assert!(h.validate().is_err(), "cut at {cut} validated");
        }
    }
}
