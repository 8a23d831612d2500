// Gaussian noise by counter (Metal): the ChaCha20 words of chacha20.rs and
// noise.cu, bit for bit; value j is slot j % 4 of block j / 4. Apple GPUs
// have no double, so the Box-Muller transform runs in float here (the CPU
// and CUDA run it in double, and Metal's fast math applies): the values agree
// with the CPU's to about 1e-5 of the noise scale, not bit for bit.
// NOT RUN by this project's CI (no macOS machine).
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

static float2 box_muller(ulong radius_word, ulong angle_word) {
  const float u = (float(radius_word) + 0.5f) * 5.421010862e-20f;  // 2^-64
  const float r = sqrt(-2.0f * log(u));
  const float theta = 6.283185307f * (float(angle_word >> 40) * 5.960464478e-8f);  // 24 bits, 2^-24
  return float2(r * cos(theta), r * sin(theta));
}

kernel void add_noise_f32(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                          constant ulong& n [[buffer(2)]], constant Key& key [[buffer(3)]],
                          constant float& std_dev [[buffer(4)]], constant float& scale [[buffer(5)]],
                          uint b [[thread_position_in_grid]]) {
  const ulong j = ulong(b) * 4;
  if (j >= n) return;
  uint k[8];
  for (int i = 0; i < 8; ++i) k[i] = key.words[i];
  uint w[16];
  chacha20_block(k, ulong(b), w);
  float2 p[4];
  for (int i = 0; i < 4; ++i) {
    const ulong radius = ulong(w[4 * i]) | (ulong(w[4 * i + 1]) << 32);
    const ulong angle = ulong(w[4 * i + 2]) | (ulong(w[4 * i + 3]) << 32);
    p[i] = box_muller(radius, angle);
  }
  const float h = 0.70710678f;
  const float z[4] = {(p[0].x + p[1].x) * h, (p[0].y + p[1].y) * h, (p[2].x + p[3].x) * h, (p[2].y + p[3].y) * h};
  for (int i = 0; i < 4; ++i)
    if (j + i < n) out[j + i] = (x[j + i] + std_dev * z[i]) * scale;
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
