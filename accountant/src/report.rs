//! The privacy statement a reviewer signs off, made from a ledger alone.

use std::fmt::Write as _;

use serde::Serialize;

use crate::accountant::PrivacyAccountant;
use crate::conversion::EpsilonBound;
use crate::error::{ensure, Result, Valid};
use crate::event::{Adjacency, DpEvent};
use crate::kind::AccountantKind;
use crate::ledger::{Ledger, ModelRelease, NoiseSource, PrivacyTarget, SamplerKind, Seeding};
use crate::pld::{PldAccountant, PldEpsilon};
use crate::rdp::RdpAccountant;

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
    /// Steps taken with these parameters.
    pub steps: u64,
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
    /// Training set size, if declared.
    pub dataset_size: Option<u64>,
    /// The unit of privacy.
    pub adjacency: Adjacency,
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
        let mut caveats = record_caveats(ledger, &mechanisms);
        caveats.extend(delta_caveats(delta, delta_source, header.dataset_size));
        caveats.extend(accounting_caveats(&accounted, header.target, epsilon_at_target_delta, within_target));
        let (accountant_name, accountant_reference, conversion, conversion_reference) = method_text(accountant);
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
            adjacency: ledger.adjacency(),
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
            caveats,
        })
    }

    /// The statement as plain text.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "PRIVACY STATEMENT");
        let _ = writeln!(s, "{}", self.guarantee_sentence());
        let _ = writeln!(s);
        let _ = writeln!(s, "Protected unit:  {}", self.protected_unit());
        let _ = writeln!(s, "Total steps:     {}", self.total_steps);
        for m in &self.mechanisms {
            let _ = writeln!(s, "Mechanism:       {}", describe(m));
        }
        for r in &self.releases {
            let _ =
                writeln!(s, "Model released:  {} after {} steps, SHA-256 {}", r.file, r.after_steps, r.weights_sha256);
        }
        if let Some(t) = self.target {
            let _ = writeln!(s, "Declared budget: {}", self.target_sentence(t));
        }
        let _ = writeln!(s, "Accountant:      {}", self.accountant);
        let _ = writeln!(s, "                 {}", self.accountant_reference);
        let _ = writeln!(s, "Conversion:      {}", self.conversion);
        let _ = writeln!(s, "                 {}", self.conversion_reference);
        let _ = writeln!(s, "Orders:          {}; optimal order {}", self.orders, fmt_num(self.order));
        let _ = writeln!(s, "Side by side:    {}", self.side_by_side());
        let _ = writeln!(s, "Ledger:          {} entries, head {}", self.ledger_entries, self.ledger_head);
        let _ = writeln!(s, "Signature:       {}", self.signature_sentence());
        let _ = writeln!(s, "Written by:      {}{}", self.created_by, self.description_suffix());
        let _ = writeln!(s);
        if self.caveats.is_empty() {
            let _ = writeln!(s, "Caveats: none.");
        } else {
            let _ = writeln!(s, "Caveats:");
            for c in &self.caveats {
                let _ = writeln!(s, "  - {c}");
            }
        }
        s
    }

    /// The statement as Markdown.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# Privacy statement\n");
        let _ = writeln!(s, "{}\n", self.guarantee_sentence());
        let _ = writeln!(s, "| | |\n|---|---|");
        let _ = writeln!(s, "| Protected unit | {} |", self.protected_unit());
        let _ = writeln!(s, "| Epsilon | {} |", fmt_num(self.epsilon));
        let _ = writeln!(s, "| Delta | {:e} ({}) |", self.delta, delta_source_words(self.delta_source));
        let _ = writeln!(s, "| Total steps | {} |", self.total_steps);
        if let Some(t) = self.target {
            let _ = writeln!(s, "| Declared budget | {} |", self.target_sentence(t));
        }
        let _ = writeln!(s, "| Accountant | {} ({}) |", self.accountant, self.accountant_reference);
        let _ = writeln!(s, "| Conversion | {} ({}) |", self.conversion, self.conversion_reference);
        let _ = writeln!(s, "| Optimal RDP order | {} ({}) |", fmt_num(self.order), self.orders);
        let _ = writeln!(s, "| Side by side | {} |", self.side_by_side());
        for r in &self.releases {
            let _ = writeln!(
                s,
                "| Model released | `{}` after {} steps, SHA-256 `{}` |",
                r.file, r.after_steps, r.weights_sha256
            );
        }
        let _ = writeln!(s, "| Ledger | {} entries, head `{}` |", self.ledger_entries, self.ledger_head);
        let _ = writeln!(s, "| Signature | {} |", self.signature_sentence());
        let _ = writeln!(s, "| Written by | {}{} |", self.created_by, self.description_suffix());
        let _ = writeln!(s, "\n## Mechanisms\n");
        let _ = writeln!(s, "| Sampler | Sample rate | Noise multiplier | Clipping norm | Noise source | Steps |");
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for m in &self.mechanisms {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                sampler_words(m.sampler),
                m.sample_rate.map_or("-".to_string(), fmt_num),
                fmt_num(m.noise_multiplier),
                fmt_num(m.clipping_norm),
                noise_words(m.noise),
                m.steps
            );
        }
        let _ = writeln!(s, "\n## Caveats\n");
        if self.caveats.is_empty() {
            let _ = writeln!(s, "None.");
        }
        for c in &self.caveats {
            let _ = writeln!(s, "- {c}");
        }
        s
    }

    /// The statement as one JSON object (infinite epsilon is `null`).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub(crate) fn guarantee_sentence(&self) -> String {
        format!(
            "The training run recorded in this ledger is ({}, {:e})-differentially private over its {} steps, \
             protecting {}.",
            fmt_eps(self.epsilon),
            self.delta,
            self.total_steps,
            self.protected_unit()
        )
    }

    /// Both accountants' epsilons, and which one the statement uses.
    pub(crate) fn side_by_side(&self) -> String {
        let pld = match (self.epsilon_pld, self.epsilon_pld_lower) {
            (Some(e), Some(lo)) => {
                format!("PLD epsilon {} (the true epsilon is proven to be at least {})", fmt_eps(e), fmt_eps(lo))
            }
            _ => "PLD not computed".to_string(),
        };
        format!(
            "RDP epsilon {}; {pld}; at delta {:e}. The statement uses {}.",
            fmt_eps(self.epsilon_rdp),
            self.delta,
            self.statement_accountant.name().to_uppercase()
        )
    }

    /// Whether the statement is signed, and by which key.
    pub(crate) fn signature_sentence(&self) -> String {
        match &self.signature {
            Some(sig) if sig.trusted => {
                format!("signed (Ed25519) by the trusted key {}, over this head", sig.fingerprint)
            }
            Some(sig) => format!(
                "signed (Ed25519) by key {}, over this head; not checked against a key you trust (use --public-key)",
                sig.fingerprint
            ),
            None => "not signed (anchor the head, or sign it: dp-accountant sign)".to_string(),
        }
    }

    pub(crate) fn protected_unit(&self) -> String {
        match self.adjacency {
            Adjacency::AddOrRemoveOne => "each training example (add-or-remove-one adjacency)".into(),
            Adjacency::ReplaceOne => "each training example (replace-one adjacency)".into(),
        }
    }

    pub(crate) fn target_sentence(&self, t: PrivacyTarget) -> String {
        let verdict = match self.within_target {
            Some(true) => "met",
            _ => "EXCEEDED",
        };
        format!(
            "epsilon {} at delta {:e}: {verdict} (epsilon at that delta: {})",
            fmt_num(t.epsilon),
            t.delta,
            fmt_eps(self.epsilon_at_target_delta.unwrap_or(f64::NAN))
        )
    }

    pub(crate) fn description_suffix(&self) -> String {
        self.description.as_ref().map(|d| format!(" ({d})")).unwrap_or_default()
    }
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

/// Epsilon at the end against delta, `1e-12` to `1e-2`, log-spaced (31 points).
fn epsilon_by_delta(accountant: &dyn PrivacyAccountant) -> Result<Vec<(f64, f64)>> {
    (0..=30)
        .map(|k| {
            let d = 10f64.powf(-12.0 + 10.0 * f64::from(k) / 30.0);
            Ok((d, accountant.epsilon_at(d)?.epsilon))
        })
        .collect()
}

/// The ledger's steps in order, as segments `(event, copies)`: composed
/// events are opened up, so that a prefix ends inside at most one segment.
fn segments(ledger: &Ledger) -> Vec<(&DpEvent, u64)> {
    fn walk<'a>(event: &'a DpEvent, copies: u64, out: &mut Vec<(&'a DpEvent, u64)>) {
        match event {
            DpEvent::Composed { events } if copies == 1 => events.iter().for_each(|e| walk(e, 1, out)),
            DpEvent::SelfComposed { event, count } if copies == 1 => out.push((event, *count)),
            other => out.push((other, copies)),
        }
    }
    let mut out = Vec::new();
    for m in ledger.mechanisms() {
        walk(&m.event, 1, &mut out);
    }
    out
}

/// The first `steps` steps of `event` (fewer than it has), as an event.
fn first_steps(event: &DpEvent, steps: u64) -> DpEvent {
    match event {
        DpEvent::SelfComposed { event, count } => {
            let per = event.steps().max(1);
            let (whole, rest) = ((steps / per).min(*count), steps % per);
            let mut parts = vec![DpEvent::self_composed((**event).clone(), whole)];
            if rest > 0 && whole < *count {
                parts.push(first_steps(event, rest));
            }
            DpEvent::composed(parts)
        }
        DpEvent::Composed { events } => {
            let (mut parts, mut left) = (Vec::new(), steps);
            for e in events {
                if left == 0 {
                    break;
                }
                let n = e.steps();
                if n <= left {
                    parts.push(e.clone());
                    left -= n;
                } else {
                    parts.push(first_steps(e, left));
                    left = 0;
                }
            }
            DpEvent::composed(parts)
        }
        DpEvent::ShuffledFixedSizeBatches { noise_multiplier, steps_per_epoch, .. } => {
            DpEvent::shuffled_fixed_size_batches(*noise_multiplier, *steps_per_epoch, steps)
        }
        // A single release has no proper prefix but the empty one.
        _ => DpEvent::composed(Vec::new()),
    }
}

/// Epsilon after about 40 evenly spaced step counts: the steps before each
/// count composed (composed and repeated mechanisms cut exactly at it).
/// `running` is the empty accountant the prefixes are composed into.
fn epsilon_by_step(
    ledger: &Ledger,
    delta: f64,
    mut running: Box<dyn PrivacyAccountant>,
    max_points: u64,
) -> Result<Vec<(u64, f64)>> {
    let total = ledger.total_steps();
    let mut points = vec![(0, 0.0)];
    if total == 0 {
        return Ok(points);
    }
    let n_points = total.min(max_points.max(1));
    let segments = segments(ledger);
    let mut next = segments.iter().peekable();
    let mut done = 0u64;
    for j in 1..=n_points {
        // (Exact in u128: `total * j` overflows u64 for ledgers of 2^58 steps and more.)
        let target = (u128::from(total) * u128::from(j) / u128::from(n_points)) as u64;
        while let Some(&&(event, copies)) = next.peek() {
            let steps = event.steps().saturating_mul(copies);
            if steps > target - done {
                break;
            }
            running.compose(event, copies)?;
            done += steps;
            next.next();
        }
        let left = target - done;
        let epsilon = match next.peek() {
            Some(&&(event, copies)) if left > 0 => {
                let mut cut = running.clone();
                let per = event.steps().max(1);
                cut.compose(event, left / per)?;
                if left % per > 0 {
                    cut.compose(&first_steps(event, left % per), 1)?;
                }
                debug_assert!(left / per < copies);
                cut.epsilon_at(delta)?.epsilon
            }
            _ => running.epsilon_at(delta)?.epsilon,
        };
        points.push((target, epsilon));
    }
    Ok(points)
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
                steps,
            };
            let same = |o: &MechanismSummary| {
                (o.sampler, o.sample_rate, o.steps_per_epoch, o.noise_multiplier, o.clipping_norm, o.noise)
                    == (m.sampler, m.sample_rate, m.steps_per_epoch, m.noise_multiplier, m.clipping_norm, m.noise)
            };
            match out.iter_mut().find(|o| same(o)) {
                Some(o) => o.steps = o.steps.saturating_add(steps),
                None => out.push(m),
            }
        }
    }
    out
}

fn describe(m: &MechanismSummary) -> String {
    let sampling = match (m.sampler, m.sample_rate, m.steps_per_epoch) {
        (SamplerKind::Poisson, Some(q), _) => format!("Poisson sampling, q = {}", fmt_num(q)),
        (SamplerKind::ShuffledFixedSize, _, Some(k)) => format!("shuffled fixed-size batches, {k} steps per epoch"),
        _ => sampler_words(m.sampler).to_string(),
    };
    format!(
        "Gaussian noise, multiplier {} (std {} x C), clipping norm C = {}, {sampling}, {} steps; noise from {}",
        fmt_num(m.noise_multiplier),
        fmt_num(m.noise_multiplier),
        fmt_num(m.clipping_norm),
        m.steps,
        noise_words(m.noise)
    )
}

fn sampler_words(s: SamplerKind) -> &'static str {
    match s {
        SamplerKind::Poisson => "Poisson",
        SamplerKind::ShuffledFixedSize => "shuffled fixed-size batches",
        SamplerKind::FullBatch => "full batch",
    }
}

fn noise_words(n: NoiseSource) -> &'static str {
    match n.seed {
        Seeding::OsEntropy => "ChaCha20 seeded from OS entropy",
        Seeding::Fixed => "ChaCha20 with a FIXED seed",
    }
}

fn delta_source_words(d: DeltaSource) -> &'static str {
    match d {
        DeltaSource::Given => "given by the reviewer",
        DeltaSource::LedgerTarget => "the ledger's declared delta",
        DeltaSource::Default => "default: none given or declared",
    }
}

/// A number with 6 significant digits, without trailing noise; in
/// scientific notation below `1e-4` and from `1e6` on (never 300 digits).
pub(crate) fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    let s = format!("{x:.6e}");
    let v: f64 = s.parse().unwrap_or(x);
    if v != 0.0 && (v.abs() < 1e-4 || v.abs() >= 1e6) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

fn fmt_eps(x: f64) -> String {
    if x == f64::INFINITY {
        "infinity".into()
    } else {
        fmt_num(x)
    }
}
