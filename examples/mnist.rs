//! A differentially private CNN on MNIST, with DP convolutions.
//!
//! Reads the four MNIST files in IDX format (raw or `.gz`) from `--data-dir`
//! (the repository does not ship them: see the error message for where they
//! are published) and trains the benchmark CNN (conv 1->16 k5, max-pool,
//! conv 16->32 k5, max-pool, linear 512->10) with DP-SGD around AdamW,
//! Poisson sampling and noise calibrated to the target epsilon. It writes the
//! same run folder as the `digits` example.
//!
//! ```sh
//! cargo run --release --example mnist -- --data-dir data/mnist --epochs 2
//! ```
//! On one CPU core a step of batch 256 takes about 0.4 s, so an epoch of
//! 60 000 examples (235 steps) takes minutes: try `--limit` on a subset first.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Module};
use candle_dp::optim::AdamW;
use candle_dp::{loss, DpOptimizer, PoissonSampler, PrivacyBudget};
use candle_nn::{ParamsAdamW, VarBuilder, VarMap};
use clap::Parser;

/// Train a DP CNN on MNIST.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Folder with the four MNIST IDX files (raw or .gz).
    #[arg(long, default_value = "data/mnist")]
    data_dir: PathBuf,
    /// Target epsilon.
    #[arg(long, default_value_t = 3.0, allow_hyphen_values = true)]
    epsilon: f64,
    /// Target delta.
    #[arg(long, default_value_t = 1e-5, allow_hyphen_values = true)]
    delta: f64,
    /// Passes over the training set.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Expected batch size.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Clipping norm C.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    max_grad_norm: f64,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 0.002, allow_hyphen_values = true)]
    lr: f64,
    /// Seed for initialization, sampling and noise (recorded as fixed).
    #[arg(long)]
    seed: Option<u64>,
    /// Train on the first N training examples only.
    #[arg(long)]
    limit: Option<usize>,
    /// Run folder (default runs/mnist-<UTC time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print summary.json as the last line of stdout.
    #[arg(long)]
    json: bool,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = check_flags(&args).and_then(|()| run(&args)) {
        eprintln!("mnist: error: {e}");
        std::process::exit(2);
    }
}

/// Every numeric flag in its range, named as on the command line.
fn check_flags(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    use common::finite_positive;
    let limit = args.limit.unwrap_or(1);
    common::check_flags(&[
        ("--epsilon", args.epsilon, "finite and > 0", finite_positive(args.epsilon)),
        ("--delta", args.delta, "in (0, 1)", args.delta > 0.0 && args.delta < 1.0),
        ("--max-grad-norm", args.max_grad_norm, "finite and > 0", finite_positive(args.max_grad_norm)),
        ("--lr", args.lr, "finite and > 0", finite_positive(args.lr)),
        ("--epochs", args.epochs as f64, "an integer >= 1", args.epochs >= 1),
        ("--limit", limit as f64, "an integer >= 1", limit >= 1),
    ])?;
    Ok(())
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let train_set = common::idx::load_mnist(&args.data_dir, "train")?;
    let test_set = common::idx::load_mnist(&args.data_dir, "t10k")?;
    let n = args.limit.unwrap_or(train_set.labels.len()).min(train_set.labels.len());
    if args.batch_size == 0 || args.batch_size > n {
        return Err(format!("--batch-size = {}: must be in [1, {n}]", args.batch_size).into());
    }
    let steps_per_epoch = n.div_ceil(args.batch_size) as u64;
    let steps = args.epochs as u64 * steps_per_epoch;
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from(format!("runs/mnist-{}", common::utc_stamp())));
    common::refuse_released(&out)?;

    let varmap = VarMap::new();
    let model = common::Cnn::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    if let Some(seed) = args.seed {
        common::init_seeded(&varmap, seed)?;
    }
    let sampler = PoissonSampler::with_expected_batch_size(n, args.batch_size, args.seed)?;
    let mut opt = DpOptimizer::<AdamW>::builder(candle_dp::vars_by_name(&varmap), sampler)
        .target(PrivacyBudget { epsilon: args.epsilon, delta: args.delta }, steps)
        .max_grad_norm(args.max_grad_norm)
        // A Poisson batch's size is random: bound what one pass holds.
        .max_physical_batch_size(2 * args.batch_size)
        .noise(common::noise(args.seed)?)
        .description(format!("MNIST CNN, {} epochs on {n} examples, expected batch {}", args.epochs, args.batch_size))
        .build(ParamsAdamW { lr: args.lr, weight_decay: 0.0, ..Default::default() })?;

    let bar = common::progress_bar(steps, args.json)?;
    let started = std::time::Instant::now();
    for step in 0..steps {
        let s = opt.train_step(|idx| {
            let (x, y) = train_set.tensors(idx, &dev)?;
            loss::cross_entropy(&model.forward(&x)?, &y)
        })?;
        bar.inc(1);
        if (step + 1) % steps_per_epoch == 0 {
            bar.set_message(format!("epsilon {:.3}", opt.epsilon(args.delta)?));
        } else if s.examples > 0 {
            bar.set_message(format!("loss {:.3}", s.loss_sum / s.examples as f64));
        }
    }
    bar.finish_and_clear();

    // Test accuracy, in chunks to bound memory.
    let mut correct = 0.0;
    let all: Vec<usize> = (0..test_set.labels.len()).collect();
    for chunk in all.chunks(1000) {
        let (x, y) = test_set.tensors(chunk, &dev)?;
        let pred = model.forward(&x)?.argmax(1)?;
        correct += pred.eq(&y)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    }
    let accuracy = correct / all.len() as f64;

    // The folder is made only now, with something to put in it.
    let release = opt.release(&out, &varmap, Some(args.delta))?;
    let summary = serde_json::json!({
        "test_accuracy": accuracy,
        "epsilon": release.report.epsilon,
        "delta": args.delta,
        "noise_multiplier": opt.noise_multiplier(),
        "steps": steps,
        "sample_rate": args.batch_size as f64 / n as f64,
        "train_examples": n,
        "wall_seconds": started.elapsed().as_secs_f64(),
    });
    common::finish(&out, &summary, Some(&release.report), args.json, &format!("test accuracy {accuracy:.4}"))
}
