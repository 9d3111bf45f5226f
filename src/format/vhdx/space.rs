//! Unreferenced space in a VHDX: what the headers, regions and BAT
//! reference, reclaiming the tail at a writable open, `check`'s report and
//! `chainfs compact` (see `crate::format::space`).
//!
//! **Referenced**: the 1 MiB header section, the log, every region of the
//! region table (BAT, metadata, and any other), and every block a BAT entry
//! gives an offset: payload blocks FULLY/PARTIALLY_PRESENT, sector bitmap
//! blocks SB_PRESENT, and, to be safe with other writers, any entry in any
//! state whose offset field is not zero.
//!
//! **Tail reuse (every writable open).** A crash before a flush leaves
//! blocks past the last referenced one. The open cuts the file at the end of
//! the last referenced structure (`ftruncate`, `fsync`) and allocates from
//! there: nothing can read the bytes cut off, so a crash before or after
//! the cut opens the same disk. The cut, not just reuse, is needed because
//! a new block writes only the sectors written and the rest must read as
//! zeros (a cut file grows back with holes).
//!
//! **Compact.** (a) Payload blocks that hold nothing of their own change
//! state, their data left unreferenced: a base's all-zero FULLY_PRESENT
//! block becomes NOT_PRESENT (reads zeros); in a differencing disk an
//! all-zero FULLY_PRESENT block, or a PARTIALLY_PRESENT one whose bitmap is
//! all set and whose data is zeros, becomes ZERO (zeros that still hide the
//! parent), and a PARTIALLY_PRESENT one whose bitmap is empty becomes
//! NOT_PRESENT (the parent, as every clear bit said). The entries go
//! through the usual flush (8-byte atomic writes after `fdatasync`, then
//! `fsync`). Then the sector bitmap block of every chunk with no
//! PARTIALLY_PRESENT block left is dropped, in a second flush, so a bitmap
//! entry never disappears while a payload entry on disk still needs it.
//! (b) Holes over every unreferenced range (only after those flushes) and
//! over the zero pages of kept blocks. (c) The tail is cut as above. The
//! DataWriteGuid is kept (what the disk reads does not change, so its
//! children stay linked); the FileWriteGuid changes as for any write.

use super::*;
use crate::format::space::{self, CompactStats};

impl VhdxLayer {
    /// Referenced byte ranges (module docs), normalized. Pending entries
    /// count: callers that cut or punch flush first.
    pub(super) fn referenced_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let l = self.layout();
        let mut r = vec![
            (0, MIB),
            (
                l.header.log_offset,
                l.header.log_offset + l.header.log_length as u64,
            ),
            (l.bat_offset, l.bat_offset + l.bat_length),
            (l.metadata_offset, l.metadata_offset + l.metadata_length),
        ];
        r.extend(
            l.regions
                .iter()
                .map(|e| (e.offset, e.offset + e.length as u64)),
        );
        for idx in 0..l.bat_entries {
            let e = self.bat(idx)?;
            let off = (e >> 20) * MIB;
            if off == 0 {
                continue;
            }
            let len = if idx % (l.chunk_ratio + 1) == l.chunk_ratio {
                MIB
            } else {
                l.block_size
            };
            r.push((off, off + len));
        }
        Ok(space::normalize(r))
    }

    /// Cut the unreferenced tail (module docs). Nothing may be pending.
    pub(super) fn reclaim_tail(&self) -> Result<u64> {
        let p = &self.path;
        let len = self.file.metadata().ctx(p, "cannot stat", None)?.len();
        let end = self
            .referenced_ranges()?
            .last()
            .map_or(MIB, |r| r.1)
            .next_multiple_of(MIB);
        if end >= len {
            return Ok(0);
        }
        self.begin_session(false)?;
        crate::fault::point()?;
        self.file
            .set_len(end)
            .ctx(p, "cannot truncate", Some(end))?;
        crate::fault::point()?;
        self.file.sync_all().ctx(p, "cannot fsync", None)?;
        self.data_end.store(end, Ordering::Release);
        self.next_alloc.store(end, Ordering::Release);
        ::log::info!(
            "{}: {} unreferenced bytes at the end given back (cut at {end:#x})",
            p.display(),
            len - end
        );
        Ok(len - end)
    }

    /// `check`'s report of allocated space no structure references.
    pub(super) fn leaks(&self) -> Result<Vec<String>> {
        let refs = self.referenced_ranges()?;
        let len = self
            .file
            .metadata()
            .ctx(&self.path, "cannot stat", None)?
            .len();
        space::leak_report(&self.file, &self.path, &refs, len, "BAT or regions")
    }

    /// `chainfs compact` (module docs).
    pub(super) fn compact_impl(&self) -> Result<CompactStats> {
        let l = self.layout();
        let p = &self.path;
        if l.leave_allocated {
            return Err(Error::unsupported(
                p,
                "a fixed disk has no unused blocks to give back (compact works on dynamic and differencing disks)",
            ));
        }
        crate::format::require_writable(self.writable, &self.path)?;
        let _a = self.alloc.lock();
        self.flush_locked()?;
        let mut stats = CompactStats {
            file_size_before: self.file.metadata().ctx(p, "cannot stat", None)?.len(),
            ..Default::default()
        };
        let (bs, cr) = (l.block_size, l.chunk_ratio);
        let spb = bs / l.logical_sector as u64;
        let blocks = l.virtual_size.div_ceil(bs);
        // (a) Payload blocks.
        let mut data = vec![0u8; bs as usize];
        let mut kept = Vec::new();
        let mut changed = false;
        for n in 0..blocks {
            let idx = n + n / cr;
            let e = self.bat(idx)?;
            let state = e & 7;
            if !matches!(state, PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT) {
                continue;
            }
            let at = self.data_in_file(idx, self.entry_offset(idx, e)?, bs)?;
            let bits = if state == PAYLOAD_PARTIALLY_PRESENT {
                let bm = self.block_bitmap(n)?;
                let (set, run) = bit_run_lsb(&bm, 0, spb);
                Some(if run == spb { Some(set) } else { None })
            } else {
                None
            };
            let new = match bits {
                // Every bit clear: nothing here, the parent shows through.
                Some(Some(false)) => Some(PAYLOAD_NOT_PRESENT),
                // Mixed bits: the block stays.
                Some(None) => None,
                // Fully present, or every bit set: zeros can go.
                _ => {
                    self.file
                        .read_exact_at(&mut data, at)
                        .ctx(p, "cannot read data", Some(at))?;
                    space::is_zero(&data).then_some(if l.has_parent {
                        PAYLOAD_ZERO
                    } else {
                        PAYLOAD_NOT_PRESENT
                    })
                }
            };
            match new {
                Some(s) => {
                    stats.blocks_freed += 1;
                    changed = true;
                    if stats.blocks_freed == 1 {
                        self.begin_session(false)?;
                    }
                    self.pending.set_entry(idx, s);
                    self.maybe_flush()?;
                }
                None => kept.push(at),
            }
        }
        self.dirty.store(true, Ordering::Release);
        self.flush_locked()?;
        // ... then bitmap blocks no partially present block needs.
        if l.has_parent {
            for c in 0..blocks.div_ceil(cr) {
                let sidx = c * (cr + 1) + cr;
                if sidx >= l.bat_entries || self.bat(sidx)? & 7 != SB_PRESENT {
                    continue;
                }
                let mut needed = false;
                for n in c * cr..((c + 1) * cr).min(blocks) {
                    if self.bat(n + n / cr)? & 7 == PAYLOAD_PARTIALLY_PRESENT {
                        needed = true;
                        break;
                    }
                }
                if !needed {
                    if !changed {
                        self.begin_session(false)?;
                        changed = true;
                    }
                    self.pending.set_entry(sidx, 0);
                    self.maybe_flush()?;
                }
            }
            self.dirty.store(true, Ordering::Release);
            self.flush_locked()?;
        }
        *self.allocated.lock() = None;
        // (b) Holes.
        for at in kept {
            stats.holes_punched += space::punch_zero_pages(&self.file, p, at, bs)?;
        }
        let len = self.file.metadata().ctx(p, "cannot stat", None)?.len();
        for (s, e) in space::gaps(&self.referenced_ranges()?, len) {
            stats.holes_punched += space::punch_range(&self.file, p, s, e)? as u64;
        }
        if stats.holes_punched > 0 {
            crate::fault::point()?;
            self.file.sync_all().ctx(p, "cannot fsync", None)?;
        }
        // (c) The tail.
        self.reclaim_tail()?;
        stats.file_size_after = self.file.metadata().ctx(p, "cannot stat", None)?.len();
        Ok(stats)
    }

    /// New file space writing `ranges` (virtual, sorted) would take: a
    /// block for every block not allocated, and in a differencing disk a
    /// 1 MiB bitmap block for every chunk that has none yet.
    pub(super) fn space_for_impl(&self, ranges: &[(u64, u64)]) -> Result<u64> {
        let l = self.layout();
        if l.leave_allocated {
            return Ok(0);
        }
        let (bs, cr) = (l.block_size, l.chunk_ratio);
        let mut last: Option<u64> = None;
        let mut last_chunk: Option<u64> = None;
        let mut total = 0;
        for &(off, len) in ranges {
            if len == 0 {
                continue;
            }
            let first = off / bs;
            let end = (off + len - 1) / bs;
            for n in first.max(last.map_or(0, |x| x + 1))..=end {
                let s = self.bat(n + n / cr)? & 7;
                if !matches!(s, PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT) {
                    total += bs;
                    let c = n / cr;
                    if l.has_parent
                        && last_chunk != Some(c)
                        && self.bat(c * (cr + 1) + cr)? & 7 != SB_PRESENT
                    {
                        total += MIB;
                        last_chunk = Some(c);
                    }
                }
            }
            last = Some(last.map_or(end, |x| x.max(end)));
        }
        Ok(total)
    }
}
