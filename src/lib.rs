//! Differentially private training for [Candle](https://github.com/huggingface/candle).
//!
//! `candle-dp` wraps a Candle optimizer with DP-SGD: per-example clipping,
//! calibrated Gaussian noise from a secure generator, Poisson sampling and an
//! enforced privacy budget, with every step recorded in a tamper-evident
//! ledger that [`dp_accountant`] (re-exported as [`accountant`]) reads.
//!
//! * [`linear()`] and the other DP layers: drop-in replacements for candle-nn's.
//! * [`DpOptimizer`]: DP-SGD around any `candle_nn::Optimizer`, with its
//!   sampler, one call per step ([`DpOptimizer::train_step`]), checkpoints
//!   ([`checkpoint`]) and the release of the model with its statement
//!   ([`DpOptimizer::release`]).
//! * [`PoissonSampler`]: the sampling the accounting assumes.
//! * [`optim::AdamW`]: candle-nn's AdamW with its moments checkpointable.
//! * [`loss::cross_entropy`]: per-example losses, the only kind the optimizer takes.
//! * [`kernels`]: the per-example norm, clip-and-accumulate and device-noise
//!   ops (CPU reference; CUDA and Metal behind features).
//! * [`audit`]: what a run really leaked: canaries in training
//!   ([`DpOptimizerBuilder::audit`], epsilon-hat in the ledger beside
//!   epsilon) and the replay check on neighbouring datasets.
//! * [`distributed`]: data-parallel DP-SGD over MPI or NCCL
//!   ([`DpOptimizer::distribute`]): each rank samples and clips its shard,
//!   the noise is drawn once per coordinate in slices.
//! * Mixed precision: bf16 and f16 models train with f32 norms, sums and
//!   noise and f32 master weights (see [`optimizer`]).
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
//! use candle_nn::{VarBuilder, VarMap};
//! use candle_dp::optim::AdamW;
//! use candle_dp::{loss, DpOptimizer, GaussianNoise, PoissonSampler, PrivacyBudget};
//!
//! let dev = Device::Cpu;
//! let varmap = VarMap::new();
//! let model = candle_dp::linear(4, 3, VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp("fc"))?;
//!
//! // A toy dataset of 100 examples: 4 features, 3 classes.
//! let x = Tensor::randn(0f32, 1.0, (100, 4), &dev)?;
//! let y = Tensor::from_vec((0..100u32).map(|i| i % 3).collect(), 100, &dev)?;
//!
//! // The optimizer owns its sampler: what it accounts is what it draws.
//! let mut opt = DpOptimizer::<AdamW>::builder(candle_dp::vars_by_name(&varmap), PoissonSampler::seeded(100, 0.1, 0)?)
//!     .target(PrivacyBudget { epsilon: 3.0, delta: 1e-5 }, 20)
//!     .max_grad_norm(1.0)
//!     .max_physical_batch_size(8)
//!     .noise(GaussianNoise::from_seed(1))
//!     .build(Default::default())?;
//!
//! // Each step: a Poisson batch of indices in, per-example losses out.
//! for _ in 0..20 {
//!     opt.train_step(|batch| {
//!         let idx = Tensor::from_vec(batch.iter().map(|&i| i as u32).collect(), batch.len(), &dev)?;
//!         loss::cross_entropy(&model.forward(&x.index_select(&idx, 0)?)?, &y.index_select(&idx, 0)?)
//!     })?;
//! }
//! // The weights, their SHA-256 in the ledger, the ledger and the report.
//! # let dir = std::env::temp_dir().join(format!("candle-dp-doc-{}", std::process::id()));
//! let release = opt.release(&dir, &varmap, None)?;
//! assert!(release.report.epsilon <= 3.0);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), candle_dp::Error>(())
//! ```
#![deny(missing_docs)]
#![deny(missing_debug_implementations)]

pub use dp_accountant as accountant;

pub mod audit;
pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod distributed;
mod error;
pub mod grad_sample;
pub mod kernels;
pub mod layers;
pub mod loss;
pub mod models;
pub mod noise;
pub mod optim;
pub mod optimizer;
pub mod release;
pub mod sampler;

pub use clip::ClipMode;
pub use config::{DpConfig, Engine, PrivacyBudget};
pub use error::{error_number, Error, Result};
pub use layers::{
    batch_norm, conv1d, conv2d, embedding, group_norm, layer_norm, linear, linear_no_bias, lora_linear, rms_norm,
    DpConv, DpEmbedding, DpLinear, DpNorm, LoraConfig, LoraLinear,
};
pub use loss::PerSampleLoss;
pub use noise::GaussianNoise;
pub use optim::{OptimizerState, StatefulOptimizer};
pub use optimizer::{vars_by_name, DpOptimizer, DpOptimizerBuilder, StepSummary};
pub use release::Release;
pub use sampler::{PoissonSampler, Sampler, SamplerDescription, ShuffledSampler};
