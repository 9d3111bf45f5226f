//! Shared test support: the CLI binary and its writes (also of a raw
//! disk's changed blocks into a chain layer), real fixtures, hashing,
//! partitioned raw disks, and the rule for tests that need root, FUSE or
//! loop devices (must run under CI=true, may skip elsewhere with a printed
//! reason).
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sha2::{Digest, Sha256};

/// splitmix64: a small seeded generator, so every failure reproduces.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        for c in v.chunks_mut(8) {
            c.copy_from_slice(&self.next().to_le_bytes()[..c.len()]);
        }
        v
    }
}

/// The `chainfs` binary built for this test run.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_chainfs"))
}

/// Run `chainfs ARGS...`, returning the output (never panics on failure).
pub fn chainfs(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("cannot run chainfs")
}

/// Run `chainfs ARGS...` and insist on success.
pub fn chainfs_ok(args: &[&str]) -> String {
    let o = chainfs(args);
    assert!(
        o.status.success(),
        "chainfs {args:?} failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Exit status of a process stopped by fault injection
/// (`CHAINFS_FAULT_AFTER=k`, src/fault.rs).
pub const FAULT_EXIT: i32 = 86;

/// A process's exit code, -1 when a signal ended it.
pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// A process's stdout followed by its stderr.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn utf8(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// `chainfs write IMG --offset OFF --input SCRATCH`, `data` staged in the
/// file `scratch` (replaced).
pub fn chainfs_write(img: &Path, off: u64, data: &[u8], scratch: &Path) {
    std::fs::write(scratch, data).unwrap();
    chainfs_ok(&[
        "write",
        utf8(img),
        "--offset",
        &off.to_string(),
        "--input",
        utf8(scratch),
    ]);
}

/// [`chainfs_write`], and the same bytes written into `model`.
pub fn chainfs_write_mirrored(img: &Path, off: u64, data: &[u8], scratch: &Path, model: &mut [u8]) {
    chainfs_write(img, off, data, scratch);
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

/// Put the 4 KiB blocks that differ between `old` and `new` into `layer`,
/// one `chainfs write` per run of changed blocks; returns the bytes written.
pub fn write_changes(layer: &Path, old: &[u8], new: &[u8], scratch: &Path) -> usize {
    let mut changed = 0;
    let mut i = 0;
    while i < new.len() {
        if old[i..i + 4096] == new[i..i + 4096] {
            i += 4096;
            continue;
        }
        let start = i;
        while i < new.len() && old[i..i + 4096] != new[i..i + 4096] {
            i += 4096;
        }
        chainfs_write(layer, start as u64, &new[start..i], scratch);
        changed += i - start;
    }
    changed
}

/// A new raw disk file of `size` bytes holding one Linux partition from
/// sector 2048 to the end, in a partition table of `label` (sfdisk's
/// `dos` or `gpt`).
pub fn partitioned_raw(raw: &Path, size: u64, label: &str) {
    std::fs::File::create(raw).unwrap().set_len(size).unwrap();
    let kind = if label == "gpt" {
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
    } else {
        "83"
    };
    let mut child = Command::new("sfdisk")
        .arg("--quiet")
        .arg(raw)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("label: {label}\nstart=2048, type={kind}\n").as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk");
}

/// One stage of a chain built from snapshots of a raw disk: creates
/// `dir/layers[stage]` (the base with `chainfs create BASE base_args...`, a
/// later layer as the child of the one before it) and writes into it the
/// 4 KiB blocks that changed from `prev` to `now` ([`write_changes`]);
/// returns the bytes written.
pub fn layer_from_snapshot(
    dir: &Path,
    layers: &[&str],
    stage: usize,
    base_args: &[&str],
    prev: &[u8],
    now: &[u8],
    scratch: &Path,
) -> usize {
    let layer = dir.join(layers[stage]);
    if stage == 0 {
        let mut args = vec!["create", utf8(&layer)];
        args.extend_from_slice(base_args);
        chainfs_ok(&args);
    } else {
        chainfs_ok(&[
            "create",
            utf8(&layer),
            "--parent",
            utf8(&dir.join(layers[stage - 1])),
        ]);
    }
    write_changes(&layer, prev, now, scratch)
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Is the external `tool` on PATH?
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Returns true when the test may go on. Under CI a missing prerequisite is
/// a failure; elsewhere the test prints why it skips and returns false.
pub fn require(what: &str, ok: bool) -> bool {
    if ok {
        return true;
    }
    if in_ci() {
        panic!("CI=true but {what} is not available");
    }
    eprintln!("SKIP: {what} is not available");
    false
}

pub fn is_root() -> bool {
    // SAFETY: geteuid() takes no arguments, cannot fail and touches no
    // memory.
    unsafe { libc::geteuid() == 0 }
}

/// Root, /dev/fuse and fusermount3: what a real FUSE mount needs.
pub fn require_fuse() -> bool {
    require(
        "FUSE (/dev/fuse and fusermount3)",
        Path::new("/dev/fuse").exists() && have("fusermount3"),
    )
}

/// Root and loop devices.
pub fn require_loop() -> bool {
    require(
        "root with loop devices (losetup)",
        is_root() && have("losetup") && Path::new("/dev/loop-control").exists(),
    )
}

pub fn sha256_file(p: &Path) -> String {
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    hex(&h.finalize())
}

pub fn sha256(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

/// Lowercase hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `tests/fixtures/real`: the real-writer images (provenance and expected
/// hashes in `SOURCES.md` there), kept in the repository so a clone alone
/// passes.
pub fn fixtures_dir() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real");
    assert!(p.is_dir(), "fixtures missing at {}", p.display());
    p
}

/// Decompress `fixtures/real/REL.gz` into `dir` under its basename.
pub fn unpack_fixture(rel: &str, dir: &Path) -> PathBuf {
    let src = fixtures_dir().join(format!("{rel}.gz"));
    let name = Path::new(rel).file_name().unwrap();
    let dst = dir.join(name);
    let out = Command::new("gzip")
        .arg("-dc")
        .arg(&src)
        .output()
        .expect("gzip");
    assert!(out.status.success(), "gunzip {}", src.display());
    std::fs::write(&dst, out.stdout).unwrap();
    dst
}

/// A FUSE mount (ours or vhdimount's) that is unmounted on drop, even when
/// the test fails.
pub struct MountGuard {
    pub dir: PathBuf,
}

impl MountGuard {
    pub fn new(dir: &Path) -> MountGuard {
        MountGuard {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        for _ in 0..50 {
            let ok = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.dir)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok || !is_mounted(&self.dir) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Mount `leaf` with libvhdi's vhdimount and wait for `vhdi{layers}` (the
/// flattened leaf). It runs from the leaf's folder with the bare file name:
/// libvhdi joins the stored parent name to its working folder.
pub fn vhdimount(leaf: &Path, mnt: &Path, layers: usize) -> MountGuard {
    std::fs::create_dir_all(mnt).unwrap();
    let mnt = std::path::absolute(mnt).unwrap();
    let guard = MountGuard::new(&mnt);
    // As a user runs it: absolute paths, from a working folder that is not
    // the image's, so libvhdi has to find the parents from what the files
    // store (running it in the leaf's folder with a bare name hid defect 3
    // of issue 14).
    let leaf = std::path::absolute(leaf).unwrap();
    let o = Command::new("vhdimount")
        .current_dir("/")
        .arg(&leaf)
        .arg(&mnt)
        .output()
        .expect("cannot run vhdimount");
    assert!(
        o.status.success(),
        "vhdimount {}: {}{}",
        leaf.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let want = mnt.join(format!("vhdi{layers}"));
    let t0 = std::time::Instant::now();
    while !want.exists() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(15),
            "vhdimount {}: {} did not appear",
            leaf.display(),
            want.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    guard
}

/// Is `dir` a mount point right now?
pub fn is_mounted(dir: &Path) -> bool {
    let Ok(c) = std::fs::canonicalize(dir) else {
        return false;
    };
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .any(|m| Path::new(&m.replace("\\040", " ")) == c)
}

/// A loop device detached on drop.
pub struct LoopGuard {
    pub dev: String,
}

impl LoopGuard {
    /// `losetup -f --show [-r] [-P] FILE`, plus `partx -a` for partitions.
    pub fn attach(file: &Path, read_only: bool, partitions: bool) -> LoopGuard {
        let mut c = Command::new("losetup");
        c.arg("-f").arg("--show");
        if read_only {
            c.arg("-r");
        }
        if partitions {
            c.arg("-P");
        }
        let o = c.arg(file).output().expect("losetup");
        assert!(
            o.status.success(),
            "losetup {}: {}",
            file.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
        let g = LoopGuard { dev };
        if partitions {
            // This kernel does not scan partition tables by itself.
            let _ = Command::new("partx").args(["-a", &g.dev]).status();
        }
        g
    }

    pub fn partition(&self, n: u32) -> String {
        format!("{}p{n}", self.dev)
    }
}

impl Drop for LoopGuard {
    fn drop(&mut self) {
        let _ = Command::new("partx").args(["-d", &self.dev]).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// A kernel mount (`mount DEV DIR`) undone on drop.
pub struct KernelMount {
    pub dir: PathBuf,
}

impl KernelMount {
    pub fn mount(dev: &str, dir: &Path, opts: &str) -> KernelMount {
        std::fs::create_dir_all(dir).unwrap();
        let o = Command::new("mount")
            .args(["-o", opts, dev])
            .arg(dir)
            .output()
            .expect("mount");
        assert!(
            o.status.success(),
            "mount {dev} {}: {}",
            dir.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        KernelMount {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// What is wrong with the layout of the VHD at `path` by the rule every
/// writer in the field follows and some readers require (issue 14): the
/// footer copy at 0 equal to the trailing footer, the dynamic header at
/// 512 with a good checksum, the BAT and locator data inside the file, and
/// no stale dynamic header or relink journal anywhere else. Empty when
/// right (and for fixed disks).
pub fn vhd_layout_problems(path: &Path) -> Vec<String> {
    use chainfs::format::vhd::{DynamicHeader, Footer};
    let b = std::fs::read(path).unwrap();
    let name = path.display();
    let mut bad = Vec::new();
    if b.len() < 512 {
        return vec![format!("{name}: shorter than a footer")];
    }
    let tail = &b[b.len() - 512..];
    let footer = match Footer::parse(tail, true) {
        Ok(f) => f,
        Err(e) => return vec![format!("{name}: trailing footer: {e}")],
    };
    if footer.disk_type == 2 {
        return bad;
    }
    if &b[..512] != tail {
        bad.push(format!(
            "{name}: footer copy at 0 differs from the trailing footer"
        ));
    }
    if footer.data_offset != 512 {
        bad.push(format!(
            "{name}: dynamic header at {:#x}, not 512",
            footer.data_offset
        ));
    }
    match DynamicHeader::parse(&b[512..1536], true) {
        Ok(h) => {
            let end = b.len() as u64 - 512;
            if h.table_offset + h.max_table_entries as u64 * 4 > end {
                bad.push(format!(
                    "{name}: BAT at {:#x} runs past the footer",
                    h.table_offset
                ));
            }
            for l in h.locators.iter().filter(|l| l.code != 0) {
                if l.data_offset + l.data_len as u64 > end {
                    bad.push(format!(
                        "{name}: locator data at {:#x} past the footer",
                        l.data_offset
                    ));
                }
            }
        }
        Err(e) => bad.push(format!("{name}: dynamic header at 512: {e}")),
    }
    for (i, sector) in b.chunks(512).enumerate().skip(2) {
        if sector.starts_with(b"cxsparse") {
            bad.push(format!("{name}: a stale dynamic header at {:#x}", i * 512));
        }
        if sector.starts_with(b"chfsrlnk") {
            bad.push(format!("{name}: a relink journal left at {:#x}", i * 512));
        }
    }
    bad
}
