//! One canonical, lossless encoding: an honest ledger always verifies, a
//! changed one never does, whatever the floats, keys or spelling (issue 12).

mod common;

use common::{poisson_record, sample_ledger, Rng};
use dp_accountant::{Ledger, LedgerError, LedgerHeader, PrivacyTarget};

/// What serde_json reads without `float_roundtrip` (its fast path) differs
/// from the correctly rounded value for these; with it, they round-trip.
#[test]
fn floats_that_the_default_parser_misreads_round_trip() {
    let x = 7.2059999999999995_f64;
    assert_eq!(format!("{x}"), "7.2059999999999995");
    let mut ledger = sample_ledger();
    ledger.append(poisson_record(11.0 / 1437.0, x, 131)).unwrap();
    let back = Ledger::from_json(&ledger.to_json()).expect("an honest ledger verifies");
    assert_eq!(back, ledger);
    assert_eq!(back.head(), ledger.head());
}

/// A seeded sweep: random sample rates, noise multipliers and clipping
/// norms (about one in ten of which the default parser misreads) always
/// verify after write-then-read, bit for bit.
#[test]
fn random_ledgers_always_verify() {
    let mut rng = Rng(0x5eed);
    for _ in 0..200 {
        let mut ledger = Ledger::new(LedgerHeader {
            created_by: "sweep".into(),
            target: Some(PrivacyTarget { epsilon: 0.1 + 10.0 * rng.unit(), delta: 1e-7 + 1e-5 * rng.unit() }),
            ..Default::default()
        });
        for _ in 0..3 {
            let mut r = poisson_record(1e-4 + 0.9 * rng.unit(), 0.3 + 8.0 * rng.unit(), 1 + rng.next() % 500);
            r.clipping_norm = 1e-3 + 10.0 * rng.unit();
            ledger.append(r).unwrap();
        }
        let text = ledger.to_json();
        let back = Ledger::from_json(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back, ledger);
        assert_eq!(back.to_json(), text);
    }
}

/// Written by `Ledger::to_json` at git adfab0b (before this fix), which
/// that version's own reader called tampered: it must verify now.
#[test]
fn ledgers_written_by_the_previous_version_verify() {
    let text = include_str!("fixtures/ledger_v1_written_at_adfab0b.json");
    let ledger = Ledger::from_json(text).expect("an old honest ledger verifies");
    assert_eq!(ledger.head(), "01a19801e8800ee686aece6ff2b1b17d5b9810778d8391ecfe36a20d10ba9aa7");
    assert_eq!(ledger.entries().len(), 44);
    assert_eq!(ledger.to_json(), text);
}

#[test]
fn one_ulp_edits_are_refused() {
    let text = sample_ledger().to_json();
    for (from, to) in [
        ("\"clipping_norm\": 1.0", "\"clipping_norm\": 0.9999999999999999"),
        ("\"delta\": 0.00001", "\"delta\": 0.000009999999999999999"),
    ] {
        assert!(text.contains(from), "{from}");
        let edited = text.replacen(from, to, 1);
        assert!(Ledger::from_json(&edited).is_err(), "{to} accepted");
    }
}

#[test]
fn other_spellings_of_the_same_value_are_refused_as_non_canonical() {
    let text = sample_ledger().to_json();
    for (from, to) in [
        ("\"clipping_norm\": 1.0", "\"clipping_norm\": 1.00"),
        ("\"clipping_norm\": 1.0", "\"clipping_norm\": 1e0"),
        ("\"clipping_norm\": 1.0", "\"clipping_norm\":  1.0"),
        ("\"clipping_norm\": 1.0", "\"clipping_norm\": 1.00000000000000000001"),
    ] {
        let edited = text.replacen(from, to, 1);
        let err = Ledger::from_json(&edited).unwrap_err();
        assert_eq!(
            err,
            LedgerError::NonCanonical { entry: Some(0), key: "record.mechanism.clipping_norm".into(), line: 35 },
            "{to}"
        );
    }
    // Trailing whitespace is the one freedom; leading is not.
    assert!(Ledger::from_json(&format!("{text}\n\n  \t")).is_ok());
    assert!(Ledger::from_json(&format!(" {text}")).is_err());
    assert!(Ledger::from_json(&text.replace('\n', "\r\n")).is_err());
}

/// The insertions: a second copy of a key before the real one.
#[test]
fn duplicate_keys_are_refused_naming_the_key() {
    let mut ledger = sample_ledger();
    ledger.append_release("model.safetensors", &"ab".repeat(32)).unwrap();
    let text = ledger.to_json();
    let cases: [(&str, &str, Option<usize>, &str); 10] = [
        (
            "\"noise_multiplier\": ",
            "\"noise_multiplier\": 0.1,\n",
            Some(0),
            "record.mechanism.event.self_composed.event.poisson_sampled.event.gaussian.noise_multiplier",
        ),
        ("\"epsilon\": ", "\"epsilon\": 100.0,\n", None, "header.target.epsilon"),
        ("\"head\": ", "\"head\": \"00\",\n", None, "head"),
        ("\"delta\": ", "\"delta\": 0.5,\n", None, "header.target.delta"),
        ("\"clipping_norm\": ", "\"clipping_norm\": 100.0,\n", Some(0), "record.mechanism.clipping_norm"),
        (
            "\"sampling_probability\": ",
            "\"sampling_probability\": 0.0001,\n",
            Some(0),
            "record.mechanism.event.self_composed.event.poisson_sampled.sampling_probability",
        ),
        ("\"count\": ", "\"count\": 1,\n", Some(0), "record.mechanism.event.self_composed.count"),
        ("\"seed\": ", "\"seed\": \"os_entropy\",\n", Some(0), "record.mechanism.noise.seed"),
        ("\"dataset_size\": ", "\"dataset_size\": 100000000,\n", None, "header.dataset_size"),
        ("\"weights_sha256\": ", "\"weights_sha256\": \"00\",\n", Some(3), "record.release.weights_sha256"),
    ];
    for (key, insert, entry, path) in cases {
        let at = if entry == Some(3) { text.rfind(key) } else { text.find(key) }.unwrap();
        let edited = format!("{}{insert}{}", &text[..at], &text[at..]);
        let err = Ledger::from_json(&edited).unwrap_err();
        assert_eq!(err, LedgerError::DuplicateKey { entry, key: path.into() }, "{insert}");
        assert!(err.to_string().contains(path), "{err}");
    }
}

mod signing {
    use super::common;
    use super::*;
    use dp_accountant::{generate_key_files, PublicKey, SecretKey};
    use serde_json::Value;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("dp-accountant-sign-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn signed_ledger_verifies_with_its_public_key_and_forgeries_fail() {
        let d = dir("a");
        let public = generate_key_files(d.join("key")).unwrap();
        assert_eq!(PublicKey::read(d.join("key.pub")).unwrap(), public);
        let secret = SecretKey::read(d.join("key")).unwrap();
        let mut ledger = sample_ledger();
        ledger.sign(&secret);
        let text = ledger.to_json();
        let back = Ledger::from_json(&text).unwrap();
        back.verify_signature(&public).unwrap();
        assert_eq!(back.signer(), Some(public));

        // Edited and consistently re-hashed: the signature no longer verifies.
        let mut v: Value = serde_json::from_str(&text).unwrap();
        v["entries"][1]["record"]["mechanism"]["clipping_norm"] = Value::from(0.5);
        let err = Ledger::from_json(&common::rehash_canonical(&mut v)).unwrap_err();
        assert!(matches!(err, LedgerError::BadSignature { .. }), "{err:?}");
        // Without the signature it is a consistent, unsigned ledger: not signed by the key.
        let mut unsigned = sample_ledger();
        unsigned.append(poisson_record(0.01, 1.0, 5)).unwrap();
        assert!(matches!(unsigned.verify_signature(&public), Err(LedgerError::UntrustedSigner { .. })));

        // Re-signed by another key: intact, but not by the trusted key.
        let mut forged = sample_ledger();
        forged.sign(&SecretKey::generate().unwrap());
        let forged = Ledger::from_json(&forged.to_json()).unwrap();
        let err = forged.verify_signature(&public).unwrap_err();
        assert!(matches!(err, LedgerError::UntrustedSigner { .. }), "{err:?}");
        // A wrong key for a genuine signature fails too.
        let other = SecretKey::generate().unwrap().public_key();
        assert!(back.verify_signature(&other).is_err());
        // Appending drops the signature (it signed another head).
        let mut longer = back.clone();
        longer.append(poisson_record(0.01, 1.0, 5)).unwrap();
        assert!(longer.signature().is_none());
    }

    /// The documented message, reimplemented with ed25519-dalek directly:
    /// Ed25519 is deterministic, so the ledger's signature must be exactly
    /// the signature of `domain || head`; one over the bare head is refused.
    #[test]
    fn the_signature_is_over_the_domain_separated_head() {
        use ed25519_dalek::{Signer, SigningKey};
        let d = dir("c");
        let seed = [7u8; 32]; // A test key only: real keys come from `keygen`.
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        std::fs::write(d.join("k"), format!("ed25519-secret-key {}\n", hex(&seed))).unwrap();
        let mut ledger = sample_ledger();
        ledger.sign(&SecretKey::read(d.join("k")).unwrap());
        let dalek = SigningKey::from_bytes(&seed);
        let head: Vec<u8> =
            (0..32).map(|k| u8::from_str_radix(&ledger.head()[2 * k..2 * k + 2], 16).unwrap()).collect();
        let message = [b"dp-accountant-ledger-head-signature-v1\n".as_slice(), &head].concat();
        let sig = ledger.signature().unwrap();
        assert_eq!(sig.signature, hex(&dalek.sign(&message).to_bytes()));
        assert_eq!(sig.public_key, hex(dalek.verifying_key().as_bytes()));
        let bare = ledger.to_json().replace(&sig.signature, &hex(&dalek.sign(&head).to_bytes()));
        assert!(matches!(Ledger::from_json(&bare), Err(LedgerError::BadSignature { .. })));
    }

    #[test]
    fn key_files_are_checked() {
        let d = dir("b");
        let err = PublicKey::read(d.join("missing.pub")).unwrap_err().to_string();
        assert!(err.contains("missing.pub") && err.contains("cannot read the key file"), "{err}");
        generate_key_files(d.join("k")).unwrap();
        // Never overwritten.
        assert!(generate_key_files(d.join("k")).is_err());
        // A secret key is not a public key, and vice versa.
        assert!(PublicKey::read(d.join("k")).unwrap_err().to_string().contains("not an ed25519-public-key"));
        assert!(SecretKey::read(d.join("k.pub")).is_err());
        // Two keys from the OS differ (no fixed seed).
        generate_key_files(d.join("k2")).unwrap();
        assert_ne!(PublicKey::read(d.join("k.pub")).unwrap(), PublicKey::read(d.join("k2.pub")).unwrap());
    }
}
