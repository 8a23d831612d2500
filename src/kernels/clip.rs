//! Per-example squared norms and the fused clip-and-accumulate.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};

use super::cpu::{contiguous_cpu, for_each_chunk, Element};
use crate::error::{Error, Result};

/// Elements of a row that one CPU work item reduces. It fixes the order of
/// the `f64` reduction (lanes within a block, then blocks in order), so the
/// result does not depend on the number of threads.
const NORM_BLOCK: usize = 4096;

/// Columns one CPU work item of the clipped sum owns: its `f64` accumulators
/// (16 KiB) stay in the L1 cache while every row's slice streams past.
const SUM_TILE: usize = 2048;

/// Per-example squared L2 norms: `grads [B, N] -> [B]`, row `i` giving
/// `sum_n grads[i, n]^2`.
///
/// Accumulated in `f64` (Metal: `f32` in short sums and trees) and rounded
/// once to the input's dtype; `f16`/`bf16` inputs are widened to `f32` and
/// the result narrowed back. A row holding NaN or infinity gives NaN or
/// infinity. No gradient flows through this op.
///
/// # Errors
/// [`Error::Shape`] unless `grads` has rank 2; [`Error::Dtype`] for a
/// non-float dtype.
pub fn squared_norms(grads: &Tensor) -> Result<Tensor> {
    rank2(grads, "squared_norms: grads")?;
    let (g, dtype) = widened(grads, "squared_norms: grads")?;
    Ok(g.apply_op1_no_bwd(&SquaredNorms)?.to_dtype(dtype)?)
}

/// The reference for [`squared_norms`]: `f64` squares summed by Candle.
///
/// # Errors
/// As [`squared_norms`].
pub fn squared_norms_slow(grads: &Tensor) -> Result<Tensor> {
    rank2(grads, "squared_norms_slow: grads")?;
    Ok(grads.to_dtype(DType::F64)?.sqr()?.sum(1)?.to_dtype(grads.dtype())?)
}

/// The clipped sum `sum_i factors[i] grads[i, ..]`: `[B, N], [B] -> [N]`.
///
/// One pass over `grads`; no scaled copy is made. `factors` are converted
/// to the gradients' dtype; the sum is accumulated in `f64` (Metal: `f32`
/// in blocks of 16 rows) and rounded once. No gradient flows through
/// this op.
///
/// # Errors
/// [`Error::Shape`] unless `grads` is `[B, N]` and `factors` is `[B]`;
/// [`Error::Dtype`] for a non-float dtype.
pub fn clip_accumulate(grads: &Tensor, factors: &Tensor) -> Result<Tensor> {
    let (b, _) = rank2(grads, "clip_accumulate: grads")?;
    rank1(factors, b, "clip_accumulate: factors")?;
    let (g, dtype) = widened(grads, "clip_accumulate: grads")?;
    let c = factors.to_dtype(g.dtype())?.contiguous()?;
    Ok(g.apply_op2_no_bwd(&c, &ClipAccumulate)?.to_dtype(dtype)?)
}

/// The reference for [`clip_accumulate`]: an `f64` broadcast product summed
/// over the batch by Candle.
///
/// # Errors
/// As [`clip_accumulate`].
pub fn clip_accumulate_slow(grads: &Tensor, factors: &Tensor) -> Result<Tensor> {
    let (b, _) = rank2(grads, "clip_accumulate_slow: grads")?;
    rank1(factors, b, "clip_accumulate_slow: factors")?;
    let c = factors.to_dtype(DType::F64)?.unsqueeze(1)?;
    Ok(grads.to_dtype(DType::F64)?.broadcast_mul(&c)?.sum(0)?.to_dtype(grads.dtype())?)
}

fn rank2(t: &Tensor, what: &'static str) -> Result<(usize, usize)> {
    t.dims2().map_err(|_| Error::Shape { what, expected: "[B, N]: one row per example", got: t.dims().to_vec() })
}

fn rank1(t: &Tensor, b: usize, what: &'static str) -> Result<()> {
    if t.dims() == [b] {
        Ok(())
    } else {
        Err(Error::Shape { what, expected: "[B]: one factor per row of grads", got: t.dims().to_vec() })
    }
}

/// `t` contiguous in the dtype the kernels compute in, and the dtype to
/// return the result in.
pub(crate) fn widened(t: &Tensor, what: &'static str) -> Result<(Tensor, DType)> {
    let dtype = t.dtype();
    let compute = match dtype {
        DType::F32 | DType::F64 => dtype,
        DType::F16 | DType::BF16 => DType::F32,
        got => return Err(Error::Dtype { what, got, expected: "a float dtype (f32, f64, f16 or bf16)" }),
    };
    Ok((t.to_dtype(compute)?.contiguous()?, dtype))
}

struct SquaredNorms;

impl CustomOp1 for SquaredNorms {
    fn name(&self) -> &'static str {
        "candle-dp-squared-norms"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, n) = l.shape().dims2()?;
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(squared_norms_cpu(contiguous_cpu::<f32>(s, l, self.name())?, b, n)),
            CpuStorage::F64(_) => CpuStorage::F64(squared_norms_cpu(contiguous_cpu::<f64>(s, l, self.name())?, b, n)),
            _ => return Err(candle_core::Error::UnsupportedDTypeForOp(s.dtype(), self.name())),
        };
        Ok((out, Shape::from(b)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (b, n) = l.shape().dims2()?;
        Ok((super::cuda::squared_norms(s, l, b, n)?, Shape::from(b)))
    }

    #[cfg(all(feature = "metal", target_os = "macos"))]
    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        let (b, n) = l.shape().dims2()?;
        Ok((super::metal::squared_norms(s, l, b, n)?, Shape::from(b)))
    }
}

struct ClipAccumulate;

impl CustomOp2 for ClipAccumulate {
    fn name(&self) -> &'static str {
        "candle-dp-clip-accumulate"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        c: &CpuStorage,
        cl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, n) = gl.shape().dims2()?;
        let name = self.name();
        let out = match (g, c) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(clip_accumulate_cpu(
                contiguous_cpu::<f32>(g, gl, name)?,
                contiguous_cpu::<f32>(c, cl, name)?,
                b,
                n,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(clip_accumulate_cpu(
                contiguous_cpu::<f64>(g, gl, name)?,
                contiguous_cpu::<f64>(c, cl, name)?,
                b,
                n,
            )),
            _ => return Err(candle_core::Error::UnsupportedDTypeForOp(g.dtype(), name)),
        };
        Ok((out, Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        c: &candle_core::CudaStorage,
        cl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (b, n) = gl.shape().dims2()?;
        Ok((super::cuda::clip_accumulate(g, gl, c, cl, b, n)?, Shape::from(n)))
    }

    #[cfg(all(feature = "metal", target_os = "macos"))]
    fn metal_fwd(
        &self,
        g: &candle_core::MetalStorage,
        gl: &Layout,
        c: &candle_core::MetalStorage,
        cl: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        let (b, n) = gl.shape().dims2()?;
        Ok((super::metal::clip_accumulate(g, gl, c, cl, b, n)?, Shape::from(n)))
    }
}

/// Squared norms of the `b` rows of `x` (`n` elements each), in `f64`.
fn squared_norms_cpu<T: Element>(x: &[T], b: usize, n: usize) -> Vec<T> {
    let blocks = n.div_ceil(NORM_BLOCK);
    let mut partial = vec![0.0f64; b * blocks];
    for_each_chunk(&mut partial, 1, b * n, |k, sum| {
        let (row, block) = (k / blocks, k % blocks);
        let start = row * n + block * NORM_BLOCK;
        let end = row * n + n.min((block + 1) * NORM_BLOCK);
        sum[0] = block_sum_of_squares(&x[start..end]);
    });
    (0..b).map(|i| T::from_f64(partial[i * blocks..(i + 1) * blocks].iter().sum())).collect()
}

/// `sum x^2` over a block in eight `f64` lanes (independent, so the loop
/// vectorizes), combined pairwise. The square of an `f32` is exact in `f64`.
fn block_sum_of_squares<T: Element>(x: &[T]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (acc, v) in lanes.iter_mut().zip(c) {
            let v = v.to_f64();
            *acc += v * v;
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|v| v.to_f64() * v.to_f64()).sum();
    let [a, b, c, d, e, f, g, h] = lanes;
    (((a + b) + (c + d)) + ((e + f) + (g + h))) + tail
}

/// `sum_i c_i x[i, ..]` over the `b` rows of `x` (`n` elements each), in
/// `f64`. Rows are taken four at a time (one load and store of each
/// accumulator per four elements read) and in order, whatever the threads.
fn clip_accumulate_cpu<T: Element>(x: &[T], c: &[T], b: usize, n: usize) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); n];
    for_each_chunk(&mut out, SUM_TILE, b * n, |tile, out| {
        let (start, w) = (tile * SUM_TILE, out.len());
        let row = |i: usize| &x[i * n + start..i * n + start + w];
        let mut acc = [0.0f64; SUM_TILE];
        let acc = &mut acc[..w];
        let mut i = 0;
        while i + 4 <= b {
            let (c0, c1, c2, c3) = (c[i].to_f64(), c[i + 1].to_f64(), c[i + 2].to_f64(), c[i + 3].to_f64());
            let (r0, r1, r2, r3) = (row(i), row(i + 1), row(i + 2), row(i + 3));
            for (j, a) in acc.iter_mut().enumerate() {
                *a += (c0 * r0[j].to_f64() + c1 * r1[j].to_f64()) + (c2 * r2[j].to_f64() + c3 * r3[j].to_f64());
            }
            i += 4;
        }
        for (k, ci) in c.iter().enumerate().skip(i) {
            let ci = ci.to_f64();
            for (a, v) in acc.iter_mut().zip(row(k)) {
                *a += ci * v.to_f64();
            }
        }
        for (o, a) in out.iter_mut().zip(acc.iter()) {
            *o = T::from_f64(*a);
        }
    });
    out
}
