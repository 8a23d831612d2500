//! Differentially private training for [Candle](https://github.com/huggingface/candle).
//!
//! `candle-dp` wraps a Candle optimizer with DP-SGD: per-example clipping,
//! calibrated Gaussian noise from a secure generator, Poisson sampling and an
//! enforced privacy budget. The training engine is being built; today this
//! crate re-exports the accountant it rests on, [`dp_accountant`], which
//! computes epsilon, calibrates noise and keeps the tamper-evident ledger.
//!
//! ```
//! use candle_dp::accountant::calibrate_noise_multiplier;
//! // Noise for epsilon 3 at delta 1e-5: 20 epochs of 1 437 examples, expected batch 64.
//! let plan = calibrate_noise_multiplier(3.0, 1e-5, 64.0 / 1437.0, 20 * 1437 / 64)?;
//! assert!(plan.epsilon.epsilon <= 3.0);
//! # Ok::<(), candle_dp::accountant::Error>(())
//! ```
#![deny(missing_docs)]

pub use dp_accountant as accountant;
