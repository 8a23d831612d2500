//! What happened: the vocabulary of mechanisms that the ledger records and
//! the accountants read.
//!
//! As in dp_accounting's `dp_event.py`, an event describes a mechanism and
//! never its cost; the RDP accountant (and later ones) are readers of it. An
//! event's meaning never changes: a new meaning is a new variant, and the
//! ledger's format version says which variants a file may contain.
//!
//! **Noise multipliers are relative to the clipping norm** `C`, the bound on
//! one example's contribution, as DP-SGD users know them: the noise has
//! standard deviation `noise_multiplier * C`. (dp_accounting instead divides
//! by the L2 sensitivity.) The accountant applies the sensitivity that the
//! [`Adjacency`] implies: `C` when an example is added or removed, `2 C` when
//! one is replaced by another.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{ensure, Error, Result, Valid};

/// Subsampled Gaussian steps with more noise than this are accounted as if
/// they had exactly this much: beyond it their series and grids lose all
/// precision (`sigma^2` overflows near 1e154), while their privacy loss is
/// already below 1e-15 per step. Less noise can only raise epsilon, so the
/// cap errs on the safe side.
pub(crate) const NOISE_MULTIPLIER_CAP: f64 = 1e8;

/// Which datasets count as neighbours: the unit of privacy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Adjacency {
    /// One example added or removed: the standard for Poisson-sampled DP-SGD
    /// (the dataset size itself is private).
    AddOrRemoveOne,
    /// One example replaced by another (the dataset size is public); the
    /// sensitivity of a clipped sum is then `2 C`.
    ReplaceOne,
}

impl Adjacency {
    /// The L2 sensitivity of a sum of per-example contributions clipped to
    /// norm 1 (squared): 1 under add/remove, 4 under replacement.
    pub(crate) fn squared_sensitivity(self) -> f64 {
        match self {
            Adjacency::AddOrRemoveOne => 1.0,
            Adjacency::ReplaceOne => 4.0,
        }
    }
}

impl fmt::Display for Adjacency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Adjacency::AddOrRemoveOne => "add-or-remove-one",
            Adjacency::ReplaceOne => "replace-one",
        })
    }
}

/// A differentially private mechanism, as applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum DpEvent {
    /// The Gaussian mechanism on the whole dataset: noise of standard
    /// deviation `noise_multiplier * C` added to a sum of clipped contributions.
    Gaussian {
        /// Noise standard deviation over the clipping norm; finite and > 0.
        noise_multiplier: f64,
    },
    /// The inner event applied to a Poisson sample: each example included
    /// independently with probability `sampling_probability`.
    PoissonSampled {
        /// The per-example inclusion probability `q`, in `[0, 1]`.
        sampling_probability: f64,
        /// The mechanism applied to the sample (a [`DpEvent::Gaussian`]).
        event: Box<DpEvent>,
    },
    /// The inner event applied `count` times, each time afresh.
    SelfComposed {
        /// The repeated mechanism.
        event: Box<DpEvent>,
        /// How many times it was applied.
        count: u64,
    },
    /// Several mechanisms applied in sequence.
    Composed {
        /// The mechanisms, in order.
        events: Vec<DpEvent>,
    },
    /// `steps` noisy steps over batches of a fixed size drawn by shuffling the
    /// dataset once per epoch (each example in exactly one of every
    /// `steps_per_epoch` consecutive steps).
    ///
    /// Accounted **without amplification by sampling**: each started epoch
    /// counts as one full Gaussian mechanism on the example's batch, under
    /// replace-one adjacency (the fixed batch size makes the dataset size
    /// public). This is what the sampler did, not the Poisson guarantee.
    ShuffledFixedSizeBatches {
        /// Noise standard deviation over the clipping norm; finite and > 0.
        noise_multiplier: f64,
        /// Steps per pass over the data; >= 1.
        steps_per_epoch: u64,
        /// Steps taken.
        steps: u64,
    },
}

impl DpEvent {
    /// A Gaussian mechanism on the full dataset.
    pub fn gaussian(noise_multiplier: f64) -> Self {
        DpEvent::Gaussian { noise_multiplier }
    }

    /// One step of DP-SGD with Poisson sampling: the Poisson-sampled Gaussian.
    pub fn poisson_sampled_gaussian(sampling_probability: f64, noise_multiplier: f64) -> Self {
        DpEvent::PoissonSampled { sampling_probability, event: Box::new(DpEvent::gaussian(noise_multiplier)) }
    }

    /// `event` applied `count` times.
    pub fn self_composed(event: DpEvent, count: u64) -> Self {
        DpEvent::SelfComposed { event: Box::new(event), count }
    }

    /// `events` applied in sequence.
    pub fn composed(events: Vec<DpEvent>) -> Self {
        DpEvent::Composed { events }
    }

    /// `steps` steps over shuffled fixed-size batches (no amplification).
    pub fn shuffled_fixed_size_batches(noise_multiplier: f64, steps_per_epoch: u64, steps: u64) -> Self {
        DpEvent::ShuffledFixedSizeBatches { noise_multiplier, steps_per_epoch, steps }
    }

    /// The variant's name as the ledger spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            DpEvent::Gaussian { .. } => "gaussian",
            DpEvent::PoissonSampled { .. } => "poisson_sampled",
            DpEvent::SelfComposed { .. } => "self_composed",
            DpEvent::Composed { .. } => "composed",
            DpEvent::ShuffledFixedSizeBatches { .. } => "shuffled_fixed_size_batches",
        }
    }

    /// Checks every parameter of the event tree.
    ///
    /// # Errors
    /// [`crate::Error::InvalidParameter`] naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        match self {
            DpEvent::Gaussian { noise_multiplier } => {
                ensure("noise_multiplier", *noise_multiplier, Valid::Positive)?;
            }
            DpEvent::PoissonSampled { sampling_probability, event } => {
                ensure("sampling_probability", *sampling_probability, Valid::ClosedUnit)?;
                event.validate()?;
            }
            DpEvent::SelfComposed { event, .. } => event.validate()?,
            DpEvent::Composed { events } => {
                for e in events {
                    e.validate()?;
                }
            }
            DpEvent::ShuffledFixedSizeBatches { noise_multiplier, steps_per_epoch, .. } => {
                ensure("noise_multiplier", *noise_multiplier, Valid::Positive)?;
                ensure("steps_per_epoch", *steps_per_epoch as f64, Valid::AtLeastOne)?;
            }
        }
        Ok(())
    }

    /// The leaf mechanisms (neither composed nor self-composed) of the event
    /// tree, each with how many times it is applied (saturating).
    pub fn leaves(&self) -> Vec<(&DpEvent, u64)> {
        fn walk<'a>(event: &'a DpEvent, count: u64, out: &mut Vec<(&'a DpEvent, u64)>) {
            match event {
                DpEvent::SelfComposed { event, count: n } => walk(event, count.saturating_mul(*n), out),
                DpEvent::Composed { events } => events.iter().for_each(|e| walk(e, count, out)),
                leaf => out.push((leaf, count)),
            }
        }
        let mut out = Vec::new();
        walk(self, 1, &mut out);
        out
    }

    /// The number of noisy steps (noisy releases) the event stands for,
    /// `None` if it exceeds `u64::MAX` (what ledgers check).
    pub fn checked_steps(&self) -> Option<u64> {
        match self {
            DpEvent::Gaussian { .. } | DpEvent::PoissonSampled { .. } => Some(1),
            DpEvent::SelfComposed { event, count } => event.checked_steps()?.checked_mul(*count),
            DpEvent::Composed { events } => events.iter().try_fold(0u64, |s, e| s.checked_add(e.checked_steps()?)),
            DpEvent::ShuffledFixedSizeBatches { steps, .. } => Some(*steps),
        }
    }

    /// The number of noisy steps (noisy releases) the event stands for.
    ///
    /// Saturates at `u64::MAX` rather than wrapping.
    pub fn steps(&self) -> u64 {
        match self {
            DpEvent::Gaussian { .. } | DpEvent::PoissonSampled { .. } => 1,
            DpEvent::SelfComposed { event, count } => event.steps().saturating_mul(*count),
            DpEvent::Composed { events } => events.iter().fold(0u64, |s, e| s.saturating_add(e.steps())),
            DpEvent::ShuffledFixedSizeBatches { steps, .. } => *steps,
        }
    }
}

/// Checks that `event` is valid and that the accountants can bound it under
/// `adjacency` (both read the same events), touching nothing.
pub(crate) fn check_supported(event: &DpEvent, adjacency: Adjacency) -> Result<()> {
    event.validate()?;
    match event {
        DpEvent::Gaussian { .. } => Ok(()),
        DpEvent::PoissonSampled { event, .. } => {
            if !matches!(**event, DpEvent::Gaussian { .. }) {
                return Err(Error::UnsupportedEvent {
                    event: "poisson_sampled",
                    adjacency,
                    reason: "only a Gaussian mechanism inside Poisson sampling is supported",
                });
            }
            if adjacency != Adjacency::AddOrRemoveOne {
                return Err(Error::UnsupportedEvent {
                    event: "poisson_sampled",
                    adjacency,
                    reason: "amplification by Poisson sampling is accounted under add-or-remove-one adjacency",
                });
            }
            Ok(())
        }
        DpEvent::SelfComposed { event, .. } => check_supported(event, adjacency),
        DpEvent::Composed { events } => events.iter().try_for_each(|e| check_supported(e, adjacency)),
        DpEvent::ShuffledFixedSizeBatches { .. } => {
            if adjacency != Adjacency::ReplaceOne {
                return Err(Error::UnsupportedEvent {
                    event: "shuffled_fixed_size_batches",
                    adjacency,
                    reason: "fixed-size batches make the dataset size public: account them under replace-one adjacency",
                });
            }
            Ok(())
        }
    }
}
