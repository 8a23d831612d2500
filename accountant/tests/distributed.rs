//! A ledger records, per mechanism entry, that its steps ran data parallel
//! on some number of processes with the noise drawn once per coordinate
//! (a run checkpointed on one number of processes may resume on another);
//! the record is hashed into the chain and checked on load as on append;
//! ledgers without distributed steps keep their bytes and hashes; the
//! statement says which steps ran how, in every format.

mod common;

use common::{poisson_record, sample_ledger, Rng};
use dp_accountant::ledger::{DataProvenance, MAX_WORLD_SIZE};
use dp_accountant::{
    DistributedNoise, DistributedSteps, Distribution, DpEvent, Ledger, LedgerError, LedgerHeader, MechanismRecord,
    PrivacyReport, SamplerKind,
};
use serde_json::Value;

fn on(world_size: u64) -> Distribution {
    Distribution { world_size, noise: DistributedNoise::OncePerCoordinate }
}

fn record_on(w: Option<u64>, q: f64, sigma: f64, n: u64) -> MechanismRecord {
    MechanismRecord { distributed: w.map(on), ..poisson_record(q, sigma, n) }
}

/// The sample ledger's three segments (200, 250, 224 steps), each run on
/// the given number of processes (`None`: one process, no record).
fn segments(worlds: [Option<u64>; 3]) -> Ledger {
    let mut ledger = Ledger::new(sample_ledger().header().clone());
    for ((q, s, n), w) in [(0.0445, 1.9, 200u64), (0.0445, 1.9, 250), (0.0445, 2.1, 224)].into_iter().zip(worlds) {
        ledger.append(record_on(w, q, s, n)).unwrap();
    }
    ledger
}

fn invalid_world_size(entry: usize, w: u64) -> String {
    format!("ledger entry {entry}: distributed.world_size = {w}: must be an integer from 1 to 16777216 (2^24)")
}

#[test]
fn a_distributed_record_round_trips_in_the_documented_shape() {
    let ledger = segments([Some(8); 3]);
    let text = ledger.to_json();
    let back = Ledger::from_json(&text).unwrap();
    assert_eq!(back, ledger);
    assert_eq!(back.to_json(), text);
    assert!(back.mechanisms().all(|m| m.distributed == Some(on(8))));
    let v: Value = serde_json::from_str(&text).unwrap();
    let expected = serde_json::json!({"world_size": 8, "noise": "once_per_coordinate"});
    assert_eq!(v["entries"][0]["record"]["mechanism"]["distributed"], expected);
    assert_eq!(serde_json::to_value(on(8)).unwrap(), expected);
    assert!(v["header"].get("distributed").is_none());
    // Hashed: the same steps on one process, or on 9, make other chains.
    assert_ne!(ledger.head(), sample_ledger().head());
    assert_ne!(ledger.head(), segments([Some(9); 3]).head());
}

/// Heads computed by this crate before the field existed (git 8f9b6df):
/// ledgers without distributed steps serialize and hash exactly as they did.
#[test]
fn ledgers_without_distribution_keep_their_bytes_and_hashes() {
    let sample = sample_ledger();
    assert_eq!(sample.head(), "a4b0b767448ff98d1bb0e633137bf1825873d85c0683c1c4adbcecc7b38be74e");
    assert_eq!(segments([None; 3]).head(), sample.head());
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
    }
    // A ledger written before the field existed still verifies, with its head.
    let old = Ledger::from_json(include_str!("fixtures/ledger_v1_written_at_adfab0b.json")).unwrap();
    assert!(old.mechanisms().all(|m| m.distributed.is_none()));
    assert_eq!(old.head(), "01a19801e8800ee686aece6ff2b1b17d5b9810778d8391ecfe36a20d10ba9aa7");
    // `null` is not how an absent field is written.
    let text = sample.to_json();
    let seed = "\"sampler_seed\": \"os_entropy\"";
    assert!(text.contains(seed));
    let spelled_null = text.replacen(seed, &format!("{seed},\n            \"distributed\": null"), 1);
    let err = Ledger::from_json(&spelled_null).unwrap_err();
    assert!(matches!(err, LedgerError::NonCanonical { entry: Some(0), .. }), "{err:?}");
}

#[test]
fn editing_the_distribution_of_a_saved_ledger_is_tampering() {
    let ledger = segments([Some(2), Some(2), Some(3)]);
    let v: Value = serde_json::from_str(&ledger.to_json()).unwrap();
    for (entry, to) in [(0, Some(3)), (2, Some(2)), (2, None), (1, Some(1))] {
        let mut edited = v.clone();
        let m = &mut edited["entries"][entry]["record"]["mechanism"];
        match to {
            Some(w) => m["distributed"] = serde_json::to_value(on(w)).unwrap(),
            None => {
                m.as_object_mut().unwrap().remove("distributed");
            }
        }
        let err = Ledger::from_json(&common::render_any(&edited)).unwrap_err();
        assert!(matches!(err, LedgerError::HashMismatch { entry: e, .. } if e == entry), "{entry} -> {to:?}: {err:?}");
    }
    // Adding it to a one-process ledger, likewise.
    let mut added: Value = serde_json::from_str(&sample_ledger().to_json()).unwrap();
    added["entries"][1]["record"]["mechanism"]["distributed"] = serde_json::to_value(on(4)).unwrap();
    let err = Ledger::from_json(&common::render_any(&added)).unwrap_err();
    assert!(matches!(err, LedgerError::HashMismatch { entry: 1, .. }), "{err:?}");
    // An unknown noise placement is malformed.
    let edited = ledger.to_json().replacen("\"once_per_coordinate\"", "\"rank_zero_only\"", 1);
    assert!(matches!(Ledger::from_json(&edited), Err(LedgerError::Malformed { .. })));
}

#[test]
fn a_world_size_out_of_range_is_refused_naming_the_field() {
    for w in [0, MAX_WORLD_SIZE + 1, u64::MAX] {
        assert_eq!(
            on(w).check().unwrap_err(),
            format!("distributed.world_size = {w}: must be an integer from 1 to 16777216 (2^24)")
        );
        // On append: nothing is chained.
        let mut ledger = sample_ledger();
        let before = ledger.clone();
        let err = ledger.append(record_on(Some(w), 0.01, 1.0, 1)).unwrap_err();
        assert_eq!(err.to_string(), invalid_world_size(3, w));
        assert!(matches!(err, dp_accountant::Error::Ledger(LedgerError::InvalidEntry { entry: 3, .. })), "{err:?}");
        assert_eq!(ledger, before);
        // On load, even with every hash rewritten consistently.
        let mut v: Value = serde_json::from_str(&segments([Some(8); 3]).to_json()).unwrap();
        v["entries"][1]["record"]["mechanism"]["distributed"]["world_size"] = Value::from(w);
        let err = Ledger::from_json(&common::rehash_canonical(&mut v)).unwrap_err();
        assert!(matches!(err, LedgerError::InvalidEntry { entry: 1, .. }), "{w}: {err:?}");
        assert_eq!(err.to_string(), invalid_world_size(1, w));
    }
    assert_eq!(MAX_WORLD_SIZE, 1 << 24);
    for w in [1, MAX_WORLD_SIZE] {
        assert_eq!(on(w).check(), Ok(()));
        let ledger = segments([Some(w); 3]);
        assert_eq!(Ledger::from_json(&ledger.to_json()).unwrap(), ledger);
    }
    // A world size that is not a non-negative integer does not parse.
    for bad in ["-1", "8.0", "\"8\"", "null", "18446744073709551616"] {
        let edited =
            segments([Some(8); 3]).to_json().replacen("\"world_size\": 8", &format!("\"world_size\": {bad}"), 1);
        assert!(matches!(Ledger::from_json(&edited), Err(LedgerError::Malformed { .. })), "{bad}");
    }
}

#[test]
fn unknown_or_missing_fields_inside_distributed_are_refused() {
    let v: Value = serde_json::from_str(&segments([Some(8); 3]).to_json()).unwrap();
    let mut unknown = v.clone();
    unknown["entries"][0]["record"]["mechanism"]["distributed"]["ranks_per_node"] = Value::from(4);
    let mut missing = v.clone();
    missing["entries"][0]["record"]["mechanism"]["distributed"].as_object_mut().unwrap().remove("noise");
    let mut not_an_object = v.clone();
    not_an_object["entries"][0]["record"]["mechanism"]["distributed"] = Value::from(8);
    for (what, bad) in [("unknown field", unknown), ("missing field", missing), ("invalid type", not_an_object)] {
        let err = Ledger::from_json(&bad.to_string()).unwrap_err();
        assert!(matches!(err, LedgerError::Malformed { .. }), "{what}: {err:?}");
        assert!(err.to_string().contains(what), "{what}: {err}");
    }
    assert!(
        serde_json::from_str::<Distribution>(r#"{"world_size": 2, "noise": "once_per_coordinate", "x": 1}"#).is_err()
    );
}

const HOW: &str = "in data parallel, each holding a disjoint shard of the data and sampling its own examples \
     independently at the same rate q = 0.0445, so that the global batch is the Poisson batch of the whole dataset \
     that the accounting assumes; the noise was added once per coordinate: each process drew a disjoint slice of \
     one Gaussian noise vector, summed with the clipped gradients, so every coordinate received noise of standard \
     deviation sigma C (the recorded noise multiplier times the clipping norm) exactly once. The guarantee is the \
     same as a one-process run's";

fn span(first_step: u64, last_step: u64, world_size: u64) -> DistributedSteps {
    DistributedSteps { first_step, last_step, world_size, noise_placement: DistributedNoise::OncePerCoordinate }
}

#[test]
fn the_statement_says_which_steps_ran_how_in_every_format() {
    let r = PrivacyReport::from_ledger(&segments([Some(8); 3]), None).unwrap();
    assert_eq!(r.distributed, vec![span(1, 674, 8)]);
    let sentence = format!("training ran on 8 processes {HOW}");
    assert!(r.to_text().contains(&format!("Distributed:     {sentence}\n")), "{}", r.to_text());
    assert!(r.to_markdown().contains(&format!("| Distributed | {sentence} |")), "{}", r.to_markdown());
    let html = r.to_html();
    let row = format!("<tr><th>Distributed</th><td>{sentence}</td></tr>");
    assert!(html.contains(&row), "{html}");
    assert!(html.find("<th>Total steps</th>").unwrap() < html.find(&row).unwrap());
    let v: Value = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(
        v["distributed"],
        serde_json::json!([{"first_step": 1, "last_step": 674, "world_size": 8, "noise_placement": "once_per_coordinate"}])
    );
    // The same accounting as on one process: only the words differ.
    let one = PrivacyReport::from_ledger(&sample_ledger(), None).unwrap();
    assert_eq!((r.epsilon, r.epsilon_pld, r.total_steps), (one.epsilon, one.epsilon_pld, one.total_steps));
    assert_eq!((r.caveats.clone(), r.failures.clone()), (one.caveats.clone(), one.failures.clone()));

    // Resumed on another number of processes, and a first part on one.
    let r = PrivacyReport::from_ledger(&segments([None, Some(2), Some(3)]), None).unwrap();
    assert_eq!(r.distributed, vec![span(201, 450, 2), span(451, 674, 3)]);
    let sentence = format!(
        "training ran steps 201-450 on 2 processes, steps 451-674 on 3 processes (the other steps in one process) \
         {HOW}"
    );
    assert!(r.to_text().contains(&sentence), "{}", r.to_text());
    let v: Value = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(v["distributed"].as_array().unwrap().len(), 2);
    // Consecutive entries on the same number of processes are one span.
    let r = PrivacyReport::from_ledger(&segments([Some(2), Some(2), Some(1)]), None).unwrap();
    assert_eq!(r.distributed, vec![span(1, 450, 2), span(451, 674, 1)]);
    assert!(r.to_text().contains("training ran steps 1-450 on 2 processes, steps 451-674 on 1 process in data"));
}

#[test]
fn a_one_process_statement_says_nothing_new() {
    let r = PrivacyReport::from_ledger(&sample_ledger(), None).unwrap();
    assert!(r.distributed.is_empty());
    for out in [r.to_text(), r.to_markdown(), r.to_html()] {
        assert!(!out.contains("Distributed") && !out.contains("data parallel") && !out.contains("processes"), "{out}");
    }
    let v: Value = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(v["distributed"], serde_json::json!([]));
}

#[test]
fn steps_that_are_not_poisson_samples_are_a_caveat_of_a_distributed_run() {
    let mut ledger = Ledger::new(LedgerHeader { dataset_size: Some(100), ..Default::default() });
    ledger
        .append(MechanismRecord {
            event: DpEvent::self_composed(DpEvent::gaussian(5.0), 4),
            sampler: SamplerKind::FullBatch,
            distributed: Some(on(4)),
            ..poisson_record(0.1, 1.0, 1)
        })
        .unwrap();
    let r = PrivacyReport::from_ledger(&ledger, Some(1e-5)).unwrap();
    let text = r.to_text();
    assert!(text.contains(
        "training ran on 4 processes in data parallel, each holding a disjoint shard of the data; some steps' \
         batches are not Poisson samples (see the caveats); the noise was added once per coordinate"
    ));
    let caveat = r.caveats.iter().find(|c| c.contains("distributed (over up to 4 processes)")).expect("a caveat");
    assert!(caveat.contains("full batch (every example in every step), not Poisson samples"), "{caveat}");
    // The same steps on one process carry no such caveat.
    let mut one = Ledger::new(LedgerHeader { dataset_size: Some(100), ..Default::default() });
    one.append(MechanismRecord { distributed: None, ..ledger.mechanisms().next().unwrap().clone() }).unwrap();
    let r = PrivacyReport::from_ledger(&one, Some(1e-5)).unwrap();
    assert!(r.caveats.iter().all(|c| !c.contains("distributed")), "{:?}", r.caveats);
}

/// Seeded, bounded: world sizes across and beyond the range (powers of two
/// and their neighbours, and uniform draws) are accepted exactly when in
/// range, on append and on load, round-trip and are reported.
#[test]
fn random_world_sizes_are_accepted_exactly_in_range() {
    let mut rng = Rng(0xd15_7e1b);
    let mut sizes: Vec<u64> = (0..=26).flat_map(|k| [(1u64 << k) - 1, 1 << k, (1 << k) + 1]).collect();
    sizes.extend((0..40).map(|_| rng.next() % (1 << 26)));
    sizes.extend((0..10).map(|_| rng.next()));
    let base: Value = serde_json::from_str(&segments([Some(8); 3]).to_json()).unwrap();
    for w in sizes {
        let in_range = (1..=MAX_WORLD_SIZE).contains(&w);
        let mut ledger = Ledger::new(Default::default());
        let appended = ledger.append(record_on(Some(w), 0.01, 1.0 + rng.unit(), 1 + rng.next() % 100)).is_ok();
        assert_eq!(appended, in_range, "{w}");
        let mut v = base.clone();
        v["entries"][2]["record"]["mechanism"]["distributed"]["world_size"] = Value::from(w);
        let loaded = Ledger::from_json(&common::rehash_canonical(&mut v));
        assert_eq!(loaded.is_ok(), in_range, "{w}: {loaded:?}");
        if !in_range {
            assert_eq!(loaded.unwrap_err().to_string(), invalid_world_size(2, w));
            continue;
        }
        let back = Ledger::from_json(&ledger.to_json()).unwrap();
        assert_eq!(back, ledger);
        let r = PrivacyReport::from_ledger(&back, None).unwrap();
        assert_eq!(r.distributed.len(), 1);
        assert_eq!(r.distributed[0].world_size, w);
        assert!(r.to_text().contains(&format!("training ran on {w} process")), "{w}");
    }
}
