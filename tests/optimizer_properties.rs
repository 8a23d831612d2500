//! DpOptimizer: noise scale, empty batches, bad input, the budget, inner
//! optimizers, reproducibility, and the ledger it writes.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_dp::{
    loss, ClipMode, DpOptimizer, Engine, Error, GaussianNoise, PoissonSampler, PrivacyBudget, ShuffledSampler,
};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap, SGD};
use common::{mlp_pair, set_deterministic, take, tensor, vars_by_name};
use dp_accountant::{AccountantKind, Ledger, PrivacyReport, Seeding};

fn weights(varmap: &VarMap) -> Vec<f64> {
    vars_by_name(varmap)
        .iter()
        .flat_map(|v| v.as_tensor().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap())
        .collect()
}

/// A linearly separable two-class problem: label = [x0 + x1 > 0].
fn toy_data(n: usize) -> (Tensor, Tensor) {
    let x = tensor(&[n, 4], 77, 1.0, DType::F32).unwrap();
    let v = x.to_vec2::<f32>().unwrap();
    let y: Vec<u32> = v.iter().map(|r| u32::from(r[0] + r[1] > 0.0)).collect();
    (x, Tensor::from_vec(y, n, &Device::Cpu).unwrap())
}

/// With zero gradients (every example's loss is 0 times the model's output)
/// and SGD at learning rate 1, each update is `-N(0, (sigma C)^2) / (q N)`:
/// its sample standard deviation over n = 5 x 4160 coordinates must be
/// `sigma C / (q N)` within 5 standard errors of a sample standard deviation
/// (`5 / sqrt(2 n)` relative = 2.5%), and its mean 0 within 5 standard errors
/// (`5 sd / sqrt(n)`). (Empty batches, the other noise-only step, are in
/// `train_step.rs`.)
#[test]
fn noise_std_is_sigma_times_c() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let layer = candle_dp::linear(64, 64, vb.pp("l")).unwrap();
    let x = tensor(&[1000, 64], 8, 1.0, DType::F32).unwrap();
    let sampler = PoissonSampler::seeded(1000, 0.1, 1).unwrap();
    let (sigma, c) = (2.0, 0.5);
    let mut opt = DpOptimizer::<SGD>::builder(varmap.all_vars(), sampler)
        .noise_multiplier(sigma)
        .max_grad_norm(c)
        .noise(GaussianNoise::from_seed(9))
        .build(1.0)
        .unwrap();
    let mut deltas = Vec::new();
    for _ in 0..5 {
        let before = weights(&varmap);
        let summary = opt
            .train_step(|idx| {
                // Times a zero tensor (Candle prunes a multiplication by the constant 0 from the graph).
                let out = layer.forward(&take(&x, idx))?.sum(1)?;
                candle_dp::PerSampleLoss::new(out.mul(&out.zeros_like()?)?)
            })
            .unwrap();
        assert_eq!(summary.loss_sum, 0.0);
        deltas.extend(weights(&varmap).iter().zip(&before).map(|(a, b)| a - b));
    }
    let n = deltas.len() as f64;
    let expected = sigma * c / 100.0;
    let mean = deltas.iter().sum::<f64>() / n;
    let sd = (deltas.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    assert!(((sd - expected) / expected).abs() < 5.0 / (2.0 * n).sqrt(), "sd {sd} vs {expected}");
    assert!(mean.abs() < 5.0 * expected / n.sqrt(), "mean {mean}");
    // Five noise-only steps were accounted.
    assert_eq!(opt.steps(), 5);
    assert_eq!(opt.ledger().unwrap().total_steps(), 5);
    assert!(opt.epsilon(1e-5).unwrap() > 0.0);
}

#[test]
fn nan_input_is_refused_and_changes_nothing() {
    let varmap = VarMap::new();
    let (dp, _) = mlp_pair(&varmap, &[4, 8, 2], DType::F32).unwrap();
    // q = 1 over the 3 examples: the batch drawn is all of them, in order.
    let sampler = PoissonSampler::seeded(3, 1.0, 1).unwrap();
    let mut opt = DpOptimizer::<SGD>::builder(varmap.all_vars(), sampler)
        .noise_multiplier(1.0)
        .noise(GaussianNoise::from_seed(1))
        .build(0.1)
        .unwrap();
    let before = weights(&varmap);
    let mut x = tensor(&[3, 4], 1, 1.0, DType::F32).unwrap().to_vec2::<f32>().unwrap();
    x[1][2] = f32::NAN;
    let x = Tensor::new(x, &Device::Cpu).unwrap();
    let y = Tensor::new(&[0u32, 1, 0], &Device::Cpu).unwrap();
    assert_eq!(opt.next_batch().unwrap(), vec![0, 1, 2]);
    // ReLU maps the NaN activation to 0, so the loss is finite; the NaN
    // reaches the first layer's weight gradient and its norm.
    let err = opt.accumulate(&loss::cross_entropy(&dp.forward(&x).unwrap(), &y).unwrap()).unwrap_err();
    assert!(matches!(err, Error::NonFinite { what: "gradient norm", sample: 1 }), "{err}");
    // Through the first layer alone the loss itself is NaN.
    let err = opt.accumulate(&loss::cross_entropy(&dp.0[0].forward(&x).unwrap().narrow(1, 0, 2).unwrap(), &y).unwrap());
    assert!(matches!(err, Err(Error::NonFinite { what: "loss", sample: 1 })), "{err:?}");
    // Nothing was accumulated, so the batch cannot be stepped on.
    let err = opt.step().unwrap_err();
    assert!(matches!(err, Error::BatchMismatch { drawn: 3, accumulated: 0 }), "{err}");
    assert_eq!(weights(&varmap), before);
    assert_eq!(opt.steps(), 0);
    assert_eq!(opt.ledger().unwrap().entries().len(), 0);
    assert_eq!(opt.epsilon(1e-5).unwrap(), 0.0);
    // The optimizer is still usable afterwards.
    let x = tensor(&[3, 4], 2, 1.0, DType::F32).unwrap();
    opt.accumulate(&loss::cross_entropy(&dp.forward(&x).unwrap(), &y).unwrap()).unwrap();
    opt.step().unwrap();
    assert_ne!(weights(&varmap), before);
}

#[test]
fn budget_stops_training_before_it_is_exceeded() {
    let varmap = VarMap::new();
    let (dp, _) = mlp_pair(&varmap, &[4, 2], DType::F32).unwrap();
    let (x, y) = toy_data(100);
    let sampler = PoissonSampler::seeded(100, 0.2, 3).unwrap();
    let budget = PrivacyBudget { epsilon: 2.0, delta: 1e-5 };
    let mut opt = DpOptimizer::<SGD>::builder(varmap.all_vars(), sampler)
        .target(budget, 10)
        .noise(GaussianNoise::from_seed(3))
        .build(0.1)
        .unwrap();
    let max = opt.max_steps().unwrap();
    assert!(max >= 10, "the calibrated noise allows the planned steps: {max}");
    for _ in 0..max {
        let idx = opt.next_batch().unwrap();
        if !idx.is_empty() {
            opt.accumulate(&loss::cross_entropy(&dp.forward(&take(&x, &idx)).unwrap(), &take(&y, &idx)).unwrap())
                .unwrap();
        }
        opt.step().unwrap();
    }
    let spent = opt.epsilon(1e-5).unwrap();
    assert!(spent <= 2.0, "{spent}");
    let before = weights(&varmap);
    let sampler_before = opt.sampler().clone();
    // The step is refused before its batch is drawn, by both ways of stepping.
    match opt.next_batch() {
        Err(Error::BudgetExhausted { would_spend, budget, .. }) => {
            assert!(would_spend > 2.0 && budget == 2.0, "{would_spend}");
        }
        other => panic!("expected BudgetExhausted, got {other:?}"),
    }
    match opt.train_step(|_| unreachable!("no batch is drawn once the budget is spent")) {
        Err(Error::BudgetExhausted { would_spend, budget, .. }) => {
            assert!(would_spend > 2.0 && budget == 2.0, "{would_spend}");
        }
        other => panic!("expected BudgetExhausted, got {other:?}"),
    }
    assert_eq!(weights(&varmap), before, "a refused step touches nothing");
    assert_eq!(opt.steps(), max);
    assert_eq!(opt.epsilon(1e-5).unwrap(), spent);
    // Nothing was drawn: the sampler is where it was.
    let (mut a, mut b) = (sampler_before, opt.sampler().clone());
    assert_eq!(a.sample(), b.sample());
}

/// With the PLD accountant the same target needs less noise, the budget is
/// enforced by PLD, and the ledger is the one RDP reads too.
#[test]
fn pld_accountant_calibrates_less_noise_and_enforces_the_budget() {
    let budget = PrivacyBudget { epsilon: 2.0, delta: 1e-5 };
    let build = |accountant: AccountantKind| {
        let varmap = VarMap::new();
        // The DP layers must stay alive: the ghost engine registers them.
        let (model, _) = mlp_pair(&varmap, &[4, 2], DType::F32).unwrap();
        let sampler = PoissonSampler::seeded(1000, 0.05, 3).unwrap();
        let opt = DpOptimizer::<SGD>::builder(vars_by_name(&varmap), sampler)
            .target(budget, 400)
            .accountant(accountant)
            .noise(GaussianNoise::from_seed(3))
            .build(0.1)
            .unwrap();
        (opt, model)
    };
    let (rdp, _rdp_model) = build(AccountantKind::Rdp);
    let (mut pld, pld_model) = build(AccountantKind::Pld);
    let (x, y) = toy_data(1000);
    assert_eq!(pld.accountant(), AccountantKind::Pld);
    assert!(
        pld.noise_multiplier() < rdp.noise_multiplier(),
        "{} vs {}",
        pld.noise_multiplier(),
        rdp.noise_multiplier()
    );
    let max = pld.max_steps().unwrap();
    assert!(max >= 400, "{max}");
    for _ in 0..max {
        pld.train_step(|idx| loss::cross_entropy(&pld_model.forward(&take(&x, idx))?, &take(&y, idx))).unwrap();
    }
    let ledger = pld.ledger().unwrap();
    let by_pld = ledger.epsilon(AccountantKind::Pld, 1e-5).unwrap();
    assert_eq!(pld.epsilon(1e-5).unwrap(), by_pld);
    assert!(by_pld <= 2.0, "{by_pld}");
    // RDP, reading the same ledger, states more than the budget PLD enforced.
    assert!(ledger.epsilon(AccountantKind::Rdp, 1e-5).unwrap() > by_pld);
    assert!(matches!(pld.next_batch(), Err(Error::BudgetExhausted { .. })));
}

/// Trains the toy problem with `O`; returns test accuracy.
fn train<O: Optimizer>(config: O::Config, seed: u64) -> (f64, Vec<f64>, Ledger) {
    let varmap = VarMap::new();
    let (dp, _) = mlp_pair(&varmap, &[4, 8, 2], DType::F32).unwrap();
    set_deterministic(&varmap, seed).unwrap();
    let (x, y) = toy_data(400);
    let sampler = PoissonSampler::seeded(400, 0.1, seed).unwrap();
    let mut opt = DpOptimizer::<O>::builder(vars_by_name(&varmap), sampler)
        .noise_multiplier(0.8)
        .max_grad_norm(1.0)
        .noise(GaussianNoise::from_seed(seed))
        .build(config)
        .unwrap();
    for _ in 0..150 {
        opt.train_step(|idx| loss::cross_entropy(&dp.forward(&take(&x, idx))?, &take(&y, idx))).unwrap();
    }
    let pred = dp.forward(&x).unwrap().argmax(1).unwrap();
    let correct = pred.eq(&y).unwrap().to_dtype(DType::F64).unwrap().mean_all().unwrap().to_scalar::<f64>().unwrap();
    (correct, weights(&varmap), opt.ledger().unwrap())
}

#[test]
fn sgd_and_adamw_are_both_wrapped_and_learn() {
    let (acc_sgd, _, _) = train::<SGD>(0.5, 1);
    let (acc_adam, _, _) = train::<AdamW>(ParamsAdamW { lr: 0.02, ..Default::default() }, 1);
    assert!(acc_sgd > 0.85, "SGD accuracy {acc_sgd}");
    assert!(acc_adam > 0.85, "AdamW accuracy {acc_adam}");
}

#[test]
fn same_seed_gives_bit_identical_weights() {
    let (_, w1, l1) = train::<SGD>(0.5, 4);
    let (_, w2, l2) = train::<SGD>(0.5, 4);
    let (_, w3, _) = train::<SGD>(0.5, 5);
    assert_eq!(w1, w2);
    assert_eq!(l1.head(), l2.head());
    assert_ne!(w1, w3);
}

#[test]
fn the_ledger_matches_the_optimizer_and_verifies() {
    let (_, _, ledger) = train::<SGD>(0.5, 6);
    let reloaded = Ledger::from_json(&ledger.to_json()).unwrap();
    assert_eq!(reloaded.total_steps(), 150);
    let entry = reloaded.mechanisms().next().unwrap();
    assert_eq!(entry.noise.seed, Seeding::Fixed);
    assert_eq!(entry.clipping_norm, 1.0);
    let report = PrivacyReport::from_ledger(&reloaded, Some(1e-5)).unwrap();
    let mut acc = dp_accountant::RdpAccountant::new(dp_accountant::Adjacency::AddOrRemoveOne);
    acc.compose(&dp_accountant::DpEvent::poisson_sampled_gaussian(0.1, 0.8), 150).unwrap();
    assert_eq!(report.epsilon, acc.epsilon(1e-5).unwrap().epsilon);
}

#[test]
fn shuffled_batches_are_recorded_as_such() {
    let varmap = VarMap::new();
    let (dp, _) = mlp_pair(&varmap, &[4, 2], DType::F32).unwrap();
    let (x, y) = toy_data(100);
    let sampler = ShuffledSampler::new(100, 20, Some(1)).unwrap();
    let mut opt = DpOptimizer::<SGD>::builder(varmap.all_vars(), sampler)
        .noise_multiplier(2.0)
        .noise(GaussianNoise::from_seed(1))
        .build(0.1)
        .unwrap();
    for _ in 0..7 {
        let idx = opt.next_batch().unwrap();
        assert_eq!(idx.len(), 20);
        opt.accumulate(&loss::cross_entropy(&dp.forward(&take(&x, &idx)).unwrap(), &take(&y, &idx)).unwrap()).unwrap();
        opt.step().unwrap();
    }
    let ledger = opt.ledger().unwrap();
    let record = ledger.mechanisms().next().unwrap();
    assert_eq!(record.sampler, dp_accountant::SamplerKind::ShuffledFixedSize);
    assert_eq!(record.adjacency, dp_accountant::Adjacency::ReplaceOne);
    // 7 steps of 5 per epoch: 2 started epochs, each a Gaussian of sensitivity 2C.
    let rdp = ledger.compose_into(dp_accountant::RdpAccountant::new(ledger.adjacency())).unwrap().rdp_at(4.0).unwrap();
    assert!((rdp - 2.0 * 4.0 * 4.0 / (2.0 * 4.0)).abs() < 1e-12, "{rdp}");
    // The optimizer's epsilon is the ledger's, as a reviewer accounts it.
    assert_eq!(
        opt.epsilon(1e-5).unwrap(),
        ledger
            .compose_into(dp_accountant::RdpAccountant::new(ledger.adjacency()))
            .unwrap()
            .epsilon(1e-5)
            .unwrap()
            .epsilon
    );
}

#[test]
fn shuffled_batches_respect_the_budget_across_ledger_flushes() {
    let varmap = VarMap::new();
    let (dp, _) = mlp_pair(&varmap, &[4, 2], DType::F32).unwrap();
    let (x, y) = toy_data(100);
    let sampler = ShuffledSampler::new(100, 20, Some(1)).unwrap();
    let budget = PrivacyBudget { epsilon: 6.0, delta: 1e-5 };
    let mut opt = DpOptimizer::<SGD>::builder(varmap.all_vars(), sampler)
        .noise_multiplier(3.0)
        .budget(budget)
        .noise(GaussianNoise::from_seed(1))
        .build(0.1)
        .unwrap();
    let mut taken = 0;
    loop {
        match opt.train_step(|idx| loss::cross_entropy(&dp.forward(&take(&x, idx))?, &take(&y, idx))) {
            Ok(summary) => {
                assert_eq!((summary.examples, summary.chunks), (20, 1));
                taken += 1
            }
            Err(Error::BudgetExhausted { would_spend, .. }) => {
                assert!(would_spend > 6.0);
                break;
            }
            Err(e) => panic!("{e}"),
        }
        // Flushing mid-epoch splits the ledger into entries whose epochs round up separately.
        if taken % 3 == 0 {
            opt.flush_ledger().unwrap();
        }
        assert!(taken < 1000);
    }
    let ledger = opt.ledger().unwrap();
    let spent = ledger
        .compose_into(dp_accountant::RdpAccountant::new(ledger.adjacency()))
        .unwrap()
        .epsilon(1e-5)
        .unwrap()
        .epsilon;
    assert!(spent <= 6.0, "the ledger as accounted stays within the budget: {spent}");
    assert!(taken > 0);
}

#[test]
fn microbatch_engine_trains_a_plain_model() {
    let varmap = VarMap::new();
    let (_, plain) = mlp_pair(&varmap, &[4, 8, 2], DType::F32).unwrap();
    let (x, y) = toy_data(50);
    let sampler = PoissonSampler::seeded(50, 0.2, 1).unwrap();
    let mut opt = DpOptimizer::<SGD>::builder(varmap.all_vars(), sampler)
        .noise_multiplier(1.0)
        .engine(Engine::Microbatch)
        .noise(GaussianNoise::from_seed(1))
        .build(0.1)
        .unwrap();
    let before = weights(&varmap);
    let idx = opt.next_batch().unwrap();
    assert!(!idx.is_empty(), "a batch with examples, so the step is not noise only");
    opt.accumulate_microbatch(idx.len(), |k| {
        let i = idx[k];
        loss::cross_entropy(&plain.forward(&x.narrow(0, i, 1)?)?, &y.narrow(0, i, 1)?).unwrap().tensor().sum_all()
    })
    .unwrap();
    opt.step().unwrap();
    assert_ne!(weights(&varmap), before);
}

#[test]
fn unowned_variables_and_bad_config_are_refused() {
    let sampler = PoissonSampler::seeded(100, 0.1, 1).unwrap();
    assert_eq!(sampler.description().seeding(), Seeding::Fixed);
    // A plain candle-nn layer: its variables would be trained without clipping.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let _plain = candle_nn::linear(4, 2, vb.pp("plain")).unwrap();
    let err =
        DpOptimizer::<SGD>::builder(varmap.all_vars(), sampler.clone()).noise_multiplier(1.0).build(0.1).unwrap_err();
    assert!(matches!(err, Error::UnownedVariable { .. }), "{err}");

    let varmap = VarMap::new();
    let (_dp, _) = mlp_pair(&varmap, &[4, 3, 2], DType::F32).unwrap();
    let build = |f: &dyn Fn(candle_dp::DpOptimizerBuilder<SGD>) -> candle_dp::DpOptimizerBuilder<SGD>| {
        f(DpOptimizer::<SGD>::builder(varmap.all_vars(), sampler.clone())).build(0.1).unwrap_err().to_string()
    };
    assert_eq!(build(&|b| b.noise_multiplier(-1.0)), "noise_multiplier = -1: must be finite and > 0");
    assert_eq!(build(&|b| b.noise_multiplier(f64::NAN)), "noise_multiplier = NaN: must be finite and > 0");
    assert_eq!(
        build(&|b| b),
        "the noise multiplier is not set: call noise_multiplier(..) or target(..) on the builder"
    );
    let err = DpOptimizer::<SGD>::builder(varmap.all_vars(), sampler.clone()).build(0.1).unwrap_err();
    assert!(matches!(err, Error::MissingSetting { setting: "the noise multiplier", .. }), "{err}");
    assert_eq!(build(&|b| b.noise_multiplier(1.0).max_grad_norm(0.0)), "max_grad_norm = 0: must be finite and > 0");
    assert_eq!(
        build(&|b| b.noise_multiplier(1.0).budget(PrivacyBudget { epsilon: 1.0, delta: 2.0 })),
        "budget.delta = 2: must be in (0, 1)"
    );
    assert!(build(&|b| b.noise_multiplier(1.0).clipping(ClipMode::PerLayer(vec![0.5, 0.5]))).contains("sum of squared"));
    assert!(
        build(&|b| b.noise_multiplier(1.0).clipping(ClipMode::PerLayer(vec![1.0]))).contains("number of thresholds")
    );
    // Uniform per-layer thresholds are accepted.
    DpOptimizer::<SGD>::builder(varmap.all_vars(), sampler.clone())
        .noise_multiplier(1.0)
        .clipping(ClipMode::per_layer_uniform(1.0, 2))
        .build(0.1)
        .unwrap();
}

#[test]
fn microbatch_engine_refuses_dp_layers() {
    // DP layers give Candle no weight gradient: with the microbatch engine the
    // variables would train on noise alone (or, used by a plain op too, lose
    // the DP layer's part). The builder refuses them.
    let varmap = VarMap::new();
    let (_dp, _) = mlp_pair(&varmap, &[4, 2], DType::F32).unwrap();
    let sampler = PoissonSampler::seeded(10, 0.5, 1).unwrap();
    let err = DpOptimizer::<SGD>::builder(varmap.all_vars(), sampler)
        .noise_multiplier(1.0)
        .engine(Engine::Microbatch)
        .noise(GaussianNoise::from_seed(1))
        .build(0.1)
        .unwrap_err();
    assert!(matches!(err, Error::DpLayerInMicrobatch { .. }), "{err}");
}

#[test]
fn a_noise_scale_that_overflows_is_refused() {
    let varmap = VarMap::new();
    let (_dp, _) = mlp_pair(&varmap, &[4, 2], DType::F32).unwrap();
    let sampler = PoissonSampler::seeded(10, f64::MIN_POSITIVE, 1).unwrap();
    let err = DpOptimizer::<SGD>::builder(varmap.all_vars(), sampler).noise_multiplier(1.0).build(0.1).unwrap_err();
    assert!(err.to_string().starts_with("noise_multiplier * max_grad_norm / expected_batch_size = "), "{err}");
}

/// An empty loss tensor is not an empty batch: it is refused, and accumulates
/// nothing (an empty batch drawn by the sampler needs no accumulate at all).
#[test]
fn an_empty_loss_batch_is_refused_and_points_to_step() {
    let varmap = VarMap::new();
    let (_dp, _) = mlp_pair(&varmap, &[4, 2], DType::F32).unwrap();
    let sampler = PoissonSampler::seeded(10, 0.5, 1).unwrap();
    let mut opt = DpOptimizer::<SGD>::builder(varmap.all_vars(), sampler)
        .noise_multiplier(1.0)
        .noise(GaussianNoise::from_seed(1))
        .build(0.1)
        .unwrap();
    let drawn = opt.next_batch().unwrap().len();
    assert!(drawn > 0);
    let empty = candle_dp::PerSampleLoss::new(Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let err = opt.accumulate(&empty).unwrap_err();
    assert!(matches!(&err, Error::Shape { what: "per-sample losses", got, .. } if got == &[0]), "{err}");
    // It points to what an empty batch needs instead.
    assert_eq!(
        err.to_string(),
        "per-sample losses: expected at least one example (an empty Poisson batch accumulates nothing: call step() \
         directly), got shape [0]"
    );
    // Nothing was accumulated: the batch still waits for all its examples.
    let err = opt.step().unwrap_err();
    assert!(matches!(err, Error::BatchMismatch { drawn: d, accumulated: 0 } if d == drawn), "{err}");
    assert_eq!(opt.steps(), 0);
}
