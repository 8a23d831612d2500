//! Data-parallel DP-SGD over NCCL (feature `nccl`; needs CUDA GPUs, so it
//! runs on a lent GPU machine through gpu-bin/run.sh, see ../shared/CUDA.md):
//! the collectives at world size 1 are the identity; a run distributed over
//! NCCL at world size 1 is the plain run bit for bit; one rank per GPU (all
//! the machine has, as threads) equals one process to 1e-12 in f64.

mod common;

use candle_core::{DType, Device};
use candle_dp::distributed::{Collective, Nccl};
use common::dp_run::{max_rel_diff, Run, STEPS};

fn cuda(ordinal: usize) -> candle_core::CudaDevice {
    match Device::new_cuda(ordinal).expect("a CUDA device") {
        Device::Cuda(d) => d,
        _ => unreachable!("new_cuda gives a CUDA device"),
    }
}

#[test]
fn nccl_collectives_of_one_gpu_are_the_identity() {
    let nccl = Nccl::single(&cuda(0)).unwrap();
    assert_eq!((nccl.rank(), nccl.world_size()), (0, 1));
    let mut a: Vec<f64> = (0..1000).map(|i| f64::from(i) * 0.37 - 11.0).collect();
    let before = a.clone();
    nccl.all_reduce_sum_f64(&mut a).unwrap();
    assert_eq!(a, before);
    let mut b: Vec<f32> = (0..333).map(|i| i as f32 * 1.5).collect();
    let before = b.clone();
    nccl.all_reduce_sum_f32(&mut b).unwrap();
    assert_eq!(b, before);
    let mut bytes: Vec<u8> = (0..=255).collect();
    nccl.broadcast(&mut bytes, 0).unwrap();
    assert_eq!(bytes, (0..=255).collect::<Vec<u8>>());
    let err = nccl.broadcast(&mut bytes, 1).unwrap_err();
    assert_eq!(err.to_string(), "broadcast root = 1: must be a rank, in 0..world_size");
}

/// The model trains on the CPU; its step's collectives go through NCCL on GPU 0.
#[test]
fn a_run_over_nccl_at_world_size_one_is_the_plain_run() {
    let plain = Run::new(DType::F64, 0.4, 0.3).train(STEPS);
    let nccl = Run::new(DType::F64, 0.4, 0.3).distribute(Nccl::single(&cuda(0)).unwrap()).train(STEPS);
    assert_eq!(nccl, plain);
}

/// One rank per GPU of the machine (threads, one NCCL id).
#[test]
fn one_rank_per_gpu_equals_one_process() {
    let gpus = candle_core::cuda_backend::cudarc::driver::CudaContext::device_count().unwrap() as usize;
    let one = Run::new(DType::F64, 0.4, 0.3).train(STEPS);
    let id = Nccl::unique_id().unwrap();
    let outcomes: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..gpus)
            .map(|r| {
                s.spawn(move || {
                    let nccl = Nccl::from_rank(&cuda(r), r, gpus, id).unwrap();
                    Run::new(DType::F64, 0.4, 0.3).distribute(nccl).train(STEPS)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, o) in outcomes.iter().enumerate() {
        assert_eq!(o.weights, outcomes[0].weights, "GPU rank {r} drifted");
        let d = max_rel_diff(&o.weights, &one.weights);
        assert!(d < 1e-12, "{gpus} GPU ranks vs one process: {d:e}");
    }
}
