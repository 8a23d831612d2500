//! Per-sample losses: DP-SGD clips each example's gradient, so it needs each
//! example's loss, never the batch mean that `candle_nn::loss` returns.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};

/// The losses of a physical batch, one per example (`[B]`).
///
/// The optimizer takes this type only, so a mean loss cannot be passed by
/// mistake: build it with [`cross_entropy`], [`mse`] or
/// [`PerSampleLoss::new`] from your own `[B]` tensor.
#[derive(Debug, Clone)]
pub struct PerSampleLoss(Tensor);

impl PerSampleLoss {
    /// Wraps per-example losses.
    ///
    /// # Errors
    /// [`Error::Shape`] unless `losses` has rank 1.
    pub fn new(losses: Tensor) -> Result<Self> {
        if losses.rank() != 1 {
            return Err(Error::Shape { what: "per-sample losses", expected: "[B]", got: losses.dims().to_vec() });
        }
        Ok(Self(losses))
    }

    /// The `[B]` tensor.
    pub fn tensor(&self) -> &Tensor {
        &self.0
    }

    /// The number of examples.
    pub fn len(&self) -> usize {
        self.0.dims1().unwrap_or(0)
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Cross-entropy of each example: `logits [B, C]`, `targets [B]` (u32 class
/// indices) -> `[B]`.
///
/// # Errors
/// [`Error::Shape`] for mismatched shapes; Candle's errors otherwise.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<PerSampleLoss> {
    let (b, _) =
        logits.dims2().map_err(|_| Error::Shape { what: "logits", expected: "[B, C]", got: logits.dims().to_vec() })?;
    if targets.dims() != [b] {
        return Err(Error::Shape {
            what: "targets",
            expected: "[B], one class index per example",
            got: targets.dims().to_vec(),
        });
    }
    PerSampleLoss::new(negative_log_likelihood(logits, targets)?)
}

/// `-log softmax(logits)[target]` along the last axis: `[..., C]`, `[...]` -> `[...]`.
fn negative_log_likelihood(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = log_probs.gather(&targets.to_dtype(DType::U32)?.unsqueeze(D::Minus1)?, D::Minus1)?;
    Ok(picked.squeeze(D::Minus1)?.neg()?)
}

/// Mean squared error of each example over its features:
/// `predictions`, `targets` `[B, ...]` -> `[B]`.
///
/// # Errors
/// [`Error::Shape`] for mismatched shapes; Candle's errors otherwise.
pub fn mse(predictions: &Tensor, targets: &Tensor) -> Result<PerSampleLoss> {
    if predictions.dims() != targets.dims() || predictions.rank() == 0 {
        return Err(Error::Shape {
            what: "targets",
            expected: "the predictions' shape [B, ...]",
            got: targets.dims().to_vec(),
        });
    }
    let b = predictions.dims()[0];
    let diff = (predictions - targets)?;
    PerSampleLoss::new(diff.sqr()?.reshape((b, ()))?.mean(1)?)
}

/// Cross-entropy of each sequence, averaged over its positions: `logits
/// [B, T, V]`, `targets [B, T]` (u32 token ids) -> `[B]`. The privacy unit is
/// then the sequence (one example = one sequence of `T` tokens).
///
/// # Errors
/// [`Error::Shape`] for mismatched shapes; Candle's errors otherwise.
pub fn sequence_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<PerSampleLoss> {
    let (b, t, _) = logits.dims3().map_err(|_| Error::Shape {
        what: "logits",
        expected: "[B, T, V]",
        got: logits.dims().to_vec(),
    })?;
    if targets.dims() != [b, t] {
        return Err(Error::Shape {
            what: "targets",
            expected: "[B, T], one token id per position",
            got: targets.dims().to_vec(),
        });
    }
    PerSampleLoss::new(negative_log_likelihood(logits, targets)?.mean(1)?)
}
