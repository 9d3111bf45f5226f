//! Independent readers as oracles for what chainfs writes and reads.
//!
//! * libvhdi (`vhdimount`) reads whole chains built with `chainfs create` /
//!   `chainfs write`; every level it exposes (`vhdi1` = base … `vhdiN` = the
//!   leaf flattened) must equal both `chainfs export` of that level and an
//!   in-memory model of what was written.
//! * qemu-img reads single-layer fixed and dynamic images (it has no VHD
//!   parent support, formats.md §4), and whole qcow2 chains: libvhdi reads
//!   no qcow2, so for qcow2 `qemu-img convert` of every level (qemu follows
//!   the backing files) and `qemu-img check` of every layer take its place.
//! * A known libvhdi 20210425 bug (formats.md, Appendix) is pinned: it shows
//!   where the oracle, not chainfs, is wrong.
//!
//! Writes in the chain tests are 4 KiB aligned and sized, so every bitmap
//! byte is 0x00 or 0xFF and libvhdi's bitmap bug cannot show.
//!
//! The chain and single-layer cases that every format has run once per
//! format (`per_format!` at the end: `vhd::NAME`, `vhdx::NAME`,
//! `qcow2::NAME`); 512 KiB blocks are VHD only, 4096-byte logical sectors
//! and 32 MiB blocks VHDX only. A qcow2 has no fixed type: its chains sit
//! on a sparse base of the same cluster size, and the fixed-base qemu case
//! is VHD and VHDX only. qemu reads a VHDX base with
//! 512-byte sectors (and checks it); it refuses 4096-byte ones and every
//! differencing VHDX read-only, where libvhdi and the model are the oracle.
//! libvhdi 20210425 ignores the VHDX log and misreads a differencing VHDX
//! chunk without a sector bitmap block (pinned in (d)), so every
//! differencing layer given to it here holds writes.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use chainfs::format::vhd::{bitmap_bytes, DynamicHeader, Footer};
use common::*;
use tempfile::TempDir;

const K4: u64 = 4096;
const M2: u64 = 2 << 20;
const SECTOR: usize = 512;

// ---------------------------------------------------------------------------
// (a) chains written by chainfs, read back by libvhdi (and the base by qemu).

/// One layer of a test chain: a base (`fixed` or dynamic) or a child, with
/// its block size.
#[derive(Clone, Copy)]
struct LayerSpec {
    fixed: bool,
    block: u64,
}

const fn dynamic(block: u64) -> LayerSpec {
    LayerSpec {
        fixed: false,
        block,
    }
}

const fn fixed(block: u64) -> LayerSpec {
    LayerSpec { fixed: true, block }
}

struct BuiltChain {
    /// Base first.
    layers: Vec<PathBuf>,
    /// The flat content of each layer, base first.
    snapshots: Vec<Vec<u8>>,
}

/// Build the chain `specs` (base first) of format `f` in `dir` (a VHDX base
/// with `lss`-byte logical sectors), writing random data into each layer
/// as it becomes the leaf: writes straddling 2 MiB boundaries and one of
/// the layer's own block boundaries, random 4 KiB-aligned writes, and one
/// write ending at the disk's end.
fn build_chain(
    f: Fmt,
    dir: &Path,
    size: u64,
    lss: u32,
    specs: &[LayerSpec],
    seed: u64,
) -> BuiltChain {
    let mut rng = Rng(seed);
    let mut model = vec![0u8; size as usize];
    let scratch = dir.join("input.bin");
    let mut layers: Vec<PathBuf> = Vec::new();
    let mut snapshots = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let block = spec.block.to_string();
        let img = match layers.last() {
            None => {
                let img = dir.join(f.base_name(&format!("layer{i}")));
                let kind = if spec.fixed { "fixed" } else { "dynamic" };
                let lss = lss.to_string();
                let mut args = vec!["--type", kind, "--block-size", &block];
                if f == Fmt::Vhdx {
                    args.extend(["--logical-sector", &lss]);
                } else {
                    assert_eq!(lss, "512", "{f:?} has 512-byte sectors only");
                }
                f.create_base(&img, size, &args);
                img
            }
            Some(parent) => {
                assert!(!spec.fixed);
                let img = dir.join(f.child_name(&format!("layer{i}")));
                f.create_child(&img, parent, &["--block-size", &block]);
                img
            }
        };
        // Straddling 2 MiB (and so 512 KiB and 1 MiB) block boundaries.
        for _ in 0..4 {
            let boundary = M2 * (1 + rng.below(size / M2 - 1));
            let before = K4 * (1 + rng.below(4));
            let after = K4 * (1 + rng.below(4));
            let data = rng.bytes((before + after) as usize);
            chainfs_write_mirrored(&img, boundary - before, &data, &scratch, &mut model);
        }
        // Straddling a boundary of this layer's own (larger) blocks.
        if spec.block > M2 && spec.block < size {
            let boundary = spec.block * (1 + rng.below((size - 1) / spec.block));
            let after = (K4 * (1 + rng.below(8))).min(size - boundary);
            let data = rng.bytes((K4 * 3 + after) as usize);
            chainfs_write_mirrored(&img, boundary - 3 * K4, &data, &scratch, &mut model);
        }
        // Random 4 KiB-aligned writes, 4 KiB to 128 KiB long.
        for _ in 0..6 {
            let off = K4 * rng.below(size / K4);
            let len = (K4 * (1 + rng.below(32))).min(size - off);
            let data = rng.bytes(len as usize);
            chainfs_write_mirrored(&img, off, &data, &scratch, &mut model);
        }
        // One write over a whole 2 MiB boundary region and to the very end.
        if i % 2 == 0 {
            let off = M2 - 3 * K4;
            let data = rng.bytes((M2 + 5 * K4) as usize);
            chainfs_write_mirrored(&img, off, &data, &scratch, &mut model);
        } else {
            let data = rng.bytes(2 * K4 as usize);
            chainfs_write_mirrored(&img, size - 2 * K4, &data, &scratch, &mut model);
        }
        layers.push(img);
        snapshots.push(model.clone());
    }
    BuiltChain { layers, snapshots }
}

/// Build a chain of format `f`; every level's `chainfs export` equals the
/// model; `info --json` shows the format, block size, size and type of
/// every layer; `check` is clean; qemu reads the base as the model (where
/// it reads the format: qemu has no VHD parents and no VHDX differencing
/// read-only, and refuses VHDX sectors other than 512 bytes), and for
/// qcow2 every level, each layer passing `qemu-img check`; libvhdi's
/// `vhdimount` shows exactly `vhdi1..vhdiN`, each equal to the model and to
/// chainfs's export of that level (VHD and VHDX: libvhdi reads no qcow2).
fn chain_reads_identically(f: Fmt, size: u64, lss: u32, specs: &[LayerSpec], seed: u64) {
    let t = TempDir::new().unwrap();
    let c = build_chain(f, t.path(), size, lss, specs, seed);
    let n = c.layers.len();
    let leaf = &c.layers[n - 1];
    let mut exports = Vec::new();
    for (k, img) in c.layers.iter().enumerate() {
        let e = export(img, &t.path().join(format!("export{k}.raw")));
        assert_same(
            &e,
            &c.snapshots[k],
            &format!("{f:?}: chainfs export of layer {k} vs model"),
        );
        exports.push(e);
    }
    let v = info_json(leaf);
    for (i, spec) in specs.iter().enumerate() {
        let l = &v[n - 1 - i];
        assert_eq!(l["format"], f.name(), "{v}");
        if f == Fmt::Vhd && spec.fixed {
            // A fixed VHD has no blocks.
            assert!(l["block_size"].is_null(), "{v}");
        } else {
            assert_eq!(l["block_size"], spec.block, "{v}");
        }
        assert_eq!(l["virtual_size"], size, "{v}");
        assert_eq!(l["disk_type"], f.disk_type(i > 0, spec.fixed), "{v}");
    }
    assert_clean(leaf);

    let base = &c.layers[0];
    let qemu_reads_base = match f {
        Fmt::Vhd | Fmt::Qcow2 => true,
        Fmt::Vhdx => qemu_reads(base, lss),
    };
    if have_qemu_img() && qemu_reads_base {
        if f.qemu_checks() {
            qemu_check(f, base);
        }
        let q = t.path().join("qemu.raw");
        qemu_convert(f, base, &q);
        assert_same(
            &fs::read(&q).unwrap(),
            &c.snapshots[0],
            &format!("{f:?}: qemu's view of the base"),
        );
    }

    if f.qemu_reads_chains() && have_qemu_img() {
        // qemu follows the backing files: every level flattened by qemu.
        let q = t.path().join("qemu.raw");
        for (k, (img, (snapshot, exported))) in c
            .layers
            .iter()
            .zip(c.snapshots.iter().zip(&exports))
            .enumerate()
        {
            qemu_check(f, img);
            qemu_convert(f, img, &q);
            let got = fs::read(&q).unwrap();
            assert_same(&got, snapshot, &format!("{f:?}: qemu's level {k} vs model"));
            assert_same(
                &got,
                exported,
                &format!("{f:?}: qemu's level {k} vs chainfs export"),
            );
        }
    }

    if !f.vhdi_reads() || !have_vhdimount() {
        return;
    }
    let mnt = t.path().join("mnt");
    let _guard = vhdimount(leaf, &mnt, n);
    // libvhdi found every parent: exactly vhdi1..vhdiN.
    let mut names: Vec<String> = fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let want: Vec<String> = {
        let mut v: Vec<String> = (1..=n).map(|k| format!("vhdi{k}")).collect();
        v.sort();
        v
    };
    assert_eq!(names, want, "{f:?}: vhdimount entries");
    for (k, (snapshot, exported)) in c.snapshots.iter().zip(&exports).enumerate() {
        let p = mnt.join(format!("vhdi{}", k + 1));
        let got = fs::read(&p).unwrap();
        assert_eq!(got.len() as u64, size, "{} length", p.display());
        assert_same(
            &got,
            snapshot,
            &format!("{f:?}: libvhdi vhdi{} vs model", k + 1),
        );
        assert_same(
            &got,
            exported,
            &format!("{f:?}: libvhdi vhdi{} vs chainfs export", k + 1),
        );
    }
}

/// The smallest block both formats allow at 512 KiB or more (VHDX: 1 MiB).
fn small(f: Fmt) -> u64 {
    f.min_block().max(512 << 10)
}

#[test]
fn libvhdi_reads_four_layer_512k_block_chain_as_chainfs_and_model() {
    let l = dynamic(512 << 10);
    chain_reads_identically(Fmt::Vhd, 16 << 20, 512, &[l, l, l, l], 1);
}

/// libvhdi (qcow2: qemu) and chainfs read each level as the model; a
/// qcow2 has no fixed type, so its base is sparse.
fn oracle_reads_five_layer_2m_block_chain_over_fixed_base_as_chainfs_and_model(f: Fmt) {
    let base = if f.has_fixed() {
        fixed(M2)
    } else {
        dynamic(M2)
    };
    let specs = [
        base,
        dynamic(M2),
        dynamic(small(f)),
        dynamic(M2),
        dynamic(M2),
    ];
    chain_reads_identically(f, 12 << 20, 512, &specs, 2 + 100 * f.index());
}

/// libvhdi (qcow2: qemu) and chainfs read each level as the model.
fn oracle_reads_three_layer_dynamic_2m_chain_with_partial_last_block_as_chainfs_and_model(f: Fmt) {
    let l = dynamic(M2);
    // 10 MiB + 12 KiB: the last 2 MiB block is mostly past the end.
    chain_reads_identically(f, (10 << 20) + 3 * K4, 512, &[l, l, l], 3 + 100 * f.index());
}

// VHDX only: 4096-byte logical sectors and 32 MiB blocks.

#[test]
fn vhdx_chain_512_sectors_dynamic_1m_base_under_2m_32m_1m_children_reads_identically() {
    let specs = [
        dynamic(1 << 20),
        dynamic(M2),
        dynamic(32 << 20),
        dynamic(1 << 20),
    ];
    chain_reads_identically(Fmt::Vhdx, 48 << 20, 512, &specs, 31);
}

#[test]
fn vhdx_chain_4096_sectors_fixed_2m_base_under_32m_1m_children_reads_identically() {
    let specs = [fixed(M2), dynamic(32 << 20), dynamic(1 << 20)];
    chain_reads_identically(Fmt::Vhdx, 40 << 20, 4096, &specs, 32);
}

#[test]
fn vhdx_chain_4096_sectors_dynamic_32m_base_with_a_partial_last_block_reads_identically() {
    let specs = [
        dynamic(32 << 20),
        dynamic(M2),
        dynamic(1 << 20),
        dynamic(32 << 20),
    ];
    chain_reads_identically(Fmt::Vhdx, 72 << 20, 4096, &specs, 33);
}

#[test]
fn vhdx_chain_512_sectors_fixed_1m_base_reads_identically() {
    let specs = [fixed(1 << 20), dynamic(M2)];
    chain_reads_identically(Fmt::Vhdx, 20 << 20, 512, &specs, 34);
}

// ---------------------------------------------------------------------------
// (b) single-layer images, read back by qemu-img.

/// A base image of format `f` with random 4 KiB-aligned writes (some
/// straddling 2 MiB boundaries, one at the end); `qemu-img convert -O raw`
/// must equal the model and chainfs export, `qemu-img info` the virtual
/// size, and (VHDX, qcow2) `qemu-img check` pass.
fn check_base_against_qemu(f: Fmt, kind: &str, size: u64, block: &str, seed: u64) {
    if !have_qemu_img() {
        return;
    }
    let t = TempDir::new().unwrap();
    let img = t.path().join(f.base_name("base"));
    f.create_base(&img, size, &["--type", kind, "--block-size", block]);
    let mut rng = Rng(seed);
    let mut model = vec![0u8; size as usize];
    let scratch = t.path().join("input.bin");
    for _ in 0..4 {
        let boundary = M2 * (1 + rng.below(size / M2 - 1));
        let data = rng.bytes(4 * K4 as usize);
        chainfs_write_mirrored(&img, boundary - 2 * K4, &data, &scratch, &mut model);
    }
    for _ in 0..6 {
        let off = K4 * rng.below(size / K4);
        let len = (K4 * (1 + rng.below(32))).min(size - off);
        let data = rng.bytes(len as usize);
        chainfs_write_mirrored(&img, off, &data, &scratch, &mut model);
    }
    let tail = rng.bytes(K4 as usize);
    chainfs_write_mirrored(&img, size - K4, &tail, &scratch, &mut model);
    let out = run(Command::new("qemu-img")
        .args(["info", "-f", f.qemu(), "--output=json"])
        .arg(&img));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["format"], f.qemu());
    assert_eq!(v["virtual-size"].as_u64(), Some(size), "qemu-img info: {v}");
    if f.qemu_checks() {
        qemu_check(f, &img);
    }
    let qraw = t.path().join("qemu.raw");
    qemu_convert(f, &img, &qraw);
    let q = fs::read(&qraw).unwrap();
    assert_same(&q, &model, &format!("{f:?}: qemu-img convert vs model"));
    let e = export(&img, &t.path().join("chainfs.raw"));
    assert_same(
        &e,
        &q,
        &format!("{f:?}: chainfs export vs qemu-img convert"),
    );
}

/// VHD and VHDX: a qcow2 has no fixed type (`create --type fixed` refuses
/// it).
fn qemu_img_reads_chainfs_fixed_base_as_model_with_same_virtual_size(f: Fmt) {
    // 10 MiB: CHS would give 10479616, so a size mix-up shows.
    check_base_against_qemu(f, "fixed", 10 << 20, "2M", 11 + 100 * f.index());
}

fn qemu_img_reads_chainfs_dynamic_2m_base_as_model_with_same_virtual_size(f: Fmt) {
    // Not a multiple of the block size: the last block is partial.
    let size = (9 << 20) + (512 << 10) + 512 * 3;
    check_base_against_qemu(f, "dynamic", size, "2M", 12 + 100 * f.index());
}

#[test]
fn qemu_img_reads_chainfs_dynamic_512k_base_as_model_with_same_virtual_size() {
    check_base_against_qemu(Fmt::Vhd, "dynamic", 10 << 20, "512K", 13);
}

// ---------------------------------------------------------------------------
// (c) the oracle's own bug.

/// libvhdi 20210425 decodes bitmap bit `i` as `byte >> (7 - i%8)` without a
/// mask (formats.md, Appendix), so every clear bit that follows a set bit in
/// the same bitmap byte counts as "in this layer". After one 512-byte write
/// at a sector that is not 4 KiB aligned, over a parent with data, libvhdi
/// reads the rest of that bitmap byte's sectors from the child (zeros there)
/// instead of from the parent. chainfs must read the parent; this test pins
/// both facts, so a fixed libvhdi (or a chainfs that copied the bug) fails it.
#[test]
fn known_libvhdi_bug_partial_bitmap_byte_reads_following_clear_sectors_from_child() {
    if !have_vhdimount() {
        return;
    }
    let t = TempDir::new().unwrap();
    let size: u64 = 4 << 20;
    let base = t.path().join("base.vhd");
    let child = t.path().join("child.vhd");
    let scratch = t.path().join("input.bin");
    let mut rng = Rng(42);
    let mut model = vec![0u8; size as usize];

    chainfs_ok(&["create", p(&base), "--size", "4M"]);
    // Non-zero parent data in every byte around the write.
    let pdata: Vec<u8> = rng.bytes(64 << 10).iter().map(|b| b | 1).collect();
    chainfs_write_mirrored(&base, 0x10000, &pdata, &scratch, &mut model);
    let parent_model = model.clone();

    chainfs_ok(&["create", p(&child), "--parent", p(&base)]);
    // Sector 0x80 + 3: bit 3 of bitmap byte 16.
    let sector: usize = (0x10000 / SECTOR) + 3;
    let wdata: Vec<u8> = rng.bytes(SECTOR).iter().map(|b| b | 0x80).collect();
    chainfs_write_mirrored(
        &child,
        (sector * SECTOR) as u64,
        &wdata,
        &scratch,
        &mut model,
    );

    // chainfs reads what was written.
    let e = export(&child, &t.path().join("chainfs.raw"));
    assert_same(&e, &model, "chainfs export vs model");

    // The child's on-disk bitmap: exactly the one bit, MSB-first.
    let raw = fs::read(&child).unwrap();
    let footer = Footer::parse(&raw[..512], true).unwrap();
    let ho = footer.data_offset as usize;
    let h = DynamicHeader::parse(&raw[ho..ho + 1024], true).unwrap();
    let spb = h.block_size as usize / SECTOR;
    let block = sector / spb;
    let to = h.table_offset as usize + 4 * block;
    let entry = u32::from_be_bytes(raw[to..to + 4].try_into().unwrap());
    assert_ne!(entry, u32::MAX, "the write allocated block {block}");
    let start = entry as usize * SECTOR;
    let bm_len = bitmap_bytes(h.block_size) as usize;
    let bm = &raw[start..start + bm_len];
    let idx = sector % spb;
    for (i, &b) in bm.iter().enumerate() {
        let want = if i == idx / 8 { 0x80 >> (idx % 8) } else { 0 };
        assert_eq!(b, want, "bitmap byte {i}");
    }
    let data_at = start + bm_len;

    // libvhdi's decode, applied to this layer: what vhdi2 should show.
    let mut buggy = model.clone();
    for i in 0..spb {
        let present = (bm[i / 8] >> (7 - i % 8)) != 0;
        if present {
            let v = (block * spb + i) * SECTOR;
            let f = data_at + i * SECTOR;
            buggy[v..v + SECTOR].copy_from_slice(&raw[f..f + SECTOR]);
        }
    }

    let mnt = t.path().join("mnt");
    let _guard = vhdimount(&child, &mnt, 2);
    let v1 = fs::read(mnt.join("vhdi1")).unwrap();
    assert_same(&v1, &parent_model, "libvhdi vhdi1 (the parent) vs model");
    let v2 = fs::read(mnt.join("vhdi2")).unwrap();

    // libvhdi gets it wrong, in exactly the documented sectors: those after
    // the written one up to the end of its bitmap byte (sectors 4..7 of the
    // byte), which it reads as the child's unwritten (zero) sectors.
    let wrong: Vec<usize> = (0..size as usize / SECTOR)
        .filter(|&i| v2[i * SECTOR..(i + 1) * SECTOR] != model[i * SECTOR..(i + 1) * SECTOR])
        .collect();
    let expected_wrong: Vec<usize> = (sector + 1..=(sector | 7)).collect();
    assert_eq!(
        wrong, expected_wrong,
        "sectors where libvhdi differs from the model"
    );
    for &i in &wrong {
        assert!(
            v2[i * SECTOR..(i + 1) * SECTOR].iter().all(|&b| b == 0),
            "libvhdi sector {i} should be the child's zero-filled sector"
        );
    }
    assert_same(&v2, &buggy, "libvhdi vhdi2 vs the unmasked-shift model");
    // And the sectors before the set bit in the same byte are read right.
    for i in sector & !7..=sector {
        assert_eq!(
            v2[i * SECTOR..(i + 1) * SECTOR],
            model[i * SECTOR..(i + 1) * SECTOR],
            "sector {i}"
        );
    }
}

// ---------------------------------------------------------------------------
// (d) VHDX only: libvhdi's own limit with differencing VHDX chunks.

/// The oracle's limit, pinned so the libvhdi comparisons above stay honest:
/// libvhdi 20210425 reads the sector bitmap of a differencing VHDX chunk at
/// the file offset of its BAT entry even when that entry is
/// SB_BLOCK_NOT_PRESENT (offset 0), so the file identifier `vhdxfile`
/// becomes the bitmap: LSB-first set bits of its bytes mark sectors as
/// "in this file" (where nothing is), clear bits go to the parent.
/// chainfs (and the spec: NOT_PRESENT payload blocks read the parent) show
/// the parent's data everywhere.
#[test]
fn libvhdi_misreads_a_differencing_vhdx_chunk_without_a_sector_bitmap_block() {
    if !have_vhdimount() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("c");
    let b = build(&dir, 8 << 20, 512, &[spec("base.vhdx", 1 << 20)], 0, 41);
    let mut model = b.snaps[0].clone();
    let data = Rng(42).bytes(64 * 512);
    chainfs_write_mirrored(&b.path(0), 0, &data, &t.path().join("x"), &mut model);
    let child = dir.join("empty.avhdx");
    chainfs_ok(&["create", p(&child), "--parent", p(&b.path(0))]);
    let out = t.path().join("out.raw");
    assert_same(&export(&child, &out), &model, "chainfs: an empty child");

    let mnt = t.path().join("vhdi");
    let _g = vhdimount(&child, &mnt, 2);
    assert_same(
        &fs::read(mnt.join("vhdi1")).unwrap(),
        &model,
        "libvhdi's base",
    );
    let theirs = fs::read(mnt.join("vhdi2")).unwrap();
    let bitmap = b"vhdxfile";
    let mut misread = 0;
    for sector in 0..64usize {
        let set = bitmap[sector / 8] >> (sector % 8) & 1 != 0;
        let got = &theirs[sector * 512..(sector + 1) * 512];
        let want = &model[sector * 512..(sector + 1) * 512];
        if set {
            assert!(got != want, "sector {sector}: libvhdi got it right");
            misread += 1;
        } else {
            assert_eq!(got, want, "sector {sector}");
        }
    }
    assert!(misread > 0);
}

// ---------------------------------------------------------------------------
// The matrix.

per_format! {
    oracle_reads_five_layer_2m_block_chain_over_fixed_base_as_chainfs_and_model();
    oracle_reads_three_layer_dynamic_2m_chain_with_partial_last_block_as_chainfs_and_model();
    qemu_img_reads_chainfs_fixed_base_as_model_with_same_virtual_size() in [Vhd, Vhdx];
    qemu_img_reads_chainfs_dynamic_2m_base_as_model_with_same_virtual_size();
}
