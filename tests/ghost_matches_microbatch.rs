//! The ghost engine's per-example norms and clipped sums equal the
//! microbatch oracle's (Candle's own autograd, one example at a time, on the
//! plain candle-nn twin of the model): f64 to 1e-9 relative, f32 to 1e-4.

mod common;

use candle_core::{DType, Module, Tensor, D};
use candle_dp::grad_sample::ghost::GhostEngine;
use candle_dp::grad_sample::microbatch::clip_microbatch;
use candle_dp::grad_sample::per_example::chooses_gram;
use candle_dp::{loss, ClipMode};
use candle_nn::VarMap;
use common::{mlp_pair, rel_diff, set_deterministic, tensor, vars_by_name};

fn check_mlp(dtype: DType, tol: f64, max_grad_norm: f64) {
    let varmap = VarMap::new();
    let (dp, plain) = mlp_pair(&varmap, &[6, 5, 3], dtype).unwrap();
    set_deterministic(&varmap, 11).unwrap();
    let vars = vars_by_name(&varmap);
    let b = 7;
    let x = tensor(&[b, 6], 1, 2.0, dtype).unwrap();
    let y = Tensor::from_vec((0..b as u32).map(|i| i % 3).collect(), b, x.device()).unwrap();

    let engine = GhostEngine::new(&vars).unwrap();
    let losses = loss::cross_entropy(&dp.forward(&x).unwrap(), &y).unwrap();
    let ghost = engine.clip(&losses, &ClipMode::Flat, max_grad_norm).unwrap();

    let oracle = clip_microbatch(
        &vars,
        b,
        |i| {
            let xi = x.narrow(0, i, 1)?;
            let yi = y.narrow(0, i, 1)?;
            loss::cross_entropy(&plain.forward(&xi)?, &yi).unwrap().tensor().sum_all()
        },
        max_grad_norm,
    )
    .unwrap();
    for (g, o) in ghost.norms.iter().zip(&oracle.norms) {
        assert!(((g - o) / o).abs() < tol, "norm {g} vs oracle {o}");
    }
    for (k, (g, o)) in ghost.clipped_sums.iter().zip(&oracle.clipped_sums).enumerate() {
        let d = rel_diff(g, o);
        assert!(d < tol, "variable {k}: relative difference {d:e}");
    }
    // Clipping was active for some examples and not others (a real test of c_i).
    assert!(ghost.norms.iter().any(|n| *n > max_grad_norm));
}

#[test]
fn ghost_matches_microbatch_mlp_f64() {
    check_mlp(DType::F64, 1e-9, 0.5);
}

#[test]
fn ghost_matches_microbatch_mlp_f32() {
    check_mlp(DType::F32, 1e-4, 0.5);
}

/// `[B, T, d]` inputs, in both regimes, `gram` saying which the engine must
/// choose for both layers (`chooses_gram`: by time, roughly Gram where
/// `T (d + p) <= d p`); and a layer used twice.
fn check_sequence(dtype: DType, tol: f64, t: usize, d: usize, p: usize, twice: bool, gram: bool) {
    let uses = if twice { 2 } else { 1 };
    assert_eq!(chooses_gram(t, p, d, dtype, false), gram, "the first layer's regime");
    assert_eq!(chooses_gram(uses * t, p, p, dtype, false), gram, "the second layer's regime");
    let varmap = VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, dtype, &candle_core::Device::Cpu);
    let dp = candle_dp::linear(d, p, vb.pp("seq")).unwrap();
    let dp2 = candle_dp::linear(p, p, vb.pp("sq")).unwrap();
    let plain = candle_nn::linear(d, p, vb.pp("seq")).unwrap();
    let plain2 = candle_nn::linear(p, p, vb.pp("sq")).unwrap();
    set_deterministic(&varmap, 5).unwrap();
    let vars = vars_by_name(&varmap);
    let b = 5;
    let x = tensor(&[b, t, d], 3, 1.5, dtype).unwrap();
    let target = tensor(&[b, p], 4, 1.0, dtype).unwrap();
    // Per-example loss: MSE of the mean over time of the output.
    let run = |x: &Tensor, l1: &dyn Module, l2: &dyn Module| -> candle_core::Result<Tensor> {
        let mut h = l1.forward(x)?;
        h = l2.forward(&h.tanh()?)?;
        if twice {
            h = l2.forward(&h.tanh()?)?;
        }
        h.mean(D::Minus2)
    };
    let engine = GhostEngine::new(&vars).unwrap();
    let losses = loss::mse(&run(&x, &dp, &dp2).unwrap(), &target).unwrap();
    let ghost = engine.clip(&losses, &ClipMode::Flat, 0.3).unwrap();
    let oracle = clip_microbatch(
        &vars,
        b,
        |i| {
            let out = run(&x.narrow(0, i, 1)?, &plain, &plain2)?;
            loss::mse(&out, &target.narrow(0, i, 1)?).unwrap().tensor().sum_all()
        },
        0.3,
    )
    .unwrap();
    for (g, o) in ghost.norms.iter().zip(&oracle.norms) {
        assert!(((g - o) / o).abs() < tol, "T={t} d={d} p={p}: norm {g} vs oracle {o}");
    }
    for (g, o) in ghost.clipped_sums.iter().zip(&oracle.clipped_sums) {
        assert!(rel_diff(g, o) < tol, "T={t} d={d} p={p}: {:e}", rel_diff(g, o));
    }
}

#[test]
fn ghost_matches_microbatch_sequence_gram_form() {
    check_sequence(DType::F64, 1e-9, 3, 16, 16, false, true);
    check_sequence(DType::F32, 1e-4, 3, 16, 16, false, true);
}

#[test]
fn ghost_matches_microbatch_sequence_materialized() {
    check_sequence(DType::F64, 1e-9, 8, 2, 3, false, false);
    check_sequence(DType::F32, 1e-4, 8, 2, 3, false, false);
}

#[test]
fn a_layer_used_twice_accounts_both_uses() {
    check_sequence(DType::F64, 1e-9, 3, 16, 16, true, true);
    check_sequence(DType::F64, 1e-9, 8, 2, 3, true, false);
    check_sequence(DType::F64, 1e-9, 1, 4, 5, true, true);
}

/// A backward pass of the caller's own on another forward (say, a logging
/// loss on other data) must not leak into the next batch's per-example
/// gradients.
#[test]
fn a_callers_own_backward_does_not_count() {
    let varmap = VarMap::new();
    let (dp, _) = mlp_pair(&varmap, &[6, 5, 3], DType::F64).unwrap();
    set_deterministic(&varmap, 11).unwrap();
    let vars = vars_by_name(&varmap);
    let x = tensor(&[4, 6], 1, 2.0, DType::F64).unwrap();
    let y = Tensor::from_vec(vec![0u32, 1, 2, 0], 4, x.device()).unwrap();
    let engine = GhostEngine::new(&vars).unwrap();
    let clean = engine.clip(&loss::cross_entropy(&dp.forward(&x).unwrap(), &y).unwrap(), &ClipMode::Flat, 0.5).unwrap();
    let other = tensor(&[4, 6], 2, 2.0, DType::F64).unwrap();
    let logging = loss::cross_entropy(&dp.forward(&other).unwrap(), &y).unwrap();
    let _ = logging.tensor().sum_all().unwrap().backward().unwrap();
    let losses = loss::cross_entropy(&dp.forward(&x).unwrap(), &y).unwrap();
    let after = engine.clip(&losses, &ClipMode::Flat, 0.5).unwrap();
    drop(logging);
    assert_eq!(clean.norms, after.norms);
    for (a, b) in clean.clipped_sums.iter().zip(&after.clipped_sums) {
        assert!(rel_diff(a, b) < 1e-15);
    }
}
