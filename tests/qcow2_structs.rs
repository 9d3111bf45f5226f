//! The qcow2 structure parsers against qemu's own view of qemu-made images.
//!
//! `tests/fixtures/qcow2/make.sh` builds every image at test time (about
//! 3 s) into one temporary folder shared by the tests here. Then:
//!
//! * the flattened content qemu reads (`qemu-img convert -O raw`) matches
//!   the pinned `expected.sha256`, so the fixtures are what they claim;
//! * each header, parsed with `chainfs::format::qcow2`, agrees with
//!   `qemu-img info --output=json` (virtual size, cluster size, backing
//!   file and format, compat, compression type, extended L2, lazy
//!   refcounts, refcount bits, dirty, data file, encryption, snapshots);
//! * every guest cluster (subcluster with extended L2) decoded through our
//!   L1/L2 decoders agrees with `qemu-img map --output=json`, and every
//!   allocated host cluster has a refcount of at least one (exactly one
//!   where COPIED is set) in our refcount decoding.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use chainfs::error::ErrorKind;
use chainfs::format::qcow2::{
    decode_refcount_table_entry, get_refcount, parse_snapshot_table, Cluster, ExtendedL2Entry,
    Header, L1Entry, Layout, Subcluster,
};
use serde_json::Value;

fn fixtures() -> Option<&'static Path> {
    static DIR: OnceLock<Option<tempfile::TempDir>> = OnceLock::new();
    DIR.get_or_init(|| {
        if !common::require(
            "qemu-img and qemu-io",
            common::have("qemu-img") && common::have("qemu-io"),
        ) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qcow2/make.sh");
        let out = Command::new(&script).arg(dir.path()).output().unwrap();
        assert!(
            out.status.success(),
            "make.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(dir)
    })
    .as_ref()
    .map(|d| d.path())
}

fn images(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
        .collect();
    v.sort();
    v
}

fn qemu_json(args: &[&str], img: &Path) -> Value {
    // From the image's folder: qemu 10.0 opens a relative external data
    // file name against its working directory (backing names it resolves
    // against the image's folder).
    let out = Command::new("qemu-img")
        .current_dir(img.parent().unwrap())
        .args(args)
        .arg(img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?} {}: {}",
        img.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn read_at(f: &File, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

/// What a driver does: read the fixed header, learn the cluster size, read
/// the first cluster (or the whole file when shorter) and parse that.
fn header(path: &Path) -> Header {
    let f = File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let head = read_at(&f, 0, 104.min(len as usize));
    let bits = u32::from_be_bytes(head[20..24].try_into().unwrap()).clamp(9, 21);
    let first = read_at(&f, 0, (1u64 << bits).min(len) as usize);
    Header::parse(&first).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn flat_content_matches_pinned_hashes() {
    let Some(dir) = fixtures() else { return };
    let got = std::fs::read_to_string(dir.join("manifest.sha256")).unwrap();
    let want = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qcow2/expected.sha256"),
    )
    .unwrap();
    assert_eq!(got, want);
    assert_eq!(images(dir).len(), want.lines().count());
}

#[test]
fn headers_agree_with_qemu_img_info() {
    let Some(dir) = fixtures() else { return };
    for img in images(dir) {
        check_info(&img);
    }
}

/// One image's header (and snapshots) against `qemu-img info`.
fn check_info(img: &Path) {
    let name = img.file_name().unwrap().to_str().unwrap().to_string();
    let h = header(img);
    let info = qemu_json(&["info", "-U", "--output=json"], img);
    let ctx = |what: &str| format!("{name}: {what}");
    assert_eq!(
        Some(h.size),
        info["virtual-size"].as_u64(),
        "{}",
        ctx("virtual size")
    );
    assert_eq!(
        Some(h.cluster_size()),
        info["cluster-size"].as_u64(),
        "{}",
        ctx("cluster size")
    );
    let backing = h
        .backing_file
        .as_ref()
        .map(|b| String::from_utf8(b.clone()).unwrap());
    assert_eq!(
        backing.as_deref(),
        info["backing-filename"].as_str(),
        "{}",
        ctx("backing file")
    );
    let bfmt = h.backing_format().map(|b| std::str::from_utf8(b).unwrap());
    assert_eq!(
        bfmt,
        info["backing-filename-format"].as_str(),
        "{}",
        ctx("backing format")
    );
    assert_eq!(
        h.is_dirty(),
        info["dirty-flag"].as_bool().unwrap(),
        "{}",
        ctx("dirty")
    );
    assert_eq!(
        h.crypt_method != 0,
        info["encrypted"].as_bool().unwrap_or(false),
        "{}",
        ctx("encrypted")
    );
    let d = &info["format-specific"]["data"];
    let compat = if h.version == 2 { "0.10" } else { "1.1" };
    assert_eq!(Some(compat), d["compat"].as_str(), "{}", ctx("compat"));
    let ct = match h.compression() {
        chainfs::format::qcow2::Compression::Zlib => "zlib",
        chainfs::format::qcow2::Compression::Zstd => "zstd",
    };
    assert_eq!(
        Some(ct),
        d["compression-type"].as_str(),
        "{}",
        ctx("compression type")
    );
    assert_eq!(
        Some(h.layout().refcount_bits()),
        d["refcount-bits"].as_u64(),
        "{}",
        ctx("refcount bits")
    );
    if h.version == 3 {
        assert_eq!(
            Some(h.layout().extended_l2),
            d["extended-l2"].as_bool(),
            "{}",
            ctx("extended l2")
        );
        assert_eq!(
            Some(h.lazy_refcounts()),
            d["lazy-refcounts"].as_bool(),
            "{}",
            ctx("lazy refcounts")
        );
        assert_eq!(
            Some(h.is_corrupt()),
            d["corrupt"].as_bool(),
            "{}",
            ctx("corrupt")
        );
    } else {
        assert!(
            d["extended-l2"].is_null() && d["lazy-refcounts"].is_null(),
            "{}",
            ctx("v2 has no v3 fields")
        );
    }
    let data_file = h.data_file().map(|b| std::str::from_utf8(b).unwrap());
    assert_eq!(data_file, d["data-file"].as_str(), "{}", ctx("data file"));
    if data_file.is_some() {
        assert_eq!(
            Some(h.data_file_raw()),
            d["data-file-raw"].as_bool(),
            "{}",
            ctx("data file raw")
        );
    }
    // Snapshots: ids, names, times, VM state and their L1 tables.
    let layout = h.layout();
    let f = File::open(img).unwrap();
    let len = f.metadata().unwrap().len();
    let table = read_at(
        &f,
        h.snapshots_offset,
        (len - h.snapshots_offset).min(1 << 20) as usize,
    );
    let snaps = parse_snapshot_table(&table, h.snapshots_offset, h.nb_snapshots, &layout).unwrap();
    let qsnaps = info["snapshots"].as_array().cloned().unwrap_or_default();
    assert_eq!(snaps.len(), qsnaps.len(), "{}", ctx("snapshot count"));
    for (s, q) in snaps.iter().zip(&qsnaps) {
        assert_eq!(Some(std::str::from_utf8(&s.id).unwrap()), q["id"].as_str());
        assert_eq!(
            Some(std::str::from_utf8(&s.name).unwrap()),
            q["name"].as_str()
        );
        assert_eq!(Some(u64::from(s.date_sec)), q["date-sec"].as_u64());
        assert_eq!(Some(u64::from(s.date_nsec)), q["date-nsec"].as_u64());
        assert_eq!(Some(s.vm_state_size), q["vm-state-size"].as_u64());
        assert_eq!(s.disk_size, Some(h.size), "{}", ctx("snapshot disk size"));
        assert!(s.l1_table_offset > 0 && s.l1_table_offset % h.cluster_size() == 0);
        assert!(u64::from(s.l1_size) >= layout.l1_entries_for(h.size));
    }
    // What chainfs will refuse: the encrypted image, by name.
    match h.check_supported(false) {
        Ok(()) => assert_eq!(h.crypt_method, 0, "{}", ctx("accepted")),
        Err(e) => {
            assert_eq!(name, "luks.qcow2", "{}", e.message());
            assert_eq!(e.kind, ErrorKind::Unsupported);
            assert!(e.message().contains("LUKS"), "{}", e.message());
        }
    }
    // The header round-trips byte for byte through to_bytes, up to the
    // end of the backing name (or the end marker).
    let out = h.to_bytes().unwrap();
    assert_eq!(out, read_at(&f, 0, out.len()), "{}", ctx("to_bytes"));
}

/// Our decoding of one guest unit (a cluster, or a subcluster with
/// extended L2).
#[derive(Debug, PartialEq)]
enum Unit {
    Unallocated,
    /// With the preallocated host cluster, if any.
    Zero(Option<u64>),
    Data(u64),
    Compressed,
}

/// Walk the active L1/L2 tables and decode every guest unit.
/// Host clusters the active tables use: (offset, COPIED, is a data cluster).
type Refs = Vec<(u64, bool, bool)>;

fn decode_units(img: &Path, h: &Header) -> (u64, Vec<Unit>, Refs) {
    let f = File::open(img).unwrap();
    let l = h.layout();
    let cs = l.cluster_size();
    let unit = l.subcluster_size();
    let l1 = read_at(&f, h.l1_table_offset, h.l1_size as usize * 8);
    let mut units = Vec::new();
    // Host clusters referenced by the active tables, with their COPIED bit.
    let mut refs = vec![(h.l1_table_offset, false, false)];
    let clusters = h.size.div_ceil(cs);
    for c in 0..clusters {
        let (i1, i2) = l.indices(c * cs);
        let at = h.l1_table_offset + i1 * 8;
        let e1 = L1Entry::decode(
            u64::from_be_bytes(l1[i1 as usize * 8..][..8].try_into().unwrap()),
            at,
            &l,
        )
        .unwrap();
        let per = (cs / unit) as u32;
        if e1.l2_offset == 0 {
            units.extend((0..per).map(|_| Unit::Unallocated));
            continue;
        }
        if i2 == 0 {
            refs.push((e1.l2_offset, e1.copied, false));
        }
        let at = e1.l2_offset + i2 * l.l2_entry_size();
        let raw = read_at(&f, at, l.l2_entry_size() as usize);
        let w0 = u64::from_be_bytes(raw[..8].try_into().unwrap());
        if l.extended_l2 {
            let w1 = u64::from_be_bytes(raw[8..].try_into().unwrap());
            let e = ExtendedL2Entry::decode(w0, w1, at, &l).unwrap();
            if let Cluster::Data {
                host_offset,
                copied,
            } = e.cluster
            {
                refs.push((host_offset, copied, true));
            }
            for s in 0..per {
                units.push(match e.subcluster(s, &l) {
                    Subcluster::Unallocated => Unit::Unallocated,
                    Subcluster::Zero => Unit::Zero(None),
                    Subcluster::Data { host_offset } => Unit::Data(host_offset),
                    Subcluster::Compressed => Unit::Compressed,
                });
            }
        } else {
            units.push(match Cluster::decode(w0, at, &l).unwrap() {
                Cluster::Unallocated => Unit::Unallocated,
                Cluster::Zero { host_offset, .. } => Unit::Zero(host_offset),
                Cluster::Data {
                    host_offset,
                    copied,
                } => {
                    refs.push((host_offset, copied, true));
                    Unit::Data(host_offset)
                }
                Cluster::Compressed {
                    host_offset,
                    compressed_len_bytes_upper_bound,
                } => {
                    assert!(compressed_len_bytes_upper_bound >= 512 - (host_offset & 511));
                    assert!(host_offset < f.metadata().unwrap().len());
                    Unit::Compressed
                }
            });
        }
    }
    (unit, units, refs)
}

/// The refcount of host cluster `off`, through our refcount decoders.
fn refcount(f: &File, h: &Header, l: &Layout, off: u64) -> u64 {
    let c = off / l.cluster_size();
    let n = l.refcount_block_entries();
    let at = h.refcount_table_offset + (c / n) * 8;
    let raw = u64::from_be_bytes(read_at(f, at, 8).try_into().unwrap());
    match decode_refcount_table_entry(raw, at, l).unwrap() {
        None => 0,
        Some(block) => get_refcount(&read_at(f, block, l.cluster_size() as usize), c % n, l),
    }
}

#[test]
fn l2_decoding_agrees_with_qemu_img_map() {
    let Some(dir) = fixtures() else { return };
    let mut seen = BTreeMap::new();
    for img in images(dir) {
        check_map(&img, &mut seen);
    }
    for kind in ["Data", "Zero", "ZeroAlloc", "Unallocated", "Compressed"] {
        assert!(
            seen.get(kind).copied().unwrap_or(0) > 0,
            "no {kind} unit in any fixture: {seen:?}"
        );
    }
}

/// One image's clusters against `qemu-img map`, and its refcounts;
/// counts the kinds of unit seen.
fn check_map(img: &Path, seen: &mut BTreeMap<String, usize>) {
    let name = img.file_name().unwrap().to_str().unwrap().to_string();
    let h = header(img);
    if h.crypt_method != 0 {
        return;
    }
    let (unit, units, refs) = decode_units(img, &h);
    let map = qemu_json(&["map", "-U", "--output=json"], img);
    let has_backing = h.backing_file.is_some();
    for r in map.as_array().unwrap() {
        let (start, length) = (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap());
        let depth = r["depth"].as_u64().unwrap();
        let mut g = start;
        while g < start + length {
            let ours = &units[(g / unit) as usize];
            let ctx = format!("{name}: guest {g:#x}: ours {ours:?}, qemu {r}");
            match ours {
                Unit::Data(host) => {
                    assert_eq!(depth, 0, "{ctx}");
                    // qemu's "zero" also reports holes in the host file
                    // (preallocated clusters never written): not checked.
                    assert!(r["data"].as_bool().unwrap(), "{ctx}");
                    let theirs = r["offset"].as_u64().map(|o| o + (g - start));
                    assert_eq!(theirs, Some(host + g % unit), "{ctx}");
                }
                Unit::Compressed => {
                    assert_eq!(depth, 0, "{ctx}");
                    assert_eq!(r["compressed"].as_bool(), Some(true), "{ctx}");
                }
                Unit::Zero(host) => {
                    assert_eq!(depth, 0, "{ctx}");
                    assert!(
                        r["zero"].as_bool().unwrap() && !r["data"].as_bool().unwrap(),
                        "{ctx}"
                    );
                    // A zero cluster that keeps its host cluster: qemu
                    // shows the offset too.
                    if let Some(host) = host {
                        let theirs = r["offset"].as_u64().map(|o| o + (g - start));
                        assert_eq!(theirs, Some(host + g % unit), "{ctx}");
                    }
                }
                // From the backing file; past its end qemu reports
                // depth 0, not present, zero (as without one).
                Unit::Unallocated if has_backing && depth > 0 => {}
                Unit::Unallocated => {
                    assert!(
                        !r["present"].as_bool().unwrap() && r["zero"].as_bool().unwrap(),
                        "{ctx}"
                    )
                }
            }
            let kind = match ours {
                Unit::Data(_) => "Data",
                Unit::Zero(None) => "Zero",
                Unit::Zero(Some(_)) => "ZeroAlloc",
                Unit::Unallocated => "Unallocated",
                Unit::Compressed => "Compressed",
            };
            *seen.entry(kind.to_string()).or_insert(0) += 1;
            g += unit;
        }
    }
    // Refcounts: every cluster the active tables use is counted; COPIED
    // means exactly one. (External data clusters are not refcounted.)
    let f = File::open(img).unwrap();
    let l = h.layout();
    let mut lagging = 0;
    for (off, copied, data) in refs {
        if l.external_data && data {
            continue;
        }
        let rc = refcount(&f, &h, &l, off);
        if h.is_dirty() {
            // Lazy refcounts: qemu wrote the L2 entry and died before
            // the refcount; only a rebuild makes them agree.
            lagging += usize::from(rc == 0);
            continue;
        }
        assert!(rc >= 1, "{name}: cluster {off:#x} has refcount 0");
        if copied {
            assert_eq!(rc, 1, "{name}: cluster {off:#x} is COPIED");
        }
    }
    assert_eq!(
        h.is_dirty(),
        lagging > 0,
        "{name}: refcounts lag behind L2 exactly when dirty"
    );
    if name == "snap.qcow2" {
        // The snapshot shares the first cluster's data; the rewritten
        // second cluster was copied on write.
        let first = match units[0] {
            Unit::Data(o) => o,
            ref u => panic!("snap.qcow2 cluster 0 is {u:?}"),
        };
        assert_eq!(refcount(&f, &h, &l, first), 2, "shared with the snapshot");
    }
}

/// The qemu-made images kept in `tests/fixtures/real` (a 3-level chain and
/// 4064 compressed clusters in zlib and zstd) pass the same checks.
#[test]
fn real_qemu_images_agree_with_qemu_img() {
    if !common::require("qemu-img", common::have("qemu-img")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut seen = BTreeMap::new();
    let names = [
        "backing-chain-3",
        "backing-chain-2",
        "backing-chain-1",
        "basic",
        "basic-zstd",
    ];
    let imgs: Vec<PathBuf> = names
        .iter()
        .map(|n| common::unpack_fixture(&format!("dissect-hypervisor/qcow2/{n}.qcow2"), dir.path()))
        .collect();
    for img in &imgs {
        check_info(img);
        check_map(img, &mut seen);
    }
    assert_eq!(
        header(&imgs[2]).backing_file.as_deref(),
        Some(&b"backing-chain-2.qcow2"[..])
    );
    assert!(seen["Compressed"] >= 2 * 4064, "{seen:?}");
}
