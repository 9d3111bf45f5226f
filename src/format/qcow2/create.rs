//! `chainfs create X.qcow2`: a new, empty image, laid out as qemu-img lays
//! out a new one (version 3 unless `--compat 0.10`, 64 KiB clusters unless
//! `--block-size`/`--cluster-size` says otherwise, extended L2 entries with
//! `--extended-l2`, 16-bit refcounts):
//!
//! ```text
//! cluster 0: header (112 bytes; v2: 72) [backing format extension] [end] [backing name]
//! then:      refcount table | L1 table (zeros) | refcount blocks
//! ```
//!
//! Every cluster of the file is metadata with refcount 1, so `qemu-img
//! check` finds it clean. A child over `--parent` records the parent's
//! path relative to its own folder (the file name alone in the same
//! folder, `../b/p.qcow2` elsewhere: what `qemu-img create -b` stores when
//! given that name) and always the backing format (`qcow2` or `raw`), so
//! the parent is never probed. The file is created new, filled, synced;
//! a failure removes it.

use std::os::unix::fs::FileExt;

use super::*;
use crate::format::CreateOptions;

/// The default cluster size, qemu's.
const DEFAULT_CLUSTER: u64 = 64 << 10;
/// Header length of a new image: the v3 fields, the compression type
/// byte, padding to 8 (as qemu writes it).
const NEW_HEADER_LEN: u32 = 112;
const REFCOUNT_ORDER: u32 = 4;

pub(super) fn create(path: &Path, o: &CreateOptions, parent: Option<&dyn Layer>) -> Result<()> {
    if o.fixed {
        return Err(Error::invalid(format!(
            "{}: qcow2 images are created sparse (preallocate with `qemu-img create -o preallocation=...`)",
            path.display()
        )));
    }
    let cs = o.block_size.unwrap_or(DEFAULT_CLUSTER);
    if !cs.is_power_of_two() || !(1 << MIN_CLUSTER_BITS..=1 << MAX_CLUSTER_BITS).contains(&cs) {
        return Err(Error::invalid(format!(
            "{}: cluster size {cs} must be a power of two from 512 to 2M",
            path.display()
        )));
    }
    let size = match (o.size, parent) {
        (Some(s), _) => s,
        (None, Some(p)) => p.virtual_size(),
        (None, None) => return Err(Error::invalid("--size is required for a base disk")),
    };
    if size % 512 != 0 || size > 1 << 55 {
        return Err(Error::invalid(format!(
            "{}: size {size} must be a multiple of 512 bytes, at most 32 PiB",
            path.display()
        )));
    }
    let backing = match parent {
        Some(p) => Some(backing_of(path, p)?),
        None => None,
    };
    let v2 = o.version.as_deref() == Some("0.10");
    if o.subblocks && (v2 || cs < 1 << MIN_EXTENDED_L2_CLUSTER_BITS) {
        return Err(Error::invalid(format!(
            "{}: --extended-l2 needs version 3 (--compat 1.1) and clusters of at least 16K",
            path.display()
        )));
    }
    let mut h = new_header(size, cs.trailing_zeros(), backing.as_ref())?;
    if v2 {
        h.version = 2;
        h.header_length = V2_HEADER_LEN;
        h.tail.clear();
    }
    if o.subblocks {
        h.incompatible_features |= INCOMPAT_EXTENDED_L2;
    }
    if let Some((name, _)) = &backing {
        // The name's place follows the header's length.
        set_backing_name(&mut h, name.as_bytes())?;
    }
    let (meta, rb_count) = place_tables(&mut h)?;
    let bytes = h.to_bytes()?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .ctx(path, "cannot create", None)?;
    let filled = (|| {
        let layout = h.layout();
        file.set_len(meta * cs).ctx(path, "cannot size", None)?;
        file.write_all_at(&bytes, 0)
            .ctx(path, "cannot write the header", Some(0))?;
        // The refcount blocks follow the L1 table; each covers
        // `rb_entries` clusters, the first `meta` of which are in use.
        let rb_first = meta - rb_count;
        let rbe = layout.refcount_block_entries();
        let mut table = vec![0u8; (u64::from(h.refcount_table_clusters) * cs) as usize];
        for b in 0..rb_count {
            let at = (rb_first + b) * cs;
            table[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&at.to_be_bytes());
            let mut block = vec![0u8; cs as usize];
            for i in 0..rbe.min(meta.saturating_sub(b * rbe)) {
                set_refcount(&mut block, i, 1, &layout).map_err(|e| in_file(e, path))?;
            }
            file.write_all_at(&block, at)
                .ctx(path, "cannot write a refcount block", Some(at))?;
        }
        let at = h.refcount_table_offset;
        file.write_all_at(&table, at)
            .ctx(path, "cannot write the refcount table", Some(at))?;
        file.sync_all().ctx(path, "cannot fsync", None)
    })();
    if filled.is_err() {
        // Ours: created above with create_new.
        let _ = std::fs::remove_file(path);
    }
    filled
}

/// (stored name, format name) of the backing file of a child at `path`.
fn backing_of(path: &Path, p: &dyn Layer) -> Result<(String, String)> {
    let abs = std::fs::canonicalize(p.path()).ctx(p.path(), "cannot resolve", None)?;
    let dir = std::fs::canonicalize(folder_of(path)).ctx(path, "cannot resolve folder", None)?;
    Ok((
        crate::format::hint::header_name(&dir, &abs),
        p.info().format.to_string(),
    ))
}

/// The header of an empty v3 image, tables not placed yet.
pub(super) fn new_header(
    size: u64,
    cluster_bits: u32,
    backing: Option<&(String, String)>,
) -> Result<Header> {
    let mut h = Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size,
        crypt_method: CRYPT_NONE,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: 0,
        refcount_table_clusters: 0,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: REFCOUNT_ORDER,
        header_length: NEW_HEADER_LEN,
        compression_type: 0,
        tail: vec![0; (NEW_HEADER_LEN - HEADER_LEN_WITH_COMPRESSION) as usize],
        extensions: Vec::new(),
        backing_file: None,
    };
    if let Some((name, format)) = backing {
        h.extensions
            .push(Extension::BackingFormat(format.as_bytes().to_vec()));
        set_backing_name(&mut h, name.as_bytes())?;
    }
    Ok(h)
}

/// Put the backing file name right after the extensions and their end
/// marker; refuse a name that does not fit in the first cluster.
pub(super) fn set_backing_name(h: &mut Header, name: &[u8]) -> Result<()> {
    let ext: u64 = h
        .extensions
        .iter()
        .map(|e| 8 + (e.data().len() as u64).div_ceil(8) * 8)
        .sum();
    let at = u64::from(h.header_length) + ext + 8;
    if name.is_empty()
        || name.len() > MAX_BACKING_NAME as usize
        || at + name.len() as u64 > h.cluster_size()
    {
        return Err(Error::invalid(format!(
            "backing file name {:?} ({} bytes) does not fit in the first cluster ({} bytes free)",
            String::from_utf8_lossy(name),
            name.len(),
            h.cluster_size().saturating_sub(at)
        )));
    }
    h.backing_file_offset = at;
    h.backing_file_size = name.len() as u32;
    h.backing_file = Some(name.to_vec());
    Ok(())
}

/// Place the refcount table, the L1 table and the refcount blocks after
/// the header cluster (a fixed point: more metadata clusters may need more
/// refcount blocks). Returns (metadata clusters, refcount blocks).
fn place_tables(h: &mut Header) -> Result<(u64, u64)> {
    let layout = h.layout();
    let cs = layout.cluster_size();
    let l1 = layout.l1_entries_for(h.size).max(1);
    let l1c = (l1 * 8).div_ceil(cs);
    let rbe = layout.refcount_block_entries();
    let (mut rb, mut rt) = (1u64, 1u64);
    loop {
        let total = 1 + rt + l1c + rb;
        let (rb2, rt2) = (total.div_ceil(rbe), (total.div_ceil(rbe) * 8).div_ceil(cs));
        if (rb2, rt2) == (rb, rt) {
            break;
        }
        (rb, rt) = (rb2.max(rb), rt2.max(rt));
    }
    if (rt * cs) > MAX_REFTABLE_BYTES || l1 * 8 > MAX_L1_BYTES {
        return Err(Error::invalid(format!(
            "size {} needs tables larger than qemu allows with {cs}-byte clusters; use larger clusters",
            h.size
        )));
    }
    h.refcount_table_offset = cs;
    h.refcount_table_clusters = rt as u32;
    h.l1_table_offset = (1 + rt) * cs;
    h.l1_size = l1 as u32;
    Ok((1 + rt + l1c + rb, rb))
}
