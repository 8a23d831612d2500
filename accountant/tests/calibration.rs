//! Calibration meets its target from the conservative side.

use dp_accountant::{calibrate_noise_multiplier, max_steps, Adjacency, DpEvent, Error, RdpAccountant};

/// A fresh RDP accountant: what the calibration functions compose into.
fn rdp() -> RdpAccountant {
    RdpAccountant::new(Adjacency::AddOrRemoveOne)
}

fn epsilon(q: f64, sigma: f64, steps: u64, delta: f64) -> f64 {
    let mut acc = RdpAccountant::new(Adjacency::AddOrRemoveOne);
    acc.compose(&DpEvent::poisson_sampled_gaussian(q, sigma), steps).unwrap();
    acc.epsilon(delta).unwrap().epsilon
}

#[test]
fn calibrated_sigma_meets_target() {
    for &(target, delta, q, steps) in
        &[(3.0, 1e-5, 64.0 / 1437.0, 674), (1.0, 1e-5, 0.01, 10_000), (8.0, 1e-6, 0.004, 100_000), (0.5, 1e-5, 1.0, 1)]
    {
        let c = calibrate_noise_multiplier(&rdp(), target, delta, q, steps).unwrap();
        // Recomputed independently of the calibration's own bookkeeping.
        let eps = epsilon(q, c.noise_multiplier, steps, delta);
        assert_eq!(eps, c.epsilon.epsilon);
        assert!(eps <= target, "{eps} > {target}");
        assert!(eps >= 0.999 * target, "{eps} < 0.999 * {target}");
        // And it is (nearly) the smallest: 0.1% less noise misses the target.
        assert!(epsilon(q, c.noise_multiplier * 0.999, steps, delta) > target);
    }
}

#[test]
fn max_steps_is_the_last_step_within_budget() {
    for &(target, q, sigma) in &[(3.0, 0.01, 1.0), (1.0, 0.001, 0.8), (8.0, 0.05, 2.0)] {
        let m = max_steps(&rdp(), target, 1e-5, q, sigma).unwrap();
        assert!(m.steps >= 1);
        assert!(epsilon(q, sigma, m.steps, 1e-5) <= target);
        assert!(epsilon(q, sigma, m.steps + 1, 1e-5) > target);
    }
    // One step already over budget: zero steps.
    assert_eq!(max_steps(&rdp(), 0.01, 1e-5, 1.0, 1.0).unwrap().steps, 0);
}

#[test]
fn calibration_rejects_bad_input_naming_the_field() {
    let err = calibrate_noise_multiplier(&rdp(), f64::NAN, 1e-5, 0.01, 10).unwrap_err();
    assert!(matches!(err, Error::InvalidParameter { field: "target_epsilon", .. }), "{err}");
    let err = calibrate_noise_multiplier(&rdp(), 1.0, 1.0, 0.01, 10).unwrap_err();
    assert_eq!(err.to_string(), "delta = 1: must be in (0, 1)");
    let err = calibrate_noise_multiplier(&rdp(), 1.0, 1e-5, 0.0, 10).unwrap_err();
    assert_eq!(err.to_string(), "sample_rate = 0: must be in (0, 1]");
    let err = calibrate_noise_multiplier(&rdp(), 1.0, 1e-5, 0.1, 0).unwrap_err();
    assert_eq!(err.to_string(), "steps = 0: must be an integer >= 1");
    let err = max_steps(&rdp(), 1.0, 1e-5, 0.1, -2.0).unwrap_err();
    assert_eq!(err.to_string(), "noise_multiplier = -2: must be finite and > 0");
}
