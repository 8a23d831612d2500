//! The statement in words: plain text and Markdown, and the sentences every
//! format (HTML too) shares, so that they cannot drift apart.

use std::fmt::Write as _;

use crate::event::Adjacency;
use crate::ledger::{DistributedNoise, NoiseGenerator, NoiseSource, PrivacyTarget, SamplerKind, Seeding};

use super::scope::{AuditSummary, AuditVerdict};
use super::{DeltaSource, MechanismSummary, PrivacyReport};

/// Label width of the plain-text statement.
const LABEL: usize = 17;

impl PrivacyReport {
    /// The statement as plain text.
    pub fn to_text(&self) -> String {
        let mut s = String::from("PRIVACY STATEMENT\n");
        let _ = writeln!(s, "{}", self.guarantee_sentence());
        for failure in &self.failures {
            let _ = writeln!(s, "{failure}");
        }
        let _ = writeln!(s);
        for (label, text) in self.fact_lines() {
            let _ = writeln!(s, "{:<LABEL$}{text}", if label.is_empty() { String::new() } else { format!("{label}:") });
        }
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

    /// The statement's facts as `(label, text)` lines, in the order the text
    /// and Markdown forms print them (an empty label continues the line before).
    fn fact_lines(&self) -> Vec<(&'static str, String)> {
        let mut l: Vec<(&'static str, String)> = vec![
            ("Protected unit", self.protected_unit.clone()),
            ("User level", self.user_level_sentence()),
            ("Dataset size", self.dataset_sentence()),
            ("Expected batch", self.batch_sentence()),
            ("Epochs", self.epochs_sentence()),
            ("Total steps", self.total_steps.to_string()),
        ];
        for m in &self.mechanisms {
            l.push(("Mechanism", describe(m)));
        }
        if let Some(d) = self.distribution_sentence() {
            l.push(("Distributed", d));
        }
        l.push(("Noise sampler", self.noise_sampler.clone()));
        l.push(("Data", self.data_sentence()));
        for r in &self.releases {
            l.push((
                "Model released",
                format!("{} after {} steps, SHA-256 {}", r.file, r.after_steps, r.weights_sha256),
            ));
        }
        l.push(("Covers", self.coverage.to_string()));
        if let Some(t) = self.target {
            l.push(("Declared budget", self.target_sentence(t)));
        }
        for a in &self.audits {
            l.extend(audit_lines(a).into_iter().enumerate().map(|(k, t)| (if k == 0 { "Audit" } else { "" }, t)));
        }
        l.push(("Accountant", self.accountant.to_string()));
        l.push(("", self.accountant_reference.to_string()));
        l.push(("Conversion", self.conversion.to_string()));
        l.push(("", self.conversion_reference.to_string()));
        l.push(("Orders", format!("{}; optimal order {}", self.orders, fmt_num(self.order))));
        l.push(("Side by side", self.side_by_side()));
        l.push(("Ledger", format!("{} entries, head {}", self.ledger_entries, self.ledger_head)));
        l.push(("Anchored head", self.anchor_sentence()));
        l.push(("Signature", self.signature_sentence()));
        l.push(("Written by", format!("{}{}", self.created_by, self.description_suffix())));
        l.push(("Tuning", self.tuning.to_string()));
        l
    }

    /// The statement as Markdown.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# Privacy statement\n");
        let _ = writeln!(s, "{}\n", self.guarantee_sentence());
        for failure in &self.failures {
            let _ = writeln!(s, "**{failure}**\n");
        }
        let _ = writeln!(s, "| | |\n|---|---|");
        let _ = writeln!(s, "| Epsilon | {} |", fmt_num(self.epsilon));
        let _ = writeln!(s, "| Delta | {:e} ({}) |", self.delta, delta_source_words(self.delta_source));
        for (label, text) in self.fact_lines() {
            let _ = writeln!(s, "| {label} | {} |", md_cell(&text));
        }
        let _ = writeln!(s, "\n## Mechanisms\n");
        let _ = writeln!(
            s,
            "| Sampler | Sample rate | Expected batch | Noise multiplier | Clipping norm | Noise source | Batches drawn by \
             | Steps |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for m in &self.mechanisms {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                sampler_words(m.sampler),
                m.sample_rate.map_or("-".to_string(), fmt_num),
                m.expected_batch_size.map_or("-".to_string(), fmt_num),
                fmt_num(m.noise_multiplier),
                fmt_num(m.clipping_norm),
                noise_words(m.noise),
                sampler_seed_words(m.sampler, m.sampler_seed),
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

    pub(crate) fn guarantee_sentence(&self) -> String {
        format!(
            "The training run recorded in this ledger is ({}, {:e})-differentially private over its {} steps, \
             protecting {}.",
            fmt_eps(self.epsilon),
            self.delta,
            self.total_steps,
            self.protected_unit_words()
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

    /// Whether the head was checked against one the reviewer holds.
    pub(crate) fn anchor_sentence(&self) -> String {
        match &self.head_verified_against {
            Some(h) => format!("verified against head {h}, the head you hold: this statement is about that ledger"),
            None => "not checked against a head held elsewhere (pass --expect-head HEX)".to_string(),
        }
    }

    /// The unit in the guarantee sentence.
    pub(crate) fn protected_unit_words(&self) -> String {
        match self.adjacency {
            Adjacency::AddOrRemoveOne => "each training example (add-or-remove-one adjacency)".into(),
            Adjacency::ReplaceOne => "each training example (replace-one adjacency)".into(),
        }
    }

    pub(crate) fn user_level_sentence(&self) -> String {
        match &self.user_level {
            None => "not computed: pass --max-examples-per-user K (the most examples one person contributed) for a \
                     bound by group privacy"
                .to_string(),
            Some(u) if u.vacuous => format!(
                "a person with up to K = {} examples: group privacy gives ({}, {})-DP, which says nothing; a \
                 user-level guarantee needs user-level clipping and accounting",
                u.max_examples_per_user,
                fmt_eps(u.epsilon),
                fmt_num(u.delta)
            ),
            Some(u) => format!(
                "a person with up to K = {} examples is protected at ({}, {})-DP, by group privacy \
                 (K epsilon, K e^((K-1) epsilon) delta; Vadhan 2017, Lemma 2.2): a conservative bound",
                u.max_examples_per_user,
                fmt_eps(u.epsilon),
                fmt_num(u.delta)
            ),
        }
    }

    pub(crate) fn dataset_sentence(&self) -> String {
        match self.dataset_size {
            Some(n) => format!("N = {n} examples, as the run declared (any canaries included)"),
            None => "not declared by the run".to_string(),
        }
    }

    pub(crate) fn batch_sentence(&self) -> String {
        match (self.expected_batch_size, self.dataset_size) {
            (Some(b), _) => format!("{} examples per step", fmt_num(b)),
            (None, None) => "unknown (the dataset size is not declared)".to_string(),
            (None, Some(_)) if self.mechanisms.len() > 1 => "varies between mechanisms (see each)".to_string(),
            (None, Some(_)) => "not recorded (fixed-size batches)".to_string(),
        }
    }

    pub(crate) fn epochs_sentence(&self) -> String {
        format!("{} (expected passes over the data)", fmt_num(self.epochs))
    }

    pub(crate) fn data_sentence(&self) -> String {
        match &self.data {
            Some(d) => format!(
                "the guarantee is about the data with SHA-256 {} ({:?}, {} bytes, {} rows)",
                d.sha256, d.name, d.bytes, d.rows
            ),
            None => "no data provenance recorded: the ledger does not say which data the guarantee is about".into(),
        }
    }

    /// How a distributed run spread its steps over processes, in words; none
    /// for a one-process run (whose statement says nothing about it).
    pub(crate) fn distribution_sentence(&self) -> Option<String> {
        let first = self.distributed.first()?;
        let noise = first.noise_placement;
        let mut rates: Vec<f64> = self.mechanisms.iter().filter_map(|m| m.sample_rate).collect();
        rates.sort_by(f64::total_cmp);
        rates.dedup();
        let sampling = if self.mechanisms.iter().any(|m| m.sampler != SamplerKind::Poisson) {
            "each holding a disjoint shard of the data; some steps' batches are not Poisson samples (see the \
             caveats)"
                .to_string()
        } else {
            let rate = match rates.as_slice() {
                [q] => format!("q = {}", fmt_num(*q)),
                _ => "q (each step's, as recorded)".to_string(),
            };
            format!(
                "each holding a disjoint shard of the data and sampling its own examples independently at the \
                 same rate {rate}, so that the global batch is the Poisson batch of the whole dataset that the \
                 accounting assumes"
            )
        };
        let noise = match noise {
            DistributedNoise::OncePerCoordinate => {
                "the noise was added once per coordinate: each process drew a disjoint slice of one Gaussian \
                 noise vector, summed with the clipped gradients, so every coordinate received noise of standard \
                 deviation sigma C (the recorded noise multiplier times the clipping norm) exactly once. The \
                 guarantee is the same as a one-process run's"
            }
        };
        let total: u64 = self.mechanisms.iter().map(|m| m.steps).sum();
        let spans = &self.distributed;
        let when = match spans.as_slice() {
            [only] if only.first_step == 1 && only.last_step == total => {
                format!("training ran on {} {}", only.world_size, processes(only.world_size))
            }
            _ => {
                let parts: Vec<String> = spans
                    .iter()
                    .map(|s| {
                        format!(
                            "steps {}-{} on {} {}",
                            s.first_step,
                            s.last_step,
                            s.world_size,
                            processes(s.world_size)
                        )
                    })
                    .collect();
                let in_spans: u64 = spans.iter().map(|s| s.last_step - s.first_step + 1).sum();
                let rest = if in_spans < total { " (the other steps in one process)" } else { "" };
                format!("training ran {}{rest}", parts.join(", "))
            }
        };
        Some(format!("{when} in data parallel, {sampling}; {noise}"))
    }

    pub(crate) fn target_sentence(&self, t: PrivacyTarget) -> String {
        target_sentence(t, self.within_target, self.epsilon_at_target_delta)
    }

    pub(crate) fn description_suffix(&self) -> String {
        self.description.as_ref().map(|d| format!(" ({d})")).unwrap_or_default()
    }
}

/// The declared budget, met or not.
fn target_sentence(t: PrivacyTarget, within: Option<bool>, epsilon_at_target_delta: Option<f64>) -> String {
    let verdict = match within {
        Some(true) => "met",
        _ => "EXCEEDED",
    };
    format!(
        "epsilon {} at delta {:e}: {verdict} (epsilon at that delta: {})",
        fmt_num(t.epsilon),
        t.delta,
        fmt_eps(epsilon_at_target_delta.unwrap_or(f64::NAN))
    )
}

/// What makes a statement fail, one sentence each: an exceeded budget, an
/// audit that found more leakage than the accountant allows.
pub(crate) fn failures(
    target: Option<PrivacyTarget>,
    within: Option<bool>,
    epsilon_at_target_delta: Option<f64>,
    audits: &[AuditSummary],
) -> Vec<String> {
    let mut out = Vec::new();
    if let (Some(t), Some(false)) = (target, within) {
        out.push(format!(
            "FAILURE: the declared budget is EXCEEDED ({}).",
            target_sentence(t, within, epsilon_at_target_delta)
        ));
    }
    for a in audits.iter().filter(|a| a.failed()) {
        out.push(format!("FAILURE: {}.", audit_verdict_sentence(a)));
    }
    out
}

/// What epsilon and epsilon-hat mean, in one sentence each.
pub(crate) const AUDIT_MEANING: &str = "epsilon is the accountant's proven upper bound on what any run with these \
     settings can leak about any example; epsilon-hat is what this run demonstrably leaked about its canaries, a \
     lower bound at the stated confidence. epsilon-hat <= epsilon is expected (canaries are not the worst case, so \
     a small epsilon-hat does not show the bound is tight); epsilon-hat > epsilon means the run leaked more than \
     claimed: a failure (a bug in clipping, noise, sampling or accounting).";

/// The audit's lines: what was found, against what, and the verdict.
pub(crate) fn audit_lines(a: &AuditSummary) -> Vec<String> {
    let r = &a.record;
    vec![
        format!(
            "one-run canary audit after {} steps (Steinke, Nasr & Jagielski 2023; f-DP: Mahloujifar, Melis & \
             Chaudhuri 2025)",
            r.after_steps
        ),
        format!(
            "epsilon     = {} (the accountant's upper bound at delta {:e})",
            fmt_eps(a.epsilon_upper_bound),
            r.delta
        ),
        format!(
            "epsilon-hat = {} ((epsilon, delta) audit), {} (f-DP audit, Gaussian curves, mu {}), at {}% confidence",
            fmt_lower(r.epsilon_lower_bound),
            fmt_lower(r.epsilon_lower_bound_fdp),
            fmt_lower(r.mu_fdp),
            fmt_num(100.0 * a.confidence)
        ),
        format!(
            "{} canaries, {} guesses, {} correct, alpha = {}; canaries included by a generator {}; the dataset \
             size counts the included canaries",
            r.canaries,
            r.guesses,
            r.correct,
            fmt_num(r.alpha),
            seeding_words(r.inclusion_seed)
        ),
        audit_verdict_sentence(a),
        AUDIT_MEANING.to_string(),
    ]
}

/// The audit's verdict in one sentence.
pub(crate) fn audit_verdict_sentence(a: &AuditSummary) -> String {
    let r = &a.record;
    let up = fmt_eps(a.epsilon_upper_bound);
    match a.verdict {
        AuditVerdict::Consistent => {
            format!("consistent: epsilon-hat <= epsilon after {} steps, as expected", r.after_steps)
        }
        AuditVerdict::Exceeded => format!(
            "the audit after {} steps FAILED: epsilon-hat {} exceeds the accountant's epsilon {up}: the run leaked \
             more than claimed",
            r.after_steps,
            fmt_lower(r.epsilon_lower_bound)
        ),
        AuditVerdict::ExceededFdp => format!(
            "the audit after {} steps FAILED: the f-DP epsilon-hat {} exceeds the accountant's epsilon {up} (a bound \
             that assumes Gaussian-shaped privacy curves): the run may have leaked more than claimed",
            r.after_steps,
            fmt_lower(r.epsilon_lower_bound_fdp)
        ),
    }
}

/// A Markdown table cell: pipes escaped.
fn md_cell(text: &str) -> String {
    text.replace('|', "\\|")
}

pub(crate) fn describe(m: &MechanismSummary) -> String {
    let sampling = match (m.sampler, m.sample_rate, m.steps_per_epoch) {
        (SamplerKind::Poisson, Some(q), _) => format!(
            "Poisson sampling (each example in each step's batch independently with probability q = {}{})",
            fmt_num(q),
            m.expected_batch_size.map(|b| format!(", expected batch size {}", fmt_num(b))).unwrap_or_default()
        ),
        (SamplerKind::ShuffledFixedSize, _, Some(k)) => format!(
            "shuffled fixed-size batches (the data shuffled once per epoch and cut into {k} batches of a fixed size)"
        ),
        _ => sampler_words(m.sampler).to_string(),
    };
    format!(
        "Gaussian noise, multiplier {} (std {} x C), clipping norm C = {}, {sampling}, {} steps; noise from a {}; \
         batches drawn by a generator {}",
        fmt_num(m.noise_multiplier),
        fmt_num(m.noise_multiplier),
        fmt_num(m.clipping_norm),
        m.steps,
        noise_words(m.noise),
        sampler_seed_words(m.sampler, m.sampler_seed)
    )
}

/// "process" or "processes", for `n` of them.
pub(crate) fn processes(n: u64) -> &'static str {
    if n == 1 {
        "process"
    } else {
        "processes"
    }
}

/// The sampler in words.
pub(crate) fn sampler_words(s: SamplerKind) -> &'static str {
    match s {
        SamplerKind::Poisson => "Poisson sampling (each example independently in each step)",
        SamplerKind::ShuffledFixedSize => "shuffled fixed-size batches (one shuffle per epoch)",
        SamplerKind::FullBatch => "full batch (every example in every step)",
    }
}

/// The noise generator and its seeding in words.
pub(crate) fn noise_words(n: NoiseSource) -> String {
    let generator = match n.generator {
        NoiseGenerator::Chacha20 => "ChaCha20 (RFC 8439) cryptographically secure generator",
    };
    format!("{generator}, {}", seeding_words(n.seed))
}

/// How a generator was seeded, in words.
pub(crate) fn seeding_words(s: Seeding) -> &'static str {
    match s {
        Seeding::OsEntropy => "seeded from the operating system's entropy",
        Seeding::Fixed => "seeded with a FIXED seed the user chose (whoever knows it can reproduce its output)",
    }
}

/// How the batches were drawn, in words (a full batch draws nothing).
pub(crate) fn sampler_seed_words(sampler: SamplerKind, s: Seeding) -> &'static str {
    match sampler {
        SamplerKind::FullBatch => "(none: every example in every step)",
        _ => seeding_words(s),
    }
}

pub(crate) fn delta_source_words(d: DeltaSource) -> &'static str {
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

pub(crate) fn fmt_eps(x: f64) -> String {
    if x == f64::INFINITY {
        "infinity".into()
    } else {
        fmt_num(x)
    }
}

/// A lower bound for people: rounded *down* to 3 decimals, so that the
/// digits shown never claim more than was found (JSON has every digit).
pub(crate) fn fmt_lower(x: f64) -> String {
    if !x.is_finite() {
        return fmt_eps(x);
    }
    format!("{:.3}", (x * 1000.0).floor() / 1000.0)
}
