//! qcow2 images (qemu's format, versions 2 and 3), per qemu's
//! `docs/interop/qcow2.txt`: the on-disk structures (`structs`) and the
//! layer driver.
//!
//! Everything is big-endian and allocated in clusters of `1 << cluster_bits`
//! bytes (512 B to 2 MiB). The first cluster holds the header, the header
//! extensions and the backing file name:
//!
//! ```text
//! cluster 0: [header 72 (v2) | header_length >= 104 (v3)][ext type,len,data pad8]..[end 0]  ..  [backing name]
//! elsewhere: [L1 table, contiguous] [refcount table, contiguous] [snapshot table]
//!            [L2 tables, refcount blocks, data clusters: one cluster each, any order]
//!
//! guest offset ─▶ L1[cluster / l2_entries] ─▶ L2 table ─▶ L2[cluster % l2_entries]
//!                 (0: unallocated)               ├─ standard: host cluster | zero flag | unallocated → backing file
//!                                                ├─ compressed: byte offset + sector count (not cluster aligned)
//!                                                └─ extended L2 (128-bit): cluster + 32 allocated bits + 32 zero bits
//! host cluster ─▶ refcount table[c / rb_entries] ─▶ refcount block[c % rb_entries] (1 << refcount_order bits each)
//! ```
//!
//! The header's L1 table is the active disk; snapshot table entries point to
//! other L1 tables that share clusters through refcounts greater than one
//! (the COPIED bit 63 marks an entry whose refcount is exactly one, so it
//! may be written in place).
//!
//! Parsers take bytes and the absolute file offset they came from, so every
//! [`crate::error::Error`] names the offset and the field; [`in_file`] adds
//! the path once the driver knows it. Validation follows qemu: what qemu
//! refuses to open is refused here (corrupt or unsupported), what qemu
//! reads despite a spec violation (reserved bits in table entries) is read.
//!
//! The driver (`read` for the lookups behind `map()`, `check`):
//! * Opening refuses encrypted images (naming the method), unknown
//!   incompatible feature bits, and a writable open of an image marked
//!   corrupt; a read-only open of a corrupt image works with a warning. A
//!   dirty image (lazy refcounts left behind by a crash) reads correctly
//!   read-only and is not changed: reading never looks at refcounts; its
//!   refcounts are rebuilt before the first write (`rebuild`).
//! * The active L1 table (the entries the virtual size needs: a few KiB
//!   even for TiB disks) is kept in memory; L2 tables are read in slices of
//!   at most 4 KiB through the shared [`MetaCache`] (`Key::detail`, one
//!   slice per key), so memory stays within the cache budget.
//! * Unallocated clusters are the parent's (`Extent::Parent`) when the
//!   image has a backing file, zeros otherwise; zero clusters (and, with
//!   extended L2, zero subclusters) are zeros whatever lies below;
//!   compressed clusters are `Extent::Encoded`, decoded by `read_encoded`
//!   (zlib: raw deflate; zstd: one frame), one cluster at a time with the
//!   last one decoded kept.
//! * An external data file (incompatible bit 2) is named relative to the
//!   image's folder; every data offset is then an offset in it.
//! * The parent link is by name only (qcow2 records no parent identity):
//!   one hint, the backing file name as stored (the chain resolves it from
//!   the child's folder, as qemu does), and the backing format, which
//!   decides the parent's driver. A backing name starting with
//!   [`DETACHED_PREFIX`] marks an image a merge detached from its parent:
//!   neither chainfs nor qemu (which sees an unknown protocol) opens it as a
//!   chain.

mod alloc;
mod check;
mod create;
mod read;
mod rebuild;
mod relink;
pub mod structs;
mod write;

pub use structs::*;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::cache::{new_layer_key, MetaCache};
use crate::error::{Error, IoContext, Result};
use crate::format::pending::Pending;
use crate::format::registry::{Driver, Peek};
use crate::format::{
    lock_file, open_file, Extent, Layer, LayerInfo, LayerOptions, LockMode, ParentHint, ParentLink,
};
use crate::paths::folder_of;

/// The registry entry.
pub static DRIVER: Driver = Driver {
    name: "qcow2",
    extensions: &["qcow2", "qcow"],
    parents: &["qcow2", "raw"],
    probe,
    open: |file, path, opts| Ok(Arc::new(Qcow2Layer::open(file, path, opts)?)),
    create: create::create,
    peek,
    create_versions: &["1.1", "0.10"],
    create_subblocks: true,
};

/// The backing file name of an image a merge detached from its parent
/// starts with this (followed by the old name). qemu reads the prefix as
/// an unknown protocol and refuses to open the image; chainfs reports the
/// link as detached.
pub const DETACHED_PREFIX: &str = "chainfs-merged-away:";

/// Prefix a parser's error with the file it came from, keeping its kind.
pub fn in_file(e: Error, path: &Path) -> Error {
    Error::new(e.kind, format!("{}: {}", path.display(), e.message()))
}

/// Does this file start with the qcow2 magic `QFI\xfb`? Version 1 (the
/// older qcow, another format) is left to the "what is it" message; any
/// other version is claimed, so a damaged header is refused by the open
/// naming the field (never read as raw under a `.img` name).
pub fn probe(file: &File, path: &Path) -> Result<bool> {
    let len = file.metadata().ctx(path, "cannot stat", None)?.len();
    if len < 8 {
        return Ok(false);
    }
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, 0)
        .ctx(path, "cannot read the header", Some(0))?;
    let version = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
    Ok(b[..4] == MAGIC && version != 1)
}

/// Read and parse the header from the first cluster of `file`.
fn read_header(file: &File, path: &Path, len: u64) -> Result<Header> {
    let mut head = vec![0u8; len.min(512) as usize];
    file.read_exact_at(&mut head, 0)
        .ctx(path, "cannot read the header", Some(0))?;
    // cluster_bits (offset 20) says how much of the file the header area
    // may take; the parser validates it.
    let bits = if head.len() >= 24 {
        u32::from_be_bytes([head[20], head[21], head[22], head[23]])
            .clamp(MIN_CLUSTER_BITS, MAX_CLUSTER_BITS)
    } else {
        MIN_CLUSTER_BITS
    };
    let want = len.min(1 << bits) as usize;
    if want > head.len() {
        head.resize(want, 0);
        file.read_exact_at(&mut head, 0)
            .ctx(path, "cannot read the header", Some(0))?;
    }
    Header::parse(&head).map_err(|e| in_file(e, path))
}

/// One qcow2 file.
pub struct Qcow2Layer {
    path: PathBuf,
    file: File,
    /// The external data file (incompatible bit 2), where data clusters
    /// live instead of `file`.
    data: Option<(File, PathBuf)>,
    writable: bool,
    header: RwLock<Header>,
    layout: Layout,
    /// The active L1 table's raw entries (as many as the virtual size
    /// needs).
    l1: RwLock<Vec<u64>>,
    parent: RwLock<Option<ParentLink>>,
    cache: Arc<MetaCache>,
    key: u64,
    /// The cache's fill lock (see `crate::cache`).
    meta: RwLock<()>,
    /// The last compressed cluster decoded: (host offset, bytes).
    decoded: Mutex<Option<(u64, Arc<[u8]>)>>,
    /// Allocated bytes, counted once on demand.
    allocated: Mutex<Option<u64>>,
    /// The length of the file data clusters live in (the writer raises it
    /// before an L2 entry points past it): `map` never returns data
    /// beyond it.
    data_end: std::sync::atomic::AtomicU64,
    /// The writer's state (`alloc`), loaded on the first write; held
    /// across every write.
    alloc: Mutex<Option<alloc::WriteState>>,
    /// L2 entries written but not yet on disk, by the entry's file offset
    /// (both words; the second is 0 without extended L2): see `write`.
    pending: Pending<(u64, u64)>,
}

impl Qcow2Layer {
    pub fn open(file: File, path: &Path, opts: &LayerOptions) -> Result<Qcow2Layer> {
        let len = file.metadata().ctx(path, "cannot stat", None)?.len();
        let header = read_header(&file, path, len)?;
        header
            .check_supported(opts.writable)
            .map_err(|e| in_file(e, path))?;
        if header.is_corrupt() {
            log::warn!(
                "{}: the image is marked corrupt (incompatible bit 1); reading it anyway, read-only \
                 (`qemu-img check -r all` repairs it)",
                path.display()
            );
        }
        let layout = header.layout();
        let data =
            match (layout.external_data, header.data_file()) {
                (false, _) => None,
                (true, None) => return Err(Error::unsupported(
                    path,
                    "the image keeps its data in an external data file (incompatible bit 2) but \
                     does not name it (no data file header extension)",
                )),
                (true, Some(name)) => {
                    let name = String::from_utf8_lossy(name).into_owned();
                    let dp = folder_of(path).join(&name);
                    let f = open_file(&dp, opts.writable).map_err(|e| {
                        Error::new(
                            e.kind,
                            format!("{}: external data file {name:?}: {e}", path.display()),
                        )
                    })?;
                    Some((f, dp))
                }
            };
        let l1 = read_l1(&file, path, &header, len)?;
        let data_end = match &data {
            Some((f, dp)) => f.metadata().ctx(dp, "cannot stat", None)?.len(),
            None => len,
        };
        let layer = Qcow2Layer {
            path: path.to_path_buf(),
            file,
            data,
            writable: opts.writable,
            layout,
            l1: RwLock::new(l1),
            parent: RwLock::new(parent_link(&header)),
            header: RwLock::new(header),
            cache: opts.cache.clone(),
            key: new_layer_key(),
            meta: RwLock::new(()),
            decoded: Mutex::new(None),
            allocated: Mutex::new(None),
            data_end: std::sync::atomic::AtomicU64::new(data_end),
            alloc: Mutex::new(None),
            pending: Pending::default(),
        };
        Ok(layer)
    }

    pub fn header(&self) -> Header {
        self.header.read().clone()
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The file data clusters live in, and its path.
    fn data_place(&self) -> (&File, &Path) {
        match &self.data {
            Some((f, p)) => (f, p),
            None => (&self.file, &self.path),
        }
    }

    fn file_len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .ctx(&self.path, "cannot stat", None)?
            .len())
    }
}

/// The active L1 table: the entries the virtual size needs (the rest of a
/// longer table maps nothing a reader can reach).
fn read_l1(file: &File, path: &Path, h: &Header, len: u64) -> Result<Vec<u64>> {
    let n = h.layout().l1_entries_for(h.size);
    let bytes = n * 8;
    let at = h.l1_table_offset;
    if at.saturating_add(bytes) > len {
        return Err(Error::corrupt(
            path,
            40,
            format!(
                "the L1 table ({n} entries at {at:#x}) runs past the end of the file ({len} bytes)"
            ),
        ));
    }
    let mut b = vec![0u8; bytes as usize];
    file.read_exact_at(&mut b, at)
        .ctx(path, "cannot read the L1 table", Some(at))?;
    Ok(b.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// The parent link the header records (see the module docs).
fn parent_link(h: &Header) -> Option<ParentLink> {
    let name = String::from_utf8_lossy(h.backing_file.as_deref()?).into_owned();
    let detached = name.starts_with(DETACHED_PREFIX);
    Some(ParentLink {
        ids: Vec::new(),
        hints: vec![ParentHint {
            source: "backing file".to_string(),
            stored: name,
        }],
        detached,
        format: h
            .backing_format()
            .map(|f| String::from_utf8_lossy(f).into_owned()),
    })
}

/// Format and parent link of a qcow2 file, without locking it.
fn peek(path: &Path) -> Option<Peek> {
    let file = File::open(path).ok()?;
    if !std::fs::metadata(path).ok()?.is_file() || !probe(&file, path).ok()? {
        return None;
    }
    let len = file.metadata().ok()?.len();
    let h = read_header(&file, path, len).ok()?;
    Some(Peek {
        format: DRIVER.name,
        id: None,
        parent: parent_link(&h),
    })
}

impl Layer for Qcow2Layer {
    fn path(&self) -> &Path {
        &self.path
    }

    fn info(&self) -> LayerInfo {
        let h = self.header.read();
        LayerInfo {
            format: DRIVER.name,
            disk_type: if h.version == 2 { "v2" } else { "v3" },
            virtual_size: h.size,
            block_size: Some(h.cluster_size()),
            sector_size: 512,
            unique_id: None,
            id_follows_data: false,
            creator: String::new(),
        }
    }

    fn parent(&self) -> Option<ParentLink> {
        self.parent.read().clone()
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        self.map_impl(offset, len)
    }

    fn read_data(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        let (f, p) = self.data_place();
        let mut done = 0;
        while done < buf.len() {
            let at = file_offset + done as u64;
            let n = f
                .read_at(&mut buf[done..], at)
                .ctx(p, "cannot read data", Some(at))?;
            if n == 0 {
                // Past the end of the file: zeros, as qemu reads them (a
                // preallocated or raw external data file may be shorter).
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(())
    }

    fn read_encoded(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_encoded_impl(offset, buf)
    }

    fn will_need(&self, file_offset: u64, len: u64) {
        crate::format::fileio::will_need(self.data_place().0, file_offset, len);
    }

    fn data_file(&self) -> Option<&File> {
        Some(self.data_place().0)
    }

    fn write_behind(&self) {
        crate::format::fileio::write_behind(self.data_place().0);
    }

    fn allocated_bytes(&self) -> Result<u64> {
        let mut cached = self.allocated.lock();
        if let Some(n) = *cached {
            return Ok(n);
        }
        let n = self.count_allocated()?;
        *cached = Some(n);
        Ok(n)
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn write_sectors(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_impl(offset, data)
    }

    fn write_fill(&self, offset: u64, len: u64) -> Result<Option<(u64, u64)>> {
        if !self.writable {
            return Ok(None);
        }
        self.write_fill_impl(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.discard_impl(offset, len)
    }

    fn discard_unit(&self) -> u64 {
        self.layout.subcluster_size()
    }

    fn flush(&self) -> Result<()> {
        self.flush_impl()
    }

    fn check(&self) -> Result<Vec<String>> {
        check::check(self)
    }

    fn space_for(&self, ranges: &[(u64, u64)]) -> Result<u64> {
        self.space_for_impl(ranges)
    }

    fn set_lock(&self, mode: LockMode) -> Result<()> {
        // Giving up the exclusive lock ends the write session (its dirty
        // bit cleared while the lock still keeps other writers out): the
        // header is never written later from a copy another writer may
        // have changed meanwhile.
        if self.writable && mode != LockMode::Exclusive {
            self.close_impl()?;
        }
        lock_file(&self.file, &self.path, mode)?;
        if let Some((f, p)) = &self.data {
            lock_file(f, p, mode)?;
        }
        Ok(())
    }

    /// A merge into an image with internal snapshots is refused: the
    /// snapshots were taken over the chain below as it was, and qemu's
    /// tools would restore them over content the merge moved.
    fn refuse_as_merge_destination(&self) -> Result<()> {
        let n = self.header.read().nb_snapshots;
        if n == 0 {
            return Ok(());
        }
        Err(Error::new(
            crate::error::ErrorKind::InvalidState,
            format!(
                "{}: has {n} internal snapshot(s); merging into it is refused (delete them with \
                 `qemu-img snapshot -d`, or merge into another layer)",
                self.path.display()
            ),
        ))
    }

    /// `Set`/`Detach` rewrite the backing file name and format
    /// crash-safely (see `relink`); `Expect` has nothing to do (no ids).
    fn relink(&self, change: crate::format::ParentChange<'_>) -> Result<()> {
        self.relink_impl(change)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Drop for Qcow2Layer {
    fn drop(&mut self) {
        if self.writable {
            if let Err(e) = self.close_impl() {
                log::error!("{}: flush at close failed: {e}", self.path.display());
            }
        }
        self.cache.forget_layer(self.key);
    }
}
