//! The command line: flags as clap parses them, and their checks into the
//! values the subcommands use (each check names the flag and its valid range).

use clap::{Args, Parser, Subcommand, ValueEnum};
use dp_accountant::{AccountantKind, Adjacency, PldAccountant, Valid, DEFAULT_EPSILON_ERROR};

use crate::{flag, Failure};

pub(crate) const EXIT_CODES: &str = "Exit status:
  0  success (for verify: the ledger is intact)
  1  the ledger fails verification (broken chain, edited or reordered entry, not in canonical form, duplicate key,
     wrong head, head not the --expect-head, bad signature or not signed by the --public-key, inconsistent content)
  2  usage error, invalid input (each error names the flag and its valid range; a malformed --expect-head too),
     unreadable or malformed file, unreadable key file";

/// The most work one PLD composition may take here (about three seconds),
/// in the units of `dp_accountant::MAX_WORK`.
pub(crate) const CLI_MAX_WORK: f64 = 4e8;

#[derive(Parser)]
#[command(name = "dp-accountant", version, about = "Privacy accounting for DP-SGD: epsilon, RDP curves, noise \
calibration, and reports on training ledgers.", after_help = EXIT_CODES)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Epsilon of DP-SGD with Poisson sampling (add-or-remove-one adjacency).
    Epsilon(EpsilonArgs),
    /// The RDP curve of the Poisson-subsampled Gaussian at the given orders.
    Rdp(RdpArgs),
    /// The smallest noise multiplier that meets a target epsilon.
    Calibrate(CalibrateArgs),
    /// The largest number of steps that stays within a target epsilon.
    MaxSteps(MaxStepsArgs),
    /// A privacy statement for a training ledger (verified first).
    #[command(after_help = EXIT_CODES)]
    Report(ReportArgs),
    /// Verify a ledger's hash chain, canonical form, content and signature.
    #[command(after_help = EXIT_CODES)]
    Verify(VerifyArgs),
    /// Make an Ed25519 key pair from OS entropy: FILE (secret, owner-only) and FILE.pub.
    #[command(after_help = EXIT_CODES)]
    Keygen(KeygenArgs),
    /// Sign a ledger's head with a secret key (the ledger is verified first, then rewritten with the signature).
    #[command(after_help = EXIT_CODES)]
    Sign(SignArgs),
    /// An empirical lower bound on epsilon from canary scores: the one-run audit of Steinke, Nasr & Jagielski
    /// (NeurIPS 2023).
    #[command(after_help = EXIT_CODES)]
    Audit(AuditArgs),
}

/// The flags of `audit`.
#[derive(Args)]
pub(crate) struct AuditArgs {
    /// A JSON file {"in_scores": [numbers], "out_scores": [numbers]}: the scores of the canaries that were and
    /// were not included (each independently with probability 1/2); higher means more likely included.
    pub(crate) scores: std::path::PathBuf,
    /// Delta of the hypothesis "training is (epsilon, delta)-DP", in [0, 1).
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) delta: f64,
    /// Significance: the chance that epsilon-hat exceeds the true epsilon, in (0, 1).
    #[arg(long, allow_hyphen_values = true, default_value_t = 0.05)]
    pub(crate) alpha: f64,
    /// Also guess "excluded" for the lowest scores (not only "included" for the highest).
    #[arg(long)]
    pub(crate) two_sided: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The flags of `epsilon`.
#[derive(Args)]
pub(crate) struct EpsilonArgs {
    /// Noise standard deviation over the clipping norm (> 0).
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) noise_multiplier: f64,
    #[command(flatten)]
    pub(crate) plan: Plan,
    /// Delta, in (0, 1).
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) delta: f64,
    /// Which accountant: rdp, pld (tighter; also prints a proven lower bound), or all (both; epsilon is the
    /// smaller upper bound).
    #[arg(long, value_enum, default_value_t = Which::Rdp)]
    pub(crate) accountant: Which,
    #[command(flatten)]
    pub(crate) answer: Answer,
}

/// The flags of `rdp`.
#[derive(Args)]
pub(crate) struct RdpArgs {
    /// Noise standard deviation over the clipping norm (> 0).
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) noise_multiplier: f64,
    /// Per-example sampling probability, in (0, 1].
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) sample_rate: f64,
    /// Comma-separated orders, each > 1.
    #[arg(long, allow_hyphen_values = true, value_delimiter = ',', required = true)]
    pub(crate) orders: Vec<f64>,
    /// Steps composed (default 1).
    #[arg(long, allow_hyphen_values = true, value_parser = parse_count, default_value_t = 1)]
    pub(crate) steps: u64,
    /// Print one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The flags of `calibrate`.
#[derive(Args)]
pub(crate) struct CalibrateArgs {
    #[command(flatten)]
    pub(crate) target: Target,
    #[command(flatten)]
    pub(crate) plan: Plan,
    /// The accountant the target is met by: rdp or pld (less noise for the same target).
    #[arg(long, default_value_t = AccountantKind::Rdp)]
    pub(crate) accountant: AccountantKind,
    #[command(flatten)]
    pub(crate) answer: Answer,
}

/// The flags of `max-steps`.
#[derive(Args)]
pub(crate) struct MaxStepsArgs {
    #[command(flatten)]
    pub(crate) target: Target,
    /// Per-example sampling probability, in (0, 1].
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) sample_rate: f64,
    /// Noise standard deviation over the clipping norm (> 0).
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) noise_multiplier: f64,
    /// The accountant the target is met by: rdp or pld.
    #[arg(long, default_value_t = AccountantKind::Rdp)]
    pub(crate) accountant: AccountantKind,
    #[command(flatten)]
    pub(crate) answer: Answer,
}

/// The flags of `report`.
#[derive(Args)]
pub(crate) struct ReportArgs {
    /// The ledger file (ledger.json of a run).
    pub(crate) ledger: std::path::PathBuf,
    /// Delta, in (0, 1) (default: the ledger's declared delta, else 1e-5).
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) delta: Option<f64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub(crate) format: Format,
    /// The accountant the statement uses (both are shown): rdp or pld.
    #[arg(long, default_value_t = AccountantKind::Rdp)]
    pub(crate) accountant: AccountantKind,
    /// The most examples one person contributed (an integer >= 1): adds a user-level epsilon, by group privacy.
    #[arg(long, value_name = "K", allow_hyphen_values = true, value_parser = parse_count)]
    pub(crate) max_examples_per_user: Option<u64>,
    #[command(flatten)]
    pub(crate) trust: Trust,
}

/// The flags of `verify`.
#[derive(Args)]
pub(crate) struct VerifyArgs {
    /// The ledger file.
    pub(crate) ledger: std::path::PathBuf,
    #[command(flatten)]
    pub(crate) trust: Trust,
}

/// The flags of `keygen`.
#[derive(Args)]
pub(crate) struct KeygenArgs {
    /// The secret key file to create (never overwritten); the public key goes to FILE.pub.
    #[arg(long, value_name = "FILE")]
    pub(crate) out: std::path::PathBuf,
}

/// The flags of `sign`.
#[derive(Args)]
pub(crate) struct SignArgs {
    /// The ledger file.
    pub(crate) ledger: std::path::PathBuf,
    /// The secret key file (from `keygen`).
    #[arg(long, value_name = "FILE")]
    pub(crate) key: std::path::PathBuf,
}

/// What a reviewer trusts besides the ledger itself.
#[derive(Args)]
pub(crate) struct Trust {
    /// A head hash kept elsewhere (checkpoint, earlier report): fail unless the ledger's head is this
    /// (64 hex digits).
    #[arg(long, value_name = "HEX", value_parser = parse_head)]
    pub(crate) expect_head: Option<String>,
    /// A trusted public key file (from `keygen`): fail unless the ledger's head is signed by this key.
    #[arg(long, value_name = "FILE")]
    pub(crate) public_key: Option<std::path::PathBuf>,
}

/// The target a search meets.
#[derive(Args)]
pub(crate) struct Target {
    /// Target epsilon (> 0).
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) target_epsilon: f64,
    /// Delta, in (0, 1).
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) delta: f64,
}

/// How `epsilon`, `calibrate` and `max-steps` answer: PLD's precision, and
/// the output format.
#[derive(Args)]
pub(crate) struct Answer {
    #[command(flatten)]
    pub(crate) pld: PldOptions,
    /// Print one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

/// A training plan: sample rate and steps, or dataset size, batch size and epochs.
#[derive(Args)]
pub(crate) struct Plan {
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

impl Plan {
    /// `(sample_rate, steps)`.
    pub(crate) fn resolve(&self) -> Result<(f64, u64), Failure> {
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

/// The PLD accountant's precision.
#[derive(Args)]
pub(crate) struct PldOptions {
    /// PLD only: the largest gap allowed between the proven upper and lower epsilon (> 0).
    #[arg(long, allow_hyphen_values = true, default_value_t = DEFAULT_EPSILON_ERROR)]
    pub(crate) epsilon_error: f64,
}

impl PldOptions {
    /// An empty PLD accountant at `--epsilon-error`, bounded to `CLI_MAX_WORK` a composition.
    pub(crate) fn accountant(&self) -> Result<PldAccountant, Failure> {
        Ok(PldAccountant::with_epsilon_error(Adjacency::AddOrRemoveOne, self.epsilon_error()?)?
            .with_max_work(CLI_MAX_WORK)?)
    }

    /// `--epsilon-error`, checked.
    pub(crate) fn epsilon_error(&self) -> Result<f64, Failure> {
        flag("--epsilon-error", self.epsilon_error, Valid::Positive)
    }
}

/// `--accountant` of `epsilon`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Which {
    Rdp,
    Pld,
    All,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Format {
    Text,
    Markdown,
    Json,
    /// A self-contained page with SVG plots of epsilon against steps and delta.
    Html,
}

/// Parses a head hash: 64 hex digits.
fn parse_head(text: &str) -> Result<String, String> {
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(text.to_ascii_lowercase())
    } else {
        Err("must be 64 hex digits (a SHA-256 head, as `verify` prints it)".into())
    }
}

/// Parses a count flag, with the valid range in the error.
fn parse_count(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("must be an integer >= 1".into()),
    }
}
