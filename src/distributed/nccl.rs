//! [`Nccl`]: [`Collective`] over NVIDIA's NCCL on Candle's CUDA device
//! (feature `nccl`).

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaStream, DeviceRepr};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda_backend::CudaDevice;

use super::collective::{check_root, Collective};
use crate::error::{Error, Result};

/// One GPU's rank among the GPUs of a job, through NCCL on the CUDA stream
/// of Candle's device (so collectives are ordered with the device's work).
///
/// Host buffers are copied to the device, reduced there, and copied back.
/// Sums are reduce-scattered, then all-gathered: each block is summed by
/// one rank and every rank gets that rank's bits (an all-reduce's summation
/// order is not promised to be the same on every rank).
///
/// A job of several processes needs one NCCL id, made by rank 0
/// ([`Nccl::unique_id`]) and sent to the others out of band (over MPI,
/// say: `Mpi`'s broadcast); [`Nccl::single`] is the world of one GPU.
///
/// Limitation: a CUDA error on one rank before it enters a collective (out
/// of device memory for the copy of a buffer, say) returns that error on
/// that rank while the others wait in NCCL for it; stop the job then (the
/// launcher does when a rank exits with the error). The optimizer's own
/// failures (a NaN, a closure's error) are sent through the collective and
/// stop every rank.
pub struct Nccl {
    comm: Comm,
    stream: Arc<CudaStream>,
    // NCCL communicators are not thread-safe: one thread at a time.
    _not_sync: PhantomData<Cell<()>>,
}

// SAFETY: a NCCL communicator (a handle into the NCCL library) may be used
// from any thread, one call at a time (NCCL's thread-safety rules); `Nccl`
// is not `Sync`, so no two threads can call it at once, and the CUDA stream
// it holds is `Send` and `Sync` itself.
unsafe impl Send for Nccl {}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl").field("rank", &self.comm.rank()).field("world_size", &self.comm.world_size()).finish()
    }
}

impl Nccl {
    /// A fresh NCCL id, on rank 0, to send to every rank of the job.
    ///
    /// # Errors
    /// [`Error::Collective`] from NCCL.
    pub fn unique_id() -> Result<[u8; 128]> {
        let id = Id::new().map_err(nccl)?;
        Ok(id.internal().map(|c| c as u8))
    }

    /// Rank `rank` of `world_size` GPUs that share `id` ([`Nccl::unique_id`]
    /// of rank 0), on `device`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a rank outside `0..world_size`;
    /// [`Error::Collective`] from NCCL.
    pub fn from_rank(device: &CudaDevice, rank: usize, world_size: usize, id: [u8; 128]) -> Result<Self> {
        crate::error::ensure("rank", rank as f64, "an integer in [0, world_size)", rank < world_size)?;
        crate::error::ensure("world_size", world_size as f64, "in [1, 2^31)", world_size < (1 << 31))?;
        let stream = device.cuda_stream();
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(stream.clone(), rank, world_size, id).map_err(nccl)?;
        Ok(Self { comm, stream, _not_sync: PhantomData })
    }

    /// The world of one GPU, `device`'s: rank 0 of 1.
    ///
    /// # Errors
    /// As [`Nccl::from_rank`].
    pub fn single(device: &CudaDevice) -> Result<Self> {
        Self::from_rank(device, 0, 1, Self::unique_id()?)
    }

    /// Sums `buf` over the ranks: padded with zeros to `W` equal blocks,
    /// block `r` summed by rank `r` (a reduce-scatter), then gathered by
    /// all, so every rank holds the same bits.
    fn sum<T: NcclType + DeviceRepr + Default + Copy>(&self, buf: &mut [T]) -> Result<()> {
        let w = self.comm.world_size();
        if buf.is_empty() || w == 1 {
            return Ok(());
        }
        let block = buf.len().div_ceil(w);
        let mut padded = vec![T::default(); block * w];
        padded[..buf.len()].copy_from_slice(buf);
        let mut all = self.stream.clone_htod(&padded).map_err(driver)?;
        let mut mine = self.stream.clone_htod(&padded[..block]).map_err(driver)?;
        self.comm.reduce_scatter(&all, &mut mine, &ReduceOp::Sum).map_err(nccl)?;
        self.comm.all_gather(&mine, &mut all).map_err(nccl)?;
        self.stream.memcpy_dtoh(&all, &mut padded).map_err(driver)?;
        self.stream.synchronize().map_err(driver)?;
        buf.copy_from_slice(&padded[..buf.len()]);
        Ok(())
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.sum(buf)
    }

    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.sum(buf)
    }

    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        check_root(root, self.world_size())?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut d = self.stream.clone_htod(buf).map_err(driver)?;
        self.comm.broadcast_in_place(&mut d, root as i32).map_err(nccl)?;
        self.stream.memcpy_dtoh(&d, buf).map_err(driver)?;
        self.stream.synchronize().map_err(driver)
    }
}

fn nccl(e: impl std::fmt::Debug) -> Error {
    Error::Collective { engine: "NCCL", reason: format!("{e:?}") }
}

fn driver(e: impl std::fmt::Debug) -> Error {
    Error::Collective { engine: "CUDA", reason: format!("{e:?}") }
}
