//! `sdxl-worker demo`: one job end to end. Migrates the database, runs a worker in this
//! process on the CPU, submits one small job for the default model (the bundled tiny model
//! unless configured otherwise), waits for it, prints the succeeded row and where its PNG
//! is, then shuts the worker down. It uses its own queue names (`{prefix}-demo-{random}`),
//! removed at the end, so that it never takes jobs from a running deployment.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::json;
use uuid::Uuid;

use crate::config::{Config, DevicesSetting};
use crate::db::{Db, JobState};
use crate::engine::Device;
use crate::storage::Storage;
use crate::worker::{self, RunOptions};

/// Arguments of `demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    #[arg(long, default_value = "a lighthouse on a cliff at dawn, watercolor")]
    pub prompt: String,
    /// Width and height of the image.
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    #[arg(long, default_value_t = 8)]
    pub steps: u32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Longest wait for the job, in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

/// Run `demo`.
pub async fn run(mut config: Config, args: DemoArgs) -> anyhow::Result<ExitCode> {
    let suffix = Uuid::new_v4().simple().to_string();
    config.broker.prefix = format!("{}-demo-{}", config.broker.prefix, &suffix[..8]);
    config.worker.devices = DevicesSetting::List(vec![Device::Cpu]);

    let db = Db::connect(&config.database)
        .await
        .context("connecting to Postgres")?;
    db.migrate().await.context("migrating the database")?;
    println!("database schema {:?} is up to date", db.schema());

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker_config = config.clone();
    let mut worker = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        worker::run_with(worker_config, RunOptions::default(), shutdown).await
    });

    let broker = super::submit::connect_broker(&config).await?;
    let id = Uuid::new_v4();
    let message = json!({
        "version": crate::job::VERSION,
        "id": id,
        "model": config.models.default,
        "prompt": args.prompt,
        "width": args.size,
        "height": args.size,
        "steps": args.steps,
        "seed": args.seed,
    });
    let body = serde_json::to_vec(&message)?;
    super::submit::publish(&broker, &body, id, 0).await?;
    println!(
        "submitted job {id} (model {}, {}x{}, {} steps)",
        config.models.default, args.size, args.size, args.steps
    );

    let waited = tokio::select! {
        row = super::submit::wait_for(&db, id, Duration::from_secs(args.timeout)) => row,
        ended = &mut worker => {
            let reason = match ended {
                Ok(Ok(())) => "stopped".to_owned(),
                Ok(Err(err)) => format!("failed: {err}"),
                Err(join) => format!("ended abnormally: {join}"),
            };
            bail!("the worker {reason} before the job finished");
        }
    };

    let _ = stop.send(());
    let worker_result = worker.await;
    if let Err(err) = broker.delete_topology().await {
        tracing::warn!(error = %err, "cannot remove the demo queues");
    }
    broker.close().await;
    let row = waited?;
    match worker_result {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Err(err).context("the worker failed"),
        Err(join) => bail!("the worker ended abnormally: {join}"),
    }

    let metrics = db.get_metrics(id).await?;
    println!("{}", super::status::render(&row, metrics.as_ref())?);
    db.close().await;
    if row.state != JobState::Succeeded {
        bail!("the demo job ended {}", row.state);
    }
    let storage = Storage::from_config(&config.storage).await?;
    for image in &row.images {
        println!(
            "image {}: {}",
            image.index,
            storage.describe_location(&image.key)
        );
    }
    Ok(ExitCode::SUCCESS)
}
