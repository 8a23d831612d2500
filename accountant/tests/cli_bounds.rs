//! The CLI answers within a bound or refuses in one line: no panic, no
//! hang, exit codes as documented, signatures and anchors checked (issue 12).

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::sample_ledger;

/// Exit code, stdout and stderr of one run, killed (and failed) past `limit`.
fn run_within(args: &[&str], limit: Duration) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dp-accountant"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} ran past {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    run_within(args, Duration::from_secs(20))
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dp-accountant-cli-bounds-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A one-line error (exit 2) or an answer (exit 0): never a panic or a signal.
fn assert_answer_or_one_line_error(args: &[&str], code: Option<i32>, stdout: &str, stderr: &str) {
    assert!(!stderr.contains("panicked") && !stdout.contains("panicked"), "{args:?}: {stderr}");
    match code {
        Some(0) => assert!(!stdout.trim().is_empty(), "{args:?}: no answer"),
        Some(2) => {
            let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            let errors: Vec<&&str> = lines.iter().filter(|l| l.contains("error")).collect();
            assert_eq!(errors.len(), 1, "{args:?}: {stderr}");
            assert!(errors[0].starts_with("dp-accountant: error: "), "{args:?}: {stderr}");
        }
        other => panic!("{args:?}: exit {other:?}: {stderr}"),
    }
    // Numbers are formatted, never hundreds of digits.
    assert!(!stdout.contains("00000000000000000000"), "{args:?}: {stdout}");
}

#[test]
fn expect_head_is_checked_by_verify_and_report_and_a_malformed_one_is_usage() {
    let d = dir("head");
    let ledger = sample_ledger();
    let path = d.join("ledger.json");
    std::fs::write(&path, ledger.to_json()).unwrap();
    let p = path.to_str().unwrap();
    for cmd in ["verify", "report"] {
        assert_eq!(run(&[cmd, p, "--expect-head", &ledger.head()]).0, Some(0), "{cmd}");
        let (code, _, err) = run(&[cmd, p, "--expect-head", &"0".repeat(64)]);
        assert_eq!(code, Some(1), "{cmd}: {err}");
        assert!(err.contains("anchored head"), "{err}");
        let (code, _, err) = run(&[cmd, p, "--expect-head", "zz"]);
        assert_eq!(code, Some(2), "{cmd}: {err}");
        assert!(err.contains("--expect-head") && err.contains("64 hex digits") && err.lines().count() == 1, "{err}");
    }
}

#[test]
fn keygen_sign_and_verify_with_a_public_key() {
    let d = dir("sign");
    let key = d.join("key");
    let k = key.to_str().unwrap();
    let pubkey = format!("{k}.pub");
    assert_eq!(run(&["keygen", "--out", k]).0, Some(0));
    // A key is never overwritten.
    assert_eq!(run(&["keygen", "--out", k]).0, Some(2));
    let path = d.join("ledger.json");
    std::fs::write(&path, sample_ledger().to_json()).unwrap();
    let p = path.to_str().unwrap();
    // Unsigned: a public key check fails.
    assert_eq!(run(&["verify", p, "--public-key", &pubkey]).0, Some(1));
    let (code, out, err) = run(&["sign", p, "--key", k]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("SHA256:"));
    let (code, out, _) = run(&["verify", p, "--public-key", &pubkey]);
    assert_eq!(code, Some(0));
    assert!(out.contains("signed by the trusted key"), "{out}");
    let (code, out, _) = run(&["report", p, "--public-key", &pubkey]);
    assert_eq!(code, Some(0));
    let fingerprint = dp_accountant::PublicKey::read(&pubkey).unwrap().fingerprint();
    assert!(out.contains("signed (Ed25519) by the trusted key") && out.contains(&fingerprint), "{out}");
    let (_, out, _) = run(&["report", p]);
    assert!(out.contains("not checked against a key you trust"), "{out}");
    // A wrong key fails (exit 1); a missing key file is a clear usage error (exit 2).
    let other = d.join("other");
    run(&["keygen", "--out", other.to_str().unwrap()]);
    let (code, _, err) = run(&["verify", p, "--public-key", &format!("{}.pub", other.display())]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not the trusted key"), "{err}");
    let (code, _, err) = run(&["verify", p, "--public-key", "/nonexistent/key.pub"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("/nonexistent/key.pub") && err.contains("cannot read the key file"), "{err}");
    // Edited and consistently re-hashed, signature kept: refused.
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["entries"][0]["record"]["mechanism"]["clipping_norm"] = serde_json::Value::from(0.1);
    let forged = d.join("forged.json");
    std::fs::write(&forged, common::rehash_canonical(&mut v)).unwrap();
    let (code, _, err) = run(&["verify", forged.to_str().unwrap(), "--public-key", &pubkey]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("signature"), "{err}");
}

/// The issue's first panic: PLD with a noise multiplier of 1e308.
const EPSILON_PLD_HUGE_SIGMA: &[&str] = &[
    "epsilon",
    "--noise-multiplier",
    "1e308",
    "--sample-rate",
    "0.01",
    "--steps",
    "1000",
    "--delta",
    "1e-5",
    "--accountant",
    "pld",
];
const RDP_HUGE_ORDER: &[&str] = &["rdp", "--noise-multiplier", "1", "--sample-rate", "0.1", "--orders", "1e15"];
const CALIBRATE_TINY_TARGET: &[&str] =
    &["calibrate", "--target-epsilon", "1e-5", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "100"];

/// The issue's reproductions: each answers or refuses, quickly.
#[test]
fn the_issues_panics_and_hangs_answer_or_refuse() {
    let cases: &[&[&str]] = &[
        EPSILON_PLD_HUGE_SIGMA,
        &[
            "max-steps",
            "--target-epsilon",
            "1",
            "--delta",
            "1e-5",
            "--sample-rate",
            "0.01",
            "--noise-multiplier",
            "1e308",
            "--accountant",
            "pld",
        ],
        RDP_HUGE_ORDER,
        &[
            "max-steps",
            "--target-epsilon",
            "8",
            "--delta",
            "1e-5",
            "--sample-rate",
            "0.001",
            "--noise-multiplier",
            "0.8",
            "--accountant",
            "pld",
        ],
        &[
            "calibrate",
            "--target-epsilon",
            "3",
            "--delta",
            "1e-5",
            "--dataset-size",
            "60000",
            "--batch-size",
            "1",
            "--epochs",
            "3",
            "--accountant",
            "pld",
        ],
        &[
            "calibrate",
            "--target-epsilon",
            "3",
            "--delta",
            "1e-5",
            "--sample-rate",
            "1e-300",
            "--steps",
            "1000",
            "--accountant",
            "pld",
        ],
        &[
            "max-steps",
            "--target-epsilon",
            "1e15",
            "--delta",
            "1e-5",
            "--sample-rate",
            "0.01",
            "--noise-multiplier",
            "1",
            "--accountant",
            "pld",
        ],
        CALIBRATE_TINY_TARGET,
        &["epsilon", "--noise-multiplier", "1e-300", "--sample-rate", "0.01", "--steps", "10", "--delta", "1e-5"],
    ];
    let mut errors = std::collections::HashMap::new();
    for args in cases {
        let (code, out, err) = run_within(args, Duration::from_secs(15));
        assert_answer_or_one_line_error(args, code, &out, &err);
        errors.insert(args.to_vec(), (code, err));
    }
    let (code, err) = &errors[RDP_HUGE_ORDER];
    assert_eq!(*code, Some(2));
    assert!(err.contains("--orders = 1e15: must be <= 1e6"), "{err}");
    let (_, err) = &errors[CALIBRATE_TINY_TARGET];
    assert!(err.contains("cannot be met") && err.contains("Aim for a larger target epsilon"), "{err}");
    let (_, out, _) = run(&[EPSILON_PLD_HUGE_SIGMA, &["--json"]].concat());
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["epsilon"].as_f64().is_some_and(|e| (0.0..0.05).contains(&e)), "{v}");
}

/// A subcommand (with fixed flags) and its numeric flags with good values.
type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);

/// Every numeric flag of every subcommand, with odd values: an answer or a
/// one-line error, within a deadline.
#[test]
fn odd_values_for_every_numeric_flag_answer_or_refuse() {
    let odd = ["0", "-1", "1e308", "1e-320", "inf", "nan", "", "1e15", "1000000000000000"];
    let d = dir("odd");
    let ledger = d.join("ledger.json");
    std::fs::write(&ledger, sample_ledger().to_json()).unwrap();
    let l = ledger.to_str().unwrap();
    let base: &[Case] = &[
        (
            &["epsilon"],
            &[("--noise-multiplier", "1.1"), ("--sample-rate", "0.01"), ("--steps", "100"), ("--delta", "1e-5")],
        ),
        (
            &["epsilon", "--accountant", "pld"],
            &[
                ("--noise-multiplier", "1.1"),
                ("--sample-rate", "0.01"),
                ("--steps", "100"),
                ("--delta", "1e-5"),
                ("--epsilon-error", "0.02"),
            ],
        ),
        (
            &["epsilon"],
            &[
                ("--noise-multiplier", "1.1"),
                ("--dataset-size", "1000"),
                ("--batch-size", "10"),
                ("--epochs", "2"),
                ("--delta", "1e-5"),
            ],
        ),
        (&["rdp"], &[("--noise-multiplier", "1.1"), ("--sample-rate", "0.01"), ("--orders", "2"), ("--steps", "10")]),
        (
            &["calibrate"],
            &[("--target-epsilon", "3"), ("--delta", "1e-5"), ("--sample-rate", "0.01"), ("--steps", "100")],
        ),
        (
            &["calibrate", "--accountant", "pld"],
            &[
                ("--target-epsilon", "3"),
                ("--delta", "1e-5"),
                ("--sample-rate", "0.01"),
                ("--steps", "100"),
                ("--epsilon-error", "0.05"),
            ],
        ),
        (
            &["max-steps"],
            &[("--target-epsilon", "3"), ("--delta", "1e-5"), ("--sample-rate", "0.01"), ("--noise-multiplier", "1.1")],
        ),
        (
            &["max-steps", "--accountant", "pld"],
            &[
                ("--target-epsilon", "1"),
                ("--delta", "1e-5"),
                ("--sample-rate", "0.01"),
                ("--noise-multiplier", "1.1"),
                ("--epsilon-error", "0.05"),
            ],
        ),
        (&["report", l], &[("--delta", "1e-5")]),
    ];
    let mut all: Vec<Vec<String>> = Vec::new();
    for (head, flags) in base {
        for k in 0..flags.len() {
            for value in odd {
                let mut args: Vec<String> = head.iter().map(|s| s.to_string()).collect();
                for (j, (flag, good)) in flags.iter().enumerate() {
                    args.push(flag.to_string());
                    args.push(if j == k { value.to_string() } else { good.to_string() });
                }
                all.push(args);
            }
        }
    }
    let runs = all.len();
    // Two workers: each invocation is a process of its own.
    std::thread::scope(|scope| {
        for part in all.chunks(runs.div_ceil(2)) {
            scope.spawn(move || {
                for args in part {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let (code, out, err) = run_within(&args, Duration::from_secs(15));
                    assert_answer_or_one_line_error(&args, code, &out, &err);
                }
            });
        }
    });
    assert!(runs > 300, "{runs}");
}
