-- One row per worker process, refreshed by its heartbeat. Readers call a worker alive while
-- `last_seen` is recent and `stopped_at` is null; the API and the status page list them, and
-- rows left `running` by a worker whose heartbeat stopped can be recognised and recovered.
CREATE TABLE IF NOT EXISTS workers (
    worker_id   text        PRIMARY KEY,
    host        text        NOT NULL,
    pid         integer     NOT NULL,
    version     text        NOT NULL,
    -- Whether this process runs the intake consumer.
    intake      boolean     NOT NULL,
    -- [{"device", "name", "memory_total_bytes", "memory_used_bytes", "models_loaded",
    --   "current_job"}], one entry per GPU consumer ("cpu" for a CPU consumer).
    devices     jsonb       NOT NULL DEFAULT '[]'::jsonb,
    started_at  timestamptz NOT NULL,
    last_seen   timestamptz NOT NULL DEFAULT now(),
    -- Set when the worker stopped cleanly.
    stopped_at  timestamptz
);

CREATE INDEX IF NOT EXISTS workers_last_seen_idx ON workers (last_seen);
