//! `dp-accountant report`: the user-level flag, the head a reviewer holds,
//! and an audited ledger, end to end.

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

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dp-accountant-cli-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn max_examples_per_user_adds_a_user_level_epsilon() {
    let path = temp_file("ledger.json", &sample_ledger().to_json());
    let p = path.to_str().unwrap();
    let o = run(&["report", p, "--format", "json", "--max-examples-per-user", "4"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["user_level"]["max_examples_per_user"], 4);
    assert_eq!(v["user_level"]["epsilon"].as_f64(), Some(4.0 * v["epsilon"].as_f64().unwrap()));
    for format in ["text", "markdown", "html"] {
        let out = stdout(&run(&["report", p, "--format", format, "--max-examples-per-user", "4"]));
        assert!(out.contains("a person with up to K = 4 examples"), "{format}:\n{out}");
    }
    for bad in ["0", "-1", "1.5", "many"] {
        let o = run(&["report", p, "--max-examples-per-user", bad]);
        assert_eq!(o.status.code(), Some(2), "{bad}");
        let err = stderr(&o);
        assert!(err.contains("--max-examples-per-user") && err.contains("must be an integer >= 1"), "{bad}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(stdout(&o).is_empty());
    }
}

#[test]
fn the_head_a_reviewer_holds_is_checked_and_stated() {
    let ledger = sample_ledger();
    let path = temp_file("anchored.json", &ledger.to_json());
    let p = path.to_str().unwrap();
    let o = run(&["report", p, "--expect-head", &ledger.head()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains(&format!("Anchored head:   verified against head {}", ledger.head())));
    let o = run(&["report", p, "--expect-head", &ledger.head(), "--format", "json"]);
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["head_verified_against"], Value::from(ledger.head()));
    let o = run(&["report", p, "--expect-head", &"ab".repeat(32)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).is_empty() && stderr(&o).contains("is not the anchored head"), "{}", stderr(&o));
    let o = run(&["report", p]);
    assert!(stdout(&o).contains("Anchored head:   not checked"));
}

#[test]
fn an_audited_ledger_reports_its_audit_and_a_failed_one_fails_visibly() {
    let mut ledger = sample_ledger();
    let mut audit = dp_accountant::audit::OneRunAudit {
        epsilon: 0.7,
        p_value: 0.01,
        canaries: 500,
        guesses: 50,
        correct: 44,
        candidates: 7,
        alpha: 0.05,
        delta: 1e-5,
        epsilon_fdp: 0.9,
        mu_fdp: 0.3,
        fdp_guesses: 50,
        fdp_correct: 44,
    };
    let mut good = ledger.clone();
    good.append_audit(&audit, dp_accountant::Seeding::OsEntropy).unwrap();
    let path = temp_file("audited.json", &good.to_json());
    let o = run(&["report", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("epsilon-hat = 0.700") && text.contains("500 canaries, 50 guesses, 44 correct"), "{text}");
    audit.epsilon = 25.0;
    ledger.append_audit(&audit, dp_accountant::Seeding::OsEntropy).unwrap();
    let path = temp_file("failed.json", &ledger.to_json());
    // The report is produced (exit 0: the ledger is intact), and says the run failed its audit.
    let o = run(&["report", path.to_str().unwrap(), "--format", "json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["audits"][0]["verdict"], "exceeded");
    assert!(v["failures"][0].as_str().unwrap().starts_with("FAILURE: the audit after 674 steps FAILED"));
    let html = stdout(&run(&["report", path.to_str().unwrap(), "--format", "html"]));
    assert!(html.contains("<p class=\"claim fail\">") && html.contains("<p class=\"audit fail\">"));
}
