//! `DpOptimizer`: DP-SGD around any Candle optimizer.
//!
//! # One step
//! [`DpOptimizer::train_step`] runs a whole logical step from a closure that
//! maps a batch of example indices to their per-example losses: it draws the
//! batch from the optimizer's own sampler, splits it into physical chunks
//! ([`DpOptimizerBuilder::max_physical_batch_size`]), clips and sums each
//! chunk's per-example gradients, adds the noise once, steps and accounts.
//! An empty Poisson batch is handled (the step still adds noise and is
//! accounted: skipping it would change the sampling the accountant assumes).
//!
//! # The stages, for those who need them
//! 1. [`DpOptimizer::next_batch`] draws the logical batch (refused, before
//!    anything is drawn, when the budget cannot pay for the step).
//! 2. [`DpOptimizer::accumulate`] (ghost engine, per-sample losses of a model
//!    built from DP layers) or [`DpOptimizer::accumulate_microbatch`] (any
//!    model, one example at a time), once per physical chunk of the batch:
//!    each example's gradient is clipped to `C` (flat or per layer) and the
//!    clipped gradients are summed.
//! 3. [`DpOptimizer::step`] once the batch's every example was accumulated:
//!    Gaussian noise `N(0, (sigma C)^2)` on each coordinate of the sum, a
//!    division by the **expected** batch size, the inner optimizer's step on
//!    the result, and the accounting.
//!    [`DpOptimizer::cancel_batch`] instead puts the batch back.
//!
//! # Mixed precision
//! A model whose variables are `bf16` or `f16` (Candle's dtypes) trains
//! with its per-example norms (upper bounds, half precision widened), clip
//! factors, clipped sums, noise and division in `f32` or wider, and the
//! inner optimizer steps an `f32` master copy of each half-precision
//! variable, which the model holds rounded once after each step (so updates
//! below half an ulp accumulate instead of rounding away). The masters are
//! taken from the variables when the optimizer is built, taken again from
//! any variable set from outside since (weights loaded later), and saved in
//! checkpoints. `tests/mixed_precision.rs` states the
//! agreement with `f32` and the clip bound.
//!
//! The inner optimizer and the sampler are built into the optimizer, so it
//! can neither be stepped around with unclipped gradients nor accounted for
//! a sampling other than the one it draws.

mod builder;
mod distributed;
mod master;
mod replay;
mod step;

use candle_core::{Tensor, Var};
use candle_nn::{Optimizer, VarMap};
use dp_accountant::{max_steps_with, AccountantKind, Ledger, MechanismRecord, NoiseGenerator, NoiseSource, Seeding};

pub use builder::DpOptimizerBuilder;
pub use step::StepSummary;

use crate::audit::{CanaryState, PlantedBug};
use crate::config::{DpConfig, Engine, PrivacyBudget};
use crate::error::{Error, Result};
use crate::grad_sample::ghost::GhostEngine;
use crate::noise::GaussianNoise;
use crate::sampler::Sampler;

/// The logical batch of the step in progress.
struct OpenBatch {
    /// The examples drawn.
    size: usize,
    /// The examples clipped and summed so far.
    accumulated: usize,
    /// Their clipped sums, per variable (`None` before the first chunk).
    sums: Option<Vec<Tensor>>,
    /// The audit's canaries drawn (their numbers, not sampler indices).
    canaries: Vec<usize>,
    /// The sampler as it was before the draw, for [`DpOptimizer::cancel_batch`].
    sampler_before: Sampler,
}

impl std::fmt::Debug for OpenBatch {
    /// The canaries drawn by count only: which were drawn is the audit's secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenBatch")
            .field("size", &self.size)
            .field("accumulated", &self.accumulated)
            .field("canaries_drawn", &self.canaries.len())
            .field("sampler_before", &self.sampler_before)
            .finish_non_exhaustive()
    }
}

/// DP-SGD around the Candle optimizer `O` (SGD, AdamW, or any implementation).
#[derive(Debug)]
pub struct DpOptimizer<O: Optimizer> {
    inner: O,
    vars: Vec<Var>,
    /// `f32` copies of the half-precision variables, which the inner
    /// optimizer steps (`None` without half-precision variables).
    masters: Option<master::Masters>,
    config: DpConfig,
    sampler: Sampler,
    noise: GaussianNoise,
    ghost: Option<GhostEngine>,
    batch: Option<OpenBatch>,
    ledger: Ledger,
    pending_steps: u64,
    steps: u64,
    max_steps: Option<u64>,
    audit: Option<CanaryState>,
    bug: Option<PlantedBug>,
    distributed: Option<distributed::Distributed>,
}

impl<O: Optimizer> DpOptimizer<O> {
    /// Starts building an optimizer over `vars` that draws its batches from
    /// `sampler` (a [`crate::PoissonSampler`] or [`crate::ShuffledSampler`]).
    ///
    /// The noise is drawn in the order of `vars`: for runs that reproduce
    /// with a fixed seed, pass them in a fixed order ([`vars_by_name`];
    /// `VarMap::all_vars` returns hash order, which changes between processes).
    pub fn builder(vars: Vec<Var>, sampler: impl Into<Sampler>) -> DpOptimizerBuilder<O> {
        DpOptimizerBuilder::new(vars, sampler.into())
    }

    /// The optimizer of a validated `dp` over `vars`, continuing `ledger`.
    ///
    /// # Errors
    /// As [`DpOptimizerBuilder::build`]; [`Error::Incompatible`] if the
    /// sampler is not the one `dp` describes.
    pub(crate) fn assemble(
        vars: Vec<Var>,
        sampler: Sampler,
        noise: GaussianNoise,
        dp: DpConfig,
        config: O::Config,
        ledger: Ledger,
    ) -> Result<Self> {
        dp.validate()?;
        if sampler.description() != dp.sampler {
            return Err(Error::Incompatible {
                setting: "the sampler",
                with: "the configuration's sampler description",
                why: "the sampling accounted must be the sampling used",
            });
        }
        check_epoch_alignment(&sampler)?;
        let ghost = match dp.engine {
            Engine::Ghost => {
                let g = GhostEngine::new(&vars)?;
                dp.clipping.validate(dp.max_grad_norm, g.num_layers()?)?;
                Some(g)
            }
            Engine::Microbatch => {
                crate::grad_sample::microbatch::check_plain(&vars)?;
                None
            }
        };
        let max_steps = dp.budget.map(|b| max_steps_within(&dp, b)).transpose()?;
        let steps = ledger.total_steps();
        let masters = master::Masters::of(&vars)?;
        let inner = O::new(masters.as_ref().map_or_else(|| vars.clone(), |m| m.vars().to_vec()), config)?;
        Ok(Self {
            inner,
            vars,
            masters,
            config: dp,
            sampler,
            noise,
            ghost,
            batch: None,
            ledger,
            pending_steps: 0,
            steps,
            max_steps,
            audit: None,
            bug: None,
            distributed: None,
        })
    }

    /// The privacy configuration (calibrated, if a target was given).
    pub fn config(&self) -> &DpConfig {
        &self.config
    }

    /// The epsilon spent so far at `delta`, by the optimizer's accountant.
    ///
    /// # Errors
    /// The accountant's, for a `delta` outside `(0, 1)`.
    pub fn epsilon(&self, delta: f64) -> Result<f64> {
        self.epsilon_after(self.pending_steps, delta)
    }

    /// Epsilon of the ledger with `pending` steps since the last flush, as
    /// the reviewer will account it.
    fn epsilon_after(&self, pending: u64, delta: f64) -> Result<f64> {
        Ok(self.ledger_with(pending)?.epsilon(self.config.accountant, delta)?)
    }

    /// The flushed ledger with `pending` steps appended as one entry.
    fn ledger_with(&self, pending: u64) -> Result<Ledger> {
        let mut ledger = self.ledger.clone();
        if pending > 0 {
            ledger.append(self.record(pending))?;
        }
        Ok(ledger)
    }

    /// Refuses, before anything is drawn or changed, a step the budget cannot pay for.
    fn check_budget(&self) -> Result<()> {
        let (Some(budget), Some(max_steps)) = (self.config.budget, self.max_steps) else { return Ok(()) };
        // Poisson steps compose exactly like one event of all the steps, so
        // the step count decides. Shuffled-batch entries round their epochs
        // up separately, so there the ledger itself is accounted.
        let exact = self.config.sampler.sample_rate().is_none();
        if self.steps >= max_steps || exact {
            let would_spend = self.epsilon_after(self.pending_steps + 1, budget.delta)?;
            if self.steps >= max_steps || would_spend > budget.epsilon {
                return Err(Error::BudgetExhausted { would_spend, budget: budget.epsilon, delta: budget.delta });
            }
        }
        Ok(())
    }

    /// The ledger as it stands, with the steps since the last flush as one entry.
    ///
    /// # Errors
    /// The ledger's, which cannot occur for records this optimizer makes.
    pub fn ledger(&self) -> Result<Ledger> {
        self.ledger_with(self.pending_steps)
    }

    /// Appends the steps since the last flush to the ledger as one entry.
    ///
    /// # Errors
    /// As [`DpOptimizer::ledger`].
    pub fn flush_ledger(&mut self) -> Result<&Ledger> {
        if self.pending_steps > 0 {
            self.ledger.append(self.record(self.pending_steps))?;
            self.pending_steps = 0;
        }
        Ok(&self.ledger)
    }

    /// Records in the ledger that the model file `file` (SHA-256
    /// `weights_sha256`, hex) was saved now, after all steps so far: the
    /// weights the privacy statement covers. [`DpOptimizer::release`] does
    /// this and writes the files.
    ///
    /// # Errors
    /// The ledger's, for a malformed hash.
    pub fn record_release(&mut self, file: &str, weights_sha256: &str) -> Result<()> {
        self.flush_ledger()?;
        self.ledger.append_release(file, weights_sha256)?;
        Ok(())
    }

    /// The one-run canary audit of the steps so far ([`crate::audit::Canaries`]);
    /// `None` without canaries. Nothing is recorded.
    ///
    /// # Errors
    /// The accountant's ([`Error::Accountant`]) for scores that are not
    /// finite (a noise scale so small that a likelihood ratio overflows).
    pub fn audit(&self) -> Result<Option<dp_accountant::audit::OneRunAudit>> {
        self.audit.as_ref().map(CanaryState::audit).transpose()
    }

    /// Runs the canary audit ([`DpOptimizer::audit`]) and records it in the
    /// ledger, after the steps so far. [`DpOptimizer::release`] does this
    /// before it records the model.
    ///
    /// # Errors
    /// As [`DpOptimizer::audit`]; the ledger's.
    pub fn record_audit(&mut self) -> Result<Option<dp_accountant::audit::OneRunAudit>> {
        let Some((audit, seeding)) = self.audit_with_seeding()? else { return Ok(None) };
        self.append_audit(&audit, seeding)?;
        Ok(Some(audit))
    }

    /// The audit, and how the canaries' inclusion was seeded.
    pub(crate) fn audit_with_seeding(&self) -> Result<Option<(dp_accountant::audit::OneRunAudit, Seeding)>> {
        self.audit.as_ref().map(|state| Ok((state.audit()?, state.seeding()))).transpose()
    }

    /// Records `audit` in the ledger after the steps so far.
    pub(crate) fn append_audit(&mut self, audit: &dp_accountant::audit::OneRunAudit, seeding: Seeding) -> Result<()> {
        self.flush_ledger()?;
        self.ledger.append_audit(audit, seeding)?;
        Ok(())
    }

    /// Whether the run has audit canaries.
    pub(crate) fn audited(&self) -> bool {
        self.audit.is_some()
    }

    /// What `steps` steps of this optimizer record in the ledger.
    pub(crate) fn record(&self, steps: u64) -> MechanismRecord {
        let sampler = self.config.sampler;
        MechanismRecord {
            event: sampler.event(self.config.noise_multiplier, steps),
            adjacency: sampler.adjacency(),
            clipping_norm: self.config.max_grad_norm,
            sampler: sampler.kind(),
            noise: NoiseSource { generator: NoiseGenerator::Chacha20, seed: self.noise.seeding() },
            sampler_seed: sampler.seeding(),
            distributed: self.distribution(),
        }
    }

    /// The noise multiplier (calibrated, if a target was given).
    pub fn noise_multiplier(&self) -> f64 {
        self.config.noise_multiplier
    }

    /// The clipping norm `C`.
    pub fn max_grad_norm(&self) -> f64 {
        self.config.max_grad_norm
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The accountant that enforces the budget and answers [`DpOptimizer::epsilon`].
    pub fn accountant(&self) -> AccountantKind {
        self.config.accountant
    }

    /// The most steps the budget allows, if one is enforced.
    pub fn max_steps(&self) -> Option<u64> {
        self.max_steps
    }

    /// The sampler the batches are drawn from.
    pub fn sampler(&self) -> &Sampler {
        &self.sampler
    }

    /// The inner optimizer's learning rate.
    pub fn learning_rate(&self) -> f64 {
        self.inner.learning_rate()
    }

    /// Sets the inner optimizer's learning rate (privacy is unaffected).
    pub fn set_learning_rate(&mut self, lr: f64) {
        self.inner.set_learning_rate(lr)
    }

    /// The trained variables.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The names in `varmap` of the trained variables, in the optimizer's
    /// order (found by identity, not by shape).
    ///
    /// # Errors
    /// [`Error::UnknownVariable`] for a trained variable not in `varmap`.
    pub fn variable_names(&self, varmap: &VarMap) -> Result<Vec<String>> {
        names_in(varmap, &self.vars)
    }

    /// Whether a batch is drawn and not yet stepped on.
    pub(crate) fn batch_open(&self) -> bool {
        self.batch.is_some()
    }

    /// The inner optimizer, for its state.
    pub(crate) fn inner(&self) -> &O {
        &self.inner
    }

    /// The inner optimizer, to restore its state.
    pub(crate) fn inner_mut(&mut self) -> &mut O {
        &mut self.inner
    }

    /// The f32 masters of the half-precision variables, by index (none
    /// without half-precision variables), for checkpoints.
    ///
    /// # Errors
    /// Candle's.
    pub(crate) fn master_weights(&self) -> Result<Vec<(usize, Tensor)>> {
        self.follow_masters()?;
        Ok(self.masters.as_ref().map_or_else(Vec::new, |m| m.saved(&self.vars)))
    }

    /// Takes the half-precision variables set from outside since the last
    /// step as their masters ([`master::Masters::follow`]).
    ///
    /// # Errors
    /// Candle's.
    pub(crate) fn follow_masters(&self) -> Result<()> {
        self.masters.as_ref().map_or(Ok(()), |m| m.follow(&self.vars))
    }

    /// Sets the masters: from `saved` where given, from the variables'
    /// values otherwise (a checkpoint saved without them).
    ///
    /// # Errors
    /// Candle's.
    pub(crate) fn restore_masters(&mut self, saved: &std::collections::BTreeMap<usize, Tensor>) -> Result<()> {
        let Some(masters) = &self.masters else { return Ok(()) };
        for (index, var) in self.vars.iter().enumerate() {
            masters.restore(&self.vars, index, saved.get(&index).unwrap_or(var.as_tensor()))?;
        }
        Ok(())
    }

    /// The noise generator, for its state.
    pub(crate) fn noise(&self) -> &GaussianNoise {
        &self.noise
    }
}

/// The variables of `varmap` in name order.
///
/// The optimizer draws its noise in the order of its variables, and
/// `VarMap::all_vars` returns them in hash order, which changes from one
/// process to the next: pass this to the builder for a seeded run to
/// reproduce.
pub fn vars_by_name(varmap: &VarMap) -> Vec<Var> {
    let data = varmap.data().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    names.into_iter().map(|n| data[n].clone()).collect()
}

/// A shuffled sampler must start at an epoch boundary: the accounting of
/// shuffled batches counts each ledger entry's epochs from its first step,
/// so a sampler handed over mid-epoch could show an example twice in one
/// accounted epoch. (A resumed one starts a new epoch.)
fn check_epoch_alignment(sampler: &Sampler) -> Result<()> {
    match sampler {
        Sampler::Shuffled(s) if s.batches_into_epoch() != 0 => Err(Error::Incompatible {
            setting: "a shuffled sampler in the middle of an epoch",
            with: "a new run",
            why: "its epochs are accounted from the run's first step, so it must start at an epoch boundary (a \
                  new sampler, or one that drew whole epochs only)",
        }),
        _ => Ok(()),
    }
}

/// The names in `varmap` of `vars`, by identity.
pub(crate) fn names_in(varmap: &VarMap, vars: &[Var]) -> Result<Vec<String>> {
    let data = varmap.data().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let by_id: std::collections::HashMap<_, _> = data.iter().map(|(n, v)| (v.as_tensor().id(), n)).collect();
    vars.iter()
        .enumerate()
        .map(|(index, v)| {
            by_id
                .get(&v.as_tensor().id())
                .map(|n| n.to_string())
                .ok_or_else(|| Error::UnknownVariable { index, shape: v.dims().to_vec() })
        })
        .collect()
}

/// The largest number of steps of `dp` that stays within `budget`.
fn max_steps_within(dp: &DpConfig, budget: PrivacyBudget) -> Result<u64> {
    let (sampler, sigma, accountant) = (dp.sampler, dp.noise_multiplier, dp.accountant);
    let calibration = max_steps_with(budget.epsilon, |n| {
        accountant.epsilon(sampler.adjacency(), [&sampler.event(sigma, n)], budget.delta)
    });
    match calibration {
        Ok(c) => Ok(c.steps),
        // More than 2^40 steps fit: no practical limit.
        Err(dp_accountant::Error::Calibration { .. }) => Ok(u64::MAX),
        Err(e) => Err(e.into()),
    }
}
