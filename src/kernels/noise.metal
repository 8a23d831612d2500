// Gaussian noise by counter (Metal): the ChaCha20 words of chacha20.rs and
// noise.cu, bit for bit, in the layout of gaussian.rs (value j is slot
// (j % 64) / 16 of block 16 (j / 64) + j % 16). Apple GPUs have no double,
// so the transform runs in float here with Metal's log, sqrt, sin and cos
// (the CPU and CUDA run gaussian.rs's own double-precision functions): the
// values agree with the CPU's to about 1e-5 of the noise scale, except for
// radius words near u = 1 (float u has 24 bits: rho can be off by about
// 2.4e-4 there), not bit for bit. NOT COMPILED OR RUN by this project's CI
// (no macOS machine).
#include <metal_stdlib>
using namespace metal;

#define QR(a, b, c, d)                 \
  a += b; d = rotate(d ^ a, 16u);      \
  c += d; b = rotate(b ^ c, 12u);      \
  a += b; d = rotate(d ^ a, 8u);       \
  c += d; b = rotate(b ^ c, 7u);

static void chacha20_block(const thread uint* key, ulong counter, thread uint* out) {
  uint in[16] = {0x61707865u, 0x3320646eu, 0x79622d32u, 0x6b206574u, key[0], key[1], key[2], key[3],
                 key[4], key[5], key[6], key[7], uint(counter), uint(counter >> 32), 0u, 0u};  // nonce 0
  uint x[16];
  for (int i = 0; i < 16; ++i) x[i] = in[i];
  for (int i = 0; i < 10; ++i) {
    QR(x[0], x[4], x[8], x[12]) QR(x[1], x[5], x[9], x[13]) QR(x[2], x[6], x[10], x[14]) QR(x[3], x[7], x[11], x[15])
    QR(x[0], x[5], x[10], x[15]) QR(x[1], x[6], x[11], x[12]) QR(x[2], x[7], x[8], x[13]) QR(x[3], x[4], x[9], x[14])
  }
  for (int i = 0; i < 16; ++i) out[i] = x[i] + in[i];
}

struct Key { uint words[8]; };

// Box-Muller pair p of a block (words 4p .. 4p + 4 = R_hi, R_lo, A, B):
// rho = sqrt(-ln u) with u = (R_hi 2^32 + R_lo + 1/2) 2^-64, the angle a
// 53-bit (here float-rounded) uniform in [-1/8, 1/8) turn, then the symmetry
// of the square that bits 29..31 of A pick. Returns (rho first, rho second).
static float2 pair(uint r_hi, uint r_lo, uint a, uint b) {
  const float u = (float(r_hi) * 4294967296.0f + (float(r_lo) + 0.5f)) * 5.421010862e-20f;  // 2^-64
  // Fast-math log may return a tiny positive value just below u = 1.
  const float rho = sqrt(max(-log(u), 0.0f));
  const int rem = int((a & 0x1fffffffu) - 0x10000000u);
  const float f = float(rem) * 4.656612873e-10f + float(b >> 8) * 2.775557562e-17f;  // 2^-31, 2^-55
  const float x = 6.283185307f * f;
  float first = cos(x), second = sin(x);
  if (a & (1u << 29)) { const float t = first; first = second; second = t; }
  if (a & (1u << 31)) first = -first;
  if (a & (1u << 30)) second = -second;
  return float2(rho * first, rho * second);
}

kernel void add_noise_f32(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                          constant ulong& n [[buffer(2)]], constant Key& key [[buffer(3)]],
                          constant float& std_dev [[buffer(4)]], constant float& scale [[buffer(5)]],
                          uint b [[thread_position_in_grid]]) {
  const ulong base = ulong(b / 16) * 64 + ulong(b % 16);
  if (base >= n) return;
  uint k[8];
  for (int i = 0; i < 8; ++i) k[i] = key.words[i];
  uint w[16];
  chacha20_block(k, ulong(b), w);
  float2 p[4];
  for (int i = 0; i < 4; ++i) p[i] = pair(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
  const float z[4] = {p[0].x + p[1].x, p[0].y + p[1].y, p[2].x + p[3].x, p[2].y + p[3].y};
  for (int i = 0; i < 4; ++i) {
    const ulong j = base + 16 * ulong(i);
    if (j < n) out[j] = (x[j] + std_dev * z[i]) * scale;
  }
}

kernel void chacha20_keystream(device uint* out [[buffer(0)]], constant ulong& first [[buffer(1)]],
                               constant ulong& blocks [[buffer(2)]], constant Key& key [[buffer(3)]],
                               uint b [[thread_position_in_grid]]) {
  if (ulong(b) >= blocks) return;
  uint k[8];
  for (int i = 0; i < 8; ++i) k[i] = key.words[i];
  uint w[16];
  chacha20_block(k, first + ulong(b), w);
  for (int i = 0; i < 16; ++i) out[ulong(b) * 16 + i] = w[i];
}
