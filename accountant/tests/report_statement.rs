//! The statement says what it covers: the audit beside the accountant, the
//! protected unit and a user-level bound, the checkpoints, the data, the
//! training's shape, the head checked, tuning, and the noise in words.

mod common;

use common::{poisson_record, sample_ledger};
use dp_accountant::audit::OneRunAudit;
use dp_accountant::ledger::DataProvenance;
use dp_accountant::{
    AccountantKind, Adjacency, AuditVerdict, DpEvent, Ledger, LedgerError, LedgerHeader, MechanismRecord,
    PldAccountant, PrivacyReport, PrivacyTarget, RdpAccountant, SamplerKind, Seeding,
};
use serde_json::Value;

/// An audit result as `audit_one_run` would return it, with the bounds given.
fn audit(epsilon: f64, epsilon_fdp: f64, delta: f64) -> OneRunAudit {
    OneRunAudit {
        epsilon,
        p_value: 0.001,
        canaries: 1000,
        guesses: 100,
        correct: 93,
        candidates: 7,
        alpha: 0.05,
        delta,
        epsilon_fdp,
        mu_fdp: 0.4,
        fdp_guesses: 100,
        fdp_correct: 93,
    }
}

fn audited(epsilon: f64, epsilon_fdp: f64) -> Ledger {
    let mut ledger = sample_ledger();
    ledger.append_audit(&audit(epsilon, epsilon_fdp, 1e-5), Seeding::OsEntropy).unwrap();
    ledger
}

fn json(r: &PrivacyReport) -> Value {
    serde_json::from_str(&r.to_json()).unwrap()
}

#[test]
fn a_consistent_audit_is_shown_beside_epsilon_in_every_format() {
    let r = PrivacyReport::from_ledger(&audited(0.812, 1.204), None).unwrap();
    assert_eq!(r.audits.len(), 1);
    let a = &r.audits[0];
    // The audit covers the whole run at the statement's delta: its upper bound is the statement's epsilon.
    assert_eq!(a.epsilon_upper_bound, r.epsilon);
    assert_eq!(a.verdict, AuditVerdict::Consistent);
    assert_eq!(a.confidence, 1.0 - 0.05);
    assert!(r.failures.is_empty() && r.caveats.is_empty(), "{:?} {:?}", r.failures, r.caveats);
    let text = r.to_text();
    for needle in [
        "epsilon-hat = 0.812 ((epsilon, delta) audit), 1.204 (f-DP audit",
        "at 95% confidence",
        "1000 canaries, 100 guesses, 93 correct, alpha = 0.05",
        "the dataset size counts the included canaries",
        "consistent: epsilon-hat <= epsilon after 674 steps",
        "epsilon-hat > epsilon means the run leaked more than claimed",
        "canaries included by a generator seeded from the operating system's entropy",
    ] {
        assert!(text.contains(needle), "text lacks {needle:?}:\n{text}");
    }
    assert!(!text.contains("FAILURE"), "{text}");
    let v = json(&r);
    assert_eq!(v["audits"][0]["verdict"], "consistent");
    assert_eq!(v["audits"][0]["epsilon_lower_bound"].as_f64(), Some(0.812));
    assert_eq!(v["audits"][0]["epsilon_lower_bound_fdp"].as_f64(), Some(1.204));
    assert_eq!(v["audits"][0]["epsilon_upper_bound"].as_f64(), Some(r.epsilon));
    assert_eq!(v["audits"][0]["canaries"], 1000);
    assert_eq!(v["failures"], Value::Array(vec![]));
    let html = r.to_html();
    assert!(html.contains("<h2>Empirical audit</h2>") && html.contains("<p class=\"audit\">"), "{html}");
    assert!(!html.contains("fail\""), "a consistent audit is not drawn as a failure");
    assert!(r.to_markdown().contains("epsilon-hat = 0.812"));
}

#[test]
fn an_audit_above_epsilon_is_a_failure_in_every_format() {
    let r = PrivacyReport::from_ledger(&audited(40.0, 41.0), None).unwrap();
    assert_eq!(r.audits[0].verdict, AuditVerdict::Exceeded);
    assert_eq!(r.failures.len(), 1, "{:?}", r.failures);
    assert!(r.failures[0].contains("FAILED: epsilon-hat 40.000 exceeds the accountant's epsilon"), "{:?}", r.failures);
    assert!(r.caveats.iter().any(|c| c.contains("The empirical audit FAILED")), "{:?}", r.caveats);
    assert!(r.to_text().lines().nth(2).unwrap().starts_with("FAILURE:"), "the failure follows the claim");
    let v = json(&r);
    assert_eq!(v["audits"][0]["verdict"], "exceeded");
    assert_eq!(v["failures"].as_array().unwrap().len(), 1);
    let html = r.to_html();
    assert!(html.contains("<p class=\"claim fail\">") && html.contains("<p class=\"audit fail\">"));
    assert!(r.to_markdown().contains("**FAILURE:"));

    // Only the f-DP bound above epsilon: a failure of its own kind.
    let r = PrivacyReport::from_ledger(&audited(0.5, 40.0), None).unwrap();
    assert_eq!(r.audits[0].verdict, AuditVerdict::ExceededFdp);
    assert!(r.failures[0].contains("f-DP epsilon-hat 40.000"), "{:?}", r.failures);
    assert_eq!(json(&r)["audits"][0]["verdict"], "exceeded_fdp");
}

#[test]
fn an_audit_is_checked_against_the_steps_it_saw_at_its_delta() {
    // 200 steps, the audit (at delta 1e-6), 250 more steps.
    let mut ledger = Ledger::new(Default::default());
    ledger.append(poisson_record(0.0445, 1.9, 200)).unwrap();
    ledger.append_audit(&audit(0.3, 0.4, 1e-6), Seeding::Fixed).unwrap();
    ledger.append(poisson_record(0.0445, 1.9, 250)).unwrap();
    let direct = |acc: &mut dyn dp_accountant::PrivacyAccountant| {
        acc.compose(&DpEvent::poisson_sampled_gaussian(0.0445, 1.9), 200).unwrap();
        acc.epsilon_at(1e-6).unwrap().epsilon
    };
    let r = PrivacyReport::from_ledger(&ledger, Some(1e-5)).unwrap();
    assert_eq!(r.audits[0].epsilon_upper_bound, direct(&mut RdpAccountant::new(Adjacency::AddOrRemoveOne)));
    assert!(r.audits[0].epsilon_upper_bound < r.epsilon, "fewer steps, and yet a smaller delta");
    assert!(r.to_text().contains("seeded with a FIXED seed"), "the inclusion seed in words");
    let r = PrivacyReport::from_ledger_with(&ledger, Some(1e-5), AccountantKind::Pld).unwrap();
    assert_eq!(r.audits[0].epsilon_upper_bound, direct(&mut PldAccountant::new(Adjacency::AddOrRemoveOne)));

    // Before any step nothing was released (bound 0); at delta 0 no Gaussian is private (bound infinite).
    let mut ledger = Ledger::new(Default::default());
    ledger.append_audit(&audit(0.0, 0.0, 1e-5), Seeding::OsEntropy).unwrap();
    ledger.append(poisson_record(0.01, 1.0, 10)).unwrap();
    ledger.append_audit(&audit(3.0, 3.0, 0.0), Seeding::OsEntropy).unwrap();
    let r = PrivacyReport::from_ledger(&ledger, Some(1e-5)).unwrap();
    assert_eq!(r.audits[0].epsilon_upper_bound, 0.0);
    assert_eq!(r.audits[0].verdict, AuditVerdict::Consistent);
    assert_eq!(r.audits[1].epsilon_upper_bound, f64::INFINITY);
    assert_eq!(r.audits[1].verdict, AuditVerdict::Consistent);
}

#[test]
fn the_protected_unit_is_one_example_not_one_person() {
    let r = PrivacyReport::from_ledger(&sample_ledger(), None).unwrap();
    assert!(r.protected_unit.starts_with("one training example (add-or-remove-one adjacency"));
    assert!(r.protected_unit.contains("NOT one person"), "{}", r.protected_unit);
    assert!(r.user_level.is_none());
    assert!(r.to_text().contains("User level:      not computed: pass --max-examples-per-user K"));
    assert_eq!(json(&r)["protected_unit"], Value::from(r.protected_unit.clone()));
    let mut replace = Ledger::new(Default::default());
    replace
        .append(MechanismRecord {
            event: DpEvent::shuffled_fixed_size_batches(2.0, 10, 30),
            adjacency: Adjacency::ReplaceOne,
            sampler: SamplerKind::ShuffledFixedSize,
            ..poisson_record(0.1, 1.0, 1)
        })
        .unwrap();
    let r = PrivacyReport::from_ledger(&replace, Some(1e-5)).unwrap();
    assert!(r.protected_unit.starts_with("one training example (replace-one adjacency"), "{}", r.protected_unit);
}

#[test]
fn the_user_level_bound_is_group_privacy() {
    let base = PrivacyReport::from_ledger(&sample_ledger(), None).unwrap();
    let (eps, delta) = (base.epsilon, base.delta);
    let one = base.clone().with_max_examples_per_user(1).unwrap().user_level.unwrap();
    assert_eq!((one.epsilon, one.delta, one.vacuous), (eps, delta, false));
    let r = base.clone().with_max_examples_per_user(3).unwrap();
    let u = r.user_level.clone().unwrap();
    assert_eq!(u.max_examples_per_user, 3);
    assert_eq!(u.epsilon, 3.0 * eps);
    // K e^((K-1) eps) delta, computed in logs: equal to about 1e-15 relative.
    let expected = 3.0 * (2.0 * eps).exp() * delta;
    assert!(((u.delta - expected) / expected).abs() < 1e-13, "{} vs {expected}", u.delta);
    assert!(!u.vacuous);
    let text = r.to_text();
    assert!(text.contains("a person with up to K = 3 examples is protected at ("), "{text}");
    assert!(text.contains("a conservative bound") && text.contains("Vadhan 2017, Lemma 2.2"), "{text}");
    let v = json(&r);
    assert_eq!(v["user_level"]["max_examples_per_user"], 3);
    assert_eq!(v["user_level"]["epsilon"].as_f64(), Some(3.0 * eps));
    assert!(r.to_html().contains("a person with up to K = 3 examples"));
    // Large K: the delta reaches 1 and the bound says nothing, which the statement says.
    let big = base.clone().with_max_examples_per_user(1000).unwrap();
    let u = big.user_level.clone().unwrap();
    assert!(u.vacuous && u.delta == 1.0, "{u:?}");
    assert!(big.to_text().contains("which says nothing"));
    let err = base.with_max_examples_per_user(0).unwrap_err();
    assert_eq!(err.to_string(), "max_examples_per_user = 0: must be an integer >= 1");
}

#[test]
fn every_checkpoint_is_covered_and_tuning_is_not() {
    let r = PrivacyReport::from_ledger(&sample_ledger(), None).unwrap();
    for out in [r.to_text(), r.to_markdown(), r.to_html(), r.to_json()] {
        assert!(out.contains("every intermediate model state and checkpoint of the run, not only the final model"));
        assert!(out.contains("post-processing"));
        assert!(out.contains("Hyper-parameter tuning on the same data costs privacy too"));
        assert!(out.contains("Papernot") && out.contains("arXiv:2110.03620"));
    }
    let v = json(&r);
    assert!(v["coverage"].as_str().unwrap().contains("checkpoint"));
    assert!(v["tuning"].as_str().unwrap().contains("composing every run's ledger"));
}

#[test]
fn the_statement_names_its_data_or_says_it_cannot() {
    let data = DataProvenance::of_bytes("digits.csv", b"0,1,2\n", 1797).unwrap();
    let mut ledger = Ledger::new(LedgerHeader { data: Some(data.clone()), ..sample_ledger().header().clone() });
    ledger.append(poisson_record(0.0445, 1.9, 10)).unwrap();
    let r = PrivacyReport::from_ledger(&ledger, None).unwrap();
    let sentence = format!("the guarantee is about the data with SHA-256 {}", data.sha256);
    for out in [r.to_text(), r.to_markdown()] {
        assert!(out.contains(&sentence) && out.contains("\"digits.csv\", 6 bytes, 1797 rows"), "{out}");
    }
    let html = r.to_html();
    assert!(html.contains(&sentence) && html.contains("&quot;digits.csv&quot;, 6 bytes, 1797 rows"), "{html}");
    assert_eq!(json(&r)["data"]["sha256"], Value::from(data.sha256));
    let r = PrivacyReport::from_ledger(&sample_ledger(), None).unwrap();
    assert!(r.to_text().contains("Data:            no data provenance recorded"));
    assert_eq!(json(&r)["data"], Value::Null);
}

#[test]
fn dataset_size_batch_size_epochs_and_steps_are_fields() {
    // Poisson, q = 0.0445 on N = 1437: 200 + 250 steps at sigma 1.9, 224 at 2.1.
    let r = PrivacyReport::from_ledger(&sample_ledger(), None).unwrap();
    assert_eq!(r.dataset_size, Some(1437));
    assert_eq!(r.expected_batch_size, Some(0.0445 * 1437.0));
    assert_eq!(r.epochs, 0.0445 * 450.0 + 0.0445 * 224.0);
    assert_eq!(r.total_steps, 674);
    let v = json(&r);
    assert_eq!(v["expected_batch_size"].as_f64(), Some(0.0445 * 1437.0));
    assert_eq!(v["epochs"].as_f64(), Some(r.epochs));
    assert_eq!(v["mechanisms"][1]["expected_batch_size"].as_f64(), Some(0.0445 * 1437.0));
    assert_eq!(v["mechanisms"][1]["epochs"].as_f64(), Some(0.0445 * 224.0));
    let text = r.to_text();
    for needle in
        ["Dataset size:    N = 1437 examples", "Expected batch:  63.9465 examples per step", "Epochs:          29.993"]
    {
        assert!(text.contains(needle), "text lacks {needle:?}:\n{text}");
    }

    // Two sample rates: no single batch size, each mechanism its own.
    let mut mixed = sample_ledger();
    mixed.append(poisson_record(0.1, 2.0, 10)).unwrap();
    let r = PrivacyReport::from_ledger(&mixed, None).unwrap();
    assert_eq!(r.expected_batch_size, None);
    assert!(r.to_text().contains("varies between mechanisms"));
    assert_eq!(r.mechanisms.last().unwrap().expected_batch_size, Some(0.1 * 1437.0));

    // Shuffled fixed-size batches: epochs from steps per epoch; the batch size is not recorded.
    let mut shuffled = Ledger::new(LedgerHeader { dataset_size: Some(100), ..Default::default() });
    shuffled
        .append(MechanismRecord {
            event: DpEvent::shuffled_fixed_size_batches(2.0, 10, 25),
            adjacency: Adjacency::ReplaceOne,
            sampler: SamplerKind::ShuffledFixedSize,
            ..poisson_record(0.1, 1.0, 1)
        })
        .unwrap();
    let r = PrivacyReport::from_ledger(&shuffled, Some(1e-5)).unwrap();
    assert_eq!((r.expected_batch_size, r.epochs), (None, 2.5));
    // Full batch: every example every step.
    let mut full = Ledger::new(LedgerHeader { dataset_size: Some(100), ..Default::default() });
    full.append(MechanismRecord {
        event: DpEvent::self_composed(DpEvent::gaussian(5.0), 4),
        sampler: SamplerKind::FullBatch,
        ..poisson_record(0.1, 1.0, 1)
    })
    .unwrap();
    let r = PrivacyReport::from_ledger(&full, Some(1e-5)).unwrap();
    assert_eq!((r.expected_batch_size, r.epochs), (Some(100.0), 4.0));
    // Without N: epochs still, batch size unknown.
    let mut no_n = Ledger::new(Default::default());
    no_n.append(poisson_record(0.25, 1.0, 8)).unwrap();
    let r = PrivacyReport::from_ledger(&no_n, Some(1e-5)).unwrap();
    assert_eq!((r.dataset_size, r.expected_batch_size, r.epochs), (None, None, 2.0));
    assert!(r.to_text().contains("Dataset size:    not declared by the run"));
}

#[test]
fn a_verified_head_is_stated() {
    let ledger = sample_ledger();
    let r = PrivacyReport::from_ledger(&ledger, None).unwrap();
    assert!(r.to_text().contains("Anchored head:   not checked against a head held elsewhere"));
    let checked = r.clone().with_verified_head(&ledger, &ledger.head().to_uppercase()).unwrap();
    assert_eq!(checked.head_verified_against, Some(ledger.head()));
    assert!(checked.to_text().contains(&format!("verified against head {}", ledger.head())));
    assert!(checked.to_html().contains(&format!("verified against head {}", ledger.head())));
    let err = r.clone().with_verified_head(&ledger, &"0".repeat(64)).unwrap_err();
    assert!(matches!(err, LedgerError::AnchorMismatch { .. }), "{err:?}");
    // The head of another ledger than the statement's is refused too.
    let mut other = sample_ledger();
    other.append(poisson_record(0.01, 1.0, 1)).unwrap();
    let err = r.with_verified_head(&other, &other.head()).unwrap_err();
    assert!(matches!(err, LedgerError::AnchorMismatch { .. }), "{err:?}");
}

#[test]
fn noise_sampler_and_seeding_are_in_words() {
    let words = "ChaCha20 (RFC 8439) cryptographically secure generator, seeded from the operating system's entropy";
    let r = PrivacyReport::from_ledger(&sample_ledger(), None).unwrap();
    for out in [r.to_text(), r.to_markdown(), r.to_html()] {
        assert!(out.contains(words), "{out}");
        assert!(out.contains("Poisson sampling (each example"), "{out}");
        assert!(!out.contains("Chacha20") && !out.contains("OsEntropy"), "debug names leaked:\n{out}");
    }
    // Written by "test 0": no claim about candle-dp's sampler.
    assert!(!r.noise_sampler.contains("candle-dp's sampler"), "{}", r.noise_sampler);
    assert!(r.noise_sampler.contains("assumes exact Gaussian noise"), "{}", r.noise_sampler);
    let mut ours = Ledger::new(LedgerHeader { created_by: "candle-dp 0.1.0".into(), ..Default::default() });
    ours.append(poisson_record(0.01, 1.0, 10)).unwrap();
    let r = PrivacyReport::from_ledger(&ours, Some(1e-5)).unwrap();
    assert!(r.noise_sampler.starts_with("candle-dp's sampler"), "{}", r.noise_sampler);
    assert!(r.noise_sampler.contains("counter-based ChaCha20") && r.noise_sampler.contains("2.7e-20"));
    assert!(r.to_text().contains("Noise sampler:   candle-dp's sampler"));
    let mut fixed = Ledger::new(Default::default());
    fixed
        .append(MechanismRecord {
            noise: dp_accountant::NoiseSource { seed: Seeding::Fixed, ..poisson_record(0.1, 1.0, 1).noise },
            ..poisson_record(0.1, 1.0, 10)
        })
        .unwrap();
    let html = PrivacyReport::from_ledger(&fixed, Some(1e-5)).unwrap().to_html();
    assert!(html.contains("ChaCha20 (RFC 8439) cryptographically secure generator, seeded with a FIXED seed"));
}

#[test]
fn html_shows_both_epsilons_the_target_the_chosen_delta_and_an_exceeded_budget() {
    let r = PrivacyReport::from_ledger(&sample_ledger(), None).unwrap();
    let html = r.to_html();
    let line = html.lines().find(|l| l.contains("<th>RDP | PLD</th>")).unwrap();
    let pld = r.epsilon_pld.unwrap();
    assert!(line.contains(&format!("RDP {}", fmt(r.epsilon_rdp))) && line.contains(&format!("PLD {}", fmt(pld))));
    // The target (epsilon 3 at the plotted delta 1e-5) is drawn on the curve against steps.
    assert_eq!(html.matches("<line class=\"target\"").count(), 1);
    assert!(html.contains("target epsilon 3"));
    // The statement's delta is marked on the curve against delta.
    assert!(html.contains("<circle class=\"marker\"") && html.contains("delta 1e-5: epsilon"), "{html}");
    assert!(html.contains("<p class=\"claim\">"));
    // At another delta the target is not drawn, and the page says why.
    let other = PrivacyReport::from_ledger(&sample_ledger(), Some(1e-7)).unwrap().to_html();
    assert!(!other.contains("class=\"target\"") && other.contains("is at another delta than this plot"));
    // An exceeded budget is a failure, not the green claim.
    let mut over = Ledger::new(LedgerHeader {
        created_by: "t".into(),
        target: Some(PrivacyTarget { epsilon: 1.0, delta: 1e-5 }),
        ..Default::default()
    });
    over.append(poisson_record(0.05, 1.0, 1000)).unwrap();
    let r = PrivacyReport::from_ledger(&over, None).unwrap();
    let html = r.to_html();
    assert!(html.contains("<p class=\"claim fail\">") && !html.contains("<p class=\"claim\">"));
    assert!(html.contains("FAILURE: the declared budget is EXCEEDED"));
    assert!(r.to_text().contains("FAILURE: the declared budget is EXCEEDED"));
    assert_eq!(json(&r)["failures"].as_array().unwrap().len(), 1);
}

/// The report's 6-significant-digit rendering.
fn fmt(x: f64) -> String {
    let v: f64 = format!("{x:.6e}").parse().unwrap();
    format!("{v}")
}
