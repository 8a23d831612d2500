//! [`Collective`]: the few operations data-parallel DP-SGD needs from a
//! communication engine, and [`SingleProcess`], the world of one.

use crate::error::Result;

/// The collective operations of one process (a *rank*) among `world_size`
/// that train together: what [`crate::DpOptimizer::distribute`]
/// needs from an engine. Implemented over MPI (`Mpi`, feature `mpi`) and
/// for one process ([`SingleProcess`]); implement it for another engine
/// the same way.
///
/// Every rank must make the same calls in the same order (the optimizer
/// does). A call that fails on one rank may leave the others waiting: an
/// engine should abort the whole job on a communication failure, as MPI's
/// default error handler does.
pub trait Collective: std::fmt::Debug + Send {
    /// This process's rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of processes.
    fn world_size(&self) -> usize;

    /// Replaces `buf`, on every rank, by the elementwise sum of every rank's
    /// `buf` (all ranks pass the same length).
    ///
    /// **Every rank must receive the same bits**: the ranks apply the result
    /// to their copies of the model, which must stay identical. Floating-point
    /// sums depend on their order, and an all-reduce that sums in a different
    /// order on different ranks would let the copies drift apart. Where the
    /// engine does not promise identical results, have each part summed by
    /// one rank and sent to all (a reduce-scatter, then an all-gather).
    ///
    /// # Errors
    /// The engine's.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;

    /// As [`Collective::all_reduce_sum_f64`], in `f32`.
    ///
    /// # Errors
    /// The engine's.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;

    /// Replaces `buf` on every rank by rank `root`'s `buf` (all ranks pass
    /// the same length).
    ///
    /// # Errors
    /// The engine's; [`crate::Error::InvalidConfig`] for a `root` outside
    /// `0..world_size()`.
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()>;
}

/// A boxed engine is an engine (for code that picks one at run time).
impl<C: Collective + ?Sized> Collective for Box<C> {
    fn rank(&self) -> usize {
        (**self).rank()
    }

    fn world_size(&self) -> usize {
        (**self).world_size()
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        (**self).all_reduce_sum_f64(buf)
    }

    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        (**self).all_reduce_sum_f32(buf)
    }

    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        (**self).broadcast(buf, root)
    }
}

/// The world of one process: rank 0 of 1, every collective the identity.
/// A distributed run at world size 1 behaves exactly as a plain one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn all_reduce_sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }

    fn broadcast(&self, _: &mut [u8], root: usize) -> Result<()> {
        check_root(root, 1)
    }
}

/// Refuses a broadcast root outside the world.
pub(crate) fn check_root(root: usize, world_size: usize) -> Result<()> {
    crate::error::ensure("broadcast root", root as f64, "a rank, in 0..world_size", root < world_size).map(|_| ())
}
