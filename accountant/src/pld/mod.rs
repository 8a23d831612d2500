//! The PLD accountant: the privacy loss distribution of every step,
//! discretized, composed by FFT, and read off as `(epsilon, delta)` with
//! proven upper and lower bounds.
//!
//! RDP bounds the privacy loss through its moments; the privacy loss
//! distribution *is* the loss, so composing it numerically gives epsilon
//! within a controlled error of the truth, typically 10-30% below RDP for
//! DP-SGD. This is the PRV accountant of Gopi, Lee & Wutschitz 2021
//! ("Numerical composition of differential privacy", NeurIPS), with its
//! error terms made explicit.
//!
//! # How the bounds are proven
//! Let `L_i` be step `i`'s privacy loss under the first distribution of its
//! dominating pair, `S = sum L_i`; the composed hockey-stick divergence is
//! `delta(eps) = E[(1 - exp(eps - S))_+]` (Dong, Roth & Su 2019; for the
//! Poisson-subsampled Gaussian, both orders of the pair are computed and the
//! larger delta is taken, Zhu, Dong & Wang 2022). The integrand is bounded by
//! 1 and increasing in `S`. Each step's loss is
//! 1. truncated to a core holding all but a measured `tau_i` (about `1e-23`);
//! 2. rounded to the grid `j h` at random, up with probability equal to the
//!    position inside the cell, so the rounding error `E_i` has conditional
//!    mean 0 and range `h`: by Azuma-Hoeffding `P(sum E_i >= t) <= exp(-2 t^2 / (n h^2))`,
//!    so `|sum E_i| <= eps_err = h sqrt(n ln(1/delta_err) / 2)` but with probability `delta_err`;
//! 3. composed by FFT on a window that a Chernoff bound proves misses at
//!    most `tau_w = 2e-20` of the probability.
//!
//! Then, with `D` the divergence of the composed grid distribution,
//! `D(eps + eps_err) - delta_err - tau_w <= delta(eps) <= D(eps - eps_err) + delta_err + sum tau_i + tau_w`,
//! and both sides are minimized/maximized over `delta_err` in a small set.
//! The upper bound is the accountant's answer; the lower bound shows how
//! tight it is.
//!
//! # Numerics not covered by the proof
//! Floating-point rounding (the FFT's, about `1e-16` of the largest mass),
//! and Simpson's rule for the rounding probabilities, whose error is far
//! below `1e-12` of a cell's mass (checked against an independent quadrature
//! of the mean in the tests). dp_accounting and Opacus neglect the same.

mod compose;
mod discretize;
mod loss;

use std::sync::{Arc, OnceLock};

use serde::Serialize;

use crate::error::{ensure, Error, Result, Valid};
use crate::event::{check_supported, Adjacency, DpEvent, NOISE_MULTIPLIER_CAP};
use compose::ComposedLoss;
use discretize::{discretize, GridLoss};
use loss::{Direction, SubsampledGaussianLoss};

/// The default bound on `epsilon - epsilon_lower`, the width of the interval
/// the true epsilon is proven to lie in (for `delta >= 1e-10`).
pub const DEFAULT_EPSILON_ERROR: f64 = 0.02;

/// The grid is sized so that the rounding term stays within the error
/// budget for any `delta_err` down to this (covering `delta >= 1e-10`).
const DELTA_ERR_REFERENCE: f64 = 1e-13;
/// The share of the requested width given to the two rounding terms; the
/// rest covers the `delta_err` shift between the bounds.
const ROUNDING_SHARE: f64 = 0.9;
/// Subsampled steps with a smaller sample rate are accounted as if they had
/// this one (conservative: epsilon does not decrease with the sample rate).
const MIN_SAMPLE_RATE: f64 = 1e-100;

/// The default bound on the work of one direction of one composition, in
/// units of one FFT butterfly (about 7 ns, measured): about thirty seconds
/// of one core, near what the grid limit allows anyway. Beyond it the
/// accountant refuses ([`Error::PldWorkTooLarge`]) before starting; callers
/// that must answer quickly (the CLI, reports) set a smaller bound with
/// [`PldAccountant::with_max_work`].
pub const MAX_WORK: f64 = 4e9;
/// The delta queries try `delta_err = 10^-k` for `k` in this range.
const DELTA_QUERY_EXPONENTS: std::ops::RangeInclusive<i32> = 2..=24;

/// The Azuma-Hoeffding shift `h sqrt(n ln(1/delta_err) / 2)`: `n` rounding
/// errors, each of conditional mean 0 within an interval of length `h`, sum
/// beyond it with probability at most `delta_err` (on either side).
fn rounding_shift(h: f64, rounded_steps: f64, delta_err: f64) -> f64 {
    h * (rounded_steps * delta_err.recip().ln() / 2.0).sqrt()
}

/// A PLD epsilon: the proven upper bound, and a proven lower bound on the
/// smallest epsilon the composition satisfies at `delta`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PldEpsilon {
    /// The upper bound: everything composed is `(epsilon, delta)`-DP.
    pub epsilon: f64,
    /// The lower bound: no smaller epsilon than this holds at `delta`.
    pub epsilon_lower: f64,
    /// The delta both hold at.
    pub delta: f64,
    /// The grid step of the discretized privacy loss.
    pub grid_step: f64,
}

/// A PLD delta: bounds on the smallest delta at `epsilon`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PldDelta {
    /// The upper bound: everything composed is `(epsilon, delta)`-DP.
    pub delta: f64,
    /// The lower bound: no smaller delta holds at `epsilon`.
    pub delta_lower: f64,
    /// The epsilon both hold at.
    pub epsilon: f64,
    /// The grid step of the discretized privacy loss.
    pub grid_step: f64,
}

/// Accumulates events and answers epsilon and delta by composing their
/// privacy loss distributions.
///
/// Events are collected by [`PldAccountant::compose`]; the distributions are
/// discretized and composed at the first query after a change (tens of
/// milliseconds for ten thousand DP-SGD steps), then queries are cheap.
/// The work of a composition is estimated before it starts (grid points
/// and FFT sizes) and refused past a bound ([`MAX_WORK`] by default,
/// [`PldAccountant::with_max_work`] to change it), so no query runs for
/// minutes: one distinct step per FFT makes thousands of distinct steps
/// (a long noise schedule) the costly case.
///
/// ```
/// use dp_accountant::{Adjacency, DpEvent, PldAccountant, RdpAccountant};
/// let event = DpEvent::poisson_sampled_gaussian(0.01, 1.0);
/// let mut pld = PldAccountant::new(Adjacency::AddOrRemoveOne);
/// pld.compose(&event, 10_000)?;
/// let bound = pld.epsilon(1e-5)?;
/// assert!(bound.epsilon_lower <= bound.epsilon && bound.epsilon - bound.epsilon_lower <= 0.02);
///
/// let mut rdp = RdpAccountant::new(Adjacency::AddOrRemoveOne);
/// rdp.compose(&event, 10_000)?;
/// assert!(bound.epsilon < rdp.epsilon(1e-5)?.epsilon);
/// # Ok::<(), dp_accountant::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct PldAccountant {
    adjacency: Adjacency,
    epsilon_error: f64,
    /// Distinct Poisson-subsampled Gaussians `(q, sigma / sensitivity)` with their counts.
    sampled: Vec<(f64, f64, u64)>,
    /// `sum count * sensitivity^2 / sigma^2` over full-batch Gaussian releases,
    /// which compose exactly into one Gaussian.
    gaussian_precision: f64,
    max_work: f64,
    composed: OnceLock<Arc<Composition>>,
}

/// Both directions composed, with what the bounds charge.
#[derive(Debug)]
struct Composition {
    h: f64,
    /// The number of rounded steps `n` in the Azuma-Hoeffding bound.
    rounded_steps: f64,
    /// Per direction: the composed grid loss and `sum count * tau_i`.
    directions: Vec<(ComposedLoss, f64)>,
    /// The work it took, in the units of [`MAX_WORK`] (both directions).
    work: f64,
}

impl PldAccountant {
    /// An empty accountant with the default error [`DEFAULT_EPSILON_ERROR`].
    pub fn new(adjacency: Adjacency) -> Self {
        Self {
            adjacency,
            epsilon_error: DEFAULT_EPSILON_ERROR,
            sampled: Vec::new(),
            gaussian_precision: 0.0,
            max_work: MAX_WORK,
            composed: OnceLock::new(),
        }
    }

    /// An empty accountant whose answers have `epsilon - epsilon_lower <= epsilon_error`
    /// (for `delta >= 1e-10`); smaller errors take a finer grid (time and
    /// memory grow as `1 / epsilon_error`).
    ///
    /// # Errors
    /// [`crate::Error::InvalidParameter`] unless `epsilon_error` is finite and > 0.
    pub fn with_epsilon_error(adjacency: Adjacency, epsilon_error: f64) -> Result<Self> {
        ensure("epsilon_error", epsilon_error, Valid::Positive)?;
        Ok(Self { epsilon_error, ..Self::new(adjacency) })
    }

    /// The same accountant, refusing any composition whose work (per
    /// direction, in the units of [`MAX_WORK`]) would exceed `max_work`.
    ///
    /// # Errors
    /// [`crate::Error::InvalidParameter`] unless `max_work` is finite and > 0.
    pub fn with_max_work(self, max_work: f64) -> Result<Self> {
        ensure("max_work", max_work, Valid::Positive)?;
        Ok(Self { max_work, composed: OnceLock::new(), ..self })
    }

    /// The adjacency every event is accounted under.
    pub fn adjacency(&self) -> Adjacency {
        self.adjacency
    }

    /// The requested bound on `epsilon - epsilon_lower`.
    pub fn epsilon_error(&self) -> f64 {
        self.epsilon_error
    }

    /// Whether `event` is valid and supported, without composing it.
    ///
    /// # Errors
    /// As [`PldAccountant::compose`].
    pub fn check(&self, event: &DpEvent) -> Result<()> {
        check_supported(event, self.adjacency)
    }

    /// Composes `event`, applied `count` times. Checks the whole event first
    /// and changes nothing on error. The same events as the RDP accountant.
    ///
    /// # Errors
    /// [`crate::Error::InvalidParameter`] for a bad parameter anywhere in the event;
    /// [`crate::Error::UnsupportedEvent`] for an event not supported under the
    /// accountant's adjacency.
    pub fn compose(&mut self, event: &DpEvent, count: u64) -> Result<()> {
        check_supported(event, self.adjacency)?;
        self.add(event, count);
        self.composed = OnceLock::new();
        Ok(())
    }

    fn add(&mut self, event: &DpEvent, count: u64) {
        if count == 0 {
            return;
        }
        let sensitivity2 = self.adjacency.squared_sensitivity();
        match event {
            DpEvent::Gaussian { noise_multiplier: s } => {
                self.gaussian_precision += count as f64 * sensitivity2 / (s * s);
            }
            DpEvent::PoissonSampled { sampling_probability: q, event } => {
                let DpEvent::Gaussian { noise_multiplier: s } = **event else {
                    return; // refused by `check_supported`
                };
                // See NOISE_MULTIPLIER_CAP: less noise can only raise epsilon.
                let s = s.min(NOISE_MULTIPLIER_CAP);
                // Likewise a larger sample rate can only raise epsilon; below
                // 1e-100 (subnormal rates included) the arithmetic only slows.
                let q = &if *q < 1.0 { q.max(MIN_SAMPLE_RATE) } else { *q };
                if *q == 1.0 {
                    self.add(event, count);
                } else if *q > 0.0 {
                    match self.sampled.iter_mut().find(|a| a.0 == *q && a.1 == s) {
                        Some(atom) => atom.2 = atom.2.saturating_add(count),
                        None => self.sampled.push((*q, s, count)),
                    }
                }
            }
            DpEvent::SelfComposed { event, count: n } => self.add(event, count.saturating_mul(*n)),
            DpEvent::Composed { events } => events.iter().for_each(|e| self.add(e, count)),
            DpEvent::ShuffledFixedSizeBatches { noise_multiplier: s, steps_per_epoch, steps } => {
                // Each started epoch is one Gaussian release on the example's batch (as RDP).
                let epochs = steps.div_ceil(*steps_per_epoch) as f64;
                self.gaussian_precision += count as f64 * epochs * sensitivity2 / (s * s);
            }
        }
    }

    /// The composition, computed at the first query after a change.
    fn composition(&self) -> Result<Arc<Composition>> {
        if let Some(c) = self.composed.get() {
            return Ok(Arc::clone(c));
        }
        let c = Arc::new(self.build()?);
        Ok(Arc::clone(self.composed.get_or_init(|| c)))
    }

    fn build(&self) -> Result<Composition> {
        // Atoms `(q, s, count)` with sensitivity 1; the Gaussians are one exact Gaussian.
        let mut atoms: Vec<(f64, f64, u64)> = self.sampled.clone();
        if self.gaussian_precision > 0.0 {
            atoms.push((1.0, 1.0 / self.gaussian_precision.sqrt(), 1));
        }
        let rounded_steps: f64 = atoms.iter().map(|a| a.2 as f64).sum();
        if atoms.is_empty() {
            return Ok(Composition { h: 0.0, rounded_steps, directions: Vec::new(), work: 0.0 });
        }
        let eps_err = 0.5 * ROUNDING_SHARE * self.epsilon_error;
        let h = eps_err / rounding_shift(1.0, rounded_steps, DELTA_ERR_REFERENCE);
        // The Gaussian is symmetric: one direction suffices without subsampling.
        let directions: &[Direction] =
            if self.sampled.is_empty() { &[Direction::Remove] } else { &[Direction::Remove, Direction::Add] };
        // Delta is asked at epsilon - eps_err, eps_err at most its value at the smallest delta_err tried.
        let smallest_delta_err = 10f64.powi(-DELTA_QUERY_EXPONENTS.end());
        let min_query = -rounding_shift(h, rounded_steps, smallest_delta_err) - h;
        let one_direction = |dir: Direction| -> Result<((ComposedLoss, f64), f64)> {
            // The discretization's work, estimated from the cores before any is done.
            let points: f64 = atoms
                .iter()
                .map(|&(q, s, _)| {
                    let (lo, hi) = SubsampledGaussianLoss::new(q, s, dir).core_range();
                    ((hi - lo) / h).abs() + 2.0
                })
                .sum();
            let work = compose::WORK_PER_POINT * points;
            if work.is_nan() || work > self.max_work {
                return Err(Error::PldWorkTooLarge { work, limit: self.max_work });
            }
            let grids: Vec<(GridLoss, u64)> = atoms
                .iter()
                .map(|&(q, s, n)| Ok((discretize(&SubsampledGaussianLoss::new(q, s, dir), h)?, n)))
                .collect::<Result<_>>()?;
            let truncated: f64 = grids.iter().map(|(g, n)| *n as f64 * g.tail).sum::<f64>().min(1.0);
            let (composed, fft_work) = compose::compose(&grids, h, min_query, self.max_work - work)?;
            Ok(((composed, truncated), work + fft_work))
        };
        // The directions are independent: one thread each.
        let out = std::thread::scope(|scope| {
            let handles: Vec<_> = directions.iter().map(|&dir| scope.spawn(move || one_direction(dir))).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                .collect::<Result<Vec<_>>>()
        })?;
        let work = out.iter().map(|(_, w)| w).sum();
        Ok(Composition { h, rounded_steps, directions: out.into_iter().map(|(d, _)| d).collect(), work })
    }

    /// The work composing took (composing first if needed), in the units of
    /// [`MAX_WORK`], both directions together: what a caller planning many
    /// compositions (a report's curve, a search) budgets with.
    ///
    /// # Errors
    /// As [`PldAccountant::epsilon`].
    pub fn work(&self) -> Result<f64> {
        Ok(self.composition()?.work)
    }

    /// Bounds on the smallest epsilon such that everything composed is
    /// `(epsilon, delta)`-DP; `epsilon` is the upper one.
    ///
    /// # Errors
    /// [`crate::Error::InvalidParameter`] unless `delta` is in `(0, 1)`;
    /// [`crate::Error::GridTooLarge`] if the requested error needs too fine a grid;
    /// [`crate::Error::PldWorkTooLarge`] if composing would take longer than [`MAX_WORK`] allows.
    pub fn epsilon(&self, delta: f64) -> Result<PldEpsilon> {
        ensure("delta", delta, Valid::OpenUnit)?;
        let c = self.composition()?;
        let (mut upper, mut lower) = (0.0f64, 0.0f64);
        for (composed, truncated) in &c.directions {
            let (mut up, mut lo) = (f64::INFINITY, 0.0f64);
            for k in 1..=8 {
                let delta_err = delta * 10f64.powi(-k);
                let eps_err = rounding_shift(c.h, c.rounded_steps, delta_err);
                let budget = delta - delta_err - truncated - composed.window_tail;
                if budget > 0.0 {
                    up = up.min(composed.epsilon(budget) + eps_err);
                }
                let reach = (delta + delta_err + composed.window_tail).min(1.0);
                lo = lo.max(composed.epsilon(reach) - eps_err);
            }
            upper = upper.max(up);
            lower = lower.max(lo);
        }
        Ok(PldEpsilon { epsilon: upper, epsilon_lower: lower.min(upper), delta, grid_step: c.h })
    }

    /// Bounds on the smallest delta such that everything composed is
    /// `(epsilon, delta)`-DP; `delta` is the upper one.
    ///
    /// # Errors
    /// [`crate::Error::InvalidParameter`] unless `epsilon` is finite and >= 0;
    /// [`crate::Error::GridTooLarge`] as [`PldAccountant::epsilon`].
    pub fn delta(&self, epsilon: f64) -> Result<PldDelta> {
        ensure("epsilon", epsilon, Valid::NonNegative)?;
        let c = self.composition()?;
        let (mut upper, mut lower) = (0.0f64, 0.0f64);
        for (composed, truncated) in &c.directions {
            let (mut up, mut lo) = (1.0f64, 0.0f64);
            for k in DELTA_QUERY_EXPONENTS {
                let delta_err = 10f64.powi(-k);
                let eps_err = rounding_shift(c.h, c.rounded_steps, delta_err);
                // (Never None: min_query covers epsilon - eps_err for epsilon >= 0.)
                if let Some(d) = composed.delta(epsilon - eps_err) {
                    up = up.min(d + delta_err + truncated + composed.window_tail);
                }
                if let Some(d) = composed.delta(epsilon + eps_err) {
                    lo = lo.max(d - delta_err - composed.window_tail);
                }
            }
            upper = upper.max(up);
            lower = lower.max(lo);
        }
        Ok(PldDelta { delta: upper, delta_lower: lower.min(upper), epsilon, grid_step: c.h })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[test]
    fn nothing_composed_is_free() {
        let acc = PldAccountant::new(Adjacency::AddOrRemoveOne);
        assert_eq!(acc.epsilon(1e-5).unwrap().epsilon, 0.0);
        assert_eq!(acc.delta(0.0).unwrap().delta, 0.0);
    }

    #[test]
    fn bad_input_is_refused_by_name() {
        let acc = PldAccountant::new(Adjacency::AddOrRemoveOne);
        for d in [0.0, 1.0, f64::NAN, -1e-5] {
            assert!(matches!(acc.epsilon(d), Err(Error::InvalidParameter { field: "delta", .. })));
        }
        assert!(matches!(acc.delta(-0.1), Err(Error::InvalidParameter { field: "epsilon", .. })));
        assert!(matches!(
            PldAccountant::with_epsilon_error(Adjacency::AddOrRemoveOne, 0.0),
            Err(Error::InvalidParameter { field: "epsilon_error", .. })
        ));
        let mut acc = acc;
        assert!(acc.compose(&DpEvent::poisson_sampled_gaussian(1.5, 1.0), 1).is_err());
        assert!(acc.sampled.is_empty(), "a refused event changes nothing");
    }
}
