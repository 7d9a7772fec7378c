-- Result cache: a succeeded job that ran with caching on records the key of its request; a later
-- identical request reuses its images and names the job it copied them from.
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS cache_key text;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS cached_from uuid;

CREATE INDEX IF NOT EXISTS jobs_cache_key_idx ON jobs (md5(cache_key))
    WHERE cache_key IS NOT NULL AND state = 'succeeded';
