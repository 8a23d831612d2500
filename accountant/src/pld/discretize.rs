//! One step's privacy loss moved onto the grid `l_j = j h` by randomized,
//! mean-preserving rounding (Gopi, Lee & Wutschitz 2021, "Numerical
//! composition of differential privacy", Sec. 5).
//!
//! A loss `L` in the cell `(l_j, l_{j+1}]` goes to `l_{j+1}` with probability
//! `(L - l_j) / h`, else to `l_j`. The rounding error `E = L' - L` then has
//! conditional mean 0 and lies in an interval of length `h` given `L`, which is
//! what the Azuma-Hoeffding bound of the accountant needs. Summed over the
//! cell, the mass sent up is `b = (1/h) Int_cell (S(l) - S(l_{j+1})) dl` with
//! `S(l) = P(L > l)`, integrated by Simpson's rule on the half-cell masses.

use super::loss::{SubsampledGaussianLoss, Tail};
use crate::error::{Error, Result};

/// One step's loss on the grid: `masses[k]` at loss `(first + k) h`, the
/// probability outside the core (`tail`) left out. The first and last masses
/// are positive (unless there is no mass at all): points without mass at the
/// ends are trimmed.
#[derive(Debug, Clone)]
pub(crate) struct GridLoss {
    pub(crate) first: i64,
    pub(crate) masses: Vec<f64>,
    /// `P(L < first h) + P(L > last h)`: the truncated probability.
    pub(crate) tail: f64,
}

/// The most grid points one step's loss may take (2^26, 512 MiB of f64).
pub(crate) const MAX_POINTS: u64 = 1 << 26;

/// Discretizes `loss` on the grid of step `h`.
///
/// # Errors
/// [`Error::GridTooLarge`] if the core spans more than [`MAX_POINTS`] points.
pub(crate) fn discretize(loss: &SubsampledGaussianLoss, h: f64) -> Result<GridLoss> {
    let (lo, hi) = loss.core_range();
    let first = (lo / h).floor();
    let mut last = (hi / h).ceil();
    if last <= first {
        last = first + 1.0;
    }
    let points = last - first + 1.0;
    if points > MAX_POINTS as f64 {
        return Err(Error::GridTooLarge { points: points as u64, limit: MAX_POINTS });
    }
    let (first, cells) = (first as i64, (last - first) as usize);
    let at = |k: f64| (first as f64 + k) * h;
    let mut masses = vec![0.0; cells + 1];
    let mut t_lo = loss.tail(at(0.0));
    let tail_below = t_lo.lower();
    for c in 0..cells {
        let t_mid = loss.tail(at(c as f64 + 0.5));
        let t_hi = loss.tail(at(c as f64 + 1.0));
        let low = Tail::mass_between(t_lo, t_mid);
        let up = Tail::mass_between(t_mid, t_hi);
        // Simpson on (1/h) Int (S - S(l_{j+1})): the integrand is low + up,
        // up and 0 at the cell's start, middle and end.
        let sent_up = (low + 5.0 * up) / 6.0;
        masses[c] += (5.0 * low + up) / 6.0;
        masses[c + 1] += sent_up;
        t_lo = t_hi;
    }
    // Far in the core's ends masses underflow to 0: trim them, so the
    // composition neither transforms nor scans them.
    let end = masses.iter().rposition(|&m| m > 0.0).map_or(1, |k| k + 1);
    masses.truncate(end);
    let start = masses.iter().position(|&m| m > 0.0).unwrap_or(0);
    masses.drain(..start);
    Ok(GridLoss { first: first + start as i64, masses, tail: tail_below + t_lo.upper() })
}

#[cfg(test)]
mod tests {
    use super::super::loss::Direction;
    use super::*;

    /// `E[L]` under `P` is `KL(P || Q)`; for the Gaussian it is `1 / (2 s^2)`.
    #[test]
    fn rounding_preserves_mass_and_mean() {
        let s = 0.9;
        let h = 1e-3;
        for dir in [Direction::Remove, Direction::Add] {
            let grid = discretize(&SubsampledGaussianLoss::new(1.0, s, dir), h).unwrap();
            let mass: f64 = grid.masses.iter().sum();
            let mean: f64 =
                grid.masses.iter().enumerate().map(|(k, m)| m * (grid.first + k as i64) as f64 * h).sum::<f64>();
            assert!((mass + grid.tail - 1.0).abs() < 1e-13, "mass {mass} tail {}", grid.tail);
            assert!(grid.tail < 1e-22);
            let want = 1.0 / (2.0 * s * s);
            assert!((mean - want).abs() < 1e-12, "{dir:?}: mean {mean} vs {want}");
        }
    }

    /// For the subsampled Gaussian, `E_P[L]` in the remove direction is
    /// `E_{mu0}[(mu/mu0) ln(mu/mu0)]`; computed here by an independent
    /// quadrature over `x` (fine trapezoid on [-12, 13]).
    #[test]
    fn subsampled_mean_matches_quadrature() {
        let (q, s) = (0.02, 1.1);
        let density =
            |x: f64, m: f64| (-(x - m) * (x - m) / (2.0 * s * s)).exp() / (s * (2.0 * std::f64::consts::PI).sqrt());
        let ratio = |x: f64| 1.0 - q + q * ((2.0 * x - 1.0) / (2.0 * s * s)).exp();
        let n = 200_000;
        let (a, b) = (-12.0 * s, 1.0 + 12.0 * s);
        let dx = (b - a) / n as f64;
        let mut kl_remove = 0.0;
        let mut kl_add = 0.0;
        for i in 0..=n {
            let x = a + dx * i as f64;
            let w = if i == 0 || i == n { 0.5 } else { 1.0 };
            let mu = (1.0 - q) * density(x, 0.0) + q * density(x, 1.0);
            kl_remove += w * mu * ratio(x).ln() * dx;
            kl_add -= w * density(x, 0.0) * ratio(x).ln() * dx;
        }
        for (dir, want) in [(Direction::Remove, kl_remove), (Direction::Add, kl_add)] {
            let grid = discretize(&SubsampledGaussianLoss::new(q, s, dir), 1e-4).unwrap();
            let mean: f64 =
                grid.masses.iter().enumerate().map(|(k, m)| m * (grid.first + k as i64) as f64 * 1e-4).sum::<f64>();
            assert!((mean - want).abs() < 1e-10 * want.abs().max(1e-6), "{dir:?}: mean {mean} vs {want}");
        }
    }
}
