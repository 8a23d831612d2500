//! Composition adds RDP; bad or unsupported events change nothing.

mod common;

use common::rel;
use dp_accountant::{Adjacency, DpEvent, Error, RdpAccountant, Valid};

fn rdp_of(event: &DpEvent, count: u64) -> Vec<f64> {
    let mut acc = RdpAccountant::new(Adjacency::AddOrRemoveOne);
    acc.compose(event, count).unwrap();
    acc.rdp()
}

#[test]
fn self_composition_and_counts_multiply() {
    let step = DpEvent::poisson_sampled_gaussian(0.02, 1.3);
    let one = rdp_of(&step, 1);
    for rdp in [
        rdp_of(&step, 6),
        rdp_of(&DpEvent::self_composed(step.clone(), 6), 1),
        rdp_of(&DpEvent::self_composed(step.clone(), 2), 3),
        rdp_of(&DpEvent::composed(vec![step.clone(); 6]), 1),
    ] {
        for (r, r1) in rdp.iter().zip(&one) {
            assert!(rel(*r, 6.0 * r1) < 1e-14);
        }
    }
}

#[test]
fn heterogeneous_composition_adds() {
    let a = DpEvent::poisson_sampled_gaussian(0.02, 1.3);
    let b = DpEvent::poisson_sampled_gaussian(0.05, 2.0);
    let c = DpEvent::gaussian(8.0);
    let both = rdp_of(&DpEvent::composed(vec![a.clone(), b.clone(), c.clone()]), 1);
    let (ra, rb, rc) = (rdp_of(&a, 1), rdp_of(&b, 1), rdp_of(&c, 1));
    for k in 0..both.len() {
        assert!(rel(both[k], ra[k] + rb[k] + rc[k]) < 1e-14);
    }
    // Composing in two calls gives the same epsilon as one.
    let mut acc = RdpAccountant::new(Adjacency::AddOrRemoveOne);
    acc.compose(&a, 100).unwrap();
    acc.compose(&b, 50).unwrap();
    let mut one_call = RdpAccountant::new(Adjacency::AddOrRemoveOne);
    one_call
        .compose(&DpEvent::composed(vec![DpEvent::self_composed(a, 100), DpEvent::self_composed(b, 50)]), 1)
        .unwrap();
    assert!(rel(acc.epsilon(1e-5).unwrap().epsilon, one_call.epsilon(1e-5).unwrap().epsilon) < 1e-12);
}

#[test]
fn a_bad_event_is_refused_and_changes_nothing() {
    let mut acc = RdpAccountant::new(Adjacency::AddOrRemoveOne);
    acc.compose(&DpEvent::poisson_sampled_gaussian(0.01, 1.0), 100).unwrap();
    let before = acc.rdp();
    // A valid event followed by an invalid one, in one composed event.
    let bad = DpEvent::composed(vec![
        DpEvent::poisson_sampled_gaussian(0.01, 1.0),
        DpEvent::poisson_sampled_gaussian(0.01, -1.0),
    ]);
    let err = acc.compose(&bad, 1).unwrap_err();
    assert!(matches!(err, Error::InvalidParameter { field: "noise_multiplier", valid: Valid::Positive, .. }), "{err}");
    for (field, event) in [
        ("noise_multiplier", DpEvent::gaussian(f64::NAN)),
        ("noise_multiplier", DpEvent::gaussian(0.0)),
        ("noise_multiplier", DpEvent::gaussian(f64::INFINITY)),
        ("sampling_probability", DpEvent::poisson_sampled_gaussian(f64::NAN, 1.0)),
        ("sampling_probability", DpEvent::poisson_sampled_gaussian(-0.1, 1.0)),
        ("steps_per_epoch", DpEvent::shuffled_fixed_size_batches(1.0, 0, 5)),
    ] {
        let mut acc2 = RdpAccountant::new(Adjacency::ReplaceOne);
        match acc2.compose(&event, 1) {
            Err(Error::InvalidParameter { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{event:?}: {other:?}"),
        }
    }
    assert_eq!(acc.rdp(), before);
}

#[test]
fn unsupported_events_say_why() {
    let mut add_remove = RdpAccountant::new(Adjacency::AddOrRemoveOne);
    let err = add_remove.compose(&DpEvent::shuffled_fixed_size_batches(1.0, 10, 10), 1).unwrap_err();
    assert!(matches!(err, Error::UnsupportedEvent { .. }));
    assert!(err.to_string().contains("replace-one"), "{err}");
    let mut replace = RdpAccountant::new(Adjacency::ReplaceOne);
    let err = replace.compose(&DpEvent::poisson_sampled_gaussian(0.1, 1.0), 1).unwrap_err();
    assert!(err.to_string().contains("add-or-remove-one"), "{err}");
    let nested = DpEvent::PoissonSampled {
        sampling_probability: 0.1,
        event: Box::new(DpEvent::poisson_sampled_gaussian(0.1, 1.0)),
    };
    assert!(add_remove.compose(&nested, 1).is_err());
}

#[test]
fn bad_orders_and_deltas_are_refused() {
    assert!(RdpAccountant::with_orders(Adjacency::AddOrRemoveOne, &[]).is_err());
    // 1e15: an integer order's exact series has 1e15 terms (it never ended).
    for bad in [1.0, 0.5, f64::NAN, f64::INFINITY, 1e15, 1e6 + 1.0] {
        let err = RdpAccountant::with_orders(Adjacency::AddOrRemoveOne, &[2.0, bad]).unwrap_err();
        assert!(matches!(err, Error::InvalidParameter { field: "order", .. }), "{bad}: {err}");
        let rdp = RdpAccountant::new(Adjacency::AddOrRemoveOne).rdp_at(bad).unwrap_err();
        assert!(rdp.to_string().contains("<= 1e6"), "{rdp}");
        assert!(dp_accountant::rdp_poisson_subsampled_gaussian(0.01, 1.0, bad).is_err());
    }
    assert!(RdpAccountant::with_orders(Adjacency::AddOrRemoveOne, &[2.0, 1e6]).is_ok());
    let acc = RdpAccountant::new(Adjacency::AddOrRemoveOne);
    for bad in [0.0, 1.0, -1e-5, f64::NAN] {
        assert_eq!(acc.epsilon(bad).unwrap_err().to_string(), format!("delta = {bad}: must be in (0, 1)"));
    }
    assert!(acc.delta(f64::NAN).is_err());
    assert!(acc.delta(-1.0).is_err());
    assert!(dp_accountant::rdp_poisson_subsampled_gaussian(0.1, 1.0, 1.0).is_err());
}
