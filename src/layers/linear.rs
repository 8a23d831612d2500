//! The DP linear layer: `y = x W^T + b`, with per-example gradient norms and
//! clipped sums after one ordinary backward pass.
//!
//! Inputs are `[B, d]` or `[B, T, d]` (a sequence per example); outputs
//! `[B, p]` or `[B, T, p]`. The variables are named `weight` (`[p, d]`) and
//! `bias` (`[p]`) and initialized as in `candle_nn::linear`, so a checkpoint
//! loads into the DP model and the plain one alike.
//!
//! # How
//! The product `x W^T` is a fused Candle op over `(x, W)`: its forward is one
//! matmul; its backward stores the output gradient `G` and returns the input
//! gradient only. It returns no weight gradient at all, so Candle does not
//! spend a GEMM on a gradient that DP-SGD recomputes as a clipped sum anyway
//! (measured 4x on forward+backward of a 784x512 layer, `../shared/CANDLE.md`).
//! With `X` the detached input:
//!
//! * `||grad W_i||^2 = <X_i X_i^T, G_i G_i^T>` (Gram form, `O(T^2 (d + p))`),
//!   or `||G_i^T X_i||^2` materialized when `T^2 > d p`; for `T = 1` it is
//!   `||x_i||^2 ||g_i||^2` (Goodfellow 2015; Li et al. 2021, ghost clipping).
//! * `||grad b_i||^2 = ||sum_t g_it||^2`.
//! * `sum_i c_i grad W_i = (c . G)^T X`, one matmul (Bu et al. 2023).
//!
//! A layer applied several times in one step accounts all uses: they are
//! concatenated along `T`, since the per-example gradient is the sum over uses.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Module, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

use super::tap::{lock, Captures, GradSlot};
use crate::grad_sample::registry::{self, GhostLayer};
use crate::kernels::{clip_accumulate, squared_norms};

#[derive(Debug)]
struct LinearTrace {
    weight: Tensor,
    bias: Option<Tensor>,
    /// Per use: the detached input as `[B, T, d]`.
    uses: Captures<Tensor>,
}

/// A linear layer whose per-example gradients can be clipped without being
/// materialized. Construct it with [`linear`] or [`linear_no_bias`].
#[derive(Debug, Clone)]
pub struct DpLinear {
    trace: Arc<LinearTrace>,
}

/// A DP linear layer `in_dim -> out_dim` with bias, initialized as
/// `candle_nn::linear`.
///
/// # Errors
/// Candle's, if `vb` cannot provide the variables.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<DpLinear> {
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
    let bound = 1.0 / (in_dim as f64).sqrt();
    let bias = vb.get_with_hints(out_dim, "bias", Init::Uniform { lo: -bound, up: bound })?;
    Ok(DpLinear::new(weight, Some(bias)))
}

/// A DP linear layer without bias, initialized as `candle_nn::linear_no_bias`.
///
/// # Errors
/// Candle's, if `vb` cannot provide the variable.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<DpLinear> {
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
    Ok(DpLinear::new(weight, None))
}

impl DpLinear {
    /// A layer over existing tensors: `weight [out, in]`, `bias [out]`.
    /// Pass the variables' own tensors (as a `VarBuilder` hands them out):
    /// the ghost engine finds a layer by its variables' ids.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { trace: registry::registered(LinearTrace { weight, bias, uses: Captures::new() }) }
    }

    /// The weight, `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.trace.weight
    }

    /// The bias, `[out]`.
    pub fn bias(&self) -> Option<&Tensor> {
        self.trace.bias.as_ref()
    }
}

impl Module for DpLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, time, d, seq) = match *x.dims() {
            [b, d] => (b, 1, d, false),
            [b, t, d] => (b, t, d, true),
            _ => {
                return Err(candle_core::Error::UnexpectedNumberOfDims {
                    expected: 2,
                    got: x.rank(),
                    shape: x.shape().clone(),
                })
            }
        };
        let p = self.trace.weight.dim(0)?;
        let grad: GradSlot = Arc::new(Mutex::new(None));
        self.trace.uses.push(x.detach().reshape((batch, time, d))?, grad.clone());
        let y = x.reshape((batch * time, d))?.apply_op2(&self.trace.weight, LinearOp { grad })?;
        let y = match &self.trace.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        if seq {
            y.reshape((batch, time, p))
        } else {
            Ok(y)
        }
    }
}

/// `x W^T` that captures its output gradient and returns no weight gradient.
struct LinearOp {
    grad: GradSlot,
}

/// `x W^T` on any backend: one matmul against the transposed layout of `W`.
fn linear_fwd<S: BackendStorage>(x: &S, xl: &Layout, w: &S, wl: &Layout) -> candle_core::Result<(S, Shape)> {
    let (m, k) = xl.shape().dims2()?;
    let (n, k2) = wl.shape().dims2()?;
    if k != k2 {
        return Err(candle_core::Error::ShapeMismatchBinaryOp {
            lhs: xl.shape().clone(),
            rhs: wl.shape().clone(),
            op: "candle-dp-linear",
        });
    }
    let out = x.matmul(w, (1, m, n, k), xl, &wl.transpose(0, 1)?)?;
    Ok((out, Shape::from((m, n))))
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "candle-dp-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        linear_fwd(x, xl, w, wl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        linear_fwd(x, xl, w, wl)
    }

    #[cfg(all(feature = "metal", target_os = "macos"))]
    fn metal_fwd(
        &self,
        x: &candle_core::MetalStorage,
        xl: &Layout,
        w: &candle_core::MetalStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        linear_fwd(x, xl, w, wl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        *lock(&self.grad) = Some(grad.clone());
        let grad_x = if x.track_op() { Some(grad.matmul(w)?) } else { None };
        Ok((grad_x, None))
    }
}

impl LinearMap for LinearTrace {
    fn weight(&self) -> &Tensor {
        &self.weight
    }

    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    fn uses(&self) -> &Captures<Tensor> {
        &self.uses
    }

    fn gathered(&self) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        let p = self.weight.dim(0)?;
        let mut xs = Vec::new();
        let mut gs = Vec::new();
        for (x, g) in self.uses.with_grads() {
            let (b, t, _) = x.dims3()?;
            gs.push(g.reshape((b, t, p))?);
            xs.push(x);
        }
        concat_uses(xs, gs)
    }
}

/// Concatenates the uses of a layer along `T` (dim 1): the per-example
/// gradient of a layer used several times is the sum over its uses.
pub(crate) fn concat_uses(mut xs: Vec<Tensor>, mut gs: Vec<Tensor>) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    match xs.len() {
        0 => Ok(None),
        1 => Ok(xs.pop().zip(gs.pop())),
        _ => Ok(Some((Tensor::cat(&xs, 1)?, Tensor::cat(&gs, 1)?))),
    }
}

/// Per-example squared norms of a linear map's gradients from its inputs
/// `x [B, T, d]` and output gradients `g [B, T, p]`: `[weight, bias?]`.
pub(crate) fn linear_squared_norms(x: &Tensor, g: &Tensor, bias: bool) -> candle_core::Result<Vec<Tensor>> {
    let (_, t, d) = x.dims3()?;
    let p = g.dim(2)?;
    let weight = if t == 1 {
        (squared_norms(&x.squeeze(1)?)? * squared_norms(&g.squeeze(1)?)?)?
    } else if t * t <= d * p {
        let xx = x.matmul(&x.t()?)?;
        let gg = g.matmul(&g.t()?)?;
        (xx * gg)?.sum((1, 2))?
    } else {
        let b = x.dim(0)?;
        squared_norms(&g.t()?.matmul(x)?.reshape((b, p * d))?)?
    };
    let mut norms = vec![weight];
    if bias {
        norms.push(squared_norms(&g.sum(1)?)?);
    }
    Ok(norms)
}

/// `sum_i c_i grad_i` of a linear map's weight `[p, d]` (and bias `[p]`).
pub(crate) fn linear_clipped_sums(x: &Tensor, g: &Tensor, c: &Tensor, bias: bool) -> candle_core::Result<Vec<Tensor>> {
    let (b, t, d) = x.dims3()?;
    let p = g.dim(2)?;
    let gc = g.broadcast_mul(&c.reshape((b, 1, 1))?)?;
    let weight = gc.reshape((b * t, p))?.t()?.matmul(&x.reshape((b * t, d))?)?;
    let mut sums = vec![weight];
    if bias {
        sums.push(clip_accumulate(&g.sum(1)?, c)?);
    }
    Ok(sums)
}

/// A layer that is a linear map over per-example positions: it provides its
/// inputs `X [B, T, d]` and output gradients `G [B, T, p]`, and gets the
/// ghost norms and clipped sums of [`linear_squared_norms`] and
/// [`linear_clipped_sums`] (the weight sum reshaped to the weight's shape).
pub(crate) trait LinearMap: Send + Sync + std::fmt::Debug {
    fn weight(&self) -> &Tensor;
    fn bias(&self) -> Option<&Tensor>;
    fn uses(&self) -> &Captures<Tensor>;
    /// `X` and `G` of the uses that received a gradient, along `T`.
    fn gathered(&self) -> candle_core::Result<Option<(Tensor, Tensor)>>;
}

impl<L: LinearMap> GhostLayer for L {
    fn parameters(&self) -> Vec<Tensor> {
        std::iter::once(self.weight().clone()).chain(self.bias().cloned()).collect()
    }

    fn squared_norms(&self) -> crate::Result<Option<Vec<Tensor>>> {
        let Some((x, g)) = self.gathered()? else {
            return Ok(None);
        };
        Ok(Some(linear_squared_norms(&x, &g, self.bias().is_some())?))
    }

    fn clipped_sums(&self, c: &Tensor) -> crate::Result<Option<Vec<Tensor>>> {
        let Some((x, g)) = self.gathered()? else {
            return Ok(None);
        };
        let mut sums = linear_clipped_sums(&x, &g, c, self.bias().is_some())?;
        sums[0] = sums[0].reshape(self.weight().shape())?;
        Ok(Some(sums))
    }

    fn clear(&self) {
        self.uses().clear();
    }

    fn reset_grads(&self) {
        self.uses().reset_grads();
    }
}
