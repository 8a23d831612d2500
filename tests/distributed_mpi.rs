//! Data-parallel DP-SGD under a real MPI (feature `mpi`; `.ci/run` installs
//! OpenMPI and runs this): 1, 2 and 3 ranks started by `mpirun` equal the
//! one-process run after K steps (f64, 1e-12 relative) with the same
//! ledger; one rank's failure stops every rank and changes nothing; the
//! digits and lm examples under `mpirun -n 2 ... --distributed` state what
//! a one-process run does. Without `mpirun` on the PATH these tests fail,
//! saying what to install: they never skip.

mod common;

use std::path::PathBuf;
use std::process::Command;

use candle_core::DType;
use candle_dp::distributed::{Collective, Mpi};
use common::dp_run::{max_rel_diff, records, strip, world_sizes, Run, STEPS};
use serde_json::{json, Value};

/// Where a rank started by [`mpirun`] writes what it ended with.
const OUT_ENV: &str = "CANDLE_DP_MPI_OUT";
/// The rank whose closure fails at step 2, if any.
const FAIL_ENV: &str = "CANDLE_DP_MPI_FAIL_RANK";
/// The most seconds an MPI job may take before mpirun kills it (a hang is a failure).
const TIMEOUT_S: &str = "300";

/// One rank of the MPI job the tests below start (it is not a test by itself).
#[test]
#[ignore = "one rank of an MPI job: the other tests start it under mpirun"]
fn mpi_rank() {
    let out = PathBuf::from(std::env::var(OUT_ENV).expect("started by the tests under mpirun, with CANDLE_DP_MPI_OUT"));
    let fail: Option<usize> = std::env::var(FAIL_ENV).ok().map(|r| r.parse().unwrap());
    let mpi = Mpi::init().unwrap();
    let (rank, world_size) = (mpi.rank(), mpi.world_size());
    let collectives = collectives_are_right(&mpi);
    let mut run = Run::new(DType::F64, 0.4, 0.3).distribute(mpi);
    let mut errors = Vec::new();
    while run.opt.steps() < STEPS as u64 {
        let failing = fail == Some(rank) && errors.len() == 2;
        errors.push(run.step_failing(failing, false).err().map(|e| e.to_string()));
    }
    let weights: Vec<u64> = run.weights().iter().map(|w| w.to_bits()).collect();
    let ledger = run.opt.ledger().unwrap().to_json();
    let report = json!({
        "rank": rank, "world_size": world_size, "weights": weights, "ledger": ledger, "errors": errors,
        "collectives": collectives,
    });
    std::fs::write(out.join(format!("rank{rank}.json")), report.to_string()).unwrap();
}

/// The engine's sums (of lengths that do not divide by the world size, so
/// the padding is exercised) and broadcasts from the last rank, on exact
/// integers: what each rank got, as a list of failures (empty: right).
fn collectives_are_right(mpi: &Mpi) -> Vec<String> {
    let (r, w) = (mpi.rank(), mpi.world_size());
    let mut failures = Vec::new();
    for len in [1, 7, 1000, 4099] {
        let mut a: Vec<f64> = (0..len).map(|i| ((r + 1) * i) as f64).collect();
        mpi.all_reduce_sum_f64(&mut a).unwrap();
        if a.iter().enumerate().any(|(i, v)| *v != (i * w * (w + 1) / 2) as f64) {
            failures.push(format!("f64 sum of length {len}"));
        }
        let mut b: Vec<f32> = (0..len).map(|i| ((r + 1) * (i % 100)) as f32).collect();
        mpi.all_reduce_sum_f32(&mut b).unwrap();
        if b.iter().enumerate().any(|(i, v)| *v != ((i % 100) * w * (w + 1) / 2) as f32) {
            failures.push(format!("f32 sum of length {len}"));
        }
        let mut c: Vec<u8> = (0..len).map(|i| (i + r) as u8).collect();
        mpi.broadcast(&mut c, w - 1).unwrap();
        if c.iter().enumerate().any(|(i, v)| *v != (i + w - 1) as u8) {
            failures.push(format!("broadcast of length {len}"));
        }
    }
    if mpi.broadcast(&mut [0u8], w).is_ok() {
        failures.push("a broadcast from a rank outside the world was accepted".into());
    }
    failures
}

/// `mpirun` with what OpenMPI needs to run as root (CI runs as root) and
/// more ranks than cores.
fn mpirun(ranks: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "--timeout", TIMEOUT_S, "-n", &ranks.to_string()])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c
}

fn run_checked(mut c: Command, what: &str) -> std::process::Output {
    let out = c.output().unwrap_or_else(|e| {
        panic!(
            "{what}: cannot start mpirun ({e}): these tests need an MPI (Debian: apt-get install openmpi-bin \
             libopenmpi-dev libclang-dev; .ci/run installs them)"
        )
    });
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("candle-dp-mpi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs [`mpi_rank`] on `ranks` ranks; what each rank ended with.
fn job(ranks: usize, fail: Option<usize>) -> Vec<Value> {
    let dir = scratch(&format!("job{ranks}"));
    let mut c = mpirun(ranks);
    c.arg(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "mpi_rank", "--test-threads=1", "--quiet"])
        .env(OUT_ENV, &dir);
    if let Some(r) = fail {
        c.env(FAIL_ENV, r.to_string());
    }
    run_checked(c, &format!("mpirun -n {ranks} mpi_rank"));
    let outcomes =
        (0..ranks).map(|r| serde_json::from_str(&std::fs::read_to_string(dir.join(format!("rank{r}.json"))).unwrap()));
    let outcomes: Vec<Value> = outcomes.collect::<Result<_, _>>().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    outcomes
}

fn weights(v: &Value) -> Vec<f64> {
    v["weights"].as_array().unwrap().iter().map(|b| f64::from_bits(b.as_u64().unwrap())).collect()
}

/// 1, 2 and 3 MPI ranks end where one process does (f64, 1e-12 relative),
/// every rank with the same bits, and account the same steps.
#[test]
fn mpi_ranks_equal_one_process() {
    let one = Run::new(DType::F64, 0.4, 0.3).train(STEPS);
    for ranks in [1, 2, 3] {
        let outcomes = job(ranks, None);
        for (r, o) in outcomes.iter().enumerate() {
            assert_eq!(o["world_size"], ranks);
            assert_eq!(o["collectives"], json!([]), "rank {r} of {ranks}: the engine's collectives");
            assert_eq!(o["errors"], json!(vec![Value::Null; STEPS]), "rank {r} of {ranks}");
            assert_eq!(o["weights"], outcomes[0]["weights"], "rank {r} of {ranks} drifted from rank 0");
            let d = max_rel_diff(&weights(o), &one.weights);
            assert!(d < 1e-12, "{ranks} MPI ranks vs one process: relative difference {d:e}");
            let ledger = o["ledger"].as_str().unwrap();
            assert_eq!(records(ledger), records(&one.ledger), "rank {r} of {ranks}: the ledger");
            assert_eq!(world_sizes(ledger), vec![Some(ranks as u64)], "rank {r} of {ranks}: the world size recorded");
        }
    }
}

/// Rank 1's failure at step 2 makes every rank refuse that step (its own
/// error there, `PeerFailed` elsewhere), and the run that goes on ends where
/// an uninterrupted one does: the refused step changed nothing anywhere.
#[test]
fn mpi_one_ranks_failure_stops_every_rank() {
    let one = Run::new(DType::F64, 0.4, 0.3).train(STEPS);
    let outcomes = job(3, Some(1));
    for (r, o) in outcomes.iter().enumerate() {
        let errors = o["errors"].as_array().unwrap();
        assert_eq!(errors.len(), STEPS + 1, "rank {r}: one refused step, then {STEPS} taken");
        for (k, e) in errors.iter().enumerate() {
            match (k, r) {
                (2, 1) => assert!(e.as_str().unwrap().starts_with("test data = 0"), "rank 1: {e}"),
                (2, _) => assert_eq!(
                    e.as_str().unwrap(),
                    "1 of 3 ranks failed this step (see their errors): no rank took it and nothing was recorded"
                ),
                _ => assert!(e.is_null(), "rank {r}, step {k}: {e}"),
            }
        }
        let d = max_rel_diff(&weights(o), &one.weights);
        assert!(d < 1e-12, "rank {r}: {d:e} from an uninterrupted run");
    }
}

/// An example built with `--features mpi`, beside this test.
fn example_exe(name: &str) -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    deps.parent().unwrap().parent().unwrap().join("examples").join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

fn summary(stdout: &[u8]) -> Value {
    let text = String::from_utf8_lossy(stdout);
    serde_json::from_str(text.lines().last().expect("a summary line")).unwrap()
}

/// Runs example `name` with `flags` in one process and under `mpirun -n 2
/// ... --distributed`; returns both summaries, after checking what must be
/// equal: every field but `approximate` ones, the time and the world size,
/// and the ledgers' records but the released weights' hash (the models
/// differ in their last bits: the f32 sums are summed in another order).
fn one_and_two_ranks(name: &str, flags: &[&str], approximate: &[&str]) -> (Value, Value) {
    let dir = scratch(name);
    let with_out = |out: &str| {
        let mut f: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        f.extend(["--json".into(), "--out".into(), dir.join(out).display().to_string()]);
        f
    };
    let mut alone = Command::new(example_exe(name));
    alone.args(with_out("one"));
    let alone = summary(&run_checked(alone, name).stdout);
    let mut two = mpirun(2);
    two.arg(example_exe(name)).arg("--distributed").args(with_out("two"));
    let two = summary(&run_checked(two, &format!("mpirun -n 2 {name} --distributed")).stdout);
    assert_eq!(alone["world_size"], 1);
    assert_eq!(two["world_size"], 2);
    let without = |s: &Value| {
        let mut s = s.clone();
        for k in approximate.iter().chain(&["wall_seconds", "world_size"]) {
            s.as_object_mut().unwrap().remove(*k);
        }
        s
    };
    assert_eq!(without(&alone), without(&two));
    let ledger = |run: &str| {
        let mut r = records(&std::fs::read_to_string(dir.join(run).join("ledger.json")).unwrap());
        r.iter_mut().for_each(|x| strip(x, "weights_sha256"));
        r
    };
    assert_eq!(ledger("one"), ledger("two"));
    std::fs::remove_dir_all(&dir).unwrap();
    (alone, two)
}

/// `mpirun -n 2 digits --distributed --json` prints the one-process
/// summary line (plus `world_size`) and accounts the same steps; the test
/// accuracy may move by a borderline example or two (of 359).
#[test]
fn digits_under_mpirun_states_what_one_process_does() {
    let (one, two) = one_and_two_ranks("digits", &["--seed", "3", "--epochs", "2"], &["test_accuracy"]);
    let accuracy = |s: &Value| s["test_accuracy"].as_f64().unwrap();
    assert!((accuracy(&one) - accuracy(&two)).abs() <= 2.0 / 359.0 + 1e-12, "{one} vs {two}");
}

/// The lm example's DP LoRA fine-tuning, likewise: the held-out bits per
/// byte agree to 1e-6 relative (f32 sums in another order), and the
/// sampled lines are left out (a sampler reading nearly equal
/// probabilities may pick another byte).
#[test]
fn lm_under_mpirun_states_what_one_process_does() {
    let flags = ["--seed", "1", "--limit", "160", "--batch-size", "40", "--epochs", "1"];
    let (one, two) = one_and_two_ranks("lm", &flags, &["bits_per_byte", "samples"]);
    let bpb = |s: &Value| s["bits_per_byte"].as_f64().unwrap();
    assert!((bpb(&one) - bpb(&two)).abs() <= 1e-6 * bpb(&one), "{} vs {}", bpb(&one), bpb(&two));
}
