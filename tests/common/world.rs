//! An in-process world of `W` ranks on threads, for tests of the
//! distributed optimizer without MPI: each collective waits for every rank
//! and sums in rank order, so every rank gets the same bits.
//!
//! A rank whose thread ends (it returned, or panicked) while others wait in
//! a collective, or before they call one, makes those collectives fail with
//! [`Error::Collective`]: a test whose ranks disagree on the calls they make
//! fails instead of hanging.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use candle_dp::distributed::Collective;
use candle_dp::Error;

#[derive(Debug, Default)]
struct Rendezvous {
    arrived: usize,
    /// Completed rendezvous so far.
    generation: u64,
    /// Ranks whose threads have ended.
    gone: usize,
}

#[derive(Debug)]
struct Hub {
    world_size: usize,
    rendezvous: Mutex<Rendezvous>,
    woken: Condvar,
    f64s: Mutex<Vec<Vec<f64>>>,
    f32s: Mutex<Vec<Vec<f32>>>,
    bytes: Mutex<Vec<Vec<u8>>>,
    /// Each rank's current call: its kind (with a broadcast's root) and
    /// length, so that ranks making different calls fail.
    calls: Mutex<Vec<Call>>,
}

/// What a rank is calling: the collective's kind and the buffer's length.
type Call = (&'static str, usize, usize);

/// Locks `m`, also after a rank panicked holding it (the data is then
/// still what the other ranks posted).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Hub {
    /// Waits until every rank has arrived; fails if a rank's thread ended.
    fn wait(&self) -> candle_dp::Result<()> {
        let mut state = lock(&self.rendezvous);
        let generation = state.generation;
        if state.gone == 0 {
            state.arrived += 1;
            if state.arrived == self.world_size {
                state.arrived = 0;
                state.generation += 1;
                self.woken.notify_all();
                return Ok(());
            }
        }
        while state.generation == generation && state.gone == 0 {
            state = self.woken.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        if state.generation != generation {
            return Ok(());
        }
        Err(Error::Collective {
            engine: "thread world",
            reason: format!("{} of {} ranks ended before this collective", state.gone, self.world_size),
        })
    }

    fn leave(&self) {
        lock(&self.rendezvous).gone += 1;
        self.woken.notify_all();
    }
}

/// One rank of a [`thread_world`].
#[derive(Debug, Clone)]
pub struct ThreadRank {
    rank: usize,
    hub: Arc<Hub>,
}

/// The ranks of a world of `world_size` threads.
pub fn thread_world(world_size: usize) -> Vec<ThreadRank> {
    let hub = Arc::new(Hub {
        world_size,
        rendezvous: Mutex::new(Rendezvous::default()),
        woken: Condvar::new(),
        f64s: Mutex::new(vec![Vec::new(); world_size]),
        f32s: Mutex::new(vec![Vec::new(); world_size]),
        bytes: Mutex::new(vec![Vec::new(); world_size]),
        calls: Mutex::new(vec![("", 0, 0); world_size]),
    });
    (0..world_size).map(|rank| ThreadRank { rank, hub: hub.clone() }).collect()
}

impl ThreadRank {
    /// Posts `buf`, waits for every rank, combines, waits again (so no rank
    /// posts the next call's buffer before all have read this one's). Ranks
    /// whose calls differ (kind, root, length) all fail.
    fn exchange<T: Clone>(
        &self,
        call: (&'static str, usize),
        slots: &Mutex<Vec<Vec<T>>>,
        buf: &mut [T],
        combine: impl Fn(&[Vec<T>], &mut [T]),
    ) -> candle_dp::Result<()> {
        let mine = (call.0, call.1, buf.len());
        lock(&self.hub.calls)[self.rank] = mine;
        lock(slots)[self.rank] = buf.to_vec();
        self.hub.wait()?;
        let agreed = lock(&self.hub.calls).iter().all(|c| *c == mine);
        if agreed {
            combine(&lock(slots), buf);
        }
        self.hub.wait()?;
        if agreed {
            Ok(())
        } else {
            let calls = lock(&self.hub.calls).clone();
            Err(Error::Collective {
                engine: "thread world",
                reason: format!("the ranks made different calls: {calls:?}"),
            })
        }
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
        self.hub.world_size
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> candle_dp::Result<()> {
        self.exchange(("all_reduce_sum_f64", 0), &self.hub.f64s, buf, sum_in_rank_order)
    }

    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> candle_dp::Result<()> {
        self.exchange(("all_reduce_sum_f32", 0), &self.hub.f32s, buf, sum_in_rank_order)
    }

    fn broadcast(&self, buf: &mut [u8], root: usize) -> candle_dp::Result<()> {
        if root >= self.hub.world_size {
            return Err(Error::InvalidConfig { field: "root", value: root as f64, valid: "a rank in [0, world_size)" });
        }
        self.exchange(("broadcast", root), &self.hub.bytes, buf, |all, out| out.copy_from_slice(&all[root]))
    }
}

/// Marks its rank gone when its thread ends, by return or by panic.
struct Leaves(Arc<Hub>);

impl Drop for Leaves {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// Runs `f(rank)` on every rank of a world of `world_size` threads and
/// returns the results in rank order. A rank's panic is re-raised here once
/// every rank has ended (the others' collectives fail rather than wait).
pub fn on_ranks<T: Send>(world_size: usize, f: impl Fn(ThreadRank) -> T + Sync) -> Vec<T> {
    let ranks = thread_world(world_size);
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|r| {
                s.spawn(move || {
                    let _leaves = Leaves(r.hub.clone());
                    f(r)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
        results.into_iter().map(|r| r.unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    })
}
