//! The f-DP one-run audit of Mahloujifar, Melis & Chaudhuri, "Auditing
//! f-Differential Privacy in One Run" (ICML 2025, arXiv:2410.22235), for the
//! Gaussian trade-off curves `G_mu` (`mu`-GDP, the curve of the Gaussian
//! mechanism and, by the central limit theorem, of DP-SGD).
//!
//! Their bound with a cap on the guesses: for `c` correct guesses out of
//! `c'` on `m` canaries, significance `tau`, start from `T = tau c' / m`,
//! `r_c = T c / c'`, `h_c = T (c' - c) / c'`, and for `i = c - 1, ..., 0`
//! set `h_i = max(h_(i+1), g(r_(i+1)))` and
//! `r_i = r_(i+1) + i / (c' - i) (h_i - h_(i+1))`, where `g(x) = Phi(Phi^-1(x)
//! - mu)` is the inverse of the curve's "blow-up". If training is `mu`-GDP,
//! `c` or more correct guesses have probability below `tau` whenever
//! `r_0 + h_0 > c' / m`: the hypothesis is rejected. Epsilon-hat is the
//! epsilon, at the given delta, of the largest `mu` so rejected (the
//! `(epsilon, delta)` curve of `mu`-GDP, Dong, Roth & Su 2022, Corollary 2.13).
//! The lower bound is on `mu` for a mechanism whose curve is Gaussian; its
//! epsilon says what that `mu` means.

use crate::math::log_half_erfc;

/// `ln Phi(y)`, the standard normal CDF's logarithm, without underflow.
fn log_phi(y: f64) -> f64 {
    log_half_erfc(-y / std::f64::consts::SQRT_2)
}

/// `Phi^-1(x)` for `x` in `(0, 1)`: the rational approximation of
/// Abramowitz & Stegun 26.2.23 (error below 4.5e-4), then Newton steps on
/// `ln Phi` (`d ln Phi / dy = phi(y) / Phi(y)`; concave, so the steps
/// converge quadratically from there).
fn probit(x: f64) -> f64 {
    let lower = x.min(1.0 - x);
    let t = (-2.0 * lower.ln()).sqrt();
    let approx = t
        - (2.515_517 + 0.802_853 * t + 0.010_328 * t * t)
            / (1.0 + 1.432_788 * t + 0.189_269 * t * t + 0.001_308 * t * t * t);
    let mut y = if x < 0.5 { -approx } else { approx };
    let target = x.ln();
    for _ in 0..4 {
        let lp = log_phi(y);
        let log_density = -0.5 * y * y - 0.5 * (2.0 * std::f64::consts::PI).ln();
        let step = (lp - target) / (log_density - lp).exp();
        if !step.is_finite() || step == 0.0 {
            break;
        }
        y -= step;
    }
    y
}

/// `g(x) = Phi(Phi^-1(x) - mu)`, 0 at 0 and 1 at 1.
fn inverse_blow_up(x: f64, mu: f64) -> f64 {
    if x <= 0.0 {
        0.0
    } else if x >= 1.0 {
        1.0
    } else {
        log_phi(probit(x) - mu).exp()
    }
}

/// Whether `mu`-GDP is rejected at significance `tau` by `c` correct of
/// `guesses` guesses on `m` canaries (the module's recursion).
pub(crate) fn rejects(mu: f64, m: usize, guesses: usize, c: usize, tau: f64) -> bool {
    if guesses == 0 || c == 0 {
        return false;
    }
    let t = tau * guesses as f64 / m as f64;
    let (mut r, mut h) = (t * c as f64 / guesses as f64, t * (guesses - c) as f64 / guesses as f64);
    for i in (0..c).rev() {
        let h_next = h.max(inverse_blow_up(r, mu));
        r += i as f64 / (guesses - i) as f64 * (h_next - h);
        h = h_next;
    }
    r + h > guesses as f64 / m as f64
}

/// The largest `mu` found rejected (0 if none): `rejects` is taken to be
/// monotone in `mu` (a larger `mu` is a weaker hypothesis); bisection keeps
/// a rejected lower end.
pub(crate) fn mu_hat(m: usize, guesses: usize, c: usize, tau: f64) -> f64 {
    let mut lo = 1e-3;
    if !rejects(lo, m, guesses, c, tau) {
        return 0.0;
    }
    let mut hi = 1.0;
    while rejects(hi, m, guesses, c, tau) {
        lo = hi;
        hi *= 2.0;
        if hi > 64.0 {
            return lo;
        }
    }
    for _ in 0..40 {
        let mid = 0.5 * (lo + hi);
        if rejects(mid, m, guesses, c, tau) {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo < 1e-7 * hi {
            break;
        }
    }
    lo
}

/// The epsilon of `mu`-GDP at `delta`: the root of
/// `delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)` (decreasing
/// in epsilon), by bisection; 0 when `delta(0) <= delta`.
pub(crate) fn gdp_epsilon(mu: f64, delta: f64) -> f64 {
    if mu <= 0.0 {
        return 0.0;
    }
    let d = |eps: f64| {
        let a = log_phi(-eps / mu + mu / 2.0).exp();
        let b = (eps + log_phi(-eps / mu - mu / 2.0)).exp();
        a - b
    };
    if d(0.0) <= delta {
        return 0.0;
    }
    let mut hi = 1.0;
    while d(hi) > delta && hi < 1e4 {
        hi *= 2.0;
    }
    let mut lo = 0.0;
    for _ in 0..80 {
        let mid = 0.5 * (lo + hi);
        if d(mid) > delta {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The normal CDF's inverse against values known to 16 digits.
    #[test]
    fn probit_inverts_the_normal_cdf() {
        for (p, x) in [
            (0.5, 0.0),
            (0.975, 1.959_963_984_540_054),
            (0.025, -1.959_963_984_540_054),
            (1e-10, -6.361_340_902_404_056),
        ] {
            assert!((probit(p) - x).abs() < 1e-10, "{p}: {}", probit(p));
        }
        for y in [-30.0, -8.0, -1.0, 0.3, 5.0] {
            assert!((probit(log_phi(y).exp()) - y).abs() < 1e-8 * (1.0 + y.abs()), "{y}");
        }
    }

    /// `mu`-GDP's epsilon at delta: the curve's delta is met at the root, and
    /// `mu = 1` at 1e-5 matches a 30-digit root.
    #[test]
    fn gdp_epsilon_solves_the_delta_curve() {
        for (mu, delta) in [(0.5, 1e-5), (1.0, 1e-5), (2.0, 1e-6), (3.0, 1e-3)] {
            let eps = gdp_epsilon(mu, delta);
            let d = log_phi(-eps / mu + mu / 2.0).exp() - (eps + log_phi(-eps / mu - mu / 2.0)).exp();
            assert!((d - delta).abs() < 1e-9 * delta.max(1e-12) + 1e-15, "mu {mu}: delta({eps}) = {d}");
        }
        // 4.377178095681 by mpmath's root of the same curve.
        let e1 = gdp_epsilon(1.0, 1e-5);
        assert!((e1 - 4.377_178_095_681).abs() < 1e-9, "{e1}");
    }
}
