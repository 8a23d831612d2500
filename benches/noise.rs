//! The CPU noise against a plain memory copy of the same bytes, in the same
//! run: nanoseconds per value of `GaussianNoise::add_scaled_to_f32` (the
//! optimizer's CPU path: ChaCha20 by counter, the transform, in place on an
//! `f32` buffer) for 2^16, 2^20 and 2^24 values, on one thread and on all
//! cores.
//!
//! * `copy`: `copy_from_slice` of the same `f32` buffer (reads and writes
//!   the bytes the noise reads and writes), split over the same threads.
//! * `counter`: the noise.
//! * `chacha20`: the noise's keystream alone (16 bytes per value, folded to
//!   one 32-bit word per value), one thread: the cipher's share of `counter`.
//! * `ziggurat`: the host sampler this crate used before the counter noise,
//!   one thread: ChaCha20 (`rand_chacha`) words, two Ziggurat draws
//!   (`rand_distr`) per value, `(z1 + z2) / sqrt 2`. A reference for the
//!   speed-up only; nothing in the library uses it.
//!
//! Ids are `noise/{copy,counter,chacha20,ziggurat}/{threads}/{n}`; criterion reports
//! time per iteration and elements (values) per second.

use candle_dp::GaussianNoise;
use criterion::{BenchmarkId, Criterion, Throughput};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |p| p.get())
}

fn copy_on(threads: usize, dst: &mut [f32], src: &[f32]) {
    if threads == 1 {
        dst.copy_from_slice(src);
        return;
    }
    let piece = dst.len().div_ceil(threads);
    std::thread::scope(|scope| {
        for (d, s) in dst.chunks_mut(piece).zip(src.chunks(piece)) {
            scope.spawn(move || d.copy_from_slice(s));
        }
    });
}

fn ziggurat(rng: &mut ChaCha20Rng, values: &mut [f32], std: f64, scale: f64) {
    for v in values {
        let z1: f64 = StandardNormal.sample(rng);
        let z2: f64 = StandardNormal.sample(rng);
        let z = (z1 + z2) * std::f64::consts::FRAC_1_SQRT_2;
        *v = ((f64::from(*v) + std * z) * scale) as f32;
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let all = cores();
    let mut group = c.benchmark_group("noise");
    group.sample_size(10);
    for log2 in [16, 20, 24] {
        let n = 1usize << log2;
        group.throughput(Throughput::Elements(n as u64));
        let src: Vec<f32> = (0..n).map(|k| (k % 251) as f32 * 1e-3).collect();
        let mut buf = src.clone();
        let mut thread_counts = vec![1];
        if all > 1 {
            thread_counts.push(all);
        }
        for &threads in &thread_counts {
            group.bench_function(BenchmarkId::new(format!("copy/{threads}"), n), |b| {
                b.iter(|| copy_on(threads, &mut buf, &src))
            });
            let mut noise = GaussianNoise::from_seed(1).with_threads(threads);
            group.bench_function(BenchmarkId::new(format!("counter/{threads}"), n), |b| {
                b.iter(|| noise.add_scaled_to_f32(&mut buf, 1.1, 0.5))
            });
        }
        let key = GaussianNoise::from_seed(2).noise_key();
        let mut words = vec![0u32; n];
        group.bench_function(BenchmarkId::new("chacha20/1", n), |b| {
            b.iter(|| candle_dp::kernels::gaussian::keystream_only(&key, &mut words))
        });
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        group.bench_function(BenchmarkId::new("ziggurat/1", n), |b| b.iter(|| ziggurat(&mut rng, &mut buf, 1.1, 0.5)));
    }
    group.finish();
    c.final_summary();
}
