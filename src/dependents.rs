//! Who depends on a layer: the differencing disks whose parent link names
//! it. Used to keep a parent from being changed under its children (`write`,
//! `mount -o rw`) and by merges to find children to relink and bystanders a
//! merge would break.
//!
//! There is no back-link from a parent to its children in any format, so
//! children are found the way Hyper-V's tools find them: by looking. The
//! folders searched are the layer's own folder and every `--parent-dir`
//! (where `Chain::open` looks for parents, so where children that resolve to
//! this layer live), plus the child of every `--parent CHILD=PATH`. Every
//! file a driver reads there is asked for its parent link (`format::peek`).
//!
//! A file is a child of layer L **exactly when opening its chain would
//! take L as its parent**: `chain::resolve_parent` runs the chain's own rule
//! (candidate order, `--parent-dir`s, `--parent` overrides, recorded parent
//! format, allowed formats, identity where the link records one) and the
//! file it picks must be L's file (same device and inode, so any name of
//! it counts and a same-named file elsewhere does not). A link recording
//! ids none of which is L's is not followed further: without
//! `--ignore-id-mismatch` the chain never takes such a file.
//!
//! Cost: each driver's `peek` reads a footer or headers and metadata of each
//! image file in those folders; a file whose link may lead to L is opened
//! (read-only, without locks) with the candidates its chain would try.
//! Nothing is locked or changed.

use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::chain::{resolve_parent, ChainOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::format::registry::{inspect_as, is_image_name, peek};
use crate::format::ParentLink;
use crate::paths::{canonical, file_id, folder_of, same_file};

/// An image file found in a searched folder, with its parent link.
#[derive(Debug, Clone)]
pub struct Found {
    pub path: PathBuf,
    /// Its format (registry name).
    pub format: &'static str,
    /// Its identity, where its format has one.
    pub id: Option<Uuid>,
    /// Its parent link (`None` for a base disk).
    pub parent: Option<ParentLink>,
}

impl Found {
    /// Does this file's chain take the layer at `path` (identity `id`) as
    /// its parent? `opts`: the `--parent-dir`s and `--parent` overrides its
    /// chain would be opened with (see the module docs).
    pub fn is_child_of(&self, path: &Path, id: Option<Uuid>, opts: &ChainOptions) -> bool {
        let Some(link) = &self.parent else {
            return false;
        };
        if link.detached {
            return false;
        }
        if !link.by_name_only() && !id.is_some_and(|id| link.ids.contains(&id)) {
            return false;
        }
        let Some(me) = file_id(path) else {
            return false;
        };
        // The whole link (a peek may leave the stored names out).
        let Ok(child) = inspect_as(&self.path, Some(self.format)) else {
            return false;
        };
        let Some(link) = child.parent() else {
            return false;
        };
        resolve_parent(&self.path, self.format, &link, opts)
            .is_some_and(|p| file_id(&p) == Some(me))
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

/// Every image file a driver reads in `dirs`, and the child of every
/// `overrides` entry (unreadable folders and files that do not parse are
/// skipped: they cannot be anyone's child).
pub fn scan(dirs: &[PathBuf], overrides: &[(PathBuf, PathBuf)]) -> Vec<Found> {
    let mut out: Vec<Found> = Vec::new();
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
                    format: p.format,
                    id: p.id,
                    parent: p.parent,
                });
            }
        }
    }
    for (child, _) in overrides {
        if out.iter().any(|f| same_file(&f.path, child)) {
            continue;
        }
        if let Some(p) = peek(child) {
            out.push(Found {
                path: child.clone(),
                format: p.format,
                id: p.id,
                parent: p.parent,
            });
        }
    }
    out
}

/// The children of the layer `path` (whose id is `id`, if any) in its
/// folder and the `--parent-dir` folders of `opts`, and among its
/// `--parent` overrides.
pub fn children(path: &Path, id: Option<Uuid>, opts: &ChainOptions) -> Vec<PathBuf> {
    scan(&folders([path], &opts.parent_dirs), &opts.overrides)
        .into_iter()
        .filter(|f| !same_file(&f.path, path) && f.is_child_of(path, id, opts))
        .map(|f| f.path)
        .collect()
}

/// Refuse to open `path` for writing when other disks depend on it (their
/// chains, opened with `opts`' parent folders and overrides, take it as
/// their parent). `force_hint` is how the user overrides where they are
/// (`--force`, `-o rw,force`).
pub fn refuse_if_parent(path: &Path, opts: &ChainOptions, force_hint: &str) -> Result<()> {
    let Some(me) = peek(path) else {
        // Not an image we can read: the open that follows says why.
        return Ok(());
    };
    let kids = children(path, me.id, opts);
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
