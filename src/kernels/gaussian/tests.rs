//! The noise definition's own tests: every SIMD backend against the scalar
//! definition bit for bit, the private math against the platform's, and the
//! layout, slicing and threading invariances.

use super::*;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

fn key(seed: u64) -> NoiseKey {
    let mut bytes = [0u8; 32];
    ChaCha20Rng::seed_from_u64(seed).fill_bytes(&mut bytes);
    NoiseKey::from_bytes(bytes)
}

/// The portable path, one value at a time through `value_position`: the
/// definition read as literally as possible.
fn definition(key: &NoiseKey, first: u64, len: usize) -> Vec<f64> {
    (first..first + len as u64)
        .map(|j| {
            let (counter, slot) = value_position(j);
            counter_gaussians(key, counter)[slot]
        })
        .collect()
}

/// Every backend this CPU has gives the definition's bits, for `f64` and
/// `f32` outputs, at offsets that start and end inside groups, and at block
/// counters past 2^32 (the counter's high word).
#[test]
fn every_backend_equals_the_definition_bit_for_bit() {
    let backends = Backend::available();
    eprintln!("noise backends on this CPU: {backends:?}");
    for (seed, first, len) in [(1, 0, 64 * 40), (2, 5, 1000), (3, 63, 130), (4, (1 << 38) - 100, 300), (5, 1 << 40, 64)]
    {
        let k = key(seed);
        let expected = definition(&k, first, len);
        let base: Vec<f64> = (0..len).map(|i| (i % 13) as f64 * 0.375 - 2.0).collect();
        for &backend in &backends {
            let mut z = vec![0.0f64; len];
            add_noise_at(backend, &k, first, &mut z, 1.0, 1.0, 1);
            let same = z.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{backend:?} first {first} len {len}");
            let (std, scale) = (1.7, 0.3);
            let mut wide = base.clone();
            add_noise_at(backend, &k, first, &mut wide, std, scale, 1);
            let mut narrow: Vec<f32> = base.iter().map(|v| *v as f32).collect();
            add_noise_at(backend, &k, first, &mut narrow, std, scale, 1);
            for i in 0..len {
                let exact = (base[i] + std * expected[i]) * scale;
                assert_eq!(wide[i].to_bits(), exact.to_bits(), "{backend:?} f64 value {i}");
                assert_eq!(narrow[i].to_bits(), (exact as f32).to_bits(), "{backend:?} f32 value {i}");
            }
        }
    }
}

/// The same on a million values (every symmetry and sign of the angle
/// word, radius words across their range): the widest backend against the
/// portable one.
#[test]
fn the_widest_backend_equals_the_portable_one_on_a_million_values() {
    let k = key(9);
    let n = 1 << 20;
    let mut portable = vec![0.0f64; n];
    add_noise_at(Backend::Portable, &k, 0, &mut portable, 1.0, 1.0, 2);
    let mut best = vec![0.0f64; n];
    add_noise_at(Backend::best(), &k, 0, &mut best, 1.0, 1.0, 2);
    let differ = portable.iter().zip(&best).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(differ, 0, "{:?}", Backend::best());
}

/// Any slice of the noise vector, on any number of threads, is that part
/// of the whole vector.
#[test]
fn slices_and_threads_do_not_change_values() {
    let k = key(11);
    let n = 5 * (1 << 14) + 77;
    let mut whole = vec![0.0f64; n];
    add_noise_at(Backend::best(), &k, 0, &mut whole, 1.0, 1.0, 1);
    for threads in [2, 3, 7] {
        let mut z = vec![0.0f64; n];
        add_noise_at(Backend::best(), &k, 0, &mut z, 1.0, 1.0, threads);
        assert_eq!(z, whole, "{threads} threads");
    }
    // Three ranks' slices [r n / 3, (r + 1) n / 3) cover the vector exactly.
    let mut joined = Vec::new();
    for r in 0..3 {
        let (lo, hi) = (r * n / 3, (r + 1) * n / 3);
        let mut part = vec![0.0f64; hi - lo];
        fill_gaussians(&k, lo as u64, &mut part).unwrap();
        joined.extend(part);
    }
    assert_eq!(joined, whole);
    // A slice past position 2^64 would wrap around and repeat values.
    let e = fill_gaussians(&k, u64::MAX - 2, &mut [0.0; 4]).unwrap_err();
    assert!(matches!(e, crate::Error::InvalidConfig { field: "fill_gaussians: first + out.len()", .. }), "{e}");
    let mut last = [0.0; 3];
    fill_gaussians(&k, u64::MAX - 3, &mut last).unwrap();
    assert!(last.iter().all(|z| z.is_finite()));
    for (lo, len) in [(1, 1), (63, 2), (64, 64), (1000, 3), ((1 << 14) - 1, 5)] {
        let mut part = vec![0.0f64; len];
        fill_gaussians(&k, lo as u64, &mut part).unwrap();
        assert_eq!(part[..], whole[lo..lo + len], "slice at {lo}");
    }
}

/// The layout of the module docs: 16 blocks make 64 values, slot by slot.
#[test]
fn value_positions_follow_the_layout() {
    assert_eq!(value_position(0), (0, 0));
    assert_eq!(value_position(15), (15, 0));
    assert_eq!(value_position(16), (0, 1));
    assert_eq!(value_position(63), (15, 3));
    assert_eq!(value_position(64), (16, 0));
    assert_eq!(value_position(64 * 5 + 16 * 2 + 7), (16 * 5 + 7, 2));
    // Every block and slot of the first groups is used exactly once.
    let mut seen = std::collections::HashSet::new();
    for j in 0..64 * 9 {
        assert!(seen.insert(value_position(j)));
    }
    assert!(seen.iter().all(|&(b, s)| b < 16 * 9 && s < 4));
}

/// The private logarithm against the platform's, over the whole range the
/// transform feeds it (`w` from 1/2 to 2^64): within 3 ulp of `ln` (ours is
/// within 2 ulp of the exact value, the platform's within 1).
#[test]
fn the_logarithm_is_accurate() {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let mut worst: f64 = 0.0;
    for k in 0..200_000 {
        let w = match k % 3 {
            0 => (rng.next_u64() as f64 + 0.5).max(0.5),
            1 => 0.5 + (rng.next_u64() >> 11) as f64 * 2f64.powi(-53) * 3.0,
            _ => (rng.next_u64() >> (rng.next_u32() % 64)) as f64 + 0.5,
        };
        // u = w 2^-64 is exact, and the platform's ln is accurate near 1 too.
        let exact = -(w * 2f64.powi(-64)).ln();
        let got = neg_ln_scaled(w);
        if exact != 0.0 {
            let ulp = f64::from_bits(exact.abs().to_bits() + 1) - exact.abs();
            worst = worst.max((got - exact).abs() / ulp);
        }
    }
    // Just below u = 1, where -ln u is smallest.
    for m in 1..2000u64 {
        let w = 2f64.powi(64) - (m << 11) as f64;
        let exact = -(-((m << 11) as f64 * 2f64.powi(-64))).ln_1p();
        let got = neg_ln_scaled(w);
        let ulp = f64::from_bits(exact.to_bits() + 1) - exact;
        worst = worst.max((got - exact).abs() / ulp);
    }
    eprintln!("ln: worst error {worst} ulp against the platform's");
    assert!(worst <= 3.0, "worst error {worst} ulp");
    // The ends: u = 2^-65 and u = 1.
    assert_eq!(neg_ln_scaled(2f64.powi(64)), 0.0);
    assert!((neg_ln_scaled(0.5) - 65.0 * std::f64::consts::LN_2).abs() < 1e-13);
}

/// The private sine and cosine against the platform's on `[-pi/4, pi/4]`:
/// within 2 ulp (ours under 1, the platform's under 1).
#[test]
fn sine_and_cosine_are_accurate() {
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let mut worst: f64 = 0.0;
    for _ in 0..200_000 {
        let x = ((rng.next_u64() >> 11) as f64 * 2f64.powi(-53) - 0.5) * std::f64::consts::FRAC_PI_2;
        let (s, c) = sin_cos(x);
        for (got, exact) in [(s, x.sin()), (c, x.cos())] {
            if exact != 0.0 {
                let ulp = f64::from_bits(exact.abs().to_bits() + 1) - exact.abs();
                worst = worst.max((got - exact).abs() / ulp);
            }
        }
    }
    eprintln!("sin, cos: worst error {worst} ulp against the platform's");
    assert!(worst <= 2.0, "worst error {worst} ulp");
    assert_eq!(sin_cos(0.0), (0.0, 1.0));
}

/// A value is the transform of its words: the definition against the same
/// formulas through the platform's `ln`, `sqrt`, `sin`, `cos`, within
/// 1e-15 of the value's scale (the differences are the ulps above).
#[test]
fn values_are_the_box_muller_transform_of_their_words() {
    let k = key(13);
    for counter in [0u64, 1, 99, 1 << 33] {
        let w = chacha20::block(&k.words(), counter, NONCE);
        let reference = |p: usize| {
            let (r_hi, r_lo, a, b) = (w[4 * p], w[4 * p + 1], w[4 * p + 2], w[4 * p + 3]);
            let u = ((u64::from(r_hi) << 32 | u64::from(r_lo)) as f64 + 0.5) * 2f64.powi(-64);
            let rho = (-u.ln()).sqrt();
            let f = (f64::from((a & ANGLE_MASK) as i32 - HALF_SECTOR as i32) + f64::from(b >> 8) / 2f64.powi(24))
                / 2f64.powi(31);
            let (s, c) = (std::f64::consts::TAU * f).sin_cos();
            let (x, y) = if a & (1 << 29) != 0 { (s, c) } else { (c, s) };
            let x = if a & (1 << 31) != 0 { -x } else { x };
            let y = if a & (1 << 30) != 0 { -y } else { y };
            (rho * x, rho * y)
        };
        let (p0, p1, p2, p3) = (reference(0), reference(1), reference(2), reference(3));
        let expected = [p0.0 + p1.0, p0.1 + p1.1, p2.0 + p3.0, p2.1 + p3.1];
        for (got, want) in counter_gaussians(&k, counter).iter().zip(expected) {
            assert!((got - want).abs() <= 1e-15 * (1.0 + want.abs()), "block {counter}: {got} vs {want}");
        }
    }
}

/// Pins the first values for the key of bytes 0..32 and a few far out, so
/// that a changed definition cannot slip in unnoticed: a change here
/// changes every run's noise, and needs a new version of the definition.
#[test]
fn value_stability() {
    let k = NoiseKey::from_bytes(std::array::from_fn(|i| i as u8));
    let mut z = vec![0.0; 4];
    fill_gaussians(&k, 0, &mut z).unwrap();
    assert_eq!(z, [1.1820541974001804, -0.6471858184227686, 0.046144351861994275, 0.05224914779762452]);
    let far: Vec<f64> = [17, 1 << 20, (1 << 40) + 3].iter().map(|&j| definition(&k, j, 1)[0]).collect();
    assert_eq!(far, [-0.9370819476512038, 0.4466398364387617, 0.6425044187744929]);
}

/// The CUDA kernel spells the same constants: the doubles between its
/// `BEGIN CONSTANTS` and `END CONSTANTS` lines, as bit patterns in order,
/// and the integer masks. (Whether CUDA then computes the same bits is the
/// GPU test in `tests/kernels.rs`.)
#[test]
fn the_cuda_kernel_uses_the_same_constants() {
    let source = include_str!("../noise.cu");
    let block = source.split("// BEGIN CONSTANTS").nth(1).and_then(|s| s.split("// END CONSTANTS").next());
    let block = block.expect("noise.cu marks its constants");
    let bits: Vec<u64> =
        block.split("D(0x").skip(1).map(|s| u64::from_str_radix(&s[..16], 16).expect("16 hex digits")).collect();
    let mut expected = vec![LN2_HI.to_bits(), LN2_LO.to_bits()];
    for poly in [&LN_POLY[..], &SIN_POLY[..], &COS_POLY[..]] {
        expected.extend(poly.iter().map(|c| c.to_bits()));
    }
    expected.extend([std::f64::consts::TAU.to_bits(), EXPONENT_MAGIC.to_bits()]);
    assert_eq!(bits, expected);
    for (name, value) in [
        ("EXPONENT_MAGIC_BITS", EXPONENT_MAGIC_BITS),
        ("SQRT_HALF_BITS", SQRT_HALF_BITS),
        ("MANTISSA", MANTISSA),
        ("ANGLE_MASK", u64::from(ANGLE_MASK)),
        ("HALF_SECTOR", u64::from(HALF_SECTOR)),
    ] {
        let line = source.lines().find(|l| l.starts_with(&format!("#define {name} "))).expect(name);
        let hex = line.split("0x").nth(1).expect("a hex value");
        let digits: String = hex.chars().take_while(char::is_ascii_hexdigit).collect();
        assert_eq!(u64::from_str_radix(&digits, 16).unwrap(), value, "{name}");
    }
}

/// The keystream hook of `benches/noise` folds the words the noise reads.
#[test]
fn the_keystream_hook_folds_the_noise_words() {
    let k = key(21);
    let mut out = vec![0u32; 64 * 3];
    keystream_only(&k, &mut out);
    for (j, v) in out.iter().enumerate() {
        let (counter, slot) = value_position(j as u64);
        let w = chacha20::block(&k.words(), counter, NONCE);
        assert_eq!(*v, w[4 * slot] ^ w[4 * slot + 1] ^ w[4 * slot + 2] ^ w[4 * slot + 3], "value {j}");
    }
}
