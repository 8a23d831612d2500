//! Which DP layers use which variable, and which variables an engine trains.
//!
//! DP layers keep the constructors of candle-nn (`linear(in, out, vb)`), so
//! they cannot be handed a registry; instead each registers itself, by the
//! ids of its parameter tensors, in this process-wide table of weak
//! references. A variable may have several users (tied weights, one table
//! used as embedding and output projection). The ghost engine looks every
//! trainable variable up here on every step, so a layer built after the
//! optimizer (a tied projection made inside `forward`) counts too.
//!
//! An engine *claims* the ids of the variables it trains for as long as it
//! lives ([`Claims`]). A layer captures what a parameter's per-example
//! gradients need only while that parameter is claimed: a layer nobody
//! trains records nothing. A layer may be trained by one engine at a time
//! (captures are the layer's, and an engine clears them after each batch).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use candle_core::{Tensor, TensorId};

use super::per_example::UseGrad;
use crate::error::{Error, Result};

/// What the ghost engine needs from a DP layer.
pub(crate) trait GhostLayer: Send + Sync + std::fmt::Debug {
    /// The layer's parameters, in a fixed order.
    fn parameters(&self) -> Vec<Tensor>;
    /// For each parameter (same order), the per-example gradients of the
    /// uses captured since the last [`GhostLayer::clear`] that received a
    /// gradient; empty for a parameter that was not captured.
    ///
    /// # Errors
    /// [`Error::CaptureMismatch`] if a parameter trained now was not
    /// trained when one of its uses was captured.
    fn per_example_grads(&self) -> Result<Vec<Vec<UseGrad>>>;
    /// Forgets the captured uses.
    fn clear(&self);
    /// Forgets the gradients captured so far (before the engine's own backward).
    fn reset_grads(&self);
}

#[derive(Default)]
struct Table {
    users: HashMap<TensorId, Vec<Weak<dyn GhostLayer>>>,
    /// The engine (its token, shared by its clones) that trains a variable.
    claims: HashMap<TensorId, u64>,
}

fn lock() -> MutexGuard<'static, Table> {
    static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
    // A panic while holding the lock cannot leave the maps inconsistent
    // (every change is a single insert or removal), so poisoning is ignored.
    TABLE.get_or_init(|| Mutex::new(Table::default())).lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Table {
    fn live_users(&self, id: TensorId) -> Vec<Arc<dyn GhostLayer>> {
        self.users.get(&id).map(|users| users.iter().filter_map(Weak::upgrade).collect()).unwrap_or_default()
    }
}

/// Registers `layer` as a user of its parameters.
pub(crate) fn register(layer: &Arc<dyn GhostLayer>) {
    let mut t = lock();
    t.users.retain(|_, users| {
        users.retain(|w| w.strong_count() > 0);
        !users.is_empty()
    });
    for p in layer.parameters() {
        let users = t.users.entry(p.id()).or_default();
        if !users.iter().any(|w| std::ptr::addr_eq(w.as_ptr(), Arc::as_ptr(layer))) {
            users.push(Arc::downgrade(layer));
        }
    }
}

/// Wraps a new layer and registers it as a user of its parameters.
pub(crate) fn registered<T: GhostLayer + 'static>(layer: T) -> Arc<T> {
    let layer = Arc::new(layer);
    let as_dyn: Arc<dyn GhostLayer> = layer.clone();
    register(&as_dyn);
    layer
}

/// The live layers that use the variable `id`, in registration order.
pub(crate) fn users(id: TensorId) -> Vec<Arc<dyn GhostLayer>> {
    lock().live_users(id)
}

/// Refuses a parameter computed from another tensor (`w.t()`, a cast):
/// its gradient could never reach a variable, so the layer would look
/// frozen while its source is trained.
///
/// # Errors
/// [`Error::DerivedParameter`].
pub(crate) fn check_parameter(p: &Tensor, what: &'static str) -> Result<()> {
    if p.track_op() && !p.is_variable() {
        return Err(Error::DerivedParameter { what, shape: p.dims().to_vec() });
    }
    Ok(())
}

/// [`check_parameter`] for a layer's `weight` and optional `bias`.
///
/// # Errors
/// [`Error::DerivedParameter`].
pub(crate) fn check_weight_and_bias(weight: &Tensor, bias: Option<&Tensor>) -> Result<()> {
    check_parameter(weight, "weight")?;
    bias.map_or(Ok(()), |b| check_parameter(b, "bias"))
}

/// The token of the live engine that trains the tensor `p`, if any.
pub(crate) fn trained_by(p: &Tensor) -> Option<u64> {
    lock().claims.get(&p.id()).copied()
}

/// Whether a live engine trains the tensor `p` (by id).
pub(crate) fn is_trained(p: &Tensor) -> bool {
    trained_by(p).is_some()
}

/// An engine's claim on the variables it trains, released on drop (shared
/// by the engine's clones through an `Arc`).
#[derive(Debug)]
pub(crate) struct Claims {
    ids: Vec<TensorId>,
    pub(crate) token: u64,
}

impl Claims {
    /// Claims `ids` (the optimizer's variables, in order) for a new engine.
    ///
    /// # Errors
    /// [`Error::UnownedVariable`] for a variable no live DP layer uses;
    /// [`Error::LayerTrainedTwice`] if a layer using one of them has a
    /// parameter another live engine trains.
    pub(crate) fn new(vars: &[candle_core::Var]) -> Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let token = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut t = lock();
        for (index, var) in vars.iter().enumerate() {
            let users = t.live_users(var.id());
            if users.is_empty() {
                return Err(Error::UnownedVariable { index, shape: var.dims().to_vec() });
            }
            let taken = users.iter().flat_map(|l| l.parameters()).any(|p| t.claims.contains_key(&p.id()));
            if taken {
                return Err(Error::LayerTrainedTwice { index, shape: var.dims().to_vec() });
            }
        }
        for var in vars {
            t.claims.insert(var.id(), token);
        }
        Ok(Self { ids: vars.iter().map(|v| v.id()).collect(), token })
    }
}

impl Drop for Claims {
    fn drop(&mut self) {
        // Release and clear under one lock, so that a claim taken meanwhile
        // by a new engine cannot lose captures to this clear.
        let mut t = lock();
        for id in &self.ids {
            if t.claims.get(id) == Some(&self.token) {
                t.claims.remove(id);
            }
        }
        for id in &self.ids {
            for layer in t.live_users(*id) {
                if !layer.parameters().iter().any(|p| t.claims.contains_key(&p.id())) {
                    layer.clear();
                }
            }
        }
    }
}
