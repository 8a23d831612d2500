//! A ledger records that a run was spread over processes (data parallel),
//! hashed into its first link and checked on load as on append; one-process
//! ledgers keep their bytes and hashes; the statement says so in every format.

mod common;

use common::{poisson_record, sample_ledger, Rng};
use dp_accountant::ledger::{DataProvenance, MAX_WORLD_SIZE};
use dp_accountant::{
    DistributedNoise, Distribution, DpEvent, Ledger, LedgerError, LedgerHeader, MechanismRecord, PrivacyReport,
    SamplerKind,
};
use serde_json::Value;

fn on(world_size: u64) -> Distribution {
    Distribution { world_size, noise: DistributedNoise::OncePerCoordinate }
}

/// The sample ledger's three segments, recorded by a run on `world_size` processes.
fn distributed(world_size: u64) -> Ledger {
    let mut ledger =
        Ledger::new(LedgerHeader { distributed: Some(on(world_size)), ..sample_ledger().header().clone() });
    for (q, s, n) in [(0.0445, 1.9, 200u64), (0.0445, 1.9, 250), (0.0445, 2.1, 224)] {
        ledger.append(poisson_record(q, s, n)).unwrap();
    }
    ledger
}

fn invalid_world_size(w: u64) -> String {
    format!("ledger header: distributed.world_size = {w}: must be an integer from 1 to 16777216 (2^24)")
}

#[test]
fn a_distributed_header_round_trips_in_the_documented_shape() {
    let ledger = distributed(8);
    let text = ledger.to_json();
    let back = Ledger::from_json(&text).unwrap();
    assert_eq!(back, ledger);
    assert_eq!(back.to_json(), text);
    assert_eq!(back.header().distributed, Some(on(8)));
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["header"]["distributed"], serde_json::json!({"world_size": 8, "noise": "once_per_coordinate"}));
    // After the data, the last field of the header.
    assert!(text.contains(
        "    \"target\": {\n      \"epsilon\": 3.0,\n      \"delta\": 0.00001\n    },\n    \"distributed\": {\n      \
         \"world_size\": 8,\n      \"noise\": \"once_per_coordinate\"\n    }\n  },"
    ));
    // Its own serde form is the same object.
    assert_eq!(serde_json::to_value(on(8)).unwrap(), v["header"]["distributed"]);
    // The header is hashed: the same entries on one process make another chain.
    assert_ne!(ledger.head(), sample_ledger().head());
    assert_ne!(distributed(8).head(), distributed(9).head());
}

/// Heads computed by this crate before the field existed (git 8f9b6df):
/// ledgers without it serialize and hash exactly as they did.
#[test]
fn ledgers_without_distribution_keep_their_bytes_and_hashes() {
    let sample = sample_ledger();
    assert_eq!(sample.head(), "a4b0b767448ff98d1bb0e633137bf1825873d85c0683c1c4adbcecc7b38be74e");
    let mut with_data = Ledger::new(LedgerHeader {
        data: Some(DataProvenance::of_bytes("digits.csv", b"0,1,2\n", 1797).unwrap()),
        ..sample.header().clone()
    });
    with_data.append(poisson_record(0.0445, 1.9, 200)).unwrap();
    assert_eq!(with_data.head(), "b2cf48acd427cc6396a269e8f4382c291be5c785715ef8882490745b1eb54162");
    let empty = Ledger::new(Default::default());
    assert_eq!(empty.head(), "b3dd51d7ccc61d800bdcc4c28e7563c6bf9ab2234d8e97d1b188c3f230f776c0");
    for l in [&sample, &with_data, &empty] {
        assert!(!l.to_json().contains("distributed"), "{}", l.to_json());
        assert_eq!(Ledger::from_json(&l.to_json()).unwrap().header().distributed, None);
    }
    // A ledger written before the field existed still verifies, with its head.
    let old = Ledger::from_json(include_str!("fixtures/ledger_v1_written_at_adfab0b.json")).unwrap();
    assert_eq!(old.header().distributed, None);
    assert_eq!(old.head(), "01a19801e8800ee686aece6ff2b1b17d5b9810778d8391ecfe36a20d10ba9aa7");
    // `null` is not how an absent field is written.
    let spelled_null =
        sample.to_json().replacen("\n  },\n  \"entries\"", ",\n    \"distributed\": null\n  },\n  \"entries\"", 1);
    assert!(spelled_null.contains("\"distributed\": null"));
    assert!(matches!(Ledger::from_json(&spelled_null), Err(LedgerError::NonCanonical { entry: None, .. })));
}

#[test]
fn editing_the_distribution_of_a_saved_ledger_is_tampering() {
    let ledger = distributed(8);
    let text = ledger.to_json();
    for (from, to) in [
        ("\"world_size\": 8,", "\"world_size\": 9,"),
        ("\"world_size\": 8,", "\"world_size\": 1,"),
        ("\"world_size\": 8,", "\"world_size\": 16777216,"),
    ] {
        assert!(text.contains(from));
        let err = Ledger::from_json(&text.replacen(from, to, 1)).unwrap_err();
        assert!(matches!(err, LedgerError::BrokenChain { entry: 0, .. }), "{to}: {err:?}");
    }
    // Removing the field (claiming one process) breaks the chain as well.
    let mut v: Value = serde_json::from_str(&text).unwrap();
    v["header"].as_object_mut().unwrap().remove("distributed");
    let err = Ledger::from_json(&common::render_any(&v)).unwrap_err();
    assert!(matches!(err, LedgerError::BrokenChain { entry: 0, .. }), "{err:?}");
    // So does adding it to a one-process ledger.
    let mut v: Value = serde_json::from_str(&sample_ledger().to_json()).unwrap();
    v["header"]["distributed"] = serde_json::to_value(on(4)).unwrap();
    let err = Ledger::from_json(&common::render_any(&v)).unwrap_err();
    assert!(matches!(err, LedgerError::BrokenChain { entry: 0, .. }), "{err:?}");
    // Without entries the header's hash is the head.
    let empty = Ledger::new(LedgerHeader { distributed: Some(on(8)), ..Default::default() });
    let edited = empty.to_json().replacen("\"world_size\": 8,", "\"world_size\": 2,", 1);
    assert!(matches!(Ledger::from_json(&edited), Err(LedgerError::HeadMismatch { entries: 0, .. })));
    // An unknown noise placement is malformed.
    let edited = text.replacen("\"once_per_coordinate\"", "\"rank_zero_only\"", 1);
    assert!(matches!(Ledger::from_json(&edited), Err(LedgerError::Malformed { entry: None, .. })));
}

#[test]
fn a_world_size_out_of_range_is_refused_naming_the_field() {
    for w in [0, MAX_WORLD_SIZE + 1, u64::MAX] {
        // By the check itself.
        let err = on(w).check().unwrap_err();
        assert!(matches!(err, LedgerError::InvalidHeader { .. }), "{err:?}");
        assert_eq!(err.to_string(), invalid_world_size(w));
        // On append: nothing is chained to a header that would not load.
        let mut fresh = Ledger::new(LedgerHeader { distributed: Some(on(w)), ..Default::default() });
        let err = fresh.append(poisson_record(0.01, 1.0, 1)).unwrap_err();
        assert_eq!(err.to_string(), invalid_world_size(w));
        assert!(matches!(err, dp_accountant::Error::Ledger(LedgerError::InvalidHeader { .. })), "{err:?}");
        assert!(fresh.entries().is_empty());
        // On load, even with every hash rewritten consistently.
        let mut v: Value = serde_json::from_str(&distributed(8).to_json()).unwrap();
        v["header"]["distributed"]["world_size"] = Value::from(w);
        let err = Ledger::from_json(&common::rehash_canonical(&mut v)).unwrap_err();
        assert!(matches!(err, LedgerError::InvalidHeader { .. }), "{w}: {err:?}");
        assert_eq!(err.to_string(), invalid_world_size(w));
        // An empty ledger's header is checked too.
        let mut v: Value = serde_json::from_str(&Ledger::new(Default::default()).to_json()).unwrap();
        v["header"]["distributed"] = serde_json::to_value(on(w)).unwrap();
        let err = Ledger::from_json(&common::rehash_canonical(&mut v)).unwrap_err();
        assert_eq!(err.to_string(), invalid_world_size(w));
    }
    assert_eq!(MAX_WORLD_SIZE, 1 << 24);
    // The ends of the range are valid, on append and on load.
    for w in [1, MAX_WORLD_SIZE] {
        assert_eq!(on(w).check(), Ok(()));
        let ledger = distributed(w);
        assert_eq!(Ledger::from_json(&ledger.to_json()).unwrap(), ledger);
    }
    // A world size that is not a non-negative integer does not parse.
    for bad in ["-1", "8.0", "\"8\"", "null", "18446744073709551616"] {
        let edited = distributed(8).to_json().replacen("\"world_size\": 8", &format!("\"world_size\": {bad}"), 1);
        assert!(matches!(Ledger::from_json(&edited), Err(LedgerError::Malformed { entry: None, .. })), "{bad}");
    }
}

#[test]
fn unknown_or_missing_fields_inside_distributed_are_refused() {
    let text = distributed(8).to_json();
    let v: Value = serde_json::from_str(&text).unwrap();
    let mut unknown = v.clone();
    unknown["header"]["distributed"]["ranks_per_node"] = Value::from(4);
    let mut missing = v.clone();
    missing["header"]["distributed"].as_object_mut().unwrap().remove("noise");
    let mut not_an_object = v;
    not_an_object["header"]["distributed"] = Value::from(8);
    for (what, bad) in [("unknown field", unknown), ("missing field", missing), ("invalid type", not_an_object)] {
        let err = Ledger::from_json(&bad.to_string()).unwrap_err();
        assert!(matches!(err, LedgerError::Malformed { entry: None, .. }), "{what}: {err:?}");
        assert!(err.to_string().contains(what), "{what}: {err}");
    }
    // Nor does serde accept them outside a ledger.
    assert!(
        serde_json::from_str::<Distribution>(r#"{"world_size": 2, "noise": "once_per_coordinate", "x": 1}"#).is_err()
    );
    assert_eq!(
        serde_json::from_str::<Distribution>(r#"{"world_size": 2, "noise": "once_per_coordinate"}"#).unwrap(),
        on(2)
    );
}

const SENTENCE: &str = "training ran on 8 processes in data parallel, each holding a disjoint shard of the data and \
     sampling its own examples independently at the same rate q = 0.0445, so that the global batch is the Poisson \
     batch of the whole dataset that the accounting assumes; the noise was added once per coordinate: each process \
     drew a disjoint slice of one Gaussian noise vector, summed with the clipped gradients, so every coordinate \
     received noise of standard deviation sigma C (the recorded noise multiplier times the clipping norm) exactly \
     once. The guarantee is the same as a one-process run's";

#[test]
fn the_statement_says_the_run_was_distributed_in_every_format() {
    let r = PrivacyReport::from_ledger(&distributed(8), None).unwrap();
    assert_eq!((r.world_size, r.noise_placement), (Some(8), Some(DistributedNoise::OncePerCoordinate)));
    let text = r.to_text();
    assert!(text.contains(&format!("Distributed:     {SENTENCE}\n")), "{text}");
    assert!(r.to_markdown().contains(&format!("| Distributed | {SENTENCE} |")), "{}", r.to_markdown());
    let html = r.to_html();
    let row = format!("<tr><th>Distributed</th><td>{SENTENCE}</td></tr>");
    assert!(html.contains(&row), "{html}");
    // Among the run's facts, after the steps.
    assert!(html.find("<th>Total steps</th>").unwrap() < html.find(&row).unwrap());
    let v: Value = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(v["world_size"], Value::from(8));
    assert_eq!(v["noise_placement"], Value::from("once_per_coordinate"));
    // The same accounting as on one process: only the words differ.
    let one = PrivacyReport::from_ledger(&sample_ledger(), None).unwrap();
    assert_eq!((r.epsilon, r.epsilon_pld, r.total_steps), (one.epsilon, one.epsilon_pld, one.total_steps));
    assert_eq!((r.caveats.clone(), r.failures.clone()), (one.caveats.clone(), one.failures.clone()));
    assert!(r.caveats.is_empty(), "{:?}", r.caveats);

    // One process is said in the singular; several sample rates are not listed.
    let mut mixed = distributed(1);
    mixed.append(poisson_record(0.1, 2.0, 10)).unwrap();
    let text = PrivacyReport::from_ledger(&mixed, None).unwrap().to_text();
    assert!(text.contains("training ran on 1 process in data parallel"), "{text}");
    assert!(text.contains("at the same rate q (each step's, as recorded), so that the global batch"), "{text}");
}

#[test]
fn a_one_process_statement_says_nothing_new() {
    let r = PrivacyReport::from_ledger(&sample_ledger(), None).unwrap();
    assert_eq!((r.world_size, r.noise_placement), (None, None));
    for out in [r.to_text(), r.to_markdown(), r.to_html()] {
        assert!(!out.contains("Distributed") && !out.contains("data parallel") && !out.contains("processes"), "{out}");
    }
    let v: Value = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!((&v["world_size"], &v["noise_placement"]), (&Value::Null, &Value::Null));
}

#[test]
fn steps_that_are_not_poisson_samples_are_a_caveat_of_a_distributed_run() {
    let mut ledger =
        Ledger::new(LedgerHeader { dataset_size: Some(100), distributed: Some(on(4)), ..Default::default() });
    ledger
        .append(MechanismRecord {
            event: DpEvent::self_composed(DpEvent::gaussian(5.0), 4),
            sampler: SamplerKind::FullBatch,
            ..poisson_record(0.1, 1.0, 1)
        })
        .unwrap();
    let r = PrivacyReport::from_ledger(&ledger, Some(1e-5)).unwrap();
    let text = r.to_text();
    assert!(text.contains(
        "training ran on 4 processes in data parallel, each holding a disjoint shard of the data; some steps' \
         batches are not Poisson samples (see the caveats); the noise was added once per coordinate"
    ));
    assert!(!text.contains("the same rate q"), "{text}");
    let caveat = r.caveats.iter().find(|c| c.contains("distributed over 4 processes")).expect("a caveat");
    assert!(caveat.contains("full batch (every example in every step), not Poisson samples"), "{caveat}");
    // The same steps on one process carry no such caveat.
    let mut one = Ledger::new(LedgerHeader { dataset_size: Some(100), ..Default::default() });
    one.append(ledger.mechanisms().next().unwrap().clone()).unwrap();
    let r = PrivacyReport::from_ledger(&one, Some(1e-5)).unwrap();
    assert!(r.caveats.iter().all(|c| !c.contains("distributed")), "{:?}", r.caveats);
}

/// Seeded, bounded: world sizes across and beyond the range (powers of two
/// and their neighbours, and uniform draws) are accepted exactly when in
/// range, round-trip, are chained, and are reported.
#[test]
fn random_world_sizes_are_accepted_exactly_in_range() {
    let mut rng = Rng(0xd15_7e1b);
    let mut sizes: Vec<u64> = (0..=26).flat_map(|k| [(1u64 << k) - 1, 1 << k, (1 << k) + 1]).collect();
    sizes.extend((0..40).map(|_| rng.next() % (1 << 26)));
    sizes.extend((0..10).map(|_| rng.next()));
    let base = distributed(8);
    let base_json: Value = serde_json::from_str(&base.to_json()).unwrap();
    for w in sizes {
        let in_range = (1..=MAX_WORLD_SIZE).contains(&w);
        let mut ledger = Ledger::new(LedgerHeader { distributed: Some(on(w)), ..Default::default() });
        let appended = ledger.append(poisson_record(0.01, 1.0 + rng.unit(), 1 + rng.next() % 100)).is_ok();
        assert_eq!(appended, in_range, "{w}");
        // The same edit to a saved ledger, consistently rehashed.
        let mut v = base_json.clone();
        v["header"]["distributed"]["world_size"] = Value::from(w);
        let loaded = Ledger::from_json(&common::rehash_canonical(&mut v));
        assert_eq!(loaded.is_ok(), in_range, "{w}: {loaded:?}");
        if !in_range {
            assert_eq!(loaded.unwrap_err().to_string(), invalid_world_size(w));
            continue;
        }
        let back = Ledger::from_json(&ledger.to_json()).unwrap();
        assert_eq!(back, ledger);
        if w != 8 {
            assert_ne!(loaded.unwrap().head(), base.head(), "{w}");
        }
        let r = PrivacyReport::from_ledger(&back, None).unwrap();
        assert_eq!(r.world_size, Some(w));
        assert!(r.to_text().contains(&format!("training ran on {w} process")), "{w}");
    }
}
