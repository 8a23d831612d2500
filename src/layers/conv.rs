//! DP convolutions: `conv1d` and `conv2d`, clipped as linear maps over the
//! unfolded input.
//!
//! Variables `weight` (`[C_out, C_in, k]` or `[C_out, C_in, k, k]`) and `bias`
//! (`[C_out]`), initialized as candle-nn's. The forward is Candle's
//! convolution on detached tensors; the output enters the autograd graph
//! through a pass-through op that captures `G` and whose backward gives the
//! input its gradient (the transposed convolution) and nothing else, since
//! Candle's own convolution backward would also compute the kernel gradient
//! (recomputed as a clipped sum when trained, not needed when frozen). The
//! detached input is unfolded (im2col) into `X [B, T, C_in k^n]`, `T` the
//! output positions, and the layer is then a linear map with `T` positions
//! per example (see [`mod@super::linear`]): ghost or materialized norms by cost,
//! the clipped sum as one matmul. Groups and dilation other than 1 are
//! refused (Candle's `unfold` cannot express them here yet).

use std::sync::{Arc, Mutex};

use candle_core::{Module, Tensor};
use candle_nn::{Conv1dConfig, Conv2dConfig, Init, VarBuilder};

use super::linear::{LinearMap, LinearUse};
use super::tap::{tap, with_input_grad, Captures, GradSlot, InputGrad, Owner};
use crate::error::Error;
use crate::grad_sample::registry;

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
}

/// A DP convolution. Construct it with [`conv1d`] or [`conv2d`].
#[derive(Debug, Clone)]
pub struct DpConv {
    trace: Arc<ConvTrace>,
}

fn check_config(groups: usize, dilation: usize) -> crate::Result<()> {
    for (field, value) in [("groups", groups), ("dilation", dilation)] {
        if value != 1 {
            return Err(Error::InvalidConfig {
                field,
                value: value as f64,
                valid: "1 (candle-dp cannot unfold grouped or dilated convolutions yet; use the microbatch engine)",
            });
        }
    }
    Ok(())
}

/// A DP 1-d convolution, as `candle_nn::conv1d` (groups and dilation 1).
///
/// # Errors
/// Candle's, and an error for groups or dilation other than 1.
pub fn conv1d(in_c: usize, out_c: usize, k: usize, cfg: Conv1dConfig, vb: VarBuilder) -> candle_core::Result<DpConv> {
    // Checked before any variable is made in the VarBuilder's map.
    check_config(cfg.groups, cfg.dilation)?;
    let weight = vb.get_with_hints((out_c, in_c, k), "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
    let bias = conv_bias(in_c * k, out_c, &vb)?;
    Ok(DpConv::new1d(weight, Some(bias), cfg)?)
}

/// A DP 2-d convolution, as `candle_nn::conv2d` (groups and dilation 1).
///
/// # Errors
/// Candle's, and an error for groups or dilation other than 1.
pub fn conv2d(in_c: usize, out_c: usize, k: usize, cfg: Conv2dConfig, vb: VarBuilder) -> candle_core::Result<DpConv> {
    check_config(cfg.groups, cfg.dilation)?;
    let weight = vb.get_with_hints((out_c, in_c, k, k), "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
    let bias = conv_bias(in_c * k * k, out_c, &vb)?;
    Ok(DpConv::new2d(weight, Some(bias), cfg)?)
}

/// candle-nn's bias initialization: uniform in `+-1/sqrt(fan_in)`.
fn conv_bias(fan_in: usize, out_c: usize, vb: &VarBuilder) -> candle_core::Result<Tensor> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    vb.get_with_hints(out_c, "bias", Init::Uniform { lo: -bound, up: bound })
}

impl DpConv {
    /// A 2-d convolution over existing tensors: `weight [C_out, C_in, k, k]`,
    /// `bias [C_out]` (the variables' own tensors; plain tensors, or `Var`s
    /// no optimizer trains, are frozen).
    ///
    /// # Errors
    /// [`Error::Shape`] for a kernel that is not `[C_out, C_in, k, k]` or a
    /// bias that is not `[C_out]`; an error for groups or dilation other than 1.
    pub fn new2d(weight: Tensor, bias: Option<Tensor>, cfg: Conv2dConfig) -> crate::Result<Self> {
        check_config(cfg.groups, cfg.dilation)?;
        let square = matches!(*weight.dims(), [_, _, kh, kw] if kh == kw);
        let geometry = Geometry { padding: cfg.padding, stride: cfg.stride, spatial: 2 };
        Self::checked(weight, bias, square, ("conv2d weight", "[C_out, C_in, k, k]"), geometry)
    }

    /// A 1-d convolution over existing tensors: `weight [C_out, C_in, k]`,
    /// `bias [C_out]`.
    ///
    /// # Errors
    /// As [`DpConv::new2d`], for a kernel that is not `[C_out, C_in, k]`.
    pub fn new1d(weight: Tensor, bias: Option<Tensor>, cfg: Conv1dConfig) -> crate::Result<Self> {
        check_config(cfg.groups, cfg.dilation)?;
        let rank3 = weight.rank() == 3;
        let geometry = Geometry { padding: cfg.padding, stride: cfg.stride, spatial: 1 };
        Self::checked(weight, bias, rank3, ("conv1d weight", "[C_out, C_in, k]"), geometry)
    }

    /// A convolution over `weight`, refused unless `shape_ok` (`kernel`:
    /// what it is and the shape expected) and the bias is `[C_out]`.
    fn checked(
        weight: Tensor,
        bias: Option<Tensor>,
        shape_ok: bool,
        kernel: (&'static str, &'static str),
        geometry: Geometry,
    ) -> crate::Result<Self> {
        if !shape_ok {
            return Err(Error::Shape { what: kernel.0, expected: kernel.1, got: weight.dims().to_vec() });
        }
        if let Some(b) = bias.as_ref().filter(|b| b.dims() != [weight.dims()[0]]) {
            return Err(Error::Shape { what: "convolution bias", expected: "[C_out]", got: b.dims().to_vec() });
        }
        Ok(Self::new(weight, bias, geometry))
    }

    fn owner(&self) -> Owner {
        self.trace.clone()
    }

    fn new(weight: Tensor, bias: Option<Tensor>, geometry: Geometry) -> Self {
        Self { trace: registry::registered(ConvTrace { weight, bias, geometry, uses: Captures::new() }) }
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
        registry::check_weight_and_bias(&t.weight, t.bias.as_ref())?;
        let Geometry { padding, stride, spatial } = t.geometry;
        let k = t.weight.dim(2)?;
        let w = t.weight.detach();
        let input = x.detach();
        let y = if spatial == 1 {
            input.conv1d(&w, padding, stride, 1, 1)?
        } else {
            input.conv2d(&w, padding, stride, 1, 1)?
        };
        let y = match &t.bias {
            Some(bias) => {
                let mut dims = vec![1; y.rank()];
                dims[1] = bias.dim(0)?;
                y.broadcast_add(&bias.detach().reshape(dims)?)?
            }
            None => y,
        };
        // The output enters the graph through our own op, never Candle's
        // convolution, whose backward would also compute the kernel
        // gradient (recomputed as a clipped sum, or not needed when frozen).
        let anchor = t.trained_parameter();
        let (y, slot) = if x.track_op() {
            let slot: Option<GradSlot> = anchor.map(|_| Arc::new(Mutex::new(None)));
            let capture = slot.clone().map(|s| (s, self.owner()));
            (with_input_grad(&y, x, capture, conv_input_grad(w, t.geometry, x.dims().to_vec()))?, slot)
        } else if let Some(anchor) = anchor {
            let (y, slot) = tap(&y, anchor, self.owner())?;
            (y, Some(slot))
        } else {
            (y, None)
        };
        if let Some(slot) = slot {
            let unfolded = if registry::is_trained(&t.weight) { Some(unfold(&input, k, t.geometry)?) } else { None };
            t.uses.push(LinearUse { x: unfolded, batch: x.dim(0)? }, slot);
        }
        Ok(y)
    }
}

/// The gradient of a convolution's input `[B, C_in, ...]` (of size
/// `input_dims`) from its output's: the transposed convolution with the
/// kernel, as Candle's own backward computes it. `output_padding` restores
/// the input positions past the last window; with different remainders per
/// spatial dimension the larger is used and the result cut to the input
/// size (the transposed convolution's output is then a prefix-preserving
/// extension).
fn conv_input_grad(kernel: Tensor, geometry: Geometry, input_dims: Vec<usize>) -> InputGrad {
    Box::new(move |grad: &Tensor| {
        let Geometry { padding, stride, spatial } = geometry;
        let k = kernel.dim(2)?;
        let covered = |out: usize| (out - 1) * stride + k - 2 * padding;
        if spatial == 1 {
            let output_padding = input_dims[2] - covered(grad.dim(2)?);
            grad.conv_transpose1d(&kernel, padding, output_padding, stride, 1, 1)
        } else {
            let rest_h = input_dims[2] - covered(grad.dim(2)?);
            let rest_w = input_dims[3] - covered(grad.dim(3)?);
            let g = grad.conv_transpose2d(&kernel, padding, rest_h.max(rest_w), stride, 1)?;
            g.narrow(2, 0, input_dims[2])?.narrow(3, 0, input_dims[3])
        }
    })
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
        std::iter::once(&self.weight).chain(&self.bias).find(|p| registry::is_trained(p))
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

    /// `[B, C_out, positions...]` to `[B, T, C_out]`.
    fn output_grad(&self, grad: &Tensor, batch: usize) -> candle_core::Result<Tensor> {
        grad.reshape((batch, self.weight.dim(0)?, ()))?.transpose(1, 2)?.contiguous()
    }
}
