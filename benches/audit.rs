//! What the canary audit costs per step of the digits run: the digits
//! example's MLP (64-128-10, tanh, f32), 1438 training examples, expected
//! batch 400 (q = 0.278), Adam, noise multiplier 6 (what epsilon 3 over 50
//! epochs calibrates to), one `train_step` at a time.
//!
//! * `plain`: no canaries.
//! * `canaries_1000`: `--audit 1000`: 1000 more sampler slots, their
//!   clipped sum, noise and scores (the expected number of real examples
//!   per step is the same, 400).
//!
//! The data are uniform pixels with labels `i mod 10` (the cost does not
//! depend on the values). One thread (`RAYON_NUM_THREADS=1` unless set), as
//! in `dp_step`. Report `canaries_1000` as a ratio to `plain` from the same run.

use candle_core::{DType, Device, Module, Tensor};
use candle_dp::audit::Canaries;
use candle_dp::optim::AdamW;
use candle_dp::{loss, DpOptimizer, GaussianNoise, PoissonSampler, PrivacyBudget};
use candle_nn::{VarBuilder, VarMap};
use criterion::{BenchmarkId, Criterion};

const N: usize = 1438;

struct Mlp(candle_dp::DpLinear, candle_dp::DpLinear);

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.1.forward(&self.0.forward(x)?.tanh()?)
    }
}

fn audit_cost(c: &mut Criterion) {
    let dev = Device::Cpu;
    let x = Tensor::rand(0f32, 1.0, (N, 64), &dev).unwrap();
    let y = Tensor::from_vec((0..N as u32).map(|i| i % 10).collect(), N, &dev).unwrap();
    let mut group = c.benchmark_group("audit");
    group.sample_size(30);
    for (name, canaries) in [("plain", 0usize), ("canaries_1000", 1000)] {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let model =
            Mlp(candle_dp::linear(64, 128, vb.pp("fc1")).unwrap(), candle_dp::linear(128, 10, vb.pp("fc2")).unwrap());
        let mut builder = DpOptimizer::<AdamW>::builder(
            candle_dp::vars_by_name(&varmap),
            PoissonSampler::with_expected_batch_size(N, 400, Some(1)).unwrap(),
        )
        .noise_multiplier(6.0)
        .budget(PrivacyBudget { epsilon: 1e6, delta: 1e-5 })
        .noise(GaussianNoise::from_seed(2));
        if canaries > 0 {
            builder = builder.audit(Canaries::new(canaries).seeded(3));
        }
        let mut opt =
            builder.build(candle_nn::ParamsAdamW { lr: 0.02, weight_decay: 0.0, ..Default::default() }).unwrap();
        group.bench_function(BenchmarkId::new(name, "digits_mlp_b400"), |bench| {
            bench.iter(|| {
                opt.train_step(|idx| {
                    let i = Tensor::from_vec(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), idx.len(), &dev)?;
                    loss::cross_entropy(&model.forward(&x.index_select(&i, 0)?)?, &y.index_select(&i, 0)?)
                })
                .unwrap()
            })
        });
    }
    group.finish();
}

fn main() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let mut c = Criterion::default().configure_from_args();
    audit_cost(&mut c);
    c.final_summary();
}
