//! Optimizers whose whole state can be saved and restored, for exact
//! resumption of a DP run (Candle's own AdamW keeps its moments private).
//!
//! [`StatefulOptimizer`] is what a checkpoint needs from the optimizer that
//! DP-SGD wraps: it is implemented here for [`AdamW`] (candle-nn's maths,
//! with its moments reachable) and for `candle_nn::SGD` (which has no state
//! beyond its learning rate). Implement it for your own optimizer to
//! checkpoint runs that use it.

pub mod adamw;

use std::collections::BTreeMap;

use candle_core::Tensor;
use candle_nn::Optimizer;

pub use adamw::{AdamW, AdamWState};

use crate::error::{Error, Result};

/// An optimizer's state: counters and named tensors, with the learning rate
/// restored through [`Optimizer::set_learning_rate`] (so a schedule resumes
/// where it was).
#[derive(Debug, Clone, Default)]
pub struct OptimizerState {
    /// Integer counters (AdamW: `"step"`), stored in the checkpoint's manifest.
    pub counters: BTreeMap<String, u64>,
    /// Named tensors (AdamW: `"m.{i}"` and `"v.{i}"`), stored as safetensors.
    /// Names beginning `master.` are reserved for the mixed-precision master
    /// weights a checkpoint stores beside them (a checkpoint refuses them).
    pub tensors: BTreeMap<String, Tensor>,
}

/// An [`Optimizer`] whose state can be saved and restored exactly.
pub trait StatefulOptimizer: Optimizer {
    /// The state, as copies.
    ///
    /// # Errors
    /// Candle's.
    fn save_state(&self) -> Result<OptimizerState>;

    /// Continues from `state`, as [`StatefulOptimizer::save_state`] returned
    /// it for an optimizer over the same variables in the same order.
    ///
    /// # Errors
    /// [`Error::OptimizerState`] for a missing, extra or mis-shaped entry;
    /// nothing is changed then.
    fn load_state(&mut self, state: &OptimizerState) -> Result<()>;
}

/// `candle_nn::SGD` keeps nothing between steps.
impl StatefulOptimizer for candle_nn::SGD {
    fn save_state(&self) -> Result<OptimizerState> {
        Ok(OptimizerState::default())
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        expect_keys(state, &[], &[])
    }
}

impl StatefulOptimizer for AdamW {
    fn save_state(&self) -> Result<OptimizerState> {
        let s = self.state()?;
        let mut tensors = BTreeMap::new();
        for (i, (m, v)) in s.moments.into_iter().enumerate() {
            tensors.insert(format!("m.{i}"), m);
            tensors.insert(format!("v.{i}"), v);
        }
        Ok(OptimizerState { counters: BTreeMap::from([("step".to_string(), s.step as u64)]), tensors })
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        let n = self.num_moments();
        let names: Vec<String> = (0..n).flat_map(|i| [format!("m.{i}"), format!("v.{i}")]).collect();
        expect_keys(state, &["step"], &names.iter().map(String::as_str).collect::<Vec<_>>())?;
        // Indexing cannot fail below: expect_keys found exactly "step" and these names.
        let step = usize::try_from(state.counters["step"])
            .map_err(|_| Error::OptimizerState { reason: "AdamW step count beyond usize".into() })?;
        let moments = (0..n).map(|i| (state.tensors[&names[2 * i]].clone(), state.tensors[&names[2 * i + 1]].clone()));
        self.restore(&AdamWState { step, moments: moments.collect() })
            .map_err(|e| Error::OptimizerState { reason: e.to_string() })
    }
}

/// Refuses a state whose counters or tensors are not exactly `counters` and `tensors`.
fn expect_keys(state: &OptimizerState, counters: &[&str], tensors: &[&str]) -> Result<()> {
    let same = |found: Vec<&str>, expected: &[&str]| {
        let mut expected = expected.to_vec();
        expected.sort_unstable();
        found == expected
    };
    if !same(state.counters.keys().map(String::as_str).collect(), counters) {
        return Err(Error::OptimizerState {
            reason: format!("counters {:?}, expected {counters:?}", state.counters.keys().collect::<Vec<_>>()),
        });
    }
    if !same(state.tensors.keys().map(String::as_str).collect(), tensors) {
        return Err(Error::OptimizerState {
            reason: format!("{} tensors, expected {} ({:?}...)", state.tensors.len(), tensors.len(), tensors.first()),
        });
    }
    Ok(())
}
