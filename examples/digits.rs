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
//! cargo run --release --example digits -- --out runs/a --epochs 100   # interrupted? then:
//! cargo run --release --example digits -- --resume runs/a            # continues from the last checkpoint
//! ```
//!
//! A run folder keeps its flags in `run.json`: `--resume` takes them from
//! there, and a flag given again must agree. A finished run is never
//! retrained and its released model never overwritten.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Module, Tensor};
use candle_dp::accountant::{AccountantKind, PrivacyReport};
use candle_dp::{loss, DpOptimizer, GaussianNoise, PoissonSampler, PrivacyBudget};
use candle_nn::{Optimizer, VarBuilder, VarMap, SGD};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use indicatif::{ProgressBar, ProgressStyle};
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
    /// Print summary.json as the last line of stdout.
    #[arg(long)]
    json: bool,
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
const PER_INVOCATION: [&str; 3] = ["resume", "out", "json"];

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
    Ok(Args { resume: args.resume, out: args.out, json: args.json, ..saved })
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
    let out = args
        .out
        .clone()
        .or_else(|| args.resume.clone())
        .unwrap_or_else(|| PathBuf::from(format!("runs/digits-{}", common::utc_stamp())));
    let created = !out.exists();
    let result = run(args, &out);
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

/// One non-private optimizer step on a mean loss.
type StepFn = Box<dyn FnMut(&Tensor) -> candle_core::Result<()>>;

struct Mlp {
    fc1: Box<dyn Module>,
    fc2: Box<dyn Module>,
    tanh: bool,
}

fn forward(model: &Mlp, x: &Tensor) -> candle_core::Result<Tensor> {
    // Pixels in [0, 1] are centred to [-1, 1] (a fixed map, no data statistics).
    let h = model.fc1.forward(&x.affine(2.0, -1.0)?)?;
    let h = if model.tanh { h.tanh()? } else { h.relu()? };
    model.fc2.forward(&h)
}

fn run(args: &Args, out: &std::path::Path) -> Result<(), AnyError> {
    let dev = Device::Cpu;
    let data_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/digits.csv.gz");
    let data = common::load_digits_csv(&data_path)?;
    let (train, test) = common::stratified_split(&data.labels, 0.2, 0);
    let (x_test, y_test) = data.tensors(&test, &dev)?;
    let n = train.len();
    if args.batch_size == 0 || args.batch_size > n {
        return Err(format!("--batch-size = {}: must be in [1, {n}]", args.batch_size).into());
    }
    let steps_per_epoch = n.div_ceil(args.batch_size);
    let steps = (args.epochs * steps_per_epoch) as u64;
    let ledger_path = out.join("ledger.json");
    if ledger_path.exists() {
        // The run's final ledger exists only once its model was released.
        let ledger = candle_dp::accountant::Ledger::read(&ledger_path)?;
        if let Some(r) = ledger.releases().last() {
            if args.resume.is_none() {
                return common::refuse_released(out);
            }
            println!(
                "digits: nothing to do: the run in {} finished after {} steps and released {} (SHA-256 {}); it is \
                 not retrained, and nothing was written",
                out.display(),
                r.after_steps,
                r.file,
                r.weights_sha256
            );
            return Ok(());
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

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let h = args.hidden;
    let tanh = matches!(args.activation, Activation::Tanh);
    let model = if args.non_private {
        Mlp {
            fc1: Box::new(candle_nn::linear(64, h, vb.pp("fc1"))?),
            fc2: Box::new(candle_nn::linear(h, 10, vb.pp("fc2"))?),
            tanh,
        }
    } else {
        Mlp {
            fc1: Box::new(candle_dp::linear(64, h, vb.pp("fc1"))?),
            fc2: Box::new(candle_dp::linear(h, 10, vb.pp("fc2"))?),
            tanh,
        }
    };
    if let Some(seed) = args.seed {
        common::init_seeded(&varmap, seed)?;
    }
    let mut sampler = PoissonSampler::with_expected_batch_size(n, args.batch_size, args.seed)?;

    let bar = ProgressBar::new(steps);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}")?);
    if args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = std::time::Instant::now();
    let mut epoch_loss = (0.0, 0usize);
    let (summary_privacy, ledger) = if args.non_private {
        let mut step_on: StepFn = match args.optimizer {
            Opt::Sgd => {
                let mut o = SGD::new(candle_dp::vars_by_name(&varmap), args.lr)?;
                Box::new(move |l| o.backward_step(l))
            }
            Opt::Adam => {
                let mut o = candle_nn::AdamW::new(candle_dp::vars_by_name(&varmap), adam(args.lr))?;
                Box::new(move |l| o.backward_step(l))
            }
        };
        for step in 0..steps {
            let idx: Vec<usize> = sampler.sample().iter().map(|&i| train[i]).collect();
            if !idx.is_empty() {
                let (x, y) = data.tensors(&idx, &dev)?;
                let l = candle_nn::loss::cross_entropy(&forward(&model, &x)?, &y)?;
                epoch_loss.0 += l.to_scalar::<f32>()? as f64 * idx.len() as f64;
                epoch_loss.1 += idx.len();
                step_on(&l)?;
            }
            progress(&bar, step, steps_per_epoch, &mut epoch_loss, None);
        }
        (None, None)
    } else {
        let noise = match args.seed {
            Some(s) => GaussianNoise::from_seed(s.wrapping_add(0x9e37_79b9)),
            None => GaussianNoise::from_os_entropy()?,
        };
        let budget = PrivacyBudget { epsilon: args.epsilon, delta: args.delta };
        let description = format!("digits MLP 64-{h}-10, {} epochs, expected batch {}", args.epochs, args.batch_size);
        let train_ctx =
            Ctx { args, data: &data, train: &train, varmap: &varmap, model: &model, steps, steps_per_epoch, out };
        let (ledger, eps, sigma) = match args.optimizer {
            Opt::Sgd => {
                train_dp::<SGD>(&train_ctx, &mut sampler, &bar, noise, budget, description, args.lr, &mut epoch_loss)?
            }
            Opt::Adam => train_dp::<candle_nn::AdamW>(
                &train_ctx,
                &mut sampler,
                &bar,
                noise,
                budget,
                description,
                adam(args.lr),
                &mut epoch_loss,
            )?,
        };
        (Some((eps, sigma, sampler.description().expected_batch_size() / n as f64)), Some(ledger))
    };
    bar.finish_and_clear();

    let pred = forward(&model, &x_test)?.argmax(1)?;
    let accuracy = pred.eq(&y_test)?.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?;
    if args.non_private {
        varmap.save(out.join("model.safetensors"))?;
    }
    let mut summary = serde_json::json!({
        "test_accuracy": accuracy,
        "steps": steps,
        "sample_rate": args.batch_size as f64 / n as f64,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "max_grad_norm": args.max_grad_norm,
        "lr": args.lr,
        "seed": args.seed,
        "non_private": args.non_private,
        "train_examples": n,
        "test_examples": test.len(),
        "wall_seconds": started.elapsed().as_secs_f64(),
    });
    if let (Some((eps, sigma, q)), Some(ledger)) = (summary_privacy, ledger) {
        summary["epsilon"] = eps.into();
        summary["delta"] = args.delta.into();
        summary["noise_multiplier"] = sigma.into();
        summary["sample_rate"] = q.into();
        summary["accountant"] = args.accountant.name().into();
        ledger.write(out.join("ledger.json"))?;
        let report = PrivacyReport::from_ledger_with(&ledger, Some(args.delta), args.accountant)?;
        std::fs::write(out.join("report.md"), report.to_markdown())?;
        std::fs::write(out.join("report.html"), report.to_html())?;
        if !args.json {
            println!("{}", report.to_text());
        }
    } else {
        summary["epsilon"] = serde_json::Value::Null;
        summary["delta"] = serde_json::Value::Null;
        summary["noise_multiplier"] = serde_json::Value::Null;
    }
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    if args.json {
        println!("{summary}");
    } else {
        println!("test accuracy {:.4} ({} test examples); run folder {}", accuracy, test.len(), out.display());
    }
    Ok(())
}

/// Updates the bar; at each epoch's end shows the epoch's mean loss.
fn progress(bar: &ProgressBar, step: u64, steps_per_epoch: usize, loss: &mut (f64, usize), eps: Option<f64>) {
    bar.inc(1);
    if (step + 1) % steps_per_epoch as u64 == 0 {
        let mean = if loss.1 > 0 { loss.0 / loss.1 as f64 } else { f64::NAN };
        let epoch = (step + 1) / steps_per_epoch as u64;
        bar.set_message(match eps {
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

/// What the DP training loop reads.
struct Ctx<'a> {
    args: &'a Args,
    data: &'a common::Images,
    train: &'a [usize],
    varmap: &'a VarMap,
    model: &'a Mlp,
    steps: u64,
    steps_per_epoch: usize,
    out: &'a std::path::Path,
}

/// DP-SGD around the optimizer `O`; returns the ledger, epsilon spent and the noise multiplier.
#[allow(clippy::too_many_arguments)]
fn train_dp<O: Optimizer>(
    ctx: &Ctx,
    sampler: &mut PoissonSampler,
    bar: &ProgressBar,
    noise: GaussianNoise,
    budget: PrivacyBudget,
    description: String,
    config: O::Config,
    epoch_loss: &mut (f64, usize),
) -> Result<(candle_dp::accountant::Ledger, f64, f64), AnyError> {
    let dev = Device::Cpu;
    // Name order: `VarMap::all_vars` has none, and the noise is drawn in the
    // variables' order, so a seeded run needs a fixed one.
    let mut opt = match &ctx.args.resume {
        // Continue a checkpointed run: weights, ledger (the spent budget),
        // noise and sampler as they were; Adam's moments restart.
        Some(dir) => {
            let mut varmap = ctx.varmap.clone();
            let vars = candle_dp::vars_by_name(ctx.varmap);
            let (opt, resumed) = DpOptimizer::<O>::resume(dir.join("checkpoint"), &mut varmap, vars, config)?;
            if let Some(resumed) = resumed {
                if resumed.description().dataset_size() != ctx.train.len() {
                    return Err(format!(
                        "the checkpoint samples from {} examples, the training set has {}",
                        resumed.description().dataset_size(),
                        ctx.train.len()
                    )
                    .into());
                }
                *sampler = resumed;
            }
            bar.set_position(opt.steps());
            opt
        }
        None => DpOptimizer::<O>::builder(candle_dp::vars_by_name(ctx.varmap), sampler.description())
            .target(budget, ctx.steps)
            .accountant(ctx.args.accountant)
            .max_grad_norm(ctx.args.max_grad_norm)
            .noise(noise)
            .description(description)
            .build(config)?,
    };
    let mut ema = Ema::new(ctx.varmap, ctx.args.ema)?;
    for step in opt.steps()..ctx.steps {
        let idx: Vec<usize> = sampler.sample().iter().map(|&i| ctx.train[i]).collect();
        if idx.is_empty() {
            opt.accumulate_empty();
        } else {
            let (x, y) = ctx.data.tensors(&idx, &dev)?;
            let losses = loss::cross_entropy(&forward(ctx.model, &x)?, &y)?;
            epoch_loss.0 += losses.tensor().sum_all()?.to_scalar::<f32>()? as f64;
            epoch_loss.1 += idx.len();
            opt.accumulate(&losses)?;
        }
        opt.step()?;
        ema.update(ctx.varmap)?;
        let epoch_end = (step + 1) % ctx.steps_per_epoch as u64 == 0;
        let eps = if epoch_end { Some(opt.epsilon(budget.delta)?) } else { None };
        // Also after the last step: an interrupted release resumes to it
        // without training again.
        if epoch_end || step + 1 == ctx.steps {
            opt.save_checkpoint(ctx.out.join("checkpoint"), ctx.varmap, Some(sampler))?;
        }
        progress(bar, step, ctx.steps_per_epoch, epoch_loss, eps);
    }
    ema.apply(ctx.varmap)?;
    // The model file is named in the ledger by its SHA-256: the statement
    // covers exactly these weights.
    let weights = ctx.out.join("model.safetensors");
    ctx.varmap.save(&weights)?;
    opt.record_release("model.safetensors", &candle_dp::checkpoint::sha256_file(&weights)?)?;
    let ledger = opt.flush_ledger()?.clone();
    Ok((ledger, opt.epsilon(budget.delta)?, opt.noise_multiplier()))
}
