//! Metal glue: `clip.metal` and `noise.metal`, compiled at run time by the
//! device, `f32` only (Apple GPUs have no `f64`; the kernels bound their
//! rounding by short sequential sums and trees instead, see `clip.metal`).
//!
//! NOT compiled or run by this project's CI: `candle-core/metal` builds on
//! macOS only, and no macOS machine is available. Written against
//! candle-core 0.11.1 / candle-metal-kernels 0.11.1 and reviewed against the
//! CUDA glue; treat it as untested until the kernel tests pass on a Mac.

use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::metal_backend::DeviceId;
use candle_core::{DType, Layout, MetalDevice, MetalError, MetalStorage, Result};
use candle_metal_kernels::metal::{Buffer, ComputePipeline, Library};

use super::noise::{AddNoise, Keystream};

const CLIP_SRC: &str = include_str!("clip.metal");
const NOISE_SRC: &str = include_str!("noise.metal");
/// Threads per threadgroup of the norm reduction.
const THREADS: usize = 256;

/// Libraries compiled so far: (device, source, library).
type Libraries = std::sync::Mutex<Vec<(DeviceId, &'static str, Library)>>;

/// The kernel `name` from `source`, compiled once per device and process.
fn pipeline(dev: &MetalDevice, source: &'static str, name: &str) -> Result<ComputePipeline> {
    static LIBRARIES: OnceLock<Libraries> = OnceLock::new();
    let libraries = LIBRARIES.get_or_init(Default::default);
    let mut libraries = libraries.lock().unwrap_or_else(|p| p.into_inner());
    let found = libraries.iter().find(|(d, s, _)| *d == dev.id() && std::ptr::eq(*s, source));
    let library = match found {
        Some((_, _, l)) => l.clone(),
        None => {
            let l = dev.device().new_library_with_source(source, None).map_err(MetalError::from)?;
            libraries.push((dev.id(), source, l.clone()));
            l
        }
    };
    let function = library.get_function(name, None).map_err(MetalError::from)?;
    Ok(dev.device().new_compute_pipeline_state_with_function(&function).map_err(MetalError::from)?)
}

/// A one-dimensional grid of `groups` threadgroups of `threads` threads.
/// (candle-metal-kernels returns its `MTLSize` but does not re-export the
/// type: take one and set its fields.)
fn dispatch(encoder: &candle_metal_kernels::metal::ComputeCommandEncoder, groups: usize, threads: usize) {
    let mut grid = candle_metal_kernels::utils::get_block_dims(1, 1, 1);
    grid.width = groups.max(1);
    grid.height = 1;
    grid.depth = 1;
    let mut group = grid;
    group.width = threads.max(1);
    encoder.dispatch_thread_groups(grid, group);
}

fn f32_only(s: &MetalStorage, op: &'static str) -> Result<()> {
    match s.dtype() {
        DType::F32 => Ok(()),
        d => Err(candle_core::Error::UnsupportedDTypeForOp(d, op)),
    }
}

fn offset(l: &Layout, op: &'static str) -> Result<usize> {
    let (start, _) = l.contiguous_offsets().ok_or(candle_core::Error::RequiresContiguous { op })?;
    Ok(start * 4)
}

fn zeros(dev: &MetalDevice, n: usize) -> Result<Arc<Buffer>> {
    dev.allocate_zeros(n.max(1) * 4)
}

pub(crate) fn squared_norms(s: &MetalStorage, l: &Layout, b: usize, n: usize) -> Result<MetalStorage> {
    const OP: &str = "candle-dp-squared-norms";
    f32_only(s, OP)?;
    let dev = s.device();
    let out = zeros(dev, b)?;
    if b > 0 && n > 0 {
        // Parts of at most 16 elements per thread: the error bound of clip.metal.
        let parts = n.div_ceil(THREADS * 16).max(1);
        let len = (THREADS * 16) as u64;
        let partial = zeros(dev, b * parts)?;
        let encoder = dev.command_encoder()?;
        let enc = encoder.as_ref();
        enc.set_compute_pipeline_state(&pipeline(dev, CLIP_SRC, "squared_norms_partial_f32")?);
        enc.set_input_buffer(0, Some(s.buffer()), offset(l, OP)?);
        enc.set_bytes(1, &(n as u64));
        enc.set_bytes(2, &(parts as u32));
        enc.set_bytes(3, &len);
        enc.set_output_buffer(4, Some(&*partial), 0);
        dispatch(enc, b * parts, THREADS);
        enc.set_compute_pipeline_state(&pipeline(dev, CLIP_SRC, "squared_norms_finish_f32")?);
        // Read and summed in place: an output, so the encoder puts a barrier after stage 1.
        enc.set_output_buffer(0, Some(&*partial), 0);
        enc.set_bytes(1, &(parts as u32));
        enc.set_bytes(2, &(b as u64));
        enc.set_output_buffer(3, Some(&*out), 0);
        dispatch(enc, b.div_ceil(THREADS), THREADS);
    }
    Ok(MetalStorage::new(out, dev.clone(), b, DType::F32))
}

pub(crate) fn clip_accumulate(
    g: &MetalStorage,
    gl: &Layout,
    c: &MetalStorage,
    cl: &Layout,
    b: usize,
    n: usize,
) -> Result<MetalStorage> {
    const OP: &str = "candle-dp-clip-accumulate";
    f32_only(g, OP)?;
    f32_only(c, OP)?;
    let dev = g.device();
    let out = zeros(dev, n)?;
    if b > 0 && n > 0 {
        let encoder = dev.command_encoder()?;
        let enc = encoder.as_ref();
        enc.set_compute_pipeline_state(&pipeline(dev, CLIP_SRC, "clip_accumulate_f32")?);
        enc.set_input_buffer(0, Some(g.buffer()), offset(gl, OP)?);
        enc.set_input_buffer(1, Some(c.buffer()), offset(cl, OP)?);
        enc.set_bytes(2, &(b as u64));
        enc.set_bytes(3, &(n as u64));
        enc.set_output_buffer(4, Some(&*out), 0);
        dispatch(enc, n.div_ceil(THREADS), THREADS);
    }
    Ok(MetalStorage::new(out, dev.clone(), n, DType::F32))
}

pub(crate) fn add_noise(op: &AddNoise, s: &MetalStorage, l: &Layout) -> Result<MetalStorage> {
    const OP: &str = "candle-dp-add-gaussian-noise";
    f32_only(s, OP)?;
    let dev = s.device();
    let n = l.shape().elem_count();
    let out = zeros(dev, n)?;
    if n > 0 {
        // Whole groups of 16 blocks (64 values); threads past `n` return.
        let blocks = n.div_ceil(super::gaussian::GROUP_VALUES) * super::gaussian::GROUP_BLOCKS as usize;
        let encoder = dev.command_encoder()?;
        let enc = encoder.as_ref();
        enc.set_compute_pipeline_state(&pipeline(dev, NOISE_SRC, "add_noise_f32")?);
        enc.set_input_buffer(0, Some(s.buffer()), offset(l, OP)?);
        enc.set_output_buffer(1, Some(&*out), 0);
        enc.set_bytes(2, &(n as u64));
        enc.set_bytes(3, &op.key.words());
        enc.set_bytes(4, &(op.std as f32));
        enc.set_bytes(5, &(op.scale as f32));
        dispatch(enc, blocks.div_ceil(THREADS), THREADS);
    }
    Ok(MetalStorage::new(out, dev.clone(), n, DType::F32))
}

pub(crate) fn keystream(op: &Keystream, s: &MetalStorage, blocks: usize) -> Result<MetalStorage> {
    let dev = s.device();
    let out = zeros(dev, 16 * blocks)?;
    if blocks > 0 {
        let encoder = dev.command_encoder()?;
        let enc = encoder.as_ref();
        enc.set_compute_pipeline_state(&pipeline(dev, NOISE_SRC, "chacha20_keystream")?);
        enc.set_output_buffer(0, Some(&*out), 0);
        enc.set_bytes(1, &op.first_block);
        enc.set_bytes(2, &(blocks as u64));
        enc.set_bytes(3, &op.key.words());
        dispatch(enc, blocks.div_ceil(THREADS), THREADS);
    }
    Ok(MetalStorage::new(out, dev.clone(), 16 * blocks, DType::U32))
}
