//! Data-parallel DP-SGD under MPI: one DP step of `W` ranks against the same
//! step in one process, and the step's communication alone, measured in the
//! same run (feature `mpi`; run under `mpirun`, see the README).
//!
//! * `one_process`: rank 0 alone, the plain optimizer on the whole batch
//!   (the others wait).
//! * `ranks_W`: the distributed optimizer, each rank on its shard of the
//!   batch (Poisson sampling at q = 1 over the batch's examples, so every
//!   step takes all of them: a fixed size, as in `one_process`).
//! * `all_reduce_W`: the step's one collective alone: the sum over the
//!   ranks of `n + 3` `f64` (n parameters, then the failure flag, the loss
//!   and the count), reduced to rank 0 and broadcast.
//!
//! Models (`CANDLE_DP_BENCH_MODEL`, one per run: the MPI engine is handed
//! to one optimizer): `mlp` (784-512-10, ReLU, batch 256, as benches/dp_step)
//! or `gpt` (candle_dp::models::Gpt, 4 layers, d = 256, 4 heads, T = 128,
//! batch 32, every weight trained). f32 on CPU, one thread per rank
//! (`RAYON_NUM_THREADS=1` unless set): on this project's 2-core machines,
//! 2 ranks use both cores. Report `ranks_W / one_process` from one run.

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_dp::distributed::{Collective, Mpi};
use candle_dp::models::{Flavor, Gpt, GptConfig};
use candle_dp::{loss, DpOptimizer, GaussianNoise, PerSampleLoss, PoissonSampler};
use candle_nn::{VarBuilder, VarMap, SGD};
use criterion::Criterion;
use std::time::{Duration, Instant};

const GPT: GptConfig = GptConfig { vocab_size: 256, context: 128, d_model: 256, n_layers: 4, n_heads: 4 };

/// The per-example losses of a batch of examples.
type Losses = Box<dyn Fn(&[usize]) -> candle_dp::Result<PerSampleLoss>>;

/// A model, its examples, and its per-example losses of a batch of them.
struct Workload {
    name: &'static str,
    vars: Vec<Var>,
    batch: usize,
    losses: Losses,
    _varmap: VarMap,
}

fn workload(model: &str) -> Workload {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let take = |t: &Tensor, idx: &[usize]| -> candle_core::Result<Tensor> {
        let idx = Tensor::from_vec(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), idx.len(), t.device())?;
        t.index_select(&idx, 0)
    };
    match model {
        "mlp" => {
            let (l1, l2) =
                (candle_dp::linear(784, 512, vb.pp("l1")).unwrap(), candle_dp::linear(512, 10, vb.pp("l2")).unwrap());
            let b = 256;
            let x = Tensor::randn(0f32, 1.0, (b, 784), &dev).unwrap();
            let y = Tensor::from_vec((0..b as u32).map(|i| i % 10).collect(), b, &dev).unwrap();
            let losses = move |idx: &[usize]| -> candle_dp::Result<PerSampleLoss> {
                let logits = l2.forward(&l1.forward(&take(&x, idx)?)?.relu()?)?;
                loss::cross_entropy(&logits, &take(&y, idx)?)
            };
            Workload {
                name: "mlp_784_512_10_b256",
                vars: candle_dp::vars_by_name(&varmap),
                batch: b,
                losses: Box::new(losses),
                _varmap: varmap,
            }
        }
        "gpt" => {
            let gpt = Gpt::new(GPT, vb, Flavor::Dp, None).unwrap();
            let (b, t) = (32, GPT.context);
            let ids = |offset: u32| {
                let v: Vec<u32> = (0..(b * t) as u32)
                    .map(|i| (i.wrapping_mul(2_654_435_761) >> 7).wrapping_add(offset) % 256)
                    .collect();
                Tensor::from_vec(v, (b, t), &dev).unwrap()
            };
            let (x, y) = (ids(0), ids(1));
            let losses = move |idx: &[usize]| -> candle_dp::Result<PerSampleLoss> {
                loss::sequence_cross_entropy(&gpt.forward(&take(&x, idx)?)?, &take(&y, idx)?)
            };
            Workload {
                name: "gpt_4x256_t128_b32",
                vars: candle_dp::vars_by_name(&varmap),
                batch: b,
                losses: Box::new(losses),
                _varmap: varmap,
            }
        }
        other => panic!("CANDLE_DP_BENCH_MODEL = {other}: must be mlp or gpt"),
    }
}

fn optimizer(w: &Workload) -> DpOptimizer<SGD> {
    DpOptimizer::<SGD>::builder(w.vars.clone(), PoissonSampler::seeded(w.batch, 1.0, 0).unwrap())
        .noise_multiplier(1.0)
        .noise(GaussianNoise::from_seed(0))
        .build(0.01)
        .unwrap()
}

/// Rank 0 tells the others how many iterations to run (0: the phase is over).
fn tell(c: &dyn Collective, iters: u64) {
    let mut word = iters.to_le_bytes();
    c.broadcast(&mut word, 0).unwrap();
}

fn hear(c: &dyn Collective) -> u64 {
    let mut word = [0u8; 8];
    c.broadcast(&mut word, 0).unwrap();
    u64::from_le_bytes(word)
}

fn main() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let mpi = Mpi::init().expect("MPI: run this bench under mpirun (README)");
    let (rank, world) = (mpi.rank(), mpi.world_size());
    let model = std::env::var("CANDLE_DP_BENCH_MODEL").unwrap_or_else(|_| "mlp".into());
    let w = workload(&model);
    let n: usize = w.vars.iter().map(|v| v.elem_count()).sum();
    let mut buf = vec![0.0f64; n + 3];
    let mut criterion = (rank == 0).then(|| Criterion::default().sample_size(10).configure_from_args());

    // Phase 1, the engine still ours: the communication, then rank 0 alone.
    match &mut criterion {
        Some(c) => {
            let mut group = c.benchmark_group(format!("data_parallel/{}", w.name));
            group.bench_function(format!("all_reduce_{world}"), |b| {
                b.iter_custom(|iters| {
                    tell(&mpi, iters);
                    let start = Instant::now();
                    for _ in 0..iters {
                        mpi.all_reduce_sum_f64(&mut buf).unwrap();
                    }
                    start.elapsed()
                })
            });
            tell(&mpi, 0);
            let mut alone = optimizer(&w);
            group.bench_function("one_process", |b| {
                b.iter(|| alone.train_step(|idx| (w.losses)(idx)).unwrap());
            });
            group.finish();
        }
        None => loop {
            let iters = hear(&mpi);
            if iters == 0 {
                break;
            }
            for _ in 0..iters {
                mpi.all_reduce_sum_f64(&mut buf).unwrap();
            }
        },
    }

    // Phase 2: the distributed step.
    let mut opt = optimizer(&w).distribute(mpi).unwrap();
    let steps = |iters: u64, opt: &mut DpOptimizer<SGD>| -> Duration {
        let start = Instant::now();
        for _ in 0..iters {
            let s = opt.train_step(|idx| (w.losses)(idx)).unwrap();
            assert_eq!(s.examples, w.batch, "q = 1 draws every example");
        }
        start.elapsed()
    };
    match &mut criterion {
        Some(c) => {
            let mut group = c.benchmark_group(format!("data_parallel/{}", w.name));
            group.bench_function(format!("ranks_{world}"), |b| {
                b.iter_custom(|iters| {
                    tell(opt.collective().unwrap(), iters);
                    steps(iters, &mut opt)
                })
            });
            group.finish();
            tell(opt.collective().unwrap(), 0);
        }
        None => loop {
            let iters = hear(opt.collective().unwrap());
            if iters == 0 {
                break;
            }
            steps(iters, &mut opt);
        },
    }
    if let Some(c) = criterion {
        c.final_summary();
    }
}
