//! Data-parallel DP-SGD ([`crate::distributed`]): the agreement of the
//! ranks when a run is distributed, and the step's one all-reduce.

use std::ops::Range;

use candle_core::{DType, Tensor};
use candle_nn::Optimizer;
use sha2::{Digest, Sha256};

use super::step::{finite_as, StepSummary};
use super::DpOptimizer;
use crate::distributed::{shard, Collective};
use crate::error::{ensure, Error, Result};
use crate::kernels::gaussian::{add_noise_at, Backend};
use crate::noise::ChaChaState;
use crate::sampler::Sampler;

/// A distributed optimizer's engine and its part of the work.
#[derive(Debug)]
pub(super) struct Distributed {
    collective: Box<dyn Collective>,
    /// This rank's examples, `[r N / W, (r + 1) N / W)`.
    shard: Range<usize>,
}

impl Distributed {
    /// This rank's part of the dataset.
    pub(super) fn shard(&self) -> Range<usize> {
        self.shard.clone()
    }
}

/// What rank 0 broadcasts when a run is distributed: its sampler key and
/// step, its noise generator's position, and the hash of its settings.
struct Agreement {
    sampler: ([u8; 32], u64),
    noise: ChaChaState,
    fingerprint: [u8; 32],
}

impl Agreement {
    const BYTES: usize = 32 + 8 + 32 + 8 + 16 + 32;

    fn to_bytes(&self) -> [u8; Self::BYTES] {
        let ((key, step), (noise_key, stream, word)) = (self.sampler, self.noise);
        let parts: [&[u8]; 6] =
            [&key, &step.to_le_bytes(), &noise_key, &stream.to_le_bytes(), &word.to_le_bytes(), &self.fingerprint];
        let mut bytes = [0u8; Self::BYTES];
        let mut at = 0;
        for part in parts {
            bytes[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        bytes
    }

    fn from_bytes(bytes: &[u8; Self::BYTES]) -> Self {
        let mut at = 0;
        // The parts in `to_bytes`'s order; their sizes add up to `BYTES`.
        let mut take = |out: &mut [u8]| {
            out.copy_from_slice(&bytes[at..at + out.len()]);
            at += out.len();
        };
        let (mut key, mut step, mut noise_key) = ([0u8; 32], [0u8; 8], [0u8; 32]);
        let (mut stream, mut word, mut fingerprint) = ([0u8; 8], [0u8; 16], [0u8; 32]);
        for part in [&mut key[..], &mut step, &mut noise_key, &mut stream, &mut word, &mut fingerprint] {
            take(part);
        }
        Agreement {
            sampler: (key, u64::from_le_bytes(step)),
            noise: (noise_key, u64::from_le_bytes(stream), u128::from_le_bytes(word)),
            fingerprint,
        }
    }
}

/// Slots after the gradient coordinates in a step's all-reduce: ranks that
/// failed, the sum of the losses, the examples.
const TRAILER: usize = 3;

impl<O: Optimizer> DpOptimizer<O> {
    /// Makes this optimizer rank `collective.rank()` of a data-parallel run
    /// of `collective.world_size()` processes ([`crate::distributed`]).
    /// Every rank calls it with an optimizer built (or resumed) the same
    /// way; from then on, [`DpOptimizer::train_step`] draws this rank's
    /// shard of each global Poisson batch and steps together with the
    /// others, and only rank 0 writes files.
    ///
    /// Rank 0's sampler key and noise generator replace the others' (so
    /// the run's keys are rank 0's: from its operating system unless
    /// seeded), its trained variables' values replace theirs (so the copies
    /// of the model start equal, however each was initialized), and every
    /// rank checks that its settings, variables' shapes and ledger are rank
    /// 0's. Weights the optimizer does not train (a frozen base) must be
    /// equal on every rank already: load them from the same file.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a rank outside `0..world_size`;
    /// [`Error::OutOfOrder`] with a batch open; [`Error::Incompatible`] for
    /// shuffled batches, audit canaries, or an optimizer distributed
    /// already; [`Error::RanksDisagree`] on every rank if one was built
    /// otherwise than rank 0; the engine's errors.
    pub fn distribute(mut self, collective: impl Collective + 'static) -> Result<Self> {
        let (rank, world_size) = (collective.rank(), collective.world_size());
        ensure("world_size", world_size as f64, "an integer >= 1", world_size >= 1)?;
        ensure("rank", rank as f64, "an integer in [0, world_size)", rank < world_size)?;
        // A rank that cannot be distributed still takes part in the agreement
        // (its message is zeros): every rank then fails, none waits forever.
        let local = self.local_agreement(world_size);
        let mut message = local.as_ref().map_or([0u8; Agreement::BYTES], Agreement::to_bytes);
        collective.broadcast(&mut message, 0)?;
        let root = Agreement::from_bytes(&message);
        let this_rank = matches!(&local, Ok(mine) if mine.fingerprint != root.fingerprint);
        let mut flags = [f64::from(u8::from(local.is_err())), f64::from(u8::from(this_rank))];
        collective.all_reduce_sum_f64(&mut flags)?;
        local?;
        if flags[0] > 0.0 {
            return Err(Error::PeerFailed { failed: flags[0] as usize, world_size });
        }
        if flags[1] > 0.0 {
            return Err(Error::RanksDisagree { disagreeing: flags[1] as usize, world_size, this_rank });
        }
        self.adopt_root_weights(&collective)?;
        if let Sampler::Poisson(s) = &mut self.sampler {
            s.adopt(root.sampler.0, root.sampler.1);
        }
        // The seedings are in the fingerprint, hence rank 0's.
        self.noise.adopt(root.noise);
        let shard = shard(self.config.sampler.dataset_size(), rank, world_size);
        self.distributed = Some(Distributed { collective: Box::new(collective), shard });
        Ok(self)
    }

    /// This rank's part of the agreement (its sampler key and step, noise
    /// position and fingerprint), or why it cannot be distributed. Flushes
    /// the steps taken so far: they are one process's.
    fn local_agreement(&mut self, world_size: usize) -> Result<Agreement> {
        if self.batch.is_some() {
            return Err(Error::OutOfOrder {
                call: "distribute",
                state: "while a batch is open",
                fix: "step() or cancel_batch() first",
            });
        }
        let refuse = |with: &'static str, why: &'static str| Error::Incompatible { setting: "distribute", with, why };
        if self.distributed.is_some() {
            return Err(refuse("an optimizer distributed already", "a rank belongs to one run"));
        }
        if self.audit.is_some() {
            return Err(refuse(
                "audit canaries",
                "the canaries' inclusion and scores are not shared between ranks yet: audit a one-process run",
            ));
        }
        let Sampler::Poisson(sampler) = &self.sampler else {
            return Err(refuse(
                "shuffled fixed-size batches",
                "the ranks sample their shards independently, which is Poisson sampling (use a PoissonSampler)",
            ));
        };
        let sampler = sampler.state();
        self.flush_ledger()?;
        Ok(Agreement { sampler, noise: self.noise.state(), fingerprint: self.fingerprint(world_size)? })
    }

    /// Sets the trained variables to rank 0's values, bit for bit (through
    /// `f64`, which holds every value of the narrower float dtypes exactly).
    fn adopt_root_weights(&self, collective: &impl Collective) -> Result<()> {
        let mut bytes = Vec::new();
        self.follow_masters()?;
        // The masters of half-precision variables hold their full values.
        for var in self.stepped_vars() {
            for v in var.as_tensor().flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()? {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
        collective.broadcast(&mut bytes, 0)?;
        let mut words = bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
        for var in self.stepped_vars() {
            let values: Vec<f64> = words.by_ref().take(var.elem_count()).collect();
            let root = Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?;
            var.set(&root)?;
        }
        self.masters.as_ref().map_or(Ok(()), |m| m.round_into(&self.vars))
    }

    /// What the ledger records of this optimizer's steps: the world size and
    /// the noise drawn once per coordinate; `None` unless distributed.
    pub(crate) fn distribution(&self) -> Option<dp_accountant::Distribution> {
        self.distributed.as_ref().map(|d| dp_accountant::Distribution {
            world_size: d.collective.world_size() as u64,
            noise: dp_accountant::DistributedNoise::OncePerCoordinate,
        })
    }

    /// This rank and the number of ranks: `(0, 1)` unless distributed.
    pub fn rank(&self) -> (usize, usize) {
        self.distributed.as_ref().map_or((0, 1), |d| (d.collective.rank(), d.collective.world_size()))
    }

    /// Whether this process writes the run's files: rank 0 of a
    /// distributed run, and any undistributed optimizer.
    pub fn is_root(&self) -> bool {
        self.rank().0 == 0
    }

    /// What must be equal on every rank, hashed: the configuration, the
    /// variables' shapes and dtypes in order, the noise's seeding, the
    /// ledger and the steps, a planted bug, the world size.
    fn fingerprint(&self, world_size: usize) -> Result<[u8; 32]> {
        let mut h = Sha256::new();
        let config = serde_json::to_vec(&self.config)
            .map_err(|e| Error::Collective { engine: "agreement", reason: e.to_string() })?;
        h.update(&config);
        for var in &self.vars {
            h.update(format!("{:?} {:?};", var.dims(), var.dtype()).as_bytes());
        }
        h.update(format!("{:?} {:?} {} {}", self.noise.seeding(), self.bug, self.steps, self.pending_steps).as_bytes());
        // The inner step must be the same too (its settings beyond the
        // learning rate are not visible through `Optimizer`).
        h.update(format!("{} {:e}", std::any::type_name::<O>(), self.inner.learning_rate()).as_bytes());
        h.update(self.ledger.to_json().as_bytes());
        h.update(world_size.to_le_bytes());
        Ok(h.finalize().into())
    }

    /// The distributed stage 3: one all-reduce of every rank's clipped sums
    /// with its slice of the noise, a failure flag and the loss, then the
    /// same step on every rank (or, if any rank failed, none: the batch is
    /// put back everywhere). `local` is this rank's accumulation.
    pub(super) fn step_distributed(&mut self, local: Result<StepSummary>) -> Result<StepSummary> {
        let (rank, world_size) = self.rank();
        let lens: Vec<usize> = self.vars.iter().map(|v| v.elem_count()).collect();
        let n: usize = lens.iter().sum();
        let mut buf = vec![0.0f64; n + TRAILER];
        // Every rank draws the same keys, one per variable in order (as a
        // one-process run does), whether or not its own part failed.
        let mut noise = self.noise.clone();
        let keys: Vec<_> = self.vars.iter().map(|_| noise.noise_key()).collect();
        let (std, scale) = self.noise_and_scale();
        let prepared = local.and_then(|summary| {
            let sums = self.checked_sums()?;
            self.check_budget()?;
            self.follow_masters()?;
            let mut at = 0;
            for (sum, len) in sums.iter().zip(&lens) {
                let values = sum.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                buf[at..at + len].copy_from_slice(&values);
                at += len;
            }
            // This rank's slice of the one noise vector over all coordinates.
            let slice = shard(n, rank, world_size);
            let threads = self.noise.threads();
            let mut at = 0;
            for (key, len) in keys.iter().zip(&lens) {
                let (lo, hi) = (slice.start.clamp(at, at + len), slice.end.clamp(at, at + len));
                if lo < hi {
                    add_noise_at(Backend::best(), key, (lo - at) as u64, &mut buf[lo..hi], std, 1.0, threads);
                }
                at += len;
            }
            Ok(summary)
        });
        let summary = match &prepared {
            Ok(s) => *s,
            Err(_) => {
                buf[..n].fill(0.0);
                buf[n] = 1.0;
                StepSummary { examples: 0, chunks: 0, loss_sum: 0.0 }
            }
        };
        buf[n + 1] = summary.loss_sum;
        buf[n + 2] = summary.examples as f64;
        let reduced = self.engine()?.all_reduce_sum_f64(&mut buf);
        let failed = buf[n];
        if reduced.is_err() || failed > 0.0 {
            self.cancel_batch();
            return Err(match (prepared, reduced) {
                (Err(own), _) => own,
                (_, Err(engine)) => engine,
                _ => Error::PeerFailed { failed: failed as usize, world_size },
            });
        }
        // Every rank has the same bits, so every rank refuses alike.
        let released = match self.noisy_means(&buf[..n], &lens, std, scale) {
            Ok(released) => released,
            Err(e) => {
                self.cancel_batch();
                return Err(e);
            }
        };
        self.commit(released, noise, None)?;
        Ok(StepSummary { examples: buf[n + 2] as usize, chunks: summary.chunks, loss_sum: buf[n + 1] })
    }
}

impl<O: Optimizer> DpOptimizer<O> {
    /// Takes part in the step's all-reduce as a rank that failed before it
    /// drew a batch (`own` says why), so that every rank fails the step and
    /// none waits; this rank's state is left as it is. Returns `own`.
    pub(super) fn fail_distributed_step(&mut self, own: Error) -> Error {
        let n: usize = self.vars.iter().map(|v| v.elem_count()).sum();
        let mut buf = vec![0.0f64; n + TRAILER];
        buf[n] = 1.0;
        if let Ok(engine) = self.engine() {
            // This rank fails with its own error whatever the engine says.
            let _ = engine.all_reduce_sum_f64(&mut buf);
        }
        own
    }

    /// The released means of the reduced noisy sums `reduced` (the
    /// variables' coordinates in order, `lens` each): times `scale`, in
    /// `f64`, then rounded once to each stepped variable's dtype.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a value not finite there (NaN included).
    fn noisy_means(&self, reduced: &[f64], lens: &[usize], std: f64, scale: f64) -> Result<Vec<Tensor>> {
        let mut at = 0;
        let mut released = Vec::with_capacity(lens.len());
        for (var, len) in self.stepped_vars().iter().zip(lens) {
            let values: Vec<f64> = reduced[at..at + len].iter().map(|v| v * scale).collect();
            if !values.iter().all(|v| v.is_finite()) {
                return Err(super::step::overflow(std * scale));
            }
            let mean = Tensor::from_vec(values, var.shape(), var.device())?;
            released.push(finite_as(&mean, var.dtype(), std * scale)?);
            at += len;
        }
        Ok(released)
    }
}

impl<O: Optimizer> DpOptimizer<O> {
    /// Runs `write` on rank 0 only (a distributed run's files are rank
    /// 0's), and tells every rank how it went: the other ranks then run
    /// `follow` on the 64 bytes rank 0's `write` returned beside its value,
    /// and fail with [`Error::PeerFailed`] if it failed. Undistributed: `write`.
    pub(crate) fn on_root<T>(
        &mut self,
        write: impl FnOnce(&mut Self) -> Result<(T, [u8; 64])>,
        follow: impl FnOnce(&mut Self, [u8; 64]) -> Result<T>,
    ) -> Result<T> {
        if self.distributed.is_none() {
            return write(self).map(|(value, _)| value);
        }
        let mut outcome = [0u8; 65];
        let written = if self.is_root() {
            let written = write(self);
            if let Ok((_, answer)) = &written {
                outcome[0] = 1;
                outcome[1..].copy_from_slice(answer);
            }
            Some(written)
        } else {
            None
        };
        self.engine()?.broadcast(&mut outcome, 0)?;
        match written {
            Some(written) => written.map(|(value, _)| value),
            None if outcome[0] == 1 => follow(self, outcome[1..].try_into().unwrap_or([0; 64])),
            None => Err(Error::PeerFailed { failed: 1, world_size: self.rank().1 }),
        }
    }

    /// The engine of a distributed optimizer.
    fn engine(&self) -> Result<&dyn Collective> {
        self.collective().ok_or_else(not_distributed)
    }

    /// The engine this optimizer was distributed over, for collectives of
    /// your own (an evaluation's sums, a barrier); `None` unless
    /// distributed. Make the same calls in the same order on every rank,
    /// between steps.
    pub fn collective(&self) -> Option<&dyn Collective> {
        self.distributed.as_ref().map(|d| d.collective.as_ref())
    }
}

fn not_distributed() -> Error {
    Error::OutOfOrder { call: "step_distributed", state: "on an optimizer not distributed", fix: "distribute() first" }
}

#[cfg(test)]
mod tests {
    use super::Agreement;

    /// Every field comes back from the bytes rank 0 broadcasts, each from
    /// its own place (distinct values in every byte of every field).
    #[test]
    fn an_agreement_survives_its_bytes() {
        let bytes = |from: u8| std::array::from_fn::<u8, 32, _>(|i| from + i as u8);
        let sent = Agreement {
            sampler: (bytes(1), 0x0102_0304_0506_0708),
            noise: (bytes(40), 0x1112_1314_1516_1718, 0x2122_2324_2526_2728_292a_2b2c_2d2e_2f30),
            fingerprint: bytes(100),
        };
        let got = Agreement::from_bytes(&sent.to_bytes());
        assert_eq!((got.sampler, got.noise, got.fingerprint), (sent.sampler, sent.noise, sent.fingerprint));
    }
}
