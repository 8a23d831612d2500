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

use candle_core::{DType, Tensor};

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

/// `gamma_n = n u / (1 - n u)` for the unit roundoff of `dtype`.
fn gamma(n: usize, dtype: DType) -> f64 {
    let u = if dtype == DType::F64 { f64::EPSILON / 2.0 } else { f32::EPSILON as f64 / 2.0 };
    let nu = n as f64 * u;
    if nu < 0.5 {
        nu / (1.0 - nu)
    } else {
        f64::INFINITY
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
    work: DType,
}

impl ParamGrads {
    /// Gathers `uses` of a parameter of `shape` and `dtype`.
    pub(crate) fn new(uses: Vec<UseGrad>, shape: &[usize], dtype: DType) -> candle_core::Result<Self> {
        let work = work_dtype(dtype);
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
        Ok(Self { dense, one_hot, materialized: mat, shape: shape.to_vec(), work })
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

    /// Whether the Gram (ghost) form is used for the norms: when all uses
    /// are outer products and `T^2 <= r c` for their `T` positions together,
    /// the rule of Li et al. 2021 (the Gram matrices take `B T^2` memory,
    /// the materialized gradients `B r c`).
    fn ghost(&self) -> candle_core::Result<bool> {
        let (r, c) = self.rows_cols();
        let t = self.positions()?;
        Ok(self.materialized.is_none() && t.saturating_mul(t) <= r.saturating_mul(c))
    }

    /// `S_i = sum_t |u_t| |v_t|` over every outer-product position: an upper
    /// bound on each example's gradient norm, which scales the rounding bounds.
    fn position_norm_sums(&self, b: usize) -> candle_core::Result<Vec<f64>> {
        let row_norms = |x: &Tensor| -> candle_core::Result<Vec<f64>> {
            let (bb, t, n) = x.dims3()?;
            let sq = squared_norms(&x.reshape((bb * t, n))?).map_err(candle_core::Error::wrap)?;
            Ok(to_f64_vec(&sq)?.into_iter().map(f64::sqrt).collect())
        };
        let mut s = vec![0.0; b];
        let mut add = |norms: Vec<f64>, t: usize| {
            for (k, n) in norms.into_iter().enumerate() {
                s[k / t] += n;
            }
        };
        if let Some((u, v)) = &self.dense {
            let t = v.dim(1)?;
            add(row_norms(u)?.into_iter().zip(row_norms(v)?).map(|(a, b)| a * b).collect(), t);
        }
        if let Some((_, v)) = &self.one_hot {
            add(row_norms(v)?, v.dim(1)?);
        }
        Ok(s)
    }

    /// Per-example upper bounds on the squared norm of the summed gradient
    /// (cross terms between uses included), in `f64`.
    pub(crate) fn squared_norm_bounds(&self, b: usize) -> Result<Vec<f64>> {
        let (r, c) = self.rows_cols();
        let outer = self.dense.is_some() || self.one_hot.is_some();
        if !outer {
            // Only f64 vectors: rounding far inside the clipping margin.
            return match &self.materialized {
                Some(m) => Ok(to_f64_vec(&squared_norms(m)?)?),
                None => Err(candle_core::Error::Msg("no captured use to take a norm of".into()).into()),
            };
        }
        let t = self.positions()?;
        if !self.ghost()? {
            let s = self.position_norm_sums(b)?;
            let q = to_f64_vec(&squared_norms(&self.materialize()?)?)?;
            let g = gamma(t, self.work);
            return Ok(q.iter().zip(&s).map(|(q, s)| (q.sqrt() + g * s).powi(2)).collect());
        }
        // One position, dense rows: |u|^2 |v|^2, exact up to the final rounding.
        if let (Some((u, v)), None, 1) = (&self.dense, &self.one_hot, t) {
            let q = (squared_norms(&u.squeeze(1)?)? * squared_norms(&v.squeeze(1)?)?)?;
            return Ok(to_f64_vec(&q)?);
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
        let s = self.position_norm_sums(b)?;
        let g = gamma(r + c, self.work);
        Ok(q.iter().zip(&s).map(|(q, s)| q.max(0.0) + g * s * s).collect())
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

    /// `sum_i c_i grad_i` in the parameter's shape and the work precision
    /// ([`work_dtype`]), with `c [B]` in `f64`: one weighted matmul for dense
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
            Some(t) => Ok(t.reshape(self.shape.as_slice())?),
            None => Err(candle_core::Error::Msg("no captured use to sum".into()).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The exact squared norm of `sum_t u_t v_t^T` per example, in f64 from
    /// the same (f32) factors.
    fn exact(u: &Tensor, v: &Tensor) -> Vec<f64> {
        let (u, v) = (u.to_dtype(DType::F64).unwrap(), v.to_dtype(DType::F64).unwrap());
        let g = u.transpose(1, 2).unwrap().matmul(&v).unwrap();
        g.sqr().unwrap().sum((1, 2)).unwrap().to_vec1::<f64>().unwrap()
    }

    /// Heavy cancellation: position 2 undoes position 1 up to a small
    /// residue, so the gradient is tiny against its factors. The f32 Gram
    /// estimate alone can fall below the exact norm; the bound must not.
    #[test]
    fn the_norm_bound_holds_under_cancellation_in_f32() {
        let dev = Device::Cpu;
        let (b, r, c) = (16, 300, 400);
        let mut under = 0;
        for seed in 0..4u64 {
            let base_u = Tensor::randn(0f32, 1.0, (b, 1, r), &dev).unwrap();
            let base_v = Tensor::randn(0f32, 1.0, (b, 1, c), &dev).unwrap();
            let tiny = (Tensor::randn(0f32, 1.0, (b, 1, c), &dev).unwrap() * (1e-3 * (seed + 1) as f64)).unwrap();
            let u = Tensor::cat(&[&base_u, &base_u.neg().unwrap()], 1).unwrap();
            let v = Tensor::cat(&[&base_v, &(&base_v + &tiny).unwrap()], 1).unwrap();
            let grads = ParamGrads::new(
                vec![UseGrad::Outer { rows: Rows::Dense(u.clone()), cols: v.clone() }],
                &[r, c],
                DType::F32,
            )
            .unwrap();
            assert!(grads.ghost().unwrap());
            let bounds = grads.squared_norm_bounds(b).unwrap();
            let truth = exact(&u, &v);
            let raw = (u.matmul(&u.t().unwrap()).unwrap() * v.matmul(&v.t().unwrap()).unwrap())
                .unwrap()
                .sum((1, 2))
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for i in 0..b {
                assert!(bounds[i] >= truth[i], "example {i}: bound {} < exact {}", bounds[i], truth[i]);
                under += usize::from(raw[i] < truth[i]);
            }
        }
        assert!(under > 0, "the case must be one where the unbounded f32 estimate falls short");
    }

    /// The same in the materialized regime.
    #[test]
    fn the_materialized_norm_bound_holds_under_cancellation_in_f32() {
        let dev = Device::Cpu;
        let (b, t, r, c) = (8, 40, 3, 4);
        let u = Tensor::randn(0f32, 1.0, (b, t, r), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, t, c), &dev).unwrap();
        // Make the positions cancel: append the negated rows with the same columns.
        let u = Tensor::cat(&[&u, &u.neg().unwrap()], 1).unwrap();
        let v = Tensor::cat(&[&v, &(&v + 1e-4).unwrap()], 1).unwrap();
        let grads = ParamGrads::new(
            vec![UseGrad::Outer { rows: Rows::Dense(u.clone()), cols: v.clone() }],
            &[r, c],
            DType::F32,
        )
        .unwrap();
        assert!(!grads.ghost().unwrap());
        let bounds = grads.squared_norm_bounds(b).unwrap();
        let s = grads.position_norm_sums(b).unwrap();
        for (i, (bound, truth)) in bounds.iter().zip(exact(&u, &v)).enumerate() {
            assert!(*bound >= truth, "example {i}: bound {bound} < exact {truth}");
            // No looser than stated: the computed norm plus gamma_T S.
            let slack = bound.sqrt() - truth.sqrt();
            assert!(slack <= 2.0 * gamma(2 * t, DType::F32) * s[i], "example {i}: slack {slack}");
        }
    }
}
