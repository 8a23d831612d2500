use dp_accountant::*;
use std::time::Instant;
fn main() {
    for &(e, q, n) in &[
        (3.0, 64.0 / 1437.0, 674u64),
        (1.0, 0.01, 10000),
        (8.0, 0.004, 100000),
        (0.1, 1.0, 1),
    ] {
        let t = Instant::now();
        let c = calibrate_noise_multiplier(e, 1e-5, q, n).unwrap();
        println!(
            "target {e}: sigma {:.6} eps {:.8} in {:?}",
            c.noise_multiplier,
            c.epsilon.epsilon,
            t.elapsed()
        );
        let t = Instant::now();
        let m = max_steps(e, 1e-5, q, c.noise_multiplier).unwrap();
        println!(
            "  max steps {} (plan {n}) eps {:.8} in {:?}",
            m.steps,
            m.epsilon.epsilon,
            t.elapsed()
        );
    }
}
