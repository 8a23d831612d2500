// Per-example squared norms and the fused clip-and-accumulate (Metal), the
// algorithms of clip.cu. Apple GPUs have no double: each thread accumulates
// in float with Kahan compensation, and partials are combined in order.
// NOT RUN by this project's CI (no macOS machine): see the README.
#include <metal_stdlib>
using namespace metal;

// Kahan-compensated running sum.
struct Kahan {
  float sum = 0.0f, carry = 0.0f;
  void add(float v) {
    float y = v - carry;
    float t = sum + y;
    carry = (t - sum) - y;
    sum = t;
  }
};

// Stage 1 of the norms: threadgroup k reduces part (k % parts) of row
// (k / parts) of x [rows, n] into partial[k]; 256 threads per group.
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
  Kahan acc;
  for (ulong i = start + tid; i < end; i += threads) acc.add(p[i] * p[i]);
  float v = simd_sum(acc.sum - acc.carry);
  if (lane == 0) sums[simd] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) {
    Kahan total;
    for (uint k = 0; k < (threads + 31) / 32; ++k) total.add(sums[k]);
    partial[group] = total.sum - total.carry;
  }
}

// Stage 2: row r's parts summed in order.
kernel void squared_norms_finish_f32(device const float* partial [[buffer(0)]], constant uint& parts [[buffer(1)]],
                                     constant ulong& rows [[buffer(2)]], device float* out [[buffer(3)]],
                                     uint r [[thread_position_in_grid]]) {
  if (r >= rows) return;
  Kahan s;
  for (uint k = 0; k < parts; ++k) s.add(partial[r * parts + k]);
  out[r] = s.sum - s.carry;
}

// Clip-and-accumulate: one thread per column, rows in order (consecutive
// threads read consecutive addresses of each row).
kernel void clip_accumulate_f32(device const float* g [[buffer(0)]], device const float* c [[buffer(1)]],
                                constant ulong& rows [[buffer(2)]], constant ulong& n [[buffer(3)]],
                                device float* out [[buffer(4)]], uint j [[thread_position_in_grid]]) {
  if (j >= n) return;
  Kahan acc;
  for (ulong i = 0; i < rows; ++i) acc.add(c[i] * g[i * n + j]);
  out[j] = acc.sum - acc.carry;
}
