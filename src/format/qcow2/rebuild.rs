//! Rebuilding the refcounts of a dirty image before its first write (what
//! `qemu-img check -r all` does): an image left with the dirty bit by a
//! crash under lazy refcounts has refcounts lower than its tables say.
//!
//! Every reference is counted from the tables: the header cluster, the
//! refcount table and its blocks, the snapshot table, every L1 table (the
//! active one and each snapshot's), every L2 table once per L1 entry that
//! points to it, and every cluster those L2 entries hold (data, a
//! preallocated zero cluster, each cluster a compressed one spans), once
//! per entry, as qemu counts them. Persistent bitmaps are not counted:
//! the first write clears their autoclear bit first, so qemu no longer
//! uses them. Refcount blocks the counts need and the image lacks are
//! appended; then every block is rewritten with the counts, synced, the
//! space nothing references is given back (the unreferenced tail cut off,
//! clusters before it punched out: what a crash of chainfs's own writer
//! leaked), and only then the dirty bit is cleared (and synced). A crash in between
//! leaves the image dirty, so the rebuild simply runs again (in chainfs or
//! qemu).

use std::os::unix::fs::FileExt;

use super::alloc::WriteState;
use super::*;
use crate::error::{ErrorKind, IoContext};

impl Qcow2Layer {
    pub(super) fn rebuild_refcounts(&self, st: &mut WriteState) -> Result<()> {
        log::info!(
            "{}: the image is dirty: rebuilding its refcounts before writing",
            self.path.display()
        );
        let h = self.header();
        let l = self.layout;
        let cs = l.cluster_size();
        let mut refs = self.count_references(&st.rt, st.next_free / cs)?;
        let path = &self.path;
        // Blocks the counts need that the image lacks: appended, counted.
        let rbe = l.refcount_block_entries();
        loop {
            let blocks = (refs.len() as u64).div_ceil(rbe);
            let missing = (0..blocks).find(|&b| {
                st.rt.get(b as usize).copied().unwrap_or(0) == 0
                    && refs[(b * rbe) as usize..((b + 1) * rbe).min(refs.len() as u64) as usize]
                        .iter()
                        .any(|&r| r > 0)
            });
            let Some(b) = missing else { break };
            if b as usize >= st.rt.len() {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "{}: the refcount table is too small to rebuild the refcounts; run `qemu-img check -r all`",
                        path.display()
                    ),
                ));
            }
            let at = st.next_free;
            st.next_free += cs;
            refs.push(1);
            st.rt[b as usize] = at;
        }
        let rt_at = h.refcount_table_offset;
        for (b, &at) in st.rt.iter().enumerate().filter(|(_, &a)| a != 0) {
            let mut block = vec![0u8; cs as usize];
            let first = b as u64 * rbe;
            for i in 0..rbe {
                let r = refs.get((first + i) as usize).copied().unwrap_or(0);
                if r > 0 {
                    set_refcount(&mut block, i, r, &l).map_err(|e| in_file(e, path))?;
                }
            }
            crate::fault::point()?;
            let _m = self.meta.write();
            self.file.write_all_at(&block, at).ctx(
                path,
                "cannot write a refcount block",
                Some(at),
            )?;
            self.file
                .write_all_at(&at.to_be_bytes(), rt_at + b as u64 * 8)
                .ctx(
                    path,
                    "cannot write the refcount table",
                    Some(rt_at + b as u64 * 8),
                )?;
            self.cache.insert(
                crate::cache::Key::map_page(self.key, b as u64),
                block.into(),
            );
        }
        self.sync()?;
        self.free_unreferenced(st, &refs)?;
        self.update_header(|h| h.incompatible_features &= !INCOMPAT_DIRTY)?;
        self.sync()
    }

    /// After the rebuilt counts are durable: the unreferenced tail is cut
    /// off (the next cluster is appended where it began, so a rerun reuses
    /// what a crash left) and unreferenced clusters before it are punched
    /// out. A crash here leaves the image dirty: the rebuild runs again.
    fn free_unreferenced(&self, st: &mut WriteState, refs: &[u64]) -> Result<()> {
        let cs = self.layout.cluster_size();
        let len = self.file_len()?;
        let used_end = refs
            .iter()
            .rposition(|&r| r > 0)
            .map_or(cs, |c| (c as u64 + 1) * cs);
        if used_end < len {
            crate::fault::point()?;
            self.file.set_len(used_end).ctx(
                &self.path,
                "cannot cut off the unreferenced tail",
                Some(used_end),
            )?;
            st.next_free = used_end;
            log::info!(
                "{}: cut off {} unreferenced bytes at the end",
                self.path.display(),
                len - used_end
            );
        }
        let last = ((used_end / cs) as usize).min(refs.len());
        let mut c = 0;
        for run in refs[..last].chunk_by(|a, b| (*a == 0) == (*b == 0)) {
            let (s, e) = (c as u64 * cs, (c + run.len()) as u64 * cs);
            c += run.len();
            if run[0] == 0 {
                if let Err(err) = crate::format::space::punch_range(&self.file, &self.path, s, e) {
                    log::debug!("{}: punch hole at {s:#x}: {err}", self.path.display());
                }
            }
        }
        self.sync()
    }

    /// How many times the tables reference each cluster of the file
    /// (`clusters` long; see the module docs for what is counted). `rt`:
    /// the refcount table's entries (its blocks count too).
    pub(super) fn count_references(&self, rt: &[u64], clusters: u64) -> Result<Vec<u64>> {
        let h = self.header();
        let l = self.layout;
        let cs = l.cluster_size();
        let mut refs: Vec<u64> = vec![0; clusters as usize];
        let path = &self.path;

        let add = |refs: &mut Vec<u64>, off: u64, len: u64, what: &str| -> Result<()> {
            if len == 0 {
                return Ok(());
            }
            for c in off / cs..=(off + len - 1) / cs {
                match refs.get_mut(c as usize) {
                    Some(r) => *r += 1,
                    None => {
                        return Err(Error::corrupt(
                            path,
                            off,
                            format!(
                                "{what} lies past the end of the file; run `qemu-img check -r all`"
                            ),
                        ))
                    }
                }
            }
            Ok(())
        };
        add(&mut refs, 0, cs, "the header")?;
        add(
            &mut refs,
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
            "the refcount table",
        )?;
        for &b in rt.iter().filter(|&&b| b != 0) {
            add(&mut refs, b, cs, "a refcount block")?;
        }
        let mut l1s = vec![(h.l1_table_offset, u64::from(h.l1_size))];
        if h.nb_snapshots > 0 {
            let (snaps, len) = self.snapshots(&h)?;
            add(&mut refs, h.snapshots_offset, len, "the snapshot table")?;
            l1s.extend(
                snaps
                    .iter()
                    .map(|s| (s.l1_table_offset, u64::from(s.l1_size))),
            );
        }
        let es = l.l2_entry_size();
        for (l1_at, n) in l1s {
            add(&mut refs, l1_at, n * 8, "an L1 table")?;
            let mut l1 = vec![0u8; (n * 8) as usize];
            self.file.read_exact_at(&mut l1, l1_at).ctx(
                path,
                "cannot read an L1 table",
                Some(l1_at),
            )?;
            for (i, w) in l1.chunks_exact(8).enumerate() {
                let raw = u64::from_be_bytes(w.try_into().expect("8 bytes"));
                let e =
                    L1Entry::decode(raw, l1_at + i as u64 * 8, &l).map_err(|e| in_file(e, path))?;
                if e.l2_offset == 0 {
                    continue;
                }
                add(&mut refs, e.l2_offset, cs, "an L2 table")?;
                let mut t = vec![0u8; cs as usize];
                self.file.read_exact_at(&mut t, e.l2_offset).ctx(
                    path,
                    "cannot read an L2 table",
                    Some(e.l2_offset),
                )?;
                for (j, w) in t.chunks_exact(es as usize).enumerate() {
                    let raw = u64::from_be_bytes(w[..8].try_into().expect("8 bytes"));
                    let at = e.l2_offset + j as u64 * es;
                    let c = Cluster::decode(raw, at, &l).map_err(|e| in_file(e, path))?;
                    match c {
                        _ if l.external_data => {}
                        Cluster::Data { host_offset, .. }
                        | Cluster::Zero {
                            host_offset: Some(host_offset),
                            ..
                        } => add(&mut refs, host_offset, cs, "a data cluster")?,
                        Cluster::Compressed {
                            host_offset,
                            compressed_len_bytes_upper_bound: b,
                        } => {
                            let b = b.min((refs.len() as u64 * cs).saturating_sub(host_offset));
                            add(&mut refs, host_offset, b.max(1), "a compressed cluster")?
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(refs)
    }

    /// The snapshot table and its length in bytes.
    fn snapshots(&self, h: &Header) -> Result<(Vec<Snapshot>, u64)> {
        let len = self.file_len()?;
        let at = h.snapshots_offset;
        let mut want = 64u64 << 10;
        loop {
            let n = want.min(len.saturating_sub(at));
            let mut b = vec![0u8; n as usize];
            self.file.read_exact_at(&mut b, at).ctx(
                &self.path,
                "cannot read the snapshot table",
                Some(at),
            )?;
            match parse_snapshot_table(&b, at, h.nb_snapshots, &self.layout) {
                Ok(s) => {
                    let total = s.iter().map(|s| s.to_bytes().len() as u64).sum();
                    return Ok((s, total));
                }
                Err(_) if n == want => want *= 4,
                Err(e) => return Err(in_file(e, &self.path)),
            }
        }
    }
}
