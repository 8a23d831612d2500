//! The CPU noise path in SIMD registers (x86-64): ChaCha20 on 16 blocks at
//! once with AVX-512 (8 with AVX2), one block per lane, and the transform of
//! `gaussian.rs` lane by lane with the same IEEE operations in the same
//! order, so the bits equal the scalar definition's (tested on every
//! backend the CPU has).
//!
//! One body, generic over [`Simd`]: each backend supplies a handful of
//! register operations, every one a single instruction or a short exact
//! sequence. The bodies are instantiated inside `#[target_feature]`
//! functions, which the caller may only enter after detecting the features.

use std::arch::x86_64::*;

use super::chacha20::SIGMA;
use super::cpu::Element;
use super::gaussian::constants::*;
use super::gaussian::{run, GROUP_BLOCKS, GROUP_VALUES, NONCE};

/// One register width. `U` holds one 32-bit word of `BLOCKS` blocks; `H`
/// half of them (`BLOCKS / 2` lanes), as wide as `F`, `BLOCKS / 2` doubles.
trait Simd {
    const BLOCKS: usize;
    type U: Copy;
    type H: Copy;
    type F: Copy;
    unsafe fn splat(x: u32) -> Self::U;
    /// The low counter words `first + lane` (`first` a multiple of
    /// `BLOCKS`, so no lane carries into the high word).
    unsafe fn counters(first: u32) -> Self::U;
    unsafe fn add(a: Self::U, b: Self::U) -> Self::U;
    unsafe fn xor(a: Self::U, b: Self::U) -> Self::U;
    unsafe fn rotl<const L: u32>(a: Self::U) -> Self::U;
    unsafe fn half<const WHICH: usize>(a: Self::U) -> Self::H;
    /// `(a mod 2^29) - 2^28` as doubles (the angle's signed sector position).
    unsafe fn sector(a: Self::H) -> Self::F;
    /// `b >> 8` as doubles.
    unsafe fn fine(b: Self::H) -> Self::F;
    /// Lanes as doubles (exact).
    unsafe fn to_f(a: Self::H) -> Self::F;
    unsafe fn fsplat(x: f64) -> Self::F;
    unsafe fn fadd(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn fsub(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn fmul(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn fdiv(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn fsqrt(a: Self::F) -> Self::F;
    /// `a b + c`, rounded once.
    unsafe fn fma(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    /// `(e, m)` with `w = m 2^(e + 64)`, `m` in `[sqrt(1/2), sqrt 2)`
    /// (`neg_ln_scaled`'s reduction, on the bits).
    unsafe fn reduce(w: Self::F) -> (Self::F, Self::F);
    /// The symmetry of the square that bits 29..32 of `a` select, applied
    /// to `(cos, sin)`: swap on bit 29, negate the first on bit 31, the
    /// second on bit 30.
    unsafe fn symmetry(a: Self::H, cos: Self::F, sin: Self::F) -> (Self::F, Self::F);
    unsafe fn store(a: Self::F, out: *mut f64);
    unsafe fn store_words(a: Self::U, out: *mut u32);
}

/// Runs the generic `$body` with backend `$s` inside a function compiled
/// for `$features`.
macro_rules! backend_fn {
    ($name:ident, $s:ty, $features:literal) => {
        /// [`super::gaussian::add_noise_at`]'s run on one thread with this
        /// backend.
        ///
        /// # Safety
        /// The CPU must have the features this function is compiled for.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name<T: Element>(key: &[u32; 8], first: u64, values: &mut [T], std: f64, scale: f64) {
            run(first, values, std, scale, |g, z| {
                let mut lane = 0;
                while lane < GROUP_BLOCKS as usize {
                    // SAFETY: the features are enabled (the caller's
                    // promise); `z` has room for the lanes written.
                    unsafe { blocks_normals::<$s>(key, g * GROUP_BLOCKS + lane as u64, z, lane) };
                    lane += <$s>::BLOCKS;
                }
            })
        }
    };
}

backend_fn!(add_run_avx512, Avx512, "avx512f,avx512dq,avx512vl,avx2,fma");
backend_fn!(add_run_avx2, Avx2, "avx2,fma");

/// The keystream alone, at the noise's rate of 16 bytes per value: for
/// group `g` of `out`, `out[16 k + lane]` is the XOR of words `4k .. 4k + 4`
/// of block `16 g + lane` (what `benches/noise` measures the cipher's share
/// of the noise with).
macro_rules! keystream_fn {
    ($name:ident, $s:ty, $features:literal) => {
        /// # Safety
        /// The CPU must have the features this function is compiled for.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name(key: &[u32; 8], out: &mut [u32]) {
            for (g, chunk) in out.chunks_exact_mut(GROUP_VALUES).enumerate() {
                let mut lane = 0;
                while lane < GROUP_BLOCKS as usize {
                    // SAFETY: as above; each store writes `BLOCKS` words of `chunk`.
                    unsafe {
                        let w = chacha20::<$s>(key, g as u64 * GROUP_BLOCKS + lane as u64);
                        for k in 0..4 {
                            let x = <$s>::xor(<$s>::xor(w[4 * k], w[4 * k + 1]), <$s>::xor(w[4 * k + 2], w[4 * k + 3]));
                            let at = k * GROUP_BLOCKS as usize + lane;
                            <$s>::store_words(x, chunk[at..at + <$s>::BLOCKS].as_mut_ptr());
                        }
                    }
                    lane += <$s>::BLOCKS;
                }
            }
        }
    };
}

keystream_fn!(keystream_avx512, Avx512, "avx512f,avx512dq,avx512vl");
keystream_fn!(keystream_avx2, Avx2, "avx2,fma");

/// The ChaCha20 blocks `first .. first + S::BLOCKS` (nonce 0): word `w` of
/// every block in register `w`.
#[inline(always)]
unsafe fn chacha20<S: Simd>(key: &[u32; 8], first: u64) -> [S::U; 16] {
    let high = (first >> 32) as u32;
    let init = [
        S::splat(SIGMA[0]),
        S::splat(SIGMA[1]),
        S::splat(SIGMA[2]),
        S::splat(SIGMA[3]),
        S::splat(key[0]),
        S::splat(key[1]),
        S::splat(key[2]),
        S::splat(key[3]),
        S::splat(key[4]),
        S::splat(key[5]),
        S::splat(key[6]),
        S::splat(key[7]),
        S::counters(first as u32),
        S::splat(high),
        S::splat(NONCE as u32),
        S::splat((NONCE >> 32) as u32),
    ];
    let mut s = init;
    macro_rules! qr {
        ($a:literal, $b:literal, $c:literal, $d:literal) => {
            s[$a] = S::add(s[$a], s[$b]);
            s[$d] = S::rotl::<16>(S::xor(s[$d], s[$a]));
            s[$c] = S::add(s[$c], s[$d]);
            s[$b] = S::rotl::<12>(S::xor(s[$b], s[$c]));
            s[$a] = S::add(s[$a], s[$b]);
            s[$d] = S::rotl::<8>(S::xor(s[$d], s[$a]));
            s[$c] = S::add(s[$c], s[$d]);
            s[$b] = S::rotl::<7>(S::xor(s[$b], s[$c]));
        };
    }
    for _ in 0..10 {
        qr!(0, 4, 8, 12);
        qr!(1, 5, 9, 13);
        qr!(2, 6, 10, 14);
        qr!(3, 7, 11, 15);
        qr!(0, 5, 10, 15);
        qr!(1, 6, 11, 12);
        qr!(2, 7, 8, 13);
        qr!(3, 4, 9, 14);
    }
    for (o, i) in s.iter_mut().zip(init) {
        *o = S::add(*o, i);
    }
    s
}

/// `c[0] t^(n-1) + ... + c[n-1]`, as `gaussian::horner`.
#[inline(always)]
unsafe fn horner<S: Simd>(c: &[f64], t: S::F) -> S::F {
    let mut p = S::fsplat(c[0]);
    for k in &c[1..] {
        p = S::fma(p, t, S::fsplat(*k));
    }
    p
}

/// `gaussian::pair` lane by lane: `(rho, first, second)`.
#[inline(always)]
unsafe fn pair<S: Simd>(r_hi: S::H, r_lo: S::H, a: S::H, b: S::H) -> (S::F, S::F, S::F) {
    let w = S::fma(S::to_f(r_hi), S::fsplat(TWO_POW_32), S::fadd(S::to_f(r_lo), S::fsplat(0.5)));
    let (e, m) = S::reduce(w);
    let one = S::fsplat(1.0);
    let s = S::fdiv(S::fsub(m, one), S::fadd(m, one));
    let s2 = S::fmul(s, s);
    let m2s = S::fmul(s, S::fsplat(-2.0));
    let neg_ln_m = S::fma(m2s, S::fmul(s2, horner::<S>(&LN_POLY, s2)), m2s);
    let rho = S::fsqrt(S::fma(e, S::fsplat(-LN2_HI), S::fma(e, S::fsplat(-LN2_LO), neg_ln_m)));
    let f = S::fma(S::sector(a), S::fsplat(TWO_POW_M31), S::fmul(S::fine(b), S::fsplat(TWO_POW_M55)));
    let x = S::fmul(f, S::fsplat(std::f64::consts::TAU));
    let x2 = S::fmul(x, x);
    let sin = S::fma(S::fmul(x, x2), horner::<S>(&SIN_POLY, x2), x);
    let cos = S::fma(x2, horner::<S>(&COS_POLY, x2), one);
    let (first, second) = S::symmetry(a, cos, sin);
    (rho, first, second)
}

/// The values of blocks `first .. first + S::BLOCKS`, which are lanes
/// `lane ..` of their group, into the group's values `z` (slot-major).
#[inline(always)]
unsafe fn blocks_normals<S: Simd>(key: &[u32; 8], first: u64, z: &mut [f64; GROUP_VALUES], lane: usize) {
    let w = chacha20::<S>(key, first);
    let half_lanes = S::BLOCKS / 2;
    macro_rules! half {
        ($which:literal) => {{
            let h = |i: usize| S::half::<$which>(w[i]);
            // Written out: `array::from_fn` would call `pair` through a
            // function compiled without the target features.
            let p = [
                pair::<S>(h(0), h(1), h(2), h(3)),
                pair::<S>(h(4), h(5), h(6), h(7)),
                pair::<S>(h(8), h(9), h(10), h(11)),
                pair::<S>(h(12), h(13), h(14), h(15)),
            ];
            let values = [
                S::fma(p[0].0, p[0].1, S::fmul(p[1].0, p[1].1)),
                S::fma(p[0].0, p[0].2, S::fmul(p[1].0, p[1].2)),
                S::fma(p[2].0, p[2].1, S::fmul(p[3].0, p[3].1)),
                S::fma(p[2].0, p[2].2, S::fmul(p[3].0, p[3].2)),
            ];
            for (slot, v) in values.into_iter().enumerate() {
                let at = slot * GROUP_BLOCKS as usize + lane + $which * half_lanes;
                S::store(v, z[at..at + half_lanes].as_mut_ptr());
            }
        }};
    }
    half!(0);
    half!(1);
}

/// 512-bit registers: AVX-512 F and VL (the 256-bit halves' bit tests).
struct Avx512;

/// 256-bit registers: AVX2 and FMA.
struct Avx2;

impl Simd for Avx512 {
    const BLOCKS: usize = 16;
    type U = __m512i;
    type H = __m256i;
    type F = __m512d;
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    unsafe fn splat(x: u32) -> __m512i {
        _mm512_set1_epi32(x as i32)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    unsafe fn counters(first: u32) -> __m512i {
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        _mm512_add_epi32(_mm512_set1_epi32(first as i32), lanes)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    unsafe fn add(a: __m512i, b: __m512i) -> __m512i {
        _mm512_add_epi32(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    unsafe fn xor(a: __m512i, b: __m512i) -> __m512i {
        _mm512_xor_si512(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    unsafe fn rotl<const L: u32>(a: __m512i) -> __m512i {
        _mm512_rolv_epi32(a, _mm512_set1_epi32(L as i32))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    unsafe fn half<const WHICH: usize>(a: __m512i) -> __m256i {
        if WHICH == 0 {
            _mm512_castsi512_si256(a)
        } else {
            _mm512_extracti64x4_epi64::<1>(a)
        }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    unsafe fn sector(a: __m256i) -> __m512d {
        let masked = _mm256_and_si256(a, _mm256_set1_epi32(ANGLE_MASK as i32));
        _mm512_cvtepi32_pd(_mm256_sub_epi32(masked, _mm256_set1_epi32(HALF_SECTOR as i32)))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    unsafe fn fine(b: __m256i) -> __m512d {
        _mm512_cvtepi32_pd(_mm256_srli_epi32::<8>(b))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    unsafe fn to_f(a: __m256i) -> __m512d {
        _mm512_cvtepu32_pd(a)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    unsafe fn fsplat(x: f64) -> __m512d {
        _mm512_set1_pd(x)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    unsafe fn fadd(a: __m512d, b: __m512d) -> __m512d {
        _mm512_add_pd(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    unsafe fn fsub(a: __m512d, b: __m512d) -> __m512d {
        _mm512_sub_pd(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    unsafe fn fmul(a: __m512d, b: __m512d) -> __m512d {
        _mm512_mul_pd(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    unsafe fn fdiv(a: __m512d, b: __m512d) -> __m512d {
        _mm512_div_pd(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    unsafe fn fsqrt(a: __m512d) -> __m512d {
        _mm512_sqrt_pd(a)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    unsafe fn fma(a: __m512d, b: __m512d, c: __m512d) -> __m512d {
        _mm512_fmadd_pd(a, b, c)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    unsafe fn reduce(w: __m512d) -> (__m512d, __m512d) {
        let t = _mm512_add_epi64(_mm512_castpd_si512(w), _mm512_set1_epi64(REDUCE_OFFSET as i64));
        let magic = _mm512_set1_epi64(EXPONENT_MAGIC_BITS as i64);
        let e = _mm512_castsi512_pd(_mm512_or_si512(_mm512_srli_epi64::<52>(t), magic));
        let m = _mm512_add_epi64(
            _mm512_and_si512(t, _mm512_set1_epi64(MANTISSA as i64)),
            _mm512_set1_epi64(SQRT_HALF_BITS as i64),
        );
        (_mm512_sub_pd(e, _mm512_set1_pd(EXPONENT_MAGIC)), _mm512_castsi512_pd(m))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    unsafe fn symmetry(a: __m256i, cos: __m512d, sin: __m512d) -> (__m512d, __m512d) {
        let bit = |b: u32| _mm256_test_epi32_mask(a, _mm256_set1_epi32((1u32 << b) as i32));
        let swap = bit(29);
        let first = _mm512_mask_blend_pd(swap, cos, sin);
        let second = _mm512_mask_blend_pd(swap, sin, cos);
        let sign = _mm512_set1_epi64(i64::MIN);
        let negate = |x: __m512d, m: __mmask8| {
            _mm512_castsi512_pd(_mm512_mask_xor_epi64(_mm512_castpd_si512(x), m, _mm512_castpd_si512(x), sign))
        };
        (negate(first, bit(31)), negate(second, bit(30)))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    unsafe fn store(a: __m512d, out: *mut f64) {
        _mm512_storeu_pd(out, a)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    unsafe fn store_words(a: __m512i, out: *mut u32) {
        _mm512_storeu_si512(out.cast(), a)
    }
}

impl Simd for Avx2 {
    const BLOCKS: usize = 8;
    type U = __m256i;
    type H = __m128i;
    type F = __m256d;
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn splat(x: u32) -> __m256i {
        _mm256_set1_epi32(x as i32)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn counters(first: u32) -> __m256i {
        _mm256_add_epi32(_mm256_set1_epi32(first as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn add(a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi32(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn xor(a: __m256i, b: __m256i) -> __m256i {
        _mm256_xor_si256(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rotl<const L: u32>(a: __m256i) -> __m256i {
        let left = _mm256_sllv_epi32(a, _mm256_set1_epi32(L as i32));
        _mm256_or_si256(left, _mm256_srlv_epi32(a, _mm256_set1_epi32(32 - L as i32)))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn half<const WHICH: usize>(a: __m256i) -> __m128i {
        if WHICH == 0 {
            _mm256_castsi256_si128(a)
        } else {
            _mm256_extracti128_si256::<1>(a)
        }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sector(a: __m128i) -> __m256d {
        let masked = _mm_and_si128(a, _mm_set1_epi32(ANGLE_MASK as i32));
        _mm256_cvtepi32_pd(_mm_sub_epi32(masked, _mm_set1_epi32(HALF_SECTOR as i32)))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fine(b: __m128i) -> __m256d {
        _mm256_cvtepi32_pd(_mm_srli_epi32::<8>(b))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn to_f(a: __m128i) -> __m256d {
        // No unsigned conversion below AVX-512: shift by 2^31 into the
        // signed range, convert (exact), shift back (exact).
        let signed = _mm_xor_si128(a, _mm_set1_epi32(i32::MIN));
        _mm256_add_pd(_mm256_cvtepi32_pd(signed), _mm256_set1_pd(2_147_483_648.0))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fsplat(x: f64) -> __m256d {
        _mm256_set1_pd(x)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fadd(a: __m256d, b: __m256d) -> __m256d {
        _mm256_add_pd(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fsub(a: __m256d, b: __m256d) -> __m256d {
        _mm256_sub_pd(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fmul(a: __m256d, b: __m256d) -> __m256d {
        _mm256_mul_pd(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fdiv(a: __m256d, b: __m256d) -> __m256d {
        _mm256_div_pd(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fsqrt(a: __m256d) -> __m256d {
        _mm256_sqrt_pd(a)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma(a: __m256d, b: __m256d, c: __m256d) -> __m256d {
        _mm256_fmadd_pd(a, b, c)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn reduce(w: __m256d) -> (__m256d, __m256d) {
        let t = _mm256_add_epi64(_mm256_castpd_si256(w), _mm256_set1_epi64x(REDUCE_OFFSET as i64));
        let magic = _mm256_set1_epi64x(EXPONENT_MAGIC_BITS as i64);
        let e = _mm256_castsi256_pd(_mm256_or_si256(_mm256_srli_epi64::<52>(t), magic));
        let m = _mm256_add_epi64(
            _mm256_and_si256(t, _mm256_set1_epi64x(MANTISSA as i64)),
            _mm256_set1_epi64x(SQRT_HALF_BITS as i64),
        );
        (_mm256_sub_pd(e, _mm256_set1_pd(EXPONENT_MAGIC)), _mm256_castsi256_pd(m))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn symmetry(a: __m128i, cos: __m256d, sin: __m256d) -> (__m256d, __m256d) {
        // Each lane's word widened to 64 bits and shifted so that the bit
        // wanted is the sign bit: what `blendv` reads and what `xor` flips.
        let wide = _mm256_cvtepu32_epi64(a);
        let sign = _mm256_set1_epi64x(i64::MIN);
        let swap = _mm256_castsi256_pd(_mm256_slli_epi64::<34>(wide));
        let first = _mm256_blendv_pd(cos, sin, swap);
        let second = _mm256_blendv_pd(sin, cos, swap);
        let flip = |x: __m256d, bit_to_sign: __m256i| {
            _mm256_castsi256_pd(_mm256_xor_si256(_mm256_castpd_si256(x), _mm256_and_si256(bit_to_sign, sign)))
        };
        (flip(first, _mm256_slli_epi64::<32>(wide)), flip(second, _mm256_slli_epi64::<33>(wide)))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store(a: __m256d, out: *mut f64) {
        _mm256_storeu_pd(out, a)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store_words(a: __m256i, out: *mut u32) {
        _mm256_storeu_si256(out.cast(), a)
    }
}
