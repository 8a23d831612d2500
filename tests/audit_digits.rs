//! The audits end to end on the shipped digits data (the digits example's
//! MLP, data and split): a correct run's canary audit stays below the
//! accountant's epsilon, and each planted bug (noise ten times smaller,
//! clipping disabled, the mean's noise added to the sum) shows an
//! epsilon-hat above it; the replay check passes the correct run and flags
//! each bug.
//!
//! Every run is seeded, so each result is fixed; what is random is which
//! fixed result a seed gives. A correct run's epsilon-hat exceeds epsilon
//! with probability at most alpha = 0.05 (the audit's guarantee; on the
//! runs here it stays far below).

#[path = "../examples/common/mod.rs"]
#[allow(unused_imports)]
mod data;

use candle_core::{DType, Device, Module, Tensor};
use candle_dp::audit::{replay_check, Canaries, PlantedBug, ReplayReport};
use candle_dp::optim::AdamW;
use candle_dp::{loss, DpOptimizer, PoissonSampler, PrivacyBudget, Result};
use candle_nn::{VarBuilder, VarMap};

const EPSILON: f64 = 3.0;
const DELTA: f64 = 1e-5;

struct Digits {
    data: data::Images,
    train: Vec<usize>,
}

impl Digits {
    fn load() -> Self {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/digits.csv.gz");
        let data = data::load_digits_csv(&path).unwrap();
        let (train, _test) = data::stratified_split(&data.labels, 0.2, 0);
        Self { data, train }
    }

    fn batch(&self, idx: &[usize]) -> candle_core::Result<(Tensor, Tensor)> {
        self.data.tensors(&idx.iter().map(|&i| self.train[i]).collect::<Vec<_>>(), &Device::Cpu)
    }
}

/// The digits example's MLP (64-128-10, tanh).
struct Mlp {
    fc1: candle_dp::DpLinear,
    fc2: candle_dp::DpLinear,
}

impl Mlp {
    fn new(varmap: &VarMap, seed: u64) -> Self {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
        let m = Self {
            fc1: candle_dp::linear(64, 128, vb.pp("fc1")).unwrap(),
            fc2: candle_dp::linear(128, 10, vb.pp("fc2")).unwrap(),
        };
        data::init_seeded(varmap, seed).unwrap();
        m
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(&x.affine(2.0, -1.0)?)?.tanh()?)
    }
}

/// The digits example's defaults: 50 epochs of expected batch 400, Adam,
/// `C = 1`, the noise calibrated to epsilon 3 at delta 1e-5.
fn optimizer(
    digits: &Digits,
    varmap: &VarMap,
    canaries: Option<usize>,
    bug: Option<PlantedBug>,
    max_grad_norm: f64,
    seed: u64,
) -> DpOptimizer<AdamW> {
    let n = digits.train.len();
    let steps = 50 * n.div_ceil(400) as u64;
    let mut b = DpOptimizer::<AdamW>::builder(
        candle_dp::vars_by_name(varmap),
        PoissonSampler::with_expected_batch_size(n, 400, Some(seed)).unwrap(),
    )
    .target(PrivacyBudget { epsilon: EPSILON, delta: DELTA }, steps)
    .max_grad_norm(max_grad_norm)
    .noise(candle_dp::GaussianNoise::from_seed(seed + 1));
    if let Some(m) = canaries {
        b = b.audit(Canaries::new(m).seeded(seed + 2));
    }
    if let Some(bug) = bug {
        b = b.plant_bug(bug);
    }
    b.build(candle_nn::ParamsAdamW { lr: 0.02, weight_decay: 0.0, ..Default::default() }).unwrap()
}

/// epsilon-hat (one-run, f-DP one-run) of a whole audited digits run, and the accountant's epsilon.
fn audited_run(digits: &Digits, bug: Option<PlantedBug>, seed: u64) -> (f64, f64, f64) {
    let varmap = VarMap::new();
    let model = Mlp::new(&varmap, seed);
    let mut opt = optimizer(digits, &varmap, Some(1000), bug, 1.0, seed);
    let steps = opt.max_steps().unwrap().min(50 * digits.train.len().div_ceil(400) as u64);
    for _ in 0..steps {
        opt.train_step(|idx| {
            assert!(idx.iter().all(|&i| i < digits.train.len()), "a canary reached the model");
            let (x, y) = digits.batch(idx)?;
            loss::cross_entropy(&model.forward(&x)?, &y)
        })
        .unwrap();
    }
    let audit = opt.record_audit().unwrap().unwrap();
    let recorded = opt.ledger().unwrap();
    let record = recorded.audits().last().unwrap().clone();
    assert_eq!((record.epsilon_lower_bound, record.after_steps), (audit.epsilon, steps));
    (audit.epsilon, audit.epsilon_fdp, opt.epsilon(DELTA).unwrap())
}

fn replay(digits: &Digits, bug: Option<PlantedBug>, seed: u64) -> ReplayReport {
    let varmap = VarMap::new();
    let model = Mlp::new(&varmap, seed);
    // C = 0.05: below every example's gradient norm at this stage, so the
    // removed example's clipped contribution is C exactly.
    let mut opt = optimizer(digits, &varmap, None, bug, 0.05, seed);
    let report = replay_check(&mut opt, 7, 12, |idx| -> Result<_> {
        let (x, y) = digits.batch(idx)?;
        loss::cross_entropy(&model.forward(&x)?, &y)
    })
    .unwrap();
    assert!(report.steps.iter().any(|s| s.removed_drawn), "the removed example was never drawn");
    report
}

#[test]
fn a_correct_run_audits_below_epsilon_and_passes_the_replay() {
    let digits = Digits::load();
    let (eps_hat, eps_hat_fdp, eps) = audited_run(&digits, None, 11);
    eprintln!("correct: epsilon {eps:.3}, epsilon-hat {eps_hat:.3}, f-DP {eps_hat_fdp:.3}");
    assert!(eps <= EPSILON + 1e-9);
    assert!(eps_hat <= eps && eps_hat_fdp <= eps, "{eps_hat} {eps_hat_fdp} > {eps}");

    let report = replay(&digits, None, 12);
    eprintln!(
        "correct replay: max difference {:.6} C, noise ratio {:?} in {:?}",
        report.max_difference_ratio(),
        report.noise_ratio(),
        report.noise_interval()
    );
    assert!(report.passed(), "{report:?}");
    // The check measured the removed example: its clipped contribution, C.
    assert!(report.max_difference_ratio() > 0.999, "{}", report.max_difference_ratio());
}

fn planted(bug: PlantedBug) {
    let digits = Digits::load();
    let (eps_hat, eps_hat_fdp, eps) = audited_run(&digits, Some(bug), 21);
    eprintln!("{bug:?}: epsilon {eps:.3}, epsilon-hat {eps_hat:.3}, f-DP {eps_hat_fdp:.3}");
    assert!(eps_hat > eps && eps_hat_fdp > eps, "{bug:?}: epsilon-hat {eps_hat} / {eps_hat_fdp} <= {eps}");

    let report = replay(&digits, Some(bug), 22);
    eprintln!(
        "{bug:?} replay: max difference {:.3} C, noise ratio {:?}",
        report.max_difference_ratio(),
        report.noise_ratio()
    );
    assert!(!report.passed(), "{bug:?}: the replay check passed");
    match bug {
        PlantedBug::ClippingDisabled => assert!(!report.sensitivity_ok() && report.noise_ok()),
        PlantedBug::NoiseTenTimesSmaller | PlantedBug::NoiseOfTheMean => {
            assert!(report.sensitivity_ok() && !report.noise_ok())
        }
    }
}

#[test]
fn noise_ten_times_smaller_is_caught() {
    planted(PlantedBug::NoiseTenTimesSmaller);
}

#[test]
fn clipping_disabled_is_caught() {
    planted(PlantedBug::ClippingDisabled);
}

#[test]
fn the_mean_noise_added_to_the_sum_is_caught() {
    planted(PlantedBug::NoiseOfTheMean);
}
