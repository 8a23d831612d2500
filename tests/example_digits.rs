//! The digits example as a user runs it: its flags are checked like the
//! library's configuration, a finished run is never retrained or
//! overwritten, resume takes the run's own flags, and the ledgers it writes
//! verify.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_dp::accountant::Ledger;

/// The example binary `cargo test` built beside this test.
fn digits() -> Command {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let exe = deps.parent().unwrap().join("examples").join(format!("digits{}", std::env::consts::EXE_SUFFIX));
    assert!(exe.exists(), "{} not built", exe.display());
    let mut c = Command::new(exe);
    c.env("RAYON_NUM_THREADS", "1");
    c
}

fn run(args: &[&str]) -> Output {
    digits().args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn folder(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("candle-dp-digits-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn quick(out: &Path) -> Vec<String> {
    ["--epochs", "1", "--batch-size", "300", "--seed", "1", "--json", "--out"]
        .iter()
        .map(|s| s.to_string())
        .chain([out.display().to_string()])
        .collect()
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn bad_flags_are_named_and_leave_no_folder() {
    for (flags, expected) in [
        (vec!["--hidden", "0"], "--hidden = 0: must be an integer >= 1"),
        (vec!["--ema", "1"], "--ema = 1: must be in [0, 1)"),
        (vec!["--ema", "nan"], "--ema = NaN: must be in [0, 1)"),
        // Valid, but no noise reaches it: the calibration says so, briefly.
        (vec!["--epsilon", "1e-300"], "epsilon"),
        (vec!["--epsilon", "-1"], "--epsilon = -1: must be finite and > 0"),
        (vec!["--delta", "1"], "--delta = 1: must be in (0, 1)"),
        (vec!["--lr", "inf"], "--lr = inf: must be finite and > 0"),
        (vec!["--epochs", "0"], "--epochs = 0: must be an integer >= 1"),
        (vec!["--max-grad-norm", "0"], "--max-grad-norm = 0: must be finite and > 0"),
    ] {
        let out = folder("bad");
        let mut all: Vec<&str> = flags.clone();
        let o = out.display().to_string();
        all.extend(["--out", &o]);
        let result = run(&all);
        assert_eq!(result.status.code(), Some(2), "{flags:?}");
        let err = stderr(&result);
        assert!(err.contains(expected), "{flags:?}: {err}");
        // One line, and no number printed to hundreds of digits.
        let longest_digits = err.split(|c: char| !c.is_ascii_digit()).map(str::len).max().unwrap_or(0);
        assert!(err.lines().count() == 1 && longest_digits < 20, "{flags:?}: one line, short numbers: {err}");
        assert!(!out.exists(), "{flags:?}: a failed run leaves no folder");
    }
}

#[test]
fn a_finished_run_is_not_retrained_or_overwritten() {
    let out = folder("finished");
    let first = run(&args(&quick(&out)));
    assert!(first.status.success(), "{}", stderr(&first));
    let model = std::fs::read(out.join("model.safetensors")).unwrap();
    let ledger = std::fs::read(out.join("ledger.json")).unwrap();

    let o = out.display().to_string();
    let again = run(&["--resume", &o]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to do"));
    assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), model, "the released model is untouched");
    assert_eq!(std::fs::read(out.join("ledger.json")).unwrap(), ledger, "so is its ledger");

    // A new run into the same folder is refused.
    let over = run(&args(&quick(&out)));
    assert_eq!(over.status.code(), Some(2));
    assert!(stderr(&over).contains("holds a released model"), "{}", stderr(&over));
    assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), model);
}

#[test]
fn resume_takes_the_run_flags_and_refuses_conflicting_ones() {
    let out = folder("conflict");
    assert!(run(&args(&quick(&out))).status.success());
    // As if killed after the last checkpoint, before the release.
    let model = std::fs::read(out.join("model.safetensors")).unwrap();
    std::fs::remove_file(out.join("ledger.json")).unwrap();
    std::fs::remove_file(out.join("model.safetensors")).unwrap();
    let o = out.display().to_string();

    let conflict = run(&["--resume", &o, "--epsilon", "1", "--max-grad-norm", "0.5"]);
    assert_eq!(conflict.status.code(), Some(2));
    let err = stderr(&conflict);
    assert!(err.contains("--epsilon 1.0 (the run has 3.0)") && err.contains("--max-grad-norm 0.5"), "{err}");
    // Continuing it in another folder would fork it.
    let elsewhere = folder("fork").display().to_string();
    let fork = run(&["--resume", &o, "--out", &elsewhere]);
    assert_eq!(fork.status.code(), Some(2));
    assert!(stderr(&fork).contains("a run continues in its own folder"), "{}", stderr(&fork));
    // The same value as the run's is no conflict; nothing is trained again.
    let resumed = run(&["--resume", &o, "--epochs", "1"]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), model, "released from the final checkpoint");
    let ledger = Ledger::read(out.join("ledger.json")).unwrap();
    assert_eq!(ledger.releases().count(), 1);
}

#[test]
fn ledgers_of_real_runs_verify() {
    // Batch sizes whose sample rates and calibrated noise multipliers do
    // not survive a lossy float parser (issue: 11, 14, 22 were such).
    for batch in ["11", "14", "22", "300"] {
        let out = folder(&format!("verify-{batch}"));
        let o = out.display().to_string();
        let r = run(&["--epochs", "1", "--batch-size", batch, "--seed", "2", "--json", "--out", &o]);
        assert!(r.status.success(), "{}", stderr(&r));
        let ledger = Ledger::read(out.join("ledger.json"));
        assert!(ledger.is_ok(), "batch {batch}: {:?}", ledger.err());
    }
}

/// Waits until `path` holds bytes other than `seen` (a new checkpoint), or
/// the child ended; a deadline guards against a hang (it measures nothing).
fn wait_for_change(child: &mut std::process::Child, path: &Path, seen: &[u8]) -> Option<Vec<u8>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        if let Ok(now) = std::fs::read(path) {
            if now != seen {
                return Some(now);
            }
        }
        assert!(std::time::Instant::now() < deadline, "hang guard: no new checkpoint in 300 s");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// A run with the defaults (AdamW) killed (SIGKILL) as soon as each new
/// checkpoint appears, so that the kill lands in training or in the
/// writing of the next checkpoint, and resumed each time, ends with the
/// model and the ledger of a run never interrupted, byte for byte.
#[test]
fn a_run_killed_again_and_again_resumes_to_the_uninterrupted_model() {
    let flags = |out: &Path| -> Vec<String> {
        ["--epochs", "30", "--batch-size", "200", "--seed", "4", "--json", "--out"]
            .iter()
            .map(|s| s.to_string())
            .chain([out.display().to_string()])
            .collect()
    };
    let straight = folder("straight");
    assert!(run(&args(&flags(&straight))).status.success());

    let killed = folder("killed");
    let manifest = killed.join("checkpoint").join("checkpoint.json");
    let mut child = digits().args(args(&flags(&killed))).stdout(std::process::Stdio::null()).spawn().unwrap();
    let (mut seen, mut kills) = (Vec::new(), 0);
    while kills < 5 {
        match wait_for_change(&mut child, &manifest, &seen) {
            Some(now) => seen = now,
            None => break, // finished before this kill
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        let resume = ["--resume".to_string(), killed.display().to_string(), "--json".into()];
        child = digits().args(args(&resume)).stdout(std::process::Stdio::null()).spawn().unwrap();
    }
    assert!(child.wait().unwrap().success());
    assert!(kills >= 2, "the run was killed {kills} times");
    for file in ["model.safetensors", "ledger.json"] {
        assert_eq!(std::fs::read(killed.join(file)).unwrap(), std::fs::read(straight.join(file)).unwrap(), "{file}");
    }
    for d in [straight, killed] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn an_audited_run_records_epsilon_hat_beside_epsilon() {
    let out = folder("audit");
    let o = out.display().to_string();
    let r = run(&["--epochs", "5", "--audit", "300", "--seed", "4", "--json", "--out", &o]);
    assert!(r.status.success(), "{}", stderr(&r));
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&r.stdout).lines().last().unwrap()).unwrap();
    let (eps, eps_hat) = (summary["epsilon"].as_f64().unwrap(), summary["epsilon_audit"].as_f64().unwrap());
    assert_eq!(summary["audit_canaries"].as_u64(), Some(300));
    assert!(eps_hat >= 0.0 && eps_hat <= eps, "{summary}");
    let ledger = Ledger::read(out.join("ledger.json")).unwrap();
    let audit = ledger.audits().last().unwrap();
    assert_eq!((audit.epsilon_lower_bound, audit.canaries), (eps_hat, 300));
    assert_eq!(ledger.header().dataset_size, Some(summary["train_examples"].as_u64().unwrap() + 300));
    assert!(!out.join("checkpoint").exists(), "an audited run writes no checkpoint");
    // The data the guarantee is about, by hash.
    let data = ledger.header().data.clone().unwrap();
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/digits.csv.gz");
    assert_eq!(data.sha256, candle_dp::checkpoint::sha256_file(&file).unwrap());
    assert_eq!((data.bytes, data.rows), (std::fs::metadata(&file).unwrap().len(), 1797));
    assert!(std::fs::read_to_string(out.join("report.md")).unwrap().contains("epsilon-hat"));
    // As if interrupted before its release: its flags say --audit, so there is no checkpoint to resume.
    std::fs::remove_file(out.join("ledger.json")).unwrap();
    let r = run(&["--resume", &o]);
    assert_eq!(r.status.code(), Some(2));
    assert!(stderr(&r).contains("nothing to --resume"), "{}", stderr(&r));
    std::fs::remove_dir_all(&out).unwrap();
    let r = run(&["--audit", "10", "--non-private"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(stderr(&r).contains("--audit audits a DP run"), "{}", stderr(&r));
}
