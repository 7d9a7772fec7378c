-- ControlNet share of denoising time: the part of denoising_ms spent evaluating ControlNets
-- and summing their residuals (0 for jobs without ControlNets).
ALTER TABLE job_metrics
    ADD COLUMN IF NOT EXISTS controlnet_ms double precision NOT NULL DEFAULT 0;
