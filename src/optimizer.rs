//! `DpOptimizer`: DP-SGD around any Candle optimizer.
//!
//! # One step, in stages
//! 1. **Accumulate** each physical batch of a logical batch:
//!    [`DpOptimizer::accumulate`] (ghost engine, per-sample losses of a model
//!    built from DP layers) or [`DpOptimizer::accumulate_microbatch`] (any
//!    model, one example at a time); [`DpOptimizer::accumulate_empty`] for an
//!    empty Poisson batch. Each example's gradient is clipped to `C` (flat or
//!    per layer) and the clipped gradients are summed.
//! 2. **Step** once per logical batch ([`DpOptimizer::step`]): check the
//!    budget (refuse before touching anything), add Gaussian noise
//!    `N(0, (sigma C)^2)` to each coordinate of the sum once, divide by the
//!    **expected** batch size, hand the result to the inner optimizer as its
//!    gradients, and account the step.
//!
//! The inner optimizer is built and owned here, so it cannot be stepped
//! around with unclipped gradients.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::{Optimizer, VarMap};
use dp_accountant::{
    calibrate_with, max_steps_with, AccountantKind, Ledger, LedgerHeader, MechanismRecord, NoiseGenerator, NoiseSource,
    PrivacyTarget,
};

use crate::clip::{check_max_grad_norm, ClipMode};
use crate::error::{ensure, Error, Result};
use crate::grad_sample::ghost::{ClippedBatch, GhostEngine};
use crate::grad_sample::microbatch::clip_microbatch;
use crate::loss::PerSampleLoss;
use crate::noise::GaussianNoise;
use crate::sampler::SamplerDescription;

/// A privacy budget: the run must stay `(epsilon, delta)`-DP.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrivacyBudget {
    /// The largest epsilon the run may spend (> 0).
    pub epsilon: f64,
    /// At this delta, in `(0, 1)`.
    pub delta: f64,
}

/// Which engine computes the per-example gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// Ghost clipping over DP layers (default): every trainable variable must
    /// belong to a DP layer.
    #[default]
    Ghost,
    /// One example at a time, any model.
    Microbatch,
}

/// How the noise multiplier is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
enum NoisePlan {
    Fixed(f64),
    Calibrated { budget: PrivacyBudget, planned_steps: u64 },
}

/// Builds a [`DpOptimizer`]; every value is checked in [`DpOptimizerBuilder::build`].
#[derive(Debug, Clone)]
pub struct DpOptimizerBuilder<O: Optimizer> {
    inner: std::marker::PhantomData<fn() -> O>,
    vars: Vec<Var>,
    sampler: SamplerDescription,
    noise_plan: Option<NoisePlan>,
    budget: Option<PrivacyBudget>,
    max_grad_norm: f64,
    clipping: ClipMode,
    engine: Engine,
    noise: Option<GaussianNoise>,
    description: Option<String>,
    accountant: AccountantKind,
}

impl<O: Optimizer> DpOptimizerBuilder<O> {
    /// Noise of standard deviation `noise_multiplier * max_grad_norm` on
    /// each coordinate of the clipped sum. Any finite value > 0 is accepted
    /// (a small one buys little privacy: the epsilon says how little).
    pub fn noise_multiplier(mut self, noise_multiplier: f64) -> Self {
        self.noise_plan = Some(NoisePlan::Fixed(noise_multiplier));
        self
    }

    /// The smallest noise that keeps `planned_steps` steps within `budget`
    /// (calibrated by the [`DpOptimizerBuilder::accountant`]), and the budget
    /// enforced.
    pub fn target(mut self, budget: PrivacyBudget, planned_steps: u64) -> Self {
        self.noise_plan = Some(NoisePlan::Calibrated { budget, planned_steps });
        self.budget = Some(budget);
        self
    }

    /// Enforces `budget`: a step that would exceed it is refused.
    pub fn budget(mut self, budget: PrivacyBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// The clipping norm `C` (default 1), in the units of the gradient: the
    /// L2 norm of one example's whole gradient (all variables together).
    ///
    /// Each example is clipped to `C (1 - 1e-4)`, not `C`: the norms are
    /// computed in the model's precision, and the margin keeps every
    /// example's true contribution within `C`, the sensitivity the noise is
    /// calibrated to (an `f32` sum of `n` squares can be off by about
    /// `n 2^-24` relative). It costs 0.01% of the signal.
    pub fn max_grad_norm(mut self, max_grad_norm: f64) -> Self {
        self.max_grad_norm = max_grad_norm;
        self
    }

    /// Flat (default) or per-layer clipping.
    pub fn clipping(mut self, clipping: ClipMode) -> Self {
        self.clipping = clipping;
        self
    }

    /// The per-example gradient engine (default: ghost).
    pub fn engine(mut self, engine: Engine) -> Self {
        self.engine = engine;
        self
    }

    /// The noise generator (default: ChaCha20 seeded from the OS, filling
    /// large buffers on all available cores).
    pub fn noise(mut self, noise: GaussianNoise) -> Self {
        self.noise = Some(noise);
        self
    }

    /// The accountant that calibrates the noise, enforces the budget and
    /// answers [`DpOptimizer::epsilon`] (default RDP). PLD is tighter, so a
    /// target is met with less noise; its epsilon is still a proven upper
    /// bound. The ledger is the same either way: a reviewer can account it
    /// with both.
    pub fn accountant(mut self, accountant: AccountantKind) -> Self {
        self.accountant = accountant;
        self
    }

    /// What is trained, for the ledger's header.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// Checks the configuration, calibrates the noise if asked, and builds
    /// the inner optimizer `O` over the variables with `config`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the field and its range;
    /// [`Error::UnownedVariable`] (ghost engine) for a variable no DP layer
    /// uses; [`Error::DuplicateVariable`]; [`Error::LayerTrainedTwice`] for a
    /// DP layer another live optimizer trains; [`Error::DpLayerInMicrobatch`]
    /// for a DP layer's variable with the microbatch engine; the
    /// accountant's and Candle's errors.
    pub fn build(self, config: O::Config) -> Result<DpOptimizer<O>> {
        self.sampler.validate()?;
        let c = check_max_grad_norm(self.max_grad_norm)?;
        if let Some(b) = self.budget {
            ensure("budget.epsilon", b.epsilon, "finite and > 0", b.epsilon > 0.0 && b.epsilon.is_finite())?;
            ensure("budget.delta", b.delta, "in (0, 1)", b.delta > 0.0 && b.delta < 1.0)?;
        }
        let sampler = self.sampler;
        let noise_multiplier = match self.noise_plan {
            None => {
                return Err(Error::InvalidConfig {
                    field: "noise_multiplier",
                    value: f64::NAN,
                    valid: "set: call noise_multiplier(..) or target(..)",
                })
            }
            Some(NoisePlan::Fixed(s)) => ensure("noise_multiplier", s, "finite and > 0", s > 0.0 && s.is_finite())?,
            Some(NoisePlan::Calibrated { budget, planned_steps }) => {
                ensure("planned_steps", planned_steps as f64, "an integer >= 1", planned_steps >= 1)?;
                let accountant = self.accountant;
                calibrate_with(budget.epsilon, |sigma| {
                    accountant.epsilon(sampler.adjacency(), [&sampler.event(sigma, planned_steps)], budget.delta)
                })?
                .noise_multiplier
            }
        };
        let ghost = match self.engine {
            Engine::Ghost => {
                let g = GhostEngine::new(&self.vars)?;
                self.clipping.validate(c, g.num_layers()?)?;
                Some(g)
            }
            Engine::Microbatch => {
                crate::grad_sample::microbatch::check_plain(&self.vars)?;
                if matches!(self.clipping, ClipMode::PerLayer(_)) {
                    return Err(Error::InvalidConfig {
                        field: "clipping",
                        value: f64::NAN,
                        valid: "flat with the microbatch engine (per-layer clipping needs DP layers)",
                    });
                }
                None
            }
        };
        // The noise reaches the weights as sigma C z / (q N), |z| < 10: it
        // must stay finite (a NaN or inf update is never silent).
        let noise_scale = noise_multiplier * c / sampler.expected_batch_size();
        ensure(
            "noise_multiplier * max_grad_norm / expected_batch_size",
            noise_scale,
            "at most 1e300 (the noisy gradient must stay finite)",
            noise_scale <= 1e300,
        )?;
        let max_steps = match self.budget {
            Some(b) => Some(max_steps_within(&sampler, noise_multiplier, b, self.accountant)?),
            None => None,
        };
        let noise = match self.noise {
            Some(n) => n,
            // Large models fill their noise on every core (the values do not
            // depend on the thread count).
            None => GaussianNoise::from_os_entropy()?
                .with_threads(std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)),
        };
        let header = LedgerHeader {
            created_by: format!("candle-dp {}", env!("CARGO_PKG_VERSION")),
            description: self.description,
            dataset_size: Some(sampler.dataset_size() as u64),
            target: self.budget.map(|b| PrivacyTarget { epsilon: b.epsilon, delta: b.delta }),
        };
        let inner = O::new(self.vars.clone(), config)?;
        Ok(DpOptimizer {
            inner,
            vars: self.vars,
            noise_multiplier,
            max_grad_norm: c,
            clipping: self.clipping,
            sampler,
            noise,
            ghost,
            accumulated: None,
            empty_marked: false,
            ledger: Ledger::new(header),
            pending_steps: 0,
            steps: 0,
            budget: self.budget.zip(max_steps),
            accountant: self.accountant,
        })
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

/// The largest number of steps with this sampler and noise that stays within `budget`.
fn max_steps_within(
    sampler: &SamplerDescription,
    sigma: f64,
    budget: PrivacyBudget,
    accountant: AccountantKind,
) -> Result<u64> {
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

/// DP-SGD around the Candle optimizer `O` (SGD, AdamW, or any implementation).
#[derive(Debug)]
pub struct DpOptimizer<O: Optimizer> {
    pub(crate) inner: O,
    pub(crate) vars: Vec<Var>,
    pub(crate) noise_multiplier: f64,
    pub(crate) max_grad_norm: f64,
    pub(crate) clipping: ClipMode,
    pub(crate) sampler: SamplerDescription,
    pub(crate) noise: GaussianNoise,
    pub(crate) ghost: Option<GhostEngine>,
    pub(crate) accumulated: Option<Vec<Tensor>>,
    pub(crate) empty_marked: bool,
    pub(crate) ledger: Ledger,
    pub(crate) pending_steps: u64,
    pub(crate) steps: u64,
    pub(crate) budget: Option<(PrivacyBudget, u64)>,
    pub(crate) accountant: AccountantKind,
}

impl<O: Optimizer> DpOptimizer<O> {
    /// Starts building an optimizer over `vars`, sampled as `sampler` describes.
    ///
    /// The noise is drawn in the order of `vars`: for runs that reproduce
    /// with a fixed seed, pass them in a fixed order ([`vars_by_name`];
    /// `VarMap::all_vars` returns hash order, which changes between processes).
    pub fn builder(vars: Vec<Var>, sampler: SamplerDescription) -> DpOptimizerBuilder<O> {
        DpOptimizerBuilder {
            inner: std::marker::PhantomData,
            vars,
            sampler,
            noise_plan: None,
            budget: None,
            max_grad_norm: 1.0,
            clipping: ClipMode::Flat,
            engine: Engine::Ghost,
            noise: None,
            description: None,
            accountant: AccountantKind::Rdp,
        }
    }

    /// Stage 1 (ghost engine): clips and accumulates one physical batch from
    /// its per-example losses (their sum is back-propagated here).
    ///
    /// Only the backward pass run here counts: gradients that a backward of
    /// your own left in the DP layers are discarded first.
    ///
    /// # Errors
    /// Nothing is accumulated on error: [`Error::NonFinite`],
    /// [`Error::MissingGradient`], [`Error::NonDpUse`] (a trained variable
    /// also used by a plain Candle op), [`Error::Shape`] (uses of another
    /// batch reached the loss), [`Error::CaptureMismatch`];
    /// [`Error::InvalidConfig`] if the optimizer uses the microbatch engine.
    pub fn accumulate(&mut self, losses: &PerSampleLoss) -> Result<()> {
        let Some(ghost) = &self.ghost else {
            return Err(Error::InvalidConfig {
                field: "engine",
                value: f64::NAN,
                valid: "Engine::Ghost for accumulate (use accumulate_microbatch)",
            });
        };
        let batch = ghost.clip(losses, &self.clipping, self.max_grad_norm)?;
        self.add(batch)
    }

    /// Stage 1 (any engine): clips and accumulates `batch_size` examples one
    /// at a time; `loss_of(i)` returns example `i`'s scalar loss.
    ///
    /// # Errors
    /// [`Error::NonFinite`] (nothing accumulated); Candle's errors.
    pub fn accumulate_microbatch(
        &mut self,
        batch_size: usize,
        loss_of: impl FnMut(usize) -> candle_core::Result<Tensor>,
    ) -> Result<()> {
        let batch = clip_microbatch(&self.vars, batch_size, loss_of, self.max_grad_norm)?;
        self.add(batch)
    }

    /// Stage 1 for an empty Poisson batch: the step still adds noise and is
    /// accounted (skipping it would change the sampling the accountant assumes).
    pub fn accumulate_empty(&mut self) {
        self.empty_marked = true;
    }

    fn add(&mut self, batch: ClippedBatch) -> Result<()> {
        let summed = match self.accumulated.take() {
            None => batch.clipped_sums,
            Some(acc) => {
                let mut out = Vec::with_capacity(acc.len());
                for (a, b) in acc.iter().zip(&batch.clipped_sums) {
                    match a + b {
                        Ok(t) => out.push(t),
                        Err(e) => {
                            self.accumulated = Some(acc);
                            return Err(e.into());
                        }
                    }
                }
                out
            }
        };
        self.accumulated = Some(summed);
        Ok(())
    }

    /// Stage 2: noise, scaling, the inner optimizer's step, accounting.
    ///
    /// # Errors
    /// [`Error::BudgetExhausted`] before anything is touched;
    /// [`Error::NothingAccumulated`]; Candle's errors.
    pub fn step(&mut self) -> Result<()> {
        if let Some((budget, max_steps)) = self.budget {
            // Poisson steps compose exactly like one event of all the steps,
            // so the step count decides. Shuffled-batch entries round their
            // epochs up separately, so there the ledger itself is accounted.
            let exact = self.sampler.sample_rate().is_none();
            if self.steps >= max_steps || exact {
                let would_spend = self.epsilon_after(self.pending_steps + 1, budget.delta)?;
                if self.steps >= max_steps || would_spend > budget.epsilon {
                    return Err(Error::BudgetExhausted { would_spend, budget: budget.epsilon, delta: budget.delta });
                }
            }
        }
        let sums = match &self.accumulated {
            Some(s) => s.clone(),
            None if self.empty_marked => {
                self.vars.iter().map(|v| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?
            }
            None => return Err(Error::NothingAccumulated),
        };
        let std = self.noise_multiplier * self.max_grad_norm;
        let scale = 1.0 / self.sampler.expected_batch_size();
        // Draw all noise before changing anything: a failure leaves the
        // optimizer, the variables and the ledger as they were.
        let mut noise = self.noise.clone();
        let mut grads = GradStore::default();
        for (var, sum) in self.vars.iter().zip(&sums) {
            grads.insert(var.as_tensor(), noisy_mean(sum, &mut noise, std, scale)?.to_dtype(var.dtype())?);
        }
        self.inner.step(&grads)?;
        self.noise = noise;
        self.pending_steps += 1;
        self.steps += 1;
        self.accumulated = None;
        self.empty_marked = false;
        Ok(())
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
        let mut ledger = self.ledger.clone();
        if pending > 0 {
            ledger.append(self.record(pending))?;
        }
        Ok(ledger.epsilon(self.accountant, delta)?)
    }

    /// The ledger as it stands, with the steps since the last flush as one entry.
    ///
    /// # Errors
    /// The ledger's, which cannot occur for records this optimizer makes.
    pub fn ledger(&self) -> Result<Ledger> {
        let mut ledger = self.ledger.clone();
        if self.pending_steps > 0 {
            ledger.append(self.record(self.pending_steps))?;
        }
        Ok(ledger)
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
    /// weights the privacy statement covers.
    ///
    /// # Errors
    /// The ledger's, for a malformed hash.
    pub fn record_release(&mut self, file: &str, weights_sha256: &str) -> Result<()> {
        self.flush_ledger()?;
        self.ledger.append_release(file, weights_sha256)?;
        Ok(())
    }

    pub(crate) fn record(&self, steps: u64) -> MechanismRecord {
        MechanismRecord {
            event: self.sampler.event(self.noise_multiplier, steps),
            adjacency: self.sampler.adjacency(),
            clipping_norm: self.max_grad_norm,
            sampler: self.sampler.kind(),
            noise: NoiseSource { generator: NoiseGenerator::Chacha20, seed: self.noise.seeding() },
            sampler_seed: self.sampler.seeding(),
        }
    }

    /// The noise multiplier (calibrated, if a target was given).
    pub fn noise_multiplier(&self) -> f64 {
        self.noise_multiplier
    }

    /// The clipping norm `C`.
    pub fn max_grad_norm(&self) -> f64 {
        self.max_grad_norm
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The accountant that enforces the budget and answers [`DpOptimizer::epsilon`].
    pub fn accountant(&self) -> AccountantKind {
        self.accountant
    }

    /// The most steps the budget allows, if one is enforced.
    pub fn max_steps(&self) -> Option<u64> {
        self.budget.map(|(_, m)| m)
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
}

/// `(sum + N(0, std^2)) * scale`, elementwise, computed in `f64` and
/// rounded once to the sum's dtype (`f32` directly; others through `f64`).
///
/// On the CPU the host sampler fills the values. On a GPU the noise is made
/// on the device ([`crate::kernels::add_gaussian_noise`]) from a fresh key
/// drawn from the same generator: no gradient crosses to the host and back.
fn noisy_mean(sum: &Tensor, noise: &mut GaussianNoise, std: f64, scale: f64) -> Result<Tensor> {
    if !sum.device().is_cpu() {
        return crate::kernels::add_gaussian_noise(sum, &noise.noise_key(), std, scale);
    }
    if sum.dtype() == DType::F32 {
        let mut values = sum.flatten_all()?.to_vec1::<f32>()?;
        noise.add_scaled_to_f32(&mut values, std, scale);
        return Ok(Tensor::from_vec(values, sum.shape(), sum.device())?);
    }
    let dtype = sum.dtype();
    let mut values = sum.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    noise.add_to_f64(&mut values, std);
    for v in &mut values {
        *v *= scale;
    }
    Ok(Tensor::from_vec(values, sum.shape(), sum.device())?.to_dtype(dtype)?)
}
