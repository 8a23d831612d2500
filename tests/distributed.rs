//! Data-parallel DP-SGD (issue 17) on an in-process world of threads:
//! W ranks equal one process after K steps up to summation order (f64,
//! 1e-12 relative), with the same global batches and the same ledger
//! records (each stating its world size); the
//! noise slices cover every coordinate exactly once; one rank's failure
//! stops every rank with nothing changed; ranks built otherwise refuse
//! together; only rank 0 writes files. The same properties under MPI are
//! tested by tests/distributed_mpi.rs (feature `mpi`, run under mpirun by
//! .ci/run).

mod common;

use candle_core::DType;
use candle_dp::distributed::{Collective, SingleProcess};
use candle_dp::{DpOptimizer, Error, GaussianNoise};
use candle_nn::{VarMap, SGD};
use common::dp_run::{max_rel_diff, records, world_sizes, Builder, Outcome, Run, N, STEPS};
use common::world::on_ranks;
use common::{mlp_pair, set_deterministic, vars_by_name};

/// 2 and 3 ranks end where one process does (f64, 1e-12 relative: only
/// the order of the sums differs), every rank with the same bits; each
/// step's global batch (the union of the ranks' shards of it) is the
/// one-process batch; the summaries (examples, loss) are global; and the
/// ledgers are the same.
#[test]
fn two_and_three_ranks_equal_one_process() {
    let one = Run::new(DType::F64, 0.4, 0.3).train(STEPS);
    assert!(one.batches.iter().map(Vec::len).sum::<usize>() > 3 * STEPS, "batches too small to test anything");
    for world in [2, 3] {
        let ranks = on_ranks(world, |rank| Run::new(DType::F64, 0.4, 0.3).distribute(rank).train(STEPS));
        for (r, outcome) in ranks.iter().enumerate() {
            assert_eq!(outcome.weights, ranks[0].weights, "rank {r} of {world} drifted from rank 0");
            assert_eq!(records(&outcome.ledger), records(&one.ledger), "rank {r} of {world}: ledger");
            assert_eq!(world_sizes(&outcome.ledger), vec![Some(world as u64)], "rank {r} of {world}: world size");
            let d = max_rel_diff(&outcome.weights, &one.weights);
            assert!(d < 1e-12, "{world} ranks vs one process: relative difference {d:e}");
            assert_ne!(outcome.weights, Run::new(DType::F64, 0.4, 0.3).weights(), "nothing was trained");
            for (step, summary) in outcome.summaries.iter().enumerate() {
                assert_eq!(summary.examples, one.summaries[step].examples, "step {step}");
                let (a, b) = (summary.loss_sum, one.summaries[step].loss_sum);
                assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "step {step}: loss {a} vs {b}");
            }
        }
        for step in 0..STEPS {
            let mut global: Vec<usize> = ranks.iter().flat_map(|o| o.batches[step].clone()).collect();
            global.sort_unstable();
            assert_eq!(global, one.batches[step], "{world} ranks, step {step}: the global batch");
        }
    }
}

/// The ranks' copies of the model start as rank 0's, however each was
/// initialized: a rank whose weights differ ends where the others do.
#[test]
fn ranks_start_from_rank_zeros_weights() {
    let one = Run::new(DType::F64, 0.4, 0.3).train(STEPS);
    let ranks = on_ranks(2, |rank| {
        let run = Run::new(DType::F64, 0.4, 0.3);
        if rank.rank() == 1 {
            set_deterministic(&run.varmap, 77).unwrap();
        }
        run.distribute(rank).train(STEPS)
    });
    assert_eq!(ranks[0].weights, ranks[1].weights);
    assert!(max_rel_diff(&ranks[1].weights, &one.weights) < 1e-12);
}

/// At world size 1 a distributed run is the plain run, bit for bit, in
/// f32 too.
#[test]
fn single_process_world_is_the_plain_run_bit_for_bit() {
    let plain = Run::new(DType::F32, 0.4, 0.3).train(STEPS);
    let single = Run::new(DType::F32, 0.4, 0.3).distribute(SingleProcess).train(STEPS);
    assert_eq!(
        (&single.weights, &single.batches, &single.summaries),
        (&plain.weights, &plain.batches, &plain.summaries)
    );
    assert_eq!(records(&single.ledger), records(&plain.ledger));
    assert_eq!((world_sizes(&single.ledger), world_sizes(&plain.ledger)), (vec![Some(1)], vec![None]));
}

/// With no example in any batch (q tiny), each step releases noise only:
/// the released noise of W ranks is the one-process noise bit for bit
/// (adding zeros is exact). A gap in the slices would leave a coordinate
/// without noise, an overlap would give it twice: either breaks equality.
#[test]
fn noise_slices_cover_every_coordinate_exactly_once() {
    let steps = 3;
    let one = Run::new(DType::F64, 1e-12, 1.0).train(steps);
    assert!(one.batches.iter().all(Vec::is_empty));
    let initial = Run::new(DType::F64, 1e-12, 1.0).weights();
    assert!(one.weights.iter().zip(&initial).all(|(a, b)| a != b), "a coordinate got no noise");
    for world in [2, 3, 4, 7] {
        let ranks = on_ranks(world, |rank| Run::new(DType::F64, 1e-12, 1.0).distribute(rank).train(steps));
        for outcome in &ranks {
            assert_eq!(outcome.weights, one.weights, "{world} ranks: noise differs from one process");
        }
    }
}

/// One rank's failing closure (an error, or a NaN loss) stops every rank:
/// each returns an error (its own, or `PeerFailed`), nothing changes
/// anywhere (weights, steps, ledger), and the same batch is drawn again, so
/// the run that goes on ends where an uninterrupted one does.
#[test]
fn one_ranks_failure_stops_every_rank_and_changes_nothing() {
    let uninterrupted = Run::new(DType::F64, 0.4, 0.3).train(STEPS);
    for (fail, nan) in [(true, false), (false, true)] {
        let ranks = on_ranks(3, |rank| {
            let me = rank.rank();
            let mut run = Run::new(DType::F64, 0.4, 0.3).distribute(rank);
            for _ in 0..2 {
                run.step_failing(false, false).unwrap();
            }
            let before = (run.weights(), run.opt.steps(), run.opt.ledger().unwrap().head());
            // Rank 1's part fails, whatever its batch.
            let err = run.step_failing(fail && me == 1, nan && me == 1).unwrap_err();
            let after = (run.weights(), run.opt.steps(), run.opt.ledger().unwrap().head());
            assert_eq!(after, before, "rank {me}: a refused step changed something");
            let rest = run.train(STEPS - 2);
            (me, err, rest)
        });
        for (me, err, rest) in ranks {
            match (me, &err, nan) {
                (1, Error::InvalidConfig { field: "test data", .. }, false) => {}
                (1, Error::NonFinite { what: "loss", .. }, true) => {}
                (0 | 2, Error::PeerFailed { failed: 1, world_size: 3 }, _) => {}
                _ => panic!("rank {me}: unexpected error {err}"),
            }
            ends_as_uninterrupted(me, &rest, &uninterrupted);
        }
    }
}

/// After a refused step, rank `me`'s run ended where an uninterrupted one
/// does (weights to summation order) with the same ledger records.
fn ends_as_uninterrupted(me: usize, rest: &Outcome, uninterrupted: &Outcome) {
    let d = max_rel_diff(&rest.weights, &uninterrupted.weights);
    assert!(d < 1e-12, "rank {me}: after the refused step, {d:e} from an uninterrupted run");
    assert_eq!(records(&rest.ledger), records(&uninterrupted.ledger), "rank {me}: the ledger records");
}

/// A batch left open on one rank only (`next_batch` without a step): its
/// `train_step` is refused before it draws, and the other ranks, already in
/// the step's all-reduce, fail with it instead of waiting for it forever.
#[test]
fn a_batch_left_open_on_one_rank_fails_the_step_on_every_rank() {
    let uninterrupted = Run::new(DType::F64, 0.4, 0.3).train(STEPS);
    let ranks = on_ranks(3, |rank| {
        let me = rank.rank();
        let mut run = Run::new(DType::F64, 0.4, 0.3).distribute(rank);
        run.step_failing(false, false).unwrap();
        if me == 2 {
            run.opt.next_batch().unwrap();
        }
        let err = run.step_failing(false, false).unwrap_err();
        // Rank 2's stray batch is still its own to close.
        run.opt.cancel_batch();
        (me, err, run.train(STEPS - 1))
    });
    for (me, err, rest) in ranks {
        match (me, &err) {
            (2, Error::OutOfOrder { call: "next_batch()", .. }) => {}
            (0 | 1, Error::PeerFailed { failed: 1, world_size: 3 }) => {}
            _ => panic!("rank {me}: unexpected error {err}"),
        }
        ends_as_uninterrupted(me, &rest, &uninterrupted);
    }
}

/// The test world itself: a rank that ends early (returns, or panics) makes
/// the others' collectives fail instead of waiting forever, so a test whose
/// ranks disagree fails rather than hangs.
#[test]
fn the_thread_world_fails_a_collective_a_rank_left() {
    let results = on_ranks(3, |rank| {
        let mut buf = [1.0f64; 4];
        rank.all_reduce_sum_f64(&mut buf).unwrap();
        assert_eq!(buf, [3.0; 4]);
        if rank.rank() == 1 {
            return Ok(());
        }
        rank.all_reduce_sum_f64(&mut buf)
    });
    assert!(results[1].is_ok());
    for me in [0, 2] {
        assert!(matches!(&results[me], Err(Error::Collective { .. })), "rank {me}: {:?}", results[me]);
    }
    // Different calls of the same length fail on every rank too.
    let results = on_ranks(2, |rank| {
        if rank.rank() == 0 {
            rank.broadcast(&mut [0u8; 8], 0)
        } else {
            rank.all_reduce_sum_f64(&mut [0.0; 8])
        }
    });
    assert!(results.iter().all(|r| matches!(r, Err(Error::Collective { .. }))), "{results:?}");
    let panicked = std::panic::catch_unwind(|| {
        on_ranks(2, |rank| {
            if rank.rank() == 0 {
                panic!("rank 0 fails");
            }
            rank.broadcast(&mut [0u8; 8], 0)
        })
    });
    assert!(panicked.is_err(), "rank 0's panic reaches the test");
}

/// A rank built with another clipping norm, noise seeding or model makes
/// every rank refuse to distribute, each saying whether it is the odd one.
#[test]
fn ranks_built_otherwise_refuse_together() {
    type Tweak = fn(Builder) -> Builder;
    let tweaks: [Tweak; 2] = [|b| b.max_grad_norm(0.31), |b| b.noise(GaussianNoise::from_os_entropy().unwrap())];
    for tweak in tweaks {
        let errors = on_ranks(3, |rank| {
            let me = rank.rank();
            let run = if me == 2 { Run::with(DType::F64, 0.4, tweak) } else { Run::new(DType::F64, 0.4, 0.3) };
            run.opt.distribute(rank).map(|_| ()).unwrap_err()
        });
        for (me, err) in errors.iter().enumerate() {
            let expected = Error::RanksDisagree { disagreeing: 1, world_size: 3, this_rank: me == 2 };
            assert_eq!(err.to_string(), expected.to_string(), "rank {me}");
        }
    }
    // Another model (f32 instead of f64) too.
    let errors = on_ranks(2, |rank| {
        let dtype = if rank.rank() == 1 { DType::F32 } else { DType::F64 };
        Run::new(dtype, 0.4, 0.3).opt.distribute(rank).map(|_| ()).unwrap_err()
    });
    assert!(errors.iter().all(|e| matches!(e, Error::RanksDisagree { disagreeing: 1, .. })), "{errors:?}");
}

/// The budget is enforced on every rank from the same ledger: all take the
/// same number of steps and refuse the next one together.
#[test]
fn the_budget_refuses_on_every_rank_at_the_same_step() {
    let budget = candle_dp::PrivacyBudget { epsilon: 2.0, delta: 1e-5 };
    let allowed = Run::with(DType::F64, 0.4, |b| b.budget(budget)).opt.max_steps().unwrap();
    assert!(allowed < 100, "the test needs a budget that runs out soon ({allowed} steps)");
    let outcomes = on_ranks(2, |rank| {
        let mut run = Run::with(DType::F64, 0.4, |b| b.budget(budget)).distribute(rank);
        let mut taken = 0;
        let err = loop {
            match run.step_failing(false, false) {
                Ok(_) => taken += 1,
                Err(e) => break e,
            }
        };
        (taken, err)
    });
    for (taken, err) in outcomes {
        assert_eq!(taken, allowed);
        assert!(matches!(err, Error::BudgetExhausted { .. }), "{err}");
    }
}

/// What cannot be distributed is refused with a typed error.
#[test]
fn distribute_refuses_what_it_cannot_do() {
    #[derive(Debug)]
    struct Outside;
    impl Collective for Outside {
        fn rank(&self) -> usize {
            2
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum_f64(&self, _: &mut [f64]) -> candle_dp::Result<()> {
            unreachable!("nothing is communicated before the checks")
        }
        fn all_reduce_sum_f32(&self, _: &mut [f32]) -> candle_dp::Result<()> {
            unreachable!()
        }
        fn broadcast(&self, _: &mut [u8], _: usize) -> candle_dp::Result<()> {
            unreachable!()
        }
    }
    let err = Run::new(DType::F64, 0.4, 0.3).opt.distribute(Outside).unwrap_err();
    assert_eq!(err.to_string(), "rank = 2: must be an integer in [0, world_size)");

    let varmap = VarMap::new();
    let _model = mlp_pair(&varmap, &[5, 3], DType::F64).unwrap();
    let shuffled = candle_dp::ShuffledSampler::new(N, 5, Some(1)).unwrap();
    let opt = DpOptimizer::<SGD>::builder(vars_by_name(&varmap), shuffled).noise_multiplier(1.0).build(0.1).unwrap();
    let err = opt.distribute(SingleProcess).unwrap_err();
    assert!(matches!(err, Error::Incompatible { with: "shuffled fixed-size batches", .. }), "{err}");

    let audited = Run::with(DType::F64, 0.4, |b| {
        b.audit(candle_dp::audit::Canaries::new(10).seeded(1))
            .budget(candle_dp::PrivacyBudget { epsilon: 8.0, delta: 1e-5 })
    });
    let err = audited.opt.distribute(SingleProcess).unwrap_err();
    assert!(matches!(err, Error::Incompatible { with: "audit canaries", .. }), "{err}");

    let twice = Run::new(DType::F64, 0.4, 0.3).opt.distribute(SingleProcess).unwrap();
    let err = twice.distribute(SingleProcess).unwrap_err();
    assert!(matches!(err, Error::Incompatible { with: "an optimizer distributed already", .. }), "{err}");
}

/// Only rank 0 writes a release; every rank records it and returns the
/// same statement.
#[test]
fn only_rank_zero_writes_the_release() {
    let root = std::env::temp_dir().join(format!("candle-dp-distributed-release-{}", std::process::id()));
    let releases = on_ranks(2, |rank| {
        let me = rank.rank();
        let mut run = Run::new(DType::F64, 0.4, 0.3).distribute(rank);
        run.step_failing(false, false).unwrap();
        let dir = root.join(format!("rank{me}"));
        let release = run.opt.release(&dir, &run.varmap, Some(1e-5)).unwrap();
        (dir.exists(), release.weights_sha256, release.ledger.to_json(), run.opt.ledger().unwrap().to_json())
    });
    assert!(releases[0].0, "rank 0 wrote nothing");
    assert!(!releases[1].0, "rank 1 wrote files");
    assert_eq!(releases[0].1, releases[1].1);
    assert_eq!(releases[0].2, releases[1].2);
    assert_eq!(releases[0].3, releases[1].3);
    let on_disk = std::fs::read_to_string(root.join("rank0/ledger.json")).unwrap();
    assert_eq!(on_disk, releases[0].2);
    std::fs::remove_dir_all(&root).unwrap();
}

/// Rank 0's write failing (its folder cannot be made) fails the release
/// and the checkpoint on every rank: rank 0 with its I/O error, the others
/// with `PeerFailed`; no rank records the release, the ledgers stay equal,
/// and the run goes on to the uninterrupted result and writes both later.
#[test]
fn rank_zeros_failed_write_fails_every_rank_and_records_nothing() {
    let uninterrupted = Run::new(DType::F64, 0.4, 0.3).train(STEPS);
    let root = std::env::temp_dir().join(format!("candle-dp-distributed-unwritable-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let blocker = root.join("a-file");
    std::fs::write(&blocker, b"not a folder").unwrap();
    let ranks = on_ranks(2, |rank| {
        let me = rank.rank();
        let mut run = Run::new(DType::F64, 0.4, 0.3).distribute(rank);
        run.step_failing(false, false).unwrap();
        let ledger_before = run.opt.ledger().unwrap().to_json();
        // Only rank 0's path is used; it lies under a file.
        let unwritable = blocker.join("out");
        let release = run.opt.release(&unwritable, &run.varmap, Some(1e-5)).map(|_| ()).unwrap_err();
        let checkpoint = run.opt.save_checkpoint(&unwritable, &run.varmap).unwrap_err();
        let ledger_after = run.opt.ledger().unwrap().to_json();
        let rest = run.train(STEPS - 1);
        (me, [release, checkpoint], ledger_before, ledger_after, rest)
    });
    for (me, errors, before, after, rest) in &ranks {
        for err in errors {
            match (me, err) {
                (0, Error::Io { .. }) | (1, Error::PeerFailed { failed: 1, world_size: 2 }) => {}
                _ => panic!("rank {me}: unexpected error {err}"),
            }
        }
        assert_eq!(records(after), records(before), "rank {me}: a failed release was recorded");
        assert_eq!(after, &ranks[0].3, "rank {me}: the ledgers differ");
        let d = max_rel_diff(&rest.weights, &uninterrupted.weights);
        assert!(d < 1e-12, "rank {me}: {d:e} from an uninterrupted run");
    }
    // The same ranks write both once the folder can be made.
    let written = on_ranks(2, |rank| {
        let mut run = Run::new(DType::F64, 0.4, 0.3).distribute(rank);
        run.step_failing(false, false).unwrap();
        let release = run.opt.release(root.join("release"), &run.varmap, Some(1e-5)).unwrap();
        run.opt.save_checkpoint(root.join("checkpoint"), &run.varmap).unwrap();
        release.weights_sha256
    });
    assert_eq!(written[0], written[1]);
    assert!(root.join("release/ledger.json").exists() && root.join("checkpoint").exists());
    std::fs::remove_dir_all(&root).unwrap();
}

/// Half-precision models distribute too: noise-only steps of a bf16 model
/// on 2 and 3 ranks (their f32 masters stepped, rounded once) are the
/// one-process run bit for bit, whatever the other ranks' initial weights
/// (rank 0's are broadcast); with data, the ranks agree bit for bit
/// and stay within one bf16 rounding of the one-process run.
#[test]
fn bf16_models_distribute_with_their_masters() {
    let one = Run::new(DType::BF16, 1e-12, 1.0).train(3);
    assert!(one.batches.iter().all(Vec::is_empty));
    for world in [2, 3] {
        let ranks = on_ranks(world, |rank| {
            let run = Run::new(DType::BF16, 1e-12, 1.0);
            if rank.rank() > 0 {
                set_deterministic(&run.varmap, 77).unwrap();
            }
            run.distribute(rank).train(3)
        });
        for outcome in &ranks {
            assert_eq!(outcome.weights, one.weights, "{world} ranks: bf16 noise-only steps differ");
        }
    }
    let one = Run::new(DType::BF16, 0.4, 0.3).train(STEPS);
    let ranks = on_ranks(2, |rank| Run::new(DType::BF16, 0.4, 0.3).distribute(rank).train(STEPS));
    assert_eq!(ranks[0].weights, ranks[1].weights);
    let drawn: usize = ranks.iter().map(|r| r.batches.concat().len()).sum();
    assert_eq!(drawn, one.batches.concat().len(), "the same global batches");
    // f64 sums in another order may round the f32 mean (hence a master)
    // differently by an f32 ulp; a bf16 weight then differs by at most one
    // bf16 ulp, and only where the master was near a tie. The ulp of x in
    // [2^e, 2^(e+1)) is 2^(e-7) <= 2^-7 |x|.
    let ulp = 2f64.powi(-7);
    for (a, b) in ranks[0].weights.iter().zip(&one.weights) {
        assert!((a - b).abs() <= ulp * b.abs().max(a.abs()), "bf16 weight {a} vs one process {b}");
    }
    let equal = ranks[0].weights.iter().zip(&one.weights).filter(|(a, b)| a == b).count();
    assert!(equal * 100 >= one.weights.len() * 95, "{equal} of {} bf16 weights equal", one.weights.len());
}

/// A checkpoint written by rank 0 of 2 resumes on 3 ranks (and on one
/// process), and the run ends where an uninterrupted one does.
#[test]
fn a_checkpoint_of_two_ranks_resumes_on_three() {
    let uninterrupted = Run::new(DType::F64, 0.4, 0.3).train(STEPS);
    let dir = std::env::temp_dir().join(format!("candle-dp-distributed-ckpt-{}", std::process::id()));
    on_ranks(2, |rank| {
        let mut run = Run::new(DType::F64, 0.4, 0.3).distribute(rank);
        for _ in 0..3 {
            run.step_failing(false, false).unwrap();
        }
        run.opt.save_checkpoint(&dir, &run.varmap).unwrap();
    });
    let ranks = on_ranks(3, |rank| Run::resumed(&dir).distribute(rank).train(STEPS - 3));
    let alone = Run::resumed(&dir).train(STEPS - 3);
    for outcome in ranks.iter().chain([&alone]) {
        let d = max_rel_diff(&outcome.weights, &uninterrupted.weights);
        assert!(d < 1e-12, "resumed: {d:e} from an uninterrupted run");
    }
    // The ledger says which steps ran on how many processes.
    assert_eq!(world_sizes(&ranks[0].ledger), vec![Some(2), Some(3)]);
    assert_eq!(world_sizes(&alone.ledger), vec![Some(2), None]);
    assert_eq!(records(&ranks[0].ledger)[0], records(&alone.ledger)[0]);
    for outcome in &ranks {
        assert_eq!(outcome.weights, ranks[0].weights, "the resumed ranks differ");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A rank that cannot be distributed (here: audit canaries) still takes
/// part in the agreement: it returns its own refusal, every other rank
/// `PeerFailed`, and none waits forever.
#[test]
fn a_rank_that_refuses_makes_every_rank_fail_not_hang() {
    let errors = on_ranks(3, |rank| {
        let me = rank.rank();
        let run = if me == 1 {
            Run::with(DType::F64, 0.4, |b| {
                b.audit(candle_dp::audit::Canaries::new(10).seeded(1))
                    .budget(candle_dp::PrivacyBudget { epsilon: 8.0, delta: 1e-5 })
            })
        } else {
            Run::new(DType::F64, 0.4, 0.3)
        };
        run.opt.distribute(rank).map(|_| ()).unwrap_err()
    });
    for (me, err) in errors.iter().enumerate() {
        match me {
            1 => assert!(matches!(err, Error::Incompatible { with: "audit canaries", .. }), "{err}"),
            _ => assert!(matches!(err, Error::PeerFailed { failed: 1, world_size: 3 }), "rank {me}: {err}"),
        }
    }
}

/// Every rank adopts rank 0's noise generator: a rank seeded otherwise (the
/// seeding, fixed, is the same kind) ends where the one-process run with
/// rank 0's seed does.
#[test]
fn every_rank_adopts_rank_zeros_noise_keys() {
    let one = Run::new(DType::F64, 0.4, 0.3).train(STEPS);
    let ranks = on_ranks(2, |rank| {
        let run = if rank.rank() == 1 {
            Run::with(DType::F64, 0.4, |b| b.noise(GaussianNoise::from_seed(77)))
        } else {
            Run::new(DType::F64, 0.4, 0.3)
        };
        run.distribute(rank).train(STEPS)
    });
    for o in &ranks {
        assert!(max_rel_diff(&o.weights, &one.weights) < 1e-12);
    }
    let other = Run::with(DType::F64, 0.4, |b| b.noise(GaussianNoise::from_seed(77))).train(STEPS);
    assert!(max_rel_diff(&other.weights, &one.weights) > 1e-6, "the seeds must matter for this test");
}
