//! The rules that decide what a file is and which files form a chain,
//! through the CLI:
//! * a file carrying a format's signatures is that format, even damaged:
//!   refused naming the file, the offset and what is wrong, never read as
//!   raw under a `.img` or `.raw` name;
//! * a file is a child of a layer exactly when its own chain would take that
//!   layer as its parent (the chain's candidate order, `--parent-dir`,
//!   `--parent` overrides, by file identity), which is what `write` and
//!   merges protect;
//! * a chain that comes back to a file it already holds, under another
//!   name (hard link, symlink), is a loop, reported as `loop: A -> B -> A`
//!   with the other chain refusals' exit code (5).

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::{chainfs, chainfs_ok, code, p, text};
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

/// Overwrite bytes of `file` at `off`.
fn patch(file: &Path, off: u64, bytes: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(file).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// `chainfs ARGS`: exit `want` and every needle in the output.
fn expect(args: &[&str], want: i32, needles: &[&str]) -> String {
    let o = chainfs(args);
    let t = text(&o);
    assert_eq!(code(&o), want, "chainfs {args:?}: {t}");
    assert!(!t.contains("panicked"), "chainfs {args:?}: {t}");
    for n in needles {
        assert!(t.contains(n), "chainfs {args:?}: output lacks {n:?}: {t}");
    }
    t
}

/// `info`, `check` and `export` of `img` all refuse it with exit `want`
/// (check: its own exit 3 for a chain that does not open) naming
/// `needles`, and nothing is read as raw.
fn refused_everywhere(img: &Path, want: i32, needles: &[&str], scratch: &Path) {
    let t = expect(&["info", p(img)], want, needles);
    assert!(!t.contains("format:        raw"), "{t}");
    expect(&["check", p(img)], 3, needles);
    let out = scratch.join("out.raw");
    expect(&["export", p(img), p(&out)], want, needles);
    assert!(!out.exists(), "export of a refused image wrote {out:?}");
}

// ---------------------------------------------------------------------------
// 1. Signatures decide the format.

#[test]
fn a_vhdx_with_a_damaged_identifier_named_img_or_raw_is_refused_not_read_as_raw() {
    let d = TempDir::new().unwrap();
    let good = d.path().join("disk.vhdx");
    chainfs_ok(&["create", p(&good), "--size", "8M"]);
    for name in ["disk.img", "disk.raw", "disk.vhdx2"] {
        let img = d.path().join(name);
        fs::copy(&good, &img).unwrap();
        patch(&img, 0, b"XXXXXXXX");
        let needles = [p(&img), "offset 0x0", "vhdxfile", "0x10000, 0x20000"];
        // The name decides nothing: the signatures at 64 KiB.. do.
        expect(&["info", p(&img)], 3, &needles);
        let out = d.path().join("out.raw");
        expect(&["export", p(&img), p(&out)], 3, &needles);
        assert!(!out.exists());
        fs::remove_file(&img).unwrap();
    }
    // Only the region tables left (identifier and both headers wiped).
    let img = d.path().join("wiped.img");
    fs::copy(&good, &img).unwrap();
    patch(&img, 0, &vec![0u8; 192 << 10]);
    refused_everywhere(&img, 3, &[p(&img), "0x30000, 0x40000"], d.path());
}

#[test]
fn a_vhdx_whose_headers_are_broken_named_img_is_refused_naming_both_headers() {
    let d = TempDir::new().unwrap();
    let img = d.path().join("disk.img");
    chainfs_ok(&["create", p(&d.path().join("disk.vhdx")), "--size", "8M"]);
    fs::rename(d.path().join("disk.vhdx"), &img).unwrap();
    patch(&img, (64 << 10) + 4, &[0; 4]);
    patch(&img, (128 << 10) + 4, &[0; 4]);
    refused_everywhere(&img, 3, &[p(&img), "0x10004", "0x20004"], d.path());
}

#[test]
fn one_vhdx_tag_alone_does_not_make_a_raw_image_a_vhdx() {
    // A raw image that happens to hold `head` at 64 KiB (file-system
    // data) is still raw: one 4-byte tag is too weak a sign.
    let d = TempDir::new().unwrap();
    let img = d.path().join("data.img");
    fs::write(&img, vec![0u8; 4 * MIB as usize]).unwrap();
    patch(&img, 64 << 10, b"head");
    expect(&["info", p(&img)], 0, &["raw"]);
    // Two of them are a damaged VHDX.
    patch(&img, 192 << 10, b"regi");
    expect(&["info", p(&img)], 3, &[p(&img), "vhdxfile"]);
}

#[test]
fn a_vhd_with_a_damaged_footer_named_img_is_refused_naming_the_offset() {
    let d = TempDir::new().unwrap();
    for ty in ["fixed", "dynamic"] {
        let v = d.path().join(format!("{ty}.vhd"));
        chainfs_ok(&["create", p(&v), "--size", "4M", "--type", ty]);
        let img = d.path().join(format!("{ty}.img"));
        fs::rename(&v, &img).unwrap();
        let len = fs::metadata(&img).unwrap().len();
        // The checksum of the trailing footer (and of the copy at 0).
        patch(&img, len - 512 + 64, b"\xde\xad");
        patch(&img, 64, b"\xde\xad");
        let at = format!("{:#x}", len - 512 + 64);
        refused_everywhere(&img, 3, &[p(&img), &at, "checksum"], d.path());
    }
}

#[test]
fn a_qcow2_with_a_damaged_header_named_img_is_refused_naming_the_field() {
    let d = TempDir::new().unwrap();
    let q = d.path().join("disk.qcow2");
    chainfs_ok(&["create", p(&q), "--size", "4M"]);
    let cases: [(u64, &[u8], &str); 2] = [
        // A version qcow2 never had: a damaged header, not qcow version 1.
        (4, b"\0\0\0\x07", "offset 0x4"),
        (20, b"\0\0\0\x63", "offset 0x14"),
    ];
    for (off, bytes, needle) in cases {
        let img = d.path().join("disk.img");
        fs::copy(&q, &img).unwrap();
        patch(&img, off, bytes);
        let t = expect(&["info", p(&img)], 6, &[p(&img), needle]);
        assert!(!t.contains("raw"), "{t}");
        fs::remove_file(&img).unwrap();
    }
}

// ---------------------------------------------------------------------------
// 2. A child is a file whose chain takes the layer as its parent.

/// `d2/base.qcow2` and its child, moved to `d1/child.qcow2`, which still
/// names its parent `base.qcow2`.
fn child_in_another_folder(root: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let (d1, d2) = (root.join("d1"), root.join("d2"));
    fs::create_dir_all(&d1).unwrap();
    fs::create_dir_all(&d2).unwrap();
    let base = d2.join("base.qcow2");
    chainfs_ok(&["create", p(&base), "--size", "4M"]);
    let made = d2.join("child.qcow2");
    chainfs_ok(&["create", p(&made), "--parent", p(&base)]);
    let child = d1.join("child.qcow2");
    fs::rename(&made, &child).unwrap();
    (d1, d2, base, child)
}

#[test]
fn a_child_whose_first_candidate_is_not_its_parent_still_protects_the_parent() {
    let root = TempDir::new().unwrap();
    let (d1, d2, base, child) = child_in_another_folder(root.path());
    // A second `base.qcow2` in the child's own folder comes first in the
    // candidate order, but it is not an image: the chain passes over it
    // and takes d2/base.qcow2.
    fs::write(d1.join("base.qcow2"), b"not an image").unwrap();
    let dirs = ["--parent-dir", p(&d1), "--parent-dir", p(&d2)];
    let mut args = vec!["info", "--json", p(&child)];
    args.extend_from_slice(&dirs);
    let info: serde_json::Value = serde_json::from_str(&chainfs_ok(&args)).unwrap();
    let layers = info.as_array().unwrap();
    assert_eq!(layers.len(), 2, "{info}");
    assert_eq!(layers[1]["path"].as_str().unwrap(), p(&base), "{info}");
    // So writing into d2/base.qcow2 would corrupt it: refused, naming it.
    let input = root.path().join("input");
    fs::write(&input, [0xabu8; 4096]).unwrap();
    let mut w = vec!["write", p(&base), "--offset", "0", "--input", p(&input)];
    w.extend_from_slice(&dirs);
    expect(&w, 10, &[p(&base), p(&child), "1 differencing disk"]);
    // --force writes anyway.
    w.push("--force");
    expect(&w, 0, &[]);
}

#[test]
fn a_file_whose_chain_is_sent_elsewhere_by_parent_is_not_a_child() {
    let root = TempDir::new().unwrap();
    let d = root.path();
    let base = d.join("base.qcow2");
    let other = d.join("other.qcow2");
    chainfs_ok(&["create", p(&base), "--size", "4M"]);
    chainfs_ok(&["create", p(&other), "--size", "4M"]);
    let child = d.join("child.qcow2");
    chainfs_ok(&["create", p(&child), "--parent", p(&base)]);
    let input = d.join("input");
    fs::write(&input, [0xcdu8; 4096]).unwrap();
    let w = ["write", p(&base), "--offset", "0", "--input", p(&input)];
    // By its own name, child.qcow2 depends on base.qcow2.
    expect(&w, 10, &[p(&child)]);
    // Opened with `--parent child=other`, its chain never reads base.qcow2.
    let over = format!("{}={}", p(&child), p(&other));
    let mut args = w.to_vec();
    args.extend_from_slice(&["--parent", &over]);
    expect(&args, 0, &[]);
    // An override naming base.qcow2 (by another name: a hard link) for a
    // disk whose own name leads elsewhere makes that disk a child.
    let lone = d.join("lone.qcow2");
    chainfs_ok(&["create", p(&lone), "--parent", p(&other)]);
    let link = d.join("base-link.qcow2");
    fs::hard_link(&base, &link).unwrap();
    let over = format!("{}={}", p(&lone), p(&link));
    let away = format!("{}={}", p(&child), p(&other));
    let mut args = w.to_vec();
    args.extend_from_slice(&["--parent", &over, "--parent", &away]);
    expect(&args, 10, &[p(&lone)]);
}

#[test]
fn a_merge_protects_a_sibling_whose_first_candidate_is_not_its_parent() {
    let root = TempDir::new().unwrap();
    let (d1, d2, base, sibling) = child_in_another_folder(root.path());
    fs::write(d1.join("base.qcow2"), b"not an image").unwrap();
    // The chain merged: top -> mid -> base, all in d2.
    let mid = d2.join("mid.qcow2");
    chainfs_ok(&["create", p(&mid), "--parent", p(&base)]);
    let top = d2.join("top.qcow2");
    chainfs_ok(&["create", p(&top), "--parent", p(&mid)]);
    // Merging mid into base changes base, which d1/child.qcow2 reads.
    let args = [
        "merge",
        p(&mid),
        p(&base),
        "--parent-dir",
        p(&d1),
        "--parent-dir",
        p(&d2),
    ];
    expect(&args, 10, &[p(&sibling)]);
    // Without the decoy the same holds (the first candidate is the parent).
    fs::remove_file(d1.join("base.qcow2")).unwrap();
    expect(&args, 10, &[p(&sibling)]);
    assert!(top.exists() && mid.exists());
}

#[test]
fn a_vhd_child_belongs_to_the_copy_its_chain_finds_first_not_to_every_file_with_the_id() {
    let root = TempDir::new().unwrap();
    let (d1, d2) = (root.path().join("d1"), root.path().join("d2"));
    fs::create_dir_all(&d1).unwrap();
    fs::create_dir_all(&d2).unwrap();
    let base = d2.join("base.vhd");
    chainfs_ok(&["create", p(&base), "--size", "4M"]);
    let made = d2.join("child.vhd");
    chainfs_ok(&["create", p(&made), "--parent", p(&base)]);
    // The child moves to d1 next to a byte copy of its parent (same id):
    // its relative locator `.\base.vhd` finds the copy first.
    let child = d1.join("child.vhd");
    fs::rename(&made, &child).unwrap();
    let copy = d1.join("base.vhd");
    fs::copy(&base, &copy).unwrap();
    let info: serde_json::Value =
        serde_json::from_str(&chainfs_ok(&["info", "--json", p(&child)])).unwrap();
    assert_eq!(info[1]["path"].as_str().unwrap(), p(&copy), "{info}");
    let input = root.path().join("input");
    fs::write(&input, [0x5au8; 4096]).unwrap();
    // d2/base.vhd carries the id the child records, but the child's chain
    // never reads it: writing it breaks nothing.
    let w = ["write", p(&base), "--offset", "0", "--input", p(&input)];
    let mut args = w.to_vec();
    args.extend_from_slice(&["--parent-dir", p(&d1)]);
    expect(&args, 0, &[]);
    // The copy is the child's parent: refused.
    let w = ["write", p(&copy), "--offset", "0", "--input", p(&input)];
    expect(&w, 10, &[p(&copy), p(&child)]);
}

// ---------------------------------------------------------------------------
// 3. Loops are found by device and inode.

#[test]
fn a_qcow2_backed_by_a_hard_link_of_itself_is_a_loop() {
    let d = TempDir::new().unwrap();
    let base = d.path().join("base.qcow2");
    chainfs_ok(&["create", p(&base), "--size", "4M"]);
    let me = d.path().join("me.qcow2");
    chainfs_ok(&["create", p(&me), "--parent", p(&base)]);
    // base.qcow2 becomes a second name of me.qcow2.
    fs::remove_file(&base).unwrap();
    fs::hard_link(&me, &base).unwrap();
    let want = format!("loop: {} -> {}", p(&me), p(&base));
    let same = format!("the same file as {}", p(&me));
    let needles = [p(&me), want.as_str(), same.as_str()];
    refused_everywhere(&me, 5, &needles, d.path());
}

#[test]
fn two_qcow2_backed_by_each_other_through_links_are_a_loop() {
    for symlink in [false, true] {
        let d = TempDir::new().unwrap();
        let x = d.path().join("x.qcow2");
        chainfs_ok(&["create", p(&x), "--size", "4M"]);
        let a = d.path().join("a.qcow2");
        chainfs_ok(&["create", p(&a), "--parent", p(&x)]);
        let b = d.path().join("b.qcow2");
        chainfs_ok(&["create", p(&b), "--parent", p(&a)]);
        // a names x, which is now b: b -> a -> b.
        fs::remove_file(&x).unwrap();
        if symlink {
            std::os::unix::fs::symlink(&b, &x).unwrap();
        } else {
            fs::hard_link(&b, &x).unwrap();
        }
        let want = format!("loop: {} -> {} -> {}", p(&b), p(&a), p(&x));
        // Found at the first step back into b (the link from a), not after
        // x was taken as a third layer.
        let at = format!("{}: the chain loops", p(&a));
        let needles = [at.as_str(), want.as_str()];
        refused_everywhere(&b, 5, &needles, d.path());
    }
}
