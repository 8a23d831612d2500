//! Memory stays flat over 1 000 steps of a model with a frozen DP layer.
//!
//! Its own test binary (one test, one process), so that no other test's
//! allocations move the resident set it reads. Linux only (`/proc`).

#![cfg(target_os = "linux")]

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_dp::{loss, DpLinear, DpOptimizer, GaussianNoise, PoissonSampler};
use candle_nn::{VarBuilder, VarMap, SGD};
use common::{take, tensor, vars_by_name};

/// The resident set in bytes (`VmRSS` of `/proc/self/status`).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn rss_is_flat_over_1000_steps_with_a_frozen_layer() {
    // trained 32 -> 256, frozen 256 -> 256 (Vars the optimizer is not
    // given, so its output gradient exists), trained head; batches of about
    // 64. Had the frozen layer kept each step's input and output gradient
    // (2 x 64 x 256 f32 = 128 KiB), 900 steps would add 112 MiB.
    let trained = VarMap::new();
    let vb = VarBuilder::from_varmap(&trained, DType::F32, &Device::Cpu);
    let untrained = VarMap::new();
    let first = candle_dp::linear(32, 256, vb.pp("first")).unwrap();
    let frozen: DpLinear =
        candle_dp::linear(256, 256, VarBuilder::from_varmap(&untrained, DType::F32, &Device::Cpu)).unwrap();
    let head = candle_dp::linear(256, 10, vb.pp("head")).unwrap();
    let n = 640;
    let x = tensor(&[n, 32], 2, 1.0, DType::F32).unwrap();
    let y = Tensor::from_vec((0..n as u32).map(|i| i % 10).collect(), n, &Device::Cpu).unwrap();
    let sampler = PoissonSampler::seeded(n, 0.1, 3).unwrap();
    let mut opt = DpOptimizer::<SGD>::builder(vars_by_name(&trained), sampler)
        .noise_multiplier(1.0)
        .noise(GaussianNoise::from_seed(4))
        .build(0.01)
        .unwrap();
    let mut rss_at_100 = 0;
    for step in 0..1000 {
        if step == 100 {
            rss_at_100 = rss_bytes();
        }
        let idx = opt.next_batch().unwrap();
        if !idx.is_empty() {
            let h = first.forward(&take(&x, &idx)).unwrap().relu().unwrap();
            let logits = head.forward(&frozen.forward(&h).unwrap().relu().unwrap()).unwrap();
            opt.accumulate(&loss::cross_entropy(&logits, &take(&y, &idx)).unwrap()).unwrap();
        }
        opt.step().unwrap();
        assert_eq!(frozen.captured_uses(), 0);
    }
    let growth = rss_bytes() as i64 - rss_at_100 as i64;
    // Allocator noise is a few MiB at most; the leak it guards against is 112 MiB.
    assert!(growth < 16 << 20, "resident set grew by {} KiB between steps 100 and 1000", growth / 1024);
}
