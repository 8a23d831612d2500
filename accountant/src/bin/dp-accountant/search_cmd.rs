//! `calibrate` and `max-steps`: the library's searches, by the accountant
//! chosen; a PLD search is bounded in work and shows its progress.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use dp_accountant::{
    calibrate_noise_multiplier, AccountantKind, Adjacency, DpEvent, Epsilon, Error, PldAccountant, PldEpsilon,
    PrivacyAccountant, RdpAccountant, Valid,
};
use serde_json::json;

use crate::args::{Answer, CalibrateArgs, MaxStepsArgs, PldOptions, Target, CLI_MAX_WORK};
use crate::{flag, num, progress, push_json, Failure};

/// PLD searches (calibrate, max-steps) are refused when their estimated
/// work exceeds this (about 4 s), and show progress beyond `PROGRESS_WORK`
/// (about a second); both in the units of `dp_accountant::MAX_WORK`.
const MAX_SEARCH_WORK: f64 = 5e8;
const PROGRESS_WORK: f64 = 1.5e8;

/// `calibrate`: the smallest noise multiplier that meets the target.
pub(crate) fn calibrate(args: CalibrateArgs, out: &mut String) -> Result<(), Failure> {
    let CalibrateArgs { target: Target { target_epsilon, delta }, plan, accountant, answer: Answer { pld, json } } =
        args;
    flag("--target-epsilon", target_epsilon, Valid::Positive)?;
    flag("--delta", delta, Valid::OpenUnit)?;
    let (q, steps) = plan.resolve()?;
    let search = Search::new(accountant, &pld, || {
        // The work is probed at RDP's answer, which PLD's is close to.
        let probe =
            calibrate_noise_multiplier(&rdp(), target_epsilon, delta, q, steps).map_or(1.0, |c| c.noise_multiplier);
        (DpEvent::poisson_sampled_gaussian(q, probe), steps, 40.0)
    })?;
    let c = calibrate_noise_multiplier(&*search.accountant, target_epsilon, delta, q, steps)?;
    search.finish(out);
    if json {
        let mut v = json!({
            "noise_multiplier": c.noise_multiplier, "epsilon": c.epsilon.epsilon, "target_epsilon": target_epsilon,
            "delta": delta, "sample_rate": q, "steps": steps, "accountant": accountant.name(),
        });
        if let Some(order) = c.epsilon.order {
            v["order"] = json!(order);
        }
        // A proven lower bound is PLD's, within --epsilon-error of the upper one.
        if let Some(lower) = c.epsilon.epsilon_lower {
            v["epsilon_lower"] = json!(lower);
            v["epsilon_error"] = json!(pld.epsilon_error);
        }
        push_json(out, v);
    } else {
        out.push_str(&format!(
            "noise multiplier = {} gives epsilon = {} <= {} at delta = {delta:e} (q = {}, {steps} steps, {} \
             accountant)\n",
            num(c.noise_multiplier),
            num(c.epsilon.epsilon),
            num(target_epsilon),
            num(q),
            accountant.name().to_uppercase()
        ));
    }
    Ok(())
}

/// `max-steps`: the largest number of steps within the target.
pub(crate) fn max_steps(args: MaxStepsArgs, out: &mut String) -> Result<(), Failure> {
    let MaxStepsArgs {
        target: Target { target_epsilon, delta },
        sample_rate,
        noise_multiplier,
        accountant,
        answer: Answer { pld, json },
    } = args;
    flag("--target-epsilon", target_epsilon, Valid::Positive)?;
    flag("--delta", delta, Valid::OpenUnit)?;
    flag("--sample-rate", sample_rate, Valid::HalfOpenUnit)?;
    flag("--noise-multiplier", noise_multiplier, Valid::Positive)?;
    let search = Search::new(accountant, &pld, || {
        // Probed at RDP's answer (PLD's is close to it); past 2^40 steps, at 2^40.
        let probe = dp_accountant::max_steps(&rdp(), target_epsilon, delta, sample_rate, noise_multiplier)
            .map_or(1u64 << 40, |m| m.steps.max(1));
        (DpEvent::poisson_sampled_gaussian(sample_rate, noise_multiplier), probe, 2.0 * (probe as f64).log2() + 4.0)
    })?;
    let m = dp_accountant::max_steps(&*search.accountant, target_epsilon, delta, sample_rate, noise_multiplier)?;
    search.finish(out);
    if json {
        push_json(
            out,
            json!({
                "steps": m.steps, "epsilon": m.epsilon.epsilon, "target_epsilon": target_epsilon,
                "delta": delta, "sample_rate": sample_rate, "noise_multiplier": noise_multiplier,
                "accountant": accountant.name(),
            }),
        );
    } else {
        out.push_str(&format!(
            "{} steps fit: epsilon = {} <= {} at delta = {delta:e} ({} accountant)\n",
            m.steps,
            num(m.epsilon.epsilon),
            num(target_epsilon),
            accountant.name().to_uppercase()
        ));
    }
    Ok(())
}

/// A fresh RDP accountant, as the searches and their probes use it.
fn rdp() -> RdpAccountant {
    RdpAccountant::new(Adjacency::AddOrRemoveOne)
}

/// The accountant a search composes its candidates into: RDP as it is, or
/// PLD at `--epsilon-error` with every answer counted against the search's
/// work bound ([`Bounded`]).
struct Search {
    accountant: Box<dyn PrivacyAccountant>,
    log: Option<Arc<SearchLog>>,
}

impl Search {
    /// `probe` gives one composition a PLD search is planned from (an event,
    /// its count) and the number of compositions the search may take; RDP
    /// searches need no plan.
    fn new(
        kind: AccountantKind,
        pld: &PldOptions,
        probe: impl FnOnce() -> (DpEvent, u64, f64),
    ) -> Result<Self, Failure> {
        match kind {
            AccountantKind::Rdp => Ok(Self { accountant: Box::new(rdp()), log: None }),
            AccountantKind::Pld => {
                let inner = pld.accountant()?;
                let (event, count, evaluations) = probe();
                let mut planned = inner.clone();
                planned.compose(&event, count)?;
                let log = Arc::new(SearchLog::plan(planned.work()?, evaluations)?);
                Ok(Self { accountant: Box::new(Bounded { inner, log: Arc::clone(&log) }), log: Some(log) })
            }
        }
    }

    /// Ends the progress line, and notes compositions counted as missing the target.
    fn finish(&self, out: &mut String) {
        progress::end_line(" done");
        if self.log.as_ref().is_some_and(|log| log.capped.load(Ordering::Relaxed)) {
            out.push_str(&format!(
                "note: some PLD compositions exceeded the work bound ({CLI_MAX_WORK:.0e}) and were counted as missing the \
                 target: the answer is conservative\n"
            ));
        }
    }
}

/// A PLD search's bookkeeping: its work bounded up front and as it goes,
/// its progress shown when it may take over a second. Shared by every copy
/// of the search's accountant.
#[derive(Debug)]
struct SearchLog {
    show: bool,
    done: AtomicU32,
    capped: AtomicBool,
    /// The work done so far: the search stops past `MAX_SEARCH_WORK` whatever
    /// the plan said. Counted, never timed, so that the same command gives
    /// the same answer on every machine; each composition is itself bounded
    /// by `CLI_MAX_WORK`, so a search stops within `MAX_SEARCH_WORK +
    /// CLI_MAX_WORK` operations.
    spent: Mutex<f64>,
}

impl SearchLog {
    /// Plans `evaluations` compositions of about `work` each.
    fn plan(work: f64, evaluations: f64) -> Result<Self, Failure> {
        // Refused up front if even the fewest compositions a search takes (8)
        // exceed the bound; the work actually spent is bounded in `answer`.
        let total = work * evaluations;
        let least = work * evaluations.min(8.0);
        if least > MAX_SEARCH_WORK {
            return Err(Failure::Usage(format!(
                "--accountant pld: this search needs at least 8 PLD compositions of {work:.1e} operations (about \
                 {:.0} s), more than the limit of {MAX_SEARCH_WORK:.1e} (about 4 s): use --accountant rdp, or a \
                 larger --epsilon-error",
                least * 7e-9
            )));
        }
        Ok(Self {
            show: total > PROGRESS_WORK,
            done: AtomicU32::new(0),
            capped: AtomicBool::new(false),
            spent: Mutex::new(0.0),
        })
    }

    /// One evaluation. A composition over the work bound counts as missing
    /// the target (infinite epsilon): conservative, never a smaller answer.
    fn answer(&self, acc: &PldAccountant, delta: f64) -> Result<Epsilon, Error> {
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        if self.show {
            progress::show(&format!("\rdp-accountant: PLD search, composition {done}..."));
        }
        let spent = *self.spent.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if spent > MAX_SEARCH_WORK {
            return Err(Error::Calibration {
                reason: format!(
                    "--accountant pld: the search spent {spent:.1e} operations in {} compositions without an answer, \
                     more than the limit of {MAX_SEARCH_WORK:.1e} (about 4 s): use --accountant rdp, or a larger \
                     --epsilon-error",
                    done - 1
                ),
            });
        }
        let answer = acc.epsilon(delta);
        // A failed composition is not cached: asking its work would build it
        // again. It is charged the most a composition may cost.
        let work = if answer.is_ok() { acc.work().unwrap_or(CLI_MAX_WORK) } else { CLI_MAX_WORK };
        *self.spent.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) += work;
        match answer {
            Err(Error::PldWorkTooLarge { .. } | Error::GridTooLarge { .. }) => {
                self.capped.store(true, Ordering::Relaxed);
                Ok(PldEpsilon { epsilon: f64::INFINITY, epsilon_lower: 0.0, delta, grid_step: 0.0 }.into())
            }
            other => Ok(other?.into()),
        }
    }
}

/// A PLD accountant whose answers are counted against its search's
/// [`SearchLog`]; composing is delegated as it is.
#[derive(Debug)]
struct Bounded {
    inner: PldAccountant,
    log: Arc<SearchLog>,
}

impl PrivacyAccountant for Bounded {
    fn epsilon_at(&self, delta: f64) -> Result<Epsilon, Error> {
        self.log.answer(&self.inner, delta)
    }

    fn boxed_clone(&self) -> Box<dyn PrivacyAccountant> {
        Box::new(Bounded { inner: self.inner.clone(), log: Arc::clone(&self.log) })
    }

    fn compose(&mut self, event: &DpEvent, count: u64) -> Result<(), Error> {
        self.inner.compose(event, count)
    }

    fn check(&self, event: &DpEvent) -> Result<(), Error> {
        self.inner.check(event)
    }

    fn adjacency(&self) -> Adjacency {
        self.inner.adjacency()
    }

    fn delta_at(&self, epsilon: f64) -> Result<f64, Error> {
        // Not asked by the searches; unbounded like any other delta query.
        Ok(self.inner.delta(epsilon)?.delta)
    }
}
