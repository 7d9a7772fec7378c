//! Seeded Gaussian noise of the project's own, identical on every run and machine.
//!
//! Image `i` of a request with seed `s` draws all of its noise (its initial latents first, then
//! any noise an ancestral or SDE scheduler asks for, step by step) from its own stream seeded with
//! `s.wrapping_add(i)` (wrapping `u64` addition). A job's images are therefore the same whether it
//! runs alone or in a batch with other jobs.
//!
//! The algorithm, so that any language can reproduce it (`onnx/sdxl_noise.py` does):
//! 1. State: four `u64` words, each the next output of SplitMix64 started at the seed
//!    (`z += 0x9E3779B97F4A7C15; z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
//!    z = (z ^ (z >> 27)) * 0x94D049BB133111EB; out = z ^ (z >> 31)`, all wrapping).
//! 2. Uniform words come from xoshiro256++.
//! 3. Normal pairs by Box–Muller in `f64`: `u1 = ((a >> 11) + 1) * 2^-53` (in (0, 1]),
//!    `u2 = (b >> 11) * 2^-53`, `r = sqrt(-2 ln u1)`, giving `r cos(2π u2)` then `r sin(2π u2)`,
//!    each rounded to `f32`. A pair's second value is kept for the next draw.
//!
//! `ln`, `cos`, `sin` and `sqrt` come from the pure-Rust `libm` crate, not the platform's C
//! library, so the values do not depend on the machine.

/// One image's noise stream.
#[derive(Debug, Clone)]
pub struct NoiseRng {
    state: [u64; 4],
    spare: Option<f32>,
}

impl NoiseRng {
    /// A stream seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        let state = [next(), next(), next(), next()];
        Self { state, spare: None }
    }

    /// The stream of image `index` of a request seeded with `seed`.
    pub fn for_image(seed: u64, index: usize) -> Self {
        Self::new(image_seed(seed, index))
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// The next standard normal value.
    pub fn next_normal(&mut self) -> f32 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        const SCALE: f64 = 1.0 / (1u64 << 53) as f64;
        let a = self.next_u64();
        let b = self.next_u64();
        let u1 = ((a >> 11) + 1) as f64 * SCALE;
        let u2 = (b >> 11) as f64 * SCALE;
        let r = libm::sqrt(-2.0 * libm::log(u1));
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((r * libm::sin(theta)) as f32);
        (r * libm::cos(theta)) as f32
    }

    /// Fill `out` with standard normal values, in order.
    pub fn fill(&mut self, out: &mut [f32]) {
        for v in out {
            *v = self.next_normal();
        }
    }
}

/// The seed of image `index` of a request seeded with `seed`.
pub fn image_seed(seed: u64, index: usize) -> u64 {
    seed.wrapping_add(index as u64)
}

/// Noise for a batch of images, one stream per image. Batched tensors are laid out image-major,
/// so a fill of `n` values gives each image `n / images` values from its own stream.
#[derive(Debug, Clone)]
pub struct BatchNoise {
    streams: Vec<NoiseRng>,
}

impl BatchNoise {
    /// One stream per seed, in batch order.
    pub fn from_seeds(seeds: &[u64]) -> Self {
        Self {
            streams: seeds.iter().map(|&s| NoiseRng::new(s)).collect(),
        }
    }

    /// Number of images (streams).
    pub fn images(&self) -> usize {
        self.streams.len()
    }

    /// Fill an image-major batch tensor; `out.len()` must be a multiple of the image count.
    pub fn fill(&mut self, out: &mut [f32]) {
        let n = self.streams.len().max(1);
        assert_eq!(
            out.len() % n,
            0,
            "noise tensor not divisible by image count"
        );
        let per = out.len() / n;
        for (stream, chunk) in self.streams.iter_mut().zip(out.chunks_mut(per)) {
            stream.fill(chunk);
        }
    }

    /// A freshly allocated image-major tensor of `len` values.
    pub fn sample(&mut self, len: usize) -> Vec<f32> {
        let mut v = vec![0.0; len];
        self.fill(&mut v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_different_seeds_differ() {
        let mut a = NoiseRng::new(42);
        let mut b = NoiseRng::new(42);
        let mut c = NoiseRng::new(43);
        let va: Vec<f32> = (0..64).map(|_| a.next_normal()).collect();
        let vb: Vec<f32> = (0..64).map(|_| b.next_normal()).collect();
        let vc: Vec<f32> = (0..64).map(|_| c.next_normal()).collect();
        assert_eq!(va, vb);
        assert_ne!(va, vc);
    }

    #[test]
    fn values_look_standard_normal() {
        let mut r = NoiseRng::new(7);
        let n = 200_000;
        let v: Vec<f64> = (0..n).map(|_| r.next_normal() as f64).collect();
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "variance {var}");
    }

    #[test]
    fn known_values_pin_the_algorithm() {
        // The same values `python onnx/sdxl_noise.py` prints: the two implementations agree.
        let mut r = NoiseRng::new(0);
        let got: Vec<f32> = (0..4).map(|_| r.next_normal()).collect();
        assert_eq!(got, [-1.107_908_6, 1.011_441_6, 1.426_482_3, 0.102_851_72]);
        let mut r = NoiseRng::new(u64::MAX);
        let got: Vec<f32> = (0..3).map(|_| r.next_normal()).collect();
        assert_eq!(got, [1.192_442_4, -0.860_933_96, -0.071_430_11]);
    }

    #[test]
    fn batch_streams_are_per_image() {
        let mut batch = BatchNoise::from_seeds(&[5, 9]);
        let v = batch.sample(8);
        let mut a = NoiseRng::new(5);
        let mut b = NoiseRng::new(9);
        let mut expect = vec![0.0; 8];
        a.fill(&mut expect[..4]);
        b.fill(&mut expect[4..]);
        assert_eq!(v, expect);
    }
}
