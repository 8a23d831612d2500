//! Data loading and small utilities shared by the examples (and their tests).
#![allow(dead_code)]

pub mod idx;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Why a data file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file is not there.
    #[error("{path}: not found ({hint})")]
    Missing {
        /// Where it was looked for.
        path: PathBuf,
        /// What it is and where to get it.
        hint: String,
    },
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The content is not what the format says.
    #[error("{path}: line {line}: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line (for binary formats, 0 and the message says where).
        line: usize,
        /// What was wrong.
        message: String,
    },
}

/// A labelled image set: `pixels[i]` has `width * height` values in [0, 1].
#[derive(Debug, Clone)]
pub struct Images {
    /// Pixel rows.
    pub pixels: Vec<Vec<f32>>,
    /// Class labels.
    pub labels: Vec<u32>,
}

impl Images {
    /// The examples at `idx` as `([n, features] f32, [n] u32)` tensors.
    pub fn tensors(&self, idx: &[usize], dev: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let f = self.pixels.first().map_or(0, Vec::len);
        let x: Vec<f32> = idx.iter().flat_map(|&i| self.pixels[i].iter().copied()).collect();
        let y: Vec<u32> = idx.iter().map(|&i| self.labels[i]).collect();
        Ok((Tensor::from_vec(x, (idx.len(), f), dev)?, Tensor::from_vec(y, idx.len(), dev)?))
    }
}

/// Opens a file, gunzipping it when its name ends in `.gz`.
pub fn open(path: &Path, hint: &str) -> Result<Box<dyn Read>, DataError> {
    let file = std::fs::File::open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => DataError::Missing { path: path.to_path_buf(), hint: hint.to_string() },
        _ => DataError::Io { path: path.to_path_buf(), source },
    })?;
    Ok(if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    })
}

/// Reads the digits CSV: a header, then 64 pixel values in 0..=16 and a
/// label in 0..=9 per row. Pixels are scaled to [0, 1] (divided by 16).
pub fn load_digits_csv(path: &Path) -> Result<Images, DataError> {
    let hint = "the digits data ships in examples/data/digits.csv.gz";
    let reader = BufReader::new(open(path, hint)?);
    let malformed = |line: usize, message: String| DataError::Malformed { path: path.to_path_buf(), line, message };
    let mut images = Images { pixels: Vec::new(), labels: Vec::new() };
    for (k, line) in reader.lines().enumerate() {
        let n = k + 1;
        let line = line.map_err(|e| malformed(n, format!("unreadable: {e}")))?;
        if k == 0 {
            if !line.starts_with("pixel_0,") || !line.trim_end().ends_with(",label") {
                return Err(malformed(n, "expected the header pixel_0,...,pixel_63,label".into()));
            }
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.trim_end().split(',').collect();
        if fields.len() != 65 {
            return Err(malformed(n, format!("{} columns: expected 65 (64 pixels and a label)", fields.len())));
        }
        let mut pixels = Vec::with_capacity(64);
        for (c, f) in fields[..64].iter().enumerate() {
            match f.trim().parse::<u8>() {
                Ok(v) if v <= 16 => pixels.push(f32::from(v) / 16.0),
                _ => return Err(malformed(n, format!("pixel_{c} = {f:?}: must be an integer in 0..=16"))),
            }
        }
        match fields[64].trim().parse::<u32>() {
            Ok(v) if v <= 9 => images.labels.push(v),
            _ => return Err(malformed(n, format!("label = {:?}: must be an integer in 0..=9", fields[64]))),
        }
        images.pixels.push(pixels);
    }
    if images.labels.is_empty() {
        return Err(malformed(1, "no data rows".into()));
    }
    Ok(images)
}

/// A stratified split: `test_fraction` of each class (rounded) goes to the
/// test set, chosen by a ChaCha20 shuffle from `seed`. Returns (train, test)
/// indices, each sorted.
pub fn stratified_split(labels: &[u32], test_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let classes = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for c in 0..classes {
        let mut members: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] as usize == c).collect();
        members.shuffle(&mut rng);
        let n_test = (members.len() as f64 * test_fraction).round() as usize;
        test.extend_from_slice(&members[..n_test]);
        train.extend_from_slice(&members[n_test..]);
    }
    train.sort_unstable();
    test.sort_unstable();
    (train, test)
}

/// Re-initializes every variable uniformly in `+-1/sqrt(fan_in)` (PyTorch's
/// default for linear layers) from a ChaCha20 stream, in name order: Candle's
/// own initialization cannot be seeded.
pub fn init_seeded(varmap: &VarMap, seed: u64) -> candle_core::Result<()> {
    let data = varmap.data().lock().map_err(|_| candle_core::Error::Msg("variable map lock poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    for name in names {
        let var = &data[name];
        let dims = var.dims();
        // weight [out, in...]: fan_in = product of the rest; bias [out]: use the layer's weight fan-in.
        let fan_in = if dims.len() > 1 {
            dims[1..].iter().product::<usize>()
        } else {
            let weight = name.replace("bias", "weight");
            data.get(&weight).map_or(dims[0], |w| w.dims()[1..].iter().product())
        };
        let bound = 1.0 / (fan_in as f64).sqrt();
        let values: Vec<f32> = (0..var.elem_count()).map(|_| rng.random_range(-bound..bound) as f32).collect();
        var.set(&Tensor::from_vec(values, dims, var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// A number for a message: scientific notation when it is very small or
/// large (`1e-300`, not 300 digits).
pub fn short(v: f64) -> String {
    candle_dp::error_number(v)
}

/// One flag's check: its name as typed, its value, the valid range in words,
/// and whether the value is in it.
pub type FlagCheck<'a> = (&'a str, f64, &'a str, bool);

/// The first flag outside its range, as `--flag = value: must be range`.
pub fn check_flags(checks: &[FlagCheck]) -> Result<(), String> {
    match checks.iter().find(|c| !c.3) {
        Some((flag, value, valid, _)) => Err(format!("{flag} = {}: must be {valid}", short(*value))),
        None => Ok(()),
    }
}

/// Finite and > 0.
pub fn finite_positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

/// Refuses to write a run into `out` if it holds a released model (its
/// `ledger.json` records a release): a released model is never overwritten.
pub fn refuse_released(out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let ledger_path = out.join("ledger.json");
    if ledger_path.exists() {
        let ledger = candle_dp::accountant::Ledger::read(&ledger_path)?;
        if let Some(r) = ledger.releases().last() {
            return Err(format!("{} holds a released model ({}): choose another --out", out.display(), r.file).into());
        }
    }
    Ok(())
}

/// Seconds since the Unix epoch as `YYYYMMDD-HHMMSS` (UTC), for run folders.
pub fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The MNIST CNN of the benchmarks, from DP layers: conv 1->16 k5, max-pool 2,
/// conv 16->32 k5, max-pool 2, linear 512->10 (ReLU between).
pub struct Cnn {
    c1: candle_dp::DpConv,
    c2: candle_dp::DpConv,
    fc: candle_dp::DpLinear,
}

impl Cnn {
    /// Builds it from `vb` (variables `c1.*`, `c2.*`, `fc.*`).
    pub fn new(vb: candle_nn::VarBuilder) -> candle_core::Result<Self> {
        let cfg = Default::default();
        Ok(Self {
            c1: candle_dp::conv2d(1, 16, 5, cfg, vb.pp("c1"))?,
            c2: candle_dp::conv2d(16, 32, 5, cfg, vb.pp("c2"))?,
            fc: candle_dp::linear(512, 10, vb.pp("fc"))?,
        })
    }
}

impl candle_core::Module for Cnn {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let h = self.c1.forward(&x.reshape((b, 1, 28, 28))?)?.relu()?.max_pool2d(2)?;
        let h = self.c2.forward(&h)?.relu()?.max_pool2d(2)?;
        self.fc.forward(&h.flatten_from(1)?)
    }
}

/// The noise generator of a run: from the seed (offset, so that it is not
/// the initialization's stream) or from the OS.
pub fn noise(seed: Option<u64>) -> Result<candle_dp::GaussianNoise, candle_dp::Error> {
    Ok(match seed {
        Some(s) => candle_dp::GaussianNoise::from_seed(s.wrapping_add(0x9e37_79b9)),
        None => candle_dp::GaussianNoise::from_os_entropy()?.with_all_threads(),
    })
}

/// The canaries of an example's `--audit M` (none for 0), their inclusion
/// seeded from `--seed` (offset from the other streams) or from the OS.
pub fn canaries(count: usize, seed: Option<u64>) -> Option<candle_dp::audit::Canaries> {
    (count > 0).then(|| {
        let c = candle_dp::audit::Canaries::new(count);
        match seed {
            Some(s) => c.seeded(s.wrapping_add(0x7f4a_7c15)),
            None => c,
        }
    })
}

/// Adds the audit fields to an example's `summary.json` object, from its
/// released ledger (nulls without an audit).
pub fn add_audit(summary: &mut serde_json::Value, ledger: Option<&candle_dp::accountant::Ledger>) {
    let audit = ledger.and_then(|l| l.audits().last());
    if let Some(map) = summary.as_object_mut() {
        map.insert("audit_canaries".into(), serde_json::json!(audit.map(|a| a.canaries)));
        map.insert("epsilon_audit".into(), serde_json::json!(audit.map(|a| a.epsilon_lower_bound)));
        map.insert("epsilon_audit_fdp".into(), serde_json::json!(audit.map(|a| a.epsilon_lower_bound_fdp)));
    }
}

/// A progress bar over `steps` steps, hidden when stdout is for `--json`.
pub fn progress_bar(steps: u64, hidden: bool) -> Result<indicatif::ProgressBar, Box<dyn std::error::Error>> {
    let bar = indicatif::ProgressBar::new(steps);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps {elapsed_precise}  {msg}")?);
    if hidden {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    Ok(bar)
}

/// Writes `summary.json` into `out` and prints the summary (`--json`: one
/// line, last on stdout) or the report and `done`.
pub fn finish(
    out: &Path,
    summary: &serde_json::Value,
    report: Option<&candle_dp::accountant::PrivacyReport>,
    json: bool,
    done: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(summary)?)?;
    if json {
        println!("{summary}");
        return Ok(());
    }
    if let Some(r) = report {
        println!("{}", r.to_text());
    }
    println!("{done}; run folder {}", out.display());
    Ok(())
}

/// The job this process trains in: with `--distributed`, one rank of the
/// MPI job `mpirun` started (the examples built with `--features mpi`);
/// otherwise, or outside `mpirun`, a world of one.
///
/// # Errors
/// `--distributed` in a build without the `mpi` feature; MPI's errors.
pub fn join_world(
    distributed: bool,
) -> Result<Box<dyn candle_dp::distributed::Collective>, Box<dyn std::error::Error>> {
    if !distributed {
        return Ok(Box::new(candle_dp::distributed::SingleProcess));
    }
    #[cfg(feature = "mpi")]
    {
        Ok(Box::new(candle_dp::distributed::Mpi::init()?))
    }
    #[cfg(not(feature = "mpi"))]
    {
        Err("--distributed runs under MPI: build with `cargo build --release --features mpi --example <name>` \
             (needs an MPI library and libclang; on Debian libopenmpi-dev and libclang-dev), then start it with \
             `mpirun -n <ranks> target/release/examples/<name> --distributed ...`"
            .into())
    }
}

/// What rank 0 decided about the run folder, told to every rank (the
/// others never write): `Ok(true)` to train, `Ok(false)` for nothing to do.
///
/// # Errors
/// Rank 0's error, there; on the other ranks, that rank 0 failed.
pub fn agree_on_folder(
    world: &dyn candle_dp::distributed::Collective,
    decide: impl FnOnce() -> Result<bool, Box<dyn std::error::Error>>,
) -> Result<bool, Box<dyn std::error::Error>> {
    let mut verdict = [0u8];
    let decided = if world.rank() == 0 {
        let d = decide();
        verdict[0] = match &d {
            Ok(true) => 1,
            Ok(false) => 2,
            Err(_) => 0,
        };
        Some(d)
    } else {
        None
    };
    world.broadcast(&mut verdict, 0)?;
    match (decided, verdict[0]) {
        (Some(d), _) => d,
        (None, 1) => Ok(true),
        (None, 2) => Ok(false),
        (None, _) => Err("rank 0 could not prepare the run folder (its error says why)".into()),
    }
}
