//! The replay check on every DP layer type (ghost engine) and on candle-nn
//! models (microbatch engine), flat and per-layer clipping: from the same
//! state, with the same noise keys, the privatized sums of the batch with
//! and without one example differ by that example's clipped gradient (at
//! most `C`, and here `C` itself: every gradient is longer), and the noise
//! measured is the noise claimed. A planted bug that disables clipping is
//! flagged on each engine.

mod common;

use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_dp::audit::{replay_check, PlantedBug, ReplayReport};
use candle_dp::models::{Adapters, Flavor, Gpt, GptConfig};
use candle_dp::{loss, ClipMode, DpOptimizer, Engine, GaussianNoise, LoraConfig, PerSampleLoss, PoissonSampler};
use candle_nn::{Conv1dConfig, Conv2dConfig, VarBuilder, VarMap, SGD};
use common::{set_deterministic, take, tensor, vars_by_name};

const N: usize = 6;
const STEPS: u64 = 4;
/// Far below every example's gradient norm: each contribution is clipped.
const C: f64 = 1e-3;

fn vb(varmap: &VarMap) -> VarBuilder<'static> {
    VarBuilder::from_varmap(varmap, DType::F64, &Device::Cpu)
}

/// Replays `STEPS` full-batch steps (`q = 1`: the removed example is in every batch).
fn replay(
    vars: Vec<Var>,
    engine: Engine,
    clipping: ClipMode,
    bug: Option<PlantedBug>,
    losses: impl Fn(&[usize]) -> candle_dp::Result<PerSampleLoss>,
) -> ReplayReport {
    let mut b = DpOptimizer::<SGD>::builder(vars, PoissonSampler::seeded(N, 1.0, 3).unwrap())
        .noise_multiplier(1.0)
        .max_grad_norm(C)
        .clipping(clipping)
        .engine(engine)
        .noise(GaussianNoise::from_seed(4));
    if let Some(bug) = bug {
        b = b.plant_bug(bug);
    }
    let mut opt = b.build(0.01).unwrap();
    replay_check(&mut opt, 1, STEPS, losses).unwrap()
}

fn check(name: &str, report: &ReplayReport) {
    assert!(report.passed(), "{name}: {report:?}");
    assert_eq!(report.steps.len(), STEPS as usize);
    for s in &report.steps {
        assert!(s.removed_drawn && s.same_control_flow, "{name}: {s:?}");
        for (d, b) in s.difference.iter().zip(&s.bound) {
            // The clipped gradient itself, C (1 - 1e-4): the check measured it.
            assert!(*d >= 0.999 * b, "{name}: difference {d} for bound {b}");
        }
    }
    let (ratio, (lo, hi)) = (report.noise_ratio().unwrap(), report.noise_interval().unwrap());
    eprintln!(
        "{name}: max difference {:.6} C, noise ratio {ratio:.4} in [{lo:.4}, {hi:.4}]",
        report.max_difference_ratio()
    );
}

fn mse_of(out: candle_core::Result<Tensor>, target: &Tensor, idx: &[usize]) -> candle_dp::Result<PerSampleLoss> {
    loss::mse(&out?, &take(target, idx))
}

#[test]
fn linear_layers_flat_and_per_layer() {
    let varmap = VarMap::new();
    let (v, x, y) =
        (vb(&varmap), tensor(&[N, 5], 1, 1.0, DType::F64).unwrap(), tensor(&[N, 3], 2, 1.0, DType::F64).unwrap());
    let fc = candle_dp::linear(5, 8, v.pp("fc")).unwrap();
    let out = candle_dp::linear_no_bias(8, 3, v.pp("out")).unwrap();
    set_deterministic(&varmap, 5).unwrap();
    let losses = |idx: &[usize]| mse_of(out.forward(&fc.forward(&take(&x, idx))?.tanh()?), &y, idx);
    check("linear", &replay(vars_by_name(&varmap), Engine::Ghost, ClipMode::Flat, None, losses));
    let per_layer = ClipMode::per_layer_uniform(C, 2);
    let report = replay(vars_by_name(&varmap), Engine::Ghost, per_layer.clone(), None, losses);
    assert_eq!(report.steps[0].bound.len(), 2, "one bound per layer");
    check("linear, per layer", &report);
    // A planted bug that disables clipping is flagged, layer by layer.
    let report = replay(vars_by_name(&varmap), Engine::Ghost, per_layer, Some(PlantedBug::ClippingDisabled), losses);
    assert!(!report.sensitivity_ok() && !report.passed(), "{report:?}");
}

#[test]
fn convolutions() {
    let varmap = VarMap::new();
    let v = vb(&varmap);
    let c1 = candle_dp::conv1d(2, 3, 3, Conv1dConfig::default(), v.pp("c1")).unwrap();
    let c2 = candle_dp::conv2d(1, 2, 3, Conv2dConfig { padding: 1, ..Default::default() }, v.pp("c2")).unwrap();
    let head = candle_dp::linear(3 * 6 + 2 * 4 * 4, 2, v.pp("head")).unwrap();
    set_deterministic(&varmap, 6).unwrap();
    let (x1, x2) =
        (tensor(&[N, 2, 8], 7, 1.0, DType::F64).unwrap(), tensor(&[N, 1, 4, 4], 8, 1.0, DType::F64).unwrap());
    let y = tensor(&[N, 2], 9, 1.0, DType::F64).unwrap();
    let losses = |idx: &[usize]| {
        let a = c1.forward(&take(&x1, idx))?.tanh()?.flatten_from(1)?;
        let b = c2.forward(&take(&x2, idx))?.tanh()?.flatten_from(1)?;
        mse_of(head.forward(&Tensor::cat(&[a, b], 1)?), &y, idx)
    };
    check("conv1d + conv2d", &replay(vars_by_name(&varmap), Engine::Ghost, ClipMode::Flat, None, losses));
}

#[test]
fn embedding_and_norms() {
    let varmap = VarMap::new();
    let v = vb(&varmap);
    let emb = candle_dp::embedding(7, 6, v.pp("emb")).unwrap();
    let ln = candle_dp::layer_norm(6, 1e-5, v.pp("ln")).unwrap();
    let rms = candle_dp::rms_norm(6, 1e-5, v.pp("rms")).unwrap();
    let gn = candle_dp::group_norm(2, 6, 1e-5, v.pp("gn")).unwrap();
    let head = candle_dp::linear(6, 3, v.pp("head")).unwrap();
    set_deterministic(&varmap, 10).unwrap();
    let ids: Vec<u32> = (0..N * 4).map(|k| ((k * 5 + k / 3) % 7) as u32).collect();
    let ids = Tensor::from_vec(ids, (N, 4), &Device::Cpu).unwrap();
    let y = tensor(&[N, 3], 11, 1.0, DType::F64).unwrap();
    let losses = |idx: &[usize]| {
        let z = emb.forward(&take(&ids, idx))?; // [b, 4, 6]
                                                // Non-contiguous: the norms' reference path (candle-nn's fused kernels have no f64).
        let z = Tensor::cat(&[&z, &z], D::Minus1)?.narrow(D::Minus1, 0, 6)?;
        let z = rms.forward(&ln.forward(&z)?)?;
        let z = gn.forward(&z.transpose(1, 2)?)?.transpose(1, 2)?; // channels second
        mse_of(head.forward(&z)?.mean(1), &y, idx)
    };
    check("embedding + norms", &replay(vars_by_name(&varmap), Engine::Ghost, ClipMode::Flat, None, losses));
}

const CFG: GptConfig = GptConfig { vocab_size: 11, context: 6, d_model: 8, n_layers: 2, n_heads: 2 };

fn sequences() -> (Tensor, Tensor) {
    let ids: Vec<u32> = (0..N * 7).map(|i| ((i * 7 + i / 3) % CFG.vocab_size) as u32).collect();
    let all = Tensor::from_vec(ids, (N, 7), &Device::Cpu).unwrap();
    (all.narrow(1, 0, 6).unwrap().contiguous().unwrap(), all.narrow(1, 1, 6).unwrap().contiguous().unwrap())
}

#[test]
fn transformer_full_and_lora() {
    let (x, y) = sequences();
    let varmap = VarMap::new();
    let gpt = Gpt::new(CFG, vb(&varmap), Flavor::Dp, None).unwrap();
    set_deterministic(&varmap, 12).unwrap();
    let losses = |m: &Gpt, idx: &[usize]| loss::sequence_cross_entropy(&m.forward(&take(&x, idx))?, &take(&y, idx));
    check("gpt", &replay(vars_by_name(&varmap), Engine::Ghost, ClipMode::Flat, None, |idx| losses(&gpt, idx)));

    let (base, adapter) = (VarMap::new(), VarMap::new());
    let lora = Adapters { config: LoraConfig { rank: 2, alpha: 4.0 }, vb: vb(&adapter) };
    let gpt = Gpt::new(CFG, vb(&base), Flavor::Dp, Some(lora)).unwrap();
    set_deterministic(&base, 13).unwrap();
    set_deterministic(&adapter, 14).unwrap();
    check("gpt, LoRA", &replay(vars_by_name(&adapter), Engine::Ghost, ClipMode::Flat, None, |idx| losses(&gpt, idx)));
}

#[test]
fn microbatch_engine_on_candle_nn_layers() {
    let varmap = VarMap::new();
    let v = vb(&varmap);
    let conv = candle_nn::conv2d(1, 2, 3, Conv2dConfig::default(), v.pp("conv")).unwrap();
    let emb = candle_nn::embedding(7, 3, v.pp("emb")).unwrap();
    let ln = candle_nn::layer_norm(2 * 2 * 2 + 3, 1e-5, v.pp("ln")).unwrap();
    let head = candle_nn::linear(2 * 2 * 2 + 3, 2, v.pp("head")).unwrap();
    set_deterministic(&varmap, 15).unwrap();
    let x = tensor(&[N, 1, 4, 4], 16, 1.0, DType::F64).unwrap();
    let ids = Tensor::from_vec((0..N as u32).map(|i| i % 7).collect(), N, &Device::Cpu).unwrap();
    let y = tensor(&[N, 2], 17, 1.0, DType::F64).unwrap();
    let losses = |idx: &[usize]| {
        let a = conv.forward(&take(&x, idx))?.tanh()?.flatten_from(1)?;
        let z = Tensor::cat(&[a, emb.forward(&take(&ids, idx))?], 1)?;
        // [b, 2, 11], non-contiguous: the norm's reference path (no fused f64 kernel).
        let z = Tensor::stack(&[&z, &z], 1)?;
        let z = Tensor::cat(&[&z, &z], 2)?.narrow(2, 0, 11)?;
        mse_of(head.forward(&ln.forward(&z)?.mean(1)?), &y, idx)
    };
    check("microbatch", &replay(vars_by_name(&varmap), Engine::Microbatch, ClipMode::Flat, None, losses));
    let report =
        replay(vars_by_name(&varmap), Engine::Microbatch, ClipMode::Flat, Some(PlantedBug::ClippingDisabled), losses);
    assert!(!report.sensitivity_ok(), "{report:?}");
}

#[test]
fn a_removed_index_outside_the_dataset_is_refused() {
    let varmap = VarMap::new();
    let fc = candle_dp::linear(2, 1, vb(&varmap).pp("fc")).unwrap();
    let x = tensor(&[N, 2], 1, 1.0, DType::F64).unwrap();
    let mut opt = DpOptimizer::<SGD>::builder(vars_by_name(&varmap), PoissonSampler::seeded(N, 1.0, 3).unwrap())
        .noise_multiplier(1.0)
        .build(0.01)
        .unwrap();
    let e =
        replay_check(&mut opt, N, 1, |idx| loss::mse(&fc.forward(&take(&x, idx))?, &take(&x, idx).narrow(1, 0, 1)?))
            .unwrap_err();
    assert!(matches!(e, candle_dp::Error::InvalidConfig { field: "removed", .. }), "{e}");
    assert_eq!(opt.steps(), 0, "nothing was taken");
}
