//! The report says every caveat that qualifies its statement.

mod common;

use common::{poisson_record, sample_ledger};
use dp_accountant::{
    Adjacency, DeltaSource, DpEvent, Ledger, LedgerHeader, MechanismRecord, PrivacyReport, PrivacyTarget, SamplerKind,
    Seeding,
};

fn caveats(ledger: &Ledger, delta: Option<f64>) -> String {
    PrivacyReport::from_ledger(ledger, delta).unwrap().caveats.join("\n")
}

#[test]
fn a_clean_run_has_no_caveats_and_meets_its_target() {
    let r = PrivacyReport::from_ledger(&sample_ledger(), None).unwrap();
    assert!(r.caveats.is_empty(), "{:?}", r.caveats);
    assert_eq!(r.within_target, Some(true));
    assert_eq!(r.delta_source, DeltaSource::LedgerTarget);
    assert!(r.to_text().contains("Caveats: none."));
}

#[test]
fn an_exceeded_budget_is_flagged() {
    let mut ledger = Ledger::new(LedgerHeader {
        created_by: "t".into(),
        target: Some(PrivacyTarget { epsilon: 1.0, delta: 1e-5 }),
        ..Default::default()
    });
    ledger.append(poisson_record(0.05, 1.0, 1000)).unwrap();
    let r = PrivacyReport::from_ledger(&ledger, None).unwrap();
    assert_eq!(r.within_target, Some(false));
    assert!(caveats(&ledger, None).contains("EXCEEDED"));
    assert!(r.to_markdown().contains("EXCEEDED"));
}

#[test]
fn fixed_seed_and_shuffled_batches_are_flagged() {
    let mut ledger = Ledger::new(Default::default());
    ledger
        .append(MechanismRecord {
            event: DpEvent::shuffled_fixed_size_batches(2.0, 10, 30),
            adjacency: Adjacency::ReplaceOne,
            sampler: SamplerKind::ShuffledFixedSize,
            noise: dp_accountant::NoiseSource { seed: Seeding::Fixed, ..poisson_record(0.1, 1.0, 1).noise },
            ..poisson_record(0.1, 1.0, 1)
        })
        .unwrap();
    let c = caveats(&ledger, Some(1e-5));
    assert!(c.contains("without amplification"), "{c}");
    assert!(c.contains("noise came from a fixed seed"), "{c}");
    assert!(!c.contains("batches were drawn with a fixed seed"), "{c}");
    let mut seeded = Ledger::new(Default::default());
    seeded.append(MechanismRecord { sampler_seed: Seeding::Fixed, ..poisson_record(0.1, 1.0, 10) }).unwrap();
    assert!(caveats(&seeded, Some(1e-5)).contains("batches were drawn with a fixed seed"));
    let r = PrivacyReport::from_ledger(&ledger, Some(1e-5)).unwrap();
    assert!(r.to_text().contains("replace-one"));
}

#[test]
fn default_delta_and_large_delta_are_flagged() {
    let mut ledger =
        Ledger::new(LedgerHeader { created_by: "t".into(), dataset_size: Some(1000), ..Default::default() });
    ledger.append(poisson_record(0.01, 1.0, 100)).unwrap();
    let c = caveats(&ledger, None);
    assert!(c.contains("delta = 1e-5 was used"), "{c}");
    let c = caveats(&ledger, Some(0.01));
    assert!(c.contains("not below 1/N"), "{c}");
}

#[test]
fn an_empty_ledger_says_so() {
    let r = PrivacyReport::from_ledger(&Ledger::new(Default::default()), Some(1e-5)).unwrap();
    assert_eq!(r.epsilon, 0.0);
    assert!(r.caveats.iter().any(|c| c.contains("no mechanism")));
}

#[test]
fn a_bad_delta_is_refused() {
    let err = PrivacyReport::from_ledger(&sample_ledger(), Some(2.0)).unwrap_err();
    assert_eq!(err.to_string(), "delta = 2: must be in (0, 1)");
}

#[test]
fn epsilon_curves_match_the_accountant() {
    let ledger = sample_ledger();
    let r = PrivacyReport::from_ledger(&ledger, Some(1e-5)).unwrap();
    assert_eq!(r.epsilon_by_step.first(), Some(&(0, 0.0)));
    // The curves are grid-only RDP (no refinement between orders): exactly
    // that accountant's answer, and never below the refined statement.
    let grid = |events: &[(f64, u64)], delta: f64| {
        let mut acc = dp_accountant::RdpAccountant::new(Adjacency::AddOrRemoveOne).with_refinement(false);
        for &(sigma, n) in events {
            acc.compose(&DpEvent::poisson_sampled_gaussian(0.0445, sigma), n).unwrap();
        }
        acc.epsilon(delta).unwrap().epsilon
    };
    let full = grid(&[(1.9, 450), (2.1, 224)], 1e-5);
    assert_eq!(r.epsilon_by_step.last(), Some(&(674, full)));
    assert!(full >= r.epsilon);
    assert!(r.epsilon_by_step.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "non-decreasing in steps");
    // Cutting inside an entry: 200 + 250 steps at sigma 1.9, then 224 at 2.1.
    let (steps, eps) = r.epsilon_by_step.iter().find(|(s, _)| *s > 200 && *s < 450).copied().unwrap();
    assert_eq!(eps, grid(&[(1.9, steps)], 1e-5));
    let (d, e) = r.epsilon_by_delta[20];
    assert_eq!(e, grid(&[(1.9, 450), (2.1, 224)], d));
    assert!(r.epsilon_by_delta.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 >= w[1].1), "non-increasing in delta");
}
