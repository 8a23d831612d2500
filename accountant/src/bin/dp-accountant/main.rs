//! `dp-accountant`: privacy accounting for reviewers, from the command line.
//!
//! Every number it prints comes from the `dp_accountant` library; this file
//! only parses flags, validates them (naming the flag and its valid range),
//! and formats. Exit codes: 0 success; 1 a ledger that fails verification;
//! 2 usage, input or I/O error.

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use dp_accountant::{
    calibrate_noise_multiplier, calibrate_noise_multiplier_pld, max_steps, max_steps_pld, AccountantKind, Adjacency,
    DpEvent, Error, Ledger, LedgerError, PldAccountant, PrivacyReport, RdpAccountant, Valid, DEFAULT_EPSILON_ERROR,
};
use serde_json::json;

const EXIT_CODES: &str = "Exit status:
  0  success (for verify: the ledger is intact)
  1  the ledger fails verification (broken chain, edited or reordered entry, wrong head, inconsistent content)
  2  usage error, invalid input (each error names the flag and its valid range), unreadable or malformed file";

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
    },
    /// Verify a ledger's hash chain and content.
    #[command(after_help = EXIT_CODES)]
    Verify {
        /// The ledger file.
        ledger: std::path::PathBuf,
        /// A head hash kept elsewhere (checkpoint, signed report): also fail if the ledger's head differs.
        #[arg(long)]
        expect_head: Option<String>,
    },
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
        Ok(PldAccountant::with_epsilon_error(Adjacency::AddOrRemoveOne, self.epsilon_error()?)?)
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
    let cli = Cli::parse();
    let mut out = String::new();
    let result = run(cli.command, &mut out);
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (`| head`) is not an error.
    let _ = stdout.write_all(out.as_bytes()).and_then(|_| stdout.flush());
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
                let plan = format!("q = {q}, noise multiplier {noise_multiplier}, {steps} steps");
                if let Some(r) = &rdp {
                    out.push_str(&format!(
                        "epsilon = {} at delta = {delta:e} (RDP accountant, optimal order {:.4}; {plan})\n",
                        r.epsilon, r.order
                    ));
                    edge_notes(out, r.order_at_range_edge, &r.dropped_orders);
                }
                if let Some(p) = &pld_bound {
                    out.push_str(&format!(
                        "epsilon = {} at delta = {delta:e} (PLD accountant; the true epsilon is proven to lie in [{}, \
                         {}]; {plan})\n",
                        p.epsilon, p.epsilon_lower, p.epsilon
                    ));
                }
                if rdp.is_some() && pld_bound.is_some() {
                    out.push_str(&format!("stated: epsilon = {epsilon} ({chosen}, the smaller upper bound)\n"));
                }
            }
        }
        Command::Rdp { noise_multiplier, sample_rate, orders, steps, json } => {
            flag("--noise-multiplier", noise_multiplier, Valid::Positive)?;
            flag("--sample-rate", sample_rate, Valid::HalfOpenUnit)?;
            for &a in &orders {
                flag("--orders", a, Valid::AboveOne)?;
            }
            let mut acc = RdpAccountant::with_orders(Adjacency::AddOrRemoveOne, &orders)?;
            acc.compose(&DpEvent::poisson_sampled_gaussian(sample_rate, noise_multiplier), steps)?;
            let rdp: Vec<f64> = orders.iter().map(|&a| acc.rdp_at(a)).collect::<Result<_, _>>()?;
            if json {
                push_json(out, json!({ "orders": orders, "rdp": rdp, "steps": steps }));
            } else {
                out.push_str("order\trdp\n");
                for (a, r) in orders.iter().zip(&rdp) {
                    out.push_str(&format!("{a}\t{r:.12e}\n"));
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
                    let c = calibrate_noise_multiplier_pld(target_epsilon, delta, q, steps, pld.epsilon_error()?)?;
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
                    "noise multiplier = {noise_multiplier} gives epsilon = {epsilon} <= {target_epsilon} at delta = \
                     {delta:e} (q = {q}, {steps} steps, {} accountant)\n",
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
                    let m = max_steps_pld(target_epsilon, delta, sample_rate, noise_multiplier, pld.epsilon_error()?)?;
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
                    "{steps} steps fit: epsilon = {epsilon} <= {target_epsilon} at delta = {delta:e} ({} accountant)\n",
                    accountant.name().to_uppercase()
                ));
            }
        }
        Command::Report { ledger, delta, format, accountant } => {
            if let Some(d) = delta {
                flag("--delta", d, Valid::OpenUnit)?;
            }
            let ledger = Ledger::read(&ledger)?;
            let report = PrivacyReport::from_ledger_with(&ledger, delta, accountant)?;
            out.push_str(&match format {
                Format::Text => report.to_text(),
                Format::Markdown => report.to_markdown(),
                Format::Json => report.to_json() + "\n",
                Format::Html => report.to_html(),
            });
        }
        Command::Verify { ledger: path, expect_head } => {
            let ledger = Ledger::read(&path)?;
            if let Some(anchor) = expect_head {
                ledger.verify_head(&anchor).map_err(ledger_failure)?;
            }
            out.push_str(&format!(
                "{}: intact: {} entries, {} steps, head {}\n",
                path.display(),
                ledger.entries().len(),
                ledger.total_steps(),
                ledger.head()
            ));
        }
    }
    Ok(())
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
    if !dropped.is_empty() {
        out.push_str(&format!(
            "note: orders {dropped:?} were dropped (series did not converge); epsilon can only be higher.\n"
        ));
    }
}
