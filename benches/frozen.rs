//! What a frozen layer costs in forward + backward: a 784 -> 512 linear
//! with a frozen weight (a plain tensor, no optimizer trains it), batch 256,
//! whose input needs its gradient (a frozen layer between trained ones, as
//! in fine-tuning), f32 on the CPU.
//!
//! * `candle_nn`: `candle_nn::Linear` over the frozen tensor; Candle's
//!   matmul backward computes the weight gradient too and throws it away.
//! * `dp_frozen`: `candle_dp::DpLinear` over the same tensor: the input
//!   gradient only, nothing captured.
//!
//! One thread (`RAYON_NUM_THREADS=1` unless set); report ratios to
//! `candle_nn` from the same run.

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_dp::DpLinear;
use criterion::{BenchmarkId, Criterion};

fn forward_backward(layer: &dyn Module, x: &Var) {
    let y = layer.forward(x.as_tensor()).unwrap();
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
}

fn frozen(c: &mut Criterion) {
    let dev = Device::Cpu;
    let (b, d, p) = (256, 784, 512);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, d), &dev).unwrap()).unwrap();
    let w = (Tensor::randn(0f32, 1.0, (p, d), &dev).unwrap() * 0.03).unwrap();
    let bias = Tensor::zeros(p, DType::F32, &dev).unwrap();
    let plain = candle_nn::Linear::new(w.clone(), Some(bias.clone()));
    let dp = DpLinear::new(w, Some(bias));

    let mut group = c.benchmark_group("frozen_linear");
    group.sample_size(30);
    group.bench_function(BenchmarkId::new("candle_nn", "784x512_b256"), |bench| {
        bench.iter(|| forward_backward(&plain, &x))
    });
    group.bench_function(BenchmarkId::new("dp_frozen", "784x512_b256"), |bench| {
        bench.iter(|| {
            forward_backward(&dp, &x);
            assert_eq!(dp.captured_uses(), 0);
        })
    });

    group.finish();
}

fn main() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // Before any thread pool exists: pins Candle's CPU kernels to one thread.
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    eprintln!("frozen: RAYON_NUM_THREADS={}", std::env::var("RAYON_NUM_THREADS").unwrap_or_default());
    let mut c = Criterion::default().configure_from_args();
    frozen(&mut c);
    c.final_summary();
}
