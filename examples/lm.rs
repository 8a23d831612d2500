//! A byte-level language model pretrained without privacy on public text
//! and fine-tuned with DP on a second text standing in for private data.
//!
//! The model is the library's decoder-only transformer
//! ([`candle_dp::models::Gpt`], 4 layers, width 128, 4 heads, context 64,
//! 0.83 M parameters: small enough to fine-tune in minutes on two CPU cores). The texts are fortune-cookie files of Debian's
//! `fortunes` package (BSD licence; `examples/data/README.md`): 29 files as
//! the public text, 5 others (literature, love, songs and poems, Star Trek,
//! wisdom) as the private one. The base model ships as
//! `examples/data/lm-base.safetensors`, made by this example's `pretrain`
//! mode, so the default run only fine-tunes:
//!
//! ```sh
//! cargo run --release --example lm                        # LoRA, epsilon 8
//! cargo run --release --example lm -- --full --epsilon 3  # every weight
//! cargo run --release --example lm -- --non-private       # the same without DP
//! cargo run --release --example lm -- --mode pretrain     # remake the base model
//! ```
//!
//! Data parallel over MPI (`--distributed`, as `digits`; see the README):
//!
//! ```sh
//! cargo build --release --features mpi --example lm
//! mpirun -n 2 target/release/examples/lm --distributed --seed 1 --json
//! ```
//!
//! # The privacy unit
//! One example is one window of 65 consecutive bytes of the private text
//! (64 inputs and their next bytes), with a per-window loss. The guarantee
//! is about one window: a fortune that spans two windows is in two examples,
//! and a person who wrote many fortunes is in many (group privacy applies).
//!
//! It writes the run folder as `digits` does (ledger, reports, the trained
//! weights — the LoRA adapter alone by default — named by SHA-256 in the
//! ledger, `summary.json`) and prints held-out bits per byte on the private
//! text before and after fine-tuning, and a few sampled lines.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Module, Tensor};
use candle_dp::accountant::DataProvenance;
use candle_dp::models::{Adapters, Flavor, Gpt, GptConfig};
use candle_dp::optim::AdamW;
use candle_dp::{loss, DpOptimizer, LoraConfig, PoissonSampler, PrivacyBudget};
use candle_nn::{Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::Parser;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// The shipped model's shape.
const CONFIG: GptConfig = GptConfig { vocab_size: 256, context: 64, d_model: 128, n_layers: 4, n_heads: 4 };
/// Bytes per example: the context and one more (the last target).
const WINDOW: usize = CONFIG.context + 1;

type AnyError = Box<dyn std::error::Error>;

/// Pretrain a byte-level transformer in public, fine-tune it with DP in private.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Args {
    /// finetune (default) or pretrain (remakes the base model from the public text).
    #[arg(long, value_enum, default_value_t = Mode::Finetune)]
    mode: Mode,
    /// Target epsilon of the fine-tuning.
    #[arg(long, default_value_t = 8.0, allow_hyphen_values = true)]
    epsilon: f64,
    /// Target delta (below 1 / the number of private windows).
    #[arg(long, default_value_t = 1e-5, allow_hyphen_values = true)]
    delta: f64,
    /// Passes over the private training windows.
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// Expected (Poisson) batch size of the fine-tuning.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Most windows one forward and backward pass takes (with or without DP).
    #[arg(long, default_value_t = 32)]
    physical_batch_size: usize,
    /// Clipping norm C.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    max_grad_norm: f64,
    /// AdamW learning rate (default: 2e-3 for LoRA, 5e-4 with --full, 2e-3 to pretrain).
    #[arg(long, allow_hyphen_values = true)]
    lr: Option<f64>,
    /// Fine-tune every weight instead of LoRA adapters.
    #[arg(long)]
    full: bool,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    /// Fine-tune without DP, for comparison.
    #[arg(long)]
    non_private: bool,
    /// Steps of pretraining (batch 32).
    #[arg(long, default_value_t = 3000)]
    pretrain_steps: usize,
    /// Fine-tune on the first N private training windows only (and evaluate
    /// on the first N / 10 held-out ones): for quick trials and tests.
    #[arg(long)]
    limit: Option<usize>,
    /// The base model: read to fine-tune, written by pretrain.
    #[arg(long)]
    base: Option<PathBuf>,
    /// Seed for initialization, sampling, noise and the sampled lines; without it they come from the OS.
    #[arg(long)]
    seed: Option<u64>,
    /// Run folder (default runs/lm-<UTC time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Audit the fine-tuning with this many canaries (0: none): the one-run
    /// canary audit's epsilon-hat, an empirical lower bound, goes into the
    /// ledger and the report beside epsilon. Canaries take sampler slots
    /// after the training windows.
    #[arg(long, default_value_t = 0)]
    audit: usize,
    /// Print summary.json as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Fine-tune as one rank of an MPI job started by `mpirun -n W` (data
    /// parallel, a build with `--features mpi`); rank 0 writes the run folder.
    #[arg(long)]
    distributed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
enum Mode {
    Finetune,
    Pretrain,
}

fn main() {
    let args = Args::parse();
    let result = check_flags(&args).and_then(|()| match args.mode {
        Mode::Pretrain => pretrain(&args),
        Mode::Finetune => finetune(&args),
    });
    if let Err(e) = result {
        eprintln!("lm: error: {e}");
        std::process::exit(2);
    }
}

fn check_flags(args: &Args) -> Result<(), AnyError> {
    use common::finite_positive;
    let lr = args.lr.unwrap_or(1.0);
    common::check_flags(&[
        ("--epsilon", args.epsilon, "finite and > 0", finite_positive(args.epsilon)),
        ("--delta", args.delta, "in (0, 1)", args.delta > 0.0 && args.delta < 1.0),
        ("--max-grad-norm", args.max_grad_norm, "finite and > 0", finite_positive(args.max_grad_norm)),
        ("--lr", lr, "finite and > 0", finite_positive(lr)),
        ("--epochs", args.epochs as f64, "an integer >= 1", args.epochs >= 1),
        ("--physical-batch-size", args.physical_batch_size as f64, "an integer >= 1", args.physical_batch_size >= 1),
        ("--pretrain-steps", args.pretrain_steps as f64, "an integer >= 1", args.pretrain_steps >= 1),
        ("--lora-rank", args.lora_rank as f64, "an integer in [1, 128]", (1..=128).contains(&args.lora_rank)),
        ("--limit", args.limit.unwrap_or(10) as f64, "an integer >= 10", args.limit.unwrap_or(10) >= 10),
    ])?;
    if args.distributed && (args.non_private || args.mode == Mode::Pretrain || args.audit > 0) {
        return Err("--distributed fine-tunes with DP-SGD in data parallel; it cannot be combined with \
                    --non-private, --mode pretrain or --audit"
            .into());
    }
    if args.audit > 0 && (args.non_private || args.mode == Mode::Pretrain) {
        return Err(
            "--audit audits a DP fine-tuning; it cannot be combined with --non-private or --mode pretrain".into()
        );
    }
    Ok(())
}

/// The private fine-tuning text.
const PRIVATE: &str = "fortunes-private.txt.gz";

fn data_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data").join(name)
}

/// A text cut into windows of [`WINDOW`] bytes (the last partial one dropped).
struct Windows {
    /// The whole text, shared by the sets cut from it.
    bytes: std::rc::Rc<[u8]>,
    /// Window starts, by example index.
    starts: Vec<usize>,
}

impl Windows {
    fn read(name: &str) -> Result<Self, AnyError> {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut common::open(&data_path(name), "shipped in examples/data")?, &mut bytes)?;
        let starts = (0..bytes.len() / WINDOW).map(|k| k * WINDOW).collect();
        Ok(Self { bytes: bytes.into(), starts })
    }

    /// The first `n` windows (all if fewer).
    fn first(mut self, n: usize) -> Self {
        self.starts.truncate(n);
        self
    }

    /// Every `k`-th window as its own set (the held-out part), the rest as the other.
    fn split(&self, k: usize) -> (Windows, Windows) {
        let pick = |held: bool| Windows {
            bytes: std::rc::Rc::clone(&self.bytes),
            starts: self.starts.iter().enumerate().filter(|(i, _)| (i % k == k - 1) == held).map(|(_, &s)| s).collect(),
        };
        (pick(false), pick(true))
    }

    fn len(&self) -> usize {
        self.starts.len()
    }

    /// Inputs and next-byte targets `[n, T]` (u32) of windows `idx`.
    fn batch(&self, idx: &[usize]) -> candle_core::Result<(Tensor, Tensor)> {
        let take = |offset: usize| -> Vec<u32> {
            idx.iter()
                .flat_map(|&i| self.bytes[self.starts[i] + offset..self.starts[i] + offset + CONFIG.context].iter())
                .map(|&b| u32::from(b))
                .collect()
        };
        let shape = (idx.len(), CONFIG.context);
        Ok((Tensor::from_vec(take(0), shape, &Device::Cpu)?, Tensor::from_vec(take(1), shape, &Device::Cpu)?))
    }

    /// Mean bits per byte of `model` over every window.
    fn bits_per_byte(&self, model: &Gpt) -> Result<f64, AnyError> {
        let all: Vec<usize> = (0..self.len()).collect();
        let mut nats = 0.0;
        for chunk in all.chunks(64) {
            let (x, y) = self.batch(chunk)?;
            let l = loss::sequence_cross_entropy(&model.forward(&x)?, &y)?;
            nats += l.tensor().to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        }
        Ok(nats / self.len() as f64 / std::f64::consts::LN_2)
    }
}

fn adam(lr: f64) -> ParamsAdamW {
    ParamsAdamW { lr, weight_decay: 0.0, ..Default::default() }
}

fn rng(seed: Option<u64>) -> Result<ChaCha20Rng, AnyError> {
    Ok(match seed {
        Some(s) => ChaCha20Rng::seed_from_u64(s.wrapping_add(7)),
        None => ChaCha20Rng::try_from_os_rng()?,
    })
}

/// Trains the base model on the public text without privacy and writes it.
fn pretrain(args: &Args) -> Result<(), AnyError> {
    let (train, held_out) = Windows::read("fortunes-public.txt.gz")?.split(50);
    let varmap = VarMap::new();
    let model = Gpt::new(CONFIG, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), Flavor::Plain, None)?;
    if let Some(seed) = args.seed {
        common::init_seeded(&varmap, seed)?;
    }
    let mut opt = AdamW::new(candle_dp::vars_by_name(&varmap), adam(args.lr.unwrap_or(2e-3)))?;
    let mut rng = rng(args.seed)?;
    let bar = common::progress_bar(args.pretrain_steps as u64, args.json)?;
    for step in 0..args.pretrain_steps {
        let idx: Vec<usize> = (0..32).map(|_| rng.random_range(0..train.len())).collect();
        let (x, y) = train.batch(&idx)?;
        let l = loss::sequence_cross_entropy(&model.forward(&x)?, &y)?.tensor().mean_all()?;
        opt.backward_step(&l)?;
        bar.inc(1);
        if step % 50 == 0 {
            bar.set_message(format!("loss {:.3} bits/byte", l.to_scalar::<f32>()? as f64 / std::f64::consts::LN_2));
        }
    }
    bar.finish_and_clear();
    let path = args.base.clone().unwrap_or_else(|| data_path("lm-base.safetensors"));
    varmap.save(&path)?;
    let private = Windows::read("fortunes-private.txt.gz")?;
    println!(
        "pretrained {} steps: held-out public {:.3} bits/byte, private text {:.3}; wrote {} (SHA-256 {})",
        args.pretrain_steps,
        held_out.bits_per_byte(&model)?,
        private.split(10).1.bits_per_byte(&model)?,
        path.display(),
        candle_dp::checkpoint::sha256_file(&path)?
    );
    Ok(())
}

/// The model to fine-tune over the base weights, and the variables trained.
struct Tuned {
    model: Gpt,
    /// The trained variables: the adapter's, or the whole model's with `--full`.
    trained: VarMap,
}

fn build(args: &Args, base: &HashMap<String, Tensor>) -> Result<Tuned, AnyError> {
    let flavor = if args.non_private { Flavor::Plain } else { Flavor::Dp };
    let trained = VarMap::new();
    let model = if args.full {
        let m = Gpt::new(CONFIG, VarBuilder::from_varmap(&trained, DType::F32, &Device::Cpu), flavor, None)?;
        for (name, var) in trained.data().lock().map_err(|_| "variable map lock poisoned")?.iter() {
            var.set(base.get(name).ok_or_else(|| format!("the base model has no {name}"))?)?;
        }
        m
    } else {
        // Frozen: plain tensors, never a trained variable.
        let base_vb = VarBuilder::from_tensors(base.clone(), DType::F32, &Device::Cpu);
        let adapters = Adapters {
            config: LoraConfig { rank: args.lora_rank, alpha: 2.0 * args.lora_rank as f64 },
            vb: VarBuilder::from_varmap(&trained, DType::F32, &Device::Cpu),
        };
        Gpt::new(CONFIG, base_vb, flavor, Some(adapters))?
    };
    if let Some(seed) = args.seed {
        if !args.full {
            // A from the seed; B stays zero, so the adapted model starts as the base.
            common::init_seeded(&trained, seed)?;
            for (name, var) in trained.data().lock().map_err(|_| "variable map lock poisoned")?.iter() {
                if name.contains("lora_B") {
                    var.set(&var.zeros_like()?)?;
                }
            }
        }
    }
    Ok(Tuned { model, trained })
}

fn finetune(args: &Args) -> Result<(), AnyError> {
    let base_path = args.base.clone().unwrap_or_else(|| data_path("lm-base.safetensors"));
    let base = candle_core::safetensors::load(&base_path, &Device::Cpu)
        .map_err(|e| format!("{}: {e} (make it with --mode pretrain)", base_path.display()))?;
    let private = Windows::read(PRIVATE)?;
    // The whole file is hashed; fine-tuning reads its training windows.
    let provenance =
        DataProvenance::of_file(data_path(PRIVATE), "examples/data/fortunes-private.txt.gz", private.len() as u64)?;
    let (mut train, mut held_out) = private.split(10);
    if let Some(limit) = args.limit {
        (train, held_out) = (train.first(limit), held_out.first(limit / 10));
    }
    let n = train.len();
    if args.batch_size == 0 || args.batch_size > n {
        return Err(format!("--batch-size = {}: must be in [1, {n}]", args.batch_size).into());
    }
    let steps = (args.epochs * n.div_ceil(args.batch_size)) as u64;
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from(format!("runs/lm-{}", common::utc_stamp())));
    let world = common::join_world(args.distributed)?;
    let (rank, world_size) = (world.rank(), world.world_size());
    // Rank 0's folder: it checks it and tells the others.
    common::agree_on_folder(world.as_ref(), || common::refuse_released(&out).map(|()| true))?;
    let tuned = build(args, &base)?;
    let base_bpb = held_out.bits_per_byte(&tuned.model)?;
    let lr = args.lr.unwrap_or(if args.full { 5e-4 } else { 2e-3 });
    let started = std::time::Instant::now();
    let bar = common::progress_bar(steps, args.json || rank != 0)?;
    let sampler = PoissonSampler::with_expected_batch_size(n, args.batch_size, args.seed)?;
    let vars = candle_dp::vars_by_name(&tuned.trained);
    let losses = |idx: &[usize]| -> candle_dp::Result<candle_dp::PerSampleLoss> {
        let (x, y) = train.batch(idx)?;
        loss::sequence_cross_entropy(&tuned.model.forward(&x)?, &y)
    };
    let release = if args.non_private {
        let mut opt = AdamW::new(vars.clone(), adam(lr))?;
        let mut sampler = sampler;
        for _ in 0..steps {
            let idx = sampler.sample();
            if !idx.is_empty() {
                opt.step(&mean_gradient(&vars, &idx, args.physical_batch_size, losses)?)?;
            }
            bar.inc(1);
        }
        std::fs::create_dir_all(&out)?;
        tuned.trained.save(out.join("model.safetensors"))?;
        None
    } else {
        let builder = DpOptimizer::<AdamW>::builder(vars, sampler)
            .target(PrivacyBudget { epsilon: args.epsilon, delta: args.delta }, steps)
            .max_grad_norm(args.max_grad_norm)
            .max_physical_batch_size(args.physical_batch_size)
            .noise(common::noise(args.seed)?)
            .data(provenance)
            .description(format!(
                "byte-level GPT {} on {n} windows of {WINDOW} bytes (the privacy unit: one window), {} epochs, \
                 expected batch {}",
                if args.full { "full fine-tuning" } else { "LoRA fine-tuning" },
                args.epochs,
                args.batch_size
            ));
        let opt = match common::canaries(args.audit, args.seed) {
            Some(c) => builder.audit(c),
            None => builder,
        }
        .build(adam(lr))?;
        let mut opt = if args.distributed { opt.distribute(world)? } else { opt };
        for _ in 0..steps {
            let s = opt.train_step(losses)?;
            bar.inc(1);
            if s.examples > 0 {
                let bpb = s.loss_sum / s.examples as f64 / std::f64::consts::LN_2;
                bar.set_message(format!("loss {bpb:.3} bits/byte  epsilon {:.2}", opt.epsilon(args.delta)?));
            }
        }
        Some((opt.release(&out, &tuned.trained, Some(args.delta))?, opt.noise_multiplier()))
    };
    bar.finish_and_clear();
    if rank != 0 {
        // Rank 0 evaluates and reports the model every rank holds.
        return Ok(());
    }
    let bpb = held_out.bits_per_byte(&tuned.model)?;
    let samples = sample_lines(&tuned.model, args.seed, 3)?;
    let mut summary = serde_json::json!({
        "epsilon": release.as_ref().map(|(r, _)| r.report.epsilon),
        "delta": release.as_ref().map(|_| args.delta),
        "noise_multiplier": release.as_ref().map(|(_, s)| *s),
        "steps": steps,
        "base_bits_per_byte": base_bpb,
        "bits_per_byte": bpb,
        "fine_tuning": if args.full { "full" } else { "lora" },
        "non_private": args.non_private,
        "world_size": world_size,
        "train_windows": n,
        "held_out_windows": held_out.len(),
        "batch_size": args.batch_size,
        "seed": args.seed,
        "samples": samples,
        "wall_seconds": started.elapsed().as_secs_f64(),
    });
    common::add_audit(&mut summary, release.as_ref().map(|(r, _)| &r.ledger));
    if !args.json {
        for line in &samples {
            println!("  > {line}");
        }
    }
    let done = format!("held-out bits per byte: base model {base_bpb:.3}, fine-tuned {bpb:.3}");
    common::finish(&out, &summary, release.as_ref().map(|(r, _)| &r.report), args.json, &done)
}

/// The gradient of the mean loss over `idx`, accumulated over physical
/// batches of at most `chunk` examples, as the DP run takes them (so that
/// the two runs hold the same activations at a time).
fn mean_gradient(
    vars: &[candle_core::Var],
    idx: &[usize],
    chunk: usize,
    losses: impl Fn(&[usize]) -> candle_dp::Result<candle_dp::PerSampleLoss>,
) -> Result<candle_core::backprop::GradStore, AnyError> {
    let mut total: Option<candle_core::backprop::GradStore> = None;
    for part in idx.chunks(chunk) {
        let grads = (losses(part)?.tensor().sum_all()? / idx.len() as f64)?.backward()?;
        match total.as_mut() {
            None => total = Some(grads),
            Some(acc) => {
                for v in vars {
                    if let Some(g) = grads.get(v.as_tensor()) {
                        let sum = match acc.get(v.as_tensor()) {
                            Some(a) => (a + g)?,
                            None => g.clone(),
                        };
                        acc.insert(v.as_tensor(), sum);
                    }
                }
            }
        }
    }
    total.ok_or_else(|| "an empty batch has no gradient".into())
}

/// `count` lines sampled from the model after a fortune separator, at temperature 0.8.
fn sample_lines(model: &Gpt, seed: Option<u64>, count: usize) -> Result<Vec<String>, AnyError> {
    let mut rng = rng(seed.map(|s| s ^ 0x5a5a))?;
    let mut lines = Vec::new();
    for _ in 0..count {
        let mut bytes: Vec<u8> = b"%\n".to_vec();
        while bytes.len() < 100 {
            let start = bytes.len().saturating_sub(CONFIG.context);
            let ctx: Vec<u32> = bytes[start..].iter().map(|&b| u32::from(b)).collect();
            let t = ctx.len();
            let logits = model.forward(&Tensor::from_vec(ctx, (1, t), &Device::Cpu)?)?.get(0)?.get(t - 1)?;
            let probs = candle_nn::ops::softmax_last_dim(&(logits / 0.8)?)?.to_vec1::<f32>()?;
            let mut u: f32 = rng.random();
            let next = probs.iter().position(|&p| {
                u -= p;
                u <= 0.0
            });
            let b = next.unwrap_or(255) as u8;
            if b == b'\n' && bytes.len() > 3 {
                break;
            }
            bytes.push(b);
        }
        lines.push(String::from_utf8_lossy(&bytes[2..]).replace(['\n', '\t'], " "));
    }
    Ok(lines)
}
