//! Connects to the AMQP URL given as the only argument and does what a lapin producer does:
//! declare, enable confirms, publish with properties and headers, get, close.

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .ok_or("usage: lapin-seed-client AMQP_URL")?;
    let props = ConnectionProperties::default().with_connection_name("fuzz-seed-lapin".into());
    let conn = Connection::connect(&url, props).await?;
    let ch = conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(60_000));
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;

    let mut headers = FieldTable::default();
    headers.insert(
        "task".into(),
        AMQPValue::LongString(LongString::from("lapin.job")),
    );
    headers.insert("attempt".into(), AMQPValue::ShortShortUInt(2));
    headers.insert("score".into(), AMQPValue::Double(0.25));
    headers.insert("ratio".into(), AMQPValue::Float(-1.5));
    headers.insert("ts".into(), AMQPValue::Timestamp(1_714_564_800));
    headers.insert(
        "tags".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![
            AMQPValue::LongString(LongString::from("a")),
            AMQPValue::ShortInt(-3),
            AMQPValue::Void,
        ])),
    );
    let properties = BasicProperties::default()
        .with_content_type("application/octet-stream".into())
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_message_id("lapin-1".into())
        .with_app_id("lapin-seed".into());
    for body in [&b"lapin body"[..], &[0u8; 5000][..]] {
        ch.basic_publish(
            "".into(),
            q.name().clone(),
            BasicPublishOptions::default(),
            body,
            properties.clone(),
        )
        .await?
        .await?;
    }
    let _ = ch
        .basic_get(q.name().clone(), BasicGetOptions { no_ack: true })
        .await?;
    ch.close(200, "bye".into()).await?;
    conn.close(200, "bye".into()).await?;
    Ok(())
}
