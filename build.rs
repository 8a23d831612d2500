//! Compiles the CUDA kernels (`src/kernels/*.cu`) to PTX, only with the
//! `cuda` feature: the default build needs no CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

/// The kernels, compiled for `compute_80` PTX: the driver JIT-compiles it
/// for the GPU at hand (Ampere and newer).
const KERNELS: [&str; 2] = ["clip", "noise"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=NVCC");
    for name in KERNELS {
        println!("cargo::rerun-if-changed=src/kernels/{name}.cu");
    }
    println!("cargo::rerun-if-changed=src/kernels/chacha20.cuh");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    for name in KERNELS {
        let ptx = out_dir.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-arch=compute_80", "-O3", "-std=c++17", "-o"])
            .arg(&ptx)
            .arg(format!("src/kernels/{name}.cu"))
            .status()
            .unwrap_or_else(|e| panic!("the cuda feature needs nvcc ({nvcc}): {e}"));
        assert!(status.success(), "nvcc failed on src/kernels/{name}.cu ({status})");
    }
}
