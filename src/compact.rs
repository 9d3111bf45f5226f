//! `chainfs compact IMAGE`: give a layer's unused space back to the file
//! system, like Hyper-V's `Optimize-VHD -Mode Full`, offline.
//!
//! The layer is opened for writing, which takes the exclusive lock (a mount
//! of any chain that uses it, a merge or a `write` holds a lock, and the
//! open fails as *in use*, exit 7) and already cuts an unreferenced tail
//! off (see `format::space`). Then the driver's `Layer::compact` frees
//! blocks that hold nothing of their own, punches holes over unreferenced
//! space and zero pages, and cuts the tail again. What the layer reads is
//! unchanged at every step, and so is its identity: its children stay
//! linked. Nothing here knows a format's bytes.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::cache::MetaCache;
use crate::error::Result;
use crate::format::space::{occupied, CompactStats};
use crate::format::{open_layer, LayerOptions};

/// What `compact` did.
#[derive(Debug, Clone, Serialize)]
pub struct CompactReport {
    pub image: PathBuf,
    /// Space the file occupied on its file system before and after
    /// (`st_blocks`), and the difference.
    pub bytes_on_disk_before: u64,
    pub bytes_on_disk_after: u64,
    pub bytes_freed: u64,
    #[serde(flatten)]
    pub stats: CompactStats,
}

/// Compact one image file (not its parents).
pub fn compact(image: &Path) -> Result<CompactReport> {
    let before = occupied(image)?;
    let size_before = std::fs::metadata(image)
        .map_err(|e| crate::error::Error::io(image, "cannot stat", None, e))?
        .len();
    let layer = open_layer(
        image,
        &LayerOptions {
            writable: true,
            ignore_checksums: false,
            cache: MetaCache::new(crate::cache::DEFAULT_CACHE_BYTES),
        },
    )?;
    let mut stats = layer.compact()?;
    // The open may have cut an unreferenced tail already.
    stats.file_size_before = size_before;
    layer.flush()?;
    drop(layer);
    let after = occupied(image)?;
    Ok(CompactReport {
        image: image.to_path_buf(),
        bytes_on_disk_before: before,
        bytes_on_disk_after: after,
        bytes_freed: before.saturating_sub(after),
        stats,
    })
}
