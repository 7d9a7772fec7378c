//! Errors of the broker module, each with a stable machine-readable code.

/// Everything that can go wrong talking to RabbitMQ.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The prefix makes queue or exchange names longer than AMQP allows (255 bytes).
    #[error("broker prefix is too long: `{name}` exceeds 255 bytes")]
    NameTooLong { name: String },
    /// The AMQP connection could not be opened.
    #[error("cannot connect to the broker: {source}")]
    Connect {
        #[source]
        source: lapin::Error,
    },
    /// A channel could not be opened or configured (qos, confirm mode).
    #[error("cannot set up a broker channel ({what}): {source}")]
    Channel {
        what: &'static str,
        #[source]
        source: lapin::Error,
    },
    /// Declaring an exchange, a queue or a binding failed (usually: it exists with other arguments).
    #[error("cannot declare {what} `{name}`: {source}")]
    Declare {
        what: &'static str,
        name: String,
        #[source]
        source: lapin::Error,
    },
    /// The publish itself failed (connection or channel gone).
    #[error("cannot publish to `{exchange}`: {source}")]
    Publish {
        exchange: String,
        #[source]
        source: lapin::Error,
    },
    /// The broker refused the message (basic.nack under publisher confirms).
    #[error("the broker did not accept the message published to `{exchange}` (nack)")]
    Nacked { exchange: String },
    /// The message reached no queue (returned under the mandatory flag).
    #[error(
        "the message published to `{exchange}` with routing key `{routing_key}` reached no queue \
         ({reply_code} {reply_text})"
    )]
    Unroutable {
        exchange: String,
        routing_key: String,
        reply_code: u16,
        reply_text: String,
    },
    /// Starting a consumer or pulling a message failed.
    #[error("cannot receive from `{queue}`: {source}")]
    Receive {
        queue: String,
        #[source]
        source: lapin::Error,
    },
    /// Acknowledging (ack, nack) a delivery failed; the broker redelivers the message.
    #[error("cannot acknowledge a delivery: {source}")]
    Acknowledge {
        #[source]
        source: lapin::Error,
    },
}

impl BrokerError {
    /// Stable snake_case code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            BrokerError::NameTooLong { .. } => "broker_name_too_long",
            BrokerError::Connect { .. } => "broker_connect",
            BrokerError::Channel { .. } => "broker_channel",
            BrokerError::Declare { .. } => "broker_declare",
            BrokerError::Publish { .. } => "broker_publish",
            BrokerError::Nacked { .. } => "broker_nacked",
            BrokerError::Unroutable { .. } => "broker_unroutable",
            BrokerError::Receive { .. } => "broker_receive",
            BrokerError::Acknowledge { .. } => "broker_acknowledge",
        }
    }

    /// Whether trying again later can succeed. A declaration conflict or an unroutable message
    /// is a configuration problem that retrying does not fix.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            BrokerError::NameTooLong { .. }
                | BrokerError::Declare { .. }
                | BrokerError::Unroutable { .. }
        )
    }
}
