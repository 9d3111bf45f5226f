//! Writing VHDX files (the safety argument, in write order):
//!
//! - **Sessions.** Before the first change in an open, both headers are
//!   rewritten by the [MS-VHDX] 2.2.2.1 protocol (the non-current slot gets
//!   sequence + 1, flush, then the other slot): a new FileWriteGuid, and
//!   before the first user-visible change a new DataWriteGuid.
//! - **Blocks** are appended 1 MiB aligned, past the end of the file, so
//!   what a write does not reach reads as zeros. A block over the parent
//!   (NOT_PRESENT in a differencing disk) becomes PARTIALLY_PRESENT with its
//!   slice of the chunk's sector bitmap written whole, so no stale bit
//!   survives; any other (a base's, or one that read as zeros, like ZERO
//!   after a discard) FULLY_PRESENT, so the parent never shows through it.
//!   The data and bitmap are written first; the BAT entries wait in memory
//!   (`pending`, where reads find them) until `flush`: `fsync`, then the
//!   entries, then `fsync`. A BAT entry is 8 aligned bytes inside one
//!   sector, so its write is atomic and needs no log: a crash leaves either
//!   the old entry (the new block is leaked) or the new one with its data.
//! - **Metadata items** (the parent locator) change through the log: one
//!   log entry holding the new 4 KiB sectors under a fresh LogGuid, flush;
//!   the headers take that LogGuid (now an open replays the entry); the
//!   sectors are written in place, flush; LogGuid cleared. A crash before
//!   the header update leaves an entry nobody reads; after it, a log that
//!   the next open replays.
//! - **Replay** of a dirty log on a writable open writes the logged sectors,
//!   extends the file as the log says, flushes, and clears the LogGuid.

use std::path::Path;
use std::sync::atomic::Ordering;

use uuid::Uuid;

use super::*;

impl VhdxLayer {
    /// Rewrite both headers with `f` applied (the two-step protocol).
    pub(super) fn header_update(&self, f: impl FnOnce(&mut Header)) -> Result<()> {
        let mut l = self.layout.write();
        let mut h = l.header.clone();
        f(&mut h);
        for _ in 0..2 {
            h.sequence = l.header.sequence + 1;
            let slot = 1 - l.slot;
            let at = [HEADER1, HEADER2][slot];
            crate::fault::point()?;
            self.file.write_all_at(&h.to_bytes(), at).ctx(
                &self.path,
                "cannot write header",
                Some(at),
            )?;
            crate::fault::point()?;
            self.file
                .sync_data()
                .ctx(&self.path, "cannot fsync", None)?;
            l.header = h.clone();
            l.slot = slot;
        }
        Ok(())
    }

    /// New FileWriteGuid before the first change of this open; with `data`,
    /// a new DataWriteGuid before the first user-visible change.
    pub(super) fn begin_session(&self, data: bool) -> Result<()> {
        let need_file = !self.session.load(Ordering::Acquire);
        let need_data = data && !self.data_session.load(Ordering::Acquire);
        if !need_file && !need_data {
            return Ok(());
        }
        let _s = self.session_lock.lock();
        let need_file = !self.session.load(Ordering::Acquire);
        let need_data = data && !self.data_session.load(Ordering::Acquire);
        if !need_file && !need_data {
            return Ok(());
        }
        let next = self.next_id.lock().take();
        self.header_update(|h| {
            if need_file {
                h.file_write_guid = Uuid::new_v4();
            }
            if need_data {
                h.data_write_guid = next.unwrap_or_else(Uuid::new_v4);
            }
        })?;
        self.session.store(true, Ordering::Release);
        if need_data {
            self.data_session.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// The DataWriteGuid the next user-visible change will give this file
    /// (so a merge can tell the children first).
    pub(super) fn next_identity_impl(&self) -> Option<Uuid> {
        if self.data_session.load(Ordering::Acquire) {
            return None;
        }
        Some(*self.next_id.lock().get_or_insert_with(Uuid::new_v4))
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(u64, u64)> {
        crate::format::require_writable(self.writable, &self.path)?;
        let l = self.layout.read();
        let lss = l.logical_sector as u64;
        if offset % lss != 0 || len % lss != 0 || offset + len > l.virtual_size {
            return Err(Error::invalid(format!(
                "{}: write of {len} bytes at {offset:#x} is not whole {lss}-byte sectors inside the disk",
                self.path.display()
            )));
        }
        Ok((l.block_size, lss))
    }

    /// Bound the memory held by pending entries. `alloc` held.
    pub(super) fn maybe_flush(&self) -> Result<()> {
        if self.pending.due() {
            self.flush_locked()?;
        }
        Ok(())
    }

    pub(super) fn write_impl(&self, offset: u64, data: &[u8]) -> Result<()> {
        let (bs, _) = self.check_write(offset, data.len() as u64)?;
        self.begin_session(true)?;
        self.dirty.store(true, Ordering::Release);
        let mut done = 0usize;
        while done < data.len() {
            let off = offset + done as u64;
            let in_off = off % bs;
            let n = ((bs - in_off) as usize).min(data.len() - done);
            self.write_in_block(off / bs, in_off, &data[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn idx(&self, n: u64) -> u64 {
        let cr = self.layout.read().chunk_ratio;
        n + n / cr
    }

    fn write_in_block(&self, n: u64, in_off: u64, data: &[u8]) -> Result<()> {
        let idx = self.idx(n);
        let mut e = self.bat(idx)?;
        if !matches!(e & 7, PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT) {
            let _a = self.alloc.lock();
            e = self.bat(idx)?;
            if !matches!(e & 7, PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT) {
                return self.allocate(n, e, in_off, data);
            }
        }
        let at = self.entry_offset(idx, e)? + in_off;
        crate::fault::point()?;
        self.file
            .write_all_at(data, at)
            .ctx(&self.path, "cannot write data", Some(at))?;
        if e & 7 == PAYLOAD_PARTIALLY_PRESENT {
            let lss = self.layout.read().logical_sector as u64;
            // Bitmap read-modify-writes are serialised with allocation.
            let _a = self.alloc.lock();
            self.set_bits(n, in_off / lss, data.len() as u64 / lss, false)?;
            self.maybe_flush()?;
        }
        Ok(())
    }

    /// A new 1 MiB aligned region of `len` bytes at the end of the file.
    fn append_region(&self, len: u64) -> Result<u64> {
        let at = self.next_alloc.fetch_add(len, Ordering::AcqRel);
        self.data_end.fetch_max(at + len, Ordering::AcqRel);
        crate::fault::point()?;
        let flen = self
            .file
            .metadata()
            .ctx(&self.path, "cannot stat", None)?
            .len();
        if flen < at + len {
            self.file
                .set_len(at + len)
                .ctx(&self.path, "cannot extend", Some(at))?;
        }
        Ok(at)
    }

    fn queue(&self, idx: u64, entry: u64) {
        self.pending.set_entry(idx, entry);
    }

    /// Allocate payload block `n`, whose entry is `old` (not stored),
    /// holding `data` at `in_off`. `alloc` held.
    ///
    /// Only a NOT_PRESENT block of a differencing disk shows its parent, so
    /// only there the new block is PARTIALLY_PRESENT with the bits of `data`
    /// set and the rest clear (still the parent). Every other state read as
    /// zeros (ZERO after a discard, UNMAPPED, UNDEFINED; NOT_PRESENT in a
    /// base) and must go on doing so around `data`: the new region lies past
    /// the old end of the file, so it reads as zeros, and the block becomes
    /// FULLY_PRESENT. (A PARTIALLY_PRESENT block there would let the parent
    /// show through every sector the write did not reach.)
    fn allocate(&self, n: u64, old: u64, in_off: u64, data: &[u8]) -> Result<()> {
        let (bs, lss, has_parent) = {
            let l = self.layout.read();
            (l.block_size, l.logical_sector as u64, l.has_parent)
        };
        let at = self.append_region(bs)?;
        if !data.is_empty() {
            crate::fault::point()?;
            self.file.write_all_at(data, at + in_off).ctx(
                &self.path,
                "cannot write data",
                Some(at + in_off),
            )?;
        }
        let state = if has_parent && old & 7 == PAYLOAD_NOT_PRESENT {
            self.set_bits(n, in_off / lss, data.len() as u64 / lss, true)?;
            PAYLOAD_PARTIALLY_PRESENT
        } else {
            PAYLOAD_FULLY_PRESENT
        };
        self.queue(self.idx(n), state | (at / MIB) << 20);
        if let Some(c) = self.allocated.lock().as_mut() {
            *c += 1;
        }
        self.maybe_flush()
    }

    /// Set bits `first..first+cnt` of block `n`'s bitmap; `fresh` clears the
    /// others (a new block). Allocates the chunk's bitmap block if needed.
    /// Called with `alloc` held.
    fn set_bits(&self, n: u64, first: u64, cnt: u64, fresh: bool) -> Result<()> {
        let (cr, spb) = {
            let l = self.layout.read();
            (l.chunk_ratio, l.block_size / l.logical_sector as u64)
        };
        let sidx = (n / cr) * (cr + 1) + cr;
        let mut se = self.bat(sidx)?;
        if se & 7 != SB_PRESENT {
            let at = self.append_region(MIB)?;
            se = SB_PRESENT | (at / MIB) << 20;
            self.queue(sidx, se);
        }
        let bytes = spb / 8;
        let at = self.entry_offset(sidx, se)? + (n % cr) * bytes;
        let mut bm = if fresh {
            vec![0u8; bytes as usize]
        } else {
            self.block_bitmap(n)?.to_vec()
        };
        for i in first..first + cnt {
            bm[(i / 8) as usize] |= 1 << (i % 8);
        }
        let bm: Arc<[u8]> = bm.into();
        if fresh {
            // A new block: nothing points at it until its BAT entry lands.
            crate::fault::point()?;
            self.file.write_all_at(&bm, at).ctx(
                &self.path,
                "cannot write sector bitmap",
                Some(at),
            )?;
            self.cache.insert(self.bitmap_key(n), bm);
        } else {
            // Written by flush(), after the data it makes visible is synced;
            // queued and cached under the fill lock (see the VHD driver).
            let _m = self.meta.write();
            self.pending.set_bitmap(n, at, bm.clone());
            self.cache.insert(self.bitmap_key(n), bm);
        }
        Ok(())
    }

    pub(super) fn discard_impl(&self, offset: u64, len: u64) -> Result<()> {
        let (bs, _) = self.check_write(offset, len)?;
        self.begin_session(true)?;
        self.dirty.store(true, Ordering::Release);
        let mut done = 0;
        while done < len {
            let off = offset + done;
            let n = off / bs;
            let in_off = off % bs;
            let cnt = (bs - in_off).min(len - done);
            done += cnt;
            let (has_parent, fixed) = {
                let l = self.layout.read();
                (l.has_parent, l.leave_allocated)
            };
            // A block not stored reads as zeros already, but for the parent's
            // bytes behind a NOT_PRESENT block of a differencing disk.
            let state = self.bat(self.idx(n))? & 7;
            if !(matches!(state, PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT)
                || (has_parent && state == PAYLOAD_NOT_PRESENT))
            {
                continue;
            }
            if cnt < bs || fixed {
                if fixed && cnt == bs {
                    // A fixed disk keeps its blocks: zeros by a hole.
                    let e = self.bat(self.idx(n))?;
                    self.punch(self.entry_offset(self.idx(n), e)?, bs)?;
                    continue;
                }
                self.write_in_block(n, in_off, &vec![0u8; cnt as usize])?;
                continue;
            }
            // A whole block: state ZERO reads as zeros (never the parent);
            // its old data, if any, becomes a hole.
            let _a = self.alloc.lock();
            let idx = self.idx(n);
            let e = self.bat(idx)?;
            self.queue(idx, PAYLOAD_ZERO);
            *self.allocated.lock() = None;
            if matches!(e & 7, PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT) {
                self.punch(self.entry_offset(idx, e)?, bs)?;
            }
        }
        Ok(())
    }

    fn punch(&self, off: u64, len: u64) -> Result<()> {
        crate::fault::point()?;
        if let Err(e) = crate::format::fileio::punch_hole(&self.file, off, len) {
            // Not freeing space is fine: the BAT no longer points here.
            ::log::debug!("{}: punch hole at {off:#x}: {e}", self.path.display());
        }
        Ok(())
    }

    /// Make every write durable: data, then BAT entries, then everything.
    pub(super) fn flush_locked(&self) -> Result<()> {
        if !self.dirty.swap(false, Ordering::AcqRel) && self.pending.is_empty() {
            return Ok(());
        }
        let p = &self.path;
        let (bat_offset, cr) = {
            let l = self.layout.read();
            (l.bat_offset, l.chunk_ratio)
        };
        let is_bitmap_entry = |idx: u64| idx % (cr + 1) == cr;
        self.pending
            .write_out(&self.file, p, &self.meta, is_bitmap_entry, |idx, e| {
                let at = bat_offset + idx * 8;
                self.file.write_all_at(&e.to_le_bytes(), at).ctx(
                    p,
                    "cannot write BAT entry",
                    Some(at),
                )?;
                let page = idx / BAT_PAGE_ENTRIES;
                if let Some(old) = self.cache.get(&self.bat_key(page)) {
                    let mut np = old.to_vec();
                    let i = ((idx % BAT_PAGE_ENTRIES) * 8) as usize;
                    np[i..i + 8].copy_from_slice(&e.to_le_bytes());
                    self.cache.insert(self.bat_key(page), np.into());
                }
                Ok(())
            })?;
        crate::fault::point()?;
        self.file.sync_all().ctx(p, "cannot fsync", None)
    }

    /// Write whole 4 KiB `sectors` of metadata atomically, through the log.
    fn transaction(&self, sectors: &[(u64, Vec<u8>)]) -> Result<()> {
        self.begin_session(false)?;
        let (log_offset, log_length) = {
            let l = self.layout.read();
            (l.header.log_offset, l.header.log_length as u64)
        };
        let guid = Uuid::new_v4();
        let flen = self.data_end.load(Ordering::Acquire);
        let entry = log_entry(guid, 1, sectors, flen, flen);
        if entry.len() as u64 > log_length {
            return Err(Error::unsupported(
                &self.path,
                format!(
                    "a {} byte log entry does not fit the {log_length} byte log",
                    entry.len()
                ),
            ));
        }
        // The entry first: while the header's LogGuid is not `guid` it is
        // ignored, so a crash here leaves the file as it was.
        crate::fault::point()?;
        self.file.write_all_at(&entry, log_offset).ctx(
            &self.path,
            "cannot write log entry",
            Some(log_offset),
        )?;
        crate::fault::point()?;
        self.file
            .sync_data()
            .ctx(&self.path, "cannot fsync", None)?;
        // From this header on, an open replays the entry.
        self.header_update(|h| h.log_guid = guid)?;
        for (off, data) in sectors {
            crate::fault::point()?;
            self.file.write_all_at(data, *off).ctx(
                &self.path,
                "cannot write metadata",
                Some(*off),
            )?;
        }
        crate::fault::point()?;
        self.file
            .sync_data()
            .ctx(&self.path, "cannot fsync", None)?;
        self.header_update(|h| h.log_guid = Uuid::nil())
    }

    /// Apply a dirty log to the file (writable open).
    pub(super) fn replay_into_file(&mut self) -> Result<()> {
        let overlay = std::mem::take(&mut self.overlay);
        self.session.store(false, Ordering::Release);
        self.begin_session(false)?;
        for (off, data) in &overlay.sectors {
            crate::fault::point()?;
            self.file
                .write_all_at(data, *off)
                .ctx(&self.path, "cannot replay log", Some(*off))?;
        }
        let flen = self
            .file
            .metadata()
            .ctx(&self.path, "cannot stat", None)?
            .len();
        if flen < overlay.min_len {
            self.file
                .set_len(overlay.min_len)
                .ctx(&self.path, "cannot extend", None)?;
        }
        crate::fault::point()?;
        self.file.sync_all().ctx(&self.path, "cannot fsync", None)?;
        self.header_update(|h| h.log_guid = Uuid::nil())?;
        self.dirty_log = false;
        ::log::info!("{}: log replayed into the file", self.path.display());
        Ok(())
    }

    /// Rewrite the parent locator (relink, detach, second linkage).
    fn write_locator(&self, pairs: Vec<(String, String)>) -> Result<()> {
        let _a = self.alloc.lock();
        self.flush_locked()?;
        let l = self.layout();
        let bytes = parent_locator_bytes(&pairs);
        let mut entries = l.metadata.clone();
        let pos = entries
            .iter()
            .position(|e| e.item == PARENT_LOCATOR && !e.is_user)
            .ok_or_else(|| Error::corrupt(&self.path, l.metadata_offset, "no parent locator"))?;
        let old = entries[pos].clone();
        let offset = if bytes.len() <= old.length as usize {
            old.offset as u64
        } else {
            let end = entries
                .iter()
                .map(|e| e.offset as u64 + e.length as u64)
                .max()
                .unwrap_or(64 * KIB)
                .max(64 * KIB);
            end.next_multiple_of(4096)
        };
        if offset + bytes.len() as u64 > l.metadata_length {
            return Err(Error::unsupported(
                &self.path,
                "the new parent locator does not fit the metadata region",
            ));
        }
        entries[pos].offset = offset as u32;
        entries[pos].length = bytes.len() as u32;
        let mo = l.metadata_offset;
        let table = metadata_table_bytes(&entries);
        let mut sectors = vec![(mo, table[..4096].to_vec())];
        let first = (mo + offset) / 4096 * 4096;
        let last = (mo + offset + bytes.len() as u64).next_multiple_of(4096);
        for s in (first..last).step_by(4096) {
            let mut sec = vec![0u8; 4096];
            self.read_meta(s, &mut sec)?;
            let a = s.max(mo + offset);
            let b = (s + 4096).min(mo + offset + bytes.len() as u64);
            let src = (a - mo - offset) as usize..(b - mo - offset) as usize;
            sec[(a - s) as usize..(b - s) as usize].copy_from_slice(&bytes[src]);
            sectors.push((s, sec));
        }
        self.transaction(&sectors)?;
        {
            let mut lw = self.layout.write();
            lw.metadata = entries;
            lw.locator = pairs;
        }
        *self.parent.write() = self.parent_link();
        Ok(())
    }

    /// Point at a new parent (`Some`) or detach (`None`: nil linkage).
    pub(super) fn relink_to(&self, target: Option<(&Path, Uuid)>) -> Result<()> {
        let l = self.layout();
        if !l.has_parent || !self.writable {
            return Err(Error::new(
                ErrorKind::InvalidState,
                format!(
                    "{}: only a differencing disk open for writing can be relinked",
                    self.path.display()
                ),
            ));
        }
        let pairs = match target {
            Some((parent, id)) => {
                let abs = std::fs::canonicalize(parent).ctx(parent, "cannot resolve", None)?;
                let dir = std::fs::canonicalize(crate::paths::folder_of(&self.path)).ctx(
                    &self.path,
                    "cannot resolve folder",
                    None,
                )?;
                vec![
                    ("parent_linkage".to_string(), guid_text(&id)),
                    (
                        "relative_path".to_string(),
                        crate::format::hint::windows_relative(&dir, &abs),
                    ),
                    (
                        "absolute_win32_path".to_string(),
                        crate::format::hint::windows_absolute(&abs),
                    ),
                ]
            }
            None => {
                let mut p: Vec<(String, String)> = l
                    .locator
                    .iter()
                    .filter(|(k, _)| k != "parent_linkage2")
                    .cloned()
                    .collect();
                for (k, v) in p.iter_mut() {
                    if k == "parent_linkage" {
                        *v = guid_text(&Uuid::nil());
                    }
                }
                p
            }
        };
        self.write_locator(pairs)
    }

    /// Also accept a parent whose DataWriteGuid is `id` (parent_linkage2).
    pub(super) fn accept_parent_impl(&self, id: Uuid) -> Result<()> {
        let mut pairs: Vec<(String, String)> = self
            .layout()
            .locator
            .into_iter()
            .filter(|(k, _)| k != "parent_linkage2")
            .collect();
        pairs.push(("parent_linkage2".to_string(), guid_text(&id)));
        self.write_locator(pairs)
    }
}

/// A one-entry log sequence carrying `sectors` (whole 4 KiB sectors).
pub fn log_entry(
    guid: Uuid,
    seq: u64,
    sectors: &[(u64, Vec<u8>)],
    flushed: u64,
    last: u64,
) -> Vec<u8> {
    let count = sectors.len();
    let desc_sectors = (count + 2).div_ceil(128);
    let total = (desc_sectors + count) * 4096;
    let mut e = vec![0u8; total];
    e[0..4].copy_from_slice(b"loge");
    e[8..12].copy_from_slice(&(total as u32).to_le_bytes());
    e[12..16].copy_from_slice(&0u32.to_le_bytes());
    e[16..24].copy_from_slice(&seq.to_le_bytes());
    e[24..28].copy_from_slice(&(count as u32).to_le_bytes());
    e[32..48].copy_from_slice(&guid.to_bytes_le());
    e[48..56].copy_from_slice(&flushed.to_le_bytes());
    e[56..64].copy_from_slice(&last.to_le_bytes());
    for (i, (off, data)) in sectors.iter().enumerate() {
        let d = 64 + i * 32;
        e[d..d + 4].copy_from_slice(b"desc");
        e[d + 4..d + 8].copy_from_slice(&data[4092..4096]);
        e[d + 8..d + 16].copy_from_slice(&data[0..8]);
        e[d + 16..d + 24].copy_from_slice(&off.to_le_bytes());
        e[d + 24..d + 32].copy_from_slice(&seq.to_le_bytes());
        let s = (desc_sectors + i) * 4096;
        e[s..s + 4].copy_from_slice(b"data");
        e[s + 4..s + 8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
        e[s + 8..s + 4092].copy_from_slice(&data[8..4092]);
        e[s + 4092..s + 4096].copy_from_slice(&(seq as u32).to_le_bytes());
    }
    let c = crc_with_zeroed(&e, 4);
    e[4..8].copy_from_slice(&c.to_le_bytes());
    e
}
