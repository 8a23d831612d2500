//! The ledger detects every kind of tampering, and says where.

mod common;

use common::{poisson_record, sample_ledger};
use dp_accountant::{Adjacency, DpEvent, Ledger, LedgerError, MechanismRecord, SamplerKind, Seeding};
use serde_json::Value;

fn json(ledger: &Ledger) -> Value {
    serde_json::from_str(&ledger.to_json()).unwrap()
}

fn load(v: &Value) -> Result<Ledger, LedgerError> {
    Ledger::from_json(&common::render_any(v))
}

#[test]
fn round_trip_preserves_everything() {
    let ledger = sample_ledger();
    let back = Ledger::from_json(&ledger.to_json()).unwrap();
    assert_eq!(back, ledger);
    assert_eq!(back.head(), ledger.head());
    assert_eq!(back.total_steps(), 674);
    // And the epsilon it implies is the one of the events composed directly.
    let direct = {
        let mut acc = dp_accountant::RdpAccountant::new(Adjacency::AddOrRemoveOne);
        acc.compose(&DpEvent::poisson_sampled_gaussian(0.0445, 1.9), 450).unwrap();
        acc.compose(&DpEvent::poisson_sampled_gaussian(0.0445, 2.1), 224).unwrap();
        acc.epsilon(1e-5).unwrap()
    };
    assert_eq!(
        back.compose_into(dp_accountant::RdpAccountant::new(back.adjacency())).unwrap().epsilon(1e-5).unwrap(),
        direct
    );
}

#[test]
fn tampered_ledger_is_detected_when_an_entry_is_edited() {
    let mut v = json(&sample_ledger());
    v["entries"][1]["record"]["mechanism"]["event"]["self_composed"]["count"] = Value::from(25);
    assert!(matches!(load(&v), Err(LedgerError::HashMismatch { entry: 1, .. })), "{:?}", load(&v));
    let mut v = json(&sample_ledger());
    v["entries"][2]["record"]["mechanism"]["clipping_norm"] = Value::from(10.0);
    assert!(matches!(load(&v), Err(LedgerError::HashMismatch { entry: 2, .. })));
    let mut v = json(&sample_ledger());
    v["entries"][0]["record"]["mechanism"]["noise"]["seed"] = Value::from("fixed");
    assert!(matches!(load(&v), Err(LedgerError::HashMismatch { entry: 0, .. })));
}

#[test]
fn tampered_ledger_is_detected_when_the_header_is_edited() {
    let mut v = json(&sample_ledger());
    v["header"]["target"]["epsilon"] = Value::from(30.0);
    assert!(matches!(load(&v), Err(LedgerError::BrokenChain { entry: 0, .. })));
}

#[test]
fn tampered_ledger_is_detected_when_entries_are_reordered() {
    let mut v = json(&sample_ledger());
    let entries = v["entries"].as_array_mut().unwrap();
    entries.swap(1, 2);
    assert!(matches!(load(&v), Err(LedgerError::IndexMismatch { entry: 1, found: 2 })));
    // Even with the indices rewritten, the chain breaks.
    let mut v = json(&sample_ledger());
    let entries = v["entries"].as_array_mut().unwrap();
    entries.swap(1, 2);
    entries[1]["index"] = Value::from(1);
    entries[2]["index"] = Value::from(2);
    assert!(matches!(load(&v), Err(LedgerError::BrokenChain { entry: 1, .. })));
}

#[test]
fn tampered_ledger_is_detected_when_an_entry_is_removed() {
    let mut v = json(&sample_ledger());
    v["entries"].as_array_mut().unwrap().remove(1);
    assert!(matches!(load(&v), Err(LedgerError::IndexMismatch { entry: 1, found: 2 })));
}

#[test]
fn tampered_ledger_is_detected_when_truncated() {
    let mut v = json(&sample_ledger());
    v["entries"].as_array_mut().unwrap().pop();
    assert!(matches!(load(&v), Err(LedgerError::HeadMismatch { entries: 2, .. })), "{:?}", load(&v));
    // A truncation that also rewrites `head` is consistent on its own; the
    // anchored head (kept in a checkpoint or report) still catches it.
    let full = sample_ledger();
    let mut v = json(&full);
    v["entries"].as_array_mut().unwrap().pop();
    v["head"] = v["entries"][1]["hash"].clone();
    let truncated = load(&v).unwrap();
    assert!(matches!(truncated.verify_head(&full.head()), Err(LedgerError::AnchorMismatch { entries: 2, .. })));
}

#[test]
fn tampered_ledger_is_detected_when_an_entry_is_appended() {
    let ledger = sample_ledger();
    // A copy of the last entry, renumbered.
    let mut v = json(&ledger);
    let mut extra = v["entries"][2].clone();
    extra["index"] = Value::from(3);
    v["entries"].as_array_mut().unwrap().push(extra);
    assert!(matches!(load(&v), Err(LedgerError::BrokenChain { entry: 3, .. })));
    // A correctly chained entry, but `head` not updated.
    let mut longer = ledger.clone();
    longer.append(poisson_record(0.0445, 2.1, 10)).unwrap();
    let mut v = json(&longer);
    v["head"] = Value::from(ledger.head());
    assert!(matches!(load(&v), Err(LedgerError::HeadMismatch { entries: 4, .. })));
    // Fully consistent, but not the anchored ledger.
    assert!(longer.verify_head(&ledger.head()).is_err());
    assert!(ledger.verify_head(&ledger.head()).is_ok());
}

#[test]
fn unknown_version_format_field_or_event_is_an_error() {
    let mut v = json(&sample_ledger());
    v["version"] = Value::from(2);
    assert_eq!(load(&v), Err(LedgerError::UnsupportedVersion { found: 2, supported: 1 }));
    let mut v = json(&sample_ledger());
    v["format"] = Value::from("something-else");
    assert!(matches!(load(&v), Err(LedgerError::WrongFormat { .. })));
    let mut v = json(&sample_ledger());
    v["entries"][1]["record"]["mechanism"]["comment"] = Value::from("hi");
    assert!(matches!(load(&v), Err(LedgerError::Malformed { entry: Some(1), .. })), "{:?}", load(&v));
    let mut v = json(&sample_ledger());
    v["entries"][2]["record"]["mechanism"]["event"] = serde_json::json!({"laplace": {"scale": 1.0}});
    let err = load(&v).unwrap_err();
    assert!(matches!(err, LedgerError::Malformed { entry: Some(2), .. }));
    assert!(err.to_string().contains("ledger entry 2") && err.to_string().contains("laplace"), "{err}");
    let mut v = json(&sample_ledger());
    v["extra"] = Value::from(1);
    assert!(matches!(load(&v), Err(LedgerError::Malformed { entry: None, .. })));
    assert!(matches!(Ledger::from_json("{not json"), Err(LedgerError::Malformed { entry: None, .. })));
}

#[test]
fn inconsistent_records_are_refused_at_append() {
    let mut ledger = sample_ledger();
    let before = ledger.clone();
    // Sampler says shuffled, event says Poisson.
    let mut r = poisson_record(0.01, 1.0, 10);
    r.sampler = SamplerKind::ShuffledFixedSize;
    let err = ledger.append(r).unwrap_err();
    assert!(err.to_string().contains("ledger entry 3"), "{err}");
    // A different adjacency from entry 0.
    let r = MechanismRecord {
        event: DpEvent::shuffled_fixed_size_batches(1.0, 22, 22),
        adjacency: Adjacency::ReplaceOne,
        sampler: SamplerKind::ShuffledFixedSize,
        ..poisson_record(0.01, 1.0, 1)
    };
    assert!(ledger.append(r).unwrap_err().to_string().contains("adjacency"));
    // A bad value.
    let mut r = poisson_record(0.01, 1.0, 10);
    r.clipping_norm = f64::NAN;
    assert!(ledger.append(r).unwrap_err().to_string().contains("clipping_norm = NaN: must be finite and > 0"));
    let r = poisson_record(1.5, 1.0, 10);
    assert!(ledger.append(r).unwrap_err().to_string().contains("sampling_probability = 1.5: must be in [0, 1]"));
    // Poisson amplification under replace-one is not claimed.
    let mut r = poisson_record(0.01, 1.0, 10);
    r.adjacency = Adjacency::ReplaceOne;
    assert!(Ledger::new(Default::default()).append(r).is_err());
    assert_eq!(ledger, before, "a refused append changes nothing");
}

#[test]
fn the_documented_hash_format_reproduces_the_hashes() {
    let ledger = sample_ledger();
    let original = json(&ledger);
    let mut v = original.clone();
    common::rehash_canonical(&mut v);
    assert_eq!(v, original);
}

#[test]
fn a_consistently_hashed_but_contradictory_entry_is_invalid() {
    let mut v = json(&sample_ledger());
    v["entries"][1]["record"]["mechanism"]["sampler"] = Value::from("full_batch");
    common::rehash_canonical(&mut v);
    let err = load(&v).unwrap_err();
    assert!(matches!(err, LedgerError::InvalidEntry { entry: 1, .. }), "{err:?}");
    assert!(err.to_string().contains("sampler"), "{err}");
    let mut v = json(&sample_ledger());
    v["entries"][2]["record"]["mechanism"]["event"]["self_composed"]["event"]["poisson_sampled"]["event"]["gaussian"]
        ["noise_multiplier"] = Value::from(-1.0);
    common::rehash_canonical(&mut v);
    let err = load(&v).unwrap_err();
    assert_eq!(err.to_string(), "ledger entry 2: noise_multiplier = -1: must be finite and > 0");
}

#[test]
fn shuffled_fixed_size_batches_are_recorded_and_accounted_without_amplification() {
    let mut ledger = Ledger::new(Default::default());
    ledger
        .append(MechanismRecord {
            event: DpEvent::shuffled_fixed_size_batches(2.0, 10, 25),
            adjacency: Adjacency::ReplaceOne,
            clipping_norm: 1.0,
            sampler: SamplerKind::ShuffledFixedSize,
            noise: dp_accountant::NoiseSource {
                generator: dp_accountant::NoiseGenerator::Chacha20,
                seed: Seeding::Fixed,
            },
            sampler_seed: Seeding::OsEntropy,
            distributed: None,
        })
        .unwrap();
    let ledger = Ledger::from_json(&ledger.to_json()).unwrap();
    // 25 steps of 10 per epoch: 3 started epochs, each a Gaussian release of
    // sensitivity 2C: RDP = 3 * alpha * 4 / (2 sigma^2) = 1.5 alpha.
    let acc = ledger.compose_into(dp_accountant::RdpAccountant::new(ledger.adjacency())).unwrap();
    assert!((acc.rdp_at(3.0).unwrap() - 4.5).abs() < 1e-12);
}

#[test]
fn a_model_release_is_chained_and_checked() {
    let mut ledger = sample_ledger();
    let sha = "ab".repeat(32);
    ledger.append_release("model.safetensors", &sha).unwrap();
    let back = Ledger::from_json(&ledger.to_json()).unwrap();
    let release = back.releases().next().unwrap();
    assert_eq!(
        (release.file.as_str(), release.weights_sha256.as_str(), release.after_steps),
        ("model.safetensors", sha.as_str(), 674)
    );
    assert_eq!(back.total_steps(), 674, "a release is not a step");
    // Editing the named hash breaks the chain.
    let mut v = json(&ledger);
    v["entries"][3]["record"]["release"]["weights_sha256"] = Value::from("cd".repeat(32));
    assert!(matches!(load(&v), Err(LedgerError::HashMismatch { entry: 3, .. })));
    // A malformed hash or a wrong step count is refused.
    assert!(ledger.append_release("m", "xyz").is_err());
    let mut v = json(&ledger);
    v["entries"][3]["record"]["release"]["after_steps"] = Value::from(5);
    common::rehash_canonical(&mut v);
    assert!(load(&v).unwrap_err().to_string().contains("after_steps = 5"));
}

#[test]
fn a_ledger_is_refused_by_an_accountant_of_another_adjacency() {
    let ledger = sample_ledger();
    let err = ledger.compose_into(dp_accountant::PldAccountant::new(Adjacency::ReplaceOne)).unwrap_err();
    assert!(
        matches!(
            err,
            dp_accountant::Error::AdjacencyMismatch {
                ledger: Adjacency::AddOrRemoveOne,
                accountant: Adjacency::ReplaceOne
            }
        ),
        "{err}"
    );
    // An empty ledger records no unit of privacy: any accountant takes it.
    let empty = Ledger::new(Default::default());
    assert!(empty.compose_into(dp_accountant::RdpAccountant::new(Adjacency::ReplaceOne)).is_ok());
}

/// A one-run audit of `m` canaries whose included half all outscore the
/// excluded half: a clear leak, so every bound it records is positive.
fn clear_leak_audit(m: usize) -> dp_accountant::audit::OneRunAudit {
    use dp_accountant::audit::{audit_one_run, CanaryScores, Guesses};
    let included: Vec<f64> = (0..m / 2).map(|k| 10.0 + k as f64).collect();
    let excluded: Vec<f64> = (0..m - m / 2).map(|k| -(k as f64)).collect();
    audit_one_run(&CanaryScores::new(included, excluded).unwrap(), 1e-5, 0.05, Guesses::Top).unwrap()
}

#[test]
fn an_audit_is_chained_and_checked() {
    let mut ledger = sample_ledger();
    let audit = clear_leak_audit(200);
    assert!(audit.epsilon > 0.0 && audit.epsilon_fdp > 0.0 && audit.mu_fdp > 0.0, "{audit:?}");
    ledger.append_audit(&audit, Seeding::OsEntropy).unwrap();
    let back = Ledger::from_json(&ledger.to_json()).unwrap();
    assert_eq!(back, ledger);
    assert_eq!(back.head(), ledger.head());
    let a = back.audits().next().unwrap();
    assert_eq!(a.method, dp_accountant::AuditMethod::OneRunCanaries);
    assert_eq!((a.canaries, a.guesses, a.correct), (200, audit.guesses as u64, audit.correct as u64));
    assert_eq!((a.alpha, a.delta), (0.05, 1e-5));
    assert_eq!(
        (a.epsilon_lower_bound, a.epsilon_lower_bound_fdp, a.mu_fdp),
        (audit.epsilon, audit.epsilon_fdp, audit.mu_fdp)
    );
    assert_eq!((a.inclusion_seed, a.after_steps), (Seeding::OsEntropy, 674));
    assert_eq!(back.total_steps(), 674, "an audit is not a step");
    assert_eq!(back.mechanisms().count(), 3);
    // The JSON names the record kind and the method as documented.
    let v = json(&ledger);
    assert_eq!(v["entries"][3]["record"]["audit"]["method"], Value::from("one_run_canaries"));
    assert_eq!(v["entries"][3]["record"]["audit"]["inclusion_seed"], Value::from("os_entropy"));

    // Editing any recorded field breaks the chain at that entry.
    for (field, value) in [
        ("epsilon_lower_bound", Value::from(0.0)),
        ("epsilon_lower_bound_fdp", Value::from(0.0)),
        ("mu_fdp", Value::from(0.0)),
        ("correct", Value::from(1)),
        ("canaries", Value::from(201)),
        ("alpha", Value::from(0.5)),
        ("inclusion_seed", Value::from("fixed")),
    ] {
        let mut v = json(&ledger);
        v["entries"][3]["record"]["audit"][field] = value;
        assert!(matches!(load(&v), Err(LedgerError::HashMismatch { entry: 3, .. })), "{field}: {:?}", load(&v));
    }

    // Out-of-range values, even consistently rehashed, are refused naming the field.
    for (field, value, needle) in [
        ("alpha", Value::from(1.0), "alpha = 1: must be in (0, 1)"),
        ("delta", Value::from(1.0), "delta = 1: must be in [0, 1)"),
        ("epsilon_lower_bound", Value::from(-0.5), "epsilon_lower_bound = -0.5: must be finite and >= 0"),
        ("epsilon_lower_bound_fdp", Value::from(-2.0), "epsilon_lower_bound_fdp = -2: must be finite and >= 0"),
        ("mu_fdp", Value::from(-1.0), "mu_fdp = -1: must be finite and >= 0"),
        ("canaries", Value::from(0), "canaries = 0: must be an integer >= 1"),
        ("guesses", Value::from(201), "guesses = 201: must be an integer from 0 to canaries (200)"),
        ("correct", Value::from(audit.guesses + 1), "must be an integer from 0 to guesses"),
        ("after_steps", Value::from(5), "after_steps = 5: the entries before it record 674 steps"),
    ] {
        let mut v = json(&ledger);
        v["entries"][3]["record"]["audit"][field] = value;
        common::rehash_canonical(&mut v);
        let err = load(&v).unwrap_err();
        assert!(matches!(err, LedgerError::InvalidEntry { entry: 3, .. }), "{field}: {err:?}");
        assert!(err.to_string().contains(needle), "{field}: {err}");
    }

    // An unknown field or method is malformed, not ignored.
    let mut v = json(&ledger);
    v["entries"][3]["record"]["audit"]["extra"] = Value::from(1);
    assert!(matches!(load(&v), Err(LedgerError::Malformed { entry: Some(3), .. })));
    let mut v = json(&ledger);
    v["entries"][3]["record"]["audit"]["method"] = Value::from("many_runs");
    assert!(matches!(load(&v), Err(LedgerError::Malformed { entry: Some(3), .. })));

    // Appending an out-of-range audit is refused and appends nothing.
    let head = ledger.head();
    let bad = dp_accountant::audit::OneRunAudit { delta: 1.0, ..audit.clone() };
    let err = ledger.append_audit(&bad, Seeding::Fixed).unwrap_err();
    assert!(err.to_string().contains("delta = 1: must be in [0, 1)"), "{err}");
    let bad = dp_accountant::audit::OneRunAudit { epsilon: f64::NAN, ..audit.clone() };
    let err = ledger.append_audit(&bad, Seeding::Fixed).unwrap_err();
    assert!(err.to_string().contains("epsilon_lower_bound = NaN: must be finite and >= 0"), "{err}");
    // (An infinite value cannot come from a file, JSON has none, but can from a caller.)
    let bad = dp_accountant::audit::OneRunAudit { epsilon_fdp: f64::INFINITY, ..audit };
    let err = ledger.append_audit(&bad, Seeding::Fixed).unwrap_err();
    assert!(err.to_string().contains("epsilon_lower_bound_fdp = inf: must be finite and >= 0"), "{err}");
    assert_eq!(ledger.head(), head);

    // Steps after an audit are recorded as usual; the audit keeps its count.
    ledger.append(poisson_record(0.0445, 2.1, 10)).unwrap();
    let back = Ledger::from_json(&ledger.to_json()).unwrap();
    assert_eq!((back.total_steps(), back.audits().next().unwrap().after_steps), (684, 674));
}

#[test]
fn a_ledger_without_audits_writes_no_audit_field() {
    let text = sample_ledger().to_json();
    assert!(!text.contains("audit"), "{text}");
}
