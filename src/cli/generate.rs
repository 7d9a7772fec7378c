//! `sdxl-worker generate`: one local text-to-image run, written to PNG files.
//!
//! ```text
//! sdxl-worker generate --model models/sdxl --prompt "a lighthouse at dusk" --out lighthouse.png
//! ```
//!
//! Several images (`--images 3`) are written as `lighthouse.png`, `lighthouse_1.png`,
//! `lighthouse_2.png`. Progress goes to stderr, one line per step; stage timings to stdout.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::engine::png::{encode_png, PngParameters};
use crate::engine::{
    Device, Engine, EngineOptions, GenerateRequest, Progress, SchedulerKind, SchedulerOverrides,
};

/// Arguments of `generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Model directory in the Optimum ONNX layout (model_index.json, unet/, ...).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt.
    #[arg(long)]
    pub prompt: String,
    /// Prompt for the second text encoder (default: the prompt).
    #[arg(long)]
    pub prompt_2: Option<String>,
    /// Negative prompt (default: none, which SDXL base turns into zero conditioning).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Negative prompt for the second text encoder (default: the negative prompt).
    #[arg(long)]
    pub negative_prompt_2: Option<String>,
    /// Image width in pixels (default: the model's default size, 1024 for SDXL).
    #[arg(long)]
    pub width: Option<u32>,
    /// Image height in pixels (default: the model's default size, 1024 for SDXL).
    #[arg(long)]
    pub height: Option<u32>,
    /// Denoising steps.
    #[arg(long, default_value_t = 30)]
    pub steps: u32,
    /// Classifier-free guidance scale (1 or less disables guidance).
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f32,
    /// Guidance rescale (0 disables it; 0.7 is common with v-prediction models).
    #[arg(long, default_value_t = 0.0)]
    pub guidance_rescale: f32,
    /// Scheduler: an id (euler_a, dpmpp_2m_karras, ...) or an A1111 name ("DPM++ 2M Karras").
    #[arg(long, default_value = "euler_a", value_parser = parse_scheduler)]
    pub scheduler: SchedulerKind,
    /// Seed of the first image; image i uses seed + i.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Number of images.
    #[arg(long, default_value_t = 1)]
    pub images: u32,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// CPU threads per operator (default: ONNX Runtime's choice).
    #[arg(long)]
    pub threads: Option<usize>,
    /// On CUDA, let float32 math use TF32 tensor cores (faster, less exact).
    #[arg(long)]
    pub tf32: bool,
    /// Output PNG path.
    #[arg(long, default_value = "out.png")]
    pub out: PathBuf,
}

fn parse_scheduler(s: &str) -> Result<SchedulerKind, String> {
    SchedulerKind::parse(s).ok_or_else(|| {
        let ids: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.id()).collect();
        format!("unknown scheduler {s:?}; choose one of: {}", ids.join(", "))
    })
}

/// Path of image `index`: the `--out` path itself for the first, `stem_N.ext` after it.
pub fn output_path(out: &Path, index: u32) -> PathBuf {
    if index == 0 {
        return out.to_path_buf();
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match out.extension() {
        Some(ext) => format!("{stem}_{index}.{}", ext.to_string_lossy()),
        None => format!("{stem}_{index}"),
    };
    out.with_file_name(name)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Run `generate`.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let load_started = Instant::now();
    let options = EngineOptions {
        device: args.device,
        intra_threads: args.threads,
        cuda: crate::engine::cuda::CudaOptions {
            tf32: args.tf32,
            ..Default::default()
        },
        ..EngineOptions::default()
    };
    let engine = Engine::load(&args.model, &options)
        .with_context(|| format!("loading the model in {}", args.model.display()))?;
    let load_time = load_started.elapsed();
    let default_size = engine.model().config.default_size;
    let request = GenerateRequest {
        prompt: args.prompt,
        prompt_2: args.prompt_2,
        negative_prompt: args.negative_prompt,
        negative_prompt_2: args.negative_prompt_2,
        width: args.width.unwrap_or(default_size),
        height: args.height.unwrap_or(default_size),
        steps: args.steps,
        guidance_scale: args.guidance,
        guidance_rescale: args.guidance_rescale,
        scheduler: args.scheduler,
        scheduler_overrides: SchedulerOverrides::default(),
        seed: args.seed,
        num_images: args.images,
        original_size: None,
        crops_coords_top_left: (0, 0),
        target_size: None,
        initial_latents: None,
        controls: Default::default(),
    };
    let started = Instant::now();
    let mut bar = super::progress::StepProgress::new();
    let output = engine.generate(&request, &mut |p: Progress| {
        bar.step(p.step, p.total);
        ControlFlow::Continue(())
    });
    bar.finish();
    let output = output.context("generation failed")?;
    let total = started.elapsed();

    let model_name = engine.model().name.clone();
    let encode_started = Instant::now();
    for image in &output.images {
        let params = PngParameters::from_request(&request, image.index, Some(&model_name));
        let bytes = encode_png(
            &image.rgb,
            image.width,
            image.height,
            Some(&params.to_a1111()),
        )?;
        let path = output_path(&args.out, image.index);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {} (seed {})", path.display(), image.seed);
    }
    let encode_time = encode_started.elapsed();
    let t = &output.timings;
    let steps = t.per_step.len().max(1) as u32;
    println!("model load      {}", ms(load_time));
    println!("text encoding   {}", ms(t.text_encoding));
    println!(
        "denoising       {} ({} per step, {} in ONNX Runtime)",
        ms(t.denoising),
        ms(t.denoising / steps),
        ms(t.denoising_session_run)
    );
    println!("VAE decode      {}", ms(t.vae_decode));
    println!("PNG encode      {}", ms(encode_time));
    println!("total           {}", ms(total + encode_time));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_paths_number_the_extra_images() {
        let out = Path::new("/tmp/a.png");
        assert_eq!(output_path(out, 0), PathBuf::from("/tmp/a.png"));
        assert_eq!(output_path(out, 1), PathBuf::from("/tmp/a_1.png"));
        assert_eq!(output_path(Path::new("img"), 2), PathBuf::from("img_2"));
    }

    #[test]
    fn schedulers_parse_by_id_and_a1111_name() {
        assert_eq!(parse_scheduler("euler_a"), Ok(SchedulerKind::EulerA));
        assert_eq!(
            parse_scheduler("DPM++ 2M Karras"),
            Ok(SchedulerKind::Dpmpp2mKarras)
        );
        assert!(parse_scheduler("nope").unwrap_err().contains("euler_a"));
    }
}
