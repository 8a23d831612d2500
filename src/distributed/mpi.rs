//! [`Mpi`]: [`Collective`] over the system's MPI (rsmpi; feature `mpi`).

use std::cell::Cell;
use std::marker::PhantomData;

use ::mpi::collective::SystemOperation;
use ::mpi::environment::Universe;
use ::mpi::traits::{Communicator, Root};
use ::mpi::Threading;

use super::collective::{check_root, Collective};
use crate::error::{Error, Result};

/// Elements per MPI call: MPI counts are C `int`s, so larger buffers go in pieces.
const PIECE: usize = 1 << 28;

/// The processes of an MPI job (`MPI_COMM_WORLD`), started by `mpirun`.
///
/// MPI is initialized by [`Mpi::init`] and finalized when this is dropped
/// (once per process: MPI cannot be initialized again). A communication
/// failure aborts the whole job (MPI's default error handler), so no rank
/// is left waiting for another that failed.
///
/// Sums are reduced to rank 0 and broadcast from it, rather than
/// all-reduced: the MPI standard does not require an all-reduce to give every
/// rank the same bits, and every rank must apply the same update. (A
/// reduce-scatter and an all-gather would too; with OpenMPI 4.1 on two
/// processes of this project's machines they were no faster: 5.7 ms
/// against 4.3-5.3 ms for 3.3 MB, `benches/data_parallel.rs`.)
pub struct Mpi {
    universe: Universe,
    rank: usize,
    world_size: usize,
    // MPI is initialized for serialized calls: the value may move to another
    // thread, but two threads must not call it at once.
    _not_sync: PhantomData<Cell<()>>,
}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mpi").field("rank", &self.rank).field("world_size", &self.world_size).finish()
    }
}

impl Mpi {
    /// Initializes MPI for calls from one thread at a time and joins the
    /// world of the job (one process, world size 1, outside `mpirun`).
    ///
    /// # Errors
    /// [`Error::Collective`] if MPI was initialized before in this process,
    /// or cannot serve calls from a thread other than the one that
    /// initialized it.
    pub fn init() -> Result<Self> {
        let Some((universe, threading)) = ::mpi::initialize_with_threading(Threading::Serialized) else {
            return Err(collective("MPI was initialized before in this process (Mpi::init can be called once)"));
        };
        if threading < Threading::Serialized {
            return Err(collective("this MPI cannot serve calls from more than one thread (MPI_THREAD_SERIALIZED)"));
        }
        let world = universe.world();
        let (rank, world_size) = (world.rank(), world.size());
        Ok(Self {
            universe,
            rank: usize::try_from(rank).map_err(|_| collective("negative MPI rank"))?,
            world_size: usize::try_from(world_size).map_err(|_| collective("negative MPI world size"))?,
            _not_sync: PhantomData,
        })
    }

    /// Sums `buf` over the ranks into rank 0's, then broadcasts it.
    fn sum<T: ::mpi::datatype::Equivalence + Copy + Default>(&self, buf: &mut [T]) {
        let world = self.universe.world();
        let root = world.process_at_rank(0);
        let mut send = vec![T::default(); buf.len().min(PIECE)];
        for piece in buf.chunks_mut(PIECE) {
            let send = &mut send[..piece.len()];
            send.copy_from_slice(piece);
            if self.rank == 0 {
                root.reduce_into_root(&*send, piece, SystemOperation::sum());
            } else {
                root.reduce_into(&*send, SystemOperation::sum());
            }
            root.broadcast_into(piece);
        }
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.sum(buf);
        Ok(())
    }

    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.sum(buf);
        Ok(())
    }

    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        check_root(root, self.world_size)?;
        let world = self.universe.world();
        // `root < world_size`, which came from an MPI int.
        let process = world.process_at_rank(root as ::mpi::Rank);
        for piece in buf.chunks_mut(PIECE) {
            process.broadcast_into(piece);
        }
        Ok(())
    }
}

fn collective(reason: &str) -> Error {
    Error::Collective { engine: "MPI", reason: reason.to_string() }
}
