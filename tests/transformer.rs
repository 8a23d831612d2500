//! The decoder-only transformer and LoRA: per-example clipping of the ghost
//! engine equals the microbatch oracle's on the same model built from
//! candle-nn's layers (attention, tied embeddings, layer norms, positional
//! embeddings; full and LoRA fine-tuning), and LoRA's algebra (identity at
//! start, merge, adapter files) holds.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_dp::models::{Adapters, Flavor, Gpt, GptConfig};
use candle_dp::optim::AdamW;
use candle_dp::{loss, DpOptimizer, GaussianNoise, LoraConfig, PoissonSampler};
use candle_nn::{VarBuilder, VarMap};
use common::{ghost_vs_oracle, set_deterministic, take, vars_by_name};

const CFG: GptConfig = GptConfig { vocab_size: 11, context: 6, d_model: 8, n_layers: 2, n_heads: 2 };
const B: usize = 5;
const T: usize = 6;

/// `B` sequences of `T + 1` tokens: inputs and next-token targets.
fn tokens() -> (Tensor, Tensor) {
    let ids: Vec<u32> = (0..B * (T + 1)).map(|i| ((i * 7 + i / 3) % CFG.vocab_size) as u32).collect();
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
