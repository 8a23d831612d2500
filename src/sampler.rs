//! How examples are drawn into batches, and how that is described to the
//! accountant.

use dp_accountant::{DpEvent, SamplerKind, Seeding};
use rand::{seq::SliceRandom, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::error::{ensure, Result};
use crate::noise::{chacha_at, chacha_position, os_rng, ChaChaState};

/// What a sampler does, as the optimizer accounts it and records it in the
/// ledger: the accounting always matches the sampling actually used.
///
/// The fields are private and every constructor validates them, so a
/// description that would divide by zero or state a privacy guarantee for
/// sampling that never happened (a rate of 0, an empty dataset) cannot be
/// built. The samplers' `description()` is the normal way to get one.
///
/// It serializes (as part of [`crate::DpConfig`]); a deserialized one is
/// validated again wherever it is used.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerDescription {
    scheme: Scheme,
    dataset_size: usize,
    seeding: Seeding,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Scheme {
    /// Each example independently with probability `sample_rate`.
    Poisson { sample_rate: f64 },
    /// A shuffle per epoch cut into batches of exactly `batch_size`.
    ShuffledFixedSize { batch_size: usize },
}

/// The valid range of a Poisson sample rate. Subnormal rates are refused:
/// the optimizer divides by `q N`, which must stay finite.
const SAMPLE_RATE_RANGE: &str = "in (0, 1], and at least 2.2250738585072014e-308 (a normal float)";

impl SamplerDescription {
    /// Poisson sampling of `dataset_size` examples at rate `sample_rate`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) unless `dataset_size >= 1` and `sample_rate`
    /// is in `(0, 1]` (and not subnormal).
    pub fn poisson(dataset_size: usize, sample_rate: f64, seeding: Seeding) -> Result<Self> {
        check_dataset_size(dataset_size)?;
        ensure("sample_rate", sample_rate, SAMPLE_RATE_RANGE, (f64::MIN_POSITIVE..=1.0).contains(&sample_rate))?;
        Ok(Self { scheme: Scheme::Poisson { sample_rate }, dataset_size, seeding })
    }

    /// Shuffled fixed-size batches of `batch_size` out of `dataset_size`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) unless `1 <= batch_size <= dataset_size`.
    pub fn shuffled_fixed_size(dataset_size: usize, batch_size: usize, seeding: Seeding) -> Result<Self> {
        check_dataset_size(dataset_size)?;
        ensure(
            "batch_size",
            batch_size as f64,
            "an integer in [1, dataset_size]",
            batch_size >= 1 && batch_size <= dataset_size,
        )?;
        Ok(Self { scheme: Scheme::ShuffledFixedSize { batch_size }, dataset_size, seeding })
    }

    /// Checks the description again (the optimizer does, so that no code
    /// path, a deserialized configuration included, can train on one its
    /// constructors would refuse).
    ///
    /// # Errors
    /// As the constructors.
    pub fn validate(&self) -> Result<()> {
        match self.scheme {
            Scheme::Poisson { sample_rate } => Self::poisson(self.dataset_size, sample_rate, self.seeding),
            Scheme::ShuffledFixedSize { batch_size } => {
                Self::shuffled_fixed_size(self.dataset_size, batch_size, self.seeding)
            }
        }
        .map(|_| ())
    }

    /// The batch size DP-SGD divides the noisy sum by: `q N` for Poisson
    /// (the expected size, never the realized one), the batch size otherwise.
    /// Always finite and > 0.
    pub fn expected_batch_size(&self) -> f64 {
        match self.scheme {
            Scheme::Poisson { sample_rate } => sample_rate * self.dataset_size as f64,
            Scheme::ShuffledFixedSize { batch_size } => batch_size as f64,
        }
    }

    /// The Poisson inclusion probability `q`; `None` for fixed-size batches.
    pub fn sample_rate(&self) -> Option<f64> {
        match self.scheme {
            Scheme::Poisson { sample_rate } => Some(sample_rate),
            Scheme::ShuffledFixedSize { .. } => None,
        }
    }

    /// The fixed batch size; `None` for Poisson sampling.
    pub fn batch_size(&self) -> Option<usize> {
        match self.scheme {
            Scheme::Poisson { .. } => None,
            Scheme::ShuffledFixedSize { batch_size } => Some(batch_size),
        }
    }

    /// The ledger's sampler kind.
    pub fn kind(&self) -> SamplerKind {
        match self.scheme {
            Scheme::Poisson { .. } => SamplerKind::Poisson,
            Scheme::ShuffledFixedSize { .. } => SamplerKind::ShuffledFixedSize,
        }
    }

    /// The adjacency its accounting is valid under.
    pub fn adjacency(&self) -> dp_accountant::Adjacency {
        match self.scheme {
            Scheme::Poisson { .. } => dp_accountant::Adjacency::AddOrRemoveOne,
            Scheme::ShuffledFixedSize { .. } => dp_accountant::Adjacency::ReplaceOne,
        }
    }

    /// The number of examples.
    pub fn dataset_size(&self) -> usize {
        self.dataset_size
    }

    /// How the sampler's generator was seeded.
    pub fn seeding(&self) -> Seeding {
        self.seeding
    }

    /// The event of `steps` DP-SGD steps with this sampler and noise multiplier.
    pub fn event(&self, noise_multiplier: f64, steps: u64) -> DpEvent {
        match self.scheme {
            Scheme::Poisson { sample_rate } => {
                DpEvent::self_composed(DpEvent::poisson_sampled_gaussian(sample_rate, noise_multiplier), steps)
            }
            Scheme::ShuffledFixedSize { batch_size } => {
                DpEvent::shuffled_fixed_size_batches(noise_multiplier, (self.dataset_size / batch_size) as u64, steps)
            }
        }
    }
}

fn check_dataset_size(dataset_size: usize) -> Result<f64> {
    ensure("dataset_size", dataset_size as f64, "an integer >= 1", dataset_size >= 1)
}

/// Poisson sampling: each example joins a batch independently with
/// probability `q`, so batches vary in size and may be empty. This is the
/// sampling the privacy amplification of DP-SGD's accounting assumes.
///
/// # Counter-based
/// Whether example `i` is in the batch of step `t` is a function of the
/// sampler's 256-bit key, `t` and `i` alone: the 64-bit word pair `i mod 8`
/// of the ChaCha20 block with counter `i / 8` and nonce `t`. So a batch does
/// not depend on the dataset's size (slots appended after it, such as an
/// audit's canaries, leave the examples' batches as they were), on the order
/// in which examples are visited, or on how the dataset is split between
/// workers; and a checkpoint is the key and the step.
///
/// # Precision
/// An example is included when a 53-bit uniform is below `q`: the inclusion
/// probability is `q` rounded down to a multiple of `2^-53`.
///
/// # Security
/// The key comes from the operating system unless a seed is given (which
/// makes the batches reproducible, and is recorded by the seeding).
#[derive(Clone)]
pub struct PoissonSampler {
    dataset_size: usize,
    sample_rate: f64,
    key: [u8; 32],
    step: u64,
    seeding: Seeding,
}

impl std::fmt::Debug for PoissonSampler {
    /// Everything but the key (which would reveal every batch).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoissonSampler")
            .field("dataset_size", &self.dataset_size)
            .field("sample_rate", &self.sample_rate)
            .field("step", &self.step)
            .field("seeding", &self.seeding)
            .finish_non_exhaustive()
    }
}

impl PoissonSampler {
    /// A sampler over `dataset_size` examples with inclusion probability `sample_rate`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) unless `dataset_size >= 1` and
    /// `sample_rate` is in `(0, 1]`; [`Error::Entropy`](crate::Error::Entropy) if the OS has none.
    pub fn new(dataset_size: usize, sample_rate: f64) -> Result<Self> {
        let mut key = [0u8; 32];
        os_rng()?.fill_bytes(&mut key);
        Self::build(dataset_size, sample_rate, key, 0, Seeding::OsEntropy)
    }

    /// A reproducible sampler (its key made by ChaCha20 from `seed`).
    ///
    /// # Errors
    /// As [`PoissonSampler::new`].
    pub fn seeded(dataset_size: usize, sample_rate: f64, seed: u64) -> Result<Self> {
        let mut key = [0u8; 32];
        ChaCha20Rng::seed_from_u64(seed).fill_bytes(&mut key);
        Self::build(dataset_size, sample_rate, key, 0, Seeding::Fixed)
    }

    /// A sampler whose expected batch size is `expected_batch_size`
    /// (`q = expected_batch_size / dataset_size`).
    ///
    /// # Errors
    /// As [`PoissonSampler::new`], and unless `1 <= expected_batch_size <= dataset_size`.
    pub fn with_expected_batch_size(
        dataset_size: usize,
        expected_batch_size: usize,
        seed: Option<u64>,
    ) -> Result<Self> {
        let b = expected_batch_size as f64;
        ensure(
            "expected_batch_size",
            b,
            "an integer in [1, dataset_size]",
            b >= 1.0 && expected_batch_size <= dataset_size,
        )?;
        let q = b / dataset_size as f64;
        match seed {
            Some(s) => Self::seeded(dataset_size, q, s),
            None => Self::new(dataset_size, q),
        }
    }

    fn build(dataset_size: usize, sample_rate: f64, key: [u8; 32], step: u64, seeding: Seeding) -> Result<Self> {
        SamplerDescription::poisson(dataset_size, sample_rate, seeding)?;
        Ok(Self { dataset_size, sample_rate, key, step, seeding })
    }

    /// The indices of the next batch, in increasing order (possibly none).
    pub fn sample(&mut self) -> Vec<usize> {
        let batch = self.batch_at(self.step, 0..self.dataset_size);
        self.step += 1;
        batch
    }

    /// The examples of `range` in the next batch (a distributed rank's
    /// shard of it).
    pub(crate) fn sample_range(&mut self, range: std::ops::Range<usize>) -> Vec<usize> {
        let batch = self.batch_at(self.step, range);
        self.step += 1;
        batch
    }

    /// Takes another sampler's key and step (a distributed run's rank 0's).
    pub(crate) fn adopt(&mut self, key: [u8; 32], step: u64) {
        self.key = key;
        self.step = step;
    }

    /// The examples of `range` in the batch of step `step`, in increasing
    /// order: the same whatever else is drawn, and in whatever order.
    pub(crate) fn batch_at(&self, step: u64, range: std::ops::Range<usize>) -> Vec<usize> {
        // Included when a 53-bit integer is below floor(q 2^53): the
        // inclusion probability is q rounded down, never above the q the
        // accountant uses (the product is exact; the cast truncates).
        let threshold = (self.sample_rate * (1u64 << 53) as f64) as u64;
        // rand_chacha's stream `t` at word 16 c is block (counter c, nonce t)
        // of `kernels::chacha20` (tested there), and it reads a word pair as
        // one little-endian u64: the definition above, at SIMD speed.
        let mut rng = ChaCha20Rng::from_seed(self.key);
        rng.set_stream(step);
        rng.set_word_pos(16 * (range.start / 8) as u128);
        for _ in 0..range.start % 8 {
            rng.next_u64();
        }
        range.filter(|_| (rng.next_u64() >> 11) < threshold).collect()
    }

    /// Where the sampler is, for checkpoints: its key and the next step.
    /// Only a fixed-seed sampler's is saved; an OS-seeded sampler gets a
    /// fresh key when resumed.
    pub(crate) fn state(&self) -> ([u8; 32], u64) {
        (self.key, self.step)
    }

    /// A sampler restored at `state` (see [`PoissonSampler::state`]).
    ///
    /// # Errors
    /// As [`PoissonSampler::new`].
    pub(crate) fn restore(dataset_size: usize, sample_rate: f64, state: ([u8; 32], u64)) -> Result<Self> {
        Self::build(dataset_size, sample_rate, state.0, state.1, Seeding::Fixed)
    }

    /// What this sampler does, for the optimizer and the ledger.
    pub fn description(&self) -> SamplerDescription {
        SamplerDescription {
            scheme: Scheme::Poisson { sample_rate: self.sample_rate },
            dataset_size: self.dataset_size,
            seeding: self.seeding,
        }
    }

    /// How the sampler was seeded.
    pub fn seeding(&self) -> Seeding {
        self.seeding
    }

    /// Steps per epoch in expectation: `ceil(1 / q)`.
    pub fn steps_per_epoch(&self) -> u64 {
        (1.0 / self.sample_rate).ceil() as u64
    }
}

/// Shuffled fixed-size batches: a fresh permutation per epoch, cut into
/// batches of exactly `batch_size` (a last partial batch is dropped). Its
/// steps are accounted without amplification by sampling, under replace-one
/// adjacency, and recorded as exactly that.
#[derive(Debug, Clone)]
pub struct ShuffledSampler {
    order: Vec<usize>,
    batch_size: usize,
    position: usize,
    // Boxed: the generator is most of its size, and `Sampler` holds either kind.
    rng: Box<ChaCha20Rng>,
    seeding: Seeding,
}

impl ShuffledSampler {
    /// A sampler over `dataset_size` examples in batches of `batch_size`;
    /// seeded from `seed`, or from the OS when `None`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) unless `1 <= batch_size <= dataset_size`.
    pub fn new(dataset_size: usize, batch_size: usize, seed: Option<u64>) -> Result<Self> {
        match seed {
            Some(s) => Self::with_rng(dataset_size, batch_size, ChaCha20Rng::seed_from_u64(s), Seeding::Fixed),
            None => Self::with_rng(dataset_size, batch_size, os_rng()?, Seeding::OsEntropy),
        }
    }

    /// A sampler that starts a new epoch with the generator `rng`.
    fn with_rng(dataset_size: usize, batch_size: usize, rng: ChaCha20Rng, seeding: Seeding) -> Result<Self> {
        // Validated as the description it will report (seeding does not matter).
        SamplerDescription::shuffled_fixed_size(dataset_size, batch_size, Seeding::Fixed)?;
        // position = N forces a shuffle on the first batch.
        Ok(Self { order: (0..dataset_size).collect(), batch_size, position: dataset_size, rng: Box::new(rng), seeding })
    }

    /// The indices of the next batch (always `batch_size` of them).
    pub fn sample(&mut self) -> Vec<usize> {
        if self.position + self.batch_size > self.order.len() {
            // Each epoch permutes 0..N afresh, so the permutation depends on
            // the generator's state alone (a resume at an epoch's end draws
            // the same one).
            for (k, i) in self.order.iter_mut().enumerate() {
                *i = k;
            }
            self.order.shuffle(&mut *self.rng);
            self.position = 0;
        }
        let batch = self.order[self.position..self.position + self.batch_size].to_vec();
        self.position += self.batch_size;
        batch
    }

    /// What this sampler does, for the optimizer and the ledger.
    pub fn description(&self) -> SamplerDescription {
        SamplerDescription {
            scheme: Scheme::ShuffledFixedSize { batch_size: self.batch_size },
            dataset_size: self.order.len(),
            seeding: self.seeding,
        }
    }
}

/// The sampler a [`crate::DpOptimizer`] owns and draws every batch from:
/// since the optimizer accounts [`Sampler::description`] of the sampler it
/// holds, the sampling accounted is the sampling used.
#[derive(Debug, Clone)]
pub enum Sampler {
    /// Poisson sampling (amplification by sampling, add-or-remove adjacency).
    Poisson(PoissonSampler),
    /// Shuffled fixed-size batches (no amplification, replace-one adjacency).
    Shuffled(ShuffledSampler),
}

impl Sampler {
    /// The indices of the next logical batch, in `0..dataset_size`.
    pub fn sample(&mut self) -> Vec<usize> {
        match self {
            Sampler::Poisson(s) => s.sample(),
            Sampler::Shuffled(s) => s.sample(),
        }
    }

    /// The examples of `range` in the next logical batch: a distributed
    /// rank's shard of it (for shuffled batches, which the optimizer does
    /// not distribute, the batch's members in `range`).
    pub(crate) fn sample_shard(&mut self, range: std::ops::Range<usize>) -> Vec<usize> {
        match self {
            Sampler::Poisson(s) => s.sample_range(range),
            Sampler::Shuffled(s) => s.sample().into_iter().filter(|i| range.contains(i)).collect(),
        }
    }

    /// What this sampler does, for the optimizer and the ledger.
    pub fn description(&self) -> SamplerDescription {
        match self {
            Sampler::Poisson(s) => s.description(),
            Sampler::Shuffled(s) => s.description(),
        }
    }

    /// The same sampler over `extra` more slots appended after the dataset
    /// (indices `N..N + extra`), drawn like every example: the canaries of
    /// an audit ([`crate::audit::Canaries`]). Poisson sampling only.
    ///
    /// # Errors
    /// [`Error::Incompatible`](crate::Error::Incompatible) for shuffled
    /// batches; [`Error::InvalidConfig`](crate::Error::InvalidConfig) if the
    /// count overflows.
    pub(crate) fn with_appended_slots(self, extra: usize) -> Result<Sampler> {
        match self {
            Sampler::Poisson(mut s) => {
                let size = s.dataset_size.checked_add(extra).ok_or(crate::Error::InvalidConfig {
                    field: "audit canaries",
                    value: extra as f64,
                    valid: "few enough that dataset_size + canaries fits in usize",
                })?;
                SamplerDescription::poisson(size, s.sample_rate, s.seeding)?;
                s.dataset_size = size;
                Ok(Sampler::Poisson(s))
            }
            Sampler::Shuffled(_) => Err(crate::Error::Incompatible {
                setting: "a canary audit",
                with: "shuffled fixed-size batches",
                why: "the one-run audit's canaries are Poisson-sampled like every example, so that each canary's \
                      inclusion is independent of the others' (use a PoissonSampler)",
            }),
        }
    }

    /// Steps in one pass over the data: `ceil(1 / q)` in expectation for
    /// Poisson sampling, `floor(N / b)` for shuffled batches.
    pub fn steps_per_epoch(&self) -> u64 {
        match self {
            Sampler::Poisson(s) => s.steps_per_epoch(),
            Sampler::Shuffled(s) => (s.order.len() / s.batch_size) as u64,
        }
    }
}

impl From<PoissonSampler> for Sampler {
    fn from(s: PoissonSampler) -> Self {
        Sampler::Poisson(s)
    }
}

impl From<ShuffledSampler> for Sampler {
    fn from(s: ShuffledSampler) -> Self {
        Sampler::Shuffled(s)
    }
}

impl ShuffledSampler {
    /// Batches of the current epoch already drawn (0 at an epoch boundary,
    /// where the next batch starts a new permutation).
    pub fn batches_into_epoch(&self) -> usize {
        if self.position + self.batch_size > self.order.len() {
            0
        } else {
            self.position / self.batch_size
        }
    }

    /// The generator's position (see [`PoissonSampler::state`]).
    pub(crate) fn state(&self) -> ChaChaState {
        chacha_position(&self.rng)
    }

    /// A sampler over `dataset_size` examples that starts a new epoch, its
    /// generator at `state` (a fixed-seed run) or seeded afresh from the OS.
    ///
    /// A resumed run starts a new permutation rather than finishing the
    /// saved one: the ledger entry before the checkpoint counts its partial
    /// epoch as a whole one, and the entry after it starts a fresh count,
    /// so nothing stored in the checkpoint (which can be rewritten) decides
    /// how often an example is used. A checkpoint at an epoch's end resumes
    /// exactly.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) unless `1 <= batch_size <= dataset_size`;
    /// [`Error::Entropy`](crate::Error::Entropy).
    pub(crate) fn restore(dataset_size: usize, batch_size: usize, state: Option<ChaChaState>) -> Result<Self> {
        match state {
            Some(state) => Self::with_rng(dataset_size, batch_size, chacha_at(state), Seeding::Fixed),
            None => Self::new(dataset_size, batch_size, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::chacha20;

    /// Over 200 batches of N = 1000 at q = 0.05, the inclusion count is
    /// Binomial(200 000, 0.05): mean 10 000, standard deviation 97.5; 5 sd
    /// is 487.
    #[test]
    fn poisson_inclusion_rate_is_q() {
        let mut s = PoissonSampler::seeded(1000, 0.05, 3).unwrap();
        let total: usize = (0..200).map(|_| s.sample().len()).sum();
        assert!((total as f64 - 10_000.0).abs() < 487.0, "{total}");
        // Every example is included at the same rate (no index bias): over
        // 2000 batches each is drawn Binomial(2000, 0.05) times, sd 9.7.
        let mut counts = vec![0usize; 1000];
        for _ in 0..2000 {
            for i in s.sample() {
                counts[i] += 1;
            }
        }
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*lo > 100 - 50 && *hi < 100 + 50, "{lo}..{hi}");
    }

    /// Example `i`'s inclusion at step `t` is ChaCha20 word pair `i mod 8`
    /// of block `i / 8` under nonce `t` (written out here from the block
    /// function), whatever the dataset size, the range asked or the steps
    /// drawn before.
    #[test]
    fn poisson_inclusion_is_a_function_of_key_step_and_index() {
        let (q, seed) = (0.3, 9);
        let mut big = PoissonSampler::seeded(1000, q, seed).unwrap();
        let mut small = PoissonSampler::seeded(37, q, seed).unwrap();
        let key = chacha20::key_words(&big.state().0);
        let threshold = (q * (1u64 << 53) as f64) as u64;
        for t in 0..20u64 {
            let want: Vec<usize> = (0..1000)
                .filter(|&i| {
                    let w = chacha20::block(&key, (i / 8) as u64, t);
                    let u = u64::from(w[2 * (i % 8)]) | (u64::from(w[2 * (i % 8) + 1]) << 32);
                    (u >> 11) < threshold
                })
                .collect();
            // Any slice of the examples, e.g. one worker's shard, draws its part.
            let shard = big.batch_at(t, 123..777);
            assert_eq!(shard, want.iter().copied().filter(|i| (123..777).contains(i)).collect::<Vec<_>>());
            assert_eq!(big.sample(), want, "step {t}");
            assert_eq!(small.sample(), want.iter().copied().filter(|&i| i < 37).collect::<Vec<_>>());
        }
        // A restored sampler continues at its step.
        let mut resumed = PoissonSampler::restore(1000, q, big.state()).unwrap();
        assert_eq!(resumed.sample(), big.sample());
        // Another seed, other batches; and the key is not in Debug.
        let other = PoissonSampler::seeded(1000, q, seed + 1).unwrap();
        assert_ne!(other.batch_at(0, 0..1000), PoissonSampler::seeded(1000, q, seed).unwrap().batch_at(0, 0..1000));
        assert!(!format!("{big:?}").contains(&format!("{:?}", big.state().0)));
    }

    #[test]
    fn poisson_batches_can_be_empty() {
        let mut s = PoissonSampler::seeded(10, 0.01, 1).unwrap();
        assert!((0..100).any(|_| s.sample().is_empty()));
        assert_eq!(s.description().expected_batch_size(), 0.1);
    }

    #[test]
    fn shuffled_batches_cover_each_example_once_per_epoch() {
        let mut s = ShuffledSampler::new(10, 3, Some(5)).unwrap();
        let mut seen: Vec<usize> = (0..3).flat_map(|_| s.sample()).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 9, "3 full batches of an epoch are disjoint");
        assert_eq!(s.sample().len(), 3);
    }

    #[test]
    fn bad_sampler_config_names_the_field() {
        assert_eq!(
            PoissonSampler::seeded(10, 0.0, 1).unwrap_err().to_string(),
            format!("sample_rate = 0: must be {SAMPLE_RATE_RANGE}")
        );
        assert!(PoissonSampler::seeded(10, f64::NAN, 1).is_err());
        assert!(PoissonSampler::seeded(0, 0.5, 1).is_err());
        assert!(ShuffledSampler::new(10, 11, Some(1)).is_err());
        assert!(PoissonSampler::with_expected_batch_size(10, 0, Some(1)).is_err());
    }
}
