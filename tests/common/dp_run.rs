//! One small DP run (an f64 MLP over 25 examples, seeded), the same on
//! every rank, for the distributed tests (threads and MPI).

use candle_core::{DType, Device, Module, Tensor};
use candle_dp::distributed::{shard, Collective};
use candle_dp::{loss, DpLinear, DpOptimizer, Error, GaussianNoise, PerSampleLoss, PoissonSampler, StepSummary};
use candle_nn::{VarMap, SGD};

use super::{mlp_pair, set_deterministic, take, tensor, vars_by_name, Mlp};

/// Steps of the comparisons.
pub const STEPS: usize = 6;

pub const N: usize = 25;

/// What a run on one rank ends with.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub weights: Vec<f64>,
    pub ledger: String,
    /// The examples this rank saw at each step.
    pub batches: Vec<Vec<usize>>,
    pub summaries: Vec<StepSummary>,
}

pub type Builder = candle_dp::DpOptimizerBuilder<SGD>;

pub struct Run {
    pub varmap: VarMap,
    pub model: Mlp<DpLinear>,
    pub opt: DpOptimizer<SGD>,
    pub x: Tensor,
    pub y: Tensor,
}

impl Run {
    /// The same MLP, data and seeds on every rank.
    pub fn new(dtype: DType, sample_rate: f64, max_grad_norm: f64) -> Self {
        Run::with(dtype, sample_rate, |b| b.max_grad_norm(max_grad_norm))
    }

    /// As [`Run::new`], with `tweak` applied to the builder.
    pub fn with(dtype: DType, sample_rate: f64, tweak: impl FnOnce(Builder) -> Builder) -> Self {
        Run::build(dtype, |varmap| {
            let sampler = PoissonSampler::seeded(N, sample_rate, 3).unwrap();
            let builder = DpOptimizer::<SGD>::builder(vars_by_name(varmap), sampler)
                .noise_multiplier(0.8)
                .max_grad_norm(0.3)
                .max_physical_batch_size(4)
                .noise(GaussianNoise::from_seed(9));
            tweak(builder).build(0.2).unwrap()
        })
    }

    /// The model and data, resumed from the checkpoint in `dir`.
    pub fn resumed(dir: &std::path::Path) -> Self {
        Run::build(DType::F64, |varmap| DpOptimizer::resume(dir, varmap, vars_by_name(varmap), 0.2).unwrap())
    }

    pub fn build(dtype: DType, optimizer: impl FnOnce(&VarMap) -> DpOptimizer<SGD>) -> Self {
        let varmap = VarMap::new();
        let (model, _) = mlp_pair(&varmap, &[5, 7, 3], dtype).unwrap();
        set_deterministic(&varmap, 4).unwrap();
        let opt = optimizer(&varmap);
        let x = tensor(&[N, 5], 12, 1.5, dtype).unwrap();
        let y = Tensor::from_vec((0..N as u32).map(|i| i % 3).collect(), N, &Device::Cpu).unwrap();
        Run { varmap, model, opt, x, y }
    }

    /// One train step whose closure fails on this rank if `fail` (after
    /// computing the losses), or returns a NaN loss if `nan`.
    pub fn step_failing(&mut self, fail: bool, nan: bool) -> candle_dp::Result<StepSummary> {
        let (model, x, y) = (&self.model, &self.x, &self.y);
        self.opt.train_step(|idx| {
            let losses = loss::cross_entropy(&model.forward(&take(x, idx))?, &take(y, idx))?;
            if fail {
                return Err(Error::InvalidConfig { field: "test data", value: 0.0, valid: "readable" });
            }
            if nan {
                let t = losses.tensor();
                return PerSampleLoss::new((t * f64::NAN)?);
            }
            Ok(losses)
        })
    }

    pub fn weights(&self) -> Vec<f64> {
        vars_by_name(&self.varmap)
            .iter()
            .flat_map(|v| v.as_tensor().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap())
            .collect()
    }

    /// `steps` train steps; returns what each saw.
    pub fn train(mut self, steps: usize) -> Outcome {
        let (rank, world) = self.opt.rank();
        let mut batches = Vec::new();
        let mut summaries = Vec::new();
        for _ in 0..steps {
            let mut seen = Vec::new();
            let (model, x, y) = (&self.model, &self.x, &self.y);
            let summary = self
                .opt
                .train_step(|idx| {
                    seen.extend_from_slice(idx);
                    loss::cross_entropy(&model.forward(&take(x, idx))?, &take(y, idx))
                })
                .unwrap();
            assert!(seen.iter().all(|i| shard(N, rank, world).contains(i)), "rank {rank} saw {seen:?}");
            batches.push(seen);
            summaries.push(summary);
        }
        self.outcome(batches, summaries)
    }

    pub fn outcome(&self, batches: Vec<Vec<usize>>, summaries: Vec<StepSummary>) -> Outcome {
        Outcome { weights: self.weights(), ledger: self.opt.ledger().unwrap().to_json(), batches, summaries }
    }

    pub fn distribute(mut self, collective: impl Collective + 'static) -> Self {
        self.opt = self.opt.distribute(collective).unwrap();
        self
    }
}

pub fn max_rel_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// A ledger's records, without the hashes and each record's `distributed`
/// (how many processes ran the steps): what a run on any number of ranks
/// must share with the one-process run.
pub fn records(ledger_json: &str) -> Vec<serde_json::Value> {
    let ledger: serde_json::Value = serde_json::from_str(ledger_json).unwrap();
    ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let mut record = e["record"].clone();
            strip(&mut record, "distributed");
            record
        })
        .collect()
}

/// `v` without `key` at any depth.
pub fn strip(v: &mut serde_json::Value, key: &str) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove(key);
            m.values_mut().for_each(|x| strip(x, key));
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| strip(x, key)),
        _ => {}
    }
}

/// The world size each mechanism record of a ledger states (`None`: one process).
pub fn world_sizes(ledger_json: &str) -> Vec<Option<u64>> {
    let ledger = candle_dp::accountant::Ledger::from_json(ledger_json).unwrap();
    ledger.mechanisms().map(|m| m.distributed.map(|d| d.world_size)).collect()
}
