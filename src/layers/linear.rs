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
//! matmul; its backward returns the input gradient only (and, while the
//! weight is trained, stores the output gradient `G`). It returns no weight
//! gradient at all, so Candle does not spend a GEMM on a gradient that DP-SGD
//! recomputes as a clipped sum anyway (measured 4x on forward+backward of a
//! 784x512 layer, `../shared/CANDLE.md`). With `X` the detached input:
//!
//! * `||grad W_i||^2 = <X_i X_i^T, G_i G_i^T>` (Gram form, `O(T^2 (d + p))`),
//!   or `||G_i^T X_i||^2` materialized when `T^2 > d p`, `T` counting the
//!   positions of every use of the weight; for `T = 1` it is
//!   `||x_i||^2 ||g_i||^2` (Goodfellow 2015; Li et al. 2021, ghost clipping).
//! * `||grad b_i||^2 = ||sum_t g_it||^2`.
//! * `sum_i c_i grad W_i = (c . G)^T X`, one matmul (Bu et al. 2023).
//!
//! A layer applied several times in one step accounts all uses, and a
//! weight shared with other DP layers (tied) is accounted over all of them
//! by the ghost engine ([`crate::grad_sample`]). A layer whose parameters
//! no live optimizer trains records nothing; its backward still gives the
//! input gradient and never computes a weight gradient, so a frozen base
//! weight may be a plain tensor (not a `Var`). With only the bias trained,
//! the layer keeps `G` (through a tap on its output) but not `X`.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

use super::tap::{lock, tap, Captures, GradSlot, Owner};
use crate::error::Error;
use crate::grad_sample::per_example::{Rows, UseGrad};
use crate::grad_sample::registry::{self, GhostLayer};

#[derive(Debug)]
struct LinearTrace {
    weight: Tensor,
    bias: Option<Tensor>,
    uses: Captures<LinearUse>,
}

/// What one use of a linear map saved for its per-example gradients.
#[derive(Debug, Clone)]
pub(crate) struct LinearUse {
    /// The detached input `[B, T, d]`, kept only while the weight is trained.
    pub(crate) x: Option<Tensor>,
    /// The examples in the batch.
    pub(crate) batch: usize,
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
    ///
    /// Several layers may share a weight (tying, e.g. an output projection
    /// over an embedding table: `DpLinear::new(emb.embeddings().clone(), None)`);
    /// the ghost engine clips the sum of all uses. A weight that is a plain
    /// tensor, or a `Var` that no optimizer trains, is frozen.
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

    /// How many forward uses the layer holds activations and gradients of
    /// now (for memory diagnostics): 0 between steps, and always 0 for a
    /// layer no live optimizer trains.
    pub fn captured_uses(&self) -> usize {
        self.trace.uses.len()
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
        let t = &self.trace;
        registry::check_weight_and_bias(&t.weight, t.bias.as_ref())?;
        let p = t.weight.dim(0)?;
        let flat = x.reshape((batch * time, d))?;
        let weight_trained = registry::is_trained(&t.weight);
        // Parameters enter detached (Candle computes no gradient for them);
        // a trained weight is the op's second input so that the op is in
        // the graph and its backward captures the output gradient.
        let mut y = if weight_trained {
            let grad: GradSlot = Arc::new(Mutex::new(None));
            t.uses.push(LinearUse { x: Some(x.detach().reshape((batch, time, d))?), batch }, grad.clone());
            flat.apply_op2(&t.weight, LinearOp { grad: Some(grad), _owner: Some(self.trace.clone()) })?
        } else {
            flat.apply_op2(&t.weight.detach(), LinearOp { grad: None, _owner: None })?
        };
        if let Some(b) = &t.bias {
            y = y.broadcast_add(&b.detach())?;
            if !weight_trained && registry::is_trained(b) {
                let (tapped, slot) = tap(&y, b, self.trace.clone())?;
                t.uses.push(LinearUse { x: None, batch }, slot);
                y = tapped;
            }
        }
        if seq {
            y.reshape((batch, time, p))
        } else {
            Ok(y)
        }
    }
}

/// `x W^T` that returns no weight gradient, and captures its output
/// gradient when given a slot.
struct LinearOp {
    grad: Option<GradSlot>,
    _owner: Option<Owner>,
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
        if let Some(slot) = &self.grad {
            // Detached: with CANDLE_GRAD_DO_NOT_DETACH the gradient would keep
            // its graph, which holds this op's layer: a cycle.
            *lock(slot) = Some(grad.detach());
        }
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

    fn uses(&self) -> &Captures<LinearUse> {
        &self.uses
    }

    fn output_grad(&self, grad: &Tensor, batch: usize) -> candle_core::Result<Tensor> {
        grad.reshape((batch, (), self.weight.dim(0)?))
    }
}

/// A layer that is a linear map over per-example positions: each use gives
/// its inputs `X [B, T, d]` (while the weight is trained) and output
/// gradients `G [B, T, p]`, and the weight's per-example gradient is
/// `G_i^T X_i` (reshaped to the weight's shape), the bias's `sum_t g_it`.
pub(crate) trait LinearMap: Send + Sync + std::fmt::Debug {
    fn weight(&self) -> &Tensor;
    fn bias(&self) -> Option<&Tensor>;
    fn uses(&self) -> &Captures<LinearUse>;
    /// A use's captured output gradient as `G [B, T, p]`.
    fn output_grad(&self, grad: &Tensor, batch: usize) -> candle_core::Result<Tensor>;
}

impl<L: LinearMap> GhostLayer for L {
    fn parameters(&self) -> Vec<Tensor> {
        std::iter::once(self.weight().clone()).chain(self.bias().cloned()).collect()
    }

    fn per_example_grads(&self) -> crate::Result<Vec<Vec<UseGrad>>> {
        let bias = self.bias().is_some_and(registry::is_trained);
        let weight = registry::is_trained(self.weight());
        let (mut weight_uses, mut bias_uses) = (Vec::new(), Vec::new());
        for (saved, grad) in self.uses().with_grads() {
            let g = self.output_grad(&grad, saved.batch)?;
            if bias {
                // In f64: the sum over positions decides the bias's norm.
                bias_uses.push(UseGrad::Materialized(g.to_dtype(DType::F64)?.sum(1)?));
            }
            match (saved.x, weight) {
                (Some(x), true) => weight_uses.push(UseGrad::Outer { rows: Rows::Dense(g), cols: x }),
                (None, true) => return Err(Error::CaptureMismatch { what: "weight" }),
                (_, false) => {}
            }
        }
        Ok(std::iter::once(weight_uses).chain(self.bias().map(|_| bias_uses)).collect())
    }

    fn clear(&self) {
        self.uses().clear();
    }

    fn reset_grads(&self) {
        self.uses().reset_grads();
    }
}
