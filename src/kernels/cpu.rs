//! The CPU side shared by the kernels: the element types they accept, their
//! contiguous elements, and a scoped split of independent work over the
//! machine's cores.

use std::sync::OnceLock;

use candle_core::{CpuStorage, Layout};

/// Below this many elements of work a kernel stays on the calling thread:
/// spawning costs more than it saves.
const PARALLEL_MIN: usize = 1 << 18;

/// A floating-point element the kernels read and write, with the `f64` the
/// CPU path accumulates in.
pub(crate) trait Element: Copy + Send + Sync + 'static {
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

impl Element for f32 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Element for f64 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// The number of cores this process may use (1 if unknown).
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Calls `f(k, chunk)` for each `chunk`-sized piece `k` of `out` (the last
/// may be shorter), on all cores when `work` (elements read) is large enough.
/// Each piece is written by exactly one call, so results do not depend on
/// the number of threads.
pub(crate) fn for_each_chunk<T: Send>(out: &mut [T], chunk: usize, work: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    for_each_chunk_on(out, chunk, threads_for(work), f);
}

/// [`for_each_chunk`] on at most `threads` threads (1: the calling thread).
pub(crate) fn for_each_chunk_on<T: Send>(
    out: &mut [T],
    chunk: usize,
    threads: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let chunk = chunk.max(1);
    let pieces = out.len().div_ceil(chunk);
    let threads = threads.min(pieces);
    if threads <= 1 {
        out.chunks_mut(chunk).enumerate().for_each(|(k, c)| f(k, c));
        return;
    }
    let per_thread = pieces.div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        for (t, span) in out.chunks_mut(per_thread * chunk).enumerate() {
            scope.spawn(move || {
                for (k, c) in span.chunks_mut(chunk).enumerate() {
                    f(t * per_thread + k, c);
                }
            });
        }
    });
}

/// The number of threads a kernel whose work is `work` elements read uses.
pub(crate) fn threads_for(work: usize) -> usize {
    if work >= PARALLEL_MIN {
        cores()
    } else {
        1
    }
}

/// The contiguous elements of a CPU tensor, or an error naming `op`.
pub(crate) fn contiguous_cpu<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &'static str,
) -> candle_core::Result<&'a [T]> {
    let (start, end) = l.contiguous_offsets().ok_or(candle_core::Error::RequiresContiguous { op })?;
    Ok(&s.as_slice::<T>()?[start..end])
}
