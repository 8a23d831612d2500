//! The noise definition: hardened standard normals as a pure function of a
//! ChaCha20 key and a position, computed with IEEE operations only, so that
//! the CPU, CUDA and every split of the work give the same bits (Metal,
//! which has no `f64`, approximates them in `f32`); and the CPU's fill,
//! vectorized where the CPU allows.
//!
//! # Layout
//! Value `j` of a noise vector is slot `(j mod 64) / 16` of ChaCha20 block
//! `16 (j / 64) + j mod 16` (nonce 0): 16 consecutive blocks make 64
//! consecutive values, slot by slot, so that 16 SIMD lanes (or 16 GPU
//! threads) computing 16 blocks write 16 consecutive values at a time.
//!
//! # Transform
//! A block's 16 words make four Box-Muller pairs (Box & Muller 1958); pair
//! `p` reads words `4p .. 4p + 4` as `(R_hi, R_lo, A, B)`:
//! * radius: `W = R_hi 2^32 + R_lo + 1/2`, rounded once to `f64`, so
//!   `u = W 2^-64` is in `(0, 1]`; `rho = sqrt(-ln u)`, which is the
//!   Box-Muller radius `sqrt(-2 ln u)` times `1/sqrt 2`;
//! * angle: `x = 2 pi f` with `f = ((A mod 2^29) - 2^28) 2^-31 + (B >> 8)
//!   2^-55`, a 53-bit uniform in `[-1/8, 1/8)` turn (exact in `f64`); the
//!   top three bits of `A` pick one of the eight symmetries of the square
//!   (bit 29 swaps cosine and sine, bit 31 negates the first, bit 30 the
//!   second). The sector `[-pi/4, pi/4)` is two fundamental domains of the
//!   square's symmetry group (joined by the reflection `x -> -x`), so its
//!   eight images cover the circle exactly twice: a uniform symmetry of a
//!   uniform angle in the sector is a uniform angle on the circle (one of
//!   the three bits is redundant), and `(rho c, rho s)` are two independent
//!   `N(0, 1/2)` values;
//! * value: slot 0 is `fma(rho_0, c_0, round(rho_1 c_1))`,
//!   slot 1 `rho_0 s_0 + rho_1 s_1`, slots 2 and 3 the same with pairs 2
//!   and 3: each the sum of two independent `N(0, 1/2)`, so `N(0, 1)`.
//!
//! `ln`, `sin` and `cos` are this module's own: an exponent split and the
//! series of `atanh` for the logarithm, polynomials on `[-pi/4, pi/4]` for
//! the circle, every step an IEEE-754 addition, multiplication, division,
//! square root or fused multiply-add (correctly rounded on every CPU and on
//! CUDA), never a math library's `ln`, `sin` or `cos`, whose last bits differ
//! between platforms. (Without hardware FMA the portable path calls the C
//! library's `fma`, which glibc, musl and macOS round correctly.) Their
//! errors, measured against 60-digit references: `ln` at most 2 ulp, `sin`
//! and `cos` under 1 ulp; a value is within about `4e-16 max(1, |z|)` of the
//! exact transform of its words with `W` as rounded.
//!
//! # Security
//! * ChaCha20 (RFC 8439, 20 rounds, 256-bit key) is the keystream: a
//!   standard CSPRNG whose ARX rounds take the same time for every key on
//!   CPUs and GPUs alike (no tables, no key-dependent branches). The key is
//!   fresh from the optimizer's generator for every draw. Only the cipher is
//!   claimed constant-time: the transform has no branches on secret bits,
//!   but its division and square root may take operand-dependent time on
//!   some CPUs.
//! * Floating-point attacks (Mironov 2012 for Laplace; Jin et al. 2022,
//!   arXiv:2112.05307, for the Gaussian, on Box-Muller in particular) read
//!   the secret from which floating-point values a sampler can and cannot
//!   produce. Following Holohan & Braghin, "Secure Random Sampling in
//!   Differential Privacy" (ESORICS 2021), each value is the sum of two
//!   independent Gaussians from disjoint random words (Gaussian in exact
//!   arithmetic; in floating point the sum fills the gaps a single
//!   Box-Muller draw leaves, which mitigates the attacks). All of it in
//!   `f64`, rounded once to the output's dtype.
//! * `u >= 2^-65`, so `|rho c| <= sqrt(65 ln 2) = 6.72` (`|z| <= 9.49` for a
//!   Box-Muller normal): against the same sampler with an exact uniform `u`,
//!   a pair misses the tail `P(R^2 > 90.1) = 2^-65`, so a noise vector of
//!   `n` values is within total variation `n 2^-65` (`2.7e-20 n`) of it. Over
//!   a run that is `2.7e-20` times the values drawn in all steps (1e12
//!   values: 2.7e-8), which the accountant's delta does not include.

use super::chacha20;
use super::cpu::Element;
use super::noise::NoiseKey;
use crate::error::{ensure, Result};

/// Normal values made from one ChaCha20 block: block `16 g + i` holds values
/// `64 g + i + 16 k`, `k = 0..4` ([`value_position`]), not four consecutive
/// ones.
pub const VALUES_PER_BLOCK: usize = 4;

/// Blocks whose values interleave (see the module's layout).
pub(crate) const GROUP_BLOCKS: u64 = 16;

/// Values of one group of [`GROUP_BLOCKS`] blocks.
pub(crate) const GROUP_VALUES: usize = 64;

/// The ChaCha20 nonce of the noise stream. Every draw has a fresh random
/// key, so the (key, counter) pairs never repeat with a fixed nonce.
pub(crate) const NONCE: u64 = 0;

/// The transform's constants, shared by the scalar definition and the SIMD
/// paths (and written out again in `noise.cu`).
pub(crate) mod constants {
    /// `ln 2` split so that `e LN2_HI` is exact for `|e| < 2^20` (the
    /// classic split of Cody & Waite).
    pub const LN2_HI: f64 = 0.693_147_180_369_123_8;
    pub const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    /// `sqrt(1/2)`'s bits: mantissas are reduced to `[sqrt(1/2), sqrt 2)`.
    pub const SQRT_HALF_BITS: u64 = 0x3fe6_a09e_667f_3bcd;
    /// Added to a double's bits so that the exponent field counts from
    /// `sqrt(1/2)` instead of 1.
    pub const REDUCE_OFFSET: u64 = 0x3ff0_0000_0000_0000 - SQRT_HALF_BITS;
    pub const MANTISSA: u64 = 0x000f_ffff_ffff_ffff;
    /// `2^52 + 1023 + 64`: the biased exponent's bits OR-ed into 2^52,
    /// minus this, is the exponent of `u = W 2^-64`.
    pub const EXPONENT_MAGIC: f64 = 4_503_599_627_371_583.0;
    pub const EXPONENT_MAGIC_BITS: u64 = 0x4330_0000_0000_0000;
    /// `atanh(s) / s = 1 + s^2 P(s^2)`: `P` on `[0, 0.02944]` (the range
    /// of `s^2` for mantissas in `[sqrt(1/2), sqrt 2)`), highest degree
    /// first; a Chebyshev fit of degree 6, relative error 5e-16 in `P`,
    /// 1e-17 in the logarithm.
    pub const LN_POLY: [f64; 7] = [
        0.073_082_248_425_217_03,
        0.076_658_608_002_780_21,
        0.090_914_445_626_308_61,
        0.111_111_055_673_975_4,
        0.142_857_143_129_877_43,
        0.199_999_999_999_497_52,
        0.333_333_333_333_333_5,
    ];
    /// `sin x = x + x^3 S(x^2)` on `[-pi/4, pi/4]`, degree 5 in `x^2`.
    pub const SIN_POLY: [f64; 6] = [
        1.591_812_929_486_660_8e-10,
        -2.505_113_184_500_362_4e-8,
        2.755_731_610_255_244e-6,
        -1.984_126_983_675_857_4e-4,
        8.333_333_333_330_948e-3,
        -0.166_666_666_666_666_66,
    ];
    /// `cos x = 1 + x^2 C(x^2)` on `[-pi/4, pi/4]`, degree 6 in `x^2`.
    pub const COS_POLY: [f64; 7] = [
        -1.136_799_865_402_249_4e-11,
        2.087_588_673_804_705_2e-9,
        -2.755_731_556_634_189_5e-7,
        2.480_158_729_369_346e-5,
        -1.388_888_888_888_077_5e-3,
        0.041_666_666_666_666_64,
        -0.5,
    ];
    pub const TWO_POW_32: f64 = 4_294_967_296.0;
    pub const TWO_POW_M31: f64 = 1.0 / 2_147_483_648.0;
    pub const TWO_POW_M55: f64 = TWO_POW_M31 / 16_777_216.0;
    /// Bits 0..29 of the angle word: the sector's position.
    pub const ANGLE_MASK: u32 = (1 << 29) - 1;
    pub const HALF_SECTOR: u32 = 1 << 28;
}

use constants::*;

/// Block counter and slot of value `j` (see the module's layout).
pub fn value_position(j: u64) -> (u64, usize) {
    let group = j / GROUP_VALUES as u64;
    let within = (j % GROUP_VALUES as u64) as usize;
    (group * GROUP_BLOCKS + (within % GROUP_BLOCKS as usize) as u64, within / GROUP_BLOCKS as usize)
}

/// The four standard normals of ChaCha20 block `counter` under `key` (the
/// module's transform, in slot order): the definition every device follows.
pub fn counter_gaussians(key: &NoiseKey, counter: u64) -> [f64; 4] {
    block_normals(&chacha20::block(&key.words(), counter, NONCE))
}

/// The four values from one block's sixteen words.
pub(crate) fn block_normals(w: &[u32; 16]) -> [f64; 4] {
    let p: [Pair; 4] = std::array::from_fn(|p| pair(w[4 * p], w[4 * p + 1], w[4 * p + 2], w[4 * p + 3]));
    [
        p[0].rho.mul_add(p[0].first, p[1].rho * p[1].first),
        p[0].rho.mul_add(p[0].second, p[1].rho * p[1].second),
        p[2].rho.mul_add(p[2].first, p[3].rho * p[3].first),
        p[2].rho.mul_add(p[2].second, p[3].rho * p[3].second),
    ]
}

/// One Box-Muller pair: the scaled radius and the two coordinates on the
/// unit circle.
struct Pair {
    rho: f64,
    first: f64,
    second: f64,
}

/// The pair of words `(R_hi, R_lo, A, B)` (see the module's transform).
fn pair(r_hi: u32, r_lo: u32, a: u32, b: u32) -> Pair {
    let w = f64::from(r_hi).mul_add(TWO_POW_32, f64::from(r_lo) + 0.5);
    let rho = neg_ln_scaled(w).sqrt();
    let rem = (a & ANGLE_MASK).wrapping_sub(HALF_SECTOR) as i32;
    let f = f64::from(rem).mul_add(TWO_POW_M31, f64::from(b >> 8) * TWO_POW_M55);
    let (sin, cos) = sin_cos(f * std::f64::consts::TAU);
    // The symmetry by bit operations, not branches on the secret bits: all
    // ones where bit 29 swaps, then the sign bits flipped by bits 31 and 30.
    let swap = 0u64.wrapping_sub(u64::from((a >> 29) & 1));
    let (c, s) = (cos.to_bits(), sin.to_bits());
    let first = ((c & !swap) | (s & swap)) ^ (u64::from(a >> 31) << 63);
    let second = ((s & !swap) | (c & swap)) ^ (u64::from((a >> 30) & 1) << 63);
    Pair { rho, first: f64::from_bits(first), second: f64::from_bits(second) }
}

/// `-ln(w 2^-64)` for `w` in `[1/2, 2^64]`: `w = m 2^k` with `m` in
/// `[sqrt(1/2), sqrt 2)`, `ln m = 2 atanh(s)`, `s = (m - 1) / (m + 1)`.
pub(crate) fn neg_ln_scaled(w: f64) -> f64 {
    let t = w.to_bits().wrapping_add(REDUCE_OFFSET);
    let e = f64::from_bits((t >> 52) | EXPONENT_MAGIC_BITS) - EXPONENT_MAGIC;
    let m = f64::from_bits((t & MANTISSA) + SQRT_HALF_BITS);
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let m2s = s * -2.0;
    let neg_ln_m = m2s.mul_add(s2 * horner(&LN_POLY, s2), m2s);
    e.mul_add(-LN2_HI, e.mul_add(-LN2_LO, neg_ln_m))
}

/// `(sin x, cos x)` for `|x| <= pi/4`.
pub(crate) fn sin_cos(x: f64) -> (f64, f64) {
    let x2 = x * x;
    ((x * x2).mul_add(horner(&SIN_POLY, x2), x), x2.mul_add(horner(&COS_POLY, x2), 1.0))
}

/// `c[0] t^(n-1) + ... + c[n-1]` by Horner's rule with fused steps.
fn horner(c: &[f64], t: f64) -> f64 {
    c[1..].iter().fold(c[0], |p, k| p.mul_add(t, *k))
}

/// The SIMD width the CPU path uses: chosen once from what the CPU offers,
/// every choice giving the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    /// Scalar, one block at a time: the definition itself.
    Portable,
    /// 8 blocks per step in 256-bit registers (AVX2 and FMA).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// 16 blocks per step in 512-bit registers (AVX-512 F, DQ and VL).
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Backend {
    /// Every backend this CPU can run, slowest first. (AVX-512 needs F and VL
    /// for what it uses; DQ is asked for as well, present on every CPU with
    /// VL.)
    pub(crate) fn available() -> Vec<Backend> {
        let mut all = vec![Backend::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                all.push(Backend::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                all.push(Backend::Avx512);
            }
        }
        all
    }

    /// The fastest backend this CPU can run.
    pub(crate) fn best() -> Backend {
        static BEST: std::sync::OnceLock<Backend> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| Backend::available().last().copied().unwrap_or(Backend::Portable))
    }
}

/// `v = (v + std z_{first + i}) scale` for every `values[i]`, with `z` the
/// noise vector of `key`: the multiply, the add and the scale each rounded
/// in `f64`, then once to `T`. Pieces of `chunk` values go to `threads`
/// threads; the result does not depend on either.
pub(crate) fn add_noise_at<T: Element>(
    backend: Backend,
    key: &NoiseKey,
    first: u64,
    values: &mut [T],
    std: f64,
    scale: f64,
    threads: usize,
) {
    let chunk = 1 << 14;
    super::cpu::for_each_chunk_on(values, chunk, threads, |k, piece| {
        add_run(backend, key, first + (k * chunk) as u64, piece, std, scale);
    });
}

/// [`add_noise_at`] on one thread.
fn add_run<T: Element>(backend: Backend, key: &NoiseKey, first: u64, values: &mut [T], std: f64, scale: f64) {
    let key = key.words();
    match backend {
        Backend::Portable => run(first, values, std, scale, |g, z| portable_group(&key, g, z)),
        // SAFETY: `available` saw the CPU features these functions enable.
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 => unsafe { super::simd::add_run_avx2(&key, first, values, std, scale) },
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512 => unsafe { super::simd::add_run_avx512(&key, first, values, std, scale) },
    }
}

/// The values of group `g` (blocks `16 g .. 16 g + 16`) in layout order.
fn portable_group(key: &[u32; 8], g: u64, z: &mut [f64; GROUP_VALUES]) {
    for lane in 0..GROUP_BLOCKS as usize {
        let values = block_normals(&chacha20::block(key, g * GROUP_BLOCKS + lane as u64, NONCE));
        for (slot, v) in values.into_iter().enumerate() {
            z[slot * GROUP_BLOCKS as usize + lane] = v;
        }
    }
}

/// Walks `values` (noise positions `first ..`) group by group: `group(g, z)`
/// makes group `g`'s values, and the overlapping ones are applied.
#[inline(always)]
pub(crate) fn run<T: Element>(
    first: u64,
    values: &mut [T],
    std: f64,
    scale: f64,
    mut group: impl FnMut(u64, &mut [f64; GROUP_VALUES]),
) {
    let mut z = [0.0; GROUP_VALUES];
    let mut j = first;
    let mut rest = values;
    while !rest.is_empty() {
        let lo = (j % GROUP_VALUES as u64) as usize;
        let take = (GROUP_VALUES - lo).min(rest.len());
        group(j / GROUP_VALUES as u64, &mut z);
        let (head, tail) = rest.split_at_mut(take);
        for (v, z) in head.iter_mut().zip(&z[lo..lo + take]) {
            *v = T::from_f64((v.to_f64() + std * z) * scale);
        }
        rest = tail;
        j += take as u64;
    }
}

/// The noise vector of `key` at positions `first .. first + out.len()`
/// (standard normals), on the calling thread and the CPU's widest SIMD.
/// Any slice of a noise vector can be made this way independently of the
/// rest: the same values as [`crate::kernels::add_gaussian_noise`] on a
/// zero tensor, on the CPU and CUDA. Short slices cost a whole group of 16
/// blocks (64 values) at each end.
///
/// # Errors
/// [`crate::Error::InvalidConfig`] if `first + out.len()` exceeds
/// `u64::MAX` (positions would wrap around and repeat values).
pub fn fill_gaussians(key: &NoiseKey, first: u64, out: &mut [f64]) -> Result<()> {
    let fits = ends_by_u64_max(first, out.len());
    ensure("fill_gaussians: first + out.len()", first as f64, "first + out.len() <= u64::MAX", fits)?;
    out.fill(0.0);
    add_noise_at(Backend::best(), key, first, out, 1.0, 1.0, 1);
    Ok(())
}

/// Whether `first + len` stays within `u64::MAX`: a run of positions (or
/// block counters) from `first` that does not wrap around and repeat.
pub(crate) fn ends_by_u64_max(first: u64, len: usize) -> bool {
    u64::try_from(len).ok().and_then(|len| first.checked_add(len)).is_some()
}

/// The ChaCha20 keystream of the noise alone, at the noise's 16 bytes per
/// value (`out[j]` is the XOR of the four words of pair `slot` of value
/// `j`'s block: the same amount of keystream a value consumes), on the
/// calling thread and the CPU's widest SIMD: the cipher's share of the
/// noise's cost, for `benches/noise`. Only whole groups of 64 are written.
#[doc(hidden)]
pub fn keystream_only(key: &NoiseKey, out: &mut [u32]) {
    let words = key.words();
    match Backend::best() {
        Backend::Portable => {
            for (g, chunk) in out.chunks_exact_mut(GROUP_VALUES).enumerate() {
                for lane in 0..GROUP_BLOCKS as usize {
                    let w = chacha20::block(&words, g as u64 * GROUP_BLOCKS + lane as u64, NONCE);
                    for k in 0..4 {
                        chunk[k * GROUP_BLOCKS as usize + lane] = w[4 * k] ^ w[4 * k + 1] ^ w[4 * k + 2] ^ w[4 * k + 3];
                    }
                }
            }
        }
        // SAFETY: `best` saw the CPU features these functions enable.
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 => unsafe { super::simd::keystream_avx2(&words, out) },
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512 => unsafe { super::simd::keystream_avx512(&words, out) },
    }
}

#[cfg(test)]
mod tests;
