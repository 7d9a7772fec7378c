-- The API token that created a job (by the token's configured name). Jobs published to the
-- broker directly have no row here. With authentication on, only the owner reads or cancels.
CREATE TABLE IF NOT EXISTS job_owners (
    job_id  uuid PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    owner   text NOT NULL
);

-- Estimates and throughput read the most recent metrics rows and finished jobs.
CREATE INDEX IF NOT EXISTS job_metrics_recorded_at_idx ON job_metrics (recorded_at);
CREATE INDEX IF NOT EXISTS jobs_finished_at_idx ON jobs (finished_at);
