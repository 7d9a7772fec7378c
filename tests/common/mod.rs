//! What the engine tests share: fixture paths, the tiny pipeline on the test device, file readers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sdxl_worker::engine::{
    Device, Engine, EngineOptions, GenerateRequest, SchedulerKind, SchedulerOverrides,
};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn tiny_model_dir() -> PathBuf {
    fixtures().join("tiny-sdxl")
}

/// The device tests run on: `SDXL_TEST_DEVICE` (`cpu`, `cuda`, `cuda:N`), CPU by default.
pub fn test_device() -> Device {
    match std::env::var("SDXL_TEST_DEVICE") {
        Ok(v) if !v.is_empty() => v.parse().expect("SDXL_TEST_DEVICE"),
        _ => Device::Cpu,
    }
}

fn test_options() -> EngineOptions {
    EngineOptions {
        device: test_device(),
        intra_threads: Some(1),
        ..EngineOptions::default()
    }
}

/// The tiny pipeline on the test device, loaded once per test binary.
pub fn tiny_engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        Engine::load(tiny_model_dir(), &test_options()).expect("load the tiny pipeline")
    })
}

/// A small valid request for the tiny pipeline.
pub fn basic_request() -> GenerateRequest {
    GenerateRequest {
        prompt: "a photograph of an astronaut riding a horse".into(),
        prompt_2: None,
        negative_prompt: Some("blurry".into()),
        negative_prompt_2: None,
        width: 64,
        height: 64,
        steps: 4,
        guidance_scale: 5.0,
        guidance_rescale: 0.0,
        scheduler: SchedulerKind::Euler,
        scheduler_overrides: SchedulerOverrides::default(),
        seed: 7,
        num_images: 1,
        original_size: None,
        crops_coords_top_left: (0, 0),
        target_size: None,
        initial_latents: None,
        controls: Default::default(),
    }
}

/// Little-endian f32 values of a file.
pub fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Decode an 8-bit RGB PNG into (width, height, pixels).
pub fn read_png_rgb(path: &Path) -> (u32, u32, Vec<u8>) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .expect("png header");
    let mut buf = vec![0; reader.output_buffer_size().expect("buffer size")];
    let info = reader.next_frame(&mut buf).expect("png frame");
    assert_eq!(info.color_type, png::ColorType::Rgb, "{}", path.display());
    assert_eq!(info.bit_depth, png::BitDepth::Eight, "{}", path.display());
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

pub mod onnx;

/// A copy of the tiny pipeline in a temporary directory: every entry is a symbolic link to the
/// fixture except the component directories named in `copy`, which are copied so that a test
/// can change them.
pub fn model_copy(copy: &[&str]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("temp dir");
    let src = tiny_model_dir();
    for entry in std::fs::read_dir(&src).expect("read fixture") {
        let entry = entry.expect("entry");
        let name = entry.file_name();
        let dest = tmp.path().join(&name);
        if copy.iter().any(|c| name.to_str() == Some(*c)) {
            std::fs::create_dir(&dest).expect("mkdir");
            for f in std::fs::read_dir(entry.path()).expect("read component") {
                let f = f.expect("file");
                // A copied UNet is a plain export: without the ControlNet variant, which the
                // engine would load instead, edits of unet/model.onnx take effect.
                if f.file_name() == "model_controlnet.onnx" {
                    continue;
                }
                std::fs::copy(f.path(), dest.join(f.file_name())).expect("copy");
            }
        } else {
            std::os::unix::fs::symlink(entry.path(), &dest).expect("symlink");
        }
    }
    tmp
}

/// Load a model directory on the test device.
pub fn load(dir: &Path) -> Result<Engine, sdxl_worker::engine::EngineError> {
    Engine::load(dir, &test_options())
}
