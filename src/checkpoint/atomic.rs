//! Crash-safe writes: a file appears under its name complete or not at all.
//!
//! Each file is written to `NAME.tmp`, flushed to disk (`fsync`) and renamed
//! over `NAME`, and the folder is flushed after the renames, so that a
//! rename cannot reach the disk before the data it names (POSIX `rename(2)`
//! is atomic; ext4, XFS and APFS order it after the fsync of the file).
//!
//! A checkpoint's files are named by their content, and the manifest, which
//! names them, is written last: until its rename the previous manifest and
//! the files it names are untouched, after it the new ones are complete.
//! A crash at any point therefore leaves one complete checkpoint.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Where a write may be interrupted (tests simulate a crash at each).
#[derive(Debug, Default)]
pub(crate) struct Writer {
    /// Interruption points passed so far.
    passed: usize,
    /// Stop at this interruption point, as a crash would (tests only).
    crash_at: Option<usize>,
}

impl Writer {
    /// A writer that stops, as a killed process would, at interruption point
    /// `k` (0-based), leaving a half-written temporary file if `k` falls inside
    /// a write.
    #[cfg(test)]
    pub(crate) fn crashing_at(k: usize) -> Self {
        Self { passed: 0, crash_at: Some(k) }
    }

    /// Whether the simulated crash happens here.
    fn crash_here(&mut self) -> bool {
        let here = self.crash_at == Some(self.passed);
        self.passed += 1;
        here
    }

    fn crashed(path: &Path) -> Error {
        Error::Checkpoint { path: path.to_path_buf(), reason: "simulated crash (test)".into() }
    }

    /// Writes `bytes` to `dir/name` atomically.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub(crate) fn write(&mut self, dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
        let tmp = tmp_path(dir, name);
        let half = bytes.len() / 2;
        let mut file = File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(&bytes[..half]).map_err(io(&tmp))?;
        if self.crash_here() {
            return Err(Self::crashed(&tmp));
        }
        file.write_all(&bytes[half..]).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        drop(file);
        self.commit(dir, name)
    }

    /// Writes `dir/name` atomically with `write_to(tmp_path)`, for writers
    /// that take a path (safetensors); returns the bytes' SHA-256.
    ///
    /// # Errors
    /// [`Error::Io`] and `write_to`'s.
    pub(crate) fn write_with(
        &mut self,
        dir: &Path,
        name: impl Fn(&str) -> String,
        write_to: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<(String, String)> {
        let tmp = tmp_path(dir, "staged");
        write_to(&tmp)?;
        let sha256 = super::sha256_file(&tmp)?;
        if self.crash_here() {
            // A crash mid-write leaves a partial temporary file.
            let len = std::fs::metadata(&tmp).map_err(io(&tmp))?.len();
            File::options().write(true).open(&tmp).and_then(|f| f.set_len(len / 2)).map_err(io(&tmp))?;
            return Err(Self::crashed(&tmp));
        }
        File::open(&tmp).and_then(|f| f.sync_all()).map_err(io(&tmp))?;
        let name = name(&sha256);
        std::fs::rename(&tmp, tmp_path(dir, &name)).map_err(io(&tmp))?;
        self.commit(dir, &name)?;
        Ok((name, sha256))
    }

    /// Renames `dir/name.tmp` over `dir/name` and flushes the folder.
    fn commit(&mut self, dir: &Path, name: &str) -> Result<()> {
        if self.crash_here() {
            return Err(Self::crashed(&dir.join(name)));
        }
        let (tmp, path) = (tmp_path(dir, name), dir.join(name));
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(dir)?;
        if self.crash_here() {
            return Err(Self::crashed(&path));
        }
        Ok(())
    }
}

fn tmp_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.tmp"))
}

/// Flushes a folder's entries (the renames in it) to disk.
fn sync_dir(dir: &Path) -> Result<()> {
    // Windows cannot open a folder as a file; its renames are durable
    // through the file system's own journal.
    if cfg!(unix) {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    }
    Ok(())
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}
