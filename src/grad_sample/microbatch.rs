//! The microbatch engine: any Candle model, one example at a time.
//!
//! It needs no DP layer: each example's loss is differentiated on its own,
//! its gradient read, clipped and added. `B` backward passes make it slow;
//! it is the universal fallback, and the oracle the ghost engine is tested
//! against. Use plain candle-nn layers with it: DP layers deliberately give
//! Candle no weight gradient, so the optimizer refuses variables that a DP
//! layer uses ([`check_plain`]).

use candle_core::{DType, Tensor, Var};

use super::ghost::ClippedBatch;
use super::per_example::work_dtype;
use crate::clip::{check_max_grad_norm, clip_factor};
use crate::error::{Error, Result};

/// Checks that no live DP layer uses any of `vars`: the microbatch engine
/// reads Candle's gradients, which DP layers never produce for their
/// parameters (a DP use of a variable that a plain op also uses would be
/// dropped).
///
/// # Errors
/// [`Error::DpLayerInMicrobatch`] naming the first such variable.
pub fn check_plain(vars: &[Var]) -> Result<()> {
    match vars.iter().position(|v| !super::registry::users(v.id()).is_empty()) {
        Some(index) => Err(Error::DpLayerInMicrobatch { index, shape: vars[index].dims().to_vec() }),
        None => Ok(()),
    }
}

/// Clips each of `batch_size` examples' gradients (of `loss_of(i)`, a scalar)
/// with respect to `vars` to norm `max_grad_norm`, and sums them.
///
/// # Errors
/// [`Error::NonFinite`] for a NaN or infinite loss or gradient norm;
/// [`Error::Shape`] if a loss is not a scalar; Candle's errors otherwise.
pub fn clip_microbatch<E: Into<Error>>(
    vars: &[Var],
    batch_size: usize,
    mut loss_of: impl FnMut(usize) -> std::result::Result<Tensor, E>,
    max_grad_norm: f64,
) -> Result<ClippedBatch> {
    check_max_grad_norm(max_grad_norm)?;
    // Sums in at least f32, as the ghost engine's.
    let mut sums: Vec<Tensor> =
        vars.iter().map(|v| v.zeros_like()?.to_dtype(work_dtype(v.dtype()))).collect::<candle_core::Result<_>>()?;
    let mut norms = Vec::with_capacity(batch_size);
    let mut received = vec![false; vars.len()];
    for i in 0..batch_size {
        let loss = loss_of(i).map_err(Into::into)?;
        if loss.rank() != 0 {
            return Err(Error::Shape { what: "microbatch loss", expected: "a scalar", got: loss.dims().to_vec() });
        }
        if !loss.to_dtype(DType::F64)?.to_scalar::<f64>()?.is_finite() {
            return Err(Error::NonFinite { what: "loss", sample: i });
        }
        let grads = loss.backward()?;
        let mut per_var = Vec::with_capacity(vars.len());
        for (k, v) in vars.iter().enumerate() {
            per_var.push(match grads.get(v.as_tensor()) {
                Some(g) => {
                    received[k] = true;
                    g.clone()
                }
                None => v.zeros_like()?,
            });
        }
        let mut sq = 0.0;
        for g in &per_var {
            sq += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
        }
        let norm = sq.sqrt();
        if !norm.is_finite() {
            return Err(Error::NonFinite { what: "gradient norm", sample: i });
        }
        let c = clip_factor(norm, max_grad_norm);
        for (s, g) in sums.iter_mut().zip(&per_var) {
            *s = (&*s + g.to_dtype(s.dtype())?.affine(c, 0.0)?)?;
        }
        norms.push(norm);
    }
    // A variable no example's loss reaches is a wiring error (or a DP layer,
    // which gives Candle no weight gradient): never train it silently on noise.
    if let Some(index) = received.iter().position(|r| !r) {
        if batch_size > 0 {
            return Err(Error::MissingGradient { index, shape: vars[index].dims().to_vec() });
        }
    }
    Ok(ClippedBatch { clipped_sums: sums, norms })
}
