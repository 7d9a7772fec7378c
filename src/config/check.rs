//! Checks of value ranges and of keys that depend on each other.

use crate::config::keys::Settings;
use crate::config::types::FALLBACK_SIDE;

type Failure = (&'static str, String);

pub(crate) fn all(s: &Settings) -> Result<(), Failure> {
    broker(s)?;
    database(s)?;
    worker(s)?;
    limits(s)?;
    models(s)?;
    log(s)?;
    api(s)
}

fn api(s: &Settings) -> Result<(), Failure> {
    let a = &s.api;
    a.listen.parse::<std::net::SocketAddr>().map_err(|e| {
        (
            "api.listen",
            format!("expected HOST:PORT with an IP address: {e}"),
        )
    })?;
    at_least("api.body_limit_bytes", a.body_limit_bytes, 1024)?;
    at_least("api.url_ttl_secs", a.url_ttl_secs, 1)
}

fn at_least<T: PartialOrd + std::fmt::Display>(
    key: &'static str,
    value: T,
    min: T,
) -> Result<(), Failure> {
    if value < min {
        return Err((key, format!("must be at least {min}, found {value}")));
    }
    Ok(())
}

fn broker(s: &Settings) -> Result<(), Failure> {
    let b = &s.broker;
    let prefix_ok = !b.prefix.is_empty()
        && b.prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !prefix_ok {
        return Err((
            "broker.prefix",
            "must be non-empty ASCII letters, digits, '_', '-' or '.'".to_owned(),
        ));
    }
    at_least("broker.delivery_limit", b.delivery_limit, 1)?;
    at_least("broker.intake_prefetch", b.intake_prefetch, 1)?;
    at_least("broker.reconnect_delay_ms", b.reconnect_delay_ms, 1)?;
    at_least(
        "broker.reconnect_max_delay_ms",
        b.reconnect_max_delay_ms,
        b.reconnect_delay_ms,
    )
}

fn database(s: &Settings) -> Result<(), Failure> {
    let d = &s.database;
    crate::db::check_schema_name(&d.schema).map_err(|m| ("database.schema", m))?;
    at_least("database.max_connections", d.max_connections, 1)?;
    at_least("database.acquire_timeout_ms", d.acquire_timeout_ms, 1)
}

fn worker(s: &Settings) -> Result<(), Failure> {
    let w = &s.worker;
    at_least("worker.prefetch", w.prefetch, 1)?;
    at_least("worker.max_batch", w.max_batch, 1)?;
    if w.prefetch < w.max_batch {
        return Err((
            "worker.prefetch",
            format!(
                "is {} but worker.max_batch is {}: a consumer batches only the jobs it holds, so \
                 prefetch must be at least max_batch",
                w.prefetch, w.max_batch
            ),
        ));
    }
    at_least("worker.max_attempts", w.max_attempts, 1)?;
    at_least("worker.progress_interval_ms", w.progress_interval_ms, 1)?;
    at_least("worker.poll_interval_ms", w.poll_interval_ms, 1)?;
    at_least("worker.job_timeout_ms", w.job_timeout_ms, 1)?;
    at_least("worker.job_timeout_min_ms", w.job_timeout_min_ms, 1)?;
    at_least("worker.heartbeat_interval_ms", w.heartbeat_interval_ms, 10)?;
    // A live worker must never look lost: its lease spans at least two heartbeats.
    at_least(
        "worker.lease_ms",
        w.lease_ms,
        w.heartbeat_interval_ms.saturating_mul(2),
    )?;
    at_least(
        "worker.lease_sweep_interval_ms",
        w.lease_sweep_interval_ms,
        10,
    )?;
    Ok(())
}

fn limits(s: &Settings) -> Result<(), Failure> {
    let l = &s.limits;
    at_least("limits.min_side", l.min_side, 8)?;
    if !l.min_side.is_multiple_of(8) {
        return Err(("limits.min_side", "must be a multiple of 8".to_owned()));
    }
    at_least("limits.max_side", l.max_side, l.min_side)?;
    if !l.max_side.is_multiple_of(8) {
        return Err(("limits.max_side", "must be a multiple of 8".to_owned()));
    }
    let min_pixels = u64::from(l.min_side) * u64::from(l.min_side);
    at_least("limits.max_pixels", l.max_pixels, min_pixels)?;
    at_least("limits.min_steps", l.min_steps, 1)?;
    at_least("limits.max_steps", l.max_steps, l.min_steps)?;
    at_least("limits.min_guidance_scale", l.min_guidance_scale, 0.0)?;
    at_least(
        "limits.max_guidance_scale",
        l.max_guidance_scale,
        l.min_guidance_scale,
    )?;
    at_least("limits.max_images", l.max_images, 1)?;
    at_least("limits.max_prompt_chars", l.max_prompt_chars, 1)?;
    at_least("limits.max_message_bytes", l.max_message_bytes, 256)?;
    at_least("limits.max_metadata_bytes", l.max_metadata_bytes, 2)
}

fn models(s: &Settings) -> Result<(), Failure> {
    let m = &s.models;
    if m.get(&m.default).is_none() {
        return Err((
            "models.default",
            format!(
                "{:?} is not one of models.available ({})",
                m.default,
                m.names().join(", ")
            ),
        ));
    }
    let l = &s.limits;
    for entry in &m.models {
        let (w, h) = entry.default_size();
        let fits = |side: u32| side.is_multiple_of(8) && side >= l.min_side && side <= l.max_side;
        let ok = fits(w) && fits(h) && u64::from(w) * u64::from(h) <= l.max_pixels;
        if !ok {
            let given = entry.default_width.is_some() || entry.default_height.is_some();
            let what = if given {
                "its default size"
            } else {
                "the fallback size"
            };
            return Err((
                "models.available",
                format!(
                    "model {:?}: {what} {w}x{h} breaks the limits (multiples of 8 within \
                     limits.min_side..limits.max_side, at most limits.max_pixels; fallback \
                     {FALLBACK_SIDE})",
                    entry.name
                ),
            ));
        }
    }
    Ok(())
}

fn log(s: &Settings) -> Result<(), Failure> {
    tracing_subscriber::EnvFilter::try_new(&s.log.level)
        .map(|_| ())
        .map_err(|e| ("log.level", format!("not a valid filter directive: {e}")))
}
