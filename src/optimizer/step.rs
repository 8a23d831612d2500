//! The stages of a DP-SGD step, and [`DpOptimizer::train_step`], which runs them all.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use candle_nn::Optimizer;

use super::{DpOptimizer, OpenBatch};
use crate::audit::PlantedBug;
use crate::clip::ClipMode;
use crate::config::Engine;
use crate::error::{Error, Result};
use crate::grad_sample::ghost::ClippedBatch;
use crate::grad_sample::microbatch::clip_microbatch;
use crate::grad_sample::per_example::work_dtype;
use crate::loss::PerSampleLoss;
use crate::noise::GaussianNoise;

/// What one [`DpOptimizer::train_step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSummary {
    /// Examples in the logical batch (Poisson: random, possibly 0).
    pub examples: usize,
    /// Physical chunks it was split into.
    pub chunks: usize,
    /// The sum of the per-example losses over the batch (0 for an empty one).
    ///
    /// Computed from the private examples **without noise**: it is not
    /// covered by the privacy guarantee. Show it to whoever may see the
    /// training data, never release it.
    pub loss_sum: f64,
}

impl<O: Optimizer> DpOptimizer<O> {
    /// One whole logical DP-SGD step: draws the next batch from the sampler,
    /// calls `losses_of` on each physical chunk of its indices (at most
    /// [`crate::DpOptimizerBuilder::max_physical_batch_size`] of them; one
    /// at a time with the microbatch engine) for their per-example losses,
    /// clips and sums, adds the noise once, steps the inner optimizer and
    /// accounts the step. An empty batch calls nothing and still steps.
    ///
    /// Indices are in `0..dataset_size` of the sampler, in increasing order
    /// for Poisson sampling.
    ///
    /// # Errors
    /// [`Error::BudgetExhausted`] before anything is drawn;
    /// [`Error::Shape`] if `losses_of` returns another number of losses than
    /// indices; `losses_of`'s own errors; as [`DpOptimizer::accumulate`] and
    /// [`DpOptimizer::step`]. On any error nothing is changed, the sampler
    /// included: the same batch is drawn again next time, so a failing
    /// example is never skipped silently (a data-dependent skip would change
    /// the sampling the accountant assumes). On a distributed optimizer a
    /// step that fails on one rank fails on every rank (the others return
    /// [`Error::PeerFailed`]), and none waits for another.
    pub fn train_step(&mut self, mut losses_of: impl FnMut(&[usize]) -> Result<PerSampleLoss>) -> Result<StepSummary> {
        let batch = match self.next_batch() {
            Ok(batch) => batch,
            // A batch left open on this rank only: the others are in the
            // step's all-reduce already, so this rank joins it to fail it.
            Err(own) if self.distributed.is_some() => return Err(self.fail_distributed_step(own)),
            Err(own) => return Err(own),
        };
        let local = self.accumulate_batch(&batch, &mut losses_of);
        // A distributed rank steps even when its own part failed: the step's
        // all-reduce tells every rank, and all refuse together.
        let result = if self.distributed.is_some() {
            self.step_distributed(local)
        } else {
            local.and_then(|summary| {
                self.step()?;
                Ok(summary)
            })
        };
        if result.is_err() {
            self.cancel_batch();
        }
        result
    }

    /// Clips and sums every example of `batch`, chunk by chunk.
    pub(super) fn accumulate_batch(
        &mut self,
        batch: &[usize],
        losses_of: &mut impl FnMut(&[usize]) -> Result<PerSampleLoss>,
    ) -> Result<StepSummary> {
        let mut summary = StepSummary { examples: batch.len(), chunks: 0, loss_sum: 0.0 };
        let mut losses_checked = |indices: &[usize]| -> Result<PerSampleLoss> {
            let losses = losses_of(indices)?;
            if losses.len() != indices.len() {
                return Err(Error::Shape {
                    what: "the losses train_step's closure returned",
                    expected: "one per index it was given",
                    got: losses.tensor().dims().to_vec(),
                });
            }
            summary.loss_sum += losses.tensor().to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
            summary.chunks += 1;
            Ok(losses)
        };
        match self.config.engine {
            Engine::Ghost => {
                let chunk = self.config.max_physical_batch_size.unwrap_or(usize::MAX);
                for indices in batch.chunks(chunk) {
                    let losses = losses_checked(indices)?;
                    self.accumulate(&losses)?;
                }
            }
            Engine::Microbatch => self.accumulate_microbatch_with(batch.len(), |k| -> Result<Tensor> {
                Ok(losses_checked(&batch[k..k + 1])?.tensor().sum_all()?)
            })?,
        }
        Ok(summary)
    }

    /// Stage 1: draws the next logical batch from the sampler and opens the
    /// step; returns its example indices (possibly none).
    ///
    /// # Errors
    /// [`Error::BudgetExhausted`] (nothing is drawn); [`Error::OutOfOrder`]
    /// while a batch is open.
    pub fn next_batch(&mut self) -> Result<Vec<usize>> {
        if self.batch.is_some() {
            return Err(Error::OutOfOrder {
                call: "next_batch()",
                state: "while the batch drawn before is open",
                fix: "step() or cancel_batch() closes it",
            });
        }
        self.check_budget()?;
        let sampler_before = self.sampler.clone();
        let drawn = match &self.distributed {
            Some(d) => self.sampler.sample_shard(d.shard()),
            None => self.sampler.sample(),
        };
        let (batch, canaries) = match &self.audit {
            Some(audit) => audit.split(drawn),
            None => (drawn, Vec::new()),
        };
        self.batch = Some(OpenBatch { size: batch.len(), accumulated: 0, sums: None, canaries, sampler_before });
        Ok(batch)
    }

    /// Closes the open batch without a step and puts it back: the sampler is
    /// as it was before [`DpOptimizer::next_batch`], so the next call draws
    /// the same batch. Does nothing without an open batch.
    pub fn cancel_batch(&mut self) {
        if let Some(open) = self.batch.take() {
            self.sampler = open.sampler_before;
        }
    }

    /// Stage 2 (ghost engine): clips and accumulates one physical chunk of
    /// the open batch from its per-example losses (their sum is
    /// back-propagated here).
    ///
    /// Only the backward pass run here counts: gradients that a backward of
    /// your own left in the DP layers are discarded first.
    ///
    /// # Errors
    /// Nothing is accumulated on error: [`Error::OutOfOrder`] without an
    /// open batch; [`Error::BatchMismatch`] for more examples than the batch
    /// drew; [`Error::NonFinite`], [`Error::MissingGradient`],
    /// [`Error::NonDpUse`] (a trained variable also used by a plain Candle
    /// op), [`Error::Shape`] (uses of another batch reached the loss),
    /// [`Error::CaptureMismatch`]; [`Error::WrongEngine`] with the
    /// microbatch engine.
    pub fn accumulate(&mut self, losses: &PerSampleLoss) -> Result<()> {
        let Some(ghost) = &self.ghost else {
            return Err(Error::WrongEngine {
                call: "accumulate",
                needs: Engine::Ghost,
                engine: Engine::Microbatch,
                instead: "use accumulate_microbatch (or train_step, which calls the right one)",
            });
        };
        self.check_room(losses.len())?;
        let clipped = match self.bug {
            Some(PlantedBug::ClippingDisabled) => ghost.clip(losses, &ClipMode::Flat, f64::MAX)?,
            _ => ghost.clip(losses, &self.config.clipping, self.config.max_grad_norm)?,
        };
        self.add(clipped)
    }

    /// Stage 2 (any engine): clips and accumulates `count` examples of the
    /// open batch one at a time; `loss_of(i)` returns the `i`-th one's
    /// scalar loss.
    ///
    /// # Errors
    /// As [`DpOptimizer::accumulate`]; Candle's errors.
    pub fn accumulate_microbatch(
        &mut self,
        count: usize,
        loss_of: impl FnMut(usize) -> candle_core::Result<Tensor>,
    ) -> Result<()> {
        self.accumulate_microbatch_with(count, loss_of)
    }

    fn accumulate_microbatch_with<E: Into<Error>>(
        &mut self,
        count: usize,
        loss_of: impl FnMut(usize) -> std::result::Result<Tensor, E>,
    ) -> Result<()> {
        self.check_room(count)?;
        let clipped = clip_microbatch(&self.vars, count, loss_of, self.clip_threshold())?;
        self.add(clipped)
    }

    /// Refuses a chunk without an open batch, or one beyond its size.
    fn check_room(&self, count: usize) -> Result<()> {
        let open = self.batch.as_ref().ok_or_else(no_open_batch)?;
        if open.accumulated + count > open.size {
            return Err(Error::BatchMismatch { drawn: open.size, accumulated: open.accumulated + count });
        }
        Ok(())
    }

    fn add(&mut self, clipped: ClippedBatch) -> Result<()> {
        let open = self.batch.as_mut().ok_or_else(no_open_batch)?;
        let count = clipped.norms.len();
        let summed = match &open.sums {
            None => clipped.clipped_sums,
            Some(acc) => {
                acc.iter().zip(&clipped.clipped_sums).map(|(a, b)| a + b).collect::<candle_core::Result<_>>()?
            }
        };
        open.sums = Some(summed);
        open.accumulated += count;
        Ok(())
    }

    /// Stage 3: noise, scaling, the inner optimizer's step, accounting; it
    /// closes the batch.
    ///
    /// On a distributed optimizer ([`DpOptimizer::distribute`]) every rank
    /// must call it, even one whose [`DpOptimizer::accumulate`] failed (it
    /// then fails here on every rank, and every rank's batch is put back).
    ///
    /// # Errors
    /// Before anything is touched: [`Error::BudgetExhausted`];
    /// [`Error::OutOfOrder`] without an open batch; [`Error::BatchMismatch`]
    /// unless every example drawn was accumulated; [`Error::InvalidConfig`]
    /// for a noisy gradient that overflows the variables' dtype. If the inner
    /// optimizer itself fails, the step counts as taken (it may have applied
    /// part of the update): it is accounted, its noise is spent, the batch is
    /// closed, and the inner optimizer's error is returned.
    pub fn step(&mut self) -> Result<()> {
        if self.distributed.is_some() {
            let examples = self.batch.as_ref().map_or(0, |b| b.size);
            return self.step_distributed(Ok(StepSummary { examples, chunks: 0, loss_sum: 0.0 })).map(|_| ());
        }
        let sums = self.checked_sums()?;
        self.check_budget()?;
        // Weights set from outside since the last step are the ones the
        // gradients were taken at: the masters take them before the update.
        self.follow_masters()?;
        // Draw all noise before changing anything: a failure leaves the
        // optimizer, the variables and the ledger as they were.
        let mut noise = self.noise.clone();
        let released = self.privatize(&sums, &mut noise)?;
        let canaries = self.privatize_canaries(&mut noise)?;
        self.commit(released, noise, canaries)
    }

    /// The open batch's clipped sums (zeros for an empty batch), once every
    /// example drawn was accumulated.
    pub(super) fn checked_sums(&self) -> Result<Vec<Tensor>> {
        let Some(open) = &self.batch else {
            return Err(Error::OutOfOrder {
                call: "step()",
                state: "without an open batch",
                fix: "next_batch() draws the batch to step on (or use train_step)",
            });
        };
        if open.accumulated != open.size {
            return Err(Error::BatchMismatch { drawn: open.size, accumulated: open.accumulated });
        }
        Ok(match &open.sums {
            Some(s) => s.clone(),
            // In the dtype the engines sum in: f32 for half precision, never
            // rounded to it before the noise.
            None => self
                .vars
                .iter()
                .map(|v| v.zeros_like()?.to_dtype(work_dtype(v.dtype())))
                .collect::<candle_core::Result<Vec<_>>>()?,
        })
    }

    /// The threshold handed to the clipping: `C` (a planted bug may
    /// disable it).
    fn clip_threshold(&self) -> f64 {
        match self.bug {
            Some(PlantedBug::ClippingDisabled) => f64::MAX,
            _ => self.config.max_grad_norm,
        }
    }

    /// The noise's standard deviation on the sum, `sigma C` (unless a bug
    /// is planted), and the scale `1 / B` of the mean.
    pub(super) fn noise_and_scale(&self) -> (f64, f64) {
        let std = self.config.noise_multiplier * self.config.max_grad_norm;
        let scale = 1.0 / self.config.sampler.expected_batch_size();
        let std = match self.bug {
            Some(PlantedBug::NoiseTenTimesSmaller) => std / 10.0,
            Some(PlantedBug::NoiseOfTheMean) => std * scale,
            _ => std,
        };
        (std, scale)
    }

    /// The noisy mean of each variable's sum, a key of `noise` each, in the
    /// variables' order.
    pub(super) fn privatize(&self, sums: &[Tensor], noise: &mut GaussianNoise) -> Result<Vec<Tensor>> {
        let (std, scale) = self.noise_and_scale();
        self.stepped_vars().iter().zip(sums).map(|(var, sum)| noisy_mean(sum, noise, std, scale, var.dtype())).collect()
    }

    /// The variables the inner optimizer steps: the `f32` masters of
    /// half-precision variables, the variables themselves otherwise.
    pub(super) fn stepped_vars(&self) -> &[candle_core::Var] {
        self.masters.as_ref().map_or(&self.vars, |m| m.vars())
    }

    /// The audit block's privatized sum (not divided: the model never reads
    /// it), with the next key of `noise`; `None` without canaries.
    pub(super) fn privatize_canaries(&self, noise: &mut GaussianNoise) -> Result<Option<Vec<f32>>> {
        let (Some(audit), Some(open)) = (&self.audit, &self.batch) else { return Ok(None) };
        let (std, _) = self.noise_and_scale();
        let mut sum = audit.clipped_sum(&open.canaries, self.clip_threshold(), self.config.max_grad_norm);
        noise.add_scaled_to_f32(&mut sum, std, 1.0);
        if !sum.iter().all(|v| v.is_finite()) {
            return Err(overflow(std));
        }
        Ok(Some(sum))
    }

    /// The inner optimizer's step on `released`, then the step is taken:
    /// `noise` becomes the generator, the canaries are scored, the step is
    /// accounted and the batch closed.
    pub(super) fn commit(
        &mut self,
        released: Vec<Tensor>,
        noise: GaussianNoise,
        canaries: Option<Vec<f32>>,
    ) -> Result<()> {
        let mut grads = GradStore::default();
        for (var, g) in self.stepped_vars().iter().zip(released) {
            grads.insert(var.as_tensor(), g);
        }
        let stepped = self.inner.step(&grads).map_err(Error::from);
        // The model's half-precision variables are their masters, rounded
        // once (after a failed inner step too: the model is what was applied).
        let rounded = self.masters.as_ref().map_or(Ok(()), |m| m.round_into(&self.vars));
        let stepped = stepped.and(rounded);
        // Committed even when the inner step failed: it may have applied part
        // of the noisy update, which is then released. It is accounted, and
        // its noise is spent (a retry with the same noise would release the
        // same draw twice).
        self.noise = noise;
        if let (Some(audit), Some(noisy)) = (&mut self.audit, canaries) {
            // Scored against the claimed mechanism, whatever a bug did.
            let q = self.config.sampler.sample_rate().unwrap_or(1.0);
            let c = self.config.max_grad_norm;
            audit.score(&noisy, q, c, self.config.noise_multiplier * c);
        }
        self.pending_steps += 1;
        self.steps += 1;
        self.batch = None;
        stepped
    }
}

/// `t` in `dtype`, refused if a value is not finite there (an `f32` or half
/// precision model with an enormous noise scale).
pub(super) fn finite_as(t: &Tensor, dtype: DType, noise_scale: f64) -> Result<Tensor> {
    let t = t.to_dtype(dtype)?;
    let largest = t.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if largest.is_finite() {
        Ok(t)
    } else {
        Err(overflow(noise_scale))
    }
}

pub(super) fn overflow(noise_scale: f64) -> Error {
    Error::InvalidConfig {
        field: "noise_multiplier * max_grad_norm / expected_batch_size",
        value: noise_scale,
        valid: "small enough that the noisy gradient stays finite in the variables' dtype (the step was not taken)",
    }
}

fn no_open_batch() -> Error {
    Error::OutOfOrder {
        call: "accumulate",
        state: "without an open batch",
        fix: "next_batch() draws the batch to accumulate (or use train_step)",
    }
}

/// `(sum + N(0, std^2)) * scale`, elementwise, computed in `f64` and
/// rounded once to the sum's dtype (`f32` directly; others through `f64`),
/// then converted to `dtype`, the variable's.
///
/// One noise definition on every device: the counter noise of a fresh key
/// from the generator ([`crate::kernels::gaussian`]), made where the sum
/// lives (on a GPU, on the device: no gradient crosses to the host and
/// back). An `f32` sum on the CPU is noised in a host copy, then checked for
/// overflow before it becomes a tensor again.
///
/// # Errors
/// [`Error::InvalidConfig`] for a result that is not finite in `dtype` (an
/// enormous noise scale): never a silent inf.
fn noisy_mean(sum: &Tensor, noise: &mut GaussianNoise, std: f64, scale: f64, dtype: DType) -> Result<Tensor> {
    if sum.device().is_cpu() && sum.dtype() == DType::F32 {
        let mut values = sum.flatten_all()?.to_vec1::<f32>()?;
        noise.add_scaled_to_f32(&mut values, std, scale);
        if !values.iter().all(|v| v.is_finite()) {
            return Err(overflow(std * scale));
        }
        let noisy = Tensor::from_vec(values, sum.shape(), sum.device())?;
        return if dtype == DType::F32 { Ok(noisy) } else { finite_as(&noisy, dtype, std * scale) };
    }
    let noisy = crate::kernels::add_gaussian_noise(sum, &noise.noise_key(), std, scale)?;
    finite_as(&noisy, dtype, std * scale)
}
