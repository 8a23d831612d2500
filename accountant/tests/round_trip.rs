//! epsilon -> delta -> epsilon, and delta -> epsilon -> delta, agree.

use dp_accountant::{Adjacency, DpEvent, RdpAccountant};

#[test]
fn epsilon_delta_round_trip() {
    for &q in &[0.001, 0.01, 0.1, 0.8, 1.0] {
        for &s in &[0.5, 1.0, 10.0] {
            let mut acc = RdpAccountant::new(Adjacency::AddOrRemoveOne);
            acc.compose(&DpEvent::poisson_sampled_gaussian(q, s), 100).unwrap();
            for &delta in &[0.1, 1e-3, 1e-5, 1e-9, 1e-12] {
                let eps = acc.epsilon(delta).unwrap();
                let back = acc.delta(eps.epsilon).unwrap();
                if eps.epsilon == 0.0 {
                    // The KL shortcut: epsilon 0 holds at any delta it was asked for.
                    assert!(back.delta <= delta, "q={q} s={s}: {} > {delta}", back.delta);
                } else {
                    let r = (back.delta / delta - 1.0).abs();
                    assert!(r < 1e-6, "q={q} s={s} delta={delta}: eps {} -> delta {}", eps.epsilon, back.delta);
                }
            }
        }
    }
}
