//! The ghost (book-keeping) engine over DP layers: one forward, one
//! backward, no per-example gradient of a large layer materialized.

use std::sync::Arc;

use candle_core::{DType, Tensor, Var};

use super::registry::{self, GhostLayer};
use crate::clip::{clip_factor, ClipMode};
use crate::error::{Error, Result};
use crate::loss::PerSampleLoss;

/// The result of one physical batch: what the optimizer accumulates.
#[derive(Debug, Clone)]
pub struct ClippedBatch {
    /// `sum_i c_i g_i` for each variable, in the variables' order.
    pub clipped_sums: Vec<Tensor>,
    /// Each example's gradient norm before clipping (over all variables).
    pub norms: Vec<f64>,
}

/// A DP layer, and for each of its parameters the index of the optimizer
/// variable it is (`None` for a frozen parameter).
type OwnedLayer = (Arc<dyn GhostLayer>, Vec<Option<usize>>);

/// The DP layers owning a list of variables, with where each parameter goes.
#[derive(Debug, Clone)]
pub struct GhostEngine {
    layers: Vec<OwnedLayer>,
    shapes: Vec<Vec<usize>>,
}

impl GhostEngine {
    /// Finds the DP layer of every variable.
    ///
    /// # Errors
    /// [`Error::UnownedVariable`] for a variable no live DP layer owns.
    pub fn new(vars: &[Var]) -> Result<Self> {
        let mut layers: Vec<OwnedLayer> = Vec::new();
        for (index, var) in vars.iter().enumerate() {
            let owner = registry::owner(var.id())
                .ok_or_else(|| Error::UnownedVariable { index, shape: var.dims().to_vec() })?;
            let params = owner.parameters();
            let slot = layers.iter().position(|(l, _)| Arc::ptr_eq(l, &owner)).unwrap_or_else(|| {
                layers.push((owner.clone(), vec![None; params.len()]));
                layers.len() - 1
            });
            if let Some(k) = params.iter().position(|p| p.id() == var.id()) {
                layers[slot].1[k] = Some(index);
            }
        }
        Ok(Self { layers, shapes: vars.iter().map(|v| v.dims().to_vec()).collect() })
    }

    /// The number of DP layers (for per-layer clipping).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Backward of the summed per-example losses, then per-example norms and
    /// clipped sums. The DP layers' captures are cleared whatever happens.
    ///
    /// # Errors
    /// [`Error::NonFinite`] for a NaN or infinite loss or gradient norm;
    /// [`Error::MissingGradient`] for a variable whose layer was not used.
    pub fn clip(&self, losses: &PerSampleLoss, clipping: &ClipMode, max_grad_norm: f64) -> Result<ClippedBatch> {
        let result = self.clip_inner(losses, clipping, max_grad_norm);
        for (layer, _) in &self.layers {
            layer.clear();
        }
        result
    }

    fn clip_inner(&self, losses: &PerSampleLoss, clipping: &ClipMode, max_grad_norm: f64) -> Result<ClippedBatch> {
        let b = losses.len();
        if b == 0 {
            return Err(Error::Shape {
                what: "per-sample losses",
                expected: "at least one example (for an empty Poisson batch call accumulate_empty)",
                got: vec![0],
            });
        }
        let values = losses.tensor().to_dtype(DType::F64)?.to_vec1::<f64>()?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite { what: "loss", sample: i });
        }
        // Only this backward counts: drop anything a backward of the caller's
        // own left in the layers. The per-example gradients of the sum are the
        // per-example gradients.
        for (layer, _) in &self.layers {
            layer.reset_grads();
        }
        let _ = losses.tensor().sum_all()?.backward()?;

        // Squared norms per layer (only parameters that are trained count).
        let mut layer_sq: Vec<Vec<f64>> = Vec::with_capacity(self.layers.len());
        for (layer, slots) in &self.layers {
            let norms = layer.squared_norms()?;
            let mut sq = vec![0.0; b];
            for (k, slot) in slots.iter().enumerate() {
                let Some(index) = slot else { continue };
                let Some(n) = norms.as_ref().map(|n| &n[k]) else {
                    return Err(Error::MissingGradient { index: *index, shape: self.shapes[*index].clone() });
                };
                for (acc, v) in sq.iter_mut().zip(n.to_dtype(DType::F64)?.to_vec1::<f64>()?) {
                    *acc += v;
                }
            }
            layer_sq.push(sq);
        }
        let norms: Vec<f64> = (0..b).map(|i| layer_sq.iter().map(|l| l[i]).sum::<f64>().sqrt()).collect();
        if let Some(i) = norms.iter().position(|n| !n.is_finite()) {
            return Err(Error::NonFinite { what: "gradient norm", sample: i });
        }

        let mut clipped_sums: Vec<Option<Tensor>> = vec![None; self.shapes.len()];
        for (l, (layer, slots)) in self.layers.iter().enumerate() {
            let factors: Vec<f64> = match clipping {
                ClipMode::Flat => norms.iter().map(|n| clip_factor(*n, max_grad_norm)).collect(),
                ClipMode::PerLayer(t) => layer_sq[l].iter().map(|s| clip_factor(s.sqrt(), t[l])).collect(),
            };
            let Some(dtype_device) = layer.parameters().first().map(|p| (p.dtype(), p.device().clone())) else {
                continue;
            };
            let c = Tensor::from_vec(factors, b, &dtype_device.1)?.to_dtype(dtype_device.0)?;
            let sums = layer.clipped_sums(&c)?;
            for (k, slot) in slots.iter().enumerate() {
                if let (Some(index), Some(s)) = (slot, sums.as_ref().map(|s| &s[k])) {
                    clipped_sums[*index] = Some(s.clone());
                }
            }
        }
        let clipped_sums = clipped_sums
            .into_iter()
            .enumerate()
            .map(|(index, s)| s.ok_or_else(|| Error::MissingGradient { index, shape: self.shapes[index].clone() }))
            .collect::<Result<Vec<_>>>()?;
        Ok(ClippedBatch { clipped_sums, norms })
    }
}
