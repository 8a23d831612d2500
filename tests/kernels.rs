//! The clipping and noise kernels against their references, on the CPU and
//! on every GPU present (CUDA with `--features cuda`; a missing device is
//! skipped with the reason printed).

mod common;

use candle_core::{DType, Device, Tensor};
use candle_dp::kernels::{self, NoiseKey};
use candle_dp::{Error, GaussianNoise};
use common::{tensor, values};

/// The CPU, and each GPU this build can reach.
fn devices() -> Vec<Device> {
    let mut devices = vec![Device::Cpu];
    // The first line of the reason: Candle's CUDA errors carry a backtrace.
    let reason = |e: candle_core::Error| e.to_string().lines().next().unwrap_or_default().to_string();
    match Device::new_cuda(0) {
        Ok(d) => devices.push(d),
        Err(e) => eprintln!("CUDA kernels not tested: {}", reason(e)),
    }
    #[cfg(target_os = "macos")]
    match Device::new_metal(0) {
        Ok(d) => devices.push(d),
        Err(e) => eprintln!("Metal kernels not tested: {}", reason(e)),
    }
    devices
}

/// Rows of varied scale (1e-3 to 1e3 across rows), never all zeros.
fn grads(b: usize, n: usize, seed: u64, dtype: DType) -> Tensor {
    let v: Vec<f64> = values(b * n, seed, 1.0)
        .iter()
        .enumerate()
        .map(|(k, x)| x * 10f64.powf(-3.0 + 6.0 * ((k / n.max(1)) % 7) as f64 / 6.0))
        .collect();
    Tensor::from_vec(v, (b, n), &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// The dtypes a device computes in: Metal has no `f64`.
fn dtypes(dev: &Device) -> Vec<DType> {
    if dev.is_metal() {
        vec![DType::F32]
    } else {
        vec![DType::F32, DType::F64]
    }
}

/// How far a squared norm of `n` terms may be from the reference, relative:
/// two `f64` sums of non-negative terms err by at most `n u64` each
/// (Higham 2002, section 4.2), then each is rounded once to `dtype`. Metal
/// sums in `f32`, never more than 16 terms in a row, the rest in trees:
/// 32 `u32` (clip.metal).
fn norm_tolerance(dev: &Device, n: usize, dtype: DType) -> f64 {
    let accumulation = if dev.is_metal() { 32.0 * unit(DType::F32) } else { 2.0 * n as f64 * unit(DType::F64) };
    accumulation + 2.0 * unit(dtype)
}

/// The same for a clipped sum over `b` rows, relative to `sum_i |c_i g_i|`:
/// `2 b u64` for two `f64` sums; Metal's blocks of 16 rows: `(16 + b / 16 + 2) u32`.
fn sum_tolerance(dev: &Device, b: usize) -> f64 {
    if dev.is_metal() {
        (18.0 + b as f64 / 16.0) * unit(DType::F32)
    } else {
        2.0 * b as f64 * unit(DType::F64)
    }
}

/// Unit roundoff of a dtype.
fn unit(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::EPSILON / 2.0,
        DType::F32 => f64::from(f32::EPSILON) / 2.0,
        _ => 2f64.powi(-8),
    }
}

/// Sizes with B = 1, N = 0, N not a multiple of any vector width, rows
/// longer than one CPU block (4096), and two large enough for the
/// multi-threaded CPU path.
const SIZES: [(usize, usize); 9] =
    [(1, 1), (3, 0), (1, 4097), (5, 8191), (7, 1), (64, 3001), (2, 300_007), (300, 1001), (33, 130)];

/// Within [`norm_tolerance`] of the reference.
#[test]
fn squared_norms_match_reference() {
    for dev in devices() {
        for dtype in dtypes(&dev) {
            for (k, &(b, n)) in SIZES.iter().enumerate() {
                let g = grads(b, n, k as u64, dtype);
                let fast = f64s(&kernels::squared_norms(&g.to_device(&dev).unwrap()).unwrap());
                let slow = f64s(&kernels::squared_norms_slow(&g).unwrap());
                assert_eq!(fast.len(), b);
                let tol = norm_tolerance(&dev, n, dtype);
                for (i, (f, s)) in fast.iter().zip(&slow).enumerate() {
                    assert!((f - s).abs() <= tol * s, "{dev:?} {dtype:?} [{b}, {n}] row {i}: {f} vs {s}");
                }
            }
        }
    }
}

/// Each column is a sum of `B` terms of both signs: within
/// [`sum_tolerance`] of `sum_i |c_i g_i|`, plus one rounding each.
#[test]
fn clip_accumulate_matches_reference() {
    for dev in devices() {
        for dtype in dtypes(&dev) {
            for (k, &(b, n)) in SIZES.iter().enumerate() {
                let g = grads(b, n, 10 + k as u64, dtype);
                // Clip factors in (0, 1], some exactly 1 (examples within C).
                let c: Vec<f64> = values(b, 20 + k as u64, 1.0).iter().map(|v| v.abs().max(0.01)).collect();
                let mut c = c;
                c.iter_mut().step_by(3).for_each(|v| *v = 1.0);
                let c = Tensor::from_vec(c, b, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                let fast = kernels::clip_accumulate(&g.to_device(&dev).unwrap(), &c.to_device(&dev).unwrap()).unwrap();
                assert_eq!(fast.dims(), [n]);
                let fast = f64s(&fast);
                let slow = f64s(&kernels::clip_accumulate_slow(&g, &c).unwrap());
                let abs = f64s(&kernels::clip_accumulate_slow(&g.abs().unwrap(), &c).unwrap());
                for (j, ((f, s), a)) in fast.iter().zip(&slow).zip(&abs).enumerate() {
                    let tol = sum_tolerance(&dev, b) * a + 2.0 * unit(dtype) * s.abs();
                    assert!((f - s).abs() <= tol, "{dev:?} {dtype:?} [{b}, {n}] column {j}: {f} vs {s}");
                }
            }
        }
    }
}

#[test]
fn empty_batches_give_zeros() {
    for dev in devices() {
        let (g, c) = match (Tensor::zeros((0, 5), DType::F32, &dev), Tensor::zeros(0, DType::F32, &dev)) {
            (Ok(g), Ok(c)) => (g, c),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("empty batches not tested on {dev:?}: Candle cannot make an empty tensor there: {e}");
                continue;
            }
        };
        assert_eq!(kernels::squared_norms(&g).unwrap().dims(), [0]);
        assert_eq!(f64s(&kernels::clip_accumulate(&g, &c).unwrap()), vec![0.0; 5]);
    }
}

/// A NaN or infinity makes its own row's norm non-finite (the engine then
/// refuses the step) and leaves the other rows exact.
#[test]
fn non_finite_rows_are_reported_not_hidden() {
    for dev in devices() {
        let mut v = values(4 * 5000, 3, 1.0);
        v[5000 + 17] = f64::NAN;
        v[3 * 5000 + 4999] = f64::INFINITY;
        let g = Tensor::from_vec(v, (4, 5000), &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
        let fast = f64s(&kernels::squared_norms(&g.to_device(&dev).unwrap()).unwrap());
        let slow = f64s(&kernels::squared_norms_slow(&g).unwrap());
        assert!(fast[1].is_nan(), "{dev:?}: {fast:?}");
        assert_eq!(fast[3], f64::INFINITY, "{dev:?}");
        for i in [0, 2] {
            assert!((fast[i] - slow[i]).abs() <= 1e-6 * slow[i], "{dev:?} row {i}");
        }
    }
}

/// Half-precision inputs are widened, computed and narrowed back; a
/// transposed (non-contiguous) input is read by its layout.
#[test]
fn half_precision_and_strided_inputs() {
    for dev in devices() {
        for dtype in [DType::F16, DType::BF16] {
            // Squared norms up to 75: within f16's range (65504).
            let g = tensor(&[6, 300], 4, 0.5, dtype).unwrap().to_device(&dev).unwrap();
            let n = kernels::squared_norms(&g).unwrap();
            assert_eq!(n.dtype(), dtype);
            let slow = f64s(&kernels::squared_norms_slow(&g.to_device(&Device::Cpu).unwrap()).unwrap());
            for (f, s) in f64s(&n).iter().zip(&slow) {
                assert!((f - s).abs() <= 2.0 * unit(dtype) * s, "{dev:?} {dtype:?}: {f} vs {s}");
            }
        }
        let t = grads(40, 7, 5, DType::F32).t().unwrap();
        assert!(!t.is_contiguous());
        let fast = f64s(&kernels::squared_norms(&t.to_device(&dev).unwrap()).unwrap());
        let slow = f64s(&kernels::squared_norms_slow(&t.contiguous().unwrap()).unwrap());
        for (f, s) in fast.iter().zip(&slow) {
            assert!((f - s).abs() <= 1e-6 * s, "{dev:?}: {f} vs {s}");
        }
    }
}

#[test]
fn bad_arguments_are_typed_errors() {
    let g = tensor(&[3, 4], 1, 1.0, DType::F32).unwrap();
    let e = kernels::squared_norms(&g.flatten_all().unwrap()).unwrap_err();
    assert!(matches!(e, Error::Shape { what: "squared_norms: grads", .. }), "{e}");
    let c = tensor(&[4], 1, 1.0, DType::F32).unwrap();
    let e = kernels::clip_accumulate(&g, &c).unwrap_err();
    assert!(matches!(e, Error::Shape { what: "clip_accumulate: factors", .. }), "{e}");
    assert!(e.to_string().contains("[B]"), "{e}");
    let ints = Tensor::zeros((3, 4), DType::U32, &Device::Cpu).unwrap();
    let e = kernels::squared_norms(&ints).unwrap_err();
    assert!(matches!(e, Error::Dtype { got: DType::U32, .. }), "{e}");
    let key = NoiseKey::from_bytes([1; 32]);
    for (std, scale, field) in [
        (-1.0, 1.0, "add_gaussian_noise: std"),
        (f64::NAN, 1.0, "add_gaussian_noise: std"),
        (1.0, f64::INFINITY, "add_gaussian_noise: scale"),
    ] {
        let e = kernels::add_gaussian_noise(&g, &key, std, scale).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { field: f, .. } if f == field), "{e}");
    }
    // Blocks past counter u64::MAX would wrap around and repeat.
    let e = kernels::keystream(&key, u64::MAX - 1, 5, &Device::Cpu).unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { field: "keystream: first_block + blocks", .. }), "{e}");
    assert!(kernels::keystream(&key, u64::MAX - 5, 5, &Device::Cpu).is_ok());
    assert_eq!(format!("{key:?}"), "NoiseKey(<secret>)");
}

/// The same uniform bits on every device: the raw ChaCha20 words of 1000
/// blocks (past the 32-bit counter boundary) equal the CPU keystream's, and
/// under a second key (RFC 8439's, 00..1f) a block whose counter has a high
/// word equals the CPU block function's. The RFC 8439 vectors themselves are
/// checked on that block function (`kernels::chacha20` unit tests): the noise
/// stream's nonce is 0, so the RFC block cannot be asked of the op.
#[test]
fn keystream_is_the_same_on_every_device() {
    let key = NoiseKey::from_bytes(std::array::from_fn(|i| i as u8 * 7 + 3));
    let cpu = kernels::keystream(&key, (1 << 32) - 500, 1000, &Device::Cpu).unwrap();
    let rfc_key = NoiseKey::from_bytes(std::array::from_fn(|i| i as u8));
    for dev in devices() {
        let words = kernels::keystream(&key, (1 << 32) - 500, 1000, &dev).unwrap();
        let words: Vec<u32> = words.to_device(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(words, cpu.flatten_all().unwrap().to_vec1::<u32>().unwrap(), "{dev:?}");
        let first = kernels::keystream(&rfc_key, 1 | (0x0900_0000 << 32), 1, &dev).unwrap();
        let first: Vec<u32> = first.to_device(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let expected = candle_dp::kernels::chacha20::block(&rfc_key.words(), 1 | (0x0900_0000 << 32), 0);
        assert_eq!(first, expected, "{dev:?}");
    }
}

/// The op equals its reference (an independent keystream from
/// `rand_chacha` and the scalar definition) bit for bit, in `f64` and `f32`,
/// on the CPU and on CUDA: both compute the same IEEE operations in the
/// same order. Metal runs the transform in `f32` with its own `log`,
/// `sin`, `cos`: its values are held to 1e-5 of the noise scale instead.
#[test]
fn noise_matches_reference() {
    let key = NoiseKey::from_bytes(std::array::from_fn(|i| (i * i) as u8));
    for dev in devices() {
        if dev.is_metal() {
            let x = Tensor::from_vec(values(4097, 1, 2.0), 4097, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
            let fast = f64s(&kernels::add_gaussian_noise(&x.to_device(&dev).unwrap(), &key, 1.7, 0.25).unwrap());
            let slow = f64s(&kernels::add_gaussian_noise_slow(&x, &key, 1.7, 0.25).unwrap());
            for (j, (f, s)) in fast.iter().zip(&slow).enumerate() {
                assert!((f - s).abs() <= 1e-5 * 1.7 * 0.25 * 14.0, "{dev:?} value {j}: {f} vs {s}");
            }
            continue;
        }
        for &n in &[0, 1, 3, 5, 63, 65, 4097, 300_001] {
            let x64 = Tensor::from_vec(values(n, n as u64, 2.0), n, &Device::Cpu).unwrap();
            let (std, scale) = (1.7, 0.25);
            let fast = f64s(&kernels::add_gaussian_noise(&x64.to_device(&dev).unwrap(), &key, std, scale).unwrap());
            let slow = f64s(&kernels::add_gaussian_noise_slow(&x64, &key, std, scale).unwrap());
            assert_eq!(fast.len(), n);
            let differ = fast.iter().zip(&slow).position(|(f, s)| f.to_bits() != s.to_bits());
            assert_eq!(differ, None, "{dev:?} f64 n {n}");
            let x32 = x64.to_dtype(DType::F32).unwrap();
            let fast = kernels::add_gaussian_noise(&x32.to_device(&dev).unwrap(), &key, std, scale).unwrap();
            let fast: Vec<f32> = fast.to_device(&Device::Cpu).unwrap().to_vec1().unwrap();
            let slow: Vec<f32> = kernels::add_gaussian_noise_slow(&x32, &key, std, scale).unwrap().to_vec1().unwrap();
            let differ = fast.iter().zip(&slow).position(|(f, s)| f.to_bits() != s.to_bits());
            assert_eq!(differ, None, "{dev:?} f32 n {n}");
        }
    }
}

fn noise(n: usize, key: &NoiseKey) -> Vec<f64> {
    f64s(&kernels::add_gaussian_noise(&Tensor::zeros(n, DType::F64, &Device::Cpu).unwrap(), key, 1.0, 1.0).unwrap())
}

/// Value `j` depends on the key and `j` only: a longer tensor extends a
/// shorter one, any slice can be made alone, and another key gives other
/// values.
#[test]
fn noise_is_a_function_of_key_and_position() {
    let key = NoiseKey::from_bytes([9; 32]);
    let long = noise(300_001, &key);
    assert_eq!(noise(10, &key)[..], long[..10]);
    assert_eq!(noise(5003, &key)[..], long[..5003]);
    let mut slice = vec![0.0; 1000];
    kernels::fill_gaussians(&key, 123_457, &mut slice).unwrap();
    assert_eq!(slice[..], long[123_457..124_457]);
    let other = noise(10, &NoiseKey::from_bytes([10; 32]));
    assert!(other.iter().zip(&long).all(|(a, b)| a != b));
    // Counter-indexing: value j is slot (j % 64) / 16 of block 16 (j / 64) + j % 16.
    for j in [0usize, 3, 4, 17, 63, 64, 4095, 4096, 299_999] {
        let (counter, slot) = kernels::value_position(j as u64);
        assert_eq!(long[j], kernels::counter_gaussians(&key, counter)[slot]);
    }
}

/// `Phi(x)`, the standard normal CDF, to about 1e-13: the series of `erf`
/// for `|x| < 3`, the continued fraction of Mills' ratio beyond.
fn normal_cdf(x: f64) -> f64 {
    if x.abs() < 3.0 {
        let t = x / std::f64::consts::SQRT_2;
        let (mut term, mut sum, mut n) = (t, t, 0.0);
        while term.abs() > 1e-17 * sum.abs().max(1e-300) {
            n += 1.0;
            term *= -t * t / n;
            sum += term / (2.0 * n + 1.0);
        }
        return 0.5 + sum / std::f64::consts::PI.sqrt();
    }
    let a = x.abs();
    let mut r = a;
    for k in (1..=300).rev() {
        r = a + f64::from(k) / r;
    }
    let tail = (-a * a / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt() / r;
    if x > 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// Standard normal, from 1 200 000 values of one key:
/// * mean, variance, and the mass beyond 3 and beyond 4 within 5 standard
///   errors of their sampling distributions (mean 4.6e-3, variance 6.5e-3;
///   P(|z| > 3) = 0.0026998, P(|z| > 4) = 6.334e-5, binomial errors);
/// * Kolmogorov-Smirnov: `D <= 2.694 / sqrt(n)`, which an exact Gaussian
///   exceeds with probability at most 1e-6 (Dvoretzky-Kiefer-Wolfowitz with
///   Massart's constant: `P(sqrt(n) D > t) <= 2 exp(-2 t^2)`);
/// * no correlation between the four values of a block, between
///   neighbouring blocks, between far-apart slices of the vector, or with
///   the next key's vector (a later step): each `|r| < 5 / sqrt(m)`.
#[test]
fn noise_is_standard_normal_and_independent() {
    let n = 1_200_000;
    let key = NoiseKey::from_bytes(std::array::from_fn(|i| 255 - i as u8));
    let z = noise(n, &key);
    let nf = n as f64;
    let mean = z.iter().sum::<f64>() / nf;
    let var = z.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (nf - 1.0);
    assert!(mean.abs() < 5.0 / nf.sqrt(), "mean {mean}");
    assert!((var - 1.0).abs() < 5.0 * (2.0 / nf).sqrt(), "variance {var}");
    for (t, p) in [(3.0, 0.002_699_796), (4.0, 6.334e-5)] {
        let tail = z.iter().filter(|x| x.abs() > t).count() as f64 / nf;
        assert!((tail - p).abs() < 5.0 * (p * (1.0 - p) / nf).sqrt(), "P(|z| > {t}) = {tail}");
    }
    let mut sorted = z.clone();
    sorted.sort_by(f64::total_cmp);
    let d = sorted
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let f = normal_cdf(*x);
            ((i + 1) as f64 / nf - f).max(f - i as f64 / nf)
        })
        .fold(0.0, f64::max);
    assert!(d <= 2.694 / nf.sqrt(), "Kolmogorov-Smirnov D = {d}");
    let corr = |a: &dyn Fn(usize) -> f64, b: &dyn Fn(usize) -> f64, count: usize| {
        let r = (0..count).map(|k| a(k) * b(k)).sum::<f64>() / count as f64;
        assert!(r.abs() < 5.0 / (count as f64).sqrt(), "r = {r} over {count}");
    };
    // Value of slot `s` of block `b` (the layout of kernels::gaussian).
    let at = |b: usize, s: usize| z[b / 16 * 64 + 16 * s + b % 16];
    let blocks = n / 4;
    for (s, t) in [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)] {
        corr(&|b| at(b, s), &|b| at(b, t), blocks);
    }
    for s in 0..4 {
        corr(&|b| at(b, s), &|b| at(b + 1, s), blocks - 1);
    }
    corr(&|j| z[j], &|j| z[j + n / 2], n / 2);
    let next = noise(n, &NoiseKey::from_bytes(std::array::from_fn(|i| 254 - i as u8)));
    corr(&|j| z[j], &|j| next[j], n);
}

/// The optimizer's generator hands out a fresh key per draw, reproducibly
/// under a fixed seed and continued by a restored state.
#[test]
fn noise_keys_come_fresh_from_the_generator() {
    let mut g = GaussianNoise::from_seed(3);
    let (a, b) = (g.noise_key(), g.noise_key());
    assert_ne!(a, b);
    let mut h = GaussianNoise::from_seed(3);
    assert_eq!(h.noise_key(), a);
    let mut r = GaussianNoise::restore(h.state(), h.seeding());
    assert_eq!(r.noise_key(), b);
}

/// On every device the optimizer's noise is the counter noise of keys its
/// generator draws, one per variable in order: a noise-only step (an empty
/// Poisson batch, drawn by the optimizer at `E[B] = q N = 0.01`) moves each
/// variable by exactly `-lr std z / E[B]` with `z` recomputed here by the
/// CPU's op (on a GPU, the noise was made on the device).
#[test]
fn optimizer_noise_is_the_counter_noise_on_every_device() {
    use candle_dp::{DpOptimizer, PoissonSampler};
    use candle_nn::{VarBuilder, VarMap, SGD};
    for dev in devices() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let _layer = candle_dp::linear(300, 40, vb.pp("fc")).unwrap();
        let vars = candle_dp::vars_by_name(&varmap);
        let before: Vec<Vec<f64>> = vars.iter().map(|v| f64s(v.as_tensor())).collect();
        let sampler = PoissonSampler::seeded(1000, 1e-5, 1).unwrap();
        let (sigma, c, lr) = (1.3, 0.7, 0.1);
        let mut opt = DpOptimizer::<SGD>::builder(vars.clone(), sampler)
            .noise_multiplier(sigma)
            .max_grad_norm(c)
            .noise(GaussianNoise::from_seed(7))
            .build(lr)
            .unwrap();
        let expected_batch = opt.sampler().description().expected_batch_size();
        assert_eq!(expected_batch, 1000.0 * 1e-5);
        let idx = opt.next_batch().unwrap();
        assert!(idx.is_empty(), "a noise-only step needs an empty batch: {idx:?}");
        opt.step().unwrap();
        let mut keys = GaussianNoise::from_seed(7);
        for (var, before) in vars.iter().zip(&before) {
            let zeros = Tensor::zeros(var.elem_count(), DType::F64, &Device::Cpu).unwrap();
            let z = f64s(&kernels::add_gaussian_noise(&zeros, &keys.noise_key(), 1.0, 1.0).unwrap());
            let after = f64s(var.as_tensor());
            for (k, ((a, b), z)) in after.iter().zip(before).zip(&z).enumerate() {
                let expected = b - lr * sigma * c * z / expected_batch;
                assert!(
                    (a - expected).abs() <= 1e-6 * (1.0 + expected.abs()),
                    "{dev:?} element {k}: {a} vs {expected}"
                );
            }
        }
    }
}
