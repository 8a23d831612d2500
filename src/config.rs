//! [`DpConfig`]: everything that decides what a run's privacy is, in one
//! validated, serializable value.
//!
//! The builder produces it ([`crate::DpOptimizerBuilder::build`], which
//! calibrates the noise), the optimizer holds it ([`crate::DpOptimizer::config`]),
//! and a checkpoint stores it. Every path that turns one into an optimizer
//! validates it again, a deserialized one included.

use dp_accountant::AccountantKind;
use serde::{Deserialize, Serialize};

use crate::clip::{check_max_grad_norm, ClipMode};
use crate::error::{ensure, Error, Result};
use crate::sampler::SamplerDescription;

/// A privacy budget: the run must stay `(epsilon, delta)`-DP.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyBudget {
    /// The largest epsilon the run may spend (> 0).
    pub epsilon: f64,
    /// At this delta, in `(0, 1)`.
    pub delta: f64,
}

impl PrivacyBudget {
    /// Checks the budget.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] unless epsilon is finite and > 0 and delta in `(0, 1)`.
    pub fn validate(&self) -> Result<()> {
        ensure("budget.epsilon", self.epsilon, "finite and > 0", self.epsilon > 0.0 && self.epsilon.is_finite())?;
        ensure("budget.delta", self.delta, "in (0, 1)", self.delta > 0.0 && self.delta < 1.0)?;
        Ok(())
    }
}

/// Which engine computes the per-example gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// Ghost clipping over DP layers (default): every trainable variable must
    /// belong to a DP layer.
    #[default]
    Ghost,
    /// One example at a time, any model.
    Microbatch,
}

/// The privacy-relevant configuration of a DP-SGD run.
///
/// The fields are private: an optimizer is only ever built from a value
/// that [`DpConfig::validate`] accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpConfig {
    pub(crate) noise_multiplier: f64,
    pub(crate) max_grad_norm: f64,
    pub(crate) clipping: ClipMode,
    pub(crate) engine: Engine,
    pub(crate) sampler: SamplerDescription,
    pub(crate) budget: Option<PrivacyBudget>,
    pub(crate) accountant: AccountantKind,
    pub(crate) max_physical_batch_size: Option<usize>,
}

impl DpConfig {
    /// Checks every field (the per-layer thresholds' count is checked
    /// against the model when an optimizer is built).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the field and its range;
    /// [`Error::Incompatible`] for per-layer clipping with the microbatch engine.
    pub fn validate(&self) -> Result<()> {
        self.sampler.validate()?;
        let c = check_max_grad_norm(self.max_grad_norm)?;
        let sigma = self.noise_multiplier;
        ensure("noise_multiplier", sigma, "finite and > 0", sigma > 0.0 && sigma.is_finite())?;
        if let Some(b) = self.budget {
            b.validate()?;
        }
        if let Some(m) = self.max_physical_batch_size {
            ensure("max_physical_batch_size", m as f64, "an integer >= 1", m >= 1)?;
        }
        if self.engine == Engine::Microbatch && matches!(self.clipping, ClipMode::PerLayer(_)) {
            return Err(Error::Incompatible {
                setting: "per-layer clipping",
                with: "the microbatch engine",
                why: "per-layer thresholds apply to DP layers, which only the ghost engine reads",
            });
        }
        // The noise reaches the weights as sigma C z / (q N), |z| < 10: it
        // must stay finite (a NaN or inf update is never silent).
        let noise_scale = sigma * c / self.sampler.expected_batch_size();
        ensure(
            "noise_multiplier * max_grad_norm / expected_batch_size",
            noise_scale,
            "at most 1e300 (the noisy gradient must stay finite)",
            noise_scale <= 1e300,
        )?;
        Ok(())
    }

    /// The noise multiplier `sigma`: the noise's standard deviation is `sigma C`.
    pub fn noise_multiplier(&self) -> f64 {
        self.noise_multiplier
    }

    /// The clipping norm `C`, in the gradient's units.
    pub fn max_grad_norm(&self) -> f64 {
        self.max_grad_norm
    }

    /// Flat or per-layer clipping.
    pub fn clipping(&self) -> &ClipMode {
        &self.clipping
    }

    /// The per-example gradient engine.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The sampling the run draws and is accounted with.
    pub fn sampler(&self) -> SamplerDescription {
        self.sampler
    }

    /// The enforced budget, if any.
    pub fn budget(&self) -> Option<PrivacyBudget> {
        self.budget
    }

    /// The accountant that enforces the budget and answers epsilon.
    pub fn accountant(&self) -> AccountantKind {
        self.accountant
    }

    /// The most examples one forward and backward pass takes (a logical
    /// batch is split into chunks of at most this size); `None`: the whole
    /// logical batch at once.
    pub fn max_physical_batch_size(&self) -> Option<usize> {
        self.max_physical_batch_size
    }

    /// The configuration as JSON (the form checkpoints store).
    pub fn to_json(&self) -> String {
        // Plain data with string keys and finite numbers always serializes.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Reads and validates a configuration written by [`DpConfig::to_json`].
    ///
    /// # Errors
    /// [`Error::InvalidConfigFile`] for malformed JSON or an unknown field;
    /// as [`DpConfig::validate`] otherwise.
    pub fn from_json(text: &str) -> Result<Self> {
        let config: DpConfig =
            serde_json::from_str(text).map_err(|e| Error::InvalidConfigFile { reason: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }
}
