//! The training loop that cannot be held wrong (issue 13): every misuse of
//! the stages of a step (`next_batch`, `accumulate`, `step`) is refused with
//! its own typed error and changes nothing (weights, steps, ledger, sampler);
//! `cancel_batch` puts a batch back; `train_step` runs a whole step, and on
//! any error changes nothing and draws the same batch next time.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_dp::{
    loss, ClipMode, DpLinear, DpOptimizer, Engine, Error, GaussianNoise, PerSampleLoss, PoissonSampler, Sampler,
    ShuffledSampler, StepSummary,
};
use candle_nn::{VarMap, SGD};
use common::{mlp_pair, set_deterministic, take, tensor, vars_by_name, Mlp};

const N: usize = 20;

/// Everything a refused call must leave as it was: the weights, the step
/// count, the ledger's head, and the batches the sampler will draw next.
#[derive(Debug, PartialEq)]
struct State {
    weights: Vec<f64>,
    steps: u64,
    ledger_head: String,
    next_draws: Vec<Vec<usize>>,
}

fn state(opt: &DpOptimizer<SGD>, varmap: &VarMap) -> State {
    let weights = vars_by_name(varmap)
        .iter()
        .flat_map(|v| v.as_tensor().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap())
        .collect();
    let mut sampler = opt.sampler().clone();
    State {
        weights,
        steps: opt.steps(),
        ledger_head: opt.ledger().unwrap().head(),
        next_draws: (0..3).map(|_| sampler.sample()).collect(),
    }
}

/// A DP MLP over `N` examples, its optimizer (ghost engine) and the data.
struct Run {
    varmap: VarMap,
    model: Mlp<DpLinear>,
    opt: DpOptimizer<SGD>,
    x: Tensor,
    y: Tensor,
}

impl Run {
    fn new(sampler: impl Into<Sampler>, max_physical_batch_size: Option<usize>) -> Self {
        let varmap = VarMap::new();
        let (model, _) = mlp_pair(&varmap, &[4, 8, 2], DType::F32).unwrap();
        set_deterministic(&varmap, 11).unwrap();
        let mut builder = DpOptimizer::<SGD>::builder(vars_by_name(&varmap), sampler)
            .noise_multiplier(1.0)
            .max_grad_norm(0.5)
            .noise(GaussianNoise::from_seed(5));
        if let Some(m) = max_physical_batch_size {
            builder = builder.max_physical_batch_size(m);
        }
        let opt = builder.build(0.1).unwrap();
        let x = tensor(&[N, 4], 12, 1.0, DType::F32).unwrap();
        let y = Tensor::from_vec((0..N as u32).map(|i| i % 2).collect(), N, &Device::Cpu).unwrap();
        Run { varmap, model, opt, x, y }
    }

    fn poisson(seed: u64) -> Self {
        Run::new(PoissonSampler::seeded(N, 0.5, seed).unwrap(), None)
    }

    /// The per-example losses of the examples `idx`.
    fn losses(&self, idx: &[usize]) -> candle_dp::Result<PerSampleLoss> {
        loss::cross_entropy(&self.model.forward(&take(&self.x, idx))?, &take(&self.y, idx))
    }

    fn state(&self) -> State {
        state(&self.opt, &self.varmap)
    }

    /// Steps (correctly) until the next batch has at least `min` examples.
    fn skip_to_batch_of_at_least(&mut self, min: usize) {
        while self.state().next_draws[0].len() < min {
            self.step_correctly();
        }
    }

    /// Draws a batch with at least `min` examples, stepping over smaller ones.
    fn batch_of_at_least(&mut self, min: usize) -> Vec<usize> {
        self.skip_to_batch_of_at_least(min);
        self.opt.next_batch().unwrap()
    }

    /// One correct step through the stages: the optimizer still works.
    fn step_correctly(&mut self) -> Vec<usize> {
        let idx = self.opt.next_batch().unwrap();
        if !idx.is_empty() {
            self.opt.accumulate(&self.losses(&idx).unwrap()).unwrap();
        }
        self.opt.step().unwrap();
        idx
    }
}

/// A twin of `Run::poisson(seed)` that takes `steps` correct steps: the
/// optimizer that saw a refused call must end where it does, bit for bit.
fn twin_weights(seed: u64, steps: usize) -> Vec<f64> {
    let mut twin = Run::poisson(seed);
    for _ in 0..steps {
        twin.step_correctly();
    }
    twin.state().weights
}

#[test]
fn accumulate_without_next_batch_is_out_of_order() {
    let mut run = Run::poisson(1);
    let losses = run.losses(&[0, 1, 2]).unwrap();
    let before = run.state();
    let err = run.opt.accumulate(&losses).unwrap_err();
    assert!(matches!(err, Error::OutOfOrder { call: "accumulate", .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "accumulate called without an open batch: next_batch() draws the batch to accumulate (or use train_step)"
    );
    assert_eq!(run.state(), before, "a refused accumulate changes nothing");
    // Nothing was accumulated: the next batch is drawn and stepped on as if
    // the call had not been made.
    let idx = run.step_correctly();
    assert_eq!(idx, before.next_draws[0]);
    assert_eq!(run.state().weights, twin_weights(1, 1));
}

#[test]
fn accumulate_microbatch_without_next_batch_is_out_of_order() {
    let varmap = VarMap::new();
    let (_, plain) = mlp_pair(&varmap, &[4, 8, 2], DType::F32).unwrap();
    let mut opt = DpOptimizer::<SGD>::builder(vars_by_name(&varmap), PoissonSampler::seeded(N, 0.5, 1).unwrap())
        .noise_multiplier(1.0)
        .engine(Engine::Microbatch)
        .noise(GaussianNoise::from_seed(1))
        .build(0.1)
        .unwrap();
    let x = tensor(&[N, 4], 3, 1.0, DType::F32).unwrap();
    let y = Tensor::from_vec((0..N as u32).map(|i| i % 2).collect(), N, &Device::Cpu).unwrap();
    let before = state(&opt, &varmap);
    let mut called = 0;
    let err = opt
        .accumulate_microbatch(2, |i| {
            called += 1;
            candle_nn::loss::cross_entropy(&plain.forward(&x.narrow(0, i, 1)?)?, &y.narrow(0, i, 1)?)
        })
        .unwrap_err();
    assert!(matches!(err, Error::OutOfOrder { call: "accumulate", .. }), "{err}");
    assert_eq!(called, 0, "refused before any example's loss is computed");
    assert_eq!(state(&opt, &varmap), before);
}

#[test]
fn step_without_next_batch_is_out_of_order() {
    let mut run = Run::poisson(2);
    let before = run.state();
    let err = run.opt.step().unwrap_err();
    assert!(matches!(err, Error::OutOfOrder { call: "step()", .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "step() called without an open batch: next_batch() draws the batch to step on (or use train_step)"
    );
    assert_eq!(run.state(), before, "a refused step changes nothing");
    // A step closes its batch: stepping again needs a new one.
    run.step_correctly();
    let after_one = run.state();
    let err = run.opt.step().unwrap_err();
    assert!(matches!(err, Error::OutOfOrder { call: "step()", .. }), "{err}");
    assert_eq!(run.state(), after_one);
    assert_eq!(run.opt.steps(), 1);
    assert_eq!(after_one.weights, twin_weights(2, 1));
}

#[test]
fn next_batch_twice_is_out_of_order() {
    let mut run = Run::poisson(3);
    let before = run.state();
    let idx = run.opt.next_batch().unwrap();
    assert_eq!(idx, before.next_draws[0]);
    let open = run.state();
    let err = run.opt.next_batch().unwrap_err();
    assert!(matches!(err, Error::OutOfOrder { call: "next_batch()", .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "next_batch() called while the batch drawn before is open: step() or cancel_batch() closes it"
    );
    assert_eq!(run.state(), open, "the refused draw drew nothing");
    assert_eq!(open.next_draws[0], before.next_draws[1]);
    // The batch drawn first is still the open one.
    if !idx.is_empty() {
        run.opt.accumulate(&run.losses(&idx).unwrap()).unwrap();
    }
    run.opt.step().unwrap();
    assert_eq!(run.state().weights, twin_weights(3, 1));
    assert_eq!(run.opt.next_batch().unwrap(), before.next_draws[1]);
}

#[test]
fn accumulating_more_than_drawn_is_a_batch_mismatch() {
    let mut run = Run::poisson(4);
    let idx = run.batch_of_at_least(3);
    let steps_before = run.opt.steps() as usize;
    let n = idx.len();
    // One chunk with an example too many.
    let mut too_many = idx.clone();
    too_many.push(idx[0]);
    let before = run.state();
    let err = run.opt.accumulate(&run.losses(&too_many).unwrap()).unwrap_err();
    assert!(matches!(err, Error::BatchMismatch { drawn, accumulated } if drawn == n && accumulated == n + 1), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "the batch drawn has {n} examples and {} were accumulated: accumulate exactly the examples of \
             next_batch() (the step was not taken)",
            n + 1
        )
    );
    assert_eq!(run.state(), before);
    // A second chunk that overshoots, after a first one that fits: the first
    // one stays, the refused one adds nothing.
    run.opt.accumulate(&run.losses(&idx[..2]).unwrap()).unwrap();
    let err = run.opt.accumulate(&run.losses(&idx[1..]).unwrap()).unwrap_err();
    assert!(matches!(err, Error::BatchMismatch { drawn, accumulated } if drawn == n && accumulated == n + 1), "{err}");
    assert_eq!(run.state(), before);
    run.opt.accumulate(&run.losses(&idx[2..]).unwrap()).unwrap();
    run.opt.step().unwrap();
    assert_eq!(run.opt.steps() as usize, steps_before + 1);
    // The twin accumulates the same chunks, without the refused ones.
    let mut twin = Run::poisson(4);
    assert_eq!(twin.batch_of_at_least(3), idx);
    twin.opt.accumulate(&twin.losses(&idx[..2]).unwrap()).unwrap();
    twin.opt.accumulate(&twin.losses(&idx[2..]).unwrap()).unwrap();
    twin.opt.step().unwrap();
    assert_eq!(run.state(), twin.state());
}

#[test]
fn stepping_before_every_example_is_accumulated_is_a_batch_mismatch() {
    let mut run = Run::poisson(5);
    let idx = run.batch_of_at_least(2);
    let n = idx.len();
    let before = run.state();
    // None accumulated.
    let err = run.opt.step().unwrap_err();
    assert!(matches!(err, Error::BatchMismatch { drawn, accumulated: 0 } if drawn == n), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "the batch drawn has {n} examples and 0 were accumulated: accumulate exactly the examples of \
             next_batch() (the step was not taken)"
        )
    );
    assert_eq!(run.state(), before);
    // Some accumulated.
    run.opt.accumulate(&run.losses(&idx[..1]).unwrap()).unwrap();
    let err = run.opt.step().unwrap_err();
    assert!(matches!(err, Error::BatchMismatch { drawn, accumulated: 1 } if drawn == n), "{err}");
    assert_eq!(run.state(), before);
    // The rest, and the step is taken.
    run.opt.accumulate(&run.losses(&idx[1..]).unwrap()).unwrap();
    run.opt.step().unwrap();
    let mut twin = Run::poisson(5);
    assert_eq!(twin.batch_of_at_least(2), idx);
    twin.opt.accumulate(&twin.losses(&idx[..1]).unwrap()).unwrap();
    twin.opt.accumulate(&twin.losses(&idx[1..]).unwrap()).unwrap();
    twin.opt.step().unwrap();
    assert_eq!(run.state(), twin.state());
}

#[test]
fn accumulate_with_the_microbatch_engine_is_wrong_engine() {
    let varmap = VarMap::new();
    let (_, plain) = mlp_pair(&varmap, &[4, 8, 2], DType::F32).unwrap();
    let mut opt = DpOptimizer::<SGD>::builder(vars_by_name(&varmap), PoissonSampler::seeded(N, 0.5, 6).unwrap())
        .noise_multiplier(1.0)
        .engine(Engine::Microbatch)
        .noise(GaussianNoise::from_seed(6))
        .build(0.1)
        .unwrap();
    let x = tensor(&[N, 4], 7, 1.0, DType::F32).unwrap();
    let y = Tensor::from_vec((0..N as u32).map(|i| i % 2).collect(), N, &Device::Cpu).unwrap();
    let idx = opt.next_batch().unwrap();
    assert!(!idx.is_empty());
    let open = state(&opt, &varmap);
    let losses = loss::cross_entropy(&plain.forward(&take(&x, &idx)).unwrap(), &take(&y, &idx)).unwrap();
    let err = opt.accumulate(&losses).unwrap_err();
    assert!(
        matches!(err, Error::WrongEngine { call: "accumulate", needs: Engine::Ghost, engine: Engine::Microbatch, .. }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "accumulate needs the Ghost engine; this optimizer uses Microbatch: use accumulate_microbatch (or train_step, \
         which calls the right one)"
    );
    assert_eq!(state(&opt, &varmap), open);
    // Nothing was accumulated: the batch still needs all its examples.
    let err = opt.step().unwrap_err();
    assert!(matches!(err, Error::BatchMismatch { accumulated: 0, .. }), "{err}");
    assert_eq!(state(&opt, &varmap), open);
    opt.accumulate_microbatch(idx.len(), |k| {
        candle_nn::loss::cross_entropy(&plain.forward(&take(&x, &idx[k..k + 1]))?, &take(&y, &idx[k..k + 1]))
    })
    .unwrap();
    opt.step().unwrap();
    assert_eq!(opt.steps(), 1);
    assert_ne!(state(&opt, &varmap).weights, open.weights);
}

#[test]
fn a_missing_noise_multiplier_is_a_missing_setting() {
    let varmap = VarMap::new();
    let (_model, _) = mlp_pair(&varmap, &[4, 2], DType::F32).unwrap();
    set_deterministic(&varmap, 8).unwrap();
    let weights = |varmap: &VarMap| -> Vec<Vec<f32>> {
        vars_by_name(varmap).iter().map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()).collect()
    };
    let before = weights(&varmap);
    let sampler = PoissonSampler::seeded(N, 0.5, 8).unwrap();
    let builders = [
        DpOptimizer::<SGD>::builder(vars_by_name(&varmap), sampler.clone()),
        // A budget alone enforces, it does not calibrate: still no noise multiplier.
        DpOptimizer::<SGD>::builder(vars_by_name(&varmap), sampler.clone())
            .budget(candle_dp::PrivacyBudget { epsilon: 1.0, delta: 1e-5 }),
    ];
    for builder in builders {
        let err = builder.build(0.1).unwrap_err();
        assert!(matches!(err, Error::MissingSetting { setting: "the noise multiplier", .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "the noise multiplier is not set: call noise_multiplier(..) or target(..) on the builder"
        );
    }
    assert_eq!(weights(&varmap), before);
    // The refused builds claimed nothing: the layers can still be trained.
    let mut opt = DpOptimizer::<SGD>::builder(vars_by_name(&varmap), sampler).noise_multiplier(1.0).build(0.1).unwrap();
    assert_eq!((opt.steps(), opt.ledger().unwrap().total_steps()), (0, 0));
    let idx = opt.next_batch().unwrap();
    assert_eq!(idx, PoissonSampler::seeded(N, 0.5, 8).unwrap().sample(), "the sampler was not drawn from");
}

#[test]
fn per_layer_clipping_with_the_microbatch_engine_is_incompatible() {
    let varmap = VarMap::new();
    let (_, _plain) = mlp_pair(&varmap, &[4, 3, 2], DType::F32).unwrap();
    let sampler = PoissonSampler::seeded(N, 0.5, 9).unwrap();
    for clipping in [ClipMode::PerLayer(vec![0.5, 0.5]), ClipMode::per_layer_uniform(1.0, 2)] {
        let err = DpOptimizer::<SGD>::builder(vars_by_name(&varmap), sampler.clone())
            .noise_multiplier(1.0)
            .engine(Engine::Microbatch)
            .clipping(clipping)
            .build(0.1)
            .unwrap_err();
        assert!(
            matches!(err, Error::Incompatible { setting: "per-layer clipping", with: "the microbatch engine", .. }),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "per-layer clipping cannot be used with the microbatch engine: per-layer thresholds apply to DP layers, \
             which only the ghost engine reads"
        );
    }
    // Flat clipping with the same engine, variables and sampler is accepted.
    DpOptimizer::<SGD>::builder(vars_by_name(&varmap), sampler)
        .noise_multiplier(1.0)
        .engine(Engine::Microbatch)
        .build(0.1)
        .unwrap();
}

#[test]
fn cancel_batch_puts_the_batch_back() {
    let mut run = Run::poisson(10);
    run.skip_to_batch_of_at_least(2);
    let before = run.state();
    let idx = run.opt.next_batch().unwrap();
    let steps = run.opt.steps() as usize;
    run.opt.accumulate(&run.losses(&idx[..1]).unwrap()).unwrap();
    run.opt.cancel_batch();
    let cancelled = run.state();
    assert_eq!(cancelled, before, "as before the draw: the cancelled batch is the next one drawn");
    assert_eq!(cancelled.next_draws[0], idx);
    // Closed: nothing to step on or accumulate into.
    assert!(matches!(run.opt.step(), Err(Error::OutOfOrder { call: "step()", .. })));
    assert!(matches!(run.opt.accumulate(&run.losses(&idx[1..]).unwrap()), Err(Error::OutOfOrder { .. })));
    assert_eq!(run.state(), cancelled);
    // Without an open batch, cancel_batch does nothing.
    run.opt.cancel_batch();
    assert_eq!(run.state(), cancelled);
    assert_eq!(run.opt.next_batch().unwrap(), idx);
    // The chunk accumulated before the cancel is gone: the whole batch is needed again.
    run.opt.accumulate(&run.losses(&idx[1..]).unwrap()).unwrap();
    let err = run.opt.step().unwrap_err();
    assert!(
        matches!(err, Error::BatchMismatch { drawn, accumulated } if drawn == idx.len() && accumulated == idx.len() - 1),
        "{err}"
    );
    run.opt.accumulate(&run.losses(&idx[..1]).unwrap()).unwrap();
    run.opt.step().unwrap();
    assert_eq!(run.opt.steps() as usize, steps + 1);
    // The twin never cancelled.
    let mut twin = Run::poisson(10);
    assert_eq!(twin.batch_of_at_least(2), idx);
    twin.opt.accumulate(&twin.losses(&idx[1..]).unwrap()).unwrap();
    twin.opt.accumulate(&twin.losses(&idx[..1]).unwrap()).unwrap();
    twin.opt.step().unwrap();
    assert_eq!(run.state(), twin.state());
}

/// A shuffled sampler is put back too, across the reshuffle at an epoch's end:
/// the cancelled batch of a new epoch is drawn again, not a fresh permutation.
#[test]
fn cancel_batch_puts_a_shuffled_batch_back_across_an_epoch() {
    let mut run = Run::new(ShuffledSampler::new(N, 6, Some(3)).unwrap(), None);
    let mut reference = ShuffledSampler::new(N, 6, Some(3)).unwrap();
    for _ in 0..3 {
        assert_eq!(run.step_correctly(), reference.sample());
    }
    // The 4th batch needs a new permutation (18 + 6 > 20).
    let before = run.state();
    let idx = run.opt.next_batch().unwrap();
    run.opt.cancel_batch();
    assert_eq!(run.state(), before);
    assert_eq!(run.opt.next_batch().unwrap(), idx);
    run.opt.cancel_batch();
    assert_eq!(run.step_correctly(), idx);
    assert_eq!(idx, reference.sample());
    assert_eq!(run.opt.next_batch().unwrap(), reference.sample());
}

#[test]
fn save_checkpoint_while_a_batch_is_open_is_out_of_order() {
    let mut run = Run::poisson(13);
    run.step_correctly();
    run.opt.next_batch().unwrap();
    let open = run.state();
    let dir = std::env::temp_dir().join(format!("candle-dp-open-batch-{}", std::process::id()));
    let err = run.opt.save_checkpoint(&dir, &run.varmap).unwrap_err();
    assert!(matches!(err, Error::OutOfOrder { call: "save_checkpoint", .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "save_checkpoint called while a batch is open: step() or cancel_batch() first: a checkpoint holds whole steps \
         only"
    );
    assert!(!dir.exists(), "nothing was written");
    assert_eq!(run.state(), open);
}

/// The per-example losses of `idx`, for `train_step` closures (which borrow
/// the model and data while the optimizer is borrowed mutably).
fn losses_of(model: &Mlp<DpLinear>, x: &Tensor, y: &Tensor, idx: &[usize]) -> candle_dp::Result<PerSampleLoss> {
    loss::cross_entropy(&model.forward(&take(x, idx))?, &take(y, idx))
}

/// The sum of `losses` as `train_step` sums them.
fn loss_sum(losses: &PerSampleLoss) -> f64 {
    losses.tensor().to_dtype(DType::F64).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn train_step_with_the_wrong_number_of_losses_is_a_shape_error() {
    // (physical chunk size, the chunk whose losses are wrong, losses more (+1) or fewer (-1) than indices)
    for (chunk, bad_chunk, off) in [(None, 0, -1i64), (None, 0, 1), (Some(3), 1, -1), (Some(3), 2, 1)] {
        let mut run = Run::new(PoissonSampler::seeded(N, 0.5, 12).unwrap(), chunk);
        let before = run.state();
        let drawn = &before.next_draws[0];
        assert!(drawn.len() > 3 * (bad_chunk + 1), "a batch with the bad chunk in it: {drawn:?}");
        let mut seen: Vec<Vec<usize>> = Vec::new();
        let err = run
            .opt
            .train_step(|idx| {
                seen.push(idx.to_vec());
                if seen.len() == bad_chunk + 1 {
                    let mut wrong = idx.to_vec();
                    if off < 0 {
                        wrong.pop();
                    } else {
                        wrong.push(idx[0]);
                    }
                    losses_of(&run.model, &run.x, &run.y, &wrong)
                } else {
                    losses_of(&run.model, &run.x, &run.y, idx)
                }
            })
            .unwrap_err();
        let got = (seen[bad_chunk].len() as i64 + off) as usize;
        assert!(
            matches!(
                &err,
                Error::Shape { what: "the losses train_step's closure returned", expected: "one per index it was given", got: g }
                    if g == &[got]
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!("the losses train_step's closure returned: expected one per index it was given, got shape [{got}]")
        );
        assert_eq!(seen.len(), bad_chunk + 1, "train_step stops at the bad chunk");
        assert_eq!(run.state(), before, "{chunk:?}, chunk {bad_chunk}: nothing changed, the sampler included");
        // The next train_step draws the same batch, and ends where a run without the error does.
        let mut again: Vec<Vec<usize>> = Vec::new();
        let summary = run
            .opt
            .train_step(|idx| {
                again.push(idx.to_vec());
                losses_of(&run.model, &run.x, &run.y, idx)
            })
            .unwrap();
        assert_eq!(again.concat(), *drawn);
        assert_eq!(again[..=bad_chunk], seen[..]);
        assert_eq!(summary.examples, drawn.len());
        let mut twin = Run::new(PoissonSampler::seeded(N, 0.5, 12).unwrap(), chunk);
        twin.opt.train_step(|idx| losses_of(&twin.model, &twin.x, &twin.y, idx)).unwrap();
        assert_eq!(run.state(), twin.state());
    }
}

/// An error of the closure's own, or of the accumulation (a NaN loss), in
/// any chunk: returned as is, nothing changed, and the same batch next time.
#[test]
fn train_step_errors_change_nothing_and_the_batch_is_drawn_again() {
    for (chunk, bad_chunk) in [(None, 0), (Some(4), 0), (Some(4), 1)] {
        for nan in [false, true] {
            let mut run = Run::new(PoissonSampler::seeded(N, 0.5, 14).unwrap(), chunk);
            run.step_correctly();
            let before = run.state();
            let drawn = before.next_draws[0].clone();
            assert!(drawn.len() > 4 * (bad_chunk + 1), "{drawn:?}");
            let mut calls = 0;
            let err = run
                .opt
                .train_step(|idx| {
                    calls += 1;
                    if calls < bad_chunk + 1 {
                        return losses_of(&run.model, &run.x, &run.y, idx);
                    }
                    if nan {
                        let l = losses_of(&run.model, &run.x, &run.y, idx)?;
                        let mut v = l.tensor().to_vec1::<f32>()?;
                        v[1] = f32::NAN;
                        PerSampleLoss::new(Tensor::from_vec(v, idx.len(), &Device::Cpu)?)
                    } else {
                        Err(candle_core::Error::Msg("example unavailable".into()).into())
                    }
                })
                .unwrap_err();
            if nan {
                assert!(matches!(err, Error::NonFinite { what: "loss", sample: 1 }), "{err}");
            } else {
                assert!(matches!(&err, Error::Candle(_)) && err.to_string().contains("example unavailable"), "{err}");
            }
            assert_eq!(calls, bad_chunk + 1);
            assert_eq!(run.state(), before, "{chunk:?} chunk {bad_chunk} nan {nan}");
            let mut again = Vec::new();
            run.opt
                .train_step(|idx| {
                    again.extend_from_slice(idx);
                    losses_of(&run.model, &run.x, &run.y, idx)
                })
                .unwrap();
            assert_eq!(again, drawn);
            let mut twin = Run::new(PoissonSampler::seeded(N, 0.5, 14).unwrap(), chunk);
            twin.step_correctly();
            twin.opt.train_step(|idx| losses_of(&twin.model, &twin.x, &twin.y, idx)).unwrap();
            assert_eq!(run.state(), twin.state());
        }
    }
}

/// An empty Poisson batch: the closure is not called, and the step is still
/// taken (noise only) and accounted.
#[test]
fn train_step_on_an_empty_batch_steps_with_noise_only() {
    let mut run = Run::new(PoissonSampler::seeded(N, 1e-3, 15).unwrap(), Some(4));
    let before = run.state();
    assert!(before.next_draws[0].is_empty(), "{:?}", before.next_draws[0]);
    let summary = run.opt.train_step(|_| unreachable!("an empty batch has no examples to compute")).unwrap();
    assert_eq!(summary, StepSummary { examples: 0, chunks: 0, loss_sum: 0.0 });
    let after = run.state();
    assert_eq!(after.steps, 1);
    assert_eq!(run.opt.ledger().unwrap().total_steps(), 1);
    assert_ne!(after.ledger_head, before.ledger_head);
    assert_ne!(after.weights, before.weights, "the noise is added");
    assert!(run.opt.epsilon(1e-5).unwrap() > 0.0);
    // The same through the stages.
    let mut twin = Run::new(PoissonSampler::seeded(N, 1e-3, 15).unwrap(), Some(4));
    assert!(twin.opt.next_batch().unwrap().is_empty());
    twin.opt.step().unwrap();
    assert_eq!(twin.state(), after);
}

/// `max_physical_batch_size` splits the batch into consecutive chunks, in
/// order; the step is the stages' over the same chunks, bit for bit.
#[test]
fn train_step_chunks_the_batch() {
    let mut run = Run::new(PoissonSampler::seeded(N, 1.0, 16).unwrap(), Some(6));
    let mut seen: Vec<Vec<usize>> = Vec::new();
    let mut sum = 0.0;
    let summary = run
        .opt
        .train_step(|idx| {
            seen.push(idx.to_vec());
            let l = losses_of(&run.model, &run.x, &run.y, idx)?;
            sum += loss_sum(&l);
            Ok(l)
        })
        .unwrap();
    let all: Vec<usize> = (0..N).collect();
    assert_eq!(seen, vec![all[0..6].to_vec(), all[6..12].to_vec(), all[12..18].to_vec(), all[18..20].to_vec()]);
    assert_eq!(summary, StepSummary { examples: N, chunks: 4, loss_sum: sum });
    assert!(sum > 0.0);
    let mut twin = Run::new(PoissonSampler::seeded(N, 1.0, 16).unwrap(), Some(6));
    let idx = twin.opt.next_batch().unwrap();
    assert_eq!(idx, all);
    for c in idx.chunks(6) {
        twin.opt.accumulate(&twin.losses(c).unwrap()).unwrap();
    }
    twin.opt.step().unwrap();
    assert_eq!(run.state(), twin.state());
    assert_eq!(run.opt.config().max_physical_batch_size(), Some(6));
}

/// With the microbatch engine `train_step` asks for one example at a time
/// and steps as `accumulate_microbatch` does.
#[test]
fn train_step_with_the_microbatch_engine_goes_one_example_at_a_time() {
    let build = || {
        let varmap = VarMap::new();
        let (_, plain) = mlp_pair(&varmap, &[4, 8, 2], DType::F32).unwrap();
        set_deterministic(&varmap, 17).unwrap();
        let opt = DpOptimizer::<SGD>::builder(vars_by_name(&varmap), PoissonSampler::seeded(N, 0.5, 17).unwrap())
            .noise_multiplier(1.0)
            .engine(Engine::Microbatch)
            .max_physical_batch_size(8)
            .noise(GaussianNoise::from_seed(17))
            .build(0.1)
            .unwrap();
        (varmap, plain, opt)
    };
    let x = tensor(&[N, 4], 18, 1.0, DType::F32).unwrap();
    let y = Tensor::from_vec((0..N as u32).map(|i| i % 2).collect(), N, &Device::Cpu).unwrap();
    let plain_losses = |plain: &Mlp<candle_nn::Linear>, idx: &[usize]| {
        loss::cross_entropy(&plain.forward(&take(&x, idx))?, &take(&y, idx))
    };
    let (varmap, plain, mut opt) = build();
    let drawn = opt.sampler().clone().sample();
    assert!(drawn.len() > 1);
    let mut seen = Vec::new();
    let summary = opt
        .train_step(|idx| {
            seen.push(idx.to_vec());
            plain_losses(&plain, idx)
        })
        .unwrap();
    assert_eq!(seen, drawn.iter().map(|&i| vec![i]).collect::<Vec<_>>());
    assert_eq!((summary.examples, summary.chunks), (drawn.len(), drawn.len()));
    let (twin_map, twin_plain, mut twin) = build();
    let idx = twin.next_batch().unwrap();
    assert_eq!(idx, drawn);
    twin.accumulate_microbatch(idx.len(), |k| plain_losses(&twin_plain, &idx[k..k + 1]).unwrap().tensor().sum_all())
        .unwrap();
    twin.step().unwrap();
    assert_eq!(state(&opt, &varmap), state(&twin, &twin_map));
}
