//! VHDX layers (Hyper-V `.vhdx`, checkpoints `.avhdx`): fixed, dynamic and
//! differencing, per [MS-VHDX].
//!
//! ```text
//! [identifier 64K][header 1 @64K][header 2 @128K][region table 1 @192K][2 @256K] .. 1 MiB
//! [log][BAT][metadata][payload and sector-bitmap blocks, 1 MiB aligned]
//! ```
//!
//! Opening: the current header is the valid one with the larger sequence
//! number. A non-zero LogGuid means the log must be replayed before any
//! metadata is trusted: a read-only open replays it into an in-memory
//! overlay (`log::Overlay`) that every metadata read passes through, so a
//! dirty image is read right and never changed; a writable open replays it
//! into the file first (see `write`).
//! Which header is current, the regions and the metadata items are
//! decided by `layout`, a parser over bytes (fuzzable as [`fuzz_layout`]).
//!
//! Reading: payload block `n` has BAT entry `n + n / chunk_ratio`; its
//! state decides: FULLY_PRESENT is data, NOT_PRESENT is the parent (zeros
//! in a base), ZERO/UNMAPPED/UNDEFINED read as zeros even in a differencing
//! disk, PARTIALLY_PRESENT consults the chunk's sector bitmap (LSB-first: a
//! set bit is "in this file", a clear bit "from the parent").
//!
//! Identity: a child names its parent by the parent's DataWriteGuid
//! (`parent_linkage`, or `parent_linkage2` during a merge), which is what
//! `LayerInfo::unique_id` reports for a VHDX.

mod check;
pub mod create;
mod layout;
pub(crate) mod log;
mod space;
pub mod structs;
mod write;

pub use layout::{fuzz_layout, Layout};
pub use structs::*;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use uuid::Uuid;

use crate::cache::{new_layer_key, Key, MetaCache};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::pending::Pending;
use crate::format::registry::{Driver, Peek};
use crate::format::{
    lock_file, Extent, Layer, LayerInfo, LayerOptions, LockMode, ParentChange, ParentHint,
    ParentLink,
};

use layout::{MetaSource, RawFile, Source};

/// The registry entry.
pub static DRIVER: Driver = Driver {
    name: "vhdx",
    extensions: &["vhdx", "avhdx"],
    parents: &["vhdx"],
    probe,
    open: |file, path, opts| Ok(Arc::new(VhdxLayer::open(file, path, opts)?)),
    create: create::create_file,
    peek,
    create_versions: &[],
    create_subblocks: false,
};

const BAT_PAGE_ENTRIES: u64 = 512;

/// Does this file carry VHDX signatures? The `vhdxfile` identifier at 0,
/// or at least two of the four structure signatures (`head` at 64 KiB and
/// 128 KiB, `regi` at 192 KiB and 256 KiB): a VHDX whose identifier is
/// damaged is still claimed, and its open refuses it naming what is wrong,
/// so it is never read as raw bytes (a `.img` name would make raw claim
/// it). One 4-byte tag alone is too weak a sign: a file-system image may
/// hold one at those offsets by chance.
pub fn probe(file: &File, path: &Path) -> Result<bool> {
    let len = file.metadata().ctx(path, "cannot stat", None)?.len();
    let (ident, found) = layout::signatures(&RawFile { file, path }, len)?;
    Ok(ident == FILE_SIGNATURE || found.len() >= 2)
}

pub struct VhdxLayer {
    path: PathBuf,
    file: File,
    writable: bool,
    layout: RwLock<Layout>,
    overlay: log::Overlay,
    /// Whether the file was opened with a log still to replay (read-only).
    dirty_log: bool,
    parent: RwLock<Option<ParentLink>>,
    cache: Arc<MetaCache>,
    key: u64,
    meta: RwLock<()>,
    alloc: Mutex<()>,
    /// The file's length as the log says it is (reads stop here).
    data_end: AtomicU64,
    /// Where the next 1 MiB aligned block goes.
    next_alloc: AtomicU64,
    /// Payload/bitmap BAT entries written since the last flush: index -> entry.
    pending: Pending,
    dirty: AtomicBool,
    /// Allocated payload blocks, counted once on demand (None: recount).
    allocated: Mutex<Option<u64>>,
    /// The headers were updated for this writing session (new FileWriteGuid).
    session: AtomicBool,
    /// ... and the DataWriteGuid was changed in it.
    data_session: AtomicBool,
    session_lock: Mutex<()>,
    /// The DataWriteGuid the next data change will use (announced to
    /// children by a merge before it happens).
    next_id: Mutex<Option<Uuid>>,
}

impl VhdxLayer {
    pub fn open(file: File, path: &Path, opts: &LayerOptions) -> Result<VhdxLayer> {
        let len = file.metadata().ctx(path, "cannot stat", None)?.len();
        let raw = RawFile { file: &file, path };
        let layout::Parsed {
            layout,
            overlay,
            log_entries,
            len: layer_len,
        } = layout::parse_source(&raw, len, opts.ignore_checksums)?;
        let dirty_log = log_entries > 0;
        if dirty_log {
            ::log::info!(
                "{}: replaying {} log entries ({} sectors){}",
                path.display(),
                log_entries,
                overlay.sectors.len(),
                if opts.writable { "" } else { " in memory" }
            );
        }
        let mut layer = VhdxLayer {
            path: path.to_path_buf(),
            file,
            writable: opts.writable,
            parent: RwLock::new(None),
            overlay,
            dirty_log,
            cache: opts.cache.clone(),
            key: new_layer_key(),
            meta: RwLock::new(()),
            alloc: Mutex::new(()),
            data_end: AtomicU64::new(layer_len),
            next_alloc: AtomicU64::new(layer_len.next_multiple_of(MIB)),
            pending: Pending::default(),
            dirty: AtomicBool::new(false),
            allocated: Mutex::new(None),
            session: AtomicBool::new(false),
            data_session: AtomicBool::new(false),
            session_lock: Mutex::new(()),
            next_id: Mutex::new(None),
            layout: RwLock::new(layout),
        };
        let link = layer.parent_link();
        *layer.parent.get_mut() = link;
        if opts.writable && layer.dirty_log {
            layer.replay_into_file()?;
        }
        if opts.writable {
            // Space a crash left past the last referenced block is reused
            // (see `space`).
            layer.reclaim_tail()?;
        }
        Ok(layer)
    }

    /// Metadata bytes at `off`: the file as the log says it is.
    fn read_meta(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let raw = RawFile {
            file: &self.file,
            path: &self.path,
        };
        MetaSource {
            raw: &raw,
            overlay: &self.overlay,
            len: self.data_end.load(Ordering::Acquire),
        }
        .read(off, buf)
    }

    fn parent_link(&self) -> Option<ParentLink> {
        let l = self.layout.read();
        if !l.has_parent {
            return None;
        }
        let get = |k: &str| {
            l.locator
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let id = get("parent_linkage")
            .and_then(|v| parse_guid_text(&v))
            .unwrap_or_default();
        let alt_id = get("parent_linkage2")
            .and_then(|v| parse_guid_text(&v))
            .filter(|u| !u.is_nil());
        let mut hints = Vec::new();
        for key in ["relative_path", "absolute_win32_path", "volume_path"] {
            if let Some(v) = get(key) {
                hints.push(ParentHint {
                    source: key.to_string(),
                    stored: v,
                });
            }
        }
        Some(ParentLink {
            // A merge detaches a kept layer by recording the nil id.
            detached: id.is_nil(),
            format: None,
            ids: std::iter::once(id).chain(alt_id).collect(),
            hints,
        })
    }

    fn bat_key(&self, page: u64) -> Key {
        Key::map_page(self.key, page)
    }

    fn bitmap_key(&self, block: u64) -> Key {
        Key::detail(self.key, block)
    }

    /// BAT entry number `idx` (payload and bitmap entries interleaved).
    fn bat(&self, idx: u64) -> Result<u64> {
        if let Some(e) = self.pending.entry(idx) {
            return Ok(e);
        }
        let (bat_offset, entries) = {
            let l = self.layout.read();
            (l.bat_offset, l.bat_entries)
        };
        if idx >= entries {
            return Ok(0);
        }
        let page = idx / BAT_PAGE_ENTRIES;
        let buf = self.cache.get_or_load(self.bat_key(page), &self.meta, || {
            let first = page * BAT_PAGE_ENTRIES;
            let n = (entries - first).min(BAT_PAGE_ENTRIES);
            let mut b = vec![0u8; (n * 8) as usize];
            self.read_meta(bat_offset + first * 8, &mut b)?;
            Ok(b)
        })?;
        let i = ((idx % BAT_PAGE_ENTRIES) * 8) as usize;
        Ok(le64(&buf, i))
    }

    fn entry_offset(&self, idx: u64, e: u64) -> Result<u64> {
        let off = (e >> 20) * MIB;
        if e & 0xF_FFF8 != 0 {
            let bat = self.layout.read().bat_offset;
            return Err(Error::corrupt(
                &self.path,
                bat + idx * 8,
                format!("BAT entry {idx} ({e:#x}) has reserved bits set"),
            ));
        }
        Ok(off)
    }

    /// The sector bitmap bytes of payload block `n` (LSB-first).
    fn block_bitmap(&self, n: u64) -> Result<Arc<[u8]>> {
        let (cr, spb, bat_offset) = {
            let l = self.layout.read();
            (
                l.chunk_ratio,
                l.block_size / l.logical_sector as u64,
                l.bat_offset,
            )
        };
        let idx = (n / cr) * (cr + 1) + cr;
        let e = self.bat(idx)?;
        if e & 7 != SB_PRESENT {
            return Err(Error::corrupt(
                &self.path,
                bat_offset + idx * 8,
                format!(
                    "block {n} is partially present but its sector bitmap (BAT entry {idx}) is not present"
                ),
            ));
        }
        if let Some(b) = self.pending.bitmap(n) {
            return Ok(b);
        }
        let sb = self.entry_offset(idx, e)?;
        let bytes = spb / 8;
        let at = sb + (n % cr) * bytes;
        // Under the fill lock, look in `pending` again (see the VHD driver).
        self.cache.get_or_load(self.bitmap_key(n), &self.meta, || {
            if let Some(b) = self.pending.bitmap(n) {
                return Ok(b.to_vec());
            }
            let mut b = vec![0u8; bytes as usize];
            self.read_meta(at, &mut b)?;
            Ok(b)
        })
    }

    /// `off` if `len` bytes there lie inside the file, else a clear error.
    fn data_in_file(&self, idx: u64, off: u64, len: u64) -> Result<u64> {
        if off < MIB || off.saturating_add(len) > self.data_end.load(Ordering::Acquire) {
            let bat = self.layout.read().bat_offset;
            return Err(Error::corrupt(
                &self.path,
                bat + idx * 8,
                format!("BAT entry {idx} points to {off:#x}+{len}, outside the file"),
            ));
        }
        Ok(off)
    }

    /// The dirty-log state as opened (for `check`).
    pub fn had_dirty_log(&self) -> bool {
        self.dirty_log
    }

    pub fn layout(&self) -> Layout {
        self.layout.read().clone()
    }
}

/// LSB-first run of equal bits from `first`, at most `max` long (VHDX
/// sector bitmaps: bit 0 of byte 0 is the first sector).
pub fn bit_run_lsb(bm: &[u8], first: u64, max: u64) -> (bool, u64) {
    crate::format::bit_run(bm, first, max, false)
}

/// DataWriteGuid and parent link of a VHDX file, without locking it.
fn peek(path: &Path) -> Option<Peek> {
    let file = File::open(path).ok()?;
    if !probe(&file, path).ok()? {
        return None;
    }
    let opts = LayerOptions {
        writable: false,
        ignore_checksums: false,
        cache: MetaCache::new(1 << 20),
    };
    // Opening without `open_file` takes no lock.
    let l = VhdxLayer::open(file, path, &opts).ok()?;
    Some(Peek {
        format: DRIVER.name,
        id: l.info().unique_id,
        parent: l.parent(),
    })
}

impl Layer for VhdxLayer {
    fn path(&self) -> &Path {
        &self.path
    }

    fn info(&self) -> LayerInfo {
        let l = self.layout.read();
        LayerInfo {
            format: DRIVER.name,
            disk_type: if l.has_parent {
                "differencing"
            } else if l.leave_allocated {
                "fixed"
            } else {
                "dynamic"
            },
            virtual_size: l.virtual_size,
            block_size: Some(l.block_size),
            sector_size: l.logical_sector,
            unique_id: Some(l.header.data_write_guid),
            id_follows_data: true,
            creator: l.creator.clone(),
        }
    }

    fn parent(&self) -> Option<ParentLink> {
        self.parent.read().clone()
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let (size, bs, cr, has_parent, lss) = {
            let l = self.layout.read();
            (
                l.virtual_size,
                l.block_size,
                l.chunk_ratio,
                l.has_parent,
                l.logical_sector as u64,
            )
        };
        if offset >= size {
            return Ok(Extent::Zero { len });
        }
        let n = offset / bs;
        let in_off = offset % bs;
        let len = len.min(size - offset).min(bs - in_off);
        let idx = n + n / cr;
        let e = self.bat(idx)?;
        match e & 7 {
            PAYLOAD_FULLY_PRESENT => Ok(Extent::Data {
                file_offset: self.data_in_file(idx, self.entry_offset(idx, e)? + in_off, len)?,
                len,
            }),
            PAYLOAD_PARTIALLY_PRESENT if has_parent => {
                let base = self.entry_offset(idx, e)?;
                let bm = self.block_bitmap(n)?;
                let first = in_off / lss;
                let last = (in_off + len - 1) / lss;
                let (set, run) = bit_run_lsb(&bm, first, last - first + 1);
                let len = ((first + run) * lss - in_off).min(len);
                Ok(if set {
                    Extent::Data {
                        file_offset: self.data_in_file(idx, base + in_off, len)?,
                        len,
                    }
                } else {
                    Extent::Parent { len }
                })
            }
            PAYLOAD_NOT_PRESENT if has_parent => Ok(Extent::Parent { len }),
            PAYLOAD_NOT_PRESENT
            | PAYLOAD_UNDEFINED
            | PAYLOAD_ZERO
            | PAYLOAD_UNMAPPED
            | PAYLOAD_UNMAPPED_V095 => Ok(Extent::Zero { len }),
            s => {
                let bat = self.layout.read().bat_offset;
                Err(Error::corrupt(
                    &self.path,
                    bat + idx * 8,
                    format!(
                        "BAT entry {idx} has payload state {s}, invalid in a {} disk",
                        if has_parent {
                            "differencing"
                        } else {
                            "non-differencing"
                        }
                    ),
                ))
            }
        }
    }

    fn will_need(&self, file_offset: u64, len: u64) {
        crate::format::fileio::will_need(&self.file, file_offset, len);
    }

    fn data_file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn write_behind(&self) {
        crate::format::fileio::write_behind(&self.file);
    }

    fn read_data(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let at = file_offset + done as u64;
            let n = self.file.read_at(&mut buf[done..], at).ctx(
                &self.path,
                "cannot read data",
                Some(at),
            )?;
            if n == 0 {
                // Past the end: zeros only where the log extended the file.
                if file_offset + buf.len() as u64 <= self.overlay.min_len {
                    buf[done..].fill(0);
                    break;
                }
                return Err(Error::corrupt(
                    &self.path,
                    at,
                    "block data lies past the end of the file",
                ));
            }
            done += n;
        }
        Ok(())
    }

    fn allocated_bytes(&self) -> Result<u64> {
        let l = self.layout();
        let mut cached = self.allocated.lock();
        if let Some(n) = *cached {
            return Ok(n * l.block_size);
        }
        let mut n = 0;
        for b in 0..l.virtual_size.div_ceil(l.block_size) {
            let s = self.bat(b + b / l.chunk_ratio)? & 7;
            if s == PAYLOAD_FULLY_PRESENT || s == PAYLOAD_PARTIALLY_PRESENT {
                n += 1;
            }
        }
        *cached = Some(n);
        Ok(n * l.block_size)
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn write_sectors(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_impl(offset, data)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.discard_impl(offset, len)
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let _a = self.alloc.lock();
        self.flush_locked()
    }

    fn check(&self) -> Result<Vec<String>> {
        check::check(self)
    }

    fn compact(&self) -> Result<crate::format::space::CompactStats> {
        self.compact_impl()
    }

    fn space_for(&self, ranges: &[(u64, u64)]) -> Result<u64> {
        self.space_for_impl(ranges)
    }

    fn set_lock(&self, mode: LockMode) -> Result<()> {
        lock_file(&self.file, &self.path, mode)
    }

    /// `Set` and `Detach` rewrite the parent locator through the log;
    /// `Expect` records the parent's next DataWriteGuid as
    /// `parent_linkage2`, so this child accepts the parent before and after
    /// the parent's first write ([MS-VHDX] note 12).
    fn relink(&self, change: ParentChange<'_>) -> Result<()> {
        fn vhdx_parent<'a>(me: &Path, p: &'a dyn Layer) -> Result<&'a VhdxLayer> {
            p.as_any()
                .downcast_ref::<VhdxLayer>()
                .ok_or_else(|| Error::unsupported(me, "a VHDX can only have a VHDX parent"))
        }
        match change {
            ParentChange::Expect(parent) => {
                match vhdx_parent(&self.path, parent)?.next_identity_impl() {
                    Some(id) => self.accept_parent_impl(id),
                    None => Ok(()), // its identity changed already this session
                }
            }
            ParentChange::Set(parent) => {
                let p = vhdx_parent(&self.path, parent)?;
                self.relink_to(Some((p.path(), p.layout.read().header.data_write_guid)))
            }
            ParentChange::Detach => {
                if self.parent.read().as_ref().is_some_and(|l| l.detached) {
                    return Ok(()); // detached already
                }
                self.relink_to(None)
            }
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Drop for VhdxLayer {
    fn drop(&mut self) {
        if self.writable {
            let _a = self.alloc.lock();
            if let Err(e) = self.flush_locked() {
                ::log::error!("{}: flush at close failed: {e}", self.path.display());
            }
        }
        self.cache.forget_layer(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{open_layer, LayerOptions};

    /// The VHDX twin of the VHD driver's test of the same name: a reader
    /// mid-fill (played by hand, holding the fill lock with the old bitmap)
    /// must not be able to put that bitmap back over the writer's newer one.
    #[test]
    fn a_reader_filling_the_cache_cannot_put_an_old_bitmap_back() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vhdx");
        let child = dir.path().join("child.avhdx");
        let opts = |writable| LayerOptions {
            writable,
            ignore_checksums: false,
            cache: MetaCache::new(1 << 20),
        };
        let spec = |parent| create::VhdxSpec {
            size: 8 << 20,
            fixed: false,
            block_size: 2 << 20,
            logical_sector: 512,
            parent,
        };
        create::create(&base, &spec(None)).unwrap();
        let b = open_layer(&base, &opts(false)).unwrap();
        create::create(&child, &spec(Some((base.as_path(), b.as_ref())))).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&child)
            .unwrap();
        let l = VhdxLayer::open(file, &child, &opts(true)).unwrap();
        l.write_sectors(0, &[1u8; 512]).unwrap();
        l.flush().unwrap();
        let old = l.block_bitmap(0).unwrap();
        assert_eq!(old[0] & 7, 0b001);

        crate::format::race_reader_mid_fill(
            &l.meta,
            || l.write_sectors(512, &[2u8; 512]).unwrap(),
            || l.cache.insert(l.bitmap_key(0), old),
        );
        l.flush().unwrap();
        l.write_sectors(1024, &[3u8; 512]).unwrap();
        l.flush().unwrap();
        drop(l);
        let fresh = open_layer(&child, &opts(false)).unwrap();
        let mut got = [0u8; 1536];
        let mut off = 0;
        while off < got.len() as u64 {
            match fresh.map(off, got.len() as u64 - off).unwrap() {
                Extent::Data { file_offset, len } => {
                    fresh
                        .read_data(file_offset, &mut got[off as usize..(off + len) as usize])
                        .unwrap();
                    off += len;
                }
                e => panic!("sectors 0-2 written, but {off} maps to {e:?}"),
            }
        }
        assert_eq!(&got[512..1024], &[2u8; 512]);
    }

    /// What `l` says about each of `sectors` sectors from `offset`:
    /// `Some(byte)` stored or zero (the first byte), `None` the parent's.
    fn sectors_at(l: &VhdxLayer, offset: u64, sectors: u64) -> Vec<Option<u8>> {
        (0..sectors)
            .map(|s| match l.map(offset + s * 512, 512).unwrap() {
                Extent::Data { file_offset, .. } => {
                    let mut b = [0u8; 1];
                    l.read_data(file_offset, &mut b).unwrap();
                    Some(b[0])
                }
                Extent::Zero { .. } => Some(0),
                Extent::Parent { .. } => None,
                e => panic!("sector {s}: {e:?}"),
            })
            .collect()
    }

    /// A write into a block a discard made ZERO in a differencing disk
    /// keeps the block's other sectors zero (FULLY_PRESENT over zeros),
    /// before and after a close without flush; a write into a NOT_PRESENT
    /// block still leaves the other sectors to the parent (PARTIALLY_PRESENT).
    #[test]
    fn a_write_into_a_zero_block_of_a_child_leaves_the_rest_zero() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vhdx");
        let child = dir.path().join("child.avhdx");
        let opts = |writable| LayerOptions {
            writable,
            ignore_checksums: false,
            cache: MetaCache::new(1 << 20),
        };
        let spec = |parent| create::VhdxSpec {
            size: 4 << 20,
            fixed: false,
            block_size: 1 << 20,
            logical_sector: 512,
            parent,
        };
        create::create(&base, &spec(None)).unwrap();
        let b = open_layer(&base, &opts(false)).unwrap();
        create::create(&child, &spec(Some((base.as_path(), b.as_ref())))).unwrap();
        let open = |writable| {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(writable)
                .open(&child)
                .unwrap();
            VhdxLayer::open(file, &child, &opts(writable)).unwrap()
        };
        let mib = 1 << 20;
        let l = open(true);
        l.discard(0, mib).unwrap();
        assert_eq!(l.bat(0).unwrap() & 7, PAYLOAD_ZERO);
        l.write_sectors(512, &[7u8; 512]).unwrap();
        l.write_sectors(mib + 512, &[8u8; 512]).unwrap();
        let (e0, e1) = (l.bat(0).unwrap() & 7, l.bat(1).unwrap() & 7);
        let want0 = vec![Some(0), Some(7), Some(0), Some(0)];
        let want1 = vec![None, Some(8), None, None];
        assert_eq!(sectors_at(&l, 0, 4), want0, "the open layer, ZERO block 0");
        drop(l);
        let l = open(false);
        assert_eq!(sectors_at(&l, 0, 4), want0, "reopened, ZERO block 0");
        assert_eq!(
            sectors_at(&l, mib, 4),
            want1,
            "reopened, NOT_PRESENT block 1"
        );
        assert_eq!(
            (e0, e1),
            (PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT),
            "states of the written blocks"
        );
        assert!(l.check().unwrap().is_empty());
    }
}
