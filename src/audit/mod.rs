//! Audits that measure what a run leaked, beside the accountant's proof.
//!
//! * [`Canaries`] ([`crate::DpOptimizerBuilder::audit`]): the one-run canary
//!   audit. White-box gradient canaries train with the model, and their
//!   scores, read from the privatized sums, give epsilon-hat, an empirical
//!   lower bound on the run's epsilon (Steinke, Nasr & Jagielski 2023;
//!   f-DP version, Mahloujifar, Melis & Chaudhuri 2025), recorded in the
//!   ledger beside the accountant's epsilon. A correct run has
//!   epsilon-hat <= epsilon (except with probability about alpha).
//! * [`replay_check`]: every step on `D` and on `D` minus one example,
//!   with identical randomness; the privatized sums must differ by at most
//!   `C`, and the noise must be what the ledger claims.
//! * [`PlantedBug`]: the bugs both must catch, planted on purpose
//!   (feature `planted-bugs`, for tests).
//!
//! The accountant proves an upper bound for the mechanism as specified; the
//! audits check that the code is that mechanism.

mod canaries;
mod planted;
mod replay;

pub use canaries::Canaries;
pub(crate) use canaries::CanaryState;
pub use planted::PlantedBug;
pub(crate) use replay::{compare, Releases};
pub use replay::{replay_check, ReplayReport, ReplayStep, NOISE_CHECK_Z};
