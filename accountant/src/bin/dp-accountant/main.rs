//! `dp-accountant`: privacy accounting for reviewers, from the command line.
//!
//! Every number it prints comes from the `dp_accountant` library; these
//! files only parse flags, validate them (naming the flag and its valid
//! range), and format. Exit codes: 0 success; 1 a ledger that fails
//! verification; 2 usage, input or I/O error.
//!
//! `args` holds the flags; each subcommand is one function, in
//! `plan_cmd` (`epsilon`, `rdp`), `search_cmd` (`calibrate`, `max-steps`)
//! `ledger_cmd` (`report`, `verify`, `keygen`, `sign`) and `audit_cmd`
//! (`audit`).

mod args;
mod audit_cmd;
mod ledger_cmd;
mod plan_cmd;
mod progress;
mod search_cmd;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use dp_accountant::{Error, LedgerError, Valid};

use args::{Cli, Command};

/// Why the CLI stops.
pub(crate) enum Failure {
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

/// A ledger that cannot be read is a usage error (exit 2); one that fails a check is exit 1.
pub(crate) fn ledger_failure(e: LedgerError) -> Failure {
    match e {
        LedgerError::Malformed { .. } | LedgerError::WrongFormat { .. } | LedgerError::UnsupportedVersion { .. } => {
            Failure::Usage(e.to_string())
        }
        other => Failure::Verification(format!("ledger fails verification: {other}")),
    }
}

/// Checks a flag's value, naming the flag in the error.
pub(crate) fn flag(name: &'static str, value: f64, valid: Valid) -> Result<f64, Failure> {
    if valid.contains(value) {
        Ok(value)
    } else {
        Err(Error::InvalidParameter { field: name, value, valid }.into())
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
    progress::end_line("");
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

/// Runs one subcommand, its output collected in `out`.
fn run(command: Command, out: &mut String) -> Result<(), Failure> {
    match command {
        Command::Epsilon(args) => plan_cmd::epsilon(args, out),
        Command::Rdp(args) => plan_cmd::rdp(args, out),
        Command::Calibrate(args) => search_cmd::calibrate(args, out),
        Command::MaxSteps(args) => search_cmd::max_steps(args, out),
        Command::Report(args) => ledger_cmd::report(args, out),
        Command::Verify(args) => ledger_cmd::verify(args, out),
        Command::Keygen(args) => ledger_cmd::keygen(args, out),
        Command::Sign(args) => ledger_cmd::sign(args, out),
        Command::Audit(args) => audit_cmd::audit(args, out),
    }
}

/// Clap's message on one line: the usage and hint lines dropped.
fn one_line(message: &str) -> String {
    let body = message.split("\n\nUsage:").next().unwrap_or(message);
    let body = body.split("\n\nFor more information").next().unwrap_or(body);
    let body = body.trim().trim_start_matches("error: ");
    body.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A number for people: shortest round-trip digits, in scientific notation
/// below 1e-4 and from 1e6 on (never hundreds of digits).
pub(crate) fn num(x: f64) -> String {
    if x != 0.0 && x.is_finite() && (x.abs() < 1e-4 || x.abs() >= 1e6) {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

/// One JSON object on one line.
pub(crate) fn push_json(out: &mut String, value: serde_json::Value) {
    out.push_str(&value.to_string());
    out.push('\n');
}
