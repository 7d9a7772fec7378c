//! `sdxl-worker status ID`: prints a job's status row (with its metrics once it finished) as
//! JSON. An unknown id prints "not found" and exits with code 2.

use std::process::ExitCode;

use anyhow::Context;
use uuid::Uuid;

use crate::config::Config;
use crate::db::{Db, JobRow};

/// Arguments of `status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The job id.
    pub id: Uuid,
}

/// Run `status`.
pub async fn run(config: Config, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let db = Db::connect(&config.database)
        .await
        .context("connecting to Postgres")?;
    let found = db.get(args.id).await.context("reading the job row")?;
    let code = match found {
        Some(row) => {
            let metrics = db.get_metrics(args.id).await.context("reading metrics")?;
            println!("{}", render(&row, metrics.as_ref())?);
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("job {} not found", args.id);
            ExitCode::from(super::EXIT_NOT_FOUND)
        }
    };
    db.close().await;
    Ok(code)
}

/// The row as pretty JSON, with `metrics` added when there are any.
pub fn render(row: &JobRow, metrics: Option<&crate::db::JobMetrics>) -> anyhow::Result<String> {
    let mut value = serde_json::to_value(row)?;
    if let (Some(object), Some(metrics)) = (value.as_object_mut(), metrics) {
        object.insert("metrics".to_owned(), serde_json::to_value(metrics)?);
    }
    Ok(serde_json::to_string_pretty(&value)?)
}
