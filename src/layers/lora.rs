//! LoRA (Hu et al. 2021, arXiv:2106.09685): a frozen linear map plus a
//! trained low-rank update, `y = x W^T + b + (alpha / r) (x A^T) B^T`.
//!
//! `W [out, in]` and `b` are the pretrained layer's, frozen: pass plain
//! tensors (from safetensors, or any `VarBuilder` whose variables no
//! optimizer trains); the layer never computes their gradient (no
//! weight-gradient GEMM in backward, only the input gradient flows). The
//! factors are DP linear layers without bias: `A [r, in]` (`lora_A.weight`,
//! Kaiming-initialized) and `B [out, r]` (`lora_B.weight`, zeros, so the
//! adapted layer starts as the pretrained one). The scaling `alpha / r` and
//! the names are PEFT's (`peft.LoraConfig`, `use_rslora = false`), so an
//! adapter trained here reads like one trained there.
//!
//! Per-example gradient norms of `A` and `B` come from the ghost engine like
//! any DP linear layer's; with `r` small their per-example gradients are
//! often cheaper to materialize than the Gram form, and the engine chooses
//! per layer and call ([`crate::grad_sample`]).

use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};

use super::linear::DpLinear;
use crate::error::{ensure, Result};

/// The rank and scaling of a LoRA adapter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraConfig {
    /// The rank `r` of the update (>= 1).
    pub rank: usize,
    /// The scaling numerator: the update is multiplied by `alpha / r`.
    pub alpha: f64,
}

impl Default for LoraConfig {
    /// `r = 8`, `alpha = 16`: a common choice for small models.
    fn default() -> Self {
        Self { rank: 8, alpha: 16.0 }
    }
}

/// A linear layer with a frozen base and a trained LoRA update. Build it
/// with [`lora_linear`] or [`LoraLinear::new`].
#[derive(Debug, Clone)]
pub struct LoraLinear {
    base: DpLinear,
    a: DpLinear,
    b: DpLinear,
    scale: f64,
}

/// Adapts the frozen layer `weight [out, in]`, `bias [out]` with factors
/// made by `adapter` (`lora_A.weight`, `lora_B.weight`; give the optimizer
/// their variables only).
///
/// # Errors
/// [`crate::Error::InvalidConfig`] for `rank` outside `[1, min(in, out)]` or
/// a non-finite `alpha`; Candle's, if `adapter` cannot provide the factors.
pub fn lora_linear(
    weight: Tensor,
    bias: Option<Tensor>,
    config: LoraConfig,
    adapter: VarBuilder,
) -> Result<LoraLinear> {
    let (out_dim, in_dim) = weight.dims2()?;
    let (a, b) = lora_factors(in_dim, out_dim, config, adapter)?;
    LoraLinear::new(DpLinear::new(weight, bias), a, b, config)
}

/// The factors `A [r, in]` (Kaiming) and `B [out, r]` (zeros) from `adapter`.
pub(crate) fn lora_factors(
    in_dim: usize,
    out_dim: usize,
    config: LoraConfig,
    adapter: VarBuilder,
) -> Result<(Tensor, Tensor)> {
    check(config, in_dim, out_dim)?;
    let r = config.rank;
    let a = adapter.pp("lora_A").get_with_hints((r, in_dim), "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
    let b = adapter.pp("lora_B").get_with_hints((out_dim, r), "weight", Init::Const(0.0))?;
    Ok((a, b))
}

fn check(config: LoraConfig, in_dim: usize, out_dim: usize) -> Result<()> {
    let r = config.rank;
    ensure("lora.rank", r as f64, "an integer in [1, min(in_dim, out_dim)]", r >= 1 && r <= in_dim.min(out_dim))?;
    ensure("lora.alpha", config.alpha, "finite", config.alpha.is_finite())?;
    Ok(())
}

impl LoraLinear {
    /// A LoRA layer over existing tensors: the frozen `base` and the
    /// factors `a [r, in]` and `b [out, r]` (pass the variables' own tensors).
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] as [`lora_linear`]; [`crate::Error::Shape`]
    /// for factors that do not fit `base`.
    pub fn new(base: DpLinear, a: Tensor, b: Tensor, config: LoraConfig) -> Result<Self> {
        let (out_dim, in_dim) = base.weight().dims2()?;
        check(config, in_dim, out_dim)?;
        let r = config.rank;
        if a.dims() != [r, in_dim] || b.dims() != [out_dim, r] {
            return Err(crate::Error::Shape {
                what: "LoRA factors",
                expected: "A [rank, in_dim] and B [out_dim, rank]",
                got: [a.dims(), b.dims()].concat(),
            });
        }
        Ok(Self { base, a: DpLinear::new(a, None), b: DpLinear::new(b, None), scale: config.alpha / r as f64 })
    }

    /// The frozen base layer.
    pub fn base(&self) -> &DpLinear {
        &self.base
    }

    /// The factor `A`, `[r, in]`.
    pub fn a(&self) -> &Tensor {
        self.a.weight()
    }

    /// The factor `B`, `[out, r]`.
    pub fn b(&self) -> &Tensor {
        self.b.weight()
    }

    /// `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The merged weight `W + (alpha / r) B A` (`[out, in]`, detached): the
    /// plain layer to export once training is done.
    ///
    /// # Errors
    /// Candle's.
    pub fn merge(&self) -> Result<Tensor> {
        let update = self.b().detach().matmul(&self.a().detach())?;
        Ok((self.base.weight().detach() + (update * self.scale)?)?)
    }
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let update = self.b.forward(&self.a.forward(x)?)?;
        self.base.forward(x)? + (update * self.scale)?
    }
}
