//! What a statement covers besides its epsilon: the unit it protects and a
//! user-level bound, the shape of the training (N, batch size, epochs), the
//! audits beside it, and how its noise was drawn.

use serde::Serialize;

use crate::accountant::PrivacyAccountant;
use crate::error::{ensure, Result, Valid};
use crate::event::Adjacency;
use crate::kind::AccountantKind;
use crate::ledger::{AuditRecord, Ledger, SamplerKind};
use crate::pld::PldAccountant;
use crate::rdp::RdpAccountant;

use super::curves::compose_prefix;
use super::{MechanismSummary, REPORT_PLD_MAX_WORK};

/// Which checkpoints the guarantee covers.
///
/// Every model state of the run is computed from the noisy gradients
/// released at the steps before it (and from public choices), so it is a
/// post-processing of the mechanisms the ledger records and carries the same
/// guarantee (Dwork & Roth 2014, "The Algorithmic Foundations of
/// Differential Privacy", Prop. 2.1), at the steps it saw.
pub(crate) const COVERAGE: &str = "every intermediate model state and checkpoint of the run, not only the final \
     model: each is computed from the noisy gradients released at the steps before it (post-processing, Dwork & \
     Roth 2014, Prop. 2.1), so it is covered by the guarantee of those steps, hence by this one";

/// What tuning on the same data costs.
pub(crate) const TUNING: &str = "this statement covers one training run. Hyper-parameter tuning on the same data \
     costs privacy too: if several runs were tried (learning rates, noise, epochs) and one was chosen, account for \
     all of them, by composing every run's ledger, or by running a random number of trials as in Papernot & \
     Steinke, \"Hyperparameter Tuning with Renyi Differential Privacy\" (ICLR 2022, arXiv:2110.03620) and applying \
     their bound for the whole search";

/// The Gaussian sampler of candle-dp, as its `kernels/gaussian.rs` documents it.
const CANDLE_DP_SAMPLER: &str = "candle-dp's sampler: each Gaussian value is drawn from a counter-based ChaCha20 \
     keystream (the sum of two Box-Muller draws from disjoint words, after Holohan & Braghin 2021), and is within \
     2.7e-20 in total variation of an exact Gaussian (its uniforms are cut at 2^-65; floating-point rounding aside); \
     that distance, times the values drawn, is not included in the stated delta";

/// The protected unit in words, with what it is not.
pub(crate) fn protected_unit_sentence(adjacency: Adjacency) -> String {
    let neighbours = match adjacency {
        Adjacency::AddOrRemoveOne => "add-or-remove-one adjacency: the run with and without any one example",
        Adjacency::ReplaceOne => "replace-one adjacency: the run with any one example replaced by another",
    };
    format!(
        "one training example ({neighbours}), NOT one person: a person who contributed several examples is \
         protected only as a group (see the user-level bound)"
    )
}

/// How the Gaussian values were drawn, as far as the ledger's writer tells.
pub(crate) fn gaussian_sampler_sentence(created_by: &str) -> String {
    if created_by.starts_with("candle-dp") {
        CANDLE_DP_SAMPLER.to_string()
    } else {
        format!(
            "the ledger's writer ({created_by:?}) is not candle-dp, so this report does not know how its Gaussian \
             values were drawn; the accounting assumes exact Gaussian noise"
        )
    }
}

/// The guarantee for a person who contributed up to `max_examples_per_user`
/// examples, by group privacy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UserLevelBound {
    /// `K`: the most examples one person contributed (an integer >= 1).
    pub max_examples_per_user: u64,
    /// `K epsilon` (infinite if epsilon is).
    pub epsilon: f64,
    /// `K e^((K - 1) epsilon) delta`, capped at 1.
    pub delta: f64,
    /// Whether the bound says nothing (`delta` reaches 1 or `epsilon` is infinite).
    pub vacuous: bool,
}

impl UserLevelBound {
    /// The group-privacy bound for `k` examples per person from an
    /// `(epsilon, delta)` statement about one example.
    ///
    /// # Formula
    /// `(K epsilon, K e^((K - 1) epsilon) delta)`. Datasets that differ in
    /// one person's `K` examples are joined by a chain of `K` neighbours;
    /// applying the `(epsilon, delta)` inequality along it gives
    /// `P[M(x) in S] <= e^(K epsilon) P[M(x') in S] + delta sum_{j < K} e^(j epsilon)`,
    /// and the sum is at most `K e^((K - 1) epsilon)`.
    ///
    /// # Reference
    /// Vadhan 2017, "The Complexity of Differential Privacy", Lemma 2.2
    /// (group privacy); Dwork & Roth 2014, Thm 2.2 for pure DP.
    ///
    /// # Numerics
    /// `delta` in log space (`ln K + (K - 1) epsilon + ln delta`), capped
    /// at 1, so no overflow for any `K`. Conservative: tighter user-level
    /// bounds exist (group privacy in RDP, or user-level clipping, which
    /// bounds a person's whole contribution per step).
    ///
    /// # Errors
    /// [`crate::Error::InvalidParameter`] (`max_examples_per_user`) unless
    /// `k >= 1`.
    pub fn new(k: u64, epsilon: f64, delta: f64) -> Result<Self> {
        ensure("max_examples_per_user", k as f64, Valid::AtLeastOne)?;
        let kf = k as f64;
        let (epsilon, delta) = if k == 1 {
            (epsilon, delta)
        } else {
            let log_delta = kf.ln() + (kf - 1.0) * epsilon + delta.ln();
            (kf * epsilon, if log_delta >= 0.0 { 1.0 } else { log_delta.exp() })
        };
        let vacuous = delta >= 1.0 || !epsilon.is_finite();
        Ok(Self { max_examples_per_user: k, epsilon, delta, vacuous })
    }
}

/// How an audit compares with the accountant's bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditVerdict {
    /// Both lower bounds are at most the accountant's epsilon: as expected.
    Consistent,
    /// The `(epsilon, delta)` audit's lower bound, which assumes nothing
    /// about the mechanism, exceeds the accountant's epsilon: the run leaked
    /// more than claimed. A failure.
    Exceeded,
    /// Only the f-DP audit's lower bound exceeds it. That bound assumes the
    /// privacy curve is Gaussian-shaped; still a failure to investigate.
    ExceededFdp,
}

/// An audit the ledger records, beside the accountant's bound for the same
/// steps at the same delta.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditSummary {
    /// The audit as recorded.
    #[serde(flatten)]
    pub record: AuditRecord,
    /// `1 - alpha`: the confidence of each lower bound.
    pub confidence: f64,
    /// The accountant's proven upper bound on epsilon at the audit's delta
    /// after its `after_steps` steps, by the statement's accountant (0 after
    /// no step; infinite at delta 0, which no Gaussian meets).
    pub epsilon_upper_bound: f64,
    /// How the lower bounds compare with it.
    pub verdict: AuditVerdict,
}

impl AuditSummary {
    /// Whether the audit contradicts the accountant.
    pub fn failed(&self) -> bool {
        self.verdict != AuditVerdict::Consistent
    }
}

/// Each audit of the ledger beside its upper bound. `full` is the whole
/// ledger composed by the statement's accountant (`kind`).
pub(super) fn audit_summaries(
    ledger: &Ledger,
    kind: AccountantKind,
    full: &dyn PrivacyAccountant,
) -> Result<Vec<AuditSummary>> {
    ledger
        .audits()
        .map(|a| {
            let upper = if a.after_steps == 0 {
                0.0
            } else if a.delta <= 0.0 {
                f64::INFINITY
            } else if a.after_steps == ledger.total_steps() {
                full.epsilon_at(a.delta)?.epsilon
            } else {
                let empty: Box<dyn PrivacyAccountant> = match kind {
                    AccountantKind::Rdp => Box::new(RdpAccountant::new(ledger.adjacency())),
                    AccountantKind::Pld => {
                        Box::new(PldAccountant::new(ledger.adjacency()).with_max_work(REPORT_PLD_MAX_WORK)?)
                    }
                };
                compose_prefix(ledger, a.after_steps, empty)?.epsilon_at(a.delta)?.epsilon
            };
            let verdict = if a.epsilon_lower_bound > upper {
                AuditVerdict::Exceeded
            } else if a.epsilon_lower_bound_fdp > upper {
                AuditVerdict::ExceededFdp
            } else {
                AuditVerdict::Consistent
            };
            Ok(AuditSummary { record: a.clone(), confidence: 1.0 - a.alpha, epsilon_upper_bound: upper, verdict })
        })
        .collect()
}

/// `(expected batch size, epochs)` of `steps` steps of one mechanism on `n`
/// examples: `q N` and `q steps` (Poisson), `N` and `steps` (full batch),
/// none and `steps / steps_per_epoch` (shuffled fixed-size batches, whose
/// batch size the event does not record).
pub(super) fn mechanism_shape(
    sampler: SamplerKind,
    sample_rate: Option<f64>,
    steps_per_epoch: Option<u64>,
    steps: u64,
    n: Option<u64>,
) -> (Option<f64>, f64) {
    let n = n.map(|n| n as f64);
    match (sampler, sample_rate, steps_per_epoch) {
        (SamplerKind::Poisson, Some(q), _) => (n.map(|n| q * n), q * steps as f64),
        (SamplerKind::ShuffledFixedSize, _, Some(k)) => (None, steps as f64 / k.max(1) as f64),
        (SamplerKind::FullBatch, _, _) => (n, steps as f64),
        _ => (None, 0.0),
    }
}

/// `(expected batch size, epochs)` of the whole run: the batch size when
/// every mechanism has the same one, and the epochs summed.
pub(super) fn training_shape(mechanisms: &[MechanismSummary]) -> (Option<f64>, f64) {
    let epochs = mechanisms.iter().map(|m| m.epochs).sum();
    let first = mechanisms.first().and_then(|m| m.expected_batch_size);
    let same = mechanisms.iter().all(|m| m.expected_batch_size == first);
    (if same { first } else { None }, epochs)
}
