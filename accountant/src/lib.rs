//! Privacy accounting for DP-SGD (stub, being written).
pub mod conversion;
mod error;
pub mod event;
mod math;
pub mod rdp;

pub use conversion::{DeltaBound, EpsilonBound};
pub use error::{Error, LedgerError, Result, Valid};
pub use event::{Adjacency, DpEvent};
pub use rdp::{default_orders, rdp_poisson_subsampled_gaussian, RdpAccountant};
pub mod calibrate;
pub use calibrate::{calibrate_noise_multiplier, max_steps, NoiseCalibration, StepsCalibration};
pub mod ledger;
pub use ledger::{
    Ledger, LedgerEntry, LedgerHeader, MechanismRecord, NoiseGenerator, NoiseSource, PrivacyTarget, SamplerKind,
    Seeding,
};
pub mod report;
pub use report::{DeltaSource, MechanismSummary, PrivacyReport};
