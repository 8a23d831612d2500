//! What a failure leaves behind (found in review): a noisy update that
//! overflows its dtype is refused before anything changes; an inner
//! optimizer that fails mid-step has its (possibly applied) step accounted
//! and its noise spent; a release or a resume with variables other than the
//! ones trained is refused.

mod common;

use std::cell::Cell;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_dp::optim::AdamW;
use candle_dp::{loss, DpOptimizer, Error, GaussianNoise, PoissonSampler};
use candle_nn::{Optimizer, VarMap, SGD};
use common::{mlp_pair, set_deterministic, take, tensor, vars_by_name};

const N: usize = 10;

fn data() -> (Tensor, Tensor) {
    let x = tensor(&[N, 3], 1, 1.0, DType::F32).unwrap();
    (x, Tensor::from_vec((0..N as u32).map(|i| i % 2).collect(), N, &Device::Cpu).unwrap())
}

fn flat(varmap: &VarMap) -> Vec<f32> {
    vars_by_name(varmap).iter().flat_map(|v| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
}

#[test]
fn a_noisy_update_that_overflows_f32_is_refused_and_changes_nothing() {
    let varmap = VarMap::new();
    let (model, _) = mlp_pair(&varmap, &[3, 2], DType::F32).unwrap();
    set_deterministic(&varmap, 3).unwrap();
    let (x, y) = data();
    // sigma C / (q N) = 1e40: finite in f64, beyond f32's 3.4e38.
    let mut opt = DpOptimizer::<SGD>::builder(vars_by_name(&varmap), PoissonSampler::seeded(N, 1.0, 1).unwrap())
        .noise_multiplier(1e41)
        .noise(GaussianNoise::from_seed(1))
        .build(0.1)
        .unwrap();
    let before = flat(&varmap);
    let err = opt.train_step(|idx| loss::cross_entropy(&model.forward(&take(&x, idx))?, &take(&y, idx))).unwrap_err();
    assert!(
        matches!(err, Error::InvalidConfig { field: "noise_multiplier * max_grad_norm / expected_batch_size", .. }),
        "{err}"
    );
    assert_eq!(flat(&varmap), before);
    assert_eq!((opt.steps(), opt.ledger().unwrap().total_steps()), (0, 0));
}

thread_local! { static FAIL_NEXT: Cell<bool> = const { Cell::new(true) }; }

/// SGD that, once, fails after updating its first variable.
struct Flaky {
    vars: Vec<Var>,
    lr: f64,
}

impl Optimizer for Flaky {
    type Config = f64;
    fn new(vars: Vec<Var>, lr: f64) -> candle_core::Result<Self> {
        Ok(Self { vars, lr })
    }
    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        for (k, v) in self.vars.iter().enumerate() {
            if k == 1 && FAIL_NEXT.with(|f| f.replace(false)) {
                candle_core::bail!("simulated device error mid-step");
            }
            if let Some(g) = grads.get(v) {
                v.set(&v.sub(&(g * self.lr)?)?)?;
            }
        }
        Ok(())
    }
    fn learning_rate(&self) -> f64 {
        self.lr
    }
    fn set_learning_rate(&mut self, lr: f64) {
        self.lr = lr
    }
}

#[test]
fn an_inner_step_that_fails_midway_is_accounted_and_spends_its_noise() {
    let varmap = VarMap::new();
    let (model, _) = mlp_pair(&varmap, &[3, 2], DType::F32).unwrap();
    set_deterministic(&varmap, 3).unwrap();
    let (x, y) = data();
    let vars = vars_by_name(&varmap);
    let mut opt = DpOptimizer::<Flaky>::builder(vars.clone(), PoissonSampler::seeded(N, 0.5, 1).unwrap())
        .noise_multiplier(1.0)
        .noise(GaussianNoise::from_seed(1))
        .build(0.5)
        .unwrap();
    let first = |v: &Var| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (w0, w1) = (first(&vars[0]), first(&vars[1]));
    let step = |opt: &mut DpOptimizer<Flaky>| {
        opt.train_step(|idx| loss::cross_entropy(&model.forward(&take(&x, idx))?, &take(&y, idx)))
    };
    let err = step(&mut opt).unwrap_err();
    assert!(err.to_string().contains("simulated device error"), "{err}");
    // Variable 0 took its noisy update before the failure: that was a release.
    assert_ne!(first(&vars[0]), w0);
    assert_eq!(first(&vars[1]), w1);
    assert_eq!((opt.steps(), opt.ledger().unwrap().total_steps()), (1, 1), "the partial step is accounted");
    // The batch is closed and the noise spent: the next step draws anew.
    let after_failure = first(&vars[0]);
    step(&mut opt).unwrap();
    assert_eq!((opt.steps(), opt.ledger().unwrap().total_steps()), (2, 2));
    assert_ne!(first(&vars[0]), after_failure);
}

#[test]
fn a_release_of_a_varmap_without_the_trained_variables_is_refused() {
    let (trained, other) = (VarMap::new(), VarMap::new());
    let (model, _) = mlp_pair(&trained, &[3, 2], DType::F32).unwrap();
    let _unrelated = mlp_pair(&other, &[3, 2], DType::F32).unwrap();
    let (x, y) = data();
    let mut opt = DpOptimizer::<SGD>::builder(vars_by_name(&trained), PoissonSampler::seeded(N, 0.5, 1).unwrap())
        .noise_multiplier(1.0)
        .noise(GaussianNoise::from_seed(1))
        .build(0.1)
        .unwrap();
    opt.train_step(|idx| loss::cross_entropy(&model.forward(&take(&x, idx))?, &take(&y, idx))).unwrap();
    let dir = std::env::temp_dir().join(format!("candle-dp-release-other-{}", std::process::id()));
    let err = opt.release(&dir, &other, None).unwrap_err();
    assert!(matches!(err, Error::UnknownVariable { index: 0, .. }), "{err}");
    assert!(!dir.exists(), "nothing written");
    assert_eq!(opt.ledger().unwrap().releases().count(), 0, "nothing recorded");
    let err = opt.save_checkpoint(&dir, &other).unwrap_err();
    assert!(matches!(err, Error::UnknownVariable { .. }), "{err}");
    // The right VarMap releases, once.
    let release = opt.release(&dir, &trained, None).unwrap();
    assert_eq!(release.ledger.releases().count(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_resume_with_the_variables_in_another_order_is_refused() {
    let varmap = VarMap::new();
    let (model, _) = mlp_pair(&varmap, &[3, 4, 2], DType::F32).unwrap();
    set_deterministic(&varmap, 3).unwrap();
    let (x, y) = data();
    let mut opt = DpOptimizer::<AdamW>::builder(vars_by_name(&varmap), PoissonSampler::seeded(N, 0.5, 1).unwrap())
        .noise_multiplier(1.0)
        .noise(GaussianNoise::from_seed(1))
        .build(Default::default())
        .unwrap();
    opt.train_step(|idx| loss::cross_entropy(&model.forward(&take(&x, idx))?, &take(&y, idx))).unwrap();
    let dir = std::env::temp_dir().join(format!("candle-dp-var-order-{}", std::process::id()));
    opt.save_checkpoint(&dir, &varmap).unwrap();
    drop(opt);
    let fresh = VarMap::new();
    let _m = mlp_pair(&fresh, &[3, 4, 2], DType::F32).unwrap();
    let mut rotated = vars_by_name(&fresh);
    rotated.rotate_left(2); // same shapes pairwise would not be caught by shapes alone
    let err = DpOptimizer::<AdamW>::resume(&dir, &fresh, rotated, Default::default()).map(|_| ()).unwrap_err();
    assert!(err.to_string().contains("same order"), "{err}");
    DpOptimizer::<AdamW>::resume(&dir, &fresh, vars_by_name(&fresh), Default::default()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
