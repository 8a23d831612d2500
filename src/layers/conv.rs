//! DP convolutions: `conv1d` and `conv2d`, clipped as linear maps over the
//! unfolded input.
//!
//! Variables `weight` (`[C_out, C_in, k]` or `[C_out, C_in, k, k]`) and `bias`
//! (`[C_out]`), initialized as candle-nn's. The forward is Candle's
//! convolution with a detached kernel, its output tapped for `G`; the
//! detached input is unfolded (im2col) into `X [B, T, C_in k^n]`, `T` the
//! output positions, and the layer is then a linear map with `T` positions
//! per example (see [`mod@super::linear`]): ghost or materialized norms by cost,
//! the clipped sum as one matmul. Groups and dilation other than 1 are
//! refused (Candle's `unfold` cannot express them here yet).

use std::sync::Arc;

use candle_core::{Module, Tensor};
use candle_nn::{Conv1dConfig, Conv2dConfig, Init, VarBuilder};

use super::linear::{LinearMap, LinearUse};
use super::tap::{tap, Captures};
use crate::error::Error;
use crate::grad_sample::registry::{self, Training};

/// Padding and stride of a convolution, per spatial dimension (equal).
#[derive(Debug, Clone, Copy)]
struct Geometry {
    padding: usize,
    stride: usize,
    spatial: usize,
}

#[derive(Debug)]
struct ConvTrace {
    weight: Tensor,
    bias: Option<Tensor>,
    geometry: Geometry,
    /// Per use: the unfolded detached input `[B, T, C_in k^n]` while the
    /// kernel is trained.
    uses: Captures<LinearUse>,
    training: Training,
}

/// A DP convolution. Construct it with [`conv1d`] or [`conv2d`].
#[derive(Debug, Clone)]
pub struct DpConv {
    trace: Arc<ConvTrace>,
}

fn check_config(groups: usize, dilation: usize) -> candle_core::Result<()> {
    for (field, value) in [("groups", groups), ("dilation", dilation)] {
        if value != 1 {
            return Err(Error::InvalidConfig {
                field,
                value: value as f64,
                valid: "1 (candle-dp cannot unfold grouped or dilated convolutions yet; use the microbatch engine)",
            }
            .into());
        }
    }
    Ok(())
}

/// A DP 1-d convolution, as `candle_nn::conv1d` (groups and dilation 1).
///
/// # Errors
/// Candle's, and an error for groups or dilation other than 1.
pub fn conv1d(in_c: usize, out_c: usize, k: usize, cfg: Conv1dConfig, vb: VarBuilder) -> candle_core::Result<DpConv> {
    check_config(cfg.groups, cfg.dilation)?;
    let weight = vb.get_with_hints((out_c, in_c, k), "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
    let bias = conv_bias(in_c * k, out_c, &vb)?;
    Ok(DpConv::new(weight, Some(bias), Geometry { padding: cfg.padding, stride: cfg.stride, spatial: 1 }))
}

/// A DP 2-d convolution, as `candle_nn::conv2d` (groups and dilation 1).
///
/// # Errors
/// Candle's, and an error for groups or dilation other than 1.
pub fn conv2d(in_c: usize, out_c: usize, k: usize, cfg: Conv2dConfig, vb: VarBuilder) -> candle_core::Result<DpConv> {
    check_config(cfg.groups, cfg.dilation)?;
    let weight = vb.get_with_hints((out_c, in_c, k, k), "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
    let bias = conv_bias(in_c * k * k, out_c, &vb)?;
    Ok(DpConv::new(weight, Some(bias), Geometry { padding: cfg.padding, stride: cfg.stride, spatial: 2 }))
}

/// candle-nn's bias initialization: uniform in `+-1/sqrt(fan_in)`.
fn conv_bias(fan_in: usize, out_c: usize, vb: &VarBuilder) -> candle_core::Result<Tensor> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    vb.get_with_hints(out_c, "bias", Init::Uniform { lo: -bound, up: bound })
}

impl DpConv {
    fn new(weight: Tensor, bias: Option<Tensor>, geometry: Geometry) -> Self {
        let training = Training::new(1 + usize::from(bias.is_some()));
        Self { trace: registry::registered(ConvTrace { weight, bias, geometry, uses: Captures::new(), training }) }
    }

    /// The kernel.
    pub fn weight(&self) -> &Tensor {
        &self.trace.weight
    }

    /// The bias.
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

impl Module for DpConv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let t = &self.trace;
        let Geometry { padding, stride, spatial } = t.geometry;
        let k = t.weight.dim(2)?;
        let w = t.weight.detach();
        let y = if spatial == 1 { x.conv1d(&w, padding, stride, 1, 1)? } else { x.conv2d(&w, padding, stride, 1, 1)? };
        let y = match &t.bias {
            Some(bias) => {
                let mut dims = vec![1; y.rank()];
                dims[1] = bias.dim(0)?;
                y.broadcast_add(&bias.detach().reshape(dims)?)?
            }
            None => y,
        };
        let Some(anchor) = self.trace.trained_parameter() else {
            return Ok(y);
        };
        let unfolded = if t.training.is_trained(0) { Some(unfold(&x.detach(), k, t.geometry)?) } else { None };
        let (y, slot) = tap(&y, anchor)?;
        t.uses.push(LinearUse { x: unfolded, batch: x.dim(0)? }, slot);
        Ok(y)
    }
}

/// The input unfolded (im2col) to `[B, T, C_in k^n]`, `T` the output
/// positions. Only for detached inputs: `Tensor::unfold`'s backward is wrong.
fn unfold(x: &Tensor, k: usize, geometry: Geometry) -> candle_core::Result<Tensor> {
    let Geometry { padding, stride, spatial } = geometry;
    let b = x.dim(0)?;
    if spatial == 1 {
        let cols = x.pad_with_zeros(2, padding, padding)?.unfold(2, k, stride)?; // [B, C, Lo, k]
        let lo = cols.dim(2)?;
        cols.permute((0, 2, 1, 3))?.contiguous()?.reshape((b, lo, ()))
    } else {
        let cols = x
            .pad_with_zeros(2, padding, padding)?
            .pad_with_zeros(3, padding, padding)?
            .unfold(2, k, stride)?
            .unfold(3, k, stride)?; // [B, C, Ho, Wo, k, k]
        let (ho, wo) = (cols.dim(2)?, cols.dim(3)?);
        cols.permute((0, 2, 3, 1, 4, 5))?.contiguous()?.reshape((b, ho * wo, ()))
    }
}

impl ConvTrace {
    /// A trained parameter to anchor the output tap on, if any is trained.
    fn trained_parameter(&self) -> Option<&Tensor> {
        std::iter::once(&self.weight)
            .chain(&self.bias)
            .enumerate()
            .find(|(k, _)| self.training.is_trained(*k))
            .map(|(_, p)| p)
    }
}

impl LinearMap for ConvTrace {
    fn weight(&self) -> &Tensor {
        &self.weight
    }

    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    fn uses(&self) -> &Captures<LinearUse> {
        &self.uses
    }

    fn training(&self) -> &Training {
        &self.training
    }

    /// `[B, C_out, positions...]` to `[B, T, C_out]`.
    fn output_grad(&self, grad: &Tensor, batch: usize) -> candle_core::Result<Tensor> {
        grad.reshape((batch, self.weight.dim(0)?, ()))?.transpose(1, 2)?.contiguous()
    }
}
