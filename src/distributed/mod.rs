//! Data-parallel DP-SGD over several processes (ranks), on a real
//! communication engine behind the small [`Collective`] trait: MPI (`Mpi`,
//! feature `mpi`), NCCL on CUDA devices (`Nccl`, feature `nccl`), or
//! [`SingleProcess`].
//!
//! # One step across `W` ranks
//! [`crate::DpOptimizer::distribute`] makes every rank's optimizer
//! one part of a single DP-SGD run:
//! * **Sampling.** Example `i` of the global dataset belongs to the shard of
//!   exactly one rank ([`shard`]: `[r N / W, (r + 1) N / W)`), and each rank
//!   includes each of its examples with probability `q` by the counter-based
//!   Poisson sampler ([`crate::PoissonSampler`]): inclusion is a function of
//!   the sampler's key, the step and `i`, so the global batch is the Poisson
//!   batch the accountant assumes, and the same for every world size. Ranks
//!   never load each other's examples, but they are one trusted curator:
//!   every rank holds the sampler key and the noise keys (it could remove
//!   the noise from an update, as rank 0 could in any scheme), so all
//!   ranks must be as trusted as the training data.
//! * **Clipping** is local; each rank sums its clipped gradients.
//! * **Noise, once per coordinate.** The `n` coordinates of all trained
//!   variables, in the optimizer's order, form one noise vector per step,
//!   made by the counter-based generator ([`crate::kernels::gaussian`]) from
//!   keys every rank knows. Rank `r` adds to its clipped sum only the values
//!   of its slice `[r n / W, (r + 1) n / W)` ([`shard`] again). One flat
//!   all-reduce per step then sums clipped gradients and noise together, so
//!   every coordinate has received exactly one draw of `N(0, (sigma C)^2)`
//!   in total: the values a one-process run draws, in the same places. The
//!   result equals a one-process run up to the order of the summation.
//! * The sum is divided by the expected **global** batch size `q N`, and
//!   every rank applies the same bits to its copy of the model
//!   ([`Collective::all_reduce_sum_f64`] requires it).
//!
//! Why slices: with the noise drawn on rank 0 only (as Opacus does), rank 0
//! makes all `n` values while the others wait; with independent shares of
//! standard deviation `sigma C / sqrt(W)` on every rank, every rank makes `n`
//! values (`W n` in all), the total is right only if `W` generators were
//! seeded independently (two equal seeds give a share twice, and the wrong
//! distribution), and the run cannot be compared with a one-process run. A
//! slice each splits the work `W` ways and draws exactly the one-process
//! noise.
//!
//! # Agreement
//! When the optimizer is distributed, rank 0's sampler key and noise generator
//! state are broadcast (so the keys are rank 0's, from its operating
//! system unless seeded: never a fixed default), and every rank checks that
//! its settings, variables and ledger hash to rank 0's: a rank built
//! otherwise fails the build on every rank. Each step's all-reduce carries a
//! failure flag: a rank whose step fails (an error, a non-finite gradient)
//! makes every rank refuse the step, and no rank changes anything. The
//! budget is checked on every rank from the same ledger, so all refuse
//! together.
//!
//! Only rank 0 writes files (releases, checkpoints); every rank keeps the
//! same ledger.

mod collective;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;

pub use collective::{Collective, SingleProcess};
#[cfg(feature = "mpi")]
pub use mpi::Mpi;
#[cfg(feature = "nccl")]
pub use nccl::Nccl;

use std::ops::Range;

/// Part `rank` of `len` items split `world_size` ways: `[rank len / W,
/// (rank + 1) len / W)`, rounded down. The parts cover `0..len` exactly once, in
/// order; their sizes differ by at most one. The dataset's shards and the
/// noise vector's slices are both cut this way.
///
/// `rank < world_size` is the caller's to ensure (the optimizer checks it);
/// a larger `rank` gives an empty range at `len`.
pub fn shard(len: usize, rank: usize, world_size: usize) -> Range<usize> {
    let w = world_size.max(1) as u128;
    let at = |r: usize| ((r.min(world_size) as u128 * len as u128) / w) as usize;
    at(rank)..at(rank.saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parts of every split tile `0..len`: no gap, no overlap, in
    /// order, sizes within one of each other.
    #[test]
    fn shards_tile_the_range_exactly_once() {
        for len in [0, 1, 2, 7, 64, 1000, 60_001] {
            for world in 1..=9 {
                let parts: Vec<_> = (0..world).map(|r| shard(len, r, world)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[world - 1].end, len);
                for pair in parts.windows(2) {
                    assert_eq!(pair[0].end, pair[1].start, "len {len} world {world}");
                }
                let sizes: Vec<_> = parts.iter().map(|p| p.len()).collect();
                let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(hi - lo <= 1, "len {len} world {world}: {sizes:?}");
            }
        }
        // No overflow for the largest lengths.
        assert_eq!(shard(usize::MAX, 1, 2), usize::MAX / 2..usize::MAX);
    }
}
