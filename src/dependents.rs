//! Who depends on a layer: the differencing disks whose parent link names
//! it. Used to keep a parent from being changed under its children (`write`,
//! `mount -o rw`) and by merges to find children to relink and bystanders a
//! merge would break.
//!
//! There is no back-link from a parent to its children in any format, so
//! children are found the way Hyper-V's tools find them: by looking. The
//! folders searched are the layer's own folder and every `--parent-dir`
//! (where `Chain::open` looks for parents, so where children that resolve to
//! this layer live). Every file a driver reads there is asked for its parent
//! link (`format::peek`). It is a child of the layer when the link records
//! identities and one of them is the layer's (VHD: parent UUID = footer
//! unique id; VHDX: `parent_linkage` = DataWriteGuid), or, for a format that
//! names its parent by file name only, when the chain's own candidate rule
//! (`paths::candidates`) leads from it to the layer's file.
//!
//! Cost: each driver's `peek` reads a footer or headers and metadata of each
//! image file in those folders; nothing is locked or changed.

use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::error::{Error, ErrorKind, Result};
use crate::format::registry::{is_image_name, peek};
use crate::format::ParentLink;
use crate::paths::{canonical, folder_of};

/// An image file found in a searched folder, with its parent link.
#[derive(Debug, Clone)]
pub struct Found {
    pub path: PathBuf,
    /// Its identity, where its format has one.
    pub id: Option<Uuid>,
    /// Its parent link (`None` for a base disk).
    pub parent: Option<ParentLink>,
}

impl Found {
    /// Does this file name the layer at `path` (identity `id`) as its
    /// parent? `dirs`: the `--parent-dir`s its chain would be opened with.
    pub fn is_child_of(&self, path: &Path, id: Option<Uuid>, dirs: &[PathBuf]) -> bool {
        let Some(link) = &self.parent else {
            return false;
        };
        if link.detached {
            return false;
        }
        if !link.by_name_only() {
            return id.is_some_and(|id| link.ids.contains(&id));
        }
        let me = canonical(path);
        crate::paths::candidates(&self.path, &link.stored_names(), dirs)
            .iter()
            .find(|c| c.is_file())
            .is_some_and(|c| canonical(c) == me)
    }
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

/// Every image file a driver reads in `dirs` (unreadable folders and files
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
            // Regular files only (following links): peeking opens the
            // file, and opening a FIFO named like an image would block.
            .filter(|p| is_image_name(p) && std::fs::metadata(p).is_ok_and(|m| m.is_file()))
            .collect();
        // Stable order, so messages name the same child every time.
        names.sort();
        for path in names {
            if let Some(p) = peek(&path) {
                out.push(Found {
                    path,
                    id: p.id,
                    parent: p.parent,
                });
            }
        }
    }
    out
}

/// The children of the layer `path` (whose id is `id`, if any) in its
/// folder and `extra` folders.
pub fn children(path: &Path, id: Option<Uuid>, extra: &[PathBuf]) -> Vec<PathBuf> {
    let me = canonical(path);
    scan(&folders([path], extra))
        .into_iter()
        .filter(|f| canonical(&f.path) != me && f.is_child_of(path, id, extra))
        .map(|f| f.path)
        .collect()
}

/// Refuse to open `path` for writing when other disks depend on it.
/// `force_hint` is how the user overrides where they are (`--force`,
/// `-o rw,force`).
pub fn refuse_if_parent(path: &Path, extra: &[PathBuf], force_hint: &str) -> Result<()> {
    let Some(me) = peek(path) else {
        // Not an image we can read: the open that follows says why.
        return Ok(());
    };
    let kids = children(path, me.id, extra);
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
