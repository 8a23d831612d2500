//! Composition of grid losses by FFT, and the hockey-stick divergence of the
//! result.
//!
//! Independent steps add their losses, so the composed loss is the
//! convolution of the steps' distributions: one real FFT per distinct step,
//! spectra raised to their counts and multiplied, one inverse FFT (as in
//! Koskela, Jalko & Honkela 2020). The transform is circular: a sum outside
//! the window of `N` grid points would wrap around. The window is chosen by a
//! Chernoff bound so that the probability outside it is at most
//! `WINDOW_TAIL` on each side, and that probability is reported so the
//! accountant can charge it.

use std::sync::{Mutex, OnceLock};

use realfft::num_complex::Complex;
use realfft::RealFftPlanner;

use super::discretize::{GridLoss, MAX_POINTS};
use crate::error::{Error, Result};

/// Work is counted in units of one butterfly of an FFT (`n log2 n` per
/// transform, about 7 ns each, measured); discretizing one grid point (three
/// `erfc`) costs about this many (measured: about 170 ns).
pub(crate) const WORK_PER_POINT: f64 = 30.0;

/// The probability allowed outside the composition window on each side.
const WINDOW_TAIL: f64 = 1e-18;

/// A composed loss on its window, from loss `first h` up, as the suffix sums
/// that answer delta at any epsilon from `min_query` up in O(1). (The masses
/// further below cannot change delta there, so they are not kept.)
#[derive(Debug, Clone)]
pub(crate) struct ComposedLoss {
    first: i64,
    h: f64,
    /// The smallest epsilon delta may be asked at.
    min_query: f64,
    /// `sum_{i >= k} w_i`.
    suffix_mass: Vec<f64>,
    /// `sum_{i >= k} w_i exp(-(i - k) h)`.
    suffix_weighted: Vec<f64>,
    /// A bound on the probability the window misses (both sides).
    pub(crate) window_tail: f64,
}

/// `ln E[exp(lambda L)]` for one step's grid loss (the core's sub-probability
/// measure), shifted so that no term overflows.
fn log_mgf(grid: &GridLoss, h: f64, lambda: f64) -> f64 {
    // Factor out the largest exponent: the top point for lambda > 0, the
    // bottom one otherwise (both carry mass: `GridLoss` trims its ends).
    let n = grid.masses.len();
    let (anchor, step) = if lambda > 0.0 { (n - 1, -lambda * h) } else { (0, lambda * h) };
    // Eight interleaved power chains keep the loop free of a serial dependency.
    let ratio = step.exp();
    let ratio8 = (8.0 * step).exp();
    let mut pw: [f64; 8] = std::array::from_fn(|i| (step * i as f64).exp());
    let mut acc = [0.0f64; 8];
    let idx = |k: usize| if lambda > 0.0 { anchor - k } else { anchor + k };
    let mut k = 0;
    while k + 8 <= n {
        for lane in 0..8 {
            acc[lane] += grid.masses[idx(k + lane)] * pw[lane];
            pw[lane] *= ratio8;
        }
        k += 8;
    }
    let mut sum: f64 = acc.iter().sum();
    let mut p = (step * k as f64).exp();
    while k < n {
        sum += grid.masses[idx(k)] * p;
        p *= ratio;
        k += 1;
    }
    // The power chains round; 1e-12 relative covers their drift over 2^26 terms.
    lambda * (grid.first + anchor as i64) as f64 * h + sum.ln() + 1e-12
}

/// The smallest `t` with `P(sign * S >= t) <= WINDOW_TAIL` that a Chernoff
/// bound `exp(K(lambda) - lambda t)` proves, searched over `lambda`
/// (golden section in `ln lambda`; `(K(lambda) + c) / lambda` is
/// quasi-convex since `K` is convex).
fn chernoff_edge(atoms: &[(GridLoss, u64)], h: f64, sign: f64) -> f64 {
    let c = -WINDOW_TAIL.ln();
    let edge = |ln_lambda: f64| {
        let lambda = ln_lambda.exp();
        let k: f64 = atoms.iter().map(|(g, n)| *n as f64 * log_mgf(g, h, sign * lambda)).sum();
        (k + c) / lambda
    };
    let (mut a, mut b) = ((1e-4f64).ln(), (1e4f64).ln());
    let phi = 0.5 * (5f64.sqrt() - 1.0);
    let (mut x1, mut x2) = (b - phi * (b - a), a + phi * (b - a));
    let (mut f1, mut f2) = (edge(x1), edge(x2));
    let mut best = f1.min(f2);
    for _ in 0..16 {
        if f1 <= f2 {
            (b, x2, f2) = (x2, x1, f1);
            x1 = b - phi * (b - a);
            f1 = edge(x1);
        } else {
            (a, x1, f1) = (x1, x2, f2);
            x2 = a + phi * (b - a);
            f2 = edge(x2);
        }
        best = best.min(f1).min(f2);
    }
    // Every evaluated lambda gives a valid bound; the best one is kept.
    best
}

/// The smallest FFT length `2^a` or `3 * 2^a` that is `>= n` and even: fast
/// for the FFT, and few enough sizes that plans are reused.
fn fft_length(n: usize) -> usize {
    let pow2 = n.next_power_of_two().max(2);
    let three = 3 * (n.div_ceil(3)).next_power_of_two().max(1);
    if three % 2 == 0 {
        pow2.min(three)
    } else {
        pow2
    }
}

/// `z^n` for a complex `z` with `|z| <= 1` and a count `n`, through polar
/// form; `0` without trigonometry where `|z|^n` underflows (`|z|^2` below
/// `underflow`, which is `exp(-1500 / n)`).
fn complex_pow(z: Complex<f64>, n: u64, underflow: f64) -> Complex<f64> {
    let r2 = z.norm_sqr();
    if r2 <= underflow {
        return Complex::new(0.0, 0.0);
    }
    if n == 1 {
        return z;
    }
    let n = n as f64;
    Complex::from_polar((0.5 * n * r2.ln()).exp(), n * z.arg())
}

/// The distribution of the sum of `count` independent copies of each grid
/// loss, on the window a Chernoff bound proves holds all but `2 WINDOW_TAIL`.
///
/// Delta will be asked at epsilons from `min_query` (<= 0) up.
///
/// # Errors
/// [`Error::GridTooLarge`] if the window needs more than [`MAX_POINTS`] points;
/// [`Error::PldWorkTooLarge`] if its FFTs would take more than `max_work`
/// units (see [`WORK_PER_POINT`]).
pub(crate) fn compose(atoms: &[(GridLoss, u64)], h: f64, min_query: f64, max_work: f64) -> Result<(ComposedLoss, f64)> {
    let min_query = min_query.min(0.0);
    // Window [lo, hi] in grid units, within the sum's possible range.
    let min_sum: f64 = atoms.iter().map(|(g, n)| *n as f64 * g.first as f64).sum();
    let max_sum: f64 = atoms.iter().map(|(g, n)| *n as f64 * (g.first + g.masses.len() as i64 - 1) as f64).sum();
    // (A NaN edge, from an atom without mass, falls back to the support.)
    let hi = (chernoff_edge(atoms, h, 1.0) / h).ceil().min(max_sum);
    let lo = (-chernoff_edge(atoms, h, -1.0) / h).floor().max(min_sum);
    let needed = hi - lo + 1.0;
    if needed > MAX_POINTS as f64 {
        return Err(Error::GridTooLarge { points: needed as u64, limit: MAX_POINTS });
    }
    let first = lo as i64;
    let n = fft_length(needed as usize);
    // The FFTs' work, checked before any is done.
    let work = (atoms.len() + 1) as f64 * n as f64 * (n as f64).log2() + WORK_PER_POINT * needed;
    if work > max_work {
        return Err(Error::PldWorkTooLarge { work, limit: max_work });
    }
    let (forward, inverse) = {
        // Plans (twiddle tables) are shared by every composition in the process.
        static PLANNER: OnceLock<Mutex<RealFftPlanner<f64>>> = OnceLock::new();
        let mut planner =
            PLANNER.get_or_init(|| Mutex::new(RealFftPlanner::new())).lock().unwrap_or_else(|p| p.into_inner());
        (planner.plan_fft_forward(n), planner.plan_fft_inverse(n))
    };
    let mut product = vec![Complex::new(1.0, 0.0); n / 2 + 1];
    let mut buffer = vec![0.0; n];
    let mut spectrum = forward.make_output_vec();
    for (grid, count) in atoms {
        buffer.iter_mut().for_each(|v| *v = 0.0);
        // Point j of the step sits at j mod n: sums land at their value mod n.
        for (k, &m) in grid.masses.iter().enumerate() {
            buffer[(grid.first + k as i64).rem_euclid(n as i64) as usize] += m;
        }
        forward.process(&mut buffer, &mut spectrum).map_err(|e| Error::Numerical { reason: e.to_string() })?;
        let underflow = (-1500.0 / *count as f64).exp();
        for (p, z) in product.iter_mut().zip(&spectrum) {
            if *p != Complex::new(0.0, 0.0) {
                *p *= complex_pow(*z, *count, underflow);
            }
        }
    }
    // The first and (n even) last bins are real: drop the imaginary rounding.
    product[0].im = 0.0;
    product[n / 2].im = 0.0;
    inverse.process(&mut product, &mut buffer).map_err(|e| Error::Numerical { reason: e.to_string() })?;
    // Unwrap in place: value v in [first, first + n) sits at v mod n. Only
    // points from the one at or below min_query on are kept. Rounding can
    // leave tiny negative masses; they are set to zero.
    buffer.rotate_left(first.rem_euclid(n as i64) as usize);
    // In floats: `min_query / h` can be far beyond i64 (a tiny grid step).
    let skip = ((min_query / h).floor() - first as f64).clamp(0.0, (n - 1) as f64) as usize;
    buffer.drain(..skip);
    let kept = buffer.len();
    let scale = 1.0 / n as f64;
    let decay = (-h).exp();
    let mut suffix_mass = vec![0.0; kept + 1];
    let mut suffix_weighted = buffer;
    suffix_weighted.push(0.0);
    for k in (0..kept).rev() {
        let m = (suffix_weighted[k] * scale).max(0.0);
        suffix_mass[k] = suffix_mass[k + 1] + m;
        suffix_weighted[k] = m + decay * suffix_weighted[k + 1];
    }
    let first = first + skip as i64;
    // With nothing dropped, any epsilon may be asked.
    let min_query = if skip == 0 { f64::NEG_INFINITY } else { first as f64 * h };
    Ok((ComposedLoss { first, h, min_query, suffix_mass, suffix_weighted, window_tail: 2.0 * WINDOW_TAIL }, work))
}

impl ComposedLoss {
    /// Number of grid points of the window.
    pub(crate) fn len(&self) -> usize {
        self.suffix_mass.len() - 1
    }

    /// `H(eps) = E[(1 - exp(eps - S))_+]` over the window's masses: the
    /// hockey-stick divergence of the composed grid pair; `None` below the
    /// smallest epsilon it may be asked at.
    pub(crate) fn delta(&self, eps: f64) -> Option<f64> {
        if eps < self.min_query {
            return None;
        }
        Some(self.delta_from(eps))
    }

    /// [`ComposedLoss::delta`] for `eps >= min_query`.
    fn delta_from(&self, eps: f64) -> f64 {
        // First point strictly above eps.
        let k = (eps / self.h).floor() as i64 + 1 - self.first;
        if k >= self.len() as i64 {
            return 0.0;
        }
        let k = k.max(0) as usize;
        let at = (self.first + k as i64) as f64 * self.h;
        (self.suffix_mass[k] - (eps - at).exp() * self.suffix_weighted[k]).max(0.0)
    }

    /// The smallest `eps >= 0` with `delta(eps) <= target` (`+inf` if even
    /// the largest loss of the window leaves more than `target`; that cannot
    /// happen for `target > 0` since `delta` reaches 0 there).
    pub(crate) fn epsilon(&self, target: f64) -> f64 {
        // min_query <= 0: every epsilon asked here is allowed.
        if self.delta_from(0.0) <= target {
            return 0.0;
        }
        let at_point = |k: usize| self.delta_from((self.first + k as i64) as f64 * self.h);
        // The smallest k with delta(l_k) <= target among points l_k >= 0
        // (delta at the last point is 0). On (l_{k-1}, l_k] the points above
        // eps are those from k on, so there delta = W_k - e^{eps - l_k} V_k.
        let last = self.len() - 1;
        let start = ((-self.first).max(0) as usize).min(last);
        let hi = if at_point(start) <= target {
            start
        } else {
            let (mut lo, mut hi) = (start, last);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if at_point(mid) > target {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            hi
        };
        let l_hi = (self.first + hi as i64) as f64 * self.h;
        let eps = l_hi + ((self.suffix_mass[hi] - target) / self.suffix_weighted[hi]).ln();
        eps.max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fft_lengths_are_smooth_and_sufficient() {
        for n in [1, 2, 3, 5, 7, 100, 1000, 4097, 100_000, 786_433] {
            let m = fft_length(n);
            assert!(m >= n && m % 2 == 0);
            let mut r = m;
            while r % 2 == 0 {
                r /= 2;
            }
            while r % 3 == 0 {
                r /= 3;
            }
            assert_eq!(r, 1, "{m}");
        }
        assert_eq!(fft_length(1000), 1024);
        assert_eq!(fft_length(700), 768); // 2^8 * 3
    }

    /// Direct convolution is the oracle for the FFT.
    #[test]
    fn fft_composition_matches_direct_convolution() {
        let h = 0.5;
        let a = GridLoss { first: -2, masses: vec![0.1, 0.2, 0.3, 0.15, 0.25], tail: 0.0 };
        let b = GridLoss { first: 1, masses: vec![0.6, 0.4], tail: 0.0 };
        let composed = compose(&[(a.clone(), 3), (b.clone(), 2)], h, -1.0, f64::INFINITY).unwrap().0;
        // Direct: a*a*a*b*b.
        let conv = |x: &(i64, Vec<f64>), y: &GridLoss| {
            let mut out = vec![0.0; x.1.len() + y.masses.len() - 1];
            for (i, u) in x.1.iter().enumerate() {
                for (j, v) in y.masses.iter().enumerate() {
                    out[i + j] += u * v;
                }
            }
            (x.0 + y.first, out)
        };
        let mut direct = (0i64, vec![1.0]);
        for g in [&a, &a, &a, &b, &b] {
            direct = conv(&direct, g);
        }
        for eps in [-3.0, -1.0, 0.0, 0.3, 1.0, 2.2, 4.0, 7.9] {
            let want: f64 = direct
                .1
                .iter()
                .enumerate()
                .map(|(k, w)| w * (1.0 - (eps - (direct.0 + k as i64) as f64 * h).exp()).max(0.0))
                .sum();
            match composed.delta(eps) {
                Some(got) => assert!((got - want).abs() < 1e-14, "eps {eps}: {got} vs {want}"),
                None => assert!(eps < -1.0, "delta refused at {eps}"),
            }
        }
    }

    #[test]
    fn epsilon_inverts_delta() {
        let g = GridLoss {
            first: -40,
            masses: (0..200).map(|k| (-((k as f64 - 90.0) / 30.0).powi(2)).exp()).collect(),
            tail: 0.0,
        };
        let total: f64 = g.masses.iter().sum();
        let g = GridLoss { masses: g.masses.iter().map(|m| m / total).collect(), ..g };
        let c = compose(&[(g, 7)], 0.01, -0.5, f64::INFINITY).unwrap().0;
        for target in [0.3, 1e-2, 1e-5, 1e-9] {
            let eps = c.epsilon(target);
            assert!(eps > 0.0);
            let at = c.delta(eps).unwrap();
            assert!((at - target).abs() < 1e-9 * target, "{target}: delta(eps) = {at}");
            assert!(c.delta(eps - 1e-6).unwrap() > target);
        }
    }

    /// The powered spectrum against an exact answer: `n` Gaussian steps
    /// discretized once and composed by raising to the `n`-th power give the
    /// Gaussian of `sqrt(n) / sigma`, within the Azuma-Hoeffding rounding term.
    #[test]
    fn powered_gaussian_steps_bracket_the_exact_composition() {
        use super::super::discretize::discretize;
        use super::super::loss::{Direction, SubsampledGaussianLoss};
        let phi = |x: f64| 0.5 * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2);
        let (sigma, n, h) = (8.0, 400u64, 2e-4);
        let mu = (n as f64).sqrt() / sigma;
        let grid = discretize(&SubsampledGaussianLoss::new(1.0, sigma, Direction::Remove), h).unwrap();
        let tails = n as f64 * grid.tail;
        let composed = compose(&[(grid, n)], h, -1.0, f64::INFINITY).unwrap().0;
        let delta_err: f64 = 1e-12;
        let eps_err = h * (n as f64 * (1.0 / delta_err).ln() / 2.0).sqrt();
        for eps in [0.0, 0.5, 1.0, 2.0, 4.0] {
            let exact = phi(-eps / mu + mu / 2.0) - eps.exp() * phi(-eps / mu - mu / 2.0);
            let upper = composed.delta(eps - eps_err).unwrap() + delta_err + tails + composed.window_tail;
            let lower = composed.delta(eps + eps_err).unwrap() - delta_err - composed.window_tail;
            assert!(lower <= exact && exact <= upper, "eps {eps}: {exact} not in [{lower}, {upper}]");
            // And the bracket is tight: the rounding term is the only slack.
            assert!(upper - lower < 0.02 * exact + 1e-10, "eps {eps}: [{lower}, {upper}] around {exact}");
        }
    }
}
