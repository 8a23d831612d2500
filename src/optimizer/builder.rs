//! [`DpOptimizerBuilder`]: the settings of a run, checked and calibrated into a [`DpConfig`].

use candle_core::Var;
use candle_nn::Optimizer;
use dp_accountant::{calibrate_with, AccountantKind, DataProvenance, Ledger, LedgerHeader, PrivacyTarget};

use super::DpOptimizer;
use crate::audit::{Canaries, CanaryState, PlantedBug};
use crate::clip::ClipMode;
use crate::config::{DpConfig, Engine, PrivacyBudget};
use crate::error::{ensure, Error, Result};
use crate::noise::GaussianNoise;
use crate::sampler::Sampler;

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
    sampler: Sampler,
    noise_plan: Option<NoisePlan>,
    budget: Option<PrivacyBudget>,
    max_grad_norm: f64,
    clipping: ClipMode,
    engine: Engine,
    noise: Option<GaussianNoise>,
    description: Option<String>,
    accountant: AccountantKind,
    max_physical_batch_size: Option<usize>,
    audit: Option<Canaries>,
    bug: Option<PlantedBug>,
    data: Option<DataProvenance>,
}

impl<O: Optimizer> DpOptimizerBuilder<O> {
    pub(super) fn new(vars: Vec<Var>, sampler: Sampler) -> Self {
        Self {
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
            max_physical_batch_size: None,
            audit: None,
            bug: None,
            data: None,
        }
    }

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

    /// Splits each logical batch into physical chunks of at most this many
    /// examples in [`DpOptimizer::train_step`] (default: the whole batch at
    /// once). Each chunk is clipped on its own, and the noise is added and the
    /// step accounted once per logical batch, so the privacy is that of the
    /// logical batch and only the memory changes: a Poisson batch's size is
    /// random, and this bounds what one pass must hold.
    pub fn max_physical_batch_size(mut self, max_physical_batch_size: usize) -> Self {
        self.max_physical_batch_size = Some(max_physical_batch_size);
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

    /// The data the examples are read from, by SHA-256, size and rows
    /// ([`DataProvenance::of_file`]), for the ledger's header: the report
    /// then says which data the guarantee is about.
    pub fn data(mut self, data: DataProvenance) -> Self {
        self.data = Some(data);
        self
    }

    /// Audits the run with canaries ([`Canaries`], the one-run audit of
    /// [`crate::audit`]): `m` slots are appended to the sampler's dataset
    /// (indices `N..N + m`, drawn like every example at the same rate, and
    /// counted in the ledger's dataset size), each holding a canary with
    /// probability 1/2. The closure of [`DpOptimizer::train_step`] and
    /// [`DpOptimizer::next_batch`] see real examples only, in the batches
    /// they would have without canaries (the sampling is counter-based);
    /// the canaries' gradients land on an audit block the model never
    /// reads, so the model's gradients are untouched, but the expected batch size that
    /// divides the sum counts the slots (the update is `N / (N + m)` of an
    /// unaudited run's: raise the learning rate to match).
    /// [`DpOptimizer::record_audit`] (or a release) records the audit in
    /// the ledger. Poisson sampling only; not with checkpoints yet.
    pub fn audit(mut self, canaries: Canaries) -> Self {
        self.audit = Some(canaries);
        self
    }

    /// Plants `bug` in the optimizer (feature `planted-bugs`, for tests of
    /// the audits only: the run is not private). The ledger's description
    /// says so.
    #[cfg(feature = "planted-bugs")]
    pub fn plant_bug(mut self, bug: PlantedBug) -> Self {
        self.bug = Some(bug);
        self
    }

    /// What is trained, for the ledger's header.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// Checks the settings, calibrates the noise if asked, and builds the
    /// inner optimizer `O` over the variables with `config`.
    ///
    /// # Errors
    /// [`Error::MissingSetting`] without a noise multiplier or target;
    /// [`Error::InvalidConfig`] naming the field and its range;
    /// [`Error::Incompatible`] for per-layer clipping with the microbatch
    /// engine; [`Error::UnownedVariable`] (ghost engine) for a variable no DP
    /// layer uses; [`Error::DuplicateVariable`]; [`Error::LayerTrainedTwice`]
    /// for a DP layer another live optimizer trains;
    /// [`Error::DpLayerInMicrobatch`] for a DP layer's variable with the
    /// microbatch engine; for [`DpOptimizerBuilder::audit`],
    /// [`Error::InvalidConfig`] naming a bad setting,
    /// [`Error::MissingSetting`] without a delta and
    /// [`Error::Incompatible`] for a shuffled sampler; the accountant's and
    /// Candle's errors.
    pub fn build(mut self, config: O::Config) -> Result<DpOptimizer<O>> {
        let first_canary = self.sampler.description().dataset_size();
        if let Some(canaries) = &self.audit {
            self.sampler = self.sampler.with_appended_slots(canaries.count())?;
        }
        let audit = self.audit.map(|c| CanaryState::new(c, first_canary, self.budget.map(|b| b.delta))).transpose()?;
        let description = self.sampler.description();
        description.validate()?;
        let noise_multiplier = match self.noise_plan {
            None => {
                return Err(Error::MissingSetting {
                    setting: "the noise multiplier",
                    how: "call noise_multiplier(..) or target(..) on the builder",
                })
            }
            Some(NoisePlan::Fixed(s)) => s,
            Some(NoisePlan::Calibrated { budget, planned_steps }) => {
                ensure("planned_steps", planned_steps as f64, "an integer >= 1", planned_steps >= 1)?;
                budget.validate()?;
                let accountant = self.accountant;
                calibrate_with(budget.epsilon, |sigma| {
                    accountant.epsilon(
                        description.adjacency(),
                        [&description.event(sigma, planned_steps)],
                        budget.delta,
                    )
                })?
                .noise_multiplier
            }
        };
        let dp = DpConfig {
            noise_multiplier,
            max_grad_norm: self.max_grad_norm,
            clipping: self.clipping,
            engine: self.engine,
            sampler: description,
            budget: self.budget,
            accountant: self.accountant,
            max_physical_batch_size: self.max_physical_batch_size,
        };
        // `assemble` validates `dp`, as it does a resumed configuration.
        let noise = match self.noise {
            Some(n) => n,
            // Large models fill their noise on every core (the values do not
            // depend on the thread count).
            None => GaussianNoise::from_os_entropy()?.with_all_threads(),
        };
        let description_text = match self.bug {
            Some(bug) => {
                Some(format!("PLANTED BUG ({}): NOT PRIVATE. {}", bug.describe(), self.description.unwrap_or_default()))
            }
            None => self.description,
        };
        let ledger = Ledger::new(LedgerHeader {
            created_by: format!("candle-dp {}", env!("CARGO_PKG_VERSION")),
            description: description_text,
            dataset_size: Some(description.dataset_size() as u64),
            target: self.budget.map(|b| PrivacyTarget { epsilon: b.epsilon, delta: b.delta }),
            data: self.data,
        });
        let mut optimizer = DpOptimizer::assemble(self.vars, self.sampler, noise, dp, config, ledger)?;
        optimizer.audit = audit;
        optimizer.bug = self.bug;
        Ok(optimizer)
    }
}
