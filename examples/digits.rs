//! Differentially private handwritten-digit recognition, end to end.
//!
//! Trains an MLP (64-128-10) with DP-SGD on the UCI digits data that ships in
//! `examples/data/` (8x8 images, 1797 examples, a stratified 80/20 split),
//! to a target epsilon (default 3 at delta 1e-5) with Poisson sampling and
//! the noise calibrated by the RDP accountant. It prints the test accuracy
//! and the privacy statement, and writes a run folder with `ledger.json`
//! (for `dp-accountant report`), `report.md` and `report.html`,
//! `model.safetensors` (named by its SHA-256 in the ledger) and `summary.json`.
//!
//! ```sh
//! cargo run --release --example digits
//! cargo run --release --example digits -- --epsilon 1 --seed 2 --json
//! cargo run --release --example digits -- --non-private   # the same model without DP
//! cargo run --release --example digits -- --audit 1000     # epsilon-hat beside epsilon
//! cargo run --release --example digits -- --out runs/a --epochs 100   # interrupted? then:
//! cargo run --release --example digits -- --resume runs/a            # continues from the last checkpoint
//! ```
//!
//! Data parallel over MPI (`--distributed`: each rank trains on its shard,
//! rank 0 writes the run folder; see the README for running as root):
//!
//! ```sh
//! cargo build --release --features mpi --example digits
//! mpirun -n 2 target/release/examples/digits --distributed --seed 2 --json
//! ```
//!
//! A run folder keeps its flags in `run.json`: `--resume` takes them from
//! there, and a flag given again must agree. A finished run is never
//! retrained and its released model never overwritten.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Module, Tensor};
use candle_dp::accountant::{AccountantKind, DataProvenance};
use candle_dp::distributed::Collective;
use candle_dp::optim::AdamW;
use candle_dp::{loss, DpOptimizer, PoissonSampler, PrivacyBudget, StatefulOptimizer};
use candle_nn::{Optimizer, VarBuilder, VarMap, SGD};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

/// Train a DP MLP on the shipped digits data.
#[derive(Parser, Debug, Clone, Serialize, Deserialize)]
#[command(version, about)]
struct Args {
    /// Target epsilon (the budget; the noise is calibrated to it).
    #[arg(long, default_value_t = 3.0, allow_hyphen_values = true)]
    epsilon: f64,
    /// Target delta.
    #[arg(long, default_value_t = 1e-5, allow_hyphen_values = true)]
    delta: f64,
    /// The accountant that calibrates the noise, enforces the budget and
    /// states epsilon: rdp, or pld (tighter: less noise for the same epsilon).
    #[arg(long, default_value_t = AccountantKind::Rdp)]
    accountant: AccountantKind,
    /// Passes over the training set.
    #[arg(long, default_value_t = 50)]
    epochs: usize,
    /// Expected batch size of the Poisson sampler (large batches help DP-SGD:
    /// the noise is fixed per step while the signal grows with the batch).
    #[arg(long, default_value_t = 400)]
    batch_size: usize,
    /// Clipping norm C.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    max_grad_norm: f64,
    /// Learning rate of the wrapped optimizer.
    #[arg(long, default_value_t = 0.02, allow_hyphen_values = true)]
    lr: f64,
    /// Seed for initialization, sampling and noise (recorded as a fixed seed
    /// in the ledger); without it they come from the OS.
    #[arg(long)]
    seed: Option<u64>,
    /// Run folder (default runs/digits-<UTC time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint (written at
    /// every epoch's end to `<run>/checkpoint/`); its spent budget carries
    /// over. Its flags come from `<run>/run.json`; a flag given again must
    /// agree with them.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Train the same model without DP, for comparison.
    #[arg(long)]
    non_private: bool,
    /// Hidden units of the MLP.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// Hidden activation: relu or tanh.
    #[arg(long, value_enum, default_value_t = Activation::Tanh)]
    activation: Activation,
    /// Optimizer that DP-SGD wraps.
    #[arg(long, value_enum, default_value_t = Opt::Adam)]
    optimizer: Opt,
    /// Decay of the exponential moving average of the weights that is
    /// evaluated and saved (0 disables it). Averaging is post-processing of
    /// the privatized updates: it costs no privacy. The average is not in the
    /// checkpoint: it restarts from the weights at a resume.
    #[arg(long, default_value_t = 0.0)]
    ema: f64,
    /// Audit the run with this many canaries (0: none): the one-run canary
    /// audit's epsilon-hat, an empirical lower bound, goes into the ledger
    /// and the report beside epsilon. Canaries take sampler slots after the
    /// training set (with Adam the smaller update this makes matters
    /// little). An audited run writes no checkpoints, so it cannot be
    /// resumed.
    #[arg(long, default_value_t = 0)]
    audit: usize,
    /// Print summary.json as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Train as one rank of an MPI job started by `mpirun -n W` (data
    /// parallel: each rank samples and clips its shard of the data, the
    /// noise is drawn once in slices; a build with `--features mpi`). Rank 0
    /// writes the run folder, which `--resume` needs every rank to see. A
    /// run may be resumed on another number of ranks, or without.
    #[arg(long)]
    #[serde(default)]
    distributed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum, Serialize, Deserialize)]
enum Activation {
    Relu,
    /// Bounded activations suit DP-SGD (Papernot et al. 2021, "Tempered sigmoid activations").
    Tanh,
}

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum, Serialize, Deserialize)]
enum Opt {
    Sgd,
    Adam,
}

fn main() {
    let matches = Args::command().get_matches();
    let result = Args::from_arg_matches(&matches)
        .map_err(|e| e.to_string().into())
        .and_then(|args| resolve(args, |id| matches.value_source(id) == Some(ValueSource::CommandLine)))
        .and_then(|args| {
            check_flags(&args)?;
            run_in_folder(&args)
        });
    if let Err(e) = result {
        eprintln!("digits: error: {e}");
        std::process::exit(2);
    }
}

type AnyError = Box<dyn std::error::Error>;

/// The flags that `run.json` does not fix: where to read and write, how to print.
const PER_INVOCATION: [&str; 4] = ["resume", "out", "json", "distributed"];

/// With `--resume RUN`, the run's own flags from `RUN/run.json`, and an
/// error naming every flag given on the command line that disagrees.
fn resolve(args: Args, given: impl Fn(&str) -> bool) -> Result<Args, AnyError> {
    let Some(dir) = args.resume.clone() else { return Ok(args) };
    let path = dir.join("run.json");
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("{}: {e} (is it a digits run folder?)", path.display()))?;
    let saved: Args = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let (now, then) = (serde_json::to_value(&args)?, serde_json::to_value(&saved)?);
    let conflicts: Vec<String> = now
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| !PER_INVOCATION.contains(&k.as_str()) && given(k) && then.get(k.as_str()) != Some(v))
        .map(|(k, v)| format!("--{} {v} (the run has {})", k.replace('_', "-"), then[k.as_str()]))
        .collect();
    if !conflicts.is_empty() {
        return Err(format!("flags that conflict with {}: {}", path.display(), conflicts.join(", ")).into());
    }
    Ok(Args { resume: args.resume, out: args.out, json: args.json, distributed: args.distributed, ..saved })
}

/// Every numeric flag in its range, named as on the command line.
fn check_flags(args: &Args) -> Result<(), AnyError> {
    use common::finite_positive;
    common::check_flags(&[
        ("--epsilon", args.epsilon, "finite and > 0", finite_positive(args.epsilon)),
        ("--delta", args.delta, "in (0, 1)", args.delta > 0.0 && args.delta < 1.0),
        ("--max-grad-norm", args.max_grad_norm, "finite and > 0", finite_positive(args.max_grad_norm)),
        ("--lr", args.lr, "finite and > 0", finite_positive(args.lr)),
        ("--ema", args.ema, "in [0, 1) (0 disables it)", (0.0..1.0).contains(&args.ema)),
        ("--epochs", args.epochs as f64, "an integer >= 1", args.epochs >= 1),
        ("--hidden", args.hidden as f64, "an integer >= 1", args.hidden >= 1),
    ])?;
    if args.resume.is_some() && args.non_private {
        return Err("--resume continues a DP run; it cannot be combined with --non-private".into());
    }
    if args.audit > 0 && args.non_private {
        return Err("--audit audits a DP run; it cannot be combined with --non-private".into());
    }
    if args.distributed && args.non_private {
        return Err("--distributed trains DP-SGD in data parallel; it cannot be combined with --non-private".into());
    }
    if args.distributed && args.audit > 0 {
        return Err("--audit: the canary audit runs in one process; it cannot be combined with --distributed".into());
    }
    if args.audit > 0 && args.resume.is_some() {
        return Err("--audit: an audited run writes no checkpoints, so there is nothing to --resume".into());
    }
    if let (Some(resume), Some(out)) = (&args.resume, &args.out) {
        // Continuing a run elsewhere would fork it: two models, two ledgers,
        // each counting only its own branch of the privacy spent.
        if resume != out {
            return Err(format!(
                "--out {} with --resume {}: a run continues in its own folder",
                out.display(),
                resume.display()
            )
            .into());
        }
    }
    Ok(())
}

/// Runs in the run folder; a folder this run created and left empty (it
/// failed before writing anything) is removed.
fn run_in_folder(args: &Args) -> Result<(), AnyError> {
    let world = common::join_world(args.distributed)?;
    let out = args
        .out
        .clone()
        .or_else(|| args.resume.clone())
        .unwrap_or_else(|| PathBuf::from(format!("runs/digits-{}", common::utc_stamp())));
    // Rank 0's folder: the others never write, nor clean up.
    let created = !out.exists() && world.rank() == 0;
    let result = run(args, &out, world);
    // A run that failed before its first checkpoint cannot be resumed: its
    // flags go, and so does the folder if this run made it and left it empty.
    if result.is_err() && created && !out.join("checkpoint").exists() {
        let _ = std::fs::remove_file(out.join("run.json"));
        if std::fs::read_dir(&out).is_ok_and(|mut d| d.next().is_none()) {
            let _ = std::fs::remove_dir(&out);
        }
    }
    result
}

struct Mlp {
    fc1: Box<dyn Module>,
    fc2: Box<dyn Module>,
    tanh: bool,
}

impl Mlp {
    /// DP layers for a DP run, candle-nn's for `--non-private` (the same maths).
    fn new(vb: VarBuilder, args: &Args) -> candle_core::Result<Self> {
        let (h, tanh) = (args.hidden, args.activation == Activation::Tanh);
        let layer = |i, o, name| -> candle_core::Result<Box<dyn Module>> {
            Ok(if args.non_private {
                Box::new(candle_nn::linear(i, o, vb.pp(name))?)
            } else {
                Box::new(candle_dp::linear(i, o, vb.pp(name))?)
            })
        };
        Ok(Self { fc1: layer(64, h, "fc1")?, fc2: layer(h, 10, "fc2")?, tanh })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // Pixels in [0, 1] are centred to [-1, 1] (a fixed map, no data statistics).
        let h = self.fc1.forward(&x.affine(2.0, -1.0)?)?;
        let h = if self.tanh { h.tanh()? } else { h.relu()? };
        self.fc2.forward(&h)
    }
}

/// What a training loop reads.
struct Ctx<'a> {
    args: &'a Args,
    data: &'a common::Images,
    train: &'a [usize],
    varmap: &'a VarMap,
    model: &'a Mlp,
    steps: u64,
    steps_per_epoch: u64,
    out: &'a std::path::Path,
    bar: &'a ProgressBar,
}

impl Ctx<'_> {
    /// The batch at positions `idx` of the training split.
    fn batch(&self, idx: &[usize]) -> candle_core::Result<(Tensor, Tensor)> {
        self.data.tensors(&idx.iter().map(|&i| self.train[i]).collect::<Vec<_>>(), &Device::Cpu)
    }
}

/// The privacy side of a finished DP run.
struct Private {
    release: candle_dp::Release,
    noise_multiplier: f64,
}

/// The shipped data file.
fn data_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/digits.csv.gz")
}

fn run(args: &Args, out: &std::path::Path, world: Box<dyn Collective>) -> Result<(), AnyError> {
    let data = common::load_digits_csv(&data_file())?;
    let (train, test) = common::stratified_split(&data.labels, 0.2, 0);
    let n = train.len();
    if args.batch_size == 0 || args.batch_size > n {
        return Err(format!("--batch-size = {}: must be in [1, {n}]", args.batch_size).into());
    }
    let steps_per_epoch = n.div_ceil(args.batch_size) as u64;
    let steps = args.epochs as u64 * steps_per_epoch;
    if !common::agree_on_folder(world.as_ref(), || Ok(prepare_folder(args, out)? == Folder::Ready))? {
        return Ok(());
    }
    let (rank, world_size) = (world.rank(), world.world_size());
    let varmap = VarMap::new();
    let model = Mlp::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), args)?;
    if let Some(seed) = args.seed {
        common::init_seeded(&varmap, seed)?;
    }
    let bar = common::progress_bar(steps, args.json || rank != 0)?;
    let started = std::time::Instant::now();
    let ctx = Ctx {
        args,
        data: &data,
        train: &train,
        varmap: &varmap,
        model: &model,
        steps,
        steps_per_epoch,
        out,
        bar: &bar,
    };
    let private = match (args.non_private, args.optimizer) {
        (true, Opt::Sgd) => train_non_private::<SGD>(&ctx, args.lr).map(|()| None),
        (true, Opt::Adam) => train_non_private::<AdamW>(&ctx, adam(args.lr)).map(|()| None),
        (false, Opt::Sgd) => train_dp::<SGD>(&ctx, args.lr, world).map(Some),
        (false, Opt::Adam) => train_dp::<AdamW>(&ctx, adam(args.lr), world).map(Some),
    }?;
    bar.finish_and_clear();
    if rank != 0 {
        // Rank 0 evaluates and reports the model every rank holds.
        return Ok(());
    }

    let (x_test, y_test) = data.tensors(&test, &Device::Cpu)?;
    let pred = model.forward(&x_test)?.argmax(1)?;
    let accuracy = pred.eq(&y_test)?.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?;
    let q = args.batch_size as f64 / n as f64;
    let (epsilon, delta, sigma) = match &private {
        Some(p) => (Some(p.release.report.epsilon), Some(args.delta), Some(p.noise_multiplier)),
        None => (None, None, None),
    };
    let mut summary = serde_json::json!({
        "test_accuracy": accuracy,
        "epsilon": epsilon,
        "delta": delta,
        "noise_multiplier": sigma,
        "accountant": private.as_ref().map(|_| args.accountant.name()),
        "steps": steps,
        "sample_rate": q,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "max_grad_norm": args.max_grad_norm,
        "lr": args.lr,
        "seed": args.seed,
        "non_private": args.non_private,
        "world_size": world_size,
        "train_examples": n,
        "test_examples": test.len(),
        "wall_seconds": started.elapsed().as_secs_f64(),
    });
    common::add_audit(&mut summary, private.as_ref().map(|p| &p.release.ledger));
    let done = format!("test accuracy {accuracy:.4} ({} test examples)", test.len());
    common::finish(out, &summary, private.as_ref().map(|p| &p.release.report), args.json, &done)
}

#[derive(Debug, PartialEq)]
enum Folder {
    /// Ready to train in.
    Ready,
    /// Holds a finished, released run: nothing to do.
    Released,
}

/// Checks what `out` holds against what was asked, and makes it ready: a
/// released run is never retrained, an unfinished one only continued with
/// `--resume`.
fn prepare_folder(args: &Args, out: &std::path::Path) -> Result<Folder, AnyError> {
    let ledger_path = out.join("ledger.json");
    if ledger_path.exists() {
        // The run's final ledger exists only once its model was released.
        let ledger = candle_dp::accountant::Ledger::read(&ledger_path)?;
        if let Some(r) = ledger.releases().last() {
            if args.resume.is_none() {
                common::refuse_released(out)?;
            }
            println!(
                "digits: nothing to do: the run in {} finished after {} steps and released {} (SHA-256 {}); it is \
                 not retrained, and nothing was written",
                out.display(),
                r.after_steps,
                r.file,
                r.weights_sha256
            );
            return Ok(Folder::Released);
        }
    }
    if args.resume.is_none() && (out.join("run.json").exists() || out.join("checkpoint").exists()) {
        return Err(format!(
            "{} holds a run already: continue it with --resume, or choose another --out",
            out.display()
        )
        .into());
    }
    std::fs::create_dir_all(out)?;
    if args.resume.is_none() {
        std::fs::write(out.join("run.json"), serde_json::to_string_pretty(args)?)?;
    }
    Ok(Folder::Ready)
}

/// Updates the bar; at each epoch's end shows the epoch's mean loss.
fn progress(ctx: &Ctx, step: u64, loss: &mut (f64, usize), eps: Option<f64>) {
    ctx.bar.set_position(step + 1);
    if (step + 1).is_multiple_of(ctx.steps_per_epoch) {
        let mean = if loss.1 > 0 { loss.0 / loss.1 as f64 } else { f64::NAN };
        let epoch = (step + 1) / ctx.steps_per_epoch;
        ctx.bar.set_message(match eps {
            Some(e) => format!("epoch {epoch}  loss {mean:.3}  epsilon {e:.3}"),
            None => format!("epoch {epoch}  loss {mean:.3}"),
        });
        *loss = (0.0, 0);
    }
}

/// An exponential moving average of the variables (in name order).
struct Ema {
    decay: f64,
    avg: Vec<Tensor>,
}

impl Ema {
    fn new(varmap: &VarMap, decay: f64) -> candle_core::Result<Self> {
        let avg = if decay > 0.0 {
            candle_dp::vars_by_name(varmap).iter().map(|v| v.as_tensor().copy()).collect::<Result<_, _>>()?
        } else {
            vec![]
        };
        Ok(Self { decay, avg })
    }

    fn update(&mut self, varmap: &VarMap) -> candle_core::Result<()> {
        for (a, v) in self.avg.iter_mut().zip(candle_dp::vars_by_name(varmap)) {
            *a = ((&*a * self.decay)? + (v.as_tensor() * (1.0 - self.decay))?)?;
        }
        Ok(())
    }

    fn apply(&self, varmap: &VarMap) -> candle_core::Result<()> {
        for (a, v) in self.avg.iter().zip(candle_dp::vars_by_name(varmap)) {
            v.set(a)?;
        }
        Ok(())
    }
}

/// AdamW without weight decay (decay would shrink weights toward a prior the data never chose).
fn adam(lr: f64) -> candle_nn::ParamsAdamW {
    candle_nn::ParamsAdamW { lr, weight_decay: 0.0, ..Default::default() }
}

/// The same model, sampling and optimizer without DP, for comparison.
fn train_non_private<O: Optimizer>(ctx: &Ctx, config: O::Config) -> Result<(), AnyError> {
    let mut opt = O::new(candle_dp::vars_by_name(ctx.varmap), config)?;
    let mut sampler = PoissonSampler::with_expected_batch_size(ctx.train.len(), ctx.args.batch_size, ctx.args.seed)?;
    let mut epoch_loss = (0.0, 0usize);
    for step in 0..ctx.steps {
        let idx = sampler.sample();
        if !idx.is_empty() {
            let (x, y) = ctx.batch(&idx)?;
            let l = candle_nn::loss::cross_entropy(&ctx.model.forward(&x)?, &y)?;
            epoch_loss.0 += l.to_scalar::<f32>()? as f64 * idx.len() as f64;
            epoch_loss.1 += idx.len();
            opt.backward_step(&l)?;
        }
        progress(ctx, step, &mut epoch_loss, None);
    }
    Ok(ctx.varmap.save(ctx.out.join("model.safetensors"))?)
}

/// DP-SGD around the optimizer `O`, from a checkpoint with `--resume`,
/// checkpointed at every epoch's end and after the last step.
fn train_dp<O: StatefulOptimizer>(
    ctx: &Ctx,
    config: O::Config,
    world: Box<dyn Collective>,
) -> Result<Private, AnyError> {
    let (args, checkpoint) = (ctx.args, ctx.out.join("checkpoint"));
    // Name order: the noise is drawn in the variables' order, so a seeded
    // run needs a fixed one (`VarMap::all_vars` has none).
    let vars = candle_dp::vars_by_name(ctx.varmap);
    let opt = match &args.resume {
        // Weights, ledger (the spent budget), noise, sampler and optimizer
        // state as they were.
        Some(_) => DpOptimizer::<O>::resume(&checkpoint, ctx.varmap, vars, config)?,
        None => {
            let builder = DpOptimizer::<O>::builder(
                vars,
                PoissonSampler::with_expected_batch_size(ctx.train.len(), args.batch_size, args.seed)?,
            )
            .target(PrivacyBudget { epsilon: args.epsilon, delta: args.delta }, ctx.steps)
            .accountant(args.accountant)
            .max_grad_norm(args.max_grad_norm)
            .noise(common::noise(args.seed)?)
            // The whole file is hashed; training reads its stratified 80% split.
            .data(DataProvenance::of_file(data_file(), "examples/data/digits.csv.gz", ctx.data.labels.len() as u64)?)
            .description(format!(
                "digits MLP 64-{}-10, {} epochs, expected batch {}, on the 80% training split (seed 0) of the data",
                args.hidden, args.epochs, args.batch_size
            ));
            match common::canaries(args.audit, args.seed) {
                Some(c) => builder.audit(c),
                None => builder,
            }
            .build(config)?
        }
    };
    // One rank of a data-parallel run.
    let mut opt = if args.distributed { opt.distribute(world)? } else { opt };
    let trained_on = opt.config().sampler().dataset_size() - args.audit;
    if trained_on != ctx.train.len() {
        return Err(format!(
            "the checkpoint samples from {trained_on} examples, the training set has {}",
            ctx.train.len()
        )
        .into());
    }
    ctx.bar.set_position(opt.steps());
    let mut ema = Ema::new(ctx.varmap, args.ema)?;
    let mut epoch_loss = (0.0, 0usize);
    for step in opt.steps()..ctx.steps {
        let s = opt.train_step(|idx| {
            let (x, y) = ctx.batch(idx)?;
            loss::cross_entropy(&ctx.model.forward(&x)?, &y)
        })?;
        epoch_loss = (epoch_loss.0 + s.loss_sum, epoch_loss.1 + s.examples);
        ema.update(ctx.varmap)?;
        let epoch_end = (step + 1) % ctx.steps_per_epoch == 0;
        // Also after the last step: an interrupted release resumes to it
        // without training again.
        if (epoch_end || step + 1 == ctx.steps) && args.audit == 0 {
            opt.save_checkpoint(&checkpoint, ctx.varmap)?;
        }
        progress(ctx, step, &mut epoch_loss, epoch_end.then(|| opt.epsilon(args.delta)).transpose()?);
    }
    ema.apply(ctx.varmap)?;
    // The model file is named in the ledger by its SHA-256: the statement
    // covers exactly these weights.
    let release = opt.release(ctx.out, ctx.varmap, Some(args.delta))?;
    Ok(Private { release, noise_multiplier: opt.noise_multiplier() })
}
