//! The accountant interface: what RDP and PLD have in common, so that
//! calibration, budgets, ledgers and reports are written once.
//!
//! As in dp_accounting's `privacy_accountant.py`, an accountant is a stateful
//! reader of [`DpEvent`]s: it composes events (each applied some number of
//! times) and answers "epsilon at this delta" and "delta at this epsilon"
//! for everything composed so far, under an [`Adjacency`] fixed when it was
//! built. [`RdpAccountant`] and [`PldAccountant`] implement it directly:
//! they already are exactly such composers, so wrapper or strategy types
//! would only give each a second name. What is particular to one of them
//! (RDP's orders and refinement, PLD's error, work bound and proven lower
//! bound) stays on its own type, and on [`Epsilon`] where it qualifies an
//! answer.

use std::fmt;

use serde::Serialize;

use crate::conversion::EpsilonBound;
use crate::error::Result;
use crate::event::{Adjacency, DpEvent};
use crate::pld::{PldAccountant, PldEpsilon};
use crate::rdp::RdpAccountant;

/// A privacy accountant: composes [`DpEvent`]s and bounds the privacy loss
/// of their composition.
///
/// # Units
/// Noise multipliers in events are relative to the clipping norm (see
/// [`crate::event`]); epsilon is in nats (the natural logarithm of a
/// probability ratio), delta a probability in `(0, 1)`.
///
/// # Contract
/// Every answer is an upper bound: what was composed is
/// `(epsilon_at(delta).epsilon, delta)`-DP and `(epsilon, delta_at(epsilon))`-DP.
/// Composing more never lowers an answer. `compose` checks the whole event
/// before changing anything, so an accountant that refused an event is
/// unchanged.
///
/// # Errors
/// [`crate::Error::InvalidParameter`] for a bad parameter (in an event, or a
/// `delta` outside `(0, 1)`, an `epsilon` negative or not finite);
/// [`crate::Error::UnsupportedEvent`] for an event the accountant cannot
/// bound under its adjacency; an accountant's own refusals (PLD:
/// [`crate::Error::GridTooLarge`], [`crate::Error::PldWorkTooLarge`]).
pub trait PrivacyAccountant: fmt::Debug + Send + Sync {
    /// The adjacency every event is accounted under.
    fn adjacency(&self) -> Adjacency;

    /// Whether `event` is valid and supported, without composing it.
    ///
    /// # Errors
    /// As [`PrivacyAccountant::compose`].
    fn check(&self, event: &DpEvent) -> Result<()>;

    /// Composes `event`, applied `count` times (0: nothing).
    ///
    /// # Errors
    /// See the trait; nothing is composed on error.
    fn compose(&mut self, event: &DpEvent, count: u64) -> Result<()>;

    /// The smallest epsilon this accountant proves at `delta` for
    /// everything composed.
    ///
    /// # Errors
    /// See the trait.
    fn epsilon_at(&self, delta: f64) -> Result<Epsilon>;

    /// The smallest delta this accountant proves at `epsilon` for
    /// everything composed (at most 1). A bare number: nothing in this crate
    /// needs more, and each accountant's own `delta` gives what it rests on.
    ///
    /// # Errors
    /// See the trait.
    fn delta_at(&self, epsilon: f64) -> Result<f64>;

    /// A copy, as a trait object: what a search composes each candidate
    /// into, so that the accountant's settings (and anything already
    /// composed) carry over.
    fn boxed_clone(&self) -> Box<dyn PrivacyAccountant>;
}

impl Clone for Box<dyn PrivacyAccountant> {
    fn clone(&self) -> Self {
        self.boxed_clone()
    }
}

/// An accountant's epsilon at one delta: the upper bound every accountant
/// gives, and what an accountant adds to it where it has more to say.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Epsilon {
    /// The upper bound: everything composed is `(epsilon, delta)`-DP
    /// (`+inf` if the accountant proves nothing finite).
    pub epsilon: f64,
    /// The delta it holds at.
    pub delta: f64,
    /// A proven lower bound on the smallest epsilon that holds at `delta`,
    /// for accountants that prove one (PLD); `None` otherwise.
    pub epsilon_lower: Option<f64>,
    /// The Renyi order the bound comes from, for accountants that minimize
    /// over orders (RDP); `None` otherwise.
    pub order: Option<f64>,
}

impl From<EpsilonBound> for Epsilon {
    fn from(b: EpsilonBound) -> Self {
        Self { epsilon: b.epsilon, delta: b.delta, epsilon_lower: None, order: Some(b.order) }
    }
}

impl From<PldEpsilon> for Epsilon {
    fn from(b: PldEpsilon) -> Self {
        Self { epsilon: b.epsilon, delta: b.delta, epsilon_lower: Some(b.epsilon_lower), order: None }
    }
}

/// The trait's methods, forwarded to the inherent ones of the same meaning
/// (whose answers say more: [`EpsilonBound`], [`PldEpsilon`]).
macro_rules! forward_to_inherent {
    ($($(#[$doc:meta])* $accountant:ty),* $(,)?) => {$(
        $(#[$doc])*
        impl PrivacyAccountant for $accountant {
            fn adjacency(&self) -> Adjacency {
                <$accountant>::adjacency(self)
            }

            fn check(&self, event: &DpEvent) -> Result<()> {
                <$accountant>::check(self, event)
            }

            fn compose(&mut self, event: &DpEvent, count: u64) -> Result<()> {
                <$accountant>::compose(self, event, count)
            }

            fn epsilon_at(&self, delta: f64) -> Result<Epsilon> {
                Ok(self.epsilon(delta)?.into())
            }

            fn delta_at(&self, epsilon: f64) -> Result<f64> {
                Ok(self.delta(epsilon)?.delta)
            }

            fn boxed_clone(&self) -> Box<dyn PrivacyAccountant> {
                Box::new(self.clone())
            }
        }
    )*};
}

forward_to_inherent!(
    /// RDP: [`RdpAccountant::epsilon`] with its order, at the accountant's
    /// own orders and refinement. Clones share the per-step series already
    /// summed, so a search over step counts sums each series once.
    RdpAccountant,
    /// PLD: [`PldAccountant::epsilon`] with its proven lower bound, at the
    /// accountant's own error and work bound. A clone shares the
    /// composition already computed, if any.
    PldAccountant,
);
