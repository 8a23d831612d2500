//! The ChaCha20 block function (RFC 8439, section 2.3), the counter-based
//! generator behind the device noise.
//!
//! A block is a pure function of a 256-bit key and four input words, so any
//! thread can compute any block: the CPU (this file), the CUDA kernel
//! (`chacha20.cuh`) and the Metal kernel (`noise.metal`) make the same words
//! from the same input. The input words are a 64-bit block counter (words 12
//! and 13, low word first) and a 64-bit nonce (words 14 and 15), the layout
//! of Bernstein's original ChaCha and of `rand_chacha`; read as RFC 8439's
//! 32-bit counter and 96-bit nonce, it is the same function (word 13 is then
//! the nonce's first word).

/// `"expand 32-byte k"`, the four constant words of the state.
pub(crate) const SIGMA: [u32; 4] = [0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574];

/// The quarter round on four words of the state (RFC 8439, section 2.1).
#[inline(always)]
fn quarter_round(s: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize) {
    s[a] = s[a].wrapping_add(s[b]);
    s[d] = (s[d] ^ s[a]).rotate_left(16);
    s[c] = s[c].wrapping_add(s[d]);
    s[b] = (s[b] ^ s[c]).rotate_left(12);
    s[a] = s[a].wrapping_add(s[b]);
    s[d] = (s[d] ^ s[a]).rotate_left(8);
    s[c] = s[c].wrapping_add(s[d]);
    s[b] = (s[b] ^ s[c]).rotate_left(7);
}

/// The 16 output words of the block with this key and input words 12..15
/// (RFC 8439, section 2.3: 20 rounds, then the input added word by word).
pub fn block_words(key: &[u32; 8], input: [u32; 4]) -> [u32; 16] {
    let mut init = [0u32; 16];
    init[..4].copy_from_slice(&SIGMA);
    init[4..12].copy_from_slice(key);
    init[12..].copy_from_slice(&input);
    let mut s = init;
    for _ in 0..10 {
        quarter_round(&mut s, 0, 4, 8, 12);
        quarter_round(&mut s, 1, 5, 9, 13);
        quarter_round(&mut s, 2, 6, 10, 14);
        quarter_round(&mut s, 3, 7, 11, 15);
        quarter_round(&mut s, 0, 5, 10, 15);
        quarter_round(&mut s, 1, 6, 11, 12);
        quarter_round(&mut s, 2, 7, 8, 13);
        quarter_round(&mut s, 3, 4, 9, 14);
    }
    for (o, i) in s.iter_mut().zip(init) {
        *o = o.wrapping_add(i);
    }
    s
}

/// Block `counter` of stream `nonce` under `key` (64-bit counter, 64-bit nonce).
pub fn block(key: &[u32; 8], counter: u64, nonce: u64) -> [u32; 16] {
    block_words(key, [counter as u32, (counter >> 32) as u32, nonce as u32, (nonce >> 32) as u32])
}

/// A 32-byte key read as eight little-endian words (RFC 8439, section 2.3).
pub fn key_words(key: &[u8; 32]) -> [u32; 8] {
    let mut words = [0u32; 8];
    for (w, bytes) in words.iter_mut().zip(key.chunks_exact(4)) {
        *w = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    /// RFC 8439, section 2.1.1: the quarter-round test vector.
    #[test]
    fn quarter_round_rfc8439_2_1_1() {
        let mut s = [0u32; 16];
        s[..4].copy_from_slice(&[0x1111_1111, 0x0102_0304, 0x9b8d_6f43, 0x0123_4567]);
        quarter_round(&mut s, 0, 1, 2, 3);
        assert_eq!(s[..4], [0xea2a_92f4, 0xcb1c_f8ce, 0x4581_472e, 0x5881_c4bb]);
    }

    /// RFC 8439, section 2.3.2: key 00..1f, nonce 00:00:00:09:00:00:00:4a:00:00:00:00, counter 1.
    #[test]
    fn block_rfc8439_2_3_2() {
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let out = block_words(&key_words(&key), [1, 0x0900_0000, 0x4a00_0000, 0]);
        let expected = [
            0xe4e7_f110,
            0x1559_3bd1,
            0x1fdd_0f50,
            0xc471_20a3,
            0xc7f4_d1c7,
            0x0368_c033,
            0x9aaa_2204,
            0x4e6c_d4c3,
            0x4664_82d2,
            0x09aa_9f07,
            0x05d7_c214,
            0xa202_8bd9,
            0xd19c_12b5,
            0xb94e_16de,
            0xe883_d0cb,
            0x4e3c_50a2,
        ];
        assert_eq!(out, expected);
        // The same block through the 64-bit counter / 64-bit nonce view.
        assert_eq!(block(&key_words(&key), 1 | (0x0900_0000 << 32), 0x4a00_0000), expected);
    }

    /// RFC 8439, appendix A.1, test vector 1: all-zero key, nonce and counter.
    #[test]
    fn block_rfc8439_a_1_vector_1() {
        let expected = [
            0xade0_b876,
            0x903d_f1a0,
            0xe56a_5d40,
            0x28bd_8653,
            0xb819_d2bd,
            0x1aed_8da0,
            0xccef_36a8,
            0xc70d_778b,
            0x7c59_41da,
            0x8d48_5751,
            0x3fe0_2477,
            0x374a_d8b8,
            0xf4b8_436a,
            0x1ca1_1815,
            0x69b6_87c3,
            0x8665_eeb2,
        ];
        assert_eq!(block(&[0; 8], 0, 0), expected);
    }

    /// An independent implementation agrees on random keys, counters (past
    /// the 32-bit boundary) and nonces: `rand_chacha` 0.9's keystream, whose
    /// word position is 16 words per block.
    #[test]
    fn block_matches_rand_chacha() {
        let mut meta = ChaCha20Rng::seed_from_u64(11);
        for _ in 0..50 {
            let mut key = [0u8; 32];
            meta.fill_bytes(&mut key);
            let counter = meta.next_u64() >> (meta.next_u32() % 40);
            let nonce = meta.next_u64();
            let mut reference = ChaCha20Rng::from_seed(key);
            reference.set_stream(nonce);
            reference.set_word_pos(u128::from(counter) * 16);
            let expected: [u32; 16] = std::array::from_fn(|_| reference.next_u32());
            assert_eq!(block(&key_words(&key), counter, nonce), expected, "counter {counter} nonce {nonce}");
        }
    }
}
