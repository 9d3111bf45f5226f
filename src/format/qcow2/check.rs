//! `check` of one qcow2 file: the header's state bits (the dirty bit alone
//! is no problem: it marks a session, and what a crash hid behind it is
//! counted below), the tables' places
//! (L1, refcount table, every L2 table of the active L1 inside the file)
//! and every entry of the active L2 tables (decodable, data inside the
//! file), then the refcounts against the references the tables hold
//! (`count_references`, as `qemu-img check` counts them): a refcount below
//! its references is an error (a write could free a cluster still in use),
//! one above them a leak (space nothing uses).

use super::*;

/// At most this many problems of one kind are listed.
const MAX_LISTED: usize = 20;

pub(super) fn check(l: &Qcow2Layer) -> Result<Vec<String>> {
    let p = l.path.display();
    let h = l.header();
    let len = l.file_len()?;
    let cs = h.cluster_size();
    let mut out = Vec::new();
    if h.is_dirty() {
        // Not a problem by itself (a writer's session, or one a crash
        // ended): what it hides, refcounts below the references or leaks,
        // is reported below.
        log::info!(
            "{p}: the dirty bit is set (incompatible bit 0): the next writable open rebuilds the \
             refcounts"
        );
    }
    if h.is_corrupt() {
        out.push(format!(
            "{p}: marked corrupt by qemu (incompatible bit 1); `qemu-img check -r all` repairs it"
        ));
    }
    let rt_end = h.refcount_table_offset + u64::from(h.refcount_table_clusters) * cs;
    if rt_end > len {
        out.push(format!(
            "{p}: at offset {:#x}: the refcount table ({} clusters) runs past the end of the file ({len} bytes)",
            h.refcount_table_offset, h.refcount_table_clusters
        ));
    }
    let (data_len, data_path) = match &l.data {
        Some((f, dp)) => (f.metadata().ctx(dp, "cannot stat", None)?.len(), dp.clone()),
        None => (len, l.path.clone()),
    };
    let layout = l.layout;
    let entries = l.l1.read().len() as u64;
    let mut listed = 0;
    let mut note = |out: &mut Vec<String>, msg: String| {
        listed += 1;
        if listed <= MAX_LISTED {
            out.push(msg);
        } else if listed == MAX_LISTED + 1 {
            out.push(format!("{p}: more table problems not listed"));
        }
    };
    for l1i in 0..entries {
        let e = match l.l1_entry(l1i) {
            Ok(e) => e,
            Err(e) => {
                note(&mut out, e.to_string());
                continue;
            }
        };
        if e.l2_offset == 0 {
            continue;
        }
        if e.l2_offset + cs > len {
            note(
                &mut out,
                format!(
                    "{p}: at offset {:#x}: L1 entry {l1i} points to an L2 table at {:#x}, past the end of the file",
                    h.l1_table_offset + l1i * 8,
                    e.l2_offset
                ),
            );
            continue;
        }
        let first = l1i * layout.l2_coverage();
        let end = (first + layout.l2_coverage()).min(h.size);
        let mut at = first;
        while at < end {
            match l.entry(at) {
                Err(e) => note(&mut out, e.to_string()),
                Ok(Some(ExtendedL2Entry {
                    cluster: Cluster::Data { host_offset, .. },
                    ..
                })) if host_offset >= data_len && l.data.is_none() => note(
                    &mut out,
                    format!(
                        "{}: at offset {host_offset:#x}: the data cluster of guest offset {at:#x} starts past the end of the file",
                        data_path.display()
                    ),
                ),
                Ok(Some(ExtendedL2Entry {
                    cluster: Cluster::Compressed { host_offset, .. },
                    ..
                })) if host_offset >= len => note(
                    &mut out,
                    format!(
                        "{p}: at offset {host_offset:#x}: the compressed cluster of guest offset {at:#x} lies past the end of the file"
                    ),
                ),
                Ok(_) => {}
            }
            at += cs;
        }
    }
    if out.is_empty() || out.len() == usize::from(h.is_corrupt()) {
        out.extend(refcounts(l)?);
    }
    Ok(out)
}

/// Refcounts vs references (see the module docs).
fn refcounts(l: &Qcow2Layer) -> Result<Vec<String>> {
    let p = l.path.display();
    let st = match super::alloc::WriteState::load(l) {
        Ok(s) => s,
        Err(e) => return Ok(vec![e.to_string()]),
    };
    let cs = l.layout.cluster_size();
    let refs = match l.count_references(&st.rt, st.next_free / cs) {
        Ok(r) => r,
        Err(e) => return Ok(vec![e.to_string()]),
    };
    let rbe = l.layout.refcount_block_entries();
    // Persistent bitmaps' clusters are not counted by `count_references`.
    let bitmaps = l.header.read().autoclear_features & AUTOCLEAR_BITMAPS != 0;
    let (mut errors, mut leaks, mut first) = (0u64, 0u64, Vec::new());
    for (b, &at) in st.rt.iter().enumerate() {
        let first_c = b as u64 * rbe;
        if first_c >= refs.len() as u64 {
            break;
        }
        let block = if at == 0 {
            None
        } else {
            Some(l.refcount_block(b as u64, at)?)
        };
        for c in first_c..(first_c + rbe).min(refs.len() as u64) {
            let stored = block
                .as_ref()
                .map_or(0, |bl| get_refcount(bl, c - first_c, &l.layout));
            let want = refs[c as usize];
            if stored < want {
                errors += 1;
                if first.len() < MAX_LISTED {
                    first.push(format!(
                        "{p}: at offset {:#x}: the cluster's refcount is {stored} but the tables reference it {want} time(s)",
                        c * cs
                    ));
                }
            } else if stored > want && !bitmaps {
                leaks += 1;
            }
        }
    }
    // Clusters the table has no block for but the tables use.
    let covered = st.rt.len() as u64 * rbe;
    for c in covered..refs.len() as u64 {
        if refs[c as usize] > 0 {
            errors += 1;
            if first.len() < MAX_LISTED {
                first.push(format!(
                    "{p}: at offset {:#x}: the cluster is used but the refcount table does not cover it",
                    c * cs
                ));
            }
        }
    }
    if errors > first.len() as u64 {
        first.push(format!("{p}: {errors} refcount errors in all"));
    }
    if leaks > 0 {
        let cure = if l.header.read().is_dirty() {
            "the next write through chainfs (or any writable open in qemu) frees them"
        } else {
            "`qemu-img check -r leaks` frees them"
        };
        first.push(format!(
            "{p}: {leaks} cluster(s) leaked: counted but unused ({} bytes; left by an interrupted write, {cure})",
            leaks * cs
        ));
    }
    Ok(first)
}
