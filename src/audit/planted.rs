//! Bugs planted on purpose, to show that the audits catch them.
//!
//! Each is a bug found in DP-SGD code in the wild, put where such a bug
//! would be: in the threshold handed to the clipping, or in the scale of
//! the noise. [`crate::DpOptimizerBuilder::plant_bug`] exists only with the
//! `planted-bugs` feature (this crate's own tests enable it); the ledger of
//! a run with a planted bug says so in its description.

/// A privacy bug, planted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// The noise has standard deviation `sigma C / 10`, while the ledger
    /// claims `sigma C`.
    NoiseTenTimesSmaller,
    /// Clipping does nothing: every gradient (canaries' too) enters the sum
    /// whole, while the noise is still `sigma C`.
    ClippingDisabled,
    /// The noise scaled for the mean, `sigma C / B`, is added to the sum,
    /// which is then divided by `B` (the batch size divides the noise twice).
    NoiseOfTheMean,
}

impl PlantedBug {
    /// What the bug is, for the ledger's description.
    pub fn describe(self) -> &'static str {
        match self {
            PlantedBug::NoiseTenTimesSmaller => "noise ten times smaller than claimed",
            PlantedBug::ClippingDisabled => "clipping disabled",
            PlantedBug::NoiseOfTheMean => "noise of the mean's scale added to the sum",
        }
    }
}
