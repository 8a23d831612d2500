//! Gaussian noise by counter: ChaCha20 blocks turned into hardened normals,
//! the same bits on every device.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::chacha20;
use super::clip::widened;
use super::cpu::{contiguous_cpu, for_each_chunk, Element};
use crate::error::{ensure, Result};

/// Normal values made from one ChaCha20 block.
pub const VALUES_PER_BLOCK: usize = 4;

/// The ChaCha20 nonce of the noise stream. Every draw has a fresh random
/// key, so the (key, counter) pairs never repeat with a fixed nonce.
const NONCE: u64 = 0;

/// Values one CPU work item fills (a multiple of [`VALUES_PER_BLOCK`]).
const CPU_CHUNK: usize = 1 << 12;

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

/// The four standard normals of ChaCha20 block `counter` under `key`:
/// value `j` of a tensor is `counter_gaussians(key, j / 4)[j % 4]`.
///
/// # Definition
/// Read the block as eight 64-bit words `w_0..w_8` (little-endian word
/// pairs). Each pair `(w_2k, w_2k+1)` gives, by the Box-Muller transform
/// (Box & Muller 1958), `r_k = sqrt(-2 ln u)` with `u = (w_2k + 1/2) 2^-64`
/// in `(0, 1]`, and `theta_k = 2 pi (w_2k+1 >> 11) 2^-53`; then
/// `(r_0 cos theta_0 + r_1 cos theta_1) / sqrt 2`,
/// `(r_0 sin theta_0 + r_1 sin theta_1) / sqrt 2`, and the same with pairs 2
/// and 3. All in `f64`.
///
/// # Security
/// Each value is the normalized sum of two independent standard normals from
/// disjoint random words: the floating-point hardening of the host sampler
/// (Holohan & Braghin, ESORICS 2021; the `n = 2` of Opacus' secure mode),
/// against the attacks of Jin et al. 2022 (arXiv:2112.05307) on plain
/// Box-Muller. The four values of a block depend on disjoint independent
/// pairs (cosine and sine of one pair are independent), so they are
/// independent.
///
/// # Numerics
/// `u >= 2^-65`, so each normal is truncated at `|z| <= 9.49`: a total
/// variation distance of at most `2 P(|Z| > 9.49) = 4.6e-21` per value from
/// the exact Gaussian (1e8 parameters for 1e5 steps: 4.6e-8 in all), which
/// the accountant's delta does not include. The CUDA kernel computes the
/// same words; its `log`, `sin` and `cos` are within 2 ulp of the CPU's, so
/// values agree to about 1e-15 relative, and after rounding to `f32` are
/// equal or one ulp apart.
pub fn counter_gaussians(key: &NoiseKey, counter: u64) -> [f64; 4] {
    let w = chacha20::block(&key.words, counter, NONCE);
    let word = |k: usize| u64::from(w[2 * k]) | (u64::from(w[2 * k + 1]) << 32);
    let (c0, s0) = box_muller(word(0), word(1));
    let (c1, s1) = box_muller(word(2), word(3));
    let (c2, s2) = box_muller(word(4), word(5));
    let (c3, s3) = box_muller(word(6), word(7));
    let h = std::f64::consts::FRAC_1_SQRT_2;
    [(c0 + c1) * h, (s0 + s1) * h, (c2 + c3) * h, (s2 + s3) * h]
}

/// Two independent standard normals from two uniform 64-bit words.
#[inline]
fn box_muller(radius_word: u64, angle_word: u64) -> (f64, f64) {
    const TWO_POW_M64: f64 = 1.0 / 18_446_744_073_709_551_616.0;
    const TWO_POW_M53: f64 = 1.0 / 9_007_199_254_740_992.0;
    let u = (radius_word as f64 + 0.5) * TWO_POW_M64;
    let r = (-2.0 * u.ln()).sqrt();
    let theta = std::f64::consts::TAU * ((angle_word >> 11) as f64 * TWO_POW_M53);
    let (s, c) = theta.sin_cos();
    (r * c, r * s)
}

/// `(x + std z) scale` for every element of `x`, computed in `f64` and
/// rounded once, with `z` the values of [`counter_gaussians`] in row-major
/// order. The op runs where `x` lives: on a GPU the noise is made there,
/// from the key alone. `f16`/`bf16` go through `f32`. No gradient flows.
///
/// # Errors
/// [`crate::Error::InvalidConfig`] for `std` negative or not finite, or
/// `scale` not finite; [`crate::Error::Dtype`] for a non-float dtype.
pub fn add_gaussian_noise(x: &Tensor, key: &NoiseKey, std: f64, scale: f64) -> Result<Tensor> {
    check(std, scale)?;
    let (t, dtype) = widened(x, "add_gaussian_noise: x")?;
    let op = AddNoise { key: key.clone(), std, scale };
    Ok(t.apply_op1_no_bwd(&op)?.to_dtype(dtype)?)
}

/// The reference for [`add_gaussian_noise`]: one thread, the key stream read
/// from `rand_chacha` (an implementation independent of this crate's block
/// function) and the transform written out per value.
///
/// # Errors
/// As [`add_gaussian_noise`].
pub fn add_gaussian_noise_slow(x: &Tensor, key: &NoiseKey, std: f64, scale: f64) -> Result<Tensor> {
    check(std, scale)?;
    let mut bytes = [0u8; 32];
    for (b, w) in bytes.chunks_exact_mut(4).zip(key.words) {
        b.copy_from_slice(&w.to_le_bytes());
    }
    let mut stream = ChaCha20Rng::from_seed(bytes);
    stream.set_stream(NONCE);
    let values = x.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let mut out = Vec::with_capacity(values.len());
    for block in values.chunks(VALUES_PER_BLOCK) {
        let w: [u64; 8] = std::array::from_fn(|_| stream.next_u64());
        let pair = |k: usize| {
            let u = (w[2 * k] as f64 + 0.5) / 2f64.powi(64);
            let theta = 2.0 * std::f64::consts::PI * ((w[2 * k + 1] >> 11) as f64 / 2f64.powi(53));
            let r = (-2.0 * u.ln()).sqrt();
            (r * theta.cos(), r * theta.sin())
        };
        let (p0, p1, p2, p3) = (pair(0), pair(1), pair(2), pair(3));
        let z = [p0.0 + p1.0, p0.1 + p1.1, p2.0 + p3.0, p2.1 + p3.1];
        for (v, z) in block.iter().zip(z) {
            out.push((v + std * (z / 2f64.sqrt())) * scale);
        }
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
    /// The CPU path: chunks of whole blocks, on all cores for large tensors.
    fn cpu<T: Element>(&self, x: &[T]) -> Vec<T> {
        let mut out = x.to_vec();
        // ChaCha20 and four transcendental calls per value outweigh the
        // memory traffic: count the work per value as a block's worth.
        for_each_chunk(&mut out, CPU_CHUNK, x.len() * 16, |k, chunk| {
            let first_block = (k * CPU_CHUNK / VALUES_PER_BLOCK) as u64;
            for (b, values) in chunk.chunks_mut(VALUES_PER_BLOCK).enumerate() {
                let z = counter_gaussians(&self.key, first_block + b as u64);
                for (v, z) in values.iter_mut().zip(z) {
                    *v = T::from_f64((v.to_f64() + self.std * z) * self.scale);
                }
            }
        });
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
/// Candle's, if the device fails.
pub fn keystream(key: &NoiseKey, first_block: u64, blocks: usize, device: &candle_core::Device) -> Result<Tensor> {
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
