//! `audit`: epsilon-hat, an empirical lower bound on epsilon, from a run's
//! canary scores.

use dp_accountant::audit::{audit_one_run, CanaryScores, Guesses};
use dp_accountant::{Error, Valid};

use crate::args::AuditArgs;
use crate::{flag, num, push_json, Failure};

/// `audit`: reads the scores, runs the one-run audit, says what it found.
pub(crate) fn audit(args: AuditArgs, out: &mut String) -> Result<(), Failure> {
    let AuditArgs { scores, delta, alpha, two_sided, json } = args;
    flag("--delta", delta, Valid::UnitFromZero)?;
    flag("--alpha", alpha, Valid::OpenUnit)?;
    let text = std::fs::read_to_string(&scores).map_err(|source| Error::Io { path: scores.clone(), source })?;
    let canaries = CanaryScores::from_json(&text)?;
    let guesses = if two_sided { Guesses::TopAndBottom } else { Guesses::Top };
    let a = audit_one_run(&canaries, delta, alpha, guesses)?;
    let side = if two_sided { "top_and_bottom" } else { "top" };
    if json {
        push_json(
            out,
            serde_json::json!({
                "epsilon_one_run": a.epsilon,
                "epsilon_one_run_fdp": a.epsilon_fdp,
                "mu_one_run_fdp": a.mu_fdp,
                "fdp_guesses": a.fdp_guesses,
                "fdp_correct": a.fdp_correct,
                "p_value": a.p_value,
                "canaries": a.canaries,
                "in_canaries": canaries.in_scores().len(),
                "guesses": a.guesses,
                "correct": a.correct,
                "guess_counts_tried": a.candidates,
                "guesses_on": side,
                "alpha": a.alpha,
                "delta": a.delta,
                "method": "one-run audit, Steinke, Nasr & Jagielski (NeurIPS 2023, arXiv:2305.08846), with its delta \
                           term; f-DP (Gaussian curves) one-run audit, Mahloujifar, Melis & Chaudhuri (ICML 2025, \
                           arXiv:2410.22235); Bonferroni over the guess counts tried",
            }),
        );
        return Ok(());
    }
    let confidence = num(100.0 * (1.0 - alpha));
    out.push_str(&format!(
        "one-run audit of {} canaries ({} included), guesses on the {}\n",
        a.canaries,
        canaries.in_scores().len(),
        if two_sided { "highest and lowest scores" } else { "highest scores" }
    ));
    if a.epsilon > 0.0 {
        // Rounded down: it is a lower bound (--json has every digit).
        let shown = format!("{:.3}", (a.epsilon * 1000.0).floor() / 1000.0);
        out.push_str(&format!(
            "epsilon-hat: {shown} (with {confidence}% confidence, training is not ({shown}, {})-DP)\n",
            num(delta)
        ));
    } else {
        out.push_str("epsilon-hat: 0 (no evidence of leakage at this confidence)\n");
    }
    out.push_str(&format!(
        "  from {} guesses, {} correct: the largest epsilon whose p-value is below alpha / {} = {:.3e}\n",
        a.guesses,
        a.correct,
        a.candidates,
        alpha / a.candidates as f64
    ));
    if a.mu_fdp > 0.0 {
        let shown = format!("{:.3}", (a.epsilon_fdp * 1000.0).floor() / 1000.0);
        out.push_str(&format!(
            "f-DP audit (Gaussian curves): not {:.3}-GDP, i.e. epsilon-hat {shown} at delta {} \
             ({} guesses, {} correct)\n",
            (a.mu_fdp * 1000.0).floor() / 1000.0,
            num(delta),
            a.fdp_guesses,
            a.fdp_correct
        ));
    } else {
        out.push_str("f-DP audit (Gaussian curves): epsilon-hat 0 (no mu-GDP rejected)\n");
    }
    out.push_str(&format!(
        "  {} guess counts tried (1% to 50% of the canaries), each at alpha / {}: the count chosen\n  \
         after seeing the scores is paid for (Bonferroni)\n",
        a.candidates, a.candidates
    ));
    out.push_str(
        "epsilon-hat is a lower bound on what this run leaked about a canary; the accountant's epsilon is an\n\
         upper bound on what any run could leak about any example. epsilon-hat above the accountant's epsilon\n\
         means a bug; below it is expected (canaries are not the worst case). Valid only if each canary was\n\
         included independently with probability 1/2.\n",
    );
    Ok(())
}
