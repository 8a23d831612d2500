//! Every DP layer type against the microbatch oracle on its candle-nn twin:
//! embedding (with repeated tokens), layer/RMS/group norm, conv1d, conv2d.
//! f64 to 1e-9 relative, f32 to 1e-4.

mod common;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_dp::loss;
use candle_nn::{Conv1dConfig, Conv2dConfig, VarBuilder, VarMap};
use common::{ghost_vs_oracle, rel_diff, set_deterministic, tensor};

fn vb(varmap: &VarMap, dtype: DType) -> VarBuilder<'static> {
    VarBuilder::from_varmap(varmap, dtype, &Device::Cpu)
}

fn embedding_case(dtype: DType, tol: f64, t: usize) {
    let varmap = VarMap::new();
    let v = vb(&varmap, dtype);
    let (emb, head) =
        (candle_dp::embedding(7, 4, v.pp("emb")).unwrap(), candle_dp::linear(4, 3, v.pp("head")).unwrap());
    let (pemb, phead) =
        (candle_nn::embedding(7, 4, v.pp("emb")).unwrap(), candle_nn::linear(4, 3, v.pp("head")).unwrap());
    set_deterministic(&varmap, 31).unwrap();
    let b = 6;
    // Repeated tokens within an example exercise the token-equality term.
    let ids: Vec<u32> = (0..b * t).map(|k| ((k * 5 + k / 3) % 7) as u32).collect();
    let shape: Vec<usize> = if t == 1 { vec![b] } else { vec![b, t] };
    let ids = Tensor::from_vec(ids, shape, &Device::Cpu).unwrap();
    let target = tensor(&[b, 3], 32, 1.0, dtype).unwrap();
    let forward = |e: &dyn Module, h: &dyn Module, ids: &Tensor| -> candle_core::Result<Tensor> {
        let z = e.forward(ids)?;
        let z = if t == 1 { z } else { z.tanh()?.sum(1)? };
        h.forward(&z)
    };
    ghost_vs_oracle(
        &varmap,
        b,
        || Ok(loss::mse(&forward(&emb, &head, &ids)?, &target).unwrap().tensor().clone()),
        |i| {
            loss::mse(&forward(&pemb, &phead, &ids.narrow(0, i, 1)?)?, &target.narrow(0, i, 1)?)
                .unwrap()
                .tensor()
                .sum_all()
        },
        0.2,
        tol,
        "embedding",
    );
}

#[test]
fn embedding_matches_microbatch() {
    embedding_case(DType::F64, 1e-9, 5);
    embedding_case(DType::F64, 1e-9, 1);
    embedding_case(DType::F32, 1e-4, 5);
}

fn norm_case(dtype: DType, tol: f64, rms: bool) {
    let varmap = VarMap::new();
    let v = vb(&varmap, dtype);
    let fc = candle_dp::linear(3, 5, v.pp("fc")).unwrap();
    let out = candle_dp::linear(5, 2, v.pp("out")).unwrap();
    let norm =
        if rms { candle_dp::rms_norm(5, 1e-5, v.pp("norm")) } else { candle_dp::layer_norm(5, 1e-5, v.pp("norm")) }
            .unwrap();
    let pfc = candle_nn::linear(3, 5, v.pp("fc")).unwrap();
    let pout = candle_nn::linear(5, 2, v.pp("out")).unwrap();
    let pnorm: Box<dyn Module> = if rms {
        Box::new(candle_nn::rms_norm(5, 1e-5, v.pp("norm")).unwrap())
    } else {
        Box::new(candle_nn::layer_norm(5, 1e-5, v.pp("norm")).unwrap())
    };
    set_deterministic(&varmap, 41).unwrap();
    let b = 5;
    let x = tensor(&[b, 4, 3], 42, 2.0, dtype).unwrap();
    let target = tensor(&[b, 2], 43, 1.0, dtype).unwrap();
    // candle-nn's fused norm kernels have no f64 path; a non-contiguous
    // input sends its layers down their reference (unfused) path.
    let forward = |fc: &dyn Module, n: &dyn Module, o: &dyn Module, x: &Tensor| -> candle_core::Result<Tensor> {
        let h = fc.forward(x)?;
        let h = Tensor::cat(&[&h, &h], D::Minus1)?.narrow(D::Minus1, 0, 5)?;
        o.forward(&n.forward(&h)?)?.mean(1)
    };
    ghost_vs_oracle(
        &varmap,
        b,
        || Ok(loss::mse(&forward(&fc, &norm, &out, &x)?, &target).unwrap().tensor().clone()),
        |i| {
            loss::mse(&forward(&pfc, pnorm.as_ref(), &pout, &x.narrow(0, i, 1)?)?, &target.narrow(0, i, 1)?)
                .unwrap()
                .tensor()
                .sum_all()
        },
        0.2,
        tol,
        if rms { "rms_norm" } else { "layer_norm" },
    );
}

#[test]
fn layer_norm_and_rms_norm_match_microbatch() {
    norm_case(DType::F64, 1e-9, false);
    norm_case(DType::F64, 1e-9, true);
    norm_case(DType::F32, 1e-4, false);
}

fn conv2d_case(dtype: DType, tol: f64, group_norm: bool) {
    let varmap = VarMap::new();
    let v = vb(&varmap, dtype);
    let cfg = Conv2dConfig { padding: 1, stride: 2, ..Default::default() };
    let conv = candle_dp::conv2d(2, 4, 3, cfg, v.pp("conv")).unwrap();
    // Built only when used: an unused DP layer is a missing gradient.
    let gn = group_norm.then(|| candle_dp::group_norm(2, 4, 1e-5, v.pp("gn")).unwrap());
    let head = candle_dp::linear(4 * 4 * 4, 3, v.pp("head")).unwrap();
    let pconv = candle_nn::conv2d(2, 4, 3, cfg, v.pp("conv")).unwrap();
    let pgn = group_norm.then(|| candle_nn::group_norm(2, 4, 1e-5, v.pp("gn")).unwrap());
    let phead = candle_nn::linear(4 * 4 * 4, 3, v.pp("head")).unwrap();
    set_deterministic(&varmap, 51).unwrap();
    let b = 4;
    let x = tensor(&[b, 2, 7, 7], 52, 1.5, dtype).unwrap();
    let y = Tensor::from_vec((0..b as u32).map(|i| i % 3).collect(), b, &Device::Cpu).unwrap();
    let forward = |c: &dyn Module, g: Option<&dyn Module>, h: &dyn Module, x: &Tensor| -> candle_core::Result<Tensor> {
        let mut z = c.forward(x)?;
        if let Some(g) = g {
            z = g.forward(&z)?;
        }
        h.forward(&z.relu()?.flatten_from(1)?)
    };
    let gn = gn.as_ref().map(|g| g as &dyn Module);
    let pgn = pgn.as_ref().map(|g| g as &dyn Module);
    ghost_vs_oracle(
        &varmap,
        b,
        || Ok(loss::cross_entropy(&forward(&conv, gn, &head, &x)?, &y).unwrap().tensor().clone()),
        |i| {
            loss::cross_entropy(&forward(&pconv, pgn, &phead, &x.narrow(0, i, 1)?)?, &y.narrow(0, i, 1)?)
                .unwrap()
                .tensor()
                .sum_all()
        },
        0.2,
        tol,
        if group_norm { "conv2d + group_norm" } else { "conv2d" },
    );
}

#[test]
fn conv2d_matches_microbatch() {
    conv2d_case(DType::F64, 1e-9, false);
    conv2d_case(DType::F32, 1e-4, false);
}

#[test]
fn group_norm_matches_microbatch() {
    conv2d_case(DType::F64, 1e-9, true);
}

#[test]
fn conv1d_matches_microbatch() {
    for (dtype, tol) in [(DType::F64, 1e-9), (DType::F32, 1e-4)] {
        let varmap = VarMap::new();
        let v = vb(&varmap, dtype);
        let cfg = Conv1dConfig { padding: 1, stride: 1, ..Default::default() };
        let conv = candle_dp::conv1d(2, 3, 3, cfg, v.pp("c")).unwrap();
        let head = candle_dp::linear(3, 2, v.pp("h")).unwrap();
        let pconv = candle_nn::conv1d(2, 3, 3, cfg, v.pp("c")).unwrap();
        let phead = candle_nn::linear(3, 2, v.pp("h")).unwrap();
        set_deterministic(&varmap, 61).unwrap();
        let b = 5;
        let x = tensor(&[b, 2, 9], 62, 1.0, dtype).unwrap();
        let target = tensor(&[b, 2], 63, 1.0, dtype).unwrap();
        let forward = |c: &dyn Module, h: &dyn Module, x: &Tensor| -> candle_core::Result<Tensor> {
            h.forward(&c.forward(x)?.tanh()?.mean(D::Minus1)?)
        };
        ghost_vs_oracle(
            &varmap,
            b,
            || Ok(loss::mse(&forward(&conv, &head, &x)?, &target).unwrap().tensor().clone()),
            |i| {
                loss::mse(&forward(&pconv, &phead, &x.narrow(0, i, 1)?)?, &target.narrow(0, i, 1)?)
                    .unwrap()
                    .tensor()
                    .sum_all()
            },
            0.2,
            tol,
            "conv1d",
        );
    }
}

/// Two convolutions in a row: the second one's input needs its gradient,
/// which the DP convolution gives through its own transposed convolution
/// (stride 2, padding 1, a non-square image).
#[test]
fn stacked_convolutions_match_microbatch() {
    let dtype = DType::F64;
    let varmap = VarMap::new();
    let v = vb(&varmap, dtype);
    let c1 = Conv2dConfig { padding: 1, ..Default::default() };
    let c2 = Conv2dConfig { padding: 1, stride: 2, ..Default::default() };
    let (a, b2) =
        (candle_dp::conv2d(2, 3, 3, c1, v.pp("a")).unwrap(), candle_dp::conv2d(3, 4, 3, c2, v.pp("b")).unwrap());
    let head = candle_dp::linear(4 * 4 * 5, 3, v.pp("head")).unwrap();
    let (pa, pb) =
        (candle_nn::conv2d(2, 3, 3, c1, v.pp("a")).unwrap(), candle_nn::conv2d(3, 4, 3, c2, v.pp("b")).unwrap());
    let phead = candle_nn::linear(4 * 4 * 5, 3, v.pp("head")).unwrap();
    set_deterministic(&varmap, 65).unwrap();
    let b = 4;
    let x = tensor(&[b, 2, 7, 9], 66, 1.5, dtype).unwrap();
    let y = Tensor::from_vec((0..b as u32).map(|i| i % 3).collect(), b, &Device::Cpu).unwrap();
    let forward = |c1: &dyn Module, c2: &dyn Module, h: &dyn Module, x: &Tensor| -> candle_core::Result<Tensor> {
        h.forward(&c2.forward(&c1.forward(x)?.tanh()?)?.relu()?.flatten_from(1)?)
    };
    ghost_vs_oracle(
        &varmap,
        b,
        || Ok(loss::cross_entropy(&forward(&a, &b2, &head, &x)?, &y).unwrap().tensor().clone()),
        |i| {
            loss::cross_entropy(&forward(&pa, &pb, &phead, &x.narrow(0, i, 1)?)?, &y.narrow(0, i, 1)?)
                .unwrap()
                .tensor()
                .sum_all()
        },
        0.2,
        1e-9,
        "conv2d -> conv2d",
    );
}

/// The DP convolution's input gradient equals Candle's, frozen or trained,
/// for strides whose last window leaves input positions unread; where the
/// two spatial remainders differ (Candle's own backward cannot take that
/// case), against Candle on the input extended by a zero column, which
/// leaves the output unchanged.
#[test]
fn convolution_input_gradients_match_candle() {
    let grad_of = |layer: &dyn Module, x: &Tensor, r: &Tensor| -> Tensor {
        let xv = candle_core::Var::from_tensor(x).unwrap();
        let y = layer.forward(xv.as_tensor()).unwrap();
        (y * r).unwrap().sum_all().unwrap().backward().unwrap().get(xv.as_tensor()).unwrap().clone()
    };
    // 2-d: (H, W, stride, padding); H = 8, W = 9 at stride 2 has remainders 1 and 0.
    for (h, w, stride, padding) in [(7, 7, 2, 1), (8, 9, 2, 1), (9, 8, 2, 0), (8, 8, 3, 1), (6, 7, 1, 1)] {
        let kernel = tensor(&[4, 2, 3, 3], 67, 0.5, DType::F64).unwrap();
        let x = tensor(&[2, 2, h, w], 68, 1.0, DType::F64).unwrap();
        let cfg = Conv2dConfig { padding, stride, ..Default::default() };
        let frozen = candle_dp::DpConv::new2d(kernel.clone(), None, cfg).unwrap();
        let plain = candle_nn::Conv2d::new(kernel.clone(), None, cfg);
        let out = plain.forward(&x).unwrap();
        let r = tensor(out.dims(), 69, 1.0, DType::F64).unwrap();
        let ours = grad_of(&frozen, &x, &r);
        // Candle, on the input zero-extended until both remainders agree.
        let rem = |n: usize| (n + 2 * padding - 3) % stride;
        let (mut hx, mut wx) = (h, w);
        while rem(hx) != rem(wx) || rem(hx) < rem(h).max(rem(w)) {
            if rem(hx) < rem(wx) {
                hx += 1
            } else {
                wx += 1
            }
        }
        let ext = x.pad_with_zeros(2, 0, hx - h).unwrap().pad_with_zeros(3, 0, wx - w).unwrap();
        assert_eq!(plain.forward(&ext).unwrap().dims(), out.dims(), "the extension must not change the output");
        let theirs = grad_of(&plain, &ext, &r).narrow(2, 0, h).unwrap().narrow(3, 0, w).unwrap();
        let d = rel_diff(&ours, &theirs);
        assert!(d < 1e-12, "2-d {h}x{w} stride {stride} padding {padding}: {d:e}");
    }
    for (l, stride, padding) in [(9, 2, 1), (10, 2, 1), (11, 3, 0)] {
        let kernel = tensor(&[3, 2, 3], 70, 0.5, DType::F64).unwrap();
        let x = tensor(&[2, 2, l], 71, 1.0, DType::F64).unwrap();
        let cfg = Conv1dConfig { padding, stride, ..Default::default() };
        let frozen = candle_dp::DpConv::new1d(kernel.clone(), None, cfg).unwrap();
        let plain = candle_nn::Conv1d::new(kernel, None, cfg);
        let r = tensor(plain.forward(&x).unwrap().dims(), 72, 1.0, DType::F64).unwrap();
        let d = rel_diff(&grad_of(&frozen, &x, &r), &grad_of(&plain, &x, &r));
        assert!(d < 1e-12, "1-d {l} stride {stride} padding {padding}: {d:e}");
    }
}

#[test]
fn batch_norm_is_refused_with_a_replacement() {
    let varmap = VarMap::new();
    let err = candle_dp::batch_norm(4, vb(&varmap, DType::F32)).unwrap_err().to_string();
    assert!(err.contains("mixes examples") && err.contains("group_norm"), "{err}");
}

#[test]
fn unsupported_layer_configurations_are_typed_errors() {
    let varmap = VarMap::new();
    let cfg = Conv2dConfig { groups: 2, ..Default::default() };
    let err = candle_dp::conv2d(4, 4, 3, cfg, vb(&varmap, DType::F32)).unwrap_err().to_string();
    assert!(err.contains("groups = 2: must be 1"), "{err}");
    let err = candle_dp::group_norm(3, 4, 1e-5, vb(&varmap, DType::F32).pp("g")).unwrap_err().to_string();
    assert!(err.contains("num_groups = 3: must be a divisor of num_channels"), "{err}");
}
