//! The cost of privacy per training step: a DP-SGD step against the same
//! model's non-private step, measured in one criterion group.
//!
//! * MLP 784-512-10 (ReLU), batch 256; CNN on 1x28x28 (conv 1->16 k5, max-pool 2,
//!   conv 16->32 k5, max-pool 2, linear 512->10), batch 128; f32.
//! * `non_private`: candle-nn layers, mean cross-entropy, backward, SGD step.
//! * `dp_ghost`: candle-dp layers, per-example cross-entropy, ghost clipping,
//!   noise for every parameter, SGD step, accounting. The optimizer draws
//!   each batch from its own sampler: Poisson sampling at q = 1 over the
//!   batch's examples, so every step takes all of them (the batch size is
//!   fixed, as in `non_private`).
//! * `dp_microbatch`: the candle-nn model through the microbatch engine.
//! * `noise_only`: the step's noise (one value per parameter, the
//!   optimizer's CPU path: `add_scaled_to_f32` in place, one thread), the
//!   part of `dp_ghost` that clipping does not explain.
//!
//! * The transformer (`candle_dp::models::Gpt`: 4 layers, d = 256, 4 heads,
//!   vocabulary 256, T = 128, B = 32, 3.3 M parameters), per-sequence
//!   cross-entropy: `non_private` and `dp_ghost` on every weight (`full`) and
//!   on LoRA adapters of rank 8 over a frozen base (`lora`: plain tensors
//!   under frozen `DpLinear`s in both, so neither computes the base's weight
//!   gradients), with `noise_only` for the trained parameters of each.
//!
//! * `mixed_precision`: the MLP's DP step with bf16 and f16 weights and
//!   activations (f32 norms, sums, noise and master weights) beside f32.
//!
//! Device: the CPU, or with `CANDLE_DP_BENCH_DEVICE=cuda` (built with
//! `--features cuda`) the first CUDA GPU, whose groups are named with a
//! `_cuda` suffix; each GPU iteration ends with a device synchronization,
//! so that the work queued is timed, not just its launch.
//!
//! Threads: one (`RAYON_NUM_THREADS=1` unless set), since on a loaded
//! 2-core machine Candle's default threading is slower and noisier
//! (../shared/CANDLE.md). Allocator: the system's (glibc malloc, default
//! settings). Report ratios to `non_private` from the same run.

use candle_core::{DType, Device, Module, Tensor};
use candle_dp::models::{Adapters, Flavor, Gpt, GptConfig};
use candle_dp::{loss, DpOptimizer, Engine, GaussianNoise, LoraConfig, PoissonSampler};
use candle_nn::{Optimizer, VarBuilder, VarMap, SGD};
use criterion::{BenchmarkId, Criterion, SamplingMode};

/// The MLP or the CNN, over any layer constructors.
enum Net<L, C> {
    Mlp(L, L),
    Cnn(C, C, L),
}

impl<L: Module, C: Module> Module for Net<L, C> {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Net::Mlp(a, b) => b.forward(&a.forward(x)?.relu()?),
            Net::Cnn(c1, c2, fc) => {
                let h = c1.forward(x)?.relu()?.max_pool2d(2)?;
                let h = c2.forward(&h)?.relu()?.max_pool2d(2)?;
                fc.forward(&h.flatten_from(1)?)
            }
        }
    }
}

type DpNet = Net<candle_dp::DpLinear, candle_dp::DpConv>;
type PlainNet = Net<candle_nn::Linear, candle_nn::Conv2d>;

fn build(cnn: bool, vb: VarBuilder) -> candle_core::Result<(DpNet, PlainNet)> {
    let cfg = Default::default();
    Ok(if cnn {
        (
            Net::Cnn(
                candle_dp::conv2d(1, 16, 5, cfg, vb.pp("c1"))?,
                candle_dp::conv2d(16, 32, 5, cfg, vb.pp("c2"))?,
                candle_dp::linear(512, 10, vb.pp("fc"))?,
            ),
            Net::Cnn(
                candle_nn::conv2d(1, 16, 5, cfg, vb.pp("c1"))?,
                candle_nn::conv2d(16, 32, 5, cfg, vb.pp("c2"))?,
                candle_nn::linear(512, 10, vb.pp("fc"))?,
            ),
        )
    } else {
        (
            Net::Mlp(candle_dp::linear(784, 512, vb.pp("l1"))?, candle_dp::linear(512, 10, vb.pp("l2"))?),
            Net::Mlp(candle_nn::linear(784, 512, vb.pp("l1"))?, candle_nn::linear(512, 10, vb.pp("l2"))?),
        )
    })
}

/// The device of every group (module docs) and the suffix of its groups' names.
fn bench_device() -> (Device, &'static str) {
    let refuse = |why: String| -> ! {
        eprintln!("dp_step: {why}");
        std::process::exit(2)
    };
    match std::env::var("CANDLE_DP_BENCH_DEVICE").as_deref() {
        Err(_) | Ok("cpu") => (Device::Cpu, ""),
        Ok("cuda") => match Device::new_cuda(0) {
            Ok(dev) => (dev, "_cuda"),
            // The first line: Candle's CUDA errors carry a backtrace.
            Err(e) => refuse(format!(
                "CANDLE_DP_BENCH_DEVICE=cuda: no CUDA device ({})",
                e.to_string().lines().next().unwrap_or_default()
            )),
        },
        Ok(other) => refuse(format!("CANDLE_DP_BENCH_DEVICE={other}: use cpu or cuda")),
    }
}

/// DP-SGD at learning rate 0.01, noise multiplier 1, a fixed noise seed.
fn dp_sgd(vars: Vec<candle_core::Var>, sampler: PoissonSampler, engine: Engine) -> DpOptimizer<SGD> {
    DpOptimizer::<SGD>::builder(vars, sampler)
        .noise_multiplier(1.0)
        .engine(engine)
        .noise(GaussianNoise::from_seed(0))
        .build(0.01)
        .unwrap()
}

fn dp_step(c: &mut Criterion) {
    let (dev, suffix) = bench_device();
    let mut group = c.benchmark_group(format!("dp_step{suffix}"));
    group.sample_size(20);
    for (name, cnn, b) in [("mlp_784_512_10_b256", false, 256usize), ("cnn_mnist_b128", true, 128)] {
        let varmap = VarMap::new();
        let (dp, plain) = build(cnn, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
        let shape: Vec<usize> = if cnn { vec![b, 1, 28, 28] } else { vec![b, 784] };
        let x = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let y = Tensor::from_vec((0..b as u32).map(|i| i % 10).collect(), b, &dev).unwrap();
        // Poisson sampling at q = 1 over the b examples: every batch drawn is all of x, in order.
        let sampler = PoissonSampler::seeded(b, 1.0, 0).unwrap();

        let mut sgd = SGD::new(varmap.all_vars(), 0.01).unwrap();
        group.bench_function(BenchmarkId::new("non_private", name), |bench| {
            bench.iter(|| {
                let l = candle_nn::loss::cross_entropy(&plain.forward(&x).unwrap(), &y).unwrap();
                sgd.backward_step(&l).unwrap();
                dev.synchronize().unwrap();
            })
        });

        let mut ghost = dp_sgd(varmap.all_vars(), sampler.clone(), Engine::Ghost);
        group.bench_function(BenchmarkId::new("dp_ghost", name), |bench| {
            bench.iter(|| {
                let idx = ghost.next_batch().unwrap();
                assert_eq!(idx.len(), b, "q = 1 draws every example");
                let losses = loss::cross_entropy(&dp.forward(&x).unwrap(), &y).unwrap();
                ghost.accumulate(&losses).unwrap();
                ghost.step().unwrap();
                dev.synchronize().unwrap();
            })
        });

        // Where the DP overhead goes: the noise alone, one value per parameter.
        let params: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
        let mut noise = GaussianNoise::from_seed(1);
        let mut buf = vec![0.0f32; params];
        group.bench_function(BenchmarkId::new("noise_only", name), |bench| {
            bench.iter(|| noise.add_scaled_to_f32(&mut buf, 1.0, 0.5))
        });

        // The microbatch engine takes a plain model: the same one over its own variables.
        let plain_map = VarMap::new();
        let (_, plain) = build(cnn, VarBuilder::from_varmap(&plain_map, DType::F32, &dev)).unwrap();
        let mut micro = dp_sgd(plain_map.all_vars(), sampler, Engine::Microbatch);
        group.sample_size(10);
        group.bench_function(BenchmarkId::new("dp_microbatch", name), |bench| {
            bench.iter(|| {
                let idx = micro.next_batch().unwrap();
                assert_eq!(idx.len(), b, "q = 1 draws every example");
                micro
                    .accumulate_microbatch(b, |i| {
                        let logits = plain.forward(&x.narrow(0, i, 1)?)?;
                        candle_nn::loss::cross_entropy(&logits, &y.narrow(0, i, 1)?)
                    })
                    .unwrap();
                micro.step().unwrap();
                dev.synchronize().unwrap();
            })
        });
        group.sample_size(20);
    }
    group.finish();
}

/// The transformer of the goals.
const GPT: GptConfig = GptConfig { vocab_size: 256, context: 128, d_model: 256, n_layers: 4, n_heads: 4 };
const GPT_BATCH: usize = 32;

fn transformer_step(c: &mut Criterion) {
    let (dev, suffix) = bench_device();
    let mut group = c.benchmark_group(format!("dp_step_transformer{suffix}"));
    // Seconds per step: flat sampling, ten steps per sample set.
    group.sample_size(10).sampling_mode(SamplingMode::Flat);
    let (b, t) = (GPT_BATCH, GPT.context);
    let ids = |offset: u32| -> Tensor {
        let v: Vec<u32> =
            (0..(b * t) as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 7).wrapping_add(offset) % 256).collect();
        Tensor::from_vec(v, (b, t), &dev).unwrap()
    };
    let (x, y) = (ids(0), ids(1));
    let sequence_losses = |m: &Gpt| loss::sequence_cross_entropy(&m.forward(&x).unwrap(), &y).unwrap();

    // The base weights as plain tensors (frozen for LoRA) and as variables (for full).
    let full = VarMap::new();
    let (dp_full, plain_full) = (
        Gpt::new(GPT, VarBuilder::from_varmap(&full, DType::F32, &dev), Flavor::Dp, None).unwrap(),
        Gpt::new(GPT, VarBuilder::from_varmap(&full, DType::F32, &dev), Flavor::Plain, None).unwrap(),
    );
    let base: std::collections::HashMap<String, Tensor> =
        full.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect();
    let adapter = VarMap::new();
    let lora = |flavor| {
        let adapters = Adapters {
            config: LoraConfig { rank: 8, alpha: 16.0 },
            vb: VarBuilder::from_varmap(&adapter, DType::F32, &dev),
        };
        Gpt::new(GPT, VarBuilder::from_tensors(base.clone(), DType::F32, &dev), flavor, Some(adapters)).unwrap()
    };
    let (dp_lora, plain_lora) = (lora(Flavor::Dp), lora(Flavor::Plain));

    for (name, varmap, dp, plain) in [("full", &full, &dp_full, &plain_full), ("lora", &adapter, &dp_lora, &plain_lora)]
    {
        let vars = candle_dp::vars_by_name(varmap);
        let mut sgd = SGD::new(vars.clone(), 0.01).unwrap();
        group.bench_function(BenchmarkId::new("non_private", name), |bench| {
            bench.iter(|| {
                sgd.backward_step(&sequence_losses(plain).tensor().mean_all().unwrap()).unwrap();
                dev.synchronize().unwrap();
            })
        });
        let mut ghost = dp_sgd(vars.clone(), PoissonSampler::seeded(b, 1.0, 0).unwrap(), Engine::Ghost);
        group.bench_function(BenchmarkId::new("dp_ghost", name), |bench| {
            bench.iter(|| {
                let s = ghost.train_step(|_| Ok(sequence_losses(dp))).unwrap();
                assert_eq!(s.examples, b, "q = 1 draws every example");
                dev.synchronize().unwrap();
            })
        });
        drop(ghost);
        let params: usize = vars.iter().map(|v| v.elem_count()).sum();
        let mut noise = GaussianNoise::from_seed(1);
        let mut buf = vec![0.0f32; params];
        group.bench_function(BenchmarkId::new("noise_only", name), |bench| {
            bench.iter(|| noise.add_scaled_to_f32(&mut buf, 1.0, 0.5))
        });
    }
    group.finish();
}

/// Where a DP step's extra time goes: the norms (the engine's choice of
/// method) and the clipped sum of each projection's weight in one block of
/// the transformer at B = 32, T = 128 (`x4` blocks for a step). Not timed
/// here: biases, layer norms, the tied table and the noise (`noise_only`).
fn transformer_parts(c: &mut Criterion) {
    use candle_dp::grad_sample::per_example::{linear_clipped_sum, linear_squared_norm_bounds, NormMethod};
    let (dev, suffix) = bench_device();
    let mut group = c.benchmark_group(format!("dp_step_transformer_parts{suffix}"));
    group.sample_size(10);
    let (b, t, d) = (GPT_BATCH, GPT.context, GPT.d_model);
    let factors = Tensor::ones(b, DType::F64, &dev).unwrap();
    for (name, p, q) in [("c_attn", 3 * d, d), ("attn_c_proj", d, d), ("c_fc", 4 * d, d), ("mlp_c_proj", d, 4 * d)] {
        let g = Tensor::randn(0f32, 1.0, (b, t, p), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (b, t, q), &dev).unwrap();
        group.bench_function(BenchmarkId::new("norms", name), |bench| {
            bench.iter(|| {
                linear_squared_norm_bounds(&g, &x, NormMethod::Auto).unwrap();
                dev.synchronize().unwrap();
            })
        });
        group.bench_function(BenchmarkId::new("clipped_sum", name), |bench| {
            bench.iter(|| {
                linear_clipped_sum(&g, &x, &factors).unwrap();
                dev.synchronize().unwrap();
            })
        });
    }
    group.finish();
}

/// Mixed precision: the DP ghost step of the MLP (784-512-10, batch 256)
/// with bf16 and f16 weights and activations (norms, clip factors, sums and
/// noise in f32, f32 master weights) against the same step in f32, one
/// group, one run. `mixed_precision/<dtype>` over `mixed_precision/f32`.
fn mixed_precision(c: &mut Criterion) {
    let (dev, suffix) = bench_device();
    let mut group = c.benchmark_group(format!("mixed_precision{suffix}"));
    group.sample_size(20);
    let b = 256;
    let x32 = Tensor::randn(0f32, 1.0, (b, 784), &dev).unwrap();
    let y = Tensor::from_vec((0..b as u32).map(|i| i % 10).collect(), b, &dev).unwrap();
    for (name, dtype) in [("f32", DType::F32), ("bf16", DType::BF16), ("f16", DType::F16)] {
        let varmap = VarMap::new();
        let (dp, _) = build(false, VarBuilder::from_varmap(&varmap, dtype, &dev)).unwrap();
        let x = x32.to_dtype(dtype).unwrap();
        let mut opt =
            dp_sgd(candle_dp::vars_by_name(&varmap), PoissonSampler::seeded(b, 1.0, 0).unwrap(), Engine::Ghost);
        group.bench_function(BenchmarkId::new("mlp_784_512_10_b256", name), |bench| {
            bench.iter(|| {
                let s = opt.train_step(|_| loss::cross_entropy(&dp.forward(&x)?, &y)).unwrap();
                assert_eq!(s.examples, b, "q = 1 draws every example");
                dev.synchronize().unwrap();
            })
        });
    }
    group.finish();
}

fn main() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // Before any thread pool exists: pins Candle's CPU kernels to one thread.
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    eprintln!(
        "dp_step: RAYON_NUM_THREADS={}, allocator: system (glibc malloc, default settings)",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_default()
    );
    let mut c = Criterion::default().configure_from_args();
    dp_step(&mut c);
    transformer_step(&mut c);
    transformer_parts(&mut c);
    mixed_precision(&mut c);
    c.final_summary();
}
