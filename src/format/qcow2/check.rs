//! `check` of one qcow2 file: the header's state bits, the tables' places
//! (L1, refcount table, every L2 table of the active L1 inside the file)
//! and every entry of the active L2 tables (decodable, data inside the
//! file). Refcounts are not recounted here; `qemu-img check` does that.

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
        out.push(format!(
            "{p}: the dirty bit is set (incompatible bit 0): refcounts may lag behind the tables \
             after a crash with lazy refcounts (`qemu-img check -r all` rebuilds them)"
        ));
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
                })) if host_offset + cs > data_len && l.data.is_none() => note(
                    &mut out,
                    format!(
                        "{}: at offset {host_offset:#x}: the data cluster of guest offset {at:#x} lies past the end of the file",
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
    Ok(out)
}
