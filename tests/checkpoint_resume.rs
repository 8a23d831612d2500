//! Checkpoints: resume is bit-identical (SGD and AdamW, Poisson and shuffled
//! samplers), the budget continues, tampering is caught.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_dp::optim::AdamW;
use candle_dp::{
    loss, DpOptimizer, DpOptimizerBuilder, Error, GaussianNoise, PoissonSampler, PrivacyBudget, Sampler,
    ShuffledSampler, StatefulOptimizer,
};
use candle_nn::{ParamsAdamW, VarMap, SGD};
use common::{mlp_pair, rehash_manifest as rehash, set_deterministic, take, tensor, vars_by_name};

type Model = common::Mlp<candle_dp::DpLinear>;

fn data() -> (Tensor, Tensor) {
    let x = tensor(&[60, 5], 3, 1.0, DType::F32).unwrap();
    let y = Tensor::from_vec((0..60u32).map(|i| i % 3).collect(), 60, &Device::Cpu).unwrap();
    (x, y)
}

/// Runs `steps` DP-SGD steps; returns each step's batch.
fn train<O: StatefulOptimizer>(model: &Model, opt: &mut DpOptimizer<O>, steps: usize) -> Vec<Vec<usize>> {
    let (x, y) = data();
    let mut batches = Vec::new();
    for _ in 0..steps {
        opt.train_step(|idx| {
            batches.push(idx.to_vec());
            loss::cross_entropy(&model.forward(&take(&x, idx))?, &take(&y, idx))
        })
        .unwrap();
    }
    batches
}

fn weights(varmap: &VarMap) -> Vec<f32> {
    vars_by_name(varmap).iter().flat_map(|v| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
}

/// A model with fixed weights (`seed`), its variables, and its DP layers (which must live).
fn model(seed: u64) -> (VarMap, Model) {
    let varmap = VarMap::new();
    let (dp, _) = mlp_pair(&varmap, &[5, 6, 3], DType::F32).unwrap();
    set_deterministic(&varmap, seed).unwrap();
    (varmap, dp)
}

fn builder<O: StatefulOptimizer>(varmap: &VarMap, sampler: impl Into<Sampler>) -> DpOptimizerBuilder<O> {
    DpOptimizer::<O>::builder(vars_by_name(varmap), sampler).noise_multiplier(1.3).noise(GaussianNoise::from_seed(13))
}

fn poisson() -> PoissonSampler {
    PoissonSampler::seeded(60, 0.2, 11).unwrap()
}

fn fresh(budget: Option<PrivacyBudget>) -> (VarMap, Model, DpOptimizer<SGD>) {
    let (varmap, dp) = model(7);
    let mut b = builder::<SGD>(&varmap, poisson());
    if let Some(budget) = budget {
        b = b.budget(budget);
    }
    let opt = b.build(0.2).unwrap();
    (varmap, dp, opt)
}

fn dir(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("candle-dp-ckpt-{}-{name}", std::process::id()))
}

/// Resumes `d` into a fresh model; returns the model and optimizer.
fn resume<O: StatefulOptimizer>(
    d: &std::path::Path,
    config: O::Config,
) -> candle_dp::Result<(VarMap, Model, DpOptimizer<O>)> {
    let (varmap, dp) = model(99);
    let vars = vars_by_name(&varmap);
    let opt = DpOptimizer::<O>::resume(d, &varmap, vars, config)?;
    Ok((varmap, dp, opt))
}

fn adam() -> ParamsAdamW {
    ParamsAdamW { lr: 0.01, weight_decay: 0.0, ..Default::default() }
}

/// N steps, a checkpoint, a resume in a new model and N more steps give the
/// weights, ledger and epsilon of 2N straight steps, bit for bit.
fn check_split_run<O: StatefulOptimizer>(
    what: &str,
    first: usize,
    sampler: impl Fn() -> Sampler,
    config: impl Fn() -> O::Config,
) {
    let (straight_map, straight_model) = model(7);
    let mut straight = builder::<O>(&straight_map, sampler()).build(config()).unwrap();
    let straight_batches = train(&straight_model, &mut straight, 30);

    let (map, first_model) = model(7);
    let mut opt = builder::<O>(&map, sampler()).build(config()).unwrap();
    let mut batches = train(&first_model, &mut opt, first);
    let d = dir(&format!("split-{what}"));
    opt.save_checkpoint(&d, &map).unwrap();
    drop((map, first_model, opt));

    let (map2, model2, mut opt2) = resume::<O>(&d, config()).unwrap();
    assert_eq!(opt2.steps(), first as u64, "{what}");
    batches.extend(train(&model2, &mut opt2, 30 - first));
    assert_eq!(batches, straight_batches, "{what}: the resumed run draws the same batches");
    assert_eq!(weights(&map2), weights(&straight_map), "{what}: resumed weights differ from the straight run");
    assert_eq!(opt2.ledger().unwrap().total_steps(), 30, "{what}");
    // Poisson steps compose the same in one ledger entry or two; shuffled
    // entries count their started epochs, and the split is at an epoch's end.
    assert_eq!(opt2.epsilon(1e-5).unwrap(), straight.epsilon(1e-5).unwrap(), "{what}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn n_steps_save_resume_n_steps_equals_2n_steps() {
    check_split_run::<SGD>("sgd-poisson", 15, || poisson().into(), || 0.2);
    check_split_run::<AdamW>("adamw-poisson", 15, || poisson().into(), adam);
    // Shuffled batches of 8 out of 60: 7 per epoch; the checkpoint after
    // two epochs resumes exactly.
    let shuffled = || ShuffledSampler::new(60, 8, Some(3)).unwrap().into();
    check_split_run::<SGD>("sgd-shuffled", 14, shuffled, || 0.2);
    check_split_run::<AdamW>("adamw-shuffled", 14, shuffled, adam);
}

/// A shuffled run resumed mid-epoch starts a new epoch (nothing the
/// checkpoint stores decides how often an example is used), and its ledger
/// accounts both the partial epoch before and the new one: the accounted
/// epochs cover every use of every example.
#[test]
fn a_shuffled_run_resumed_mid_epoch_starts_a_new_accounted_epoch() {
    let (map, dp) = model(7);
    let mut opt = builder::<SGD>(&map, ShuffledSampler::new(60, 8, None).unwrap()).build(0.2).unwrap();
    let before = train(&dp, &mut opt, 3);
    let d = dir("shuffled-os");
    opt.save_checkpoint(&d, &map).unwrap();
    let (manifest, _) = manifest_file(&d, "weights");
    assert_eq!(manifest["sampler"], serde_json::json!({"shuffled": {"rng": null}}), "no generator state, no order");
    drop((map, dp, opt));
    let (_map2, model2, mut opt2) = resume::<SGD>(&d, 0.2).unwrap();
    let after = train(&model2, &mut opt2, 7);
    let mut epoch: Vec<usize> = after.concat();
    epoch.sort_unstable();
    epoch.dedup();
    assert_eq!(epoch.len(), 56, "the 7 batches after the resume are one whole new epoch");
    let uses = |i: usize| before.iter().chain(&after).filter(|b| b.contains(&i)).count();
    assert!((0..60).all(|i| uses(i) <= 2), "at most once per accounted epoch");
    let two_epochs = candle_dp::accountant::AccountantKind::Rdp
        .epsilon(
            candle_dp::accountant::Adjacency::ReplaceOne,
            [&candle_dp::accountant::DpEvent::shuffled_fixed_size_batches(1.3, 7, 14)],
            1e-5,
        )
        .unwrap();
    assert_eq!(opt2.epsilon(1e-5).unwrap(), two_epochs, "3 + 7 steps are accounted as two epochs");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn resume_keeps_spent_budget() {
    let budget = PrivacyBudget { epsilon: 4.0, delta: 1e-5 };
    let (map, model, mut opt) = fresh(Some(budget));
    let max = opt.max_steps().unwrap();
    assert!(max > 10);
    train(&model, &mut opt, 10);
    let spent = opt.epsilon(1e-5).unwrap();
    let d = dir("budget");
    opt.save_checkpoint(&d, &map).unwrap();

    let (_map2, model2, mut opt2) = resume::<SGD>(&d, 0.2).unwrap();
    assert_eq!(opt2.epsilon(1e-5).unwrap(), spent, "the spent epsilon carries over");
    assert_eq!(opt2.max_steps(), Some(max));
    train(&model2, &mut opt2, (max - 10) as usize);
    assert!(
        matches!(opt2.next_batch(), Err(Error::BudgetExhausted { .. })),
        "the budget counts steps before the resume"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

/// The manifest as JSON, and the path of the file it names under `files.<which>`.
fn manifest_file(d: &std::path::Path, which: &str) -> (serde_json::Value, std::path::PathBuf) {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("checkpoint.json")).unwrap()).unwrap();
    let name = manifest["files"][which]["name"].as_str().unwrap().to_string();
    (manifest, d.join(name))
}

/// Replaces a file and re-seals the manifest over it, as a forger who also
/// recomputes the hashes would.
fn forge(d: &std::path::Path, which: &str, bytes: &[u8]) {
    use sha2::Digest;
    let (mut manifest, path) = manifest_file(d, which);
    std::fs::write(&path, bytes).unwrap();
    manifest["files"][which]["sha256"] = dp_accountant::ledger::hex(&sha2::Sha256::digest(bytes)).into();
    rehash(&mut manifest);
    std::fs::write(d.join("checkpoint.json"), serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
}

#[test]
fn tampered_checkpoint_is_detected() {
    let (map, model, mut opt) = fresh(None);
    train(&model, &mut opt, 5);
    let d = dir("tamper");
    opt.save_checkpoint(&d, &map).unwrap();
    let original_manifest = std::fs::read(d.join("checkpoint.json")).unwrap();
    let resumes = || resume::<SGD>(&d, 0.2).map(|_| ()).map_err(|e| e.to_string());
    resumes().unwrap();

    // Each file, one byte altered: its SHA-256 no longer matches the manifest.
    for which in ["weights", "ledger"] {
        let (_, path) = manifest_file(&d, which);
        let original = std::fs::read(&path).unwrap();
        let mut bytes = original.clone();
        let last = bytes.len() - 2;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = resumes().unwrap_err();
        assert!(err.contains("the file was altered"), "{which}: {err}");
        std::fs::write(&path, &original).unwrap();
    }

    // An edited ledger entry (fewer steps recorded), hashes recomputed in
    // the manifest: the ledger's own hash chain breaks.
    let (_, ledger_path) = manifest_file(&d, "ledger");
    let text = std::fs::read_to_string(&ledger_path).unwrap();
    assert!(text.contains("\"count\": 5"));
    forge(&d, "ledger", text.replacen("\"count\": 5", "\"count\": 1", 1).as_bytes());
    let err = resumes().unwrap_err();
    assert!(err.contains("ledger entry 0"), "{err}");
    // A consistently rewritten but different ledger fails the manifest's head.
    std::fs::write(d.join("checkpoint.json"), &original_manifest).unwrap();
    let mut other = dp_accountant::Ledger::new(Default::default());
    other.append(opt.ledger().unwrap().mechanisms().next().unwrap().clone()).unwrap();
    forge(&d, "ledger", other.to_json().as_bytes());
    let err = resumes().unwrap_err();
    assert!(err.contains("anchored head"), "{err}");
    // A file name that leaves the folder is refused before anything is read.
    std::fs::write(d.join("checkpoint.json"), &original_manifest).unwrap();
    let mut manifest: serde_json::Value = serde_json::from_slice(&original_manifest).unwrap();
    manifest["files"]["weights"]["name"] = "../../etc/passwd".into();
    rehash(&mut manifest);
    std::fs::write(d.join("checkpoint.json"), serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
    assert!(resumes().unwrap_err().contains("not a plain file name"));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn every_privacy_setting_of_the_manifest_is_covered() {
    let (map, model, mut opt) = fresh(Some(PrivacyBudget { epsilon: 8.0, delta: 1e-5 }));
    train(&model, &mut opt, 5);
    let d = dir("manifest");
    opt.save_checkpoint(&d, &map).unwrap();
    let path = d.join("checkpoint.json");
    let original: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let resumes = || resume::<SGD>(&d, 0.2).map(|_| ()).map_err(|e| e.to_string());
    resumes().unwrap();
    let edits: Vec<(&str, serde_json::Value)> = vec![
        ("/config/max_grad_norm", 10.0.into()),
        ("/config/noise_multiplier", 0.1.into()),
        ("/config/sampler/scheme/poisson/sample_rate", 0.9.into()),
        ("/config/sampler/dataset_size", 100_000.into()),
        ("/config/sampler/seeding", "os_entropy".into()),
        ("/config/budget/epsilon", 100.0.into()),
        ("/config/accountant", "pld".into()),
        ("/steps", 4.into()),
        ("/noise/seeding", "os_entropy".into()),
    ];
    for (field, value) in edits {
        let mut edited = original.clone();
        *edited.pointer_mut(field).unwrap_or_else(|| panic!("{field} is in the manifest")) = value;
        // Edited alone: the manifest's own hash no longer matches.
        std::fs::write(&path, serde_json::to_string_pretty(&edited).unwrap()).unwrap();
        let err = resumes().unwrap_err();
        assert!(err.contains("manifest_sha256 does not match"), "{field}: {err}");
        // Edited and re-hashed: the ledger, which the head anchors, or the
        // saved state disagrees (the accountant alone changes no privacy
        // record, so its edit is checked against the budget it enforces).
        rehash(&mut edited);
        std::fs::write(&path, serde_json::to_string_pretty(&edited).unwrap()).unwrap();
        match resumes() {
            Err(err) => assert!(err.contains("checkpoint") && !err.contains("manifest_sha256"), "{field}: {err}"),
            Ok(()) => assert_eq!(field, "/config/accountant", "{field} re-hashed was accepted"),
        }
    }
    // Noise, sampler and optimizer state: covered by the manifest's hash.
    let state_edits: [(&str, serde_json::Value); 3] = [
        ("/noise/rng/word_pos", "0".into()),
        ("/sampler/poisson/counter/step", 0.into()),
        ("/learning_rate", 0.5.into()),
    ];
    for (field, value) in state_edits {
        let mut edited = original.clone();
        *edited.pointer_mut(field).unwrap() = value;
        std::fs::write(&path, serde_json::to_string_pretty(&edited).unwrap()).unwrap();
        assert!(resumes().unwrap_err().contains("manifest_sha256 does not match"), "{field}");
    }
    // An unknown field is refused, and so is a version-3 manifest (whose
    // Poisson sampler state was a sequential generator's).
    let mut edited = original.clone();
    edited["clip_everything"] = true.into();
    rehash(&mut edited);
    std::fs::write(&path, serde_json::to_string_pretty(&edited).unwrap()).unwrap();
    assert!(resumes().unwrap_err().contains("unknown field"));
    let mut edited = original.clone();
    edited["version"] = 3.into();
    std::fs::write(&path, serde_json::to_string_pretty(&edited).unwrap()).unwrap();
    let err = resumes().unwrap_err();
    assert!(err.contains("version 3: expected \"candle-dp-checkpoint\" version 4"), "{err}");
    std::fs::write(&path, serde_json::to_string_pretty(&original).unwrap()).unwrap();
    resumes().unwrap();
    std::fs::remove_dir_all(&d).unwrap();
}

/// Checkpoints of other configurations resume too (no false "edited"):
/// per-layer clipping, the PLD accountant, an OS-seeded Poisson run, AdamW,
/// several ledger flushes; and a refused checkpoint leaves the caller's
/// weights as they were.
#[test]
fn other_configurations_resume_and_a_refused_one_changes_nothing() {
    use candle_dp::accountant::AccountantKind;
    use candle_dp::ClipMode;
    let (map, dp) = model(7);
    let mut opt = builder::<AdamW>(&map, PoissonSampler::new(60, 0.2).unwrap())
        .clipping(ClipMode::per_layer_uniform(1.0, 2))
        .accountant(AccountantKind::Pld)
        .budget(PrivacyBudget { epsilon: 50.0, delta: 1e-5 })
        .build(adam())
        .unwrap();
    for _ in 0..3 {
        train(&dp, &mut opt, 2);
        opt.flush_ledger().unwrap(); // several ledger entries
    }
    let d = dir("config");
    opt.save_checkpoint(&d, &map).unwrap();
    let (resumed_map, _m, resumed) = resume::<AdamW>(&d, adam()).unwrap();
    assert_eq!(resumed.steps(), 6);
    assert_eq!(resumed.epsilon(1e-5).unwrap(), opt.epsilon(1e-5).unwrap());
    assert_eq!(resumed.config(), opt.config());
    assert_eq!(weights(&resumed_map), weights(&map));
    drop((resumed_map, _m, resumed));

    // Refused (a ledger edited and its hashes recomputed): the caller's
    // variables are untouched.
    let (_, ledger_path) = manifest_file(&d, "ledger");
    let text = std::fs::read_to_string(&ledger_path).unwrap();
    assert!(text.contains("\"clipping_norm\": 1.0"));
    forge(&d, "ledger", text.replacen("\"clipping_norm\": 1.0", "\"clipping_norm\": 2.0", 1).as_bytes());
    let (m2, _model2) = model(99);
    let untouched = weights(&m2);
    assert!(DpOptimizer::<AdamW>::resume(&d, &m2, vars_by_name(&m2), adam()).is_err());
    assert_eq!(weights(&m2), untouched, "a refused checkpoint loads nothing");
    assert_ne!(weights(&map), untouched);
    std::fs::remove_dir_all(&d).unwrap();
}

/// A checkpoint holds whole steps only: saving with a batch drawn and not
/// stepped on is refused, and writes nothing.
#[test]
fn a_checkpoint_is_refused_while_a_batch_is_open() {
    let (map, _model, mut opt) = fresh(None);
    opt.next_batch().unwrap();
    let d = dir("open");
    assert!(matches!(opt.save_checkpoint(&d, &map), Err(Error::OutOfOrder { call: "save_checkpoint", .. })));
    assert!(!d.exists());
}

/// An inner optimizer whose state names a tensor `master.0`, the prefix
/// the checkpoint keeps for mixed precision's master weights.
#[derive(Debug)]
struct ClaimsMasterNames(SGD);

impl candle_nn::Optimizer for ClaimsMasterNames {
    type Config = f64;

    fn new(vars: Vec<candle_core::Var>, lr: f64) -> candle_core::Result<Self> {
        SGD::new(vars, lr).map(Self)
    }

    fn step(&mut self, grads: &candle_core::backprop::GradStore) -> candle_core::Result<()> {
        self.0.step(grads)
    }

    fn learning_rate(&self) -> f64 {
        self.0.learning_rate()
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.0.set_learning_rate(lr)
    }
}

impl StatefulOptimizer for ClaimsMasterNames {
    fn save_state(&self) -> candle_dp::Result<candle_dp::OptimizerState> {
        let mut state = candle_dp::OptimizerState::default();
        state.tensors.insert("master.0".into(), Tensor::zeros(6, DType::F32, &Device::Cpu)?);
        Ok(state)
    }

    fn load_state(&mut self, _: &candle_dp::OptimizerState) -> candle_dp::Result<()> {
        Ok(())
    }
}

/// Names the checkpoint reserves for the master weights are refused in an
/// inner optimizer's state (they would be taken for, or overwritten by,
/// masters), before anything is written.
#[test]
fn an_inner_state_using_the_master_prefix_is_refused() {
    let (map, _model) = model(7);
    let mut opt = builder::<ClaimsMasterNames>(&map, poisson()).build(0.2).unwrap();
    let d = dir("master-names");
    let err = opt.save_checkpoint(&d, &map).unwrap_err();
    assert!(matches!(&err, Error::OptimizerState { reason } if reason.contains("\"master.0\"")), "{err}");
    assert!(!d.exists());
}

/// Seeded, bounded fuzz of the manifest a user resumes from: 600 mutations
/// (byte flips, deletions, duplicated spans, digit changes, truncation)
/// never panic, and a mutated manifest is accepted only if it still means
/// the same JSON (whitespace changes).
#[test]
fn mutated_manifests_are_refused_without_panicking() {
    let (map, model, mut opt) = fresh(Some(PrivacyBudget { epsilon: 8.0, delta: 1e-5 }));
    train(&model, &mut opt, 3);
    let d = dir("fuzz");
    opt.save_checkpoint(&d, &map).unwrap();
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
        let outcome = std::panic::catch_unwind(|| resume::<SGD>(&d, 0.2).map(|_| ()));
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
    std::fs::remove_dir_all(&d).unwrap();
}

/// Shuffled batches are accounted in epochs counted from the run's first
/// step: a sampler handed to the builder mid-epoch (it could show an
/// example twice in one accounted epoch) is refused, and one that drew
/// whole epochs is accepted.
#[test]
fn a_shuffled_sampler_must_start_at_an_epoch_boundary() {
    let (map, _dp) = model(7);
    let mut s = ShuffledSampler::new(60, 8, Some(1)).unwrap();
    s.sample();
    let err = builder::<SGD>(&map, s.clone()).build(0.2).unwrap_err();
    assert!(
        matches!(err, Error::Incompatible { setting: "a shuffled sampler in the middle of an epoch", .. }),
        "{err}"
    );
    for _ in 0..6 {
        s.sample(); // the rest of the epoch: 7 batches of 8 out of 60
    }
    assert_eq!(s.batches_into_epoch(), 0);
    builder::<SGD>(&map, s).build(0.2).unwrap();
}
