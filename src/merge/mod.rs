//! Merges: fold SOURCE (and every layer between it and DESTINATION) into
//! DESTINATION, an ancestor of SOURCE, as Hyper-V's `MergeVirtualHardDisk`
//! does, while the flattened view stays byte-identical throughout.
//!
//! Chain, leaf first: `L0 .. Ls(SOURCE) .. Ld(DESTINATION) .. base`.
//!
//! Step order (the safety argument):
//! 1. Take write access: DESTINATION reopened writable, SOURCE..Ld-1 locked
//!    exclusively, the children to relink opened writable. Nothing changed.
//! 2. Intent record, phase `copy` (see `intent`).
//! 3. Copy: every run that `Ls..Ld-1` hold, resolved newest-first, is
//!    written into DESTINATION. Those runs are shadowed by `Ls..Ld-1` in
//!    the chain, so no reader of the chain sees a change. Then
//!    DESTINATION is flushed (data, then tables, then fsync).
//! 4. Either (a) SOURCE is not the leaf: each child of SOURCE is relinked
//!    to DESTINATION (`Layer::relink`, crash-safe in each format's own way:
//!    each driver documents its relink order).
//!    Before: child -> SOURCE -> ... -> Ld, after: child -> Ld, and Ld now
//!    holds what SOURCE..Ld-1 held: the same bytes either way. Or (b)
//!    SOURCE is the leaf of a writable mount: writes were tracked since the
//!    copy began; the written ranges are copied again until few are left,
//!    then writes are paused, the rest is copied and flushed.
//! 5. Record phase `relinked`; retire SOURCE..Ld-1 (delete, or with
//!    `keep`, detach: parent id set to nil so they no longer open as a
//!    chain over the changed DESTINATION); switch the mount's layer list;
//!    for 4b, DESTINATION becomes the leaf and writes resume there.
//! 6. Remove the record. The merge is complete: the chain on disk is
//!    final and durable. The deleted layers' space comes back at their last
//!    close, which the caller may leave to a thread or a helper process
//!    (`Plan::free`, see `free`) rather than wait for it.
//!
//! A crash before 5 leaves the chain as it was (DESTINATION has extra data
//! only under layers that shadow it); rerunning the merge redoes the copy.
//! A crash in 5 leaves the merged chain complete; rerunning finishes the
//! cleanup from the record, and opening a retired SOURCE is refused.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

mod free;

pub use free::FreeSpace;
use free::Holder;

use crate::dependents;
use crate::error::{Error, ErrorKind, Result};
use crate::format::registry::{may_have_parent, mixed_error, peek};
use crate::format::{open_layer, Layer, LayerOptions, LockMode, ParentChange};
use crate::image::{resolve_span, FlatImage, Layers, Span};
use crate::intent::{self, Phase, Record};
use crate::paths::{canonical, file_id, folder_of};

/// What was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeRequest {
    pub source: String,
    pub destination: String,
    pub keep: bool,
    pub force: bool,
    /// Folders besides the chain's own where dependent disks may live
    /// (`--parent-dir`).
    pub parent_dirs: Vec<PathBuf>,
}

/// Progress and cancellation, shared with whoever watches the merge.
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes_done: AtomicU64,
    pub bytes_total: AtomicU64,
    pub cancel: AtomicBool,
    percent: AtomicU64,
}

impl Progress {
    /// 0..=100, never decreasing; 100 only once `finish()` was called.
    pub fn percent(&self) -> u64 {
        let total = self.bytes_total.load(Ordering::Relaxed);
        let done = self.bytes_done.load(Ordering::Relaxed);
        let now = (done * 100).checked_div(total).unwrap_or(0).min(99);
        self.percent.fetch_max(now, Ordering::Relaxed).max(now)
    }

    pub fn finish(&self) {
        self.percent.store(100, Ordering::Relaxed);
    }
}

/// The user a merge is done for (from the FUSE request), for access checks.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// A checked merge, ready to run.
pub struct Plan {
    pub layers: Layers,
    /// Index of SOURCE and DESTINATION in `layers`.
    pub s: usize,
    pub d: usize,
    /// Children of SOURCE outside `layers`, to relink as well.
    pub extra_children: Vec<PathBuf>,
    pub keep: bool,
    /// Who waits for the space of the deleted layers (`free`); the caller
    /// sets it, [`FreeSpace::Wait`] unless it does.
    pub free: FreeSpace,
}

impl Plan {
    pub fn source(&self) -> &Path {
        self.layers[self.s].path()
    }

    pub fn destination(&self) -> &Path {
        self.layers[self.d].path()
    }
}

/// Find the layer a command names: a path (same file) or a file name.
pub fn find_layer(layers: &[Arc<dyn Layer>], name: &str) -> Result<usize> {
    if name.contains('/') {
        let want = canonical(Path::new(name));
        if let Some(i) = layers.iter().position(|l| canonical(l.path()) == want) {
            return Ok(i);
        }
        if !Path::new(name).exists() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("{name}: no such file"),
            ));
        }
        return Err(Error::invalid(format!("{name}: not a layer of this chain")));
    }
    let hits: Vec<usize> = layers
        .iter()
        .enumerate()
        .filter(|(_, l)| l.path().file_name().is_some_and(|n| n == name))
        .map(|(i, _)| i)
        .collect();
    match hits[..] {
        [i] => Ok(i),
        [] => Err(Error::new(
            ErrorKind::NotFound,
            format!("{name}: no layer of this chain has that name"),
        )),
        _ => Err(Error::invalid(format!(
            "{name}: several layers have that name; give the full path"
        ))),
    }
}

/// The chain as file names, leaf first: `leaf -> mid -> base`.
pub fn chain_order(layers: &[Arc<dyn Layer>]) -> String {
    let names: Vec<String> = layers
        .iter()
        .map(|l| {
            l.path()
                .file_name()
                .unwrap_or(l.path().as_os_str())
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.join(" -> ")
}

/// Check a merge request against a chain (leaf first): names, order,
/// formats, siblings, access. Changes nothing. `caller` is the user of a
/// control-file command; `None` is the command line, and messages then
/// name its options (`--force`) instead of the control words (`force`).
pub fn plan(layers: Layers, req: &MergeRequest, caller: Option<Caller>) -> Result<Plan> {
    plan_with(layers, req, caller, &[])
}

/// [`plan`], with the `--parent CHILD=PATH` overrides the chain was opened
/// with: the children and bystanders of a layer are the disks whose chains,
/// opened with them and `--parent-dir`, take it as their parent
/// (`crate::dependents`).
pub fn plan_with(
    layers: Layers,
    req: &MergeRequest,
    caller: Option<Caller>,
    overrides: &[(PathBuf, PathBuf)],
) -> Result<Plan> {
    let (force_word, keep_word) = match caller {
        Some(_) => ("`force`", "`keep`"),
        None => ("--force", "--keep"),
    };
    let rule = |e: Error| {
        Error::new(
            e.kind,
            format!(
                "{e}; DESTINATION must be an ancestor of SOURCE, and the chain is {} (leaf first)",
                chain_order(&layers)
            ),
        )
    };
    let s = find_layer(&layers, &req.source)?;
    let d = find_layer(&layers, &req.destination).map_err(rule)?;
    if d <= s {
        return Err(rule(Error::invalid(format!(
            "{} is not an ancestor of {}",
            layers[d].path().display(),
            layers[s].path().display()
        ))));
    }
    // The child above SOURCE will have DESTINATION as its parent: its
    // format must allow that (the chain already allows each link).
    let df = layers[d].info().format;
    if s > 0 && !may_have_parent(layers[s - 1].info().format, df) {
        let c = &layers[s - 1];
        return Err(mixed_error(c.path(), c.info().format, df, layers[d].path()));
    }
    // Who depends on the layers this merge changes or removes?
    // The chain's own files, by device and inode (a second name of a layer
    // is that layer, not a child of it).
    let members: HashSet<(u64, u64)> = layers.iter().filter_map(|l| file_id(l.path())).collect();
    let dirs = dependents::folders(layers.iter().map(|l| l.path()), &req.parent_dirs);
    // A rerun of an interrupted merge: children it already relinked point
    // at DESTINATION; they are this merge's children, not bystanders.
    let relinked: HashSet<PathBuf> = match intent::read(layers[s].path())? {
        Some(r) if canonical(&r.destination) == canonical(layers[d].path()) => {
            r.children.iter().map(|c| canonical(c)).collect()
        }
        _ => HashSet::new(),
    };
    for c in &relinked {
        if c.exists() && peek(c).is_none() {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "{}: a child this merge relinks cannot be read; not going on",
                    c.display()
                ),
            ));
        }
    }
    // Children of SOURCE outside the chain are relinked with it; children
    // of the layers below it, down to DESTINATION, are bystanders the merge
    // would break. Whether a file names a layer as its parent is the
    // drivers' answer (identity, or name for formats without one).
    let chain_opts = crate::chain::ChainOptions {
        parent_dirs: req.parent_dirs.clone(),
        overrides: overrides.to_vec(),
        ..Default::default()
    };
    let child_of = |f: &dependents::Found, l: &Arc<dyn Layer>| {
        f.is_child_of(l.path(), l.info().unique_id, &chain_opts)
    };
    let mut extra_children = Vec::new();
    let mut siblings = Vec::new();
    for f in dependents::scan(&dirs, overrides) {
        let canon = canonical(&f.path);
        if file_id(&f.path).is_some_and(|id| members.contains(&id)) {
            continue;
        }
        if child_of(&f, &layers[s]) || relinked.contains(&canon) {
            extra_children.push(f.path);
        } else if layers[s + 1..=d].iter().any(|l| child_of(&f, l)) {
            siblings.push(f.path);
        }
    }
    if let Some((c, cf)) = extra_children.iter().find_map(|c| {
        let cf = peek(c)?.format;
        (!may_have_parent(cf, df)).then_some((c, cf))
    }) {
        return Err(mixed_error(c, cf, df, layers[d].path()));
    }
    if !siblings.is_empty() && !req.force {
        let list: Vec<String> = siblings.iter().map(|p| p.display().to_string()).collect();
        return Err(Error::new(
            ErrorKind::InvalidState,
            format!(
                "other differencing disks depend on layers this merge changes, and would be corrupted: {} (add {force_word} to merge anyway)",
                list.join(", ")
            ),
        ));
    }
    layers[d].refuse_as_merge_destination()?;
    // Formats that link by name allow layers of other sizes (qemu's
    // backing files); a merge across them would drop or invent data.
    let dsize = layers[d].virtual_size();
    if let Some(l) = layers[s..d].iter().find(|l| l.virtual_size() != dsize) {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{}: its virtual size {} differs from DESTINATION {}'s {dsize}: merging layers of different sizes is not supported",
                l.path().display(),
                l.virtual_size(),
                layers[d].path().display()
            ),
        ));
    }
    if let Some(c) = caller {
        let mut need: Vec<&Path> = layers[s..=d].iter().map(|l| l.path()).collect();
        if s > 0 {
            need.push(layers[s - 1].path());
        }
        need.extend(extra_children.iter().map(|p| p.as_path()));
        for p in need {
            if !may_write(p, c) {
                return Err(Error::new(
                    ErrorKind::AccessDenied,
                    format!("{}: uid {} may not write it", p.display(), c.uid),
                ));
            }
        }
        if !req.keep {
            for l in &layers[s..d] {
                let dir = folder_of(l.path());
                if !may_write(dir, c) {
                    return Err(Error::new(
                        ErrorKind::AccessDenied,
                        format!(
                            "{}: uid {} may not delete files in it (use {keep_word})",
                            dir.display(),
                            c.uid
                        ),
                    ));
                }
            }
        }
    }
    Ok(Plan {
        layers,
        s,
        d,
        extra_children,
        keep: req.keep,
        free: FreeSpace::Wait,
    })
}

/// Permission to write `p` for `c` (owner, group or other bits; root may).
fn may_write(p: &Path, c: Caller) -> bool {
    let Ok(md) = std::fs::metadata(p) else {
        return false;
    };
    if c.uid == 0 {
        return true;
    }
    let mode = md.mode();
    let dir_x = if md.is_dir() { 0o1 } else { 0 };
    let bits = if md.uid() == c.uid {
        mode >> 6
    } else if md.gid() == c.gid {
        mode >> 3
    } else {
        mode
    };
    bits & 0o2 != 0 && bits & dir_x == dir_x
}

/// Reopen `l` for writing in this process: drop our shared lock, open
/// writable (exclusive lock), or take the shared lock back on failure.
fn reopen_writable(l: &Arc<dyn Layer>, cache: &LayerOptions) -> Result<Arc<dyn Layer>> {
    if l.writable() {
        return Ok(l.clone());
    }
    l.set_lock(LockMode::Unlocked)?;
    match open_layer(
        l.path(),
        &LayerOptions {
            writable: true,
            ..cache.clone()
        },
    ) {
        Ok(w) => Ok(w),
        Err(e) => {
            if let Err(e2) = l.set_lock(LockMode::Shared) {
                log::error!(
                    "{}: cannot take the shared lock back: {e2}",
                    l.path().display()
                );
            }
            Err(e)
        }
    }
}

/// One piece of a copy window: `len` bytes at virtual `offset`, found in
/// `span` (data of some layer, or zeros that hide what lies below).
type Run = (u64, Span, u64);

/// Data read for DESTINATION: `(virtual offset, length, zeros?)` pieces;
/// the bytes of the non-zero ones follow each other in `data`.
struct Batch {
    pieces: Vec<(u64, u64, bool)>,
    data: Vec<u8>,
}

/// Copy what `layers[s..d]` show over `ranges` into `dest`.
///
/// Two threads. The reader goes by windows of virtual space: it resolves
/// a window's runs (their tables fetched ahead, DESTINATION's too) and
/// tells the kernel about all their data at once, and only then reads the
/// window before it, so the reads of the next window are in flight while
/// this one is read (a layer's blocks sit in write order, not in disk
/// order, so they are scattered). This thread writes what the reader hands
/// over into DESTINATION meanwhile; at most `QUEUE` batches wait between
/// them, so memory stays bounded.
fn copy_ranges(
    layers: &[Arc<dyn Layer>],
    s: usize,
    d: usize,
    dest: &Arc<dyn Layer>,
    ranges: &[(u64, u64)],
    size: u64,
    progress: &Progress,
) -> Result<()> {
    const BATCH: u64 = 4 << 20;
    const WINDOW: u64 = 64 << 20;
    const QUEUE: usize = 4;
    let ss = dest.sector_size() as u64;
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Batch>(QUEUE);
    let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || -> Result<()> {
            let mut batch = Batch {
                pieces: Vec::new(),
                data: Vec::with_capacity(BATCH as usize),
            };
            let read = |runs: Vec<Run>, batch: &mut Batch| -> Result<bool> {
                for (off, span, n) in runs {
                    let at = batch.data.len();
                    match span {
                        Span::Data { depth, file_offset } => {
                            batch.data.resize(at + n as usize, 0);
                            layers[depth].read_data(file_offset, &mut batch.data[at..])?;
                        }
                        Span::Encoded { depth } => {
                            batch.data.resize(at + n as usize, 0);
                            layers[depth].read_encoded(off, &mut batch.data[at..])?;
                        }
                        Span::Zero | Span::Below => {}
                    }
                    batch.pieces.push((off, n, span == Span::Zero));
                    if batch.data.len() as u64 >= BATCH || batch.pieces.len() >= 1024 {
                        let mut data = empty_rx.try_recv().unwrap_or_default();
                        data.clear();
                        let pieces = std::mem::take(&mut batch.pieces);
                        let full = std::mem::replace(&mut batch.data, data);
                        if full_tx.send(Batch { pieces, data: full }).is_err() {
                            return Ok(false); // the writer stopped
                        }
                    }
                }
                Ok(true)
            };
            let mut ahead: Option<Vec<Run>> = None;
            for &(start, len) in ranges {
                let end = (start + len).next_multiple_of(ss).min(size);
                let mut wstart = start - start % ss;
                while wstart < end {
                    if progress.cancel.load(Ordering::Relaxed) {
                        return Err(Error::new(ErrorKind::InvalidState, "merge cancelled"));
                    }
                    let wend = (wstart + WINDOW).min(end);
                    let runs = window_runs(layers, s, d, wstart, wend, BATCH)?;
                    // DESTINATION's bitmaps of the blocks the window writes.
                    dest.prefetch(wstart, wend - wstart);
                    if let Some(prev) = ahead.replace(runs) {
                        if !read(prev, &mut batch)? {
                            return Ok(());
                        }
                    }
                    wstart = wend;
                }
            }
            if let Some(last) = ahead {
                read(last, &mut batch)?;
            }
            if !batch.pieces.is_empty() {
                let _ = full_tx.send(batch);
            }
            Ok(())
        });
        let zeros = vec![0u8; BATCH as usize];
        // DESTINATION's own view (for pieces it stores in larger units:
        // `Layer::write_fill`): it and the layers below it.
        let below: Vec<Arc<dyn Layer>> = std::iter::once(dest.clone())
            .chain(layers[d + 1..].iter().cloned())
            .collect();
        let write = |off: u64, part: &[u8]| -> Result<()> {
            match dest.write_fill(off, part.len() as u64)? {
                None => dest.write_sectors(off, part),
                Some((a, b)) => {
                    let mut buf = vec![0u8; (b.min(size) - a) as usize];
                    crate::image::read_layers(&below, 0, a, &mut buf)?;
                    let at = (off - a) as usize;
                    buf[at..at + part.len()].copy_from_slice(part);
                    dest.write_sectors(a, &buf)
                }
            }
        };
        let mut written = Ok(());
        // Write-behind: every WRITE_BEHIND bytes, DESTINATION's writeback
        // is started, so the flush after the copy has little left.
        const WRITE_BEHIND: u64 = 32 << 20;
        let mut unsent = 0u64;
        for batch in full_rx.iter() {
            let mut at = 0;
            for &(off, n, zero) in &batch.pieces {
                let part = if zero {
                    &zeros[..n as usize]
                } else {
                    at += n as usize;
                    &batch.data[at - n as usize..at]
                };
                if let Err(e) = write(off, part) {
                    written = Err(e);
                    break;
                }
                progress.bytes_done.fetch_add(n, Ordering::Relaxed);
                unsent += n;
            }
            if written.is_err() {
                break;
            }
            if unsent >= WRITE_BEHIND {
                dest.write_behind();
                unsent = 0;
            }
            let _ = empty_tx.send(batch.data);
        }
        // Stops the reader at its next hand-over if this side failed.
        drop(full_rx);
        let read = reader
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        written.and(read)
    })
}

/// Resolve `wstart..wend` into runs of at most `max` bytes (adjacent pieces
/// of one layer's file joined) and start reading their data.
fn window_runs(
    layers: &[Arc<dyn Layer>],
    s: usize,
    d: usize,
    wstart: u64,
    wend: u64,
    max: u64,
) -> Result<Vec<Run>> {
    for l in &layers[s..d] {
        l.prefetch(wstart, wend - wstart);
    }
    let mut runs: Vec<Run> = Vec::new();
    let mut off = wstart;
    while off < wend {
        let (span, n) = resolve_span(layers, s, d, off, (wend - off).min(max))?;
        match (runs.last_mut(), span) {
            (
                Some((roff, Span::Data { depth, file_offset }, rn)),
                Span::Data {
                    depth: dd,
                    file_offset: fo,
                },
            ) if *depth == dd
                && *roff + *rn == off
                && *file_offset + *rn == fo
                && *rn + n <= max =>
            {
                *rn += n
            }
            _ if span != Span::Below => runs.push((off, span, n)),
            _ => {}
        }
        off += n;
    }
    for &(_, span, n) in &runs {
        if let Span::Data { depth, file_offset } = span {
            layers[depth].will_need(file_offset, n);
        }
    }
    Ok(runs)
}

/// A layer the merge opened for writing that the chain only reads from
/// now: reopen it read-only with a shared lock, so other readers may share
/// it again. Best effort: on failure the writable one is kept.
fn share(l: &Arc<dyn Layer>, opts: &LayerOptions) -> Arc<dyn Layer> {
    let reopen = || -> Result<Arc<dyn Layer>> {
        l.flush()?;
        l.set_lock(LockMode::Unlocked)?;
        open_layer(
            l.path(),
            &LayerOptions {
                writable: false,
                ..opts.clone()
            },
        )
    };
    match reopen() {
        Ok(r) => r,
        Err(e) => {
            log::warn!("{}: stays open for writing: {e}", l.path().display());
            if let Err(e) = l.set_lock(LockMode::Exclusive) {
                log::error!("{}: cannot lock it again: {e}", l.path().display());
            }
            l.clone()
        }
    }
}

/// Delete (or with `keep`, detach) the merged layers. For
/// [`FreeSpace::InHelper`] a [`Holder`] takes descriptors of them first
/// (best effort: without one, the merge frees the space itself).
fn retire(
    layers: &[Arc<dyn Layer>],
    keep: bool,
    opts: &LayerOptions,
    free: FreeSpace,
) -> Result<Option<Holder>> {
    let holder = if !keep && free == FreeSpace::InHelper {
        let paths: Vec<&Path> = layers.iter().map(|l| l.path()).collect();
        Holder::start(&paths)
            .inspect_err(|e| log::info!("merge: no helper to free the merged layers: {e}"))
            .ok()
    } else {
        None
    };
    for l in layers {
        if keep {
            reopen_writable(l, opts)?.relink(ParentChange::Detach)?;
        } else {
            crate::fault::point()?;
            std::fs::remove_file(l.path())
                .map_err(|e| Error::io(l.path(), "cannot delete merged file", None, e))?;
            intent::sync_dir(l.path())?;
        }
    }
    Ok(holder)
}

/// The pre-flight space check: the bytes `layers[s..d]` hold (what the
/// copy moves), after making sure DESTINATION's file system has room for
/// the blocks the copy will allocate in it (whole blocks; DESTINATION's
/// unreferenced tail was already given back when it was opened for
/// writing, so `statvfs` counts it as free). Refuses with `NoSpace` naming
/// both numbers, before the intent record or any data is written.
fn preflight(
    layers: &[Arc<dyn Layer>],
    s: usize,
    d: usize,
    dest: &Arc<dyn Layer>,
    size: u64,
) -> Result<u64> {
    for l in &layers[s..d] {
        l.prefetch(0, size);
    }
    let mut total = 0;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut off = 0;
    while off < size {
        let (span, n) = resolve_span(layers, s, d, off, size - off)?;
        if span != Span::Below {
            total += n;
            match ranges.last_mut() {
                Some(r) if r.0 + r.1 == off => r.1 += n,
                _ => ranges.push((off, n)),
            }
        }
        off += n;
    }
    let needed = dest.space_for(&ranges)?;
    if needed == 0 {
        return Ok(total);
    }
    let free = crate::format::space::free_space(dest.path())?;
    log::info!(
        "merge: {} needs up to {needed} bytes more, {free} free",
        dest.path().display()
    );
    if needed > free {
        use crate::size::human;
        return Err(Error::new(
            ErrorKind::NoSpace,
            format!(
                "{}: not enough space for the merge: it needs {needed} bytes ({}) more for the \
                 blocks it would allocate, its file system has {free} bytes ({}) free; nothing \
                 was written",
                dest.path().display(),
                human(needed),
                human(free)
            ),
        ));
    }
    Ok(total)
}

/// Run a planned merge on `image` (whose layers the plan was made from).
pub fn execute(image: &FlatImage, plan: Plan, progress: &Progress) -> Result<()> {
    let Plan {
        layers,
        s,
        d,
        extra_children,
        keep,
        free,
    } = plan;
    let opts = LayerOptions {
        writable: true,
        ignore_checksums: false,
        cache: image.cache(),
    };
    // 1. Write access. Every step here is undone if a later one fails.
    let mut relock: Vec<Arc<dyn Layer>> = Vec::new();
    let mut phase = None;
    let mut holder = None;
    let result = (|| -> Result<()> {
        let dest = reopen_writable(&layers[d], &opts)?;
        if !layers[d].writable() {
            relock.push(layers[d].clone());
        }
        for l in &layers[s..d] {
            if !l.writable() {
                l.set_lock(LockMode::Exclusive)?;
                relock.push(l.clone());
            }
        }
        let child = if s > 0 {
            let c = reopen_writable(&layers[s - 1], &opts)?;
            if !layers[s - 1].writable() {
                relock.push(layers[s - 1].clone());
            }
            Some(c)
        } else {
            None
        };
        let mut extra = Vec::new();
        for p in &extra_children {
            extra.push(open_layer(p, &opts)?);
        }
        // Before anything is written: will DESTINATION's new blocks fit?
        // (Its reopening above gave back any tail an interrupted run left.)
        let size = image.size();
        let total = preflight(&layers, s, d, &dest, size)?;
        // A format whose identity follows the data (`id_follows_data`)
        // has the layer above DESTINATION accept its next identity first, so
        // the chain keeps opening while DESTINATION changes.
        if dest.info().id_follows_data {
            let above = reopen_writable(&layers[d - 1], &opts)?;
            if !layers[d - 1].writable() {
                relock.push(layers[d - 1].clone());
            }
            above.relink(ParentChange::Expect(dest.as_ref()))?;
        }

        // 2. Intent.
        let mut record = Record {
            version: 1,
            phase: Phase::Copy,
            // Absolute paths: the record must mean the same files from any
            // working folder.
            source: canonical(layers[s].path()),
            destination: canonical(layers[d].path()),
            removed: layers[s..d].iter().map(|l| canonical(l.path())).collect(),
            children: child
                .iter()
                .chain(extra.iter())
                .map(|c| canonical(c.path()))
                .collect(),
            keep,
            destination_id: layers[d]
                .info()
                .unique_id
                .map(|u| u.to_string())
                .unwrap_or_default(),
            crc32c: 0,
        };
        record.write()?;
        phase = Some(Phase::Copy);

        // 3. Copy.
        let live_leaf = s == 0 && layers[0].writable();
        if live_leaf {
            image.track_writes(true);
        }
        let t = std::time::Instant::now();
        progress.bytes_total.store(total, Ordering::Relaxed);
        copy_ranges(&layers, s, d, &dest, &[(0, size)], size, progress)?;
        log::info!("merge: copied in {:?}", t.elapsed());
        dest.flush()?;
        log::info!("merge: destination flushed at {:?}", t.elapsed());

        let mut new_layers: Vec<Arc<dyn Layer>> = Vec::new();
        if live_leaf {
            // 4b. Catch up with writes to the leaf, then switch with writes held.
            loop {
                let dirty = image.take_dirty();
                let bytes: u64 = dirty.iter().map(|r| r.1).sum();
                progress.bytes_total.fetch_add(bytes, Ordering::Relaxed);
                copy_ranges(&layers, s, d, &dest, &dirty, size, progress)?;
                if bytes < (64 << 20) {
                    break;
                }
            }
            let _gate = image.pause_writes();
            let dirty = image.take_dirty();
            copy_ranges(&layers, s, d, &dest, &dirty, size, progress)?;
            dest.flush()?;
            image.track_writes(false);
            for c in &extra {
                c.relink(ParentChange::Set(dest.as_ref()))?;
            }
            record.phase = Phase::Relinked;
            record.write()?;
            phase = Some(Phase::Relinked);
            holder = retire(&layers[s..d], keep, &opts, free)?;
            new_layers.push(dest.clone());
            new_layers.extend(layers[d + 1..].iter().cloned());
            image.swap_layers(new_layers.into());
        } else {
            // 4a. Relink the children of SOURCE.
            record.phase = Phase::Relinking;
            record.write()?;
            phase = Some(Phase::Relinking);
            for c in child.iter().chain(extra.iter()) {
                c.relink(ParentChange::Set(dest.as_ref()))?;
            }
            record.phase = Phase::Relinked;
            record.write()?;
            phase = Some(Phase::Relinked);
            if let Some(c) = &child {
                new_layers.extend(layers[..s - 1].iter().cloned());
                // A relinked child below the leaf goes back to read-only.
                new_layers.push(if s - 1 > 0 {
                    share(c, &opts)
                } else {
                    c.clone()
                });
            }
            new_layers.push(share(&dest, &opts));
            new_layers.extend(layers[d + 1..].iter().cloned());
            image.swap_layers(new_layers.into());
            holder = retire(&layers[s..d], keep, &opts, free)?;
        }
        // 6. Done.
        intent::remove(layers[s].path())?;
        relock.clear();
        Ok(())
    })();
    if result.is_err() {
        image.track_writes(false);
        if progress.cancel.load(Ordering::Relaxed) && phase == Some(Phase::Copy) {
            // Cancelled while copying: the chain never changed; nothing to
            // finish, so no record to keep.
            if let Err(e) = intent::remove(layers[s].path()) {
                log::error!("{e}");
            }
        }
        for l in relock {
            if let Err(e) = l.set_lock(LockMode::Shared) {
                log::error!(
                    "{}: cannot take the shared lock back: {e}",
                    l.path().display()
                );
            }
        }
    } else {
        if !keep {
            let each = layers.to_vec();
            drop(layers);
            free::close(each, free, holder);
        }
        progress.finish();
    }
    result
}

/// Finish a merge whose record says `relinked`: retire what is left.
pub fn finish(record: &Record, cache: &LayerOptions) -> Result<()> {
    if record.phase != Phase::Relinked {
        return Err(Error::new(
            ErrorKind::InvalidState,
            format!("{record}: it must be rerun from its chain, not finished"),
        ));
    }
    for p in &record.removed {
        if !p.exists() {
            continue;
        }
        if record.keep {
            // Also when already detached: the writable open finishes a
            // detach a crash cut short (the driver's relink recovery), and
            // detaching a detached layer changes nothing.
            if peek(p).is_some_and(|k| k.parent.is_some()) {
                open_layer(p, cache)?.relink(ParentChange::Detach)?;
            }
        } else {
            crate::fault::point()?;
            std::fs::remove_file(p)
                .map_err(|e| Error::io(p, "cannot delete merged file", None, e))?;
            intent::sync_dir(p)?;
        }
    }
    intent::remove(&record.source)
}
