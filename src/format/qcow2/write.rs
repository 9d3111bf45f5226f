//! Writes and discards into a qcow2 leaf, one cluster at a time, in the
//! order that keeps every crash at worst a leak:
//!
//! 0. First change of the session: the dirty bit is set (then synced),
//!    see below.
//! 1. First write of the layer: autoclear bits the writer does not
//!    maintain are cleared in the header (then synced).
//! 2. A cluster stored in place (allocated, COPIED: refcount 1) is written
//!    in place; nothing else changes.
//! 3. Otherwise the cluster (or, with extended L2, the subclusters touched)
//!    gets a new host cluster at the end of the file: counted first
//!    (`alloc`: its refcount block written), the whole new content written
//!    (the caller fills what the write does not cover from the flattened
//!    view: see [`Layer::write_fill`]; a layer without a parent fills from
//!    its own content), and the new L2 entry waits in memory (`pending`,
//!    where reads find it first). A missing L2 table, or one shared with a
//!    snapshot (COPIED clear), is first replaced by a new one (zeros or a
//!    copy) written at the end; its L1 entry changes in memory and waits
//!    too (`l1_dirty`).
//! 4. The reference the old entry held (a shared or compressed cluster, an
//!    L2 table shared with a snapshot) waits in `releases`.
//! 5. `flush` (an fsync from the user, the end of a command or merge, a
//!    clean close, or 4096 waiting entries): `fdatasync` (data, new
//!    tables, refcounts), then the waiting L2 entries (8 or 16 aligned
//!    bytes in one sector: atomic) and L1 entries, `fdatasync`, then the
//!    releases (refcounts lowered, space punched), `fsync`. So no entry
//!    reaches the disk before what it points at and the count it needs,
//!    and no count drops before the entry that dropped the reference is
//!    durable: a refcount never falls below what the file references, and
//!    a crash loses only unflushed writes and leaks at worst.
//!
//! Discards: whole clusters get the zero flag (v3; with extended L2 the
//! subclusters' zero bits), reading as zeros over any backing file; their
//! host clusters are released (space punched out). A version 2 image has
//! no zero flag: with a backing file the cluster is written as zeros, and
//! without one it becomes unallocated.
//!
//! The dirty bit (version 3) guards the session: set and synced before
//! the first change (step 0), cleared at a clean close once the last
//! flush is durable. A crash in between leaves it set, and the next
//! writable open (here, or qemu's) rebuilds the refcounts from the tables
//! before anything else (`rebuild`), which frees what the crash leaked:
//! clusters counted for entries that never reached the disk. Refcounts
//! here are never lower than the references (steps 3 to 5), so until then
//! the image reads correctly and `check` sees leaks at worst. A version 2
//! image has no dirty bit: a crash leaks there until `qemu-img check -r
//! leaks`.

use std::os::unix::fs::FileExt;

use super::alloc::WriteState;
use super::read::Unit;
use super::*;
use crate::error::{ErrorKind, IoContext};

impl Qcow2Layer {
    fn require_writable(&self) -> Result<()> {
        crate::format::require_writable(self.writable, &self.path)
    }

    /// The writer state, loaded on first use, with the header made ready
    /// for writing (step 1) and the refcounts of a dirty image rebuilt.
    fn state(&self) -> Result<parking_lot::MappedMutexGuard<'_, WriteState>> {
        let mut g = self.alloc.lock();
        if g.is_none() {
            *g = Some(WriteState::load(self)?);
        }
        let mut st = parking_lot::MutexGuard::map(g, |s| s.as_mut().expect("loaded"));
        if !st.started {
            let clear = self.header.read().autoclear_to_clear();
            if clear != 0 {
                self.update_header(|h| h.autoclear_features &= !clear)?;
                self.sync()?;
            }
            if self.header.read().is_dirty() {
                self.rebuild_refcounts(&mut st)?;
            }
            st.started = true;
        }
        Ok(st)
    }

    /// [`Self::state`] for a change: the dirty bit set first (step 0).
    fn session(&self) -> Result<parking_lot::MappedMutexGuard<'_, WriteState>> {
        let mut st = self.state()?;
        if !st.marked && self.header.read().version >= 3 {
            self.update_header(|h| h.incompatible_features |= INCOMPAT_DIRTY)?;
            self.sync()?;
            st.marked = true;
        }
        Ok(st)
    }

    /// What a crash left (the dirty bit set) is repaired now, before a
    /// merge measures the space it needs; a clean image is not touched.
    fn recover(&self) -> Result<()> {
        if self.writable && self.header.read().is_dirty() {
            drop(self.state()?);
        }
        Ok(())
    }

    /// A clean close: everything flushed, then the dirty bit this session
    /// set is cleared (step 0).
    pub(super) fn close_impl(&self) -> Result<()> {
        let mut g = self.alloc.lock();
        let Some(st) = g.as_mut() else {
            return self.sync_all();
        };
        self.flush_locked(st)?;
        if st.marked {
            self.update_header(|h| h.incompatible_features &= !INCOMPAT_DIRTY)?;
            self.sync_all()?;
            st.marked = false;
        }
        Ok(())
    }

    /// New file space writing `ranges` (guest offsets, sorted) would take
    /// at most: a cluster for every cluster not stored in place, an L2
    /// table for every table missing or shared, and the refcount blocks
    /// (and a grown refcount table) counting them all.
    pub(super) fn space_for_impl(&self, ranges: &[(u64, u64)]) -> Result<u64> {
        self.recover()?;
        let cs = self.layout.cluster_size();
        let cov = self.layout.l2_coverage();
        let size = self.header.read().size;
        let (mut clusters, mut tables) = (0u64, 0u64);
        let (mut last_c, mut last_t): (Option<u64>, Option<u64>) = (None, None);
        for &(off, len) in ranges {
            let end = (off + len).min(size);
            if len == 0 || off >= end {
                continue;
            }
            let mut at = off - off % cs;
            while at < end {
                let c = at / cs;
                if last_c.is_none_or(|l| c > l) {
                    let e = self.entry(at)?;
                    let sc = self.layout.subcluster_size() as usize;
                    let whole_in_place = (at..at + cs)
                        .step_by(sc)
                        .all(|u| self.in_place(e.as_ref(), u));
                    if !whole_in_place && !self.layout.external_data {
                        clusters += 1;
                    }
                    last_c = Some(c);
                }
                let t = at / cov;
                if last_t.is_none_or(|l| t > l) {
                    let l1 = self.l1_entry(t)?;
                    if l1.l2_offset == 0 || !l1.copied {
                        tables += 1;
                    }
                    last_t = Some(t);
                }
                at += cs;
            }
        }
        let new = clusters + tables;
        if new == 0 {
            return Ok(0);
        }
        // Refcount blocks for the new clusters (and for themselves), and
        // room for a refcount table twice as large as it may need to be.
        let rbe = self.layout.refcount_block_entries();
        let blocks = new.div_ceil(rbe) + 1;
        let table = ((self.file_len()? / cs + new + blocks).div_ceil(rbe) * 8)
            .div_ceil(cs)
            .saturating_mul(2);
        Ok((new + blocks + table) * cs)
    }

    /// Is the unit (cluster, or subcluster with extended L2) at `at`
    /// stored in place, so that any part of it can be written directly?
    fn in_place(&self, e: Option<&ExtendedL2Entry>, at: u64) -> bool {
        let Some(e) = e else { return false };
        match e.cluster {
            Cluster::Data { copied: true, .. } if self.layout.extended_l2 => {
                let i = (at % self.layout.cluster_size()) / self.layout.subcluster_size();
                e.allocated & (1 << i) != 0
            }
            Cluster::Data { copied: true, .. } => true,
            _ => false,
        }
    }

    /// The range a write of `[offset, offset + len)` must cover: whole
    /// units wherever a unit is not stored in place (see
    /// [`Layer::write_fill`]).
    pub(super) fn write_fill_impl(&self, offset: u64, len: u64) -> Result<Option<(u64, u64)>> {
        let size = self.header.read().size;
        let end = (offset + len).min(size);
        let cs = self.layout.cluster_size();
        let mut out: Option<(u64, u64)> = None;
        let mut at = offset;
        while at < end {
            let e = self.entry(at)?;
            let cend = (at / cs + 1) * cs;
            let unit = match e.map(|e| e.cluster) {
                // A cluster copied on write is written whole.
                Some(Cluster::Compressed { .. }) | Some(Cluster::Data { copied: false, .. }) => cs,
                _ => self.layout.subcluster_size(),
            };
            let mut u = at - at % unit;
            while u < cend.min(end) {
                if !self.in_place(e.as_ref(), u) {
                    let (s, t) = (u, (u + unit).min(size));
                    out = Some(match out {
                        None => (s.min(offset), t.max(end)),
                        Some((a, b)) => (a.min(s), b.max(t)),
                    });
                }
                u += unit;
            }
            at = cend;
        }
        Ok(out)
    }

    pub(super) fn write_impl(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.require_writable()?;
        let size = self.header.read().size;
        let n = (data.len() as u64).min(size.saturating_sub(offset));
        let cs = self.layout.cluster_size();
        let mut st = self.session()?;
        let mut done = 0u64;
        while done < n {
            let at = offset + done;
            let len = (cs - at % cs).min(n - done);
            self.write_cluster(&mut st, at, &data[done as usize..(done + len) as usize])?;
            self.maybe_flush(&mut st)?;
            done += len;
        }
        *self.allocated.lock() = None;
        Ok(())
    }

    /// The L2 table for guest offset `at`, made writable: present and not
    /// shared (step 3). Returns (L1 index, table offset).
    fn writable_l2(&self, st: &mut WriteState, at: u64) -> Result<(u64, u64)> {
        let (l1i, _) = self.layout.indices(at);
        let e = self.l1_entry(l1i)?;
        if e.l2_offset != 0 && e.copied {
            return Ok((l1i, e.l2_offset));
        }
        let cs = self.layout.cluster_size();
        let mut table = vec![0u8; cs as usize];
        if e.l2_offset != 0 {
            self.file.read_exact_at(&mut table, e.l2_offset).ctx(
                &self.path,
                "cannot read an L2 table",
                Some(e.l2_offset),
            )?;
            // A shared table is never written to, so nothing of it waits;
            // copy what would anyway.
            let es = self.layout.l2_entry_size();
            for (at, w) in self.pending.entries_in(e.l2_offset..e.l2_offset + cs) {
                let i = (at - e.l2_offset) as usize;
                table[i..i + es as usize].copy_from_slice(&entry_bytes(w, es));
            }
        }
        let t = self.alloc_cluster(st)?;
        crate::fault::point()?;
        self.file
            .write_all_at(&table, t)
            .ctx(&self.path, "cannot write an L2 table", Some(t))?;
        // Readers follow the in-memory L1 to the table just written; the
        // entry on disk waits for the flush (step 5).
        let raw = L1Entry {
            l2_offset: t,
            copied: true,
        }
        .encode();
        self.l1.write()[l1i as usize] = raw;
        st.l1_dirty.insert(l1i);
        if e.l2_offset != 0 {
            st.releases.push(e.l2_offset);
        }
        Ok((l1i, t))
    }

    /// Set L2 entry `l2i` of the table at `l2_offset` (words of an
    /// extended entry: both): it waits for the flush (step 3).
    fn set_l2(&self, l2_offset: u64, l2i: u64, words: (u64, u64)) -> Result<()> {
        let at = l2_offset + l2i * self.layout.l2_entry_size();
        self.pending.set_entry(at, words);
        Ok(())
    }

    /// Flush (step 5) when enough waits: bounds the memory held.
    fn maybe_flush(&self, st: &mut WriteState) -> Result<()> {
        if self.pending.due() || st.releases.len() >= crate::format::pending::LIMIT {
            self.flush_locked(st)?;
        }
        Ok(())
    }

    /// What this layer alone shows for cluster `c0` (guest offset of its
    /// start): its data, zeros, or an error where the parent's content is
    /// needed and the caller did not provide it.
    fn own_content(
        &self,
        c0: u64,
        e: Option<&ExtendedL2Entry>,
        need: &[(u64, u64)],
    ) -> Result<Vec<u8>> {
        let cs = self.layout.cluster_size();
        let mut buf = vec![0u8; cs as usize];
        let mut at = c0;
        while at < c0 + cs {
            let (u, n) = self.unit(at)?;
            let n = n.min(c0 + cs - at);
            let r = (at - c0) as usize..(at - c0 + n) as usize;
            match u {
                Unit::Data(h) => self.read_data_at(h, &mut buf[r])?,
                Unit::Compressed => self.read_encoded_impl(at, &mut buf[r])?,
                Unit::Zero => {}
                Unit::Unallocated if self.parent.read().is_none() => {}
                Unit::Unallocated => {
                    if need.iter().any(|&(s, t)| s < t && s < at + n && at < t) {
                        return Err(Error::new(
                            ErrorKind::InvalidState,
                            format!(
                                "{}: a partial write at guest offset {at:#x} needs the backing file's data \
                                 (write through the chain)",
                                self.path.display()
                            ),
                        ));
                    }
                }
            }
            at += n;
        }
        let _ = e;
        Ok(buf)
    }

    /// The data's file now reaches `end` (before an entry points there).
    fn grew(&self, end: u64) {
        self.data_end
            .fetch_max(end, std::sync::atomic::Ordering::AcqRel);
    }

    fn read_data_at(&self, h: u64, buf: &mut [u8]) -> Result<()> {
        <Self as Layer>::read_data(self, h, buf)
    }

    /// Write `data` at guest offset `at`, all within one cluster.
    fn write_cluster(&self, st: &mut WriteState, at: u64, data: &[u8]) -> Result<()> {
        let cs = self.layout.cluster_size();
        let c0 = at - at % cs;
        let e = self.entry(at)?;
        let end = at + data.len() as u64;
        // In place where every unit touched is stored in place (step 2).
        let sc = self.layout.subcluster_size();
        let all_in_place = (at - at % sc..end)
            .step_by(sc as usize)
            .all(|u| self.in_place(e.as_ref(), u));
        if all_in_place {
            let Some(Cluster::Data { host_offset, .. }) = e.map(|e| e.cluster) else {
                unreachable!("in place means data")
            };
            let h = host_offset + (at - c0);
            let (f, p) = self.data_place();
            crate::fault::point()?;
            f.write_all_at(data, h)
                .ctx(p, "cannot write data", Some(h))?;
            self.grew(h + data.len() as u64);
            return Ok(());
        }
        let (_, l2i) = self.layout.indices(at);
        let (_, l2_offset) = self.writable_l2(st, at)?;
        let e = self.entry(at)?;
        let cluster = e.map(|e| e.cluster).unwrap_or(Cluster::Unallocated);
        if self.layout.extended_l2 {
            if let Cluster::Data {
                host_offset,
                copied: true,
            } = cluster
            {
                // New subclusters in a cluster of our own: write them, then
                // mark them allocated.
                let first = (at - c0) / sc;
                let last = (end - c0).div_ceil(sc);
                let (s0, s1) = (c0 + first * sc, (c0 + last * sc).min(c0 + cs));
                let mut buf = self.own_content(c0, e.as_ref(), &[(s0, at), (end, s1)])?
                    [(first * sc) as usize..(last * sc) as usize]
                    .to_vec();
                buf[(at - c0 - first * sc) as usize..(end - c0 - first * sc) as usize]
                    .copy_from_slice(data);
                let h = host_offset + first * sc;
                let (f, p) = self.data_place();
                crate::fault::point()?;
                f.write_all_at(&buf, h)
                    .ctx(p, "cannot write data", Some(h))?;
                self.grew(h + buf.len() as u64);
                let mask = ((((1u64 << (last - first)) - 1) << first) & 0xffff_ffff) as u32;
                let ee = e.expect("data has an entry");
                let ne = ExtendedL2Entry {
                    cluster,
                    allocated: ee.allocated | mask,
                    zero: ee.zero & !mask,
                };
                return self.set_l2(l2_offset, l2i, ne.encode(&self.layout));
            }
        }
        // A new host cluster (step 3): the whole cluster's new content
        // (with extended L2 and no cluster yet, only the touched
        // subclusters count).
        // Bytes past the virtual size (the last cluster of a disk whose
        // size is not a multiple of the cluster size) are never read, so
        // they are never needed from below.
        let vsize = self.header.read().size;
        let need = if self.layout.extended_l2 && matches!(cluster, Cluster::Unallocated) {
            [
                (at - at % sc, at),
                (end, end.next_multiple_of(sc).min(vsize)),
            ]
        } else {
            [(c0, at), (end, (c0 + cs).min(vsize))]
        };
        let mut buf = self.own_content(c0, e.as_ref(), &need)?;
        buf[(at - c0) as usize..(end - c0) as usize].copy_from_slice(data);
        let mut allocated = u32::MAX;
        if self.layout.extended_l2 && matches!(cluster, Cluster::Unallocated) {
            // Only the subclusters touched become ours; the rest still
            // read from below (or as zeros where they were zero).
            let first = (at - c0) / sc;
            let last = (end - c0).div_ceil(sc);
            allocated = ((((1u64 << (last - first)) - 1) << first) & 0xffff_ffff) as u32;
        }
        let host = self.new_data_cluster(st, c0)?;
        let (f, p) = self.data_place();
        crate::fault::point()?;
        f.write_all_at(&buf, host)
            .ctx(p, "cannot write data", Some(host))?;
        self.grew(host + buf.len() as u64);
        let old_zero = e.map_or(0, |e| e.zero);
        let words = if self.layout.extended_l2 {
            ExtendedL2Entry {
                cluster: Cluster::Data {
                    host_offset: host,
                    copied: true,
                },
                allocated,
                zero: if allocated == u32::MAX {
                    0
                } else {
                    old_zero & !allocated
                },
            }
            .encode(&self.layout)
        } else {
            (
                Cluster::Data {
                    host_offset: host,
                    copied: true,
                }
                .encode(&self.layout),
                0,
            )
        };
        self.set_l2(l2_offset, l2i, words)?;
        self.drop_old(st, cluster)
    }

    /// A host cluster for new data of the guest cluster at `c0`: appended
    /// and counted, or, with an external data file, the guest offset
    /// itself there (data file clusters carry no refcounts).
    fn new_data_cluster(&self, st: &mut WriteState, c0: u64) -> Result<u64> {
        if self.layout.external_data {
            return Ok(c0);
        }
        self.alloc_cluster(st)
    }

    /// Release what a replaced entry referenced, once the replacement is
    /// durable (step 4).
    fn drop_old(&self, st: &mut WriteState, old: Cluster) -> Result<()> {
        let cs = self.layout.cluster_size();
        let held: Vec<u64> = match old {
            _ if self.layout.external_data => Vec::new(),
            Cluster::Data { host_offset, .. } => vec![host_offset],
            Cluster::Zero {
                host_offset: Some(h),
                ..
            } => vec![h],
            Cluster::Compressed {
                host_offset,
                compressed_len_bytes_upper_bound: b,
            } => {
                let first = host_offset / cs;
                let last = (host_offset + b - 1) / cs;
                (first..=last).map(|c| c * cs).collect()
            }
            _ => Vec::new(),
        };
        st.releases.extend(held);
        Ok(())
    }

    /// Make whole sectors read as zeros (see the module docs); the caller
    /// passes whole units ([`Layer::discard_unit`]) and writes zeros for
    /// the rest.
    pub(super) fn discard_impl(&self, offset: u64, len: u64) -> Result<()> {
        self.require_writable()?;
        let size = self.header.read().size;
        let end = (offset + len).min(size);
        let cs = self.layout.cluster_size();
        let sc = self.layout.subcluster_size();
        let mut at = offset;
        let mut st = self.session()?;
        while at < end {
            let c0 = at - at % cs;
            let cend = (c0 + cs).min(end);
            let whole = at == c0 && (cend == c0 + cs || cend == size);
            if self.header.read().version == 2 {
                if self.parent.read().is_some() {
                    let zeros = vec![0u8; (cend - at) as usize];
                    self.write_cluster(&mut st, at, &zeros)?;
                } else if whole {
                    self.unmap_cluster(&mut st, at, Cluster::Unallocated)?;
                } else {
                    self.write_cluster(&mut st, at, &vec![0u8; (cend - at) as usize])?;
                }
            } else if self.layout.extended_l2 && !whole {
                let first = (at - c0) / sc;
                let last = (cend - c0).div_ceil(sc);
                let mask = ((((1u64 << (last - first)) - 1) << first) & 0xffff_ffff) as u32;
                let (_, l2_offset) = self.writable_l2(&mut st, at)?;
                let (_, l2i) = self.layout.indices(at);
                let e = self.entry(at)?.unwrap_or(ExtendedL2Entry {
                    cluster: Cluster::Unallocated,
                    allocated: 0,
                    zero: 0,
                });
                if matches!(
                    e.cluster,
                    Cluster::Compressed { .. } | Cluster::Data { copied: false, .. }
                ) {
                    // Shared: copy on write with zeros, keeping the rest.
                    self.write_cluster(&mut st, at, &vec![0u8; (cend - at) as usize])?;
                } else {
                    let ne = ExtendedL2Entry {
                        cluster: e.cluster,
                        allocated: e.allocated & !mask,
                        zero: e.zero | mask,
                    };
                    self.set_l2(l2_offset, l2i, ne.encode(&self.layout))?;
                }
            } else if whole {
                let zero = if self.layout.extended_l2 {
                    Cluster::Unallocated
                } else {
                    Cluster::Zero {
                        host_offset: None,
                        copied: false,
                    }
                };
                self.unmap_cluster(&mut st, at, zero)?;
            } else {
                self.write_cluster(&mut st, at, &vec![0u8; (cend - at) as usize])?;
            }
            self.maybe_flush(&mut st)?;
            at = cend;
        }
        *self.allocated.lock() = None;
        Ok(())
    }

    /// Point the whole cluster at `at` to `new` (unallocated or zero; with
    /// extended L2 all zero bits set) and release what it held.
    fn unmap_cluster(&self, st: &mut WriteState, at: u64, new: Cluster) -> Result<()> {
        let (l1i, l2i) = self.layout.indices(at);
        if self.l1_entry(l1i)?.l2_offset == 0
            && matches!(new, Cluster::Unallocated)
            && !self.layout.extended_l2
        {
            return Ok(()); // unallocated already
        }
        let old = self
            .entry(at)?
            .map(|e| e.cluster)
            .unwrap_or(Cluster::Unallocated);
        let (_, l2_offset) = self.writable_l2(st, at)?;
        let words = if self.layout.extended_l2 {
            ExtendedL2Entry {
                cluster: Cluster::Unallocated,
                allocated: 0,
                zero: u32::MAX,
            }
            .encode(&self.layout)
        } else {
            (new.encode(&self.layout), 0)
        };
        self.set_l2(l2_offset, l2i, words)?;
        if self.layout.external_data {
            if let Cluster::Data { host_offset, .. } = old {
                let (f, _) = self.data_place();
                let _ =
                    crate::format::fileio::punch_hole(f, host_offset, self.layout.cluster_size());
            }
        }
        self.drop_old(st, old)
    }

    pub(super) fn flush_impl(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut g = self.alloc.lock();
        match g.as_mut() {
            Some(st) => self.flush_locked(st),
            None => self.sync_all(),
        }
    }

    /// Step 5 of the module docs. `alloc` held.
    fn flush_locked(&self, st: &mut WriteState) -> Result<()> {
        if !self.pending.is_empty() || !st.l1_dirty.is_empty() {
            self.sync()?;
            let es = self.layout.l2_entry_size();
            let sb = self.slice_bytes();
            let l1_offset = self.header.read().l1_table_offset;
            // Under the fill lock's write side: no reader caches a slice
            // between an entry's write and the refresh of its cached copy.
            let _m = self.meta.write();
            for (at, w) in self.pending.entries_in(0..u64::MAX) {
                crate::fault::point()?;
                self.file.write_all_at(&entry_bytes(w, es), at).ctx(
                    &self.path,
                    "cannot write an L2 entry",
                    Some(at),
                )?;
                let slice_at = at - at % sb;
                let key = self.slice_key(slice_at);
                if let Some(old) = self.cache.get(&key) {
                    let mut s = old.to_vec();
                    let i = (at - slice_at) as usize;
                    s[i..i + es as usize].copy_from_slice(&entry_bytes(w, es));
                    self.cache.insert(key, s.into());
                }
            }
            for &i in &st.l1_dirty {
                let raw = self.l1.read()[i as usize];
                let at = l1_offset + i * 8;
                crate::fault::point()?;
                self.file.write_all_at(&raw.to_be_bytes(), at).ctx(
                    &self.path,
                    "cannot write the L1 table",
                    Some(at),
                )?;
            }
            self.pending.clear();
            st.l1_dirty.clear();
        }
        if !st.releases.is_empty() {
            self.sync()?;
            for h in std::mem::take(&mut st.releases) {
                self.release(st, h)?;
            }
        }
        self.sync_all()
    }

    /// `fsync` the image file and the data file.
    fn sync_all(&self) -> Result<()> {
        crate::fault::point()?;
        if let Some((f, p)) = &self.data {
            f.sync_all().ctx(p, "cannot fsync", None)?;
        }
        self.file.sync_all().ctx(&self.path, "cannot fsync", None)
    }
}

/// An L2 entry's bytes on disk: one word, or both of an extended entry.
fn entry_bytes(w: (u64, u64), entry_size: u64) -> Vec<u8> {
    let mut b = w.0.to_be_bytes().to_vec();
    if entry_size == 16 {
        b.extend_from_slice(&w.1.to_be_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use crate::cache::MetaCache;
    use crate::format::{open_layer, CreateOptions, Extent, Layer, LayerOptions};
    use std::path::Path;

    fn opts(writable: bool) -> LayerOptions {
        LayerOptions {
            writable,
            ignore_checksums: false,
            cache: MetaCache::new(1 << 20),
        }
    }

    /// What a fresh open of `path` maps guest offset `at` to (the file as
    /// a crash would leave it; opened past the writer's lock).
    fn mapped(path: &Path, at: u64) -> Extent {
        let f = std::fs::File::open(path).unwrap();
        super::Qcow2Layer::open(f, path, &opts(false))
            .unwrap()
            .map(at, 512)
            .unwrap()
    }

    /// A new 8 MiB qcow2 with 64 KiB clusters at `path`.
    fn create_8m(path: &Path) {
        let o = CreateOptions {
            size: Some(8 << 20),
            fixed: false,
            block_size: Some(64 << 10),
            logical_sector: 512,
            parent: None,
            version: None,
            subblocks: false,
        };
        crate::format::registry::create(path, &o).unwrap();
    }

    /// Step 5: new entries reach the file only at a flush, after their
    /// data; the writer reads them before that, and a flush writes them.
    #[test]
    fn new_entries_wait_for_the_flush_and_the_writer_reads_them_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.qcow2");
        create_8m(&path);
        let l = open_layer(&path, &opts(true)).unwrap();
        l.write_sectors(3 << 20, &[7u8; 4096]).unwrap();
        // The writer sees its data ...
        let Extent::Data { file_offset, .. } = l.map(3 << 20, 4096).unwrap() else {
            panic!("the written cluster does not map to data");
        };
        let mut b = [0u8; 4096];
        l.read_data(file_offset, &mut b).unwrap();
        assert_eq!(b, [7u8; 4096]);
        // ... the file does not point at it yet ...
        assert!(
            matches!(mapped(&path, 3 << 20), Extent::Zero { .. }),
            "an entry reached the file before the flush"
        );
        // ... and does after the flush.
        l.flush().unwrap();
        assert!(matches!(mapped(&path, 3 << 20), Extent::Data { .. }));
    }

    /// Step 0: the dirty bit is on disk from the first change until a
    /// clean close (a flush alone keeps it); a read-only open never sets it.
    #[test]
    fn the_dirty_bit_marks_a_write_session_until_the_clean_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.qcow2");
        create_8m(&path);
        let dirty = || std::fs::read(&path).unwrap()[79] & 1 == 1;
        let l = open_layer(&path, &opts(true)).unwrap();
        assert!(!dirty(), "a writable open alone marks the image");
        l.write_sectors(1 << 20, &[9u8; 512]).unwrap();
        assert!(dirty(), "the first write does not mark the image");
        l.flush().unwrap();
        assert!(dirty(), "a flush ends the session");
        drop(l);
        assert!(!dirty(), "the clean close leaves the image marked");
        drop(open_layer(&path, &opts(false)).unwrap());
        assert!(!dirty());
        // Giving up the write lock ends the session too (a merge shares
        // its DESTINATION again that way, before the object is dropped).
        let l = open_layer(&path, &opts(true)).unwrap();
        l.write_sectors(2 << 20, &[3u8; 512]).unwrap();
        assert!(dirty());
        l.set_lock(crate::format::LockMode::Unlocked).unwrap();
        assert!(!dirty(), "unlocked with the session still open");
    }
}
