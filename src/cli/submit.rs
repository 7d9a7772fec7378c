//! `sdxl-worker submit`: builds a version-1 job message from flags (or takes one from
//! `--json FILE`), checks it against this deployment's limits and models, publishes it to
//! `{prefix}.jobs` with publisher confirms and prints its id. With `--wait` it then polls the
//! status row until the job finishes and prints the row.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lapin::types::ShortString;
use lapin::BasicProperties;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::broker::{Broker, Topology};
use crate::config::Config;
use crate::db::{Db, JobRow};
use crate::job::{self, JobRejection};

/// Arguments of `submit`.
#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// Take the whole message from this JSON file (`-` for stdin); flags are ignored. An `id`
    /// is added when the file has none.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Job id (default: a new random UUID).
    #[arg(long)]
    pub id: Option<Uuid>,
    #[arg(long, required_unless_present = "json")]
    pub prompt: Option<String>,
    #[arg(long)]
    pub prompt_2: Option<String>,
    #[arg(long)]
    pub negative_prompt: Option<String>,
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub width: Option<u32>,
    #[arg(long)]
    pub height: Option<u32>,
    #[arg(long)]
    pub steps: Option<u32>,
    #[arg(long)]
    pub guidance_scale: Option<f64>,
    /// Scheduler id (`euler`, `euler_a`, `dpmpp_2m`, ...).
    #[arg(long)]
    pub scheduler: Option<String>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub num_images: Option<u32>,
    /// 0-9; 5 and above go to the high-priority queue.
    #[arg(long)]
    pub priority: Option<u8>,
    /// Wait for the job to finish and print its status row.
    #[arg(long)]
    pub wait: bool,
    /// Longest wait with `--wait`, in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

/// Run `submit`.
pub async fn run(config: Config, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let message = build_message(&args)?;
    let body = serde_json::to_vec(&message)?;
    let job = match job::parse_and_validate_with(
        &body,
        &config.limits,
        &config.models,
        &config.controlnet,
    ) {
        Ok(job) => job,
        Err(JobRejection::Invalid { errors, .. }) => {
            for error in &errors {
                eprintln!("{}: {} ({})", error.field, error.message, error.code);
            }
            bail!("the job message is invalid");
        }
        Err(rejection) => bail!("the job message is invalid: {rejection}"),
    };

    let broker = connect_broker(&config).await?;
    publish(&broker, &body, job.id, job.priority).await?;
    broker.close().await;
    println!("{}", job.id);

    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let db = Db::connect(&config.database)
        .await
        .context("connecting to Postgres")?;
    let row = wait_for(&db, job.id, Duration::from_secs(args.timeout)).await?;
    let metrics = db.get_metrics(job.id).await?;
    println!("{}", super::status::render(&row, metrics.as_ref())?);
    db.close().await;
    Ok(if row.state == crate::db::JobState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The message: the `--json` file (with an id added when missing) or one built from flags.
pub fn build_message(args: &SubmitArgs) -> anyhow::Result<Value> {
    if let Some(path) = &args.json {
        let text = if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).context("reading the message from stdin")?
        } else {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        };
        let mut value: Value = serde_json::from_str(&text).context("the message is not JSON")?;
        let Some(object) = value.as_object_mut() else {
            bail!("the message must be a JSON object");
        };
        if !object.contains_key("id") {
            let id = args.id.unwrap_or_else(Uuid::new_v4);
            object.insert("id".to_owned(), json!(id));
        }
        return Ok(value);
    }
    let mut object = Map::new();
    object.insert("version".to_owned(), json!(job::VERSION));
    object.insert("id".to_owned(), json!(args.id.unwrap_or_else(Uuid::new_v4)));
    let mut put = |key: &str, value: Option<Value>| {
        if let Some(value) = value {
            object.insert(key.to_owned(), value);
        }
    };
    put("prompt", args.prompt.as_ref().map(|v| json!(v)));
    put("prompt_2", args.prompt_2.as_ref().map(|v| json!(v)));
    put(
        "negative_prompt",
        args.negative_prompt.as_ref().map(|v| json!(v)),
    );
    put("model", args.model.as_ref().map(|v| json!(v)));
    put("width", args.width.map(|v| json!(v)));
    put("height", args.height.map(|v| json!(v)));
    put("steps", args.steps.map(|v| json!(v)));
    put("guidance_scale", args.guidance_scale.map(|v| json!(v)));
    put("scheduler", args.scheduler.as_ref().map(|v| json!(v)));
    put("seed", args.seed.map(|v| json!(v)));
    put("num_images", args.num_images.map(|v| json!(v)));
    put("priority", args.priority.map(|v| json!(v)));
    Ok(Value::Object(object))
}

/// Connects and declares the topology (so the message has a queue to land in).
pub async fn connect_broker(config: &Config) -> anyhow::Result<Broker> {
    let topology = Topology::new(config.broker.prefix.clone(), config.broker.delivery_limit);
    let broker = Broker::connect(&config.broker.url, topology)
        .await
        .context("connecting to RabbitMQ")?;
    broker
        .declare_topology()
        .await
        .context("declaring the queues")?;
    Ok(broker)
}

/// Publishes a job message to `{prefix}.jobs`, confirmed by the broker.
pub async fn publish(broker: &Broker, body: &[u8], id: Uuid, priority: u8) -> anyhow::Result<()> {
    let properties = BasicProperties::default()
        .with_message_id(ShortString::from(id.to_string()))
        .with_content_type(ShortString::from("application/json"))
        .with_priority(priority);
    broker
        .publish_job(body, properties)
        .await
        .context("publishing the job")
}

/// Polls the row of `id` until it is terminal, showing its state changes and step progress
/// on stderr (a live bar on a terminal, plain lines otherwise).
pub async fn wait_for(db: &Db, id: Uuid, timeout: Duration) -> anyhow::Result<JobRow> {
    let deadline = Instant::now() + timeout;
    let mut progress = super::progress::StepProgress::new();
    let mut last_state = None;
    loop {
        if let Some(row) = db.get(id).await.context("reading the job row")? {
            if last_state != Some(row.state) {
                last_state = Some(row.state);
                let place = match (&row.worker_id, &row.device) {
                    (Some(w), Some(d)) if row.state == crate::db::JobState::Running => {
                        format!(" on {w} ({d})")
                    }
                    _ => String::new(),
                };
                progress.note(&format!("job {id}: {}{place}", row.state));
            }
            if let (Some(step), Some(total)) = (row.progress_step, row.progress_total) {
                if row.state == crate::db::JobState::Running {
                    progress.step(
                        u32::try_from(step).unwrap_or(0),
                        u32::try_from(total).unwrap_or(0),
                    );
                }
            }
            if row.state.is_terminal() {
                progress.finish();
                return Ok(row);
            }
        }
        if Instant::now() >= deadline {
            progress.finish();
            bail!("job {id} did not finish within {} s", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
