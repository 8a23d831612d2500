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
    /// A ledger composed into an accountant built for another adjacency: its
    /// answers would be about another unit of privacy.
    #[error(
        "the ledger's mechanisms are accounted under {ledger} adjacency but the accountant under {accountant}: \
         build the accountant with the ledger's adjacency (Ledger::adjacency)"
    )]
    AdjacencyMismatch {
        /// The ledger's adjacency.
        ledger: Adjacency,
        /// The accountant's.
        accountant: Adjacency,
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
         epsilon_error (--epsilon-error), or use the RDP accountant (--accountant rdp)"
    )]
    GridTooLarge {
        /// Grid points needed.
        points: u64,
        /// The most allowed.
        limit: u64,
    },
    /// The PLD accountant would work longer than its bound
    /// ([`crate::pld::MAX_WORK`] or the caller's): many distinct steps, very
    /// many steps, or a fine `epsilon_error`. Checked before the work starts.
    #[error(
        "PLD accountant: this composition needs about {work:.1e} operations (about {:.0} s), more than the limit of \
         {limit:.1e}: use the RDP accountant (--accountant rdp) or a larger epsilon_error (--epsilon-error)",
        work * 7e-9
    )]
    PldWorkTooLarge {
        /// The estimated work (FFT butterflies and grid points, see `pld::MAX_WORK`).
        work: f64,
        /// The most allowed.
        limit: f64,
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
    /// A key file could not be read, written or understood, or no entropy
    /// was available to make a key.
    #[error("{}{reason}", path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
    Key {
        /// The key file, if the problem is with one.
        path: Option<PathBuf>,
        /// What is wrong.
        reason: String,
    },
    /// A canary-scores file that is not the audit's format.
    #[error("canary scores: {reason}")]
    Scores {
        /// What is wrong, and where.
        reason: String,
    },
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
    /// A key that appears twice in one JSON object: a reader that keeps the
    /// first copy would see another ledger than one that keeps the last.
    #[error("ledger{}: duplicate key `{key}`: each key may appear once", at(*entry))]
    DuplicateKey {
        /// The entry, if the key is inside one.
        entry: Option<usize>,
        /// The key's path inside the entry (or the file), e.g. `record.mechanism.clipping_norm`.
        key: String,
    },
    /// The file is not byte for byte the rendering this crate writes for the
    /// values it holds (only trailing whitespace may differ): reformatted or
    /// edited by hand. The hash covers the values, so only the canonical
    /// rendering ties the bytes a reader sees to the hash.
    #[error(
        "ledger{}: not in canonical form at `{key}` (line {line}): the file differs from what the writer produces \
         for its own values (edited, or reformatted by another tool)",
        at(*entry)
    )]
    NonCanonical {
        /// The entry, if the difference is inside one.
        entry: Option<usize>,
        /// The path of the first difference, e.g. `record.mechanism.clipping_norm`.
        key: String,
        /// The line (from 1) of the first difference in the file.
        line: usize,
    },
    /// The ledger carries a signature that does not verify under the key it
    /// names (or that is malformed).
    #[error("ledger: signature: {reason}")]
    BadSignature {
        /// What is wrong.
        reason: String,
    },
    /// The ledger is signed by another key than the trusted one (or not at all).
    #[error("ledger: {found}: not the trusted key {trusted}")]
    UntrustedSigner {
        /// The trusted key's fingerprint.
        trusted: String,
        /// Who signed: a key fingerprint, or "not signed".
        found: String,
    },
    /// A header whose values are out of range (e.g. a malformed data hash).
    #[error("ledger header: {message}")]
    InvalidHeader {
        /// What is wrong, naming the field and its valid range.
        message: String,
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
    /// An RDP order: `1 < x <= 1e6` (the exact series takes time linear in
    /// the order; 1e6 takes about 20 ms).
    Order,
    /// `0 <= x < 1`.
    UnitFromZero,
    /// Any finite number.
    Finite,
    /// A number of canaries: an integer from 1 to 10^7.
    Canaries,
    /// An integer from 0 to the number of canaries (the upper end is checked
    /// where the canaries are known).
    AtMostCanaries,
    /// An integer from 0 to the number of guesses (likewise).
    AtMostGuesses,
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
            Valid::Order => x > 1.0 && x <= 1e6,
            Valid::UnitFromZero => (0.0..1.0).contains(&x),
            Valid::Finite => x.is_finite(),
            Valid::Canaries => (1.0..=1e7).contains(&x) && x.fract() == 0.0,
            Valid::AtMostCanaries | Valid::AtMostGuesses => (0.0..f64::INFINITY).contains(&x) && x.fract() == 0.0,
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
            Valid::Order => "> 1 and <= 1e6 (the series takes time linear in the order)",
            Valid::UnitFromZero => "in [0, 1)",
            Valid::Finite => "finite",
            Valid::Canaries => "an integer from 1 to 10^7",
            Valid::AtMostCanaries => "an integer from 0 to the number of canaries",
            Valid::AtMostGuesses => "an integer from 0 to the number of guesses",
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
