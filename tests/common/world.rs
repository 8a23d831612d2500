//! An in-process world of `W` ranks on threads, for tests of the
//! distributed optimizer without MPI: each collective waits for every rank
//! and sums in rank order, so every rank gets the same bits.

use std::sync::{Arc, Barrier, Mutex};

use candle_dp::distributed::Collective;

#[derive(Debug)]
struct Hub {
    barrier: Barrier,
    f64s: Mutex<Vec<Vec<f64>>>,
    f32s: Mutex<Vec<Vec<f32>>>,
    bytes: Mutex<Vec<Vec<u8>>>,
}

/// One rank of a [`ThreadWorld`].
#[derive(Debug, Clone)]
pub struct ThreadRank {
    rank: usize,
    world_size: usize,
    hub: Arc<Hub>,
}

/// The ranks of a world of `world_size` threads.
pub fn thread_world(world_size: usize) -> Vec<ThreadRank> {
    let hub = Arc::new(Hub {
        barrier: Barrier::new(world_size),
        f64s: Mutex::new(vec![Vec::new(); world_size]),
        f32s: Mutex::new(vec![Vec::new(); world_size]),
        bytes: Mutex::new(vec![Vec::new(); world_size]),
    });
    (0..world_size).map(|rank| ThreadRank { rank, world_size, hub: hub.clone() }).collect()
}

impl ThreadRank {
    /// Posts `buf`, waits for every rank, combines, waits again (so no rank
    /// posts the next call's buffer before all have read this one's).
    fn exchange<T: Clone>(&self, slots: &Mutex<Vec<Vec<T>>>, buf: &mut [T], combine: impl Fn(&[Vec<T>], &mut [T])) {
        slots.lock().unwrap()[self.rank] = buf.to_vec();
        self.hub.barrier.wait();
        combine(&slots.lock().unwrap(), buf);
        self.hub.barrier.wait();
    }
}

fn sum_in_rank_order<T: Copy + std::ops::Add<Output = T>>(all: &[Vec<T>], out: &mut [T]) {
    for (i, v) in out.iter_mut().enumerate() {
        let mut acc = all[0][i];
        for r in &all[1..] {
            acc = acc + r[i];
        }
        *v = acc;
    }
}

impl Collective for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> candle_dp::Result<()> {
        self.exchange(&self.hub.f64s, buf, sum_in_rank_order);
        Ok(())
    }

    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> candle_dp::Result<()> {
        self.exchange(&self.hub.f32s, buf, sum_in_rank_order);
        Ok(())
    }

    fn broadcast(&self, buf: &mut [u8], root: usize) -> candle_dp::Result<()> {
        self.exchange(&self.hub.bytes, buf, |all, out| out.copy_from_slice(&all[root]));
        Ok(())
    }
}

/// Runs `f(rank)` on every rank of a world of `world_size` threads and
/// returns the results in rank order.
pub fn on_ranks<T: Send>(world_size: usize, f: impl Fn(ThreadRank) -> T + Sync) -> Vec<T> {
    let ranks = thread_world(world_size);
    std::thread::scope(|s| {
        let handles: Vec<_> = ranks.into_iter().map(|r| s.spawn(|| f(r))).collect();
        handles.into_iter().map(|h| h.join().expect("a rank panicked")).collect()
    })
}
