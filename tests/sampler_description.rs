//! A sampler description that would train and state a wrong epsilon (0
//! for a rate of 0, NaN weights for an empty dataset) cannot be built, nor
//! read back from a checkpoint.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_dp::accountant::Seeding;
use candle_dp::{loss, DpOptimizer, Error, GaussianNoise, PoissonSampler, PrivacyBudget, SamplerDescription};
use candle_nn::{VarMap, SGD};
use common::{mlp_pair, take, tensor, vars_by_name};

fn field_of(e: Error) -> &'static str {
    match e {
        Error::InvalidConfig { field, .. } => field,
        other => panic!("expected InvalidConfig, got {other}"),
    }
}

#[test]
fn invalid_poisson_descriptions_are_refused_with_the_field() {
    for q in [0.0, -0.1, 1.5, f64::NAN, f64::INFINITY, 1e-310] {
        let e = SamplerDescription::poisson(100, q, Seeding::Fixed).unwrap_err();
        assert_eq!(field_of(e), "sample_rate", "q = {q}");
    }
    let e = SamplerDescription::poisson(0, 0.5, Seeding::Fixed).unwrap_err();
    assert!(e.to_string().starts_with("dataset_size = 0: must be"), "{e}");
    let d = SamplerDescription::poisson(100, 1.0, Seeding::Fixed).unwrap();
    assert_eq!((d.sample_rate(), d.batch_size(), d.expected_batch_size()), (Some(1.0), None, 100.0));
    // The smallest normal rate keeps 1 / (q N) finite.
    let tiny = SamplerDescription::poisson(1, f64::MIN_POSITIVE, Seeding::Fixed).unwrap();
    assert!((1.0 / tiny.expected_batch_size()).is_finite());
}

#[test]
fn invalid_fixed_size_descriptions_are_refused_with_the_field() {
    for (n, b, field) in [(100, 0, "batch_size"), (100, 101, "batch_size"), (0, 0, "dataset_size")] {
        let e = SamplerDescription::shuffled_fixed_size(n, b, Seeding::Fixed).unwrap_err();
        assert_eq!(field_of(e), field, "N = {n}, b = {b}");
    }
    let d = SamplerDescription::shuffled_fixed_size(100, 10, Seeding::OsEntropy).unwrap();
    assert_eq!((d.sample_rate(), d.batch_size(), d.dataset_size()), (None, Some(10), 100));
}

#[test]
fn a_valid_description_trains_and_spends_epsilon() {
    let varmap = VarMap::new();
    let (dp, _) = mlp_pair(&varmap, &[4, 2], DType::F32).unwrap();
    let d = SamplerDescription::poisson(100, 0.1, Seeding::Fixed).unwrap();
    let sampler = PoissonSampler::seeded(100, 0.1, 1).unwrap();
    assert_eq!(sampler.description(), d);
    let mut opt = DpOptimizer::<SGD>::builder(vars_by_name(&varmap), sampler)
        .noise_multiplier(1.0)
        .budget(PrivacyBudget { epsilon: 8.0, delta: 1e-5 })
        .noise(GaussianNoise::from_seed(1))
        .build(0.1)
        .unwrap();
    assert_eq!(opt.config().sampler(), d);
    let x = tensor(&[100, 4], 1, 1.0, DType::F32).unwrap();
    let y = Tensor::from_vec((0..100u32).map(|i| i % 2).collect(), 100, &Device::Cpu).unwrap();
    let summary = opt.train_step(|idx| loss::cross_entropy(&dp.forward(&take(&x, idx))?, &take(&y, idx))).unwrap();
    assert!(summary.examples > 0, "a batch with examples: {summary:?}");
    let eps = opt.epsilon(1e-5).unwrap();
    assert!(eps > 0.0 && eps.is_finite(), "{eps}");
}

#[test]
fn a_checkpoint_with_an_invalid_sampler_is_refused() {
    let varmap = VarMap::new();
    let (dp, _) = mlp_pair(&varmap, &[4, 2], DType::F32).unwrap();
    let sampler = PoissonSampler::seeded(20, 0.5, 1).unwrap();
    let mut opt = DpOptimizer::<SGD>::builder(vars_by_name(&varmap), sampler)
        .noise_multiplier(1.0)
        .noise(GaussianNoise::from_seed(1))
        .build(0.1)
        .unwrap();
    let x = tensor(&[20, 4], 2, 1.0, DType::F32).unwrap();
    let y = Tensor::from_vec((0..20u32).map(|i| i % 2).collect(), 20, &Device::Cpu).unwrap();
    let idx = opt.next_batch().unwrap();
    let idx = Tensor::from_vec(idx.iter().map(|&i| i as u32).collect(), idx.len(), &Device::Cpu).unwrap();
    let logits = dp.forward(&x.index_select(&idx, 0).unwrap()).unwrap();
    opt.accumulate(&loss::cross_entropy(&logits, &y.index_select(&idx, 0).unwrap()).unwrap()).unwrap();
    opt.step().unwrap();
    let dir = std::env::temp_dir().join(format!("candle-dp-sampler-{}", std::process::id()));
    opt.save_checkpoint(&dir, &varmap).unwrap();
    let manifest = dir.join("checkpoint.json");
    let original: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    for (field, pointer, saved, value) in [
        ("sample_rate", "/config/sampler/scheme/poisson/sample_rate", serde_json::json!(0.5), serde_json::json!(0.0)),
        ("dataset_size", "/config/sampler/dataset_size", serde_json::json!(20), serde_json::json!(0)),
    ] {
        // Edited and re-hashed, so that the sampler's own validation is what refuses it.
        let mut edited = original.clone();
        let slot = edited.pointer_mut(pointer).unwrap_or_else(|| panic!("the manifest has {pointer}"));
        assert_eq!(*slot, saved, "{pointer}");
        *slot = value;
        common::rehash_manifest(&mut edited);
        std::fs::write(&manifest, serde_json::to_string(&edited).unwrap()).unwrap();
        let m = VarMap::new();
        let _model = mlp_pair(&m, &[4, 2], DType::F32).unwrap();
        let vars = vars_by_name(&m);
        let err = DpOptimizer::<SGD>::resume(&dir, &m, vars, 0.1).unwrap_err().to_string();
        assert!(err.contains("invalid sampler") && err.contains(field), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
