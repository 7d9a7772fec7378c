//! VAE decoding: final latents to 8-bit RGB, one image at a time, with diffusers' scaling
//! (`latents / scaling_factor`, or the per-channel statistics of VAEs that declare them) and
//! post-processing (`(x / 2 + 0.5).clamp(0, 1) * 255`, rounded half to even as numpy does).

use std::time::Duration;

use ort::value::TensorElementType;

use super::model::VaeDecoder;
use super::tensor;
use super::EngineError;

const STAGE: &str = "VAE decoder";

/// One decoded image.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedImage {
    pub width: u32,
    pub height: u32,
    /// Row-major RGB, 3 bytes per pixel.
    pub rgb: Vec<u8>,
    pub session_time: Duration,
}

/// Undo the latent scaling in place (`channels` planes of `plane` values each).
pub fn unscale_latents(vae: &VaeDecoder, latents: &mut [f32], channels: usize) {
    let sf = vae.config.scaling_factor as f32;
    let plane = latents.len() / channels.max(1);
    match &vae.config.latents_mean_std {
        Some((mean, std)) if mean.len() == channels && std.len() == channels => {
            for (c, chunk) in latents.chunks_mut(plane).enumerate() {
                let (m, s) = (mean[c] as f32, std[c] as f32);
                for v in chunk {
                    *v = *v * s / sf + m;
                }
            }
        }
        _ => {
            for v in latents {
                *v /= sf;
            }
        }
    }
}

/// Map a decoder output in [-1, 1] (`[3, H, W]`, planar) to interleaved 8-bit RGB.
pub fn to_rgb8(planar: &[f32], width: usize, height: usize) -> Vec<u8> {
    let plane = width * height;
    let mut out = vec![0u8; plane * 3];
    for c in 0..3 {
        let src = &planar[c * plane..(c + 1) * plane];
        for (i, &x) in src.iter().enumerate() {
            let v = (x * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0;
            out[i * 3 + c] = v.round_ties_even() as u8;
        }
    }
    out
}

/// Decode one image's latents (`[C, h, w]`, already divided by the scaling factor).
pub fn decode(
    vae: &VaeDecoder,
    latents: &[f32],
    channels: usize,
    latent_h: usize,
    latent_w: usize,
) -> Result<DecodedImage, EngineError> {
    let shape = [1, channels as i64, latent_h as i64, latent_w as i64];
    let value = tensor::float_value(vae.latent_sample.elem, &shape, latents).map_err(|source| {
        EngineError::Inference {
            stage: STAGE,
            source,
        }
    })?;
    let result = vae
        .component
        .run(STAGE, vec![("latent_sample", value.into())], &["sample"])?;
    let sample =
        result
            .outputs
            .into_iter()
            .next()
            .ok_or_else(|| EngineError::UnexpectedOutput {
                stage: STAGE,
                message: "no sample".to_owned(),
            })?;
    let (height, width) = match sample.shape.as_slice() {
        [1, 3, h, w] if *h > 0 && *w > 0 => (*h as usize, *w as usize),
        other => {
            return Err(EngineError::UnexpectedOutput {
                stage: STAGE,
                message: format!("an image of shape {other:?}, expected [1, 3, height, width]"),
            })
        }
    };
    if sample.data.iter().any(|v| !v.is_finite()) {
        let hint =
            if vae.latent_sample.elem == TensorElementType::Float16 && vae.config.force_upcast {
                " (this float16 VAE is marked force_upcast: it overflows in float16; use a float32 \
             VAE export or an fp16-fixed VAE)"
            } else {
                ""
            };
        return Err(EngineError::NonFinite {
            stage: STAGE,
            hint: hint.to_owned(),
        });
    }
    Ok(DecodedImage {
        width: width as u32,
        height: height as u32,
        rgb: to_rgb8(&sample.data, width, height),
        session_time: result.session_time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postprocess_matches_diffusers_rounding_and_clamping() {
        // -1 -> 0, 1 -> 255, 0 -> 127.5 -> 128, out-of-range values clamp.
        let w = 5;
        let vals = [-1.0f32, 1.0, 0.0, -3.0, 3.0];
        let mut planar = Vec::new();
        for _ in 0..3 {
            planar.extend_from_slice(&vals);
        }
        let rgb = to_rgb8(&planar, w, 1);
        let red: Vec<u8> = rgb.iter().step_by(3).copied().collect();
        assert_eq!(red, [0, 255, 128, 0, 255]);
    }
}
