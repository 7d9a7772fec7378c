//! Control images: 8-bit RGB pictures handed to a ControlNet, resized to the generation size as
//! diffusers' `VaeImageProcessor` does it for `StableDiffusionXLControlNetPipeline` (Pillow's
//! `Image.resize` with `LANCZOS`, then values / 255 without normalization).
//!
//! The resize reproduces Pillow's two-pass separable resampling for 8-bit images: a windowed
//! sinc of support 3 stretched by the downscale factor, coefficients normalized per output pixel
//! and rounded to 22-bit fixed point, one pass per axis, each rounded and clamped to 0..=255.
//! Upscales, and downscales of one axis, equal Pillow 13 byte for byte. Pillow 13 orders the two
//! passes by a rule not reproduced for every shrink of both axes (it sometimes resamples the
//! height first); there a few pixels can differ by some levels.

use super::EngineError;

/// Fixed-point precision of Pillow's 8-bit resampling coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Half-width of the Lanczos window, in source pixels at scale 1.
const LANCZOS_SUPPORT: f64 = 3.0;

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlImage {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

impl ControlImage {
    /// An image from its pixels; the buffer must hold `width * height * 3` bytes.
    pub fn new(width: u32, height: u32, rgb: Vec<u8>) -> Result<Self, EngineError> {
        if width == 0 || height == 0 {
            return Err(EngineError::invalid(
                "controlnets",
                "a control image is empty",
            ));
        }
        if rgb.len() != width as usize * height as usize * 3 {
            return Err(EngineError::invalid(
                "controlnets",
                format!(
                    "a {width}x{height} RGB control image needs {} bytes, got {}",
                    width as usize * height as usize * 3,
                    rgb.len()
                ),
            ));
        }
        Ok(Self { width, height, rgb })
    }

    /// A grey image repeated on the three channels.
    pub fn from_gray(width: u32, height: u32, gray: &[u8]) -> Result<Self, EngineError> {
        Self::new(
            width,
            height,
            gray.iter().flat_map(|&g| [g, g, g]).collect(),
        )
    }

    /// The image at `width`×`height`, resampled as Pillow's `resize(..., LANCZOS)` does.
    pub fn resized(&self, width: u32, height: u32) -> ControlImage {
        let (w0, h0) = (self.width as usize, self.height as usize);
        let (w1, h1) = (width as usize, height as usize);
        let mut pixels = self.rgb.clone();
        // Pillow 13 runs the vertical pass first when the width grows and the height shrinks
        // (found by comparing with it; each pass rounds to 8 bits, so the order matters).
        if w1 > w0 && h1 < h0 {
            pixels = resample_columns(&pixels, w0, h0, h1);
            pixels = resample_rows(&pixels, w0, h1, w1);
        } else {
            if w1 != w0 {
                pixels = resample_rows(&pixels, w0, h0, w1);
            }
            if h1 != h0 {
                pixels = resample_columns(&pixels, w1, h0, h1);
            }
        }
        ControlImage {
            width,
            height,
            rgb: pixels,
        }
    }

    /// Planar `[3, height, width]` values in [0, 1], as the ControlNet's `controlnet_cond` takes.
    pub fn to_planar(&self) -> Vec<f32> {
        let plane = self.width as usize * self.height as usize;
        let mut out = vec![0.0f32; 3 * plane];
        for (i, px) in self.rgb.chunks_exact(3).enumerate() {
            for (c, &v) in px.iter().enumerate() {
                out[c * plane + i] = f32::from(v) / 255.0;
            }
        }
        out
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

fn lanczos(x: f64) -> f64 {
    if (-LANCZOS_SUPPORT..LANCZOS_SUPPORT).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// For each output position: the first input index and the fixed-point weights.
struct Coefficients {
    starts: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

fn coefficients(in_size: usize, out_size: usize) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = LANCZOS_SUPPORT * filterscale;
    let mut starts = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero, as `as` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let count = (xmax - xmin).max(0) as usize;
        let mut k: Vec<f64> = (0..count)
            .map(|x| lanczos(((x as i64 + xmin) as f64 - center + 0.5) * ss))
            .collect();
        let total: f64 = k.iter().sum();
        if total != 0.0 {
            k.iter_mut().for_each(|w| *w /= total);
        }
        let unit = f64::from(1u32 << PRECISION_BITS);
        let fixed = k
            .iter()
            .map(|&w| {
                if w < 0.0 {
                    (-0.5 + w * unit) as i32
                } else {
                    (0.5 + w * unit) as i32
                }
            })
            .collect();
        starts.push(xmin as usize);
        weights.push(fixed);
    }
    Coefficients { starts, weights }
}

fn clip8(acc: i32) -> u8 {
    if acc >= (1 << PRECISION_BITS << 8) {
        255
    } else if acc <= 0 {
        0
    } else {
        (acc >> PRECISION_BITS) as u8
    }
}

fn resample_rows(src: &[u8], w0: usize, h: usize, w1: usize) -> Vec<u8> {
    let k = coefficients(w0, w1);
    let mut out = vec![0u8; w1 * h * 3];
    for y in 0..h {
        let row = &src[y * w0 * 3..(y + 1) * w0 * 3];
        for (xx, (start, weights)) in k.starts.iter().zip(&k.weights).enumerate() {
            for c in 0..3 {
                let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                for (x, &wt) in weights.iter().enumerate() {
                    acc += i32::from(row[(start + x) * 3 + c]) * wt;
                }
                out[(y * w1 + xx) * 3 + c] = clip8(acc);
            }
        }
    }
    out
}

fn resample_columns(src: &[u8], w: usize, h0: usize, h1: usize) -> Vec<u8> {
    let k = coefficients(h0, h1);
    let mut out = vec![0u8; w * h1 * 3];
    for (yy, (start, weights)) in k.starts.iter().zip(&k.weights).enumerate() {
        for x in 0..w {
            for c in 0..3 {
                let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                for (y, &wt) in weights.iter().enumerate() {
                    acc += i32::from(src[((start + y) * w + x) * 3 + c]) * wt;
                }
                out[(yy * w + x) * 3 + c] = clip8(acc);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_identity_and_flat_stays_flat() {
        let rgb: Vec<u8> = (0..4 * 3 * 3).map(|i| (i * 7 % 256) as u8).collect();
        let image = ControlImage::new(4, 3, rgb.clone()).unwrap();
        assert_eq!(image.resized(4, 3).rgb, rgb);
        let flat = ControlImage::new(5, 7, vec![200; 5 * 7 * 3]).unwrap();
        let up = flat.resized(11, 3);
        assert!(up.rgb.iter().all(|&v| v == 200), "{:?}", up.rgb);
    }

    #[test]
    fn planar_values_are_in_unit_range() {
        let image = ControlImage::new(2, 1, vec![0, 255, 51, 255, 0, 102]).unwrap();
        assert_eq!(image.to_planar(), vec![0.0, 1.0, 1.0, 0.0, 0.2, 0.4]);
    }

    #[test]
    fn wrong_buffer_size_is_an_error() {
        let err = ControlImage::new(2, 2, vec![0; 5]).unwrap_err();
        assert_eq!(err.code(), "invalid_request");
    }
}
