//! Differentially private training for [Candle](https://github.com/huggingface/candle).
//!
//! `candle-dp` wraps a Candle optimizer with DP-SGD: per-example clipping,
//! calibrated Gaussian noise from a secure generator, Poisson sampling and an
//! enforced privacy budget, with every step recorded in a tamper-evident
//! ledger that [`dp_accountant`] (re-exported as [`accountant`]) reads.
//!
//! * [`linear()`] and the other DP layers: drop-in replacements for candle-nn's.
//! * [`DpOptimizer`]: DP-SGD around any `candle_nn::Optimizer`.
//! * [`PoissonSampler`]: the sampling the accounting assumes.
//! * [`loss::cross_entropy`]: per-example losses, the only kind the optimizer takes.
//! * [`kernels`]: the per-example norm, clip-and-accumulate and device-noise
//!   ops (CPU reference; CUDA and Metal behind features).
//!
//! # What a step guarantees
//! Each example's gradient (over all trained variables, every use of a tied
//! weight included) is clipped to `C (1 - 1e-4)` for the clipping norm `C`
//! ([`DpOptimizerBuilder::max_grad_norm`]; the margin absorbs rounding in
//! the norms), and Gaussian noise of standard deviation `sigma C` is added
//! once per logical batch. The noise multiplier `sigma` must be finite and
//! `> 0`; any such value is accepted, and the accountant states what it
//! buys. DP layers whose parameters the optimizer does not train are frozen
//! and record nothing ([`grad_sample`] says who owns what).
//!
//! # Example
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{VarBuilder, VarMap, SGD};
//! use candle_dp::{loss, DpOptimizer, GaussianNoise, PoissonSampler};
//!
//! let dev = Device::Cpu;
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//! let model = candle_dp::linear(4, 3, vb.pp("fc"))?;
//!
//! let mut sampler = PoissonSampler::seeded(100, 0.1, 0)?;
//! let mut opt = DpOptimizer::<SGD>::builder(candle_dp::vars_by_name(&varmap), sampler.description())
//!     .noise_multiplier(1.1)
//!     .max_grad_norm(1.0)
//!     .noise(GaussianNoise::from_seed(1))
//!     .build(0.1)?;
//!
//! // A toy dataset of 100 examples: 4 features, 3 classes.
//! let x = Tensor::randn(0f32, 1.0, (100, 4), &dev)?;
//! let y = Tensor::from_vec((0..100u32).map(|i| i % 3).collect(), 100, &dev)?;
//!
//! // One DP-SGD step: a Poisson batch, per-example losses, clip, noise, step.
//! let batch: Vec<u32> = sampler.sample().iter().map(|&i| i as u32).collect();
//! if batch.is_empty() {
//!     opt.accumulate_empty();
//! } else {
//!     let idx = Tensor::from_vec(batch.clone(), batch.len(), &dev)?;
//!     let logits = model.forward(&x.index_select(&idx, 0)?)?;
//!     opt.accumulate(&loss::cross_entropy(&logits, &y.index_select(&idx, 0)?)?)?;
//! }
//! opt.step()?;
//! let eps = opt.epsilon(1e-5)?;
//! assert!(eps > 0.0 && eps.is_finite());
//! # Ok::<(), candle_dp::Error>(())
//! ```
#![deny(missing_docs)]
#![deny(missing_debug_implementations)]

pub use dp_accountant as accountant;

pub mod checkpoint;
pub mod clip;
mod error;
pub mod grad_sample;
pub mod kernels;
pub mod layers;
pub mod loss;
pub mod noise;
pub mod optim;
pub mod optimizer;
pub mod sampler;

pub use clip::ClipMode;
pub use error::{error_number, Error, Result};
pub use layers::{
    batch_norm, conv1d, conv2d, embedding, group_norm, layer_norm, linear, linear_no_bias, rms_norm, DpConv,
    DpEmbedding, DpLinear, DpNorm,
};
pub use loss::PerSampleLoss;
pub use noise::GaussianNoise;
pub use optimizer::{vars_by_name, DpOptimizer, DpOptimizerBuilder, Engine, PrivacyBudget};
pub use sampler::{PoissonSampler, SamplerDescription, ShuffledSampler};
