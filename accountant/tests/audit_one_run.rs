//! The one-run audit (Steinke, Nasr & Jagielski 2023): its p-value against a
//! direct evaluation, epsilon-hat's closed form, monotonicity and false-alarm
//! rate, and its refusals.

use dp_accountant::audit::{self, CanaryScores, Guesses};
use dp_accountant::Error;

/// The p-value written out directly: binomial coefficients from Pascal's
/// triangle, probabilities as `C(r, k) p^k (1 - p)^(r - k)` in plain `f64`
/// (no logarithms, no lgamma), the delta term's maximum over every `i`.
fn direct_p_value(pascal: &[Vec<f64>], m: u64, r: usize, v: usize, epsilon: f64, delta: f64) -> f64 {
    let p = epsilon.exp() / (1.0 + epsilon.exp());
    let pmf = |k: usize| pascal[r][k] * p.powi(k as i32) * (1.0 - p).powi((r - k) as i32);
    let beta: f64 = (v..=r).map(pmf).sum();
    let mut term: f64 = 0.0;
    for i in 1..=v {
        let window: f64 = (v - i..v).map(pmf).sum();
        term = term.max(window / i as f64);
    }
    (beta + 2.0 * m as f64 * delta * term).min(1.0)
}

fn pascal(n: usize) -> Vec<Vec<f64>> {
    let mut rows = vec![vec![1.0]];
    for r in 1..=n {
        let prev = &rows[r - 1];
        let row = (0..=r).map(|k| if k == 0 || k == r { 1.0 } else { prev[k - 1] + prev[k] }).collect();
        rows.push(row);
    }
    rows
}

/// The p-value equals the direct evaluation on a grid: every `(r, v)` for
/// `m` up to 60, a spread of them for `m` = 200 and 1000 (guesses 1..m,
/// wrong guesses 0..guesses), epsilon 0 to 4, delta 0 to 1e-2. Agreement to
/// 1e-9 relative (the direct sum's own rounding is about 1e-13) or 1e-250
/// absolute, where `p^k` underflows in the direct form.
#[test]
fn p_value_equals_a_direct_evaluation() {
    let rows = pascal(1000);
    let mut checked = 0;
    for &(m, dense) in &[(7u64, true), (60, true), (200, false), (1000, false)] {
        let rs: Vec<usize> = if dense {
            (1..=m as usize).collect()
        } else {
            [1, 2, 5, 10, 33, 100, m as usize / 2, m as usize].into_iter().filter(|&r| r <= m as usize).collect()
        };
        for r in rs {
            let vs: Vec<usize> =
                if dense { (0..=r).collect() } else { [0, 1, r / 4, r / 2, 3 * r / 4, r - 1, r].into() };
            for v in vs {
                for epsilon in [0.0, 0.5, 1.0, 2.0, 4.0] {
                    for delta in [0.0, 1e-5, 1e-2] {
                        let got = audit::one_run_p_value(m, r as u64, v as u64, epsilon, delta).unwrap();
                        let want = direct_p_value(&rows, m, r, v, epsilon, delta);
                        let ok = (got - want).abs() <= 1e-9 * want.abs() || (got - want).abs() < 1e-250;
                        assert!(ok, "m {m} r {r} v {v} eps {epsilon} delta {delta}: {got} vs {want}");
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked > 20_000, "{checked}");
}

/// With `v = r = m` and `delta = 0` the p-value is `p^m`, so epsilon-hat
/// solves `(e^eps / (1 + e^eps))^m = alpha`: `eps = ln(a / (1 - a))` with
/// `a = alpha^(1/m)`.
#[test]
fn epsilon_hat_has_its_closed_form_for_perfect_guesses() {
    for (m, alpha) in [(10u64, 0.05f64), (100, 0.05), (1000, 0.01), (5000, 0.001)] {
        let a = alpha.powf(1.0 / m as f64);
        let exact = (a / (1.0 - a)).ln();
        let got = audit::one_run_epsilon(m, m, m, 0.0, alpha).unwrap();
        assert!(got <= exact && exact - got <= 1e-8 * exact, "m {m}: {got} vs {exact}");
        assert!(audit::one_run_p_value(m, m, m, got, 0.0).unwrap() < alpha);
    }
    // No correct guess, or no better than chance: nothing is rejected.
    assert_eq!(audit::one_run_epsilon(100, 50, 0, 1e-5, 0.05).unwrap(), 0.0);
    assert_eq!(audit::one_run_epsilon(100, 50, 25, 1e-5, 0.05).unwrap(), 0.0);
}

/// SplitMix64: the tests' own generator.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, t) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * t).cos()
    }
}

/// `m` canaries, each included with probability 1/2; an included one scores
/// `shift` more (on the same base draws for every shift).
fn gaussian_canaries(m: usize, shift: f64, seed: u64) -> CanaryScores {
    let mut rng = Mix(seed);
    let (mut ins, mut outs) = (Vec::new(), Vec::new());
    for _ in 0..m {
        let included = rng.next() & 1 == 1;
        let score = rng.normal();
        if included {
            ins.push(score + shift);
        } else {
            outs.push(score);
        }
    }
    CanaryScores::new(ins, outs).unwrap()
}

/// Epsilon-hat grows with the separation of in- and out-scores (the same
/// draws shifted: every guess count's correct guesses can only grow), is 0
/// for no separation on these draws, and is 0 when every score is equal.
#[test]
fn epsilon_hat_grows_with_separation() {
    for guesses in [Guesses::Top, Guesses::TopAndBottom] {
        let mut last = -1.0;
        for shift in [0.0, 0.5, 1.0, 2.0, 4.0, 8.0] {
            let audit = audit::audit_one_run(&gaussian_canaries(1000, shift, 3), 1e-5, 0.05, guesses).unwrap();
            assert!(audit.epsilon >= last, "{guesses:?} shift {shift}: {} after {last}", audit.epsilon);
            if shift == 0.0 {
                assert_eq!(audit.epsilon, 0.0, "{guesses:?}");
            }
            last = audit.epsilon;
        }
        assert!(last > 2.0, "{guesses:?}: separated scores give {last}");
    }
    let equal = CanaryScores::new(vec![0.5; 300], vec![0.5; 280]).unwrap();
    let audit = audit::audit_one_run(&equal, 1e-5, 0.05, Guesses::TopAndBottom).unwrap();
    assert_eq!((audit.epsilon, audit.guesses), (0.0, 0));
}

/// The guarantee: if training is `(epsilon, delta)`-DP, epsilon-hat exceeds
/// epsilon with probability at most alpha. Randomized response on each
/// canary (the score is its membership flipped with probability
/// `1 / (1 + e)`, plus a jitter that breaks ties) is exactly 1-DP in each
/// canary; over 300 seeds at alpha
/// 0.05 the audit may exceed 1 at most 0.05 * 300 = 15 times in
/// expectation (and Bonferroni makes it rarer): more than 15 + 3 standard
/// deviations (26) fails. Identical in- and out-distributions (0-DP) are
/// held to the same count for epsilon-hat > 0. Randomized response also
/// shows the audit is not vacuous: at m = 2000 it finds well above 0.5.
#[test]
fn the_false_alarm_rate_is_at_most_alpha() {
    let p_flip = 1.0 / (1.0 + std::f64::consts::E);
    let (mut over_rr, mut over_null, mut sum_rr) = (0, 0, 0.0);
    let seeds = 300;
    for seed in 0..seeds {
        let mut rng = Mix(1000 + seed);
        let (mut ins, mut outs) = (Vec::new(), Vec::new());
        for _ in 0..2000 {
            let included = rng.next() & 1 == 1;
            let says_in = included ^ (rng.uniform() < p_flip);
            // Jitter independent of membership breaks the ties (post-processing: still 1-DP).
            let score = if says_in { 1.0 } else { 0.0 } + 0.01 * rng.uniform();
            if included {
                ins.push(score);
            } else {
                outs.push(score);
            }
        }
        let rr = audit::audit_one_run(&CanaryScores::new(ins, outs).unwrap(), 0.0, 0.05, Guesses::TopAndBottom);
        let rr = rr.unwrap();
        over_rr += usize::from(rr.epsilon > 1.0);
        sum_rr += rr.epsilon;
        let null = audit::audit_one_run(&gaussian_canaries(500, 0.0, 5000 + seed), 1e-5, 0.05, Guesses::Top);
        over_null += usize::from(null.unwrap().epsilon > 0.0);
    }
    assert!(over_rr <= 26, "randomized response: epsilon-hat > 1 in {over_rr} of {seeds}");
    assert!(over_null <= 26, "identical distributions: epsilon-hat > 0 in {over_null} of {seeds}");
    let mean = sum_rr / seeds as f64;
    assert!(mean > 0.5, "randomized response at epsilon 1: mean epsilon-hat {mean}");
    eprintln!("false alarms: {over_rr} (RR, > 1), {over_null} (null, > 0) of {seeds}; mean RR epsilon-hat {mean:.3}");
}

/// The result names what it rests on, and its p-value is below the
/// Bonferroni level at the epsilon it reports.
#[test]
fn the_audit_reports_its_counts() {
    let scores = gaussian_canaries(1000, 3.0, 11);
    let audit = audit::audit_one_run(&scores, 1e-5, 0.05, Guesses::Top).unwrap();
    assert_eq!(audit.canaries, 1000);
    assert_eq!(audit.candidates, 7);
    assert!(audit.correct <= audit.guesses && audit.guesses <= 1000);
    assert!(audit.epsilon > 0.0);
    let p = audit::one_run_p_value(1000, audit.guesses as u64, audit.correct as u64, audit.epsilon, 1e-5).unwrap();
    assert_eq!(p, audit.p_value);
    assert!(p < 0.05 / 7.0);
    assert!(
        audit::one_run_epsilon(1000, audit.guesses as u64, audit.correct as u64, 1e-5, 0.05 / 7.0).unwrap()
            == audit.epsilon
    );
}

/// Bad input is a typed error naming the field.
#[test]
fn bad_input_is_refused() {
    let field = |e: Error| match e {
        Error::InvalidParameter { field, .. } => field,
        other => panic!("{other}"),
    };
    assert_eq!(field(CanaryScores::new(vec![1.0, f64::NAN], vec![]).unwrap_err()), "in_scores");
    assert_eq!(field(CanaryScores::new(vec![], vec![f64::INFINITY]).unwrap_err()), "out_scores");
    assert_eq!(field(CanaryScores::new(vec![], vec![]).unwrap_err()), "canaries");
    assert_eq!(field(audit::one_run_p_value(10, 11, 0, 1.0, 0.0).unwrap_err()), "guesses");
    assert_eq!(field(audit::one_run_p_value(10, 5, 6, 1.0, 0.0).unwrap_err()), "correct");
    assert_eq!(field(audit::one_run_p_value(0, 0, 0, 1.0, 0.0).unwrap_err()), "canaries");
    assert_eq!(field(audit::one_run_p_value(10, 5, 5, -1.0, 0.0).unwrap_err()), "epsilon");
    assert_eq!(field(audit::one_run_p_value(10, 5, 5, 1.0, 1.5).unwrap_err()), "delta");
    assert_eq!(field(audit::one_run_epsilon(10, 5, 5, 0.0, 1.0).unwrap_err()), "alpha");
    let scores = CanaryScores::new(vec![1.0], vec![0.0]).unwrap();
    assert_eq!(field(audit::audit_one_run(&scores, 0.0, 0.0, Guesses::Top).unwrap_err()), "alpha");
    assert_eq!(field(audit::audit_one_run(&scores, f64::NAN, 0.05, Guesses::Top).unwrap_err()), "delta");
}

/// What reviewers feed in: 3000 seeded mutations of a scores file (bytes
/// replaced, inserted, deleted; numbers made huge, negative, NaN-like) are
/// each refused with a typed error or audited, never a panic; accepted ones
/// give a finite epsilon-hat.
#[test]
fn mutated_score_files_are_refused_or_audited() {
    let base = r#"{"in_scores": [0.5, 1e3, -2, 7.25, 3], "out_scores": [0.1, -1e-300, 2, 4]}"#.as_bytes().to_vec();
    let alphabet = b"{}[],:.-+eE0123456789\" nulltrueNaNin_scoresout_";
    let mut rng = Mix(77);
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..3000 {
        let mut bytes = base.clone();
        for _ in 0..1 + rng.next() % 4 {
            let at = (rng.next() as usize) % (bytes.len() + 1);
            let c = alphabet[(rng.next() as usize) % alphabet.len()];
            match rng.next() % 3 {
                0 if at < bytes.len() => bytes[at] = c,
                1 => bytes.insert(at, c),
                _ if at < bytes.len() => {
                    bytes.remove(at);
                }
                _ => bytes.push(c),
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        match CanaryScores::from_json(&text) {
            Ok(scores) => {
                let a = audit::audit_one_run(&scores, 1e-5, 0.05, Guesses::TopAndBottom).unwrap();
                assert!(a.epsilon.is_finite() && a.epsilon >= 0.0, "{text}");
                accepted += 1;
            }
            Err(Error::Scores { .. } | Error::InvalidParameter { .. }) => refused += 1,
            Err(other) => panic!("{text}: unexpected {other}"),
        }
    }
    assert!(accepted > 100 && refused > 100, "accepted {accepted}, refused {refused}");
}

/// The f-DP audit (Mahloujifar, Melis & Chaudhuri 2025) on Gaussian scores:
/// in-scores `N(mu, 1)` against out-scores `N(0, 1)` make each canary's
/// membership exactly `mu`-GDP, so the audit may reject `mu` itself at most
/// alpha of the time: over 100 seeded runs at `mu = 1`, alpha 0.05, more
/// than 5 + 3 standard deviations (12) rejections fail. On the same
/// scores it is at least as tight as the `(epsilon, delta)` audit, and its
/// epsilon never exceeds the epsilon of the true `mu`.
#[test]
fn the_fdp_audit_is_valid_and_tighter_on_gaussian_scores() {
    let seeds: u64 = 100;
    let (mut rejected_true, mut tighter) = (0u64, 0u64);
    let true_eps = audit::audit_one_run(&gaussian_canaries(10, 0.0, 1), 1e-5, 0.05, Guesses::Top).unwrap();
    assert_eq!(true_eps.epsilon_fdp, 0.0);
    for seed in 0..seeds {
        let a = audit::audit_one_run(&gaussian_canaries(500, 1.0, 9000 + seed), 1e-5, 0.05, Guesses::TopAndBottom);
        let a = a.unwrap();
        rejected_true += u64::from(a.mu_fdp > 1.0);
        tighter += u64::from(a.epsilon_fdp >= a.epsilon);
    }
    assert!(rejected_true <= 12, "1-GDP rejected in {rejected_true} of {seeds}");
    assert!(tighter >= seeds * 9 / 10, "f-DP at least as tight in only {tighter} of {seeds}");
    let strong = audit::audit_one_run(&gaussian_canaries(1000, 3.0, 4), 1e-5, 0.05, Guesses::TopAndBottom).unwrap();
    assert!(strong.mu_fdp > 1.0 && strong.mu_fdp <= 3.0, "mu-hat {} for 3-GDP scores", strong.mu_fdp);
    assert!(strong.epsilon_fdp > strong.epsilon, "{} vs {}", strong.epsilon_fdp, strong.epsilon);
    eprintln!(
        "f-DP: 1-GDP rejected in {rejected_true} of {seeds}; at least as tight in {tighter}; 3-GDP scores: mu-hat {:.3}, \
         epsilon-hat {:.3} (f-DP) vs {:.3}",
        strong.mu_fdp, strong.epsilon_fdp, strong.epsilon
    );
}
