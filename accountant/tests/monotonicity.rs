//! Epsilon rises with steps and sample rate, falls with noise and delta.

use dp_accountant::{Adjacency, DpEvent, RdpAccountant};

fn epsilon(q: f64, sigma: f64, steps: u64, delta: f64) -> f64 {
    let mut acc = RdpAccountant::new(Adjacency::AddOrRemoveOne);
    acc.compose(&DpEvent::poisson_sampled_gaussian(q, sigma), steps).unwrap();
    acc.epsilon(delta).unwrap().epsilon
}

fn assert_increasing(values: &[f64], what: &str) {
    for w in values.windows(2) {
        assert!(w[0] < w[1], "{what}: {values:?}");
    }
}

#[test]
fn epsilon_rises_with_steps() {
    let eps: Vec<f64> = [1, 10, 100, 1000, 10_000, 100_000].iter().map(|&n| epsilon(0.01, 1.0, n, 1e-5)).collect();
    assert_increasing(&eps, "steps");
}

#[test]
fn epsilon_rises_with_sample_rate() {
    let eps: Vec<f64> =
        [1e-4, 1e-3, 0.01, 0.05, 0.2, 0.5, 0.9, 1.0].iter().map(|&q| epsilon(q, 1.0, 100, 1e-5)).collect();
    assert_increasing(&eps, "q");
}

#[test]
fn epsilon_falls_with_noise_multiplier() {
    let mut eps: Vec<f64> = [0.5, 0.7, 1.0, 1.5, 2.0, 4.0, 8.0].iter().map(|&s| epsilon(0.01, s, 1000, 1e-5)).collect();
    eps.reverse();
    assert_increasing(&eps, "sigma");
}

#[test]
fn epsilon_falls_with_delta() {
    let mut eps: Vec<f64> = [1e-12, 1e-9, 1e-6, 1e-5, 1e-3, 0.1].iter().map(|&d| epsilon(0.01, 1.0, 1000, d)).collect();
    eps.reverse();
    assert_increasing(&eps, "delta");
}

#[test]
fn refinement_is_never_looser_than_the_grid() {
    for &(q, s, n, d) in &[(0.01, 1.0, 1000, 1e-5), (0.04, 1.5, 2250, 1e-5), (0.5, 0.6, 10, 1e-3), (1.0, 3.0, 1, 1e-6)]
    {
        let mut acc = RdpAccountant::new(Adjacency::AddOrRemoveOne).with_refinement(false);
        acc.compose(&DpEvent::poisson_sampled_gaussian(q, s), n).unwrap();
        let grid = acc.epsilon(d).unwrap();
        let refined = acc.with_refinement(true).epsilon(d).unwrap();
        assert!(refined.epsilon <= grid.epsilon, "{} > {}", refined.epsilon, grid.epsilon);
    }
}

#[test]
fn an_optimal_order_at_the_end_of_the_grid_is_flagged() {
    // Very little privacy loss: the bound wants an order beyond 1024.
    let mut acc = RdpAccountant::new(Adjacency::AddOrRemoveOne);
    acc.compose(&DpEvent::poisson_sampled_gaussian(1e-3, 30.0), 1).unwrap();
    let b = acc.epsilon(1e-5).unwrap();
    assert!(b.order_at_range_edge && b.order >= 512.0, "{b:?}");
    // A typical DP-SGD run is not at the edge.
    let mut acc = RdpAccountant::new(Adjacency::AddOrRemoveOne);
    acc.compose(&DpEvent::poisson_sampled_gaussian(0.01, 1.0), 1000).unwrap();
    assert!(!acc.epsilon(1e-5).unwrap().order_at_range_edge);
}
