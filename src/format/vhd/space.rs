//! Unreferenced space in a dynamic or differencing VHD: what the BAT and
//! header reference, reclaiming the tail at a writable open, `check`'s
//! report and `chainfs compact` (see `crate::format::space`).
//!
//! **Tail reuse (every writable open).** A crash before a flush leaves
//! blocks past the last BAT-referenced one (their entries never landed).
//! The next writable open moves the footer back to the end of the last
//! referenced structure and cuts the file there, so new blocks are placed
//! where the lost ones were. Order and crash states:
//!
//! 1. The footer is written at the new end `E` (sector aligned, at least
//!    one sector before the current trailing footer), over bytes nothing
//!    references; `fdatasync`. A crash during or after this leaves the
//!    trailing footer as it was (still the one an open reads), and `E`
//!    holds a torn or an identical copy nobody reads.
//! 2. `ftruncate(E + 512)`; `fsync`. Now the footer at `E` is the trailing
//!    one: the same bytes as the old trailing footer, so a crash on either
//!    side of the truncate opens the same disk.
//!
//! The tail must also go (not merely be overwritten later): a new block
//! writes only its bitmap and the sectors written, and a dynamic disk reads
//! the rest of an allocated block as stored, so stale bytes of a lost block
//! would show. A cut file reads zeros where it grows again.
//!
//! **Compact.** (a) A block that holds nothing of its own is unallocated: in
//! a dynamic disk a block whose data is all zeros (an unallocated block
//! reads as zeros), in a differencing disk only a block whose sector
//! bitmap is empty (an all-zero block with bits set shadows the parent, so
//! it stays). The entries are queued in `pending` and written by the usual
//! flush (data synced first, then the 4-byte entries, then `fsync`); the
//! blocks' space is given back only after that `fsync`, so a crash leaves
//! either the block referenced and intact or unreferenced (a leak).
//! (b) Holes are punched over every unreferenced range and over the zero
//! pages of kept blocks (zeros read as zeros either way). (c) The tail is
//! cut as above.

use super::*;
use crate::format::space::{self, CompactStats};

impl VhdLayer {
    /// The byte ranges the footer copy, the current dynamic header, its
    /// locators, the BAT and every allocated block occupy (normalized; the
    /// trailing footer is not included). Pending entries count: callers
    /// that cut or punch flush first.
    pub(super) fn referenced_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let h = self.current_header()?;
        let ho = self.footer.lock().data_offset;
        let mut r = vec![
            (0, FOOTER_SIZE as u64),
            (ho, ho + HEADER_SIZE as u64),
            (
                h.table_offset,
                h.table_offset + (h.max_table_entries as u64 * 4).next_multiple_of(SECTOR),
            ),
        ];
        for loc in h.locators.iter().filter(|l| l.code != PLAT_NONE) {
            // `data_space` is a byte count as Windows writes it, a sector
            // count in the spec: take the larger reading that is plausible.
            let space = if loc.data_space as u64 % SECTOR == 0 {
                loc.data_space as u64
            } else {
                loc.data_space as u64 * SECTOR
            };
            let len = (loc.data_len as u64).max(space).next_multiple_of(SECTOR);
            r.push((loc.data_offset, loc.data_offset.saturating_add(len)));
        }
        let span = self.bitmap_size + self.block_size;
        for b in 0..self.entries() {
            let e = self.bat_entry(b)?;
            if e != UNALLOCATED {
                let s = e as u64 * SECTOR;
                r.push((s, s + span));
            }
        }
        Ok(space::normalize(r))
    }

    /// Cut the unreferenced tail (module docs). Nothing may be pending.
    /// Returns the bytes cut off.
    pub(super) fn reclaim_tail(&self) -> Result<u64> {
        let tail = self.data_end.load(Ordering::Acquire);
        let refs = self.referenced_ranges()?;
        let end = refs
            .iter()
            .map(|r| r.1)
            .filter(|&e| e <= tail)
            .max()
            .unwrap_or(FOOTER_SIZE as u64)
            .next_multiple_of(SECTOR);
        if refs.iter().any(|r| r.1 > tail) || end + FOOTER_SIZE as u64 > tail {
            // Nothing to cut (or a table pointing past the footer, which
            // `check` reports and nothing here should touch).
            return Ok(0);
        }
        let p = &self.path;
        let f = self.footer.lock().to_bytes();
        crate::fault::point()?;
        self.file
            .write_all_at(&f, end)
            .ctx(p, "cannot write footer", Some(end))?;
        crate::fault::point()?;
        self.file.sync_data().ctx(p, "cannot fsync", None)?;
        let old_len = self.file.metadata().ctx(p, "cannot stat", None)?.len();
        crate::fault::point()?;
        self.file.set_len(end + FOOTER_SIZE as u64).ctx(
            p,
            "cannot truncate",
            Some(end + FOOTER_SIZE as u64),
        )?;
        crate::fault::point()?;
        self.file.sync_all().ctx(p, "cannot fsync", None)?;
        self.data_end.store(end, Ordering::Release);
        let cut = old_len - (end + FOOTER_SIZE as u64);
        log::info!(
            "{}: {cut} unreferenced bytes at the end given back (footer moved from {tail:#x} to {end:#x})",
            p.display()
        );
        Ok(cut)
    }

    /// `check`'s report of allocated space no structure references.
    pub(super) fn leaks(&self) -> Result<Vec<String>> {
        let tail = self.data_end.load(Ordering::Acquire);
        let mut refs = self.referenced_ranges()?;
        refs.push((tail, tail + FOOTER_SIZE as u64));
        let refs = space::normalize(refs);
        let len = self
            .file
            .metadata()
            .ctx(&self.path, "cannot stat", None)?
            .len();
        space::leak_report(&self.file, &self.path, &refs, len, "BAT")
    }

    /// `chainfs compact` (module docs).
    pub(super) fn compact_impl(&self) -> Result<CompactStats> {
        if self.disk_type == TYPE_FIXED {
            return Err(Error::unsupported(
                &self.path,
                "a fixed disk has no unused blocks to give back (compact works on dynamic and differencing disks)",
            ));
        }
        crate::format::require_writable(self.writable, &self.path)?;
        let p = &self.path;
        let _a = self.alloc.lock();
        self.flush_locked()?;
        let mut stats = CompactStats {
            file_size_before: self.file.metadata().ctx(p, "cannot stat", None)?.len(),
            ..Default::default()
        };
        let diff = self.disk_type == TYPE_DIFFERENCING;
        // (a) Blocks that hold nothing of their own.
        let mut data = vec![0u8; self.block_size as usize];
        let mut kept = Vec::new();
        for b in 0..self.entries() {
            let e = self.bat_entry(b)?;
            if e == UNALLOCATED {
                continue;
            }
            let start = self.block_start(b, e)?;
            let empty = if diff {
                let bm = self.bitmap(b, start)?;
                space::is_zero(&bm[..(self.block_size / SECTOR / 8) as usize])
            } else {
                let at = start + self.bitmap_size;
                self.file
                    .read_exact_at(&mut data, at)
                    .ctx(p, "cannot read data", Some(at))?;
                space::is_zero(&data)
            };
            if empty {
                stats.blocks_freed += 1;
                if self.pending.set_entry(b, UNALLOCATED as u64) {
                    self.dirty.store(true, Ordering::Release);
                    self.flush_locked()?;
                }
            } else {
                kept.push(start + self.bitmap_size);
            }
        }
        self.dirty.store(true, Ordering::Release);
        self.flush_locked()?;
        *self.allocated.lock() = None;
        // (b) Holes: zero pages of kept blocks, then every unreferenced range.
        for at in kept {
            stats.holes_punched += space::punch_zero_pages(&self.file, p, at, self.block_size)?;
        }
        let tail = self.data_end.load(Ordering::Acquire);
        for (s, e) in space::gaps(&self.referenced_ranges()?, tail) {
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
    /// block (with its bitmap and alignment) for every block not allocated.
    pub(super) fn space_for_impl(&self, ranges: &[(u64, u64)]) -> Result<u64> {
        if self.disk_type == TYPE_FIXED {
            return Ok(0);
        }
        let per_block =
            (FOOTER_SIZE as u64 + self.bitmap_size).next_multiple_of(4096) + self.block_size;
        let mut last = None;
        let mut n = 0;
        for &(off, len) in ranges {
            if len == 0 {
                continue;
            }
            let first = off / self.block_size;
            let end = (off + len - 1) / self.block_size;
            for b in first.max(last.map_or(0, |l: u64| l + 1))..=end {
                if self.bat_entry(b)? == UNALLOCATED {
                    n += 1;
                }
            }
            last = Some(last.map_or(end, |l: u64| l.max(end)));
        }
        Ok(n * per_block)
    }
}
