//! The clipping and noise kernels against a plain copy of the same bytes,
//! measured in the same run: GB/s of gradient data read.
//!
//! * Clipping: per-example gradients `[B, N] = [256, 1M]` `f32` (1 GiB):
//!   `squared_norms` (reads 1 GiB) and `clip_accumulate` (reads 1 GiB,
//!   writes 4 MiB). The baseline, `copy`, copies the same 1 GiB (reads and
//!   writes it). Goal: each kernel's GB/s at least 70% of the copy's on the
//!   CPU, 80% on an H100.
//! * Noise, on a GPU: `add_gaussian_noise` over 1M and 256M values (1 GiB)
//!   against a copy of the same bytes. The CPU's noise has its own bench,
//!   `benches/noise.rs`.
//!
//! CPU ids start with `cpu/`, CUDA ids with `cuda/` (run only with
//! `--features cuda` and a GPU; the device is synchronized before the clock
//! stops). Inputs are non-zero pseudo-random values; at 1 GiB no cache
//! holds them, so they are not rotated. Threads: all cores (the kernels'
//! CPU path splits work itself).

use candle_core::{Device, Tensor};
use candle_dp::kernels;
use candle_dp::GaussianNoise;
use criterion::{Criterion, Throughput};

const B: usize = 256;
const N: usize = 1 << 20;
const NOISE_N: usize = 1 << 20;

/// Non-zero values in (-1, 1), cheaply (SplitMix64).
fn filled(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let z = (s ^ (s >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 0.999
        })
        .collect()
}

/// Runs `op` and waits for the device, so that the clock sees the work.
fn synced(dev: &Device, op: impl Fn() -> candle_dp::Result<Tensor>) -> Tensor {
    let t = op().unwrap();
    dev.synchronize().unwrap();
    t
}

fn clipping(c: &mut Criterion, dev: &Device, name: &str) {
    let grads = Tensor::from_vec(filled(B * N, 1), (B, N), dev).unwrap();
    let factors = Tensor::from_vec(filled(B, 2).iter().map(|v| v.abs()).collect::<Vec<f32>>(), B, dev).unwrap();
    let mut group = c.benchmark_group("kernels_clip");
    group.sample_size(10).throughput(Throughput::Bytes((B * N * 4) as u64));
    if dev.is_cpu() {
        let src = filled(B * N, 3);
        let mut dst = vec![0f32; B * N];
        // On all cores, as the kernels run: one piece of the buffer per thread.
        let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
        let piece = (B * N).div_ceil(threads);
        group.bench_function(format!("{name}/copy"), |b| {
            b.iter(|| {
                std::thread::scope(|scope| {
                    for (d, s) in dst.chunks_mut(piece).zip(src.chunks(piece)) {
                        scope.spawn(move || d.copy_from_slice(s));
                    }
                });
                std::hint::black_box(&dst);
            })
        });
    } else {
        group.bench_function(format!("{name}/copy"), |b| b.iter(|| synced(dev, || Ok(grads.copy()?))));
    }
    group
        .bench_function(format!("{name}/squared_norms"), |b| b.iter(|| synced(dev, || kernels::squared_norms(&grads))));
    group.bench_function(format!("{name}/clip_accumulate"), |b| {
        b.iter(|| synced(dev, || kernels::clip_accumulate(&grads, &factors)))
    });
    group.finish();
}

fn noise(c: &mut Criterion, dev: &Device, name: &str, n: usize) {
    let x = Tensor::from_vec(filled(n, 4), n, dev).unwrap();
    let mut group = c.benchmark_group("kernels_noise");
    group.sample_size(10).throughput(Throughput::Bytes((n * 4) as u64));
    let mut keys = GaussianNoise::from_seed(5);
    group.bench_function(format!("{name}/copy/{n}"), |b| b.iter(|| synced(dev, || Ok(x.copy()?))));
    group.bench_function(format!("{name}/add_gaussian_noise/{n}"), |b| {
        b.iter(|| {
            let key = keys.noise_key();
            synced(dev, || kernels::add_gaussian_noise(&x, &key, 1.1, 0.01))
        })
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    clipping(&mut c, &Device::Cpu, "cpu");
    match Device::new_cuda(0) {
        Ok(dev) => {
            clipping(&mut c, &dev, "cuda");
            noise(&mut c, &dev, "cuda", NOISE_N);
            noise(&mut c, &dev, "cuda", B * N);
        }
        Err(e) => eprintln!("CUDA kernels not benchmarked: {e}"),
    }
    c.final_summary();
}
