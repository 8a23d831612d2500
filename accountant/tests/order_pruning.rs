//! Skipping fractional orders that convexity rules out never changes the
//! answer: epsilon and delta equal the minimum over every grid order.

use dp_accountant::conversion::{epsilon_at_order, log_delta_at_order};
use dp_accountant::{default_orders, Adjacency, DpEvent, RdpAccountant};

#[test]
fn pruned_grid_minimum_equals_the_full_grid_minimum() {
    let orders = default_orders();
    let mut cases = 0;
    for &q in &[1e-4, 0.003, 0.01, 0.05, 0.2, 0.5, 0.9] {
        for &sigma in &[0.5, 0.8, 1.1, 2.0, 5.0] {
            for &steps in &[1u64, 100, 10_000] {
                let mut acc = RdpAccountant::new(Adjacency::AddOrRemoveOne).with_refinement(false);
                acc.compose(&DpEvent::poisson_sampled_gaussian(q, sigma), steps).unwrap();
                let rdp = acc.rdp(); // every order, computed
                for &delta in &[1e-3, 1e-5, 1e-9] {
                    let full = orders
                        .iter()
                        .zip(&rdp)
                        .map(|(&a, &r)| epsilon_at_order(a, r, delta))
                        .fold(f64::INFINITY, f64::min);
                    let pruned = acc.epsilon(delta).unwrap();
                    assert_eq!(pruned.epsilon, full, "q={q} sigma={sigma} steps={steps} delta={delta}");
                    assert!(pruned.dropped_orders.is_empty());
                    cases += 1;
                }
                let eps = 1.0;
                let full =
                    orders.iter().zip(&rdp).map(|(&a, &r)| log_delta_at_order(a, r, eps)).fold(f64::INFINITY, f64::min);
                assert_eq!(acc.delta(eps).unwrap().delta, full.exp().min(1.0), "q={q} sigma={sigma} steps={steps}");
            }
        }
    }
    assert_eq!(cases, 315);
}
