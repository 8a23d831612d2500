//! Mixed precision (issue 17): bf16 and f16 models, whose per-example
//! norms, clip factors, clipped sums, noise and division run in f32 or
//! wider and whose inner optimizer steps f32 master weights.
//!
//! * The half-precision ghost paths equal the f32 path on the same
//!   (rounded) weights and inputs, on an MLP, a CNN (f16 only on the CPU:
//!   Candle's CPU conv2d has no bf16 kernel; both on a GPU) and the
//!   transformer, on the CPU and on a CUDA device when one is present
//!   (`--features cuda`; skipped with the reason printed otherwise),
//!   within tolerances stated from the formats' unit roundoff u (bf16 2^-8,
//!   f16 2^-11): the forward and backward round every activation and
//!   gradient to the model's dtype, a few roundings per layer compounded
//!   over the depth, so norms and clipped sums agree to `K u` with `K` = 16
//!   for these 2- to 4-layer models.
//! * No example's contribution exceeds `C`, in f64, without tolerance, for
//!   all three models in both formats.
//! * The master weights: noise-only steps whose updates are below half a
//!   bf16 ulp move the f32 masters exactly as the f32 run moves its
//!   weights, and the model is that, rounded once (without masters the
//!   weights would never move); a checkpoint keeps the masters.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_dp::grad_sample::ghost::GhostEngine;
use candle_dp::models::{Flavor, Gpt, GptConfig};
use candle_dp::optim::AdamW;
use candle_dp::{loss, ClipMode, DpOptimizer, GaussianNoise, PerSampleLoss, PoissonSampler};
use candle_dp::{DpLinear, StatefulOptimizer};
use candle_nn::{ParamsAdamW, VarBuilder, VarMap, SGD};
use common::{norm, rel_diff, tensor, values, vars_by_name};

/// Unit roundoff of the half formats.
fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
        _ => unreachable!(),
    }
}

/// The tolerance of the comparisons with f32, in units of u (module docs).
const K: f64 = 16.0;

/// Which model.
#[derive(Debug, Clone, Copy)]
enum Net {
    Mlp,
    Cnn,
    Gpt,
}

/// The models each format runs on `device`: Candle's CPU conv2d has no
/// bf16 kernel ("unsupported dtype BF16 for op matmul"), so the bf16 CNN
/// runs on a CUDA device only.
fn nets(dtype: DType, device: &Device) -> &'static [Net] {
    match dtype {
        DType::BF16 if device.is_cpu() => &[Net::Mlp, Net::Gpt],
        _ => &[Net::Mlp, Net::Cnn, Net::Gpt],
    }
}

/// The CPU, and the first CUDA device if this build reaches one.
fn devices() -> Vec<Device> {
    let mut devices = vec![Device::Cpu];
    match Device::new_cuda(0) {
        Ok(d) => devices.push(d),
        // The first line: Candle's CUDA errors carry a backtrace.
        Err(e) => eprintln!("mixed precision not tested on CUDA: {}", e.to_string().lines().next().unwrap_or("")),
    }
    devices
}

const GPT: GptConfig = GptConfig { vocab_size: 32, context: 8, d_model: 16, n_layers: 2, n_heads: 2 };

/// A model of kind `net` in `dtype` on `device` over `varmap`, and its
/// per-example losses on `b` fixed examples (inputs rounded through `via`).
fn model(
    net: Net,
    dtype: DType,
    varmap: &VarMap,
    b: usize,
    via: DType,
    device: &Device,
) -> Box<dyn Fn() -> PerSampleLoss> {
    let vb = VarBuilder::from_varmap(varmap, dtype, device);
    let input = |shape: &[usize], seed| {
        tensor(shape, seed, 1.0, via).unwrap().to_dtype(dtype).unwrap().to_device(device).unwrap()
    };
    let labels = |k: u32| Tensor::from_vec((0..b as u32).map(|i| i % k).collect(), b, device).unwrap();
    match net {
        Net::Mlp => {
            let (l1, l2) =
                (candle_dp::linear(12, 16, vb.pp("l1")).unwrap(), candle_dp::linear(16, 5, vb.pp("l2")).unwrap());
            let (x, y) = (input(&[b, 12], 1), labels(5));
            Box::new(move || {
                loss::cross_entropy(&l2.forward(&l1.forward(&x).unwrap().tanh().unwrap()).unwrap(), &y).unwrap()
            })
        }
        Net::Cnn => {
            let c = candle_dp::conv2d(2, 4, 3, Default::default(), vb.pp("c")).unwrap();
            let fc = candle_dp::linear(4 * 6 * 6, 3, vb.pp("fc")).unwrap();
            let (x, y) = (input(&[b, 2, 8, 8], 2), labels(3));
            Box::new(move || {
                let h = c.forward(&x).unwrap().relu().unwrap().flatten_from(1).unwrap();
                loss::cross_entropy(&fc.forward(&h).unwrap(), &y).unwrap()
            })
        }
        Net::Gpt => {
            let gpt = Gpt::new(GPT, vb, Flavor::Dp, None).unwrap();
            let ids = |seed: u64| {
                let v: Vec<u32> =
                    values(b * GPT.context, seed, 1.0).iter().map(|u| ((u + 1.0) * 15.99) as u32).collect();
                Tensor::from_vec(v, (b, GPT.context), device).unwrap()
            };
            let (x, y) = (ids(3), ids(4));
            Box::new(move || loss::sequence_cross_entropy(&gpt.forward(&x).unwrap(), &y).unwrap())
        }
    }
}

/// Sets every variable to deterministic values rounded through `via`.
fn set_rounded(varmap: &VarMap, via: DType) {
    for (k, var) in vars_by_name(varmap).iter().enumerate() {
        let t = tensor(var.dims(), 50 + k as u64, 0.4, via).unwrap().to_dtype(var.dtype()).unwrap();
        let t = t.to_device(var.device()).unwrap();
        var.set(&t).unwrap();
    }
}

/// The ghost engine's norms and clipped sums of `net` in `dtype`, and of
/// the same weights and inputs in f32, on `device`.
fn half_and_f32(net: Net, dtype: DType, c: f64, device: &Device) -> [(Vec<f64>, Vec<Tensor>); 2] {
    let b = 6;
    [dtype, DType::F32].map(|d| {
        let varmap = VarMap::new();
        let losses = model(net, d, &varmap, b, dtype, device);
        set_rounded(&varmap, dtype);
        let engine = GhostEngine::new(&vars_by_name(&varmap)).unwrap();
        let out = engine.clip(&losses(), &ClipMode::Flat, c).unwrap();
        (out.norms, out.clipped_sums)
    })
}

#[test]
fn half_precision_ghost_paths_equal_the_f32_path() {
    for (device, dtype) in devices().iter().flat_map(|d| [(d, DType::BF16), (d, DType::F16)]) {
        let tol = K * unit_roundoff(dtype);
        for &net in nets(dtype, device) {
            // C large (no clipping: the sums themselves) and small (every example clipped).
            for c in [1e6, 1e-2] {
                let [(half_norms, half_sums), (norms, sums)] = half_and_f32(net, dtype, c, device);
                let worst_norm = half_norms.iter().zip(&norms).map(|(h, f)| (h - f).abs() / f).fold(0.0, f64::max);
                let worst_sum = half_sums.iter().zip(&sums).map(|(h, f)| rel_diff(h, f)).fold(0.0, f64::max);
                eprintln!(
                    "{device:?} {net:?} {dtype:?} C {c}: norms {:.2} u, sums {:.2} u",
                    worst_norm / unit_roundoff(dtype),
                    worst_sum / unit_roundoff(dtype)
                );
                for (h, f) in half_norms.iter().zip(&norms) {
                    assert!((h - f).abs() <= tol * f, "{device:?} {net:?} {dtype:?}: norm {h} vs f32 {f}");
                }
                for (k, (h, f)) in half_sums.iter().zip(&sums).enumerate() {
                    assert_eq!(h.dtype(), DType::F32, "sums are never rounded to {dtype:?}");
                    let d = rel_diff(h, f);
                    assert!(d <= tol, "{device:?} {net:?} {dtype:?} C {c}: variable {k} differs by {d:e} > {tol:e}");
                }
                if c < 1.0 {
                    assert!(norms.iter().all(|n| *n > c), "{net:?}: C = {c} must clip every example");
                }
            }
        }
    }
}

/// One example at a time, thresholds from 0.01 to 100: its contribution,
/// computed in f64 from the f32 clipped sums, is at most C.
#[test]
fn no_example_exceeds_c_in_half_precision() {
    for (device, dtype) in devices().iter().flat_map(|d| [(d, DType::BF16), (d, DType::F16)]) {
        for &net in nets(dtype, device) {
            let varmap = VarMap::new();
            let losses = model(net, dtype, &varmap, 1, dtype, device);
            set_rounded(&varmap, dtype);
            let engine = GhostEngine::new(&vars_by_name(&varmap)).unwrap();
            let mut clipped = 0;
            for k in 0..12 {
                let c = 10f64.powf(-2.0 + 4.0 * f64::from(k) / 11.0);
                let out = engine.clip(&losses(), &ClipMode::Flat, c).unwrap();
                let total = out.clipped_sums.iter().map(|t| norm(t).powi(2)).sum::<f64>().sqrt();
                assert!(total <= c, "{device:?} {net:?} {dtype:?}: contribution {total} > C = {c}");
                clipped += usize::from(out.norms[0] > c);
            }
            assert!((2..12).contains(&clipped), "{device:?} {net:?} {dtype:?}: both regimes ({clipped} clipped)");
        }
    }
}

/// A DP MLP in `dtype` over 25 examples whose batches are empty (q tiny):
/// each step releases noise alone, in f32 for every dtype. SGD at a rate
/// that makes the updates about 1e-4, below half a bf16 ulp of every
/// weight with |w| >= 1/16 (2.4e-4 and up).
struct NoiseRun<O: StatefulOptimizer = SGD> {
    varmap: VarMap,
    opt: DpOptimizer<O>,
}

const N: usize = 25;

/// Updates of about 1e-4 (the noise of the mean, 4e10, times the rate).
const LR: f64 = 2.5e-15;

/// The two linear layers of a [`NoiseRun`], `l1` in `dtypes[0]` and `l2`
/// in `dtypes[1]`, with the same initial weights for every dtype (exactly
/// representable in bf16). The layers own the variables: keep them while
/// the optimizer is built.
fn noise_model(dtypes: [DType; 2], device: &Device) -> (VarMap, [DpLinear; 2]) {
    let varmap = VarMap::new();
    let vb = |dtype| VarBuilder::from_varmap(&varmap, dtype, device);
    let l1 = candle_dp::linear(6, 8, vb(dtypes[0]).pp("l1")).unwrap();
    let l2 = candle_dp::linear(8, 3, vb(dtypes[1]).pp("l2")).unwrap();
    set_rounded(&varmap, DType::BF16);
    (varmap, [l1, l2])
}

impl NoiseRun {
    fn new(dtype: DType) -> Self {
        NoiseRun::on(dtype, &Device::Cpu)
    }

    fn on(dtype: DType, device: &Device) -> Self {
        NoiseRun::with([dtype; 2], LR, device)
    }
}

impl<O: StatefulOptimizer> NoiseRun<O> {
    fn with(dtypes: [DType; 2], config: O::Config, device: &Device) -> Self {
        let (varmap, _layers) = noise_model(dtypes, device);
        let opt = Self::builder(&varmap).build(config).unwrap();
        NoiseRun { varmap, opt }
    }

    fn builder(varmap: &VarMap) -> candle_dp::DpOptimizerBuilder<O> {
        DpOptimizer::<O>::builder(vars_by_name(varmap), PoissonSampler::seeded(N, 1e-12, 5).unwrap())
            .noise_multiplier(1.0)
            .max_grad_norm(1.0)
            .noise(GaussianNoise::from_seed(8))
    }

    /// A checkpoint of this run, resumed on a new model of `dtypes` on the CPU.
    fn checkpointed(self, dtypes: [DType; 2], config: O::Config, name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("candle-dp-masters-{name}-{}", std::process::id()));
        let mut run = self;
        run.opt.save_checkpoint(&dir, &run.varmap).unwrap();
        drop(run);
        let (varmap, _layers) = noise_model(dtypes, &Device::Cpu);
        let opt = DpOptimizer::<O>::resume(&dir, &varmap, vars_by_name(&varmap), config).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        NoiseRun { varmap, opt }
    }

    fn steps(&mut self, k: usize) {
        for _ in 0..k {
            let s = self.opt.train_step(|_| unreachable!("the batches are empty")).unwrap();
            assert_eq!(s.examples, 0);
        }
    }

    /// The weights in f64, rounded to `dtype` first.
    fn weights(&self, dtype: DType) -> Vec<f64> {
        vars_by_name(&self.varmap)
            .iter()
            .flat_map(|v| {
                let t = v.as_tensor().to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap();
                t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
            })
            .collect()
    }
}

/// The bf16 and f16 models step f32 masters exactly as the f32 model steps
/// its weights (the same noise, in f32, on the same initial values), and
/// hold them rounded once: bit for bit. The updates are below half an ulp
/// of most bf16 weights, so without masters those would never move.
#[test]
fn master_weights_keep_what_half_precision_rounds_away() {
    let steps = 30;
    for device in devices() {
        let mut f32_run = NoiseRun::on(DType::F32, &device);
        let initial = f32_run.weights(DType::F32);
        f32_run.steps(steps);
        for dtype in [DType::BF16, DType::F16] {
            let mut half = NoiseRun::on(dtype, &device);
            assert_eq!(half.weights(DType::F64), initial, "{device:?} {dtype:?}: the same start");
            half.steps(1);
            let moved_by_one = half.weights(DType::F64).iter().zip(&initial).filter(|(a, b)| a != b).count();
            half.steps(steps - 1);
            assert_eq!(
                half.weights(DType::F64),
                f32_run.weights(dtype),
                "{device:?} {dtype:?}: the f32 run's weights, rounded"
            );
            let moved = half.weights(DType::F64).iter().zip(&initial).filter(|(a, b)| a != b).count();
            if dtype == DType::BF16 {
                // One step moves few bf16 weights; the masters carry the rest until they round over.
                assert!(
                    moved_by_one * 4 < initial.len(),
                    "bf16: {moved_by_one} of {} moved in one step",
                    initial.len()
                );
                assert!(moved > 2 * moved_by_one, "bf16: the masters accumulated ({moved_by_one} -> {moved})");
            }
        }
    }
}

/// Weights set from outside after the optimizer was built (loaded, say)
/// are what the next step updates: the masters take them, so the bf16 run
/// goes on as the f32 run given the same weights does, bit for bit, instead
/// of returning to its stale masters.
#[test]
fn weights_set_after_build_become_the_masters() {
    let mut f32_run = NoiseRun::new(DType::F32);
    let mut half = NoiseRun::new(DType::BF16);
    f32_run.steps(3);
    half.steps(3);
    // New weights, exact in bf16 and far from the trained ones.
    for run in [&f32_run, &half] {
        for var in vars_by_name(&run.varmap) {
            let t = var.as_tensor();
            let set = ((t.to_dtype(DType::BF16).unwrap() * 2.0).unwrap() + 0.5).unwrap();
            var.set(&set.to_dtype(t.dtype()).unwrap()).unwrap();
        }
    }
    assert_eq!(half.weights(DType::F64), f32_run.weights(DType::F64), "the same weights set");
    half.steps(5);
    f32_run.steps(5);
    assert_eq!(half.weights(DType::F64), f32_run.weights(DType::BF16), "the f32 run's weights, rounded");
}

/// A checkpoint of a bf16 run keeps its masters: resumed, it ends where
/// the uninterrupted run does, bit for bit.
#[test]
fn a_checkpoint_keeps_the_master_weights() {
    let mut whole = NoiseRun::new(DType::BF16);
    whole.steps(20);
    let mut first = NoiseRun::new(DType::BF16);
    first.steps(7);
    let mut resumed = first.checkpointed([DType::BF16; 2], LR, "sgd");
    resumed.steps(13);
    assert_eq!(resumed.weights(DType::F64), whole.weights(DType::F64));
}

/// A model with f32 and bf16 layers under AdamW: the masters (of the bf16
/// layer only) and the moments (over the masters and the f32 weights) are
/// both in the checkpoint, and line up by variable: resumed, the run ends
/// where the uninterrupted one does, bit for bit, and where the f32 run
/// does (the bf16 layer rounded, the f32 layer exactly).
#[test]
fn a_mixed_model_under_adamw_resumes_bit_for_bit() {
    let adam = || ParamsAdamW { lr: 1e-3, weight_decay: 0.0, ..Default::default() };
    let mixed = [DType::BF16, DType::F32];
    let mut f32_run = NoiseRun::<AdamW>::with([DType::F32; 2], adam(), &Device::Cpu);
    f32_run.steps(20);
    let mut whole = NoiseRun::<AdamW>::with(mixed, adam(), &Device::Cpu);
    whole.steps(20);
    let mut first = NoiseRun::<AdamW>::with(mixed, adam(), &Device::Cpu);
    first.steps(7);
    let mut resumed = first.checkpointed(mixed, adam(), "adamw");
    resumed.steps(13);
    assert_eq!(resumed.weights(DType::F64), whole.weights(DType::F64), "resumed = uninterrupted");
    let layer = |run: &NoiseRun<AdamW>, name: &str, dtype: DType| -> Vec<f64> {
        let vars = run.varmap.data().lock().unwrap();
        let mut names: Vec<_> = vars.keys().filter(|k| k.starts_with(name)).cloned().collect();
        names.sort();
        names
            .iter()
            .flat_map(|k| {
                let rounded = vars[k].as_tensor().to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap();
                rounded.flatten_all().unwrap().to_vec1::<f64>().unwrap()
            })
            .collect()
    };
    assert_eq!(
        layer(&whole, "l1", DType::F64),
        layer(&f32_run, "l1", DType::BF16),
        "bf16 layer: the f32 run's, rounded"
    );
    assert_eq!(layer(&whole, "l2", DType::F64), layer(&f32_run, "l2", DType::F64), "f32 layer: the f32 run's");
    let moved = layer(&whole, "l1", DType::F64)
        != layer(&NoiseRun::<AdamW>::with(mixed, adam(), &Device::Cpu), "l1", DType::F64);
    assert!(moved, "the bf16 layer moved");
}
