-- Refiner stage time of a refined job ("refiner" in the job message): the refiner's prompt
-- encoding and denoising steps, after the base's (0 for jobs without a refiner). denoising_ms
-- is the base's part alone; step_ms lists the base's steps then the refiner's.
ALTER TABLE job_metrics
    ADD COLUMN IF NOT EXISTS refiner_ms double precision NOT NULL DEFAULT 0;
