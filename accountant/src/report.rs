//! The privacy statement a reviewer signs off, made from a ledger alone.
//!
//! This file builds [`PrivacyReport`] (the accounting, the caveats); its
//! submodules hold the rest: `scope` (the protected unit, a user-level bound,
//! N, batch size and epochs, audits, the noise sampler), `curves` (epsilon
//! against steps and delta) and `text` (the plain-text and Markdown forms,
//! and the sentences HTML shares); `report_html.rs` draws the HTML page.

mod curves;
mod scope;
mod text;

use serde::Serialize;

use crate::accountant::PrivacyAccountant;
use crate::conversion::EpsilonBound;
use crate::error::{ensure, LedgerError, Result, Valid};
use crate::event::{Adjacency, DpEvent};
use crate::kind::AccountantKind;
use crate::ledger::{
    DataProvenance, DistributedNoise, Ledger, ModelRelease, NoiseSource, PrivacyTarget, SamplerKind, Seeding,
};
use crate::pld::{PldAccountant, PldEpsilon};
use crate::rdp::RdpAccountant;

use curves::{epsilon_by_delta, epsilon_by_step};
pub use scope::{AuditSummary, AuditVerdict, UserLevelBound};
pub(crate) use text::{audit_lines, fmt_lower, fmt_num, noise_words, sampler_seed_words, sampler_words};

/// The most work of the report's PLD composition, in the units of
/// [`crate::MAX_WORK`] (about three seconds): a report answers quickly or
/// says why PLD is missing.
const REPORT_PLD_MAX_WORK: f64 = 4e8;

/// The work a PLD report's curve by step may take, in the units of
/// [`crate::MAX_WORK`] (a few seconds).
const REPORT_PLD_WORK: f64 = 8e8;

/// The delta used when neither the caller nor the ledger gives one.
pub const DEFAULT_DELTA: f64 = 1e-5;

const ACCOUNTANT: &str = "RDP (Renyi differential privacy) of the Poisson-subsampled Gaussian";
const ACCOUNTANT_REFERENCE: &str = "Mironov 2017 (arXiv:1702.07476v3); Mironov, Talwar & Zhang 2019, Sec. 3.3 \
     (arXiv:1908.10530v1): exact binomial expansion at integer orders, two-sided series with a proven tail bound at \
     fractional orders";
const CONVERSION: &str = "RDP to (epsilon, delta): the bound of Balle et al. / Canonne, Kamath & Steinke";
const CONVERSION_REFERENCE: &str = "Balle, Barthe, Gaboardi, Hsu & Sato 2020, Thm 21 (arXiv:1905.09982v3); \
     Canonne, Kamath & Steinke 2020, Prop. 12 (arXiv:2004.00010v4)";
const PLD_ACCOUNTANT: &str = "PLD (privacy loss distribution) of every step, composed by FFT, upper bound";
const PLD_REFERENCE: &str = "Koskela, Jalko & Honkela 2020; Gopi, Lee & Wutschitz 2021 (randomized mean-preserving \
     discretization, Azuma-Hoeffding error term); dominating pairs of Zhu, Dong & Wang 2022";
const PLD_CONVERSION: &str = "the hockey-stick divergence of the composed distribution, read off directly";
const PLD_CONVERSION_REFERENCE: &str = "Dong, Roth & Su 2019; Balle & Wang 2018";
const ORDERS: &str = "dp_accounting's default grid (1.1 to 10.9 by 0.1, 11 to 63, 128, 256, 512, 1024), \
     the best order refined between its grid neighbours";

/// Where the report's delta came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeltaSource {
    /// Given by the reviewer.
    Given,
    /// The target the ledger declares.
    LedgerTarget,
    /// Neither: [`DEFAULT_DELTA`].
    Default,
}

/// One kind of step the ledger records, with how many were taken.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MechanismSummary {
    /// How batches were drawn.
    pub sampler: SamplerKind,
    /// Poisson sampling probability (Poisson sampler only).
    pub sample_rate: Option<f64>,
    /// Steps per epoch (shuffled fixed-size batches only).
    pub steps_per_epoch: Option<u64>,
    /// Noise standard deviation over the clipping norm.
    pub noise_multiplier: f64,
    /// The bound on each example's contribution.
    pub clipping_norm: f64,
    /// Where the noise came from.
    pub noise: NoiseSource,
    /// How the batch sampler's generator was seeded.
    pub sampler_seed: Seeding,
    /// Steps taken with these parameters.
    pub steps: u64,
    /// Expected examples per step: `q N` (Poisson), `N` (full batch); none
    /// without a declared `N`, or for fixed-size batches (whose size the
    /// event does not record).
    pub expected_batch_size: Option<f64>,
    /// Expected passes over the data these steps make: `q steps` (Poisson),
    /// `steps` (full batch), `steps / steps_per_epoch` (shuffled).
    pub epochs: f64,
}

/// Consecutive steps that ran data parallel the same way.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DistributedSteps {
    /// The first of these steps, from 1.
    pub first_step: u64,
    /// The last of them.
    pub last_step: u64,
    /// The processes that ran them ([`crate::Distribution::world_size`]).
    pub world_size: u64,
    /// How their noise was made ([`crate::Distribution::noise`]).
    pub noise_placement: DistributedNoise,
}

/// The distributed steps of `ledger`, grouped (see [`PrivacyReport::distributed`]).
fn distributed_steps(ledger: &Ledger) -> Vec<DistributedSteps> {
    let mut spans: Vec<DistributedSteps> = Vec::new();
    let mut done = 0u64;
    for m in ledger.mechanisms() {
        let steps = m.event.steps();
        if let (Some(d), true) = (m.distributed, steps > 0) {
            let (first, last) = (done + 1, done.saturating_add(steps));
            match spans.last_mut() {
                Some(s) if s.last_step == done && s.world_size == d.world_size && s.noise_placement == d.noise => {
                    s.last_step = last;
                }
                _ => spans.push(DistributedSteps {
                    first_step: first,
                    last_step: last,
                    world_size: d.world_size,
                    noise_placement: d.noise,
                }),
            }
        }
        done = done.saturating_add(steps);
    }
    spans
}

/// Who signed the ledger's head (see [`crate::signing`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SignatureSummary {
    /// The signer's public key, hex.
    pub public_key: String,
    /// Its fingerprint ([`crate::PublicKey::fingerprint`]).
    pub fingerprint: String,
    /// Whether the key was checked against one the reviewer trusts
    /// (`--public-key`); otherwise the signature only proves that whoever
    /// holds this key vouched for the head.
    pub trusted: bool,
}

/// A privacy statement: every number a reviewer needs, and every caveat.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrivacyReport {
    /// The ledger's head hash: the statement covers exactly this ledger.
    pub ledger_head: String,
    /// Entries in the ledger.
    pub ledger_entries: usize,
    /// The signature over the head, if any (it verified when the ledger loaded).
    pub signature: Option<SignatureSummary>,
    /// The program that wrote it.
    pub created_by: String,
    /// What was trained.
    pub description: Option<String>,
    /// Training set size `N`, if declared (canaries of an audit included).
    pub dataset_size: Option<u64>,
    /// Expected examples per step, when every mechanism has the same
    /// ([`MechanismSummary::expected_batch_size`]).
    pub expected_batch_size: Option<f64>,
    /// Expected passes over the data, all mechanisms together.
    pub epochs: f64,
    /// The data trained on, by hash, if the run recorded it.
    pub data: Option<DataProvenance>,
    /// The steps that ran data parallel, in runs of consecutive records
    /// with the same distribution (a run resumed on another number of
    /// processes has several); empty for a one-process run.
    pub distributed: Vec<DistributedSteps>,
    /// The unit of privacy.
    pub adjacency: Adjacency,
    /// The unit of privacy in words, with what it is not (one person).
    pub protected_unit: String,
    /// The bound for a person with several examples, if asked for
    /// ([`PrivacyReport::with_max_examples_per_user`]).
    pub user_level: Option<UserLevelBound>,
    /// Which model states the guarantee covers (every checkpoint, not only the last).
    pub coverage: &'static str,
    /// What hyper-parameter tuning on the same data costs, and how to account it.
    pub tuning: &'static str,
    /// How the Gaussian values were drawn, as far as the ledger's writer tells.
    pub noise_sampler: String,
    /// The empirical audits the ledger records, each beside the accountant's
    /// bound for the same steps and delta.
    pub audits: Vec<AuditSummary>,
    /// The head the reviewer holds, once checked against the ledger
    /// ([`PrivacyReport::with_verified_head`]).
    pub head_verified_against: Option<String>,
    /// What kinds of step were taken.
    pub mechanisms: Vec<MechanismSummary>,
    /// The model files the run released, with their SHA-256: the weights this
    /// statement covers.
    pub releases: Vec<ModelRelease>,
    /// Total noisy steps.
    pub total_steps: u64,
    /// The privacy loss bound at `delta`.
    pub epsilon: f64,
    /// The delta.
    pub delta: f64,
    /// Where `delta` came from.
    pub delta_source: DeltaSource,
    /// The accountant whose upper bound the statement uses.
    pub statement_accountant: AccountantKind,
    /// The RDP accountant's epsilon at `delta`.
    pub epsilon_rdp: f64,
    /// The PLD accountant's epsilon (upper bound) at `delta`, if it could be computed.
    pub epsilon_pld: Option<f64>,
    /// The PLD accountant's proven lower bound on the true epsilon at `delta`.
    pub epsilon_pld_lower: Option<f64>,
    /// The RDP order that gives `epsilon_rdp`.
    pub order: f64,
    /// The budget the ledger declares, if any.
    pub target: Option<PrivacyTarget>,
    /// The epsilon at the target's delta, if a target is declared.
    pub epsilon_at_target_delta: Option<f64>,
    /// Whether that epsilon is within the target.
    pub within_target: Option<bool>,
    /// The accountant.
    pub accountant: &'static str,
    /// Its references.
    pub accountant_reference: &'static str,
    /// The conversion to `(epsilon, delta)`.
    pub conversion: &'static str,
    /// Its references.
    pub conversion_reference: &'static str,
    /// The orders searched.
    pub orders: &'static str,
    /// What makes the statement fail, one sentence each: a declared budget
    /// exceeded, an audit whose lower bound exceeds the accountant's epsilon.
    /// Empty when the statement stands.
    pub failures: Vec<String>,
    /// Everything that weakens or qualifies the statement.
    pub caveats: Vec<String>,
    /// Epsilon at `delta` after a given number of steps (about 40 points; as
    /// few as 4 for a PLD statement whose compositions are costly). By RDP
    /// these use the grid orders only: valid upper bounds, at or slightly
    /// above the refined statement.
    pub epsilon_by_step: Vec<(u64, f64)>,
    /// Epsilon at the end against delta (`1e-12` to `1e-2`, log-spaced; by
    /// RDP, grid orders only, as `epsilon_by_step`).
    pub epsilon_by_delta: Vec<(f64, f64)>,
}

impl PrivacyReport {
    /// The statement for `ledger` at `delta` (else the ledger's target delta,
    /// else [`DEFAULT_DELTA`]), by the RDP accountant (PLD beside it).
    ///
    /// # Errors
    /// [`crate::Error::InvalidParameter`] unless `delta` is in `(0, 1)`.
    pub fn from_ledger(ledger: &Ledger, delta: Option<f64>) -> Result<Self> {
        Self::from_ledger_with(ledger, delta, AccountantKind::Rdp)
    }

    /// The statement by `accountant`; both accountants' epsilons are reported.
    ///
    /// # Errors
    /// As [`PrivacyReport::from_ledger`]; with PLD, [`crate::Error::GridTooLarge`] or
    /// [`crate::Error::PldWorkTooLarge`] (past about three seconds of work).
    pub fn from_ledger_with(ledger: &Ledger, delta: Option<f64>, accountant: AccountantKind) -> Result<Self> {
        let header = ledger.header();
        let (delta, delta_source) = resolve_delta(delta, header.target)?;
        let accounted = Accounted::new(ledger, delta, accountant)?;
        let epsilon = accounted.statement.epsilon_at(delta)?.epsilon;
        let (epsilon_at_target_delta, within_target) = target_verdict(header.target, &*accounted.statement)?;
        let mechanisms = summarize(ledger);
        let audits = scope::audit_summaries(ledger, accountant, &*accounted.statement)?;
        let mut caveats = record_caveats(ledger, &mechanisms);
        caveats.extend(distribution_caveat(ledger, &mechanisms));
        caveats.extend(delta_caveats(delta, delta_source, header.dataset_size));
        caveats.extend(accounting_caveats(&accounted, header.target, epsilon_at_target_delta, within_target));
        caveats.extend(audits.iter().filter(|a| a.failed()).map(audit_caveat));
        let (accountant_name, accountant_reference, conversion, conversion_reference) = method_text(accountant);
        let (expected_batch_size, epochs) = scope::training_shape(&mechanisms);
        let failures = text::failures(header.target, within_target, epsilon_at_target_delta, &audits);
        Ok(Self {
            epsilon_by_step: epsilon_by_step(ledger, delta, accounted.by_step, accounted.step_points)?,
            epsilon_by_delta: epsilon_by_delta(&*accounted.by_delta)?,
            ledger_head: ledger.head(),
            ledger_entries: ledger.entries().len(),
            signature: ledger.signer().map(|k| SignatureSummary {
                public_key: k.to_hex(),
                fingerprint: k.fingerprint(),
                trusted: false,
            }),
            created_by: header.created_by.clone(),
            description: header.description.clone(),
            dataset_size: header.dataset_size,
            expected_batch_size,
            epochs,
            data: header.data.clone(),
            distributed: distributed_steps(ledger),
            adjacency: ledger.adjacency(),
            protected_unit: scope::protected_unit_sentence(ledger.adjacency()),
            user_level: None,
            coverage: scope::COVERAGE,
            tuning: scope::TUNING,
            noise_sampler: scope::gaussian_sampler_sentence(&header.created_by),
            audits,
            head_verified_against: None,
            mechanisms,
            releases: ledger.releases().cloned().collect(),
            total_steps: ledger.total_steps(),
            epsilon,
            delta,
            delta_source,
            statement_accountant: accountant,
            epsilon_rdp: accounted.rdp.epsilon,
            epsilon_pld: accounted.pld.as_ref().map(|b| b.epsilon),
            epsilon_pld_lower: accounted.pld.as_ref().map(|b| b.epsilon_lower),
            order: accounted.rdp.order,
            target: header.target,
            epsilon_at_target_delta,
            within_target,
            accountant: accountant_name,
            accountant_reference,
            conversion,
            conversion_reference,
            orders: ORDERS,
            failures,
            caveats,
        })
    }

    /// The statement with a user-level bound for people who contributed up
    /// to `k` examples each ([`UserLevelBound::new`]: group privacy from this
    /// statement's epsilon and delta).
    ///
    /// # Errors
    /// [`crate::Error::InvalidParameter`] (`max_examples_per_user`) unless `k >= 1`.
    pub fn with_max_examples_per_user(mut self, k: u64) -> Result<Self> {
        self.user_level = Some(UserLevelBound::new(k, self.epsilon, self.delta)?);
        Ok(self)
    }

    /// The statement, recorded as checked against `anchor`, a head the
    /// reviewer holds ([`Ledger::verify_head`]); `ledger` must be the one the
    /// statement was made from.
    ///
    /// # Errors
    /// [`LedgerError::AnchorMismatch`] if the ledger's head is not `anchor`,
    /// or if the statement is about another ledger (another head).
    pub fn with_verified_head(mut self, ledger: &Ledger, anchor: &str) -> Result<Self, LedgerError> {
        ledger.verify_head(anchor)?;
        if ledger.head() != self.ledger_head {
            return Err(LedgerError::AnchorMismatch {
                anchor: anchor.to_string(),
                head: self.ledger_head.clone(),
                entries: self.ledger_entries,
            });
        }
        self.head_verified_against = Some(ledger.head());
        Ok(self)
    }

    /// The statement as one JSON object (infinite epsilon is `null`).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// The caveat of an audit that contradicts the accountant.
fn audit_caveat(a: &AuditSummary) -> String {
    format!(
        "The empirical audit FAILED ({}). Do not rely on this statement until the cause is found: check clipping,          the noise, the sampler and the ledger against the code that ran.",
        text::audit_verdict_sentence(a)
    )
}

/// The ledger accounted for a report: RDP always (its epsilon, order and
/// caveats are reported), PLD beside it when it can run, and the accountants
/// the statement and its curves are drawn from. The one place where a report
/// tells RDP and PLD apart.
struct Accounted {
    /// RDP's answer at the report's delta.
    rdp: EpsilonBound,
    /// PLD's answer at the report's delta, if it ran.
    pld: Option<PldEpsilon>,
    /// Why PLD did not run (only where the statement is RDP's).
    pld_failure: Option<String>,
    /// The whole ledger, by the accountant that states epsilon.
    statement: Box<dyn PrivacyAccountant>,
    /// The whole ledger, for the curve against delta.
    by_delta: Box<dyn PrivacyAccountant>,
    /// Empty, for the curve against steps.
    by_step: Box<dyn PrivacyAccountant>,
    /// The most points the curve against steps may have.
    step_points: u64,
}

impl Accounted {
    fn new(ledger: &Ledger, delta: f64, kind: AccountantKind) -> Result<Self> {
        let adjacency = ledger.adjacency();
        let rdp = ledger.compose_into(RdpAccountant::new(adjacency))?;
        let rdp_bound = rdp.epsilon(delta)?;
        // PLD beside RDP; if it cannot run (a grid too large), only a statement by PLD fails.
        let pld = PldAccountant::new(adjacency)
            .with_max_work(REPORT_PLD_MAX_WORK)
            .and_then(|p| ledger.compose_into(p))
            .and_then(|p| p.epsilon(delta).map(|b| (p, b)));
        let (pld, pld_failure) = match pld {
            Ok(x) => (Some(x), None),
            Err(e) if kind == AccountantKind::Pld => return Err(e),
            Err(e) => (None, Some(e.to_string())),
        };
        let (statement, by_delta, by_step, step_points) = match &pld {
            // (A statement by PLD that could not run has returned above.)
            Some((p, _)) if kind == AccountantKind::Pld => {
                // A PLD curve composes a prefix per point: as many points as
                // about eight full compositions' work allows (4 to 40).
                let points = (REPORT_PLD_WORK / p.work()?.max(1.0)).clamp(4.0, 40.0) as u64;
                (p.boxed_clone(), p.boxed_clone(), PldAccountant::new(adjacency).boxed_clone(), points)
            }
            // RDP curves are grid-only (no refinement between orders): a valid,
            // slightly looser upper bound, and each distinct step's series is
            // then summed once for every point, since clones share the
            // per-step cache.
            _ => {
                let by_delta = rdp.clone().with_refinement(false).boxed_clone();
                let by_step = RdpAccountant::new(adjacency).with_refinement(false).boxed_clone();
                (rdp.boxed_clone(), by_delta, by_step, 40)
            }
        };
        Ok(Self { rdp: rdp_bound, pld: pld.map(|(_, b)| b), pld_failure, statement, by_delta, by_step, step_points })
    }
}

/// The report's delta and where it came from: the reviewer's, else the
/// ledger's declared one, else [`DEFAULT_DELTA`].
fn resolve_delta(given: Option<f64>, target: Option<PrivacyTarget>) -> Result<(f64, DeltaSource)> {
    Ok(match (given, target) {
        (Some(d), _) => (ensure("delta", d, Valid::OpenUnit)?, DeltaSource::Given),
        (None, Some(t)) => (ensure("delta", t.delta, Valid::OpenUnit)?, DeltaSource::LedgerTarget),
        (None, None) => (DEFAULT_DELTA, DeltaSource::Default),
    })
}

/// Epsilon at the declared target's delta, and whether it is within the
/// target (both `None` without a target).
fn target_verdict(
    target: Option<PrivacyTarget>,
    statement: &dyn PrivacyAccountant,
) -> Result<(Option<f64>, Option<bool>)> {
    let Some(t) = target else { return Ok((None, None)) };
    let e = statement.epsilon_at(ensure("target.delta", t.delta, Valid::OpenUnit)?)?.epsilon;
    Ok((Some(e), Some(e <= t.epsilon)))
}

/// The accountant's and the conversion's names and references:
/// `(accountant, accountant_reference, conversion, conversion_reference)`.
fn method_text(kind: AccountantKind) -> (&'static str, &'static str, &'static str, &'static str) {
    match kind {
        AccountantKind::Rdp => (ACCOUNTANT, ACCOUNTANT_REFERENCE, CONVERSION, CONVERSION_REFERENCE),
        AccountantKind::Pld => (PLD_ACCOUNTANT, PLD_REFERENCE, PLD_CONVERSION, PLD_CONVERSION_REFERENCE),
    }
}

/// What the records themselves qualify: nothing recorded, no amplification
/// by sampling, batches or noise that someone could predict.
fn record_caveats(ledger: &Ledger, mechanisms: &[MechanismSummary]) -> Vec<String> {
    let mut caveats = Vec::new();
    if ledger.entries().is_empty() {
        caveats.push("The ledger records no mechanism: nothing was released under it.".to_string());
    }
    if mechanisms.iter().any(|m| m.sampler == SamplerKind::ShuffledFixedSize) {
        caveats.push(
            "Batches were shuffled fixed-size batches, not Poisson samples: the guarantee is accounted without \
             amplification by sampling (each started epoch counts as a full Gaussian release), under replace-one \
             adjacency."
                .to_string(),
        );
    }
    if ledger.mechanisms().any(|m| m.sampler_seed == Seeding::Fixed && m.sampler != SamplerKind::FullBatch) {
        caveats.push(
            "The batches were drawn with a fixed seed: whoever knows it knows which examples each step used, and \
             the amplification by sampling that the accounting relies on assumes they are secret."
                .to_string(),
        );
    }
    if mechanisms.iter().any(|m| m.noise.seed == Seeding::Fixed) {
        caveats.push(
            "The noise came from a fixed seed: anyone who knows it can regenerate and subtract the noise, which \
             voids the guarantee. Keep the seed as secret as the data, or retrain with OS entropy before release."
                .to_string(),
        );
    }
    caveats
}

/// What a distributed run's records qualify: steps whose batches were not
/// Poisson samples, which the processes' independent sampling of their shards
/// does not describe.
fn distribution_caveat(ledger: &Ledger, mechanisms: &[MechanismSummary]) -> Option<String> {
    let world_size = ledger.mechanisms().filter_map(|m| m.distributed).map(|d| d.world_size).max()?;
    let other = mechanisms.iter().find(|m| m.sampler != SamplerKind::Poisson)?;
    Some(format!(
        "The run was distributed (over up to {world_size} {}), but some steps record {}, not Poisson samples: a \
         data-parallel run's processes sample their shards independently, which is Poisson sampling, and the \
         ledger does not say how those steps' batches were drawn across the processes, so whether their \
         accounting applies is not shown.",
        text::processes(world_size),
        sampler_words(other.sampler)
    ))
}

/// What the delta qualifies: a default one, or one too large for the dataset.
fn delta_caveats(delta: f64, source: DeltaSource, dataset_size: Option<u64>) -> Vec<String> {
    let mut caveats = Vec::new();
    if source == DeltaSource::Default {
        caveats.push(format!("No delta was given and the ledger declares none: delta = {DEFAULT_DELTA:e} was used."));
    }
    if let Some(n) = dataset_size.filter(|&n| n > 0 && delta >= 1.0 / n as f64) {
        caveats.push(format!(
            "delta = {delta:e} is not below 1/N = {:e}: releasing one random example outright meets such a \
             delta. Use a delta well below 1/N.",
            1.0 / n as f64
        ));
    }
    caveats
}

/// What the accounting qualifies: RDP orders dropped or at the grid's end,
/// an exceeded budget, PLD not run.
fn accounting_caveats(
    accounted: &Accounted,
    target: Option<PrivacyTarget>,
    epsilon_at_target_delta: Option<f64>,
    within_target: Option<bool>,
) -> Vec<String> {
    let mut caveats = Vec::new();
    let bound = &accounted.rdp;
    if !bound.dropped_orders.is_empty() {
        caveats.push(format!(
            "RDP orders {:?} could not be computed to the required accuracy and were left out (this can only \
             raise epsilon).",
            bound.dropped_orders
        ));
    }
    if bound.order_at_range_edge && bound.epsilon > 0.0 && bound.epsilon.is_finite() {
        caveats.push(format!(
            "The best RDP order ({}) is at the end of the order grid: a wider grid might give a smaller epsilon \
             (the stated one remains valid).",
            fmt_num(bound.order)
        ));
    }
    if let (Some(t), Some(false)) = (target, within_target) {
        caveats.push(format!(
            "The declared budget (epsilon {} at delta {:e}) is EXCEEDED: epsilon at that delta is {}.",
            fmt_num(t.epsilon),
            t.delta,
            fmt_num(epsilon_at_target_delta.unwrap_or(f64::NAN))
        ));
    }
    if let Some(why) = &accounted.pld_failure {
        caveats.push(format!("The PLD accountant was not run on this ledger ({why}); only RDP is shown."));
    }
    caveats
}

/// Groups the ledger's steps by their parameters.
fn summarize(ledger: &Ledger) -> Vec<MechanismSummary> {
    let mut out: Vec<MechanismSummary> = Vec::new();
    for r in ledger.mechanisms() {
        for (leaf, count) in r.event.leaves() {
            let (sample_rate, steps_per_epoch, noise_multiplier, steps) = match leaf {
                DpEvent::PoissonSampled { sampling_probability, event } => match **event {
                    DpEvent::Gaussian { noise_multiplier } => {
                        (Some(*sampling_probability), None, noise_multiplier, count)
                    }
                    _ => continue,
                },
                DpEvent::Gaussian { noise_multiplier } => (None, None, *noise_multiplier, count),
                DpEvent::ShuffledFixedSizeBatches { noise_multiplier, steps_per_epoch, steps } => {
                    (None, Some(*steps_per_epoch), *noise_multiplier, steps.saturating_mul(count))
                }
                _ => continue,
            };
            let m = MechanismSummary {
                sampler: r.sampler,
                sample_rate,
                steps_per_epoch,
                noise_multiplier,
                clipping_norm: r.clipping_norm,
                noise: r.noise,
                sampler_seed: r.sampler_seed,
                steps,
                expected_batch_size: None,
                epochs: 0.0,
            };
            let key = |o: &MechanismSummary| {
                (
                    o.sampler,
                    o.sample_rate,
                    o.steps_per_epoch,
                    o.noise_multiplier,
                    o.clipping_norm,
                    o.noise,
                    o.sampler_seed,
                )
            };
            match out.iter_mut().find(|o| key(o) == key(&m)) {
                Some(o) => o.steps = o.steps.saturating_add(steps),
                None => out.push(m),
            }
        }
    }
    let n = ledger.header().dataset_size;
    for m in &mut out {
        (m.expected_batch_size, m.epochs) =
            scope::mechanism_shape(m.sampler, m.sample_rate, m.steps_per_epoch, m.steps, n);
    }
    out
}
