//! `chainfs export` to every kind of OUTPUT: a block device is written in
//! place (never replaced by a file), a FIFO and standard output get the
//! whole image in order, a symlink is written through, /dev/null is
//! accepted, any other character device is refused. Every content is
//! compared with the sha256 of an export to a regular file, and with a
//! model of the chain's bytes.
//!
//! A file export reads the layers and writes the new file around the page
//! cache when they are cold, and reads what the page cache holds from it.
//!
//! Device nodes are made with mknod in the test's temporary folder (for a
//! block device: the numbers of a loop device the test attaches over its
//! own file), so a wrong export can only ever replace a node of ours.

mod common;

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{
    assert_same, bin, cached_share, chainfs, chainfs_ok, chainfs_write_mirrored, code, evict,
    file_len, have, require, require_direct_io, require_loop, sha256, sha256_file, text, Fmt,
    LoopGuard, Rng, FORMATS,
};
use tempfile::TempDir;

const MIB: u64 = 1 << 20;
/// Five of a stream's 8 MiB chunks, so the order of their writes matters.
const SIZE: u64 = 40 * MIB;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// base <- leaf with data in both, zeros stored over base data in the leaf,
/// and runs nobody wrote; returns the leaf and the model of its flat bytes.
fn chain(d: &Path) -> (PathBuf, Vec<u8>) {
    let base = d.join("base.vhd");
    let leaf = d.join("leaf.vhd");
    let scratch = d.join("scratch");
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = Rng(15);
    chainfs_ok(&["create", s(&base), "--size", "40M"]);
    chainfs_write_mirrored(&base, 0, &rng.bytes(MIB as usize), &scratch, &mut model);
    chainfs_write_mirrored(&base, 3 * MIB + 512, &rng.bytes(4096), &scratch, &mut model);
    chainfs_write_mirrored(
        &base,
        31 * MIB,
        &rng.bytes(2 * MIB as usize),
        &scratch,
        &mut model,
    );
    chainfs_ok(&["create", s(&leaf), "--parent", s(&base)]);
    chainfs_write_mirrored(&leaf, 5 * MIB, &rng.bytes(300_000), &scratch, &mut model);
    chainfs_write_mirrored(
        &leaf,
        16 * MIB - 4096,
        &rng.bytes(MIB as usize),
        &scratch,
        &mut model,
    );
    chainfs_write_mirrored(&leaf, SIZE - 4096, &rng.bytes(4096), &scratch, &mut model);
    // Zeros the leaf stores over the base's data.
    chainfs_write_mirrored(&leaf, 4096, &[0u8; 8192], &scratch, &mut model);
    fs::remove_file(&scratch).unwrap();
    (leaf, model)
}

/// The sha256 of the chain's export to a new regular file.
fn reference(d: &Path, leaf: &Path, model: &[u8]) -> String {
    let out = d.join("ref.raw");
    chainfs_ok(&["export", s(leaf), s(&out)]);
    let sha = sha256_file(&out);
    assert_eq!(sha, sha256(model), "the file export differs from the model");
    fs::remove_file(&out).unwrap();
    sha
}

fn mknod(path: &Path, kind: libc::mode_t, rdev: libc::dev_t) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string; mknod only reads it.
    let r = unsafe { libc::mknod(c.as_ptr(), kind | 0o600, rdev) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// A loop device over a new file of `len` bytes of 0xEE (so that zero runs
/// must be written, not assumed), and a block node for it in `d`.
fn device(d: &Path, len: u64) -> (LoopGuard, PathBuf, PathBuf) {
    let backing = d.join("disk.img");
    fs::write(&backing, vec![0xeeu8; len as usize]).unwrap();
    let lo = LoopGuard::attach(&backing, false, false);
    let node = d.join("disk.dev");
    mknod(&node, libc::S_IFBLK, fs::metadata(&lo.dev).unwrap().rdev());
    (lo, backing, node)
}

fn read_dev(node: &Path) -> Vec<u8> {
    let mut b = Vec::new();
    fs::File::open(node).unwrap().read_to_end(&mut b).unwrap();
    b
}

fn assert_block_node(node: &Path, rdev: u64) {
    let m = fs::symlink_metadata(node).unwrap();
    assert!(
        m.file_type().is_block_device(),
        "{} is no longer a block device: {:?}",
        node.display(),
        m.file_type()
    );
    assert_eq!(m.rdev(), rdev);
}

#[test]
fn block_device_is_written_in_place_and_keeps_its_tail() {
    if !require_loop() {
        return;
    }
    let d = TempDir::new().unwrap();
    let (leaf, model) = chain(d.path());
    let want = reference(d.path(), &leaf, &model);
    let (lo, _backing, node) = device(d.path(), SIZE + 4 * MIB);
    let rdev = fs::metadata(&node).unwrap().rdev();

    // Without --force: refused, nothing written.
    let o = chainfs(&["export", s(&leaf), s(&node)]);
    assert_eq!(code(&o), 9, "{}", text(&o));
    assert!(
        text(&o).contains("block device") && text(&o).contains("--force"),
        "{}",
        text(&o)
    );
    assert!(read_dev(&node).iter().all(|&b| b == 0xee));

    let o = chainfs(&["export", s(&leaf), s(&node), "--force", "--json"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert_block_node(&node, rdev);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["target"], "block_device");
    assert!(v["zeroed"].as_u64().unwrap() > 0, "{v}");
    let got = read_dev(&node);
    assert_eq!(got.len() as u64, SIZE + 4 * MIB);
    assert_eq!(sha256(&got[..SIZE as usize]), want, "device content");
    assert!(
        got[SIZE as usize..].iter().all(|&b| b == 0xee),
        "bytes past the virtual size changed"
    );

    // Through a symlink (as /dev/disk/by-id/... are): the device is
    // written, the link stays a link.
    fs::write(&node, vec![0xeeu8; SIZE as usize]).unwrap();
    let link = d.path().join("by-id-disk");
    std::os::unix::fs::symlink(&node, &link).unwrap();
    chainfs_ok(&["export", s(&leaf), s(&link), "--force"]);
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_block_node(&node, rdev);
    assert_eq!(sha256(&read_dev(&node)[..SIZE as usize]), want);
    drop(lo);
}

#[test]
fn block_device_smaller_than_the_disk_is_refused_untouched() {
    if !require_loop() {
        return;
    }
    let d = TempDir::new().unwrap();
    let (leaf, _model) = chain(d.path());
    let (lo, _backing, node) = device(d.path(), SIZE - MIB);
    let rdev = fs::metadata(&node).unwrap().rdev();
    let o = chainfs(&["export", s(&leaf), s(&node), "--force"]);
    assert_eq!(code(&o), 9, "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains(s(&node))
            && t.contains(&(SIZE - MIB).to_string())
            && t.contains("nothing written"),
        "{t}"
    );
    assert_block_node(&node, rdev);
    assert!(read_dev(&node).iter().all(|&b| b == 0xee), "device written");
    drop(lo);
}

#[test]
fn fifo_gets_the_whole_image_in_order() {
    let d = TempDir::new().unwrap();
    let (leaf, model) = chain(d.path());
    let want = reference(d.path(), &leaf, &model);
    let fifo = d.path().join("pipe");
    mknod(&fifo, libc::S_IFIFO, 0);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let mut b = Vec::new();
            fs::File::open(&fifo).unwrap().read_to_end(&mut b).unwrap();
            b
        })
    };
    let o = chainfs(&["export", s(&leaf), s(&fifo), "--threads", "3"]);
    // Should export have failed without opening the pipe, let the reader go.
    let _ = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo);
    let got = reader.join().unwrap();
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert_eq!(got.len() as u64, SIZE);
    assert_eq!(sha256(&got), want);
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
}

#[test]
fn dash_and_dev_stdout_stream_to_standard_output() {
    let d = TempDir::new().unwrap();
    let (leaf, model) = chain(d.path());
    let want = reference(d.path(), &leaf, &model);
    for out in ["-", "/dev/stdout"] {
        let o = Command::new(bin())
            .args(["export", s(&leaf), out, "--json"])
            .current_dir(d.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(code(&o), 0, "{out}: {}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(o.stdout.len() as u64, SIZE, "{out}");
        assert_eq!(sha256(&o.stdout), want, "{out}");
        // The byte counts go to stderr, out of the image's way.
        let err = String::from_utf8_lossy(&o.stderr);
        let v: serde_json::Value = serde_json::from_str(err.trim()).unwrap();
        assert_eq!(v["target"], "stdout");
        assert_eq!(v["data_written"], SIZE);
        assert!(!d.path().join("-").exists(), "a file named - was written");
    }
}

#[test]
fn symlink_is_written_through_and_stays_a_symlink() {
    let d = TempDir::new().unwrap();
    let (leaf, model) = chain(d.path());
    let want = reference(d.path(), &leaf, &model);
    let sub = d.path().join("sub");
    fs::create_dir(&sub).unwrap();

    // To an existing file: needs --force, replaces the target, keeps the link.
    let target = sub.join("disk.raw");
    fs::write(&target, b"old").unwrap();
    let link = d.path().join("link.raw");
    std::os::unix::fs::symlink("sub/disk.raw", &link).unwrap();
    let o = chainfs(&["export", s(&leaf), s(&link)]);
    assert_eq!(code(&o), 9, "{}", text(&o));
    assert_eq!(fs::read(&target).unwrap(), b"old");
    chainfs_ok(&["export", s(&leaf), s(&link), "--force"]);
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read_link(&link).unwrap(), Path::new("sub/disk.raw"));
    assert_eq!(sha256_file(&target), want);

    // A dangling link: its target is created (its folder exists).
    let dangling = d.path().join("dangling.raw");
    std::os::unix::fs::symlink("sub/new.raw", &dangling).unwrap();
    chainfs_ok(&["export", s(&leaf), s(&dangling)]);
    assert!(fs::symlink_metadata(&dangling)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(sha256_file(&sub.join("new.raw")), want);

    // ... and refused when the target's folder does not exist.
    let nowhere = d.path().join("nowhere.raw");
    std::os::unix::fs::symlink("missing/x.raw", &nowhere).unwrap();
    let o = chainfs(&["export", s(&leaf), s(&nowhere)]);
    assert_eq!(code(&o), 4, "{}", text(&o));
    assert!(text(&o).contains("folder does not exist"), "{}", text(&o));
    assert!(fs::symlink_metadata(&nowhere)
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn other_character_device_is_refused_and_left_alone() {
    let d = TempDir::new().unwrap();
    let (leaf, _model) = chain(d.path());
    // The numbers of /dev/zero.
    let node = d.path().join("zero.dev");
    let rdev = libc::makedev(1, 5);
    mknod(&node, libc::S_IFCHR, rdev);
    for force in [false, true] {
        let mut args = vec!["export", s(&leaf), s(&node)];
        if force {
            args.push("--force");
        }
        let o = chainfs(&args);
        assert_eq!(code(&o), 9, "{}", text(&o));
        assert!(text(&o).contains("a character device"), "{}", text(&o));
        let m = fs::symlink_metadata(&node).unwrap();
        assert!(m.file_type().is_char_device(), "{:?}", m.file_type());
        assert_eq!(m.rdev(), rdev);
    }
}

#[test]
fn dev_null_is_accepted() {
    let d = TempDir::new().unwrap();
    let (leaf, _model) = chain(d.path());
    let o = chainfs(&["export", s(&leaf), "/dev/null", "--json"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["target"], "null");
    assert!(v["data_read"].as_u64().unwrap() > 0);
    let m = fs::symlink_metadata("/dev/null").unwrap();
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), libc::makedev(1, 3));
}

#[test]
fn dash_is_refused_when_standard_output_is_a_terminal() {
    if !require("script (util-linux)", have("script")) {
        return;
    }
    let d = TempDir::new().unwrap();
    let img = d.path().join("a.vhd");
    chainfs_ok(&["create", s(&img), "--size", "1M"]);
    // `script` runs the command on a pseudo-terminal.
    let cmd = format!("{} export {} -; echo rc=$?", s(&bin()), s(&img));
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .current_dir(d.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("standard output is a terminal") && out.contains("rc=9"),
        "{out}"
    );
    assert!(!d.path().join("-").exists());
}

// ---------------------------------------------------------------------------
// The page cache.

/// A base of `f` full of data and a leaf rewriting every third MiB of it,
/// 24 MiB, in `d`: returns (base, leaf, the flat bytes).
fn cache_chain(d: &Path, f: Fmt) -> (PathBuf, PathBuf, Vec<u8>) {
    let size = 24 * MIB as usize;
    let base = d.join(f.base_name("base"));
    let leaf = d.join(f.child_name("leaf"));
    let scratch = d.join("scratch");
    let mut model = vec![0u8; size];
    let mut rng = Rng(0xCAC4E + f.index());
    f.create_base(&base, size as u64, &[]);
    chainfs_write_mirrored(&base, 0, &rng.bytes(size), &scratch, &mut model);
    f.create_child(&leaf, &base, &[]);
    for k in (0..24).step_by(3) {
        let data = rng.bytes(MIB as usize);
        chainfs_write_mirrored(&leaf, k * MIB, &data, &scratch, &mut model);
    }
    fs::remove_file(&scratch).unwrap();
    (base, leaf, model)
}

/// Run `chainfs ARGS`, which must succeed; returns the bytes it read from
/// storage (its own `ru_inblock`, direct reads included), not what it
/// copied from the page cache.
// wait4 reaps the child (std has no way to get its rusage).
#[allow(clippy::zombie_processes)]
fn storage_reads(args: &[&str]) -> u64 {
    let child = Command::new(bin())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child (std's handle is dropped unwaited:
    // it does not wait on drop); both pointers are to live values.
    let r = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut ru) };
    assert_eq!(r, child.id() as libc::pid_t, "wait4");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "chainfs {args:?}: status {status:#x}"
    );
    ru.ru_inblock as u64 * 512
}

/// Run `case(format, base, leaf, model, out)` over a `cache_chain` of
/// every format, on a disk file system (a tmpfs keeps every page) that
/// takes direct I/O; `out` is where to export to. The files are removed
/// after each case.
fn on_cache_chains(case: impl Fn(Fmt, &Path, &Path, &[u8], &Path)) {
    let d = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    if !require_direct_io(d.path()) {
        return;
    }
    for &f in FORMATS {
        let (base, leaf, model) = cache_chain(d.path(), f);
        let out = d.path().join(format!("{}.raw", f.name()));
        case(f, &base, &leaf, &model, &out);
        for file in [&base, &leaf, &out] {
            fs::remove_file(file).unwrap();
        }
    }
}

/// A cold chain's data is read around the page cache and the new file
/// written around it (direct I/O into huge pages: few large disk requests,
/// and the user's cached files are not pushed out by a bulk copy): after
/// the export neither the base's data nor the output is cached, and the
/// bytes are the chain's.
#[test]
fn a_cold_export_goes_around_the_page_cache() {
    on_cache_chains(|f, base, leaf, model, out| {
        evict(base);
        evict(leaf);
        chainfs_ok(&["export", s(leaf), s(out)]);
        let base_cached = cached_share(base, 0, file_len(base));
        let out_cached = cached_share(out, 0, file_len(out));
        eprintln!(
            "{f:?}: cached after the export: base {:.0}%, output {:.0}%",
            base_cached * 100.0,
            out_cached * 100.0
        );
        // The base holds 16 of its 24 MiB shown; its headers and tables
        // are read through the page cache, which is far less.
        assert!(base_cached < 0.2, "{f:?}: base {:.0}%", base_cached * 100.0);
        assert!(out_cached < 0.2, "{f:?}: output {:.0}%", out_cached * 100.0);
        assert_same(&fs::read(out).unwrap(), model, &format!("{f:?} export"));
    });
}

/// A chain the page cache holds is exported from memory, not read from
/// the disk again: the export's own storage reads stay far under the data
/// (and once the files are evicted, the same export does read it all, so
/// the measure sees direct reads).
#[test]
fn a_cached_chain_is_exported_from_the_page_cache() {
    on_cache_chains(|f, base, leaf, model, out| {
        let data = model.len() as u64;
        // Cached: read whole (and written back, so nothing is dirty).
        for file in [base, leaf] {
            evict(file);
            fs::read(file).unwrap();
            assert!(
                cached_share(file, 0, file_len(file)) > 0.9,
                "{f:?} not cached"
            );
        }
        let warm = storage_reads(&["export", s(leaf), s(out), "--force"]);
        assert_same(&fs::read(out).unwrap(), model, &format!("{f:?} warm"));
        evict(base);
        evict(leaf);
        let cold = storage_reads(&["export", s(leaf), s(out), "--force"]);
        assert_same(&fs::read(out).unwrap(), model, &format!("{f:?} cold"));
        eprintln!("{f:?}: read from storage: warm {warm} bytes, cold {cold} of {data}");
        assert!(warm < data / 10, "{f:?}: a warm export read {warm} bytes");
        assert!(
            cold > data / 2,
            "{f:?}: a cold export read only {cold} bytes"
        );
    });
}
