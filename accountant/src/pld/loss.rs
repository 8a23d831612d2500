//! The privacy loss of one step of the Poisson-subsampled Gaussian, as a
//! random variable: its tails, accurate on both sides.
//!
//! Sensitivity 1, noise standard deviation `s`, sample rate `q` (`q = 1` is
//! the plain Gaussian). With `mu0 = N(0, s^2)` and
//! `mu = (1 - q) N(0, s^2) + q N(1, s^2)`, the log density ratio is
//! `r(x) = ln(1 - q + q exp((2x - 1) / (2 s^2)))`, increasing in `x`.
//! Add-or-remove adjacency needs both orders of the pair (Zhu, Dong & Wang
//! 2022, "Optimal accounting of differential privacy via characteristic
//! function", AISTATS):
//! * remove: `P = mu`, `Q = mu0`, loss `L = r(x)`, `x ~ mu`;
//! * add: `P = mu0`, `Q = mu`, loss `L = -r(x)`, `x ~ mu0`.

use std::f64::consts::FRAC_1_SQRT_2;

use crate::math::log_add;

/// Which distribution of the pair comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// The example is in the sample's population: `P = mu`, `Q = mu0`.
    Remove,
    /// The example is not: `P = mu0`, `Q = mu`.
    Add,
}

/// How far each Gaussian component is followed, in its standard deviations.
/// The mass beyond, `Phi(-10) = 7.6e-24` per side, is not dropped silently:
/// the discretization measures it exactly and the bounds add it.
const CORE_Z: f64 = 10.0;

/// A probability carried on the side where it is accurate: the upper tail
/// `P(L > l)` where that is at most about one half, else the lower tail
/// `P(L <= l)`. Differences of nearby tails then lose no digits.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Tail {
    /// `P(L > l)`.
    Upper(f64),
    /// `P(L <= l)`.
    Lower(f64),
}

impl Tail {
    /// `P(a < L <= b)` for the tails at `a <= b`, never negative.
    pub(crate) fn mass_between(a: Tail, b: Tail) -> f64 {
        let m = match (a, b) {
            (Tail::Upper(sa), Tail::Upper(sb)) => sa - sb,
            (Tail::Lower(fa), Tail::Lower(fb)) => fb - fa,
            (Tail::Lower(fa), Tail::Upper(sb)) => 1.0 - fa - sb,
            (Tail::Upper(sa), Tail::Lower(fb)) => fb + sa - 1.0,
        };
        m.max(0.0)
    }

    /// `P(L > l)`.
    pub(crate) fn upper(self) -> f64 {
        match self {
            Tail::Upper(s) => s,
            Tail::Lower(f) => 1.0 - f,
        }
    }

    /// `P(L <= l)`.
    pub(crate) fn lower(self) -> f64 {
        match self {
            Tail::Upper(s) => 1.0 - s,
            Tail::Lower(f) => f,
        }
    }
}

/// `P(Z > z)` for a standard normal `Z`, accurate far into the tail.
fn normal_upper(z: f64) -> f64 {
    0.5 * libm::erfc(z * FRAC_1_SQRT_2)
}

/// The privacy loss of one subsampled-Gaussian step in one direction.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SubsampledGaussianLoss {
    q: f64,
    s: f64,
    direction: Direction,
    ln_q: f64,
    ln_1mq: f64,
}

impl SubsampledGaussianLoss {
    /// `q` in `(0, 1]`, `s > 0`: validated by the caller.
    pub(crate) fn new(q: f64, s: f64, direction: Direction) -> Self {
        Self { q, s, direction, ln_q: q.ln(), ln_1mq: (-q).ln_1p() }
    }

    /// `r(x)`, the log density ratio `ln(mu(x) / mu0(x))`.
    fn log_ratio(&self, x: f64) -> f64 {
        log_add(self.ln_1mq, self.ln_q + (2.0 * x - 1.0) / (2.0 * self.s * self.s))
    }

    /// The `x` with `r(x) = v`; `-inf` when `v <= ln(1 - q)` (below the range of `r`).
    fn x_at_log_ratio(&self, v: f64) -> f64 {
        // ln(e^v - (1 - q)), written to keep its digits for large and small v.
        let ln_excess = if v > 1.0 {
            v + (-(1.0 - self.q) * (-v).exp()).ln_1p()
        } else {
            let excess = v.exp_m1() + self.q;
            if excess <= 0.0 {
                return f64::NEG_INFINITY;
            }
            excess.ln()
        };
        self.s * self.s * (ln_excess - self.ln_q) + 0.5
    }

    /// The tails of `L` at `l`.
    pub(crate) fn tail(&self, l: f64) -> Tail {
        let (q, s) = (self.q, self.s);
        match self.direction {
            Direction::Remove => {
                // L > l  <=>  x > x(l), x ~ (1 - q) N(0, s^2) + q N(1, s^2).
                let x = self.x_at_log_ratio(l);
                if x == f64::NEG_INFINITY {
                    return Tail::Lower(0.0);
                }
                if x >= 0.5 {
                    Tail::Upper((1.0 - q) * normal_upper(x / s) + q * normal_upper((x - 1.0) / s))
                } else {
                    Tail::Lower((1.0 - q) * normal_upper(-x / s) + q * normal_upper((1.0 - x) / s))
                }
            }
            Direction::Add => {
                // L > l  <=>  r(x) < -l  <=>  x < x(-l), x ~ N(0, s^2).
                let x = self.x_at_log_ratio(-l);
                if x == f64::NEG_INFINITY {
                    return Tail::Upper(0.0);
                }
                if x <= 0.0 {
                    Tail::Upper(normal_upper(-x / s))
                } else {
                    Tail::Lower(normal_upper(x / s))
                }
            }
        }
    }

    /// The losses `[lo, hi]` of the core: every Gaussian component of `P`
    /// within `CORE_Z` standard deviations of its mean.
    pub(crate) fn core_range(&self) -> (f64, f64) {
        let s = self.s;
        match self.direction {
            Direction::Remove => (self.log_ratio(-CORE_Z * s), self.log_ratio(1.0 + CORE_Z * s)),
            Direction::Add => (-self.log_ratio(CORE_Z * s), -self.log_ratio(-CORE_Z * s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_loss_is_normal_with_mean_mu_and_variance_2mu() {
        // q = 1: L ~ N(1/(2 s^2), 1/s^2) in both directions.
        for dir in [Direction::Remove, Direction::Add] {
            let s = 0.8;
            let loss = SubsampledGaussianLoss::new(1.0, s, dir);
            let (mean, sd) = (1.0 / (2.0 * s * s), 1.0 / s);
            for l in [-3.0, -0.5, 0.0, 0.7, 2.0, 6.0] {
                let want = normal_upper((l - mean) / sd);
                let got = loss.tail(l).upper();
                assert!((got - want).abs() <= 1e-15 + 1e-13 * want, "{dir:?} l={l}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn tails_are_complementary_and_monotone() {
        for dir in [Direction::Remove, Direction::Add] {
            let loss = SubsampledGaussianLoss::new(0.05, 1.3, dir);
            let (lo, hi) = loss.core_range();
            let mut prev = 1.0;
            for k in 0..=400 {
                let l = lo + (hi - lo) * f64::from(k) / 400.0;
                let t = loss.tail(l);
                assert!((t.upper() + t.lower() - 1.0).abs() < 1e-15);
                assert!(t.upper() <= prev + 1e-16, "{dir:?}: not decreasing at {l}");
                prev = t.upper();
            }
        }
    }
}
