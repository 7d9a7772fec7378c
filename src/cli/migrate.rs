//! `sdxl-worker migrate`: creates or upgrades the tables in the configured schema.

use std::process::ExitCode;

use anyhow::Context;

use crate::config::Config;
use crate::db::Db;

/// Run `migrate`.
pub async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let db = Db::connect(&config.database)
        .await
        .context("connecting to Postgres")?;
    db.migrate().await.context("migrating the database")?;
    println!("database schema {:?} is up to date", db.schema());
    db.close().await;
    Ok(ExitCode::SUCCESS)
}
