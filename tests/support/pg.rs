//! A Postgres schema per test, migrated, dropped when the test ends.

use sdxl_worker::config::DatabaseConfig;
use sdxl_worker::db::Db;
use sqlx::{Connection, Executor};

/// A migrated schema of its own; dropped (with everything in it) on drop.
pub struct TestDb {
    pub db: Db,
    pub config: DatabaseConfig,
}

impl TestDb {
    /// Create schema `t_<label>_...`, connect and migrate.
    pub async fn new(label: &str) -> TestDb {
        TestDb::new_at(label, &super::database_url()).await
    }

    /// A migrated schema of its own on the Postgres server at `url`.
    pub async fn new_at(label: &str, url: &str) -> TestDb {
        let mut config = TestDb::config(label);
        config.url = url.to_owned();
        let db = Db::connect(&config)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to Postgres ({e}); is it running?"));
        db.migrate().await.expect("migrations failed");
        TestDb { db, config }
    }

    /// A database configuration with a fresh schema name (nothing is created yet).
    pub fn config(label: &str) -> DatabaseConfig {
        DatabaseConfig {
            url: super::database_url(),
            schema: format!("t_{}", super::unique_name(label)),
            max_connections: 4,
            acquire_timeout_ms: 10_000,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let url = self.config.url.clone();
        let schema = self.config.schema.clone();
        // Drop may run inside a runtime: do the clean-up on a thread with its own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&url).await.ok()?;
                // Never wait long for a lock a connection of the test may still hold.
                conn.execute("SET lock_timeout = '5s'").await.ok()?;
                let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
                conn.execute(sql.as_str()).await.ok()?;
                conn.close().await.ok()
            })
        });
        let _ = cleanup.join();
    }
}
