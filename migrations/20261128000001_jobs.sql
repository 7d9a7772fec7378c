-- One status row per job, written before any GPU consumer can see the job.
CREATE TABLE IF NOT EXISTS jobs (
    id               uuid        PRIMARY KEY,
    state            text        NOT NULL
                     CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    model            text,
    priority         smallint    NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 9),
    -- The normalized job message (every default resolved, the seed recorded), or the raw
    -- message of a job rejected as invalid.
    request          jsonb       NOT NULL,
    -- Fencing token: incremented by every start; updates of a running job name the attempt.
    attempt          integer     NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    worker_id        text,
    device           text,
    progress_step    integer,
    progress_total   integer,
    -- [{"index", "key", "seed", "width", "height"}], recorded before the job succeeds.
    images           jsonb       NOT NULL DEFAULT '[]'::jsonb,
    error_code       text,
    error_message    text,
    -- For invalid requests: {"errors": [{"field", "code", "message"}]}.
    error_details    jsonb,
    cancel_requested boolean     NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- When the job last entered the queued state.
    queued_at        timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((state IN ('succeeded', 'failed', 'cancelled')) = (finished_at IS NOT NULL)),
    CHECK (state <> 'failed' OR error_code IS NOT NULL)
);

CREATE INDEX IF NOT EXISTS jobs_state_idx ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_created_at_idx ON jobs (created_at);

-- Timings of a finished job, in milliseconds.
CREATE TABLE IF NOT EXISTS job_metrics (
    job_id             uuid               PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    queue_wait_ms      double precision   NOT NULL,
    model_load_ms      double precision   NOT NULL,
    text_encoding_ms   double precision   NOT NULL,
    denoising_ms       double precision   NOT NULL,
    step_ms            double precision[] NOT NULL,
    session_run_ms     double precision   NOT NULL,
    vae_ms             double precision   NOT NULL,
    png_ms             double precision   NOT NULL,
    upload_ms          double precision   NOT NULL,
    total_ms           double precision   NOT NULL,
    peak_gpu_mem_bytes bigint,
    recorded_at        timestamptz        NOT NULL DEFAULT now()
);

-- Every insert and every change of state or progress is announced on the channel
-- `sdxl_job_events`, so clients can LISTEN instead of polling.
CREATE OR REPLACE FUNCTION jobs_notify_change() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('sdxl_job_events', json_build_object(
        'schema', TG_TABLE_SCHEMA,
        'id', NEW.id,
        'state', NEW.state,
        'attempt', NEW.attempt,
        'progress_step', NEW.progress_step,
        'progress_total', NEW.progress_total
    )::text);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS jobs_notify_change ON jobs;
CREATE TRIGGER jobs_notify_change
    AFTER INSERT OR UPDATE OF state, progress_step, attempt ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_notify_change();
