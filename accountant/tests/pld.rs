//! The PLD accountant against closed forms, an independent implementation
//! and the RDP accountant, and its bounds against each other.

use dp_accountant::{Adjacency, DpEvent, PldAccountant, RdpAccountant};

/// The exact delta of the Gaussian mechanism with sensitivity over sigma
/// `mu`: `Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)` (Balle & Wang
/// 2018, "Improving the Gaussian mechanism for differential privacy",
/// Thm. 8).
fn gaussian_delta(mu: f64, eps: f64) -> f64 {
    let phi = |x: f64| 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
    phi(-eps / mu + mu / 2.0) - eps.exp() * phi(-eps / mu - mu / 2.0)
}

/// The exact epsilon of the Gaussian mechanism at `delta` (bisection to 1e-13).
fn gaussian_epsilon(mu: f64, delta: f64) -> f64 {
    let (mut lo, mut hi) = (0.0, 1.0);
    while gaussian_delta(mu, hi) > delta {
        hi *= 2.0;
    }
    while hi - lo > 1e-13 {
        let mid = 0.5 * (lo + hi);
        if gaussian_delta(mu, mid) > delta {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

#[test]
fn gaussian_steps_are_bracketed_around_the_analytic_gaussian() {
    for &(sigma, steps) in &[(1.0, 1u64), (5.0, 10), (3.0, 200), (20.0, 1000)] {
        // n Gaussian steps of noise sigma are one Gaussian of noise sigma / sqrt(n).
        let mu = (steps as f64).sqrt() / sigma;
        let mut acc = PldAccountant::new(Adjacency::AddOrRemoveOne);
        acc.compose(&DpEvent::poisson_sampled_gaussian(1.0, sigma), steps).unwrap();
        for delta in [1e-3, 1e-5, 1e-8, 1e-10] {
            let exact = gaussian_epsilon(mu, delta);
            let b = acc.epsilon(delta).unwrap();
            assert!(
                b.epsilon_lower <= exact && exact <= b.epsilon,
                "sigma {sigma} n {steps} delta {delta}: {exact} not in {b:?}"
            );
            assert!(b.epsilon - b.epsilon_lower <= acc.epsilon_error(), "{b:?}");
        }
        for eps in [0.0, 0.5, 1.0, 3.0] {
            let exact = gaussian_delta(mu, eps);
            let b = acc.delta(eps).unwrap();
            assert!(
                b.delta_lower <= exact && exact <= b.delta,
                "sigma {sigma} n {steps} eps {eps}: {exact} not in {b:?}"
            );
        }
    }
}

#[test]
fn replace_one_gaussian_has_sensitivity_two() {
    // Shuffled batches: each started epoch is one Gaussian of sensitivity 2.
    let (sigma, per_epoch, steps) = (4.0, 50, 120);
    let mut acc = PldAccountant::new(Adjacency::ReplaceOne);
    acc.compose(&DpEvent::shuffled_fixed_size_batches(sigma, per_epoch, steps), 1).unwrap();
    let mu = 2.0 * 3f64.sqrt() / sigma; // three started epochs
    let exact = gaussian_epsilon(mu, 1e-5);
    let b = acc.epsilon(1e-5).unwrap();
    assert!(b.epsilon_lower <= exact && exact <= b.epsilon, "{exact} not in {b:?}");
}

#[test]
fn bounds_are_ordered_and_within_the_requested_error() {
    let event = DpEvent::poisson_sampled_gaussian(0.02, 1.1);
    for error in [0.1, 0.02, 0.005] {
        let mut acc = PldAccountant::with_epsilon_error(Adjacency::AddOrRemoveOne, error).unwrap();
        acc.compose(&event, 2000).unwrap();
        for delta in [1e-3, 1e-5, 1e-8, 1e-10] {
            let b = acc.epsilon(delta).unwrap();
            assert!(b.epsilon_lower <= b.epsilon, "{b:?}");
            assert!(b.epsilon - b.epsilon_lower <= error, "requested {error}: {b:?}");
        }
        for eps in [0.5, 2.0, 4.0] {
            let b = acc.delta(eps).unwrap();
            assert!(b.delta_lower <= b.delta && b.delta <= 1.0, "{b:?}");
        }
    }
}

#[test]
fn pld_is_below_rdp() {
    for &q in &[0.001, 0.01, 0.1] {
        for &sigma in &[0.8, 1.5, 4.0] {
            for &steps in &[10u64, 1000, 10_000] {
                let event = DpEvent::poisson_sampled_gaussian(q, sigma);
                let mut pld = PldAccountant::new(Adjacency::AddOrRemoveOne);
                pld.compose(&event, steps).unwrap();
                let mut rdp = RdpAccountant::new(Adjacency::AddOrRemoveOne);
                rdp.compose(&event, steps).unwrap();
                for delta in [1e-5, 1e-8] {
                    let p = pld.epsilon(delta).unwrap();
                    let r = rdp.epsilon(delta).unwrap().epsilon;
                    // Both bound the same true epsilon from above: the PLD lower bound is below RDP always.
                    assert!(p.epsilon_lower <= r, "q {q} sigma {sigma} n {steps}: {p:?} vs rdp {r}");
                    // Where RDP is not already within the PLD's own error of the truth, PLD is tighter.
                    if r - p.epsilon_lower > pld.epsilon_error() {
                        assert!(p.epsilon < r, "q {q} sigma {sigma} n {steps}: {p:?} vs rdp {r}");
                    }
                }
            }
        }
    }
}

/// dp_accounting 0.6.0's PLD accountant (connect-the-dots, pessimistic,
/// `value_discretization_interval = 2e-5`) on the same heterogeneous
/// composition gives epsilon(1e-6) = 3.56754596 and delta(2) = 1.75886e-3;
/// an independent implementation, so its answers must fall in our brackets.
#[test]
fn heterogeneous_composition_brackets_dp_accounting() {
    let event = DpEvent::composed(vec![
        DpEvent::self_composed(DpEvent::poisson_sampled_gaussian(0.02, 1.2), 800),
        DpEvent::self_composed(DpEvent::poisson_sampled_gaussian(0.005, 0.9), 3000),
        DpEvent::gaussian(20.0),
    ]);
    let mut acc = PldAccountant::new(Adjacency::AddOrRemoveOne);
    acc.compose(&event, 1).unwrap();
    let e = acc.epsilon(1e-6).unwrap();
    assert!(e.epsilon_lower <= 3.56754596 && 3.56754596 <= e.epsilon, "{e:?}");
    let d = acc.delta(2.0).unwrap();
    assert!(d.delta_lower <= 1.75886e-3 && 1.75886e-3 <= d.delta, "{d:?}");
    // The order of composition does not matter.
    let mut reversed = PldAccountant::new(Adjacency::AddOrRemoveOne);
    reversed.compose(&DpEvent::gaussian(20.0), 1).unwrap();
    reversed.compose(&DpEvent::poisson_sampled_gaussian(0.005, 0.9), 3000).unwrap();
    reversed.compose(&DpEvent::poisson_sampled_gaussian(0.02, 1.2), 800).unwrap();
    assert_eq!(reversed.epsilon(1e-6).unwrap(), e);
}

#[test]
fn delta_and_epsilon_queries_are_consistent() {
    let mut acc = PldAccountant::new(Adjacency::AddOrRemoveOne);
    acc.compose(&DpEvent::poisson_sampled_gaussian(0.01, 0.9), 3000).unwrap();
    for delta in [1e-4, 1e-6, 1e-9] {
        let e = acc.epsilon(delta).unwrap();
        // The truth is (e.epsilon, delta)-DP, so the delta lower bound there is <= delta;
        // it is not (e.epsilon_lower - 0, delta)-DP below the lower bound, so the upper delta there is >= delta.
        assert!(acc.delta(e.epsilon).unwrap().delta_lower <= delta);
        assert!(acc.delta(e.epsilon_lower).unwrap().delta >= delta);
    }
    for eps in [0.5, 1.5, 3.0] {
        let d = acc.delta(eps).unwrap();
        // The truth is (eps, d.delta)-DP: the smallest epsilon at d.delta is at most eps.
        assert!(acc.epsilon(d.delta).unwrap().epsilon_lower <= eps);
    }
}

#[test]
fn more_steps_never_cost_less() {
    // The true epsilon grows with the steps; each bracket may be placed
    // differently, but a later upper bound is never below an earlier lower one.
    let mut prev_lower = 0.0;
    for steps in [1u64, 10, 100, 1000, 5000] {
        let mut acc = PldAccountant::new(Adjacency::AddOrRemoveOne);
        acc.compose(&DpEvent::poisson_sampled_gaussian(0.01, 1.0), steps).unwrap();
        let e = acc.epsilon(1e-5).unwrap();
        assert!(e.epsilon >= prev_lower, "{steps}: {e:?} below {prev_lower}");
        assert!(e.epsilon_lower > prev_lower || steps == 1, "{steps}: {e:?}");
        prev_lower = e.epsilon_lower;
    }
}

#[test]
fn unsupported_events_are_refused_as_by_rdp() {
    let mut acc = PldAccountant::new(Adjacency::ReplaceOne);
    let err = acc.compose(&DpEvent::poisson_sampled_gaussian(0.01, 1.0), 10).unwrap_err();
    assert!(err.to_string().contains("add-or-remove-one"), "{err}");
    let mut acc = PldAccountant::new(Adjacency::AddOrRemoveOne);
    assert!(acc.compose(&DpEvent::shuffled_fixed_size_batches(1.0, 10, 10), 1).is_err());
}

#[test]
fn report_shows_both_accountants_and_says_which_one_it_states() {
    use dp_accountant::{
        AccountantKind, Ledger, LedgerHeader, MechanismRecord, NoiseGenerator, NoiseSource, PrivacyReport, SamplerKind,
        Seeding,
    };
    let mut ledger = Ledger::new(LedgerHeader { created_by: "test".into(), ..Default::default() });
    ledger
        .append(MechanismRecord {
            event: DpEvent::self_composed(DpEvent::poisson_sampled_gaussian(0.02, 1.0), 1500),
            adjacency: Adjacency::AddOrRemoveOne,
            clipping_norm: 1.0,
            sampler: SamplerKind::Poisson,
            noise: NoiseSource { generator: NoiseGenerator::Chacha20, seed: Seeding::OsEntropy },
            sampler_seed: Seeding::OsEntropy,
            distributed: None,
        })
        .unwrap();
    let by_pld = PrivacyReport::from_ledger_with(&ledger, Some(1e-5), AccountantKind::Pld).unwrap();
    let by_rdp = PrivacyReport::from_ledger(&ledger, Some(1e-5)).unwrap();
    let pld = ledger.compose_into(PldAccountant::new(ledger.adjacency())).unwrap().epsilon(1e-5).unwrap();
    let rdp = ledger.compose_into(RdpAccountant::new(ledger.adjacency())).unwrap().epsilon(1e-5).unwrap().epsilon;
    assert_eq!(by_pld.epsilon, pld.epsilon);
    assert_eq!(by_rdp.epsilon, rdp);
    for r in [&by_pld, &by_rdp] {
        assert_eq!(r.epsilon_rdp, rdp);
        assert_eq!(r.epsilon_pld, Some(pld.epsilon));
        assert_eq!(r.epsilon_pld_lower, Some(pld.epsilon_lower));
    }
    assert!(by_pld.to_text().contains("The statement uses PLD"));
    assert!(by_rdp.to_markdown().contains("The statement uses RDP"));
    // The curve ends at the statement's epsilon.
    assert_eq!(by_pld.epsilon_by_step.last().unwrap().1, pld.epsilon);
}
