//! Files that are not VHD or VHDX, made by the tools users make them with
//! (`qemu-img create`, `mkfs.ext4`, `mkswap`), get an error that says what
//! the file is and what chainfs does with it, with exit code 6
//! (unsupported), from `info`, `info --json`, `check`, `check --json` and
//! `export`. `check --json` prints its JSON object on such a failure too.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{chainfs, chainfs_ok, code, have, info_json, require, sha256_file, text};
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

fn qemu_img(args: &[&str]) {
    let o = Command::new("/usr/bin/qemu-img")
        .args(args)
        .current_dir("/")
        .output()
        .expect("qemu-img");
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn qemu_create(dir: &Path, name: &str, fmt: &str, extra: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-q", "-f", fmt];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[p.to_str().unwrap(), "16M"]);
    qemu_img(&args);
    p
}

/// Every read-only command fails with exit 6 and names the file and each
/// of `needles`.
fn assert_refused(img: &Path, needles: &[&str]) {
    let s = img.to_str().unwrap();
    let out = img.with_extension("exported.raw");
    let o_out = out.to_str().unwrap();
    let runs: [&[&str]; 5] = [
        &["info", s],
        &["info", "--json", s],
        &["check", s],
        &["check", "--json", s],
        &["export", s, o_out],
    ];
    for args in runs {
        let o = chainfs(args);
        let t = text(&o);
        assert_eq!(code(&o), 6, "chainfs {args:?}: {t}");
        assert!(!t.contains("panicked"), "{t}");
        assert!(
            t.contains(s),
            "chainfs {args:?} does not name the file: {t}"
        );
        for n in needles {
            assert!(t.contains(n), "chainfs {args:?} does not say {n:?}: {t}");
        }
        assert!(!t.contains("no VHD footer"), "the old vague message: {t}");
    }
    assert!(!out.exists(), "export of a foreign file left an output");
}

#[test]
fn qcow_v1_is_named_with_a_conversion_and_qcow2_opens() {
    if !require("qemu-img", have("/usr/bin/qemu-img")) {
        return;
    }
    let d = TempDir::new().unwrap();
    let v1 = qemu_create(d.path(), "old.qcow", "qcow", &[]);
    assert_refused(
        &v1,
        &[
            "a qcow image (version 1)",
            "VHD, VHDX, qcow2 (versions 2 and 3) and raw images",
            "qemu-img convert -O vhdx",
        ],
    );
    // qcow2 has its own driver (tests/qcow2.rs): both versions open.
    for (name, extra) in [
        ("x.qcow2", &[][..]),
        ("old.qcow2", &["-o", "compat=0.10"][..]),
    ] {
        let img = qemu_create(d.path(), name, "qcow2", extra);
        assert_eq!(info_json(&img)[0]["format"], "qcow2", "{name}");
    }
}

#[test]
fn vmdk_and_vdi_are_named() {
    if !require("qemu-img", have("/usr/bin/qemu-img")) {
        return;
    }
    let d = TempDir::new().unwrap();
    let vmdk = qemu_create(d.path(), "x.vmdk", "vmdk", &[]);
    assert_refused(
        &vmdk,
        &["a VMDK sparse extent (version 1)", "qemu-img convert"],
    );
    // A split VMDK: the named file is the text descriptor.
    let desc = qemu_create(
        d.path(),
        "split.vmdk",
        "vmdk",
        &["-o", "subformat=twoGbMaxExtentSparse"],
    );
    assert_refused(&desc, &["a VMDK descriptor"]);
    let vdi = qemu_create(d.path(), "x.vdi", "vdi", &[]);
    assert_refused(&vdi, &["a VirtualBox VDI image", "qemu-img convert"]);
}

#[test]
fn luks_is_named() {
    if !require("qemu-img", have("/usr/bin/qemu-img")) {
        return;
    }
    let d = TempDir::new().unwrap();
    let luks = qemu_create(
        d.path(),
        "x.luks",
        "luks",
        &[
            "--object",
            "secret,id=s0,data=x",
            "-o",
            "key-secret=s0,iter-time=10",
        ],
    );
    assert_refused(&luks, &["a LUKS1 encrypted volume", "cryptsetup"]);
}

/// Raw disks (a file system, swap or a partition table at the start) are
/// read by the raw driver whatever they are named: `info` says raw and
/// `export` gives the file's bytes back.
fn assert_raw(img: &Path) {
    let s = img.to_str().unwrap();
    let j: serde_json::Value = serde_json::from_str(&chainfs_ok(&["info", "--json", s])).unwrap();
    assert_eq!(j[0]["format"], "raw", "{}: {j}", img.display());
    let out = img.with_extension("exported.raw");
    chainfs_ok(&["export", s, out.to_str().unwrap()]);
    assert_eq!(sha256_file(&out), sha256_file(img), "{}", img.display());
}

#[test]
fn raw_ext4_swap_and_mbr_open_as_raw_disks() {
    let d = TempDir::new().unwrap();
    if require("mkfs.ext4", have("mkfs.ext4")) {
        let ext4 = d.path().join("fs.ext4");
        std::fs::File::create(&ext4)
            .unwrap()
            .set_len(16 * MIB)
            .unwrap();
        let o = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&ext4)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_raw(&ext4);
    }
    if require("mkswap", have("mkswap")) {
        let swap = d.path().join("swap.part");
        std::fs::File::create(&swap)
            .unwrap()
            .set_len(16 * MIB)
            .unwrap();
        let o = Command::new("mkswap").arg(&swap).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_raw(&swap);
    }
    // The MBR is written by hand, one Linux partition from sector 2048 to
    // the end, as sfdisk would.
    let mbr = d.path().join("disk.bin");
    let mut b = vec![0u8; (16 * MIB) as usize];
    let e = &mut b[446..462];
    e[4] = 0x83;
    e[8..12].copy_from_slice(&2048u32.to_le_bytes());
    e[12..16].copy_from_slice(&((16 * MIB / 512) as u32 - 2048).to_le_bytes());
    b[510] = 0x55;
    b[511] = 0xaa;
    std::fs::write(&mbr, &b).unwrap();
    assert_raw(&mbr);
}

#[test]
fn unknown_bytes_keep_the_cookie_message() {
    let d = TempDir::new().unwrap();
    let junk = d.path().join("junk.bin");
    std::fs::write(&junk, vec![0x5a; 4096]).unwrap();
    let o = chainfs(&["info", junk.to_str().unwrap()]);
    assert_eq!(code(&o), 6, "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("conectix") && t.contains("vhdxfile"), "{t}");
    let empty = d.path().join("empty.vhd");
    std::fs::write(&empty, b"").unwrap();
    let o = chainfs(&["info", empty.to_str().unwrap()]);
    assert_eq!(code(&o), 6, "{}", text(&o));
    assert!(text(&o).contains("an empty file"), "{}", text(&o));
}

#[test]
fn check_json_reports_a_failure_as_json() {
    let d = TempDir::new().unwrap();
    // A file that cannot be opened as a chain at all: exit 6.
    let junk = d.path().join("junk.vhd");
    std::fs::write(&junk, vec![0x5a; 4096]).unwrap();
    // And one that does not exist: exit 4.
    let gone = d.path().join("gone.vhd");
    for (img, want) in [(&junk, 6), (&gone, 4)] {
        let o = chainfs(&["check", "--json", img.to_str().unwrap()]);
        assert_eq!(code(&o), want, "{}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", text(&o)));
        assert_eq!(v["image"], img.to_str().unwrap());
        assert_eq!(v["clean"], false);
        assert_eq!(v["problems"], serde_json::json!([]));
        assert_eq!(v["error"]["exit_code"], want);
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(img.to_str().unwrap()), "{msg}");
        // The message still reaches a human on stderr.
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(msg),
            "{}",
            text(&o)
        );
    }
}
