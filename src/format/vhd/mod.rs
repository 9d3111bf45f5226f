//! VHD (Virtual PC / Hyper-V v1) layers: fixed, dynamic and differencing.
//!
//! Layout of a dynamic or differencing file:
//!
//! ```text
//! [footer copy @0][dynamic header @data_offset][locator data][BAT]...[bitmap|block data]...[footer @EOF-512]
//! ```
//!
//! Reading: `map()` looks the block up in the BAT (cached in 4 KiB pages) and,
//! for a differencing disk, in the block's sector bitmap (MSB-first: sector
//! `i` is bit `0x80 >> (i % 8)` of byte `i / 8`); a set bit means "stored
//! here", a clear bit or an unallocated block means "ask the parent". A
//! dynamic disk ignores its bitmaps on read (as qemu does; the spec requires
//! unset sectors to hold zeros) and reads unallocated blocks as zeros.
//!
//! Writing (the safety argument, in write order):
//! 1. A new block goes past the current footer, leaving the old footer in
//!    place (it becomes padding), its data 4 KiB aligned. The footer is
//!    written first, at the new end of file (the file grows in one write and
//!    always ends in a valid footer), then the bitmap (bits for the sectors
//!    written only) and the data. The block's BAT entry is kept in memory
//!    (`pending`), where reads of this layer find it.
//! 2. `flush()` makes it durable: `fdatasync` (data, bitmaps, footer), then
//!    the pending BAT entries are written, then `fsync`. A BAT entry thus
//!    never reaches the disk before the block it points to; a crash before
//!    the flush loses only unflushed writes and leaks space.
//! 3. If a crash leaves the end of the file without a footer (the file grew
//!    but the footer did not land), the footer copy at offset 0 describes the
//!    same file; the next writable open appends a fresh footer.
//!
//! Writes into an existing block write the data in place; the bitmap bits
//! that make newly written sectors visible are kept in memory (`crate::format::pending`,
//! where reads find them) and written by `flush()` after the data is synced,
//! so a crash never shows a sector whose data did not land.
//!
//! Relinking a child to a new parent (merges, set-parent) rewrites the
//! dynamic header in place at 512 through a relink journal: see `relink`.
//!
//! Files: `structs` (on-disk structures), `locator` (parent hints), `read`
//! (BAT and bitmap lookups behind `map()`), `write` (writes, allocation,
//! flush), `relink`, `space` (leaks, compaction), `check`, `create`.

pub mod create;
mod locator;
mod read;
mod relink;
mod structs;
mod write;

pub use structs::*;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::cache::{new_layer_key, Key, MetaCache};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::pending::Pending;
use crate::format::registry::{Driver, Peek};
use crate::format::{
    lock_file, CreateOptions, Extent, Layer, LayerInfo, LayerOptions, LockMode, ParentChange,
    ParentHint, ParentLink,
};

/// The registry entry.
pub static DRIVER: Driver = Driver {
    name: "vhd",
    extensions: &["vhd", "avhd"],
    parents: &["vhd"],
    probe,
    open: |file, path, opts| Ok(Arc::new(VhdLayer::open(file, path, opts)?)),
    create: create_file,
    peek,
    create_versions: &[],
    create_subblocks: false,
};

/// `chainfs create` for a VHD: a base (`--size`, `--fixed`) or a child of
/// `parent`, which it takes its block size from (readers that work in whole
/// blocks, such as vhd-lib, read a chain of mixed sizes wrong).
fn create_file(path: &Path, o: &CreateOptions, parent: Option<&dyn Layer>) -> Result<()> {
    let inherited = parent.and_then(|p| p.info().block_size);
    let bs = u32::try_from(o.block_size.or(inherited).unwrap_or(2 << 20))
        .map_err(|_| Error::invalid("block size too large for VHD"))?;
    match parent {
        Some(pl) => {
            let i = pl.info();
            let unique_id = i.unique_id.ok_or_else(|| {
                Error::unsupported(pl.path(), "a VHD parent must be a VHD with an id")
            })?;
            create::create_child(
                path,
                &create::ParentSpec {
                    path: pl.path(),
                    unique_id,
                    virtual_size: i.virtual_size,
                },
                bs,
            )
        }
        None => {
            let size = o
                .size
                .ok_or_else(|| Error::invalid("--size is required for a base disk"))?;
            create::create_base(path, size, o.fixed, bs)
        }
    }
}

/// BAT entries per cached page (4 KiB of table).
const BAT_PAGE_ENTRIES: u64 = 1024;
/// Locator data larger than this is not a path.
const MAX_LOCATOR_LEN: u32 = 64 * 1024;

/// The unique id and (for a differencing disk) the parent id of a VHD file,
/// read without taking any lock (for finding the children of a layer).
fn peek(path: &Path) -> Option<Peek> {
    let file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    if len < FOOTER_SIZE as u64 {
        return None;
    }
    let mut b = [0u8; FOOTER_SIZE];
    file.read_exact_at(&mut b, len - FOOTER_SIZE as u64).ok()?;
    let footer = Footer::parse(&b, true).ok().or_else(|| {
        file.read_exact_at(&mut b, 0).ok()?;
        Footer::parse(&b, true).ok()
    })?;
    let id = Some(footer.unique_id);
    if footer.disk_type != TYPE_DIFFERENCING {
        return Some(Peek {
            format: DRIVER.name,
            id,
            parent: None,
        });
    }
    let mut hb = [0u8; HEADER_SIZE];
    match relink::find_journal(&file, len - FOOTER_SIZE as u64, &footer) {
        Some(j) => hb = j.header,
        None => file.read_exact_at(&mut hb, footer.data_offset).ok()?,
    }
    let h = DynamicHeader::parse(&hb, true).ok()?;
    Some(Peek {
        format: DRIVER.name,
        id,
        // The id is what children are matched by; hints are not read here.
        parent: Some(ParentLink {
            ids: vec![h.parent_id],
            hints: Vec::new(),
            detached: h.parent_id.is_nil(),
            format: None,
        }),
    })
}

/// Does this file look like a VHD (footer cookie at its end or at offset 0)?
pub fn probe(file: &File, path: &Path) -> Result<bool> {
    let len = file.metadata().ctx(path, "cannot stat", None)?.len();
    if len < FOOTER_SIZE as u64 {
        return Ok(false);
    }
    let mut c = [0u8; 8];
    file.read_exact_at(&mut c, len - FOOTER_SIZE as u64).ctx(
        path,
        "cannot read footer",
        Some(len - FOOTER_SIZE as u64),
    )?;
    if &c == FOOTER_COOKIE {
        return Ok(true);
    }
    file.read_exact_at(&mut c, 0)
        .ctx(path, "cannot read footer copy", Some(0))?;
    Ok(&c == FOOTER_COOKIE)
}

pub struct VhdLayer {
    path: PathBuf,
    file: File,
    writable: bool,
    /// The current footer (its data offset moves when relinking).
    footer: Mutex<Footer>,
    size: u64,
    disk_type: u32,
    unique_id: uuid::Uuid,
    creator: String,
    /// Why the trailing footer was not used, if the offset-0 copy was.
    footer_problem: Option<String>,
    /// The dynamic header as opened; its parent fields may be stale after a
    /// relink (see `parent`), its table geometry never is.
    header: Option<DynamicHeader>,
    parent: RwLock<Option<ParentLink>>,
    /// Blocks allocated since the last flush: block -> BAT entry.
    pending: Pending,
    /// Written since the last flush.
    dirty: AtomicBool,
    /// Where the dynamic header was when the file was opened.
    header_at: u64,
    /// An unfinished relink found by a read-only open: its header is the
    /// one in force (the one on disk may be torn).
    journal: Option<relink::Journal>,
    /// Allocated blocks, counted once on demand and kept up to date.
    allocated: Mutex<Option<u64>>,
    cache: Arc<MetaCache>,
    key: u64,
    block_size: u64,
    bitmap_size: u64,
    /// End of the area blocks may occupy (the trailing footer's offset).
    data_end: AtomicU64,
    /// Read side: cache fills. Write side: on-disk table changes.
    meta: RwLock<()>,
    /// Serialises block allocation and bitmap updates.
    alloc: Mutex<()>,
}

impl VhdLayer {
    pub fn open(file: File, path: &Path, opts: &LayerOptions) -> Result<VhdLayer> {
        let len = file.metadata().ctx(path, "cannot stat", None)?.len();
        if len < FOOTER_SIZE as u64 {
            return Err(Error::corrupt(path, 0, "file is shorter than a VHD footer"));
        }
        let tail_off = len - FOOTER_SIZE as u64;
        let mut buf = [0u8; FOOTER_SIZE];
        file.read_exact_at(&mut buf, tail_off)
            .ctx(path, "cannot read footer", Some(tail_off))?;
        if opts.ignore_checksums && opts.writable {
            return Err(Error::invalid(format!(
                "{}: --ignore-checksum is for reading only",
                path.display()
            )));
        }
        let verify = !opts.ignore_checksums;
        let (footer, footer_problem) = match Footer::parse(&buf, verify) {
            Ok(f) => (f, None),
            Err(tail_err) => {
                // Virtual PC's rule: fall back to the copy at offset 0
                // (dynamic and differencing disks only).
                let tail_err = Error::format(path, tail_off, "trailing footer", tail_err);
                let mut copy = [0u8; FOOTER_SIZE];
                file.read_exact_at(&mut copy, 0)
                    .ctx(path, "cannot read footer copy", Some(0))?;
                match Footer::parse(&copy, verify) {
                    Ok(f) if f.disk_type != TYPE_FIXED => {
                        log::warn!("{tail_err}; using the footer copy at offset 0");
                        let note = format!(
                            "{tail_err} (the file grew in a write that did not finish; the \
                             footer copy at offset 0 is used, and the next writable open \
                             appends a fresh footer)"
                        );
                        (f, Some(note))
                    }
                    _ => return Err(tail_err),
                }
            }
        };
        let mut layer = VhdLayer {
            path: path.to_path_buf(),
            file,
            writable: opts.writable,
            size: footer.current_size,
            disk_type: footer.disk_type,
            unique_id: footer.unique_id,
            creator: footer.creator(),
            footer_problem,
            header: None,
            parent: RwLock::new(None),
            pending: Pending::default(),
            dirty: AtomicBool::new(false),
            allocated: Mutex::new(None),
            header_at: footer.data_offset,
            journal: None,
            cache: opts.cache.clone(),
            key: new_layer_key(),
            block_size: 0,
            bitmap_size: 0,
            data_end: AtomicU64::new(tail_off),
            meta: RwLock::new(()),
            alloc: Mutex::new(()),
            footer: Mutex::new(footer.clone()),
        };
        if footer.disk_type == TYPE_FIXED {
            if tail_off < footer.current_size {
                return Err(Error::corrupt(
                    path,
                    tail_off,
                    format!(
                        "fixed VHD is truncated: {} bytes of data before the footer, current size is {}",
                        tail_off, footer.current_size
                    ),
                ));
            }
            return Ok(layer);
        }
        layer.open_dynamic(tail_off, verify)?;
        if opts.writable && layer.footer_problem.is_some() {
            layer.repair_footer(len)?;
        }
        if opts.writable {
            layer.repair_footer_copy()?;
            // A relink journal first: it sits in the unreferenced tail that
            // `reclaim_tail` cuts.
            if let Some(j) = layer.journal.take() {
                layer.redo_relink(&j, layer.header_at)?;
                log::warn!(
                    "{}: finished a relink that was interrupted (journal at {:#x})",
                    path.display(),
                    j.at
                );
            }
            // Space a crash left past the last referenced block is reused
            // (see `space`).
            layer.reclaim_tail()?;
        }
        Ok(layer)
    }

    /// The copy at offset 0 must equal the footer (a crash in a relink can
    /// leave the old one there); the trailing footer is the authority.
    fn repair_footer_copy(&self) -> Result<()> {
        let f = self.footer.lock().to_bytes();
        let mut copy = [0u8; FOOTER_SIZE];
        self.file.read_exact_at(&mut copy, 0).ctx(
            &self.path,
            "cannot read footer copy",
            Some(0),
        )?;
        if copy != f {
            self.file
                .write_all_at(&f, 0)
                .ctx(&self.path, "cannot write footer copy", Some(0))?;
            self.file.sync_all().ctx(&self.path, "cannot fsync", None)?;
            log::warn!("{}: footer copy at offset 0 rewritten", self.path.display());
        }
        Ok(())
    }

    /// A writable open of a file whose end lacks a valid footer (a crash
    /// while it grew): append the footer copy at the end. Nothing is
    /// overwritten: whatever lies past the last referenced block is unused.
    fn repair_footer(&mut self, len: u64) -> Result<()> {
        let at = len.next_multiple_of(SECTOR);
        let f = self.footer.lock().to_bytes();
        self.file
            .write_all_at(&f, at)
            .ctx(&self.path, "cannot write footer", Some(at))?;
        self.file.sync_all().ctx(&self.path, "cannot fsync", None)?;
        log::warn!(
            "{}: appended a footer at {at:#x} (the end of the file had none)",
            self.path.display()
        );
        self.data_end.store(at, Ordering::Release);
        self.footer_problem = None;
        Ok(())
    }

    fn open_dynamic(&mut self, tail_off: u64, verify: bool) -> Result<()> {
        let path = self.path.clone();
        let ho = self.footer.lock().data_offset;
        if ho
            .checked_add(HEADER_SIZE as u64)
            .is_none_or(|e| e > tail_off)
        {
            return Err(Error::corrupt(
                &path,
                16,
                format!("dynamic header offset {ho:#x} lies past the footer at {tail_off:#x}"),
            ));
        }
        let footer = self.footer.lock().clone();
        self.journal = relink::find_journal(&self.file, tail_off, &footer);
        let mut hb = [0u8; HEADER_SIZE];
        match &self.journal {
            Some(j) => hb = j.header,
            None => self.file.read_exact_at(&mut hb, ho).ctx(
                &path,
                "cannot read dynamic header",
                Some(ho),
            )?,
        }
        let h = DynamicHeader::parse(&hb, verify)
            .map_err(|e| Error::format(&path, ho, "dynamic header", e))?;
        let bs = h.block_size as u64;
        let needed = self.size.div_ceil(bs);
        if (h.max_table_entries as u64) < needed {
            return Err(Error::corrupt(
                &path,
                ho + 28,
                format!(
                    "BAT has {} entries but the virtual size {} needs {needed} blocks of {bs} bytes",
                    h.max_table_entries, self.size
                ),
            ));
        }
        let table_end = h
            .table_offset
            .saturating_add(h.max_table_entries as u64 * 4);
        if table_end > tail_off {
            return Err(Error::corrupt(
                &path,
                ho + 16,
                format!(
                    "BAT at {:#x} with {} entries runs past the footer at {tail_off:#x}",
                    h.table_offset, h.max_table_entries
                ),
            ));
        }
        self.block_size = bs;
        self.bitmap_size = bitmap_bytes(h.block_size);
        if self.disk_type == TYPE_DIFFERENCING {
            *self.parent.get_mut() = Some(self.parent_link(&h, tail_off));
        }
        self.header = Some(h);
        Ok(())
    }

    pub fn footer(&self) -> Footer {
        self.footer.lock().clone()
    }

    fn entries(&self) -> u64 {
        self.header
            .as_ref()
            .map_or(0, |h| h.max_table_entries as u64)
    }

    /// The dynamic header as it is on disk now.
    fn current_header(&self) -> Result<DynamicHeader> {
        let ho = self.footer.lock().data_offset;
        let mut hb = [0u8; HEADER_SIZE];
        match &self.journal {
            Some(j) => hb = j.header,
            None => self.file.read_exact_at(&mut hb, ho).ctx(
                &self.path,
                "cannot read dynamic header",
                Some(ho),
            )?,
        }
        DynamicHeader::parse(&hb, false)
            .map_err(|e| Error::format(&self.path, ho, "dynamic header", e))
    }
}

impl Layer for VhdLayer {
    fn path(&self) -> &Path {
        &self.path
    }

    fn info(&self) -> LayerInfo {
        LayerInfo {
            format: DRIVER.name,
            disk_type: match self.disk_type {
                TYPE_FIXED => "fixed",
                TYPE_DYNAMIC => "dynamic",
                _ => "differencing",
            },
            virtual_size: self.size,
            block_size: self.header.as_ref().map(|h| h.block_size as u64),
            sector_size: SECTOR as u32,
            unique_id: Some(self.unique_id),
            id_follows_data: false,
            creator: self.creator.clone(),
        }
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn sector_size(&self) -> u32 {
        SECTOR as u32
    }

    fn parent(&self) -> Option<ParentLink> {
        self.parent.read().clone()
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let size = self.size;
        if offset >= size {
            // Past this layer's end (a smaller parent): zeros.
            return Ok(Extent::Zero { len });
        }
        let len = len.min(size - offset);
        if self.disk_type == TYPE_FIXED {
            return Ok(Extent::Data {
                file_offset: offset,
                len,
            });
        }
        let block = offset / self.block_size;
        let in_off = offset % self.block_size;
        let len = len.min(self.block_size - in_off);
        let diff = self.disk_type == TYPE_DIFFERENCING;
        let entry = self.bat_entry(block)?;
        if entry == UNALLOCATED {
            return Ok(if diff {
                Extent::Parent { len }
            } else {
                Extent::Zero { len }
            });
        }
        let start = self.block_start(block, entry)?;
        let file_offset = start + self.bitmap_size + in_off;
        if !diff {
            return Ok(Extent::Data { file_offset, len });
        }
        let bm = self.bitmap(block, start)?;
        let first = in_off / SECTOR;
        let last = (in_off + len - 1) / SECTOR;
        let (set, n) = bit_run(&bm, first, last - first + 1);
        // The run covers sectors first..first+n; clip to the request.
        let run_end = (first + n) * SECTOR;
        let len = (run_end - in_off).min(len);
        Ok(if set {
            Extent::Data { file_offset, len }
        } else {
            Extent::Parent { len }
        })
    }

    fn prefetch(&self, offset: u64, len: u64) {
        // A differencing layer reads a bitmap per block, and a write to a
        // dynamic one updates it: fetch them all.
        let needs = match self.disk_type {
            TYPE_DIFFERENCING => true,
            TYPE_FIXED => false,
            _ => self.writable,
        };
        if !needs || len == 0 {
            return;
        }
        let first = offset / self.block_size;
        let last = (offset + len - 1) / self.block_size;
        for b in first..=last {
            if self.pending.bitmap(b).is_some() || self.cache.get(&self.bitmap_key(b)).is_some() {
                continue;
            }
            if let Ok(e) = self.bat_entry(b) {
                if e != UNALLOCATED {
                    self.will_need(e as u64 * SECTOR, self.bitmap_size);
                }
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
        self.file.read_exact_at(buf, file_offset).ctx(
            &self.path,
            "cannot read data",
            Some(file_offset),
        )
    }

    fn allocated_bytes(&self) -> Result<u64> {
        if self.disk_type == TYPE_FIXED {
            return Ok(self.size);
        }
        let mut cached = self.allocated.lock();
        if let Some(n) = *cached {
            return Ok(n * self.block_size);
        }
        let mut n = 0;
        for b in 0..self.entries() {
            if self.bat_entry(b)? != UNALLOCATED {
                n += 1;
            }
        }
        *cached = Some(n);
        Ok(n * self.block_size)
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn write_sectors(&self, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        self.check_write(offset, len)?;
        self.dirty.store(true, Ordering::Release);
        if self.disk_type == TYPE_FIXED {
            crate::fault::point()?;
            return self.file.write_all_at(data, offset).ctx(
                &self.path,
                "cannot write data",
                Some(offset),
            );
        }
        let mut done = 0u64;
        while done < len {
            let off = offset + done;
            let block = off / self.block_size;
            let in_off = off % self.block_size;
            let n = (self.block_size - in_off).min(len - done);
            self.write_in_block(block, in_off, &data[done as usize..(done + n) as usize])?;
            done += n;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        self.dirty.store(true, Ordering::Release);
        if self.disk_type == TYPE_FIXED {
            return self.punch(offset, len);
        }
        let diff = self.disk_type == TYPE_DIFFERENCING;
        let mut done = 0u64;
        while done < len {
            let off = offset + done;
            let block = off / self.block_size;
            let in_off = off % self.block_size;
            let n = (self.block_size - in_off).min(len - done);
            done += n;
            let entry = self.bat_entry(block)?;
            if entry == UNALLOCATED && !diff {
                continue; // reads as zeros already
            }
            if n == self.block_size {
                let spb = self.block_size / SECTOR;
                if entry == UNALLOCATED {
                    // A block of zeros that hides the parent: every bit set,
                    // its data a hole never written.
                    let _a = self.alloc.lock();
                    if self.bat_entry(block)? == UNALLOCATED {
                        self.allocate_block(block, 0, &[], (0, spb))?;
                        continue;
                    }
                }
                let entry = self.bat_entry(block)?;
                let start = self.block_start(block, entry)?;
                self.punch(start + self.bitmap_size, self.block_size)?;
                if diff {
                    self.set_block_bits(block, start, 0, spb)?;
                }
                continue;
            }
            let zeros = vec![0u8; n as usize];
            self.write_in_block(block, in_off, &zeros)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let _a = self.alloc.lock();
        self.flush_locked()
    }

    fn set_lock(&self, mode: LockMode) -> Result<()> {
        lock_file(&self.file, &self.path, mode)
    }

    /// Relinks go through the relink journal (`relink.rs`): the header
    /// and footer change together or not at all. The identity of a VHD
    /// does not follow its data, so `Expect` has nothing to do.
    fn relink(&self, change: ParentChange<'_>) -> Result<()> {
        if self.disk_type != TYPE_DIFFERENCING || !self.writable {
            return Err(Error::new(
                ErrorKind::InvalidState,
                format!(
                    "{}: only a differencing disk open for writing can be relinked",
                    self.path.display()
                ),
            ));
        }
        match change {
            ParentChange::Expect(_) => Ok(()),
            ParentChange::Set(parent) => {
                let (Some(id), true) =
                    (parent.info().unique_id, parent.info().format == DRIVER.name)
                else {
                    return Err(Error::unsupported(
                        &self.path,
                        "a VHD can only have a VHD parent",
                    ));
                };
                self.relink_to(Some((parent.path(), id)))
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

    fn check(&self) -> Result<Vec<String>> {
        check::check(self)
    }

    fn compact(&self) -> Result<crate::format::space::CompactStats> {
        self.compact_impl()
    }

    fn space_for(&self, ranges: &[(u64, u64)]) -> Result<u64> {
        self.space_for_impl(ranges)
    }
}

impl Drop for VhdLayer {
    fn drop(&mut self) {
        // A clean close is not a crash: pending BAT entries reach the disk.
        if self.writable {
            if let Err(e) = self.flush_locked() {
                log::error!("{}: flush at close failed: {e}", self.path.display());
            }
        }
        self.cache.forget_layer(self.key);
    }
}

mod check;
mod space;

/// `(is_set, count)` of the run of equal bits starting at sector `first`,
/// looking at no more than `max` sectors. VHD bitmaps are MSB-first.
pub fn bit_run(bm: &[u8], first: u64, max: u64) -> (bool, u64) {
    crate::format::bit_run(bm, first, max, true)
}

pub fn set_bits(bm: &mut [u8], first: u64, n: u64) {
    for i in first..first + n {
        bm[(i / 8) as usize] |= 0x80 >> (i % 8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_runs_msb_first() {
        let bm = [0b1100_0000u8, 0xFF, 0x00, 0x01];
        assert_eq!(bit_run(&bm, 0, 32), (true, 2));
        assert_eq!(bit_run(&bm, 2, 30), (false, 6));
        assert_eq!(bit_run(&bm, 8, 24), (true, 8));
        assert_eq!(bit_run(&bm, 16, 16), (false, 15));
        assert_eq!(bit_run(&bm, 31, 1), (true, 1));
        assert_eq!(bit_run(&bm, 16, 3), (false, 3));
    }
}
