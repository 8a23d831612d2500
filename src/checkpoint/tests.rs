//! A crash at every point of a checkpoint write: the folder always resumes,
//! from the old checkpoint or the new one, to the same final model as a run
//! never interrupted.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{ParamsAdamW, VarBuilder, VarMap};

use super::atomic::Writer;
use crate::optim::AdamW;
use crate::{linear, loss, vars_by_name, DpLinear, DpOptimizer, GaussianNoise, PoissonSampler};

const N: usize = 24;

/// A model with fixed initial weights, its own variables and DP layer.
struct Model {
    varmap: VarMap,
    fc: DpLinear,
}

fn model() -> Model {
    let varmap = VarMap::new();
    let fc = linear(3, 2, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
    for (k, v) in vars_by_name(&varmap).iter().enumerate() {
        let values: Vec<f32> = (0..v.elem_count()).map(|i| ((i + 3 * k) as f32 * 0.37).sin()).collect();
        v.set(&Tensor::from_vec(values, v.shape(), &Device::Cpu).unwrap()).unwrap();
    }
    Model { varmap, fc }
}

fn adam() -> ParamsAdamW {
    ParamsAdamW { lr: 0.05, ..Default::default() }
}

fn optimizer(m: &Model) -> DpOptimizer<AdamW> {
    DpOptimizer::builder(vars_by_name(&m.varmap), PoissonSampler::seeded(N, 0.4, 5).unwrap())
        .noise_multiplier(0.8)
        .noise(GaussianNoise::from_seed(6))
        .build(adam())
        .unwrap()
}

fn step(opt: &mut DpOptimizer<AdamW>, m: &Model) {
    let x = Tensor::from_vec((0..3 * N).map(|i| (i as f32 * 0.11).cos()).collect(), (N, 3), &Device::Cpu).unwrap();
    let y = Tensor::from_vec((0..N as u32).map(|i| i % 2).collect(), N, &Device::Cpu).unwrap();
    opt.train_step(|idx| {
        let idx = Tensor::from_vec(idx.iter().map(|&i| i as u32).collect(), idx.len(), &Device::Cpu)?;
        loss::cross_entropy(&m.fc.forward(&x.index_select(&idx, 0)?)?, &y.index_select(&idx, 0)?)
    })
    .unwrap();
}

fn weights(m: &Model) -> Vec<Vec<f32>> {
    vars_by_name(&m.varmap).iter().map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()).collect()
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn a_crash_anywhere_in_a_checkpoint_write_resumes_to_the_uninterrupted_model() {
    const TOTAL: u64 = 6;
    let reference = model();
    let mut opt = optimizer(&reference);
    for _ in 0..TOTAL {
        step(&mut opt, &reference);
    }
    let expected = weights(&reference);
    drop(opt);

    let root = std::env::temp_dir().join(format!("candle-dp-crash-{}", std::process::id()));
    let base = root.join("base");
    let run = model();
    let mut opt = optimizer(&run);
    step(&mut opt, &run);
    step(&mut opt, &run);
    opt.save_checkpoint(&base, &run.varmap).unwrap();
    step(&mut opt, &run);

    let mut outcomes = Vec::new();
    for k in 0.. {
        let dir = root.join(format!("crash-{k}"));
        copy_dir(&base, &dir);
        let crashed = opt.save_checkpoint_with(&dir, &run.varmap, &mut Writer::crashing_at(k)).is_err();
        let resumed = model();
        let mut again = DpOptimizer::<AdamW>::resume(&dir, &resumed.varmap, vars_by_name(&resumed.varmap), adam())
            .unwrap_or_else(|e| panic!("crash at point {k}: the folder does not resume: {e}"));
        outcomes.push(again.steps());
        while again.steps() < TOTAL {
            step(&mut again, &resumed);
        }
        assert_eq!(weights(&resumed), expected, "crash at point {k}: resumed from step {}", outcomes[k]);
        drop(again);
        if !crashed {
            break;
        }
    }
    std::fs::remove_dir_all(&root).unwrap();
    // Every point was reached: first the old checkpoint resumes, then,
    // once the manifest is renamed, the new one.
    assert!(outcomes.len() >= 8, "{outcomes:?}");
    assert_eq!(outcomes.first(), Some(&2));
    assert_eq!(outcomes.last(), Some(&3));
    let switch = outcomes.iter().position(|&s| s == 3).unwrap();
    assert!(outcomes[switch..].iter().all(|&s| s == 3), "{outcomes:?}");
}

#[test]
fn a_save_removes_the_files_of_earlier_checkpoints_and_crashes() {
    let dir = std::env::temp_dir().join(format!("candle-dp-gc-{}", std::process::id()));
    let run = model();
    let mut opt = optimizer(&run);
    step(&mut opt, &run);
    opt.save_checkpoint(&dir, &run.varmap).unwrap();
    assert!(opt.save_checkpoint_with(&dir, &run.varmap, &mut Writer::crashing_at(0)).is_err());
    std::fs::write(dir.join("notes.txt"), "the user's own file").unwrap();
    step(&mut opt, &run);
    opt.save_checkpoint(&dir, &run.varmap).unwrap();
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    std::fs::remove_dir_all(&dir).unwrap();
    let prefixes: Vec<&str> = names.iter().map(|n| n.split(['-', '.']).next().unwrap()).collect();
    assert_eq!(prefixes, ["checkpoint", "ledger", "model", "notes", "optimizer"], "{names:?}");
}
