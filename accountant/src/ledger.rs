//! The privacy ledger: an append-only, hash-chained record of every
//! mechanism a training run applied.
//!
//! # Format (version 1)
//! ```json
//! { "format": "dp-accountant-ledger", "version": 1,
//!   "header": { "created_by": "...", "dataset_size": 1797, "target": {"epsilon": 3.0, "delta": 1e-5},
//!               "data": {"name": "digits.csv", "sha256": "<hex>", "bytes": 123456, "rows": 1797} },
//!   "entries": [ { "index": 0, "prev_hash": "<hex>", "record": { "mechanism": { ...,
//!                  "distributed": {"world_size": 8, "noise": "once_per_coordinate"} } }, "hash": "<hex>" },
//!                { "index": 1, "prev_hash": "<hex>", "record": { "release": { ... } }, "hash": "<hex>" } ],
//!   "head": "<hex>",
//!   "signature": { "algorithm": "ed25519", "public_key": "<hex>", "signature": "<hex>" } }
//! ```
//! `hash_k = SHA-256("dp-accountant-ledger-entry-v1\n" || prev_hash_k || index_k (u64, big endian) || canonical(record_k))`,
//! `prev_hash_0 = SHA-256("dp-accountant-ledger-header-v1\n" || canonical(header))`, and
//! `head` is the last hash (the header's hash for an empty ledger). The
//! canonical bytes are the compact JSON this crate writes (fields in
//! declaration order, floats in shortest round-trip form).
//!
//! # Record kinds
//! Each entry's `record` is one of:
//! * `mechanism` ([`MechanismRecord`]): a mechanism applied to the data (the
//!   event, adjacency, clipping norm, sampler, noise source, seeding); the
//!   only kind that costs privacy.
//! * `release` ([`ModelRelease`]): a model file saved from the run, by name
//!   and SHA-256, with the steps recorded before it.
//! * `audit` ([`AuditRecord`]): the result of an empirical one-run canary
//!   audit of the run (an epsilon *lower* bound, beside the accountant's
//!   upper bound), with the steps recorded before it.
//!
//! Releases and audits cost nothing and change no epsilon; each is checked
//! on load against the entries before it. A kind added later is a new
//! variant: ledgers without it keep their bytes, and hashes, unchanged.
//!
//! # One canonical, lossless encoding
//! Floats are hashed as serde_json renders them (shortest round-trip form)
//! and parsed with serde_json's `float_roundtrip` feature, which reads every
//! such rendering back to the same bits. Hashing the raw bits instead would
//! have changed the hash of every ledger already written; this way the
//! format, and its hashes, are those the writer has always produced, and
//! ledgers written by earlier versions keep verifying.
//!
//! The hash covers values, so the *bytes* are tied to it by a second rule:
//! a file verifies only if it is byte for byte the pretty rendering
//! [`Ledger::to_json`] produces for the values it holds, trailing whitespace
//! aside. Any other spelling of a number (`1.00`, `1e0`, 17 more digits), a
//! reordered or repeated key, other whitespace or escapes is refused as
//! [`LedgerError::NonCanonical`] or [`LedgerError::DuplicateKey`], with the
//! entry and the key. Two files that verify with the same head are therefore
//! the same file, whatever parser reads them, and a parser that misread a
//! number would be caught too (its re-rendering would differ).
//!
//! # What the chain detects
//! Any edit of a header or entry, reordering, insertion or removal of entries,
//! and truncation or extension that does not also rewrite `head`. A chain
//! without a secret cannot stop someone who rewrites every hash: anchor the
//! head elsewhere (the report prints it, checkpoints store it) and check it
//! with [`Ledger::verify_head`] or `dp-accountant verify --expect-head`, or
//! sign it.
//!
//! # Signature (optional)
//! `signature`, when present, is an Ed25519 signature over the head (see
//! [`crate::signing`]: the message is `"dp-accountant-ledger-head-signature-v1\n"`
//! followed by the head's 32 bytes), with the signer's public key, both
//! lower-case hex. It is part of the file, so the canonical-form rule covers
//! it; it is not part of any hash (it signs the last one). Every load checks
//! it against the key it names ([`LedgerError::BadSignature`]);
//! [`Ledger::verify_signature`] checks that key is the one a reviewer trusts.
//! Appending to a signed ledger drops the signature: it signed another head.
//! A ledger without the field is exactly a ledger of earlier versions.

mod canonical;

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::accountant::PrivacyAccountant;
use crate::audit::OneRunAudit;
use crate::error::{ensure, Error, LedgerError, Result, Valid};
use crate::event::{Adjacency, DpEvent};
use crate::kind::AccountantKind;
use crate::rdp::RdpAccountant;
use crate::signing::{PublicKey, SecretKey};

/// The `format` tag of a ledger file.
pub const LEDGER_FORMAT: &str = "dp-accountant-ledger";
/// The format version this build writes and reads.
pub const LEDGER_VERSION: u64 = 1;

const ENTRY_DOMAIN: &[u8] = b"dp-accountant-ledger-entry-v1\n";
const HEADER_DOMAIN: &[u8] = b"dp-accountant-ledger-header-v1\n";

/// How batches were drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    /// Each example independently with probability `q` per step (amplification applies).
    Poisson,
    /// A shuffle per epoch, cut into batches of a fixed size (no amplification).
    ShuffledFixedSize,
    /// Every example in every step (full-batch gradient descent).
    FullBatch,
}

/// The generator the noise came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseGenerator {
    /// ChaCha20 (`rand_chacha` 0.9), a cryptographically secure generator.
    Chacha20,
}

/// How the noise generator was seeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Seeding {
    /// From the operating system's entropy source: unpredictable.
    OsEntropy,
    /// From a seed the user chose, for reproducible research: anyone who knows
    /// it can reproduce (and subtract) the noise. The seed itself is never recorded.
    Fixed,
}

/// Where the noise came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoiseSource {
    /// The generator.
    pub generator: NoiseGenerator,
    /// Its seeding.
    pub seed: Seeding,
}

/// One mechanism applied, with everything a reviewer needs to judge it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MechanismRecord {
    /// What was applied (noise multipliers relative to `clipping_norm`).
    pub event: DpEvent,
    /// The unit of privacy.
    pub adjacency: Adjacency,
    /// The L2 bound on each example's contribution, `C > 0`.
    pub clipping_norm: f64,
    /// How the batches were drawn; must match the event.
    pub sampler: SamplerKind,
    /// Where the noise came from.
    pub noise: NoiseSource,
    /// How the sampler's generator was seeded. Amplification by sampling
    /// assumes the batches are secret: a fixed seed makes them predictable.
    pub sampler_seed: Seeding,
    /// How these steps were spread over processes, if they ran data
    /// parallel (absent for one-process steps, so that their records, and
    /// the hashes of ledgers without distributed steps, are unchanged). Per
    /// record: a run checkpointed on some processes may resume on others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distributed: Option<Distribution>,
}

/// A model saved from the run: names the weights a privacy statement covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRelease {
    /// The file's name, e.g. `model.safetensors`.
    pub file: String,
    /// The SHA-256 of the file's bytes, lower-case hex.
    pub weights_sha256: String,
    /// The number of steps recorded before it (it reflects exactly those).
    pub after_steps: u64,
}

/// How an empirical audit was run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditMethod {
    /// Canaries each included in the training data independently with
    /// probability 1/2, scored after training, and the one-run audit of
    /// Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training
    /// Run" (NeurIPS 2023, arXiv:2305.08846) beside the f-DP (Gaussian
    /// curves) audit of the same guesses by Mahloujifar, Melis & Chaudhuri
    /// (ICML 2025, arXiv:2410.22235); see [`crate::audit`].
    OneRunCanaries,
}

/// The empirical audit of a run: canaries inserted in training, scored from
/// the privatized gradients. Its epsilons are *lower* bounds on what the run
/// leaked (at confidence `1 - alpha`); the accountant's epsilon is the upper
/// bound they should not exceed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// How the audit was run.
    pub method: AuditMethod,
    /// Canaries, `m >= 1` (each included with probability 1/2; the included
    /// ones count in the training set's size).
    pub canaries: u64,
    /// Guesses `r` of the guess count that gave `epsilon_lower_bound`, `r <= m`.
    pub guesses: u64,
    /// Correct guesses `v` among them, `v <= r`.
    pub correct: u64,
    /// The significance, in `(0, 1)`: each lower bound holds with probability
    /// at least `1 - alpha`.
    pub alpha: f64,
    /// The delta of the hypothesis "training is `(epsilon, delta)`-DP", in `[0, 1)`.
    pub delta: f64,
    /// Epsilon-hat of the `(epsilon, delta)` audit ([`OneRunAudit::epsilon`]), `>= 0`.
    pub epsilon_lower_bound: f64,
    /// Epsilon-hat of the f-DP audit at `delta` ([`OneRunAudit::epsilon_fdp`]), `>= 0`.
    pub epsilon_lower_bound_fdp: f64,
    /// The largest `mu` of `mu`-GDP the f-DP audit rejected ([`OneRunAudit::mu_fdp`]), `>= 0`.
    pub mu_fdp: f64,
    /// How the generator that chose which canaries are included was seeded
    /// (the audit assumes the choice is secret from the training run).
    pub inclusion_seed: Seeding,
    /// The number of steps recorded before it (it audits exactly those);
    /// filled by [`Ledger::append_audit`].
    pub after_steps: u64,
}

/// What one ledger entry records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Record {
    /// A mechanism applied to the data.
    Mechanism(MechanismRecord),
    /// A model saved from the run.
    Release(ModelRelease),
    /// An empirical audit of the run.
    Audit(AuditRecord),
}

impl Record {
    /// The mechanism, if this entry records one.
    pub fn mechanism(&self) -> Option<&MechanismRecord> {
        match self {
            Record::Mechanism(m) => Some(m),
            _ => None,
        }
    }

    /// The release, if this entry records one.
    pub fn release(&self) -> Option<&ModelRelease> {
        match self {
            Record::Release(r) => Some(r),
            _ => None,
        }
    }

    /// The audit, if this entry records one.
    pub fn audit(&self) -> Option<&AuditRecord> {
        match self {
            Record::Audit(a) => Some(a),
            _ => None,
        }
    }
}

/// A privacy target declared by the run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyTarget {
    /// The epsilon the run promised not to exceed.
    pub epsilon: f64,
    /// At this delta.
    pub delta: f64,
}

/// The most bytes of [`DataProvenance::name`].
pub const MAX_DATA_NAME_BYTES: usize = 1024;

/// The data a run trained on, identified by its bytes: the privacy statement
/// is about exactly the data with this hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataProvenance {
    /// A name for people, e.g. the file's name: 1 to [`MAX_DATA_NAME_BYTES`]
    /// bytes, no control characters (it is printed on one line).
    pub name: String,
    /// The SHA-256 of the data's bytes, 64 lower-case hex digits.
    pub sha256: String,
    /// The data's length in bytes.
    pub bytes: u64,
    /// The examples (rows) the data holds, as the trainer counted them.
    pub rows: u64,
}

impl DataProvenance {
    /// The provenance of the file at `path`, hashed as a stream (64 KiB at a
    /// time, never read whole into memory), named `name`, holding `rows` examples.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read; [`LedgerError::InvalidHeader`]
    /// for a `name` that is empty, longer than [`MAX_DATA_NAME_BYTES`], or
    /// holds a control character.
    pub fn of_file(path: impl AsRef<Path>, name: &str, rows: u64) -> Result<Self> {
        use std::io::Read as _;
        let path = path.as_ref();
        let io = |source| Error::Io { path: path.to_path_buf(), source };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let (mut hasher, mut bytes) = (Sha256::new(), 0u64);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io(e)),
            };
            hasher.update(&buf[..n]);
            bytes += n as u64;
        }
        Self::checked(name, hex(&hasher.finalize()), bytes, rows)
    }

    /// The provenance of data held in memory, named `name`, holding `rows` examples.
    ///
    /// # Errors
    /// As [`DataProvenance::of_file`] for `name`.
    pub fn of_bytes(name: &str, data: &[u8], rows: u64) -> Result<Self> {
        Self::checked(name, hex(&Sha256::digest(data)), data.len() as u64, rows)
    }

    fn checked(name: &str, sha256: String, bytes: u64, rows: u64) -> Result<Self> {
        let data = Self { name: name.to_string(), sha256, bytes, rows };
        data.check()?;
        Ok(data)
    }

    /// Checks the fields: `name` 1 to [`MAX_DATA_NAME_BYTES`] bytes without
    /// control characters, `sha256` 64 lower-case hex digits.
    ///
    /// # Errors
    /// [`LedgerError::InvalidHeader`] naming the field.
    pub fn check(&self) -> Result<(), LedgerError> {
        let invalid = |message: String| LedgerError::InvalidHeader { message };
        if self.name.is_empty() || self.name.len() > MAX_DATA_NAME_BYTES || self.name.chars().any(char::is_control) {
            return Err(invalid(format!(
                "data.name = {:?}: must be 1 to {MAX_DATA_NAME_BYTES} bytes without control characters",
                self.name
            )));
        }
        if unhex(&self.sha256).is_none() {
            return Err(invalid(format!("data.sha256 = {:?}: must be 64 lower-case hex digits", self.sha256)));
        }
        Ok(())
    }
}

/// The most processes a [`Distribution`] may name: 2^24.
pub const MAX_WORLD_SIZE: u64 = 1 << 24;

/// How a run's steps were spread over processes (data parallel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Distribution {
    /// The processes (ranks) that trained together, 1 to [`MAX_WORLD_SIZE`].
    pub world_size: u64,
    /// How each step's noise was made across them.
    pub noise: DistributedNoise,
}

/// How the noise of a data-parallel step was made across its processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DistributedNoise {
    /// One Gaussian noise vector per step over all `n` coordinates: rank `r`
    /// of `W` drew only its slice `[r n / W, (r + 1) n / W)` of it, and the
    /// slices were summed with the clipped gradients in one all-reduce, so
    /// each coordinate received the noise exactly once in total (standard
    /// deviation `sigma C`), as in a one-process run.
    OncePerCoordinate,
}

impl Distribution {
    /// Checks the fields: `world_size` from 1 to [`MAX_WORLD_SIZE`].
    ///
    /// # Errors
    /// What is wrong, naming the field and its range (the ledger reports it
    /// as [`LedgerError::InvalidEntry`] of the record).
    pub fn check(&self) -> Result<(), String> {
        if !(1..=MAX_WORLD_SIZE).contains(&self.world_size) {
            return Err(format!(
                "distributed.world_size = {}: must be an integer from 1 to {MAX_WORLD_SIZE} (2^24)",
                self.world_size
            ));
        }
        Ok(())
    }
}

/// Facts about the run as a whole, hashed into the chain's first link.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerHeader {
    /// The program that wrote the ledger, e.g. `"candle-dp 0.1.0"`.
    pub created_by: String,
    /// Free text: what was trained, on what.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The number of examples in the training set, if declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_size: Option<u64>,
    /// The budget the run declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<PrivacyTarget>,
    /// The data trained on, by hash (absent from ledgers that record none, so
    /// that theirs, and their hashes, are unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataProvenance>,
}

impl LedgerHeader {
    /// Checks the header's values (today: its data provenance, if any).
    ///
    /// # Errors
    /// [`LedgerError::InvalidHeader`] naming the field.
    pub fn check(&self) -> Result<(), LedgerError> {
        self.data.as_ref().map_or(Ok(()), DataProvenance::check)
    }
}

/// One link of the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerEntry {
    /// Position in the ledger, from 0.
    pub index: u64,
    /// The hash of the previous entry (of the header for entry 0), hex.
    pub prev_hash: String,
    /// What the entry records.
    pub record: Record,
    /// This entry's hash, hex.
    pub hash: String,
}

/// The signature algorithms a ledger's head may be signed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignatureAlgorithm {
    /// Ed25519 (RFC 8032), strict verification.
    Ed25519,
}

/// A signature over the ledger's head (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadSignature {
    /// The algorithm.
    pub algorithm: SignatureAlgorithm,
    /// The signer's public key, 64 lower-case hex digits.
    pub public_key: String,
    /// The signature, 128 lower-case hex digits.
    pub signature: String,
}

/// The ledger of one training run: verified on every load, append-only in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Ledger {
    header: LedgerHeader,
    entries: Vec<LedgerEntry>,
    signature: Option<HeadSignature>,
}

#[derive(Serialize)]
struct LedgerFileOut<'a> {
    format: &'static str,
    version: u64,
    header: &'a LedgerHeader,
    entries: &'a [LedgerEntry],
    head: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    signature: Option<&'a HeadSignature>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LedgerFileIn {
    #[allow(dead_code)]
    format: String,
    #[allow(dead_code)]
    version: u64,
    header: LedgerHeader,
    entries: Vec<serde_json::Value>,
    head: String,
    #[serde(default)]
    signature: Option<HeadSignature>,
}

impl Ledger {
    /// An empty ledger.
    pub fn new(header: LedgerHeader) -> Self {
        Self { header, entries: Vec::new(), signature: None }
    }

    /// The header.
    pub fn header(&self) -> &LedgerHeader {
        &self.header
    }

    /// The entries, in order.
    pub fn entries(&self) -> &[LedgerEntry] {
        &self.entries
    }

    /// The hash of the last entry (of the header if there is none), hex: the
    /// value to anchor elsewhere.
    pub fn head(&self) -> String {
        self.entries.last().map_or_else(|| hex(&header_hash(&self.header)), |e| e.hash.clone())
    }

    /// Checks `record` and appends it, returning the new entry.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] or [`Error::UnsupportedEvent`] for a bad
    /// event, [`LedgerError::InvalidEntry`] if it contradicts itself or the
    /// entries before it, [`LedgerError::InvalidHeader`] if the header would
    /// not load ([`LedgerHeader::check`]; every append checks it). Nothing is
    /// appended on error.
    pub fn append(&mut self, record: MechanismRecord) -> Result<&LedgerEntry> {
        self.push(Record::Mechanism(record))
    }

    /// Records that the model file `file` with SHA-256 `weights_sha256` was
    /// saved after the steps recorded so far.
    ///
    /// # Errors
    /// [`LedgerError::InvalidEntry`] unless the hash is 64 hex digits.
    pub fn append_release(&mut self, file: &str, weights_sha256: &str) -> Result<&LedgerEntry> {
        let after_steps = self.total_steps();
        self.push(Record::Release(ModelRelease {
            file: file.to_string(),
            weights_sha256: weights_sha256.to_ascii_lowercase(),
            after_steps,
        }))
    }

    /// Records the result of a one-run canary audit of the steps recorded so
    /// far; `inclusion_seed` says how the generator that chose which canaries
    /// were included was seeded.
    ///
    /// # Errors
    /// [`LedgerError::InvalidEntry`], naming the field and its valid range,
    /// for an audit out of range (e.g. `delta = 1`, which
    /// [`crate::audit::audit_one_run`] accepts but no run can mean). Nothing
    /// is appended on error.
    pub fn append_audit(&mut self, audit: &OneRunAudit, inclusion_seed: Seeding) -> Result<&LedgerEntry> {
        let after_steps = self.total_steps();
        self.push(Record::Audit(AuditRecord {
            method: AuditMethod::OneRunCanaries,
            canaries: audit.canaries as u64,
            guesses: audit.guesses as u64,
            correct: audit.correct as u64,
            alpha: audit.alpha,
            delta: audit.delta,
            epsilon_lower_bound: audit.epsilon,
            epsilon_lower_bound_fdp: audit.epsilon_fdp,
            mu_fdp: audit.mu_fdp,
            inclusion_seed,
            after_steps,
        }))
    }

    fn push(&mut self, record: Record) -> Result<&LedgerEntry> {
        let index = self.entries.len();
        // A header that would not load is refused before anything is chained to it.
        self.header.check()?;
        check_entry(&record, self.first_adjacency(), self.total_steps(), index)?;
        // A signature vouches for the head it signed, which this entry replaces.
        self.signature = None;
        let prev =
            self.entries.last().map_or_else(|| header_hash(&self.header), |e| unhex(&e.hash).unwrap_or_default());
        let hash = entry_hash(&prev, index as u64, &record);
        self.entries.push(LedgerEntry { index: index as u64, prev_hash: hex(&prev), record, hash: hex(&hash) });
        Ok(&self.entries[index])
    }

    /// The mechanisms recorded, in order.
    pub fn mechanisms(&self) -> impl Iterator<Item = &MechanismRecord> {
        self.entries.iter().filter_map(|e| e.record.mechanism())
    }

    /// The models released, in order.
    pub fn releases(&self) -> impl Iterator<Item = &ModelRelease> {
        self.entries.iter().filter_map(|e| e.record.release())
    }

    /// The audits recorded, in order.
    pub fn audits(&self) -> impl Iterator<Item = &AuditRecord> {
        self.entries.iter().filter_map(|e| e.record.audit())
    }

    fn first_adjacency(&self) -> Option<Adjacency> {
        self.mechanisms().next().map(|m| m.adjacency)
    }

    /// The total number of noisy steps recorded. Exact: a ledger whose count
    /// would exceed `u64::MAX` is refused when appended to or loaded.
    pub fn total_steps(&self) -> u64 {
        self.mechanisms().fold(0u64, |s, m| s.saturating_add(m.event.steps()))
    }

    /// The adjacency of the entries (that of an empty ledger is add/remove).
    pub fn adjacency(&self) -> Adjacency {
        self.first_adjacency().unwrap_or(Adjacency::AddOrRemoveOne)
    }

    /// `accountant` with every mechanism of the ledger composed into it, in
    /// order: the ledger accounted by any accountant, at any settings, e.g.
    /// `ledger.compose_into(RdpAccountant::new(ledger.adjacency()))?.rdp_at(4.0)?`.
    ///
    /// # Errors
    /// [`Error::AdjacencyMismatch`] if the ledger records mechanisms and the
    /// accountant's adjacency is not theirs; the accountant's own errors
    /// otherwise (none from composing a ledger that loaded or was built by
    /// [`Ledger::append`]).
    pub fn compose_into<A: PrivacyAccountant>(&self, mut accountant: A) -> Result<A> {
        if let Some(ledger) = self.first_adjacency().filter(|&a| a != accountant.adjacency()) {
            return Err(Error::AdjacencyMismatch { ledger, accountant: accountant.adjacency() });
        }
        for m in self.mechanisms() {
            accountant.compose(&m.event, 1)?;
        }
        Ok(accountant)
    }

    /// The upper bound on epsilon at `delta` of everything recorded, by `accountant`.
    ///
    /// # Errors
    /// As [`Ledger::compose_into`], and the accountant's for a bad `delta`.
    pub fn epsilon(&self, accountant: AccountantKind, delta: f64) -> Result<f64> {
        accountant.epsilon(self.adjacency(), self.mechanisms().map(|m| &m.event), delta)
    }

    /// Checks that the head is `expected` (an anchor kept elsewhere).
    ///
    /// # Errors
    /// [`LedgerError::AnchorMismatch`].
    pub fn verify_head(&self, anchor: &str) -> Result<(), LedgerError> {
        let head = self.head();
        if head.eq_ignore_ascii_case(anchor) {
            Ok(())
        } else {
            Err(LedgerError::AnchorMismatch { anchor: anchor.to_string(), head, entries: self.entries.len() })
        }
    }

    /// The signature over the head, if the ledger is signed.
    pub fn signature(&self) -> Option<&HeadSignature> {
        self.signature.as_ref()
    }

    /// The key that signed the head, if the ledger is signed (the signature
    /// verified when the ledger was loaded or signed).
    pub fn signer(&self) -> Option<PublicKey> {
        self.signature.as_ref().and_then(|s| PublicKey::from_hex(&s.public_key).ok())
    }

    /// Signs the head with `key` (replacing any signature).
    pub fn sign(&mut self, key: &SecretKey) {
        let head = self.head_bytes();
        self.signature = Some(HeadSignature {
            algorithm: SignatureAlgorithm::Ed25519,
            public_key: key.public_key().to_hex(),
            signature: hex(&key.sign_head(&head)),
        });
    }

    /// Checks that the ledger is signed, by `trusted`, over its head.
    ///
    /// # Errors
    /// [`LedgerError::UntrustedSigner`] if it is unsigned or signed by
    /// another key; [`LedgerError::BadSignature`] if the signature does not verify.
    pub fn verify_signature(&self, trusted: &PublicKey) -> Result<(), LedgerError> {
        let untrusted = |found: String| LedgerError::UntrustedSigner { trusted: trusted.fingerprint(), found };
        let sig = self.signature.as_ref().ok_or_else(|| untrusted("not signed".into()))?;
        let signer = check_signature(sig, &self.head_bytes())?;
        if signer != *trusted {
            return Err(untrusted(format!("signed by {}", signer.fingerprint())));
        }
        Ok(())
    }

    fn head_bytes(&self) -> [u8; 32] {
        self.entries.last().map_or_else(|| header_hash(&self.header), |e| unhex(&e.hash).unwrap_or_default())
    }

    /// The ledger as pretty-printed JSON: the canonical rendering, the only
    /// form [`Ledger::from_json`] accepts.
    pub fn to_json(&self) -> String {
        let out = LedgerFileOut {
            format: LEDGER_FORMAT,
            version: LEDGER_VERSION,
            header: &self.header,
            entries: &self.entries,
            head: self.head(),
            signature: self.signature.as_ref(),
        };
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string_pretty(&out).unwrap_or_default()
    }

    /// Parses and fully verifies a ledger: format, version, every field, the
    /// chain, the head, every record's consistency, the signature if any, and
    /// that the text is the canonical rendering of its values (see the module
    /// docs; trailing whitespace aside).
    ///
    /// # Errors
    /// The first [`LedgerError`] found, with the entry (and key) it concerns.
    pub fn from_json(text: &str) -> Result<Self, LedgerError> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| malformed(None, &e))?;
        let obj = value.as_object().ok_or_else(|| LedgerError::Malformed {
            entry: None,
            message: "expected a JSON object at the top level".into(),
        })?;
        match obj.get("format").and_then(|f| f.as_str()) {
            Some(LEDGER_FORMAT) => {}
            other => {
                return Err(LedgerError::WrongFormat {
                    found: other.unwrap_or("<missing>").to_string(),
                    expected: LEDGER_FORMAT,
                })
            }
        }
        match obj.get("version").and_then(|v| v.as_u64()) {
            Some(LEDGER_VERSION) => {}
            Some(found) => return Err(LedgerError::UnsupportedVersion { found, supported: LEDGER_VERSION }),
            None => {
                return Err(LedgerError::Malformed {
                    entry: None,
                    message: "field `version` must be a non-negative integer".into(),
                })
            }
        }
        // serde_json keeps the last of repeated keys; refuse them before that matters.
        canonical::check_duplicate_keys(text)?;
        let file: LedgerFileIn = serde_json::from_value(value).map_err(|e| malformed(None, &e))?;
        file.header.check()?;
        let mut ledger = Ledger::new(file.header);
        let mut prev = header_hash(&ledger.header);
        for (k, raw) in file.entries.into_iter().enumerate() {
            let entry: LedgerEntry = serde_json::from_value(raw).map_err(|e| malformed(Some(k), &e))?;
            if entry.index != k as u64 {
                return Err(LedgerError::IndexMismatch { entry: k, found: entry.index });
            }
            let prev_hex = hex(&prev);
            if entry.prev_hash != prev_hex {
                return Err(LedgerError::BrokenChain { entry: k, expected: prev_hex, found: entry.prev_hash });
            }
            let hash = entry_hash(&prev, k as u64, &entry.record);
            if entry.hash != hex(&hash) {
                return Err(LedgerError::HashMismatch { entry: k, expected: hex(&hash), found: entry.hash });
            }
            check_entry(&entry.record, ledger.first_adjacency(), ledger.total_steps(), k).map_err(|e| match e {
                Error::Ledger(l) => l,
                other => LedgerError::InvalidEntry { entry: k, message: other.to_string() },
            })?;
            prev = hash;
            ledger.entries.push(LedgerEntry { prev_hash: prev_hex, hash: hex(&hash), ..entry });
        }
        let head = ledger.head();
        if head != file.head {
            return Err(LedgerError::HeadMismatch { expected: head, found: file.head, entries: ledger.entries.len() });
        }
        if let Some(sig) = &file.signature {
            check_signature(sig, &prev)?;
        }
        ledger.signature = file.signature;
        canonical::check_canonical(text, &ledger.to_json())?;
        Ok(ledger)
    }

    /// Reads and verifies a ledger file.
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be read; [`Error::Ledger`] as
    /// [`Ledger::from_json`] (text that is not UTF-8 is
    /// [`LedgerError::Malformed`], with the byte offset).
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Ok(Self::from_bytes(&bytes)?)
    }

    /// [`Ledger::from_json`] on raw bytes, which must be UTF-8.
    ///
    /// # Errors
    /// [`LedgerError::Malformed`] at the first byte that is not UTF-8; as
    /// [`Ledger::from_json`] otherwise.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, LedgerError> {
        let text = std::str::from_utf8(bytes).map_err(|e| LedgerError::Malformed {
            entry: None,
            message: format!("byte {} is not UTF-8: a ledger is UTF-8 JSON text", e.valid_up_to()),
        })?;
        Self::from_json(text)
    }

    /// Writes the ledger atomically (to a temporary file, then renamed).
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let io = |source| Error::Io { path: path.to_path_buf(), source };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, self.to_json()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

fn malformed(entry: Option<usize>, e: &serde_json::Error) -> LedgerError {
    LedgerError::Malformed { entry, message: e.to_string() }
}

/// Checks an entry against the ledger before it.
fn check_entry(record: &Record, adjacency: Option<Adjacency>, steps_before: u64, index: usize) -> Result<()> {
    match record {
        Record::Mechanism(m) => {
            check_record(m, adjacency, index)?;
            // Counts are exact or refused: a saturated count would understate the steps.
            match m.event.checked_steps().and_then(|n| n.checked_add(steps_before)) {
                Some(_) => Ok(()),
                None => Err(Error::Ledger(LedgerError::InvalidEntry {
                    entry: index,
                    message: format!(
                        "steps: this entry and the {steps_before} steps before it total more than {} (u64), \
                         which no ledger can record exactly",
                        u64::MAX
                    ),
                })),
            }
        }
        Record::Release(r) => {
            let invalid = |message: String| Error::Ledger(LedgerError::InvalidEntry { entry: index, message });
            if unhex(&r.weights_sha256).is_none() {
                return Err(invalid(format!("weights_sha256 = {:?}: must be 64 hex digits", r.weights_sha256)));
            }
            if r.after_steps != steps_before {
                return Err(invalid(format!(
                    "after_steps = {}: the entries before it record {steps_before} steps",
                    r.after_steps
                )));
            }
            Ok(())
        }
        Record::Audit(a) => check_audit(a, steps_before, index),
    }
}

/// Checks an audit's values: every float in its range (NaN fails each),
/// the counts nested (`correct <= guesses <= canaries`, `canaries >= 1`),
/// and the steps it claims to audit those recorded before it.
fn check_audit(a: &AuditRecord, steps_before: u64, index: usize) -> Result<()> {
    let invalid = |message: String| Error::Ledger(LedgerError::InvalidEntry { entry: index, message });
    for (field, value, valid) in [
        ("alpha", a.alpha, Valid::OpenUnit),
        ("delta", a.delta, Valid::UnitFromZero),
        ("epsilon_lower_bound", a.epsilon_lower_bound, Valid::NonNegative),
        ("epsilon_lower_bound_fdp", a.epsilon_lower_bound_fdp, Valid::NonNegative),
        ("mu_fdp", a.mu_fdp, Valid::NonNegative),
    ] {
        ensure(field, value, valid).map_err(|e| invalid(format!("audit: {e}")))?;
    }
    if a.canaries == 0 {
        return Err(invalid("audit: canaries = 0: must be an integer >= 1".into()));
    }
    if a.guesses > a.canaries {
        return Err(invalid(format!(
            "audit: guesses = {}: must be an integer from 0 to canaries ({})",
            a.guesses, a.canaries
        )));
    }
    if a.correct > a.guesses {
        return Err(invalid(format!(
            "audit: correct = {}: must be an integer from 0 to guesses ({})",
            a.correct, a.guesses
        )));
    }
    if a.after_steps != steps_before {
        return Err(invalid(format!(
            "audit: after_steps = {}: the entries before it record {steps_before} steps",
            a.after_steps
        )));
    }
    Ok(())
}

/// Checks a record's values and their consistency with each other and with
/// the ledger's adjacency (that of its first mechanism).
fn check_record(record: &MechanismRecord, ledger_adjacency: Option<Adjacency>, index: usize) -> Result<()> {
    let invalid = |message: String| Error::Ledger(LedgerError::InvalidEntry { entry: index, message });
    ensure("clipping_norm", record.clipping_norm, Valid::Positive).map_err(|e| invalid(e.to_string()))?;
    record.distributed.as_ref().map_or(Ok(()), Distribution::check).map_err(invalid)?;
    RdpAccountant::new(record.adjacency).check(&record.event).map_err(|e| invalid(e.to_string()))?;
    if let Some(adjacency) = ledger_adjacency {
        if adjacency != record.adjacency {
            return Err(invalid(format!(
                "adjacency = {}: differs from the first mechanism's ({adjacency}); one ledger has one unit of privacy",
                record.adjacency
            )));
        }
    }
    let expected = match record.sampler {
        SamplerKind::Poisson => "poisson_sampled",
        SamplerKind::ShuffledFixedSize => "shuffled_fixed_size_batches",
        SamplerKind::FullBatch => "gaussian",
    };
    if let Some(bad) = record.event.leaves().iter().map(|(leaf, _)| leaf.kind()).find(|k| *k != expected) {
        return Err(invalid(format!(
            "sampler = {:?} but the event contains a {bad} mechanism: a {:?} sampler records {expected} events only",
            record.sampler, record.sampler
        )));
    }
    Ok(())
}

fn canonical<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain data with string keys always serializes.
    serde_json::to_vec(value).unwrap_or_default()
}

fn header_hash(header: &LedgerHeader) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(HEADER_DOMAIN);
    h.update(canonical(header));
    h.finalize().into()
}

fn entry_hash(prev: &[u8; 32], index: u64, record: &Record) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(ENTRY_DOMAIN);
    h.update(prev);
    h.update(index.to_be_bytes());
    h.update(canonical(record));
    h.finalize().into()
}

/// Lower-case hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    unhex_n(s)
}

/// `N` bytes from exactly `2 N` lower-case hex digits (the only spelling
/// this crate writes, so that a hash has one spelling).
pub(crate) fn unhex_n<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0u8; N];
    for (k, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * k..2 * k + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Checks a signature against the key it names; returns that key.
fn check_signature(sig: &HeadSignature, head: &[u8; 32]) -> Result<PublicKey, LedgerError> {
    let bad = |reason: String| LedgerError::BadSignature { reason };
    let key = PublicKey::from_hex(&sig.public_key).map_err(|e| bad(format!("public_key: {e}")))?;
    let bytes: [u8; 64] =
        unhex_n(&sig.signature).ok_or_else(|| bad("signature: must be 128 lower-case hex digits".into()))?;
    if !key.verifies(head, &bytes) {
        return Err(bad(format!(
            "does not verify under the key it names ({}): the ledger changed after it was signed, or the \
             signature was forged",
            key.fingerprint()
        )));
    }
    Ok(key)
}
