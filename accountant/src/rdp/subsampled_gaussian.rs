//! RDP of the Poisson-subsampled Gaussian mechanism at a single order.
//!
//! One DP-SGD step with sample rate `q` and noise multiplier `sigma` is, for a
//! pair of add/remove-one neighbours, the pair of distributions
//! `mu0 = N(0, sigma^2)` and `mu = (1 - q) mu0 + q N(1, sigma^2)`
//! (Mironov, Talwar & Zhang 2019, Thm 4 in arXiv:1908.10530v1). Its Renyi
//! divergence of order `alpha` is `ln(A_alpha) / (alpha - 1)` with
//!
//! ```text
//! A_alpha = E_{z ~ mu0} [ (1 - q + q L(z))^alpha ],   L(z) = exp((2 z - 1) / (2 sigma^2)).
//! ```
//!
//! Two facts shape the numerics here. `A_alpha - 1` is what carries the
//! privacy loss, and at small `q` it is tiny (about `q^2 alpha (alpha-1) / (2
//! sigma^2)`): computing `A_alpha` and subtracting one would lose every digit
//! (at `q = 1e-4` the RDP would be good to 1e-8 at best). So both expansions
//! below are written as series for `A_alpha - 1` directly, and `ln A_alpha` is
//! `ln(1 + exp(ln(A_alpha - 1)))`. And every term is a log-magnitude with a
//! sign, because the terms overflow `f64` long before their sum does.

use crate::math::{log1p_exp, log_add, log_expm1, log_half_erfc, log_sub, SignedLogSum};

/// The fractional series stops once its rigorous tail bound is this small
/// relative to the partial sum (and that bound is then added, so the result
/// can only be high).
const FRACTIONAL_TAIL_TOLERANCE: f64 = 1e-14;

/// Terms past the order after which an unconverged fractional series gives up
/// and the order is dropped (reported as `+inf`). At the tolerance above this
/// is reached only for orders within about 0.01 of 1 at large `q`.
const FRACTIONAL_MAX_EXTRA_TERMS: u64 = 200_000;

/// `ln(A_alpha)` for the subsampled Gaussian; `None` if the fractional series
/// did not converge (the caller drops the order).
///
/// Requires `0 < q < 1`, `sigma > 0`, `alpha > 1`, all finite.
pub(crate) fn log_a(q: f64, sigma: f64, alpha: f64) -> Option<f64> {
    let ln_a_minus_one = if alpha.fract() == 0.0 && alpha <= u64::MAX as f64 {
        // `alpha` is an integral float, so the cast is exact.
        Some(log_a_minus_one_integer(q, sigma, alpha as u64))
    } else {
        log_a_minus_one_fractional(q, sigma, alpha)
    }?;
    Some(log1p_exp(ln_a_minus_one))
}

/// `ln(A_alpha - 1)` at an integer order by the exact binomial expansion.
///
/// # Formula
/// Expanding `(1 - q + q L)^alpha` and using `E_mu0[L^i] = exp((i^2 - i) / (2 sigma^2))`
/// (Mironov, Talwar & Zhang 2019, Sec. 3.3, arXiv:1908.10530v1) and
/// `sum_i C(alpha, i) (1-q)^(alpha-i) q^i = 1`:
///
/// ```text
/// A_alpha - 1 = sum_{i=2}^{alpha} C(alpha, i) (1-q)^(alpha-i) q^i expm1((i^2 - i) / (2 sigma^2))
/// ```
///
/// # Numerics
/// Every term is positive: no cancellation at all, whatever `q`. The
/// binomial coefficient is carried by its recurrence (error about one ulp of
/// `ln` per term), the sum by log-add.
fn log_a_minus_one_integer(q: f64, sigma: f64, alpha: u64) -> f64 {
    let ln_q = q.ln();
    let ln_1mq = (-q).ln_1p();
    let two_s2 = 2.0 * sigma * sigma;
    let a = alpha as f64;
    let mut log_binom = 0.0;
    let mut acc = f64::NEG_INFINITY;
    for i in 1..=alpha {
        let fi = i as f64;
        log_binom += (a - fi + 1.0).ln() - fi.ln();
        if i >= 2 {
            let term = log_binom + fi * ln_q + (a - fi) * ln_1mq + log_expm1((fi * fi - fi) / two_s2);
            acc = log_add(acc, term);
        }
    }
    acc
}

/// `ln(A_alpha - 1)` at a fractional order by the two-sided series of
/// Mironov, Talwar & Zhang 2019 (Sec. 3.3, arXiv:1908.10530v1), with a
/// stopping rule that is a proof and not a heuristic.
///
/// # Formula
/// Split the integral at `z0 = sigma^2 ln(1/q - 1) + 1/2`, where `q L = 1 - q`,
/// and expand the binomial in the small ratio on each side. With
/// `b_i = C(alpha, i) (1-q)^(alpha-i) q^i`, `b'_i = C(alpha, i) q^(alpha-i) (1-q)^i`,
/// `j = alpha - i`, `c = 1 / (sqrt(2) sigma)`:
///
/// ```text
/// A_alpha = sum_i s0_i + s1_i
/// s0_i = b_i  exp((i^2 - i) / (2 sigma^2)) erfc((i - z0) c) / 2
/// s1_i = b'_i exp((j^2 - j) / (2 sigma^2)) erfc((z0 - j) c) / 2
/// ```
///
/// The side that holds `z = 1/2` (left when `q < 1/2`) is the one where the
/// plain binomial series `sum_i b_i = 1` (or `sum_i b'_i = 1`) converges, so
/// subtracting it term by term gives a series for `A_alpha - 1` whose early
/// terms are `-b_i erfc((z0 - i) c) / 2` rather than `b_i` minus almost `b_i`.
///
/// # Stopping rule (why the result is never low)
/// For `i > alpha` the signs of `C(alpha, i)` alternate, and the magnitudes of
/// `s0_i`, `s1_i`, `b_i` and `b'_i` all decrease strictly: the ratio of
/// consecutive `s0` terms is at most `(i - alpha) / (i + 1)` because
/// `erfcx(x) = exp(x^2) erfc(x)` is decreasing, which makes
/// `erfc(x + c) / erfc(x) <= exp(-2 x c - c^2)` and cancels every other factor
/// exactly; the same holds for `s1`, and `b_{i+1} / b_i` carries an extra
/// factor `q / (1 - q) <= 1` on the side where it is used. So each tail is an
/// alternating series with decreasing terms: it lies between zero and its
/// first term (Leibniz). The loop stops when the sum of those first terms is
/// below `1e-14` of the partial sum, then adds whichever of them is positive:
/// the result is an upper bound on `A_alpha - 1`. A series that has not
/// stopped after 200 000 terms past `alpha` returns `None`, and the order is
/// dropped, never underestimated.
fn log_a_minus_one_fractional(q: f64, sigma: f64, alpha: f64) -> Option<f64> {
    let ln_q = q.ln();
    let ln_1mq = (-q).ln_1p();
    let two_s2 = 2.0 * sigma * sigma;
    let z0 = sigma * sigma * (ln_1mq - ln_q) + 0.5;
    let c = std::f64::consts::FRAC_1_SQRT_2 / sigma;
    // Which side's plain binomial series is subtracted (see the doc above).
    let shift_left = q < 0.5;
    let first_alternating = alpha.floor() + 1.0;
    let max_terms = first_alternating + FRACTIONAL_MAX_EXTRA_TERMS as f64;
    let ln_tol = FRACTIONAL_TAIL_TOLERANCE.ln();

    let mut acc = SignedLogSum::ZERO;
    let mut log_binom = 0.0_f64;
    let mut positive = true;
    let mut fi = 0.0_f64;
    while fi <= max_terms {
        if fi > 0.0 {
            let factor = alpha - (fi - 1.0);
            log_binom += factor.abs().ln() - fi.ln();
            if factor < 0.0 {
                positive = !positive;
            }
        }
        let j = alpha - fi;
        let log_b = log_binom + fi * ln_q + j * ln_1mq; // b_i
        let log_b_prime = log_binom + j * ln_q + fi * ln_1mq; // b'_i
        let x0 = (fi * fi - fi) / two_s2;
        let x1 = (j * j - j) / two_s2;
        let log_s0 = log_b + x0 + log_half_erfc((fi - z0) * c);
        let log_s1 = log_b_prime + x1 + log_half_erfc((z0 - j) * c);

        // The side whose plain series is subtracted contributes `term - b`;
        // the other side contributes its term as is.
        let (log_shifted_b, shifted_x, shifted_arg, log_s_other) = if shift_left {
            (log_b, x0, (z0 - fi) * c, log_s1)
        } else {
            (log_b_prime, x1, (j - z0) * c, log_s0)
        };
        acc.add(positive, log_s_other);
        add_shifted_term(&mut acc, positive, log_shifted_b, shifted_x, shifted_arg);

        if fi >= first_alternating {
            let log_tail = log_add(log_add(log_s0, log_s1), log_shifted_b);
            if let Some(total) = acc.ln() {
                if log_tail < total + ln_tol {
                    // The tails after this term have the sign of the next
                    // term: the s-series tails are positive when this term is
                    // negative, the subtracted b-series tail when it is
                    // positive. Add the bound of the positive ones.
                    if positive {
                        acc.add(true, log_shifted_b);
                    } else {
                        acc.add(true, log_add(log_s0, log_s1));
                    }
                    return acc.ln();
                }
            }
        }
        fi += 1.0;
    }
    None
}

/// Adds `b * (exp(x) * (1 - Q) - 1)` with `Q = erfc(arg) / 2`, the shifted
/// term of the side whose plain binomial series is subtracted.
///
/// While `Q < 1/2` it is formed as `b * (expm1(x) - exp(x) Q)`, which keeps
/// the small early terms exact; past the split (`Q >= 1/2`) `exp(x) (1 - Q)`
/// is a small tail term of its own and `b` is subtracted separately, since
/// forming the difference there would cancel two huge numbers.
fn add_shifted_term(acc: &mut SignedLogSum, positive: bool, log_b: f64, x: f64, arg: f64) {
    if arg > 0.0 {
        let log_q = log_half_erfc(arg);
        if x == 0.0 {
            acc.add(!positive, log_b + log_q);
            return;
        }
        let log_exp_q = x + log_q;
        if x > 0.0 {
            let log_em1 = log_expm1(x);
            match log_sub(log_em1, log_exp_q) {
                Some(m) => acc.add(positive, log_b + m),
                None => acc.add(
                    !positive,
                    log_b + log_sub(log_exp_q, log_em1).unwrap_or(f64::NEG_INFINITY),
                ),
            }
        } else {
            // x < 0: exp(x)(1 - Q) - 1 = -( -expm1(x) + exp(x) Q ), both positive.
            let log_neg_em1 = (-x.exp_m1()).ln();
            acc.add(!positive, log_b + log_add(log_neg_em1, log_exp_q));
        }
    } else {
        let log_one_minus_q = log_half_erfc(-arg);
        acc.add(positive, log_b + x + log_one_minus_q);
        acc.add(!positive, log_b);
    }
}
