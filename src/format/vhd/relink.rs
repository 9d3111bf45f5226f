//! Relinking a VHD child to a new parent (merges, `chainfs set-parent`,
//! and detaching with a nil parent id), keeping the dynamic header at
//! offset 512 where every writer puts it and some readers require it
//! (Xen Orchestra's vhd-lib refuses any other data offset).
//!
//! The header is rewritten **in place**, so a crash must never leave a
//! torn header with nothing to recover from. A relink journal makes the
//! in-place write a redo, not a guess:
//!
//! ```text
//! before:  ...[old footer]                                  (file end)
//! after 1: ...[new locator data][journal: record + new header][footer]
//! ```
//!
//! 1. The current footer is written at the new end of the file (the file
//!    grows in one write and keeps ending in a valid footer); the new
//!    locator data goes into the space before it; `fdatasync`.
//! 2. The journal, just before the new footer: a 512-byte record (magic
//!    `chfsrlnk`, the header offset, the file's unique id, the byte ranges
//!    that become stale) and the new 1024-byte header, all under one
//!    CRC-32C; `fdatasync`. From here on the relink is decided.
//! 3. The new header over the old one at its offset (512); `fsync`.
//! 4. The stale ranges (the old locator data) and the journal are zeroed;
//!    `fsync`. The footer never changes: its data offset stays 512.
//!
//! Opening a file finds the journal at `trailing footer − 1536`; a valid
//! one for this file (magic, CRC, unique id, header offset) means step 3 or
//! 4 may be unfinished. A writable open redoes 3 and 4; a read-only open
//! uses the journal's header (the on-disk one may be torn) and `check`
//! reports the unfinished relink. A crash before the journal is durable
//! leaves the old header untouched; the new locator data is then unused
//! space. The VHD header checksum alone could not do this: it is a byte
//! sum, and a header torn between two sectors can carry a valid one.
//!
//! A file whose header is elsewhere (older chainfs versions moved it past
//! the end) is moved back to 512 when that space is free: the new header
//! is written at 512 (unreferenced), synced, then the trailing footer is
//! switched to data offset 512 in one sector write, then the copy at 0;
//! the old header and locator data are zeroed last.
//!
//! Every write and sync is a fault-injection point (`crate::fault`).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use super::*;

/// Journal record magic.
const MAGIC: &[u8; 8] = b"chfsrlnk";
/// Record sector + the new header.
pub(super) const JOURNAL_SIZE: u64 = SECTOR + HEADER_SIZE as u64;
/// Stale ranges a record can name.
const MAX_RANGES: usize = 16;

/// An unfinished relink found at open.
#[derive(Debug, Clone)]
pub(super) struct Journal {
    /// Where the journal starts in the file.
    pub at: u64,
    /// The header to put at the header offset.
    pub header: [u8; HEADER_SIZE],
    /// Byte ranges to zero (stale locator data, an old header).
    pub stale: Vec<(u64, u64)>,
}

fn journal_bytes(ho: u64, id: &uuid::Uuid, stale: &[(u64, u64)], header: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; JOURNAL_SIZE as usize];
    b[0..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&1u32.to_be_bytes());
    b[12..20].copy_from_slice(&ho.to_be_bytes());
    b[20..36].copy_from_slice(id.as_bytes());
    b[36..40].copy_from_slice(&(stale.len() as u32).to_be_bytes());
    for (i, (o, l)) in stale.iter().enumerate() {
        let at = 40 + i * 16;
        b[at..at + 8].copy_from_slice(&o.to_be_bytes());
        b[at + 8..at + 16].copy_from_slice(&l.to_be_bytes());
    }
    b[SECTOR as usize..].copy_from_slice(header);
    let crc = journal_crc(&b);
    b[508..512].copy_from_slice(&crc.to_be_bytes());
    b
}

fn journal_crc(b: &[u8]) -> u32 {
    let c = crc32c::crc32c(&b[..508]);
    crc32c::crc32c_append(c, &b[SECTOR as usize..])
}

/// The journal of an unfinished relink of the file whose trailing footer
/// (at `tail_off`) is `footer`, if there is one.
pub(super) fn find_journal(file: &File, tail_off: u64, footer: &Footer) -> Option<Journal> {
    let at = tail_off.checked_sub(JOURNAL_SIZE)?;
    if at < SECTOR + HEADER_SIZE as u64 {
        return None;
    }
    let mut b = vec![0u8; JOURNAL_SIZE as usize];
    file.read_exact_at(&mut b, at).ok()?;
    let be64 = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    if &b[0..8] != MAGIC
        || b[8..12] != 1u32.to_be_bytes()
        || u32::from_be_bytes(b[508..512].try_into().unwrap()) != journal_crc(&b)
        || be64(12) != footer.data_offset
        || b[20..36] != *footer.unique_id.as_bytes()
    {
        return None;
    }
    let n = (u32::from_be_bytes(b[36..40].try_into().unwrap()) as usize).min(MAX_RANGES);
    let stale = (0..n)
        .map(|i| (be64(40 + i * 16), be64(48 + i * 16)))
        .collect();
    Some(Journal {
        at,
        header: b[SECTOR as usize..].try_into().unwrap(),
        stale,
    })
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

impl VhdLayer {
    /// Finish an unfinished relink (writable open): the header from the
    /// journal, then the stale ranges and the journal zeroed.
    pub(super) fn redo_relink(&self, j: &Journal, ho: u64) -> Result<()> {
        let p = &self.path;
        crate::fault::point()?;
        self.file
            .write_all_at(&j.header, ho)
            .ctx(p, "cannot write dynamic header", Some(ho))?;
        crate::fault::point()?;
        self.file.sync_all().ctx(p, "cannot fsync", None)?;
        let mut zero = j.stale.clone();
        zero.push((j.at, JOURNAL_SIZE));
        self.clear_and_sync(&zero)
    }

    /// Zero `ranges` (stale locator data, an old header, the journal:
    /// nothing references them any more), then `fsync`.
    fn clear_and_sync(&self, ranges: &[(u64, u64)]) -> Result<()> {
        let p = &self.path;
        for &(off, len) in ranges {
            crate::fault::point()?;
            self.file.write_all_at(&vec![0u8; len as usize], off).ctx(
                p,
                "cannot clear stale relink data",
                Some(off),
            )?;
        }
        crate::fault::point()?;
        self.file.sync_all().ctx(p, "cannot fsync", None)
    }

    /// File ranges in use that a relink must not touch: the BAT and every
    /// allocated block.
    fn used_ranges(&self, h: &DynamicHeader) -> Result<Vec<(u64, u64)>> {
        let mut used = vec![(h.table_offset, h.max_table_entries as u64 * 4)];
        for b in 0..h.max_table_entries as u64 {
            let e = self.bat_entry(b)?;
            if e != UNALLOCATED {
                used.push((e as u64 * SECTOR, self.bitmap_size + self.block_size));
            }
        }
        Ok(used)
    }

    /// Point this differencing layer at a new parent, or detach it (`None`:
    /// parent id nil, locators kept). See the module docs for the order.
    pub(super) fn relink_to(&self, target: Option<(&Path, uuid::Uuid)>) -> Result<()> {
        let p = &self.path;
        let _a = self.alloc.lock();
        self.flush_locked()?;
        let old = self.current_header()?;
        let mut header = old.clone();
        let blobs = match target {
            Some((parent, parent_id)) => {
                let f = create::parent_fields(p, parent)?;
                header.parent_id = parent_id;
                header.parent_timestamp = f.timestamp;
                header.parent_name = f.name;
                header.locators = f.locators;
                f.blobs
            }
            None => {
                header.parent_id = uuid::Uuid::nil();
                Vec::new()
            }
        };
        let ho = self.footer.lock().data_offset;
        let used = self.used_ranges(&old)?;
        // The old locator data becomes stale when new data replaces it.
        let mut stale: Vec<(u64, u64)> = if blobs.is_empty() {
            Vec::new()
        } else {
            old.locators
                .iter()
                .filter(|l| l.code != PLAT_NONE && l.data_len > 0)
                .map(|l| (l.data_offset, l.data_len as u64))
                .filter(|&r| {
                    r.0 >= FOOTER_SIZE as u64
                        && !overlaps(r, (ho, HEADER_SIZE as u64))
                        && !used.iter().any(|&u| overlaps(r, u))
                })
                .take(MAX_RANGES - 1)
                .collect()
        };
        // Move the header back to 512 when it is elsewhere and 512 is free.
        let home = (SECTOR, HEADER_SIZE as u64);
        let move_home = ho != SECTOR
            && !overlaps(home, (ho, HEADER_SIZE as u64))
            && !used.iter().any(|&u| overlaps(home, u))
            && !old
                .locators
                .iter()
                .filter(|l| l.code != PLAT_NONE && l.data_len > 0)
                .any(|l| overlaps(home, (l.data_offset, l.data_len as u64)));
        let start = self.data_end.load(Ordering::Acquire);
        let mut next = start;
        for (i, _) in blobs.iter().enumerate() {
            header.locators[i].data_offset = next;
            next += header.locators[i].data_space as u64;
        }
        let journal_at = next;
        let end = if move_home { next } else { next + JOURNAL_SIZE };
        let hb = header.to_bytes();
        let mut footer = self.footer.lock();
        // 1. Grow the file: the current footer at the new end.
        crate::fault::point()?;
        self.file
            .write_all_at(&footer.to_bytes(), end)
            .ctx(p, "cannot write footer", Some(end))?;
        for (i, data) in blobs.iter().enumerate() {
            let at = header.locators[i].data_offset;
            crate::fault::point()?;
            self.file
                .write_all_at(data, at)
                .ctx(p, "cannot write parent locator", Some(at))?;
        }
        let nf = if move_home {
            // The header at 512 is not referenced yet: write it, sync, then
            // switch the footer to it (one sector), then the copy at 0.
            crate::fault::point()?;
            self.file.write_all_at(&hb, SECTOR).ctx(
                p,
                "cannot write dynamic header",
                Some(SECTOR),
            )?;
            crate::fault::point()?;
            self.file.sync_data().ctx(p, "cannot fsync", None)?;
            let mut nf = footer.clone();
            nf.data_offset = SECTOR;
            crate::fault::point()?;
            self.file
                .write_all_at(&nf.to_bytes(), end)
                .ctx(p, "cannot write footer", Some(end))?;
            crate::fault::point()?;
            self.file.sync_all().ctx(p, "cannot fsync", None)?;
            crate::fault::point()?;
            self.file.write_all_at(&nf.to_bytes(), 0).ctx(
                p,
                "cannot write footer copy",
                Some(0),
            )?;
            crate::fault::point()?;
            self.file.sync_all().ctx(p, "cannot fsync", None)?;
            stale.push((ho, HEADER_SIZE as u64));
            self.clear_and_sync(&stale)?;
            nf
        } else {
            // 2. The journal, durable after the locator data it names.
            crate::fault::point()?;
            self.file.sync_data().ctx(p, "cannot fsync", None)?;
            let j = journal_bytes(ho, &footer.unique_id, &stale, &hb);
            crate::fault::point()?;
            self.file.write_all_at(&j, journal_at).ctx(
                p,
                "cannot write relink journal",
                Some(journal_at),
            )?;
            crate::fault::point()?;
            self.file.sync_data().ctx(p, "cannot fsync", None)?;
            // 3 and 4: what a rerun would redo.
            self.redo_relink(
                &Journal {
                    at: journal_at,
                    header: hb,
                    stale,
                },
                ho,
            )?;
            footer.clone()
        };
        *footer = nf;
        self.data_end.store(end, Ordering::Release);
        *self.parent.write() = Some(self.parent_link(&header, end));
        Ok(())
    }
}
