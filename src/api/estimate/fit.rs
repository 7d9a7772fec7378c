//! The fitting arithmetic of the estimates: non-negative least absolute relative error by
//! iteratively reweighted least squares, a small dense solver and quantiles.

pub(super) fn dot<const N: usize>(a: &[f64; N], b: &[f64; N]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Sorted-slice quantile with linear interpolation.
pub(super) fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 1.0;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Least absolute relative error with non-negative coefficients, by iteratively reweighted
/// least squares (a handful of rounds starting from least squares on relative error, so a
/// few rows slowed by something else, such as a busy host, pull the fit less). Features whose
/// coefficient comes out negative (or that never vary from zero) are dropped and the rest
/// refitted.
pub(super) fn nonnegative_fit<const N: usize>(rows: &[([f64; N], f64)]) -> Option<[f64; N]> {
    let mut active: Vec<usize> = (0..N)
        .filter(|&j| rows.iter().any(|(x, _)| x[j] != 0.0))
        .collect();
    'features: while !active.is_empty() {
        let mut weights: Vec<f64> = rows.iter().map(|(_, t)| 1.0 / (t * t)).collect();
        let mut solution = Vec::new();
        for _ in 0..IRLS_ROUNDS {
            solution = weighted_least_squares(rows, &weights, &active)?;
            if let Some(i) = solution.iter().position(|c| *c < 0.0) {
                active.remove(i);
                continue 'features;
            }
            for ((x, t), w) in rows.iter().zip(weights.iter_mut()) {
                let fitted: f64 = active.iter().zip(&solution).map(|(&j, c)| c * x[j]).sum();
                let relative = ((fitted - t) / t).abs().max(0.01);
                *w = 1.0 / (t * t * relative);
            }
        }
        let mut out = [0.0; N];
        for (j, c) in active.iter().zip(solution) {
            out[*j] = c;
        }
        return Some(out);
    }
    None
}

/// Rounds of reweighting in [`nonnegative_fit`].
const IRLS_ROUNDS: usize = 8;

/// Solves the normal equations of Σ w·(x·c − t)² over the `active` features.
fn weighted_least_squares<const N: usize>(
    rows: &[([f64; N], f64)],
    weights: &[f64],
    active: &[usize],
) -> Option<Vec<f64>> {
    let k = active.len();
    let mut a = vec![vec![0.0; k + 1]; k];
    for ((x, t), w) in rows.iter().zip(weights) {
        for (r, &i) in active.iter().enumerate() {
            for (c, &j) in active.iter().enumerate() {
                a[r][c] += w * x[i] * x[j];
            }
            a[r][k] += w * x[i] * t;
        }
    }
    // A touch of ridge keeps nearly collinear features solvable.
    for (r, row) in a.iter_mut().enumerate() {
        row[r] *= 1.0 + 1e-9;
    }
    solve(a)
}

/// Gaussian elimination with partial pivoting on an augmented k × (k+1) matrix.
fn solve(mut a: Vec<Vec<f64>>) -> Option<Vec<f64>> {
    let k = a.len();
    for col in 0..k {
        let pivot = (col..k).max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))?;
        if a[pivot][col].abs() < 1e-300 {
            return None;
        }
        a.swap(col, pivot);
        let pivot_row = a[col].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot_row[col];
                for (x, p) in row.iter_mut().zip(&pivot_row).skip(col) {
                    *x -= f * p;
                }
            }
        }
    }
    Some((0..k).map(|i| a[i][k] / a[i][i]).collect())
}
