//! The ghost-versus-materialize rule, measured: per-example gradient norms
//! of one linear use `grad_i = G_i^T X_i` by the Gram form and by
//! materializing the gradients, over the layer shapes of a transformer.
//!
//! * Layers `[p, d]`: `d x d` (attention output), `4d x d` (MLP), `8 x d`
//!   (a LoRA `A` of rank 8); `d` 256 and 1024; `T` 64 to 512 positions;
//!   `B = 4` examples (both costs are linear in `B`); f32 factors with
//!   Gaussian entries.
//! * `gram` and `materialize` force the method; the engine's own choice
//!   (`chooses_gram`) is printed before the measurements, with the choices
//!   of two simpler rules and whether each method's f32 bound was loose
//!   enough for it to run in f64.
//! * Flops: the Gram form costs `2 B T^2 (p + d)`, materializing
//!   `2 B T p d`, so by flops Gram wins when `T (p + d) < p d`; by memory
//!   (`B T^2` against `B p d`) when `T^2 < p d` (Li et al. 2021). The
//!   engine's rule is the flop count with each side doubled where it is
//!   expected to run in f64.
//!
//! One thread, as `dp_step`. Report each case's ratio gram / materialize.

use candle_core::{DType, Device, Tensor};
use candle_dp::grad_sample::per_example::{chooses_gram, linear_squared_norm_bounds, NormMethod};
use criterion::{BenchmarkId, Criterion, SamplingMode};

const B: usize = 4;

fn cases() -> Vec<(String, usize, usize, usize)> {
    let mut v = Vec::new();
    for d in [256usize, 1024] {
        for (layer, p) in [("square", d), ("mlp", 4 * d), ("lora_a", 8)] {
            for t in [64usize, 128, 256, 512] {
                v.push((format!("{layer}_p{p}_d{d}_t{t}"), p, d, t));
            }
        }
    }
    v
}

fn norm_rule(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut group = c.benchmark_group("norm_rule");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3));
    for (name, p, d, t) in cases() {
        let g = Tensor::randn(0f32, 1.0, (B, t, p), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (B, t, d), &dev).unwrap();
        let widened = |m| linear_squared_norm_bounds(&g, &x, m).unwrap().1;
        let name_of = |gram: bool| if gram { "gram" } else { "materialize" };
        eprintln!(
            "norm_rule/{name}: engine picks {}; flops favour {}; memory {}; in f64: gram {}, materialize {}",
            name_of(chooses_gram(t, p, d, DType::F32, false)),
            name_of(t * (p + d) <= p * d),
            name_of(t * t <= p * d),
            widened(NormMethod::Gram),
            widened(NormMethod::Materialize),
        );
        for (label, method) in [("gram", NormMethod::Gram), ("materialize", NormMethod::Materialize)] {
            group.bench_function(BenchmarkId::new(label, &name), |bench| {
                bench.iter(|| linear_squared_norm_bounds(&g, &x, method).unwrap())
            });
        }
    }
    group.finish();
}

fn main() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // Before any thread pool exists: pins Candle's CPU kernels to one thread.
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let mut c = Criterion::default().configure_from_args();
    norm_rule(&mut c);
    c.final_summary();
}
