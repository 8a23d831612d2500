//! Property: every ledger a real optimizer run writes verifies, for random
//! dataset sizes, sample rates, noise multipliers (fixed or calibrated),
//! clipping norms and step counts. (About one float in ten did not survive
//! a lossy parser, so honest ledgers were called tampered.)

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_dp::accountant::Ledger;
use candle_dp::{loss, DpOptimizer, GaussianNoise, PoissonSampler, PrivacyBudget, Sampler, ShuffledSampler};
use candle_nn::{VarMap, SGD};
use common::{mlp_pair, tensor, values, vars_by_name};

#[test]
fn every_ledger_an_optimizer_writes_verifies() {
    let varmap = VarMap::new();
    let (dp, _) = mlp_pair(&varmap, &[3, 2], DType::F32).unwrap();
    let vars = vars_by_name(&varmap);
    // Uniforms in [0, 1) from the shared deterministic generator.
    let u: Vec<f64> = values(6 * 300, 2026, 1.0).into_iter().map(|v| (v + 1.0) / 2.0).collect();
    let mut checked = 0;
    for case in u.chunks(6) {
        let n = 10 + (case[0] * 100_000.0) as usize;
        let batch = 1 + (case[1] * (n - 1) as f64) as usize;
        let steps = 1 + (case[2] * 4.0) as u64;
        let c = 0.01 + case[3] * 10.0;
        let sampler: Sampler = if case[4] < 0.2 {
            ShuffledSampler::new(n, batch, Some(checked as u64)).unwrap().into()
        } else {
            PoissonSampler::new(n, batch as f64 / n as f64).unwrap().into()
        };
        let builder =
            DpOptimizer::<SGD>::builder(vars.clone(), sampler).max_grad_norm(c).noise(GaussianNoise::from_seed(1));
        let builder = if case[5] < 0.3 {
            // Calibrated to a random target: the noise multiplier is a bisection's output.
            builder.target(PrivacyBudget { epsilon: 0.5 + case[5] * 30.0, delta: 1e-5 }, steps)
        } else {
            builder.noise_multiplier(0.3 + case[5] * 20.0)
        };
        let Ok(mut opt) = builder.build(0.1) else { continue };
        for step in 0..steps {
            // The examples' features do not matter here, only that every one drawn is accumulated.
            opt.train_step(|idx| {
                let x = tensor(&[idx.len(), 3], step, 1.0, DType::F32)?;
                let y = Tensor::from_vec(idx.iter().map(|&i| (i % 2) as u32).collect(), idx.len(), &Device::Cpu)?;
                loss::cross_entropy(&dp.forward(&x)?, &y)
            })
            .unwrap();
        }
        opt.record_release("model.safetensors", &"ab".repeat(32)).unwrap();
        let written = opt.ledger().unwrap();
        let text = written.to_json();
        let read = Ledger::from_json(&text);
        assert!(read.is_ok(), "N {n}, batch {batch}, C {c}, sigma {}: {:?}", opt.noise_multiplier(), read.err());
        assert_eq!(read.unwrap(), written);
        checked += 1;
    }
    assert!(checked > 250, "most random configurations are valid: {checked}");
}
