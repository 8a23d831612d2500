//! A pass-through op that captures the gradient of a layer's output, and
//! the per-layer list of captures.
//!
//! The tap sits on a layer's output with one of the layer's variables as a
//! second, unused input: that makes the output part of the autograd graph
//! even when the layer computed it from detached parameters (so Candle
//! computes no parameter gradient), and its backward stores the incoming
//! gradient and passes it through unchanged.
//!
//! [`with_input_grad`] is the same op over an output computed without any
//! graph and the layer's input: its backward hands the input the gradient a
//! closure computes (a convolution's transpose), so Candle's own backward,
//! which would also compute the kernel gradient, never runs.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use crate::grad_sample::registry::GhostLayer;

/// Where one use's output gradient lands.
pub(crate) type GradSlot = Arc<Mutex<Option<Tensor>>>;

/// Locks a mutex whose data stays valid even if a holder panicked.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The layer a capture belongs to, held by the op in the autograd graph: a
/// layer made inside `forward` and dropped at its end (a tied projection)
/// lives, with its captures, as long as the graph that will be clipped.
pub(crate) type Owner = Arc<dyn GhostLayer>;

/// `x`, unchanged, with its gradient captured for `owner`; `anchor` must be
/// a variable of the layer (passed as the variable's own tensor).
pub(crate) fn tap(x: &Tensor, anchor: &Tensor, owner: Owner) -> candle_core::Result<(Tensor, GradSlot)> {
    let slot: GradSlot = Arc::new(Mutex::new(None));
    let y = x.apply_op2(anchor, TapOp { slot: Some(slot.clone()), input_grad: None, _owner: Some(owner) })?;
    Ok((y, slot))
}

/// The gradient of a layer's input from the gradient of its output.
pub(crate) type InputGrad = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

/// `y` (computed from detached tensors), in the graph through the layer's
/// input `x`: backward gives `x` the gradient `input_grad(grad)` and, with
/// a capture (slot and owner), captures `grad`.
pub(crate) fn with_input_grad(
    y: &Tensor,
    x: &Tensor,
    capture: Option<(GradSlot, Owner)>,
    input_grad: InputGrad,
) -> candle_core::Result<Tensor> {
    let (slot, owner) = capture.unzip();
    y.apply_op2(x, TapOp { slot, input_grad: Some(input_grad), _owner: owner })
}

/// A contiguous copy of `x` read through its layout, on a device backend.
#[cfg(any(feature = "cuda", all(feature = "metal", target_os = "macos")))]
fn copy_by_layout<S>(x: &S, xl: &Layout) -> candle_core::Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    // SAFETY: `copy_strided_src` writes every element of the freshly
    // allocated buffer (it has exactly `xl.shape()` elements) before any read.
    let mut out = unsafe { x.device().alloc_uninit(xl.shape(), x.dtype())? };
    x.copy_strided_src(&mut out, 0, xl)?;
    Ok((out, xl.shape().clone()))
}

struct TapOp {
    slot: Option<GradSlot>,
    /// `None`: the second input only anchors the graph and gets no gradient.
    input_grad: Option<InputGrad>,
    _owner: Option<Owner>,
}

impl CustomOp2 for TapOp {
    fn name(&self) -> &'static str {
        "candle-dp-tap"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        // Copy by layout: `try_clone` ignores the layout of a narrowed or
        // transposed view on CPU (../shared/CANDLE.md). Zeroed rather than
        // uninitialized: no unsafe on the reference path.
        let mut out = candle_core::cpu_backend::CpuDevice.zeros_impl(xl.shape(), x.dtype())?;
        x.copy_strided_src(&mut out, 0, xl)?;
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        copy_by_layout(x, xl)
    }

    #[cfg(all(feature = "metal", target_os = "macos"))]
    fn metal_fwd(
        &self,
        x: &candle_core::MetalStorage,
        xl: &Layout,
        _: &candle_core::MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        copy_by_layout(x, xl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        second: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if let Some(slot) = &self.slot {
            // Detached: with CANDLE_GRAD_DO_NOT_DETACH the gradient would keep
            // its graph, which holds this op's layer: a cycle.
            *lock(slot) = Some(grad.detach());
        }
        let second_grad = match &self.input_grad {
            Some(f) if second.track_op() => Some(f(grad)?),
            _ => None,
        };
        Ok((x.track_op().then(|| grad.clone()), second_grad))
    }
}

/// The uses of a layer since its last clear: what each saved, and its slot.
#[derive(Debug, Default)]
pub(crate) struct Captures<S> {
    uses: Mutex<Vec<(S, GradSlot)>>,
}

impl<S: Clone> Captures<S> {
    pub(crate) fn new() -> Self {
        Self { uses: Mutex::new(Vec::new()) }
    }

    /// Records a use; drops earlier uses whose graph is gone (an evaluation
    /// forward can never receive a gradient) with their activations.
    pub(crate) fn push(&self, saved: S, slot: GradSlot) {
        let mut uses = lock(&self.uses);
        uses.retain(|(_, s)| Arc::strong_count(s) > 1 || lock(s).is_some());
        uses.push((saved, slot));
    }

    /// The uses that received a gradient, with it.
    pub(crate) fn with_grads(&self) -> Vec<(S, Tensor)> {
        lock(&self.uses).iter().filter_map(|(saved, slot)| lock(slot).clone().map(|g| (saved.clone(), g))).collect()
    }

    pub(crate) fn clear(&self) {
        lock(&self.uses).clear();
    }

    /// The uses held now.
    pub(crate) fn len(&self) -> usize {
        lock(&self.uses).len()
    }

    /// Forgets the gradients received so far, keeping the uses.
    pub(crate) fn reset_grads(&self) {
        for (_, slot) in lock(&self.uses).iter() {
            *lock(slot) = None;
        }
    }
}
