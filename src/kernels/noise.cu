// Gaussian noise by counter (CUDA): the definition of gaussian.rs, bit for
// bit. Value j of a tensor is slot (j % 64) / 16 of ChaCha20 block
// 16 (j / 64) + j % 16; the transform uses gaussian.rs's own logarithm,
// sine and cosine with every operation an explicitly rounded intrinsic
// (__fma_rn, __dmul_rn, ...), so that nvcc cannot contract or reorder
// anything; the constants are the same doubles, as bit patterns (a test on
// the CPU reads them from this file and compares them with gaussian.rs's).

#include <stdint.h>
#include "chacha20.cuh"

#define KEY_PARAMS uint32_t k0, uint32_t k1, uint32_t k2, uint32_t k3, uint32_t k4, uint32_t k5, uint32_t k6, uint32_t k7
#define KEY_ARRAY {k0, k1, k2, k3, k4, k5, k6, k7}

// The noise stream's nonce (gaussian.rs: NONCE); every draw has a fresh key.
#define NOISE_NONCE 0ull

// A double from its IEEE-754 bits.
#define D(bits) __longlong_as_double((long long)(bits##ull))

// BEGIN CONSTANTS (order: LN2_HI, LN2_LO, LN_POLY, SIN_POLY, COS_POLY, TAU, EXPONENT_MAGIC)
#define LN2_HI D(0x3fe62e42fee00000)
#define LN2_LO D(0x3dea39ef35793c76)
#define LN_POLY(t) horner7(t, D(0x3fb2b584aae78a57), D(0x3fb39fe606542dde), D(0x3fb7462b4ab2ef6b), \
    D(0x3fbc71c62e5800a1), D(0x3fc2492492df148d), D(0x3fc99999999952e2), D(0x3fd5555555555558))
#define SIN_POLY(t) horner6(t, D(0x3de5e0b19f8b1451), D(0xbe5ae600b02b6262), D(0x3ec71de37968a100), \
    D(0xbf2a01a019e83aae), D(0x3f81111111110bb2), D(0xbfc5555555555555))
#define COS_POLY(t) horner7(t, D(0xbda8ff9d439a204a), D(0x3e21eea7f259b344), D(0xbe927e4f8e4a2e74), \
    D(0x3efa01a019de131f), D(0xbf56c16c16c15d79), D(0x3fa5555555555551), D(0xbfe0000000000000))
#define TAU D(0x401921fb54442d18)
#define EXPONENT_MAGIC D(0x433000000000043f)
// END CONSTANTS
#define EXPONENT_MAGIC_BITS 0x4330000000000000ull
#define SQRT_HALF_BITS 0x3fe6a09e667f3bcdull
#define REDUCE_OFFSET (0x3ff0000000000000ull - SQRT_HALF_BITS)
#define MANTISSA 0x000fffffffffffffull
#define ANGLE_MASK 0x1fffffffu
#define HALF_SECTOR 0x10000000u

__device__ __forceinline__ double horner6(double t, double c0, double c1, double c2, double c3, double c4, double c5) {
  double p = c0;
  p = __fma_rn(p, t, c1);
  p = __fma_rn(p, t, c2);
  p = __fma_rn(p, t, c3);
  p = __fma_rn(p, t, c4);
  return __fma_rn(p, t, c5);
}

__device__ __forceinline__ double horner7(double t, double c0, double c1, double c2, double c3, double c4, double c5,
                                          double c6) {
  return __fma_rn(horner6(t, c0, c1, c2, c3, c4, c5), t, c6);
}

// -ln(w 2^-64) for w in [1/2, 2^64] (gaussian.rs: neg_ln_scaled).
__device__ __forceinline__ double neg_ln_scaled(double w) {
  const uint64_t t = (uint64_t)__double_as_longlong(w) + REDUCE_OFFSET;
  const double e = __dsub_rn(__longlong_as_double((long long)((t >> 52) | EXPONENT_MAGIC_BITS)), EXPONENT_MAGIC);
  const double m = __longlong_as_double((long long)((t & MANTISSA) + SQRT_HALF_BITS));
  const double s = __ddiv_rn(__dsub_rn(m, 1.0), __dadd_rn(m, 1.0));
  const double s2 = __dmul_rn(s, s);
  const double m2s = __dmul_rn(s, -2.0);
  const double neg_ln_m = __fma_rn(m2s, __dmul_rn(s2, LN_POLY(s2)), m2s);
  return __fma_rn(e, -LN2_HI, __fma_rn(e, -LN2_LO, neg_ln_m));
}

// One Box-Muller pair (gaussian.rs: pair): rho and the two coordinates.
struct Pair {
  double rho, first, second;
};

__device__ __forceinline__ Pair pair(uint32_t r_hi, uint32_t r_lo, uint32_t a, uint32_t b) {
  const double w = __fma_rn(__uint2double_rn(r_hi), 4294967296.0, __dadd_rn(__uint2double_rn(r_lo), 0.5));
  Pair p;
  p.rho = __dsqrt_rn(neg_ln_scaled(w));
  const int32_t rem = (int32_t)((a & ANGLE_MASK) - HALF_SECTOR);
  const double f = __fma_rn(__int2double_rn(rem), 0x1p-31, __dmul_rn(__uint2double_rn(b >> 8), 0x1p-55));
  const double x = __dmul_rn(f, TAU);
  const double x2 = __dmul_rn(x, x);
  const double sn = __fma_rn(__dmul_rn(x, x2), SIN_POLY(x2), x);
  const double cs = __fma_rn(x2, COS_POLY(x2), 1.0);
  const bool swap = (a >> 29) & 1u;
  const double first = swap ? sn : cs, second = swap ? cs : sn;
  p.first = ((a >> 31) & 1u) ? -first : first;
  p.second = ((a >> 30) & 1u) ? -second : second;
  return p;
}

// The four values of block `counter` (gaussian.rs: counter_gaussians).
__device__ __forceinline__ void counter_gaussians(const uint32_t key[8], uint64_t counter, double z[4]) {
  uint32_t w[16];
  chacha20_block(key, counter, NOISE_NONCE, w);
  const Pair p0 = pair(w[0], w[1], w[2], w[3]);
  const Pair p1 = pair(w[4], w[5], w[6], w[7]);
  const Pair p2 = pair(w[8], w[9], w[10], w[11]);
  const Pair p3 = pair(w[12], w[13], w[14], w[15]);
  z[0] = __fma_rn(p0.rho, p0.first, __dmul_rn(p1.rho, p1.first));
  z[1] = __fma_rn(p0.rho, p0.second, __dmul_rn(p1.rho, p1.second));
  z[2] = __fma_rn(p2.rho, p2.first, __dmul_rn(p3.rho, p3.first));
  z[3] = __fma_rn(p2.rho, p2.second, __dmul_rn(p3.rho, p3.second));
}

// (x + std z) scale with the multiply and add rounded separately, as on the
// CPU: no fused multiply-add, so both round the same intermediate.
__device__ __forceinline__ double noisy(double x, double std_dev, double z, double scale) {
  return __dmul_rn(__dadd_rn(x, __dmul_rn(std_dev, z)), scale);
}

// out = (x + std z) scale, one thread per block, grid-stride: block b
// holds values 64 (b / 16) + b % 16 + 16 k, k = 0..3, so the 16 threads of a
// group write 16 consecutive values at a time.
template <typename T>
__device__ void add_noise(const T* x, T* out, uint64_t n, const uint32_t key[8], double std_dev, double scale) {
  const uint64_t blocks = (n + 63) / 64 * 16;
  for (uint64_t b = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; b < blocks; b += (uint64_t)gridDim.x * blockDim.x) {
    const uint64_t base = b / 16 * 64 + b % 16;
    if (base >= n) continue;
    double z[4];
    counter_gaussians(key, b, z);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint64_t j = base + 16 * k;
      if (j < n) out[j] = (T)noisy((double)x[j], std_dev, z[k], scale);
    }
  }
}

extern "C" __global__ void add_noise_f32(const float* x, float* out, uint64_t n, KEY_PARAMS, double std_dev,
                                         double scale) {
  const uint32_t key[8] = KEY_ARRAY;
  add_noise<float>(x, out, n, key, std_dev, scale);
}

extern "C" __global__ void add_noise_f64(const double* x, double* out, uint64_t n, KEY_PARAMS, double std_dev,
                                         double scale) {
  const uint32_t key[8] = KEY_ARRAY;
  add_noise<double>(x, out, n, key, std_dev, scale);
}

// The raw words of blocks first .. first + blocks, [blocks, 16], one thread per block.
extern "C" __global__ void chacha20_keystream(uint32_t* out, uint64_t first, uint64_t blocks, KEY_PARAMS) {
  const uint32_t key[8] = KEY_ARRAY;
  for (uint64_t b = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; b < blocks; b += (uint64_t)gridDim.x * blockDim.x) {
    uint32_t w[16];
    chacha20_block(key, first + b, NOISE_NONCE, w);
    for (int k = 0; k < 16; ++k) out[b * 16 + k] = w[k];
  }
}
