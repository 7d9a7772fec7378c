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

/// Map a decoder output in [-1, 1] (`[3, H, W]`, planar) to interleaved 8-bit RGB; `None` when
/// it holds a value that is not finite (NaN or infinite).
pub fn to_rgb8(planar: &[f32], width: usize, height: usize) -> Option<Vec<u8>> {
    let plane = width * height;
    let (red, rest) = planar.split_at(plane);
    let (green, blue) = rest.split_at(plane);
    let mut out = vec![0u8; plane * 3];
    let mut finite = true;
    for (((pixel, &r), &g), &b) in out.chunks_exact_mut(3).zip(red).zip(green).zip(blue) {
        for (byte, x) in pixel.iter_mut().zip([r, g, b]) {
            finite &= x.is_finite();
            *byte = round_to_u8((x * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0);
        }
    }
    finite.then_some(out)
}

/// Rounds a value in [0, 255] to the nearest integer, ties to even, as numpy's `round` does.
/// Adding and subtracting 2^23 rounds that way in the default rounding mode; unlike
/// `round_ties_even`, it compiles to plain vector arithmetic on every x86-64.
#[inline]
fn round_to_u8(v: f32) -> u8 {
    const ROUND: f32 = 8_388_608.0;
    ((v + ROUND) - ROUND) as u8
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
    let Some(rgb) = to_rgb8(&sample.data, width, height) else {
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
    };
    Ok(DecodedImage {
        width: width as u32,
        height: height as u32,
        rgb,
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
        let rgb = to_rgb8(&planar, w, 1).unwrap();
        let red: Vec<u8> = rgb.iter().step_by(3).copied().collect();
        assert_eq!(red, [0, 255, 128, 0, 255]);
    }

    #[test]
    fn rounds_halves_to_even() {
        // Every integer and every tie in [0, 255] (k / 2 is exact in f32).
        for k in 0..=510u32 {
            let v = k as f32 / 2.0;
            assert_eq!(round_to_u8(v), v.round_ties_even() as u8, "{v}");
        }
        assert_eq!(
            (round_to_u8(0.5), round_to_u8(1.5), round_to_u8(254.5)),
            (0, 2, 254)
        );
        assert_eq!(round_to_u8(0.49999997), 0);
        assert_eq!(round_to_u8(0.50000006), 1);
    }

    #[test]
    fn interleaves_the_planes_and_rounds_like_numpy() {
        let values: Vec<f32> = (0..=600).map(|k| k as f32 / 250.0 - 1.2).collect();
        let n = values.len();
        let mut planar = values.clone();
        planar.extend(values.iter().map(|_| -1.0));
        planar.extend(values.iter().map(|_| 1.0));
        let rgb = to_rgb8(&planar, n, 1).unwrap();
        for (k, pixel) in rgb.chunks_exact(3).enumerate() {
            let expected = ((values[k] * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0).round_ties_even();
            assert_eq!(pixel, [expected as u8, 0, 255], "value {}", values[k]);
        }
    }

    #[test]
    fn a_value_that_is_not_finite_fails_the_conversion() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut planar = vec![0.0f32; 12];
            planar[7] = bad;
            assert!(to_rgb8(&planar, 2, 2).is_none(), "{bad}");
        }
    }
}
