//! White-box gradient canaries for the one-run audit.
//!
//! Canary `k` is an example whose gradient is `gradient_norm * C` on
//! coordinate `k` of an audit block, a vector of `m` coordinates that the
//! model never reads. It is handed through the optimizer's clip factor (the
//! one real examples get) and its noise (the same generator, the same
//! scale). Its gradient is not computed by the ghost kernels or the
//! per-example norms: the canaries audit the clip threshold, the noise scale
//! and the accounting; the replay check ([`super::replay_check`]) audits the
//! clipping of real gradients layer by layer.
//! Its threshold is the whole `C` in either clipping mode: a canary is one
//! example, and its gradient lies in a block of its own.

use dp_accountant::audit::{audit_one_run, CanaryScores, Guesses, OneRunAudit, MAX_CANARIES};
use dp_accountant::Seeding;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::clip::{clip_factor, CLIP_MARGIN};
use crate::error::{ensure, Error, Result};
use crate::noise::os_rng;

/// The settings of a one-run canary audit ([`crate::DpOptimizerBuilder::audit`]).
///
/// `m` canaries, each included in the training set with probability 1/2 by
/// a ChaCha20 generator (seeded from the OS unless [`Canaries::seeded`]),
/// then Poisson-sampled like every example. After training, each canary is
/// scored from the privatized sums alone (the log-likelihood ratio of "in"
/// against "out" of its audit coordinate under the claimed mechanism) and
/// the scores go to [`dp_accountant::audit::audit_one_run`]: epsilon-hat, a
/// lower bound on the epsilon of the run at confidence `1 - alpha`
/// (Steinke, Nasr & Jagielski 2023), and its f-DP version (Mahloujifar,
/// Melis & Chaudhuri 2025).
///
/// A correct run has epsilon-hat <= epsilon except with probability about
/// `alpha`; a run that leaks more than it claims (too little noise, no
/// clipping) shows epsilon-hat above epsilon when the leak exceeds what `m`
/// canaries can resolve (with `m` canaries epsilon-hat can reach about
/// `ln(m / (2 ln(7 / alpha)))` at most).
#[derive(Clone, PartialEq)]
pub struct Canaries {
    count: usize,
    gradient_norm: f64,
    alpha: f64,
    delta: Option<f64>,
    guesses: Guesses,
    seed: Option<u64>,
}

impl std::fmt::Debug for Canaries {
    /// Everything but the seed (which would reveal every canary's inclusion).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Canaries")
            .field("count", &self.count)
            .field("gradient_norm", &self.gradient_norm)
            .field("alpha", &self.alpha)
            .field("delta", &self.delta)
            .field("guesses", &self.guesses)
            .field("seeded", &self.seed.is_some())
            .finish()
    }
}

impl Canaries {
    /// `count` canaries, with the defaults: gradient norm `10 C`, alpha
    /// 0.05, the delta of the run's budget, guesses on both ends of the
    /// scores, the inclusion generator seeded from the OS.
    pub fn new(count: usize) -> Self {
        Self { count, gradient_norm: 10.0, alpha: 0.05, delta: None, guesses: Guesses::TopAndBottom, seed: None }
    }

    /// Each canary's gradient norm, in units of `C` (> 1, so that clipping
    /// must act on it: a run that does not clip shows it).
    pub fn gradient_norm(mut self, times_max_grad_norm: f64) -> Self {
        self.gradient_norm = times_max_grad_norm;
        self
    }

    /// The significance of the audit (default 0.05).
    pub fn alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }

    /// The delta at which epsilon-hat is stated (default: the budget's).
    pub fn delta(mut self, delta: f64) -> Self {
        self.delta = Some(delta);
        self
    }

    /// Guess "in" on the highest scores only (default: also "out" on the lowest).
    pub fn one_sided(mut self) -> Self {
        self.guesses = Guesses::Top;
        self
    }

    /// Chooses the canaries' inclusion with ChaCha20 keyed by `seed`
    /// (reproducible; the ledger records a fixed seed). Whoever knows it
    /// knows which canaries are in: keep it from anyone the audit tests.
    pub fn seeded(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The number of canaries, `m`.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Checks the settings; `budget_delta` is the run's.
    fn validated_delta(&self, budget_delta: Option<f64>) -> Result<f64> {
        // Checked before the inclusion bits are allocated, at the accountant's
        // limit: a count the audit would refuse after training is refused now.
        ensure(
            "audit canaries",
            self.count as f64,
            "an integer in [1, 10^7]",
            self.count >= 1 && self.count as u64 <= MAX_CANARIES,
        )?;
        ensure(
            "audit gradient_norm (in units of max_grad_norm)",
            self.gradient_norm,
            "finite and > 1",
            self.gradient_norm > 1.0 && self.gradient_norm.is_finite(),
        )?;
        ensure("audit alpha", self.alpha, "in (0, 1)", self.alpha > 0.0 && self.alpha < 1.0)?;
        let delta = self.delta.or(budget_delta).ok_or(Error::MissingSetting {
            setting: "the audit's delta",
            how: "set a budget on the builder, or call delta(..) on the Canaries",
        })?;
        ensure("audit delta", delta, "in [0, 1)", (0.0..1.0).contains(&delta))
    }
}

/// The canaries of a run: who is in, and the scores so far.
#[derive(Clone)]
pub(crate) struct CanaryState {
    settings: Canaries,
    delta: f64,
    /// The sampler's index of canary 0 (the dataset size `N`).
    first_slot: usize,
    included: Vec<bool>,
    scores: Vec<f64>,
    seeding: Seeding,
}

impl std::fmt::Debug for CanaryState {
    /// Counts, not the inclusion bits (the auditor's secret) or the scores.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CanaryState")
            .field("settings", &self.settings)
            .field("delta", &self.delta)
            .field("first_slot", &self.first_slot)
            .field("canaries", &self.included.len())
            .field("seeding", &self.seeding)
            .finish_non_exhaustive()
    }
}

impl CanaryState {
    /// Draws the canaries' inclusion; canary `k` is the sampler's example `first_slot + k`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming a bad setting; [`Error::MissingSetting`]
    /// without a delta; [`Error::Entropy`].
    pub(crate) fn new(settings: Canaries, first_slot: usize, budget_delta: Option<f64>) -> Result<Self> {
        let delta = settings.validated_delta(budget_delta)?;
        let (mut rng, seeding) = match settings.seed {
            Some(s) => (ChaCha20Rng::seed_from_u64(s), Seeding::Fixed),
            None => (os_rng()?, Seeding::OsEntropy),
        };
        let included = (0..settings.count).map(|_| rng.next_u32() & 1 == 1).collect();
        let scores = vec![0.0; settings.count];
        Ok(Self { settings, delta, first_slot, included, scores, seeding })
    }

    /// The number of canaries.
    pub(crate) fn count(&self) -> usize {
        self.settings.count
    }

    /// How the inclusion generator was seeded.
    pub(crate) fn seeding(&self) -> Seeding {
        self.seeding
    }

    /// Splits a drawn batch into the real examples (in order) and the canaries drawn.
    pub(crate) fn split(&self, batch: Vec<usize>) -> (Vec<usize>, Vec<usize>) {
        let (real, slots): (Vec<usize>, Vec<usize>) = batch.into_iter().partition(|&i| i < self.first_slot);
        (real, slots.into_iter().map(|i| i - self.first_slot).collect())
    }

    /// The audit block's clipped sum for the canaries `drawn`: each one
    /// included contributes its gradient, of norm `gradient_norm * C` on its
    /// own coordinate, times the clip factor at `clip_threshold` (`C` in a
    /// correct run), in `f32` like the model's sums.
    pub(crate) fn clipped_sum(&self, drawn: &[usize], clip_threshold: f64, max_grad_norm: f64) -> Vec<f32> {
        let norm = self.settings.gradient_norm * max_grad_norm;
        let contribution = (clip_factor(norm, clip_threshold) * norm) as f32;
        let mut sum = vec![0f32; self.count()];
        for &k in drawn {
            if self.included[k] {
                sum[k] += contribution;
            }
        }
        sum
    }

    /// Adds one step to every canary's score: the log-likelihood ratio of
    /// its privatized coordinate `x` (on the scale of the sum) under "in"
    /// against "out" of the claimed mechanism, whose "in" adds `c = C (1 -
    /// margin)` with probability `sample_rate` under noise of standard
    /// deviation `std`: `ln(1 - q + q exp((x c - c^2 / 2) / std^2))`.
    /// The scores use nothing but the released values, so they are
    /// post-processing of the mechanism's output.
    pub(crate) fn score(&mut self, noisy: &[f32], sample_rate: f64, max_grad_norm: f64, std: f64) {
        let c = max_grad_norm * (1.0 - CLIP_MARGIN);
        let (ln_q, ln_not_q) = (sample_rate.ln(), (-sample_rate).ln_1p());
        for (score, &x) in self.scores.iter_mut().zip(noisy) {
            let z = (f64::from(x) * c - c * c / 2.0) / (std * std);
            *score += log_add_exp(ln_not_q, ln_q + z);
        }
    }

    /// The one-run audit of the scores so far.
    ///
    /// # Errors
    /// The accountant's ([`Error::Accountant`]): none for valid settings
    /// and finite scores.
    pub(crate) fn audit(&self) -> Result<OneRunAudit> {
        let (mut inside, mut outside) = (Vec::new(), Vec::new());
        for (&s, &i) in self.scores.iter().zip(&self.included) {
            if i {
                inside.push(s)
            } else {
                outside.push(s)
            }
        }
        let scores = CanaryScores::new(inside, outside)?;
        Ok(audit_one_run(&scores, self.delta, self.settings.alpha, self.settings.guesses)?)
    }
}

/// `ln(e^a + e^b)`, exact at `-inf`.
fn log_add_exp(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        hi
    } else {
        hi + (lo - hi).exp().ln_1p()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_are_included_and_slots_split() {
        let s = CanaryState::new(Canaries::new(4000).seeded(3), 10, Some(1e-5)).unwrap();
        let inside = s.included.iter().filter(|&&i| i).count();
        // Bin(4000, 1/2): standard deviation 31.6; 5 of them.
        assert!((inside as f64 - 2000.0).abs() < 5.0 * 31.7, "{inside}");
        let (real, canaries) = s.split(vec![0, 3, 9, 10, 12, 4009]);
        assert_eq!(real, vec![0, 3, 9]);
        assert_eq!(canaries, vec![0, 2, 3999]);
    }

    #[test]
    fn only_included_canaries_contribute_clipped() {
        let s = CanaryState::new(Canaries::new(64).seeded(5), 0, Some(1e-5)).unwrap();
        let all: Vec<usize> = (0..64).collect();
        let sum = s.clipped_sum(&all, 2.0, 2.0);
        for (k, v) in sum.iter().enumerate() {
            let want = if s.included[k] { (2.0 * (1.0 - CLIP_MARGIN)) as f32 } else { 0.0 };
            assert_eq!(*v, want);
        }
        // Unclipped (a threshold far above the norm): the full 10 C.
        let sum = s.clipped_sum(&all, f64::MAX, 2.0);
        assert!(sum.iter().zip(&s.included).all(|(v, &i)| *v == if i { 20.0 } else { 0.0 }));
    }

    #[test]
    fn score_is_the_likelihood_ratio() {
        let mut s = CanaryState::new(Canaries::new(2).seeded(1), 0, Some(1e-5)).unwrap();
        s.score(&[1.5, -0.5], 0.25, 1.0, 2.0);
        let c = 1.0 - CLIP_MARGIN;
        for (score, x) in s.scores.iter().zip([1.5f64, -0.5]) {
            let want = (0.75 + 0.25 * ((x * c - c * c / 2.0) / 4.0).exp()).ln();
            assert!((score - want).abs() < 1e-15, "{score} {want}");
        }
        // Full batches: the Gaussian log-likelihood ratio itself.
        let mut s = CanaryState::new(Canaries::new(1).seeded(1), 0, Some(1e-5)).unwrap();
        s.score(&[3.0], 1.0, 1.0, 1.0);
        assert!((s.scores[0] - (3.0 * c - c * c / 2.0)).abs() < 1e-15);
    }

    #[test]
    fn bad_settings_name_the_field() {
        let bad = [
            (Canaries::new(0), "audit canaries"),
            (Canaries::new(10_000_001), "audit canaries"),
            (Canaries::new(usize::MAX), "audit canaries"),
            (Canaries::new(5).gradient_norm(1.0), "audit gradient_norm (in units of max_grad_norm)"),
            (Canaries::new(5).gradient_norm(f64::NAN), "audit gradient_norm (in units of max_grad_norm)"),
            (Canaries::new(5).alpha(0.0), "audit alpha"),
            (Canaries::new(5).alpha(1.0), "audit alpha"),
            (Canaries::new(5).delta(1.0), "audit delta"),
            (Canaries::new(5).delta(-1e-9), "audit delta"),
        ];
        for (c, name) in bad {
            match CanaryState::new(c, 0, Some(1e-5)) {
                Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert!(matches!(CanaryState::new(Canaries::new(5), 0, None), Err(Error::MissingSetting { .. })));
    }
}
