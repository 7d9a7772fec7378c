//! Classifier-free guidance arithmetic: combining the unconditional and conditional UNet
//! predictions, and diffusers' guidance rescale (`rescale_noise_cfg`).

/// `out = uncond + scale * (cond - uncond)`.
pub fn apply_guidance(uncond: &[f32], cond: &[f32], scale: f32, out: &mut [f32]) {
    for ((o, &u), &c) in out.iter_mut().zip(uncond).zip(cond) {
        *o = u + scale * (c - u);
    }
}

fn std_dev(values: &[f32]) -> f64 {
    let n = values.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0);
    var.sqrt()
}

/// diffusers' `rescale_noise_cfg`, per image: scale the guided prediction to the standard
/// deviation of the conditional one and mix by `rescale` (arXiv:2305.08891, §3.4).
pub fn rescale_guidance(guided: &mut [f32], cond: &[f32], per_image: usize, rescale: f32) {
    for (g, c) in guided.chunks_mut(per_image).zip(cond.chunks(per_image)) {
        let std_cfg = std_dev(g);
        if std_cfg == 0.0 {
            continue;
        }
        let factor = (std_dev(c) / std_cfg) as f32;
        for v in g.iter_mut() {
            *v = rescale * (*v * factor) + (1.0 - rescale) * *v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guidance_combines_as_diffusers() {
        let mut out = [0.0; 2];
        apply_guidance(&[1.0, 2.0], &[3.0, 2.0], 5.0, &mut out);
        assert_eq!(out, [11.0, 2.0]);
    }

    #[test]
    fn rescale_matches_the_formula() {
        let cond = [1.0f32, -1.0, 1.0, -1.0];
        let mut guided = [4.0f32, -4.0, 4.0, -4.0];
        rescale_guidance(&mut guided, &cond, 4, 0.5);
        // std ratio is 1/4: 0.5 * 1 + 0.5 * 4 = 2.5
        assert_eq!(guided, [2.5, -2.5, 2.5, -2.5]);
        let mut full = [4.0f32, -4.0, 4.0, -4.0];
        rescale_guidance(&mut full, &cond, 4, 1.0);
        assert_eq!(full, cond);
    }
}
