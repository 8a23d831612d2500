//! The canary audit's plumbing: canaries take sampler slots after the
//! dataset (counted in the ledger's dataset size) and never reach the
//! model, leave the model's gradients as they were (only the division by
//! the expected batch size sees them), and end in the ledger as an audit
//! record before the model release; bad settings are refused by name.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_dp::audit::{Canaries, PlantedBug};
use candle_dp::{loss, DpOptimizer, Error, GaussianNoise, PoissonSampler, PrivacyBudget, ShuffledSampler};
use candle_nn::{VarBuilder, VarMap, SGD};
use common::{set_deterministic, take, tensor, vars_by_name};

const N: usize = 40;
const M: usize = 24;

struct Model {
    varmap: VarMap,
    fc: candle_dp::DpLinear,
    x: Tensor,
    y: Tensor,
}

fn model() -> Model {
    let varmap = VarMap::new();
    let fc = candle_dp::linear(3, 2, VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu).pp("fc")).unwrap();
    set_deterministic(&varmap, 1).unwrap();
    let (x, y) = (tensor(&[N, 3], 2, 1.0, DType::F64).unwrap(), tensor(&[N, 2], 3, 1.0, DType::F64).unwrap());
    Model { varmap, fc, x, y }
}

fn builder(m: &Model, q: f64) -> candle_dp::DpOptimizerBuilder<SGD> {
    DpOptimizer::<SGD>::builder(vars_by_name(&m.varmap), PoissonSampler::seeded(N, q, 4).unwrap())
        .noise_multiplier(1.5)
        .budget(PrivacyBudget { epsilon: 100.0, delta: 1e-5 })
        .noise(GaussianNoise::from_seed(5))
}

fn step(opt: &mut DpOptimizer<SGD>, m: &Model) {
    opt.train_step(|idx| {
        assert!(idx.iter().all(|&i| i < N), "a canary slot reached the model: {idx:?}");
        loss::mse(&m.fc.forward(&take(&m.x, idx))?, &take(&m.y, idx))
    })
    .unwrap();
}

fn weights(m: &Model) -> Vec<f64> {
    vars_by_name(&m.varmap)
        .iter()
        .flat_map(|v| v.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap())
        .collect()
}

#[test]
fn canaries_take_slots_after_the_dataset_and_are_recorded() {
    let m = model();
    let mut opt = builder(&m, 0.5).audit(Canaries::new(M).seeded(6)).build(0.1).unwrap();
    assert_eq!(opt.config().sampler().dataset_size(), N + M);
    assert_eq!(opt.ledger().unwrap().header().dataset_size, Some((N + M) as u64));
    for _ in 0..30 {
        step(&mut opt, &m);
    }
    let audit = opt.audit().unwrap().unwrap();
    assert_eq!(audit.canaries, M);
    assert!(opt.ledger().unwrap().audits().next().is_none(), "audit() records nothing");

    let dir = std::env::temp_dir().join(format!("candle-dp-canaries-{}", std::process::id()));
    let release = opt.release(&dir, &m.varmap, None).unwrap();
    let kinds: Vec<(bool, bool)> =
        release.ledger.entries().iter().map(|e| (e.record.audit().is_some(), e.record.release().is_some())).collect();
    // ..., the audit, then the model it audits.
    assert_eq!(&kinds[kinds.len() - 2..], &[(true, false), (false, true)]);
    let record = release.ledger.audits().next().unwrap();
    assert_eq!((record.canaries, record.after_steps, record.epsilon_lower_bound), (M as u64, 30, audit.epsilon));
    assert_eq!(record.inclusion_seed, candle_dp::accountant::Seeding::Fixed);
    // The ledger written is the optimizer's.
    assert_eq!(candle_dp::accountant::Ledger::read(dir.join("ledger.json")).unwrap(), opt.ledger().unwrap());
    std::fs::remove_dir_all(&dir).unwrap();

    // Without canaries there is nothing to audit.
    let plain = builder(&model(), 0.5).build(0.1).unwrap();
    assert!(plain.audit().unwrap().is_none());
}

#[test]
fn canaries_leave_the_model_gradients_alone() {
    // The same sampler seed: counter-based sampling gives the real examples
    // the same batches with and without the canary slots after them. The
    // same noise seed: the model's noise keys come first, so both runs add
    // the same noise. So the audited update is the unaudited one times
    // N / (N + M), the ratio of the expected batch sizes.
    let (a, b) = (model(), model());
    let start = weights(&a);
    let mut audited = builder(&a, 0.5).audit(Canaries::new(M).seeded(7)).build(1.0).unwrap();
    let mut plain = builder(&b, 0.5).build(1.0).unwrap();
    let drawn = audited.next_batch().unwrap();
    assert_eq!(drawn, plain.next_batch().unwrap());
    assert!(!drawn.is_empty());
    audited.cancel_batch();
    plain.cancel_batch();
    step(&mut audited, &a);
    step(&mut plain, &b);
    for ((w0, wa), wb) in start.iter().zip(weights(&a)).zip(weights(&b)) {
        let (da, db) = (wa - w0, wb - w0);
        let want = db * N as f64 / (N + M) as f64;
        assert!((da - want).abs() <= 1e-12 * want.abs().max(1e-3), "{da} vs {want}");
    }
}

#[test]
fn bad_audit_settings_are_refused_by_name() {
    let m = model();
    let refused = |b: candle_dp::DpOptimizerBuilder<SGD>| b.build(0.1).unwrap_err();
    let e = refused(builder(&m, 0.5).audit(Canaries::new(M).alpha(1.5)));
    assert!(matches!(e, Error::InvalidConfig { field: "audit alpha", .. }), "{e}");
    let e = refused(builder(&m, 0.5).audit(Canaries::new(0)));
    assert!(matches!(e, Error::InvalidConfig { field: "audit canaries", .. }), "{e}");
    // No budget and no delta: the audit has no delta to state epsilon-hat at.
    let no_budget = DpOptimizer::<SGD>::builder(vars_by_name(&m.varmap), PoissonSampler::seeded(N, 0.5, 4).unwrap())
        .noise_multiplier(1.0)
        .audit(Canaries::new(M));
    assert!(matches!(refused(no_budget), Error::MissingSetting { .. }));
    let shuffled = DpOptimizer::<SGD>::builder(vars_by_name(&m.varmap), ShuffledSampler::new(N, 10, Some(1)).unwrap())
        .noise_multiplier(1.0)
        .audit(Canaries::new(M).delta(1e-5));
    assert!(matches!(refused(shuffled), Error::Incompatible { with: "shuffled fixed-size batches", .. }));
}

#[test]
fn audited_runs_refuse_checkpoints_and_planted_bugs_say_so() {
    let m = model();
    let mut opt = builder(&m, 0.5).audit(Canaries::new(M)).build(0.1).unwrap();
    let dir = std::env::temp_dir().join(format!("candle-dp-canaries-ckpt-{}", std::process::id()));
    let e = opt.save_checkpoint(&dir, &m.varmap).unwrap_err();
    assert!(matches!(e, Error::Incompatible { setting: "a checkpoint", .. }), "{e}");
    assert!(!dir.exists(), "nothing written");
    drop(opt); // releases the layer for the next optimizer

    let bugged = builder(&m, 0.5).plant_bug(PlantedBug::ClippingDisabled).build(0.1).unwrap();
    let text = bugged.ledger().unwrap().header().description.clone().unwrap();
    assert!(text.starts_with("PLANTED BUG (clipping disabled): NOT PRIVATE."), "{text}");
}

/// Which canaries are in is the auditor's secret: no Debug output shows the
/// inclusion seed, the inclusion bits, or which canaries a batch drew.
#[test]
fn debug_output_hides_the_canaries_secret() {
    let m = model();
    let seed = 918_273_645_u64;
    let canaries = Canaries::new(M).seeded(seed);
    let shown = format!("{canaries:?}");
    assert!(shown.contains("seeded: true") && !shown.contains(&seed.to_string()), "{shown}");
    let mut opt = builder(&m, 0.5).audit(canaries).build(0.1).unwrap();
    step(&mut opt, &m);
    let idx = opt.next_batch().unwrap();
    let shown = format!("{opt:?}");
    assert!(!shown.contains(&seed.to_string()), "the seed is shown: {shown}");
    assert!(!shown.contains("included") && !shown.contains("true, false"), "inclusion bits are shown: {shown}");
    assert!(shown.contains(&format!("canaries: {M}")) && shown.contains("canaries_drawn"), "{shown}");
    drop(idx);
    opt.cancel_batch();
}
