//! Per-sample gradients: their norms and their clipped sum, by two engines
//! with one contract.
//!
//! For one physical batch, an engine returns the per-example squared
//! gradient norms (summed over a group of parameters) and, given clip
//! factors `c [B]`, the clipped sum `sum_i c_i g_i` for every parameter.
//!
//! * [`ghost`] (default): DP layers record their inputs and capture their
//!   output gradients during the ordinary forward and backward; norms come
//!   from Gram products (Goodfellow 2015; Li et al. 2021) and the clipped sum
//!   is one weighted matmul per layer (Bu et al. 2023). One backward pass.
//! * [`microbatch`]: any Candle model, one example at a time. Slow, exact,
//!   and the oracle every test of the ghost engine is checked against.

pub mod ghost;
pub mod microbatch;
pub(crate) mod registry;
