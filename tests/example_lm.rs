//! The lm example as a user runs it, on a slice of the shipped private text
//! (`--limit`): DP LoRA fine-tuning of the shipped base model writes a run
//! folder whose ledger verifies and names the adapter it released, full
//! fine-tuning releases every weight, and the `--json` summary has the
//! fields the README promises.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_dp::accountant::Ledger;

/// The example binary `cargo test` built beside this test.
fn lm(args: &[&str]) -> Output {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let exe = deps.parent().unwrap().join("examples").join(format!("lm{}", std::env::consts::EXE_SUFFIX));
    assert!(exe.exists(), "{} not built", exe.display());
    Command::new(exe).args(args).output().unwrap()
}

fn folder(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("candle-dp-lm-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn quick<'a>(out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--limit", "160", "--batch-size", "40", "--epochs", "1", "--seed", "1", "--json", "--out"];
    v.push(out.to_str().unwrap());
    v.extend_from_slice(extra);
    v
}

fn summary(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn dp_lora_fine_tuning_releases_the_adapter_under_a_verified_ledger() {
    let out = folder("lora");
    let s = summary(&lm(&quick(&out, &["--audit", "100"])));
    let (eps, base, tuned) = (
        s["epsilon"].as_f64().unwrap(),
        s["base_bits_per_byte"].as_f64().unwrap(),
        s["bits_per_byte"].as_f64().unwrap(),
    );
    assert!(eps > 0.0 && eps <= 8.0, "{s}");
    assert_eq!(s["delta"].as_f64(), Some(1e-5));
    assert_eq!(s["fine_tuning"], "lora");
    assert!(s["steps"].as_u64().unwrap() >= 1);
    // The shipped base model predicts bytes far better than uniform (8 bits).
    assert!(base.is_finite() && base < 6.0 && tuned.is_finite(), "{s}");
    let ledger = Ledger::read(out.join("ledger.json")).unwrap();
    let release = ledger.releases().last().unwrap().clone();
    assert_eq!(release.file, "model.safetensors");
    assert_eq!(release.weights_sha256, candle_dp::checkpoint::sha256_file(&out.join("model.safetensors")).unwrap());
    let tensors = candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert!(
        !tensors.is_empty() && tensors.keys().all(|k| k.contains(".lora_")),
        "the adapter alone: {:?}",
        tensors.keys()
    );
    assert!(
        std::fs::read_to_string(out.join("report.md")).unwrap().contains("one window"),
        "the privacy unit is stated"
    );
    // --audit 100: epsilon-hat in the summary and the ledger, below epsilon.
    let audit = ledger.audits().last().unwrap();
    assert_eq!(
        (s["audit_canaries"].as_u64(), s["epsilon_audit"].as_f64()),
        (Some(100), Some(audit.epsilon_lower_bound))
    );
    assert!(audit.epsilon_lower_bound <= eps, "{s}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn dp_full_fine_tuning_releases_every_weight() {
    let out = folder("full");
    let s = summary(&lm(&quick(&out, &["--full"])));
    assert_eq!(s["fine_tuning"], "full");
    assert!(s["epsilon"].as_f64().unwrap() <= 8.0 && s["bits_per_byte"].as_f64().unwrap().is_finite(), "{s}");
    let tensors = candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let base = candle_core::safetensors::load(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/lm-base.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    let mut base_names: Vec<&String> = base.keys().collect();
    names.sort();
    base_names.sort();
    assert_eq!(names, base_names, "the whole model, under the base model's names");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn non_private_fine_tuning_states_no_epsilon_and_bad_flags_are_named() {
    let out = folder("plain");
    let s = summary(&lm(&quick(&out, &["--non-private"])));
    assert!(s["epsilon"].is_null() && s["bits_per_byte"].as_f64().unwrap().is_finite(), "{s}");
    std::fs::remove_dir_all(&out).unwrap();
    for (flags, expected) in [
        (vec!["--lora-rank", "0"], "--lora-rank = 0: must be an integer in [1, 128]"),
        (vec!["--epsilon", "0"], "--epsilon = 0: must be finite and > 0"),
        (vec!["--limit", "3"], "--limit = 3: must be an integer >= 10"),
        (vec!["--audit", "5", "--non-private"], "--audit audits a DP fine-tuning"),
    ] {
        let o = lm(&flags);
        assert_eq!(o.status.code(), Some(2), "{flags:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(expected),
            "{flags:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
