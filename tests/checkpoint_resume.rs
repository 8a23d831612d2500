//! Checkpoints: resume is bit-identical, the budget continues, tampering is caught.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_dp::{loss, DpOptimizer, Error, GaussianNoise, PoissonSampler, PrivacyBudget};
use candle_nn::{VarMap, SGD};
use common::{mlp_pair, rehash_manifest as rehash, set_deterministic, take, tensor, vars_by_name};

fn data() -> (Tensor, Tensor) {
    let x = tensor(&[60, 5], 3, 1.0, DType::F32).unwrap();
    let y = Tensor::from_vec((0..60u32).map(|i| i % 3).collect(), 60, &Device::Cpu).unwrap();
    (x, y)
}

/// Runs `steps` DP-SGD steps.
fn train(model: &impl Module, opt: &mut DpOptimizer<SGD>, sampler: &mut PoissonSampler, steps: usize) {
    let (x, y) = data();
    for _ in 0..steps {
        let idx = sampler.sample();
        if idx.is_empty() {
            opt.accumulate_empty();
        } else {
            opt.accumulate(&loss::cross_entropy(&model.forward(&take(&x, &idx)).unwrap(), &take(&y, &idx)).unwrap())
                .unwrap();
        }
        opt.step().unwrap();
    }
}

fn weights(varmap: &VarMap) -> Vec<f32> {
    vars_by_name(varmap).iter().flat_map(|v| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
}

fn fresh(
    budget: Option<PrivacyBudget>,
) -> (VarMap, common::Mlp<candle_dp::DpLinear>, DpOptimizer<SGD>, PoissonSampler) {
    let varmap = VarMap::new();
    let (dp, _) = mlp_pair(&varmap, &[5, 6, 3], DType::F32).unwrap();
    set_deterministic(&varmap, 7).unwrap();
    let sampler = PoissonSampler::seeded(60, 0.2, 11).unwrap();
    let mut b = DpOptimizer::<SGD>::builder(vars_by_name(&varmap), sampler.description())
        .noise_multiplier(1.3)
        .noise(GaussianNoise::from_seed(13));
    if let Some(budget) = budget {
        b = b.budget(budget);
    }
    let opt = b.build(0.2).unwrap();
    (varmap, dp, opt, sampler)
}

fn dir(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("candle-dp-ckpt-{}-{name}", std::process::id()))
}

#[test]
fn n_steps_save_resume_n_steps_equals_2n_steps() {
    let (straight_map, straight_model, mut straight_opt, mut straight_sampler) = fresh(None);
    train(&straight_model, &mut straight_opt, &mut straight_sampler, 30);

    let (map, model, mut opt, mut sampler) = fresh(None);
    train(&model, &mut opt, &mut sampler, 15);
    let d = dir("resume");
    opt.save_checkpoint(&d, &map, Some(&sampler)).unwrap();
    drop((map, model, opt, sampler));

    let mut map2 = VarMap::new();
    let (model2, _) = mlp_pair(&map2, &[5, 6, 3], DType::F32).unwrap();
    let vars2 = vars_by_name(&map2);
    let (mut opt2, sampler2) = DpOptimizer::<SGD>::resume(&d, &mut map2, vars2, 0.2).unwrap();
    let mut sampler2 = sampler2.unwrap();
    assert_eq!(opt2.steps(), 15);
    train(&model2, &mut opt2, &mut sampler2, 15);

    assert_eq!(weights(&map2), weights(&straight_map), "resumed weights differ from the straight run");
    assert_eq!(opt2.ledger().unwrap().total_steps(), 30);
    assert_eq!(opt2.epsilon(1e-5).unwrap(), straight_opt.epsilon(1e-5).unwrap());
}

#[test]
fn resume_keeps_spent_budget() {
    let budget = PrivacyBudget { epsilon: 4.0, delta: 1e-5 };
    let (map, model, mut opt, mut sampler) = fresh(Some(budget));
    let max = opt.max_steps().unwrap();
    assert!(max > 10);
    train(&model, &mut opt, &mut sampler, 10);
    let spent = opt.epsilon(1e-5).unwrap();
    let d = dir("budget");
    opt.save_checkpoint(&d, &map, Some(&sampler)).unwrap();

    let mut map2 = VarMap::new();
    let (model2, _) = mlp_pair(&map2, &[5, 6, 3], DType::F32).unwrap();
    let vars2 = vars_by_name(&map2);
    let (mut opt2, sampler2) = DpOptimizer::<SGD>::resume(&d, &mut map2, vars2, 0.2).unwrap();
    assert_eq!(opt2.epsilon(1e-5).unwrap(), spent, "the spent epsilon carries over");
    assert_eq!(opt2.max_steps(), Some(max));
    let mut sampler2 = sampler2.unwrap();
    train(&model2, &mut opt2, &mut sampler2, (max - 10) as usize);
    opt2.accumulate_empty();
    assert!(matches!(opt2.step(), Err(Error::BudgetExhausted { .. })), "the budget counts steps before the resume");
}

#[test]
fn tampered_checkpoint_is_detected() {
    let (map, model, mut opt, mut sampler) = fresh(None);
    train(&model, &mut opt, &mut sampler, 5);
    let d = dir("tamper");
    opt.save_checkpoint(&d, &map, Some(&sampler)).unwrap();
    let resume = || {
        let mut m = VarMap::new();
        let _model = mlp_pair(&m, &[5, 6, 3], DType::F32).unwrap(); // its DP layers must live
        let vars = vars_by_name(&m);
        DpOptimizer::<SGD>::resume(&d, &mut m, vars, 0.2).map(|_| ())
    };
    resume().unwrap();

    // Altered weights: one byte of the safetensors file.
    let w = d.join("model.safetensors");
    let original = std::fs::read(&w).unwrap();
    let mut bytes = original.clone();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&w, &bytes).unwrap();
    let err = resume().unwrap_err().to_string();
    assert!(err.contains("weights were altered"), "{err}");
    std::fs::write(&w, &original).unwrap();

    // An edited ledger entry (fewer steps recorded) breaks its hash chain.
    let l = d.join("ledger.json");
    let text = std::fs::read_to_string(&l).unwrap();
    std::fs::write(&l, text.replacen("\"count\": 5", "\"count\": 1", 1)).unwrap();
    let err = resume().unwrap_err().to_string();
    assert!(err.contains("ledger entry 0"), "{err}");
    // A consistently rewritten but different ledger fails the manifest's head.
    let mut other = dp_accountant::Ledger::new(Default::default());
    other.append(opt.ledger().unwrap().mechanisms().next().unwrap().clone()).unwrap();
    other.write(&l).unwrap();
    let err = resume().unwrap_err().to_string();
    assert!(err.contains("anchored head"), "{err}");
}

#[test]
fn every_privacy_setting_of_the_manifest_is_covered() {
    let (map, model, mut opt, mut sampler) = fresh(Some(PrivacyBudget { epsilon: 8.0, delta: 1e-5 }));
    train(&model, &mut opt, &mut sampler, 5);
    let d = dir("manifest");
    opt.save_checkpoint(&d, &map, Some(&sampler)).unwrap();
    let path = d.join("checkpoint.json");
    let original: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let resume = || {
        let mut m = VarMap::new();
        let _model = mlp_pair(&m, &[5, 6, 3], DType::F32).unwrap();
        let vars = vars_by_name(&m);
        DpOptimizer::<SGD>::resume(&d, &mut m, vars, 0.2).map(|_| ()).map_err(|e| e.to_string())
    };
    resume().unwrap();
    let edits: Vec<(&str, serde_json::Value)> = vec![
        ("max_grad_norm", 10.0.into()),
        ("noise_multiplier", 0.1.into()),
        ("sample_rate", 0.9.into()),
        ("dataset_size", 100_000.into()),
        ("budget", serde_json::json!([100.0, 1e-5])),
        ("steps", 4.into()),
        ("noise_seeding", "os_entropy".into()),
        ("sampler_seeding", "os_entropy".into()),
    ];
    for (field, value) in edits {
        let mut edited = original.clone();
        assert!(edited.get(field).is_some(), "{field} is in the manifest");
        edited[field] = value;
        // Edited alone: the manifest's own hash no longer matches.
        std::fs::write(&path, serde_json::to_string_pretty(&edited).unwrap()).unwrap();
        let err = resume().unwrap_err();
        assert!(err.contains("manifest_sha256 does not match"), "{field}: {err}");
        // Edited and re-hashed: the ledger, which the head anchors, disagrees.
        rehash(&mut edited);
        std::fs::write(&path, serde_json::to_string_pretty(&edited).unwrap()).unwrap();
        let err = resume().expect_err(field);
        assert!(err.contains("checkpoint") && !err.contains("manifest_sha256"), "{field} re-hashed: {err}");
    }
    // Noise and sampler state: covered by the manifest's hash.
    for field in ["noise_state", "sampler_state"] {
        let mut edited = original.clone();
        edited[field]["word_pos"] = "0".into();
        std::fs::write(&path, serde_json::to_string_pretty(&edited).unwrap()).unwrap();
        assert!(resume().unwrap_err().contains("manifest_sha256 does not match"), "{field}");
    }
    // An unknown field is refused, and so is a version-1 manifest.
    let mut edited = original.clone();
    edited["clip_everything"] = true.into();
    rehash(&mut edited);
    std::fs::write(&path, serde_json::to_string_pretty(&edited).unwrap()).unwrap();
    assert!(resume().unwrap_err().contains("unknown field"));
    let mut edited = original.clone();
    edited["version"] = 1.into();
    std::fs::write(&path, serde_json::to_string_pretty(&edited).unwrap()).unwrap();
    assert!(resume().unwrap_err().contains("version 1: expected"));
    std::fs::write(&path, serde_json::to_string_pretty(&original).unwrap()).unwrap();
    resume().unwrap();
}

/// Checkpoints of other configurations resume too (no false "edited"): a
/// fixed-seed shuffled sampler (whose state is not saved), per-layer
/// clipping, the PLD accountant, an OS-seeded Poisson run, several ledger
/// flushes; and a refused checkpoint leaves the caller's weights as they were.
#[test]
fn other_configurations_resume_and_a_refused_one_changes_nothing() {
    use candle_dp::accountant::AccountantKind;
    use candle_dp::{ClipMode, ShuffledSampler};
    type Make = Box<dyn Fn(&VarMap) -> (DpOptimizer<SGD>, Option<PoissonSampler>)>;
    let cases: Vec<(&str, Make)> = vec![
        (
            "shuffled, fixed seed",
            Box::new(|m: &VarMap| {
                let s = ShuffledSampler::new(60, 10, Some(3)).unwrap();
                let o = DpOptimizer::<SGD>::builder(vars_by_name(m), s.description())
                    .noise_multiplier(1.3)
                    .noise(GaussianNoise::from_seed(1))
                    .build(0.2)
                    .unwrap();
                (o, None)
            }),
        ),
        (
            "per-layer, PLD, OS-seeded sampler",
            Box::new(|m: &VarMap| {
                let s = PoissonSampler::new(60, 0.2).unwrap();
                let o = DpOptimizer::<SGD>::builder(vars_by_name(m), s.description())
                    .noise_multiplier(1.3)
                    .clipping(ClipMode::per_layer_uniform(1.0, 2))
                    .accountant(AccountantKind::Pld)
                    .budget(PrivacyBudget { epsilon: 50.0, delta: 1e-5 })
                    .noise(GaussianNoise::from_seed(1))
                    .build(0.2)
                    .unwrap();
                (o, Some(s))
            }),
        ),
    ];
    for (what, make) in cases {
        let map = VarMap::new();
        let (model, _) = mlp_pair(&map, &[5, 6, 3], DType::F32).unwrap();
        set_deterministic(&map, 7).unwrap();
        let (mut opt, sampler) = make(&map);
        let (x, y) = data();
        for k in 0..6 {
            opt.accumulate(&loss::cross_entropy(&model.forward(&x).unwrap(), &y).unwrap()).unwrap();
            opt.step().unwrap();
            if k % 2 == 1 {
                opt.flush_ledger().unwrap(); // several ledger entries
            }
        }
        let d = dir(&format!("config-{}", what.len()));
        opt.save_checkpoint(&d, &map, sampler.as_ref()).unwrap();
        let mut m = VarMap::new();
        let _model = mlp_pair(&m, &[5, 6, 3], DType::F32).unwrap();
        let vars = vars_by_name(&m);
        let before = weights(&m);
        let (resumed, _) = DpOptimizer::<SGD>::resume(&d, &mut m, vars.clone(), 0.2).unwrap();
        assert_eq!(resumed.steps(), 6, "{what}");
        assert_eq!(resumed.epsilon(1e-5).unwrap(), opt.epsilon(1e-5).unwrap(), "{what}");
        drop(resumed);

        // Refused (its ledger edited): the caller's variables are untouched.
        let mut m2 = VarMap::new();
        let _model2 = mlp_pair(&m2, &[5, 6, 3], DType::F32).unwrap();
        set_deterministic(&m2, 99).unwrap();
        let untouched = weights(&m2);
        let l = d.join("ledger.json");
        let text = std::fs::read_to_string(&l).unwrap();
        assert!(text.contains("\"clipping_norm\": 1.0"), "{what}");
        std::fs::write(&l, text.replacen("\"clipping_norm\": 1.0", "\"clipping_norm\": 2.0", 1)).unwrap();
        let vars2 = vars_by_name(&m2);
        assert!(DpOptimizer::<SGD>::resume(&d, &mut m2, vars2, 0.2).is_err(), "{what}");
        assert_eq!(weights(&m2), untouched, "{what}: a refused checkpoint loads nothing");
        assert_ne!(before, untouched);
    }
    // A fixed-seed Poisson run must be saved with its sampler.
    let (map, _model, mut opt, _sampler) = fresh(None);
    opt.accumulate_empty();
    opt.step().unwrap();
    let err = opt.save_checkpoint(dir("nosampler"), &map, None).unwrap_err().to_string();
    assert!(err.contains("pass the sampler"), "{err}");
}

/// Seeded, bounded fuzz of the manifest a user resumes from: 600 mutations
/// (byte flips, deletions, duplicated spans, digit changes, truncation)
/// never panic, and a mutated manifest is accepted only if it still means
/// the same JSON (whitespace changes).
#[test]
fn mutated_manifests_are_refused_without_panicking() {
    let (map, model, mut opt, mut sampler) = fresh(Some(PrivacyBudget { epsilon: 8.0, delta: 1e-5 }));
    train(&model, &mut opt, &mut sampler, 3);
    let d = dir("fuzz");
    opt.save_checkpoint(&d, &map, Some(&sampler)).unwrap();
    let path = d.join("checkpoint.json");
    let original = std::fs::read(&path).unwrap();
    let meaning: serde_json::Value = serde_json::from_slice(&original).unwrap();
    let mut state = 0x5eed_u64;
    let mut next = move |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n.max(1) as u64) as usize
    };
    let (mut refused, mut accepted) = (0, 0);
    for _ in 0..600 {
        let mut m = original.clone();
        let at = next(m.len());
        match next(5) {
            0 => m[at] ^= 1 << next(8),
            1 => {
                m.remove(at);
            }
            2 => {
                let span: Vec<u8> = m[at..(at + 1 + next(20)).min(m.len())].to_vec();
                m.splice(at..at, span);
            }
            3 => {
                if let Some(k) = m.iter().skip(at).position(u8::is_ascii_digit) {
                    m[at + k] = b'0' + next(10) as u8;
                }
            }
            _ => m.truncate(at),
        }
        std::fs::write(&path, &m).unwrap();
        let outcome = std::panic::catch_unwind(|| {
            let mut vm = VarMap::new();
            let _model = mlp_pair(&vm, &[5, 6, 3], DType::F32).unwrap();
            let vars = vars_by_name(&vm);
            DpOptimizer::<SGD>::resume(&d, &mut vm, vars, 0.2).map(|_| ())
        });
        match outcome.unwrap_or_else(|_| panic!("resume panicked on:\n{}", String::from_utf8_lossy(&m))) {
            Err(_) => refused += 1,
            Ok(()) => {
                let now: serde_json::Value = serde_json::from_slice(&m).unwrap();
                assert_eq!(now, meaning, "a changed manifest was accepted:\n{}", String::from_utf8_lossy(&m));
                accepted += 1;
            }
        }
    }
    assert!(refused > 500, "{refused} refused, {accepted} accepted");
}
