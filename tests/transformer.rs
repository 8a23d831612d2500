//! The decoder-only transformer and LoRA: per-example clipping of the ghost
//! engine equals the microbatch oracle's on the same model built from
//! candle-nn's layers (attention, tied embeddings, layer norms, positional
//! embeddings; full and LoRA fine-tuning; frozen blocks and every layer
//! used twice), no sequence contributes more than C, and LoRA's algebra
//! (identity at start, merge, adapter files) holds.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_dp::grad_sample::ghost::GhostEngine;
use candle_dp::grad_sample::microbatch::clip_microbatch;
use candle_dp::models::{Adapters, Flavor, Gpt, GptConfig};
use candle_dp::optim::AdamW;
use candle_dp::{loss, ClipMode, DpOptimizer, GaussianNoise, LoraConfig, PerSampleLoss, PoissonSampler};
use candle_nn::{VarBuilder, VarMap};
use common::{ghost_vs_oracle, set_deterministic, take, vars_by_name};

const CFG: GptConfig = GptConfig { vocab_size: 11, context: 6, d_model: 8, n_layers: 2, n_heads: 2 };
/// Wide enough that every layer's norms take the Gram form (`CFG`'s mostly
/// materialize): both regimes of the engine on the whole model.
const WIDE: GptConfig = GptConfig { vocab_size: 32, context: 6, d_model: 32, n_layers: 2, n_heads: 2 };
const B: usize = 5;
const T: usize = 6;

/// `B` sequences of `T + 1` tokens: inputs and next-token targets.
fn tokens() -> (Tensor, Tensor) {
    tokens_of(&CFG)
}

fn tokens_of(cfg: &GptConfig) -> (Tensor, Tensor) {
    let ids: Vec<u32> = (0..B * (T + 1)).map(|i| ((i * 7 + i / 3) % cfg.vocab_size) as u32).collect();
    let all = Tensor::from_vec(ids, (B, T + 1), &Device::Cpu).unwrap();
    (all.narrow(1, 0, T).unwrap().contiguous().unwrap(), all.narrow(1, 1, T).unwrap().contiguous().unwrap())
}

fn vb(varmap: &VarMap) -> VarBuilder<'_> {
    VarBuilder::from_varmap(varmap, DType::F64, &Device::Cpu)
}

fn losses(model: &Gpt, x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    Ok(loss::sequence_cross_entropy(&model.forward(x)?, y)?.tensor().clone())
}

#[test]
fn full_fine_tuning_clips_as_the_oracle() {
    let varmap = VarMap::new();
    let dp = Gpt::new(CFG, vb(&varmap), Flavor::Dp, None).unwrap();
    let plain = Gpt::new(CFG, vb(&varmap), Flavor::Plain, None).unwrap();
    set_deterministic(&varmap, 3).unwrap();
    let n: usize = vars_by_name(&varmap).iter().map(|v| v.elem_count()).sum();
    assert_eq!(n, CFG.parameters());
    let (x, y) = tokens();
    let plain_loss = |i: usize| losses(&plain, &take(&x, &[i]), &take(&y, &[i]))?.sum_all();
    ghost_vs_oracle(&varmap, B, || losses(&dp, &x, &y), plain_loss, 0.05, 1e-9, "gpt, full");
}

#[test]
fn lora_fine_tuning_clips_as_the_oracle() {
    let (base, adapter) = (VarMap::new(), VarMap::new());
    let lora = LoraConfig { rank: 2, alpha: 4.0 };
    let dp = Gpt::new(CFG, vb(&base), Flavor::Dp, Some(Adapters { config: lora, vb: vb(&adapter) })).unwrap();
    let plain = Gpt::new(CFG, vb(&base), Flavor::Plain, Some(Adapters { config: lora, vb: vb(&adapter) })).unwrap();
    set_deterministic(&base, 5).unwrap();
    // B starts at zero, where A's gradient is zero too: move both off it.
    set_deterministic(&adapter, 6).unwrap();
    let names: Vec<String> = adapter.data().lock().unwrap().keys().cloned().collect();
    assert_eq!(names.len(), 4 * 2 * CFG.n_layers, "A and B on four projections per block: {names:?}");
    assert!(names.iter().any(|n| n == "h.1.attn.c_attn.lora_A.weight"), "{names:?}");
    let (x, y) = tokens();
    let plain_loss = |i: usize| losses(&plain, &take(&x, &[i]), &take(&y, &[i]))?.sum_all();
    // Only the adapter is trained; the base's DP layers are frozen.
    ghost_vs_oracle(&adapter, B, || losses(&dp, &x, &y), plain_loss, 0.05, 1e-9, "gpt, LoRA");
}

/// The variables of `varmap` whose names `keep` accepts, in a map of their own
/// (the same `Var`s: training them trains the model).
fn subset(varmap: &VarMap, keep: impl Fn(&str) -> bool) -> VarMap {
    let sub = VarMap::new();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if keep(name) {
            sub.data().lock().unwrap().insert(name.clone(), var.clone());
        }
    }
    sub
}

/// The first block and the positional embeddings frozen (DP layers over
/// variables no engine trains, mixed with trained ones), the tied table
/// trained, and every layer used twice per example: the loss of an example
/// is the sum of its sequence's loss and of a second sequence's through the
/// same model (cross terms between the two uses enter its norm).
fn twice_losses(model: &Gpt, x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    let vocab = model.config().vocab_size as u32;
    let ids: Vec<u32> = x.flatten_all()?.to_vec1::<u32>()?.iter().map(|t| (t + 3) % vocab).collect();
    let shifted = Tensor::from_vec(ids, x.dims(), x.device())?;
    losses(model, x, y)? + losses(model, &shifted, y)?
}

fn frozen(name: &str) -> bool {
    name.starts_with("h.0.") || name.starts_with("wpe")
}

/// In both regimes: `CFG` materializes the per-example gradients of every
/// projection and of the tied table, `WIDE` takes the Gram form for all of
/// them (the cross terms between uses then come from the Gram products).
#[test]
fn frozen_layers_and_layers_used_twice_clip_as_the_oracle() {
    use candle_dp::grad_sample::per_example::chooses_gram;
    for (cfg, gram) in [(CFG, false), (WIDE, true)] {
        let d = cfg.d_model;
        // Two forwards of T positions per projection; the table: T one-hot
        // and T dense positions per forward.
        for (p, c) in [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] {
            assert_eq!(chooses_gram(2 * T, p, c, DType::F64, false), gram, "{cfg:?}: projection [{p}, {c}]");
        }
        assert_eq!(chooses_gram(4 * T, cfg.vocab_size, d, DType::F64, true), gram, "{cfg:?}: the tied table");
        let varmap = VarMap::new();
        let dp = Gpt::new(cfg, vb(&varmap), Flavor::Dp, None).unwrap();
        let plain = Gpt::new(cfg, vb(&varmap), Flavor::Plain, None).unwrap();
        set_deterministic(&varmap, 4).unwrap();
        let trained = subset(&varmap, |n| !frozen(n));
        let names: Vec<String> = trained.data().lock().unwrap().keys().cloned().collect();
        assert!(names.iter().any(|n| n == "wte.weight") && names.iter().any(|n| n.starts_with("h.1.")), "{names:?}");
        assert!(names.len() < varmap.all_vars().len(), "some layers are frozen");
        let (x, y) = tokens_of(&cfg);
        let plain_loss = |i: usize| twice_losses(&plain, &take(&x, &[i]), &take(&y, &[i]))?.sum_all();
        let what = format!("gpt d = {d}, frozen and twice");
        ghost_vs_oracle(&trained, B, || twice_losses(&dp, &x, &y), plain_loss, 0.05, 1e-9, &what);
    }
}

/// On the same model in f32 (both widths), each sequence alone contributes
/// a clipped gradient of norm at most C, for C from far below to above the
/// gradients' norms, and within 2e-4 of C when it is clipped (the clip
/// margin, 1e-4, and the norm's rounding bound); and the engine's norm is
/// never below the microbatch oracle's (a use it dropped would lower both
/// its norm and its sum, and pass the first check).
#[test]
fn no_sequence_contributes_more_than_the_clipping_norm() {
    let (mut clipped, mut unclipped) = (0, 0);
    for cfg in [CFG, WIDE] {
        let varmap = VarMap::new();
        let f32_vb = || VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let dp = Gpt::new(cfg, f32_vb(), Flavor::Dp, None).unwrap();
        let plain = Gpt::new(cfg, f32_vb(), Flavor::Plain, None).unwrap();
        set_deterministic(&varmap, 12).unwrap();
        let trained = subset(&varmap, |n| !frozen(n));
        let vars = vars_by_name(&trained);
        let engine = GhostEngine::new(&vars).unwrap();
        let (x, y) = tokens_of(&cfg);
        for i in 0..B {
            let (xi, yi) = (take(&x, &[i]), take(&y, &[i]));
            let oracle = clip_microbatch(&vars, 1, |_| twice_losses(&plain, &xi, &yi)?.sum_all(), 1.0).unwrap();
            for c in [1e-3, 0.1, 1.0, 10.0, 1e3] {
                let l = PerSampleLoss::new(twice_losses(&dp, &xi, &yi).unwrap()).unwrap();
                let out = engine.clip(&l, &ClipMode::Flat, c).unwrap();
                assert!(
                    out.norms[0] >= oracle.norms[0] * (1.0 - 1e-5),
                    "d = {}, sequence {i}: norm {} below the oracle's {}",
                    cfg.d_model,
                    out.norms[0],
                    oracle.norms[0]
                );
                let total = out.clipped_sums.iter().map(|t| common::norm(t).powi(2)).sum::<f64>().sqrt();
                assert!(total <= c, "sequence {i}, C = {c}: contribution {total}");
                if out.norms[0] > c {
                    clipped += 1;
                    assert!(total > c * (1.0 - 2e-4), "sequence {i}, C = {c}: clipped to {total}");
                } else {
                    unclipped += 1;
                }
            }
        }
    }
    assert!(clipped > 0 && unclipped > 0, "both regimes: {clipped} clipped, {unclipped} not");
}

/// At start (B = 0) the adapted model is the base model; `merge()` folds the
/// update into a plain weight that computes the same map.
#[test]
fn lora_starts_as_the_base_and_merges_into_it() {
    let (base, adapter) = (VarMap::new(), VarMap::new());
    let lora = LoraConfig::default();
    let plain = Gpt::new(CFG, vb(&base), Flavor::Plain, None).unwrap();
    let adapted = Gpt::new(CFG, vb(&base), Flavor::Dp, Some(Adapters { config: lora, vb: vb(&adapter) })).unwrap();
    set_deterministic(&base, 8).unwrap();
    let (x, _) = tokens();
    let diff = (plain.forward(&x).unwrap() - adapted.forward(&x).unwrap()).unwrap().abs().unwrap();
    assert_eq!(diff.max_all().unwrap().to_scalar::<f64>().unwrap(), 0.0);

    let w = common::tensor(&[6, 16], 1, 1.0, DType::F64).unwrap();
    let layer =
        candle_dp::lora_linear(w.clone(), None, LoraConfig { rank: 3, alpha: 6.0 }, vb(&VarMap::new())).unwrap();
    set_deterministic(&VarMap::new(), 0).unwrap();
    let a = common::tensor(&[3, 16], 2, 1.0, DType::F64).unwrap();
    let bm = common::tensor(&[6, 3], 3, 1.0, DType::F64).unwrap();
    let layer = candle_dp::LoraLinear::new(layer.base().clone(), a, bm, LoraConfig { rank: 3, alpha: 6.0 }).unwrap();
    assert_eq!(layer.scale(), 2.0);
    let input = common::tensor(&[4, 16], 4, 1.0, DType::F64).unwrap();
    let merged = candle_nn::Linear::new(layer.merge().unwrap(), None);
    let d = (layer.forward(&input).unwrap() - merged.forward(&input).unwrap()).unwrap().abs().unwrap();
    assert!(d.max_all().unwrap().to_scalar::<f64>().unwrap() < 1e-12);
    // A rank beyond the layer is refused, naming the field.
    let err = candle_dp::lora_linear(w, None, LoraConfig { rank: 7, alpha: 1.0 }, vb(&VarMap::new())).unwrap_err();
    assert!(err.to_string().starts_with("lora.rank = 7: must be"), "{err}");
}

/// A LoRA-adapted model (B moved off zero), DP or plain, and the plain model
/// loaded from its `merged_weights()` compute the same logits in f32 (1e-5 of
/// the largest), under the base model's names, at both widths; so do a fully
/// fine-tuned model and its export. The export is a copy: training on after
/// it does not change it.
#[test]
fn the_merged_model_computes_the_adapted_one_in_f32() {
    let f32_vb = |m: &VarMap| VarBuilder::from_varmap(m, DType::F32, &Device::Cpu);
    let sorted_names = |m: &VarMap| {
        let mut v: Vec<String> = m.data().lock().unwrap().keys().cloned().collect();
        v.sort();
        v
    };
    let lora = LoraConfig { rank: 2, alpha: 4.0 };
    for cfg in [CFG, WIDE] {
        for (flavor, adapted) in [(Flavor::Dp, true), (Flavor::Plain, true), (Flavor::Dp, false)] {
            let (base, adapter) = (VarMap::new(), VarMap::new());
            let adapters = adapted.then(|| Adapters { config: lora, vb: f32_vb(&adapter) });
            let model = Gpt::new(cfg, f32_vb(&base), flavor, adapters).unwrap();
            set_deterministic(&base, 21).unwrap();
            if adapted {
                set_deterministic(&adapter, 22).unwrap();
            }
            let merged = model.merged_weights().unwrap();
            let mut names: Vec<String> = merged.keys().cloned().collect();
            names.sort();
            assert_eq!(names, sorted_names(&base), "the base model's names");
            let plain =
                Gpt::new(cfg, VarBuilder::from_tensors(merged, DType::F32, &Device::Cpu), Flavor::Plain, None).unwrap();
            let (x, _) = tokens_of(&cfg);
            let (a, p) = (model.forward(&x).unwrap(), plain.forward(&x).unwrap());
            let what = format!("d = {}, {flavor:?}, adapters {adapted}", cfg.d_model);
            let d = common::rel_diff(&p, &a);
            assert!(d < 1e-5, "{what}: merged vs model, {d:e} of the largest logit");
            if adapted {
                let base_only = Gpt::new(cfg, f32_vb(&base), Flavor::Plain, None).unwrap().forward(&x).unwrap();
                assert!(common::rel_diff(&base_only, &a) > 1e-3, "{what}: the adapter changes the model");
            }
            // Moving every variable (as training on would) leaves the export as it was.
            set_deterministic(&base, 23).unwrap();
            set_deterministic(&adapter, 24).unwrap();
            assert!(common::rel_diff(&model.forward(&x).unwrap(), &a) > 1e-3, "{what}: the model moved");
            let again = plain.forward(&x).unwrap();
            assert_eq!(common::rel_diff(&again, &p), 0.0, "{what}: the export shares storage with the model");
        }
    }
}

/// DP LoRA fine-tuning trains the adapter only: the base weights do not
/// move, and the adapter alone (saved and loaded into a fresh model over
/// the same base) reproduces the fine-tuned model.
#[test]
fn dp_lora_training_moves_only_the_adapter_which_saves_alone() {
    let (base, adapter) = (VarMap::new(), VarMap::new());
    let lora = LoraConfig { rank: 2, alpha: 4.0 };
    let model = Gpt::new(CFG, vb(&base), Flavor::Dp, Some(Adapters { config: lora, vb: vb(&adapter) })).unwrap();
    set_deterministic(&base, 9).unwrap();
    let before: Vec<Vec<f64>> =
        vars_by_name(&base).iter().map(|v| v.flatten_all().unwrap().to_vec1().unwrap()).collect();
    let (x, y) = tokens();
    let mut opt = DpOptimizer::<AdamW>::builder(vars_by_name(&adapter), PoissonSampler::seeded(B, 0.8, 1).unwrap())
        .noise_multiplier(0.5)
        .max_grad_norm(0.1)
        .max_physical_batch_size(2)
        .noise(GaussianNoise::from_seed(2))
        .build(candle_nn::ParamsAdamW { lr: 0.05, ..Default::default() })
        .unwrap();
    for _ in 0..3 {
        opt.train_step(|idx| loss::sequence_cross_entropy(&model.forward(&take(&x, idx))?, &take(&y, idx))).unwrap();
    }
    let after: Vec<Vec<f64>> =
        vars_by_name(&base).iter().map(|v| v.flatten_all().unwrap().to_vec1().unwrap()).collect();
    assert_eq!(before, after, "the base is frozen");
    let logits = model.forward(&x).unwrap();

    let path = std::env::temp_dir().join(format!("candle-dp-adapter-{}.safetensors", std::process::id()));
    adapter.save(&path).unwrap();
    let mut reloaded = VarMap::new();
    let fresh = Gpt::new(CFG, vb(&base), Flavor::Dp, Some(Adapters { config: lora, vb: vb(&reloaded) })).unwrap();
    reloaded.load(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let d = (fresh.forward(&x).unwrap() - &logits).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(d.to_scalar::<f64>().unwrap(), 0.0);
    let moved = (&logits - Gpt::new(CFG, vb(&base), Flavor::Plain, None).unwrap().forward(&x).unwrap()).unwrap();
    assert!(moved.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() > 1e-6, "the adapter was trained");
}
