// Gaussian noise by counter (CUDA): value j of a tensor is slot j % 4 of the
// normals made from ChaCha20 block j / 4, exactly as counter_gaussians in
// noise.rs (the reference and the definition). All arithmetic in double.

#include <stdint.h>
#include "chacha20.cuh"

#define KEY_PARAMS uint32_t k0, uint32_t k1, uint32_t k2, uint32_t k3, uint32_t k4, uint32_t k5, uint32_t k6, uint32_t k7
#define KEY_ARRAY {k0, k1, k2, k3, k4, k5, k6, k7}

// The noise stream's nonce (noise.rs: NONCE); every draw has a fresh key.
#define NOISE_NONCE 0ull

// Two independent standard normals from two uniform 64-bit words
// (Box-Muller; u = (w + 1/2) 2^-64 in (0, 1], theta = 2 pi (w' >> 11) 2^-53).
__device__ __forceinline__ void box_muller(uint64_t radius_word, uint64_t angle_word, double* c, double* s) {
  const double u = ((double)radius_word + 0.5) * 0x1p-64;
  const double r = sqrt(-2.0 * log(u));
  const double theta = 6.283185307179586 * ((double)(angle_word >> 11) * 0x1p-53);  // 2 pi
  double sn, cs;
  sincos(theta, &sn, &cs);
  *c = r * cs;
  *s = r * sn;
}

__device__ __forceinline__ void counter_gaussians(const uint32_t key[8], uint64_t counter, double z[4]) {
  uint32_t w[16];
  chacha20_block(key, counter, NOISE_NONCE, w);
  double c0, s0, c1, s1, c2, s2, c3, s3;
#define WORD(k) ((uint64_t)w[2 * (k)] | ((uint64_t)w[2 * (k) + 1] << 32))
  box_muller(WORD(0), WORD(1), &c0, &s0);
  box_muller(WORD(2), WORD(3), &c1, &s1);
  box_muller(WORD(4), WORD(5), &c2, &s2);
  box_muller(WORD(6), WORD(7), &c3, &s3);
#undef WORD
  const double h = 0.7071067811865476;  // 1 / sqrt 2
  z[0] = (c0 + c1) * h;
  z[1] = (s0 + s1) * h;
  z[2] = (c2 + c3) * h;
  z[3] = (s2 + s3) * h;
}

// (x + std z) scale with the multiply and add rounded separately, as on the
// CPU: no fused multiply-add, so both round the same intermediate.
__device__ __forceinline__ double noisy(double x, double std_dev, double z, double scale) {
  return __dmul_rn(__dadd_rn(x, __dmul_rn(std_dev, z)), scale);
}

// out = (x + std z) scale, one thread per block of four values, grid-stride.
template <typename T>
__device__ void add_noise(const T* x, T* out, uint64_t n, const uint32_t key[8], double std_dev, double scale) {
  const uint64_t blocks = (n + 3) / 4;
  const bool aligned = ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(out)) & 15) == 0;
  for (uint64_t b = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; b < blocks; b += (uint64_t)gridDim.x * blockDim.x) {
    double z[4];
    counter_gaussians(key, b, z);
    const uint64_t j = b * 4;
    if constexpr (sizeof(T) == 4) {
      if (aligned && j + 4 <= n) {  // one 16-byte load and store per thread
        const float4 v = *reinterpret_cast<const float4*>(x + j);
        float4 o;
        o.x = (float)noisy(v.x, std_dev, z[0], scale);
        o.y = (float)noisy(v.y, std_dev, z[1], scale);
        o.z = (float)noisy(v.z, std_dev, z[2], scale);
        o.w = (float)noisy(v.w, std_dev, z[3], scale);
        *reinterpret_cast<float4*>(out + j) = o;
        continue;
      }
    }
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (j + k < n) out[j + k] = (T)noisy(x[j + k], std_dev, z[k], scale);
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
