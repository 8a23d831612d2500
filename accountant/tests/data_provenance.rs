//! A ledger names the data its guarantee is about, by SHA-256, and refuses a
//! malformed name or hash on load as on append.

mod common;

use common::{poisson_record, sample_ledger};
use dp_accountant::ledger::DataProvenance;
use dp_accountant::{Error, Ledger, LedgerError, LedgerHeader};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn with_data(data: DataProvenance) -> Ledger {
    let mut ledger = Ledger::new(LedgerHeader { data: Some(data), ..sample_ledger().header().clone() });
    ledger.append(poisson_record(0.0445, 1.9, 200)).unwrap();
    ledger
}

#[test]
fn of_bytes_is_the_sha256_of_the_bytes() {
    // FIPS 180-2, Appendix B.1: SHA-256("abc").
    let d = DataProvenance::of_bytes("abc.txt", b"abc", 1).unwrap();
    assert_eq!(d.sha256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    assert_eq!((d.name.as_str(), d.bytes, d.rows), ("abc.txt", 3, 1));
}

#[test]
fn of_file_streams_and_matches_of_bytes() {
    // Larger than the 64 KiB buffer and not a multiple of it.
    let data: Vec<u8> = (0..200_003u32).map(|k| (k.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let dir = std::env::temp_dir().join(format!("dp-accountant-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("train.bin");
    std::fs::write(&path, &data).unwrap();
    let d = DataProvenance::of_file(&path, "train.bin", 1797).unwrap();
    assert_eq!(d.sha256, hex(&Sha256::digest(&data)));
    assert_eq!(d.bytes, 200_003);
    assert_eq!(d, DataProvenance::of_bytes("train.bin", &data, 1797).unwrap());
    let missing = DataProvenance::of_file(dir.join("missing.bin"), "missing.bin", 1).unwrap_err();
    assert!(matches!(missing, Error::Io { .. }), "{missing}");
    assert!(missing.to_string().contains("missing.bin"), "{missing}");
}

#[test]
fn a_bad_name_is_refused_naming_the_field() {
    for name in ["", "two\nlines", &"x".repeat(1025)] {
        let err = DataProvenance::of_bytes(name, b"abc", 1).unwrap_err();
        assert!(err.to_string().contains("data.name"), "{err}");
        assert!(err.to_string().contains("must be 1 to 1024 bytes without control characters"), "{err}");
    }
    assert!(DataProvenance::of_bytes(&"x".repeat(1024), b"abc", 1).is_ok());
}

#[test]
fn a_ledger_with_data_round_trips_and_its_header_is_chained() {
    let ledger = with_data(DataProvenance::of_bytes("digits.csv", b"0,1,2\n", 1797).unwrap());
    let back = Ledger::from_json(&ledger.to_json()).unwrap();
    assert_eq!(back, ledger);
    assert_eq!(back.header().data.as_ref().unwrap().name, "digits.csv");
    // Editing the recorded hash breaks the chain at its first link.
    let mut v: Value = serde_json::from_str(&ledger.to_json()).unwrap();
    v["header"]["data"]["sha256"] = Value::from("00".repeat(32));
    let err = Ledger::from_json(&common::render_any(&v)).unwrap_err();
    assert!(matches!(err, LedgerError::BrokenChain { entry: 0, .. }), "{err:?}");
    // A header without data writes no `data` key: older ledgers hash as they did.
    assert!(!sample_ledger().to_json().contains("\"data\""));
}

#[test]
fn a_malformed_data_hash_is_refused_on_load_and_on_append() {
    let ledger = with_data(DataProvenance::of_bytes("digits.csv", b"0,1,2\n", 1797).unwrap());
    for bad in ["AB".repeat(32), "ab".repeat(31), "zz".repeat(32)] {
        let mut v: Value = serde_json::from_str(&ledger.to_json()).unwrap();
        v["header"]["data"]["sha256"] = Value::from(bad.clone());
        let text = common::rehash_canonical(&mut v);
        let err = Ledger::from_json(&text).unwrap_err();
        assert!(matches!(err, LedgerError::InvalidHeader { .. }), "{bad}: {err:?}");
        assert_eq!(err.to_string(), format!("ledger header: data.sha256 = {bad:?}: must be 64 lower-case hex digits"));
    }
    let mut v: Value = serde_json::from_str(&ledger.to_json()).unwrap();
    v["header"]["data"]["name"] = Value::from("");
    let err = Ledger::from_json(&common::rehash_canonical(&mut v)).unwrap_err();
    assert!(err.to_string().contains("data.name = \"\""), "{err}");
    // An unknown field in `data` is malformed, not ignored.
    let mut v: Value = serde_json::from_str(&ledger.to_json()).unwrap();
    v["header"]["data"]["url"] = Value::from("https://example.org");
    assert!(matches!(Ledger::from_json(&v.to_string()), Err(LedgerError::Malformed { entry: None, .. })));
    // A hand-made header that would not load takes no entry.
    let bad = DataProvenance { sha256: "nope".into(), ..ledger.header().data.clone().unwrap() };
    let mut fresh = Ledger::new(LedgerHeader { data: Some(bad), ..Default::default() });
    let err = fresh.append(poisson_record(0.01, 1.0, 1)).unwrap_err();
    assert!(err.to_string().contains("data.sha256"), "{err}");
    assert!(fresh.entries().is_empty());
}
