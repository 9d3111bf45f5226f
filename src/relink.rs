//! `chainfs set-parent CHILD PARENT`: repair a chain whose parent moved,
//! like Hyper-V's `Set-VHD -ParentPath` and `qemu-img rebase -u`.
//!
//! CHILD is opened for writing (its exclusive lock refuses the command
//! while a mount, merge or write holds the chain: *in use*, exit 7), PARENT
//! read-only. Where CHILD's format records its parent's identity (VHD:
//! footer unique id; VHDX: DataWriteGuid, `parent_linkage` or
//! `parent_linkage2`), PARENT must carry it; another disk is refused naming
//! both ids, unless `ignore_id_mismatch`, which records PARENT's id. Sizes
//! must match and CHILD's format must allow PARENT's. Then the layer's own
//! crash-safe relink ([`Layer::relink`]) rewrites every locator and hint
//! for the new location; this module knows no format's bytes.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::cache::MetaCache;
use crate::error::{Error, ErrorKind, Result};
use crate::format::registry::{may_have_parent, mixed_error};
use crate::format::{open_layer, LayerOptions, ParentChange};
use crate::paths::canonical;

/// What `set-parent` did.
#[derive(Debug, Clone, Serialize)]
pub struct SetParentReport {
    pub child: PathBuf,
    pub parent: PathBuf,
    /// The parent id CHILD recorded before (none: linked by name only).
    pub old_parent_id: Option<uuid::Uuid>,
    /// The parent id it records now (PARENT's id, where there is one).
    pub parent_id: Option<uuid::Uuid>,
    /// The locators CHILD had before, as stored.
    pub old_locators: Vec<String>,
}

/// Make `parent` the parent of `child`; see the module docs.
pub fn set_parent(
    child: &Path,
    parent: &Path,
    ignore_id_mismatch: bool,
) -> Result<SetParentReport> {
    if let Some(r) = crate::intent::read(child)? {
        return Err(Error::new(
            ErrorKind::Busy,
            format!("{}: in use: {r}", child.display()),
        ));
    }
    let opts = |writable| LayerOptions {
        writable,
        ignore_checksums: false,
        cache: MetaCache::new(1 << 20),
    };
    let c = open_layer(child, &opts(true))?;
    let Some(link) = c.parent() else {
        return Err(Error::new(
            ErrorKind::InvalidState,
            format!(
                "{}: not a differencing disk: it has no parent to set",
                child.display()
            ),
        ));
    };
    if link.detached {
        return Err(Error::new(
            ErrorKind::InvalidState,
            format!(
                "{}: detached by a merge: its content was merged into another disk",
                child.display()
            ),
        ));
    }
    if canonical(child) == canonical(parent) {
        return Err(Error::new(
            ErrorKind::BadChain,
            format!("{}: a disk cannot be its own parent", child.display()),
        ));
    }
    let p = open_layer(parent, &opts(false))?;
    let (ci, pi) = (c.info(), p.info());
    if !may_have_parent(ci.format, pi.format) {
        return Err(mixed_error(child, ci.format, pi.format, parent));
    }
    if let Some(id) = pi.unique_id.filter(|id| ci.unique_id == Some(*id)) {
        return Err(Error::new(
            ErrorKind::BadChain,
            format!(
                "{}: {} has the child's own id {id}: the chain would loop",
                child.display(),
                parent.display(),
            ),
        ));
    }
    if ci.virtual_size != pi.virtual_size {
        return Err(Error::new(
            ErrorKind::BadChain,
            format!(
                "{}: virtual size {} differs from {}'s {}",
                child.display(),
                ci.virtual_size,
                parent.display(),
                pi.virtual_size
            ),
        ));
    }
    let old_id = link.ids.first().copied();
    let show = |id: Option<uuid::Uuid>| id.map_or("no id".to_string(), |u| format!("id {u}"));
    let matches = link.accepts(pi.unique_id);
    if !matches && !ignore_id_mismatch {
        return Err(Error::new(
            ErrorKind::IdMismatch,
            format!(
                "{} expects a parent with {}, but {} has {}: not the same disk \
                 (pass --ignore-id-mismatch to make it the parent anyway and record its id)",
                child.display(),
                show(old_id),
                parent.display(),
                show(pi.unique_id)
            ),
        ));
    }
    if !matches {
        log::warn!(
            "{}: recording parent {} with {} instead of {} (--ignore-id-mismatch)",
            child.display(),
            parent.display(),
            show(pi.unique_id),
            show(old_id)
        );
    }
    c.relink(ParentChange::Set(p.as_ref()))?;
    c.flush()?;
    Ok(SetParentReport {
        child: child.to_path_buf(),
        parent: parent.to_path_buf(),
        old_parent_id: old_id,
        parent_id: pi.unique_id,
        old_locators: link
            .hints
            .iter()
            .map(|h| format!("{}={}", h.source, h.stored))
            .collect(),
    })
}
