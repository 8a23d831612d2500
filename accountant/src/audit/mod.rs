//! Empirical lower bounds on epsilon from canaries: what a training run
//! demonstrably leaked, beside what the accountant proves it could leak.
//!
//! # The one-run audit
//! Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run",
//! NeurIPS 2023 (arXiv:2305.08846). `m` canaries are each included in the
//! training data independently with probability 1/2. After training, an
//! auditor scores every canary (higher: more likely included), guesses
//! "included" for the top scores and, optionally, "excluded" for the bottom
//! ones, and abstains on the rest. If training is `(epsilon, delta)`-DP, the
//! number `W` of correct guesses among `r` satisfies, for every `v`
//! (their main theorem, with its `delta` term),
//!
//! `P[W >= v] <= P[Bin(r, p) >= v] + 2 m delta max_{1 <= i <= v} P[v - i <= Bin(r, p) < v] / i`,
//!
//! with `p = e^epsilon / (1 + e^epsilon)`: a p-value for the hypothesis
//! "training is `(epsilon, delta)`-DP" ([`one_run_p_value`]). The audit's
//! epsilon-hat is the largest epsilon that hypothesis is rejected at
//! significance `alpha` ([`one_run_epsilon`]): if training is `(epsilon,
//! delta)`-DP, epsilon-hat exceeds epsilon with probability at most `alpha`.
//!
//! # Choosing the guesses after seeing the scores
//! The number of guesses is picked from the scores, so the choice is paid
//! for: [`audit_one_run`] tries a fixed set of guess counts (1%, 2%, 5%,
//! 10%, 20%, 30% and 50% of the canaries, at most 7), each at significance
//! `alpha / 7` (Bonferroni), and reports the largest epsilon-hat. Bonferroni
//! rather than a split of the canaries into a half that picks the count and a
//! half that tests it: a split halves `m` (and the guesses with it), while
//! Bonferroni only divides the significance by 7, which the binomial tail
//! absorbs with a few more correct guesses.
//!
//! # The f-DP audit
//! Mahloujifar, Melis & Chaudhuri (ICML 2025, arXiv:2410.22235) bound the
//! same game under an f-DP hypothesis instead of `(epsilon, delta)`: for the
//! Gaussian curves (`mu`-GDP, the shape of DP-SGD's privacy), the largest
//! `mu` rejected, turned into epsilon at the given delta, is tighter on
//! Gaussian-like scores ([`OneRunAudit::epsilon_fdp`]; the recursion is in
//! `fdp.rs`). It rests on the curve's shape being Gaussian; the bound above
//! assumes nothing about the shape. Same guess counts, same Bonferroni.
//!
//! Guesses never split canaries with equal scores: a guess count stops at
//! the last boundary between distinct scores at or below it, so the guesses
//! depend on the scores alone and not on the order of the input lists (which
//! gives away which canaries were included).

use crate::error::{Error, Result, Valid};

mod fdp;

/// The guess counts tried, as fractions of the canaries (see the module docs).
pub const GUESS_FRACTIONS: [f64; 7] = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5];

/// The largest epsilon the search considers: beyond it even `v = r = m = 10^7`
/// correct guesses are no evidence at any significance above `1e-300`.
const EPSILON_CAP: f64 = 800.0;

/// Points of the coarse scan of epsilon before the final bisection.
const SCAN_POINTS: usize = 256;

/// The scores of a run's canaries, split by whether each was included.
#[derive(Debug, Clone, PartialEq)]
pub struct CanaryScores {
    included: Vec<f64>,
    excluded: Vec<f64>,
}

impl CanaryScores {
    /// Scores of the included (`in_scores`) and excluded (`out_scores`)
    /// canaries; higher means more likely included.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a score that is not finite
    /// (`in_scores` or `out_scores`, naming the list), or for no canary at
    /// all (`canaries`).
    pub fn new(in_scores: Vec<f64>, out_scores: Vec<f64>) -> Result<Self> {
        for (field, list) in [("in_scores", &in_scores), ("out_scores", &out_scores)] {
            if let Some(bad) = list.iter().find(|s| !s.is_finite()) {
                return Err(Error::InvalidParameter { field, value: *bad, valid: Valid::Finite });
            }
        }
        let m = in_scores.len() + out_scores.len();
        if m == 0 {
            return Err(Error::InvalidParameter { field: "canaries", value: 0.0, valid: Valid::AtLeastOne });
        }
        Ok(Self { included: in_scores, excluded: out_scores })
    }

    /// Scores from JSON: `{"in_scores": [...], "out_scores": [...]}`, two
    /// arrays of numbers (other fields are refused, so a misspelt name is
    /// not read as an empty list).
    ///
    /// # Errors
    /// [`Error::Scores`] for text that is not that object; then as
    /// [`CanaryScores::new`].
    pub fn from_json(text: &str) -> Result<Self> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            in_scores: Vec<f64>,
            out_scores: Vec<f64>,
        }
        let file: File = serde_json::from_str(text).map_err(|e| Error::Scores {
            reason: format!("{e} (expected {{\"in_scores\": [numbers], \"out_scores\": [numbers]}})"),
        })?;
        Self::new(file.in_scores, file.out_scores)
    }

    /// The number of canaries, `m`.
    pub fn canaries(&self) -> usize {
        self.included.len() + self.excluded.len()
    }

    /// The included canaries' scores.
    pub fn in_scores(&self) -> &[f64] {
        &self.included
    }

    /// The excluded canaries' scores.
    pub fn out_scores(&self) -> &[f64] {
        &self.excluded
    }
}

/// Where guesses are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guesses {
    /// "Included" for the `k` highest scores.
    Top,
    /// "Included" for the `k` highest and "excluded" for the `k` lowest.
    TopAndBottom,
}

/// What a one-run audit found.
#[derive(Debug, Clone, PartialEq)]
pub struct OneRunAudit {
    /// Epsilon-hat: the largest epsilon rejected (0 when none is).
    pub epsilon: f64,
    /// The p-value of "training is `(epsilon, delta)`-DP" at `epsilon`:
    /// below `alpha / candidates` when `epsilon > 0`; at 0, the p-value of
    /// "0-DP" (at least `alpha / candidates` unless even that is rejected).
    pub p_value: f64,
    /// Canaries, `m`.
    pub canaries: usize,
    /// Guesses of the count that gave epsilon-hat, `r`.
    pub guesses: usize,
    /// Correct guesses among them, `v`.
    pub correct: usize,
    /// Guess counts tried (the Bonferroni factor).
    pub candidates: usize,
    /// The significance asked for.
    pub alpha: f64,
    /// The delta of the hypothesis.
    pub delta: f64,
    /// The f-DP audit's epsilon-hat (module docs): epsilon at `delta` of the
    /// largest `mu`-GDP rejected (0 when none is).
    pub epsilon_fdp: f64,
    /// That `mu`.
    pub mu_fdp: f64,
    /// Guesses and correct guesses of the count that gave it.
    pub fdp_guesses: usize,
    /// Correct guesses among them.
    pub fdp_correct: usize,
}

/// `ln P[Bin(r, p) = k]` for `k = 0..=r`, with `p = e^eps / (1 + e^eps)`.
fn log_pmf(r: u64, epsilon: f64) -> Vec<f64> {
    // ln p = -ln(1 + e^-eps), ln(1 - p) = -eps - ln(1 + e^-eps), both stable.
    let log1p_exp_neg = (-epsilon).exp().ln_1p();
    let (ln_p, ln_q) = (-log1p_exp_neg, -epsilon - log1p_exp_neg);
    let ln_r_fact = libm::lgamma(r as f64 + 1.0);
    (0..=r)
        .map(|k| {
            let (k, rest) = (k as f64, (r - k) as f64);
            ln_r_fact - libm::lgamma(k + 1.0) - libm::lgamma(rest + 1.0) + k * ln_p + rest * ln_q
        })
        .collect()
}

/// `ln sum exp(x)` over `xs` (`-inf` for none).
fn log_sum_exp(xs: &[f64]) -> f64 {
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + xs.iter().map(|x| (x - max).exp()).sum::<f64>().ln()
}

fn check_counts(m: u64, r: u64, v: u64) -> Result<()> {
    let count = |field, value: u64, valid, ok: bool| {
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidParameter { field, value: value as f64, valid })
        }
    };
    count("canaries", m, Valid::Canaries, (1..=MAX_CANARIES).contains(&m))?;
    count("guesses", r, Valid::AtMostCanaries, r <= m)?;
    count("correct", v, Valid::AtMostGuesses, v <= r)
}

/// The most canaries an audit takes (the p-value costs time linear in the
/// guesses, for each of some 300 epsilons searched).
pub const MAX_CANARIES: u64 = 10_000_000;

/// The one-run audit's p-value for "training is `(epsilon, delta)`-DP" given
/// `v` correct guesses out of `r` on `m` canaries (the module docs' bound,
/// capped at 1).
///
/// # Errors
/// [`Error::InvalidParameter`] for `m` outside `1..=10^7`, `r > m`, `v > r`,
/// `epsilon` negative or not finite, `delta` outside `[0, 1]`.
pub fn one_run_p_value(m: u64, r: u64, v: u64, epsilon: f64, delta: f64) -> Result<f64> {
    check_counts(m, r, v)?;
    crate::error::ensure("epsilon", epsilon, Valid::NonNegative)?;
    crate::error::ensure("delta", delta, Valid::ClosedUnit)?;
    Ok(p_value(m, r, v, epsilon, delta))
}

fn p_value(m: u64, r: u64, v: u64, epsilon: f64, delta: f64) -> f64 {
    let lp = log_pmf(r, epsilon);
    let v = v as usize;
    let beta = log_sum_exp(&lp[v..]).exp();
    let mut tail_term = 0.0f64;
    if delta > 0.0 && v > 0 {
        // max over i of P[v - i <= Bin < v] / i, the sum grown one term at a time.
        let max = lp[..v].iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut partial = 0.0;
        for i in 1..=v {
            partial += (lp[v - i] - max).exp();
            tail_term = tail_term.max(partial / i as f64);
        }
        tail_term *= max.exp();
    }
    (beta + 2.0 * m as f64 * delta * tail_term).min(1.0)
}

/// Epsilon-hat for `v` correct guesses out of `r` on `m` canaries: the
/// largest epsilon whose hypothesis "`(epsilon, delta)`-DP" has a p-value
/// below `alpha` ([`one_run_p_value`]), 0 if none has. The p-value need
/// not be monotone in epsilon (its delta term): a scan of 256 points up to
/// where the binomial term alone reaches `alpha`, then bisection next to
/// the largest rejected point; the epsilon returned is one whose p-value
/// was computed and found below `alpha`.
///
/// # Errors
/// As [`one_run_p_value`], and for `alpha` outside `(0, 1)`.
pub fn one_run_epsilon(m: u64, r: u64, v: u64, delta: f64, alpha: f64) -> Result<f64> {
    check_counts(m, r, v)?;
    crate::error::ensure("delta", delta, Valid::ClosedUnit)?;
    crate::error::ensure("alpha", alpha, Valid::OpenUnit)?;
    Ok(epsilon_hat(m, r, v, delta, alpha).0)
}

/// `(epsilon-hat, its p-value)`.
fn epsilon_hat(m: u64, r: u64, v: u64, delta: f64, alpha: f64) -> (f64, f64) {
    let p = |eps: f64| p_value(m, r, v, eps, delta);
    let beta = |eps: f64| p_value(m, r, v, eps, 0.0);
    if v == 0 {
        return (0.0, 1.0);
    }
    // Above `hi` the binomial term alone is at least alpha: nothing is rejected.
    let mut hi = 1.0;
    while beta(hi) < alpha && hi < EPSILON_CAP {
        hi = (hi * 2.0).min(EPSILON_CAP);
    }
    let step = hi / SCAN_POINTS as f64;
    let Some(k) = (0..=SCAN_POINTS).rev().find(|&k| p(k as f64 * step) < alpha) else {
        return (0.0, p(0.0));
    };
    let (mut lo, mut up) = (k as f64 * step, (k as f64 + 1.0) * step);
    let mut p_lo = p(lo);
    if k == SCAN_POINTS {
        return (lo, p_lo);
    }
    for _ in 0..60 {
        let mid = 0.5 * (lo + up);
        let p_mid = p(mid);
        if p_mid < alpha {
            (lo, p_lo) = (mid, p_mid);
        } else {
            up = mid;
        }
        if up - lo <= 1e-9 * up {
            break;
        }
    }
    (lo, p_lo)
}

/// The guess counts tried for `m` canaries, each at most `limit`.
fn guess_counts(m: usize, limit: usize) -> Vec<usize> {
    let mut counts: Vec<usize> =
        GUESS_FRACTIONS.iter().map(|f| ((f * m as f64).round() as usize).clamp(1, limit.max(1))).collect();
    counts.dedup();
    counts
}

/// The largest count `<= k` of the sorted scores' first entries that does
/// not end inside a run of equal scores.
fn boundary_count(sorted: &[(f64, bool)], k: usize) -> usize {
    let mut c = k.min(sorted.len());
    while c > 0 && c < sorted.len() && sorted[c - 1].0 == sorted[c].0 {
        c -= 1;
    }
    c
}

/// The one-run audit of a run's canary scores (module docs): guesses on the
/// top (and with [`Guesses::TopAndBottom`] the bottom) scores, each count of
/// [`GUESS_FRACTIONS`] tested at `alpha / candidates`, the largest
/// epsilon-hat reported with the count that gave it.
///
/// # Errors
/// [`Error::InvalidParameter`] for `delta` outside `[0, 1]`, `alpha`
/// outside `(0, 1)`, or more than `10^7` canaries.
pub fn audit_one_run(scores: &CanaryScores, delta: f64, alpha: f64, guesses: Guesses) -> Result<OneRunAudit> {
    crate::error::ensure("delta", delta, Valid::ClosedUnit)?;
    crate::error::ensure("alpha", alpha, Valid::OpenUnit)?;
    let m = scores.canaries();
    check_counts(m as u64, 0, 0)?;
    // Highest first; the flag says whether the canary was included.
    let mut sorted: Vec<(f64, bool)> =
        scores.included.iter().map(|s| (*s, true)).chain(scores.excluded.iter().map(|s| (*s, false))).collect();
    sorted.sort_by(|a, b| b.0.total_cmp(&a.0));
    // Lowest first, for the bottom guesses (made once, not per guess count).
    let ascending: Vec<(f64, bool)> =
        if guesses == Guesses::TopAndBottom { sorted.iter().rev().copied().collect() } else { Vec::new() };
    let limit = match guesses {
        Guesses::Top => m,
        Guesses::TopAndBottom => m / 2,
    };
    let counts = guess_counts(m, limit);
    let level = alpha / counts.len() as f64;
    let mut best = OneRunAudit {
        epsilon: 0.0,
        p_value: 1.0,
        canaries: m,
        guesses: 0,
        correct: 0,
        candidates: counts.len(),
        alpha,
        delta,
        epsilon_fdp: 0.0,
        mu_fdp: 0.0,
        fdp_guesses: 0,
        fdp_correct: 0,
    };
    for &k in &counts {
        let top = boundary_count(&sorted, k);
        let mut correct = sorted[..top].iter().filter(|(_, included)| *included).count();
        let mut r = top;
        if guesses == Guesses::TopAndBottom {
            let bottom = boundary_count(&ascending, k).min(m - top);
            correct += ascending[..bottom].iter().filter(|(_, included)| !*included).count();
            r += bottom;
        }
        let (epsilon, p) = epsilon_hat(m as u64, r as u64, correct as u64, delta, level);
        if epsilon > best.epsilon || (best.guesses == 0 && r > 0) {
            best = OneRunAudit { epsilon, p_value: p, guesses: r, correct, ..best };
        }
        let mu = fdp::mu_hat(m, r, correct, level);
        if mu > best.mu_fdp {
            best.mu_fdp = mu;
            best.fdp_guesses = r;
            best.fdp_correct = correct;
        }
    }
    best.epsilon_fdp = fdp::gdp_epsilon(best.mu_fdp, delta);
    Ok(best)
}
