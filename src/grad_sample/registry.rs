//! Which DP layers use which variable, and which of their parameters an
//! optimizer trains.
//!
//! DP layers keep the constructors of candle-nn (`linear(in, out, vb)`), so
//! they cannot be handed a registry; instead each registers itself, by the
//! ids of its parameter tensors, in this process-wide table of weak
//! references. A variable may have several users (tied weights, one table
//! used as embedding and output projection). The ghost engine looks every
//! trainable variable up here; a variable no layer uses is an error rather
//! than a silently unclipped parameter.
//!
//! An engine *claims* each (layer, parameter) it trains for as long as it
//! lives ([`Claim`]). A layer captures activations and output gradients only
//! for claimed parameters: a layer nobody trains records nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use candle_core::{Tensor, TensorId};

use super::per_example::UseGrad;
use crate::error::Result;

/// What the ghost engine needs from a DP layer.
pub(crate) trait GhostLayer: Send + Sync + std::fmt::Debug {
    /// The layer's parameters, in a fixed order.
    fn parameters(&self) -> Vec<Tensor>;
    /// For each parameter (same order), the per-example gradients of the
    /// uses captured since the last [`GhostLayer::clear`] that received a
    /// gradient; empty for a parameter that was not captured.
    fn per_example_grads(&self) -> Result<Vec<Vec<UseGrad>>>;
    /// Forgets the captured uses.
    fn clear(&self);
    /// Forgets the gradients captured so far (before the engine's own backward).
    fn reset_grads(&self);
    /// Which of the parameters are trained now.
    fn training(&self) -> &Training;
}

/// Per parameter of a layer, how many live engines train it.
#[derive(Debug)]
pub(crate) struct Training {
    claims: Vec<AtomicUsize>,
}

impl Training {
    /// No parameter of `parameters` trained yet.
    pub(crate) fn new(parameters: usize) -> Self {
        Self { claims: (0..parameters).map(|_| AtomicUsize::new(0)).collect() }
    }

    /// Whether parameter `k` is trained by a live engine.
    pub(crate) fn is_trained(&self, k: usize) -> bool {
        self.claims.get(k).is_some_and(|c| c.load(Ordering::Acquire) > 0)
    }

    /// Whether any parameter is trained.
    pub(crate) fn any(&self) -> bool {
        (0..self.claims.len()).any(|k| self.is_trained(k))
    }
}

/// One engine's hold on parameter `param` of `layer`: the layer captures
/// what that parameter's per-example gradients need while this lives.
#[derive(Debug)]
pub(crate) struct Claim {
    layer: Arc<dyn GhostLayer>,
    param: usize,
}

impl Claim {
    pub(crate) fn new(layer: Arc<dyn GhostLayer>, param: usize) -> Self {
        if let Some(c) = layer.training().claims.get(param) {
            c.fetch_add(1, Ordering::AcqRel);
        }
        Self { layer, param }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(c) = self.layer.training().claims.get(self.param) {
            c.fetch_sub(1, Ordering::AcqRel);
        }
        if !self.layer.training().any() {
            // Nothing trains the layer any more: drop what it still holds.
            self.layer.clear();
        }
    }
}

type Table = HashMap<TensorId, Vec<Weak<dyn GhostLayer>>>;

fn table() -> &'static Mutex<Table> {
    static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
    TABLE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn lock() -> std::sync::MutexGuard<'static, Table> {
    // A panic while holding the lock cannot leave the map inconsistent
    // (inserts and removals are single operations), so poisoning is ignored.
    table().lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Registers `layer` as a user of its parameters.
pub(crate) fn register(layer: &Arc<dyn GhostLayer>) {
    let mut t = lock();
    t.retain(|_, users| {
        users.retain(|w| w.strong_count() > 0);
        !users.is_empty()
    });
    for p in layer.parameters() {
        let users = t.entry(p.id()).or_default();
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
    lock().get(&id).map(|users| users.iter().filter_map(Weak::upgrade).collect()).unwrap_or_default()
}
