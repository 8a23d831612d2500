//! [`DpOptimizer::replay_step`]: a training step checked against its
//! neighbouring dataset (see [`crate::audit::replay_check`]).

use candle_nn::Optimizer;

use super::DpOptimizer;
use crate::audit::{compare, Releases, ReplayStep};
use crate::clip::ClipMode;
use crate::error::{ensure, Result};
use crate::loss::PerSampleLoss;
use crate::noise::GaussianNoise;

impl<O: Optimizer> DpOptimizer<O> {
    /// One [`DpOptimizer::train_step`], checked: from the same model state,
    /// the batch drawn is clipped and summed twice, with and without
    /// example `removed`; both sums are privatized with the same noise
    /// keys, and the sum with it once more with an independent key. The
    /// release on the whole batch is the step taken (and accounted); the
    /// other two are compared with it and dropped. See
    /// [`crate::audit::replay_check`], which runs these, for what is checked
    /// and why the result must not be released.
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] unless `removed` is an example index
    /// in `0..dataset_size` (canaries excluded); [`crate::Error::Entropy`]
    /// for the independent key; as [`DpOptimizer::train_step`], which it is
    /// (nothing changes on error).
    pub fn replay_step(
        &mut self,
        removed: usize,
        mut losses_of: impl FnMut(&[usize]) -> Result<PerSampleLoss>,
    ) -> Result<ReplayStep> {
        if self.distributed.is_some() {
            return Err(crate::Error::Incompatible {
                setting: "replay_step",
                with: "a distributed optimizer",
                why: "the replay compares two clipped sums of one batch, which one process must hold: replay a \
                      one-process run",
            });
        }
        let examples = self.config.sampler.dataset_size() - self.audit.as_ref().map_or(0, |a| a.count());
        ensure(
            "removed",
            removed as f64,
            "an example index in [0, dataset_size) (canaries excluded)",
            removed < examples,
        )?;
        let batch = self.next_batch()?;
        let result = self.replay_open_batch(&batch, removed, &mut losses_of);
        if result.is_err() {
            self.cancel_batch();
        }
        result
    }

    fn replay_open_batch(
        &mut self,
        batch: &[usize],
        removed: usize,
        losses_of: &mut impl FnMut(&[usize]) -> Result<PerSampleLoss>,
    ) -> Result<ReplayStep> {
        // D minus one first, then D: the open batch ends as D's.
        let neighbour: Vec<usize> = batch.iter().copied().filter(|&i| i != removed).collect();
        self.reopen(neighbour.len());
        self.accumulate_batch(&neighbour, losses_of)?;
        let neighbour_sums = self.checked_sums()?;
        self.reopen(batch.len());
        self.accumulate_batch(batch, losses_of)?;
        let sums = self.checked_sums()?;
        self.check_budget()?;

        let mut noise = self.noise.clone();
        let mut same_keys = self.noise.clone();
        let released = self.privatize(&sums, &mut noise)?;
        let neighbour_released = self.privatize(&neighbour_sums, &mut same_keys)?;
        let keys_agree = noise.state() == same_keys.state();
        let canaries = self.privatize_canaries(&mut noise)?;
        let control = self.privatize(&sums, &mut GaussianNoise::from_os_entropy()?)?;

        let (group_of_var, bound) = self.clipping_groups()?;
        let c = self.config.max_grad_norm;
        let measured = compare(&Releases {
            released: &released,
            neighbour: &neighbour_released,
            control: &control,
            group_of_var: &group_of_var,
            bound: &bound,
            scale: 1.0 / self.config.sampler.expected_batch_size(),
            summed: batch.len(),
            std: self.config.noise_multiplier * c,
        })?;
        let step = ReplayStep {
            step: self.steps,
            removed_drawn: neighbour.len() != batch.len(),
            difference: measured.difference,
            bound,
            rounding: measured.rounding,
            same_control_flow: measured.same_shapes && keys_agree,
            noise_square_sum: measured.noise_square_sum,
            noise_coordinates: measured.noise_coordinates,
        };
        self.commit(released, noise, canaries)?;
        Ok(step)
    }

    /// Empties the open batch for `size` examples (the same draw).
    fn reopen(&mut self, size: usize) {
        if let Some(open) = self.batch.as_mut() {
            open.size = size;
            open.accumulated = 0;
            open.sums = None;
        }
    }

    /// Each variable's clipping group, and each group's threshold as claimed.
    fn clipping_groups(&self) -> Result<(Vec<usize>, Vec<f64>)> {
        match (&self.config.clipping, &self.ghost) {
            (ClipMode::PerLayer(t), Some(ghost)) => Ok((ghost.clipping_group_of_vars()?, t.clone())),
            _ => Ok((vec![0; self.vars.len()], vec![self.config.max_grad_norm])),
        }
    }
}
