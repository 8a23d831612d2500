//! One calibration and one step search over [`PrivacyAccountant`] give what
//! the per-accountant twins they replaced gave, for RDP and for PLD.
//!
//! The expected values were printed by the former functions
//! (`calibrate_noise_multiplier`, `calibrate_noise_multiplier_pld`,
//! `max_steps`, `max_steps_pld`) at commit 35b3086, in a release build, with
//! `{:?}` (shortest round-trip digits), before they were replaced.

use dp_accountant::{
    calibrate_noise_multiplier, max_steps, AccountantKind, Adjacency, DpEvent, Epsilon, Error, PldAccountant,
    PrivacyAccountant, RdpAccountant,
};

/// Relative agreement required: the arithmetic is the same, so the values
/// agree to the last bits (rounding order aside).
const REL_TOL: f64 = 1e-12;

fn assert_close(got: f64, expected: f64, what: &str) {
    let scale = expected.abs().max(f64::MIN_POSITIVE);
    assert!(
        (got - expected).abs() <= REL_TOL * scale,
        "{what}: {got:?} != {expected:?} (relative tolerance {REL_TOL})"
    );
}

fn rdp() -> RdpAccountant {
    RdpAccountant::new(Adjacency::AddOrRemoveOne)
}

/// The accountant a case names: RDP, or PLD at an error.
fn accountant(pld_error: Option<f64>) -> Box<dyn PrivacyAccountant> {
    match pld_error {
        None => Box::new(rdp()),
        Some(e) => Box::new(PldAccountant::with_epsilon_error(Adjacency::AddOrRemoveOne, e).unwrap()),
    }
}

/// What an answer adds to epsilon, by accountant: RDP's order, PLD's
/// proven lower bound.
fn detail(e: &Epsilon, pld_error: Option<f64>) -> Option<f64> {
    if pld_error.is_some() {
        e.epsilon_lower
    } else {
        e.order
    }
}

/// A calibration the former functions answered: `(target, delta, q,
/// steps)` for the PLD error (`None`: RDP), and their `(sigma, epsilon,
/// detail)`, the detail being RDP's order or PLD's lower bound.
struct Calibration {
    pld_error: Option<f64>,
    plan: (f64, f64, f64, u64),
    answer: (f64, f64, f64),
}

/// A step search the former functions answered: `(target, delta, q,
/// sigma)` for the PLD error (`None`: RDP), and their `(steps, epsilon)`.
struct Steps {
    pld_error: Option<f64>,
    plan: (f64, f64, f64, f64),
    answer: (u64, f64),
}

const fn calibration(pld_error: Option<f64>, plan: (f64, f64, f64, u64), answer: (f64, f64, f64)) -> Calibration {
    Calibration { pld_error, plan, answer }
}

/// From the former `calibrate_noise_multiplier` (RDP) and
/// `calibrate_noise_multiplier_pld`.
const CALIBRATIONS: &[Calibration] = &[
    calibration(None, (1.0, 1e-5, 0.01, 1000), (1.5130572363589005, 0.9999998438556539, 16.844325627536122)),
    calibration(None, (3.0, 1e-5, 0.004, 10_000), (0.8952300192065706, 2.9998989311425257, 6.832954437407747)),
    calibration(None, (8.0, 1e-6, 0.1, 500), (1.752811207542671, 7.9996459647120535, 4.166689644542428)),
    calibration(None, (2.0, 1e-5, 1.0, 100), (21.49199657122409, 1.9999059163436992, 10.213628036189869)),
    calibration(Some(0.02), (3.0, 1e-5, 0.01, 2000), (0.9314498592738879, 2.999883489656575, 2.985371356402231)),
    calibration(Some(0.02), (1.0, 1e-5, 0.02, 500), (1.8887092388490536, 0.9999933980698577, 0.9857340080795398)),
    calibration(Some(0.02), (2.0, 1e-5, 1.0, 100), (20.002954363415228, 1.999947812091147, 1.9855882211292393)),
    calibration(Some(0.05), (3.0, 1e-5, 0.01, 100), (0.6508682671243574, 2.9998880033628224, 2.963885186137844)),
];

/// From the former `max_steps` (RDP) and `max_steps_pld`.
const STEPS: &[Steps] = &[
    Steps { pld_error: None, plan: (3.0, 1e-5, 0.01, 1.1), answer: (3132, 2.999852398971285) },
    Steps { pld_error: None, plan: (1.0, 1e-5, 0.004, 0.8), answer: (0, 0.0) },
    Steps { pld_error: None, plan: (1.0, 1e-5, 0.004, 1.2), answer: (3322, 0.9999101426325747) },
    Steps { pld_error: None, plan: (8.0, 1e-5, 1.0, 10.0), answer: (245, 7.981722505854297) },
    Steps { pld_error: None, plan: (0.01, 1e-5, 1.0, 1.0), answer: (0, 0.0) },
    Steps { pld_error: Some(0.05), plan: (1.0, 1e-5, 0.01, 1.1), answer: (405, 0.9990693250543292) },
    Steps { pld_error: Some(0.02), plan: (3.0, 1e-5, 0.02, 1.0), answer: (586, 2.9985808040455955) },
    Steps { pld_error: Some(0.02), plan: (0.01, 1e-5, 1.0, 1.0), answer: (0, 0.0) },
];

#[test]
fn calibration_matches_the_former_rdp_and_pld_functions() {
    for Calibration { pld_error, plan: (target, delta, q, steps), answer: (sigma, epsilon, expected_detail) } in
        CALIBRATIONS
    {
        let c = calibrate_noise_multiplier(&*accountant(*pld_error), *target, *delta, *q, *steps).unwrap();
        let at = format!("calibrate {pld_error:?} {target} {delta} {q} {steps}");
        assert_close(c.noise_multiplier, *sigma, &at);
        assert_close(c.epsilon.epsilon, *epsilon, &at);
        assert_close(detail(&c.epsilon, *pld_error).unwrap(), *expected_detail, &at);
    }
}

#[test]
fn max_steps_matches_the_former_rdp_and_pld_functions() {
    for Steps { pld_error, plan: (target, delta, q, sigma), answer: (steps, epsilon) } in STEPS {
        let m = max_steps(&*accountant(*pld_error), *target, *delta, *q, *sigma).unwrap();
        let at = format!("max-steps {pld_error:?} {target} {delta} {q} {sigma}");
        assert_eq!(m.steps, *steps, "{at}");
        assert_close(m.epsilon.epsilon, *epsilon, &at);
    }
}

/// The trait's answers are the inherent ones, and a kind's fresh accountant
/// is the type's `new`.
#[test]
fn trait_answers_are_the_accountants_own() {
    let event = DpEvent::poisson_sampled_gaussian(0.01, 1.1);
    let mut r = rdp();
    let mut p = PldAccountant::new(Adjacency::AddOrRemoveOne);
    let mut by_kind = [AccountantKind::Rdp, AccountantKind::Pld].map(|k| k.new_accountant(Adjacency::AddOrRemoveOne));
    r.compose(&event, 1000).unwrap();
    p.compose(&event, 1000).unwrap();
    for acc in &mut by_kind {
        acc.compose(&event, 1000).unwrap();
    }
    let (r_eps, p_eps) = (r.epsilon(1e-5).unwrap(), p.epsilon(1e-5).unwrap());
    let r_trait = PrivacyAccountant::epsilon_at(&r, 1e-5).unwrap();
    assert_eq!((r_trait.epsilon, r_trait.order), (r_eps.epsilon, Some(r_eps.order)));
    let p_trait = PrivacyAccountant::epsilon_at(&p, 1e-5).unwrap();
    assert_eq!((p_trait.epsilon, p_trait.epsilon_lower), (p_eps.epsilon, Some(p_eps.epsilon_lower)));
    assert_eq!(by_kind[0].epsilon_at(1e-5).unwrap(), r_trait);
    assert_eq!(by_kind[1].epsilon_at(1e-5).unwrap(), p_trait);
    assert_eq!(by_kind[0].delta_at(1.5).unwrap(), r.delta(1.5).unwrap().delta);
    assert_eq!(by_kind[1].delta_at(1.5).unwrap(), p.delta(1.5).unwrap().delta);
    assert_eq!(
        AccountantKind::Rdp.epsilon(Adjacency::AddOrRemoveOne, [&DpEvent::self_composed(event, 1000)], 1e-5).unwrap(),
        r_eps.epsilon
    );
}

/// The search composes on top of what the accountant holds: `m` steps
/// already taken leave exactly `m` fewer (RDP composes linearly, so the two
/// compositions are the same).
#[test]
fn max_steps_counts_the_steps_already_composed() {
    let (q, sigma) = (0.01, 1.1);
    let fresh = max_steps(&rdp(), 3.0, 1e-5, q, sigma).unwrap();
    let mut taken = rdp();
    taken.compose(&DpEvent::poisson_sampled_gaussian(q, sigma), 1000).unwrap();
    let rest = max_steps(&taken, 3.0, 1e-5, q, sigma).unwrap();
    assert_eq!(rest.steps, fresh.steps - 1000);
    assert_eq!(rest.epsilon.epsilon, fresh.epsilon.epsilon);
}

/// The accountant's adjacency is the one calibrated under: Poisson
/// amplification is refused under replace-one, not silently assumed.
#[test]
fn calibration_uses_the_accountants_adjacency() {
    let replace = RdpAccountant::new(Adjacency::ReplaceOne);
    let err = calibrate_noise_multiplier(&replace, 3.0, 1e-5, 0.01, 100).unwrap_err();
    assert!(matches!(err, Error::UnsupportedEvent { event: "poisson_sampled", .. }), "{err}");
    let err = max_steps(&replace, 3.0, 1e-5, 0.01, 1.0).unwrap_err();
    assert!(matches!(err, Error::UnsupportedEvent { event: "poisson_sampled", .. }), "{err}");
}
