//! `dp-accountant`: privacy accounting for reviewers, from the command line.
//!
//! Every number it prints comes from the `dp_accountant` library; this file
//! only parses flags, validates them (naming the flag and its valid range),
//! and formats. Exit codes: 0 success; 1 a ledger that fails verification;
//! 2 usage, input or I/O error.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

/// A progress line on stderr that no newline has ended yet.
static PROGRESS_OPEN: AtomicBool = AtomicBool::new(false);

use clap::{Args, Parser, Subcommand, ValueEnum};
use dp_accountant::{
    calibrate_noise_multiplier, calibrate_with, generate_key_files, max_steps, max_steps_with, AccountantKind,
    Adjacency, DpEvent, Error, Ledger, LedgerError, PldAccountant, PrivacyReport, PublicKey, RdpAccountant, SecretKey,
    Valid, DEFAULT_EPSILON_ERROR,
};
use serde_json::json;

const EXIT_CODES: &str = "Exit status:
  0  success (for verify: the ledger is intact)
  1  the ledger fails verification (broken chain, edited or reordered entry, not in canonical form, duplicate key,
     wrong head, head not the --expect-head, bad signature or not signed by the --public-key, inconsistent content)
  2  usage error, invalid input (each error names the flag and its valid range; a malformed --expect-head too),
     unreadable or malformed file, unreadable key file";

/// The largest RDP order `rdp --orders` accepts: the exact series takes
/// time linear in the order (1e6: about 20 ms per order).
const MAX_ORDER: f64 = 1e6;
/// The most orders, and the largest sum of orders, `rdp --orders` accepts
/// (the sum bounds the work: about 0.4 s at the limit).
const MAX_ORDERS: usize = 1000;
const MAX_ORDER_SUM: f64 = 1e7;
/// PLD searches (calibrate, max-steps) are refused when their estimated
/// work exceeds this (about 4 s), and show progress beyond `PROGRESS_WORK`
/// (about a second); both in the units of `dp_accountant::MAX_WORK`.
const MAX_SEARCH_WORK: f64 = 5e8;
const PROGRESS_WORK: f64 = 1.5e8;
/// The most work one PLD composition may take here (about three seconds),
/// in the units of `dp_accountant::MAX_WORK`.
const CLI_MAX_WORK: f64 = 4e8;

#[derive(Parser)]
#[command(name = "dp-accountant", version, about = "Privacy accounting for DP-SGD: epsilon, RDP curves, noise \
calibration, and reports on training ledgers.", after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Epsilon of DP-SGD with Poisson sampling (add-or-remove-one adjacency).
    Epsilon {
        /// Noise standard deviation over the clipping norm (> 0).
        #[arg(long, allow_hyphen_values = true)]
        noise_multiplier: f64,
        #[command(flatten)]
        plan: Plan,
        /// Delta, in (0, 1).
        #[arg(long, allow_hyphen_values = true)]
        delta: f64,
        /// Which accountant: rdp, pld (tighter; also prints a proven lower bound), or all (both; epsilon is the
        /// smaller upper bound).
        #[arg(long, value_enum, default_value_t = Which::Rdp)]
        accountant: Which,
        #[command(flatten)]
        pld: PldOptions,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// The RDP curve of the Poisson-subsampled Gaussian at the given orders.
    Rdp {
        /// Noise standard deviation over the clipping norm (> 0).
        #[arg(long, allow_hyphen_values = true)]
        noise_multiplier: f64,
        /// Per-example sampling probability, in (0, 1].
        #[arg(long, allow_hyphen_values = true)]
        sample_rate: f64,
        /// Comma-separated orders, each > 1.
        #[arg(long, allow_hyphen_values = true, value_delimiter = ',', required = true)]
        orders: Vec<f64>,
        /// Steps composed (default 1).
        #[arg(long, allow_hyphen_values = true, value_parser = parse_count, default_value_t = 1)]
        steps: u64,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// The smallest noise multiplier that meets a target epsilon.
    Calibrate {
        /// Target epsilon (> 0).
        #[arg(long, allow_hyphen_values = true)]
        target_epsilon: f64,
        /// Delta, in (0, 1).
        #[arg(long, allow_hyphen_values = true)]
        delta: f64,
        #[command(flatten)]
        plan: Plan,
        /// The accountant the target is met by: rdp or pld (less noise for the same target).
        #[arg(long, default_value_t = AccountantKind::Rdp)]
        accountant: AccountantKind,
        #[command(flatten)]
        pld: PldOptions,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// The largest number of steps that stays within a target epsilon.
    MaxSteps {
        /// Target epsilon (> 0).
        #[arg(long, allow_hyphen_values = true)]
        target_epsilon: f64,
        /// Delta, in (0, 1).
        #[arg(long, allow_hyphen_values = true)]
        delta: f64,
        /// Per-example sampling probability, in (0, 1].
        #[arg(long, allow_hyphen_values = true)]
        sample_rate: f64,
        /// Noise standard deviation over the clipping norm (> 0).
        #[arg(long, allow_hyphen_values = true)]
        noise_multiplier: f64,
        /// The accountant the target is met by: rdp or pld.
        #[arg(long, default_value_t = AccountantKind::Rdp)]
        accountant: AccountantKind,
        #[command(flatten)]
        pld: PldOptions,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// A privacy statement for a training ledger (verified first).
    #[command(after_help = EXIT_CODES)]
    Report {
        /// The ledger file (ledger.json of a run).
        ledger: std::path::PathBuf,
        /// Delta, in (0, 1) (default: the ledger's declared delta, else 1e-5).
        #[arg(long, allow_hyphen_values = true)]
        delta: Option<f64>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// The accountant the statement uses (both are shown): rdp or pld.
        #[arg(long, default_value_t = AccountantKind::Rdp)]
        accountant: AccountantKind,
        #[command(flatten)]
        trust: Trust,
    },
    /// Verify a ledger's hash chain, canonical form, content and signature.
    #[command(after_help = EXIT_CODES)]
    Verify {
        /// The ledger file.
        ledger: std::path::PathBuf,
        #[command(flatten)]
        trust: Trust,
    },
    /// Make an Ed25519 key pair from OS entropy: FILE (secret, owner-only) and FILE.pub.
    #[command(after_help = EXIT_CODES)]
    Keygen {
        /// The secret key file to create (never overwritten); the public key goes to FILE.pub.
        #[arg(long, value_name = "FILE")]
        out: std::path::PathBuf,
    },
    /// Sign a ledger's head with a secret key (the ledger is verified first, then rewritten with the signature).
    #[command(after_help = EXIT_CODES)]
    Sign {
        /// The ledger file.
        ledger: std::path::PathBuf,
        /// The secret key file (from `keygen`).
        #[arg(long, value_name = "FILE")]
        key: std::path::PathBuf,
    },
}

/// What a reviewer trusts besides the ledger itself.
#[derive(Args)]
struct Trust {
    /// A head hash kept elsewhere (checkpoint, earlier report): fail unless the ledger's head is this
    /// (64 hex digits).
    #[arg(long, value_name = "HEX", value_parser = parse_head)]
    expect_head: Option<String>,
    /// A trusted public key file (from `keygen`): fail unless the ledger's head is signed by this key.
    #[arg(long, value_name = "FILE")]
    public_key: Option<std::path::PathBuf>,
}

impl Trust {
    /// Checks the ledger against the anchors given; returns the trusted key if one was.
    fn check(&self, ledger: &Ledger) -> Result<Option<PublicKey>, Failure> {
        if let Some(anchor) = &self.expect_head {
            ledger.verify_head(anchor).map_err(ledger_failure)?;
        }
        match &self.public_key {
            Some(path) => {
                let key = PublicKey::read(path)?;
                ledger.verify_signature(&key).map_err(ledger_failure)?;
                Ok(Some(key))
            }
            None => Ok(None),
        }
    }
}

/// A training plan: sample rate and steps, or dataset size, batch size and epochs.
#[derive(Args)]
struct Plan {
    /// Per-example sampling probability, in (0, 1].
    #[arg(long, allow_hyphen_values = true, conflicts_with_all = ["dataset_size", "batch_size", "epochs"])]
    sample_rate: Option<f64>,
    /// Number of steps (>= 1).
    #[arg(long, allow_hyphen_values = true, value_parser = parse_count, conflicts_with_all = ["dataset_size", "batch_size", "epochs"])]
    steps: Option<u64>,
    /// Training set size N (>= 1); with --batch-size and --epochs instead of --sample-rate and --steps.
    #[arg(long, allow_hyphen_values = true, value_parser = parse_count)]
    dataset_size: Option<u64>,
    /// Expected batch size B, 1 <= B <= N: sample rate B/N.
    #[arg(long, allow_hyphen_values = true, value_parser = parse_count)]
    batch_size: Option<u64>,
    /// Epochs E (> 0): steps = ceil(E N / B).
    #[arg(long, allow_hyphen_values = true)]
    epochs: Option<f64>,
}

/// The PLD accountant's precision.
#[derive(Args)]
struct PldOptions {
    /// PLD only: the largest gap allowed between the proven upper and lower epsilon (> 0).
    #[arg(long, allow_hyphen_values = true, default_value_t = DEFAULT_EPSILON_ERROR)]
    epsilon_error: f64,
}

impl PldOptions {
    fn accountant(&self) -> Result<PldAccountant, Failure> {
        Ok(PldAccountant::with_epsilon_error(Adjacency::AddOrRemoveOne, self.epsilon_error()?)?
            .with_max_work(CLI_MAX_WORK)?)
    }

    /// `--epsilon-error`, checked.
    fn epsilon_error(&self) -> Result<f64, Failure> {
        flag("--epsilon-error", self.epsilon_error, Valid::Positive)
    }
}

/// `--accountant` of `epsilon`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    Rdp,
    Pld,
    All,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Markdown,
    Json,
    /// A self-contained page with SVG plots of epsilon against steps and delta.
    Html,
}

/// Why the CLI stops.
enum Failure {
    /// Exit 2.
    Usage(String),
    /// Exit 1.
    Verification(String),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        match e {
            Error::Ledger(l) => ledger_failure(l),
            other => Failure::Usage(other.to_string()),
        }
    }
}

fn ledger_failure(e: LedgerError) -> Failure {
    match e {
        LedgerError::Malformed { .. } | LedgerError::WrongFormat { .. } | LedgerError::UnsupportedVersion { .. } => {
            Failure::Usage(e.to_string())
        }
        other => Failure::Verification(format!("ledger fails verification: {other}")),
    }
}

/// Checks a flag's value, naming the flag in the error.
fn flag(name: &'static str, value: f64, valid: Valid) -> Result<f64, Failure> {
    if valid.contains(value) {
        Ok(value)
    } else {
        Err(Error::InvalidParameter { field: name, value, valid }.into())
    }
}

impl Plan {
    /// `(sample_rate, steps)`.
    fn resolve(&self) -> Result<(f64, u64), Failure> {
        match (self.sample_rate, self.steps, self.dataset_size, self.batch_size, self.epochs) {
            (Some(q), Some(n), None, None, None) => {
                flag("--sample-rate", q, Valid::HalfOpenUnit)?;
                flag("--steps", n as f64, Valid::AtLeastOne)?;
                Ok((q, n))
            }
            (None, None, Some(n), Some(b), Some(e)) => {
                flag("--dataset-size", n as f64, Valid::AtLeastOne)?;
                flag("--batch-size", b as f64, Valid::AtLeastOne)?;
                if b > n {
                    return Err(Failure::Usage(format!("--batch-size = {b}: must be <= --dataset-size ({n})")));
                }
                flag("--epochs", e, Valid::Positive)?;
                let steps = (e * n as f64 / b as f64).ceil();
                if steps >= u64::MAX as f64 {
                    return Err(Failure::Usage(format!("--epochs = {e}: too many steps")));
                }
                Ok((b as f64 / n as f64, steps as u64))
            }
            _ => Err(Failure::Usage(
                "give either --sample-rate and --steps, or --dataset-size, --batch-size and --epochs".into(),
            )),
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("dp-accountant: error: {} (see --help)", one_line(&e.to_string()));
            return ExitCode::from(2);
        }
    };
    let mut out = String::new();
    let result = run(cli.command, &mut out);
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (`| head`) is not an error.
    let _ = stdout.write_all(out.as_bytes()).and_then(|_| stdout.flush());
    if PROGRESS_OPEN.swap(false, Ordering::Relaxed) {
        eprintln!();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Verification(msg)) => {
            eprintln!("dp-accountant: {msg}");
            ExitCode::from(1)
        }
        Err(Failure::Usage(msg)) => {
            eprintln!("dp-accountant: error: {msg}");
            ExitCode::from(2)
        }
    }
}

fn run(command: Command, out: &mut String) -> Result<(), Failure> {
    match command {
        Command::Epsilon { noise_multiplier, plan, delta, accountant, pld, json } => {
            flag("--noise-multiplier", noise_multiplier, Valid::Positive)?;
            let (q, steps) = plan.resolve()?;
            flag("--delta", delta, Valid::OpenUnit)?;
            let event = DpEvent::poisson_sampled_gaussian(q, noise_multiplier);
            let rdp = if accountant == Which::Pld {
                None
            } else {
                let mut acc = RdpAccountant::new(Adjacency::AddOrRemoveOne);
                acc.compose(&event, steps)?;
                Some(acc.epsilon(delta)?)
            };
            let pld_bound = if accountant == Which::Rdp {
                None
            } else {
                let mut acc = pld.accountant()?;
                acc.compose(&event, steps)?;
                let _progress = Progress::after_a_second("composing the privacy loss distributions");
                Some(acc.epsilon(delta)?)
            };
            // The stated epsilon: the chosen accountant's upper bound (with both, the smaller one).
            let (epsilon, chosen) = match (&rdp, &pld_bound) {
                (Some(r), Some(p)) if p.epsilon < r.epsilon => (p.epsilon, "pld"),
                (Some(r), _) => (r.epsilon, "rdp"),
                (None, Some(p)) => (p.epsilon, "pld"),
                (None, None) => return Err(Failure::Usage("--accountant: no accountant chosen".into())),
            };
            if json {
                let mut v = json!({
                    "epsilon": epsilon, "delta": delta, "accountant": chosen,
                    "noise_multiplier": noise_multiplier, "sample_rate": q, "steps": steps,
                });
                if let Some(r) = &rdp {
                    v["order"] = json!(r.order);
                    v["rdp"] = json!({
                        "epsilon": r.epsilon, "order": r.order, "order_at_range_edge": r.order_at_range_edge,
                        "dropped_orders": r.dropped_orders,
                    });
                }
                if let Some(p) = &pld_bound {
                    v["epsilon_lower"] = json!(p.epsilon_lower);
                    v["pld"] = json!({
                        "epsilon": p.epsilon, "epsilon_lower": p.epsilon_lower, "grid_step": p.grid_step,
                        "epsilon_error": pld.epsilon_error,
                    });
                }
                push_json(out, v);
            } else {
                let plan = format!("q = {}, noise multiplier {}, {steps} steps", num(q), num(noise_multiplier));
                if let Some(r) = &rdp {
                    out.push_str(&format!(
                        "epsilon = {} at delta = {delta:e} (RDP accountant, optimal order {:.4}; {plan})\n",
                        num(r.epsilon),
                        r.order
                    ));
                    edge_notes(out, r.order_at_range_edge, &r.dropped_orders);
                }
                if let Some(p) = &pld_bound {
                    out.push_str(&format!(
                        "epsilon = {} at delta = {delta:e} (PLD accountant; the true epsilon is proven to lie in [{}, \
                         {}]; {plan})\n",
                        num(p.epsilon),
                        num(p.epsilon_lower),
                        num(p.epsilon)
                    ));
                }
                if rdp.is_some() && pld_bound.is_some() {
                    out.push_str(&format!("stated: epsilon = {} ({chosen}, the smaller upper bound)\n", num(epsilon)));
                }
            }
        }
        Command::Rdp { noise_multiplier, sample_rate, orders, steps, json } => {
            flag("--noise-multiplier", noise_multiplier, Valid::Positive)?;
            flag("--sample-rate", sample_rate, Valid::HalfOpenUnit)?;
            for &a in &orders {
                flag("--orders", a, Valid::AboveOne)?;
                if a > MAX_ORDER {
                    return Err(Failure::Usage(format!(
                        "--orders = {}: must be <= {} (the exact series takes time linear in the order)",
                        num(a),
                        num(MAX_ORDER)
                    )));
                }
            }
            if orders.len() > MAX_ORDERS || orders.iter().sum::<f64>() > MAX_ORDER_SUM {
                return Err(Failure::Usage(format!(
                    "--orders: at most {MAX_ORDERS} orders summing to at most {} (the work is linear in their sum)",
                    num(MAX_ORDER_SUM)
                )));
            }
            let mut acc = RdpAccountant::with_orders(Adjacency::AddOrRemoveOne, &orders)?;
            acc.compose(&DpEvent::poisson_sampled_gaussian(sample_rate, noise_multiplier), steps)?;
            let rdp: Vec<f64> = orders.iter().map(|&a| acc.rdp_at(a)).collect::<Result<_, _>>()?;
            if json {
                push_json(out, json!({ "orders": orders, "rdp": rdp, "steps": steps }));
            } else {
                out.push_str("order\trdp\n");
                for (a, r) in orders.iter().zip(&rdp) {
                    out.push_str(&format!("{}\t{r:.12e}\n", num(*a)));
                }
            }
        }
        Command::Calibrate { target_epsilon, delta, plan, accountant, pld, json } => {
            flag("--target-epsilon", target_epsilon, Valid::Positive)?;
            flag("--delta", delta, Valid::OpenUnit)?;
            let (q, steps) = plan.resolve()?;
            let (noise_multiplier, epsilon, detail) = match accountant {
                AccountantKind::Rdp => {
                    let c = calibrate_noise_multiplier(target_epsilon, delta, q, steps)?;
                    (c.noise_multiplier, c.epsilon.epsilon, json!({ "order": c.epsilon.order }))
                }
                AccountantKind::Pld => {
                    let eps_err = pld.epsilon_error()?;
                    let eval = |sigma: f64| {
                        let mut acc = PldAccountant::with_epsilon_error(Adjacency::AddOrRemoveOne, eps_err)?
                            .with_max_work(CLI_MAX_WORK)?;
                        acc.compose(&DpEvent::poisson_sampled_gaussian(q, sigma), steps)?;
                        Ok::<_, Error>(acc)
                    };
                    // The work is probed at RDP's answer, which PLD's is close to.
                    let probe =
                        calibrate_noise_multiplier(target_epsilon, delta, q, steps).map_or(1.0, |c| c.noise_multiplier);
                    let search = Search::plan(eval(probe)?.work()?, 40.0)?;
                    let c = calibrate_with(target_epsilon, |sigma| search.step(delta, || eval(sigma)))?;
                    search.finish(out);
                    let detail =
                        json!({ "epsilon_lower": c.epsilon.epsilon_lower, "epsilon_error": pld.epsilon_error });
                    (c.noise_multiplier, c.epsilon.epsilon, detail)
                }
            };
            if json {
                let mut v = json!({
                    "noise_multiplier": noise_multiplier, "epsilon": epsilon, "target_epsilon": target_epsilon,
                    "delta": delta, "sample_rate": q, "steps": steps, "accountant": accountant.name(),
                });
                if let (Some(v), Some(d)) = (v.as_object_mut(), detail.as_object()) {
                    v.extend(d.clone());
                }
                push_json(out, v);
            } else {
                out.push_str(&format!(
                    "noise multiplier = {} gives epsilon = {} <= {} at delta = {delta:e} (q = {}, {steps} steps, {} \
                     accountant)\n",
                    num(noise_multiplier),
                    num(epsilon),
                    num(target_epsilon),
                    num(q),
                    accountant.name().to_uppercase()
                ));
            }
        }
        Command::MaxSteps { target_epsilon, delta, sample_rate, noise_multiplier, accountant, pld, json } => {
            flag("--target-epsilon", target_epsilon, Valid::Positive)?;
            flag("--delta", delta, Valid::OpenUnit)?;
            flag("--sample-rate", sample_rate, Valid::HalfOpenUnit)?;
            flag("--noise-multiplier", noise_multiplier, Valid::Positive)?;
            let (steps, epsilon) = match accountant {
                AccountantKind::Rdp => {
                    let m = max_steps(target_epsilon, delta, sample_rate, noise_multiplier)?;
                    (m.steps, m.epsilon.epsilon)
                }
                AccountantKind::Pld => {
                    let eps_err = pld.epsilon_error()?;
                    let eval = |n: u64| {
                        let mut acc = PldAccountant::with_epsilon_error(Adjacency::AddOrRemoveOne, eps_err)?
                            .with_max_work(CLI_MAX_WORK)?;
                        acc.compose(&DpEvent::poisson_sampled_gaussian(sample_rate, noise_multiplier), n)?;
                        Ok::<_, Error>(acc)
                    };
                    // Probed at RDP's answer (PLD's is close to it); past 2^40 steps, at 2^40.
                    let probe = max_steps(target_epsilon, delta, sample_rate, noise_multiplier)
                        .map_or(1u64 << 40, |m| m.steps.max(1));
                    let search = Search::plan(eval(probe)?.work()?, 2.0 * (probe as f64).log2() + 4.0)?;
                    let m = max_steps_with(target_epsilon, |n| search.step(delta, || eval(n)))?;
                    search.finish(out);
                    (m.steps, m.epsilon.epsilon)
                }
            };
            if json {
                push_json(
                    out,
                    json!({
                        "steps": steps, "epsilon": epsilon, "target_epsilon": target_epsilon,
                        "delta": delta, "sample_rate": sample_rate, "noise_multiplier": noise_multiplier,
                        "accountant": accountant.name(),
                    }),
                );
            } else {
                out.push_str(&format!(
                    "{steps} steps fit: epsilon = {} <= {} at delta = {delta:e} ({} accountant)\n",
                    num(epsilon),
                    num(target_epsilon),
                    accountant.name().to_uppercase()
                ));
            }
        }
        Command::Report { ledger, delta, format, accountant, trust } => {
            if let Some(d) = delta {
                flag("--delta", d, Valid::OpenUnit)?;
            }
            let ledger = Ledger::read(&ledger)?;
            let trusted = trust.check(&ledger)?;
            let progress = Progress::after_a_second(&format!("composing {} entries", ledger.entries().len()));
            let mut report = PrivacyReport::from_ledger_with(&ledger, delta, accountant)?;
            drop(progress);
            if let (Some(sig), Some(_)) = (report.signature.as_mut(), trusted) {
                sig.trusted = true;
            }
            out.push_str(&match format {
                Format::Text => report.to_text(),
                Format::Markdown => report.to_markdown(),
                Format::Json => report.to_json() + "\n",
                Format::Html => report.to_html(),
            });
        }
        Command::Verify { ledger: path, trust } => {
            let ledger = Ledger::read(&path)?;
            let trusted = trust.check(&ledger)?;
            let signed = match (ledger.signer(), trusted) {
                (Some(k), Some(_)) => format!("signed by the trusted key {}", k.fingerprint()),
                (Some(k), None) => format!("signed by {} (not checked against a trusted key)", k.fingerprint()),
                (None, _) => "not signed".to_string(),
            };
            out.push_str(&format!(
                "{}: intact: {} entries, {} steps, head {}, {signed}\n",
                path.display(),
                ledger.entries().len(),
                ledger.total_steps(),
                ledger.head()
            ));
        }
        Command::Keygen { out: path } => {
            let key = generate_key_files(&path)?;
            out.push_str(&format!(
                "secret key: {} (keep it secret)\npublic key: {}.pub, fingerprint {}\n",
                path.display(),
                path.display(),
                key.fingerprint()
            ));
        }
        Command::Sign { ledger: path, key } => {
            let key = SecretKey::read(&key)?;
            let mut ledger = Ledger::read(&path)?;
            ledger.sign(&key);
            ledger.write(&path)?;
            out.push_str(&format!(
                "{}: head {} signed by {}\n",
                path.display(),
                ledger.head(),
                key.public_key().fingerprint()
            ));
        }
    }
    Ok(())
}

/// A line on stderr if the work it guards is still running after a second,
/// ended with "done" when it finishes.
struct Progress {
    finished: std::sync::Arc<AtomicBool>,
    shown: std::sync::Arc<AtomicBool>,
}

impl Progress {
    fn after_a_second(what: &str) -> Self {
        let finished = std::sync::Arc::new(AtomicBool::new(false));
        let shown = std::sync::Arc::new(AtomicBool::new(false));
        let (f, s, what) = (finished.clone(), shown.clone(), what.to_string());
        std::thread::spawn(move || {
            for _ in 0..10 {
                std::thread::sleep(std::time::Duration::from_millis(100));
                if f.load(Ordering::Relaxed) {
                    return;
                }
            }
            eprint!("dp-accountant: {what}...");
            s.store(true, Ordering::Relaxed);
            PROGRESS_OPEN.store(true, Ordering::Relaxed);
        });
        Self { finished, shown }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finished.store(true, Ordering::Relaxed);
        if self.shown.load(Ordering::Relaxed) && PROGRESS_OPEN.swap(false, Ordering::Relaxed) {
            eprintln!(" done");
        }
    }
}

/// A PLD search (calibrate, max-steps): its work bounded up front, its
/// progress shown when it may take over a second.
struct Search {
    show: bool,
    done: std::cell::Cell<u32>,
    capped: std::cell::Cell<bool>,
    /// The work done so far: the search stops past `MAX_SEARCH_WORK` whatever the plan said.
    spent: std::cell::Cell<f64>,
    /// A backstop where the work model is off (it is measured, not proven).
    start: std::time::Instant,
}

impl Search {
    /// Plans `evaluations` compositions of about `work` each.
    fn plan(work: f64, evaluations: f64) -> Result<Self, Failure> {
        // Refused up front if even the fewest compositions a search takes (8)
        // exceed the bound; the work actually spent is bounded in `step`.
        let total = work * evaluations;
        let least = work * evaluations.min(8.0);
        if least > MAX_SEARCH_WORK {
            return Err(Failure::Usage(format!(
                "--accountant pld: this search needs at least 8 PLD compositions of {work:.1e} operations (about \
                 {:.0} s), more than the limit of {MAX_SEARCH_WORK:.1e} (about 4 s): use --accountant rdp, or a \
                 larger --epsilon-error",
                least * 7e-9
            )));
        }
        Ok(Self {
            show: total > PROGRESS_WORK,
            done: 0.into(),
            capped: false.into(),
            spent: 0.0.into(),
            start: std::time::Instant::now(),
        })
    }

    /// One evaluation. A composition over the work bound counts as missing
    /// the target (infinite epsilon): conservative, never a smaller answer.
    fn step(
        &self,
        delta: f64,
        eval: impl FnOnce() -> Result<PldAccountant, Error>,
    ) -> Result<dp_accountant::PldEpsilon, Error> {
        self.done.set(self.done.get() + 1);
        if self.show {
            eprint!("\rdp-accountant: PLD search, composition {}...", self.done.get());
            PROGRESS_OPEN.store(true, Ordering::Relaxed);
        }
        if self.spent.get() > MAX_SEARCH_WORK || self.start.elapsed().as_secs_f64() > 5.0 {
            return Err(Error::Calibration {
                reason: format!(
                    "--accountant pld: the search spent {:.1e} operations in {} compositions without an answer, \
                     more than the limit of {MAX_SEARCH_WORK:.1e} (about 4 s): use --accountant rdp, or a larger \
                     --epsilon-error",
                    self.spent.get(),
                    self.done.get() - 1
                ),
            });
        }
        let acc = eval()?;
        let answer = acc.epsilon(delta);
        self.spent.set(self.spent.get() + acc.work().unwrap_or(CLI_MAX_WORK));
        match answer {
            Err(Error::PldWorkTooLarge { .. } | Error::GridTooLarge { .. }) => {
                self.capped.set(true);
                Ok(dp_accountant::PldEpsilon { epsilon: f64::INFINITY, epsilon_lower: 0.0, delta, grid_step: 0.0 })
            }
            other => other,
        }
    }

    fn finish(&self, out: &mut String) {
        if PROGRESS_OPEN.swap(false, Ordering::Relaxed) {
            eprintln!(" done");
        }
        if self.capped.get() {
            out.push_str(&format!(
                "note: some PLD compositions exceeded the work bound ({CLI_MAX_WORK:.0e}) and were counted as missing the \
                 target: the answer is conservative\n"
            ));
        }
    }
}

/// Clap's message on one line: the usage and hint lines dropped.
fn one_line(message: &str) -> String {
    let body = message.split("\n\nUsage:").next().unwrap_or(message);
    let body = body.split("\n\nFor more information").next().unwrap_or(body);
    let body = body.trim().trim_start_matches("error: ");
    body.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Parses a head hash: 64 hex digits.
fn parse_head(text: &str) -> Result<String, String> {
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(text.to_ascii_lowercase())
    } else {
        Err("must be 64 hex digits (a SHA-256 head, as `verify` prints it)".into())
    }
}

/// A number for people: shortest round-trip digits, in scientific notation
/// below 1e-4 and from 1e6 on (never hundreds of digits).
fn num(x: f64) -> String {
    if x != 0.0 && x.is_finite() && (x.abs() < 1e-4 || x.abs() >= 1e6) {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

/// Parses a count flag, with the valid range in the error.
fn parse_count(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("must be an integer >= 1".into()),
    }
}

fn push_json(out: &mut String, value: serde_json::Value) {
    out.push_str(&value.to_string());
    out.push('\n');
}

fn edge_notes(out: &mut String, at_edge: bool, dropped: &[f64]) {
    if at_edge {
        out.push_str("note: the optimal order is at the end of the order grid; a wider grid might give less.\n");
    }
    if let (Some(first), Some(last)) = (dropped.first(), dropped.last()) {
        out.push_str(&format!(
            "note: {} orders (from {} to {}) were dropped (series did not converge); epsilon can only be higher.\n",
            dropped.len(),
            num(*first),
            num(*last)
        ));
    }
}
