//! Who depends on a layer: the differencing disks whose parent link names
//! it. Used to keep a parent from being changed under its children (`write`,
//! `mount -o rw`) and by merges to find children to relink and bystanders a
//! merge would break.
//!
//! There is no back-link from a parent to its children in either format, so
//! children are found the way Hyper-V's tools find them: by looking. The
//! folders searched are the layer's own folder and every `--parent-dir`
//! (where `Chain::open` looks for parents, so where children that resolve to
//! this layer live). A file is a child when its recorded parent id is the
//! layer's id: VHD parent UUID = the parent's footer unique id; VHDX
//! `parent_linkage` = the parent's DataWriteGuid, which is what
//! `peek_ids` and `LayerInfo::unique_id` report for a VHDX (not the
//! FileWriteGuid, which changes on every writable open).
//!
//! Cost: `peek_ids` reads a footer or the VHDX headers and metadata of each
//! image file in those folders; nothing is locked or changed.

use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::error::{Error, ErrorKind, Result};
use crate::format::peek_ids;
use crate::paths::{canonical, folder_of};

/// An image file found in a searched folder, with its identities.
#[derive(Debug, Clone)]
pub struct Found {
    pub path: PathBuf,
    pub id: Uuid,
    /// The id its parent link records (None for a base disk).
    pub parent: Option<Uuid>,
}

/// Does the name end like a VHD or VHDX image?
fn is_image_name(p: &Path) -> bool {
    let ext = p
        .extension()
        .map(|x| x.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    matches!(ext.as_str(), "vhd" | "avhd" | "vhdx" | "avhdx")
}

/// The folders to search for the children of `layers`: their own folders,
/// then `extra` (`--parent-dir`), each once, canonical.
pub fn folders<'a>(layers: impl IntoIterator<Item = &'a Path>, extra: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let all = layers
        .into_iter()
        .map(|l| canonical(folder_of(l)))
        .chain(extra.iter().map(|d| canonical(d)));
    for d in all {
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    dirs
}

/// Every readable VHD/VHDX file in `dirs` (unreadable folders and files
/// that do not parse are skipped: they cannot be anyone's child).
pub fn scan(dirs: &[PathBuf]) -> Vec<Found> {
    let mut out = Vec::new();
    for dir in dirs {
        let Ok(rd) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut names: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| is_image_name(p))
            .collect();
        // Stable order, so messages name the same child every time.
        names.sort();
        for path in names {
            if let Some((id, parent)) = peek_ids(&path) {
                out.push(Found { path, id, parent });
            }
        }
    }
    out
}

/// The children of the layer `path` (whose id is `id`) in its folder and
/// `extra` folders.
pub fn children(path: &Path, id: Uuid, extra: &[PathBuf]) -> Vec<PathBuf> {
    let me = canonical(path);
    scan(&folders([path], extra))
        .into_iter()
        .filter(|f| f.parent == Some(id) && canonical(&f.path) != me)
        .map(|f| f.path)
        .collect()
}

/// Refuse to open `path` for writing when other disks depend on it.
/// `force_hint` is how the user overrides where they are (`--force`,
/// `-o rw,force`).
pub fn refuse_if_parent(path: &Path, extra: &[PathBuf], force_hint: &str) -> Result<()> {
    let Some((id, _)) = peek_ids(path) else {
        // Not an image we can read: the open that follows says why.
        return Ok(());
    };
    let kids = children(path, id, extra);
    let Some(first) = kids.first() else {
        return Ok(());
    };
    let (n, others) = match kids.len() {
        1 => (
            "1 differencing disk has it as its parent".to_string(),
            String::new(),
        ),
        n => (
            format!("{n} differencing disks have it as their parent"),
            format!(" and {} other{}", n - 1, if n == 2 { "" } else { "s" }),
        ),
    };
    Err(Error::new(
        ErrorKind::InvalidState,
        format!(
            "{}: {n} ({}{others}); writing into a parent corrupts its children \
             (write into a child instead, or merge it first); {force_hint} writes anyway",
            path.display(),
            first.display(),
        ),
    ))
}
