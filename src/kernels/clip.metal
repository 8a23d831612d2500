// Per-example squared norms and the fused clip-and-accumulate (Metal), the
// algorithms of clip.cu in float (Apple GPUs have no double). Metal compiles
// with fast math, which may re-associate sums and undo compensated
// summation, so the error is bounded by keeping every sequential sum short
// instead: at most 16 terms per thread, then trees (SIMD-group, threadgroup,
// pairwise over parts). Squared norms err by at most about 32 float ulps.
// NOT RUN by this project's CI (no macOS machine): see the README.
#include <metal_stdlib>
using namespace metal;

// Stage 1 of the norms: threadgroup k reduces part (k % parts) of row
// (k / parts) of x [rows, n] into partial[k]. The glue makes parts at most
// 16 * threads elements long, so each thread adds at most 16 squares.
kernel void squared_norms_partial_f32(device const float* x [[buffer(0)]], constant ulong& n [[buffer(1)]],
                                      constant uint& parts [[buffer(2)]], constant ulong& len [[buffer(3)]],
                                      device float* partial [[buffer(4)]], uint group [[threadgroup_position_in_grid]],
                                      uint tid [[thread_index_in_threadgroup]],
                                      uint threads [[threads_per_threadgroup]],
                                      uint lane [[thread_index_in_simdgroup]],
                                      uint simd [[simdgroup_index_in_threadgroup]]) {
  threadgroup float sums[32];
  const ulong row = group / parts, part = group % parts;
  const ulong start = part * len, end = min(n, start + len);
  device const float* p = x + row * n;
  float acc = 0.0f;
  for (ulong i = start + tid; i < end; i += threads) acc += p[i] * p[i];
  const float v = simd_sum(acc);
  if (lane == 0) sums[simd] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (simd == 0) {
    const float w = lane < (threads + 31) / 32 ? sums[lane] : 0.0f;
    const float total = simd_sum(w);
    if (lane == 0) partial[group] = total;
  }
}

// Stage 2: row r's parts summed pairwise (in place in the scratch partials).
kernel void squared_norms_finish_f32(device float* partial [[buffer(0)]], constant uint& parts [[buffer(1)]],
                                     constant ulong& rows [[buffer(2)]], device float* out [[buffer(3)]],
                                     uint r [[thread_position_in_grid]]) {
  if (r >= rows) return;
  device float* p = partial + r * parts;
  for (uint stride = 1; stride < parts; stride *= 2)
    for (uint k = 0; k + stride < parts; k += 2 * stride) p[k] += p[k + stride];
  out[r] = p[0];
}

// Clip-and-accumulate: one thread per column (consecutive threads read
// consecutive addresses of each row); rows are summed in blocks of 16 whose
// sums are then added, so no sequential sum is longer than 16 + rows / 16.
kernel void clip_accumulate_f32(device const float* g [[buffer(0)]], device const float* c [[buffer(1)]],
                                constant ulong& rows [[buffer(2)]], constant ulong& n [[buffer(3)]],
                                device float* out [[buffer(4)]], uint j [[thread_position_in_grid]]) {
  if (j >= n) return;
  float total = 0.0f;
  for (ulong i0 = 0; i0 < rows; i0 += 16) {
    float block = 0.0f;
    for (ulong i = i0; i < min(rows, i0 + 16); ++i) block += c[i] * g[i * n + j];
    total += block;
  }
  out[j] = total;
}
