//! Parents are protected from writes (issue 15, defect 3), and `write`
//! keeps zeros sparse (defect 4).
//!
//! A layer that has children (files in its folder or in a `--parent-dir`
//! folder whose parent link names it) is refused by `chainfs write` and
//! `chainfs mount -o rw`, with exit 10 and a message naming a child; the
//! files stay byte-identical. `--force` / `-o force` override.
//!
//! `chainfs write` does not allocate input runs that are zero where the
//! chain already reads zero (`--no-sparse` does), still writes zeros over
//! data, and streams its input instead of holding it in memory.

mod common;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

const M: u64 = 1 << 20;

/// A base of `size` with a little data in it (so writes have something to
/// change), in `dir`, named `base.EXT`.
fn base(dir: &Path, ext: &str, size: &str) -> PathBuf {
    let b = dir.join(format!("base.{ext}"));
    chainfs_ok(&["create", p(&b), "--size", size, "--block-size", "2M"]);
    chainfs_write(&b, 4096, &[0xAB; 8192], &dir.join("chunk"));
    b
}

/// The child's extension for a format.
fn child_ext(ext: &str) -> &'static str {
    if ext == "vhd" {
        "avhd"
    } else {
        "avhdx"
    }
}

/// Hashes of every file given, to show nothing changed.
fn hashes(files: &[&Path]) -> Vec<String> {
    files.iter().map(|f| sha256_file(f)).collect()
}

/// `write` into a layer with a child next to it is refused with exit 10,
/// naming the child; nothing changes; `--force` then writes.
fn write_refused(ext: &str, child_elsewhere: bool) {
    let t = tempfile::tempdir().unwrap();
    let b = base(t.path(), ext, "16M");
    let cdir = if child_elsewhere {
        let d = t.path().join("kids");
        std::fs::create_dir(&d).unwrap();
        d
    } else {
        t.path().to_path_buf()
    };
    let child = cdir.join(format!("s1.{}", child_ext(ext)));
    chainfs_ok(&["create", p(&child), "--parent", p(&b)]);
    let input = t.path().join("input");
    std::fs::write(&input, [0x77u8; 65536]).unwrap();
    let before = hashes(&[&b, &child]);
    let mut args = vec!["write", p(&b), "--offset", "1M", "--input", p(&input)];
    if child_elsewhere {
        args.extend_from_slice(&["--parent-dir", p(&cdir)]);
    }
    let o = chainfs(&args);
    assert_eq!(code(&o), 10, "write into a parent: {}", text(&o));
    let msg = text(&o);
    assert!(
        msg.contains(&format!("s1.{}", child_ext(ext))) && msg.contains("--force"),
        "the refusal names the child and --force: {msg}"
    );
    assert_eq!(
        hashes(&[&b, &child]),
        before,
        "a refused write changed a file"
    );
    // With --force the write happens (and the docs say what it breaks).
    args.push("--force");
    chainfs_ok(&args);
    let out = t.path().join("out.raw");
    chainfs_ok(&["export", p(&b), p(&out)]);
    let got = std::fs::read(&out).unwrap();
    assert!(got[M as usize..M as usize + 65536]
        .iter()
        .all(|&x| x == 0x77));
}

#[test]
fn write_into_a_vhd_parent_with_a_child_in_its_folder_is_refused() {
    write_refused("vhd", false);
}

#[test]
fn write_into_a_vhdx_parent_with_a_child_in_its_folder_is_refused() {
    write_refused("vhdx", false);
}

#[test]
fn write_into_a_vhd_parent_with_a_child_in_a_parent_dir_is_refused() {
    write_refused("vhd", true);
}

#[test]
fn write_into_a_vhdx_parent_with_a_child_in_a_parent_dir_is_refused() {
    write_refused("vhdx", true);
}

#[test]
fn write_into_a_leaf_with_unrelated_images_around_is_allowed() {
    // Siblings and the layer's own parent are not its children.
    let t = tempfile::tempdir().unwrap();
    let b = base(t.path(), "vhdx", "16M");
    let a = t.path().join("a.avhdx");
    let c = t.path().join("c.avhdx");
    chainfs_ok(&["create", p(&a), "--parent", p(&b)]);
    chainfs_ok(&["create", p(&c), "--parent", p(&b)]);
    chainfs_write(&a, 0, &[1u8; 4096], &t.path().join("chunk"));
    chainfs_ok(&["check", p(&c)]);
}

/// `mount -o rw` of a layer with a child is refused (exit 10, the child
/// named, nothing changed); `-o rw,force` mounts.
fn mount_refused(ext: &str, child_elsewhere: bool) {
    if !require_fuse() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let b = base(t.path(), ext, "16M");
    let mid = t.path().join(format!("mid.{}", child_ext(ext)));
    chainfs_ok(&["create", p(&mid), "--parent", p(&b)]);
    let cdir = if child_elsewhere {
        let d = t.path().join("kids");
        std::fs::create_dir(&d).unwrap();
        d
    } else {
        t.path().to_path_buf()
    };
    let child = cdir.join(format!("s1.{}", child_ext(ext)));
    chainfs_ok(&["create", p(&child), "--parent", p(&mid)]);
    let before = hashes(&[&b, &mid, &child]);
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut args = vec!["mount", p(&mid), p(&mnt)];
    if child_elsewhere {
        args.extend_from_slice(&["--parent-dir", p(&cdir)]);
    }
    let g = MountGuard::new(&mnt);
    let o = chainfs(&[&args[..], &["-o", "rw"]].concat());
    assert_eq!(code(&o), 10, "mount -o rw of a parent: {}", text(&o));
    assert!(!is_mounted(&mnt));
    let msg = text(&o);
    assert!(
        msg.contains(&format!("s1.{}", child_ext(ext))) && msg.contains("-o rw,force"),
        "the refusal names the child and the force option: {msg}"
    );
    assert_eq!(hashes(&[&b, &mid, &child]), before);
    // Read-only mounts stay allowed.
    chainfs_ok(&args);
    assert!(is_mounted(&mnt));
    chainfs_ok(&["umount", p(&mnt)]);
    // Forced, it mounts writable.
    chainfs_ok(&[&args[..], &["-o", "rw,force"]].concat());
    std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("disk.raw"))
        .expect("disk.raw opens for writing under -o rw,force");
    chainfs_ok(&["umount", p(&mnt)]);
    drop(g);
}

#[test]
fn mount_rw_of_a_vhd_parent_with_a_child_in_its_folder_is_refused() {
    mount_refused("vhd", false);
}

#[test]
fn mount_rw_of_a_vhdx_parent_with_a_child_in_its_folder_is_refused() {
    mount_refused("vhdx", false);
}

#[test]
fn mount_rw_of_a_vhd_parent_with_a_child_in_a_parent_dir_is_refused() {
    mount_refused("vhd", true);
}

#[test]
fn mount_rw_of_a_vhdx_parent_with_a_child_in_a_parent_dir_is_refused() {
    mount_refused("vhdx", true);
}

/// Bytes the file system gives `f` (allocated, not its length).
fn allocated(f: &Path) -> u64 {
    std::fs::metadata(f).unwrap().blocks() * 512
}

/// A 256 MiB sparse file with a fresh ext4 on it (a few MiB of data).
fn ext4_image(dir: &Path) -> PathBuf {
    let raw = dir.join("fs.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(256 * M)
        .unwrap();
    let o = Command::new("/usr/sbin/mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=1,nodiscard"])
        .arg(&raw)
        .current_dir("/")
        .output()
        .expect("mkfs.ext4");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    raw
}

fn sparse_write(ext: &str) {
    if !require("mkfs.ext4", have("mkfs.ext4")) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let raw = ext4_image(t.path());
    let data_on_disk = allocated(&raw);
    assert!(data_on_disk < 16 * M, "mkfs wrote {data_on_disk} bytes");
    let want = sha256_file(&raw);
    let img = t.path().join(format!("base.{ext}"));
    chainfs_ok(&["create", p(&img), "--size", "256M", "--block-size", "2M"]);
    chainfs_ok(&["write", p(&img), "--offset", "0", "--input", p(&raw)]);
    let got = allocated(&img);
    assert!(
        got < 32 * M,
        "{ext}: an ext4 with {data_on_disk} bytes of data made the image hold {got} bytes"
    );
    let out = t.path().join("out.raw");
    chainfs_ok(&["export", p(&img), p(&out)]);
    assert_eq!(
        sha256_file(&out),
        want,
        "{ext}: content differs from the input"
    );
    // --no-sparse stores every byte.
    let full = t.path().join(format!("full.{ext}"));
    chainfs_ok(&["create", p(&full), "--size", "256M", "--block-size", "2M"]);
    chainfs_ok(&[
        "write",
        p(&full),
        "--offset",
        "0",
        "--input",
        p(&raw),
        "--no-sparse",
    ]);
    assert!(
        allocated(&full) >= 256 * M,
        "{ext}: --no-sparse left {} bytes allocated",
        allocated(&full)
    );
    std::fs::remove_file(&out).unwrap();
    chainfs_ok(&["export", p(&full), p(&out)]);
    assert_eq!(sha256_file(&out), want);
}

#[test]
fn write_of_a_mostly_empty_ext4_into_a_vhd_stays_sparse() {
    sparse_write("vhd");
}

#[test]
fn write_of_a_mostly_empty_ext4_into_a_vhdx_stays_sparse() {
    sparse_write("vhdx");
}

/// Zeros written where the chain holds data must land: over the parent's
/// data (from a child) and over the layer's own data.
fn zeros_over_data(ext: &str) {
    let t = tempfile::tempdir().unwrap();
    let b = t.path().join(format!("base.{ext}"));
    chainfs_ok(&["create", p(&b), "--size", "16M", "--block-size", "2M"]);
    let scratch = t.path().join("chunk");
    chainfs_write(&b, 0, &vec![0xC3; 3 * M as usize], &scratch);
    let child = t.path().join(format!("child.{}", child_ext(ext)));
    chainfs_ok(&["create", p(&child), "--parent", p(&b)]);
    // From the child: zeros over 1 MiB of the parent's data, unaligned.
    chainfs_write(&child, 1000, &vec![0u8; M as usize], &scratch);
    // Into the child's own data, then zeros over part of it.
    chainfs_write(&child, 2 * M, &vec![0x11; 512 * 1024], &scratch);
    chainfs_write(&child, 2 * M + 4096, &vec![0u8; 8192], &scratch);
    let out = t.path().join("out.raw");
    chainfs_ok(&["export", p(&child), p(&out)]);
    let got = std::fs::read(&out).unwrap();
    let mut want = vec![0u8; 16 * M as usize];
    want[..3 * M as usize].fill(0xC3);
    want[1000..1000 + M as usize].fill(0);
    want[2 * M as usize..2 * M as usize + 512 * 1024].fill(0x11);
    want[2 * M as usize + 4096..2 * M as usize + 4096 + 8192].fill(0);
    assert!(got == want, "{ext}: zeros written over data were skipped");
}

#[test]
fn zeros_written_over_vhd_data_read_as_zeros() {
    zeros_over_data("vhd");
}

#[test]
fn zeros_written_over_vhdx_data_read_as_zeros() {
    zeros_over_data("vhdx");
}

/// Peak resident memory of this process's waited-for children, in bytes.
fn children_max_rss() -> u64 {
    // SAFETY: rusage is plain data (integers and timevals), for which
    // all-zero bytes are a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage() writes only into `ru`, a live, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    ru.ru_maxrss as u64 * 1024
}

#[test]
fn write_streams_standard_input_instead_of_holding_it() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("big.vhd");
    chainfs_ok(&["create", p(&img), "--size", "192M"]);
    let mut c = Command::new(bin())
        .args(["write", p(&img), "--offset", "0"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut w = c.stdin.take().unwrap();
        let chunk = vec![0x5Au8; M as usize];
        for _ in 0..192 {
            w.write_all(&chunk).unwrap();
        }
    }
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rss = children_max_rss();
    assert!(
        rss < 96 * M,
        "writing 192 MiB from stdin peaked at {rss} bytes resident"
    );
    let out = t.path().join("out.raw");
    chainfs_ok(&["export", p(&img), p(&out)]);
    let got = std::fs::read(&out).unwrap();
    assert!(got.iter().all(|&b| b == 0x5A));
}
