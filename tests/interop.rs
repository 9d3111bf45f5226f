//! Interop with other writers and readers (issue 14): files chainfs writes
//! open in libvhdi and qemu, chains Xen Orchestra's vhd-lib writes open in
//! chainfs, and moved chains are repaired with `chainfs set-parent`.
//!
//! * Layout: after every operation that relinks a VHD (merges, set-parent)
//!   its dynamic header is at 512, its footer copy at 0, and nothing stale
//!   is left (`common::vhd_layout_problems`).
//! * Oracles: libvhdi's `vhdimount` is run as users run it (absolute
//!   paths, working folder `/`) on chains with the parent in the same
//!   folder and in another folder, after create/write, a merge that
//!   relinks, and set-parent; `qemu-img convert` on the merged bases.
//!   libvhdi follows a VHDX parent only in the child's folder (it uses the
//!   file name of `absolute_win32_path`), so VHDX chains across folders are
//!   checked by chainfs's own readers only (docs/FORMATS.md).
//! * vhd-lib-shaped chains come from [`xo_vhd`], a generator written from
//!   the VHD spec and formats.md's vhd-lib appendix, not from chainfs.
//! * set-parent: the identity refusal, in use (exit 7), and fault
//!   injection at every write/sync point for VHD and VHDX.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use chainfs::format::vhd::{geometry, DynamicHeader, Footer, Locator};
use common::*;
use serde_json::Value;
use tempfile::TempDir;
use uuid::Uuid;

const MIB: u64 = 1 << 20;
const FAULT_EXIT: i32 = 86;

fn export(img: &Path, extra: &[&str]) -> Vec<u8> {
    let out = img.with_extension("export.raw");
    let mut args = vec!["export", p(img), p(&out), "--force"];
    args.extend_from_slice(extra);
    chainfs_ok(&args);
    let b = fs::read(&out).unwrap();
    fs::remove_file(&out).unwrap();
    b
}

fn info(img: &Path) -> Value {
    serde_json::from_str(&chainfs_ok(&["info", "--json", p(img)])).unwrap()
}

fn assert_layout(paths: &[&Path]) {
    let bad: Vec<String> = paths
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "vhd"))
        .flat_map(|p| vhd_layout_problems(p))
        .collect();
    assert!(bad.is_empty(), "VHD layout: {bad:#?}");
}

/// 4 KiB-aligned random writes (libvhdi misreads partly set bitmap bytes).
fn scribble(img: &Path, model: &mut [u8], rng: &mut Rng, n: usize) {
    let scratch = img.with_extension("in.bin");
    for _ in 0..n {
        let len = (1 + rng.below(64)) * 4096;
        let off = rng.below((model.len() as u64 - len) / 4096) * 4096;
        chainfs_write_mirrored(img, off, &rng.bytes(len as usize), &scratch, model);
    }
    fs::remove_file(&scratch).unwrap();
}

/// libvhdi's view of the whole chain at `leaf` (`layers` deep) equals
/// `want` and chainfs's export.
fn oracle_vhdimount(leaf: &Path, layers: usize, want: &[u8]) {
    if !have_vhdimount() {
        return;
    }
    let mnt = leaf.parent().unwrap().join(format!(
        "vhdi-{}",
        leaf.file_name().unwrap().to_string_lossy()
    ));
    let g = vhdimount(leaf, &mnt, layers);
    let got = fs::read(mnt.join(format!("vhdi{layers}"))).unwrap();
    drop(g);
    let _ = fs::remove_dir(&mnt);
    assert_same(&got, want, &format!("vhdimount {}", leaf.display()));
    assert_same(
        &export(leaf, &[]),
        want,
        &format!("export {}", leaf.display()),
    );
}

/// qemu-img's view of a base (qemu reads no VHD/VHDX parents).
fn oracle_qemu(base: &Path, want: &[u8]) {
    if !require("qemu-img", have("qemu-img")) {
        return;
    }
    let fmt = if base.extension().unwrap() == "vhd" {
        "vpc"
    } else {
        "vhdx"
    };
    let out = base.with_extension("qemu.raw");
    let o = Command::new("qemu-img")
        .current_dir("/")
        .args(["convert", "-f", fmt, "-O", "raw", p(base), p(&out)])
        .output()
        .unwrap();
    assert!(o.status.success(), "qemu-img: {}", text(&o));
    let got = fs::read(&out).unwrap();
    fs::remove_file(&out).unwrap();
    assert_same(&got, want, &format!("qemu-img convert {}", base.display()));
}

// ---------------------------------------------------------------------------
// A vhd-lib-shaped VHD writer (independent of chainfs's writer).

/// Write a VHD shaped as Xen Orchestra's vhd-lib writes one: creator
/// `xo  `, footer timestamp in Unix seconds, header at 512 with no
/// locators and (for a child) the parent name `parent_name` (a path
/// relative to the child's folder) and parent timestamp 0, the BAT right
/// after the header, fixed 2 MiB blocks with full bitmaps, in `blocks`
/// order. Returns the new disk's unique id.
fn xo_vhd(path: &Path, size: u64, parent: Option<(&str, Uuid)>, blocks: &[(u32, Vec<u8>)]) -> Uuid {
    const BLOCK: u64 = 2 * MIB;
    let id = Uuid::new_v4();
    let entries = size.div_ceil(BLOCK) as u32;
    let footer = Footer {
        features: 2,
        version: 0x0001_0000,
        data_offset: 512,
        timestamp: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as u32,
        creator_app: *b"xo  ",
        creator_version: 0x0001_0000,
        creator_os: u32::from_be_bytes(*b"Wi2k"),
        original_size: size,
        current_size: size,
        geometry: geometry(size),
        disk_type: if parent.is_some() { 4 } else { 3 },
        unique_id: id,
        saved_state: 0,
    };
    let header = DynamicHeader {
        table_offset: 1536,
        max_table_entries: entries,
        block_size: BLOCK as u32,
        parent_id: parent.map_or(Uuid::nil(), |p| p.1),
        parent_timestamp: 0,
        parent_name: parent.map_or(String::new(), |p| p.0.to_string()),
        locators: [Locator::default(); 8],
    };
    let bat_bytes = (entries as u64 * 4).next_multiple_of(512);
    let mut bat = vec![0xFFu8; bat_bytes as usize];
    let mut data = Vec::new();
    let mut sector = (1536 + bat_bytes) / 512;
    for (b, bytes) in blocks {
        assert_eq!(bytes.len() as u64, BLOCK);
        bat[*b as usize * 4..*b as usize * 4 + 4].copy_from_slice(&(sector as u32).to_be_bytes());
        data.extend_from_slice(&[0xFF; 512]);
        data.extend_from_slice(bytes);
        sector += (512 + BLOCK) / 512;
    }
    let mut f = footer.to_bytes().to_vec();
    f.extend_from_slice(&header.to_bytes());
    f.extend_from_slice(&bat);
    f.extend_from_slice(&data);
    f.extend_from_slice(&footer.to_bytes());
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, f).unwrap();
    id
}

/// Defect 2: a vhd-lib child names its parent only by a relative path with
/// folders in the header; chainfs followed only the bare name (exit 4).
#[test]
fn vhd_lib_chain_with_a_relative_parent_name_opens() {
    let t = TempDir::new().unwrap();
    let mut rng = Rng(1401);
    let size = 8 * MIB;
    let blk = |rng: &mut Rng| rng.bytes(2 * MIB as usize);
    let base_blocks = vec![(0, blk(&mut rng)), (2, blk(&mut rng))];
    let base = t.path().join("base").join("base.vhd");
    let base_id = xo_vhd(&base, size, None, &base_blocks);
    let mut model = vec![0u8; size as usize];
    for (b, d) in &base_blocks {
        model[*b as usize * (2 << 20)..(*b as usize + 1) * (2 << 20)].copy_from_slice(d);
    }
    let kid_blocks = vec![(2, blk(&mut rng)), (1, blk(&mut rng))];
    for (b, d) in &kid_blocks {
        model[*b as usize * (2 << 20)..(*b as usize + 1) * (2 << 20)].copy_from_slice(d);
    }
    for (i, name) in [
        "../base/base.vhd",
        "..\\base\\base.vhd",
        ".\\..\\base\\base.vhd",
        "./../base/base.vhd",
    ]
    .into_iter()
    .enumerate()
    {
        let kid = t.path().join("vms").join(format!("child{i}.vhd"));
        xo_vhd(&kid, size, Some((name, base_id)), &kid_blocks);
        assert_same(
            &export(&kid, &[]),
            &model,
            &format!("export, parent name {name:?}"),
        );
        let o = chainfs(&["check", p(&kid)]);
        assert_eq!(code(&o), 0, "check, parent name {name:?}: {}", text(&o));
        if i == 0 {
            // libvhdi follows the `/` form too: both readers agree.
            oracle_vhdimount(&kid, 2, &model);
        }
    }
}

/// The generator is right by libvhdi's reading, so the test above does not
/// test chainfs against itself.
#[test]
fn vhd_lib_generator_is_read_alike_by_libvhdi() {
    let t = TempDir::new().unwrap();
    let mut rng = Rng(1402);
    let d = rng.bytes(2 * MIB as usize);
    let base = t.path().join("b.vhd");
    let id = xo_vhd(&base, 4 * MIB, None, &[(1, d.clone())]);
    let kid = t.path().join("k.vhd");
    let e = rng.bytes(2 * MIB as usize);
    xo_vhd(&kid, 4 * MIB, Some(("b.vhd", id)), &[(0, e.clone())]);
    let mut model = e;
    model.extend_from_slice(&d);
    oracle_vhdimount(&kid, 2, &model);
    assert_same(&export(&kid, &[]), &model, "export");
}

// ---------------------------------------------------------------------------
// Defects 1, 3, 4 on chains chainfs writes.

/// Defect 1: a merge that relinks a VHD child moved its header past the
/// end of the file and left the old one, naming the deleted parent, at 512.
#[test]
fn merge_relinking_a_vhd_child_keeps_its_header_at_512() {
    for keep in [false, true] {
        let t = TempDir::new().unwrap();
        let d = t.path();
        let mut rng = Rng(1403);
        let size = 16 * MIB;
        let mut model = vec![0u8; size as usize];
        let (base, mid, leaf) = (d.join("base.vhd"), d.join("mid.vhd"), d.join("leaf.vhd"));
        chainfs_ok(&["create", p(&base), "--size", "16M"]);
        scribble(&base, &mut model, &mut rng, 4);
        chainfs_ok(&["create", p(&mid), "--parent", p(&base)]);
        scribble(&mid, &mut model, &mut rng, 4);
        chainfs_ok(&["create", p(&leaf), "--parent", p(&mid)]);
        scribble(&leaf, &mut model, &mut rng, 4);
        let mut args = vec!["merge", p(&mid), p(&base)];
        if keep {
            args.push("--keep");
        }
        chainfs_ok(&args);
        assert_layout(&[&base, &leaf]);
        if keep {
            assert_layout(&[&mid]);
        }
        assert_eq!(info(&leaf).as_array().unwrap().len(), 2);
        assert_same(&export(&leaf, &[]), &model, "leaf after the merge");
        let o = chainfs(&["check", p(&leaf)]);
        assert_eq!(code(&o), 0, "{}", text(&o));
        // A second relink of the same file (merging again) keeps it so.
        scribble(&leaf, &mut model, &mut rng, 2);
        let top = d.join("top.vhd");
        chainfs_ok(&["create", p(&top), "--parent", p(&leaf)]);
        chainfs_ok(&["merge", p(&leaf), p(&base)]);
        assert_layout(&[&base, &top]);
        assert_same(&export(&top, &[]), &model, "top after the second merge");
    }
}

/// The hints a layer stores, by source.
fn hints(img: &Path) -> Vec<(String, String)> {
    info(img)[0]["parent_locators"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["source"].as_str().unwrap().to_string(),
                h["stored"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Defect 3: Windows fields held POSIX paths (`/vms/x/c1.avhdx`), which
/// neither libvhdi nor Windows resolve.
#[test]
fn windows_fields_hold_windows_paths_and_the_header_name_a_relative_one() {
    let t = TempDir::new().unwrap();
    let d = t.path();
    for ext in ["vhd", "vhdx"] {
        let base = d.join("base").join(format!("base.{ext}"));
        fs::create_dir_all(base.parent().unwrap()).unwrap();
        chainfs_ok(&["create", p(&base), "--size", "8M"]);
        let same = d.join("base").join(format!("c.{ext}"));
        let other = d.join("vms").join(format!("c.{ext}"));
        fs::create_dir_all(other.parent().unwrap()).unwrap();
        for (child, rel, name) in [
            (&same, format!(".\\base.{ext}"), format!("base.{ext}")),
            (
                &other,
                format!("..\\base\\base.{ext}"),
                format!("../base/base.{ext}"),
            ),
        ] {
            chainfs_ok(&["create", p(child), "--parent", p(&base)]);
            let h = hints(child);
            let canon = fs::canonicalize(&base).unwrap();
            let win_abs = canon.to_str().unwrap().replace('/', "\\");
            let get = |k: &str| h.iter().find(|(s, _)| s == k).map(|(_, v)| v.clone());
            if ext == "vhd" {
                assert_eq!(get("W2ku"), Some(win_abs), "{}", child.display());
                assert_eq!(get("W2ru"), Some(rel), "{}", child.display());
                assert_eq!(get("name"), Some(name), "{}", child.display());
            } else {
                assert_eq!(get("absolute_win32_path"), Some(win_abs));
                assert_eq!(get("relative_path"), Some(rel));
            }
        }
    }
}

/// Defect 4: a VHD child got 2 MiB blocks over a parent with others.
#[test]
fn a_vhd_child_inherits_its_parents_block_size() {
    let t = TempDir::new().unwrap();
    let d = t.path();
    let base = d.join("base.vhd");
    chainfs_ok(&["create", p(&base), "--size", "8M", "--block-size", "512K"]);
    let kid = d.join("kid.vhd");
    chainfs_ok(&["create", p(&kid), "--parent", p(&base)]);
    assert_eq!(info(&kid)[0]["block_size"], 512 << 10);
    // --block-size still chooses.
    let k2 = d.join("k2.vhd");
    chainfs_ok(&["create", p(&k2), "--parent", p(&base), "--block-size", "1M"]);
    assert_eq!(info(&k2)[0]["block_size"], 1 << 20);
    // VHDX keeps Hyper-V's convention: checkpoints use 2 MiB blocks.
    let xb = d.join("base.vhdx");
    chainfs_ok(&["create", p(&xb), "--size", "64M"]);
    let xk = d.join("kid.avhdx");
    chainfs_ok(&["create", p(&xk), "--parent", p(&xb)]);
    assert_eq!(info(&xb)[0]["block_size"], 32 << 20);
    assert_eq!(info(&xk)[0]["block_size"], 2 << 20);
}

/// Every chain chainfs writes, VHD and VHDX, parent in the same folder and
/// in another one: libvhdi (run from `/` with absolute paths) and
/// qemu-img read what chainfs exports, after create/write, after a merge
/// that relinks, after set-parent, after merging into the base.
fn oracle_case(ext: &str, other_folder: bool, seed: u64) {
    let t = TempDir::new().unwrap();
    let d = t.path();
    let mut rng = Rng(seed);
    let size = 12 * MIB;
    let mut model = vec![0u8; size as usize];
    let (bdir, kdir) = if other_folder {
        (d.join("base"), d.join("vm"))
    } else {
        (d.join("vm"), d.join("vm"))
    };
    fs::create_dir_all(&bdir).unwrap();
    fs::create_dir_all(&kdir).unwrap();
    let child_ext = if ext == "vhd" { "vhd" } else { "avhdx" };
    let base = bdir.join(format!("base.{ext}"));
    let mid = kdir.join(format!("mid.{child_ext}"));
    let leaf = kdir.join(format!("leaf.{child_ext}"));
    chainfs_ok(&["create", p(&base), "--size", "12M", "--block-size", "1M"]);
    scribble(&base, &mut model, &mut rng, 4);
    chainfs_ok(&["create", p(&mid), "--parent", p(&base)]);
    scribble(&mid, &mut model, &mut rng, 4);
    chainfs_ok(&["create", p(&leaf), "--parent", p(&mid)]);
    scribble(&leaf, &mut model, &mut rng, 4);
    // libvhdi finds a VHDX parent only in the child's folder.
    let libvhdi = ext == "vhd" || !other_folder;
    if libvhdi {
        oracle_vhdimount(&leaf, 3, &model);
    }
    assert_same(&export(&leaf, &[]), &model, "export of the new chain");

    // A merge that relinks the leaf.
    chainfs_ok(&["merge", p(&mid), p(&base)]);
    assert_layout(&[&base, &leaf]);
    if libvhdi {
        oracle_vhdimount(&leaf, 2, &model);
    }
    assert_same(&export(&leaf, &[]), &model, "export after the merge");

    // The user moves the base (VHDX: renames it, so libvhdi can follow).
    let moved_dir = if ext == "vhd" {
        d.join("moved")
    } else {
        bdir.clone()
    };
    fs::create_dir_all(&moved_dir).unwrap();
    let moved = moved_dir.join(format!("moved-base.{ext}"));
    fs::rename(&base, &moved).unwrap();
    assert_eq!(code(&chainfs(&["info", p(&leaf)])), 4);
    chainfs_ok(&["set-parent", p(&leaf), p(&moved)]);
    assert_layout(&[&moved, &leaf]);
    let o = chainfs(&["check", p(&leaf)]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    if libvhdi {
        oracle_vhdimount(&leaf, 2, &model);
    }
    assert_same(&export(&leaf, &[]), &model, "export after set-parent");

    // Everything into the base: qemu reads it too.
    chainfs_ok(&["merge", p(&leaf), p(&moved)]);
    assert_layout(&[&moved]);
    oracle_qemu(&moved, &model);
    if libvhdi {
        oracle_vhdimount(&moved, 1, &model);
    }
}

#[test]
fn oracles_read_vhd_chains_with_the_parent_in_the_same_folder() {
    oracle_case("vhd", false, 1411);
}

#[test]
fn oracles_read_vhd_chains_with_the_parent_in_another_folder() {
    oracle_case("vhd", true, 1412);
}

#[test]
fn oracles_read_vhdx_chains_with_the_parent_in_the_same_folder() {
    oracle_case("vhdx", false, 1413);
}

#[test]
fn oracles_read_vhdx_chains_with_the_parent_in_another_folder() {
    oracle_case("vhdx", true, 1414);
}

// ---------------------------------------------------------------------------
// set-parent.

/// base in `a/`, child in `vm/`, some data in both; returns (base, child,
/// model).
fn two_layers(d: &Path, ext: &str, seed: u64) -> (PathBuf, PathBuf, Vec<u8>) {
    let mut rng = Rng(seed);
    let mut model = vec![0u8; 8 * MIB as usize];
    fs::create_dir_all(d.join("a")).unwrap();
    fs::create_dir_all(d.join("vm")).unwrap();
    let base = d.join("a").join(format!("base.{ext}"));
    let kid = d.join("vm").join(format!("kid.{ext}"));
    chainfs_ok(&["create", p(&base), "--size", "8M", "--block-size", "1M"]);
    scribble(&base, &mut model, &mut rng, 3);
    chainfs_ok(&["create", p(&kid), "--parent", p(&base)]);
    scribble(&kid, &mut model, &mut rng, 3);
    (base, kid, model)
}

fn set_parent_refusals(ext: &str) {
    let t = TempDir::new().unwrap();
    let d = t.path();
    let (base, kid, model) = two_layers(d, ext, 1421);
    let want = info(&kid)[0]["parent_id"].as_str().unwrap().to_string();
    let moved = d.join("b").join(format!("base.{ext}"));
    fs::create_dir_all(moved.parent().unwrap()).unwrap();
    fs::rename(&base, &moved).unwrap();
    assert_eq!(code(&chainfs(&["export", p(&kid), p(&d.join("x.raw"))])), 4);
    // check finds it with --parent-dir and says how to repair.
    let o = chainfs(&["check", p(&kid), "--parent-dir", p(moved.parent().unwrap())]);
    assert_eq!(code(&o), 3, "{}", text(&o));
    assert!(text(&o).contains("chainfs set-parent"), "{}", text(&o));

    // Another disk of the same size: refused, naming both ids.
    let other = d.join("b").join(format!("other.{ext}"));
    chainfs_ok(&["create", p(&other), "--size", "8M"]);
    let got = info(&other)[0]["unique_id"].as_str().unwrap().to_string();
    let o = chainfs(&["set-parent", p(&kid), p(&other)]);
    assert_eq!(code(&o), 5, "{}", text(&o));
    assert!(
        text(&o).contains(&want) && text(&o).contains(&got),
        "{}",
        text(&o)
    );
    assert_eq!(
        code(&chainfs(&["info", p(&kid)])),
        4,
        "the refusal changed nothing"
    );

    // In use: a mount of the chain holds it.
    if require_fuse() {
        let mnt = d.join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        let g = MountGuard::new(&mnt);
        chainfs_ok(&[
            "mount",
            p(&kid),
            p(&mnt),
            "-o",
            "rw",
            "--parent-dir",
            p(moved.parent().unwrap()),
        ]);
        let o = chainfs(&["set-parent", p(&kid), p(&moved)]);
        assert_eq!(code(&o), 7, "{}", text(&o));
        chainfs_ok(&["umount", p(&mnt)]);
        drop(g);
    }

    // The right one.
    chainfs_ok(&["set-parent", p(&kid), p(&moved)]);
    assert_same(&export(&kid, &[]), &model, "after set-parent");
    assert_eq!(code(&chainfs(&["check", p(&kid)])), 0);
    assert_layout(&[&kid]);

    // --ignore-id-mismatch makes another disk the parent and records its id.
    chainfs_ok(&["set-parent", p(&kid), p(&other), "--ignore-id-mismatch"]);
    let i = info(&kid);
    assert_eq!(i[0]["parent_id"].as_str(), Some(got.as_str()));
    assert_eq!(
        fs::canonicalize(i[1]["path"].as_str().unwrap()).unwrap(),
        fs::canonicalize(&other).unwrap()
    );
    assert_eq!(code(&chainfs(&["check", p(&kid)])), 0);
    assert_layout(&[&kid]);
}

#[test]
fn set_parent_on_a_moved_vhd_chain_verifies_identity() {
    set_parent_refusals("vhd");
}

#[test]
fn set_parent_on_a_moved_vhdx_chain_verifies_identity() {
    set_parent_refusals("vhdx");
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Crash set-parent at every write/sync point: the chain always reads the
/// same (found with --parent-dir), and rerunning set-parent finishes it.
fn set_parent_faults(ext: &str) {
    let t = TempDir::new().unwrap();
    let pristine = t.path().join("pristine");
    let (base, _, model) = two_layers(&pristine, ext, 1431);
    fs::create_dir_all(pristine.join("b")).unwrap();
    fs::rename(&base, pristine.join("b").join(format!("base.{ext}"))).unwrap();
    let mut done = None;
    let mut states = Vec::new();
    for k in 1..200u32 {
        let w = t.path().join(format!("k{k}"));
        copy_dir(&pristine, &w);
        let kid = w.join("vm").join(format!("kid.{ext}"));
        let moved = w.join("b").join(format!("base.{ext}"));
        let o = Command::new(bin())
            .args(["set-parent", p(&kid), p(&moved)])
            .env("CHAINFS_FAULT_AFTER", k.to_string())
            .output()
            .unwrap();
        match code(&o) {
            FAULT_EXIT => {
                let pd = ["--parent-dir", p(moved.parent().unwrap())];
                assert_same(
                    &export(&kid, &pd),
                    &model,
                    &format!("k={k}: after the crash"),
                );
                let c = chainfs(&["check", p(&kid), pd[0], pd[1]]);
                states.push(code(&c));
                chainfs_ok(&["set-parent", p(&kid), p(&moved)]);
            }
            0 => done = Some(k),
            c => panic!("k={k}: exit {c}: {}", text(&o)),
        }
        assert_same(
            &export(&kid, &[]),
            &model,
            &format!("k={k}: after set-parent"),
        );
        let c = chainfs(&["check", p(&kid)]);
        assert_eq!(code(&c), 0, "k={k}: {}", text(&c));
        assert_layout(&[&kid]);
        fs::remove_dir_all(&w).unwrap();
        if done.is_some() {
            break;
        }
    }
    let points = done.expect("set-parent never ran through") - 1;
    eprintln!("set-parent {ext}: {points} fault points; check exits after crashes {states:?}");
    assert!(points >= 5, "only {points} fault points");
}

#[test]
fn set_parent_vhd_survives_a_crash_at_every_write() {
    set_parent_faults("vhd");
}

#[test]
fn set_parent_vhdx_survives_a_crash_at_every_write() {
    set_parent_faults("vhdx");
}

/// A torn header write (half old, half new) is repaired from the journal.
#[test]
fn a_torn_vhd_header_is_finished_from_the_relink_journal() {
    let t = TempDir::new().unwrap();
    let d = t.path();
    let (base, kid, model) = two_layers(d, "vhd", 1441);
    let moved = d.join("b").join("base.vhd");
    fs::create_dir_all(moved.parent().unwrap()).unwrap();
    fs::rename(&base, &moved).unwrap();
    let before = fs::read(&kid).unwrap();
    // Stop right after the journal is durable (the header not written).
    let mut k = 1;
    let journaled = loop {
        let w = d.join(format!("w{k}"));
        fs::create_dir_all(&w).unwrap();
        let c = w.join("kid.vhd");
        fs::write(&c, &before).unwrap();
        let o = Command::new(bin())
            .args(["set-parent", p(&c), p(&moved)])
            .env("CHAINFS_FAULT_AFTER", k.to_string())
            .output()
            .unwrap();
        assert_eq!(code(&o), FAULT_EXIT, "ran through before a journal showed");
        let b = fs::read(&c).unwrap();
        if b.chunks(512).any(|s| s.starts_with(b"chfsrlnk")) && b[512..1536] == before[512..1536] {
            break c;
        }
        k += 1;
    };
    // Tear the header: its second sector from the new header in the journal.
    let mut b = fs::read(&journaled).unwrap();
    let j = b
        .chunks(512)
        .position(|s| s.starts_with(b"chfsrlnk"))
        .unwrap()
        * 512;
    let new_second = b[j + 1024..j + 1536].to_vec();
    b[1024..1536].copy_from_slice(&new_second);
    fs::write(&journaled, &b).unwrap();
    // Read-only: the journal's header is used, check names the relink.
    assert_same(
        &export(&journaled, &[]),
        &model,
        "read-only over a torn header",
    );
    let o = chainfs(&["check", p(&journaled)]);
    assert_eq!(code(&o), 3, "{}", text(&o));
    assert!(text(&o).contains("interrupted relink"), "{}", text(&o));
    // A writable open finishes it.
    let same = d.join("same.bin");
    fs::write(&same, &model[..4096]).unwrap();
    chainfs_ok(&["write", p(&journaled), "--offset", "0", "--input", p(&same)]);
    assert_layout(&[&journaled]);
    assert_eq!(code(&chainfs(&["check", p(&journaled)])), 0);
    assert_same(&export(&journaled, &[]), &model, "after the repair");
}

// ---------------------------------------------------------------------------
// VHD and VHDX never mix in one chain.

#[test]
fn chains_mixing_vhd_and_vhdx_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let px = t.path().join("p.vhdx");
    let pv = t.path().join("p.vhd");
    chainfs_ok(&["create", p(&px), "--size", "8M"]);
    chainfs_ok(&["create", p(&pv), "--size", "8M"]);
    for (child, parent) in [
        ("c.vhd", &px),
        ("c.avhd", &px),
        ("c.avhdx", &pv),
        ("c.vhdx", &pv),
    ] {
        let c = t.path().join(child);
        let o = chainfs(&["create", p(&c), "--parent", p(parent)]);
        assert_eq!(
            code(&o),
            6,
            "create {child} over {}: {}",
            parent.display(),
            text(&o)
        );
        assert!(!c.exists(), "{child} was created anyway");
    }
}
