//! Shared helpers: deterministic data and models built twice over the same
//! variables, once from DP layers and once from plain candle-nn layers (the
//! microbatch oracle's model).
#![allow(dead_code)]

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};

/// Deterministic pseudo-random values in [-scale, scale] (SplitMix64).
pub fn values(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            let u = ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64;
            scale * (2.0 * u - 1.0)
        })
        .collect()
}

/// A tensor of deterministic values.
pub fn tensor(shape: &[usize], seed: u64, scale: f64, dtype: DType) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_vec(values(n, seed, scale), shape, &Device::Cpu)?.to_dtype(dtype)
}

/// Sets every variable of `varmap` to deterministic values (Candle's own
/// initialization cannot be seeded).
pub fn set_deterministic(varmap: &VarMap, seed: u64) -> Result<()> {
    for (k, var) in vars_by_name(varmap).iter().enumerate() {
        let t = tensor(var.dims(), seed + k as u64, 0.5, var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

pub use candle_dp::vars_by_name;

pub mod dp_run;
pub mod world;

/// The same MLP twice: `(dp, plain)` over the same variables.
pub fn mlp_pair(
    varmap: &VarMap,
    dims: &[usize],
    dtype: DType,
) -> Result<(Mlp<candle_dp::DpLinear>, Mlp<candle_nn::Linear>)> {
    let vb = VarBuilder::from_varmap(varmap, dtype, &Device::Cpu);
    let mut dp = Vec::new();
    let mut plain = Vec::new();
    for (k, w) in dims.windows(2).enumerate() {
        dp.push(candle_dp::linear(w[0], w[1], vb.pp(format!("fc{k}")))?);
        plain.push(candle_nn::linear(w[0], w[1], vb.pp(format!("fc{k}")))?);
    }
    Ok((Mlp(dp), Mlp(plain)))
}

/// Linear layers with ReLU between them.
pub struct Mlp<L>(pub Vec<L>);

impl<L: Module> Module for Mlp<L> {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (k, layer) in self.0.iter().enumerate() {
            h = layer.forward(&h)?;
            if k + 1 < self.0.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

/// Largest elementwise difference of two tensors relative to the largest |value|.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0_f64, |m, v| m.max(v.abs())).max(1e-300);
    a.iter().zip(&b).fold(0.0_f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// L2 norm of a tensor.
pub fn norm(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt()
}

/// The rows `idx` of `t` (a physical batch).
pub fn take(t: &Tensor, idx: &[usize]) -> Tensor {
    let i: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    t.index_select(&Tensor::from_vec(i, idx.len(), t.device()).unwrap(), 0).unwrap()
}

/// Recomputes a checkpoint manifest's own hash (over its canonical JSON as
/// a JSON value, with `manifest_sha256` empty): what an editor who wants an
/// edit to pass the manifest check must do.
pub fn rehash_manifest(manifest: &mut serde_json::Value) {
    use sha2::Digest;
    manifest["manifest_sha256"] = "".into();
    let digest = sha2::Sha256::digest(serde_json::to_vec(manifest).unwrap());
    manifest["manifest_sha256"] = dp_accountant::ledger::hex(&digest).into();
}

/// Asserts that the ghost engine's result equals the microbatch oracle's:
/// every example's norm and every variable's clipped sum within `tol`
/// (relative), with clipping active for some example (else the clip
/// factors were never tested).
pub fn assert_same_clipping(
    ghost: &candle_dp::grad_sample::ghost::ClippedBatch,
    oracle: &candle_dp::grad_sample::ghost::ClippedBatch,
    max_grad_norm: f64,
    tol: f64,
    what: &str,
) {
    for (i, (g, o)) in ghost.norms.iter().zip(&oracle.norms).enumerate() {
        assert!(((g - o) / o).abs() < tol, "{what}: example {i} norm {g} vs oracle {o}");
    }
    for (k, (g, o)) in ghost.clipped_sums.iter().zip(&oracle.clipped_sums).enumerate() {
        let d = rel_diff(g, o);
        assert!(d < tol, "{what}: variable {k} relative difference {d:e}");
    }
    assert!(ghost.norms.iter().any(|n| *n > max_grad_norm), "{what}: clipping must be active for some examples");
}

/// Both engines over every variable of `varmap` on `b` examples: the ghost
/// engine on the DP model's per-example losses, the microbatch oracle on
/// the plain twin's loss of example `i`; asserts they agree
/// ([`assert_same_clipping`]).
pub fn ghost_vs_oracle(
    varmap: &VarMap,
    b: usize,
    dp_losses: impl Fn() -> Result<Tensor>,
    plain_loss: impl Fn(usize) -> Result<Tensor>,
    max_grad_norm: f64,
    tol: f64,
    what: &str,
) {
    use candle_dp::grad_sample::{ghost::GhostEngine, microbatch::clip_microbatch};
    let vars = vars_by_name(varmap);
    let engine = GhostEngine::new(&vars).unwrap();
    let losses = candle_dp::PerSampleLoss::new(dp_losses().unwrap()).unwrap();
    let ghost = engine.clip(&losses, &candle_dp::ClipMode::Flat, max_grad_norm).unwrap();
    let oracle = clip_microbatch(&vars, b, plain_loss, max_grad_norm).unwrap();
    assert_same_clipping(&ghost, &oracle, max_grad_norm, tol, what);
}
