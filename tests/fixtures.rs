//! Real-writer fixtures (tests/fixtures/real, see SOURCES.md there): every
//! VHD is unpacked into a temporary folder, read through the `chainfs`
//! binary, and its flattened content compared with the sha256 recorded in
//! SOURCES.md (computed there with libvhdi and qemu-img). Also: the refusal
//! paths (bad checksums, missing parent), parent discovery through
//! `--parent-dir` / `--parent`, the MSB-first bitmap order on a real Windows
//! bitmap, the libvhdi structure fragments, and that read-only commands
//! leave every file of a chain untouched.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use chainfs::format::vhd::{DynamicHeader, Footer};
use common::*;
use tempfile::TempDir;
use uuid::Uuid;

const FIXED_FLAT: &str = "459325ab1fcd1d5ec9854cba790ee26378317cda177ffc1072008a1df88e6463";
const DYNAMIC_FLAT: &str = "ecff2ef6615a3cddc6a6885f1c6d9cf13a232697e1dc6575f2c2f01f57247784";
const EXT2_FLAT: &str = "870be7ae16c1fa8faab05c6eb9205dc9a7ae35c5f552c5cf8a267c0bc6a5cb99";
const IMAGE_FLAT: &str = "c6db12a7db548e193c29420c1b4533e4708b20c5033db5cc29ef075d48316d25";
/// fat-differential.vhd over the synthetic all-zero parent (note D1).
const FAT_FLAT: &str = "9e96fac774e2e3606e0e3d5f1152844ca3c6a45ed45e61f36586b2cd60b19d3f";
const FAT_PARENT_ID: &str = "5fa21a55-f394-aa4d-9958-1951a67d5540";
const IMAGE_ID: &str = "d49c5c80-350a-4a89-898a-5ad6d10f6578";

const SECTOR: usize = 512;
const GIB: u64 = 1 << 30;

/// `chainfs export IMG OUT EXTRA...`, then the sha256 of OUT.
fn export_sha(img: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args = vec!["export", p(img), p(out)];
    args.extend_from_slice(extra);
    chainfs_ok(&args);
    assert_eq!(
        fs::metadata(out).unwrap().len(),
        virtual_size_of(img, extra),
        "export of {} has the wrong length",
        img.display()
    );
    sha256_file(out)
}

/// The leaf's virtual size as `chainfs info --json` reports it.
fn virtual_size_of(img: &Path, extra: &[&str]) -> u64 {
    let v = info_json_with(img, extra);
    v[0]["virtual_size"].as_u64().expect("virtual_size")
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}

/// Footer, dynamic header and BAT of a dynamic/differencing VHD, parsed with
/// the library from the raw bytes (checksums not verified).
struct RawVhd {
    bytes: Vec<u8>,
    header: DynamicHeader,
    bat: Vec<u32>,
}

impl RawVhd {
    fn read(p: &Path) -> RawVhd {
        let bytes = fs::read(p).unwrap();
        let footer = Footer::parse(&bytes[bytes.len() - 512..], false).unwrap();
        let ho = footer.data_offset as usize;
        let header = DynamicHeader::parse(&bytes[ho..ho + 1024], false).unwrap();
        let to = header.table_offset as usize;
        let bat = (0..header.max_table_entries as usize)
            .map(|i| be32(&bytes, to + 4 * i))
            .collect();
        RawVhd { bytes, header, bat }
    }

    /// (block, file offset of its bitmap) of every allocated block.
    fn allocated(&self) -> Vec<(usize, usize)> {
        self.bat
            .iter()
            .enumerate()
            .filter(|(_, &e)| e != u32::MAX)
            .map(|(b, &e)| (b, e as usize * SECTOR))
            .collect()
    }
}

/// The synthetic all-zero fixed parent of fat-differential.vhd (SOURCES.md
/// note D1): a 4 MiB fixed VHD whose footer unique id is the one the child
/// records, with the checksum recomputed by `Footer::to_bytes`.
fn make_fat_parent(path: &Path) {
    chainfs_ok(&["create", p(path), "--type", "fixed", "--size", "4M"]);
    set_footer_id(path, FAT_PARENT_ID);
}

fn set_footer_id(path: &Path, id: &str) {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let at = f.metadata().unwrap().len() - 512;
    let mut b = [0u8; 512];
    f.read_exact_at(&mut b, at).unwrap();
    let mut footer = Footer::parse(&b, true).unwrap();
    footer.unique_id = uuid::Uuid::parse_str(id).unwrap();
    f.write_all_at(&footer.to_bytes(), at).unwrap();
    // The new footer must verify: to_bytes recomputed the checksum.
    f.read_exact_at(&mut b, at).unwrap();
    assert_eq!(
        Footer::parse(&b, true).unwrap().unique_id.to_string(),
        id,
        "patched footer of {}",
        path.display()
    );
}

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

// ---------------------------------------------------------------------------
// Single-layer real images: flat sha256 as recorded in SOURCES.md.

#[test]
fn windows_fixed_vhd_without_footer_copy_exports_recorded_sha256() {
    let t = TempDir::new().unwrap();
    let img = unpack_fixture("dissect-hypervisor/fixed.vhd", t.path());
    let bytes = fs::read(&img).unwrap();
    // Precondition: no footer copy at offset 0, only the trailing footer.
    assert_ne!(
        &bytes[0..8],
        b"conectix",
        "fixture should lack a footer copy"
    );
    assert_eq!(&bytes[bytes.len() - 512..bytes.len() - 504], b"conectix");
    let info = info_json_with(&img, &[]);
    assert_eq!(info[0]["disk_type"], "fixed");
    // current_size, not CHS 301/4/17 (10479616), and not the raw file length.
    assert_eq!(info[0]["virtual_size"], 10485760);
    assert_eq!(export_sha(&img, &t.path().join("out.raw"), &[]), FIXED_FLAT);
}

#[test]
fn windows_dynamic_vhd_with_bat_out_of_file_order_exports_recorded_sha256() {
    let t = TempDir::new().unwrap();
    let img = unpack_fixture("dissect-hypervisor/dynamic.vhd", t.path());
    // Precondition: blocks 0, 1, 3 allocated, stored in file order 0, 3, 1.
    let raw = RawVhd::read(&img);
    let mut alloc = raw.allocated();
    assert_eq!(alloc.iter().map(|a| a.0).collect::<Vec<_>>(), vec![0, 1, 3]);
    alloc.sort_by_key(|a| a.1);
    assert_eq!(
        alloc.iter().map(|a| a.0).collect::<Vec<_>>(),
        vec![0, 3, 1],
        "fixture's BAT should not be in file order"
    );
    let info = info_json_with(&img, &[]);
    assert_eq!(info[0]["disk_type"], "dynamic");
    assert_eq!(info[0]["virtual_size"], 10485760);
    assert_eq!(
        export_sha(&img, &t.path().join("out.raw"), &[]),
        DYNAMIC_FLAT
    );
}

#[test]
fn qemu_ext2_dynamic_vhd_exports_recorded_sha256() {
    let t = TempDir::new().unwrap();
    let img = unpack_fixture("dfvfs/ext2.vhd", t.path());
    let info = info_json_with(&img, &[]);
    assert_eq!(info[0]["disk_type"], "dynamic");
    assert_eq!(info[0]["creator"], "qemu");
    assert_eq!(info[0]["virtual_size"], 4212736);
    assert_eq!(export_sha(&img, &t.path().join("out.raw"), &[]), EXT2_FLAT);
}

// ---------------------------------------------------------------------------
// image.vhd / image-differential.vhd: hand-edited, wrong checksums, no locators.

/// Without --ignore-checksum, `export` and `info` fail with exit 3 and a
/// message naming the file, the footer's offset and the stored checksum.
fn assert_refused_for_checksum(img: &Path, out: &Path) {
    let bytes = fs::read(img).unwrap();
    let tail = bytes.len() - 512;
    let stored = be32(&bytes, tail + 64);
    // Precondition: the trailing footer's checksum really is wrong.
    assert!(Footer::parse(&bytes[tail..], true).is_err());
    let name = img.file_name().unwrap().to_str().unwrap();
    let offsets = [format!("{tail:#x}"), format!("{:#x}", tail + 64)];
    let checksum = format!("{stored:#010x}");
    for args in [
        vec!["export", p(img), p(out)],
        vec!["info", p(img)],
        vec!["check", p(img)],
    ] {
        let o = chainfs(&args);
        let err = stderr_of(&o);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {err}");
        assert!(err.contains(name), "{args:?} must name the file: {err}");
        assert!(
            offsets.iter().any(|x| err.contains(x.as_str())),
            "{args:?} must name the footer offset ({offsets:?}): {err}"
        );
        assert!(
            err.contains("checksum") && err.contains(&checksum),
            "{args:?} must name the checksum {checksum}: {err}"
        );
    }
    assert!(!out.exists(), "a refused export must not create its output");
}

#[test]
fn image_vhd_bad_footer_checksum_is_refused_exit_3_naming_file_offset_checksum() {
    let t = TempDir::new().unwrap();
    let img = unpack_fixture("dfvfs/image.vhd", t.path());
    assert_refused_for_checksum(&img, &t.path().join("out.raw"));
}

#[test]
fn image_differential_bad_checksums_are_refused_exit_3_naming_file_offset_checksum() {
    let t = TempDir::new().unwrap();
    unpack_fixture("dfvfs/image.vhd", t.path());
    let img = unpack_fixture("dfvfs/image-differential.vhd", t.path());
    assert_refused_for_checksum(&img, &t.path().join("out.raw"));
}

#[test]
fn image_vhd_with_ignore_checksum_reads_as_libvhdi() {
    let t = TempDir::new().unwrap();
    let img = unpack_fixture("dfvfs/image.vhd", t.path());
    assert_eq!(
        export_sha(&img, &t.path().join("out.raw"), &["--ignore-checksum"]),
        IMAGE_FLAT
    );
}

#[test]
fn image_differential_with_ignore_checksum_reads_as_libvhdi_parent_found_by_header_name() {
    let t = TempDir::new().unwrap();
    let parent = unpack_fixture("dfvfs/image.vhd", t.path());
    let img = unpack_fixture("dfvfs/image-differential.vhd", t.path());
    // Preconditions: no locators at all; the header names `image.vhd`.
    let raw = RawVhd::read(&img);
    assert!(raw.header.locators.iter().all(|l| l.code == 0));
    assert_eq!(raw.header.parent_name, "image.vhd");
    assert_eq!(raw.header.parent_id.to_string(), IMAGE_ID);

    let info = info_json_with(&img, &["--ignore-checksum"]);
    let layers = info.as_array().unwrap();
    assert_eq!(layers.len(), 2, "{info:#}");
    assert_eq!(layers[0]["disk_type"], "differencing");
    assert_eq!(layers[1]["unique_id"], IMAGE_ID);
    let resolved = PathBuf::from(layers[0]["parent_resolved"].as_str().unwrap());
    assert_eq!(
        fs::canonicalize(resolved).unwrap(),
        fs::canonicalize(&parent).unwrap()
    );
    let hints = layers[0]["parent_locators"].as_array().unwrap();
    assert!(
        hints.iter().all(|h| h["source"] == "name"),
        "only the header name can have found it: {hints:?}"
    );
    assert_eq!(
        export_sha(&img, &t.path().join("out.raw"), &["--ignore-checksum"]),
        IMAGE_FLAT
    );
}

// ---------------------------------------------------------------------------
// fat-differential.vhd: a real Windows differencing child whose parent is lost.

#[test]
fn fat_differential_without_parent_fails_exit_4_listing_locators_and_tried_paths() {
    let t = TempDir::new().unwrap();
    let img = unpack_fixture("dfvfs/fat-differential.vhd", t.path());
    let tried = t.path().join("fat-parent.vhd");
    for args in [
        vec!["info", p(&img)],
        vec!["export", p(&img), p(&t.path().join("out.raw"))],
    ] {
        let o = chainfs(&args);
        let err = stderr_of(&o);
        assert_eq!(o.status.code(), Some(4), "{args:?}: {err}");
        assert!(err.contains(FAT_PARENT_ID), "{args:?}: parent id: {err}");
        for want in ["W2ru", "W2ku", "fat-parent.vhd", "Projects", "test_data"] {
            assert!(err.contains(want), "{args:?}: locator text {want:?}: {err}");
        }
        assert!(
            err.contains(p(&tried)),
            "{args:?}: must list the path tried, {}: {err}",
            tried.display()
        );
    }
    assert!(!t.path().join("out.raw").exists());
}

#[test]
fn fat_differential_over_synthetic_zero_parent_exports_d1_sha256() {
    let t = TempDir::new().unwrap();
    let img = unpack_fixture("dfvfs/fat-differential.vhd", t.path());
    let parent = t.path().join("fat-parent.vhd");
    make_fat_parent(&parent);
    let info = info_json_with(&img, &[]);
    assert_eq!(info.as_array().unwrap().len(), 2, "{info:#}");
    assert_eq!(info[0]["parent_id"], FAT_PARENT_ID);
    assert_eq!(info[1]["unique_id"], FAT_PARENT_ID);
    assert_eq!(info[1]["disk_type"], "fixed");
    assert_eq!(export_sha(&img, &t.path().join("out.raw"), &[]), FAT_FLAT);
}

#[test]
fn fat_differential_parent_in_other_folder_found_with_parent_dir_and_parent_override() {
    let t = TempDir::new().unwrap();
    let a = t.path().join("child");
    let b = t.path().join("elsewhere");
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    let img = unpack_fixture("dfvfs/fat-differential.vhd", &a);
    make_fat_parent(&b.join("fat-parent.vhd"));

    // Not next to the child: not found.
    let o = chainfs(&["info", p(&img)]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr_of(&o));

    // --parent-dir: found by the locators' basename.
    let pd = ["--parent-dir", p(&b)];
    assert_eq!(info_json_with(&img, &pd).as_array().unwrap().len(), 2);
    assert_eq!(export_sha(&img, &t.path().join("pd.raw"), &pd), FAT_FLAT);

    // --parent CHILD=PATH: a name no locator mentions.
    let renamed = b.join("renamed-base.vhd");
    fs::rename(b.join("fat-parent.vhd"), &renamed).unwrap();
    let o = chainfs(&["info", p(&img), "--parent-dir", p(&b)]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr_of(&o));
    let spec = format!("{}={}", p(&img), p(&renamed));
    let ov = ["--parent", spec.as_str()];
    let info = info_json_with(&img, &ov);
    assert_eq!(
        fs::canonicalize(info[0]["parent_resolved"].as_str().unwrap()).unwrap(),
        fs::canonicalize(&renamed).unwrap()
    );
    assert_eq!(export_sha(&img, &t.path().join("ov.raw"), &ov), FAT_FLAT);
}

#[test]
fn fat_differential_with_parent_of_wrong_id_is_refused_exit_5() {
    let t = TempDir::new().unwrap();
    let img = unpack_fixture("dfvfs/fat-differential.vhd", t.path());
    // A parent under the right name but with chainfs's random unique id.
    let parent = t.path().join("fat-parent.vhd");
    chainfs_ok(&["create", p(&parent), "--type", "fixed", "--size", "4M"]);
    let o = chainfs(&["export", p(&img), p(&t.path().join("out.raw"))]);
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(5), "{err}");
    assert!(err.contains(FAT_PARENT_ID), "{err}");
    // The override flag makes it usable (content = child over zeros).
    assert_eq!(
        export_sha(
            &img,
            &t.path().join("forced.raw"),
            &["--ignore-id-mismatch"]
        ),
        FAT_FLAT
    );
}

/// Is sector `i` marked in `bm`, reading bits MSB-first (VHD) or LSB-first?
fn marked(bm: &[u8], i: usize, msb_first: bool) -> bool {
    let mask = if msb_first {
        0x80 >> (i % 8)
    } else {
        1 << (i % 8)
    };
    bm[i / 8] & mask != 0
}

/// SOURCES.md: the bitmap bytes 0x02, 0x01, 0xCB, 0xA8 of fat-differential
/// only make sense MSB-first. What the bytes actually show: read MSB-first
/// they mark every sector holding non-zero data (plus some sectors the guest
/// wrote with zeros); read LSB-first they leave most of the data unmarked.
/// Then chainfs, over a parent full of non-zero data, must take exactly the
/// MSB-first-marked sectors from the child and everything else from the
/// parent.
#[test]
fn fat_differential_bitmap_is_msb_first_and_chainfs_reads_it_so() {
    let t = TempDir::new().unwrap();
    let img = unpack_fixture("dfvfs/fat-differential.vhd", t.path());
    let raw = RawVhd::read(&img);
    let bs = raw.header.block_size as usize;
    assert_eq!(bs, 2 << 20);
    let alloc = raw.allocated();
    assert_eq!(alloc.len(), 1, "one allocated block");
    let (block, start) = alloc[0];
    let bm = &raw.bytes[start..start + 512];
    let data = &raw.bytes[start + 512..start + 512 + bs];

    let nonzero_bm: Vec<(usize, u8)> = bm
        .iter()
        .enumerate()
        .filter(|(_, &b)| b != 0)
        .map(|(i, &b)| (i, b))
        .collect();
    assert_eq!(
        nonzero_bm,
        vec![(16, 0x02), (17, 0x01), (19, 0xFF), (23, 0xCB), (24, 0xA8)],
        "bitmap bytes of the fixture"
    );
    let spb = bs / SECTOR;
    let nonzero: Vec<usize> = (0..spb)
        .filter(|&i| data[i * SECTOR..(i + 1) * SECTOR].iter().any(|&b| b != 0))
        .collect();
    assert!(!nonzero.is_empty());
    let msb_missing: Vec<usize> = nonzero
        .iter()
        .copied()
        .filter(|&i| !marked(bm, i, true))
        .collect();
    let lsb_missing: Vec<usize> = nonzero
        .iter()
        .copied()
        .filter(|&i| !marked(bm, i, false))
        .collect();
    assert!(
        msb_missing.is_empty(),
        "MSB-first must mark every non-zero sector; unmarked: {msb_missing:?}"
    );
    assert!(
        !lsb_missing.is_empty(),
        "LSB-first would have to lose data for the claim to hold"
    );
    // In each partly set byte, the non-zero sectors are marked MSB-first.
    for byte in [16, 17, 23, 24] {
        for i in byte * 8..byte * 8 + 8 {
            if nonzero.contains(&i) {
                assert!(marked(bm, i, true), "sector {i} in byte {byte}");
            }
        }
    }

    // A parent full of non-zero data, different in every sector.
    let parent = t.path().join("fat-parent.vhd");
    make_fat_parent(&parent);
    let size = 4usize << 20;
    let pattern: Vec<u8> = (0..size)
        .map(|o| ((o / SECTOR) % 251) as u8 + 1 + (o % 3) as u8)
        .collect();
    let pfile = t.path().join("pattern.bin");
    fs::write(&pfile, &pattern).unwrap();
    // The fixture child sits next to it: writing its parent is the point
    // here (which sectors come from the parent), so --force.
    chainfs_ok(&[
        "write",
        p(&parent),
        "--offset",
        "0",
        "--input",
        p(&pfile),
        "--force",
    ]);

    let mut msb_model = pattern.clone();
    let mut lsb_model = pattern.clone();
    for i in 0..spb {
        let v = (block * spb + i) * SECTOR;
        let src = &data[i * SECTOR..(i + 1) * SECTOR];
        if marked(bm, i, true) {
            msb_model[v..v + SECTOR].copy_from_slice(src);
        }
        if marked(bm, i, false) {
            lsb_model[v..v + SECTOR].copy_from_slice(src);
        }
    }
    assert_ne!(msb_model, lsb_model);
    let out = t.path().join("out.raw");
    chainfs_ok(&["export", p(&img), p(&out)]);
    let got = fs::read(&out).unwrap();
    assert_eq!(got.len(), size);
    let bad: Vec<usize> = (0..size / SECTOR)
        .filter(|&i| got[i * SECTOR..(i + 1) * SECTOR] != msb_model[i * SECTOR..(i + 1) * SECTOR])
        .collect();
    assert!(
        bad.is_empty(),
        "sectors differing from the MSB-first model: {bad:?}"
    );
}

// ---------------------------------------------------------------------------
// libvhdi structure fragments, parsed with the library.

fn struct_fragment(name: &str) -> Vec<u8> {
    fs::read(common::fixtures_dir().join("libvhdi-structs").join(name)).unwrap()
}

#[test]
fn libvhdi_file_footer_fragment_parses_with_recorded_fields() {
    let b = struct_fragment("file_footer.1");
    assert_eq!(b.len(), 512);
    let sha = common::sha256(&b);
    assert!(
        sha.starts_with("77306fe2") && sha.ends_with("e8b5"),
        "{sha}"
    );
    let f = Footer::parse(&b, true).expect("valid footer with a valid checksum");
    assert_eq!(f.disk_type, 4);
    assert_eq!(f.current_size, 512 << 20);
    assert_eq!(f.original_size, 512 << 20);
    assert_eq!(f.geometry, (1040, 16, 63));
    assert_eq!(
        f.unique_id.to_string(),
        "40d56d36-9ab8-4fe4-a31a-121fe2bf15eb"
    );
    assert_eq!(&f.creator_app, b"vpc ");
    assert_eq!(f.creator(), "vpc");
    assert_eq!(f.creator_version, 0x0001_0000);
    assert_eq!(f.creator_os, u32::from_be_bytes(*b"Wi2k"));
    assert_eq!(f.data_offset, 512);
    assert_eq!(f.features, 2);
    assert_eq!(f.version, 0x0001_0000);
    assert_eq!(f.saved_state, 0);
    // Writing it back gives the same bytes, checksum included.
    assert_eq!(f.to_bytes().as_slice(), b.as_slice());
    // And a flipped byte is caught by the checksum.
    let mut bad = b.clone();
    bad[50] ^= 0x40;
    assert!(Footer::parse(&bad, true).is_err());
}

#[test]
fn libvhdi_dynamic_disk_header_fragment_parses_with_recorded_fields() {
    let b = struct_fragment("dynamic_disk_header.1");
    assert_eq!(b.len(), 1024);
    let sha = common::sha256(&b);
    assert!(
        sha.starts_with("80322d5a") && sha.ends_with("308b"),
        "{sha}"
    );
    let h = DynamicHeader::parse(&b, true).expect("valid header with a valid checksum");
    assert_eq!(
        h.parent_id.to_string(),
        "d49c5c80-350a-4a89-898a-5ad6d10f6578"
    );
    assert_eq!(h.parent_timestamp, 0x1922_077C);
    // Stored UTF-16BE: a UTF-16LE decode would give CJK garbage.
    assert_eq!(h.parent_name, "dynamic.vhd");
    assert_eq!(h.block_size, 2 << 20);
    assert_eq!(h.table_offset, 0x600);
    assert_eq!(h.max_table_entries, 256);
    // Virtual PC wrote four locators (the bytes as stored in the fragment).
    let locs: Vec<(String, u32, u64)> = h
        .locators
        .iter()
        .filter(|l| l.code != 0)
        .map(|l| {
            (
                String::from_utf8_lossy(&l.code.to_be_bytes()).into_owned(),
                l.data_len,
                l.data_offset,
            )
        })
        .collect();
    assert_eq!(
        locs,
        vec![
            ("W2ku".to_string(), 0x2a, 0x1200),
            ("W2ru".to_string(), 0x1a, 0x1000),
            ("Wi2k".to_string(), 0x15, 0xe00),
            ("Wi2r".to_string(), 0x0d, 0xc00),
        ]
    );
    assert_eq!(h.to_bytes().as_slice(), b.as_slice());
    let mut bad = b.clone();
    bad[100] ^= 1;
    assert!(DynamicHeader::parse(&bad, true).is_err());
}

// ---------------------------------------------------------------------------
// Read-only commands leave every layer untouched.

/// (sha256, length, mtime) of each file.
fn snapshot(files: &[PathBuf]) -> Vec<(String, u64, SystemTime)> {
    files
        .iter()
        .map(|f| {
            let m = fs::metadata(f).unwrap();
            (sha256_file(f), m.len(), m.modified().unwrap())
        })
        .collect()
}

/// Run info, info --json, check, check --json and export on `leaf` and
/// assert no file of `chain` changed. `check_code` is what `check` must
/// exit with (3 for the chains with known problems).
fn assert_read_only(
    leaf: &Path,
    chain: &[PathBuf],
    extra: &[&str],
    check_code: i32,
    out_dir: &Path,
) {
    let before = snapshot(chain);
    let out = out_dir.join(format!(
        "{}.raw",
        leaf.file_stem().unwrap().to_string_lossy()
    ));
    let out_s = p(&out).to_string();
    let runs: Vec<Vec<&str>> = vec![
        vec!["info", p(leaf)],
        vec!["info", p(leaf), "--json"],
        vec!["check", p(leaf)],
        vec!["check", p(leaf), "--json"],
        vec!["export", p(leaf), out_s.as_str()],
        vec!["export", p(leaf), out_s.as_str(), "--force"],
    ];
    for mut args in runs {
        args.extend_from_slice(extra);
        let o = chainfs(&args);
        let want = if args[0] == "check" { check_code } else { 0 };
        assert_eq!(o.status.code(), Some(want), "{args:?}: {}", stderr_of(&o));
        assert_eq!(
            snapshot(chain),
            before,
            "{args:?} modified a file of the chain"
        );
    }
}

#[test]
fn info_check_export_never_modify_any_file_of_the_chain() {
    let t = TempDir::new().unwrap();
    let out = t.path().join("out");
    fs::create_dir_all(&out).unwrap();

    // Real single files.
    for rel in [
        "dissect-hypervisor/fixed.vhd",
        "dissect-hypervisor/dynamic.vhd",
        "dfvfs/ext2.vhd",
    ] {
        let img = unpack_fixture(rel, t.path());
        assert_read_only(&img, std::slice::from_ref(&img), &[], 0, &out);
    }
    // Real child over the synthetic parent.
    let fat = unpack_fixture("dfvfs/fat-differential.vhd", t.path());
    let fat_parent = t.path().join("fat-parent.vhd");
    make_fat_parent(&fat_parent);
    assert_read_only(&fat, &[fat.clone(), fat_parent], &[], 0, &out);
    // Bad checksums, read with --ignore-checksum.
    let image = unpack_fixture("dfvfs/image.vhd", t.path());
    let image_diff = unpack_fixture("dfvfs/image-differential.vhd", t.path());
    assert_read_only(
        &image_diff,
        &[image_diff.clone(), image],
        &["--ignore-checksum"],
        3,
        &out,
    );
    // A three-layer chain made by chainfs, with data in every layer.
    let base = t.path().join("base.vhd");
    let mid = t.path().join("mid.vhd");
    let leaf = t.path().join("leaf.vhd");
    let data = t.path().join("data.bin");
    fs::write(&data, vec![0x5Au8; 12288]).unwrap();
    // Each layer is written before its child exists (parents refuse writes).
    chainfs_ok(&["create", p(&base), "--size", "8M", "--block-size", "512K"]);
    chainfs_ok(&["write", p(&base), "--offset", "0", "--input", p(&data)]);
    chainfs_ok(&["create", p(&mid), "--parent", p(&base)]);
    chainfs_ok(&["write", p(&mid), "--offset", "520192", "--input", p(&data)]);
    chainfs_ok(&["create", p(&leaf), "--parent", p(&mid)]);
    chainfs_ok(&[
        "write",
        p(&leaf),
        "--offset",
        "2093056",
        "--input",
        p(&data),
    ]);
    assert_read_only(&leaf, &[leaf.clone(), mid, base], &[], 0, &out);
}

// ---------------------------------------------------------------------------
// VHDX: the real Windows-made fixtures (SOURCES.md) export to their recorded flat sha256 and equal qemu's and libvhdi's view; the Hyper-V checkpoint names its locators without its parent and flattens to its recorded sha256 over the synthetic all-zero parent of SOURCES.md note D2.

/// The Hyper-V checkpoint's parent, by the name its `relative_path` gives.
const HYPERV_PARENT: &str = "Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx";

const HYPERV_PARENT_LINKAGE: &str = "ff34003b-11ed-4cf8-a166-b2be05e20b80";

const HYPERV_RAW: &str = "a4bf6f9ccaaf8f90b0e9a5b6f964e2b21ca3a9b1675c3a92e73206b04cfb1fbf";

/// differencing.avhdx over an all-zero parent (SOURCES.md note D2).
const HYPERV_FLAT: &str = "fc5c91bfd8f7ee388cf482dc7eb6cef64b39a7e1bd043516ee95887b839f2b78";

struct Fixture {
    rel: &'static str,
    raw: &'static str,
    flat: &'static str,
    size: u64,
    block: u64,
    disk_type: &'static str,
}

const FIXED: Fixture = Fixture {
    rel: "dissect-hypervisor/fixed.vhdx",
    raw: "f2d743755f1872335fb1554116feecda67825719080ebb875b97dfacf7c1f590",
    flat: "bc0be4623b15aa84216fb31ba24e3b621ec7f1c72d198c990ac0eced222d9f62",
    size: 10 << 20,
    block: 2 << 20,
    disk_type: "fixed",
};

const DYNAMIC: Fixture = Fixture {
    rel: "dissect-hypervisor/dynamic.vhdx",
    raw: "72e9aa1af9cc53c84585a8017246f14f7c9f2dd54bb3f52e3b70919b2af600b9",
    flat: "8e2b5e9265d694b42b81819e3bff29770eff4ed0f4f9f311693ff3dbdc93efac",
    size: 10 << 20,
    block: 32 << 20,
    disk_type: "dynamic",
};

const SWAP: Fixture = Fixture {
    rel: "discutils/swap.vhdx",
    raw: "e5427cf8e9a9dfc28f2c1f24e2a7294e62b3e48bcff25b458f51871092540582",
    flat: "60dd30b4c74361427d1089510cabb36e2eeda0cc4747f467ea43173acd358c49",
    size: 10 * GIB,
    block: 32 << 20,
    disk_type: "dynamic",
};

const BTRFS: Fixture = Fixture {
    rel: "discutils/btrfs.vhdx",
    raw: "e1ec34ba6fea6a047e5b97f6b9355798f4bf22e5d9fb120013d912a41babf2a4",
    flat: "0b959f9cb4e18348ad8b646f152178282542c8304f02fddf765e3fd1a1de6864",
    size: GIB,
    block: 32 << 20,
    disk_type: "dynamic",
};

/// A clean real fixture: info, check, export to the recorded flat sha256,
/// qemu's view, libvhdi's view (small disks), and its file unchanged.
fn real_fixture(fx: &Fixture) {
    let t = tempfile::tempdir().unwrap();
    let img = unpack_fixture(fx.rel, t.path());
    assert_eq!(sha256_file(&img), fx.raw, "{}: unpacked file", fx.rel);

    let v = info_json(&img);
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v[0]["format"], "vhdx", "{v}");
    assert_eq!(v[0]["disk_type"], fx.disk_type, "{v}");
    assert_eq!(v[0]["virtual_size"], fx.size, "{v}");
    assert_eq!(v[0]["block_size"], fx.block, "{v}");
    assert!(v[0]["creator"]
        .as_str()
        .unwrap()
        .starts_with("Microsoft Windows"));
    assert_clean(&img);

    let out = t.path().join("flat.raw");
    chainfs_ok(&["export", p(&img), p(&out)]);
    assert_eq!(fs::metadata(&out).unwrap().len(), fx.size);
    assert_eq!(sha256_sparse(&out), fx.flat, "{}: flattened", fx.rel);

    if have_qemu_img() {
        let q = t.path().join("qemu.raw");
        qemu_convert(Fmt::Vhdx, &img, &q);
        if let Some(d) = file_diff(&out, &q) {
            panic!("{}: chainfs and qemu-img convert differ: {d}", fx.rel);
        }
    }
    if fx.size <= 64 << 20 && have_vhdimount() {
        let mnt = t.path().join("vhdi");
        let _g = vhdimount(&img, &mnt, 1);
        assert_same(
            &fs::read(mnt.join("vhdi1")).unwrap(),
            &fs::read(&out).unwrap(),
            &format!("{}: libvhdi vs chainfs", fx.rel),
        );
    }
    assert_eq!(sha256_file(&img), fx.raw, "{}: reading changed it", fx.rel);
}

#[test]
fn real_fixed_vhdx_exports_to_its_recorded_sha256_and_matches_qemu_and_libvhdi() {
    real_fixture(&FIXED);
}

#[test]
fn real_dynamic_vhdx_with_a_block_larger_than_the_disk_matches_sha256_qemu_and_libvhdi() {
    real_fixture(&DYNAMIC);
}

#[test]
fn real_swap_vhdx_with_a_zero_block_exports_to_its_recorded_sha256_and_matches_qemu() {
    real_fixture(&SWAP);
}

#[test]
fn real_btrfs_vhdx_exports_to_its_recorded_sha256_and_matches_qemu() {
    real_fixture(&BTRFS);
}

#[test]
fn hyperv_checkpoint_without_its_parent_fails_naming_its_locators() {
    let t = tempfile::tempdir().unwrap();
    let child = unpack_fixture("dissect-hypervisor/differencing.avhdx", t.path());
    let out = t.path().join("out.raw");
    for args in [vec!["info", p(&child)], vec!["export", p(&child), p(&out)]] {
        let o = chainfs(&args);
        assert_eq!(code(&o), 4, "{args:?}: {}", text(&o));
        let msg = text(&o);
        for want in [
            "relative_path",
            "absolute_win32_path",
            HYPERV_PARENT,
            HYPERV_PARENT_LINKAGE,
        ] {
            assert!(
                msg.contains(want),
                "{args:?} does not mention {want}: {msg}"
            );
        }
    }
    assert_eq!(sha256_file(&child), HYPERV_RAW);
}

#[test]
fn hyperv_checkpoint_over_a_synthetic_zero_parent_flattens_to_its_recorded_sha256() {
    let t = tempfile::tempdir().unwrap();
    let child = unpack_fixture("dissect-hypervisor/differencing.avhdx", t.path());
    let parent = t.path().join(HYPERV_PARENT);
    // `.avhdx` names a VHDX; without --parent it is a base (dynamic) disk.
    chainfs_ok(&["create", p(&parent), "--size", "8G", "--block-size", "2M"]);
    let linkage = Uuid::parse_str(HYPERV_PARENT_LINKAGE).unwrap();
    set_data_write_guid(&parent, linkage);
    if have_qemu_img() {
        qemu_check(Fmt::Vhdx, &parent);
    }

    let v = info_json(&child);
    let layers = v.as_array().unwrap();
    assert_eq!(layers.len(), 2, "{v}");
    assert_eq!(v[0]["disk_type"], "differencing");
    assert_eq!(v[0]["virtual_size"], 8 * GIB);
    assert_eq!(v[0]["block_size"], 2u64 << 20);
    assert_eq!(v[0]["parent_id"], HYPERV_PARENT_LINKAGE);
    assert_eq!(v[1]["unique_id"], HYPERV_PARENT_LINKAGE);
    assert!(v[1]["path"].as_str().unwrap().ends_with(HYPERV_PARENT));
    // 32 PARTIALLY_PRESENT blocks of 2 MiB.
    assert_eq!(v[0]["allocated_bytes"], 32u64 * (2 << 20), "{v}");

    let flat = t.path().join("flat.raw");
    chainfs_ok(&["export", p(&child), p(&flat)]);
    assert_eq!(fs::metadata(&flat).unwrap().len(), 8 * GIB);
    assert_eq!(sha256_sparse(&flat), HYPERV_FLAT);
    assert_eq!(sha256_file(&child), HYPERV_RAW, "reading changed the child");
}
