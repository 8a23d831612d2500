//! The RDP of the subsampled Gaussian against an independent quadrature.

mod common;

use common::{quadrature_with_step, rdp_oracle, rel, step};
use dp_accountant::rdp_poisson_subsampled_gaussian;

/// (q, sigma, alpha): dp_accounting's own ten corners (rdp_privacy_accountant_test.py,
/// `test_compute_log_a_equals_mp`) and more: orders near 1, huge orders,
/// tiny q, q around and above 1/2, huge sigma.
const CORNERS: &[(f64, f64, f64)] = &[
    (1e-7, 0.1, 1.01),
    (1e-6, 0.1, 256.0),
    (1e-5, 0.1, 256.1),
    (1e-6, 1.0, 27.0),
    (1e-4, 1.0, 1.5),
    (1e-3, 1.0, 2.0),
    (0.01, 10.0, 20.0),
    (0.1, 100.0, 20.5),
    (0.99, 0.1, 256.0),
    (0.999, 100.0, 256.1),
    (0.01, 1.0, 1.1),
    (0.01, 1.0, 2.5),
    (0.01, 1.1, 10.9),
    (0.04, 1.5, 32.0),
    (0.5, 1.0, 3.3),
    (0.5, 0.8, 7.0),
    (0.3, 0.5, 63.0),
    (0.7, 2.0, 4.5),
    (1e-9, 0.7, 12.5),
    (0.2, 5.0, 1024.0),
    (0.02, 0.6, 512.5),
    (0.1, 3.0, 1.02),
    (0.45, 50.0, 2.2),
    (0.6, 1000.0, 3.7),
    (0.999999, 1.0, 1.5),
    (1e-4, 2.0, 1.3),
    (0.25, 0.3, 100.5),
];

#[test]
fn oracle_is_converged_in_its_step() {
    for &(q, s, a) in CORNERS {
        let h = step(s);
        let coarse = quadrature_with_step(q, s, a, h);
        let fine = quadrature_with_step(q, s, a, h / 2.0);
        // ln(A - 1) agrees to 1e-12 absolute (A - 1 to 1e-12 relative), or
        // to 1e-14 relative where it is large.
        let tol = 1e-12_f64.max(1e-14 * fine.abs());
        assert!((coarse - fine).abs() < tol, "q={q} s={s} a={a}: {coarse} vs {fine}");
    }
}

#[test]
fn rdp_matches_quadrature_at_corners() {
    for &(q, s, a) in CORNERS {
        let got = rdp_poisson_subsampled_gaussian(q, s, a).unwrap();
        let want = rdp_oracle(q, s, a);
        println!("q={q:e} s={s} a={a}: {got:.17e} oracle {want:.17e} rel {:.2e}", rel(got, want));
        assert!(rel(got, want) < 1e-9, "q={q} sigma={s} alpha={a}: {got} vs oracle {want}");
    }
}

/// A deterministic pseudo-random sweep (SplitMix64) over log-uniform q in
/// [1e-6, 0.999], sigma in [0.3, 50] and orders in (1.01, 200), integer and
/// fractional: every value within 1e-9 relative of the quadrature.
#[test]
fn rdp_matches_quadrature_on_a_random_sweep() {
    let mut state = 0x005E_ED0F_D15C_u64;
    let mut uniform = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut worst = 0.0_f64;
    for k in 0..150 {
        let q = (1e-6_f64.ln() + uniform() * (0.999_f64.ln() - 1e-6_f64.ln())).exp();
        let s = (0.3_f64.ln() + uniform() * (50_f64.ln() - 0.3_f64.ln())).exp();
        let mut a = (0.01_f64.ln() + uniform() * (199_f64.ln() - 0.01_f64.ln())).exp() + 1.0;
        if k % 3 == 0 {
            a = a.ceil();
        }
        let got = rdp_poisson_subsampled_gaussian(q, s, a).unwrap();
        let want = rdp_oracle(q, s, a);
        worst = worst.max(rel(got, want));
        assert!(rel(got, want) < 1e-9, "q={q} sigma={s} alpha={a}: {got} vs oracle {want}");
    }
    println!("worst relative difference over the sweep: {worst:.2e}");
}
