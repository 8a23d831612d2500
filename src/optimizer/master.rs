//! `f32` master weights for half-precision variables (mixed precision).
//!
//! A bf16 weight has 8 significant bits: an update below half its ulp
//! (`2^-9` of the weight) rounds away, and DP-SGD's averaged noisy updates
//! are mostly that small. So the inner optimizer steps an `f32` copy of
//! each `bf16` / `f16` variable (its moments are `f32` too), and the model's
//! variable is that copy rounded once after every step (Micikevicius et al.
//! 2018, "Mixed precision training"). A variable set from outside (weights
//! loaded after the optimizer was built) is taken as its new master before
//! the next step, the next checkpoint or a distribution.

use candle_core::{DType, Var};

use crate::error::Result;

/// The inner optimizer's variables of a model with half-precision ones:
/// an `f32` master per half-precision variable, the variable itself for
/// the others.
#[derive(Debug, Clone)]
pub(crate) struct Masters {
    stepped: Vec<Var>,
}

fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

impl Masters {
    /// Masters of `vars`' half-precision variables, from their values;
    /// `None` if there are none.
    ///
    /// # Errors
    /// Candle's.
    pub(crate) fn of(vars: &[Var]) -> Result<Option<Self>> {
        if !vars.iter().any(|v| is_half(v.dtype())) {
            return Ok(None);
        }
        let stepped = vars
            .iter()
            .map(|v| {
                if is_half(v.dtype()) {
                    Var::from_tensor(&v.as_tensor().to_dtype(DType::F32)?)
                } else {
                    Ok(v.clone())
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Some(Self { stepped }))
    }

    /// The variables the inner optimizer steps.
    pub(crate) fn vars(&self) -> &[Var] {
        &self.stepped
    }

    /// Takes the value of each half-precision variable of `vars` that is not
    /// its master rounded (set from outside the optimizer: weights loaded
    /// after it was built) as its new master, so that the next step updates
    /// what the model holds rather than the stale master.
    ///
    /// # Errors
    /// Candle's.
    pub(crate) fn follow(&self, vars: &[Var]) -> Result<()> {
        for (var, master) in vars.iter().zip(&self.stepped) {
            if !is_half(var.dtype()) {
                continue;
            }
            let rounded = master.as_tensor().to_dtype(var.dtype())?;
            let value = var.as_tensor();
            // A NaN is not equal to itself: one in both is no change.
            let both_nan = (rounded.ne(&rounded)? * value.ne(value)?)?;
            let changed = (rounded.ne(value)? - both_nan)?.max_all()?.to_scalar::<u8>()? != 0;
            if changed {
                master.set(&value.to_dtype(DType::F32)?)?;
            }
        }
        Ok(())
    }

    /// Sets each half-precision variable of `vars` to its master, rounded.
    ///
    /// # Errors
    /// Candle's.
    pub(crate) fn round_into(&self, vars: &[Var]) -> Result<()> {
        for (var, master) in vars.iter().zip(&self.stepped) {
            if is_half(var.dtype()) {
                var.set(&master.as_tensor().to_dtype(var.dtype())?)?;
            }
        }
        Ok(())
    }

    /// The masters of the half-precision variables, by index, for checkpoints.
    pub(crate) fn saved(&self, vars: &[Var]) -> Vec<(usize, candle_core::Tensor)> {
        vars.iter()
            .zip(&self.stepped)
            .enumerate()
            .filter(|(_, (v, _))| is_half(v.dtype()))
            .map(|(i, (_, m))| (i, m.as_tensor().clone()))
            .collect()
    }

    /// Sets the master of `vars[index]`, if it is half precision, to `value`.
    ///
    /// # Errors
    /// Candle's (a tensor of another shape).
    pub(crate) fn restore(&self, vars: &[Var], index: usize, value: &candle_core::Tensor) -> Result<()> {
        if let (Some(var), Some(master)) = (vars.get(index), self.stepped.get(index)) {
            if is_half(var.dtype()) {
                master.set(&value.to_dtype(DType::F32)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::Masters;

    fn f32s(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32).unwrap().to_vec1().unwrap()
    }

    /// `follow` keeps a master whose rounding is the variable (its extra
    /// bits included, NaNs too) and takes a variable set otherwise.
    #[test]
    fn follow_takes_only_changed_variables() {
        let fine = 1.0 + 2f32.powi(-12);
        let var =
            Var::from_tensor(&Tensor::new(&[1.0f32, f32::NAN], &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap())
                .unwrap();
        let masters = Masters::of(std::slice::from_ref(&var)).unwrap().unwrap();
        masters.vars()[0].set(&Tensor::new(&[fine, f32::NAN], &Device::Cpu).unwrap()).unwrap();
        masters.follow(std::slice::from_ref(&var)).unwrap();
        let kept = f32s(masters.vars()[0].as_tensor());
        assert_eq!(kept[0], fine, "a master that rounds to its variable keeps its extra bits");
        assert!(kept[1].is_nan());
        var.set(&Tensor::new(&[3.0f32, f32::NAN], &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap()).unwrap();
        masters.follow(std::slice::from_ref(&var)).unwrap();
        assert_eq!(f32s(masters.vars()[0].as_tensor())[0], 3.0, "a variable set from outside is the new master");
    }
}
