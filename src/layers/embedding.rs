//! The DP embedding: a lookup table whose per-example gradient norms come
//! from token equality, never from a `[B, V, d]` tensor.
//!
//! Ids are `[B]` or `[B, T]` (any integer dtype Candle indexes with);
//! outputs `[B, d]` or `[B, T, d]`. The variable is `weight` (`[V, d]`),
//! initialized as `candle_nn::embedding` (standard normal).
//!
//! # How
//! The lookup reads a detached copy of the table (so Candle builds no
//! `[V, d]` gradient) and a tap captures the output gradient `G`. Example
//! `i`'s gradient puts `sum_{t: id_t = v} g_t` in row `v`, so
//!
//! * `||grad_i||^2 = sum_{t,s} [id_t = id_s] <g_t, g_s>` (`O(T^2 d)`);
//! * `sum_i c_i grad_i = zeros(V, d).index_add(ids, c . G)`.

use std::sync::Arc;

use candle_core::{DType, Module, Tensor};
use candle_nn::{Init, VarBuilder};

use super::linear::concat_uses;
use super::tap::{tap, Captures};
use crate::grad_sample::registry::{self, GhostLayer};

#[derive(Debug)]
struct EmbeddingTrace {
    weight: Tensor,
    /// Per use: the ids as `[B, T]` (u32).
    uses: Captures<Tensor>,
}

/// A DP embedding table. Construct it with [`embedding`].
#[derive(Debug, Clone)]
pub struct DpEmbedding {
    trace: Arc<EmbeddingTrace>,
}

/// A DP embedding of `in_size` tokens into `out_size` dimensions,
/// initialized as `candle_nn::embedding`.
///
/// # Errors
/// Candle's, if `vb` cannot provide the variable.
pub fn embedding(in_size: usize, out_size: usize, vb: VarBuilder) -> candle_core::Result<DpEmbedding> {
    let weight = vb.get_with_hints((in_size, out_size), "weight", Init::Randn { mean: 0.0, stdev: 1.0 })?;
    Ok(DpEmbedding::new(weight))
}

impl DpEmbedding {
    /// A layer over an existing table `[V, d]` (the variable's own tensor).
    pub fn new(weight: Tensor) -> Self {
        Self { trace: registry::registered(EmbeddingTrace { weight, uses: Captures::new() }) }
    }

    /// The table, `[V, d]`.
    pub fn embeddings(&self) -> &Tensor {
        &self.trace.weight
    }
}

impl Module for DpEmbedding {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = match *ids.dims() {
            [b] => (b, 1),
            [b, t] => (b, t),
            _ => {
                return Err(candle_core::Error::UnexpectedNumberOfDims {
                    expected: 2,
                    got: ids.rank(),
                    shape: ids.shape().clone(),
                })
            }
        };
        let d = self.trace.weight.dim(1)?;
        let mut dims = ids.dims().to_vec();
        dims.push(d);
        let flat = ids.flatten_all()?;
        let out = self.trace.weight.detach().index_select(&flat, 0)?.reshape(dims)?;
        let (out, slot) = tap(&out, &self.trace.weight)?;
        self.trace.uses.push(flat.to_dtype(DType::U32)?.reshape((b, t))?, slot);
        Ok(out)
    }
}

impl EmbeddingTrace {
    /// Ids `[B, T]` and gradients `[B, T, d]` of every use, along `T`.
    fn gathered(&self) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        let d = self.weight.dim(1)?;
        let mut ids = Vec::new();
        let mut gs = Vec::new();
        for (i, g) in self.uses.with_grads() {
            let (b, t) = i.dims2()?;
            gs.push(g.reshape((b, t, d))?);
            ids.push(i);
        }
        concat_uses(ids, gs)
    }
}

impl GhostLayer for EmbeddingTrace {
    fn parameters(&self) -> Vec<Tensor> {
        vec![self.weight.clone()]
    }

    fn squared_norms(&self) -> crate::Result<Option<Vec<Tensor>>> {
        let Some((ids, g)) = self.gathered()? else {
            return Ok(None);
        };
        let t = ids.dim(1)?;
        let norms = if t == 1 {
            crate::kernels::squared_norms(&g.squeeze(1)?)?
        } else {
            let same = ids.unsqueeze(2)?.broadcast_eq(&ids.unsqueeze(1)?)?.to_dtype(g.dtype())?;
            (g.matmul(&g.t()?)? * same)?.sum((1, 2))?
        };
        Ok(Some(vec![norms]))
    }

    fn clipped_sums(&self, c: &Tensor) -> crate::Result<Option<Vec<Tensor>>> {
        let Some((ids, g)) = self.gathered()? else {
            return Ok(None);
        };
        let (b, t, d) = g.dims3()?;
        let gc = g.broadcast_mul(&c.reshape((b, 1, 1))?)?.reshape((b * t, d))?;
        let sum = self.weight.zeros_like()?.index_add(&ids.flatten_all()?, &gc, 0)?;
        Ok(Some(vec![sum]))
    }

    fn clear(&self) {
        self.uses.clear();
    }

    fn reset_grads(&self) {
        self.uses.reset_grads();
    }
}
