//! The RabbitMQ topology and messaging against a real broker (`SDXL_TEST_BROKER_URL`, default
//! the local one). Each test uses its own prefix and deletes its queues and exchanges
//! afterwards.

use std::time::Duration;

use lapin::types::{FieldTable, ShortString};
use lapin::BasicProperties;
use sdxl_worker::broker::{Broker, BrokerError, DeadLetterReason, Lane, Topology};

fn amqp_url() -> String {
    std::env::var("SDXL_TEST_BROKER_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

async fn broker(name: &str) -> Broker {
    let prefix = format!("test-broker-{name}-{}", uuid::Uuid::new_v4().simple());
    let broker = Broker::connect(&amqp_url(), Topology::new(prefix, 5))
        .await
        .expect("RabbitMQ must be running (scripts/test.sh starts it)");
    broker.declare_topology().await.expect("declare topology");
    broker
}

/// Takes a message, retrying briefly: a confirmed publish is routed, but a fresh channel may
/// look a moment before the queue shows it.
async fn get_eventually(broker: &Broker, queue: &str) -> Option<sdxl_worker::broker::Incoming> {
    for _ in 0..50 {
        if let Some(message) = broker.get(queue).await.expect("basic.get") {
            return Some(message);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test]
async fn declaring_the_topology_again_is_a_no_op() {
    let broker = broker("idempotent").await;
    broker.declare_topology().await.expect("second declaration");
    // A second process with the same settings declares the same topology without conflict.
    let other = Broker::connect(&amqp_url(), broker.topology().clone())
        .await
        .unwrap();
    other
        .declare_topology()
        .await
        .expect("declaration from another connection");

    // Different arguments on an existing queue are refused, not silently ignored.
    let mut conflicting = broker.topology().clone();
    conflicting.delivery_limit += 1;
    let third = Broker::connect(&amqp_url(), conflicting).await.unwrap();
    let err = third.declare_topology().await.unwrap_err();
    assert_eq!(err.code(), "broker_declare");
    assert!(!err.is_retryable());

    other.close().await;
    third.close().await;
    broker.delete_topology().await.unwrap();
    broker.close().await;
}

#[tokio::test]
async fn job_messages_reach_the_intake_queue_with_their_properties() {
    let broker = broker("intake").await;
    let id = uuid::Uuid::new_v4().to_string();
    let properties = BasicProperties::default()
        .with_message_id(ShortString::from(id.as_str()))
        .with_priority(7);
    broker.publish_job(b"{\"a\":1}", properties).await.unwrap();

    let intake = broker.topology().intake_queue();
    let message = get_eventually(&broker, &intake)
        .await
        .expect("message in intake");
    assert_eq!(message.body, b"{\"a\":1}");
    assert_eq!(message.message_id(), Some(id.as_str()));
    assert_eq!(message.priority(), Some(7));
    assert!(!message.redelivered);
    message.ack().await.unwrap();
    assert!(broker.get(&intake).await.unwrap().is_none());

    broker.delete_topology().await.unwrap();
    broker.close().await;
}

#[tokio::test]
async fn the_puller_serves_high_before_normal() {
    let broker = broker("lanes").await;
    for i in 0..3 {
        let body = format!("normal-{i}");
        broker
            .publish_work(Lane::Normal, body.as_bytes(), BasicProperties::default())
            .await
            .unwrap();
    }
    broker
        .publish_work(Lane::High, b"high", BasicProperties::default())
        .await
        .unwrap();

    let puller = broker.work_puller().await.unwrap();
    let mut order = Vec::new();
    while let Some(message) = puller.pull().await.unwrap() {
        order.push(String::from_utf8(message.body.clone()).unwrap());
        message.ack().await.unwrap();
    }
    assert_eq!(order, ["high", "normal-0", "normal-1", "normal-2"]);
    puller.close().await;

    broker.delete_topology().await.unwrap();
    broker.close().await;
}

#[tokio::test]
async fn a_nacked_delivery_comes_back_marked_redelivered() {
    let broker = broker("requeue").await;
    broker
        .publish_work(Lane::Normal, b"retry me", BasicProperties::default())
        .await
        .unwrap();
    let puller = broker.work_puller().await.unwrap();
    let first = puller.pull().await.unwrap().expect("first delivery");
    assert!(!first.redelivered);
    assert_eq!(first.delivery_count(), 0);
    first.nack_requeue().await.unwrap();

    let mut again = None;
    for _ in 0..50 {
        again = puller.pull().await.unwrap();
        if again.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = again.expect("redelivery");
    assert_eq!(again.body, b"retry me");
    assert!(again.redelivered);
    assert_eq!(again.delivery_count(), 1);
    again.ack().await.unwrap();
    puller.close().await;

    broker.delete_topology().await.unwrap();
    broker.close().await;
}

#[tokio::test]
async fn unacknowledged_messages_return_when_the_channel_closes() {
    let broker = broker("unacked").await;
    broker
        .publish_work(Lane::High, b"in flight", BasicProperties::default())
        .await
        .unwrap();
    let puller = broker.work_puller().await.unwrap();
    let taken = puller.pull().await.unwrap().expect("delivery");
    drop(taken);
    puller.close().await;

    let queue = broker.topology().work_queue(Lane::High);
    let back = get_eventually(&broker, &queue)
        .await
        .expect("message back in its queue");
    assert_eq!(back.body, b"in flight");
    assert!(back.redelivered);
    back.ack().await.unwrap();

    broker.delete_topology().await.unwrap();
    broker.close().await;
}

#[tokio::test]
async fn dead_letters_carry_their_reason_and_message_id() {
    let broker = broker("dead").await;
    let properties = BasicProperties::default().with_message_id("job-1".into());
    let reason = DeadLetterReason {
        code: "not_json".into(),
        message: "expected value at line 1 column 1".into(),
    };
    broker
        .publish_dead_letter(b"garbage", properties, &reason)
        .await
        .unwrap();

    let queue = broker.topology().dead_queue();
    let dead = get_eventually(&broker, &queue).await.expect("dead letter");
    assert_eq!(dead.body, b"garbage");
    assert_eq!(dead.message_id(), Some("job-1"));
    assert_eq!(
        dead.header_str(sdxl_worker::broker::HEADER_ERROR_CODE)
            .as_deref(),
        Some("not_json")
    );
    assert_eq!(
        dead.header_str(sdxl_worker::broker::HEADER_ERROR)
            .as_deref(),
        Some("expected value at line 1 column 1")
    );
    dead.ack().await.unwrap();

    broker.delete_topology().await.unwrap();
    broker.close().await;
}

#[tokio::test]
async fn a_message_that_reaches_no_queue_is_an_error() {
    let broker = broker("unroutable").await;
    // Remove the only binding of the jobs exchange: a publish there now reaches no queue.
    let connection = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let t = broker.topology();
    channel
        .queue_unbind(
            t.intake_queue().as_str().into(),
            t.jobs_exchange().as_str().into(),
            "".into(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let err = broker
        .publish_job(b"{}", BasicProperties::default())
        .await
        .unwrap_err();
    assert!(matches!(err, BrokerError::Unroutable { .. }), "{err:?}");
    assert_eq!(err.code(), "broker_unroutable");

    // The publishing channel survives the returned message.
    broker
        .publish_work(Lane::Normal, b"still works", BasicProperties::default())
        .await
        .unwrap();

    connection.close(200, "done".into()).await.unwrap();
    broker.delete_topology().await.unwrap();
    broker.close().await;
}

#[tokio::test]
async fn the_intake_consumer_respects_its_prefetch() {
    let broker = broker("prefetch").await;
    for i in 0..5 {
        broker
            .publish_job(format!("{i}").as_bytes(), BasicProperties::default())
            .await
            .unwrap();
    }
    let mut stream = broker.intake_consumer(2, "test-intake").await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    let second = stream.next().await.unwrap().unwrap();
    // With two unacknowledged deliveries, a third does not arrive until one is acked.
    let third = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    assert!(third.is_err(), "prefetch 2 delivered a third message");
    first.ack().await.unwrap();
    let third = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("third message after an ack")
        .unwrap()
        .unwrap();
    assert_eq!(third.body, b"2");
    second.ack().await.unwrap();
    third.ack().await.unwrap();
    stream.cancel().await.unwrap();
    stream.close().await;

    broker.delete_topology().await.unwrap();
    broker.close().await;
}
