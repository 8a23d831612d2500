//! The MNIST example's IDX reader on files the test writes, and a short DP
//! training run of its CNN on them.

#[path = "../examples/common/mod.rs"]
mod examples_common;

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module};
use candle_dp::{loss, DpOptimizer, GaussianNoise, PoissonSampler};
use candle_nn::{VarBuilder, VarMap, SGD};
use examples_common::idx::{load_mnist, read_idx};
use examples_common::DataError;

fn idx_bytes(type_byte: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, type_byte, dims.len() as u8];
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend_from_slice(data);
    b
}

fn write(dir: &Path, name: &str, bytes: &[u8], gz: bool) {
    std::fs::create_dir_all(dir).unwrap();
    if gz {
        let f = std::fs::File::create(dir.join(format!("{name}.gz"))).unwrap();
        let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap();
    } else {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// A tiny MNIST-shaped set: class 0 is a bright left half, class 1 a bright right half.
fn write_set(dir: &Path, split: &str, n: usize, gz: bool) {
    let mut pixels = Vec::with_capacity(n * 784);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let class = (i % 2) as u8;
        for r in 0..28 {
            for c in 0..28 {
                let bright = (c < 14) == (class == 0);
                pixels.push(if bright { 200 + ((r * c + i) % 50) as u8 } else { ((r + c + i) % 30) as u8 });
            }
        }
        labels.push(class);
    }
    write(dir, &format!("{split}-images-idx3-ubyte"), &idx_bytes(8, &[n as u32, 28, 28], &pixels), gz);
    write(dir, &format!("{split}-labels-idx1-ubyte"), &idx_bytes(8, &[n as u32], &labels), gz);
}

fn temp_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("candle-dp-mnist-{}-{name}", std::process::id()))
}

#[test]
fn idx_files_load_raw_and_gzipped() {
    for gz in [false, true] {
        let dir = temp_dir(if gz { "gz" } else { "raw" });
        write_set(&dir, "train", 10, gz);
        let set = load_mnist(&dir, "train").unwrap();
        assert_eq!(set.labels, vec![0, 1, 0, 1, 0, 1, 0, 1, 0, 1]);
        assert_eq!(set.pixels.len(), 10);
        assert!(set.pixels.iter().all(|p| p.len() == 784 && p.iter().all(|v| (0.0..=1.0).contains(v))));
    }
}

#[test]
fn bad_idx_files_are_clear_errors() {
    let dir = temp_dir("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let f = |name: &str, bytes: Vec<u8>| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let cases = [
        (f("magic", vec![1, 0, 8, 1, 0, 0, 0, 1, 5]), 1, "two zero bytes"),
        (f("type", idx_bytes(0x0d, &[1], &[0, 0, 0, 0])), 1, "type byte 0x0d"),
        (f("ndim", idx_bytes(8, &[1, 1], &[0])), 1, "2 dimensions: expected 1"),
        (f("short", idx_bytes(8, &[5], &[1, 2])), 1, "2 data bytes: the dimensions [5] need 5"),
        (f("long", idx_bytes(8, &[1], &[1, 2])), 1, "2 data bytes"),
        (f("header", vec![0, 0, 8, 3, 0]), 3, "shorter than its 16-byte header"),
    ];
    for (path, ndim, needle) in &cases {
        let err = read_idx(path, *ndim).unwrap_err();
        assert!(matches!(err, DataError::Malformed { .. }), "{err}");
        assert!(err.to_string().contains(needle), "{err} lacks {needle}");
    }
    // A missing split names every expected file and where MNIST is published.
    let err = load_mnist(&temp_dir("nothing"), "train").unwrap_err().to_string();
    for name in examples_common::idx::MNIST_FILES {
        assert!(err.contains(name), "{err} lacks {name}");
    }
    assert!(err.contains("published at"));
    // Labels that do not match the images, or are not digits.
    let d = temp_dir("mismatch");
    write_set(&d, "train", 4, false);
    write(&d, "train-labels-idx1-ubyte", &idx_bytes(8, &[3], &[0, 1, 0]), false);
    assert!(load_mnist(&d, "train").unwrap_err().to_string().contains("3 labels for 4 images"));
    write(&d, "train-labels-idx1-ubyte", &idx_bytes(8, &[4], &[0, 1, 12, 0]), false);
    assert!(load_mnist(&d, "train").unwrap_err().to_string().contains("label 2 = 12"));
}

/// A few DP-SGD steps of the example's CNN on files written here: the whole
/// path from IDX bytes to an accounted, verified ledger.
#[test]
fn a_short_dp_training_run_on_written_idx_files() {
    let dir = temp_dir("train");
    write_set(&dir, "train", 48, true);
    let set = load_mnist(&dir, "train").unwrap();
    let varmap = VarMap::new();
    let model = examples_common::Cnn::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
    examples_common::init_seeded(&varmap, 1).unwrap();
    let sampler = PoissonSampler::seeded(48, 0.25, 2).unwrap();
    let mut opt = DpOptimizer::<SGD>::builder(candle_dp::vars_by_name(&varmap), sampler)
        .noise_multiplier(0.5)
        .noise(GaussianNoise::from_seed(3))
        .build(0.05)
        .unwrap();
    let all: Vec<usize> = (0..48).collect();
    let eval = |model: &examples_common::Cnn| {
        let (x, y) = set.tensors(&all, &Device::Cpu).unwrap();
        loss::cross_entropy(&model.forward(&x).unwrap(), &y)
            .unwrap()
            .tensor()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let before = eval(&model);
    for _ in 0..12 {
        opt.train_step(|idx| {
            let (x, y) = set.tensors(idx, &Device::Cpu)?;
            loss::cross_entropy(&model.forward(&x)?, &y)
        })
        .unwrap();
    }
    let after = eval(&model);
    assert!(after.is_finite() && after < before, "the loss should fall on separable data: {before} -> {after}");
    let ledger = dp_accountant::Ledger::from_json(&opt.ledger().unwrap().to_json()).unwrap();
    assert_eq!(ledger.total_steps(), 12);
    assert!(opt.epsilon(1e-5).unwrap() > 0.0);
}

/// The mnist example checks its flags before it looks for data, naming the
/// flag and its range like the library's configuration errors.
#[test]
fn bad_mnist_flags_are_named() {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let exe = deps.parent().unwrap().join("examples").join(format!("mnist{}", std::env::consts::EXE_SUFFIX));
    assert!(exe.exists(), "{} not built", exe.display());
    for (flags, expected) in [
        (["--epochs", "0"], "--epochs = 0: must be an integer >= 1"),
        (["--lr", "nan"], "--lr = NaN: must be finite and > 0"),
        (["--limit", "0"], "--limit = 0: must be an integer >= 1"),
        (["--delta", "0"], "--delta = 0: must be in (0, 1)"),
    ] {
        let out = std::process::Command::new(&exe).args(flags).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{flags:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected) && err.lines().count() == 1, "{flags:?}: {err}");
    }
}
