//! Checkpoints that lose nothing privacy-relevant.
//!
//! A checkpoint is a folder: `model.safetensors` (the weights),
//! `ledger.json` (every step so far) and `checkpoint.json`, a manifest with
//! the step count, the privacy configuration, the noise and sampler state,
//! the SHA-256 of the weights file and the ledger's head hash.
//!
//! # What is checked on resume
//! * `manifest_sha256`: the SHA-256 of the manifest's canonical JSON with
//!   this field empty, so any edit of a field that does not also recompute
//!   it is refused; unknown fields are refused.
//! * The weights' SHA-256 and the ledger's head against the manifest, and the
//!   ledger's own hash chain.
//! * The manifest against the ledger, the privacy truth a reviewer reads:
//!   every mechanism recorded must be exactly what the resumed configuration
//!   records (noise multiplier, clipping norm, sample rate or batch size,
//!   adjacency, seeding), the declared budget and dataset size must be the
//!   ledger header's, and the step counts must agree. Rewriting a privacy
//!   setting therefore means rewriting the ledger, which changes its head.
//!
//! Resuming rebuilds the accountant from the ledger (the spent budget is
//! never reset) and continues the noise and the batches exactly where they
//! were for a fixed-seed run.
//!
//! # Security
//! For a run seeded from the OS, neither the noise generator's nor the
//! sampler's state is written: the resumed run re-seeds both from the OS. A
//! fixed-seed run stores their ChaCha20 state, which lets anyone who reads
//! the checkpoint regenerate the noise: such runs are for research, and the
//! ledger already says so.
//!
//! The wrapped optimizer's own state (Adam's moments) is not part of
//! Candle's public API and is not saved: a resumed AdamW starts its moments
//! afresh. Plain SGD resumes bit for bit.

use std::path::{Path, PathBuf};

use candle_core::Var;
use candle_nn::{Optimizer, VarMap};
use dp_accountant::{AccountantKind, Ledger, Seeding};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::clip::ClipMode;
use crate::error::{Error, Result};
use crate::noise::GaussianNoise;
use crate::optimizer::{DpOptimizer, Engine, PrivacyBudget};
use crate::sampler::{PoissonSampler, SamplerDescription};

const FORMAT: &str = "candle-dp-checkpoint";
/// Version 2 added `manifest_sha256`; version 1 checkpoints are refused
/// with a version error.
const VERSION: u64 = 2;
const MANIFEST: &str = "checkpoint.json";
const WEIGHTS: &str = "model.safetensors";
const LEDGER: &str = "ledger.json";

/// A ChaCha20 position: key (hex), stream, word position (decimal, a u128).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RngState {
    key: String,
    stream: u64,
    word_pos: String,
}

impl RngState {
    fn new(state: ([u8; 32], u64, u128)) -> Self {
        Self { key: dp_accountant::ledger::hex(&state.0), stream: state.1, word_pos: state.2.to_string() }
    }

    fn get(&self, path: &Path) -> Result<([u8; 32], u64, u128)> {
        let bad = |what: &str| Error::Checkpoint { path: path.to_path_buf(), reason: format!("malformed {what}") };
        if self.key.len() != 64 {
            return Err(bad("generator key"));
        }
        let mut key = [0u8; 32];
        for (k, b) in key.iter_mut().enumerate() {
            *b = u8::from_str_radix(&self.key[2 * k..2 * k + 2], 16).map_err(|_| bad("generator key"))?;
        }
        Ok((key, self.stream, self.word_pos.parse().map_err(|_| bad("generator position"))?))
    }
}

/// The manifest of a checkpoint folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    format: String,
    version: u64,
    steps: u64,
    noise_multiplier: f64,
    max_grad_norm: f64,
    per_layer_thresholds: Option<Vec<f64>>,
    microbatch: bool,
    dataset_size: usize,
    sample_rate: Option<f64>,
    batch_size: Option<usize>,
    sampler_seeding: Seeding,
    budget: Option<(f64, f64)>,
    /// The accountant that enforces the budget (absent in older checkpoints: RDP).
    #[serde(default)]
    accountant: AccountantKind,
    noise_seeding: Seeding,
    noise_state: Option<RngState>,
    sampler_state: Option<RngState>,
    weights_sha256: String,
    ledger_head: String,
    /// SHA-256 of this manifest's canonical JSON with this field empty.
    manifest_sha256: String,
}

impl Manifest {
    /// The SHA-256 (hex) of the canonical JSON of every other field: the
    /// compact form of the manifest as a JSON value with every object's keys
    /// sorted (whatever map `serde_json` is built with) and floats in
    /// shortest round-trip form, `manifest_sha256` "".
    fn digest(&self) -> String {
        let unsealed = Manifest { manifest_sha256: String::new(), ..self.clone() };
        // Plain data with string keys always serializes.
        let value = serde_json::to_value(&unsealed).map(sorted_keys).unwrap_or_default();
        dp_accountant::ledger::hex(&Sha256::digest(serde_json::to_vec(&value).unwrap_or_default()))
    }
}

/// `value` with every object's keys inserted in sorted order.
fn sorted_keys(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k, sorted_keys(v))).collect())
        }
        serde_json::Value::Array(items) => serde_json::Value::Array(items.into_iter().map(sorted_keys).collect()),
        other => other,
    }
}

/// The resumed configuration must be the one the ledger recorded: every
/// mechanism entry equal to what `opt` records for that many steps, and the
/// header's budget and dataset size equal to the manifest's.
fn check_against_ledger<O: Optimizer>(
    opt: &DpOptimizer<O>,
    ledger: &Ledger,
    budget: Option<(f64, f64)>,
    path: &Path,
) -> Result<()> {
    let bad = |reason: String| Error::Checkpoint { path: path.to_path_buf(), reason };
    for (k, m) in ledger.mechanisms().enumerate() {
        if *m != opt.record(m.event.steps()) {
            return Err(bad(format!(
                "mechanism {k} of the ledger differs from the checkpoint's configuration (noise multiplier {}, \
                 clipping norm {}, sampler {:?}): the manifest does not describe this run",
                opt.noise_multiplier, opt.max_grad_norm, opt.sampler
            )));
        }
    }
    let header = ledger.header();
    let declared = header.target.map(|t| (t.epsilon, t.delta));
    if declared != budget {
        return Err(bad(format!("budget {budget:?} differs from the ledger's declared target {declared:?}")));
    }
    if header.dataset_size != Some(opt.sampler.dataset_size() as u64) {
        return Err(bad(format!(
            "dataset_size {} differs from the ledger's {:?}",
            opt.sampler.dataset_size(),
            header.dataset_size
        )));
    }
    Ok(())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// The SHA-256 of a file's bytes, lower-case hex.
///
/// # Errors
/// [`Error::Io`].
pub fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    Ok(dp_accountant::ledger::hex(&Sha256::digest(bytes)))
}

impl<O: Optimizer> DpOptimizer<O> {
    /// Writes a checkpoint of the run to `dir` (created if needed): the
    /// weights of `varmap`, the ledger (flushed), and the manifest. Pass the
    /// Poisson sampler the run draws from so a fixed-seed run can continue
    /// its batches.
    ///
    /// # Errors
    /// [`Error::Io`] and Candle's errors.
    pub fn save_checkpoint(
        &mut self,
        dir: impl AsRef<Path>,
        varmap: &VarMap,
        sampler: Option<&PoissonSampler>,
    ) -> Result<()> {
        let dir = dir.as_ref();
        // A fixed-seed Poisson run resumes only with its sampler's state.
        let sampler_ok = match sampler {
            Some(s) => s.description() == self.sampler,
            None => self.sampler.sample_rate().is_none() || self.sampler.seeding() != Seeding::Fixed,
        };
        if !sampler_ok {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                reason: format!(
                    "pass the sampler this run draws from ({:?}): a fixed-seed Poisson run resumes only with its state",
                    self.sampler
                ),
            });
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let weights = dir.join(WEIGHTS);
        varmap.save(&weights)?;
        let ledger = self.flush_ledger()?.clone();
        ledger.write(dir.join(LEDGER))?;
        let fixed = |s: Seeding| s == Seeding::Fixed;
        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            steps: self.steps,
            noise_multiplier: self.noise_multiplier,
            max_grad_norm: self.max_grad_norm,
            per_layer_thresholds: match &self.clipping {
                ClipMode::Flat => None,
                ClipMode::PerLayer(t) => Some(t.clone()),
            },
            microbatch: self.ghost.is_none(),
            dataset_size: self.sampler.dataset_size(),
            sample_rate: self.sampler.sample_rate(),
            batch_size: self.sampler.batch_size(),
            sampler_seeding: self.sampler.seeding(),
            budget: self.budget.map(|(b, _)| (b.epsilon, b.delta)),
            accountant: self.accountant,
            noise_seeding: self.noise.seeding(),
            noise_state: fixed(self.noise.seeding()).then(|| RngState::new(self.noise.state())),
            sampler_state: sampler.filter(|s| fixed(s.seeding())).map(|s| RngState::new(s.state())),
            weights_sha256: sha256_file(&weights)?,
            ledger_head: ledger.head(),
            manifest_sha256: String::new(),
        };
        let manifest = Manifest { manifest_sha256: manifest.digest(), ..manifest };
        let path = dir.join(MANIFEST);
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| Error::Checkpoint { path: path.clone(), reason: e.to_string() })?;
        std::fs::write(&path, text).map_err(io(&path))
    }

    /// Resumes a run from the checkpoint in `dir`: verifies the weights and
    /// the ledger against the manifest, loads the weights into `varmap`, and
    /// rebuilds the optimizer over `vars` (in the same order as when saved)
    /// with the saved privacy configuration, its spent budget, and (for a
    /// Poisson run) the sampler to continue with.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] for a missing, unknown or altered file (weights
    /// whose SHA-256 or a ledger whose head differs from the manifest's);
    /// [`Error::Io`]; the accountant's and Candle's errors.
    pub fn resume(
        dir: impl AsRef<Path>,
        varmap: &mut VarMap,
        vars: Vec<Var>,
        config: O::Config,
    ) -> Result<(Self, Option<PoissonSampler>)> {
        let dir = dir.as_ref();
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let bad = |path: &PathBuf, reason: String| Error::Checkpoint { path: path.clone(), reason };
        let m: Manifest = serde_json::from_str(&text).map_err(|e| bad(&path, e.to_string()))?;
        if m.format != FORMAT || m.version != VERSION {
            return Err(bad(
                &path,
                format!("format {:?} version {}: expected {FORMAT:?} version {VERSION}", m.format, m.version),
            ));
        }
        if m.digest() != m.manifest_sha256 {
            return Err(bad(
                &path,
                "manifest_sha256 does not match the manifest: it was edited after it was written".into(),
            ));
        }
        // A generator's state is saved exactly when it was seeded by the user
        // (for the sampler: a Poisson one; a shuffled sampler has no state here).
        for (what, seeding, state, kept) in [
            ("noise", m.noise_seeding, m.noise_state.is_some(), true),
            ("sampler", m.sampler_seeding, m.sampler_state.is_some(), m.sample_rate.is_some()),
        ] {
            if state != (kept && seeding == Seeding::Fixed) {
                return Err(bad(&path, format!("{what} seeding {seeding:?} contradicts the saved {what} state")));
            }
        }
        let weights = dir.join(WEIGHTS);
        let found = sha256_file(&weights)?;
        if found != m.weights_sha256 {
            return Err(bad(
                &weights,
                format!("SHA-256 {found} differs from the manifest's {}: the weights were altered", m.weights_sha256),
            ));
        }
        let ledger_path = dir.join(LEDGER);
        let ledger = Ledger::read(&ledger_path)?;
        ledger.verify_head(&m.ledger_head).map_err(|e| bad(&ledger_path, e.to_string()))?;
        if ledger.total_steps() != m.steps {
            return Err(bad(
                &ledger_path,
                format!("{} steps recorded, the manifest says {}", ledger.total_steps(), m.steps),
            ));
        }

        // Validated as any description is: a manifest is input like any other.
        let sampler = match (m.sample_rate, m.batch_size) {
            (Some(q), None) => SamplerDescription::poisson(m.dataset_size, q, m.sampler_seeding),
            (None, Some(b)) => SamplerDescription::shuffled_fixed_size(m.dataset_size, b, m.sampler_seeding),
            _ => return Err(bad(&path, "a sampler needs exactly one of sample_rate and batch_size".into())),
        }
        .map_err(|e| bad(&path, format!("invalid sampler: {e}")))?;
        let noise = match &m.noise_state {
            Some(s) => GaussianNoise::restore(s.get(&path)?, Seeding::Fixed),
            None => GaussianNoise::from_os_entropy()?,
        };
        let mut builder = DpOptimizer::<O>::builder(vars, sampler)
            .noise_multiplier(m.noise_multiplier)
            .max_grad_norm(m.max_grad_norm)
            .noise(noise)
            .accountant(m.accountant)
            .engine(if m.microbatch { Engine::Microbatch } else { Engine::Ghost });
        if let Some(t) = &m.per_layer_thresholds {
            builder = builder.clipping(ClipMode::PerLayer(t.clone()));
        }
        if let Some((epsilon, delta)) = m.budget {
            builder = builder.budget(PrivacyBudget { epsilon, delta });
        }
        let mut opt = builder.build(config)?;
        check_against_ledger(&opt, &ledger, m.budget, &ledger_path)?;
        // Only now, with every check passed: a refused checkpoint changes nothing.
        varmap.load(&weights)?;
        opt.steps = m.steps;
        opt.ledger = ledger;
        let poisson = match (sampler.sample_rate(), &m.sampler_state) {
            (Some(q), Some(s)) => Some(PoissonSampler::restore(sampler.dataset_size(), q, s.get(&path)?)?),
            (Some(q), None) => Some(PoissonSampler::new(sampler.dataset_size(), q)?),
            (None, _) => None,
        };
        Ok((opt, poisson))
    }
}
