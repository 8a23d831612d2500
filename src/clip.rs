//! How per-example gradients are clipped.

use crate::error::{Error, Result};

/// The clipping rule. Either way each example's whole contribution has L2
/// norm at most `C`, the `max_grad_norm` the noise is calibrated to: each
/// threshold is applied with a relative margin of `1e-4` (a gradient is
/// scaled to `C (1 - 1e-4)`), so that rounding in the norm computation
/// cannot let a contribution exceed `C`.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipMode {
    /// One norm over all parameters, clipped to `C` (Abadi et al. 2016).
    #[default]
    Flat,
    /// Each DP layer's parameters clipped to their own threshold `C_l`, with
    /// `sum_l C_l^2 = C^2` so the total stays within `C`. Thresholds are in the
    /// order in which the layers' variables first appear in the optimizer's
    /// variable list; layers that share a variable (tied weights) count as
    /// one layer. Ghost engine only.
    PerLayer(Vec<f64>),
}

impl ClipMode {
    /// Equal thresholds `C / sqrt(L)` for `layers` layers.
    pub fn per_layer_uniform(max_grad_norm: f64, layers: usize) -> Self {
        ClipMode::PerLayer(vec![max_grad_norm / (layers.max(1) as f64).sqrt(); layers])
    }

    /// Checks the thresholds against `C` and the number of layers.
    pub(crate) fn validate(&self, max_grad_norm: f64, layers: usize) -> Result<()> {
        let ClipMode::PerLayer(t) = self else { return Ok(()) };
        if t.len() != layers {
            return Err(Error::InvalidConfig {
                field: "clipping.per_layer (number of thresholds)",
                value: t.len() as f64,
                valid: "one threshold per DP layer of the model",
            });
        }
        if let Some(bad) = t.iter().find(|c| !(**c > 0.0 && c.is_finite())) {
            return Err(Error::InvalidConfig { field: "clipping.per_layer", value: *bad, valid: "finite and > 0" });
        }
        let sum_sq: f64 = t.iter().map(|c| c * c).sum();
        let c2 = max_grad_norm * max_grad_norm;
        if (sum_sq - c2).abs() > 1e-9 * c2 {
            return Err(Error::InvalidConfig {
                field: "clipping.per_layer (sum of squared thresholds)",
                value: sum_sq,
                valid: "equal to max_grad_norm^2 (to 1e-9 relative)",
            });
        }
        Ok(())
    }
}

/// Checks a clipping norm `C`: finite and > 0.
///
/// # Errors
/// [`Error::InvalidConfig`] naming `max_grad_norm`.
pub(crate) fn check_max_grad_norm(c: f64) -> Result<f64> {
    crate::error::ensure("max_grad_norm", c, "finite and > 0", c > 0.0 && c.is_finite())
}

/// Relative margin kept below the clipping norm.
///
/// Norms are computed in the model's precision: an `f32` sum of `n` squares
/// can be off by up to about `n * 2^-24` relative (784 terms: 5e-5), so a
/// gradient measured at exactly `C` may really be a little longer. Clipping
/// to `C (1 - 1e-4)` keeps every example's true contribution within `C`, the
/// sensitivity the noise is calibrated to, at a cost of 0.01% of the signal.
pub(crate) const CLIP_MARGIN: f64 = 1e-4;

/// The clip factor: 1 for a gradient measured within `C (1 - margin)`,
/// else `C (1 - margin) / norm`.
pub(crate) fn clip_factor(norm: f64, threshold: f64) -> f64 {
    let target = threshold * (1.0 - CLIP_MARGIN);
    if norm > target {
        target / norm
    } else {
        1.0
    }
}
