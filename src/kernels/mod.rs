//! The clipping and noise kernels: Candle custom ops with a CPU path that is
//! the reference, and CUDA and Metal paths behind the `cuda` / `metal`
//! features.
//!
//! * [`squared_norms`]: per-example squared L2 norms, `[B, N] -> [B]`.
//! * [`clip_accumulate`]: the clipped sum `sum_i c_i g_i`, `[B, N], [B] -> [N]`,
//!   in one pass and without a scaled copy.
//! * [`add_gaussian_noise`]: `(x + std z) scale` with `z` a hardened Gaussian
//!   made from ChaCha20 by counter ([`NoiseKey`], [`gaussian`]), so that
//!   every device thread, CPU core or rank can make its own slice of the
//!   noise vector, and every one makes the same bits.
//!
//! Each op has a `*_slow` twin built from plain tensor ops (or, for the noise,
//! from the scalar definition): the reference the tests hold the op to on
//! every device.
//!
//! # Precision
//! Norms and clipped sums are accumulated in `f64` on the CPU and on CUDA
//! (the norms decide how much of each example gets through, so they carry
//! the privacy guarantee) and rounded once to the input's dtype. Metal has
//! no `f64`: there no sequential `f32` sum is longer than 16 terms, the rest
//! are trees, so a squared norm errs by about 32 `f32` ulps at most (well
//! inside the clipping margin of 1e-4).
//! Inputs are `f32` or `f64`; `f16` and `bf16` are widened to `f32` first.
//! Other dtypes are refused ([`crate::Error::Dtype`]).
//!
//! # Not-a-number
//! A NaN or infinity in a row of the gradients makes that row's squared norm
//! NaN or infinite (never zero, never hidden), which the engine refuses; the
//! clipped sum propagates non-finite values to the columns they touch.

pub mod chacha20;
mod clip;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod gaussian;
#[cfg(all(feature = "metal", target_os = "macos"))]
mod metal;
mod noise;
#[cfg(target_arch = "x86_64")]
mod simd;

pub use clip::{clip_accumulate, clip_accumulate_slow, squared_norms, squared_norms_slow};
pub use gaussian::{counter_gaussians, fill_gaussians, value_position, VALUES_PER_BLOCK};
pub use noise::{add_gaussian_noise, add_gaussian_noise_slow, keystream, NoiseKey};
