//! Gaussian noise by counter as Candle ops: the noise vector of
//! [`super::gaussian`] added where the tensor lives, and the raw keystream
//! for checking devices bit for bit.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::chacha20;
use super::clip::widened;
use super::cpu::{contiguous_cpu, threads_for, Element};
use super::gaussian::{self, Backend, NONCE};
use crate::error::{ensure, Result};

/// A 256-bit ChaCha20 key for one draw of device noise.
///
/// # Security
/// Whoever knows the key can recompute the noise and subtract it. Take a
/// fresh key for every draw from a secure generator
/// ([`crate::GaussianNoise::noise_key`] does, from the optimizer's ChaCha20);
/// `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct NoiseKey {
    words: [u32; 8],
}

impl NoiseKey {
    /// The key with these 32 bytes (read as eight little-endian words).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self { words: chacha20::key_words(&bytes) }
    }

    /// The key as ChaCha20 state words 4..12.
    pub fn words(&self) -> [u32; 8] {
        self.words
    }
}

impl std::fmt::Debug for NoiseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NoiseKey(<secret>)")
    }
}

/// `(x + std z) scale` for every element of `x` in row-major order, with `z`
/// the noise vector of `key` ([`super::gaussian`]: value `j` depends on the
/// key and `j` alone, and is the same on the CPU and CUDA; Metal
/// approximates it in `f32`): the product, the sum and the scaling each
/// rounded in `f64` (no fused multiply-add), then once to the dtype
/// (`f16`/`bf16` too; on Metal they go through `f32`). The op runs where `x`
/// lives: on a GPU the noise is made there, from the key alone. No gradient
/// flows.
///
/// # Security
/// A key is for one tensor: two tensors noised with the same key get the
/// same noise (both start at position 0), which an observer of both can
/// subtract. Draw a fresh key per tensor ([`crate::GaussianNoise::noise_key`]).
///
/// # Errors
/// [`crate::Error::InvalidConfig`] for `std` negative or not finite, or
/// `scale` not finite; [`crate::Error::Dtype`] for a non-float dtype.
pub fn add_gaussian_noise(x: &Tensor, key: &NoiseKey, std: f64, scale: f64) -> Result<Tensor> {
    check(std, scale)?;
    let (t, dtype) = widened(x, "add_gaussian_noise: x")?;
    // Half precision through f64 where the device has it: one rounding.
    let t =
        if matches!(dtype, DType::F16 | DType::BF16) && !x.device().is_metal() { t.to_dtype(DType::F64)? } else { t };
    let op = AddNoise { key: key.clone(), std, scale };
    Ok(t.apply_op1_no_bwd(&op)?.to_dtype(dtype)?)
}

/// The reference for [`add_gaussian_noise`]: one thread, the keystream
/// read from `rand_chacha` (an implementation independent of this crate's
/// block function and of its SIMD paths), each value found through
/// [`gaussian::value_position`] and made by the scalar definition.
///
/// # Errors
/// As [`add_gaussian_noise`].
pub fn add_gaussian_noise_slow(x: &Tensor, key: &NoiseKey, std: f64, scale: f64) -> Result<Tensor> {
    check(std, scale)?;
    let mut bytes = [0u8; 32];
    for (b, w) in bytes.chunks_exact_mut(4).zip(key.words()) {
        b.copy_from_slice(&w.to_le_bytes());
    }
    let mut stream = ChaCha20Rng::from_seed(bytes);
    stream.set_stream(NONCE);
    let values = x.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let mut out = Vec::with_capacity(values.len());
    for (j, v) in values.iter().enumerate() {
        let (counter, slot) = gaussian::value_position(j as u64);
        stream.set_word_pos(u128::from(counter) * 16);
        let words: [u32; 16] = std::array::from_fn(|_| stream.next_u32());
        let z = gaussian::block_normals(&words)[slot];
        out.push((v + std * z) * scale);
    }
    Ok(Tensor::from_vec(out, x.shape(), x.device())?.to_dtype(x.dtype())?)
}

fn check(std: f64, scale: f64) -> Result<()> {
    ensure("add_gaussian_noise: std", std, "finite and >= 0", std >= 0.0 && std.is_finite())?;
    ensure("add_gaussian_noise: scale", scale, "finite", scale.is_finite())?;
    Ok(())
}

pub(crate) struct AddNoise {
    pub(crate) key: NoiseKey,
    pub(crate) std: f64,
    pub(crate) scale: f64,
}

impl CustomOp1 for AddNoise {
    fn name(&self) -> &'static str {
        "candle-dp-add-gaussian-noise"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(self.cpu(contiguous_cpu::<f32>(s, l, self.name())?)),
            CpuStorage::F64(_) => CpuStorage::F64(self.cpu(contiguous_cpu::<f64>(s, l, self.name())?)),
            _ => return Err(candle_core::Error::UnsupportedDTypeForOp(s.dtype(), self.name())),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((super::cuda::add_noise(self, s, l)?, l.shape().clone()))
    }

    #[cfg(all(feature = "metal", target_os = "macos"))]
    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        Ok((super::metal::add_noise(self, s, l)?, l.shape().clone()))
    }
}

impl AddNoise {
    /// The CPU path: the widest SIMD the CPU has, on all cores for large
    /// tensors (the values depend on neither).
    fn cpu<T: Element>(&self, x: &[T]) -> Vec<T> {
        let mut out = x.to_vec();
        // ChaCha20 and the transform outweigh the memory traffic: count
        // the work per value as a block's worth of words.
        let threads = threads_for(x.len() * 16);
        gaussian::add_noise_at(Backend::best(), &self.key, 0, &mut out, self.std, self.scale, threads);
        out
    }
}

/// The raw ChaCha20 words of `blocks` consecutive blocks from `first_block`
/// under `key` (nonce 0, the noise stream), made on `device`: `[blocks, 16]`
/// `u32`. The words [`add_gaussian_noise`] turns into normals, exposed so
/// that the devices' generators can be checked bit for bit against the CPU
/// and the RFC 8439 vectors.
///
/// # Errors
/// [`crate::Error::InvalidConfig`] if the blocks would run past counter
/// `u64::MAX` (they would wrap and repeat); Candle's, if the device fails.
pub fn keystream(key: &NoiseKey, first_block: u64, blocks: usize, device: &candle_core::Device) -> Result<Tensor> {
    let fits = gaussian::ends_by_u64_max(first_block, blocks);
    ensure("keystream: first_block + blocks", first_block as f64, "first_block + blocks <= u64::MAX", fits)?;
    let shape = Tensor::zeros((blocks, 16), DType::U32, device)?;
    Ok(shape.apply_op1_no_bwd(&Keystream { key: key.clone(), first_block })?)
}

pub(crate) struct Keystream {
    pub(crate) key: NoiseKey,
    pub(crate) first_block: u64,
}

impl CustomOp1 for Keystream {
    fn name(&self) -> &'static str {
        "candle-dp-chacha20-keystream"
    }

    fn cpu_fwd(&self, _: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (blocks, _) = l.shape().dims2()?;
        let words =
            (0..blocks as u64).flat_map(|b| chacha20::block(&self.key.words, self.first_block + b, NONCE)).collect();
        Ok((CpuStorage::U32(words), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (blocks, _) = l.shape().dims2()?;
        Ok((super::cuda::keystream(self, s, blocks)?, l.shape().clone()))
    }

    #[cfg(all(feature = "metal", target_os = "macos"))]
    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        let (blocks, _) = l.shape().dims2()?;
        Ok((super::metal::keystream(self, s, blocks)?, l.shape().clone()))
    }
}
