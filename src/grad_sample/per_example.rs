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
//! tied to an output projection costs `O(T^2 d)`, never `O(V d)` per example.

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
    /// The per-example gradients themselves, `[B, n]`.
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

impl ParamGrads {
    /// Gathers `uses` of a parameter of `shape`.
    pub(crate) fn new(uses: Vec<UseGrad>, shape: &[usize]) -> candle_core::Result<Self> {
        let (mut du, mut dv, mut ids, mut hv, mut mat) = (vec![], vec![], vec![], vec![], None::<Tensor>);
        for u in uses {
            match u {
                UseGrad::Outer { rows: Rows::Dense(r), cols } => {
                    du.push(r);
                    dv.push(cols);
                }
                UseGrad::Outer { rows: Rows::OneHot(i), cols } => {
                    ids.push(i);
                    hv.push(cols);
                }
                UseGrad::Materialized(m) => accumulate(&mut mat, m)?,
            }
        }
        let dense = cat_t(du)?.zip(cat_t(dv)?);
        let one_hot = cat_t(ids)?.zip(cat_t(hv)?);
        Ok(Self { dense, one_hot, materialized: mat, shape: shape.to_vec() })
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

    /// Per-example squared norms `[B]` of the summed gradient, cross terms
    /// between uses included.
    pub(crate) fn squared_norms(&self) -> Result<Tensor> {
        if !self.ghost()? {
            return squared_norms(&self.materialize()?);
        }
        let mut total: Option<Tensor> = None;
        let mut add = |t: Tensor| accumulate(&mut total, t);
        if let Some((u, v)) = &self.dense {
            add(if v.dim(1)? == 1 {
                (squared_norms(&u.squeeze(1)?)? * squared_norms(&v.squeeze(1)?)?)?
            } else {
                (u.matmul(&u.t()?)? * v.matmul(&v.t()?)?)?.sum((1, 2))?
            })?;
        }
        if let Some((ids, v)) = &self.one_hot {
            add(if v.dim(1)? == 1 {
                squared_norms(&v.squeeze(1)?)?
            } else {
                let same = ids.unsqueeze(2)?.broadcast_eq(&ids.unsqueeze(1)?)?.to_dtype(v.dtype())?;
                (v.matmul(&v.t()?)? * same)?.sum((1, 2))?
            })?;
        }
        if let (Some((u, dv)), Some((ids, hv))) = (&self.dense, &self.one_hot) {
            // sum_{t in one-hot, s in dense} u_s[id_t] (v_t . v_s), twice.
            let (b, t_hot) = ids.dims2()?;
            let t_dense = u.dim(1)?;
            let index = ids.unsqueeze(2)?.broadcast_as((b, t_hot, t_dense))?.contiguous()?;
            let picked = u.transpose(1, 2)?.contiguous()?.gather(&index, 1)?; // [B, T_hot, T_dense]
            add(((picked * hv.matmul(&dv.t()?)?)?.sum((1, 2))? * 2.0)?)?;
        }
        match total {
            Some(t) => Ok(t),
            None => Err(candle_core::Error::Msg("no captured use to take a norm of".into()).into()),
        }
    }

    /// The per-example gradients `[B, r c]`, summed over the uses.
    fn materialize(&self) -> Result<Tensor> {
        let (r, c) = self.rows_cols();
        let mut total = self.materialized.clone();
        let mut add = |t: Tensor| accumulate(&mut total, t);
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

    /// `sum_i c_i grad_i` in the parameter's shape, with `c [B]`: one
    /// weighted matmul for dense rows (Bu et al. 2023), one `index_add` for
    /// one-hot rows, the clip kernel for materialized gradients.
    pub(crate) fn clipped_sum(&self, c: &Tensor) -> Result<Tensor> {
        let (r, cols) = self.rows_cols();
        let weighted = |v: &Tensor| -> candle_core::Result<Tensor> {
            let (b, t, n) = v.dims3()?;
            v.broadcast_mul(&c.reshape((b, 1, 1))?)?.reshape((b * t, n))
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
            add(clip_accumulate(m, c)?.reshape((r, cols))?)?;
        }
        match total {
            Some(t) => Ok(t.reshape(self.shape.as_slice())?),
            None => Err(candle_core::Error::Msg("no captured use to sum".into()).into()),
        }
    }
}
