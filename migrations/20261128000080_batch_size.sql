-- How many jobs shared the UNet batch of a job's denoising (dynamic batching, worker.max_batch;
-- 1 for a job that ran alone). Step times of a batched job are the batch's step times.
ALTER TABLE job_metrics
    ADD COLUMN IF NOT EXISTS batch_size integer NOT NULL DEFAULT 1;
