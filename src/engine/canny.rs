//! Canny edge detection for canny ControlNets, computed as OpenCV's `cv::Canny(image, low,
//! high)` does with its defaults (3×3 Sobel, L1 gradient magnitude) on an 8-bit RGB image.
//!
//! - Sobel derivatives per channel with replicated borders; at each pixel the channel with the
//!   largest `|dx| + |dy|` gives the gradient (the first one on ties).
//! - Non-maximum suppression along the gradient direction quantized to 0°, 45°, 90° and 135°
//!   with OpenCV's integer tangent test and its asymmetric comparisons (`>` on one side, `>=`
//!   on the other for horizontal and vertical directions); outside the image the magnitude is 0.
//! - Hysteresis: a pixel is an edge candidate when its magnitude exceeds `low`, a seed when it
//!   exceeds `high`; candidates 8-connected to a seed are edges.
//!
//! The output is 255 on edges and 0 elsewhere, repeated on three channels as ControlNets take it.

use super::control_image::ControlImage;
use super::EngineError;

/// OpenCV's usual thresholds for ControlNet canny preprocessing.
pub const DEFAULT_LOW: u32 = 100;
pub const DEFAULT_HIGH: u32 = 200;

const SHIFT: u32 = 15;
/// tan(22.5°) in Q15, as OpenCV rounds it.
const TG22: i64 = 13573;

/// Edge map of `image` with thresholds `low` and `high` (swapped if `low > high`).
pub fn canny(image: &ControlImage, low: u32, high: u32) -> ControlImage {
    let gray = canny_mask(image, low, high);
    let edges: Vec<u8> = gray.iter().map(|&e| if e { 255 } else { 0 }).collect();
    ControlImage::from_gray(image.width, image.height, &edges)
        .expect("the edge map has the image's size")
}

/// Validate thresholds as a request gives them.
pub fn check_thresholds(low: u32, high: u32) -> Result<(), EngineError> {
    if low > 1020 * 4 || high > 1020 * 4 {
        return Err(EngineError::invalid(
            "controlnets",
            "canny thresholds above 4080 can never be reached",
        ));
    }
    Ok(())
}

/// `true` where `image` has an edge, row-major.
pub fn canny_mask(image: &ControlImage, low: u32, high: u32) -> Vec<bool> {
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    let (low, high) = (
        i32::try_from(low).unwrap_or(i32::MAX),
        i32::try_from(high).unwrap_or(i32::MAX),
    );
    let w = image.width as usize;
    let h = image.height as usize;
    let (dx, dy, mag) = gradients(image, w, h);

    // 0: candidate, 1: not an edge, 2: edge.
    let mut map = vec![1u8; w * h];
    let mut stack = Vec::new();
    let at = |m: &[i32], x: isize, y: isize| -> i32 {
        if x < 0 || y < 0 || x >= w as isize || y >= h as isize {
            0
        } else {
            m[y as usize * w + x as usize]
        }
    };
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let m = mag[i];
            if m <= low {
                continue;
            }
            let (xs, ys) = (i64::from(dx[i]), i64::from(dy[i]));
            let ax = xs.abs();
            let ay = ys.abs() << SHIFT;
            let tg22x = ax * TG22;
            let (xi, yi) = (x as isize, y as isize);
            let is_max = if ay < tg22x {
                m > at(&mag, xi - 1, yi) && m >= at(&mag, xi + 1, yi)
            } else {
                let tg67x = tg22x + (ax << (SHIFT + 1));
                if ay > tg67x {
                    m > at(&mag, xi, yi - 1) && m >= at(&mag, xi, yi + 1)
                } else {
                    let s: isize = if (xs ^ ys) < 0 { -1 } else { 1 };
                    m > at(&mag, xi - s, yi - 1) && m > at(&mag, xi + s, yi + 1)
                }
            };
            if !is_max {
                continue;
            }
            if m > high {
                map[i] = 2;
                stack.push(i);
            } else {
                map[i] = 0;
            }
        }
    }
    while let Some(i) = stack.pop() {
        let (x, y) = ((i % w) as isize, (i / w) as isize);
        for (ox, oy) in [
            (-1, -1),
            (0, -1),
            (1, -1),
            (-1, 0),
            (1, 0),
            (-1, 1),
            (0, 1),
            (1, 1),
        ] {
            let (nx, ny) = (x + ox, y + oy);
            if nx < 0 || ny < 0 || nx >= w as isize || ny >= h as isize {
                continue;
            }
            let j = ny as usize * w + nx as usize;
            if map[j] == 0 {
                map[j] = 2;
                stack.push(j);
            }
        }
    }
    map.iter().map(|&v| v == 2).collect()
}

/// Per-pixel Sobel dx, dy and L1 magnitude, taking the strongest channel.
fn gradients(image: &ControlImage, w: usize, h: usize) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let px = |x: isize, y: isize, c: usize| -> i32 {
        let x = x.clamp(0, w as isize - 1) as usize;
        let y = y.clamp(0, h as isize - 1) as usize;
        i32::from(image.rgb[(y * w + x) * 3 + c])
    };
    let mut dx = vec![0i32; w * h];
    let mut dy = vec![0i32; w * h];
    let mut mag = vec![0i32; w * h];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let i = y as usize * w + x as usize;
            let mut best: Option<(i32, i32, i32)> = None;
            for c in 0..3 {
                let gx = (px(x + 1, y - 1, c) - px(x - 1, y - 1, c))
                    + 2 * (px(x + 1, y, c) - px(x - 1, y, c))
                    + (px(x + 1, y + 1, c) - px(x - 1, y + 1, c));
                let gy = (px(x - 1, y + 1, c) - px(x - 1, y - 1, c))
                    + 2 * (px(x, y + 1, c) - px(x, y - 1, c))
                    + (px(x + 1, y + 1, c) - px(x + 1, y - 1, c));
                let m = gx.abs() + gy.abs();
                if best.is_none_or(|(_, _, bm)| m > bm) {
                    best = Some((gx, gy, m));
                }
            }
            let (gx, gy, m) = best.unwrap_or_default();
            dx[i] = gx;
            dy[i] = gy;
            mag[i] = m;
        }
    }
    (dx, dy, mag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_gives_one_vertical_edge_line() {
        let (w, h) = (16u32, 8u32);
        let gray: Vec<u8> = (0..h)
            .flat_map(|_| (0..w).map(|x| if x < 8 { 10 } else { 240 }))
            .collect();
        let image = ControlImage::from_gray(w, h, &gray).unwrap();
        let mask = canny_mask(&image, 100, 200);
        for y in 0..h as usize {
            let row: Vec<usize> = (0..w as usize)
                .filter(|&x| mask[y * w as usize + x])
                .collect();
            assert_eq!(row, vec![7], "row {y}");
        }
        let flat = ControlImage::from_gray(w, h, &[90; 128]).unwrap();
        assert!(canny_mask(&flat, 100, 200).iter().all(|e| !e));
    }

    #[test]
    fn thresholds_above_the_gradient_find_nothing() {
        let gray: Vec<u8> = (0..64).map(|i| if i % 8 < 4 { 0 } else { 20 }).collect();
        let image = ControlImage::from_gray(8, 8, &gray).unwrap();
        // Largest L1 magnitude of a 20-level step is 4 * 20 = 80.
        assert!(canny_mask(&image, 100, 200).iter().all(|e| !e));
        assert!(canny_mask(&image, 10, 50).iter().any(|&e| e));
    }
}
