//! Queue and exchange names derived from the configured prefix, and their idempotent declaration.
//!
//! ```text
//! producers ──▶ {p}.jobs (fanout) ──▶ {p}.intake (quorum)          ◀── intake consumer
//! intake    ──▶ {p}.work (direct) ──high──▶ {p}.work.high (quorum)  ◀── GPU consumers (basic.get,
//!                                 └normal─▶ {p}.work.normal (quorum)     high before normal)
//! dead letters ──▶ {p}.dead (fanout) ──▶ {p}.dead (quorum)
//! ```
//! Work queues carry `x-delivery-limit` and dead-letter to `{p}.dead`. Every declaration is
//! idempotent: declaring again with the same arguments is a no-op, so every worker declares
//! the whole topology when it starts.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use super::BrokerError;

/// Routing key and queue of a work message: high priority is always served first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    High,
    Normal,
}

impl Lane {
    /// Priorities 5-9 go to the high lane, 0-4 to the normal lane.
    pub fn for_priority(priority: u8) -> Lane {
        if priority >= 5 {
            Lane::High
        } else {
            Lane::Normal
        }
    }

    /// The routing key on `{p}.work`.
    pub fn routing_key(self) -> &'static str {
        match self {
            Lane::High => "high",
            Lane::Normal => "normal",
        }
    }
}

/// Names of every exchange and queue, derived from one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub prefix: String,
    /// `x-delivery-limit` of the work queues.
    pub delivery_limit: u32,
}

impl Topology {
    pub fn new(prefix: impl Into<String>, delivery_limit: u32) -> Topology {
        Topology {
            prefix: prefix.into(),
            delivery_limit,
        }
    }

    /// Fanout exchange producers publish job messages to.
    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.prefix)
    }
    /// Queue the intake consumer reads.
    pub fn intake_queue(&self) -> String {
        format!("{}.intake", self.prefix)
    }
    /// Direct exchange of validated work.
    pub fn work_exchange(&self) -> String {
        format!("{}.work", self.prefix)
    }
    /// Work queue of one lane.
    pub fn work_queue(&self, lane: Lane) -> String {
        format!("{}.work.{}", self.prefix, lane.routing_key())
    }
    /// Fanout exchange of dead letters.
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }
    /// Queue holding dead letters for inspection.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// Every exchange and queue name fits in an AMQP short string (255 bytes).
    pub fn check_names(&self) -> Result<(), BrokerError> {
        // `{p}.work.normal` is the longest name.
        let longest = self.work_queue(Lane::Normal);
        if longest.len() > 255 {
            return Err(BrokerError::NameTooLong { name: longest });
        }
        Ok(())
    }

    /// Declares all exchanges, queues and bindings (idempotent).
    pub async fn declare(&self, channel: &Channel) -> Result<(), BrokerError> {
        self.declare_exchange(channel, &self.jobs_exchange(), ExchangeKind::Fanout)
            .await?;
        self.declare_exchange(channel, &self.work_exchange(), ExchangeKind::Direct)
            .await?;
        self.declare_exchange(channel, &self.dead_exchange(), ExchangeKind::Fanout)
            .await?;

        declare_queue(channel, &self.dead_queue(), quorum_args()).await?;
        bind(channel, &self.dead_queue(), &self.dead_exchange(), "").await?;

        declare_queue(channel, &self.intake_queue(), quorum_args()).await?;
        bind(channel, &self.intake_queue(), &self.jobs_exchange(), "").await?;

        for lane in [Lane::High, Lane::Normal] {
            let mut args = quorum_args();
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(LongString::from(self.dead_exchange())),
            );
            let queue = self.work_queue(lane);
            declare_queue(channel, &queue, args).await?;
            bind(channel, &queue, &self.work_exchange(), lane.routing_key()).await?;
        }
        Ok(())
    }

    async fn declare_exchange(
        &self,
        channel: &Channel,
        name: &str,
        kind: ExchangeKind,
    ) -> Result<(), BrokerError> {
        let options = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(name.into(), kind, options, FieldTable::default())
            .await
            .map_err(|source| BrokerError::Declare {
                what: "exchange",
                name: name.to_owned(),
                source,
            })
    }
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args
}

async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> Result<(), BrokerError> {
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(name.into(), options, args)
        .await
        .map(|_| ())
        .map_err(|source| BrokerError::Declare {
            what: "queue",
            name: name.to_owned(),
            source,
        })
}

async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    routing_key: &str,
) -> Result<(), BrokerError> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| BrokerError::Declare {
            what: "binding",
            name: format!("{exchange} -> {queue} ({routing_key})"),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        let t = Topology::new("acme", 5);
        assert_eq!(t.jobs_exchange(), "acme.jobs");
        assert_eq!(t.intake_queue(), "acme.intake");
        assert_eq!(t.work_exchange(), "acme.work");
        assert_eq!(t.work_queue(Lane::High), "acme.work.high");
        assert_eq!(t.work_queue(Lane::Normal), "acme.work.normal");
        assert_eq!(t.dead_exchange(), "acme.dead");
        assert_eq!(t.dead_queue(), "acme.dead");
    }

    #[test]
    fn names_longer_than_amqp_allows_are_refused() {
        assert!(Topology::new("p".repeat(243), 5).check_names().is_ok());
        let err = Topology::new("p".repeat(244), 5).check_names().unwrap_err();
        assert_eq!(err.code(), "broker_name_too_long");
        assert!(!err.is_retryable());
    }

    #[test]
    fn priorities_five_and_above_are_high() {
        assert_eq!(Lane::for_priority(0), Lane::Normal);
        assert_eq!(Lane::for_priority(4), Lane::Normal);
        assert_eq!(Lane::for_priority(5), Lane::High);
        assert_eq!(Lane::for_priority(9), Lane::High);
    }
}
