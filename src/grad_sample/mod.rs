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
//!
//! # Who owns what (ghost engine)
//! * **A variable may have several users.** Every DP layer registers itself
//!   as a user of its parameter tensors (by id). A variable used by several
//!   DP layers (an embedding table reused as the output projection, one
//!   weight shared by two linears) or by one layer several times gets the
//!   per-example gradient of the sum of all uses: its norm includes the
//!   cross terms between uses (Gram form, or materialized where that is
//!   cheaper), and its clipped sum adds every use's part.
//! * **An engine claims what it trains.** [`ghost::GhostEngine::new`] (the
//!   optimizer's builder calls it) claims each (layer, parameter) of its
//!   variables for as long as the engine lives. A DP layer captures only for
//!   claimed parameters: a layer none of whose parameters a live engine
//!   trains (a frozen base over plain tensors, or `Var`s no optimizer was
//!   given) keeps nothing, and its backward computes the input gradient
//!   only, never a weight gradient. When the last engine goes, its layers
//!   drop what they held.
//! * **Every layer used in a batch is cleared after it.** A clip call
//!   clears the captures of every layer that uses one of its variables,
//!   whether it succeeds or not, so memory does not grow across steps.
//! * **Nothing is dropped silently.** A trainable variable that no live DP
//!   layer uses is refused when the engine is built; one that received no
//!   gradient, or that also reached the loss through a plain Candle op
//!   (whose per-example part is unknown), is an error for that step.
//! * Layers that share a variable form one group for per-layer clipping.

pub mod ghost;
pub mod microbatch;
pub(crate) mod per_example;
pub(crate) mod registry;
