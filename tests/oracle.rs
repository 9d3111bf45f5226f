//! Independent readers as oracles for what chainfs writes and reads.
//!
//! * libvhdi (`vhdimount`) reads whole chains built with `chainfs create` /
//!   `chainfs write`; every level it exposes (`vhdi1` = base … `vhdiN` = the
//!   leaf flattened) must equal both `chainfs export` of that level and an
//!   in-memory model of what was written.
//! * qemu-img reads single-layer fixed and dynamic images (it has no VHD
//!   parent support, formats.md §4).
//! * A known libvhdi 20210425 bug (formats.md, Appendix) is pinned: it shows
//!   where the oracle, not chainfs, is wrong.
//!
//! Writes in the chain tests are 4 KiB aligned and sized, so every bitmap
//! byte is 0x00 or 0xFF and libvhdi's bitmap bug cannot show.

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
// (a) chains written by chainfs, read back by libvhdi.

/// One layer of a test chain: a base (`fixed` or dynamic) or a child, with
/// its block size.
struct LayerSpec {
    fixed: bool,
    block: &'static str,
}

struct BuiltChain {
    /// Base first.
    layers: Vec<PathBuf>,
    /// The flat content of each layer, base first.
    snapshots: Vec<Vec<u8>>,
}

/// Build the chain `specs` (base first) in `dir`, writing random data into
/// each layer as it becomes the leaf: writes straddling 2 MiB boundaries,
/// random 4 KiB-aligned writes, and one write ending at the disk's end.
fn build_chain(dir: &Path, size: u64, specs: &[LayerSpec], seed: u64) -> BuiltChain {
    let mut rng = Rng(seed);
    let mut model = vec![0u8; size as usize];
    let scratch = dir.join("input.bin");
    let mut layers: Vec<PathBuf> = Vec::new();
    let mut snapshots = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let img = dir.join(format!("layer{i}.vhd"));
        match layers.last() {
            None => {
                let kind = if spec.fixed { "fixed" } else { "dynamic" };
                chainfs_ok(&[
                    "create",
                    p(&img),
                    "--size",
                    &size.to_string(),
                    "--type",
                    kind,
                    "--block-size",
                    spec.block,
                ]);
            }
            Some(parent) => {
                assert!(!spec.fixed);
                chainfs_ok(&[
                    "create",
                    p(&img),
                    "--parent",
                    p(parent),
                    "--block-size",
                    spec.block,
                ]);
            }
        }
        // Straddling 2 MiB (and so 512 KiB) block boundaries.
        for _ in 0..4 {
            let boundary = M2 * (1 + rng.below(size / M2 - 1));
            let before = K4 * (1 + rng.below(4));
            let after = K4 * (1 + rng.below(4));
            let data = rng.bytes((before + after) as usize);
            chainfs_write_mirrored(&img, boundary - before, &data, &scratch, &mut model);
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

/// Build, export every level with chainfs, mount the leaf with vhdimount,
/// and compare every `vhdiK` with the model and with chainfs.
fn check_chain_against_libvhdi(size: u64, specs: &[LayerSpec], seed: u64) {
    let t = TempDir::new().unwrap();
    let c = build_chain(t.path(), size, specs, seed);
    let n = c.layers.len();
    let leaf = &c.layers[n - 1];

    let mut exports = Vec::new();
    for (k, img) in c.layers.iter().enumerate() {
        let e = export(img, &t.path().join(format!("export{k}.raw")));
        assert_same(
            &e,
            &c.snapshots[k],
            &format!("chainfs export of layer {k} vs model"),
        );
        exports.push(e);
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
    assert_eq!(names, want, "vhdimount entries");
    for (k, (snapshot, exported)) in c.snapshots.iter().zip(&exports).enumerate() {
        let p = mnt.join(format!("vhdi{}", k + 1));
        let got = fs::read(&p).unwrap();
        assert_eq!(got.len() as u64, size, "{} length", p.display());
        assert_same(&got, snapshot, &format!("libvhdi vhdi{} vs model", k + 1));
        assert_same(
            &got,
            exported,
            &format!("libvhdi vhdi{} vs chainfs export", k + 1),
        );
    }
}

#[test]
fn libvhdi_reads_four_layer_512k_block_chain_as_chainfs_and_model() {
    if !have_vhdimount() {
        return;
    }
    let l = |fixed| LayerSpec {
        fixed,
        block: "512K",
    };
    check_chain_against_libvhdi(16 << 20, &[l(false), l(false), l(false), l(false)], 1);
}

#[test]
fn libvhdi_reads_five_layer_2m_block_chain_over_fixed_base_as_chainfs_and_model() {
    if !have_vhdimount() {
        return;
    }
    let specs = [
        LayerSpec {
            fixed: true,
            block: "2M",
        },
        LayerSpec {
            fixed: false,
            block: "2M",
        },
        LayerSpec {
            fixed: false,
            block: "512K",
        },
        LayerSpec {
            fixed: false,
            block: "2M",
        },
        LayerSpec {
            fixed: false,
            block: "2M",
        },
    ];
    check_chain_against_libvhdi(12 << 20, &specs, 2);
}

#[test]
fn libvhdi_reads_three_layer_dynamic_2m_chain_with_partial_last_block_as_chainfs_and_model() {
    if !have_vhdimount() {
        return;
    }
    let l = || LayerSpec {
        fixed: false,
        block: "2M",
    };
    // 10 MiB + 12 KiB: the last 2 MiB block is mostly past the end.
    check_chain_against_libvhdi((10 << 20) + 3 * K4, &[l(), l(), l()], 3);
}

// ---------------------------------------------------------------------------
// (b) single-layer images, read back by qemu-img.

/// A base image with random 4 KiB-aligned writes (some straddling 2 MiB
/// boundaries, one at the end); `qemu-img convert -f vpc -O raw` must equal
/// the model and chainfs export, and `qemu-img info` the virtual size.
fn check_base_against_qemu(kind: &str, size: u64, block: &str, seed: u64) {
    let t = TempDir::new().unwrap();
    let img = t.path().join("base.vhd");
    chainfs_ok(&[
        "create",
        p(&img),
        "--type",
        kind,
        "--size",
        &size.to_string(),
        "--block-size",
        block,
    ]);
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

    let o = Command::new("qemu-img")
        .args(["info", "-f", "vpc", "--output=json"])
        .arg(&img)
        .output()
        .expect("qemu-img info");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["format"], "vpc");
    assert_eq!(v["virtual-size"].as_u64(), Some(size), "qemu-img info: {v}");

    let qraw = t.path().join("qemu.raw");
    let o = Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(&img)
        .arg(&qraw)
        .output()
        .expect("qemu-img convert");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let q = fs::read(&qraw).unwrap();
    assert_same(&q, &model, "qemu-img convert vs model");
    let e = export(&img, &t.path().join("chainfs.raw"));
    assert_same(&e, &q, "chainfs export vs qemu-img convert");
}

#[test]
fn qemu_img_reads_chainfs_fixed_base_as_model_with_same_virtual_size() {
    if !have_qemu_img() {
        return;
    }
    // 10 MiB: CHS would give 10479616, so a size mix-up shows.
    check_base_against_qemu("fixed", 10 << 20, "2M", 11);
}

#[test]
fn qemu_img_reads_chainfs_dynamic_2m_base_as_model_with_same_virtual_size() {
    if !have_qemu_img() {
        return;
    }
    // Not a multiple of the block size: the last block is partial.
    check_base_against_qemu("dynamic", (9 << 20) + (512 << 10) + 512 * 3, "2M", 12);
}

#[test]
fn qemu_img_reads_chainfs_dynamic_512k_base_as_model_with_same_virtual_size() {
    if !have_qemu_img() {
        return;
    }
    check_base_against_qemu("dynamic", 10 << 20, "512K", 13);
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
