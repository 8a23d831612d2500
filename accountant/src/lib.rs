//! Privacy accounting for DP-SGD, auditable without reading any training code.
//!
//! `dp-accountant` answers the questions a differentially private training
//! run raises, from a record of what it did:
//!
//! * [`DpEvent`]: what happened (a Poisson-sampled Gaussian step, repeated
//!   `n` times, ...), the vocabulary of the ledger; [`Adjacency`]: the unit
//!   of privacy.
//! * [`RdpAccountant`]: Renyi DP of composed events, exact for the
//!   Poisson-subsampled Gaussian at every order, converted to the smallest
//!   `(epsilon, delta)` over a grid of orders refined between grid points.
//! * [`PldAccountant`]: the privacy loss distributions composed by FFT,
//!   tighter than RDP, with proven upper and lower bounds on epsilon.
//! * [`PrivacyAccountant`]: what both accountants answer (compose events,
//!   epsilon at a delta, delta at an epsilon), so that everything below is
//!   written once; [`AccountantKind`] names one (`rdp`, `pld`) and makes it.
//! * [`calibrate_noise_multiplier`] and [`max_steps`]: the noise a training
//!   plan needs for a target epsilon, and the steps a budget allows, by any
//!   accountant; always on the conservative side.
//! * [`Ledger`]: an append-only, SHA-256-chained JSON record of every
//!   mechanism applied, of the models released and of the run's empirical
//!   audits ([`AuditRecord`]), with the data trained on named by hash
//!   ([`DataProvenance`]) and a data-parallel run's processes
//!   ([`Distribution`]); verified on every load.
//! * [`SecretKey`] and [`PublicKey`]: an optional Ed25519 signature over a
//!   ledger's head, so a statement can be checked with a public key alone.
//! * [`PrivacyReport`]: the privacy statement a reviewer signs off, in text,
//!   Markdown, JSON or HTML: epsilon beside the audit's epsilon-hat, the
//!   protected unit (and a user-level bound by group privacy), the data,
//!   N, batch size, epochs and steps, and every caveat; the `dp-accountant`
//!   binary prints it (`dp-accountant report ledger.json`).
//! * [`audit`]: empirical lower bounds on epsilon from a run's canary scores
//!   (the one-run audit of Steinke, Nasr & Jagielski 2023;
//!   `dp-accountant audit scores.json`).
//!
//! The crate depends on no tensor library: its users are reviewers and other
//! frameworks as much as `candle-dp`.
//!
//! # Example
//! Ten thousand DP-SGD steps at sample rate 1% and noise multiplier 1.1,
//! recorded in a ledger and reported at `delta = 1e-5`:
//!
//! ```
//! use dp_accountant::{
//!     Adjacency, DpEvent, Ledger, LedgerHeader, MechanismRecord, NoiseGenerator, NoiseSource,
//!     PrivacyReport, SamplerKind, Seeding,
//! };
//!
//! let mut ledger = Ledger::new(LedgerHeader { created_by: "my-trainer 1.0".into(), ..Default::default() });
//! ledger.append(MechanismRecord {
//!     event: DpEvent::self_composed(DpEvent::poisson_sampled_gaussian(0.01, 1.1), 10_000),
//!     adjacency: Adjacency::AddOrRemoveOne,
//!     clipping_norm: 1.0,
//!     sampler: SamplerKind::Poisson,
//!     noise: NoiseSource { generator: NoiseGenerator::Chacha20, seed: Seeding::OsEntropy },
//!     sampler_seed: Seeding::OsEntropy,
//!     distributed: None,
//! })?;
//!
//! // What a reviewer runs: parse (which verifies the chain), then report.
//! let reloaded = Ledger::from_json(&ledger.to_json())?;
//! let report = PrivacyReport::from_ledger(&reloaded, Some(1e-5))?;
//! assert!(report.epsilon > 5.0 && report.epsilon < 6.0);
//! assert_eq!(report.total_steps, 10_000);
//! println!("{}", report.to_text());
//! # Ok::<(), dp_accountant::Error>(())
//! ```
#![deny(missing_docs)]
#![deny(missing_debug_implementations)]
#![doc(test(attr(deny(warnings))))]

pub mod accountant;
pub mod audit;
pub mod calibrate;
pub mod conversion;
mod error;
pub mod event;
mod kind;
pub mod ledger;
mod math;
pub mod pld;
pub mod rdp;
pub mod report;
mod report_html;
pub mod signing;

pub use accountant::{Epsilon, PrivacyAccountant};
pub use calibrate::{
    calibrate_noise_multiplier, calibrate_with, max_steps, max_steps_with, EpsilonAnswer, NoiseCalibration,
    StepsCalibration,
};
pub use conversion::{DeltaBound, EpsilonBound};
pub use error::{Error, LedgerError, Result, Valid};
pub use event::{Adjacency, DpEvent};
pub use kind::AccountantKind;
pub use ledger::{
    AuditMethod, AuditRecord, DataProvenance, DistributedNoise, Distribution, HeadSignature, Ledger, LedgerEntry,
    LedgerHeader, MechanismRecord, ModelRelease, NoiseGenerator, NoiseSource, PrivacyTarget, Record, SamplerKind,
    Seeding, SignatureAlgorithm,
};
pub use pld::{PldAccountant, PldDelta, PldEpsilon, DEFAULT_EPSILON_ERROR, MAX_WORK};
pub use rdp::{default_orders, rdp_poisson_subsampled_gaussian, RdpAccountant};
pub use report::{
    AuditSummary, AuditVerdict, DeltaSource, DistributedSteps, MechanismSummary, PrivacyReport, SignatureSummary,
    UserLevelBound,
};
pub use signing::{generate_key_files, PublicKey, SecretKey};
