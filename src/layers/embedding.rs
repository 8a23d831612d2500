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
//!
//! Tied to an output projection `logits = h W^T` with output gradient `g'`,
//! the squared norm of the summed gradient adds twice the cross term
//! `sum_{t,s} g'_s[id_t] <g_t, h_s>` ([`crate::grad_sample`]).

use std::sync::Arc;

use candle_core::{DType, Module, Tensor};
use candle_nn::{Init, VarBuilder};

use super::tap::{tap, Captures};
use crate::grad_sample::per_example::{Rows, UseGrad};
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
    /// A layer over an existing table `[V, d]` (the variable's own tensor;
    /// a plain tensor, or a `Var` no optimizer trains, is frozen). The table
    /// may also be the weight of other DP layers (tied, e.g. the output
    /// projection `DpLinear::new(emb.embeddings().clone(), None)`).
    pub fn new(weight: Tensor) -> Self {
        Self { trace: registry::registered(EmbeddingTrace { weight, uses: Captures::new() }) }
    }

    /// The table, `[V, d]`.
    pub fn embeddings(&self) -> &Tensor {
        &self.trace.weight
    }

    /// How many forward uses the layer holds activations and gradients of
    /// now (for memory diagnostics): 0 between steps, and always 0 for a
    /// layer no live optimizer trains.
    pub fn captured_uses(&self) -> usize {
        self.trace.uses.len()
    }
}

impl Module for DpEmbedding {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        registry::check_parameter(&self.trace.weight, "embedding table")?;
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
        if !registry::is_trained(&self.trace.weight) {
            return Ok(out);
        }
        let (out, slot) = tap(&out, &self.trace.weight, self.trace.clone())?;
        self.trace.uses.push(flat.to_dtype(DType::U32)?.reshape((b, t))?, slot);
        Ok(out)
    }
}

impl GhostLayer for EmbeddingTrace {
    fn parameters(&self) -> Vec<Tensor> {
        vec![self.weight.clone()]
    }

    /// Rows one-hot at the ids, columns the output gradients `[B, T, d]`.
    fn per_example_grads(&self) -> crate::Result<Vec<Vec<UseGrad>>> {
        let d = self.weight.dim(1)?;
        let mut uses = Vec::new();
        for (ids, g) in self.uses.with_grads() {
            let (b, t) = ids.dims2()?;
            uses.push(UseGrad::Outer { rows: Rows::OneHot(ids), cols: g.reshape((b, t, d))? });
        }
        Ok(vec![uses])
    }

    fn clear(&self) {
        self.uses.clear();
    }

    fn reset_grads(&self) {
        self.uses.reset_grads();
    }
}
