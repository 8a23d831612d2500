//! Checkpoints that lose nothing privacy-relevant, written crash-safely.
//!
//! A checkpoint is a folder: the weights (`model-<sha>.safetensors`), the
//! wrapped optimizer's tensors (`optimizer-<sha>.safetensors`, e.g. AdamW's
//! moments), the ledger (`ledger-<head>.json`, every step so far) and
//! `checkpoint.json`, a manifest with the step count, the [`crate::DpConfig`], the
//! noise, sampler and optimizer state, and the SHA-256 of every file.
//!
//! # Crash safety
//! Files are named by their content and written atomically, the manifest
//! last (`src/checkpoint/atomic.rs`): a run killed at any moment, even while writing a
//! checkpoint, resumes from the last complete one. Files no manifest names
//! are removed by the next save.
//!
//! # What is checked on resume
//! * `manifest_sha256`: the SHA-256 of the manifest's canonical JSON with
//!   this field empty, so any edit of a field that does not also recompute
//!   it is refused; unknown fields are refused.
//! * Every file's SHA-256 against the manifest, the ledger's head, and the
//!   ledger's own hash chain.
//! * The manifest against the ledger, the privacy truth a reviewer reads:
//!   every mechanism recorded must be exactly what the resumed configuration
//!   records (noise multiplier, clipping norm, sampler, adjacency, seeding),
//!   the declared budget and dataset size must be the ledger header's, and
//!   the step counts must agree. Rewriting a privacy setting therefore means
//!   rewriting the ledger, which changes its head.
//!
//! Resuming rebuilds the accountant from the ledger (the spent budget is
//! never reset) and continues the noise, the batches and the optimizer
//! exactly where they were for a fixed-seed run: N steps, a checkpoint, a
//! resume and N more steps give the same weights, bit for bit, as 2N steps
//! (for shuffled batches, when N ends an epoch).
//!
//! # Security
//! For a run seeded from the OS, neither the noise generator's nor the
//! sampler's generator state is written: the resumed run re-seeds both from
//! the OS. A fixed-seed run stores their ChaCha20 state, which lets anyone who
//! reads the checkpoint regenerate the noise: such runs are for research, and
//! the ledger already says so. A shuffled sampler resumes at a new epoch (a
//! checkpoint at an epoch's end, the usual place, resumes exactly): nothing
//! the checkpoint stores decides how often an example is used, and the
//! ledger counts the partial epoch before the checkpoint as a whole one.
//!
//! The trained variables' names are stored in the optimizer's order (its
//! state is stored by position): a resume with other variables, or the same
//! in another order, is refused.

pub(crate) mod atomic;
mod manifest;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use dp_accountant::Ledger;
use sha2::{Digest, Sha256};

use self::atomic::{io, Writer};
use self::manifest::{FileRef, Files, Manifest, NoiseState, SamplerState, FORMAT, MANIFEST, VERSION};
use crate::error::{Error, Result};
use crate::optim::{OptimizerState, StatefulOptimizer};
use crate::optimizer::DpOptimizer;

/// The SHA-256 of a file's bytes, lower-case hex.
///
/// # Errors
/// [`Error::Io`].
pub fn sha256_file(path: &Path) -> Result<String> {
    Ok(sha256_hex(&std::fs::read(path).map_err(io(path))?))
}

fn sha256_hex(bytes: &[u8]) -> String {
    dp_accountant::ledger::hex(&Sha256::digest(bytes))
}

/// Writes `varmap`'s weights to `dir/name(sha)` atomically; returns the
/// file's name and SHA-256.
pub(crate) fn write_weights(
    writer: &mut Writer,
    dir: &Path,
    varmap: &VarMap,
    name: impl Fn(&str) -> String,
) -> Result<(String, String)> {
    writer.write_with(dir, name, |tmp| Ok(varmap.save(tmp)?))
}

/// The resumed configuration must be the one the ledger recorded: every
/// mechanism entry equal to what `opt` records for that many steps, and the
/// header's budget and dataset size equal to the configuration's.
fn check_against_ledger<O: candle_nn::Optimizer>(opt: &DpOptimizer<O>, ledger: &Ledger, path: &Path) -> Result<()> {
    let bad = |reason: String| Error::Checkpoint { path: path.to_path_buf(), reason };
    let config = opt.config();
    for (k, m) in ledger.mechanisms().enumerate() {
        // The processes that ran a step are the run's to change (a checkpoint
        // resumes on any number); the mechanism is not.
        let expected = dp_accountant::MechanismRecord { distributed: m.distributed, ..opt.record(m.event.steps()) };
        if *m != expected {
            return Err(bad(format!(
                "mechanism {k} of the ledger differs from the checkpoint's configuration (noise multiplier {}, \
                 clipping norm {}, sampler {:?}): the manifest does not describe this run",
                config.noise_multiplier(),
                config.max_grad_norm(),
                config.sampler()
            )));
        }
    }
    let header = ledger.header();
    let declared = header.target.map(|t| (t.epsilon, t.delta));
    let budget = config.budget().map(|b| (b.epsilon, b.delta));
    if declared != budget {
        return Err(bad(format!("budget {budget:?} differs from the ledger's declared target {declared:?}")));
    }
    let n = config.sampler().dataset_size();
    if header.dataset_size != Some(n as u64) {
        return Err(bad(format!("dataset_size {n} differs from the ledger's {:?}", header.dataset_size)));
    }
    Ok(())
}

/// Reads a file once and checks its SHA-256 against the manifest; returns
/// its path and the bytes that were checked (what is then parsed).
fn verified(dir: &Path, file: &FileRef) -> Result<(std::path::PathBuf, Vec<u8>)> {
    let path = file.path(dir)?;
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let found = sha256_hex(&bytes);
    if found != file.sha256 {
        return Err(Error::Checkpoint {
            path,
            reason: format!("SHA-256 {found} differs from the manifest's {}: the file was altered", file.sha256),
        });
    }
    Ok((path, bytes))
}

/// Loads the safetensors `bytes` (read from `path`) into `varmap`, all or
/// none: every variable must be in them with its shape and dtype before any
/// is set.
fn load_weights(varmap: &VarMap, bytes: &[u8], path: &Path) -> Result<()> {
    let data = varmap.data().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let device = data.values().next().map_or(Device::Cpu, |v| v.device().clone());
    let tensors = candle_core::safetensors::load_buffer(bytes, &device)?;
    let bad = |reason: String| Error::Checkpoint { path: path.to_path_buf(), reason };
    for (name, var) in data.iter() {
        match tensors.get(name) {
            Some(t) if t.dims() == var.dims() && t.dtype() == var.dtype() => {}
            Some(t) => {
                return Err(bad(format!(
                    "{name}: shape {:?} {:?}, the model has {:?}",
                    t.dims(),
                    t.dtype(),
                    var.dims()
                )))
            }
            None => return Err(bad(format!("{name}: not in the weights file"))),
        }
    }
    for (name, var) in data.iter() {
        var.set(&tensors[name])?;
    }
    Ok(())
}

/// Removes the files of `dir` that belong to no manifest: earlier
/// checkpoints' files and temporary files a crash left. Files that are not
/// ours are left alone.
fn remove_unreferenced(dir: &Path, files: &Files) -> Result<()> {
    let keep: Vec<&str> = files.all().map(|f| f.name.as_str()).collect();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = is_content_name(name.strip_suffix(".tmp").unwrap_or(&name))
            || name == "staged.tmp"
            || name == format!("{MANIFEST}.tmp");
        if ours && !keep.contains(&name.as_str()) {
            std::fs::remove_file(entry.path()).map_err(io(&entry.path()))?;
        }
    }
    Ok(())
}

/// Whether `name` is one [`content_name`] makes: with the temporary files
/// of the writer, the only files a save removes.
fn is_content_name(name: &str) -> bool {
    let named = |prefix: &str, ext: &str| {
        name.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(ext))
            .is_some_and(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    };
    named("model-", ".safetensors") || named("optimizer-", ".safetensors") || named("ledger-", ".json")
}

/// A content name: `prefix-<first 16 hex digits>.ext` (`sha` is always a
/// 64-digit SHA-256 this module computed, so the slice is in bounds).
fn content_name(prefix: &'static str, ext: &'static str) -> impl Fn(&str) -> String {
    move |sha: &str| format!("{prefix}-{}.{ext}", &sha[..16])
}

impl<O: StatefulOptimizer> DpOptimizer<O> {
    /// Writes a checkpoint of the run to `dir` (created if needed): the
    /// weights of `varmap`, the optimizer's state, the ledger (flushed), the
    /// configuration, the sampler and the noise, crash-safely (see the
    /// module docs).
    ///
    /// # Errors
    /// [`Error::OutOfOrder`] while a batch is open (between
    /// [`DpOptimizer::next_batch`] and [`DpOptimizer::step`]);
    /// [`Error::Incompatible`] for a run with audit canaries (their
    /// inclusion and scores are not in checkpoints yet);
    /// [`Error::Io`] and Candle's errors.
    ///
    /// On a distributed optimizer, rank 0 writes the checkpoint and every
    /// rank flushes its ledger as rank 0 does; all fail if rank 0 fails
    /// ([`Error::PeerFailed`] on the others). Every rank resumes from the
    /// same checkpoint, on any world size, with [`DpOptimizer::resume`] then
    /// [`DpOptimizer::distribute`].
    pub fn save_checkpoint(&mut self, dir: impl AsRef<Path>, varmap: &VarMap) -> Result<()> {
        let dir = dir.as_ref();
        if self.rank().1 > 1 {
            // As rank 0's checkpoint does, on every rank, whatever happens to
            // it: the ranks' ledgers stay the same entry for entry.
            self.flush_ledger()?;
        }
        self.on_root(
            |opt| opt.save_checkpoint_with(dir, varmap, &mut Writer::default()).map(|()| ((), [0; 64])),
            |_, _| Ok(()),
        )
    }

    fn save_checkpoint_with(&mut self, dir: &Path, varmap: &VarMap, writer: &mut Writer) -> Result<()> {
        if self.batch_open() {
            return Err(Error::OutOfOrder {
                call: "save_checkpoint",
                state: "while a batch is open",
                fix: "step() or cancel_batch() first: a checkpoint holds whole steps only",
            });
        }
        if self.audited() {
            return Err(Error::Incompatible {
                setting: "a checkpoint",
                with: "audit canaries",
                why: "the canaries' inclusion and scores are not saved in checkpoints yet, so a resumed run could \
                      not finish its audit: run audited trainings without checkpoints",
            });
        }
        let variables = self.variable_names(varmap)?;
        let mut state = self.inner().save_state()?;
        if let Some(name) = state.tensors.keys().find(|k| k.starts_with(MASTER)) {
            return Err(Error::OptimizerState {
                reason: format!(
                    "the inner optimizer's state has a tensor named {name:?}: names beginning {MASTER:?} are \
                     reserved for the master weights of mixed precision"
                ),
            });
        }
        // Mixed precision: the f32 masters hold what the bf16/f16 weights round away.
        for (index, master) in self.master_weights()? {
            state.tensors.insert(format!("{MASTER}{index}"), master);
        }
        let ledger = self.flush_ledger()?.clone();
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let (name, sha256) = write_weights(writer, dir, varmap, content_name("model", "safetensors"))?;
        let weights = FileRef { name, sha256 };
        let optimizer = if state.tensors.is_empty() {
            None
        } else {
            let (name, sha256) = writer.write_with(dir, content_name("optimizer", "safetensors"), |tmp| {
                Ok(candle_core::safetensors::save(
                    &state.tensors.iter().map(|(k, t)| (k.as_str(), t.clone())).collect::<HashMap<_, _>>(),
                    tmp,
                )?)
            })?;
            Some(FileRef { name, sha256 })
        };
        let ledger_bytes = ledger.to_json().into_bytes();
        let ledger_file = FileRef {
            // The head is a 64-digit SHA-256.
            name: format!("ledger-{}.json", &ledger.head()[..16]),
            sha256: sha256_hex(&ledger_bytes),
        };
        writer.write(dir, &ledger_file.name, &ledger_bytes)?;
        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            steps: self.steps(),
            config: self.config().clone(),
            variables,
            learning_rate: self.learning_rate(),
            optimizer_counters: state.counters,
            noise: NoiseState::of(self.noise()),
            sampler: SamplerState::of(self.sampler()),
            files: Files { weights, optimizer, ledger: ledger_file },
            ledger_head: ledger.head(),
            manifest_sha256: String::new(),
        }
        .sealed();
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| Error::Checkpoint { path: dir.join(MANIFEST), reason: e.to_string() })?;
        writer.write(dir, MANIFEST, text.as_bytes())?;
        remove_unreferenced(dir, &manifest.files)
    }

    /// Resumes a run from the checkpoint in `dir`: verifies every file
    /// against the manifest and the manifest against the ledger, rebuilds the
    /// optimizer over `vars` (in the same order as when saved) with the saved
    /// configuration, sampler, noise and optimizer state and its spent
    /// budget, and only then loads the weights into `varmap`.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] for a missing, unknown or altered file (one
    /// whose SHA-256, or a ledger whose head, differs from the manifest's) or
    /// a manifest that contradicts the ledger; [`Error::OptimizerState`];
    /// [`Error::Io`]; the builder's, the accountant's and Candle's errors. A
    /// refused checkpoint changes nothing.
    pub fn resume(dir: impl AsRef<Path>, varmap: &VarMap, vars: Vec<Var>, config: O::Config) -> Result<Self> {
        let dir = dir.as_ref();
        let m = Manifest::read(dir)?;
        let manifest_path = dir.join(MANIFEST);
        let (weights_path, weights) = verified(dir, &m.files.weights)?;
        let (ledger_path, ledger_bytes) = verified(dir, &m.files.ledger)?;
        let optimizer = m.files.optimizer.as_ref().map(|f| verified(dir, f)).transpose()?;
        let bad = |path: &Path, reason: String| Error::Checkpoint { path: path.to_path_buf(), reason };
        let ledger = Ledger::from_bytes(&ledger_bytes).map_err(dp_accountant::Error::from)?;
        ledger.verify_head(&m.ledger_head).map_err(|e| bad(&ledger_path, e.to_string()))?;
        if ledger.total_steps() != m.steps {
            return Err(bad(
                &ledger_path,
                format!("{} steps recorded, the manifest says {}", ledger.total_steps(), m.steps),
            ));
        }
        let names = crate::optimizer::names_in(varmap, &vars)?;
        if names != m.variables {
            return Err(bad(
                &manifest_path,
                format!(
                    "the variables given are {names:?}, the checkpoint trained {:?}: pass the same variables in the \
                     same order (vars_by_name)",
                    m.variables
                ),
            ));
        }
        let sampler = m.sampler.restore(&m.config, &manifest_path)?;
        let noise = m.noise.restore(&manifest_path)?;
        let device = vars.first().map_or(Device::Cpu, |v| v.device().clone());
        let mut opt = Self::assemble(vars, sampler, noise, m.config, config, ledger.clone())?;
        check_against_ledger(&opt, &ledger, &ledger_path)?;
        let (masters, tensors): (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) = match &optimizer {
            Some((_, bytes)) => candle_core::safetensors::load_buffer(bytes, &device)?.into_iter().collect(),
            None => BTreeMap::new(),
        }
        .into_iter()
        .partition(|(k, _)| k.starts_with(MASTER));
        let masters = masters_by_index(&masters, opt.vars(), &manifest_path)?;
        opt.inner_mut().load_state(&OptimizerState { counters: m.optimizer_counters, tensors })?;
        opt.set_learning_rate(m.learning_rate);
        // Only now, with every check passed: a refused checkpoint changes nothing.
        load_weights(varmap, &weights, &weights_path)?;
        opt.restore_masters(&masters)?;
        Ok(opt)
    }
}

/// The prefix of the f32 master weights' names in the optimizer file.
const MASTER: &str = "master.";

/// The saved masters by variable index, each checked to be `f32` of its
/// variable's shape (a checkpoint edited otherwise is refused).
fn masters_by_index(saved: &BTreeMap<String, Tensor>, vars: &[Var], path: &Path) -> Result<BTreeMap<usize, Tensor>> {
    let bad = |reason: String| Error::Checkpoint { path: path.to_path_buf(), reason };
    saved
        .iter()
        .map(|(name, t)| {
            let index: usize = name[MASTER.len()..].parse().map_err(|_| bad(format!("unknown tensor {name}")))?;
            let var = vars.get(index).ok_or_else(|| bad(format!("{name}: no variable {index}")))?;
            if t.dims() != var.dims() || t.dtype() != candle_core::DType::F32 {
                return Err(bad(format!("{name}: {:?} {:?}, the variable is {:?}", t.dtype(), t.dims(), var.dims())));
            }
            Ok((index, t.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests;
