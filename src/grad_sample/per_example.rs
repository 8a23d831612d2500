//! One parameter's per-example gradients, summed over all its uses, in the
//! form the layers hand them over: as outer products (never materialized
//! unless that is cheaper) or as small materialized vectors.
//!
//! A use of a parameter `W` (viewed as `[r, c]`) whose gradient is an outer
//! product gives, for example `i`, `grad_i = sum_t u_t v_t^T` over its
//! positions `t`: a linear layer (`u` the output gradient, `v` the input),
//! a convolution (`v` the unfolded input), an embedding (`u` one-hot at the
//! token, `v` the output gradient). The gradient of a parameter used several
//! times is the sum over the uses, so with all positions of all uses
//! together
//!
//! `||grad_i||^2 = sum_{t,s} (u_t . u_s) (v_t . v_s)`
//!
//! cross terms between uses included (Goodfellow 2015; Li et al. 2021 for
//! the Gram form). For one-hot rows `u_t . u_s = [id_t = id_s]`, and between
//! a one-hot use and a dense one `u_t . u_s = u_s[id_t]`: an embedding table
//! tied to an output projection never needs a `[V, d]` tensor per example.
//!
//! # Rounding
//! The norms decide the clipping, so each is an upper bound on the exact
//! norm of the gradient the factors define, not just an estimate. The Gram
//! entries are dot products in the factors' precision (unit roundoff `u`):
//! each is within `gamma_n |u_t| |u_s|` (`gamma_n = n u / (1 - n u)`,
//! Higham 2002, Sec. 3.1), so the Gram sum is within
//! `(gamma_r + gamma_c) S^2` of the truth, `S = sum_t |u_t| |v_t|`; the
//! products and their sum are taken in `f64`. A materialized gradient is
//! within `gamma_T S` of the truth in Frobenius norm. Both bounds are added.
//! Half-precision factors are widened to `f32` first, and the clip factors
//! and clipped sums are never rounded to half precision.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::kernels::{clip_accumulate, squared_norms};

/// The row factor of an outer-product gradient.
#[derive(Debug, Clone)]
pub(crate) enum Rows {
    /// Dense rows `[B, T, r]`.
    Dense(Tensor),
    /// One-hot rows at `ids [B, T]` (u32): an embedding lookup.
    OneHot(Tensor),
}

/// One use's per-example gradients of one parameter.
#[derive(Debug, Clone)]
pub(crate) enum UseGrad {
    /// `grad_i = sum_t rows_{i,t} cols_{i,t}^T`, `cols` `[B, T, c]`.
    Outer { rows: Rows, cols: Tensor },
    /// The per-example gradients themselves, `[B, n]`, computed in `f64`.
    Materialized(Tensor),
}

impl UseGrad {
    /// The examples in the batch this use saw.
    pub(crate) fn batch(&self) -> candle_core::Result<usize> {
        match self {
            UseGrad::Outer { cols, .. } => cols.dim(0),
            UseGrad::Materialized(m) => m.dim(0),
        }
    }
}

/// The precision the per-example computations of a parameter of `dtype`
/// run in, and the clipped sum is returned in: never below `f32`.
pub(crate) fn work_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// `gamma_n = n u / (1 - n u)` for the unit roundoff `u` of `dtype`'s
/// matmuls: `2^-53` for f64, `2^-24` for f32 (TF32 matmuls never compute
/// norms or sums: see [`ParamGrads::new`]). Infinite where `n u >= 1/2`.
fn gamma(n: usize, dtype: DType) -> f64 {
    let u = match dtype {
        DType::F64 => f64::EPSILON / 2.0,
        _ => f32::EPSILON as f64 / 2.0,
    };
    let nu = n as f64 * u;
    if nu < 0.5 {
        nu / (1.0 - nu)
    } else {
        f64::INFINITY
    }
}

/// Whether Candle runs f32 matmuls on `device` in reduced precision (TF32:
/// inputs rounded to 11 bits). Candle's flag is process-wide, and without
/// the CUDA backend it reads `true`: it says nothing about the CPU.
fn reduced_precision_f32(device: &Device) -> bool {
    device.is_cuda() && candle_core::cuda::gemm_reduced_precision_f32()
}

/// An `f32` rounding bound is tight enough to use when it inflates the
/// squared norm by at most this fraction; else the norms run again in `f64`.
const TIGHT: f64 = 1e-3;

/// Whether a relative error (an infinite or NaN one included) is above [`TIGHT`].
fn loose(rel_error: f64) -> bool {
    rel_error.is_nan() || rel_error > TIGHT
}

/// Whether the `f32` bound of the Gram form (`T` positions of dense uses,
/// a parameter `[r, c]`) is expected to be too loose, for positions that
/// are not correlated (`S^2 ~ T q`).
fn gram_expected_loose(t: usize, r: usize, c: usize, work: DType) -> bool {
    work != DType::F64 && loose(gamma(r + c, work) * t as f64)
}

/// The same for materialized gradients (`|g| ~ S / sqrt(T)`).
fn materialized_expected_loose(t: usize, work: DType) -> bool {
    work != DType::F64 && loose(2.0 * gamma(t, work) * (t as f64).sqrt())
}

/// Whether the engine computes the norms of a parameter `[r, c]` with `t`
/// positions of outer-product uses in the Gram form, in precision `work`;
/// `one_hot` if some use has one-hot rows. See [`ParamGrads`]'s `ghost`.
#[doc(hidden)]
pub fn chooses_gram(t: usize, r: usize, c: usize, work: DType, one_hot: bool) -> bool {
    if one_hot {
        return t.saturating_mul(t) <= r.saturating_mul(c);
    }
    if t == 1 {
        return true; // |u|^2 |v|^2: exact, no Gram matrix
    }
    let (tf, rf, cf) = (t as f64, r as f64, c as f64);
    let twice = |loose: bool| if loose { 2.0 } else { 1.0 };
    let gram = tf * tf * (rf + cf) * twice(gram_expected_loose(t, r, c, work));
    let materialized = tf * rf * cf * twice(materialized_expected_loose(t, work));
    gram <= materialized
}

/// `g s`, with a zero `s` contributing nothing even when `g` is infinite.
fn scaled(g: f64, s: f64) -> f64 {
    if s == 0.0 {
        0.0
    } else {
        g * s
    }
}

/// `total += t`, starting from nothing.
fn accumulate(total: &mut Option<Tensor>, t: Tensor) -> candle_core::Result<()> {
    *total = Some(match total.take() {
        None => t,
        Some(acc) => (acc + t)?,
    });
    Ok(())
}

fn cat_t(parts: Vec<Tensor>) -> candle_core::Result<Option<Tensor>> {
    match parts.len() {
        0 => Ok(None),
        1 => Ok(parts.into_iter().next()),
        _ => Tensor::cat(&parts, 1).map(Some),
    }
}

fn to_f64_vec(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// All uses of one parameter of `shape`, viewed as `[r, c]` with `r` its
/// first dimension: dense-row uses and one-hot uses each concatenated along
/// `T` (the sum over uses is a sum over more positions), materialized uses
/// summed.
#[derive(Debug)]
pub(crate) struct ParamGrads {
    dense: Option<(Tensor, Tensor)>,
    one_hot: Option<(Tensor, Tensor)>,
    materialized: Option<Tensor>,
    shape: Vec<usize>,
    /// The precision of the computations.
    work: DType,
    /// The precision of the clipped sum ([`work_dtype`]).
    out: DType,
    method: NormMethod,
}

/// How the norms of outer-product gradients are computed.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormMethod {
    /// By the cost rule ([`ParamGrads`]'s `ghost`): what the engine does.
    Auto,
    /// Always the Gram (ghost) form.
    Gram,
    /// Always the materialized per-example gradients.
    Materialize,
}

/// Per-example upper bounds on the squared norm of `grad_i = G_i^T X_i`
/// (`g [B, T, p]`, `x [B, T, d]`, one linear use) by `method`, and whether
/// the `f32` bound was too loose so that they were computed again in `f64`:
/// the hook through which `benches/norm_rule.rs` measures the
/// ghost-versus-materialize rule. Not part of the API.
///
/// # Errors
/// Candle's, for shapes that do not fit.
#[doc(hidden)]
pub fn linear_squared_norm_bounds(g: &Tensor, x: &Tensor, method: NormMethod) -> Result<(Vec<f64>, bool)> {
    let (b, _, p) = g.dims3()?;
    let d = x.dim(2)?;
    let mut grads =
        ParamGrads::new(vec![UseGrad::Outer { rows: Rows::Dense(g.clone()), cols: x.clone() }], &[p, d], x.dtype())?;
    grads.method = method;
    grads.squared_norm_bounds_widening(b)
}

/// `sum_i c_i G_i^T X_i` for one linear use (`g [B, T, p]`, `x [B, T, d]`,
/// clip factors `c [B]` of any float dtype), as the engine computes it:
/// `[p, d]` in the engine's working dtype for `x` (`f64` for TF32 `f32`).
/// The hook through which `benches/dp_step.rs` times the clipped sums of a
/// step; it clips nothing and nothing in the optimizer accepts its result.
/// Not part of the API.
///
/// # Errors
/// Candle's, for shapes that do not fit.
#[doc(hidden)]
pub fn linear_clipped_sum(g: &Tensor, x: &Tensor, c: &Tensor) -> Result<Tensor> {
    let (p, d) = (g.dim(2)?, x.dim(2)?);
    ParamGrads::new(vec![UseGrad::Outer { rows: Rows::Dense(g.clone()), cols: x.clone() }], &[p, d], x.dtype())?
        .clipped_sum(c)
}

impl ParamGrads {
    /// Gathers `uses` of a parameter of `shape` and `dtype`.
    ///
    /// The computations run in [`work_dtype`], except that `f32` runs in
    /// `f64` where Candle's f32 matmuls on the device are TF32: their inputs
    /// are rounded to 11 bits, so neither the `f32` bounds nor the clipped
    /// sum's precision (the sensitivity) would hold.
    pub(crate) fn new(uses: Vec<UseGrad>, shape: &[usize], dtype: DType) -> candle_core::Result<Self> {
        let out = work_dtype(dtype);
        let device = uses.first().map(|u| match u {
            UseGrad::Outer { cols, .. } => cols.device().clone(),
            UseGrad::Materialized(m) => m.device().clone(),
        });
        let work = match device {
            Some(d) if out == DType::F32 && reduced_precision_f32(&d) => DType::F64,
            _ => out,
        };
        let (mut du, mut dv, mut ids, mut hv, mut mat) = (vec![], vec![], vec![], vec![], None::<Tensor>);
        for u in uses {
            match u {
                UseGrad::Outer { rows: Rows::Dense(r), cols } => {
                    du.push(r.to_dtype(work)?);
                    dv.push(cols.to_dtype(work)?);
                }
                UseGrad::Outer { rows: Rows::OneHot(i), cols } => {
                    ids.push(i);
                    hv.push(cols.to_dtype(work)?);
                }
                UseGrad::Materialized(m) => accumulate(&mut mat, m.to_dtype(DType::F64)?)?,
            }
        }
        let dense = cat_t(du)?.zip(cat_t(dv)?);
        let one_hot = cat_t(ids)?.zip(cat_t(hv)?);
        Ok(Self { dense, one_hot, materialized: mat, shape: shape.to_vec(), work, out, method: NormMethod::Auto })
    }

    /// Whether no use was captured.
    pub(crate) fn is_empty(&self) -> bool {
        self.dense.is_none() && self.one_hot.is_none() && self.materialized.is_none()
    }

    fn rows_cols(&self) -> (usize, usize) {
        let r = self.shape.first().copied().unwrap_or(1);
        (r, self.shape.iter().product::<usize>() / r.max(1))
    }

    fn positions(&self) -> candle_core::Result<usize> {
        let mut t = 0;
        for (_, v) in self.dense.iter().chain(&self.one_hot) {
            t += v.dim(1)?;
        }
        Ok(t)
    }

    /// Whether the Gram (ghost) form is used for the norms (all uses must be
    /// outer products), for `T` positions of all uses together:
    ///
    /// * With one-hot uses (an embedding, tied or not), `T^2 <= r c`: the
    ///   rule of Li et al. 2021 by memory (Gram matrices `B T^2`, the
    ///   materialized gradients `B r c`, a vocabulary-sized table per example).
    /// * Dense uses only, by time: Gram costs `T^2 (r + c)` multiply-adds
    ///   per example, materializing `T r c`, and each doubles when its `f32`
    ///   bound is expected to be too loose, so that it runs in `f64`
    ///   ([`gram_expected_loose`], [`materialized_expected_loose`]); one
    ///   position is always the exact product `|u|^2 |v|^2`. Measured by
    ///   `benches/norm_rule.rs` (d 256 and 1024, T 64 to 512, square, MLP
    ///   and LoRA layers); the README gives the numbers.
    fn ghost(&self) -> candle_core::Result<bool> {
        if self.materialized.is_some() {
            return Ok(false);
        }
        let (r, c) = self.rows_cols();
        Ok(match self.method {
            NormMethod::Gram => true,
            NormMethod::Materialize => false,
            NormMethod::Auto => chooses_gram(self.positions()?, r, c, self.work, self.one_hot.is_some()),
        })
    }

    /// `S_i = sum_t |u_t| |v_t|` over the dense-row positions and over the
    /// one-hot positions (`|u_t| = 1`): upper bounds on each part's gradient
    /// norm, which scale the rounding bounds.
    fn position_norm_sums(&self, b: usize) -> candle_core::Result<(Vec<f64>, Vec<f64>)> {
        let row_norms = |x: &Tensor| -> candle_core::Result<Vec<f64>> {
            let (bb, t, n) = x.dims3()?;
            let sq = squared_norms(&x.reshape((bb * t, n))?).map_err(candle_core::Error::wrap)?;
            Ok(to_f64_vec(&sq)?.into_iter().map(f64::sqrt).collect())
        };
        let per_example = |norms: Vec<f64>, t: usize| {
            let mut s = vec![0.0; b];
            for (k, n) in norms.into_iter().enumerate() {
                s[k / t] += n;
            }
            s
        };
        let dense = match &self.dense {
            Some((u, v)) => {
                per_example(row_norms(u)?.into_iter().zip(row_norms(v)?).map(|(a, b)| a * b).collect(), v.dim(1)?)
            }
            None => vec![0.0; b],
        };
        let one_hot = match &self.one_hot {
            Some((_, v)) => per_example(row_norms(v)?, v.dim(1)?),
            None => vec![0.0; b],
        };
        Ok((dense, one_hot))
    }

    /// The same uses in f64, for norms whose f32 rounding bound is too loose.
    fn widened(&self) -> candle_core::Result<Self> {
        // One-hot rows are ids: only dense rows and the columns widen.
        let widen = |p: &Option<(Tensor, Tensor)>, rows: bool| -> candle_core::Result<Option<(Tensor, Tensor)>> {
            p.as_ref()
                .map(|(u, v)| Ok((if rows { u.to_dtype(DType::F64)? } else { u.clone() }, v.to_dtype(DType::F64)?)))
                .transpose()
        };
        Ok(Self {
            dense: widen(&self.dense, true)?,
            one_hot: widen(&self.one_hot, false)?,
            materialized: self.materialized.clone(),
            shape: self.shape.clone(),
            work: DType::F64,
            out: self.out,
            method: self.method,
        })
    }

    /// Per-example upper bounds on the squared norm of the summed gradient
    /// (cross terms between uses included), in `f64`. Where the `f32`
    /// rounding bound would inflate a norm by more than 0.05% (heavy
    /// cancellation, or dot products over a large vocabulary), the norms are
    /// computed again in `f64`.
    pub(crate) fn squared_norm_bounds(&self, b: usize) -> Result<Vec<f64>> {
        Ok(self.squared_norm_bounds_widening(b)?.0)
    }

    /// [`Self::squared_norm_bounds`], and whether they were computed again in `f64`.
    fn squared_norm_bounds_widening(&self, b: usize) -> Result<(Vec<f64>, bool)> {
        if self.work != DType::F64 && self.expected_loose()? {
            // Skip an f32 pass whose bound would be thrown away.
            return Ok((self.widened()?.squared_norm_bounds(b)?, true));
        }
        let (estimates, errors) = self.estimates_and_errors(b)?;
        // Tight only when comparable: an infinite norm or a NaN is loose.
        let tight = |q: f64, e: f64| q.is_finite() && (e == 0.0 || !loose(e / q.abs()));
        if self.work != DType::F64 && !estimates.iter().zip(&errors).all(|(q, e)| tight(*q, *e)) {
            return Ok((self.widened()?.squared_norm_bounds(b)?, true));
        }
        // A rounded estimate may dip below 0; a NaN must stay NaN (f64::max
        // would turn it into 0 and let a NaN gradient through).
        Ok((estimates.iter().zip(&errors).map(|(q, e)| if *q < 0.0 { *e } else { q + e }).collect(), false))
    }

    /// Whether the `f32` bound of the dense uses (the only ones, more than
    /// one position) is expected to be too loose for the method chosen.
    fn expected_loose(&self) -> candle_core::Result<bool> {
        let t = self.positions()?;
        if self.one_hot.is_some() || self.materialized.is_some() || t <= 1 {
            return Ok(false);
        }
        let (r, c) = self.rows_cols();
        Ok(if self.ghost()? {
            gram_expected_loose(t, r, c, self.work)
        } else {
            materialized_expected_loose(t, self.work)
        })
    }

    /// Per example, the computed squared norm and a bound on its rounding error.
    fn estimates_and_errors(&self, b: usize) -> Result<(Vec<f64>, Vec<f64>)> {
        let (r, c) = self.rows_cols();
        let outer = self.dense.is_some() || self.one_hot.is_some();
        if !outer {
            // Only f64 vectors: rounding far inside the clipping margin.
            return match &self.materialized {
                Some(m) => Ok((to_f64_vec(&squared_norms(m)?)?, vec![0.0; b])),
                None => Err(candle_core::Error::Msg("no captured use to take a norm of".into()).into()),
            };
        }
        let t = self.positions()?;
        if !self.ghost()? {
            let (sd, sh) = self.position_norm_sums(b)?;
            let q = to_f64_vec(&squared_norms(&self.materialize()?)?)?;
            let g = gamma(t, self.work);
            // |g| <= |fl(g)| + gamma_T S, so |g|^2 <= (sqrt(q) + gamma_T S)^2.
            let err =
                q.iter().zip(sd.iter().zip(&sh)).map(|(q, (d, h))| (q.sqrt() + scaled(g, d + h)).powi(2) - q).collect();
            return Ok((q, err));
        }
        // One position, dense rows: |u|^2 |v|^2, exact up to the final rounding.
        if let (Some((u, v)), None, 1) = (&self.dense, &self.one_hot, t) {
            let q = (squared_norms(&u.squeeze(1)?)? * squared_norms(&v.squeeze(1)?)?)?;
            return Ok((to_f64_vec(&q)?, vec![0.0; b]));
        }
        let mut q: Option<Tensor> = None;
        let gram = |x: &Tensor, y: &Tensor| -> candle_core::Result<Tensor> { x.matmul(&y.t()?)?.to_dtype(DType::F64) };
        if let Some((u, v)) = &self.dense {
            accumulate(&mut q, (gram(u, u)? * gram(v, v)?)?.sum((1, 2))?)?;
        }
        if let Some((ids, v)) = &self.one_hot {
            let same = ids.unsqueeze(2)?.broadcast_eq(&ids.unsqueeze(1)?)?.to_dtype(DType::F64)?;
            accumulate(&mut q, (gram(v, v)? * same)?.sum((1, 2))?)?;
        }
        if let (Some((u, dv)), Some((ids, hv))) = (&self.dense, &self.one_hot) {
            // sum_{s in dense, t in one-hot} u_s[id_t] (v_s . v_t), twice:
            // gathered along u's own last dimension, no transposed copy.
            let (b, t_hot) = ids.dims2()?;
            let t_dense = u.dim(1)?;
            let index = ids.unsqueeze(1)?.broadcast_as((b, t_dense, t_hot))?.contiguous()?;
            let picked = u.gather(&index, 2)?.to_dtype(DType::F64)?; // [B, T_dense, T_hot]
            accumulate(&mut q, ((picked * gram(dv, hv)?)?.sum((1, 2))? * 2.0)?)?;
        }
        let q = match q {
            Some(q) => to_f64_vec(&q)?,
            None => return Err(candle_core::Error::Msg("no captured use to take a norm of".into()).into()),
        };
        // Dense-row Gram entries are dot products over r and c; the one-hot
        // and cross terms' only rounded dot products are over c.
        let (sd, sh) = self.position_norm_sums(b)?;
        let (gd, gc) = (gamma(r + c, self.work), gamma(c, self.work));
        let err = sd.iter().zip(&sh).map(|(d, h)| scaled(gd, d * d) + scaled(gc, h * h + 2.0 * d * h)).collect();
        Ok((q, err))
    }

    /// The per-example gradients `[B, r c]`, summed over the uses.
    fn materialize(&self) -> Result<Tensor> {
        let (r, c) = self.rows_cols();
        let mut total = self.materialized.clone();
        let mut add = |t: Tensor| accumulate(&mut total, t.to_dtype(DType::F64)?);
        if let Some((u, v)) = &self.dense {
            let b = u.dim(0)?;
            add(u.transpose(1, 2)?.contiguous()?.matmul(v)?.reshape((b, r * c))?)?;
        }
        if let Some((ids, v)) = &self.one_hot {
            // Row id_t of example i is row i r + id_t of a [B r, c] table.
            let (b, t) = ids.dims2()?;
            let offsets = Tensor::arange_step(0i64, (b * r) as i64, r as i64, ids.device())?.unsqueeze(1)?;
            let rows = ids.to_dtype(DType::I64)?.broadcast_add(&offsets)?.flatten_all()?;
            let table = Tensor::zeros((b * r, c), v.dtype(), v.device())?;
            add(table.index_add(&rows, &v.reshape((b * t, c))?, 0)?.reshape((b, r * c))?)?;
        }
        match total {
            Some(t) => Ok(t),
            None => Err(candle_core::Error::Msg("no captured use to materialize".into()).into()),
        }
    }

    /// `sum_i c_i grad_i` in the parameter's shape and [`work_dtype`]
    /// (computed in the work precision), with `c [B]` in `f64`: one weighted matmul for dense
    /// rows (Bu et al. 2023), one `index_add` for one-hot rows, the clip
    /// kernel for materialized gradients.
    pub(crate) fn clipped_sum(&self, c: &Tensor) -> Result<Tensor> {
        let (r, cols) = self.rows_cols();
        let cw = c.to_dtype(self.work)?;
        let weighted = |v: &Tensor| -> candle_core::Result<Tensor> {
            let (b, t, n) = v.dims3()?;
            v.broadcast_mul(&cw.reshape((b, 1, 1))?)?.reshape((b * t, n))
        };
        let mut total: Option<Tensor> = None;
        let mut add = |t: Tensor| accumulate(&mut total, t);
        if let Some((u, v)) = &self.dense {
            let (b, t, _) = v.dims3()?;
            add(weighted(u)?.t()?.matmul(&v.reshape((b * t, cols))?)?)?;
        }
        if let Some((ids, v)) = &self.one_hot {
            let table = Tensor::zeros((r, cols), v.dtype(), v.device())?;
            add(table.index_add(&ids.flatten_all()?, &weighted(v)?, 0)?)?;
        }
        if let Some(m) = &self.materialized {
            add(clip_accumulate(m, &c.to_dtype(DType::F64)?)?.to_dtype(self.work)?.reshape((r, cols))?)?;
        }
        match total {
            Some(t) => Ok(t.reshape(self.shape.as_slice())?.to_dtype(self.out)?),
            None => Err(candle_core::Error::Msg("no captured use to sum".into()).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1] (SplitMix64), as an f32 tensor.
    fn det(shape: &[usize], seed: u64) -> Tensor {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                (2.0 * (((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64) - 1.0) as f32
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn f64s(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
    }

    /// The exact squared norm per example of a per-example gradient `[B, r, c]`
    /// given in f64.
    fn exact_of(g: &Tensor) -> Vec<f64> {
        f64s(&g.to_dtype(DType::F64).unwrap().sqr().unwrap().sum((1, 2)).unwrap())
    }

    /// One dense use `sum_t u_t v_t^T` of an f32 parameter `[r, c]`.
    fn dense(u: &Tensor, v: &Tensor, r: usize, c: usize) -> ParamGrads {
        ParamGrads::new(vec![UseGrad::Outer { rows: Rows::Dense(u.clone()), cols: v.clone() }], &[r, c], DType::F32)
            .unwrap()
    }

    /// `sum_t u_t v_t^T` in f64 from the (f32) factors.
    fn outer(u: &Tensor, v: &Tensor) -> Tensor {
        let (u, v) = (u.to_dtype(DType::F64).unwrap(), v.to_dtype(DType::F64).unwrap());
        u.transpose(1, 2).unwrap().matmul(&v).unwrap()
    }

    /// Every bound is above the exact norm and within 0.3% of it (the f32
    /// bound is used only where it is that tight; f64 elsewhere).
    fn check(bounds: &[f64], truth: &[f64], what: &str) {
        for (i, (bound, truth)) in bounds.iter().zip(truth).enumerate() {
            assert!(bound >= truth, "{what} example {i}: bound {bound} < exact {truth}");
            assert!(*bound <= truth * (1.0 + 3e-3) + 1e-30, "{what} example {i}: bound {bound} vs exact {truth}");
        }
    }

    /// Heavy cancellation: position 2 undoes position 1 up to a small
    /// residue, so the gradient is tiny against its factors. The f32 Gram
    /// estimate alone falls below the exact norm for some examples; the
    /// bound never does.
    #[test]
    fn the_gram_norm_bound_holds_under_cancellation_in_f32() {
        let (b, r, c) = (16, 300, 400);
        let mut under = 0;
        for seed in 0..4u64 {
            let base_u = det(&[b, 1, r], 10 * seed + 1);
            let base_v = det(&[b, 1, c], 10 * seed + 2);
            let tiny = (det(&[b, 1, c], 10 * seed + 3) * (1e-3 * (seed + 1) as f64)).unwrap();
            let u = Tensor::cat(&[&base_u, &base_u.neg().unwrap()], 1).unwrap();
            let v = Tensor::cat(&[&base_v, &(&base_v + &tiny).unwrap()], 1).unwrap();
            let grads = dense(&u, &v, r, c);
            assert!(grads.ghost().unwrap());
            let truth = exact_of(&outer(&u, &v));
            let raw = f64s(
                &(u.matmul(&u.t().unwrap()).unwrap() * v.matmul(&v.t().unwrap()).unwrap())
                    .unwrap()
                    .sum((1, 2))
                    .unwrap(),
            );
            under += raw.iter().zip(&truth).filter(|(r, t)| r < t).count();
            check(&grads.squared_norm_bounds(b).unwrap(), &truth, "gram");
        }
        assert!(under > 0, "the case must be one where the unbounded f32 estimate falls short");
    }

    /// The same in the materialized regime.
    #[test]
    fn the_materialized_norm_bound_holds_under_cancellation_in_f32() {
        let (b, t, r, c) = (8, 40, 3, 4);
        let u = det(&[b, t, r], 21);
        let v = det(&[b, t, c], 22);
        let u = Tensor::cat(&[&u, &u.neg().unwrap()], 1).unwrap();
        let v = Tensor::cat(&[&v, &(&v + 1e-4).unwrap()], 1).unwrap();
        let grads = dense(&u, &v, r, c);
        assert!(!grads.ghost().unwrap());
        check(&grads.squared_norm_bounds(b).unwrap(), &exact_of(&outer(&u, &v)), "materialized");
    }

    /// On the CPU, f32 norms run in f32 with f32's unit roundoff whatever
    /// Candle's (CUDA-only) TF32 flag reads: without the CUDA backend it reads
    /// `true`, and taking it at its word made every f32 bound loose (always
    /// recomputed in f64) and, for `c >= 1024`, `gamma_c` infinite, which
    /// times a zero one-hot sum gave a NaN bound: layers 1024 wide failed
    /// every step.
    #[test]
    fn f32_rounding_on_the_cpu_is_f32s() {
        let (u, v) = (det(&[2, 3, 4], 1), det(&[2, 3, 1024], 2));
        let grads =
            ParamGrads::new(vec![UseGrad::Outer { rows: Rows::Dense(u), cols: v }], &[4, 1024], DType::F32).unwrap();
        assert_eq!((grads.work, grads.out), (DType::F32, DType::F32));
        let g = gamma(1024, DType::F32);
        assert!((g / (1024.0 * 2f64.powi(-24)) - 1.0).abs() < 1e-4, "{g}");
        assert_eq!(gamma(1 << 23, DType::F32), f64::INFINITY);
        assert_eq!(scaled(f64::INFINITY, 0.0), 0.0);
    }

    /// The rule's regimes at the shapes `benches/norm_rule.rs` measured
    /// (f32): where each method was the faster one.
    #[test]
    fn the_rule_picks_the_measured_faster_method() {
        let f = DType::F32;
        for (t, r, c, gram) in [
            (64, 256, 256, true),
            (128, 256, 256, false),
            (128, 1024, 256, false),
            (64, 1024, 256, true),
            (512, 1024, 1024, true),
            (512, 4096, 1024, true),
            (64, 8, 1024, false),
            (128, 8, 256, false),
        ] {
            assert_eq!(chooses_gram(t, r, c, f, false), gram, "T {t}, [{r}, {c}]");
        }
        assert!(chooses_gram(1, 1, 5, f, false), "one position: the exact product");
        // One-hot uses: by memory.
        assert!(chooses_gram(16, 256, 1, f, true) && !chooses_gram(17, 256, 1, f, true));
    }

    /// A layer `[256, 1024]` (an MLP's output projection at d = 256) over 8
    /// positions of Gaussian-like factors: finite bounds above the exact
    /// norms, from the f32 computation alone.
    #[test]
    fn wide_layers_get_tight_f32_bounds() {
        let (b, t, r, c) = (3, 8, 256, 1024);
        let (u, v) = (det(&[b, t, r], 51), det(&[b, t, c], 52));
        let grads = dense(&u, &v, r, c);
        assert!(grads.ghost().unwrap());
        let (bounds, widened) = grads.squared_norm_bounds_widening(b).unwrap();
        assert!(!widened, "a tight f32 bound is not recomputed in f64: {bounds:?}");
        check(&bounds, &exact_of(&outer(&u, &v)), "wide");
    }

    /// A NaN anywhere in an example's factors gives that example a NaN
    /// bound (the engine then refuses the step), in every regime.
    #[test]
    fn a_nan_factor_gives_a_nan_bound() {
        // The exact one-position product, the Gram form, materialized.
        for (t, r, c) in [(1, 3, 4), (3, 16, 16), (9, 2, 2)] {
            assert_eq!(chooses_gram(t, r, c, DType::F32, false), t < 9);
            let mut u = f64s(&det(&[2, t, r], 41));
            u[r * t + 1] = f64::NAN; // example 1
            let u = Tensor::from_vec(u.iter().map(|&x| x as f32).collect::<Vec<_>>(), (2, t, r), &Device::Cpu).unwrap();
            let v = det(&[2, t, c], 42);
            let grads =
                ParamGrads::new(vec![UseGrad::Outer { rows: Rows::Dense(u), cols: v }], &[r, c], DType::F32).unwrap();
            let bounds = grads.squared_norm_bounds(2).unwrap();
            assert!(bounds[0].is_finite() && bounds[1].is_nan(), "T = {t}: {bounds:?}");
        }
    }

    /// A table used as an embedding (one-hot rows) and by a dense use that
    /// nearly undoes it: the one-hot and cross terms cancel.
    #[test]
    fn the_tied_norm_bound_holds_under_cancellation_in_f32() {
        let (b, t, vocab, c) = (6, 5, 200, 300);
        let ids: Vec<u32> = (0..b * t).map(|k| ((k * 37) % vocab) as u32).collect();
        let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
        let hv = det(&[b, t, c], 31);
        // Dense rows: minus the one-hot rows; columns: the same plus a residue.
        let one_hot = Tensor::zeros((b * t, vocab), DType::F32, &Device::Cpu)
            .unwrap()
            .scatter_add(
                &ids.flatten_all().unwrap().unsqueeze(1).unwrap(),
                &Tensor::ones((b * t, 1), DType::F32, &Device::Cpu).unwrap(),
                1,
            )
            .unwrap()
            .reshape((b, t, vocab))
            .unwrap();
        let du = one_hot.neg().unwrap();
        let dv = (&hv + (det(&[b, t, c], 32) * 1e-3).unwrap()).unwrap();
        let grads = ParamGrads::new(
            vec![
                UseGrad::Outer { rows: Rows::OneHot(ids.clone()), cols: hv.clone() },
                UseGrad::Outer { rows: Rows::Dense(du.clone()), cols: dv.clone() },
            ],
            &[vocab, c],
            DType::F32,
        )
        .unwrap();
        assert!(grads.ghost().unwrap());
        let truth = exact_of(&(outer(&one_hot, &hv) + outer(&du, &dv)).unwrap());
        check(&grads.squared_norm_bounds(b).unwrap(), &truth, "tied");
    }
}
