//! The reviewers' CLI: outputs, exit codes, and every error path.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::sample_ledger;
use serde_json::Value;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dp-accountant")).args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json_out(args: &[&str]) -> Value {
    let o = run(args);
    assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
    serde_json::from_str(stdout(&o).trim()).unwrap()
}

/// Exit 2 with a one-line error that contains `needle`.
fn assert_usage_error(args: &[&str], needle: &str) {
    let o = run(args);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
    assert!(!err.contains("panicked"), "{err}");
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dp-accountant-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn epsilon_json_has_the_promised_fields() {
    let v = json_out(&[
        "epsilon",
        "--noise-multiplier",
        "1.5",
        "--sample-rate",
        "0.04",
        "--steps",
        "2250",
        "--delta",
        "1e-5",
        "--json",
    ]);
    let eps = v["epsilon"].as_f64().unwrap();
    assert!(eps > 7.32 && eps <= 7.329_111_171_43, "{eps}");
    assert_eq!(v["delta"].as_f64(), Some(1e-5));
    assert!(v["order"].as_f64().unwrap() > 3.8);
    assert_eq!(v["accountant"], "rdp");
}

#[test]
fn epsilon_by_pld_gives_a_bracket_and_all_states_the_smaller_bound() {
    let args = ["epsilon", "--noise-multiplier", "1.5", "--sample-rate", "0.04", "--steps", "2250", "--delta", "1e-5"];
    let pld = json_out(&[&args[..], &["--accountant", "pld", "--json"]].concat());
    let (upper, lower) = (pld["epsilon"].as_f64().unwrap(), pld["epsilon_lower"].as_f64().unwrap());
    assert_eq!(pld["accountant"], "pld");
    assert!(lower <= upper && upper - lower <= 0.02, "{pld}");
    let all = json_out(&[&args[..], &["--accountant", "all", "--json"]].concat());
    let rdp = all["rdp"]["epsilon"].as_f64().unwrap();
    assert!(upper < rdp, "PLD {upper} vs RDP {rdp}");
    assert_eq!(all["epsilon"].as_f64(), Some(upper));
    assert_eq!(all["accountant"], "pld");
    assert_eq!(all["epsilon_lower"].as_f64(), Some(lower));
}

#[test]
fn calibrate_by_pld_needs_less_noise() {
    let args = ["calibrate", "--target-epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "2000"];
    let rdp = json_out(&[&args[..], &["--json"]].concat());
    let pld = json_out(&[&args[..], &["--accountant", "pld", "--json"]].concat());
    let (s_rdp, s_pld) = (rdp["noise_multiplier"].as_f64().unwrap(), pld["noise_multiplier"].as_f64().unwrap());
    assert!(s_pld < s_rdp, "{s_pld} vs {s_rdp}");
    let eps = pld["epsilon"].as_f64().unwrap();
    assert!((0.999 * 3.0..=3.0).contains(&eps), "{pld}");
    assert!(pld["epsilon_lower"].as_f64().unwrap() <= eps);
}

#[test]
fn epsilon_accepts_dataset_batch_and_epochs() {
    let by_plan = json_out(&[
        "epsilon",
        "--noise-multiplier",
        "1.1",
        "--dataset-size",
        "60000",
        "--batch-size",
        "256",
        "--epochs",
        "60",
        "--delta",
        "1e-5",
        "--json",
    ]);
    assert_eq!(by_plan["steps"].as_u64(), Some(14063)); // ceil(60 * 60000 / 256)
    let by_rate = json_out(&[
        "epsilon",
        "--noise-multiplier",
        "1.1",
        "--sample-rate",
        &(256.0_f64 / 60000.0).to_string(),
        "--steps",
        "14063",
        "--delta",
        "1e-5",
        "--json",
    ]);
    assert_eq!(by_plan["epsilon"], by_rate["epsilon"]);
}

#[test]
fn rdp_json_is_the_curve() {
    let v = json_out(&[
        "rdp",
        "--noise-multiplier",
        "2.5",
        "--sample-rate",
        "0.01",
        "--orders",
        "5,50,100",
        "--steps",
        "50",
        "--json",
    ]);
    let rdp: Vec<f64> = v["rdp"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(v["orders"].as_array().unwrap().len(), 3);
    for (got, want) in rdp.iter().zip([2.180_756_56e-03, 2.384_603_75e-02, 1.674_163_08e02]) {
        assert!((got / want - 1.0).abs() < 1e-8, "{got} vs {want}");
    }
}

#[test]
fn calibrate_json_meets_the_target() {
    let v = json_out(&[
        "calibrate",
        "--target-epsilon",
        "3",
        "--delta",
        "1e-5",
        "--sample-rate",
        "0.01",
        "--steps",
        "10000",
        "--json",
    ]);
    let eps = v["epsilon"].as_f64().unwrap();
    assert!((2.997..=3.0).contains(&eps), "{eps}");
    assert!(v["noise_multiplier"].as_f64().unwrap() > 1.0);
}

#[test]
fn every_bad_number_is_a_one_line_error_naming_the_flag() {
    let base = |sigma: &str, q: &str, steps: &str, delta: &str| {
        vec!["epsilon", "--noise-multiplier", sigma, "--sample-rate", q, "--steps", steps, "--delta", delta]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let cases = [
        (base("NaN", "0.01", "10", "1e-5"), "--noise-multiplier = NaN: must be finite and > 0"),
        (base("-1", "0.01", "10", "1e-5"), "--noise-multiplier = -1: must be finite and > 0"),
        (base("0", "0.01", "10", "1e-5"), "--noise-multiplier = 0: must be finite and > 0"),
        (base("inf", "0.01", "10", "1e-5"), "--noise-multiplier = inf: must be finite and > 0"),
        (base("1", "0", "10", "1e-5"), "--sample-rate = 0: must be in (0, 1]"),
        (base("1", "1.5", "10", "1e-5"), "--sample-rate = 1.5: must be in (0, 1]"),
        (base("1", "NaN", "10", "1e-5"), "--sample-rate = NaN: must be in (0, 1]"),
        (base("1", "0.01", "10", "0"), "--delta = 0: must be in (0, 1)"),
        (base("1", "0.01", "10", "1"), "--delta = 1: must be in (0, 1)"),
        (base("1", "0.01", "0", "1e-5"), "--steps"),
        (base("1", "0.01", "-3", "1e-5"), "must be an integer >= 1"),
        (base("1", "abc", "10", "1e-5"), "--sample-rate"),
        (
            [
                base("1", "0.01", "10", "1e-5"),
                vec!["--accountant".into(), "pld".into(), "--epsilon-error".into(), "0".into()],
            ]
            .concat(),
            "--epsilon-error = 0: must be finite and > 0",
        ),
    ];
    // Calibration and max-steps check --epsilon-error as epsilon does.
    assert_usage_error(
        &["calibrate", "--target-epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "100"]
            .into_iter()
            .chain(["--accountant", "pld", "--epsilon-error", "NaN"])
            .collect::<Vec<_>>(),
        "--epsilon-error = NaN: must be finite and > 0",
    );
    for (args, needle) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_usage_error(&args, needle);
    }
    assert_usage_error(
        &["epsilon", "--noise-multiplier", "1", "--delta", "1e-5", "--steps", "10"],
        "give either --sample-rate and --steps",
    );
    assert_usage_error(
        &[
            "epsilon",
            "--noise-multiplier",
            "1",
            "--delta",
            "1e-5",
            "--dataset-size",
            "10",
            "--batch-size",
            "20",
            "--epochs",
            "1",
        ],
        "--batch-size = 20: must be <= --dataset-size (10)",
    );
    assert_usage_error(
        &[
            "epsilon",
            "--noise-multiplier",
            "1",
            "--delta",
            "1e-5",
            "--dataset-size",
            "100",
            "--batch-size",
            "20",
            "--epochs",
            "-1",
        ],
        "--epochs = -1: must be finite and > 0",
    );
    assert_usage_error(
        &["rdp", "--noise-multiplier", "1", "--sample-rate", "0.1", "--orders", "2,1"],
        "--orders = 1: must be finite and > 1",
    );
    assert_usage_error(
        &["calibrate", "--target-epsilon", "-3", "--delta", "1e-5", "--sample-rate", "0.1", "--steps", "10"],
        "--target-epsilon = -3: must be finite and > 0",
    );
    assert_usage_error(
        &["max-steps", "--target-epsilon", "1", "--delta", "1e-5", "--sample-rate", "2", "--noise-multiplier", "1"],
        "--sample-rate = 2: must be in (0, 1]",
    );
    assert_usage_error(&["report", "/nonexistent/ledger.json"], "/nonexistent/ledger.json");
    assert_usage_error(&["verify", "/nonexistent/ledger.json"], "/nonexistent/ledger.json");
    assert_usage_error(&["frobnicate"], "unrecognized subcommand");
}

#[test]
fn verify_exit_codes() {
    let ledger = sample_ledger();
    let good = temp_file("good.json", &ledger.to_json());
    let o = run(&["verify", good.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("intact") && stdout(&o).contains(&ledger.head()));
    let o = run(&["verify", good.to_str().unwrap(), "--expect-head", &ledger.head()]);
    assert_eq!(o.status.code(), Some(0));
    let o = run(&["verify", good.to_str().unwrap(), "--expect-head", &"0".repeat(64)]);
    assert_eq!(o.status.code(), Some(1));

    let mut v: Value = serde_json::from_str(&ledger.to_json()).unwrap();
    v["entries"][1]["record"]["mechanism"]["clipping_norm"] = Value::from(5.0);
    let edited = temp_file("edited.json", &v.to_string());
    let o = run(&["verify", edited.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("entry 1"), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim().lines().count(), 1);

    let malformed = temp_file("malformed.json", "{\"format\": \"dp-accountant-ledger\", \"version\": 1,");
    assert_eq!(run(&["verify", malformed.to_str().unwrap()]).status.code(), Some(2));
    let future = temp_file("future.json", &ledger.to_json().replace("\"version\": 1", "\"version\": 7"));
    let o = run(&["verify", future.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("version = 7"), "{}", stderr(&o));
    // A broken ledger gets no report either.
    assert_eq!(run(&["report", edited.to_str().unwrap()]).status.code(), Some(1));
}

#[test]
fn help_documents_the_exit_codes() {
    let o = run(&["verify", "--help"]);
    assert_eq!(o.status.code(), Some(0));
    let help = stdout(&o);
    assert!(
        help.contains("0  success") && help.contains("1  the ledger fails verification") && help.contains("2  usage")
    );
}

#[test]
fn report_formats_contain_the_ledgers_numbers() {
    let ledger = sample_ledger();
    let path = temp_file("report.json", &ledger.to_json());
    let p = path.to_str().unwrap();
    let expected =
        ledger.compose_into(dp_accountant::RdpAccountant::new(ledger.adjacency())).unwrap().epsilon(1e-6).unwrap();
    let eps_text = format!("{}", (expected.epsilon * 1e5).round() / 1e5);

    let json = json_out(&["report", p, "--delta", "1e-6", "--format", "json"]);
    assert_eq!(json["epsilon"].as_f64(), Some(expected.epsilon));
    assert_eq!(json["delta"].as_f64(), Some(1e-6));
    assert_eq!(json["total_steps"].as_u64(), Some(674));
    assert_eq!(json["ledger_head"], Value::from(ledger.head()));
    assert_eq!(json["adjacency"], "add_or_remove_one");
    assert_eq!(json["mechanisms"].as_array().unwrap().len(), 2);

    for format in ["text", "markdown", "html"] {
        let o = run(&["report", p, "--delta", "1e-6", "--format", format]);
        assert_eq!(o.status.code(), Some(0));
        let out = stdout(&o);
        for needle in [eps_text.as_str(), "1e-6", "674", &ledger.head(), "add-or-remove-one", "Mironov", "Balle"] {
            assert!(out.contains(needle), "{format} report lacks {needle:?}:\n{out}");
        }
    }
    let html = stdout(&run(&["report", p, "--delta", "1e-6", "--format", "html"]));
    assert!(html.starts_with("<!DOCTYPE html>") && html.matches("<svg").count() == 2, "two plots");
    // Self-contained: no scripts, no external resources.
    assert!(!html.contains("<script") && !html.contains("src=") && !html.contains("href="));
    // Without --delta, the ledger's declared delta (1e-5) is used.
    let json = json_out(&["report", p, "--format", "json"]);
    assert_eq!(json["delta"].as_f64(), Some(1e-5));
    assert_eq!(json["delta_source"], "ledger_target");
}

#[test]
fn reports_name_the_released_weights() {
    let mut ledger = sample_ledger();
    let sha = "0123456789abcdef".repeat(4);
    ledger.append_release("model.safetensors", &sha).unwrap();
    let path = temp_file("released.json", &ledger.to_json());
    for format in ["text", "markdown", "html", "json"] {
        let out = stdout(&run(&["report", path.to_str().unwrap(), "--format", format]));
        assert!(out.contains(&sha) && out.contains("model.safetensors"), "{format} report lacks the weights' hash");
    }
}

/// `audit`: the JSON fields the issue promises, a separated run giving a
/// positive epsilon-hat that equals the library's, identical scores giving
/// 0, and every bad input a one-line usage error naming what is wrong.
#[test]
fn audit_reads_scores_and_reports_epsilon_hat() {
    // 400 canaries: included ones score 10 + k, excluded ones k, k < 200.
    let ins: Vec<String> = (0..200).map(|k| format!("{}", 10.0 + k as f64 * 0.01)).collect();
    let outs: Vec<String> = (0..200).map(|k| format!("{}", k as f64 * 0.01)).collect();
    let text = format!("{{\"in_scores\": [{}], \"out_scores\": [{}]}}", ins.join(","), outs.join(","));
    let path = temp_file("scores.json", &text);
    let p = path.to_str().unwrap();
    let v = json_out(&["audit", p, "--delta", "1e-5", "--alpha", "0.05", "--json"]);
    let eps = v["epsilon_one_run"].as_f64().unwrap();
    let scores = dp_accountant::audit::CanaryScores::from_json(&text).unwrap();
    let lib = dp_accountant::audit::audit_one_run(&scores, 1e-5, 0.05, dp_accountant::audit::Guesses::Top).unwrap();
    assert_eq!(eps, lib.epsilon);
    assert!(eps > 1.0, "{v}");
    assert_eq!(v["canaries"], 400);
    assert_eq!(v["guesses"].as_u64().unwrap() as usize, lib.guesses);
    assert_eq!(v["correct"].as_u64().unwrap() as usize, lib.correct);
    assert_eq!(v["guess_counts_tried"], 7);
    let two = json_out(&["audit", p, "--delta", "1e-5", "--two-sided", "--json"]);
    assert_eq!(two["guesses_on"], "top_and_bottom");
    assert!(two["epsilon_one_run"].as_f64().unwrap() >= eps);
    let o = run(&["audit", p, "--delta", "1e-5"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("epsilon-hat: "), "{}", stdout(&o));

    let same = temp_file("same.json", "{\"in_scores\": [1, 1, 1], \"out_scores\": [1, 1]}");
    let v = json_out(&["audit", same.to_str().unwrap(), "--delta", "0", "--json"]);
    assert_eq!(v["epsilon_one_run"].as_f64(), Some(0.0));

    for (text, needle) in [
        ("{\"in_scores\": [1, 2]}", "out_scores"),
        ("{\"in_scores\": [1], \"out_scores\": [2], \"extra\": 1}", "extra"),
        ("{\"in_scores\": [1, \"x\"], \"out_scores\": []}", "canary scores"),
        ("{\"in_scores\": [], \"out_scores\": []}", "canaries"),
        ("[1, 2, 3]", "canary scores"),
        ("", "canary scores"),
    ] {
        let bad = temp_file("bad.json", text);
        assert_usage_error(&["audit", bad.to_str().unwrap(), "--delta", "1e-5"], needle);
    }
    assert_usage_error(&["audit", p, "--delta", "1"], "--delta");
    assert_usage_error(&["audit", p, "--delta", "-1e-5"], "--delta");
    assert_usage_error(&["audit", p, "--delta", "1e-5", "--alpha", "0"], "--alpha");
    assert_usage_error(&["audit", p, "--delta", "1e-5", "--alpha", "nan"], "--alpha");
    assert_usage_error(&["audit", "/nonexistent/scores.json", "--delta", "1e-5"], "/nonexistent/scores.json");
}
