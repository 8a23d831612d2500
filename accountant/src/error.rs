//! The one error type of `dp-accountant`.

use std::fmt;
use std::path::PathBuf;

use crate::event::Adjacency;

/// Everything the accountant can refuse, each with what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A parameter outside its valid range (NaN and infinities included).
    #[error("{field} = {value}: must be {valid}")]
    InvalidParameter {
        /// The parameter's name as the API and the CLI spell it.
        field: &'static str,
        /// The value given.
        value: f64,
        /// The valid range.
        valid: Valid,
    },
    /// An event this accountant cannot bound under the given adjacency.
    #[error("{event} is not supported under {adjacency} adjacency: {reason}")]
    UnsupportedEvent {
        /// The event's kind.
        event: &'static str,
        /// The adjacency the accountant was built for.
        adjacency: Adjacency,
        /// Why, and what to use instead.
        reason: &'static str,
    },
    /// Calibration found no parameter meeting the target within its search range.
    #[error("calibration: {reason}")]
    Calibration {
        /// What was searched and why it failed.
        reason: String,
    },
    /// The PLD accountant's grid would exceed its memory limit: the requested
    /// error is too small for this composition (or the noise too small for
    /// the privacy loss to stay in a reasonable range).
    #[error(
        "PLD accountant: the grid needs {points} points, more than the limit of {limit}: request a larger \
         epsilon_error"
    )]
    GridTooLarge {
        /// Grid points needed.
        points: u64,
        /// The most allowed.
        limit: u64,
    },
    /// A numerical routine failed (it should not: please report it).
    #[error("numerical failure: {reason}")]
    Numerical {
        /// What failed.
        reason: String,
    },
    /// The ledger is malformed, altered or inconsistent.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

/// Errors that locate a problem in a ledger: each says at which entry.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// Not JSON, or not shaped like a ledger (a missing or unknown field, a
    /// wrong type, an unknown event); `entry` is `None` outside the entries.
    #[error("ledger{}: malformed: {message}", at(*entry))]
    Malformed {
        /// The entry, if the problem is inside one.
        entry: Option<usize>,
        /// What the parser expected.
        message: String,
    },
    /// A `format` tag that is not a dp-accountant ledger.
    #[error("ledger: format = {found:?}: expected \"{expected}\"")]
    WrongFormat {
        /// The tag found.
        found: String,
        /// The tag this crate writes.
        expected: &'static str,
    },
    /// A format version this build does not read.
    #[error("ledger: version = {found}: this build reads version {supported} only")]
    UnsupportedVersion {
        /// The version found.
        found: u64,
        /// The version this build reads.
        supported: u64,
    },
    /// An entry's stored index is not its position (entries reordered or removed).
    #[error("ledger entry {entry}: index = {found}: expected {entry} (entries reordered, removed or inserted)")]
    IndexMismatch {
        /// The entry's position.
        entry: usize,
        /// The index it claims.
        found: u64,
    },
    /// An entry's `prev_hash` is not the hash before it.
    #[error("ledger entry {entry}: prev_hash does not match the hash of the entry before it (expected {expected}, found {found})")]
    BrokenChain {
        /// The entry's position.
        entry: usize,
        /// The hash of the previous entry (or of the header, for entry 0).
        expected: String,
        /// The hash the entry records.
        found: String,
    },
    /// An entry's content does not hash to its recorded hash (edited).
    #[error("ledger entry {entry}: content does not match its hash (edited after it was written): expected {expected}, found {found}")]
    HashMismatch {
        /// The entry's position.
        entry: usize,
        /// The hash of the entry's content.
        expected: String,
        /// The hash recorded.
        found: String,
    },
    /// The recorded head is not the hash of the last entry (truncated or appended).
    #[error("ledger: head = {found}: expected {expected}, the hash of the last of its {entries} entries (entries truncated or appended)")]
    HeadMismatch {
        /// The hash of the last entry.
        expected: String,
        /// The head recorded in the file (or anchored by the caller).
        found: String,
        /// How many entries the file holds.
        entries: usize,
    },
    /// The ledger's head is not the head anchored elsewhere (a checkpoint, a
    /// signed report): rewritten, truncated or extended since.
    #[error("ledger: head = {head} ({entries} entries) is not the anchored head {anchor}: the ledger was rewritten, truncated or extended since the anchor was taken")]
    AnchorMismatch {
        /// The head the caller trusts.
        anchor: String,
        /// The ledger's head.
        head: String,
        /// How many entries the ledger holds.
        entries: usize,
    },
    /// An entry whose values are out of range or contradict each other.
    #[error("ledger entry {entry}: {message}")]
    InvalidEntry {
        /// The entry's position.
        entry: usize,
        /// What is wrong, with the valid range.
        message: String,
    },
}

fn at(entry: Option<usize>) -> String {
    entry.map(|e| format!(" entry {e}")).unwrap_or_default()
}

/// A valid range, as printed in error messages.
///
/// Checks are written as "inside the range", so NaN is rejected by every one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Valid {
    /// `0 < x < inf`.
    Positive,
    /// `0 <= x < inf`.
    NonNegative,
    /// `0 < x < 1`.
    OpenUnit,
    /// `0 < x <= 1`.
    HalfOpenUnit,
    /// `0 <= x <= 1`.
    ClosedUnit,
    /// `1 < x < inf`.
    AboveOne,
    /// An integer `>= 1`.
    AtLeastOne,
}

impl Valid {
    /// Whether `x` lies in the range.
    pub fn contains(self, x: f64) -> bool {
        match self {
            Valid::Positive => x > 0.0 && x < f64::INFINITY,
            Valid::NonNegative => (0.0..f64::INFINITY).contains(&x),
            Valid::OpenUnit => x > 0.0 && x < 1.0,
            Valid::HalfOpenUnit => x > 0.0 && x <= 1.0,
            Valid::ClosedUnit => (0.0..=1.0).contains(&x),
            Valid::AboveOne => x > 1.0 && x < f64::INFINITY,
            Valid::AtLeastOne => (1.0..f64::INFINITY).contains(&x) && x.fract() == 0.0,
        }
    }
}

impl fmt::Display for Valid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Valid::Positive => "finite and > 0",
            Valid::NonNegative => "finite and >= 0",
            Valid::OpenUnit => "in (0, 1)",
            Valid::HalfOpenUnit => "in (0, 1]",
            Valid::ClosedUnit => "in [0, 1]",
            Valid::AboveOne => "finite and > 1",
            Valid::AtLeastOne => "an integer >= 1",
        })
    }
}

/// Returns `value` if it lies in `valid`, else the error naming `field`.
pub(crate) fn ensure(field: &'static str, value: f64, valid: Valid) -> Result<f64> {
    if valid.contains(value) {
        Ok(value)
    } else {
        Err(Error::InvalidParameter { field, value, valid })
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
