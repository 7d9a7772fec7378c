//! RabbitMQ: the topology (exchanges and queues derived from `broker.prefix`), publishing with
//! publisher confirms and the mandatory flag, the intake consumer and the GPU-side pull.
//!
//! Everything this module publishes is confirmed by the broker before the call returns: a
//! message the broker refuses (nack) or cannot route (returned under `mandatory`) is an error,
//! never a silent loss. Deliveries are acknowledged manually through [`Incoming`].
//!
//! RabbitMQ versions: quorum queues have message priorities only from 4.0, so priorities are
//! not left to the queue. The intake routes each job to a `high` or a `normal` work queue and
//! GPU consumers always pull (basic.get) from `high` before `normal`, which gives strict
//! priority on 3.10 and on 4.x alike. A delivery that stays unacknowledged longer than the
//! broker's consumer timeout (30 minutes by default; broker-wide before 3.12) is returned to
//! its queue and its channel closed. The job is not lost (the message is back) nor run twice:
//! the worker that gets it again finds the row `running` under a live worker's lease and
//! leaves it there (see `crate::worker`), and the owner's result stands.

mod error;
mod message;
mod topology;

use futures::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

pub use error::BrokerError;
pub use message::Incoming;
pub use topology::{Lane, Topology};

/// Header carrying the stable error code of a dead letter.
pub const HEADER_ERROR_CODE: &str = "x-sdxl-error-code";
/// Header carrying the human-readable reason of a dead letter.
pub const HEADER_ERROR: &str = "x-sdxl-error";
/// Header a quorum queue sets on a redelivered message.
pub const HEADER_DELIVERY_COUNT: &str = "x-delivery-count";

/// Why a message was dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterReason {
    pub code: String,
    pub message: String,
}

/// A connection to RabbitMQ with a confirm-mode channel for publishing.
pub struct Broker {
    connection: Connection,
    /// Confirm-mode channel; reopened when the broker closed it (a channel error closes it).
    publisher: tokio::sync::Mutex<Channel>,
    /// Channel of [`Broker::get`], opened on first use; its deliveries are acked on it.
    getter: tokio::sync::Mutex<Option<Channel>>,
    topology: Topology,
}

impl Broker {
    /// Connects to `url` (`amqp://user:pass@host:port/vhost`) and opens the publishing channel.
    pub async fn connect(url: &str, topology: Topology) -> Result<Broker, BrokerError> {
        topology.check_names()?;
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("sdxl-worker ({})", topology.prefix).into());
        let connection = Connection::connect(url, properties)
            .await
            .map_err(|source| BrokerError::Connect { source })?;
        let publisher = open_confirm_channel(&connection).await?;
        Ok(Broker {
            connection,
            publisher: tokio::sync::Mutex::new(publisher),
            getter: tokio::sync::Mutex::new(None),
            topology,
        })
    }

    /// The publishing channel, reopened if the broker closed it.
    async fn publisher(&self) -> Result<Channel, BrokerError> {
        let mut channel = self.publisher.lock().await;
        if !channel.status().connected() {
            *channel = open_confirm_channel(&self.connection).await?;
        }
        Ok(channel.clone())
    }

    /// The names this broker uses.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Declares every exchange, queue and binding (idempotent).
    pub async fn declare_topology(&self) -> Result<(), BrokerError> {
        let channel = open_channel(&self.connection).await?;
        let result = self.topology.declare(&channel).await;
        close_quietly(&channel).await;
        result
    }

    /// Deletes every exchange and queue of the topology, with their messages. For tests and
    /// for tearing down a deployment; workers never call it.
    pub async fn delete_topology(&self) -> Result<(), BrokerError> {
        let channel = open_channel(&self.connection).await?;
        let t = &self.topology;
        let queues = [
            t.intake_queue(),
            t.work_queue(Lane::High),
            t.work_queue(Lane::Normal),
            t.dead_queue(),
        ];
        for queue in queues {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(|source| BrokerError::Declare {
                    what: "queue deletion",
                    name: queue.clone(),
                    source,
                })?;
        }
        for exchange in [t.jobs_exchange(), t.work_exchange(), t.dead_exchange()] {
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await
                .map_err(|source| BrokerError::Declare {
                    what: "exchange deletion",
                    name: exchange.clone(),
                    source,
                })?;
        }
        close_quietly(&channel).await;
        Ok(())
    }

    /// Publishes a job message to `{p}.jobs`, as any producer does.
    pub async fn publish_job(
        &self,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        let exchange = self.topology.jobs_exchange();
        self.publish(&exchange, "", body, properties).await
    }

    /// Publishes a validated job message to the work queue of `lane`.
    pub async fn publish_work(
        &self,
        lane: Lane,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        let exchange = self.topology.work_exchange();
        self.publish(&exchange, lane.routing_key(), body, properties)
            .await
    }

    /// Publishes `body` to `{p}.dead` with the reason in the `x-sdxl-error-code` and
    /// `x-sdxl-error` headers; other properties (message id, headers) are kept.
    pub async fn publish_dead_letter(
        &self,
        body: &[u8],
        properties: BasicProperties,
        reason: &DeadLetterReason,
    ) -> Result<(), BrokerError> {
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(
            HEADER_ERROR_CODE.into(),
            AMQPValue::LongString(LongString::from(reason.code.as_str())),
        );
        headers.insert(
            HEADER_ERROR.into(),
            AMQPValue::LongString(LongString::from(reason.message.as_str())),
        );
        let exchange = self.topology.dead_exchange();
        self.publish(&exchange, "", body, properties.with_headers(headers))
            .await
    }

    /// Starts consuming `{p}.intake` with at most `prefetch` unacknowledged messages.
    pub async fn intake_consumer(
        &self,
        prefetch: u16,
        tag: &str,
    ) -> Result<MessageStream, BrokerError> {
        let queue = self.topology.intake_queue();
        let channel = open_channel(&self.connection).await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|source| BrokerError::Channel {
                what: "prefetch",
                source,
            })?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|source| BrokerError::Receive {
                queue: queue.clone(),
                source,
            })?;
        Ok(MessageStream {
            channel,
            consumer,
            queue,
        })
    }

    /// Opens a channel for pulling work messages one at a time.
    pub async fn work_puller(&self) -> Result<WorkPuller, BrokerError> {
        let channel = open_channel(&self.connection).await?;
        Ok(WorkPuller {
            channel,
            high: self.topology.work_queue(Lane::High),
            normal: self.topology.work_queue(Lane::Normal),
        })
    }

    /// Takes one message from any queue (no automatic ack), or `None` when it is empty.
    pub async fn get(&self, queue: &str) -> Result<Option<Incoming>, BrokerError> {
        let channel = {
            let mut getter = self.getter.lock().await;
            match getter.as_ref() {
                Some(channel) if channel.status().connected() => channel.clone(),
                _ => {
                    let channel = open_channel(&self.connection).await?;
                    *getter = Some(channel.clone());
                    channel
                }
            }
        };
        basic_get(&channel, queue).await
    }

    /// Messages ready (not yet delivered) in `queue`, read with a passive declare on a
    /// channel of its own (a missing queue closes that channel, not the others).
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, BrokerError> {
        let channel = open_channel(&self.connection).await?;
        let options = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let result = channel
            .queue_declare(queue.into(), options, FieldTable::default())
            .await
            .map(|q| q.message_count())
            .map_err(|source| BrokerError::Declare {
                what: "queue (passive)",
                name: queue.to_owned(),
                source,
            });
        close_quietly(&channel).await;
        result
    }

    /// Whether the connection to the broker is open.
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected()
    }

    /// Closes the connection; unacknowledged deliveries go back to their queues.
    pub async fn close(&self) {
        if let Err(err) = self.connection.close(200, "shutting down".into()).await {
            tracing::debug!(error = %err, "closing the broker connection");
        }
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let publish_error = |source| BrokerError::Publish {
            exchange: exchange.to_owned(),
            source,
        };
        let confirmation = self
            .publisher()
            .await?
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                options,
                body,
                properties.with_delivery_mode(2),
            )
            .await
            .map_err(publish_error)?
            .await
            .map_err(publish_error)?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                Err(BrokerError::Unroutable {
                    exchange: exchange.to_owned(),
                    routing_key: routing_key.to_owned(),
                    reply_code: returned.reply_code,
                    reply_text: returned.reply_text.to_string(),
                })
            }
            Confirmation::Nack(None) | Confirmation::NotRequested => Err(BrokerError::Nacked {
                exchange: exchange.to_owned(),
            }),
        }
    }
}

/// A basic.consume subscription.
pub struct MessageStream {
    channel: Channel,
    consumer: lapin::Consumer,
    queue: String,
}

impl MessageStream {
    /// The next delivery; `None` once the consumer is cancelled or its channel closed.
    pub async fn next(&mut self) -> Option<Result<Incoming, BrokerError>> {
        let delivery = self.consumer.next().await?;
        Some(
            delivery
                .map(|delivery| Incoming::from_delivery(delivery, &self.queue))
                .map_err(|source| BrokerError::Receive {
                    queue: self.queue.clone(),
                    source,
                }),
        )
    }

    /// Stops new deliveries; those already received can still be acknowledged.
    pub async fn cancel(&self) -> Result<(), BrokerError> {
        self.channel
            .basic_cancel(self.consumer.tag(), BasicCancelOptions::default())
            .await
            .map_err(|source| BrokerError::Receive {
                queue: self.queue.clone(),
                source,
            })
    }

    /// Closes the channel: unacknowledged deliveries go back to the queue.
    pub async fn close(self) {
        close_quietly(&self.channel).await;
    }
}

/// Pulls work with basic.get, the high lane always before the normal lane.
pub struct WorkPuller {
    channel: Channel,
    high: String,
    normal: String,
}

impl WorkPuller {
    /// The next work message, or `None` when both lanes are empty.
    pub async fn pull(&self) -> Result<Option<Incoming>, BrokerError> {
        if let Some(message) = basic_get(&self.channel, &self.high).await? {
            return Ok(Some(message));
        }
        basic_get(&self.channel, &self.normal).await
    }

    /// Closes the channel: unacknowledged deliveries go back to their queues.
    pub async fn close(self) {
        close_quietly(&self.channel).await;
    }
}

async fn basic_get(channel: &Channel, queue: &str) -> Result<Option<Incoming>, BrokerError> {
    let message = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await
        .map_err(|source| BrokerError::Receive {
            queue: queue.to_owned(),
            source,
        })?;
    Ok(message.map(|message| Incoming::from_delivery(message.delivery, queue)))
}

async fn open_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    connection
        .create_channel()
        .await
        .map_err(|source| BrokerError::Channel {
            what: "open",
            source,
        })
}

async fn open_confirm_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    let channel = open_channel(connection).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|source| BrokerError::Channel {
            what: "confirm mode",
            source,
        })?;
    Ok(channel)
}

async fn close_quietly(channel: &Channel) {
    if let Err(err) = channel.close(200, "done".into()).await {
        tracing::debug!(error = %err, "closing a broker channel");
    }
}
