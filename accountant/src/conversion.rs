//! From Renyi DP to `(epsilon, delta)`-DP, minimized over orders.

use serde::Serialize;

/// Orders at or below this are skipped by the RDP conversion: the bound is
/// numerically unstable as `alpha -> 1` and never the best there (the same
/// guard as dp_accounting).
const MIN_CONVERSION_ORDER: f64 = 1.01;

/// An epsilon with what it rests on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EpsilonBound {
    /// The privacy loss bound; `+inf` if no order gives a finite one.
    pub epsilon: f64,
    /// The delta it holds at.
    pub delta: f64,
    /// The RDP order that gives it (between grid orders when refined).
    pub order: f64,
    /// The best grid order is the lowest or the highest of the grid: a wider
    /// grid might give a smaller epsilon.
    pub order_at_range_edge: bool,
    /// Grid orders whose RDP could not be computed (the series did not
    /// converge): left out, which can only make epsilon larger.
    pub dropped_orders: Vec<f64>,
}

/// A delta with what it rests on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeltaBound {
    /// The bound on delta, at most 1.
    pub delta: f64,
    /// The epsilon it holds at.
    pub epsilon: f64,
    /// The RDP order that gives it (`NaN` if none is below the KL bound).
    pub order: f64,
    /// As in [`EpsilonBound::order_at_range_edge`].
    pub order_at_range_edge: bool,
    /// As in [`EpsilonBound::dropped_orders`].
    pub dropped_orders: Vec<f64>,
}

/// Epsilon at `delta` from an RDP guarantee `rdp` at one order `alpha`.
///
/// # Formula
/// `epsilon = rdp + ln(1 - 1/alpha) - (ln delta + ln alpha) / (alpha - 1)`,
/// floored at 0; and `epsilon = 0` outright when `delta^2 >= 1 - exp(-rdp)`,
/// since `rdp` bounds the KL divergence and `TV <= sqrt(1 - exp(-KL))`
/// (Bretagnolle-Huber).
///
/// # Reference
/// Balle, Barthe, Gaboardi, Hsu & Sato 2020, Thm 21 (arXiv:1905.09982v3);
/// Canonne, Kamath & Steinke 2020, Prop. 12 (arXiv:2004.00010v4). The guards
/// (orders > 1.01, the KL shortcut) are dp_accounting's.
///
/// # Numerics
/// Infinite or NaN RDP gives `+inf`; so does `alpha <= 1.01`.
pub fn epsilon_at_order(alpha: f64, rdp: f64, delta: f64) -> f64 {
    if rdp.is_nan() || rdp == f64::INFINITY {
        return f64::INFINITY;
    }
    let rdp = rdp.max(0.0);
    if delta * delta + (-rdp).exp_m1() > 0.0 {
        return 0.0;
    }
    if alpha <= MIN_CONVERSION_ORDER {
        return f64::INFINITY;
    }
    let eps = rdp + (-1.0 / alpha).ln_1p() - (delta.ln() + alpha.ln()) / (alpha - 1.0);
    eps.max(0.0)
}

/// `ln(delta)` at `epsilon` from an RDP guarantee at one order: the inverse
/// of [`epsilon_at_order`], with the same references.
///
/// # Formula
/// `ln delta = min( (alpha - 1)(rdp - epsilon + ln(1 - 1/alpha)) - ln alpha,
///                  ln(1 - exp(-rdp)) / 2 )`, the second term the KL bound.
pub fn log_delta_at_order(alpha: f64, rdp: f64, epsilon: f64) -> f64 {
    if rdp.is_nan() || rdp == f64::INFINITY {
        return 0.0;
    }
    let rdp = rdp.max(0.0);
    let kl = if rdp == 0.0 { f64::NEG_INFINITY } else { 0.5 * (-(-rdp).exp_m1()).ln() };
    if alpha <= MIN_CONVERSION_ORDER {
        return kl;
    }
    let rdp_bound = (alpha - 1.0) * (rdp - epsilon + (-1.0 / alpha).ln_1p()) - alpha.ln();
    kl.min(rdp_bound).min(0.0)
}

/// The minimum of `objective(alpha, rdp(alpha))` over the grid, then over
/// the interval between the best grid order's neighbours.
struct Optimum {
    value: f64,
    order: f64,
    at_edge: bool,
    dropped: Vec<f64>,
}

fn minimize(
    orders: &[f64],
    rdp: &[f64],
    skipped: &[bool],
    objective: impl Fn(f64, f64) -> f64,
    refine: Option<impl Fn(f64) -> f64>,
) -> Optimum {
    // Skipped orders (proved not to be the minimizer) are `+inf` but were
    // never computed, so they are not "dropped".
    let dropped: Vec<f64> = (0..orders.len())
        .filter(|&k| !rdp[k].is_finite() && !skipped.get(k).copied().unwrap_or(false))
        .map(|k| orders[k])
        .collect();
    let values: Vec<f64> = orders.iter().zip(rdp).map(|(&a, &r)| objective(a, r)).collect();
    let mut best = 0;
    for k in 1..values.len() {
        if values[k] < values[best] {
            best = k;
        }
    }
    let at_edge = best == 0 || best + 1 == orders.len();
    let mut opt = Optimum { value: values[best], order: orders[best], at_edge, dropped };
    if let Some(rdp_at) = refine {
        if opt.value.is_finite() && orders.len() > 1 {
            let lo = orders[best.saturating_sub(1)];
            let hi = orders[(best + 1).min(orders.len() - 1)];
            let (x, fx) = brent_minimize(|a| objective(a, rdp_at(a)), lo, hi, orders[best], opt.value);
            if fx < opt.value {
                opt.value = fx;
                opt.order = x;
            }
        }
    }
    opt
}

/// Epsilon at `delta`, minimized over the grid (and refined when `refine`
/// gives the RDP at any order).
pub(crate) fn epsilon(
    orders: &[f64],
    rdp: &[f64],
    skipped: &[bool],
    delta: f64,
    refine: Option<impl Fn(f64) -> f64>,
) -> EpsilonBound {
    let opt = minimize(orders, rdp, skipped, |a, r| epsilon_at_order(a, r, delta), refine);
    EpsilonBound {
        epsilon: opt.value,
        delta,
        order: opt.order,
        order_at_range_edge: opt.at_edge,
        dropped_orders: opt.dropped,
    }
}

/// Delta at `epsilon`, minimized over the grid (and refined).
pub(crate) fn delta(
    orders: &[f64],
    rdp: &[f64],
    skipped: &[bool],
    epsilon: f64,
    refine: Option<impl Fn(f64) -> f64>,
) -> DeltaBound {
    let opt = minimize(orders, rdp, skipped, |a, r| log_delta_at_order(a, r, epsilon), refine);
    DeltaBound {
        delta: opt.value.exp().min(1.0),
        epsilon,
        order: opt.order,
        order_at_range_edge: opt.at_edge,
        dropped_orders: opt.dropped,
    }
}

/// Brent's minimization (golden section with parabolic steps) of `f` on
/// `[a, b]`, started at `x0` with `f(x0) = f0`; returns the best point seen.
///
/// # Reference
/// R. P. Brent, "Algorithms for Minimization without Derivatives", 1973,
/// ch. 5. The tolerance is relative, `1e-7 |x|`: near its minimum epsilon is
/// quadratic in the order, so the error this leaves in epsilon is negligible.
fn brent_minimize(f: impl Fn(f64) -> f64, mut a: f64, mut b: f64, x0: f64, f0: f64) -> (f64, f64) {
    const GOLDEN: f64 = 0.381_966_011_250_105_1; // (3 - sqrt 5) / 2
    const REL_TOL: f64 = 1e-7;
    const MAX_ITER: usize = 100;
    let (mut x, mut w, mut v) = (x0, x0, x0);
    let (mut fx, mut fw, mut fv) = (f0, f0, f0);
    let (mut d, mut e) = (0.0_f64, 0.0_f64);
    for _ in 0..MAX_ITER {
        let m = 0.5 * (a + b);
        let tol = REL_TOL * x.abs() + 1e-12;
        let t2 = 2.0 * tol;
        if (x - m).abs() <= t2 - 0.5 * (b - a) {
            break;
        }
        let mut parabolic = false;
        if e.abs() > tol {
            let r = (x - w) * (fx - fv);
            let mut q = (x - v) * (fx - fw);
            let mut p = (x - v) * q - (x - w) * r;
            q = 2.0 * (q - r);
            if q > 0.0 {
                p = -p;
            } else {
                q = -q;
            }
            let e_prev = e;
            e = d;
            if p.abs() < (0.5 * q * e_prev).abs() && p > q * (a - x) && p < q * (b - x) {
                d = p / q;
                let u = x + d;
                if u - a < t2 || b - u < t2 {
                    d = if x < m { tol } else { -tol };
                }
                parabolic = true;
            }
        }
        if !parabolic {
            e = if x < m { b - x } else { a - x };
            d = GOLDEN * e;
        }
        let u = x + if d.abs() >= tol { d } else { tol.copysign(d) };
        let fu = f(u);
        if fu <= fx {
            if u < x {
                b = x;
            } else {
                a = x;
            }
            (v, fv, w, fw, x, fx) = (w, fw, x, fx, u, fu);
        } else {
            if u < x {
                a = u;
            } else {
                b = u;
            }
            if fu <= fw || w == x {
                (v, fv, w, fw) = (w, fw, u, fu);
            } else if fu <= fv || v == x || v == w {
                (v, fv) = (u, fu);
            }
        }
    }
    (x, fx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_orders_are_reported_and_never_chosen() {
        let orders = [2.0, 3.0, 4.0, 5.0];
        let rdp = [0.5, f64::INFINITY, 0.9, 1.2];
        let b = epsilon(&orders, &rdp, &[], 1e-5, None::<fn(f64) -> f64>);
        assert_eq!(b.dropped_orders, vec![3.0]);
        assert_ne!(b.order, 3.0);
        assert!(b.epsilon.is_finite());
        // All dropped: epsilon is infinite, and delta is 1.
        let inf = [f64::INFINITY; 4];
        assert_eq!(epsilon(&orders, &inf, &[], 1e-5, None::<fn(f64) -> f64>).epsilon, f64::INFINITY);
        assert_eq!(delta(&orders, &inf, &[], 1.0, None::<fn(f64) -> f64>).delta, 1.0);
    }

    #[test]
    fn brent_finds_a_parabola_minimum() {
        let (x, fx) = brent_minimize(|x| (x - 2.5) * (x - 2.5) + 1.0, 1.0, 4.0, 3.0, 1.25);
        assert!((x - 2.5).abs() < 1e-6, "{x}");
        assert!((fx - 1.0).abs() < 1e-12);
    }
}
