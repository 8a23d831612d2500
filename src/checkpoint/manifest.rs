//! `checkpoint.json`: what a checkpoint holds, sealed by its own SHA-256.

use std::collections::BTreeMap;
use std::path::Path;

use dp_accountant::Seeding;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::DpConfig;
use crate::error::{Error, Result};
use crate::noise::GaussianNoise;
use crate::sampler::{PoissonSampler, Sampler, ShuffledSampler};

pub(super) const FORMAT: &str = "candle-dp-checkpoint";
/// Version 2 added `manifest_sha256`; version 3 stores the [`DpConfig`],
/// any sampler's and the optimizer's state, and content-named files;
/// version 4 the counter-based Poisson sampler's key and step.
/// Earlier versions are refused with a version error.
pub(super) const VERSION: u64 = 4;
pub(super) const MANIFEST: &str = "checkpoint.json";

/// A ChaCha20 position: key (hex), stream, word position (decimal, a u128).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RngState {
    key: String,
    stream: u64,
    word_pos: String,
}

type RawRng = ([u8; 32], u64, u128);

impl RngState {
    fn new(state: RawRng) -> Self {
        Self { key: dp_accountant::ledger::hex(&state.0), stream: state.1, word_pos: state.2.to_string() }
    }

    fn get(&self, path: &Path) -> Result<RawRng> {
        let word_pos = self.word_pos.parse().map_err(|_| malformed(path, "generator position"))?;
        Ok((parse_key(&self.key, path)?, self.stream, word_pos))
    }
}

fn malformed(path: &Path, what: &str) -> Error {
    Error::Checkpoint { path: path.to_path_buf(), reason: format!("malformed {what}") }
}

/// A 256-bit key from 64 hex digits.
fn parse_key(hex: &str, path: &Path) -> Result<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(malformed(path, "generator key"));
    }
    let mut key = [0u8; 32];
    for (k, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * k..2 * k + 2], 16).map_err(|_| malformed(path, "generator key"))?;
    }
    Ok(key)
}

/// A counter-based sampler's key (hex) and next step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CounterState {
    key: String,
    step: u64,
}

/// A generator's state is saved exactly when the user seeded it: an
/// OS-seeded generator is seeded afresh on resume, so a checkpoint never
/// reveals noise or batches that were meant to be secret.
fn saved_rng(seeding: Seeding, state: RawRng) -> Option<RngState> {
    (seeding == Seeding::Fixed).then(|| RngState::new(state))
}

/// Where the sampler is: its generator, if fixed-seed. A shuffled sampler
/// resumes at a new epoch ([`ShuffledSampler`]'s restore says why), so its
/// permutation is not stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(super) enum SamplerState {
    Poisson { counter: Option<CounterState> },
    Shuffled { rng: Option<RngState> },
}

impl SamplerState {
    pub(super) fn of(sampler: &Sampler) -> Self {
        let seeding = sampler.description().seeding();
        match sampler {
            Sampler::Poisson(s) => SamplerState::Poisson {
                counter: (seeding == Seeding::Fixed).then(|| {
                    let (key, step) = s.state();
                    CounterState { key: dp_accountant::ledger::hex(&key), step }
                }),
            },
            Sampler::Shuffled(s) => SamplerState::Shuffled { rng: saved_rng(seeding, s.state()) },
        }
    }

    /// The sampler `config` describes, at this state.
    pub(super) fn restore(&self, config: &DpConfig, path: &Path) -> Result<Sampler> {
        let d = config.sampler();
        let bad = |reason: String| Error::Checkpoint { path: path.to_path_buf(), reason };
        let saved = match self {
            SamplerState::Poisson { counter } => counter.is_some(),
            SamplerState::Shuffled { rng } => rng.is_some(),
        };
        if saved != (d.seeding() == Seeding::Fixed) {
            return Err(bad(format!("sampler seeding {:?} contradicts the saved sampler state", d.seeding())));
        }
        let invalid = |e: Error| bad(format!("invalid sampler state: {e}"));
        Ok(match (self, d.sample_rate(), d.batch_size()) {
            (SamplerState::Poisson { counter }, Some(q), None) => Sampler::Poisson(
                match counter {
                    Some(c) => PoissonSampler::restore(d.dataset_size(), q, (parse_key(&c.key, path)?, c.step)),
                    None => PoissonSampler::new(d.dataset_size(), q),
                }
                .map_err(invalid)?,
            ),
            (SamplerState::Shuffled { rng }, None, Some(b)) => {
                let state = rng.as_ref().map(|r| r.get(path)).transpose()?;
                Sampler::Shuffled(ShuffledSampler::restore(d.dataset_size(), b, state).map_err(invalid)?)
            }
            _ => return Err(bad("the sampler state is not of the configuration's sampler".into())),
        })
    }
}

/// The noise generator's seeding and (fixed seed only) state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NoiseState {
    seeding: Seeding,
    rng: Option<RngState>,
}

impl NoiseState {
    pub(super) fn of(noise: &GaussianNoise) -> Self {
        Self { seeding: noise.seeding(), rng: saved_rng(noise.seeding(), noise.state()) }
    }

    pub(super) fn restore(&self, path: &Path) -> Result<GaussianNoise> {
        let noise = match (&self.rng, self.seeding) {
            (Some(s), Seeding::Fixed) => GaussianNoise::restore(s.get(path)?, Seeding::Fixed),
            (None, Seeding::OsEntropy) => GaussianNoise::from_os_entropy()?,
            _ => {
                return Err(Error::Checkpoint {
                    path: path.to_path_buf(),
                    reason: format!("noise seeding {:?} contradicts the saved noise state", self.seeding),
                })
            }
        };
        Ok(noise.with_all_threads())
    }
}

/// A file of the checkpoint folder, by name and SHA-256 (hex).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRef {
    pub(super) name: String,
    pub(super) sha256: String,
}

impl FileRef {
    /// The file's path in `dir`, after checking that its name stays in `dir`.
    pub(super) fn path(&self, dir: &Path) -> Result<std::path::PathBuf> {
        let plain = !self.name.is_empty()
            && !self.name.starts_with('.')
            && self.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !plain {
            return Err(Error::Checkpoint {
                path: dir.join(MANIFEST),
                reason: format!("file name {:?} is not a plain file name in the checkpoint folder", self.name),
            });
        }
        Ok(dir.join(&self.name))
    }
}

/// The files a checkpoint covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Files {
    pub(super) weights: FileRef,
    /// The optimizer's tensors (absent when it has none, as SGD).
    pub(super) optimizer: Option<FileRef>,
    pub(super) ledger: FileRef,
}

impl Files {
    pub(super) fn all(&self) -> impl Iterator<Item = &FileRef> {
        [Some(&self.weights), self.optimizer.as_ref(), Some(&self.ledger)].into_iter().flatten()
    }
}

/// The manifest of a checkpoint folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Manifest {
    pub(super) format: String,
    pub(super) version: u64,
    pub(super) steps: u64,
    pub(super) config: DpConfig,
    /// The trained variables' names in the optimizer's order (the
    /// optimizer's state is stored by position).
    pub(super) variables: Vec<String>,
    pub(super) learning_rate: f64,
    pub(super) optimizer_counters: BTreeMap<String, u64>,
    pub(super) noise: NoiseState,
    pub(super) sampler: SamplerState,
    pub(super) files: Files,
    pub(super) ledger_head: String,
    /// SHA-256 of this manifest's canonical JSON with this field empty.
    pub(super) manifest_sha256: String,
}

impl Manifest {
    /// The SHA-256 (hex) of the canonical JSON of every other field: the
    /// compact form of the manifest as a JSON value with every object's keys
    /// sorted (whatever map `serde_json` is built with) and floats in
    /// shortest round-trip form, `manifest_sha256` "".
    pub(super) fn digest(&self) -> String {
        let unsealed = Manifest { manifest_sha256: String::new(), ..self.clone() };
        // Plain data with string keys always serializes.
        let value = serde_json::to_value(&unsealed).map(sorted_keys).unwrap_or_default();
        dp_accountant::ledger::hex(&Sha256::digest(serde_json::to_vec(&value).unwrap_or_default()))
    }

    /// The manifest with its seal.
    pub(super) fn sealed(self) -> Self {
        Manifest { manifest_sha256: self.digest(), ..self }
    }

    /// Reads and checks the manifest of `dir`: format, version and seal.
    pub(super) fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let bad = |reason: String| Error::Checkpoint { path: path.clone(), reason };
        let text = std::fs::read_to_string(&path).map_err(super::atomic::io(&path))?;
        // The version first, so an older checkpoint is named as such.
        let version = serde_json::from_str::<serde_json::Value>(&text).map_err(|e| bad(e.to_string()))?;
        let field = |k: &str| version.get(k).map_or_else(|| "(missing)".to_string(), ToString::to_string);
        if version.get("format").and_then(|f| f.as_str()) != Some(FORMAT)
            || version.get("version").and_then(serde_json::Value::as_u64) != Some(VERSION)
        {
            return Err(bad(format!(
                "format {} version {}: expected {FORMAT:?} version {VERSION}",
                field("format"),
                field("version")
            )));
        }
        let m: Manifest = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if m.digest() != m.manifest_sha256 {
            return Err(bad("manifest_sha256 does not match the manifest: it was edited after it was written".into()));
        }
        Ok(m)
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
