//! CUDA glue: the PTX that `build.rs` compiles from `clip.cu` and
//! `noise.cu` (for `compute_80`, JIT-compiled by the driver on newer GPUs),
//! loaded once per device and launched through cudarc.

use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result};

use super::noise::{AddNoise, Keystream};

const CLIP_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/clip.ptx"));
const NOISE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/noise.ptx"));
const CLIP_MODULE: &str = "candle_dp_clip";
const NOISE_MODULE: &str = "candle_dp_noise";

/// Threads per block of the norm reduction (`THREADS` in `clip.cu`).
const REDUCE_THREADS: u32 = 512;
/// Threads per block of the element-wise kernels.
const THREADS: u32 = 256;

/// Resident blocks of `threads` threads that fill the GPU: 2048 threads per
/// multiprocessor on every GPU since compute capability 8.0.
fn filling_blocks(dev: &CudaDevice, threads: u32) -> Result<u64> {
    let sms =
        dev.cuda_stream().context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).w()?;
    Ok(u64::from(sms.max(1) as u32) * u64::from(2048 / threads))
}

fn grid(blocks: u64, threads: u32, op: &'static str) -> Result<LaunchConfig> {
    let blocks = u32::try_from(blocks.max(1))
        .ok()
        .filter(|b| *b <= i32::MAX as u32)
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {blocks} blocks exceed the CUDA grid limit")))?;
    Ok(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 })
}

/// The contiguous elements of a layout.
fn view<'a, T>(s: &'a CudaSlice<T>, l: &Layout, op: &'static str) -> Result<CudaView<'a, T>> {
    let (start, end) = l.contiguous_offsets().ok_or(candle_core::Error::RequiresContiguous { op })?;
    Ok(s.slice(start..end))
}

/// `len` zeroed elements; one when `len` is 0 (a zero-byte device allocation
/// is an error for the driver), the tensor's shape says how many are used.
fn zeros<T: DeviceRepr + ValidAsZeroBits>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    dev.alloc_zeros::<T>(len.max(1))
}

fn dtype_error(s: &CudaStorage, op: &'static str) -> candle_core::Error {
    use candle_core::backend::BackendStorage;
    candle_core::Error::UnsupportedDTypeForOp(s.dtype(), op)
}

pub(crate) fn squared_norms(s: &CudaStorage, l: &Layout, b: usize, n: usize) -> Result<CudaStorage> {
    const OP: &str = "candle-dp-squared-norms";
    let dev = &s.device;
    let slice = match &s.slice {
        CudaStorageSlice::F32(x) => CudaStorageSlice::F32(norms(dev, &view(x, l, OP)?, b, n, "f32")?),
        CudaStorageSlice::F64(x) => CudaStorageSlice::F64(norms(dev, &view(x, l, OP)?, b, n, "f64")?),
        _ => return Err(dtype_error(s, OP)),
    };
    Ok(CudaStorage { slice, device: dev.clone() })
}

/// Two launches: `parts` blocks per row reduce into `f64` partials (enough
/// blocks to fill the GPU even for one row), then one thread per row sums
/// its parts in order.
fn norms<T: DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    b: usize,
    n: usize,
    suffix: &str,
) -> Result<CudaSlice<T>> {
    let out = zeros::<T>(dev, b)?;
    if b == 0 || n == 0 {
        return Ok(out);
    }
    // Each block reads at least 16 elements per thread; parts are whole 16-byte vectors.
    let max_parts = (n as u64).div_ceil(u64::from(REDUCE_THREADS) * 16).max(1);
    let parts = filling_blocks(dev, REDUCE_THREADS)?.div_ceil(b as u64).clamp(1, max_parts);
    let len = (n as u64).div_ceil(parts).div_ceil(4) * 4;
    let parts_u32 = parts as u32;
    let partial = dev.alloc_zeros::<f64>(b * parts as usize)?;
    let (n_u64, rows) = (n as u64, b as u64);

    let f = dev.get_or_load_custom_func(&format!("squared_norms_partial_{suffix}"), CLIP_MODULE, CLIP_PTX)?;
    let mut builder = f.builder();
    builder.arg(x).arg(&n_u64).arg(&parts_u32).arg(&len).arg(&partial);
    // SAFETY: the kernel reads `b * n` elements of `x` and writes `b * parts` partials, as allocated.
    unsafe { builder.launch(grid(rows * parts, REDUCE_THREADS, "squared_norms")?) }.w()?;

    let f = dev.get_or_load_custom_func(&format!("squared_norms_finish_{suffix}"), CLIP_MODULE, CLIP_PTX)?;
    let mut builder = f.builder();
    builder.arg(&partial).arg(&parts_u32).arg(&rows).arg(&out);
    // SAFETY: reads the partials just written (same stream), writes `b` outputs.
    unsafe { builder.launch(grid(rows.div_ceil(u64::from(THREADS)), THREADS, "squared_norms")?) }.w()?;
    Ok(out)
}

pub(crate) fn clip_accumulate(
    g: &CudaStorage,
    gl: &Layout,
    c: &CudaStorage,
    cl: &Layout,
    b: usize,
    n: usize,
) -> Result<CudaStorage> {
    const OP: &str = "candle-dp-clip-accumulate";
    let dev = &g.device;
    let slice = match (&g.slice, &c.slice) {
        (CudaStorageSlice::F32(x), CudaStorageSlice::F32(f)) => {
            CudaStorageSlice::F32(accumulate(dev, &view(x, gl, OP)?, &view(f, cl, OP)?, b, n, 4, "f32")?)
        }
        (CudaStorageSlice::F64(x), CudaStorageSlice::F64(f)) => {
            CudaStorageSlice::F64(accumulate(dev, &view(x, gl, OP)?, &view(f, cl, OP)?, b, n, 2, "f64")?)
        }
        _ => return Err(dtype_error(g, OP)),
    };
    Ok(CudaStorage { slice, device: dev.clone() })
}

/// Threads own `lanes` columns each (one 16-byte load per row); when that
/// leaves the GPU idle (small `n`), the rows are split into slices whose
/// `f64` partials a second launch sums in slice order.
fn accumulate<T: DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    g: &CudaView<T>,
    c: &CudaView<T>,
    b: usize,
    n: usize,
    lanes: u64,
    suffix: &str,
) -> Result<CudaSlice<T>> {
    let out = zeros::<T>(dev, n)?;
    if b == 0 || n == 0 {
        return Ok(out);
    }
    let (rows, n_u64) = (b as u64, n as u64);
    // Sized for `lanes` columns per thread when `n` allows it (fresh buffers
    // are 256-byte aligned); the kernel strides, so a misaligned view that
    // falls back to one column per thread is still covered.
    let groups = if n_u64 % lanes == 0 { n_u64 / lanes } else { n_u64 };
    let x_blocks = groups.div_ceil(u64::from(THREADS));
    // At least 64 rows per slice: fewer would spend more on the partials than on the data.
    let slices = (filling_blocks(dev, THREADS)?.div_ceil(x_blocks)).clamp(1, rows.div_ceil(64).max(1)).min(65_535);
    let rows_per_slice = rows.div_ceil(slices);
    let slices = rows.div_ceil(rows_per_slice);
    let partial = dev.alloc_zeros::<f64>(if slices > 1 { n * slices as usize } else { 1 })?;

    let f = dev.get_or_load_custom_func(&format!("clip_accumulate_slice_{suffix}"), CLIP_MODULE, CLIP_PTX)?;
    let mut builder = f.builder();
    builder.arg(g).arg(c).arg(&rows).arg(&n_u64).arg(&rows_per_slice).arg(&out).arg(&partial);
    let mut cfg = grid(x_blocks, THREADS, "clip_accumulate")?;
    cfg.grid_dim.1 = slices as u32;
    // SAFETY: reads `b * n` gradients and `b` factors; writes `n` outputs (one
    // slice) or `slices * n` partials, as allocated.
    unsafe { builder.launch(cfg) }.w()?;
    if slices > 1 {
        let f = dev.get_or_load_custom_func(&format!("clip_accumulate_finish_{suffix}"), CLIP_MODULE, CLIP_PTX)?;
        let mut builder = f.builder();
        let slices_u32 = slices as u32;
        builder.arg(&partial).arg(&slices_u32).arg(&n_u64).arg(&out);
        // SAFETY: reads the partials just written (same stream), writes `n` outputs.
        unsafe { builder.launch(grid(n_u64.div_ceil(u64::from(THREADS)), THREADS, "clip_accumulate")?) }.w()?;
    }
    Ok(out)
}

pub(crate) fn add_noise(op: &AddNoise, s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    const OP: &str = "candle-dp-add-gaussian-noise";
    let dev = &s.device;
    let slice = match &s.slice {
        CudaStorageSlice::F32(x) => CudaStorageSlice::F32(noise(dev, op, &view(x, l, OP)?, "f32")?),
        CudaStorageSlice::F64(x) => CudaStorageSlice::F64(noise(dev, op, &view(x, l, OP)?, "f64")?),
        _ => return Err(dtype_error(s, OP)),
    };
    Ok(CudaStorage { slice, device: dev.clone() })
}

fn noise<T: DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    op: &AddNoise,
    x: &CudaView<T>,
    suffix: &str,
) -> Result<CudaSlice<T>> {
    let n = x.len();
    if n == 0 {
        return zeros(dev, 0);
    }
    // SAFETY: the kernel writes every one of the `n` elements before anything reads them.
    let out = unsafe { dev.alloc::<T>(n)? };
    let n_u64 = n as u64;
    // Whole groups of 16 blocks (64 values); the kernel skips values past `n`.
    let blocks = n_u64.div_ceil(super::gaussian::GROUP_VALUES as u64) * super::gaussian::GROUP_BLOCKS;
    let key = op.key.words();
    let f = dev.get_or_load_custom_func(&format!("add_noise_{suffix}"), NOISE_MODULE, NOISE_PTX)?;
    let mut builder = f.builder();
    builder.arg(x).arg(&out).arg(&n_u64);
    for k in &key {
        builder.arg(k);
    }
    builder.arg(&op.std).arg(&op.scale);
    let cfg = grid(blocks.div_ceil(u64::from(THREADS)).min(filling_blocks(dev, THREADS)? * 8), THREADS, "add_noise")?;
    // SAFETY: reads `n` inputs, writes `n` outputs (grid-stride over the blocks).
    unsafe { builder.launch(cfg) }.w()?;
    Ok(out)
}

pub(crate) fn keystream(op: &Keystream, s: &CudaStorage, blocks: usize) -> Result<CudaStorage> {
    let dev = &s.device;
    let out = zeros::<u32>(dev, 16 * blocks)?;
    if blocks > 0 {
        let key = op.key.words();
        let blocks_u64 = blocks as u64;
        let f = dev.get_or_load_custom_func("chacha20_keystream", NOISE_MODULE, NOISE_PTX)?;
        let mut builder = f.builder();
        builder.arg(&out).arg(&op.first_block).arg(&blocks_u64);
        for k in &key {
            builder.arg(k);
        }
        let cfg = grid(blocks_u64.div_ceil(u64::from(THREADS)).min(65_535), THREADS, "keystream")?;
        // SAFETY: writes `16 * blocks` words (grid-stride).
        unsafe { builder.launch(cfg) }.w()?;
    }
    Ok(CudaStorage { slice: CudaStorageSlice::U32(out), device: dev.clone() })
}
