//! [`DpOptimizer::release`]: the trained model and the statement that covers it, in one call.

use std::path::{Path, PathBuf};

use candle_nn::{Optimizer, VarMap};
use dp_accountant::{Ledger, PrivacyReport};

use crate::checkpoint::atomic::{io, Writer};
use crate::checkpoint::write_weights;
use crate::error::Result;
use crate::optimizer::DpOptimizer;

/// The file names a release writes.
const WEIGHTS: &str = "model.safetensors";
const LEDGER: &str = "ledger.json";
const REPORT_MD: &str = "report.md";
const REPORT_HTML: &str = "report.html";

/// What [`DpOptimizer::release`] wrote.
#[derive(Debug, Clone)]
pub struct Release {
    /// The weights file (`model.safetensors`).
    pub weights: PathBuf,
    /// Its SHA-256, as the ledger records it (hex).
    pub weights_sha256: String,
    /// The ledger, ending with the release record.
    pub ledger: Ledger,
    /// The privacy report on that ledger.
    pub report: PrivacyReport,
}

impl<O: Optimizer> DpOptimizer<O> {
    /// Releases the trained model into `dir` (created if needed): the weights
    /// of `varmap` as `model.safetensors`, a ledger record of their SHA-256
    /// after all steps so far (the weights the privacy statement covers),
    /// `ledger.json`, and the report as `report.md` and `report.html`,
    /// accounted by the optimizer's accountant at `delta` (default: the
    /// budget's delta, else the report's default). Every file is written
    /// atomically.
    ///
    /// Training may continue after a release; the ledger then records the
    /// later steps after it, and a later release covers them.
    ///
    /// # Errors
    /// [`crate::Error::OutOfOrder`] while a batch is open;
    /// [`crate::Error::UnknownVariable`] for a trained variable not in
    /// `varmap`; [`crate::Error::Io`];
    /// the accountant's (a `delta` outside `(0, 1)`) and Candle's errors.
    ///
    /// On a distributed optimizer, rank 0 writes the files; every rank
    /// records the same release and returns the same [`Release`], or fails
    /// if rank 0 did ([`crate::Error::PeerFailed`] on the others).
    pub fn release(&mut self, dir: impl AsRef<Path>, varmap: &VarMap, delta: Option<f64>) -> Result<Release> {
        let dir = dir.as_ref();
        self.on_root(
            |opt| {
                let release = opt.release_here(dir, varmap, delta)?;
                let mut hash = [0u8; 64];
                hash.copy_from_slice(release.weights_sha256.as_bytes());
                Ok((release, hash))
            },
            |opt, hash| {
                let weights_sha256 = String::from_utf8_lossy(&hash).into_owned();
                let delta = delta.or(opt.config().budget().map(|b| b.delta));
                opt.record_release(WEIGHTS, &weights_sha256)?;
                let ledger = opt.ledger()?;
                let report = PrivacyReport::from_ledger_with(&ledger, delta, opt.accountant())?;
                Ok(Release { weights: dir.join(WEIGHTS), weights_sha256, ledger, report })
            },
        )
    }

    /// The release, written by this process.
    fn release_here(&mut self, dir: &Path, varmap: &VarMap, delta: Option<f64>) -> Result<Release> {
        if self.batch_open() {
            return Err(crate::Error::OutOfOrder {
                call: "release",
                state: "while a batch is open",
                fix: "step() or cancel_batch() first: a release covers whole steps only",
            });
        }
        let delta = delta.or(self.config().budget().map(|b| b.delta));
        self.variable_names(varmap)?;
        // The canary audit, if any, is recorded before the model it audits.
        let audit = self.audit_with_seeding()?;
        // Checked before anything is written or recorded.
        PrivacyReport::from_ledger_with(&self.ledger()?, delta, self.accountant())?;
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut writer = Writer::default();
        let (_, weights_sha256) = write_weights(&mut writer, dir, varmap, |_| WEIGHTS.to_string())?;
        // The release is recorded in the optimizer's ledger only once every
        // file is written: a failed release can be retried without a second
        // release record.
        let mut ledger = self.ledger()?;
        if let Some((audit, seeding)) = &audit {
            ledger.append_audit(audit, *seeding)?;
        }
        ledger.append_release(WEIGHTS, &weights_sha256)?;
        let report = PrivacyReport::from_ledger_with(&ledger, delta, self.accountant())?;
        writer.write(dir, LEDGER, ledger.to_json().as_bytes())?;
        writer.write(dir, REPORT_MD, report.to_markdown().as_bytes())?;
        writer.write(dir, REPORT_HTML, report.to_html().as_bytes())?;
        if let Some((audit, seeding)) = &audit {
            self.append_audit(audit, *seeding)?;
        }
        self.record_release(WEIGHTS, &weights_sha256)?;
        Ok(Release { weights: dir.join(WEIGHTS), weights_sha256, ledger, report })
    }
}
