//! A worker whose broker connections are closed by the broker (as on a broker restart or a
//! network cut) reconnects on its own and goes on taking jobs.

mod queue_harness;
mod support;

use std::process::Command;
use std::time::Duration;

use queue_harness::{small_job, Stack, StorageKind};
use sdxl_worker::broker::{Broker, Topology};
use sdxl_worker::db::JobState;
use sdxl_worker::worker::RunOptions;
use uuid::Uuid;

/// Pids of the broker connections whose client named itself after `prefix` (the plain
/// output of rabbitmqctl: one connection a line, the pid first, tab-separated).
fn connections_of(prefix: &str) -> Vec<String> {
    let output = Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "pid",
            "client_properties",
            "-q",
            "--no-table-headers",
        ])
        .output()
        .expect("rabbitmqctl runs on the broker's machine");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains(&format!("sdxl-worker ({prefix})")))
        .filter_map(|line| line.split('\t').next().map(str::to_owned))
        .collect()
}

fn close_connection(pid: &str) {
    let status = Command::new("rabbitmqctl")
        .args([
            "close_connection",
            pid,
            "closed by the reconnection test",
            "-q",
        ])
        .status()
        .expect("rabbitmqctl");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_reconnects_after_the_broker_closes_its_connection() {
    let stack = Stack::new("reconnect", StorageKind::Local).await;
    let prefix = stack.config.broker.prefix.clone();
    let worker = stack.start_worker(RunOptions::default());
    let first = Uuid::new_v4();
    stack.publish(&small_job(first)).await;
    let row = stack.wait_terminal(first, Duration::from_secs(60)).await;
    assert_eq!(row.state, JobState::Succeeded);

    // Close every connection named after this test's prefix: the worker's and the test's own.
    let pids = connections_of(&prefix);
    assert!(
        pids.len() >= 2,
        "the worker's and the test's connections: {pids:?}"
    );
    for pid in &pids {
        close_connection(pid);
    }

    // A new producer connection; the job is taken once the worker has reconnected.
    let topology = Topology::new(prefix.clone(), stack.config.broker.delivery_limit);
    let producer = Broker::connect(&stack.config.broker.url, topology)
        .await
        .unwrap();
    let second = Uuid::new_v4();
    let body = serde_json::to_vec(&small_job(second)).unwrap();
    producer
        .publish_job(&body, lapin::BasicProperties::default())
        .await
        .unwrap();
    let row = stack.wait_terminal(second, Duration::from_secs(60)).await;
    assert_eq!(row.state, JobState::Succeeded, "{row:#?}");
    assert!(!worker.is_finished(), "the worker kept running");

    worker.stop().await.unwrap();
    producer.delete_topology().await.unwrap();
    producer.close().await;
}
