//! A logical batch split into physical chunks (`max_physical_batch_size`)
//! gives the clipped sum of one physical batch (f64, 1e-12 relative: only
//! the summation order differs), the same noise and the same ledger.

use candle_core::{DType, Device, Module, Tensor};
use candle_dp::{linear, loss, vars_by_name, ClipMode, DpLinear, DpOptimizer, GaussianNoise, PoissonSampler};
use candle_nn::{VarBuilder, VarMap, SGD};

const N: usize = 40;

struct Model {
    varmap: VarMap,
    fc1: DpLinear,
    fc2: DpLinear,
}

impl Model {
    fn new() -> Self {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
        let (fc1, fc2) = (linear(4, 5, vb.pp("fc1")).unwrap(), linear(5, 3, vb.pp("fc2")).unwrap());
        for (k, v) in vars_by_name(&varmap).iter().enumerate() {
            let values: Vec<f64> = (0..v.elem_count()).map(|i| ((i * 7 + k) as f64 * 0.61).sin()).collect();
            v.set(&Tensor::from_vec(values, v.shape(), &Device::Cpu).unwrap()).unwrap();
        }
        Self { varmap, fc1, fc2 }
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.tanh()?)
    }

    fn weights(&self) -> Vec<f64> {
        vars_by_name(&self.varmap)
            .iter()
            .flat_map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    }
}

/// `steps` steps with chunks of at most `chunk` (None: one physical batch);
/// returns the model, the ledger head, each step's summary, and every chunk
/// size the closure was called with.
fn run(
    chunk: Option<usize>,
    clipping: ClipMode,
    steps: usize,
) -> (Model, String, Vec<candle_dp::StepSummary>, Vec<usize>) {
    let model = Model::new();
    let x =
        Tensor::from_vec((0..4 * N).map(|i| (i as f64 * 0.37).cos() * 3.0).collect(), (N, 4), &Device::Cpu).unwrap();
    let y = Tensor::from_vec((0..N as u32).map(|i| i % 3).collect(), N, &Device::Cpu).unwrap();
    // Almost no noise, so that the updates are the clipped sums.
    let mut b = DpOptimizer::<SGD>::builder(vars_by_name(&model.varmap), PoissonSampler::seeded(N, 0.5, 9).unwrap())
        .noise_multiplier(1e-9)
        .max_grad_norm(0.5)
        .clipping(clipping)
        .noise(GaussianNoise::from_seed(4));
    if let Some(c) = chunk {
        b = b.max_physical_batch_size(c);
    }
    let mut opt = b.build(1.0).unwrap();
    let (mut summaries, mut sizes) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        summaries.push(
            opt.train_step(|idx| {
                sizes.push(idx.len());
                let t = Tensor::from_vec(idx.iter().map(|&i| i as u32).collect(), idx.len(), &Device::Cpu)?;
                loss::cross_entropy(&model.forward(&x.index_select(&t, 0)?)?, &y.index_select(&t, 0)?)
            })
            .unwrap(),
        );
    }
    let head = opt.ledger().unwrap().head();
    drop(opt);
    (model, head, summaries, sizes)
}

fn max_rel_diff(a: &[f64], b: &[f64], scale: &[f64]) -> f64 {
    a.iter().zip(b).zip(scale).map(|((a, b), s)| (a - b).abs() / s.abs().max(1e-300)).fold(0.0, f64::max)
}

#[test]
fn chunked_logical_batches_equal_one_physical_batch() {
    let initial = Model::new().weights();
    for clipping in [ClipMode::Flat, ClipMode::per_layer_uniform(0.5, 2)] {
        let (whole, whole_head, whole_steps, whole_sizes) = run(None, clipping.clone(), 4);
        let (chunked, chunked_head, chunked_steps, chunked_sizes) = run(Some(3), clipping.clone(), 4);
        // The same batches were drawn, one call each against calls of <= 3.
        let examples: Vec<usize> = whole_steps.iter().map(|s| s.examples).collect();
        assert_eq!(examples, chunked_steps.iter().map(|s| s.examples).collect::<Vec<_>>());
        assert!(examples.iter().all(|&e| e > 3), "{examples:?}: every batch is split");
        assert_eq!(whole_sizes, examples);
        assert!(chunked_sizes.iter().all(|&s| (1..=3).contains(&s)), "{chunked_sizes:?}");
        assert_eq!(chunked_sizes.iter().sum::<usize>(), examples.iter().sum::<usize>());
        for (w, c) in whole_steps.iter().zip(&chunked_steps) {
            assert_eq!((w.chunks, c.chunks), (1, w.examples.div_ceil(3)));
            assert!((w.loss_sum - c.loss_sum).abs() <= 1e-12 * w.loss_sum.abs(), "{w:?} vs {c:?}");
        }
        // The updates (the clipped sums over the expected batch size, the
        // noise negligible and identical) agree to 1e-12 relative.
        let delta = |m: &Model| m.weights().iter().zip(&initial).map(|(w, i)| w - i).collect::<Vec<_>>();
        let (dw, dc) = (delta(&whole), delta(&chunked));
        let d = max_rel_diff(&dc, &dw, &dw);
        assert!(d < 1e-12, "{clipping:?}: chunked updates differ by {d:e} relative");
        assert!(dw.iter().all(|v| v.abs() > 1e-9), "every coordinate is updated by the clipped sum");
        assert_eq!(chunked_head, whole_head, "{clipping:?}: the ledger is the same");
    }
}
