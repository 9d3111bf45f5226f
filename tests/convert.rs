//! `chainfs export LEAF OUT` converting between formats: the flattened
//! chain becomes a new standalone image in the format OUT's extension (or
//! `--format`) names. Every output is checked by tools that are not
//! chainfs: `qemu-img compare` against the raw export (run from another
//! folder with absolute paths), `vhdiinfo` and `vhdimount` (libvhdi), and
//! by `chainfs check`; a mostly empty disk must stay sparse. The refusals
//! (unknown extension, an existing OUT, a target that is not a file) and
//! the failures (a corrupt chain, a full or read-only folder) must leave
//! the folder exactly as it was.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    chainfs, chainfs_ok, chainfs_write_mirrored, check, code, have, have_qemu_img, have_vhdimount,
    is_root, require, sha256, sha256_file, text, vhdimount, Fmt, Rng, Tmpfs,
};
use tempfile::TempDir;

const MIB: u64 = 1 << 20;
/// A mostly empty disk: about 4 MiB of data in 256 MiB.
const SIZE: u64 = 256 * MIB;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// base <- leaf in format `f`: data in both, zeros the leaf stores over
/// base data, the disk's last sector written; the leaf and a model of the
/// flat bytes.
fn chain(d: &Path, f: Fmt) -> (PathBuf, Vec<u8>) {
    let base = d.join(f.base_name("base"));
    let leaf = d.join(f.child_name("leaf"));
    let scratch = d.join("scratch");
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = Rng(11 + f.index());
    f.create_base(&base, SIZE, &[]);
    chainfs_write_mirrored(&base, 0, &rng.bytes(MIB as usize), &scratch, &mut model);
    chainfs_write_mirrored(
        &base,
        100 * MIB + 512,
        &rng.bytes(4096),
        &scratch,
        &mut model,
    );
    f.create_child(&leaf, &base, &[]);
    chainfs_write_mirrored(
        &leaf,
        200 * MIB - 4096,
        &rng.bytes(2 * MIB as usize),
        &scratch,
        &mut model,
    );
    chainfs_write_mirrored(&leaf, 4096, &[0u8; 8192], &scratch, &mut model);
    chainfs_write_mirrored(&leaf, SIZE - 512, &rng.bytes(512), &scratch, &mut model);
    fs::remove_file(&scratch).unwrap();
    (leaf, model)
}

/// The chain exported to `NAME.raw`, checked against the model.
fn reference(d: &Path, leaf: &Path, model: &[u8]) -> PathBuf {
    let out = d.join("reference.raw");
    chainfs_ok(&["export", s(leaf), s(&out)]);
    assert_eq!(sha256_file(&out), sha256(model), "the raw export differs");
    out
}

/// `chainfs export ARGS... --json`: the summary.
fn export_json(args: &[&str]) -> serde_json::Value {
    let mut a = vec!["export"];
    a.extend_from_slice(args);
    a.push("--json");
    serde_json::from_str(&chainfs_ok(&a)).expect("export --json prints JSON")
}

/// `qemu-img compare` of `img` (qemu format `qfmt`) with the raw `want`,
/// run from `/` with absolute paths.
fn qemu_same(want: &Path, img: &Path, qfmt: &str) {
    let o = Command::new("qemu-img")
        .current_dir("/")
        .args(["compare", "-f", "raw", "-F", qfmt])
        .arg(std::path::absolute(want).unwrap())
        .arg(std::path::absolute(img).unwrap())
        .output()
        .expect("cannot run qemu-img");
    assert!(
        o.status.success(),
        "qemu-img compare {} {}: {}",
        want.display(),
        img.display(),
        text(&o)
    );
}

/// libvhdi reads `img` as a standalone `kind` disk with the bytes of `want`.
fn libvhdi_same(img: &Path, kind: &str, want: &Path, d: &Path) {
    let o = Command::new("vhdiinfo").arg(img).output().unwrap();
    assert!(
        o.status.success(),
        "vhdiinfo {}: {}",
        img.display(),
        text(&o)
    );
    let info = String::from_utf8_lossy(&o.stdout);
    assert!(info.contains(kind), "vhdiinfo {}: {info}", img.display());
    assert!(
        info.contains(&format!("({SIZE} bytes)")),
        "vhdiinfo {}: {info}",
        img.display()
    );
    assert!(
        !info.contains("Parent"),
        "{} is not standalone: {info}",
        img.display()
    );
    if have_vhdimount() {
        let mnt = d.join("vhdi");
        let g = vhdimount(img, &mnt, 1);
        assert_eq!(
            sha256_file(&mnt.join("vhdi1")),
            sha256_file(want),
            "vhdimount {} reads other bytes",
            img.display()
        );
        drop(g);
    }
}

/// `img` is clean for `chainfs check`, a base, and sparse.
fn clean_and_sparse(img: &Path) {
    assert_eq!(check(img), (0, vec![]), "chainfs check {}", img.display());
    let info = common::info_json(img);
    assert_eq!(info.as_array().unwrap().len(), 1, "not standalone: {info}");
    assert_eq!(info[0]["virtual_size"], SIZE, "{info}");
    let on_disk = fs::metadata(img).unwrap().blocks() * 512;
    assert!(
        on_disk < 16 * MIB,
        "{}: {on_disk} bytes allocated for ~4 MiB of data in a {SIZE}-byte disk",
        img.display()
    );
}

/// The folder's entries (names), to see that nothing was left behind.
fn entries(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn vhd_chain_to_vhdx() {
    if !have_qemu_img() || !require("vhdiinfo (libvhdi)", have("vhdiinfo")) {
        return;
    }
    let t = TempDir::new().unwrap();
    let (leaf, model) = chain(t.path(), Fmt::Vhd);
    let want = reference(t.path(), &leaf, &model);
    let out = t.path().join("out.vhdx");
    let j = export_json(&[s(&leaf), s(&out)]);
    assert_eq!(j["format"], "vhdx", "{j}");
    assert_eq!(j["target"], "new_file", "{j}");
    assert_eq!(j["virtual_size"], SIZE, "{j}");
    let data = model.iter().filter(|&&b| b != 0).count() as u64;
    let written = j["data_written"].as_u64().unwrap();
    assert!(
        written >= data && written <= 4 * MIB,
        "{written} bytes written for {data} non-zero bytes: {j}"
    );
    qemu_same(&want, &out, "vhdx");
    libvhdi_same(&out, "VHDX", &want, t.path());
    clean_and_sparse(&out);
}

#[test]
fn vhdx_chain_to_vhd_and_raw() {
    if !have_qemu_img() || !require("vhdiinfo (libvhdi)", have("vhdiinfo")) {
        return;
    }
    let t = TempDir::new().unwrap();
    let (leaf, model) = chain(t.path(), Fmt::Vhdx);
    let want = reference(t.path(), &leaf, &model);

    let vhd = t.path().join("out.vhd");
    let j = export_json(&[s(&leaf), s(&vhd)]);
    assert_eq!(j["format"], "vhd", "{j}");
    qemu_same(&want, &vhd, "vpc");
    libvhdi_same(&vhd, "VHD", &want, t.path());
    clean_and_sparse(&vhd);

    // Raw by its name: the fast path, the same bytes, holes for zeros.
    let raw = t.path().join("out.img");
    let j = export_json(&[s(&leaf), s(&raw)]);
    assert_eq!(j["format"], "raw", "{j}");
    assert_eq!(sha256_file(&raw), sha256(&model));
    qemu_same(&want, &raw, "raw");
    let on_disk = fs::metadata(&raw).unwrap().blocks() * 512;
    assert!(on_disk < 16 * MIB, "{on_disk} bytes allocated");
}

#[test]
fn format_overrides_the_extension() {
    if !have_qemu_img() {
        return;
    }
    let t = TempDir::new().unwrap();
    let (leaf, model) = chain(t.path(), Fmt::Vhd);
    let want = reference(t.path(), &leaf, &model);
    // A VHDX named .img, and raw bytes named .vhd.
    let img = t.path().join("disk.img");
    let j = export_json(&[s(&leaf), s(&img), "--format", "vhdx"]);
    assert_eq!(j["format"], "vhdx", "{j}");
    assert_eq!(common::info_json(&img)[0]["format"], "vhdx");
    qemu_same(&want, &img, "vhdx");
    let vhd = t.path().join("flat.vhd");
    let j = export_json(&[s(&leaf), s(&vhd), "--format", "raw"]);
    assert_eq!(j["format"], "raw", "{j}");
    assert_eq!(sha256_file(&vhd), sha256(&model));
    // No extension at all: raw, as before formats were chosen.
    let bare = t.path().join("flat");
    assert_eq!(export_json(&[s(&leaf), s(&bare)])["format"], "raw");
    assert_eq!(sha256_file(&bare), sha256(&model));
    // An extension no format claims: raw too (`qemu-img convert`'s default).
    let bin = t.path().join("flat.bin");
    assert_eq!(export_json(&[s(&leaf), s(&bin)])["format"], "raw");
    assert_eq!(sha256_file(&bin), sha256(&model));
    // Block size and type reach the new image.
    let fixed = t.path().join("fixed.vhd");
    chainfs_ok(&[
        "export",
        s(&leaf),
        s(&fixed),
        "--type",
        "fixed",
        "--block-size",
        "1M",
    ]);
    assert_eq!(common::info_json(&fixed)[0]["disk_type"], "fixed");
    qemu_same(&want, &fixed, "vpc");
    let small = t.path().join("small.vhdx");
    chainfs_ok(&["export", s(&leaf), s(&small), "--block-size", "1M"]);
    assert_eq!(common::info_json(&small)[0]["block_size"], MIB);
    qemu_same(&want, &small, "vhdx");
}

#[test]
fn unknown_formats_and_impossible_targets_are_refused() {
    let t = TempDir::new().unwrap();
    let (leaf, _model) = chain(t.path(), Fmt::Vhd);
    let before = entries(t.path());
    let out = t.path().join("disk.bogus");
    let o = chainfs(&["export", s(&leaf), s(&out), "--format", "bogus"]);
    assert_eq!(code(&o), 9, "{}", text(&o));
    assert!(text(&o).contains("--format bogus"), "{}", text(&o));
    // An image format onto a target that is not a regular file.
    let o = chainfs(&["export", s(&leaf), "/dev/null", "--format", "vhdx"]);
    assert_eq!(code(&o), 9, "{}", text(&o));
    assert!(text(&o).contains("regular file"), "{}", text(&o));
    // Raw has no blocks to choose.
    let o = chainfs(&[
        "export",
        s(&leaf),
        s(&t.path().join("x.raw")),
        "--block-size",
        "1M",
    ]);
    assert_eq!(code(&o), 9, "{}", text(&o));
    assert_eq!(entries(t.path()), before, "a refusal left files behind");
}

#[test]
fn an_existing_output_is_not_touched_without_force() {
    if !have_qemu_img() {
        return;
    }
    let t = TempDir::new().unwrap();
    let (leaf, model) = chain(t.path(), Fmt::Vhd);
    let want = reference(t.path(), &leaf, &model);
    let out = t.path().join("out.vhdx");
    fs::write(&out, b"precious").unwrap();
    let before = entries(t.path());
    let o = chainfs(&["export", s(&leaf), s(&out)]);
    assert_eq!(code(&o), 9, "{}", text(&o));
    assert!(text(&o).contains("--force"), "{}", text(&o));
    assert_eq!(fs::read(&out).unwrap(), b"precious");
    assert_eq!(entries(t.path()), before);
    // --force replaces it (the documented rule), with a whole image.
    let j = export_json(&[s(&leaf), s(&out), "--force"]);
    assert_eq!(j["target"], "replaced_file", "{j}");
    qemu_same(&want, &out, "vhdx");
    assert_eq!(entries(t.path()), before);
}

#[test]
fn a_failed_export_leaves_nothing_behind() {
    if !require("root (to mount a tmpfs)", is_root()) {
        return;
    }
    let t = TempDir::new().unwrap();
    let (leaf, _model) = chain(t.path(), Fmt::Vhd);

    // 1. The folder is read-only: nothing can be created.
    let ro = t.path().join("ro");
    let m = Tmpfs::mount(&ro, "8m");
    m.read_only();
    let out = ro.join("out.vhdx");
    let o = chainfs(&["export", s(&leaf), s(&out)]);
    assert_ne!(code(&o), 0, "{}", text(&o));
    let msg = text(&o);
    assert!(
        msg.contains(s(&out)) && msg.contains("vhdx") && msg.contains("Read-only"),
        "the error names neither OUT, the format nor the cause: {msg}"
    );
    assert_eq!(entries(&ro), Vec::<String>::new());
    drop(m);

    // 2. The folder fills up during the copy: the partial image goes.
    let full = t.path().join("full");
    let m = Tmpfs::mount(&full, "2m");
    fs::write(full.join("other.vhd"), b"not ours").unwrap();
    for out in ["out.vhdx", "out.vhd"] {
        let o = chainfs(&["export", s(&leaf), s(&full.join(out))]);
        assert_ne!(code(&o), 0, "{out}: {}", text(&o));
        assert!(text(&o).contains(out), "{out}: {}", text(&o));
        assert_eq!(entries(&full), vec!["other.vhd".to_string()], "{out}");
        assert_eq!(fs::read(full.join("other.vhd")).unwrap(), b"not ours");
    }
    drop(m);

    // 3. The base's table points block 50 (data at 100 MiB) past the end
    //    of its file: the image is created, the read fails mid-copy.
    let base = t.path().join("base.vhd");
    let mut b = fs::read(&base).unwrap();
    let bat = u64::from_be_bytes(b[512 + 16..512 + 24].try_into().unwrap()) as usize;
    b[bat + 4 * 50..bat + 4 * 51].copy_from_slice(&0x7FFF_FFF0u32.to_be_bytes());
    fs::write(&base, b).unwrap();
    let before = entries(t.path());
    let out = t.path().join("from-broken.vhdx");
    let o = chainfs(&["export", s(&leaf), s(&out), "--threads", "1"]);
    assert_eq!(code(&o), 3, "{}", text(&o));
    assert!(
        text(&o).contains("from-broken.vhdx") && text(&o).contains("base.vhd"),
        "the error names neither OUT nor the broken layer: {}",
        text(&o)
    );
    assert_eq!(
        entries(t.path()),
        before,
        "a failed export left files behind"
    );
}
