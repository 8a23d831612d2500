//! No example's contribution exceeds the clipping norm.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_dp::grad_sample::ghost::GhostEngine;
use candle_dp::{loss, ClipMode, DpLinear};
use candle_nn::{VarBuilder, VarMap};
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

/// Half precision: the norms, the clip factors and the clipped sums are
/// computed in f32 or wider, so a bf16 or f16 model's contribution stays
/// within C too (a clip factor rounded to bf16 can be 0.4% too large).
#[test]
fn no_sample_exceeds_clip_norm_in_half_precision() {
    for dtype in [DType::BF16, DType::F16] {
        let varmap = VarMap::new();
        let (dp, _) = mlp_pair(&varmap, &[8, 16, 4], dtype).unwrap();
        set_deterministic(&varmap, 23).unwrap();
        let engine = GhostEngine::new(&vars_by_name(&varmap)).unwrap();
        let mut clipped = 0;
        for k in 0..40u64 {
            let c = 10f64.powf(-1.0 + 2.0 * ((k * 7) % 40) as f64 / 40.0);
            let x = tensor(&[1, 8], 300 + k, 3.0, dtype).unwrap();
            let y = Tensor::from_vec(vec![(k % 4) as u32], 1, x.device()).unwrap();
            let losses = loss::cross_entropy(&dp.forward(&x).unwrap(), &y).unwrap();
            let out = engine.clip(&losses, &ClipMode::Flat, c).unwrap();
            assert!(out.clipped_sums.iter().all(|s| s.dtype() == DType::F32), "sums are never rounded to {dtype:?}");
            let total = out.clipped_sums.iter().map(|t| norm(t).powi(2)).sum::<f64>().sqrt();
            assert!(total <= c, "{dtype:?} example {k}: contribution {total} > C = {c}");
            clipped += usize::from(out.norms[0] > c);
        }
        assert!(clipped > 5, "{dtype:?}: the sweep must clip: {clipped}");
    }
}

/// A tied embedding and output projection on sequences, f32: the Gram form
/// with cross terms, whose rounding error is bounded and added, keeps each
/// example within C.
#[test]
fn no_sample_exceeds_clip_norm_with_tied_weights_in_f32() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let wte = candle_dp::embedding(50, 16, vb.pp("wte")).unwrap();
    let hidden = candle_dp::linear(16, 16, vb.pp("hidden")).unwrap();
    set_deterministic(&varmap, 24).unwrap();
    let engine = GhostEngine::new(&vars_by_name(&varmap)).unwrap();
    let mut clipped = 0;
    for k in 0..30u64 {
        let head = DpLinear::new(wte.embeddings().clone(), None); // built after the engine: still counted
        let ids: Vec<u32> = (0..12).map(|t| ((t * 7 + k * 3) % 50) as u32).collect();
        let ids = Tensor::from_vec(ids, (1, 12), &Device::Cpu).unwrap();
        let target = tensor(&[1, 12, 50], 400 + k, 2.0, DType::F32).unwrap();
        let logits = head.forward(&hidden.forward(&wte.forward(&ids).unwrap()).unwrap().tanh().unwrap()).unwrap();
        let losses = loss::mse(&logits, &target).unwrap();
        let c = 10f64.powf(-2.0 + 4.0 * ((k * 7) % 30) as f64 / 30.0);
        let out = engine.clip(&losses, &ClipMode::Flat, c).unwrap();
        let total = out.clipped_sums.iter().map(|t| norm(t).powi(2)).sum::<f64>().sqrt();
        assert!(total <= c, "example {k}: contribution {total} > C = {c}");
        clipped += usize::from(out.norms[0] > c);
    }
    assert!(clipped > 5 && clipped < 30, "both regimes: {clipped}");
}

/// Per-layer clipping with a tied table: the embedding and the projection
/// over its table are one group, the hidden layer another; each group's
/// part of an example's contribution is within its threshold.
#[test]
fn per_layer_clipping_treats_tied_layers_as_one_group() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let hidden = candle_dp::linear(8, 8, vb.pp("a_hidden")).unwrap(); // its variables come first by name
    let wte = candle_dp::embedding(20, 8, vb.pp("wte")).unwrap();
    let head = DpLinear::new(wte.embeddings().clone(), None);
    set_deterministic(&varmap, 25).unwrap();
    let vars = vars_by_name(&varmap); // a_hidden.bias, a_hidden.weight, wte.weight
    let engine = GhostEngine::new(&vars).unwrap();
    assert_eq!(engine.num_layers().unwrap(), 2);
    let thresholds = vec![0.9f64.sqrt(), 0.1f64.sqrt()];
    let mut both = 0;
    for k in 0..10u64 {
        let ids = Tensor::from_vec(vec![(k % 20) as u32, ((k * 3 + 1) % 20) as u32], (1, 2), &Device::Cpu).unwrap();
        let target = tensor(&[1, 2, 20], 500 + k, 5.0, DType::F64).unwrap();
        let logits = head.forward(&hidden.forward(&wte.forward(&ids).unwrap()).unwrap().tanh().unwrap()).unwrap();
        let out =
            engine.clip(&loss::mse(&logits, &target).unwrap(), &ClipMode::PerLayer(thresholds.clone()), 1.0).unwrap();
        let hidden_part = (norm(&out.clipped_sums[0]).powi(2) + norm(&out.clipped_sums[1]).powi(2)).sqrt();
        let tied_part = norm(&out.clipped_sums[2]);
        assert!(hidden_part <= thresholds[0], "hidden: {hidden_part}");
        assert!(tied_part <= thresholds[1], "tied: {tied_part}");
        both += usize::from(
            hidden_part > 0.99 * thresholds[0] * (1.0 - 1e-4) && tied_part > 0.99 * thresholds[1] * (1.0 - 1e-4),
        );
    }
    assert!(both > 0, "some examples must be clipped in both groups");
}
