//! Reports on extreme ledgers: step counts near u64's end are exact or
//! refused, and many distinct steps compose without re-summing (issue 12).

mod common;

use common::poisson_record;
use dp_accountant::{
    AccountantKind, Adjacency, DpEvent, Error, Ledger, LedgerError, MechanismRecord, PrivacyReport, RdpAccountant,
};

fn record(event: DpEvent) -> MechanismRecord {
    MechanismRecord { event, ..poisson_record(0.01, 1.0, 1) }
}

#[test]
fn a_ledger_of_two_to_the_63_steps_reports_exactly() {
    let mut ledger = Ledger::new(Default::default());
    ledger.append(poisson_record(0.01, 1.0, 1 << 63)).unwrap();
    let ledger = Ledger::from_json(&ledger.to_json()).unwrap();
    assert_eq!(ledger.total_steps(), 1 << 63);
    let r = PrivacyReport::from_ledger(&ledger, Some(1e-5)).unwrap();
    assert_eq!(r.total_steps, 1 << 63);
    assert_eq!(r.epsilon_by_step.last().map(|p| p.0), Some(1 << 63));
    assert!(r.epsilon_by_step.windows(2).all(|w| w[0].0 < w[1].0));
    // Big numbers are printed in scientific notation, not 15 digits.
    assert!(!r.to_text().contains("000000000"), "{}", r.to_text());
}

#[test]
fn step_counts_beyond_u64_are_refused() {
    let mut ledger = Ledger::new(Default::default());
    ledger.append(poisson_record(0.01, 1.0, 1 << 63)).unwrap();
    let err = ledger.append(poisson_record(0.01, 1.0, 1 << 63)).unwrap_err();
    assert!(matches!(err, Error::Ledger(LedgerError::InvalidEntry { entry: 1, .. })), "{err:?}");
    assert!(err.to_string().contains("steps"), "{err}");
    let nested =
        DpEvent::self_composed(DpEvent::self_composed(DpEvent::poisson_sampled_gaussian(0.01, 1.0), 1 << 40), 1 << 40);
    assert!(Ledger::new(Default::default()).append(record(nested)).is_err());
    // Written consistently by hand: refused on load too, never saturated.
    ledger.append(poisson_record(0.01, 1.0, 1)).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&ledger.to_json()).unwrap();
    v["entries"][1]["record"]["mechanism"]["event"]["self_composed"]["count"] = serde_json::Value::from(u64::MAX);
    let err = Ledger::from_json(&common::rehash_canonical(&mut v)).unwrap_err();
    assert!(matches!(err, LedgerError::InvalidEntry { entry: 1, .. }), "{err:?}");
}

/// One entry of 2 000 distinct steps (a noise schedule): the report's
/// curves reuse each step's series, and a cut inside the entry is exact.
#[test]
fn two_thousand_distinct_steps_report_promptly_and_cut_exactly() {
    let sigmas: Vec<f64> = (0..2000).map(|k| 1.0 + k as f64 * 1e-3).collect();
    let mut ledger = Ledger::new(Default::default());
    ledger
        .append(record(DpEvent::composed(sigmas.iter().map(|&s| DpEvent::poisson_sampled_gaussian(0.01, s)).collect())))
        .unwrap();
    // Its speed is measured in the accountant bench (report_2000_distinct_steps), not here.
    let r = PrivacyReport::from_ledger(&ledger, Some(1e-5)).unwrap();
    // PLD beside it would take too long: skipped, and the caveat says why.
    assert!(r.epsilon_pld.is_none());
    assert!(r.caveats.iter().any(|c| c.contains("PLD") && c.contains("operations")), "{:?}", r.caveats);
    // A point inside the entry is the grid-only epsilon of exactly its prefix.
    let (steps, eps) = r.epsilon_by_step[20];
    assert!(steps > 0 && steps < 2000);
    let mut acc = RdpAccountant::new(Adjacency::AddOrRemoveOne).with_refinement(false);
    for &s in &sigmas[..steps as usize] {
        acc.compose(&DpEvent::poisson_sampled_gaussian(0.01, s), 1).unwrap();
    }
    assert_eq!(eps, acc.epsilon(1e-5).unwrap().epsilon);
    // A statement by PLD is refused up front, naming what to do.
    let err = PrivacyReport::from_ledger_with(&ledger, Some(1e-5), AccountantKind::Pld).unwrap_err();
    assert!(matches!(err, Error::PldWorkTooLarge { .. }), "{err:?}");
    assert!(err.to_string().contains("--accountant rdp"), "{err}");
}
