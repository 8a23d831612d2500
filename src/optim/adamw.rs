//! AdamW (Loshchilov & Hutter 2019) with its moments reachable: the same
//! maths as `candle_nn::AdamW`, operation for operation (so the results are
//! bit-identical to it), plus [`AdamW::state`] and [`AdamW::restore`].

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};

use crate::error::{Error, Result};

/// One variable with its first and second moments.
#[derive(Debug)]
struct Slot {
    var: Var,
    m: Var,
    v: Var,
}

/// AdamW over a list of variables, configured by candle-nn's
/// [`ParamsAdamW`]; non-float variables are skipped, as candle-nn does.
#[derive(Debug)]
pub struct AdamW {
    slots: Vec<Slot>,
    step_t: usize,
    params: ParamsAdamW,
}

/// Everything an [`AdamW`] needs to continue exactly: the step count and,
/// per variable (in the optimizer's order), the first and second moments.
#[derive(Debug, Clone)]
pub struct AdamWState {
    /// Steps taken (the bias corrections depend on it).
    pub step: usize,
    /// `(m, v)` per variable.
    pub moments: Vec<(Tensor, Tensor)>,
}

impl Optimizer for AdamW {
    type Config = ParamsAdamW;

    fn new(vars: Vec<Var>, params: ParamsAdamW) -> candle_core::Result<Self> {
        let slots = vars
            .into_iter()
            .filter(|var| var.dtype().is_float())
            .map(|var| {
                let m = Var::zeros(var.shape(), var.dtype(), var.device())?;
                let v = Var::zeros(var.shape(), var.dtype(), var.device())?;
                Ok(Slot { var, m, v })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { slots, step_t: 0, params })
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step_t += 1;
        let ParamsAdamW { lr, beta1, beta2, eps, weight_decay } = self.params;
        let scale_m = 1f64 / (1f64 - beta1.powi(self.step_t as i32));
        let scale_v = 1f64 / (1f64 - beta2.powi(self.step_t as i32));
        for s in &self.slots {
            let Some(g) = grads.get(&s.var) else { continue };
            // The operations of candle_nn::AdamW, in its order.
            let next_m = ((s.m.as_tensor() * beta1)? + (g * (1.0 - beta1))?)?;
            let next_v = ((s.v.as_tensor() * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let m_hat = (&next_m * scale_m)?;
            let v_hat = (&next_v * scale_v)?;
            let decayed = (s.var.as_tensor() * (1f64 - lr * weight_decay))?;
            let adjusted = (m_hat / (v_hat.sqrt()? + eps)?)?;
            let next_theta = (decayed - (adjusted * lr)?)?;
            s.m.set(&next_m)?;
            s.v.set(&next_v)?;
            s.var.set(&next_theta)?;
        }
        Ok(())
    }
}

impl AdamW {
    /// The number of `(m, v)` pairs: one per float variable.
    pub(crate) fn num_moments(&self) -> usize {
        self.slots.len()
    }

    /// The step count and the moments (copies), in the variables' order.
    ///
    /// # Errors
    /// Candle's, if a copy fails.
    pub fn state(&self) -> Result<AdamWState> {
        let moments = self
            .slots
            .iter()
            .map(|s| Ok((s.m.as_tensor().copy()?, s.v.as_tensor().copy()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamWState { step: self.step_t, moments })
    }

    /// Continues from `state` (as [`AdamW::state`] returned it for the same
    /// variables, in the same order).
    ///
    /// # Errors
    /// [`Error::Shape`] if the number of moments or a moment's shape or dtype
    /// differs from the variables'; nothing is changed then.
    pub fn restore(&mut self, state: &AdamWState) -> Result<()> {
        if state.moments.len() != self.slots.len() {
            return Err(Error::Shape {
                what: "AdamW state",
                expected: "one (m, v) pair per float variable of the optimizer",
                got: vec![state.moments.len()],
            });
        }
        for (s, (m, v)) in self.slots.iter().zip(&state.moments) {
            for t in [m, v] {
                if t.dims() != s.var.dims() || t.dtype() != s.var.dtype() {
                    return Err(Error::Shape {
                        what: "AdamW moment",
                        expected: "the shape and dtype of its variable",
                        got: t.dims().to_vec(),
                    });
                }
            }
        }
        for (s, (m, v)) in self.slots.iter().zip(&state.moments) {
            s.m.set(m)?;
            s.v.set(v)?;
        }
        self.step_t = state.step;
        Ok(())
    }
}
