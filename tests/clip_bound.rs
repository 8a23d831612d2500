//! No example's contribution exceeds the clipping norm.

mod common;

use candle_core::{DType, Module, Tensor};
use candle_dp::grad_sample::ghost::GhostEngine;
use candle_dp::{loss, ClipMode};
use candle_nn::VarMap;
use common::{mlp_pair, norm, set_deterministic, tensor, vars_by_name};

/// Randomized over 40 inputs of varied scale and clipping norms from 0.1 to
/// 10 (norms from below to far above C): each example alone (a batch of one) contributes a clipped
/// gradient of norm at most C, up to f32 rounding (1e-6 relative), and
/// exactly its gradient when that is already within C.
#[test]
fn no_sample_exceeds_clip_norm() {
    let varmap = VarMap::new();
    let (dp, _) = mlp_pair(&varmap, &[8, 16, 4], DType::F32).unwrap();
    set_deterministic(&varmap, 21).unwrap();
    let vars = vars_by_name(&varmap);
    let engine = GhostEngine::new(&vars).unwrap();
    let mut clipped = 0;
    for k in 0..40u64 {
        let scale = 10f64.powf(-2.0 + 4.0 * (k as f64) / 40.0);
        let c = 10f64.powf(1.0 - 2.0 * ((k * 7) % 40) as f64 / 40.0);
        let x = tensor(&[1, 8], 100 + k, scale, DType::F32).unwrap();
        let y = Tensor::from_vec(vec![(k % 4) as u32], 1, x.device()).unwrap();
        let losses = loss::cross_entropy(&dp.forward(&x).unwrap(), &y).unwrap();
        let out = engine.clip(&losses, &ClipMode::Flat, c).unwrap();
        let total = out.clipped_sums.iter().map(|t| norm(t).powi(2)).sum::<f64>().sqrt();
        assert!(total <= c, "example {k}: contribution {total} > C = {c}");
        if out.norms[0] > c * (1.0 - 1e-4) {
            clipped += 1;
            assert!(total > c * (1.0 - 2e-4), "clipped to C (1 - 1e-4), up to f32 rounding: {total}");
        } else {
            assert!((total - out.norms[0]).abs() < 1e-5 * out.norms[0].max(1e-12), "unclipped: {total}");
        }
    }
    assert!(clipped > 5 && clipped < 35, "the sweep must cover both regimes: {clipped}");
}

/// Per-layer clipping: each layer's part of an example's contribution is
/// within its own threshold, and the thresholds' squares sum to C^2.
#[test]
fn per_layer_clipping_bounds_each_layer() {
    let varmap = VarMap::new();
    let (dp, _) = mlp_pair(&varmap, &[8, 16, 4], DType::F64).unwrap();
    set_deterministic(&varmap, 22).unwrap();
    let vars = vars_by_name(&varmap); // fc0.bias, fc0.weight, fc1.bias, fc1.weight
    let engine = GhostEngine::new(&vars).unwrap();
    let thresholds = vec![0.6, 0.8];
    for k in 0..10u64 {
        let x = tensor(&[1, 8], 200 + k, 5.0, DType::F64).unwrap();
        let y = Tensor::from_vec(vec![(k % 4) as u32], 1, x.device()).unwrap();
        let losses = loss::cross_entropy(&dp.forward(&x).unwrap(), &y).unwrap();
        let out = engine.clip(&losses, &ClipMode::PerLayer(thresholds.clone()), 1.0).unwrap();
        let layer =
            |a: usize, b: usize| (norm(&out.clipped_sums[a]).powi(2) + norm(&out.clipped_sums[b]).powi(2)).sqrt();
        assert!(layer(0, 1) <= 0.6, "fc0: {}", layer(0, 1));
        assert!(layer(2, 3) <= 0.8, "fc1: {}", layer(2, 3));
    }
}
