//! Metadata changes that wait for a flush, and the order a flush writes
//! them in. The drivers keep new table entries (VHD BAT, VHDX BAT, qcow2
//! L2 entries) and changed sector bitmaps here instead of writing them at
//! once; readers of the layer look here first. An entry's value is `V`: a
//! BAT entry is one `u64`, an extended qcow2 L2 entry two. `write_out`
//! (the VHD/VHDX order; qcow2 writes its own out in the same order, see
//! its `write` module) is the safety argument in code:
//!
//! 1. `fdatasync`: the data those entries and bits make visible is durable;
//! 2. the bitmaps, then the table entries (each a write the format makes
//!    atomic: a 4- or 8-byte aligned entry in one sector);
//! 3. the caller's `fsync` follows.
//!
//! So no table entry or bitmap bit ever reaches the disk before the data it
//! points at, and a crash loses only what was not flushed yet.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::error::{IoContext, Result};

/// How many changes may wait before a flush is forced (bounds memory).
pub const LIMIT: usize = 4096;

/// A bitmap waiting to be written: (file offset, bytes).
type WaitingBitmap = (u64, Arc<[u8]>);

pub struct Pending<V = u64> {
    entries: RwLock<HashMap<u64, V>>,
    /// key -> (file offset, bytes)
    bitmaps: RwLock<HashMap<u64, WaitingBitmap>>,
    count: AtomicUsize,
}

impl<V> Default for Pending<V> {
    fn default() -> Self {
        Pending {
            entries: RwLock::default(),
            bitmaps: RwLock::default(),
            count: AtomicUsize::new(0),
        }
    }
}

impl<V: Copy> Pending<V> {
    pub fn is_empty(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    /// Enough is waiting that a flush is due.
    pub fn due(&self) -> bool {
        self.count.load(Ordering::Acquire) >= LIMIT
    }

    /// The waiting value of table entry `idx`, if any.
    pub fn entry(&self, idx: u64) -> Option<V> {
        if self.is_empty() {
            return None;
        }
        self.entries.read().get(&idx).copied()
    }

    /// The waiting bitmap under `key`, if any.
    pub fn bitmap(&self, key: u64) -> Option<Arc<[u8]>> {
        if self.is_empty() {
            return None;
        }
        self.bitmaps.read().get(&key).map(|(_, b)| b.clone())
    }

    /// Queue a table entry; true when a flush is due.
    pub fn set_entry(&self, idx: u64, value: V) -> bool {
        if self.entries.write().insert(idx, value).is_none() {
            self.count.fetch_add(1, Ordering::AcqRel);
        }
        self.count.load(Ordering::Acquire) >= LIMIT
    }

    /// Queue a bitmap to be written at `at`; true when a flush is due.
    pub fn set_bitmap(&self, key: u64, at: u64, bytes: Arc<[u8]>) -> bool {
        if self.bitmaps.write().insert(key, (at, bytes)).is_none() {
            self.count.fetch_add(1, Ordering::AcqRel);
        }
        self.count.load(Ordering::Acquire) >= LIMIT
    }

    /// The waiting entries with `range.contains(idx)`, in order.
    pub fn entries_in(&self, range: std::ops::Range<u64>) -> Vec<(u64, V)> {
        if self.is_empty() {
            return Vec::new();
        }
        let mut v: Vec<(u64, V)> = self
            .entries
            .read()
            .iter()
            .filter(|(i, _)| range.contains(i))
            .map(|(i, e)| (*i, *e))
            .collect();
        v.sort_unstable_by_key(|&(i, _)| i);
        v
    }

    /// Forget everything waiting: the caller wrote it out (under the fill
    /// lock, so readers go from the waiting copy to the written one).
    pub fn clear(&self) {
        self.entries.write().clear();
        self.bitmaps.write().clear();
        self.count.store(0, Ordering::Release);
    }
}

impl Pending<u64> {
    /// Steps 1 and 2 of the module docs. `write_entry` writes one table
    /// entry (and refreshes any cached copy); it runs under `lock`'s write
    /// side, the lock cache fills take, so no reader caches a stale page.
    /// Entries for which `first` holds are written and synced before the
    /// others (VHDX: a chunk's sector-bitmap entry before the payload
    /// entries that need it).
    pub fn write_out(
        &self,
        file: &File,
        path: &Path,
        lock: &RwLock<()>,
        first: impl Fn(u64) -> bool,
        mut write_entry: impl FnMut(u64, u64) -> Result<()>,
    ) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        crate::fault::point()?;
        file.sync_data().ctx(path, "cannot fsync data", None)?;
        let mut bitmaps: Vec<WaitingBitmap> = self.bitmaps.read().values().cloned().collect();
        bitmaps.sort_unstable_by_key(|b| b.0);
        for (at, bm) in &bitmaps {
            crate::fault::point()?;
            file.write_all_at(bm, *at)
                .ctx(path, "cannot write sector bitmap", Some(*at))?;
        }
        let mut entries: Vec<(u64, u64)> =
            self.entries.read().iter().map(|(i, e)| (*i, *e)).collect();
        entries.sort_unstable_by_key(|&(i, _)| (!first(i), i));
        let _w = lock.write();
        let mut firsts_to_sync = false;
        for (idx, value) in entries {
            let is_first = first(idx);
            if firsts_to_sync && !is_first {
                firsts_to_sync = false;
                crate::fault::point()?;
                file.sync_data().ctx(path, "cannot fsync", None)?;
            }
            firsts_to_sync |= is_first;
            crate::fault::point()?;
            write_entry(idx, value)?;
        }
        self.clear();
        Ok(())
    }
}
