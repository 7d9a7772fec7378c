//! A received message with manual acknowledgement.

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use lapin::Acker;
use lapin::BasicProperties;

use super::BrokerError;

/// One delivery from a queue. It stays unacknowledged until [`Incoming::ack`] or
/// [`Incoming::nack_requeue`]; a closed channel returns it to its queue.
#[derive(Debug)]
pub struct Incoming {
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    /// The broker delivered this message before (to this or another consumer).
    pub redelivered: bool,
    /// The queue it came from.
    pub queue: String,
    acker: Acker,
}

impl Incoming {
    pub(crate) fn from_delivery(delivery: Delivery, queue: &str) -> Incoming {
        Incoming {
            body: delivery.data,
            properties: delivery.properties,
            redelivered: delivery.redelivered,
            queue: queue.to_owned(),
            acker: delivery.acker,
        }
    }

    /// The AMQP `message_id` property.
    pub fn message_id(&self) -> Option<&str> {
        self.properties.message_id().as_ref().map(|id| id.as_str())
    }

    /// The AMQP `priority` property.
    pub fn priority(&self) -> Option<u8> {
        *self.properties.priority()
    }

    /// How many times a quorum queue delivered this message before (`x-delivery-count`).
    pub fn delivery_count(&self) -> u64 {
        self.header(super::HEADER_DELIVERY_COUNT)
            .and_then(|value| match value {
                AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
                AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
                AMQPValue::LongUInt(n) => Some(u64::from(*n)),
                AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
                AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
                _ => None,
            })
            .unwrap_or(0)
    }

    /// A header's value as text, when it is a string.
    pub fn header_str(&self, name: &str) -> Option<String> {
        match self.header(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            _ => None,
        }
    }

    fn header(&self, name: &str) -> Option<&AMQPValue> {
        self.properties.headers().as_ref()?.inner().get(name)
    }

    /// Acknowledges the message: the broker forgets it.
    pub async fn ack(&self) -> Result<(), BrokerError> {
        self.acker
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
            .map_err(|source| BrokerError::Acknowledge { source })
    }

    /// Returns the message to its queue for another delivery.
    pub async fn nack_requeue(&self) -> Result<(), BrokerError> {
        let options = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        self.acker
            .nack(options)
            .await
            .map(|_| ())
            .map_err(|source| BrokerError::Acknowledge { source })
    }
}
