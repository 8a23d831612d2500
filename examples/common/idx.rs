//! The IDX format of the MNIST files: a magic number (two zero bytes, a type
//! byte, the number of dimensions), the dimensions as big-endian u32, then
//! the data. MNIST uses unsigned bytes (type 0x08): images `[n, 28, 28]`
//! (magic 0x00000803) and labels `[n]` (magic 0x00000801).

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{open, DataError, Images};

/// The four MNIST files, without the optional `.gz`.
pub const MNIST_FILES: [&str; 4] =
    ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"];

const MNIST_HINT: &str = "MNIST needs train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and \
    t10k-labels-idx1-ubyte (each optionally .gz) in --data-dir; they are published at \
    http://yann.lecun.com/exdb/mnist/ and mirrored by most ML dataset hubs";

/// Reads an unsigned-byte IDX file (gzip-compressed if named `.gz`):
/// returns its dimensions and data.
pub fn read_idx(path: &Path, expected_ndim: usize) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let mut bytes = Vec::new();
    open(path, MNIST_HINT)?.read_to_end(&mut bytes).map_err(|source| DataError::Io { path: path.into(), source })?;
    let bad = |message: String| DataError::Malformed { path: path.into(), line: 0, message };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("not an IDX file: the magic number must start with two zero bytes".into()));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!("type byte 0x{:02x}: expected 0x08 (unsigned bytes)", bytes[2])));
    }
    let ndim = usize::from(bytes[3]);
    if ndim != expected_ndim {
        return Err(bad(format!("{ndim} dimensions: expected {expected_ndim}")));
    }
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(bad(format!("{} bytes: shorter than its {header}-byte header", bytes.len())));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|k| u32::from_be_bytes([bytes[4 + 4 * k], bytes[5 + 4 * k], bytes[6 + 4 * k], bytes[7 + 4 * k]]) as usize)
        .collect();
    let n: usize = dims.iter().product();
    let got = bytes.len() - header;
    if got != n {
        return Err(bad(format!("{got} data bytes: the dimensions {dims:?} need {n}")));
    }
    bytes.drain(..header);
    Ok((dims, bytes))
}

/// `dir/name` or, if that is absent, `dir/name.gz`.
fn find(dir: &Path, name: &str) -> PathBuf {
    let plain = dir.join(name);
    if plain.exists() {
        plain
    } else {
        dir.join(format!("{name}.gz"))
    }
}

/// Loads an MNIST split (`"train"` or `"t10k"`) from `dir`: pixels scaled to [0, 1].
pub fn load_mnist(dir: &Path, split: &str) -> Result<Images, DataError> {
    let images_path = find(dir, &format!("{split}-images-idx3-ubyte"));
    let labels_path = find(dir, &format!("{split}-labels-idx1-ubyte"));
    let (dims, pixels) = read_idx(&images_path, 3)?;
    let (ldims, labels) = read_idx(&labels_path, 1)?;
    let bad = |path: &Path, message: String| DataError::Malformed { path: path.into(), line: 0, message };
    if dims[1] != 28 || dims[2] != 28 {
        return Err(bad(&images_path, format!("images of {}x{}: expected 28x28", dims[1], dims[2])));
    }
    if ldims[0] != dims[0] {
        return Err(bad(&labels_path, format!("{} labels for {} images", ldims[0], dims[0])));
    }
    if let Some(i) = labels.iter().position(|&l| l > 9) {
        return Err(bad(&labels_path, format!("label {i} = {}: must be in 0..=9", labels[i])));
    }
    Ok(Images {
        pixels: pixels.chunks(784).map(|c| c.iter().map(|&p| f32::from(p) / 255.0).collect()).collect(),
        labels: labels.into_iter().map(u32::from).collect(),
    })
}
