//! The qcow2 driver end to end (issue 11), with qemu as the oracle:
//! images and chains made by `qemu-img`/`qemu-io` (the shared set of
//! `tests/fixtures/qcow2/make.sh`, random writes into chains of every
//! version and cluster size, the real dissect.hypervisor images) must
//! export byte for byte as `qemu-img convert -O raw` reads them, mount
//! read-only with the same content, link parents by name with the backing
//! format deciding the parent's driver, and refuse what chainfs cannot
//! read (encryption, unknown incompatible features) with the documented
//! exit code and a message naming the file.
//!
//! qemu-img runs with absolute paths from `/` (from the image's folder
//! where it reads an external data file, which qemu 10 opens relative to
//! its working directory), so a relative backing name it resolves is the
//! one stored in the image, not one found from the test's folder.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use chainfs::format::qcow2::{Extension, Header};
use common::*;

/// Exit code of an unsupported image (docs/CLI.md).
const EXIT_UNSUPPORTED: i32 = 6;
/// Exit code of a corrupt image.
const EXIT_CORRUPT: i32 = 3;

fn have_qemu() -> bool {
    require("qemu-img and qemu-io", have("qemu-img") && have("qemu-io"))
}

/// The images of `make.sh`, built once per test process.
fn fixtures() -> Option<&'static Path> {
    static DIR: OnceLock<Option<tempfile::TempDir>> = OnceLock::new();
    DIR.get_or_init(|| {
        if !have_qemu() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qcow2/make.sh");
        run_ok(Command::new(&script).arg(dir.path()));
        Some(dir)
    })
    .as_ref()
    .map(|d| d.path())
}

/// `name -> sha256` from a `manifest.sha256`-style file.
fn hashes(file: &Path) -> Vec<(String, String)> {
    fs::read_to_string(file)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (h, n) = l.split_once("  ")?;
            Some((n.to_string(), h.to_string()))
        })
        .collect()
}

/// The folder qemu-img reading `img` runs from: qemu 10 opens a relative
/// external data file name against its working directory (backing names
/// it resolves against the image's folder, wherever it runs).
fn img_dir(img: &Path) -> &Path {
    img.parent().unwrap()
}

/// `qemu-img ARGS` from `/`, insisting on success.
fn qemu_img(args: &[&str]) -> String {
    run(Command::new("qemu-img").current_dir("/").args(args))
}

/// `qemu-io -f qcow2 -c CMD... IMG` from `/`.
fn qemu_io(img: &Path, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.current_dir("/").args(["-f", "qcow2"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    run(c.arg(img));
}

/// What qemu reads: `qemu-img convert -O raw`.
fn qemu_flat(img: &Path, scratch: &Path) -> Vec<u8> {
    let out = scratch.join("qemu-flat.raw");
    run(Command::new("qemu-img").current_dir(img_dir(img)).args([
        "convert",
        "-U",
        "-O",
        "raw",
        p(img),
        p(&out),
    ]));
    let b = fs::read(&out).unwrap();
    fs::remove_file(&out).unwrap();
    b
}

/// Export with chainfs and compare with qemu, byte for byte.
fn assert_reads_like_qemu(img: &Path, scratch: &Path) {
    let want = qemu_flat(img, scratch);
    let got = take_export(img, &scratch.join("chainfs-flat.raw")).unwrap_or_else(|e| panic!("{e}"));
    assert_same(
        &got,
        &want,
        &format!("{} (chainfs vs qemu-img)", img.display()),
    );
}

/// Rewrite the header of `img` after `change` (through our own header
/// writer, which the structs tests pin against qemu's).
fn edit_header(img: &Path, change: impl FnOnce(&mut Header)) {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut b = vec![0u8; 65536.min(f.metadata().unwrap().len() as usize)];
    f.read_exact_at(&mut b, 0).unwrap();
    let mut h = Header::parse(&b).unwrap();
    change(&mut h);
    f.write_all_at(&h.to_bytes().unwrap(), 0).unwrap();
}

/// `n` random writes (and a few zero writes) of whole 512-byte sectors,
/// as qemu-io commands with a pattern byte each.
fn random_cmds(rng: &mut Rng, size: u64, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let off = rng.below(size / 512) * 512;
            let len = (512 * (1 + rng.below(300))).min(size - off);
            if i % 5 == 4 {
                format!("write -z {off} {len}")
            } else {
                format!("write -P {} {off} {len}", 1 + rng.below(254))
            }
        })
        .collect()
}

#[test]
fn qemu_made_images_export_as_qemu_reads_them() {
    let Some(dir) = fixtures() else { return };
    let pinned =
        hashes(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qcow2/expected.sha256"));
    let made = hashes(&dir.join("manifest.sha256"));
    let scratch = tempfile::tempdir().unwrap();
    let mut n = 0;
    for (name, want) in &pinned {
        if name == "luks.qcow2" {
            continue; // refused: see the refusal test
        }
        assert!(
            made.iter().any(|(m, h)| m == name && h == want),
            "{name}: make.sh's qemu reads something else than pinned"
        );
        let out = scratch.path().join("flat.raw");
        let got = take_export(&dir.join(name), &out).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            &sha256(&got),
            want,
            "{name}: chainfs export differs from qemu-img"
        );
        // `check` agrees with `qemu-img check`: clean, but for the image
        // left dirty, whose refcounts lag behind its tables.
        let (c, problems) = check(&dir.join(name));
        if name == "dirty.qcow2" {
            assert!(
                problems.iter().any(|m| m.contains("refcount is 0")),
                "{problems:?}"
            );
        } else {
            assert_eq!((c, &problems), (0, &Vec::new()), "{name}");
        }
        n += 1;
    }
    assert!(n >= 17, "only {n} images checked");
}

#[test]
fn real_qemu_images_read_with_the_pinned_hashes() {
    let d = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for n in 1..=3 {
        files.push(unpack_fixture(
            &format!("dissect-hypervisor/qcow2/backing-chain-{n}.qcow2"),
            d.path(),
        ));
    }
    let basic = unpack_fixture("dissect-hypervisor/qcow2/basic.qcow2", d.path());
    let zstd = unpack_fixture("dissect-hypervisor/qcow2/basic-zstd.qcow2", d.path());
    let out = d.path().join("flat.raw");
    for (img, want) in [
        (
            &files[2],
            "4a57a3a5c273c7c1144743ecafc7b23181f6e23c8abad104493a63a3599bd276",
        ),
        (
            &files[1],
            "8e2e850f2a31828f6f053f70f1fbfa71a42ce0571c6d8cd2a7ca0e21e1db8341",
        ),
        (
            &files[0],
            "186334af67c1acb54b08ded0b6a419571000755d4c810c8b768a30281e2ab074",
        ),
        (
            &basic,
            "3c86a52ad19ebbe34acffb812d276817ddca56522eb72de2b984d70ffb20582f",
        ),
        (
            &zstd,
            "3c86a52ad19ebbe34acffb812d276817ddca56522eb72de2b984d70ffb20582f",
        ),
    ] {
        chainfs_ok(&["export", p(img), p(&out), "--force"]);
        assert_eq!(sha256_file(&out), want, "{}", img.display());
    }
}

/// Chains of three in three folders (relative `../` backing names), every
/// version and cluster size, random writes and zero writes in each layer.
#[test]
fn random_chains_of_every_version_and_cluster_size_read_like_qemu() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let size: u64 = 6 << 20;
    let mut rng = Rng(0x9c0);
    for (compat, cluster) in [
        ("0.10", "65536"),
        ("1.1", "512"),
        ("1.1", "65536"),
        ("1.1", "2M"),
    ] {
        let root = d.path().join(format!("{compat}-{cluster}"));
        let mut prev: Option<PathBuf> = None;
        for layer in ["base", "mid", "top"] {
            let dir = root.join(layer);
            fs::create_dir_all(&dir).unwrap();
            let img = dir.join(format!("{layer}.qcow2"));
            let opts = format!("compat={compat},cluster_size={cluster}");
            let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &opts];
            let backing;
            if let Some(prev) = &prev {
                backing = format!(
                    "../{}/{}",
                    prev.parent()
                        .unwrap()
                        .file_name()
                        .unwrap()
                        .to_str()
                        .unwrap(),
                    prev.file_name().unwrap().to_str().unwrap()
                );
                args.extend(["-b", &backing, "-F", "qcow2"]);
            }
            let sz = size.to_string();
            args.extend([p(&img), &sz]);
            qemu_img(&args);
            qemu_io(&img, &random_cmds(&mut rng, size, 12));
            prev = Some(img);
        }
        let top = prev.unwrap();
        let j = info_json(&top);
        assert_eq!(j.as_array().unwrap().len(), 3, "{j}");
        assert_eq!(
            j[1]["parent_locators"][0]["stored"], "../base/base.qcow2",
            "{j}"
        );
        assert_reads_like_qemu(&top, d.path());
    }
}

/// Backing files shorter and longer than the overlay (qemu allows both):
/// past the end of a shorter one the overlay reads zeros.
#[test]
fn backing_files_of_other_sizes_read_like_qemu() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for (base_size, top_size) in [("3M", "5M"), ("5M", "3M")] {
        let base = d.path().join(format!("base-{base_size}.qcow2"));
        let top = d.path().join(format!("top-{base_size}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", p(&base), base_size]);
        qemu_io(&base, &[format!("write -P 0x5a 0 {base_size}")]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            p(&base),
            "-F",
            "qcow2",
            p(&top),
            top_size,
        ]);
        qemu_io(&top, &["write -P 0x6b 1M 4k".into()]);
        assert_reads_like_qemu(&top, d.path());
    }
    // A raw base shorter than the overlay (the raw driver past its end).
    let raw = d.path().join("short.raw");
    fs::write(&raw, vec![0x77u8; 1 << 20]).unwrap();
    let top = d.path().join("over-short.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        p(&raw),
        "-F",
        "raw",
        p(&top),
        "3M",
    ]);
    assert_reads_like_qemu(&top, d.path());
}

#[test]
fn the_backing_format_decides_the_parents_driver() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    // A raw base whose name and content say nothing: only `-F raw` in the
    // overlay makes it one (probing refuses it).
    let base = d.path().join("base.bin");
    fs::write(&base, Rng(3).bytes(2 << 20)).unwrap();
    let top = d.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.bin",
        "-F",
        "raw",
        p(&top),
        "2M",
    ]);
    qemu_io(&top, &["write -P 0x44 64k 64k".into()]);
    assert_reads_like_qemu(&top, d.path());
    let j = info_json(&top);
    assert_eq!(j[1]["format"], "raw", "{j}");
    assert!(
        !chainfs(&["info", p(&base)]).status.success(),
        "base.bin probes as nothing"
    );

    // Without a recorded format the parent is probed, and `check` says so.
    let rawbase = d.path().join("base.raw");
    fs::copy(&base, &rawbase).unwrap();
    let noformat = d.path().join("noformat.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&noformat),
        "2M",
    ]);
    edit_header(&noformat, |h| {
        h.extensions
            .retain(|e| !matches!(e, Extension::BackingFormat(_)))
    });
    let o = chainfs(&["check", p(&noformat)]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("records no format for its parent"),
        "check notes the probed parent: {}",
        text(&o)
    );
    assert_reads_like_qemu(&noformat, d.path());

    // A format no driver has: refused, naming the child and the format.
    let bogus = d.path().join("bogus.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&bogus),
        "2M",
    ]);
    edit_header(&bogus, |h| {
        for e in &mut h.extensions {
            if let Extension::BackingFormat(f) = e {
                *f = b"vmdk".to_vec();
            }
        }
    });
    let o = chainfs(&["export", p(&bogus), p(&d.path().join("x.raw"))]);
    assert_eq!(code(&o), EXIT_UNSUPPORTED, "{}", text(&o));
    assert!(
        text(&o).contains("bogus.qcow2") && text(&o).contains("vmdk"),
        "{}",
        text(&o)
    );
}

#[test]
fn info_reports_qcow2_layers_linked_by_name() {
    let Some(dir) = fixtures() else { return };
    let j = info_json(&dir.join("chain-top.qcow2"));
    let top = &j[0];
    assert_eq!(top["format"], "qcow2", "{j}");
    assert_eq!(top["disk_type"], "v3", "{j}");
    assert_eq!(top["block_size"], 65536, "{j}");
    assert!(top["unique_id"].is_null(), "{j}");
    assert_eq!(top["parent_link"], "name", "{j}");
    assert_eq!(
        top["parent_locators"][0]["stored"], "chain-mid.qcow2",
        "{j}"
    );
    assert_eq!(j.as_array().unwrap().len(), 3, "{j}");
    assert_eq!(info_json(&dir.join("v2.qcow2"))[0]["disk_type"], "v2");
    let j = info_json(&dir.join("c2m.qcow2"));
    assert_eq!(j[0]["block_size"], 2 << 20, "{j}");
    assert!(j[0]["parent_link"].is_null(), "a base: {j}");
}

#[test]
fn encrypted_images_and_unknown_features_are_refused_naming_the_file() {
    let Some(dir) = fixtures() else { return };
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("x.raw");
    let o = chainfs(&["export", p(&dir.join("luks.qcow2")), p(&out)]);
    assert_eq!(code(&o), EXIT_UNSUPPORTED, "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("luks.qcow2") && t.contains("LUKS"), "{t}");
    assert!(!out.exists(), "nothing exported from an encrypted image");

    let img = d.path().join("future.qcow2");
    fs::copy(dir.join("v3.qcow2"), &img).unwrap();
    edit_header(&img, |h| h.incompatible_features |= 1 << 10);
    let o = chainfs(&["info", p(&img)]);
    assert_eq!(code(&o), EXIT_UNSUPPORTED, "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("future.qcow2") && t.contains("bit 10"), "{t}");
}

#[test]
fn dirty_and_corrupt_images_read_read_only_and_stay_unchanged() {
    let Some(dir) = fixtures() else { return };
    let d = tempfile::tempdir().unwrap();
    let dirty = d.path().join("dirty.qcow2");
    fs::copy(dir.join("dirty.qcow2"), &dirty).unwrap();
    let h = fs::read(&dirty).unwrap();
    assert_eq!(h[79] & 1, 1, "make.sh left the dirty bit set");
    assert_reads_like_qemu(&dirty, d.path());
    assert!(
        fs::read(&dirty).unwrap() == h,
        "a read-only open changed a dirty image"
    );

    let corrupt = d.path().join("corrupt.qcow2");
    fs::copy(dir.join("v3.qcow2"), &corrupt).unwrap();
    edit_header(&corrupt, |h| h.incompatible_features |= 2);
    let o = chainfs(&["export", p(&corrupt), p(&d.path().join("c.raw"))]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("corrupt"), "a warning: {}", text(&o));
    let (c, problems) = check(&corrupt);
    assert_ne!(c, 0, "check reports the corrupt bit");
    assert!(
        problems.iter().any(|m| m.contains("corrupt")),
        "{problems:?}"
    );
}

#[test]
fn a_broken_table_is_an_error_naming_file_and_offset() {
    let Some(dir) = fixtures() else { return };
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("broken.qcow2");
    fs::copy(dir.join("v3.qcow2"), &img).unwrap();
    let b = fs::read(&img).unwrap();
    let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap());
    // L1 entry 0 pointing at a misaligned L2 table.
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&0x8000_0000_0001_0200u64.to_be_bytes(), l1)
        .unwrap();
    let o = chainfs(&["export", p(&img), p(&d.path().join("x.raw"))]);
    assert_eq!(code(&o), EXIT_CORRUPT, "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("broken.qcow2") && t.contains(&format!("{l1:#x}")) && t.contains("L2"),
        "{t}"
    );
}

#[test]
fn a_read_only_mount_shows_the_chain_as_qemu_reads_it() {
    if !require_fuse() {
        return;
    }
    let Some(dir) = fixtures() else { return };
    let pinned =
        hashes(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qcow2/expected.sha256"));
    let d = tempfile::tempdir().unwrap();
    for name in [
        "chain-top.qcow2",
        "zstd.qcow2",
        "ext-l2.qcow2",
        "over-raw.qcow2",
    ] {
        let before = sha256_file(&dir.join(name));
        let mnt = d.path().join("mnt");
        {
            let _m = mount(&dir.join(name), &mnt, &[]);
            let want = &pinned.iter().find(|(n, _)| n == name).unwrap().1;
            assert_eq!(&sha256_file(&mnt.join("disk.raw")), want, "{name} mounted");
        }
        assert_eq!(
            sha256_file(&dir.join(name)),
            before,
            "{name} changed by a ro mount"
        );
    }
}

/// `qemu-img info --output=json IMG` from `/`.
fn qemu_info(img: &Path) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", p(img)])).unwrap()
}

/// `qemu-img check` finds no errors and no leaks.
fn assert_qemu_clean(img: &Path) {
    let o = Command::new("qemu-img")
        .current_dir(img_dir(img))
        .args(["check", "-U", p(img)])
        .output()
        .unwrap();
    assert!(
        o.status.success() && text(&o).contains("No errors were found"),
        "qemu-img check {}: {}",
        img.display(),
        text(&o)
    );
    assert!(!text(&o).contains("leaked"), "{}", text(&o));
}

#[test]
fn created_images_are_what_qemu_img_create_makes() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let images = d.path().join("images");
    fs::create_dir(&images).unwrap();
    for (name, size, cluster) in [
        ("base.qcow2", "100M", None),
        ("small.qcow2", "64M", Some("512")),
        ("big.qcow2", "2T", Some("2M")),
    ] {
        let img = images.join(name);
        let mut args = vec!["create", p(&img), "--size", size];
        if let Some(c) = cluster {
            args.extend(["--cluster-size", c]);
        }
        chainfs_ok(&args);
        assert_qemu_clean(&img);
        let q = qemu_info(&img);
        assert_eq!(q["format"], "qcow2", "{q}");
        assert_eq!(q["format-specific"]["data"]["compat"], "1.1", "{q}");
        let want_cs = match cluster {
            Some("512") => 512,
            Some(_) => 2 << 20,
            None => 65536,
        };
        assert_eq!(q["cluster-size"], want_cs, "{q}");
        assert_eq!(
            q["virtual-size"].as_u64(),
            Some(info_json(&img)[0]["virtual_size"].as_u64().unwrap()),
            "{q}"
        );
    }
    // A child in another folder over the qcow2 base, and one over a raw
    // base: relative names as `qemu-img create -b` stores them, formats
    // always recorded.
    let raw = images.join("disk.raw");
    fs::write(&raw, Rng(8).bytes(3 << 20)).unwrap();
    let top = d.path().join("top.qcow2");
    let over_raw = images.join("over.qcow2");
    chainfs_ok(&["create", p(&top), "--parent", p(&images.join("base.qcow2"))]);
    chainfs_ok(&["create", p(&over_raw), "--parent", p(&raw)]);
    for (img, backing, format, size) in [
        (&top, "images/base.qcow2", "qcow2", 100u64 << 20),
        (&over_raw, "disk.raw", "raw", 3 << 20),
    ] {
        assert_qemu_clean(img);
        let q = qemu_info(img);
        assert_eq!(q["backing-filename"], backing, "{q}");
        assert_eq!(q["backing-filename-format"], format, "{q}");
        assert_eq!(q["virtual-size"], size, "{q}");
        // qemu writes into what chainfs made; both read the same.
        qemu_io(
            img,
            &["write -P 0x3c 1M 100k".into(), "write -z 0 4k".into()],
        );
        assert_qemu_clean(img);
        assert_reads_like_qemu(img, d.path());
    }
    // --compat 0.10 (version 2) and --extended-l2, bases and children,
    // written by qemu and by chainfs.
    for (name, extra, compat, ext) in [
        ("v2.qcow2", &["--compat", "0.10"][..], "0.10", false),
        ("ext.qcow2", &["--extended-l2"][..], "1.1", true),
    ] {
        let img = images.join(name);
        let mut args = vec!["create", p(&img), "--size", "8M"];
        args.extend_from_slice(extra);
        chainfs_ok(&args);
        let child = images.join(format!("child-{name}"));
        let mut args = vec!["create", p(&child), "--parent", p(&img)];
        args.extend_from_slice(extra);
        chainfs_ok(&args);
        for f in [&img, &child] {
            assert_qemu_clean(f);
            let q = qemu_info(f);
            assert_eq!(q["format-specific"]["data"]["compat"], compat, "{q}");
            assert_eq!(
                q["format-specific"]["data"]["extended-l2"]
                    .as_bool()
                    .unwrap_or(false),
                ext,
                "{q}"
            );
        }
        qemu_io(&img, &["write -P 0x5 0 1M".into()]);
        random_writes_read_back_in_qemu(&child, d.path(), 61, 5);
    }
    let o = chainfs(&[
        "create",
        p(&d.path().join("bad.qcow2")),
        "--size",
        "1M",
        "--extended-l2",
        "--cluster-size",
        "4K",
    ]);
    assert_eq!(code(&o), 9, "{}", text(&o));
    let o = chainfs(&[
        "create",
        p(&d.path().join("bad.vhd")),
        "--size",
        "1M",
        "--compat",
        "1.1",
    ]);
    assert_eq!(code(&o), 9, "{}", text(&o));
    // Refusals: a raw file takes no qcow2 parent; bad cluster sizes.
    let o = chainfs(&["create", p(&d.path().join("c.raw")), "--parent", p(&top)]);
    assert!(!o.status.success(), "{}", text(&o));
    let o = chainfs(&[
        "create",
        p(&d.path().join("odd.qcow2")),
        "--size",
        "1M",
        "--cluster-size",
        "3000",
    ]);
    assert_eq!(code(&o), 9, "{}", text(&o));
    assert!(!d.path().join("odd.qcow2").exists());
}

/// `qemu-img check` exit status: 0 clean, 3 leaks only, 2 corruption.
fn qemu_check_code(img: &Path) -> (i32, String) {
    let o = Command::new("qemu-img")
        .current_dir(img_dir(img))
        .args(["check", "-U", p(img)])
        .output()
        .unwrap();
    (code(&o), text(&o))
}

/// Random writes of any size and alignment through `chainfs write`, each
/// followed by `qemu-img check` (clean, no leaks); at the end qemu and
/// chainfs both read the model.
fn random_writes_read_back_in_qemu(img: &Path, scratch: &Path, seed: u64, n: usize) {
    let mut model = qemu_flat(img, scratch);
    let size = model.len() as u64;
    let mut rng = Rng(seed);
    let input = scratch.join("input.bin");
    for i in 0..n {
        let off = rng.below(size - 1);
        let len = (1 + rng.below(if i % 3 == 0 { 300_000 } else { 9000 })).min(size - off);
        let data = if i % 4 == 3 {
            vec![0u8; len as usize]
        } else {
            rng.bytes(len as usize)
        };
        chainfs_write_mirrored(img, off, &data, &input, &mut model);
        assert_qemu_clean(img);
    }
    assert_same(
        &qemu_flat(img, scratch),
        &model,
        &format!("{}: qemu reads", img.display()),
    );
    let got = take_export(img, &scratch.join("x.raw")).unwrap();
    assert_same(&got, &model, &format!("{}: chainfs reads", img.display()));
}

#[test]
fn writes_into_every_kind_of_qcow2_leaf_keep_qemu_img_check_clean() {
    let Some(dir) = fixtures() else { return };
    let d = tempfile::tempdir().unwrap();
    for f in fs::read_dir(dir).unwrap() {
        let f = f.unwrap().path();
        fs::copy(&f, d.path().join(f.file_name().unwrap())).unwrap();
    }
    let at = |n: &str| d.path().join(n);
    // A chainfs-made child over a qcow2 base and over a raw base.
    chainfs_ok(&[
        "create",
        p(&at("new-top.qcow2")),
        "--parent",
        p(&at("chain-top.qcow2")),
    ]);
    chainfs_ok(&[
        "create",
        p(&at("new-over-raw.qcow2")),
        "--parent",
        p(&at("raw-base.raw")),
    ]);
    // qemu-made children of each kind over the chain.
    for (name, opts) in [
        ("v2-top.qcow2", "compat=0.10"),
        ("ext-top.qcow2", "extended_l2=on"),
        ("c512-top.qcow2", "cluster_size=512"),
    ] {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            "-b",
            p(&at("chain-top.qcow2")),
            "-F",
            "qcow2",
            p(&at(name)),
        ]);
    }
    let mut seed = 100;
    for name in [
        "new-top.qcow2",
        "new-over-raw.qcow2",
        "v2-top.qcow2",
        "ext-top.qcow2",
        "c512-top.qcow2",
        // Bases with compressed clusters, zero clusters, preallocation,
        // an external data file, 2 MiB clusters, lazy refcounts.
        "zlib.qcow2",
        "zstd.qcow2",
        "v3.qcow2",
        "prealloc.qcow2",
        "ext-data.qcow2",
        "c2m.qcow2",
        "lazy.qcow2",
    ] {
        seed += 1;
        random_writes_read_back_in_qemu(&at(name), d.path(), seed, 8);
    }
}

#[test]
fn writes_over_an_internal_snapshot_copy_on_write_and_keep_the_snapshot() {
    let Some(dir) = fixtures() else { return };
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("snap.qcow2");
    fs::copy(dir.join("snap.qcow2"), &img).unwrap();
    let snap = |out: &Path| {
        qemu_img(&[
            "convert",
            "-U",
            "-l",
            "snapshot.name=first",
            "-O",
            "raw",
            p(&img),
            p(out),
        ]);
        fs::read(out).unwrap()
    };
    let before = snap(&d.path().join("s1.raw"));
    random_writes_read_back_in_qemu(&img, d.path(), 7, 6);
    assert_same(
        &snap(&d.path().join("s2.raw")),
        &before,
        "the snapshot after writes",
    );
}

#[test]
fn a_writer_killed_at_every_write_and_sync_point_leaves_at_most_leaks() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    let pristine = d.path().join("pristine.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        p(&base),
        "8M",
    ]);
    qemu_io(&base, &["write -P 0x21 0 8M".into()]);
    // A small refcount table, so the crash loop also crosses a table grow.
    chainfs_ok(&[
        "create",
        p(&pristine),
        "--parent",
        p(&base),
        "--cluster-size",
        "512",
    ]);
    let old = qemu_flat(&pristine, d.path());
    let input = d.path().join("in.bin");
    let data = Rng(77).bytes(40_000);
    fs::write(&input, &data).unwrap();
    let off = 12_345u64;
    let mut new = old.clone();
    new[off as usize..off as usize + data.len()].copy_from_slice(&data);
    let leaf = d.path().join("leaf.qcow2");
    let mut k = 1;
    loop {
        fs::copy(&pristine, &leaf).unwrap();
        let o = Command::new(bin())
            .env("CHAINFS_FAULT_AFTER", k.to_string())
            .args([
                "write",
                p(&leaf),
                "--offset",
                &off.to_string(),
                "--input",
                p(&input),
            ])
            .output()
            .unwrap();
        let (c, t) = qemu_check_code(&leaf);
        assert!(c == 0 || c == 3, "fault point {k}: qemu-img check: {t}");
        // chainfs check agrees: leaks exactly when qemu finds them.
        let (_, problems) = check(&leaf);
        let leaks = problems.iter().filter(|m| m.contains("leaked")).count();
        assert_eq!(
            (leaks, problems.len()),
            (usize::from(c == 3), usize::from(c == 3)),
            "fault point {k}: chainfs check {problems:?} vs qemu-img check {t}"
        );
        let got = qemu_flat(&leaf, d.path());
        for (i, s) in got.chunks(512).enumerate() {
            let r = i * 512..(i + 1) * 512;
            assert!(
                s == &old[r.clone()] || s == &new[r],
                "fault point {k}: sector {i} is neither old nor new"
            );
        }
        if code(&o) == 0 {
            assert_same(&got, &new, "the write that finished");
            assert_eq!(c, 0, "a finished write leaves no leaks: {t}");
            break;
        }
        assert_eq!(code(&o), FAULT_EXIT, "fault point {k}: {}", text(&o));
        k += 1;
        assert!(k < 20_000, "the write never finished");
    }
    assert!(k > 30, "only {k} fault points");
}

#[test]
fn a_writable_mount_holds_an_ext4_that_qemu_reads_and_checks_clean() {
    if !require_fuse() || !require_loop() || !require("mkfs.ext4", have("mkfs.ext4")) {
        return;
    }
    let Some(dir) = fixtures() else { return };
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "64M"]);
    qemu_io(&base, &["write -P 0x5e 0 64M".into()]);
    let top = d.path().join("top.qcow2");
    chainfs_ok(&["create", p(&top), "--parent", p(&base)]);
    let ext = d.path().join("ext.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-b",
        p(&base),
        "-F",
        "qcow2",
        p(&ext),
    ]);
    let _ = dir;
    let payload = Rng(31).bytes(3 << 20);
    for img in [&top, &ext] {
        let mnt = d.path().join("mnt");
        let m = mount(img, &mnt, &["-o", "rw"]);
        {
            let lo = LoopGuard::attach(&mnt.join("disk.raw"), false, false);
            run(Command::new("mkfs.ext4").args(["-q", "-F", "-E", "discard", &lo.dev]));
            let fsdir = d.path().join("fs");
            {
                let _k = KernelMount::mount(&lo.dev, &fsdir, "rw,discard");
                fs::write(fsdir.join("a.bin"), &payload).unwrap();
                fs::write(fsdir.join("b.bin"), Rng(32).bytes(1 << 20)).unwrap();
                fs::remove_file(fsdir.join("b.bin")).unwrap();
                run(&mut Command::new("sync"));
                run(Command::new("fstrim").arg(&fsdir));
            }
            drop(lo);
        }
        umount(m);
        assert_qemu_clean(img);
        assert_reads_like_qemu(img, d.path());
        let flat = d.path().join("flat.raw");
        chainfs_ok(&["export", p(img), p(&flat), "--force"]);
        run(Command::new("e2fsck").args(["-fn", p(&flat)]));
        let o = Command::new("debugfs")
            .args(["-R", "cat /a.bin", p(&flat)])
            .output()
            .unwrap();
        assert!(
            o.stdout == payload,
            "{}: the file written through the mount",
            img.display()
        );
    }
}

#[test]
fn writes_rebuild_the_refcounts_of_dirty_images_and_clear_autoclear_bits() {
    let Some(dir) = fixtures() else { return };
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("in.bin");
    fs::write(&input, [7u8; 4096]).unwrap();
    // make.sh's dirty image, and a bigger one: qemu-io aborts after
    // writes with lazy refcounts, leaving refcounts behind the tables.
    let big = d.path().join("big-dirty.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on,cluster_size=4096",
        p(&big),
        "8M",
    ]);
    let o = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x51 0 1M",
            "-c",
            "write -P 0x52 3M 300k",
            "-c",
            "abort",
        ])
        .arg(&big)
        .output()
        .unwrap();
    assert!(!o.status.success(), "qemu-io aborts");
    let dirty = d.path().join("dirty.qcow2");
    fs::copy(dir.join("dirty.qcow2"), &dirty).unwrap();
    for img in [&dirty, &big] {
        let incompat = |f: &Path| fs::read(f).unwrap()[79] & 1;
        assert_eq!(incompat(img), 1, "{}: dirty", img.display());
        let (c, t) = qemu_check_code(img);
        assert_eq!(
            c,
            2,
            "{}: refcounts lag before the rebuild: {t}",
            img.display()
        );
        let mut want = qemu_flat(img, d.path());
        chainfs_ok(&["write", p(img), "--offset", "1000000", "--input", p(&input)]);
        want[1_000_000..1_004_096].fill(7);
        assert_eq!(
            incompat(img),
            0,
            "{}: the dirty bit is cleared",
            img.display()
        );
        assert_qemu_clean(img);
        assert_same(
            &qemu_flat(img, d.path()),
            &want,
            &format!("{}", img.display()),
        );
    }

    // Persistent bitmaps chainfs does not maintain: autoclear bit 0 is
    // cleared on the first write, so qemu knows they are stale (it then
    // reports their clusters as leaks, never as corruption).
    let bm = d.path().join("bm.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&bm), "4M"]);
    qemu_img(&["bitmap", "--add", p(&bm), "b0"]);
    let autoclear = |f: &Path| u64::from_be_bytes(fs::read(f).unwrap()[88..96].try_into().unwrap());
    assert_eq!(autoclear(&bm) & 1, 1);
    chainfs_ok(&["write", p(&bm), "--offset", "70000", "--input", p(&input)]);
    assert_eq!(autoclear(&bm) & 1, 0, "the bitmaps bit is cleared");
    let (c, t) = qemu_check_code(&bm);
    assert!(c == 0 || c == 3, "{t}");
    let flat = qemu_flat(&bm, d.path());
    assert_same(&flat[70000..74096], &[7u8; 4096], "the write");
}

/// base (qcow2 or raw) <- mid.qcow2 <- top.qcow2 in `dir`, made by qemu
/// (mid's backing name `base_name`, relative); returns what qemu reads.
fn qemu_chain(dir: &Path, base_name: &str, scratch: &Path) -> Vec<u8> {
    let base = dir.join(base_name);
    let (fmt, mid, top) = (
        if base_name.ends_with(".raw") {
            "raw"
        } else {
            "qcow2"
        },
        dir.join("mid.qcow2"),
        dir.join("top.qcow2"),
    );
    if fmt == "raw" {
        fs::write(&base, Rng(41).bytes(8 << 20)).unwrap();
    } else {
        qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "8M"]);
        qemu_io(&base, &["write -P 0x11 0 8M".into()]);
    }
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base_name,
        "-F",
        fmt,
        p(&mid),
    ]);
    qemu_io(
        &mid,
        &[
            "write -P 0x22 1M 100k".into(),
            "write -z 3M 64k".into(),
            "write -P 0x23 5000 3000".into(),
        ],
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        p(&top),
    ]);
    qemu_io(
        &top,
        &["write -P 0x33 1050k 10k".into(), "write -z 6M 128k".into()],
    );
    qemu_flat(&top, scratch)
}

#[test]
fn offline_merges_of_qcow2_chains_read_the_same_in_qemu() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for (case, base, source) in [
        ("into-parent", "base.qcow2", "mid.qcow2"),
        ("into-ancestor", "base.qcow2", "top.qcow2"),
        ("into-raw", "base.raw", "mid.qcow2"),
        ("leaf-into-raw", "base.raw", "top.qcow2"),
    ] {
        let dir = d.path().join(case);
        fs::create_dir(&dir).unwrap();
        let before = qemu_chain(&dir, base, d.path());
        chainfs_ok(&["merge", p(&dir.join(source)), p(&dir.join(base))]);
        assert!(!dir.join(source).exists(), "{case}: {source} deleted");
        let leaf = if source == "top.qcow2" {
            dir.join(base)
        } else {
            dir.join("top.qcow2")
        };
        if leaf.extension().unwrap() == "qcow2" {
            assert_qemu_clean(&leaf);
        }
        if base.ends_with(".qcow2") {
            assert_qemu_clean(&dir.join(base));
        }
        if leaf == dir.join("top.qcow2") {
            let q = qemu_info(&leaf);
            assert_eq!(q["backing-filename"], base, "{case}: {q}");
            let fmt = if base.ends_with(".raw") {
                "raw"
            } else {
                "qcow2"
            };
            assert_eq!(q["backing-filename-format"], fmt, "{case}: {q}");
        }
        let after = if leaf.extension().unwrap() == "raw" {
            fs::read(&leaf).unwrap()
        } else {
            qemu_flat(&leaf, d.path())
        };
        assert_same(
            &after,
            &before,
            &format!("{case}: qemu reads the merged chain"),
        );
        assert_reads_like_qemu(&leaf, d.path());
    }
}

#[test]
fn a_kept_merge_source_is_detached_for_qemu_and_chainfs() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let before = qemu_chain(d.path(), "base.qcow2", d.path());
    let mid = d.path().join("mid.qcow2");
    chainfs_ok(&["merge", p(&mid), p(&d.path().join("base.qcow2")), "--keep"]);
    assert!(mid.exists(), "--keep keeps the source");
    // Its own structure is clean (checked without its backing file).
    let alone = format!(
        r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{}"}}}}"#,
        mid.display()
    );
    let o = Command::new("qemu-img")
        .args(["check", &alone])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = Command::new("qemu-img")
        .current_dir("/")
        .args(["convert", "-O", "raw", p(&mid), p(&d.path().join("m.raw"))])
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "qemu opened a detached image as a chain"
    );
    let o = chainfs(&["export", p(&mid), p(&d.path().join("m.raw"))]);
    assert_eq!(code(&o), 5, "{}", text(&o));
    assert!(
        text(&o).contains("mid.qcow2") && text(&o).contains("detached"),
        "{}",
        text(&o)
    );
    let top = d.path().join("top.qcow2");
    assert_eq!(qemu_info(&top)["backing-filename"], "base.qcow2");
    assert_same(
        &qemu_flat(&top, d.path()),
        &before,
        "the chain after the merge",
    );
}

#[test]
fn online_merges_keep_the_mounted_view_identical() {
    if !require_fuse() || !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for (case, base) in [("qcow2", "base.qcow2"), ("raw", "base.raw")] {
        let dir = d.path().join(case);
        fs::create_dir(&dir).unwrap();
        let before = qemu_chain(&dir, base, d.path());
        let mnt = dir.join("mnt");
        let m = mount(&dir.join("top.qcow2"), &mnt, &["-o", "rw"]);
        let flat = mnt.join("disk.raw");
        assert_eq!(sha256_file(&flat), sha256(&before), "{case}: mounted");
        for cmd in [
            format!("merge mid.qcow2 {base}"),
            format!("merge top.qcow2 {base}"),
        ] {
            let o = Command::new("bash")
                .arg("-c")
                .arg(r#"exec 3<>"$1/control"; echo "$2" >&3; cat <&3"#)
                .arg("bash")
                .arg(&mnt)
                .arg(&cmd)
                .output()
                .unwrap();
            let t = text(&o);
            assert!(t.contains("ReturnValue=4096"), "{case}: {cmd}: {t}");
            let job = t
                .lines()
                .find_map(|l| l.strip_prefix("Job="))
                .unwrap()
                .to_string();
            wait_for(&format!("{case}: {cmd}"), || {
                fs::read_to_string(mnt.join(&job))
                    .unwrap()
                    .contains("JobState=7")
            });
            assert_eq!(sha256_file(&flat), sha256(&before), "{case}: after {cmd}");
        }
        // The base is the leaf now: a write lands in it.
        let f = fs::OpenOptions::new().write(true).open(&flat).unwrap();
        f.write_all_at(&[0xeeu8; 3000], 777).unwrap();
        f.sync_all().unwrap();
        drop(f);
        umount(m);
        let mut want = before.clone();
        want[777..3777].fill(0xee);
        let b = dir.join(base);
        let got = if case == "raw" {
            fs::read(&b).unwrap()
        } else {
            assert_qemu_clean(&b);
            qemu_flat(&b, d.path())
        };
        assert_same(&got, &want, &format!("{case}: the base after the merges"));
        assert!(!dir.join("mid.qcow2").exists() && !dir.join("top.qcow2").exists());
    }
}

#[test]
fn a_merge_into_an_image_with_internal_snapshots_is_refused() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    let top = d.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "4M"]);
    qemu_io(&base, &["write -P 0x11 0 1M".into()]);
    qemu_img(&["snapshot", "-c", "s1", p(&base)]);
    chainfs_ok(&["create", p(&top), "--parent", p(&base)]);
    let input = d.path().join("in.bin");
    chainfs_write(&top, 4096, &[9u8; 8192], &input);
    let (hb, ht) = (sha256_file(&base), sha256_file(&top));
    let o = chainfs(&["merge", p(&top), p(&base)]);
    assert_eq!(code(&o), 10, "invalid state: {}", text(&o));
    assert!(
        text(&o).contains("base.qcow2") && text(&o).contains("snapshot"),
        "{}",
        text(&o)
    );
    assert_eq!(
        (sha256_file(&base), sha256_file(&top)),
        (hb, ht),
        "nothing changed"
    );
}

/// A merge into a middle layer whose clusters are larger than the
/// source's pieces: DESTINATION fills the rest of each cluster from the
/// layers below it.
#[test]
fn a_merge_into_a_middle_layer_with_larger_clusters_fills_from_below() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let at = |n: &str| d.path().join(n);
    qemu_img(&["create", "-q", "-f", "qcow2", p(&at("base.qcow2")), "8M"]);
    qemu_io(&at("base.qcow2"), &["write -P 0x11 0 8M".into()]);
    for (name, parent, opts) in [
        ("mid.qcow2", "base.qcow2", "cluster_size=2M"),
        ("top.qcow2", "mid.qcow2", "extended_l2=on"),
        ("leaf.qcow2", "top.qcow2", "cluster_size=65536"),
    ] {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            "-b",
            parent,
            "-F",
            "qcow2",
            p(&at(name)),
        ]);
    }
    qemu_io(&at("mid.qcow2"), &["write -P 0x22 2M 4k".into()]);
    qemu_io(
        &at("top.qcow2"),
        &[
            "write -P 0x33 6k 2k".into(),
            "write -P 0x34 2100k 10k".into(),
            "write -z 5M 2k".into(),
        ],
    );
    qemu_io(&at("leaf.qcow2"), &["write -P 0x44 7M 64k".into()]);
    let before = qemu_flat(&at("leaf.qcow2"), d.path());
    chainfs_ok(&["merge", p(&at("top.qcow2")), p(&at("mid.qcow2"))]);
    assert!(!at("top.qcow2").exists());
    assert_qemu_clean(&at("mid.qcow2"));
    assert_eq!(
        qemu_info(&at("leaf.qcow2"))["backing-filename"],
        "mid.qcow2"
    );
    assert_same(
        &qemu_flat(&at("leaf.qcow2"), d.path()),
        &before,
        "after the merge",
    );
    assert_reads_like_qemu(&at("leaf.qcow2"), d.path());
}

#[test]
fn a_merge_across_layers_of_different_sizes_is_refused() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (base, top) = (d.path().join("base.qcow2"), d.path().join("top.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "2M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p(&top),
        "4M",
    ]);
    qemu_io(&top, &["write -P 0x12 3M 64k".into()]);
    let o = chainfs(&["merge", p(&top), p(&base)]);
    assert_eq!(code(&o), EXIT_UNSUPPORTED, "{}", text(&o));
    assert!(
        text(&o).contains("top.qcow2") && text(&o).contains("size"),
        "{}",
        text(&o)
    );
    assert!(top.exists());
    assert_reads_like_qemu(&top, d.path());
}

/// A merge killed at every write and sync point (`CHAINFS_FAULT_AFTER`):
/// qemu reads the chain as before, every image checks clean or with leaks
/// only, and rerunning the merge completes it.
#[test]
fn a_merge_killed_at_every_point_reruns_to_the_same_chain() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for base in ["base.qcow2", "base.raw"] {
        let pristine = d.path().join(format!("pristine-{base}"));
        fs::create_dir(&pristine).unwrap();
        let before = qemu_chain(&pristine, base, d.path());
        let mut k = 1;
        loop {
            let dir = d.path().join(format!("run-{base}"));
            if dir.exists() {
                fs::remove_dir_all(&dir).unwrap();
            }
            copy_dir(&pristine, &dir);
            let (mid, dst, top) = (dir.join("mid.qcow2"), dir.join(base), dir.join("top.qcow2"));
            let o = Command::new(bin())
                .env("CHAINFS_FAULT_AFTER", k.to_string())
                .args(["merge", p(&mid), p(&dst)])
                .output()
                .unwrap();
            let done = code(&o) == 0;
            assert!(
                done || code(&o) == FAULT_EXIT,
                "{base} point {k}: {}",
                text(&o)
            );
            assert_same(
                &qemu_flat(&top, d.path()),
                &before,
                &format!("{base} point {k}: qemu reads top"),
            );
            for img in [&top, &dst, &mid] {
                if img.exists() && img.extension().unwrap() == "qcow2" {
                    let (c, t) = qemu_check_code(img);
                    assert!(c == 0 || c == 3, "{base} point {k}: {}: {t}", img.display());
                }
            }
            if done {
                break;
            }
            if mid.exists() {
                chainfs_ok(&["merge", p(&mid), p(&dst)]);
            }
            assert!(!mid.exists(), "{base} point {k}: the rerun deletes mid");
            assert_eq!(
                qemu_info(&top)["backing-filename"],
                base,
                "{base} point {k}"
            );
            assert_same(
                &qemu_flat(&top, d.path()),
                &before,
                &format!("{base} point {k}: after the rerun"),
            );
            k += 1;
            assert!(k < 2000, "the merge never finished");
        }
        assert!(k > 10, "{base}: only {k} fault points");
    }
}
