//! Path rules shared by every module that names files: the folder a file
//! is in, a canonical form for comparing two names of one file, and how a
//! parent name stored inside an image (by any writer, in any shape) is
//! turned back into a local path. Format drivers store and decode bytes;
//! deciding which file a stored name means happens here, once.

use std::path::{Path, PathBuf};

/// The folder a file is in (`.` for a bare file name).
pub fn folder_of(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Absolute, symlinks resolved where possible.
pub fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| std::path::absolute(p).unwrap_or(p.to_path_buf()))
}
