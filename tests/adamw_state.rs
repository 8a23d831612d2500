//! candle_dp::optim::AdamW equals candle-nn's AdamW step for step (bit for
//! bit), and N steps + state + restore + N steps equals 2N steps.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use common::tensor;

fn vars(seed: u64) -> Vec<Var> {
    [vec![3, 4], vec![4]]
        .iter()
        .enumerate()
        .map(|(k, s)| Var::from_tensor(&tensor(s, seed + k as u64, 1.0, DType::F32).unwrap()).unwrap())
        .collect()
}

fn grads(vars: &[Var], step: u64) -> GradStore {
    let mut g = GradStore::default();
    for (k, v) in vars.iter().enumerate() {
        g.insert(v.as_tensor(), tensor(v.dims(), 100 * step + k as u64, 0.5, DType::F32).unwrap());
    }
    g
}

fn values(vars: &[Var]) -> Vec<Vec<f32>> {
    vars.iter().map(|v| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
}

fn params() -> ParamsAdamW {
    ParamsAdamW { lr: 0.01, weight_decay: 0.1, ..Default::default() }
}

#[test]
fn equals_candle_nn_adamw_bit_for_bit() {
    let (ours, theirs) = (vars(1), vars(1));
    let mut a = candle_dp::optim::AdamW::new(ours.clone(), params()).unwrap();
    let mut b = candle_nn::AdamW::new(theirs.clone(), params()).unwrap();
    for step in 0..20 {
        a.step(&grads(&ours, step)).unwrap();
        b.step(&grads(&theirs, step)).unwrap();
        assert_eq!(values(&ours), values(&theirs), "step {step}");
    }
}

#[test]
fn state_and_restore_continue_exactly() {
    let straight = vars(2);
    let mut s = candle_dp::optim::AdamW::new(straight.clone(), params()).unwrap();
    for step in 0..20 {
        s.step(&grads(&straight, step)).unwrap();
    }
    let first = vars(2);
    let mut a = candle_dp::optim::AdamW::new(first.clone(), params()).unwrap();
    for step in 0..10 {
        a.step(&grads(&first, step)).unwrap();
    }
    let state = a.state().unwrap();
    // A fresh optimizer over the same weights, restored, continues exactly.
    let second: Vec<Var> = first.iter().map(|v| Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap()).collect();
    let mut b = candle_dp::optim::AdamW::new(second.clone(), params()).unwrap();
    b.restore(&state).unwrap();
    for step in 10..20 {
        b.step(&grads(&second, step)).unwrap();
    }
    assert_eq!(values(&second), values(&straight));
    // Without the moments it would not.
    let mut c = candle_dp::optim::AdamW::new(first.clone(), params()).unwrap();
    for step in 10..20 {
        c.step(&grads(&first, step)).unwrap();
    }
    assert_ne!(values(&first), values(&straight));
    // A state for other variables is refused and changes nothing.
    let mut d = candle_dp::optim::AdamW::new(vars(3)[..1].to_vec(), params()).unwrap();
    let before = d.state().unwrap();
    assert!(d.restore(&state).is_err());
    assert_eq!(d.state().unwrap().step, before.step);
}
