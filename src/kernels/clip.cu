// Per-example squared norms and the fused clip-and-accumulate (CUDA).
// The Rust glue is cuda.rs; the reference is the CPU path in clip.rs.
// Accumulation is in double (the norms decide the clipping, so they carry the
// privacy guarantee); loads are 16 bytes wide where the data is aligned.

#include <stdint.h>

// Threads per block of the reduction kernels (a multiple of 32).
#define THREADS 512

// 16-byte vector loads: float4 (4 lanes) for float, double2 (2 lanes) for double.
template <typename T> struct Vec16;
template <> struct Vec16<float> {
  typedef float4 V;
  static const int LANES = 4;
  __device__ static double sq(V v) {
    double a = v.x, b = v.y, c = v.z, d = v.w;
    return (a * a + b * b) + (c * c + d * d);
  }
  __device__ static void axpy(double c, V v, double* acc) {
    acc[0] += c * (double)v.x; acc[1] += c * (double)v.y;
    acc[2] += c * (double)v.z; acc[3] += c * (double)v.w;
  }
};
template <> struct Vec16<double> {
  typedef double2 V;
  static const int LANES = 2;
  __device__ static double sq(V v) { return v.x * v.x + v.y * v.y; }
  __device__ static void axpy(double c, V v, double* acc) { acc[0] += c * v.x; acc[1] += c * v.y; }
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// Sum of a double over the block; the result is valid in thread 0.
__device__ double block_sum(double v) {
  __shared__ double warp_sums[THREADS / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = 0.0;
  if (warp == 0) {
    v = lane < (int)(blockDim.x >> 5) ? warp_sums[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

// Stage 1 of the norms: block k reduces part (k % parts) of row (k / parts)
// of x [rows, n] into partial[k]. Parts are `len` elements, len a multiple
// of 4, so a part starts 16-byte aligned whenever its row does.
template <typename T>
__device__ void squared_norms_partial(const T* x, uint64_t n, uint32_t parts, uint64_t len, double* partial) {
  const uint64_t row = blockIdx.x / parts, part = blockIdx.x % parts;
  const uint64_t start = part * len;
  const uint64_t end = min(n, start + len);
  const T* p = x + row * n + start;
  const uint64_t count = end > start ? end - start : 0;
  double acc = 0.0;
  // Elements read one by one until p is 16-byte aligned (it is always
  // aligned to sizeof(T)), then 16-byte vectors, then the tail.
  const uintptr_t misaligned = reinterpret_cast<uintptr_t>(p) & 15;
  const uint64_t head = misaligned == 0 ? 0 : min(count, (uint64_t)((16 - misaligned) / sizeof(T)));
  for (uint64_t i = threadIdx.x; i < head; i += blockDim.x) { double v = p[i]; acc += v * v; }
  if (head < count) {
    typedef typename Vec16<T>::V V;
    const int L = Vec16<T>::LANES;
    const V* body = reinterpret_cast<const V*>(p + head);
    const uint64_t vectors = (count - head) / L;
    for (uint64_t i = threadIdx.x; i < vectors; i += blockDim.x) acc += Vec16<T>::sq(body[i]);
    for (uint64_t i = head + vectors * L + threadIdx.x; i < count; i += blockDim.x) { double v = p[i]; acc += v * v; }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// Stage 2: row r's parts summed in order, rounded once.
template <typename T>
__device__ void sum_parts(const double* partial, uint32_t parts, uint64_t rows, T* out) {
  const uint64_t r = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  double s = 0.0;
  for (uint32_t k = 0; k < parts; ++k) s += partial[r * parts + k];
  out[r] = (T)s;
}

// Clip-and-accumulate, stage 1: rows [s * rows_per_slice, ...) of slice
// s = blockIdx.y. A thread owns LANES consecutive columns (one 16-byte load
// per row, coalesced across the warp) when every row is 16-byte aligned,
// else one column; it strides over the columns by the grid, so any grid is
// correct. With one slice
// the result is written rounded to T, else as double partials [slices, n].
template <typename T>
__device__ void clip_accumulate_slice(const T* g, const T* c, uint64_t rows, uint64_t n, uint64_t rows_per_slice,
                                      T* out, double* partial) {
  typedef typename Vec16<T>::V V;
  const int L = Vec16<T>::LANES;
  const uint64_t r0 = (uint64_t)blockIdx.y * rows_per_slice;
  const uint64_t r1 = min(rows, r0 + rows_per_slice);
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  const uint64_t first = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const bool sliced = gridDim.y > 1;
  if (aligned16(g) && n % L == 0) {
    for (uint64_t t = first; t < n / L; t += stride) {
      const uint64_t j0 = t * L;
      double acc[L];
#pragma unroll
      for (int k = 0; k < L; ++k) acc[k] = 0.0;
      for (uint64_t i = r0; i < r1; ++i) Vec16<T>::axpy((double)c[i], *reinterpret_cast<const V*>(g + i * n + j0), acc);
#pragma unroll
      for (int k = 0; k < L; ++k) {
        if (sliced) partial[(uint64_t)blockIdx.y * n + j0 + k] = acc[k];
        else out[j0 + k] = (T)acc[k];
      }
    }
  } else {
    for (uint64_t j = first; j < n; j += stride) {
      double acc = 0.0;
      for (uint64_t i = r0; i < r1; ++i) acc += (double)c[i] * (double)g[i * n + j];
      if (sliced) partial[(uint64_t)blockIdx.y * n + j] = acc;
      else out[j] = (T)acc;
    }
  }
}

// Clip-and-accumulate, stage 2: the slices' partials summed in slice order.
template <typename T>
__device__ void sum_slices(const double* partial, uint32_t slices, uint64_t n, T* out) {
  const uint64_t j = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n) return;
  double s = 0.0;
  for (uint32_t k = 0; k < slices; ++k) s += partial[(uint64_t)k * n + j];
  out[j] = (T)s;
}

#define INSTANTIATE(T, SUFFIX)                                                                          \
  extern "C" __global__ void __launch_bounds__(THREADS) squared_norms_partial_##SUFFIX(                 \
      const T* x, uint64_t n, uint32_t parts, uint64_t len, double* partial) {                          \
    squared_norms_partial<T>(x, n, parts, len, partial);                                                \
  }                                                                                                     \
  extern "C" __global__ void squared_norms_finish_##SUFFIX(const double* partial, uint32_t parts,       \
                                                             uint64_t rows, T* out) {                   \
    sum_parts<T>(partial, parts, rows, out);                                                            \
  }                                                                                                     \
  extern "C" __global__ void clip_accumulate_slice_##SUFFIX(const T* g, const T* c, uint64_t rows,      \
                                                              uint64_t n, uint64_t rows_per_slice,      \
                                                              T* out, double* partial) {                \
    clip_accumulate_slice<T>(g, c, rows, n, rows_per_slice, out, partial);                              \
  }                                                                                                     \
  extern "C" __global__ void clip_accumulate_finish_##SUFFIX(const double* partial, uint32_t slices,    \
                                                               uint64_t n, T* out) {                    \
    sum_slices<T>(partial, slices, n, out);                                                             \
  }

INSTANTIATE(float, f32)
INSTANTIATE(double, f64)
