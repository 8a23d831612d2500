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
//!   cheaper), and its clipped sum adds every use's part. The users are
//!   looked up again on every batch, so a layer built after the optimizer
//!   (a tied projection made inside `forward`) counts; the op it put in the
//!   autograd graph keeps it and its captures alive until the clip.
//! * **An engine claims the variables it trains.** [`ghost::GhostEngine::new`]
//!   (the optimizer's builder calls it) claims its variables' ids for as long
//!   as the engine or a clone lives. A DP layer captures only for claimed
//!   parameters: a layer none of whose parameters is claimed (a frozen base
//!   over plain tensors, or `Var`s no optimizer was given) keeps nothing,
//!   and its backward computes the input gradient only, never a weight
//!   gradient; with only its bias claimed it keeps its output gradient, not
//!   its input. When the last engine goes, layers nobody trains any more
//!   drop what they held. A layer is trained by one engine at a time
//!   ([`crate::Error::LayerTrainedTwice`]): captures belong to the layer.
//! * **Every layer used in a batch is cleared after it.** A clip call
//!   clears the captures of every layer that uses one of its variables,
//!   whether it succeeds or not, so memory does not grow across steps. One
//!   batch at a time: two threads stepping one model would mix captures.
//! * **Nothing is dropped silently.** A trainable variable that no live DP
//!   layer uses is refused when the engine is built and at every batch; one
//!   that received no gradient, that also reached the loss through a plain
//!   Candle op (whose per-example part is unknown), or whose layer's uses
//!   came from another batch is an error for that step; a layer parameter
//!   computed from a variable (`w.t()`) is refused at its forward.
//! * **Norms are upper bounds.** See [`per_example`]'s rounding section:
//!   the worst-case rounding error of each norm is added, and half precision
//!   is widened, so the margin below `C` is never spent on rounding.
//! * Layers that share a variable form one group for per-layer clipping.

pub mod ghost;
pub mod microbatch;
pub mod per_example;
pub(crate) mod registry;
