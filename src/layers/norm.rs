//! DP normalization layers: layer norm, RMS norm and group norm, whose
//! affine parameters get per-example gradients; and the refusal of batch norm.
//!
//! Each normalizes per example (never across the batch), then applies a
//! per-feature scale `weight` (and shift `bias`). The per-example gradients
//! of these small vectors are materialized: with `x_hat` the normalized
//! input and `G` the output gradient, `grad weight_i = sum (G . x_hat)` and
//! `grad bias_i = sum G` over example `i`'s positions. Variables and
//! initialization are those of candle-nn (`weight` = 1, `bias` = 0).

use std::sync::Arc;

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Init, LayerNormConfig, VarBuilder};

use super::tap::{tap, Captures};
use crate::error::Error;
use crate::grad_sample::per_example::UseGrad;
use crate::grad_sample::registry::{self, GhostLayer};

/// Which axis carries the affine parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Axis {
    /// The last dimension (layer norm, RMS norm).
    Last,
    /// Dimension 1, channels (group norm).
    Channel { groups: usize },
}

#[derive(Debug)]
struct NormTrace {
    weight: Tensor,
    bias: Option<Tensor>,
    axis: Axis,
    remove_mean: bool,
    eps: f64,
    /// Per use: the detached normalized input.
    uses: Captures<Tensor>,
}

/// A DP layer norm, RMS norm or group norm. Construct it with
/// [`layer_norm`], [`rms_norm`] or [`group_norm`].
#[derive(Debug, Clone)]
pub struct DpNorm {
    trace: Arc<NormTrace>,
}

/// A DP layer norm over the last dimension of size `size`, as `candle_nn::layer_norm`.
///
/// # Errors
/// Candle's, if `vb` cannot provide the variables.
pub fn layer_norm<C: Into<LayerNormConfig>>(size: usize, config: C, vb: VarBuilder) -> candle_core::Result<DpNorm> {
    let config = config.into();
    let weight = vb.get_with_hints(size, "weight", Init::Const(1.0))?;
    let bias = if config.affine { Some(vb.get_with_hints(size, "bias", Init::Const(0.0))?) } else { None };
    Ok(DpNorm::new(weight, bias, Axis::Last, config.remove_mean, config.eps))
}

/// A DP RMS norm over the last dimension of size `size`, as `candle_nn::rms_norm`.
///
/// # Errors
/// Candle's, if `vb` cannot provide the variable.
pub fn rms_norm(size: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<DpNorm> {
    let weight = vb.get_with_hints(size, "weight", Init::Const(1.0))?;
    Ok(DpNorm::new(weight, None, Axis::Last, false, eps))
}

/// A DP group norm of `num_channels` channels in `num_groups` groups, input
/// `[B, C, ...]`, as `candle_nn::group_norm`.
///
/// # Errors
/// Candle's, if `num_groups` does not divide `num_channels` or `vb` cannot
/// provide the variables.
pub fn group_norm(num_groups: usize, num_channels: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<DpNorm> {
    if num_groups == 0 || !num_channels.is_multiple_of(num_groups) {
        return Err(Error::InvalidConfig {
            field: "num_groups",
            value: num_groups as f64,
            valid: "a divisor of num_channels, >= 1",
        }
        .into());
    }
    let weight = vb.get_with_hints(num_channels, "weight", Init::Const(1.0))?;
    let bias = vb.get_with_hints(num_channels, "bias", Init::Const(0.0))?;
    Ok(DpNorm::new(weight, Some(bias), Axis::Channel { groups: num_groups }, true, eps))
}

/// Batch normalization mixes the examples of a batch (each output depends on
/// the batch's mean and variance), so no per-example gradient exists and
/// per-example clipping cannot bound one example's influence. Always an error.
///
/// # Errors
/// Always [`Error::UnsupportedLayer`], naming group norm or layer norm as the
/// replacement.
pub fn batch_norm(_num_features: usize, _vb: VarBuilder) -> crate::Result<DpNorm> {
    Err(Error::UnsupportedLayer {
        layer: "batch normalization",
        instead: "candle_dp::group_norm (for convolutions) or candle_dp::layer_norm",
    })
}

impl DpNorm {
    fn new(weight: Tensor, bias: Option<Tensor>, axis: Axis, remove_mean: bool, eps: f64) -> Self {
        let trace = NormTrace { weight, bias, axis, remove_mean, eps, uses: Captures::new() };
        Self { trace: registry::registered(trace) }
    }

    /// The scale, one per feature or channel.
    pub fn weight(&self) -> &Tensor {
        &self.trace.weight
    }

    /// The shift, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.trace.bias.as_ref()
    }

    /// How many forward uses the layer holds activations and gradients of
    /// now (for memory diagnostics): 0 between steps, and always 0 for a
    /// layer no live optimizer trains.
    pub fn captured_uses(&self) -> usize {
        self.trace.uses.len()
    }
}

/// `x` normalized as candle-nn does, in `f32` for half-precision inputs.
fn normalize(x: &Tensor, axis: Axis, remove_mean: bool, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let internal = match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let shape = x.shape().clone();
    let (grouped, dim) = match axis {
        Axis::Last => (x.to_dtype(internal)?, D::Minus1),
        Axis::Channel { groups } => {
            if x.rank() < 3 {
                return Err(candle_core::Error::UnexpectedNumberOfDims { expected: 3, got: x.rank(), shape });
            }
            (x.reshape((x.dim(0)?, groups, ()))?.to_dtype(internal)?, D::Minus1)
        }
    };
    let n = grouped.dim(dim)? as f64;
    let centered = if remove_mean { grouped.broadcast_sub(&(grouped.sum_keepdim(dim)? / n)?)? } else { grouped };
    let var = (centered.sqr()?.sum_keepdim(dim)? / n)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?.reshape(shape)
}

impl Module for DpNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let t = &self.trace;
        registry::check_weight_and_bias(&t.weight, t.bias.as_ref())?;
        let x_hat = normalize(x, t.axis, t.remove_mean, t.eps)?;
        let param_shape = |p: &Tensor| -> candle_core::Result<Tensor> {
            match t.axis {
                Axis::Last => Ok(p.detach()),
                Axis::Channel { .. } => {
                    let mut dims = vec![1; x.rank()];
                    dims[1] = p.dim(0)?;
                    p.detach().reshape(dims)
                }
            }
        };
        let mut y = x_hat.broadcast_mul(&param_shape(&t.weight)?)?;
        if let Some(b) = &t.bias {
            y = y.broadcast_add(&param_shape(b)?)?;
        }
        // Anchor the tap on a trained parameter; nothing to capture if none is.
        let anchor = match (&t.bias, registry::is_trained(&t.weight)) {
            (_, true) => &t.weight,
            (Some(b), false) if registry::is_trained(b) => b,
            _ => return Ok(y),
        };
        let (y, slot) = tap(&y, anchor, self.trace.clone())?;
        t.uses.push(x_hat.detach(), slot);
        Ok(y)
    }
}

impl NormTrace {
    /// Per-example gradients `[B, D]` of the weight and bias, summed over uses.
    fn per_example(&self) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        let mut acc: Option<(Tensor, Tensor)> = None;
        for (x_hat, g) in self.uses.with_grads() {
            let b = x_hat.dim(0)?;
            let (xs, gs, sum_dim) = match self.axis {
                Axis::Last => {
                    let d = x_hat.dim(D::Minus1)?;
                    (x_hat.reshape((b, (), d))?, g.reshape((b, (), d))?, 1)
                }
                Axis::Channel { .. } => {
                    let c = x_hat.dim(1)?;
                    (x_hat.reshape((b, c, ()))?, g.reshape((b, c, ()))?, 2)
                }
            };
            // In f64: these sums decide the per-example norms.
            let (xs, gs) = (xs.to_dtype(DType::F64)?, gs.to_dtype(DType::F64)?);
            let gw = (xs * &gs)?.sum(sum_dim)?;
            let gb = gs.sum(sum_dim)?;
            acc = Some(match acc {
                None => (gw, gb),
                Some((w, bb)) => ((w + gw)?, (bb + gb)?),
            });
        }
        Ok(acc)
    }
}

impl GhostLayer for NormTrace {
    fn parameters(&self) -> Vec<Tensor> {
        std::iter::once(self.weight.clone()).chain(self.bias.clone()).collect()
    }

    fn per_example_grads(&self) -> crate::Result<Vec<Vec<UseGrad>>> {
        let (mut weight, mut bias) = (Vec::new(), Vec::new());
        if let Some((gw, gb)) = self.per_example()? {
            if registry::is_trained(&self.weight) {
                weight.push(UseGrad::Materialized(gw));
            }
            if self.bias.as_ref().is_some_and(registry::is_trained) {
                bias.push(UseGrad::Materialized(gb));
            }
        }
        Ok(std::iter::once(weight).chain(self.bias.as_ref().map(|_| bias)).collect())
    }

    fn clear(&self) {
        self.uses.clear();
    }

    fn reset_grads(&self) {
        self.uses.reset_grads();
    }
}
