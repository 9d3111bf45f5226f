//! Cluster allocation and refcounts for the writer.
//!
//! New clusters are always appended at the end of the file (`next_free`),
//! never taken from freed space, so a place the caches know is never
//! reused while the layer is open. Every new cluster gets refcount 1
//! before anything points to it (a crash then leaks it, which `qemu-img
//! check` reports as a leak, never as corruption). A refcount block a new
//! cluster needs is appended too, counting itself; a refcount table too
//! small for a new block is replaced by a larger copy at the end (written
//! and synced before the header points to it in one sector write; the old
//! table's clusters are freed after). Refcounts are lowered only after
//! the table entry that dropped the reference is durable (`Qcow2Layer::
//! release`), so a count is never below the references on disk; a count
//! that reaches 0 has its cluster's space punched out.
//!
//! The refcount table is kept in memory while writing (qemu caps it at
//! 8 MiB); refcount blocks go through the metadata cache
//! (`Key::map_page`, by block number) and are written through.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::cache::Key;
use crate::error::{Error, ErrorKind, IoContext, Result};

use super::{decode_refcount_table_entry, get_refcount, in_file, set_refcount, Qcow2Layer};

/// The writer's state, under `Qcow2Layer::alloc`.
pub(super) struct WriteState {
    /// Refcount table entries (block offsets, 0: none).
    pub rt: Vec<u64>,
    /// Where the next cluster is appended (cluster aligned).
    pub next_free: u64,
    /// The header was updated for writing (autoclear bits cleared, the
    /// refcounts of a dirty image rebuilt).
    pub started: bool,
    /// This session set the dirty bit (cleared again at a clean close).
    pub marked: bool,
    /// L1 entries changed in memory (`Qcow2Layer::l1`) but not yet on
    /// disk, by index.
    pub l1_dirty: std::collections::BTreeSet<u64>,
    /// Clusters whose reference a waiting entry dropped: released once
    /// that entry is durable.
    pub releases: Vec<u64>,
}

impl WriteState {
    pub(super) fn load(l: &Qcow2Layer) -> Result<WriteState> {
        let h = l.header();
        let cs = h.cluster_size();
        let n = u64::from(h.refcount_table_clusters) * cs / 8;
        let mut b = vec![0u8; (n * 8) as usize];
        l.file.read_exact_at(&mut b, h.refcount_table_offset).ctx(
            &l.path,
            "cannot read the refcount table",
            Some(h.refcount_table_offset),
        )?;
        let mut rt = Vec::with_capacity(n as usize);
        for (i, c) in b.chunks_exact(8).enumerate() {
            let raw = u64::from_be_bytes(c.try_into().expect("8 bytes"));
            let at = h.refcount_table_offset + i as u64 * 8;
            rt.push(
                decode_refcount_table_entry(raw, at, &l.layout)
                    .map_err(|e| in_file(e, &l.path))?
                    .unwrap_or(0),
            );
        }
        Ok(WriteState {
            rt,
            next_free: l.file_len()?.next_multiple_of(cs),
            started: false,
            marked: false,
            l1_dirty: Default::default(),
            releases: Vec::new(),
        })
    }
}

impl Qcow2Layer {
    fn rb_key(&self, block: u64) -> Key {
        Key::map_page(self.key, block)
    }

    /// Write refcount block number `block` at `at` and cache it, under the
    /// fill lock's write side (a reader cannot cache an older copy).
    fn put_refcount_block(&self, block: u64, at: u64, b: Vec<u8>) -> Result<()> {
        let _m = self.meta.write();
        self.file.write_all_at(&b, at).ctx(
            &self.path,
            "cannot write a refcount block",
            Some(at),
        )?;
        self.cache.insert(self.rb_key(block), b.into());
        Ok(())
    }

    /// The refcount block at `at` (number `block`), cached.
    pub(super) fn refcount_block(&self, block: u64, at: u64) -> Result<Arc<[u8]>> {
        let cs = self.layout.cluster_size();
        self.cache.get_or_load(self.rb_key(block), &self.meta, || {
            let mut b = vec![0u8; cs as usize];
            self.file.read_exact_at(&mut b, at).ctx(
                &self.path,
                "cannot read a refcount block",
                Some(at),
            )?;
            Ok(b)
        })
    }

    /// Add `delta` to the refcount of the cluster at `off` (allocating its
    /// refcount block, and growing the table, when needed).
    pub(super) fn add_ref(&self, st: &mut WriteState, off: u64, delta: i64) -> Result<u64> {
        let c = off >> self.layout.cluster_bits;
        let rbe = self.layout.refcount_block_entries();
        let block = c / rbe;
        if block as usize >= st.rt.len() {
            self.grow_table(st, block)?;
        }
        let cs = self.layout.cluster_size();
        let mut at = st.rt[block as usize];
        let mut b: Vec<u8> = if at == 0 {
            // A new block at the end; it counts itself when it covers
            // itself, else its own block is found (or made) the same way.
            at = st.next_free;
            st.next_free += cs;
            vec![0u8; cs as usize]
        } else {
            self.refcount_block(block, at)?.to_vec()
        };
        let new_block = st.rt[block as usize] == 0;
        let old = get_refcount(&b, c % rbe, &self.layout);
        let new = old.checked_add_signed(delta).ok_or_else(|| {
            Error::corrupt(
                &self.path,
                off,
                format!("refcount {old} of this cluster cannot change by {delta}"),
            )
        })?;
        set_refcount(&mut b, c % rbe, new, &self.layout).map_err(|e| in_file(e, &self.path))?;
        if new_block && at / cs / rbe == block {
            set_refcount(&mut b, (at / cs) % rbe, 1, &self.layout)
                .map_err(|e| in_file(e, &self.path))?;
        }
        crate::fault::point()?;
        self.put_refcount_block(block, at, b)?;
        if new_block {
            if at / cs / rbe != block {
                self.add_ref(st, at, 1)?;
            }
            // The block is written before the table entry that finds it.
            st.rt[block as usize] = at;
            let h = self.header();
            let e = h.refcount_table_offset + block * 8;
            crate::fault::point()?;
            self.file.write_all_at(&at.to_be_bytes(), e).ctx(
                &self.path,
                "cannot write the refcount table",
                Some(e),
            )?;
        }
        Ok(new)
    }

    /// Replace the refcount table by one with room for block `block`.
    fn grow_table(&self, st: &mut WriteState, block: u64) -> Result<()> {
        let cs = self.layout.cluster_size();
        let per = cs / 8;
        let old_clusters = st.rt.len() as u64 / per;
        // Room for the block, the new table's own blocks, and slack.
        let clusters = (old_clusters * 2).max((block + 2).div_ceil(per) + 1);
        if clusters * cs > super::MAX_REFTABLE_BYTES {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "{}: the refcount table would grow past qemu's 8 MiB limit",
                    self.path.display()
                ),
            ));
        }
        let at = st.next_free;
        st.next_free += clusters * cs;
        let old = std::mem::replace(&mut st.rt, vec![0; (clusters * per) as usize]);
        st.rt[..old.len()].copy_from_slice(&old);
        let h = self.header();
        let (old_at, old_n) = (
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters),
        );
        // Count the new table's clusters (blocks it needs land in `st.rt`,
        // written to the old table's place only if it existed there: the
        // whole new table is written below anyway).
        for i in 0..clusters {
            self.count_in_memory(st, at + i * cs)?;
        }
        let mut b = Vec::with_capacity(st.rt.len() * 8);
        for e in &st.rt {
            b.extend_from_slice(&e.to_be_bytes());
        }
        crate::fault::point()?;
        self.file.write_all_at(&b, at).ctx(
            &self.path,
            "cannot write the refcount table",
            Some(at),
        )?;
        self.sync()?;
        self.update_header(|h| {
            h.refcount_table_offset = at;
            h.refcount_table_clusters = clusters as u32;
        })?;
        self.sync()?;
        for i in 0..old_n {
            self.release(st, old_at + i * cs)?;
        }
        Ok(())
    }

    /// `add_ref(+1)` while the table is being replaced: a new block's entry
    /// lives in memory until the new table is written whole.
    fn count_in_memory(&self, st: &mut WriteState, off: u64) -> Result<()> {
        let cs = self.layout.cluster_size();
        let rbe = self.layout.refcount_block_entries();
        let c = off / cs;
        let block = c / rbe;
        let mut at = st.rt[block as usize];
        let fresh = at == 0;
        let mut b = if fresh {
            at = st.next_free;
            st.next_free += cs;
            vec![0u8; cs as usize]
        } else {
            self.refcount_block(block, at)?.to_vec()
        };
        let v = get_refcount(&b, c % rbe, &self.layout) + 1;
        set_refcount(&mut b, c % rbe, v, &self.layout).map_err(|e| in_file(e, &self.path))?;
        if fresh {
            st.rt[block as usize] = at;
            if at / cs / rbe == block {
                set_refcount(&mut b, (at / cs) % rbe, 1, &self.layout)
                    .map_err(|e| in_file(e, &self.path))?;
            }
        }
        self.put_refcount_block(block, at, b)?;
        if fresh && at / cs / rbe != block {
            self.count_in_memory(st, at)?;
        }
        Ok(())
    }

    /// A new cluster at the end of the file, counted (refcount 1).
    pub(super) fn alloc_cluster(&self, st: &mut WriteState) -> Result<u64> {
        let at = st.next_free;
        st.next_free += self.layout.cluster_size();
        self.add_ref(st, at, 1)?;
        Ok(at)
    }

    /// Drop one reference to the cluster at `off` (the entry that held it
    /// is durable already); free its space when none is left.
    pub(super) fn release(&self, st: &mut WriteState, off: u64) -> Result<()> {
        if self.add_ref(st, off, -1)? == 0 {
            let cs = self.layout.cluster_size();
            if let Err(e) = crate::format::fileio::punch_hole(&self.file, off, cs) {
                log::debug!("{}: punch hole at {off:#x}: {e}", self.path.display());
            }
        }
        Ok(())
    }

    /// `fdatasync` the image file (and the data file).
    pub(super) fn sync(&self) -> Result<()> {
        crate::fault::point()?;
        if let Some((f, p)) = &self.data {
            f.sync_data().ctx(p, "cannot fsync", None)?;
        }
        self.file.sync_data().ctx(&self.path, "cannot fsync", None)
    }

    /// Change the header and write it (the fields before the extensions:
    /// one sector write, atomic on the disks chainfs runs on).
    pub(super) fn update_header(&self, change: impl FnOnce(&mut super::Header)) -> Result<()> {
        let mut h = self.header.write();
        let mut n = h.clone();
        change(&mut n);
        let bytes = n.to_bytes().map_err(|e| in_file(e, &self.path))?;
        let len = (n.header_length as usize).min(bytes.len());
        crate::fault::point()?;
        self.file.write_all_at(&bytes[..len], 0).ctx(
            &self.path,
            "cannot write the header",
            Some(0),
        )?;
        *h = n;
        Ok(())
    }
}
