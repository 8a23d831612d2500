//! `calibrate` and `max-steps` print what they printed before they went
//! through the one calibration and one step search over the accountant
//! trait: the expected outputs were captured from the binary at commit
//! 35b3086 (release build), byte for byte, before the change.

use std::process::Command;

/// `(arguments, stdout)` of each run, by RDP and by PLD, text and JSON.
const RUNS: &[(&[&str], &str)] = &[
    (
        &["calibrate", "--target-epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "2000"],
        "noise multiplier = 0.9785049208497952 gives epsilon = 2.9999306495141265 <= 3 at delta = 1e-5 (q = 0.01, 2000 steps, RDP accountant)\n",
    ),
    (
        &["calibrate", "--target-epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "2000", "--json"],
        concat!(r#"{"accountant":"rdp","delta":0.00001,"epsilon":2.9999306495141265,"noise_multiplier":0.9785049208497952,"order":6.587655187686042,"sample_rate":0.01,"steps":2000,"target_epsilon":3.0}"#, "\n"),
    ),
    (
        &["calibrate", "--target-epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "2000", "--accountant", "pld"],
        "noise multiplier = 0.9314498592738879 gives epsilon = 2.999883489656575 <= 3 at delta = 1e-5 (q = 0.01, 2000 steps, PLD accountant)\n",
    ),
    (
        &["calibrate", "--target-epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "2000", "--accountant", "pld", "--json"],
        concat!(r#"{"accountant":"pld","delta":0.00001,"epsilon":2.999883489656575,"epsilon_error":0.02,"epsilon_lower":2.985371356402231,"noise_multiplier":0.9314498592738879,"sample_rate":0.01,"steps":2000,"target_epsilon":3.0}"#, "\n"),
    ),
    (
        &["calibrate", "--target-epsilon", "1", "--delta", "1e-6", "--dataset-size", "60000", "--batch-size", "256", "--epochs", "3", "--json"],
        concat!(r#"{"accountant":"rdp","delta":1e-6,"epsilon":0.999996251119734,"noise_multiplier":1.1102373350557366,"order":12.83520027470542,"sample_rate":0.004266666666666667,"steps":704,"target_epsilon":1.0}"#, "\n"),
    ),
    (
        &["calibrate", "--target-epsilon", "1", "--delta", "1e-6", "--dataset-size", "60000", "--batch-size", "256", "--epochs", "3", "--accountant", "pld", "--epsilon-error", "0.05", "--json"],
        concat!(r#"{"accountant":"pld","delta":1e-6,"epsilon":0.9999977567101991,"epsilon_error":0.05,"epsilon_lower":0.9627078290803879,"noise_multiplier":0.9169131975522469,"sample_rate":0.004266666666666667,"steps":704,"target_epsilon":1.0}"#, "\n"),
    ),
    (
        &["max-steps", "--target-epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.01", "--noise-multiplier", "1.1"],
        "3132 steps fit: epsilon = 2.999852398971285 <= 3 at delta = 1e-5 (RDP accountant)\n",
    ),
    (
        &["max-steps", "--target-epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.01", "--noise-multiplier", "1.1", "--json"],
        concat!(r#"{"accountant":"rdp","delta":0.00001,"epsilon":2.999852398971285,"noise_multiplier":1.1,"sample_rate":0.01,"steps":3132,"target_epsilon":3.0}"#, "\n"),
    ),
    (
        &["max-steps", "--target-epsilon", "1", "--delta", "1e-5", "--sample-rate", "0.01", "--noise-multiplier", "1.1", "--accountant", "pld", "--epsilon-error", "0.05"],
        "405 steps fit: epsilon = 0.9990693250543292 <= 1 at delta = 1e-5 (PLD accountant)\n",
    ),
    (
        &["max-steps", "--target-epsilon", "1", "--delta", "1e-5", "--sample-rate", "0.01", "--noise-multiplier", "1.1", "--accountant", "pld", "--epsilon-error", "0.05", "--json"],
        concat!(r#"{"accountant":"pld","delta":0.00001,"epsilon":0.9990693250543292,"noise_multiplier":1.1,"sample_rate":0.01,"steps":405,"target_epsilon":1.0}"#, "\n"),
    ),
    (
        &["max-steps", "--target-epsilon", "0.01", "--delta", "1e-5", "--sample-rate", "1", "--noise-multiplier", "1", "--json"],
        concat!(r#"{"accountant":"rdp","delta":0.00001,"epsilon":0.0,"noise_multiplier":1.0,"sample_rate":1.0,"steps":0,"target_epsilon":0.01}"#, "\n"),
    ),
    (
        &["max-steps", "--target-epsilon", "0.01", "--delta", "1e-5", "--sample-rate", "1", "--noise-multiplier", "1", "--accountant", "pld", "--json"],
        concat!(r#"{"accountant":"pld","delta":0.00001,"epsilon":0.0,"noise_multiplier":1.0,"sample_rate":1.0,"steps":0,"target_epsilon":0.01}"#, "\n"),
    ),
];

/// A PLD search refused before it starts, from the same work estimate.
const REFUSED: (&[&str], &str) = (
    &["calibrate", "--target-epsilon", "3", "--delta", "1e-5", "--dataset-size", "60000", "--batch-size", "1", "--epochs", "3", "--accountant", "pld"],
    "dp-accountant: error: --accountant pld: this search needs at least 8 PLD compositions of 4.7e8 operations (about 27 s), more than the limit of 5.0e8 (about 4 s): use --accountant rdp, or a larger --epsilon-error\n",
);

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dp-accountant")).args(args).output().unwrap();
    (out.status.code(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn calibrate_and_max_steps_print_what_they_printed_before() {
    for (args, expected) in RUNS {
        let (code, stdout, stderr) = run(args);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        assert_eq!(stdout, *expected, "{args:?}");
    }
}

#[test]
fn a_pld_search_too_large_is_refused_as_before() {
    let (args, expected) = REFUSED;
    let (code, stdout, stderr) = run(args);
    assert_eq!(code, Some(2), "{args:?}: {stderr}");
    assert_eq!(stdout, "");
    assert_eq!(stderr, expected, "{args:?}");
}
