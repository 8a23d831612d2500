//! Which DP layer owns which variable.
//!
//! DP layers keep the constructors of candle-nn (`linear(in, out, vb)`), so
//! they cannot be handed a registry; instead each registers itself, by the
//! ids of its parameter variables, in this process-wide table of weak
//! references. The ghost engine looks every trainable variable up here, and
//! a variable no layer owns is an error rather than a silently unclipped
//! parameter.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use candle_core::{Tensor, TensorId};

use crate::error::Result;

/// What the ghost engine needs from a DP layer.
pub(crate) trait GhostLayer: Send + Sync + std::fmt::Debug {
    /// The layer's parameters, in a fixed order.
    fn parameters(&self) -> Vec<Tensor>;
    /// Per-example squared gradient norms of each parameter (same order), from
    /// the uses captured since the last [`GhostLayer::clear`]; `None` if the
    /// layer was not used in this batch.
    fn squared_norms(&self) -> Result<Option<Vec<Tensor>>>;
    /// `sum_i c_i g_i` for each parameter, with `c` of shape `[B]`.
    fn clipped_sums(&self, clip_factors: &Tensor) -> Result<Option<Vec<Tensor>>>;
    /// Forgets the captured uses.
    fn clear(&self);
    /// Forgets the gradients captured so far (before the engine's own backward).
    fn reset_grads(&self);
}

type Table = HashMap<TensorId, Weak<dyn GhostLayer>>;

fn table() -> &'static Mutex<Table> {
    static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
    TABLE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn lock() -> std::sync::MutexGuard<'static, Table> {
    // A panic while holding the lock cannot leave the map inconsistent
    // (inserts and removals are single operations), so poisoning is ignored.
    table().lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Registers `layer` as the owner of its parameters.
pub(crate) fn register(layer: &Arc<dyn GhostLayer>) {
    let mut t = lock();
    t.retain(|_, w| w.strong_count() > 0);
    for p in layer.parameters() {
        t.insert(p.id(), Arc::downgrade(layer));
    }
}

/// Wraps a new layer and registers it as the owner of its parameters.
pub(crate) fn registered<T: GhostLayer + 'static>(layer: T) -> Arc<T> {
    let layer = Arc::new(layer);
    let as_dyn: Arc<dyn GhostLayer> = layer.clone();
    register(&as_dyn);
    layer
}

/// The live layer that owns the variable `id`, if any.
pub(crate) fn owner(id: TensorId) -> Option<Arc<dyn GhostLayer>> {
    lock().get(&id).and_then(Weak::upgrade)
}
