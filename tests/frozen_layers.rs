//! Frozen DP layers: a layer none of whose parameters a live optimizer
//! trains captures nothing, passes input gradients through correctly, and
//! its parameters never change; a layer with some parameters trained
//! (bias-only fine-tuning) clips exactly those.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_dp::grad_sample::ghost::GhostEngine;
use candle_dp::grad_sample::microbatch::clip_microbatch;
use candle_dp::{loss, ClipMode, DpLinear, DpOptimizer, GaussianNoise, PoissonSampler};
use candle_nn::{Conv2dConfig, VarBuilder, VarMap, SGD};
use common::{assert_same_clipping, set_deterministic, take, tensor, vars_by_name};

/// x -> trained (6->6) -> frozen over plain tensors -> frozen over Vars no
/// optimizer is given -> trained (6->3), with tanh between.
struct Model<L> {
    first: L,
    frozen_plain: L,
    frozen_var: L,
    last: L,
}

impl<L: Module> Module for Model<L> {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.first.forward(x)?.tanh()?;
        let h = self.frozen_plain.forward(&h)?.tanh()?;
        let h = self.frozen_var.forward(&h)?.tanh()?;
        self.last.forward(&h)
    }
}

/// The DP model and its plain twin over the same tensors; `trained` holds
/// the variables an optimizer gets, `frozen` the other variables.
fn models(dtype: DType) -> (VarMap, VarMap, Model<DpLinear>, Model<candle_nn::Linear>) {
    let trained = VarMap::new();
    let frozen = VarMap::new();
    let vt = VarBuilder::from_varmap(&trained, dtype, &Device::Cpu);
    let vf = VarBuilder::from_varmap(&frozen, dtype, &Device::Cpu);
    let plain_w = tensor(&[6, 6], 91, 0.5, dtype).unwrap();
    let plain_b = tensor(&[6], 92, 0.5, dtype).unwrap();
    let dp = Model {
        first: candle_dp::linear(6, 6, vt.pp("first")).unwrap(),
        frozen_plain: DpLinear::new(plain_w.clone(), Some(plain_b.clone())),
        frozen_var: candle_dp::linear(6, 6, vf.pp("frozen")).unwrap(),
        last: candle_dp::linear(6, 3, vt.pp("last")).unwrap(),
    };
    let plain = Model {
        first: candle_nn::linear(6, 6, vt.pp("first")).unwrap(),
        frozen_plain: candle_nn::Linear::new(plain_w, Some(plain_b)),
        frozen_var: candle_nn::linear(6, 6, vf.pp("frozen")).unwrap(),
        last: candle_nn::linear(6, 3, vt.pp("last")).unwrap(),
    };
    set_deterministic(&trained, 93).unwrap();
    set_deterministic(&frozen, 94).unwrap();
    (trained, frozen, dp, plain)
}

#[test]
fn frozen_layers_capture_nothing_over_100_steps() {
    let (trained, _frozen, dp, _) = models(DType::F32);
    let x = tensor(&[40, 6], 95, 1.0, DType::F32).unwrap();
    let y = Tensor::from_vec((0..40u32).map(|i| i % 3).collect(), 40, &Device::Cpu).unwrap();
    let sampler = PoissonSampler::seeded(40, 0.25, 1).unwrap();
    let mut opt = DpOptimizer::<SGD>::builder(vars_by_name(&trained), sampler)
        .noise_multiplier(1.0)
        .noise(GaussianNoise::from_seed(2))
        .build(0.05)
        .unwrap();
    for step in 0..100 {
        let idx = opt.next_batch().unwrap();
        if !idx.is_empty() {
            let logits = dp.forward(&take(&x, &idx)).unwrap();
            assert_eq!(dp.frozen_plain.captured_uses(), 0, "step {step}: frozen (plain tensors) captured");
            assert_eq!(dp.frozen_var.captured_uses(), 0, "step {step}: frozen (untrained Vars) captured");
            assert_eq!(dp.first.captured_uses(), 1, "step {step}: a trained layer captures its use");
            opt.accumulate(&loss::cross_entropy(&logits, &take(&y, &idx)).unwrap()).unwrap();
        }
        opt.step().unwrap();
        for (name, layer) in [("first", &dp.first), ("frozen_plain", &dp.frozen_plain), ("frozen_var", &dp.frozen_var)]
        {
            assert_eq!(layer.captured_uses(), 0, "step {step}: {name} holds captures after the step");
        }
    }
}

/// The ghost engine over `vars` (a subset of the trained ones) against the
/// oracle on the plain twin, f64.
fn against_oracle(keep: impl Fn(&candle_core::Var) -> bool, seed: u64, max_grad_norm: f64, what: &str) {
    let (trained, _frozen, dp, plain) = models(DType::F64);
    let vars: Vec<_> = vars_by_name(&trained).into_iter().filter(|v| keep(v)).collect();
    let engine = GhostEngine::new(&vars).unwrap();
    let b = 7;
    let x = tensor(&[b, 6], seed, 2.0, DType::F64).unwrap();
    let y = Tensor::from_vec((0..b as u32).map(|i| i % 3).collect(), b, &Device::Cpu).unwrap();
    let losses = loss::cross_entropy(&dp.forward(&x).unwrap(), &y).unwrap();
    let ghost = engine.clip(&losses, &ClipMode::Flat, max_grad_norm).unwrap();
    let oracle = clip_microbatch(
        &vars,
        b,
        |i| loss::cross_entropy(&plain.forward(&x.narrow(0, i, 1)?)?, &y.narrow(0, i, 1)?).unwrap().tensor().sum_all(),
        max_grad_norm,
    )
    .unwrap();
    assert_same_clipping(&ghost, &oracle, max_grad_norm, 1e-9, what);
}

#[test]
fn gradients_pass_through_frozen_layers_as_the_oracle_says() {
    against_oracle(|_| true, 96, 0.3, "frozen layers in the middle");
}

#[test]
fn bias_only_training_matches_the_oracle() {
    // BitFit-style: the optimizer trains the biases only; the weights are
    // Vars it is not given, so they are frozen.
    against_oracle(|v| v.rank() == 1, 97, 0.1, "biases only");
}

#[test]
fn a_layer_captures_only_while_an_optimizer_trains_it() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let fc = candle_dp::linear(4, 2, vb.pp("fc")).unwrap();
    let x = tensor(&[3, 4], 98, 1.0, DType::F32).unwrap();
    let _ = fc.forward(&x).unwrap();
    assert_eq!(fc.captured_uses(), 0, "no optimizer yet");
    let engine = GhostEngine::new(&vars_by_name(&varmap)).unwrap();
    let out = fc.forward(&x).unwrap();
    assert_eq!(fc.captured_uses(), 1);
    let clone = engine.clone();
    drop(engine);
    let _ = fc.forward(&x).unwrap();
    assert_eq!(fc.captured_uses(), 2, "a clone keeps the claim");
    drop(clone);
    assert_eq!(fc.captured_uses(), 0, "the last engine gone, the layer drops what it held");
    drop(out);
    let _ = fc.forward(&x).unwrap();
    assert_eq!(fc.captured_uses(), 0);
}

#[test]
fn every_frozen_layer_kind_captures_nothing() {
    // Frozen embedding, norm and convolution feeding one trained linear.
    let trained = VarMap::new();
    let frozen = VarMap::new();
    let vt = VarBuilder::from_varmap(&trained, DType::F32, &Device::Cpu);
    let vf = VarBuilder::from_varmap(&frozen, DType::F32, &Device::Cpu);
    let emb = candle_dp::embedding(10, 4, vf.pp("emb")).unwrap();
    let norm = candle_dp::layer_norm(4, 1e-5, vf.pp("norm")).unwrap();
    let conv = candle_dp::conv2d(1, 2, 3, Conv2dConfig { padding: 1, ..Default::default() }, vf.pp("conv")).unwrap();
    let head = candle_dp::linear(4 + 2 * 16, 3, vt.pp("head")).unwrap();
    // q = 1 over the 3 examples: every batch drawn is all of them.
    let mut opt = DpOptimizer::<SGD>::builder(vars_by_name(&trained), PoissonSampler::seeded(3, 1.0, 1).unwrap())
        .noise_multiplier(1.0)
        .noise(GaussianNoise::from_seed(3))
        .build(0.1)
        .unwrap();
    let ids = Tensor::from_vec(vec![1u32, 2, 3], 3, &Device::Cpu).unwrap();
    let img = tensor(&[3, 1, 4, 4], 99, 1.0, DType::F32).unwrap();
    let labels = Tensor::from_vec(vec![0u32, 1, 2], 3, &Device::Cpu).unwrap();
    for _ in 0..3 {
        let idx = opt.next_batch().unwrap();
        assert_eq!(idx, vec![0, 1, 2]);
        let a = norm.forward(&emb.forward(&take(&ids, &idx)).unwrap()).unwrap();
        let c = conv.forward(&take(&img, &idx)).unwrap().flatten_from(1).unwrap();
        let logits = head.forward(&Tensor::cat(&[&a, &c], 1).unwrap()).unwrap();
        assert_eq!((emb.captured_uses(), norm.captured_uses(), conv.captured_uses()), (0, 0, 0));
        opt.accumulate(&loss::cross_entropy(&logits, &take(&labels, &idx)).unwrap()).unwrap();
        opt.step().unwrap();
    }
}

/// x -> conv (trained) -> conv over plain tensors (frozen, stride 2) ->
/// linear over its 2 channels as positions -> layer norm -> linear head: frozen layers in the middle pass the
/// gradient through; and bias-only training of convolution, linear and norm.
#[test]
fn frozen_conv_and_norm_in_the_middle_and_bias_only_match_the_oracle() {
    let dtype = DType::F64;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
    let cfg = Conv2dConfig { padding: 1, ..Default::default() };
    let cfg2 = Conv2dConfig { padding: 1, stride: 2, ..Default::default() };
    let kernel = tensor(&[2, 2, 3, 3], 101, 0.5, dtype).unwrap();
    let kbias = tensor(&[2], 102, 0.5, dtype).unwrap();
    let conv = candle_dp::conv2d(1, 2, 3, cfg, vb.pp("conv")).unwrap();
    let frozen = candle_dp::DpConv::new2d(kernel.clone(), Some(kbias.clone()), cfg2).unwrap();
    let fc = candle_dp::linear(9, 6, vb.pp("fc")).unwrap();
    let norm = candle_dp::layer_norm(6, 1e-5, vb.pp("norm")).unwrap();
    let head = candle_dp::linear(6, 3, vb.pp("head")).unwrap();
    let p_conv = candle_nn::conv2d(1, 2, 3, cfg, vb.pp("conv")).unwrap();
    let p_frozen = candle_nn::Conv2d::new(kernel, Some(kbias), cfg2);
    let p_fc = candle_nn::linear(9, 6, vb.pp("fc")).unwrap();
    let p_norm = candle_nn::layer_norm(6, 1e-5, vb.pp("norm")).unwrap();
    let p_head = candle_nn::linear(6, 3, vb.pp("head")).unwrap();
    set_deterministic(&varmap, 103).unwrap();
    let forward = |c: &dyn Module, f: &dyn Module, l: &dyn Module, n: &dyn Module, h: &dyn Module, x: &Tensor| {
        // The frozen convolution's 2 channels as 2 positions of 9 features.
        let z = f.forward(&c.forward(x)?.tanh()?)?.tanh()?.flatten_from(2)?;
        let z = l.forward(&z)?;
        // A non-contiguous input sends candle-nn's norm down its f64 path.
        let z = Tensor::cat(&[&z, &z], 2)?.narrow(2, 0, 6)?;
        h.forward(&n.forward(&z)?.tanh()?)?.mean(1)
    };
    let b = 5;
    let x = tensor(&[b, 1, 6, 6], 104, 1.5, dtype).unwrap();
    let y = Tensor::from_vec((0..b as u32).map(|i| i % 3).collect(), b, &Device::Cpu).unwrap();
    let all = vars_by_name(&varmap);
    let names: Vec<String> = {
        let data = varmap.data().lock().unwrap();
        let mut n: Vec<String> = data.keys().cloned().collect();
        n.sort();
        n
    };
    let pick = |keep: &dyn Fn(&str) -> bool| -> Vec<candle_core::Var> {
        all.iter().zip(&names).filter(|(_, n)| keep(n)).map(|(v, _)| v.clone()).collect()
    };
    for (what, vars) in [
        ("norm frozen", pick(&|n: &str| !n.starts_with("norm"))),
        ("biases only", pick(&|n: &str| n.ends_with("bias"))),
    ] {
        let engine = GhostEngine::new(&vars).unwrap();
        let logits = forward(&conv, &frozen, &fc, &norm, &head, &x).unwrap();
        let ghost = engine.clip(&loss::cross_entropy(&logits, &y).unwrap(), &ClipMode::Flat, 0.2).unwrap();
        let oracle = clip_microbatch(
            &vars,
            b,
            |i| {
                let logits = forward(&p_conv, &p_frozen, &p_fc, &p_norm, &p_head, &x.narrow(0, i, 1)?)?;
                loss::cross_entropy(&logits, &y.narrow(0, i, 1)?).unwrap().tensor().sum_all()
            },
            0.2,
        )
        .unwrap();
        assert_same_clipping(&ghost, &oracle, 0.2, 1e-9, what);
        assert_eq!(frozen.captured_uses(), 0, "{what}: the frozen convolution captured");
    }
}
