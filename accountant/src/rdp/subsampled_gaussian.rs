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

use crate::math::{
    alternating_moment_sum, log1p_exp, log_add, log_erfcx, log_expm1, log_half_erfc, log_sub, SignedLogSum,
};

/// Terms of each tail summed by the accelerated alternating sum: its error
/// bound is `2 / (3 + sqrt 8)^24 < 1.5e-18` of the tail's first term.
const TAIL_TERMS: usize = 24;

/// The convergence rate of the accelerated sum: `3 + sqrt 8`.
const CVZ_RATE: f64 = 5.828_427_124_746_19;

/// The tail is summed with as few terms as make its error bound this small
/// relative to the head's sum (at most [`TAIL_TERMS`]).
const TAIL_BOUND_TARGET: f64 = 1e-18;

/// Longest run of head terms past the order before the tail is summed anyway
/// (the tail bound holds wherever it starts; this only bounds the work).
const MAX_HEAD_EXTRA: f64 = 4096.0;

/// The head stops once its new terms are this far (in nats) below the sum:
/// the tail's two parts can then no longer cancel anything that matters.
const HEAD_NEGLIGIBLE_NATS: f64 = 40.0;

/// A fractional order whose tail error bound exceeds this fraction of the
/// result is dropped (`+inf`) rather than trusted.
const MAX_RELATIVE_TAIL_ERROR: f64 = 1e-12;

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
    // Terms are summed relative to a running maximum: one `exp` per term.
    let (mut max, mut sum) = (f64::NEG_INFINITY, 0.0_f64);
    for i in 1..=alpha {
        let fi = i as f64;
        log_binom += (a - fi + 1.0).ln() - fi.ln();
        if i >= 2 {
            let term = log_binom + fi * ln_q + (a - fi) * ln_1mq + log_expm1((fi * fi - fi) / two_s2);
            if term > max {
                sum = sum * (max - term).exp() + 1.0;
                max = term;
            } else {
                sum += (term - max).exp();
            }
        }
    }
    max + sum.ln()
}

/// `ln(A_alpha - 1)` at a fractional order by the two-sided series of
/// Mironov, Talwar & Zhang 2019 (Sec. 3.3, arXiv:1908.10530v1), its tail
/// summed with a proven error bound.
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
/// # The tail, and why the result is never low
/// Algebra turns the terms into `s0_i = K |C(alpha, i)| erfcx((i - z0) c)` and
/// `s1_i = K |C(alpha, i)| erfcx((i - alpha + z0) c)`, with
/// `K = (1-q)^alpha exp(-z0^2 / (2 sigma^2)) / 2` and `erfcx(x) = exp(x^2) erfc(x)`.
/// For `i > alpha` the signs of `C(alpha, i)` alternate and each magnitude is a
/// Hausdorff moment sequence in `i`: `|C(alpha, i)|` is a Beta integral
/// `(|sin(pi alpha)| / pi) int_0^1 t^(i-alpha-1) (1-t)^alpha dt`, `erfcx` is
/// `(2/sqrt(pi)) int_0^inf exp(-u^2 - 2xu) du` (a moment sequence in `exp(-2cu)`),
/// `b_i` adds a factor `(q/(1-q))^i <= 1` on the side where it is used, and
/// products and sums of moment sequences are moment sequences. So, from the
/// first index `N > alpha` where the head stops, each tail is an alternating
/// series that the algorithm of Cohen, Rodriguez Villegas & Zagier sums from
/// 24 terms with an error of at most `1.5e-18` of its first term. That bound
/// is added to the result, which is therefore an upper bound on `A_alpha - 1`;
/// if the bound is not below `1e-12` of the result (heavy cancellation), the
/// order is dropped (`None`, reported as `+inf`), never underestimated.
fn log_a_minus_one_fractional(q: f64, sigma: f64, alpha: f64) -> Option<f64> {
    let ln_q = q.ln();
    let ln_1mq = (-q).ln_1p();
    let two_s2 = 2.0 * sigma * sigma;
    let z0 = sigma * sigma * (ln_1mq - ln_q) + 0.5;
    let c = std::f64::consts::FRAC_1_SQRT_2 / sigma;
    // Which side's plain binomial series is subtracted (see the doc above).
    let shift_left = q < 0.5;
    let log_shifted_b = |log_binom: f64, i: f64| {
        if shift_left {
            log_binom + i * ln_q + (alpha - i) * ln_1mq
        } else {
            log_binom + (alpha - i) * ln_q + i * ln_1mq
        }
    };
    let first_alternating = alpha.floor() + 1.0;
    let mut binom = LogBinomial::new(alpha);
    let mut acc = SignedLogSum::ZERO;

    // The head: every term, with the early shifted terms formed exactly.
    loop {
        let (i, log_binom, positive) = binom.current();
        let j = alpha - i;
        let x0 = (i * i - i) / two_s2;
        let x1 = (j * j - j) / two_s2;
        let log_b = log_binom + i * ln_q + j * ln_1mq;
        let log_b_prime = log_binom + j * ln_q + i * ln_1mq;
        let log_s0 = log_b + x0 + log_half_erfc((i - z0) * c);
        let log_s1 = log_b_prime + x1 + log_half_erfc((z0 - j) * c);
        let (log_sb, shifted_x, shifted_arg, log_s_shifted, log_s_other) = if shift_left {
            (log_b, x0, (z0 - i) * c, log_s0, log_s1)
        } else {
            (log_b_prime, x1, (j - z0) * c, log_s1, log_s0)
        };
        if i >= first_alternating {
            let negligible = log_add(log_add(log_s_shifted, log_sb), log_s_other) < acc.log_pos - HEAD_NEGLIGIBLE_NATS;
            if shifted_arg <= 0.0 || negligible || i >= first_alternating + MAX_HEAD_EXTRA {
                break;
            }
        }
        acc.add(positive, log_s_other);
        add_shifted_term(&mut acc, positive, log_sb, shifted_x, shifted_arg);
        binom.advance();
    }

    // The tail: two alternating moment sequences, summed with their bound.
    // The first terms decide how many are needed: enough that the bound,
    // `2 a_0 / (3 + sqrt 8)^n`, is below `TAIL_BOUND_TARGET` of the head's sum.
    let (_, _, tail_positive) = binom.current();
    let log_k = alpha * ln_1mq - z0 * z0 / two_s2 - std::f64::consts::LN_2;
    let mut log_s = [0.0; TAIL_TERMS];
    let mut log_sb = [0.0; TAIL_TERMS];
    let mut n = TAIL_TERMS;
    for t in 0..TAIL_TERMS {
        if t == n {
            break;
        }
        let (i, log_binom, _) = binom.current();
        let log_erfcx_sum = log_add(log_erfcx((i - z0) * c), log_erfcx((i - alpha + z0) * c));
        log_s[t] = log_k + log_binom + log_erfcx_sum;
        log_sb[t] = log_shifted_b(log_binom, i);
        if t == 0 {
            if let Some(head) = acc.ln() {
                let needed = (std::f64::consts::LN_2 + log_add(log_s[0], log_sb[0]) - head - TAIL_BOUND_TARGET.ln())
                    / CVZ_RATE.ln();
                n = (needed.ceil().max(2.0) as usize).min(TAIL_TERMS);
            }
        }
        binom.advance();
    }
    let (log_tail_s, log_err_s) = log_alternating_sum(&log_s[..n]);
    let (log_tail_b, log_err_b) = log_alternating_sum(&log_sb[..n]);
    acc.add(tail_positive, log_tail_s);
    acc.add(!tail_positive, log_tail_b);
    let log_err = log_add(log_err_s, log_err_b);
    acc.add(true, log_err);
    let total = acc.ln()?;
    (log_err < total + MAX_RELATIVE_TAIL_ERROR.ln()).then_some(total)
}

/// [`alternating_moment_sum`] of terms given by their logs: returns the logs
/// of the sum and of its error bound.
fn log_alternating_sum(log_terms: &[f64]) -> (f64, f64) {
    let first = log_terms[0];
    if first == f64::NEG_INFINITY {
        return (f64::NEG_INFINITY, f64::NEG_INFINITY);
    }
    let scaled: Vec<f64> = log_terms.iter().map(|l| (l - first).exp()).collect();
    let (sum, bound) = alternating_moment_sum(&scaled);
    (first + sum.max(0.0).ln(), first + bound.ln())
}

/// `ln |C(alpha, i)|` and its sign for `i = 0, 1, 2, ...`, by the recurrence
/// `C(alpha, i + 1) = C(alpha, i) (alpha - i) / (i + 1)`.
struct LogBinomial {
    alpha: f64,
    i: f64,
    log_abs: f64,
    positive: bool,
}

impl LogBinomial {
    fn new(alpha: f64) -> Self {
        Self { alpha, i: 0.0, log_abs: 0.0, positive: true }
    }

    /// `(i, ln |C(alpha, i)|, C(alpha, i) > 0)`.
    fn current(&self) -> (f64, f64, bool) {
        (self.i, self.log_abs, self.positive)
    }

    fn advance(&mut self) {
        let factor = self.alpha - self.i;
        self.log_abs += factor.abs().ln() - (self.i + 1.0).ln();
        if factor < 0.0 {
            self.positive = !self.positive;
        }
        self.i += 1.0;
    }
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
                None => acc.add(!positive, log_b + log_sub(log_exp_q, log_em1).unwrap_or(f64::NEG_INFINITY)),
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
