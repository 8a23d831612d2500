//! Tied weights: a variable used by several DP layers gets the per-example
//! norm of the *sum* of its uses' gradients (cross terms included) and the
//! clipped sum over all uses, equal to the microbatch oracle (Candle's
//! autograd on plain candle-nn layers over the same tensors, one example at
//! a time): f64 to 1e-9 relative, in the Gram regime and the materialized one.

mod common;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_dp::grad_sample::ghost::GhostEngine;
use candle_dp::grad_sample::microbatch::clip_microbatch;
use candle_dp::{loss, ClipMode, DpLinear, Error};
use candle_nn::{VarBuilder, VarMap};
use common::{assert_same_clipping, ghost_vs_oracle, set_deterministic, tensor, vars_by_name};

const TOL: f64 = 1e-9;

/// A GPT-2-shaped toy: token embedding `[V, d]`, one hidden DP linear used
/// twice, and the output projection tied to the embedding table. With
/// `lookup_twice` the embedding is also looked up a second time (shifted
/// ids), so the table has three uses.
fn embedding_tied_to_output(t: usize, vocab: usize, d: usize, lookup_twice: bool) {
    let dtype = DType::F64;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
    let wte = candle_dp::embedding(vocab, d, vb.pp("wte")).unwrap();
    let hidden = candle_dp::linear(d, d, vb.pp("hidden")).unwrap();
    let lm_head = DpLinear::new(wte.embeddings().clone(), None);
    let table = wte.embeddings().clone();
    let p_wte = candle_nn::Embedding::new(table.clone(), d);
    let p_hidden = candle_nn::linear(d, d, vb.pp("hidden")).unwrap();
    let p_head = candle_nn::Linear::new(table, None);
    set_deterministic(&varmap, 71).unwrap();

    let b = 5;
    // Repeated tokens within an example exercise the equality terms.
    let ids: Vec<u32> = (0..b * t).map(|k| ((k * 7 + k / 4) % vocab) as u32).collect();
    let shifted: Vec<u32> = ids.iter().map(|&i| (i + 1) % vocab as u32).collect();
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
    let shifted = Tensor::from_vec(shifted, (b, t), &Device::Cpu).unwrap();
    let target = tensor(&[b, t, vocab], 72, 1.0, dtype).unwrap();
    let forward = |e: &dyn Module, h: &dyn Module, o: &dyn Module, ids: &Tensor, shifted: &Tensor| {
        let mut z = e.forward(ids)?;
        if lookup_twice {
            z = (z + e.forward(shifted)?.affine(0.5, 0.0)?)?;
        }
        let z = h.forward(&h.forward(&z)?.tanh()?)?.tanh()?;
        o.forward(&z)
    };
    ghost_vs_oracle(
        &varmap,
        b,
        || Ok(loss::mse(&forward(&wte, &hidden, &lm_head, &ids, &shifted)?, &target).unwrap().tensor().clone()),
        |i| {
            let logits = forward(&p_wte, &p_hidden, &p_head, &ids.narrow(0, i, 1)?, &shifted.narrow(0, i, 1)?)?;
            loss::mse(&logits, &target.narrow(0, i, 1)?).unwrap().tensor().sum_all()
        },
        0.05,
        TOL,
        &format!("embedding tied to output, T = {t}, V = {vocab}, d = {d}"),
    );
}

#[test]
fn embedding_tied_to_output_projection_gram_regime() {
    // The table's uses have 12 (18) positions: 144 (324) <= V d = 368, the
    // Gram form with the embedding/linear cross term.
    embedding_tied_to_output(6, 23, 16, false);
    embedding_tied_to_output(6, 23, 16, true);
}

#[test]
fn embedding_tied_to_output_projection_materialized_regime() {
    // 18 (27) positions: 324 > V d = 15, materialized per-example gradients.
    embedding_tied_to_output(9, 5, 3, false);
    embedding_tied_to_output(9, 5, 3, true);
}

#[test]
fn embedding_tied_to_output_projection_one_position() {
    embedding_tied_to_output(1, 7, 4, false);
}

/// One weight `[d, d]` shared by two linear layers with their own biases,
/// the first of them applied twice, on `[B, T, d]` inputs; `gram`: the
/// regime the engine must choose for the weight's `3 T` positions.
fn linear_tied_to_linear(t: usize, d: usize, gram: bool) {
    let dtype = DType::F64;
    assert_eq!(candle_dp::grad_sample::per_example::chooses_gram(3 * t, d, d, dtype, false), gram);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
    let first = candle_dp::linear(d, d, vb.pp("first")).unwrap();
    let second_bias = vb.pp("second").get(d, "bias").unwrap();
    let second = DpLinear::new(first.weight().clone(), Some(second_bias.clone()));
    let out = candle_dp::linear(d, 2, vb.pp("out")).unwrap();
    let p_first = candle_nn::linear(d, d, vb.pp("first")).unwrap();
    let p_second = candle_nn::Linear::new(p_first.weight().clone(), Some(second_bias));
    let p_out = candle_nn::linear(d, 2, vb.pp("out")).unwrap();
    set_deterministic(&varmap, 81).unwrap();

    let b = 6;
    let x = tensor(&[b, t, d], 82, 1.5, dtype).unwrap();
    let target = tensor(&[b, 2], 83, 1.0, dtype).unwrap();
    let forward = |f: &dyn Module, s: &dyn Module, o: &dyn Module, x: &Tensor| {
        let h = f.forward(&f.forward(x)?.tanh()?)?.tanh()?;
        o.forward(&s.forward(&h)?.tanh()?)?.mean(D::Minus2)
    };
    ghost_vs_oracle(
        &varmap,
        b,
        || Ok(loss::mse(&forward(&first, &second, &out, &x)?, &target).unwrap().tensor().clone()),
        |i| {
            let y = forward(&p_first, &p_second, &p_out, &x.narrow(0, i, 1)?)?;
            loss::mse(&y, &target.narrow(0, i, 1)?).unwrap().tensor().sum_all()
        },
        0.3,
        TOL,
        &format!("linear tied to linear, T = {t}, d = {d}"),
    );
}

#[test]
fn linear_tied_to_linear_both_regimes() {
    // Three uses of 2 positions: 6 (d + d) = 192 <= d^2 = 256 multiply-adds (Gram).
    linear_tied_to_linear(2, 16, true);
    // 15 positions: 15 (4 + 4) > 16, materialized.
    linear_tied_to_linear(5, 4, false);
    linear_tied_to_linear(1, 3, false);
}

#[test]
fn tied_layers_form_one_clipping_group() {
    // Per-layer clipping cannot split a shared variable's norm between two
    // layers: layers that share one count as one group.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let wte = candle_dp::embedding(10, 4, vb.pp("wte")).unwrap();
    let _head = DpLinear::new(wte.embeddings().clone(), None);
    let _other = candle_dp::linear(4, 4, vb.pp("other")).unwrap();
    let engine = GhostEngine::new(&vars_by_name(&varmap)).unwrap();
    assert_eq!(engine.num_layers().unwrap(), 2);
}

#[test]
fn a_plain_op_on_a_trained_variable_is_refused() {
    // The table also reaches the loss through a plain matmul: that use's
    // per-example gradient is unknown, and dropping it would be the silent
    // error tying used to have.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let wte = candle_dp::embedding(10, 4, vb.pp("wte")).unwrap();
    let engine = GhostEngine::new(&vars_by_name(&varmap)).unwrap();
    let ids = Tensor::from_vec(vec![1u32, 2, 3, 4], (2, 2), &Device::Cpu).unwrap();
    let h = wte.forward(&ids).unwrap();
    let logits = h.broadcast_matmul(&wte.embeddings().t().unwrap()).unwrap().sum(1).unwrap();
    let targets = Tensor::from_vec(vec![0u32, 1], 2, &Device::Cpu).unwrap();
    let losses = loss::cross_entropy(&logits, &targets).unwrap();
    let err = engine.clip(&losses, &ClipMode::Flat, 1.0).unwrap_err();
    assert!(matches!(err, Error::NonDpUse { index: 0, .. }), "{err}");
}

#[test]
fn a_variable_listed_twice_is_refused() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let _fc = candle_dp::linear_no_bias(3, 2, vb.pp("fc")).unwrap();
    let vars = vars_by_name(&varmap);
    let err = GhostEngine::new(&[vars[0].clone(), vars[0].clone()]).unwrap_err();
    assert!(matches!(err, Error::DuplicateVariable { first: 0, second: 1 }), "{err}");
}

#[test]
fn a_tied_projection_built_after_the_optimizer_counts() {
    // The natural way to write tying inside `forward`: a new DP layer over
    // the table on every call, after the engine exists.
    let dtype = DType::F64;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
    let wte = candle_dp::embedding(13, 6, vb.pp("wte")).unwrap();
    set_deterministic(&varmap, 75).unwrap();
    let table = wte.embeddings().clone();
    let p_wte = candle_nn::Embedding::new(table.clone(), 6);
    let p_head = candle_nn::Linear::new(table, None);
    let vars = vars_by_name(&varmap);
    let engine = GhostEngine::new(&vars).unwrap();
    let b = 4;
    let ids: Vec<u32> = (0..b * 3).map(|k| ((k * 5) % 13) as u32).collect();
    let ids = Tensor::from_vec(ids, (b, 3), &Device::Cpu).unwrap();
    let target = tensor(&[b, 3, 13], 76, 1.0, dtype).unwrap();
    let logits = DpLinear::new(wte.embeddings().clone(), None).forward(&wte.forward(&ids).unwrap().tanh().unwrap());
    let losses = candle_dp::PerSampleLoss::new(loss::mse(&logits.unwrap(), &target).unwrap().tensor().clone()).unwrap();
    let ghost = engine.clip(&losses, &ClipMode::Flat, 0.05).unwrap();
    let oracle = clip_microbatch(
        &vars,
        b,
        |i| {
            let logits = p_head.forward(&p_wte.forward(&ids.narrow(0, i, 1)?)?.tanh()?)?;
            loss::mse(&logits, &target.narrow(0, i, 1)?).unwrap().tensor().sum_all()
        },
        0.05,
    )
    .unwrap();
    assert_same_clipping(&ghost, &oracle, 0.05, TOL, "a projection built after the engine");
}

#[test]
fn a_weight_computed_from_a_variable_is_refused() {
    // A transposed copy (a tied autoencoder's decoder) would get no gradient
    // and silently freeze: pass the variable's own tensor instead.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let enc = candle_dp::linear_no_bias(4, 3, vb.pp("enc")).unwrap();
    let dec = DpLinear::new(enc.weight().t().unwrap(), None);
    let _engine = GhostEngine::new(&vars_by_name(&varmap)).unwrap();
    let x = tensor(&[2, 4], 77, 1.0, DType::F32).unwrap();
    // Module::forward returns Candle's error, which keeps our message.
    let err = dec.forward(&enc.forward(&x).unwrap()).unwrap_err().to_string();
    let expected = Error::DerivedParameter { what: "weight", shape: vec![4, 3] }.to_string();
    assert!(err.contains(&expected), "{err}");
}

#[test]
fn uses_from_another_batch_are_refused() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let fc = candle_dp::linear(4, 2, vb.pp("fc")).unwrap();
    let engine = GhostEngine::new(&vars_by_name(&varmap)).unwrap();
    let a = fc.forward(&tensor(&[3, 4], 78, 1.0, DType::F32).unwrap()).unwrap();
    let b = fc.forward(&tensor(&[5, 4], 79, 1.0, DType::F32).unwrap()).unwrap();
    // Per-example losses of batch b, plus a term from batch a.
    let losses = b.sqr().unwrap().sum(1).unwrap().broadcast_add(&a.sum_all().unwrap()).unwrap();
    let err = engine.clip(&candle_dp::PerSampleLoss::new(losses).unwrap(), &ClipMode::Flat, 1.0).unwrap_err();
    assert!(matches!(err, Error::Shape { got, .. } if got == vec![3]), "another batch's use is refused");
    assert_eq!(fc.captured_uses(), 0, "and cleared");
}

#[test]
fn a_layer_trained_by_two_optimizers_is_refused() {
    // Captures belong to the layer and each engine clears them: one
    // optimizer for the weight and another for the bias would starve one.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let _fc = candle_dp::linear(4, 2, vb.pp("fc")).unwrap();
    let vars = vars_by_name(&varmap); // fc.bias, fc.weight
    let first = GhostEngine::new(&vars[..1]).unwrap();
    let err = GhostEngine::new(&vars[1..]).unwrap_err();
    assert!(matches!(err, Error::LayerTrainedTwice { index: 0, .. }), "{err}");
    drop(first);
    GhostEngine::new(&vars[1..]).unwrap();

    // A layer built after two engines exist, over a variable of each.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let a = candle_dp::linear(4, 2, vb.pp("a")).unwrap();
    let b = candle_dp::linear(4, 2, vb.pp("b")).unwrap();
    let vars = vars_by_name(&varmap); // a.bias, a.weight, b.bias, b.weight
    let (ea, eb) = (GhostEngine::new(&vars[..2]).unwrap(), GhostEngine::new(&vars[2..]).unwrap());
    let _mixed = DpLinear::new(a.weight().clone(), b.bias().cloned());
    let x = tensor(&[3, 4], 80, 1.0, DType::F32).unwrap();
    let losses = a.forward(&x).unwrap().sqr().unwrap().sum(1).unwrap();
    let err = ea.clip(&candle_dp::PerSampleLoss::new(losses).unwrap(), &ClipMode::Flat, 1.0).unwrap_err();
    assert!(matches!(err, Error::LayerTrainedTwice { .. }), "{err}");
    assert_eq!(a.captured_uses(), 0, "cleared all the same");
    drop(eb);
}
