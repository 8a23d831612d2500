//! Calibration: the noise a training plan needs, and the steps a budget allows.

use serde::Serialize;

use crate::accountant::{Epsilon, PrivacyAccountant};
use crate::conversion::EpsilonBound;
use crate::error::{ensure, Error, Result, Valid};
use crate::event::DpEvent;
use crate::pld::PldEpsilon;

/// An accountant's answer whose `epsilon` is an upper bound: what
/// calibration compares with the target.
pub trait EpsilonAnswer {
    /// The epsilon the guarantee states (an upper bound on the truth).
    fn epsilon_upper(&self) -> f64;
}

impl EpsilonAnswer for EpsilonBound {
    fn epsilon_upper(&self) -> f64 {
        self.epsilon
    }
}

impl EpsilonAnswer for PldEpsilon {
    fn epsilon_upper(&self) -> f64 {
        self.epsilon
    }
}

impl EpsilonAnswer for Epsilon {
    fn epsilon_upper(&self) -> f64 {
        self.epsilon
    }
}

/// A bare upper bound (as [`crate::AccountantKind::epsilon`] returns).
impl EpsilonAnswer for f64 {
    fn epsilon_upper(&self) -> f64 {
        *self
    }
}

/// Calibration stops once epsilon is within this fraction below the target
/// (the contract is `0.999 target <= epsilon <= target`; this is tighter).
const CALIBRATION_REL_TOL: f64 = 1e-4;
/// The noise multipliers searched.
const MIN_NOISE_MULTIPLIER: f64 = 1e-3;
const MAX_NOISE_MULTIPLIER: f64 = 1e6;
/// The largest step count [`max_steps`] reports.
const MAX_STEPS: u64 = 1 << 40;

/// A calibrated noise multiplier and the epsilon it gives (the accountant's
/// answer: an [`Epsilon`] from [`calibrate_noise_multiplier`], whatever the
/// closure returns from [`calibrate_with`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NoiseCalibration<B = Epsilon> {
    /// The smallest noise multiplier found whose epsilon meets the target.
    pub noise_multiplier: f64,
    /// The epsilon at that noise multiplier (never above the target).
    pub epsilon: B,
}

/// A step budget and the epsilon it spends.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepsCalibration<B = Epsilon> {
    /// The largest number of steps whose epsilon meets the target (0 if even
    /// one step exceeds it).
    pub steps: u64,
    /// The epsilon after that many steps.
    pub epsilon: B,
}

/// The smallest noise multiplier with which `steps` more steps of DP-SGD
/// with Poisson sampling at rate `sample_rate` keep `accountant` within
/// `(target_epsilon, delta)`, by that accountant's bound.
///
/// Each candidate is composed into a copy of `accountant`, on top of what it
/// holds: a fresh accountant (`AccountantKind::new_accountant`,
/// [`crate::RdpAccountant::new`], a configured [`crate::PldAccountant`])
/// calibrates a whole run, one that holds the steps already taken calibrates
/// the rest. The adjacency is the accountant's.
///
/// # Numerics
/// Bracketing by doubling, then regula falsi (Illinois) in `ln sigma`. The
/// returned multiplier is always one whose epsilon was computed and found
/// `<= target_epsilon` (the conservative end of the bracket), and it is
/// returned once that epsilon is within `1e-4` of the target, so
/// `0.999 * target <= epsilon <= target`.
///
/// # Errors
/// [`Error::InvalidParameter`] for a parameter out of range
/// (`target_epsilon > 0`, `delta` in `(0, 1)`, `sample_rate` in `(0, 1]`,
/// `steps >= 1`); [`Error::Calibration`] if no multiplier in
/// `[1e-3, 1e6]` meets the target that closely; the accountant's errors
/// (an event unsupported under its adjacency; PLD: a grid or work too large).
pub fn calibrate_noise_multiplier(
    accountant: &dyn PrivacyAccountant,
    target_epsilon: f64,
    delta: f64,
    sample_rate: f64,
    steps: u64,
) -> Result<NoiseCalibration> {
    ensure("target_epsilon", target_epsilon, Valid::Positive)?;
    ensure("delta", delta, Valid::OpenUnit)?;
    ensure("sample_rate", sample_rate, Valid::HalfOpenUnit)?;
    ensure("steps", steps as f64, Valid::AtLeastOne)?;
    calibrate_with(target_epsilon, |sigma| {
        let mut acc = accountant.boxed_clone();
        acc.compose(&DpEvent::poisson_sampled_gaussian(sample_rate, sigma), steps)?;
        acc.epsilon_at(delta)
    })
}

/// The smallest noise multiplier `sigma` for which `epsilon_of(sigma)` meets
/// `target`, for any epsilon that does not increase with `sigma`.
///
/// # Errors
/// As [`calibrate_noise_multiplier`], and whatever `epsilon_of` returns.
pub fn calibrate_with<B: EpsilonAnswer>(
    target: f64,
    epsilon_of: impl Fn(f64) -> Result<B>,
) -> Result<NoiseCalibration<B>> {
    ensure("target_epsilon", target, Valid::Positive)?;
    // Bracket: `lo` misses the target, `hi` meets it.
    let mut hi = 1.0;
    let mut e_hi = epsilon_of(hi)?;
    let mut lo = hi;
    let mut e_lo = e_hi.epsilon_upper();
    while e_hi.epsilon_upper() > target {
        (lo, e_lo) = (hi, e_hi.epsilon_upper());
        hi *= 2.0;
        if hi > MAX_NOISE_MULTIPLIER {
            return Err(Error::Calibration {
                reason: format!(
                    "no noise multiplier up to {MAX_NOISE_MULTIPLIER:e} reaches epsilon {}",
                    crate::report::fmt_num(target)
                ),
            });
        }
        e_hi = epsilon_of(hi)?;
    }
    while e_lo <= target {
        if e_lo >= (1.0 - CALIBRATION_REL_TOL) * target {
            return Ok(NoiseCalibration { noise_multiplier: lo, epsilon: epsilon_of(lo)? });
        }
        lo /= 2.0;
        if lo < MIN_NOISE_MULTIPLIER {
            return Err(Error::Calibration {
                reason: format!(
                    "epsilon {} is met even at noise multiplier {MIN_NOISE_MULTIPLIER:e}: the target is too \
                     loose to calibrate against",
                    crate::report::fmt_num(target)
                ),
            });
        }
        let e = epsilon_of(lo)?;
        e_lo = e.epsilon_upper();
        if e.epsilon_upper() <= target {
            (hi, e_hi) = (lo, e);
        }
    }
    // Illinois regula falsi on g(ln sigma) = epsilon - target.
    let (mut x_lo, mut x_hi) = (lo.ln(), hi.ln());
    let (mut g_lo, mut g_hi) = (e_lo - target, e_hi.epsilon_upper() - target);
    let mut side = 0i8;
    for _ in 0..100 {
        if e_hi.epsilon_upper() >= (1.0 - CALIBRATION_REL_TOL) * target || x_hi - x_lo < 1e-13 {
            break;
        }
        let x = if g_lo.is_finite() { (x_lo * g_hi - x_hi * g_lo) / (g_hi - g_lo) } else { 0.5 * (x_lo + x_hi) };
        let x = x.clamp(x_lo + 0.01 * (x_hi - x_lo), x_hi - 0.01 * (x_hi - x_lo));
        let e = epsilon_of(x.exp())?;
        let g = e.epsilon_upper() - target;
        if g <= 0.0 {
            (x_hi, g_hi, e_hi) = (x, g, e);
            if side == 1 {
                g_lo *= 0.5;
            }
            side = 1;
        } else {
            (x_lo, g_lo) = (x, g);
            if side == -1 {
                g_hi *= 0.5;
            }
            side = -1;
        }
    }
    if e_hi.epsilon_upper() < 0.999 * target {
        return Err(Error::Calibration {
            reason: format!(
                "target epsilon {} cannot be met to within 0.1%: the accountant's epsilon falls from above {} \
                 to {} between two noise multipliers that differ by less than 1e-13 (relative), so no noise \
                 multiplier gives an epsilon just below the target; very small targets hit this first (an RDP \
                 bound cannot go below its conversion's floor). Aim for a larger target epsilon",
                crate::report::fmt_num(target),
                crate::report::fmt_num(target),
                crate::report::fmt_num(e_hi.epsilon_upper())
            ),
        });
    }
    Ok(NoiseCalibration { noise_multiplier: x_hi.exp(), epsilon: e_hi })
}

/// The largest number of further DP-SGD steps (Poisson rate `sample_rate`,
/// noise multiplier `noise_multiplier`) that keeps `accountant` within
/// `(target_epsilon, delta)`, by that accountant's bound; composed, as in
/// [`calibrate_noise_multiplier`], into copies of `accountant`.
///
/// # Numerics
/// Doubling then bisection over the step count: the answer `n` has
/// `epsilon(n) <= target < epsilon(n + 1)`. One step is composed up front
/// and each count `n` is that copy plus `n - 1` more, so an accountant that
/// keeps per-step work in its copies (RDP's series) does it once for the
/// whole search.
///
/// # Errors
/// [`Error::InvalidParameter`] for a parameter out of range;
/// [`Error::Calibration`] if more than `2^40` steps fit; the accountant's
/// errors.
pub fn max_steps(
    accountant: &dyn PrivacyAccountant,
    target_epsilon: f64,
    delta: f64,
    sample_rate: f64,
    noise_multiplier: f64,
) -> Result<StepsCalibration> {
    ensure("delta", delta, Valid::OpenUnit)?;
    ensure("sample_rate", sample_rate, Valid::HalfOpenUnit)?;
    ensure("noise_multiplier", noise_multiplier, Valid::Positive)?;
    let step = DpEvent::poisson_sampled_gaussian(sample_rate, noise_multiplier);
    let mut one_step = accountant.boxed_clone();
    one_step.compose(&step, 1)?;
    max_steps_with(target_epsilon, |n| {
        let mut acc = if n == 0 { accountant.boxed_clone() } else { one_step.boxed_clone() };
        acc.compose(&step, n.saturating_sub(1))?;
        acc.epsilon_at(delta)
    })
}

/// The largest `n` with `epsilon_of(n) <= target_epsilon`, for any epsilon
/// that does not decrease with the number of steps (`n = 0` gives epsilon 0).
///
/// # Numerics
/// Doubling, then bisection: `epsilon_of(n) <= target < epsilon_of(n + 1)`.
///
/// # Errors
/// [`Error::InvalidParameter`] unless `target_epsilon > 0`;
/// [`Error::Calibration`] if more than `2^40` steps fit; `epsilon_of`'s.
pub fn max_steps_with<B: EpsilonAnswer>(
    target_epsilon: f64,
    epsilon_of: impl Fn(u64) -> Result<B>,
) -> Result<StepsCalibration<B>> {
    ensure("target_epsilon", target_epsilon, Valid::Positive)?;
    let first = epsilon_of(1)?;
    if first.epsilon_upper() > target_epsilon {
        return Ok(StepsCalibration { steps: 0, epsilon: epsilon_of(0)? });
    }
    // Invariant: epsilon_of(lo) <= target < epsilon_of(hi).
    let (mut lo, mut e_lo) = (1u64, first);
    let mut hi = 2u64;
    loop {
        let e = epsilon_of(hi)?;
        if e.epsilon_upper() > target_epsilon {
            break;
        }
        (lo, e_lo) = (hi, e);
        if hi >= MAX_STEPS {
            return Err(Error::Calibration {
                reason: format!("more than {MAX_STEPS} steps fit in epsilon {target_epsilon}"),
            });
        }
        hi *= 2;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        let e = epsilon_of(mid)?;
        if e.epsilon_upper() <= target_epsilon {
            (lo, e_lo) = (mid, e);
        } else {
            hi = mid;
        }
    }
    Ok(StepsCalibration { steps: lo, epsilon: e_lo })
}
