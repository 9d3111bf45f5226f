//! Shared test support: the formats every suite runs over ([`Fmt`],
//! [`FORMATS`], [`per_format!`]), the CLI binary and its writes (also of a
//! raw disk's changed blocks into a chain layer), byte comparison, mounts
//! with one timeout, real fixtures, hashing, partitioned raw disks, and the
//! rule for tests that need root, FUSE or loop devices (must run under
//! CI=true, may skip elsewhere with a printed reason).
//!
//! The suites are organised by concern (mount, oracle, writable, merge,
//! space/crash) and each concern runs over every format: a case is a
//! function taking a [`Fmt`], and [`per_format!`] stamps out one `#[test]`
//! per format (`vhd::NAME`, `vhdx::NAME`), so nextest names the format that
//! failed and runs them in parallel. Cases that only one format has (the
//! VHDX log, 4 KiB sectors, `parent_linkage2`) sit in the same concern file
//! as plain tests.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// A temp path as the `&str` the CLI takes.
pub fn p(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

fn utf8(path: &Path) -> &str {
    p(path)
}

// ---------------------------------------------------------------------------
// Formats.

/// A disk format the concern suites run over. Adding a format is a variant
/// here, its arms below, one entry in [`FORMATS`] and one line in
/// [`per_format!`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fmt {
    Vhd,
    Vhdx,
    Qcow2,
}

/// Every format, in the order the matrix runs them.
pub const FORMATS: &[Fmt] = &[Fmt::Vhd, Fmt::Vhdx, Fmt::Qcow2];

impl Fmt {
    /// Lowercase name, as in test module names and messages.
    pub fn name(self) -> &'static str {
        match self {
            Fmt::Vhd => "vhd",
            Fmt::Vhdx => "vhdx",
            Fmt::Qcow2 => "qcow2",
        }
    }

    /// Extension of a base layer.
    pub fn ext(self) -> &'static str {
        self.name()
    }

    /// Extension of a differencing layer (Hyper-V names checkpoints
    /// `.avhdx`; a qcow2 overlay is a `.qcow2` like its base).
    pub fn child_ext(self) -> &'static str {
        match self {
            Fmt::Vhd => "vhd",
            Fmt::Vhdx => "avhdx",
            Fmt::Qcow2 => "qcow2",
        }
    }

    /// `STEM.EXT`, a base layer's file name.
    pub fn base_name(self, stem: &str) -> String {
        format!("{stem}.{}", self.ext())
    }

    /// `STEM.CHILD_EXT`, a differencing layer's file name.
    pub fn child_name(self, stem: &str) -> String {
        format!("{stem}.{}", self.child_ext())
    }

    /// The smallest block size the format allows: crash loops over few,
    /// small blocks have tens of points, not thousands. A qcow2 allows
    /// clusters down to 512 bytes, but every cluster of a write is a
    /// refcount and an L2 update of its own; 64 KiB (qemu's default) keeps
    /// a crash loop's points as few as VHD's while one L2 table still maps
    /// 512 MiB. `--block-size` is `create`'s name for the cluster size too.
    pub fn min_block(self) -> u64 {
        match self {
            Fmt::Vhd => 256 << 10,
            Fmt::Vhdx => 1 << 20,
            Fmt::Qcow2 => 64 << 10,
        }
    }

    /// qemu-img's name for the format.
    pub fn qemu(self) -> &'static str {
        match self {
            Fmt::Vhd => "vpc",
            Fmt::Vhdx => "vhdx",
            Fmt::Qcow2 => "qcow2",
        }
    }

    /// Does the format have a fixed (fully allocated) type? qcow2 has
    /// none: `create --type fixed` is refused (qemu preallocates instead).
    pub fn has_fixed(self) -> bool {
        self != Fmt::Qcow2
    }

    /// Does libvhdi (`vhdimount`) read it? It reads VHD and VHDX only; for
    /// qcow2 qemu-img is the independent reader ([`Fmt::qemu_reads_chains`]).
    pub fn vhdi_reads(self) -> bool {
        self != Fmt::Qcow2
    }

    /// Does qemu-img read whole chains of this format, following parents?
    /// qemu follows qcow2 backing files; it has no VHD parents and opens
    /// no differencing VHDX (formats.md §4), so it reads single VHD and
    /// VHDX layers only.
    pub fn qemu_reads_chains(self) -> bool {
        self == Fmt::Qcow2
    }

    /// Does `qemu-img check` judge the format's metadata? It checks VHDX
    /// and qcow2 (qcow2: refcounts, L1/L2 tables, leaks) and says "does
    /// not support checks" for VHD.
    pub fn qemu_checks(self) -> bool {
        self != Fmt::Vhd
    }

    /// The `disk_type` `info` and the mount's `chain` file show for a layer:
    /// VHD and VHDX say fixed, dynamic or differencing; a qcow2 records no
    /// type, so chainfs shows its version (`v3`, what `create` writes).
    pub fn disk_type(self, child: bool, fixed: bool) -> &'static str {
        match (self, child, fixed) {
            (Fmt::Qcow2, _, _) => "v3",
            (_, true, _) => "differencing",
            (_, false, true) => "fixed",
            (_, false, false) => "dynamic",
        }
    }

    /// Does a layer carry an id its children record (VHD and VHDX), or is
    /// the link by name alone (a qcow2 backing file)?
    pub fn has_ids(self) -> bool {
        self != Fmt::Qcow2
    }

    /// Known defect: space a crash leaked can outlive the next writable
    /// open (a rerun of the merge, the next write), so `check` still
    /// reports it after the rerun. VHDX: only the unreferenced tail is cut
    /// at open; a leaked payload block before a sector bitmap block whose
    /// BAT entry became durable stays until `chainfs compact`. VHD reuses
    /// all of it; a qcow2 (version 3) is dirty after a crash, and the next
    /// writable open rebuilds its refcounts and frees the leaks. Pinned by
    /// the ignored `writable::vhdx::a_leak_a_crash_leaves_is_gone_after_the_next_write`;
    /// the crash loops accept such leaks and nothing else. Drop a format
    /// here with its fix.
    pub fn crash_leaks_outlive_a_rerun(self) -> bool {
        matches!(self, Fmt::Vhdx)
    }

    /// Position in [`FORMATS`]: offsets a seed so each format's case draws
    /// its own data.
    pub fn index(self) -> u64 {
        FORMATS.iter().position(|f| *f == self).unwrap() as u64
    }

    /// `chainfs create PATH --size SIZE EXTRA...`: a base layer (the format
    /// follows the extension).
    pub fn create_base(self, path: &Path, size: u64, extra: &[&str]) {
        let size = size.to_string();
        let mut args = vec!["create", p(path), "--size", &size];
        args.extend_from_slice(extra);
        chainfs_ok(&args);
    }

    /// `chainfs create PATH --parent PARENT EXTRA...`: a differencing layer.
    pub fn create_child(self, path: &Path, parent: &Path, extra: &[&str]) {
        let mut args = vec!["create", p(path), "--parent", p(parent)];
        args.extend_from_slice(extra);
        chainfs_ok(&args);
    }
}

/// One `#[test]` per format for each case: `per_format! { NAME(ARGS); }`
/// makes `vhd::NAME` calling `NAME(Fmt::Vhd, ARGS)`, `vhdx::NAME` and
/// `qcow2::NAME` likewise, for functions `NAME` of the calling file. Use it
/// once per file, listing every case (it defines the modules `vhd`, `vhdx`
/// and `qcow2`).
///
/// A case that only some formats can have names them:
/// `NAME(ARGS) in [Vhd, Vhdx];` makes tests in those modules only. It is
/// for what a format lacks (qcow2 has no fixed type), never for an oracle
/// that cannot read a format: swap the oracle there ([`Fmt::vhdi_reads`]).
/// The case's doc says why the others are left out.
///
/// A case that finds a known defect of one format, pending a fix the test
/// must not wait for, keeps its test there but ignored with the reason:
/// `NAME(ARGS) ignore [Qcow2] "qcow2 write path: WHAT";` (nextest lists it
/// as ignored; `--run-ignored only` runs it). A misspelt format is a
/// compile error.
#[macro_export]
macro_rules! per_format {
    ($($name:ident($($arg:expr),* $(,)?)
       $(in [$($only:ident),+ $(,)?])?
       $(ignore [$($ig:ident),+ $(,)?] $why:literal)?;)*) => {
        $crate::per_format!(@one vhd Vhd;
            $($name($($arg),*) [$($($only)+)?] [$($($ig)+)?] [$($why)?];)*);
        $crate::per_format!(@one vhdx Vhdx;
            $($name($($arg),*) [$($($only)+)?] [$($($ig)+)?] [$($why)?];)*);
        $crate::per_format!(@one qcow2 Qcow2;
            $($name($($arg),*) [$($($only)+)?] [$($($ig)+)?] [$($why)?];)*);
    };
    (@one $m:ident $v:ident;
     $($name:ident($($arg:expr),*) [$($only:ident)*] [$($ig:ident)*] [$($why:literal)?];)*) => {
        mod $m {
            $($crate::per_format!(
                @case $v $name($($arg),*) [$($only)*] [$($ig)*] [$($why)?]
            );)*
        }
    };
    // Every format.
    (@case $v:ident $name:ident($($arg:expr),*) [] [] []) => {
        #[test]
        fn $name() {
            super::$name($crate::common::Fmt::$v $(, $arg)*);
        }
    };
    // Only the listed ones (each must name a `Fmt`).
    (@case $v:ident $name:ident($($arg:expr),*) [$($only:ident)+] [] []) => {
        $(const _: $crate::common::Fmt = $crate::common::Fmt::$only;)+
        $crate::per_format!(@in $v [$($only)+] {
            $crate::per_format!(@case $v $name($($arg),*) [] [] []);
        } {});
    };
    // Ignored, with the reason, for the listed ones.
    (@case $v:ident $name:ident($($arg:expr),*) [$($only:ident)*] [$($ig:ident)+] [$why:literal]) => {
        $(const _: $crate::common::Fmt = $crate::common::Fmt::$ig;)+
        $crate::per_format!(@in $v [$($ig)+] {
            #[test]
            #[ignore = $why]
            fn $name() {
                super::$name($crate::common::Fmt::$v $(, $arg)*);
            }
        } {
            $crate::per_format!(@case $v $name($($arg),*) [$($only)*] [] []);
        });
    };
    // `@in V [LIST] {YES} {NO}`: YES when V is in LIST, else NO.
    (@in Vhd [Vhd $($rest:ident)*] {$($y:tt)*} {$($n:tt)*}) => { $($y)* };
    (@in Vhdx [Vhdx $($rest:ident)*] {$($y:tt)*} {$($n:tt)*}) => { $($y)* };
    (@in Qcow2 [Qcow2 $($rest:ident)*] {$($y:tt)*} {$($n:tt)*}) => { $($y)* };
    (@in $v:ident [$first:ident $($rest:ident)*] {$($y:tt)*} {$($n:tt)*}) => {
        $crate::per_format!(@in $v [$($rest)*] {$($y)*} {$($n)*});
    };
    (@in $v:ident [] {$($y:tt)*} {$($n:tt)*}) => { $($n)* };
}

// ---------------------------------------------------------------------------
// Comparing bytes, waiting, commands.

/// How long a test waits for something another process does (a mount to
/// appear, a job to end, a device node) before it fails.
pub const WAIT: Duration = Duration::from_secs(15);

/// Poll `cond` until it holds, failing after [`WAIT`].
pub fn wait_for(what: &str, cond: impl FnMut() -> bool) {
    wait_for_within(what, WAIT, cond);
}

/// Poll `cond` until it holds, failing after `limit` (for waits on work
/// that takes longer than [`WAIT`] by design: a merge under load).
pub fn wait_for_within(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where two byte strings first differ, with both bytes and how many
/// 512-byte sectors differ; `None` when equal (never prints them whole).
pub fn first_diff(got: &[u8], want: &[u8]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("length {} instead of {}", got.len(), want.len()));
    }
    const C: usize = 1 << 16;
    let (i, (a, b)) = got
        .chunks(C)
        .zip(want.chunks(C))
        .enumerate()
        .find(|(_, (a, b))| a != b)?;
    let j = a.iter().zip(b).position(|(x, y)| x != y).unwrap();
    let first = i * C + j;
    let sectors = got
        .chunks(512)
        .zip(want.chunks(512))
        .filter(|(a, b)| a != b)
        .count();
    Some(format!(
        "first difference at byte {first:#x} (sector {}): got {:#04x}, want {:#04x}; {sectors} sectors differ",
        first / 512,
        got[first],
        want[first]
    ))
}

/// Equal bytes, or a panic saying `what` and [`first_diff`].
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some(d) = first_diff(got, want) {
        panic!("{what}: {d}");
    }
}

/// All zero, or a panic naming the first byte that is not.
pub fn assert_zero(got: &[u8], what: &str) {
    if let Some(i) = got.iter().position(|b| *b != 0) {
        panic!("{what}: byte {i} is {:#04x}, not zero", got[i]);
    }
}

/// Run an external command, insisting on success; returns its stdout.
pub fn run(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run_ok(cmd).stdout).into_owned()
}

/// Run an external command, insisting on success; returns its output.
pub fn run_ok(cmd: &mut Command) -> Output {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed ({}): {}",
        o.status,
        text(&o)
    );
    o
}

/// `chainfs export IMG OUT --force`, returning the bytes (OUT stays).
pub fn export(img: &Path, out: &Path) -> Vec<u8> {
    try_export(img, out).unwrap_or_else(|e| panic!("{e}"))
}

/// [`export`], or the exit status and message of a refusal.
pub fn try_export(img: &Path, out: &Path) -> Result<Vec<u8>, String> {
    let o = chainfs(&["export", p(img), p(out), "--force"]);
    if !o.status.success() {
        return Err(format!(
            "chainfs export {} failed (exit {}): {}",
            img.display(),
            code(&o),
            text(&o).trim()
        ));
    }
    Ok(std::fs::read(out).unwrap())
}

/// [`try_export`], removing OUT once read (crash loops export hundreds of
/// times into tmpfs).
pub fn take_export(img: &Path, out: &Path) -> Result<Vec<u8>, String> {
    let b = try_export(img, out)?;
    std::fs::remove_file(out).ok();
    Ok(b)
}

/// `chainfs check --json IMG`: exit status and problems (one "(no JSON)"
/// problem holding the output when it printed none).
pub fn check(img: &Path) -> (i32, Vec<String>) {
    let o = chainfs(&["check", "--json", p(img)]);
    let c = code(&o);
    match serde_json::from_slice::<serde_json::Value>(&o.stdout) {
        Ok(v) => (
            c,
            v["problems"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| x.as_str().unwrap_or_default().to_string())
                        .collect()
                })
                .unwrap_or_default(),
        ),
        Err(_) => (c, vec![format!("(no JSON) {}", text(&o).trim())]),
    }
}

/// `chainfs info --json IMG`.
pub fn info_json(img: &Path) -> serde_json::Value {
    info_json_with(img, &[])
}

/// `chainfs info IMG --json EXTRA...`.
pub fn info_json_with(img: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["info", p(img), "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&chainfs_ok(&args)).expect("info --json prints JSON")
}

/// Copy the regular files of `from` into a new folder `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A temp folder on tmpfs when there is one: crash loops fsync hundreds of
/// times, and what they check is a dying process (the page cache
/// survives), not a power cut, so tmpfs proves the same, faster.
pub fn fast_tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(t) = tempfile::tempdir_in(shm) {
            return t;
        }
    }
    tempfile::tempdir().unwrap()
}

/// libvhdi's vhdimount with FUSE (a skip or, under CI, a failure without).
pub fn have_vhdimount() -> bool {
    require_fuse() && require("vhdimount (libvhdi)", have("vhdimount"))
}

/// qemu-img (a skip or, under CI, a failure without).
pub fn have_qemu_img() -> bool {
    require("qemu-img", have("qemu-img"))
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

/// `chainfs mount LEAF MNT OPTS...` in the background; the guard unmounts
/// on drop.
pub fn mount(leaf: &Path, mnt: &Path, opts: &[&str]) -> MountGuard {
    std::fs::create_dir_all(mnt).unwrap();
    let g = MountGuard::new(mnt);
    let mut args = vec!["mount", p(leaf), p(mnt)];
    args.extend_from_slice(opts);
    chainfs_ok(&args);
    assert!(
        is_mounted(mnt),
        "{} is not mounted after chainfs mount returned\n{}",
        mnt.display(),
        why_not_mounted(mnt)
    );
    g
}

/// What a failed [`is_mounted`] saw, for the panic message: whether the
/// path resolves (a daemon that died leaves a mount whose root fails
/// with ENOTCONN), the mount table's lines for it, and which chainfs
/// processes are alive.
fn why_not_mounted(mnt: &Path) -> String {
    let name = mnt.to_string_lossy().replace(' ', "\\040");
    let table = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let lines: Vec<&str> = table.lines().filter(|l| l.contains(&*name)).collect();
    let ps = Command::new("ps")
        .args(["-eo", "pid,ppid,stat,args"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let daemons: Vec<&str> = ps.lines().filter(|l| l.contains("chainfs")).collect();
    format!(
        "canonicalize: {:?}\nmount table: {lines:?}\nchainfs processes: {daemons:#?}",
        std::fs::canonicalize(mnt)
    )
}

/// `chainfs umount`, then the guard is spent. "Busy" (exit 7) is retried
/// for [`WAIT`]: a process another test thread forks holds a copy of our
/// descriptors until it execs, so a just-closed file can still pin the
/// mount. Returns when the daemon has let go of the leaf.
pub fn umount(g: MountGuard) {
    let start = Instant::now();
    loop {
        let o = chainfs(&["umount", p(&g.dir)]);
        if o.status.success() {
            break;
        }
        assert!(
            code(&o) == 7 && start.elapsed() < WAIT,
            "chainfs umount {}: {}",
            g.dir.display(),
            text(&o)
        );
        eprintln!("{} busy, unmounting again", g.dir.display());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!is_mounted(&g.dir), "{} still mounted", g.dir.display());
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
    mounted_type(dir).is_some()
}

/// The type of the file system mounted on top at `dir`, if any.
pub fn mounted_type(dir: &Path) -> Option<String> {
    let c = std::fs::canonicalize(dir).ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts.lines().rev().find_map(|l| {
        let mut f = l.split(' ');
        let at = f.nth(1)?;
        if Path::new(&at.replace("\\040", " ")) != c {
            return None;
        }
        f.next().map(str::to_string)
    })
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

// ---------------------------------------------------------------------------
// VHDX bytes, read without the reader under test.

use chainfs::format::vhdx::{
    parse_guid_text, parse_metadata_table, parse_parent_locator, parse_region_table, Header,
    BAT_GUID, HEADER1, HEADER2, HEADER_SIZE, METADATA_GUID, PARENT_LOCATOR, REGION1, REGION_SIZE,
};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use uuid::Uuid;

/// Both headers of a VHDX file as the library parses them (`None` where a
/// slot does not verify).
pub fn headers(p: &Path) -> [Option<Header>; 2] {
    let f = File::open(p).unwrap();
    [HEADER1, HEADER2].map(|at| {
        let mut b = vec![0u8; HEADER_SIZE];
        f.read_exact_at(&mut b, at).unwrap();
        Header::parse(&b).ok()
    })
}

/// The current header: the valid one with the larger sequence number.
pub fn current_header(p: &Path) -> Header {
    let [a, b] = headers(p);
    match (a, b) {
        (Some(a), Some(b)) => {
            if b.sequence > a.sequence {
                b
            } else {
                a
            }
        }
        (Some(h), None) | (None, Some(h)) => h,
        (None, None) => panic!("{}: no valid header", p.display()),
    }
}

/// Give both headers DataWriteGuid `id` (`to_bytes` recomputes the CRC).
pub fn set_data_write_guid(p: &Path, id: Uuid) {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    for at in [HEADER1, HEADER2] {
        let mut b = vec![0u8; HEADER_SIZE];
        f.read_exact_at(&mut b, at).unwrap();
        let mut h = Header::parse(&b).expect("a header chainfs wrote");
        h.data_write_guid = id;
        f.write_all_at(&h.to_bytes(), at).unwrap();
    }
    f.sync_all().unwrap();
    for h in headers(p) {
        assert_eq!(h.expect("still valid").data_write_guid, id);
    }
}

/// Where the regions of a (clean) VHDX lie, read straight from the bytes.
pub struct RawLayout {
    pub bat: (u64, u64),
    pub metadata: (u64, u64),
    pub log: (u64, u64),
}

pub fn raw_layout(b: &[u8]) -> RawLayout {
    let regions = parse_region_table(&b[REGION1 as usize..REGION1 as usize + REGION_SIZE])
        .expect("region table 1");
    let find = |g: Uuid| {
        let r = regions.iter().find(|r| r.guid == g).expect("known region");
        (r.offset, r.length as u64)
    };
    let h = {
        let h1 = Header::parse(&b[HEADER1 as usize..]).ok();
        let h2 = Header::parse(&b[HEADER2 as usize..]).ok();
        match (h1, h2) {
            (Some(a), Some(b)) if b.sequence > a.sequence => b,
            (Some(a), _) => a,
            (None, Some(b)) => b,
            (None, None) => panic!("no valid header"),
        }
    };
    RawLayout {
        bat: find(BAT_GUID),
        metadata: find(METADATA_GUID),
        log: (h.log_offset, h.log_length as u64),
    }
}

/// The parent locator's key/value pairs, read from the file's bytes (the
/// log must be clean: nothing is replayed here).
pub fn raw_locator(p: &Path) -> Result<Vec<(String, String)>, String> {
    let b = fs::read(p).unwrap();
    let l = raw_layout(&b);
    let mo = l.metadata.0 as usize;
    let table = parse_metadata_table(&b[mo..mo + REGION_SIZE])
        .map_err(|e| format!("metadata table: {e:?}"))?;
    let e = table
        .iter()
        .find(|e| e.item == PARENT_LOCATOR && !e.is_user)
        .ok_or("no parent locator")?;
    let at = mo + e.offset as usize;
    parse_parent_locator(&b[at..at + e.length as usize])
        .map_err(|e| format!("parent locator: {e:?}"))
}

pub fn locator_value(pairs: &[(String, String)], key: &str) -> Option<String> {
    pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

/// `child` names `parent` by its current DataWriteGuid (and by nothing
/// else), read from the file's bytes; the problem otherwise.
pub fn vhdx_linkage_problem(child: &Path, parent: &Path) -> Option<String> {
    if !current_header(child).log_guid.is_nil() {
        return Some(format!("{}: the log is not empty", child.display()));
    }
    let loc = match raw_locator(child) {
        Ok(l) => l,
        Err(e) => return Some(format!("{}: {e}", child.display())),
    };
    let Some(linkage) = locator_value(&loc, "parent_linkage").and_then(|v| parse_guid_text(&v))
    else {
        return Some(format!("{}: no parent_linkage in {loc:?}", child.display()));
    };
    let id = current_header(parent).data_write_guid;
    if linkage != id {
        return Some(format!(
            "{}'s parent_linkage {linkage} is not {}'s current DataWriteGuid {id} ({loc:?})",
            child.display(),
            parent.display()
        ));
    }
    let name = parent.file_name().unwrap().to_string_lossy().into_owned();
    match locator_value(&loc, "relative_path") {
        Some(rel) if rel.ends_with(&name) => {}
        other => return Some(format!("relative_path {other:?} does not name {name}")),
    }
    if let Some(l2) = locator_value(&loc, "parent_linkage2").and_then(|v| parse_guid_text(&v)) {
        if !l2.is_nil() && l2 != linkage {
            return Some(format!("a stale parent_linkage2 {l2} survived the relink"));
        }
    }
    None
}

/// What is wrong with the link from `child` to `parent` by the format's own
/// bytes: for VHDX [`vhdx_linkage_problem`]; VHD links are checked by
/// `info`'s ids and [`vhd_layout_problems`]. Empty when right.
pub fn link_problems(child: &Path, parent: &Path) -> Vec<String> {
    let is_vhdx = |f: &Path| f.extension().is_some_and(|x| x == "vhdx" || x == "avhdx");
    if is_vhdx(child) && is_vhdx(parent) {
        vhdx_linkage_problem(child, parent).into_iter().collect()
    } else {
        Vec::new()
    }
}

// ---------------------------------------------------------------------------
// Chains built with the CLI, sparse files, qemu.

const K4: u64 = 4096;

use std::io::Read;
use std::os::fd::AsRawFd;

pub fn seek(f: &File, off: u64, whence: i32) -> Option<u64> {
    // SAFETY: lseek on a descriptor we own; no memory is involved.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    (r >= 0).then_some(r as u64)
}

/// The next offset at or after `off` that holds data (`len` if none).
pub fn next_data(f: &File, off: u64, len: u64) -> u64 {
    seek(f, off, libc::SEEK_DATA).unwrap_or(len).min(len)
}

pub fn next_hole(f: &File, off: u64, len: u64) -> u64 {
    seek(f, off, libc::SEEK_HOLE).unwrap_or(len).min(len)
}

/// sha256 of a (sparse) file: holes are hashed as zeros without reading
/// them, so a 10 GiB export of a mostly empty disk hashes in seconds.
pub fn sha256_sparse(p: &Path) -> String {
    const C: usize = 1 << 20;
    let f = File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let len = f.metadata().unwrap().len();
    let zeros = vec![0u8; C];
    let mut buf = vec![0u8; C];
    let mut h = Sha256::new();
    let mut off = 0;
    while off < len {
        let d = next_data(&f, off, len);
        while off < d {
            let n = ((d - off) as usize).min(C);
            h.update(&zeros[..n]);
            off += n as u64;
        }
        if off >= len {
            break;
        }
        let e = next_hole(&f, off, len).max(off + 1);
        while off < e {
            let n = ((e - off) as usize).min(C);
            f.read_exact_at(&mut buf[..n], off).unwrap();
            h.update(&buf[..n]);
            off += n as u64;
        }
    }
    hex(&h.finalize())
}

/// sha256 of everything `r` yields, in 1 MiB reads (a FUSE file).
pub fn sha256_stream(mut r: impl Read) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

/// The first difference between two equally long (sparse) files; regions
/// that are holes in both are equal without being read.
pub fn file_diff(a: &Path, b: &Path) -> Option<String> {
    const C: u64 = 1 << 20;
    let fa = File::open(a).unwrap();
    let fb = File::open(b).unwrap();
    let len = fa.metadata().unwrap().len();
    let lb = fb.metadata().unwrap().len();
    if len != lb {
        return Some(format!("lengths {len} and {lb}"));
    }
    let mut ba = vec![0u8; C as usize];
    let mut bb = vec![0u8; C as usize];
    let mut off = 0;
    while off < len {
        let d = next_data(&fa, off, len).min(next_data(&fb, off, len));
        if d >= len {
            break;
        }
        let start = d - d % C;
        let n = (len - start).min(C) as usize;
        fa.read_exact_at(&mut ba[..n], start).unwrap();
        fb.read_exact_at(&mut bb[..n], start).unwrap();
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Some(format!(
                "first difference at byte {:#x}: {:#04x} vs {:#04x}",
                start + i as u64,
                ba[i],
                bb[i]
            ));
        }
        off = start + n as u64;
    }
    None
}

/// Can qemu open this non-differencing VHDX? qemu (since 5.2) refuses
/// logical sectors other than 512 bytes with "Operation not supported"; that
/// refusal is accepted for 4096-byte images only.
pub fn qemu_reads(img: &Path, lss: u32) -> bool {
    let o = Command::new("qemu-img")
        .args(["info", "-f", "vhdx"])
        .arg(img)
        .output()
        .expect("qemu-img");
    if o.status.success() {
        return true;
    }
    assert!(
        lss != 512 && text(&o).contains("not supported"),
        "qemu-img info {}: {}",
        img.display(),
        text(&o)
    );
    eprintln!(
        "qemu-img cannot read {}-byte logical sectors; libvhdi is the oracle there",
        lss
    );
    false
}

/// `qemu-img convert -O raw` of a file of format `fmt` into `out`.
pub fn qemu_convert(fmt: Fmt, img: &Path, out: &Path) {
    let _ = fs::remove_file(out);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", fmt.qemu(), "-O", "raw"])
            .arg(img)
            .arg(out),
    );
}

/// `qemu-img check` of a file of format `fmt`: no corruption and (qcow2)
/// no leaked clusters.
pub fn qemu_check(fmt: Fmt, img: &Path) {
    run_ok(
        Command::new("qemu-img")
            .args(["check", "-f", fmt.qemu()])
            .arg(img),
    );
}

/// `qemu-img check` of what a stopped process left (fault injection, kill
/// -9): no corruption; leaked clusters (exit 3: allocated, referenced by
/// nothing) are what an interrupted allocation may leave and are
/// accepted. A qcow2 is checked alone (`"backing": null`): a crashed merge
/// may have retired its parent already. `what` names the point for the
/// message.
pub fn qemu_check_no_corruption(fmt: Fmt, img: &Path, what: &str) {
    let mut cmd = Command::new("qemu-img");
    cmd.arg("check");
    if fmt == Fmt::Qcow2 {
        let spec = serde_json::json!({
            "driver": "qcow2",
            "file": {"driver": "file", "filename": p(img)},
            "backing": null,
        });
        cmd.arg(format!("json:{spec}"));
    } else {
        cmd.args(["-f", fmt.qemu()]).arg(img);
    }
    let o = cmd.output().expect("cannot run qemu-img");
    assert!(
        matches!(code(&o), 0 | 3),
        "{what}: qemu-img check {} (exit {}): {}",
        img.display(),
        code(&o),
        text(&o)
    );
}

/// Is this `chainfs check` problem space that nothing references, what a
/// crash may leave (VHD, VHDX: "not referenced by the BAT"; qcow2: a
/// cluster counted but unused, "leaked")?
pub fn is_leak(problem: &str) -> bool {
    problem.contains("not referenced by the") || problem.contains("leaked: counted but unused")
}

/// `chainfs check IMG` exits 0 and reports nothing.
pub fn assert_clean(img: &Path) {
    let (c, probs) = check(img);
    assert!(
        c == 0 && probs.is_empty(),
        "chainfs check {}: exit {c}, {probs:?}",
        img.display()
    );
}

/// One layer: file name, block size, and for the base its type.
#[derive(Clone, Copy)]
pub struct Spec {
    pub name: &'static str,
    pub block: u64,
    pub fixed: bool,
}

pub const fn spec(name: &'static str, block: u64) -> Spec {
    Spec {
        name,
        block,
        fixed: false,
    }
}

/// A chain built bottom-up: `snaps[i]` is the flattened content with layer
/// `i` as the leaf (it never changes once layer `i + 1` exists).
pub struct Built {
    pub dir: PathBuf,
    pub names: Vec<&'static str>,
    pub snaps: Vec<Vec<u8>>,
}

impl Built {
    pub fn path(&self, i: usize) -> PathBuf {
        self.dir.join(self.names[i])
    }

    pub fn leaf(&self) -> PathBuf {
        self.path(self.names.len() - 1)
    }

    pub fn model(&self) -> &[u8] {
        self.snaps.last().unwrap()
    }
}

/// 4 KiB aligned writes into layer `i` of block size `block`: some random,
/// one straddling a block boundary, one at the very end of the disk.
pub fn layer_writes(rng: &mut Rng, size: u64, block: u64, n: usize) -> Vec<(u64, u64)> {
    let mut w = Vec::new();
    let pages = size / K4;
    for _ in 0..n {
        let len = (1 + rng.below(48)) * K4;
        let off = rng.below(pages - len / K4 + 1) * K4;
        w.push((off, len));
    }
    // Straddle a block boundary of this layer (or the middle, for blocks
    // as large as the disk).
    let boundary = if block < size {
        (1 + rng.below((size - 1) / block)) * block
    } else {
        size / 2 / K4 * K4
    };
    let before = (1 + rng.below(8)) * K4;
    let after = ((1 + rng.below(8)) * K4).min(size - boundary);
    w.push((boundary - before, before + after));
    w.push((size - K4, K4));
    w
}

/// Build the chain `specs` (base first) in `dir` bottom-up with `chainfs
/// create` / `chainfs write`: `writes` random 4 KiB-aligned writes per
/// layer plus one across a block boundary of the layer and one at the end
/// of the disk ([`layer_writes`]); `lss` is the logical sector size of a
/// VHDX base (VHD has 512 only).
pub fn build(dir: &Path, size: u64, lss: u32, specs: &[Spec], writes: usize, seed: u64) -> Built {
    fs::create_dir_all(dir).unwrap();
    let mut rng = Rng(seed);
    let mut model = vec![0u8; size as usize];
    let mut snaps = Vec::new();
    let scratch = dir.join("..").join(format!("scratch-{seed}"));
    for (i, sp) in specs.iter().enumerate() {
        let path = dir.join(sp.name);
        let bs = format!("{}", sp.block);
        if i == 0 {
            let mut args = vec![
                "create".to_string(),
                p(&path).to_string(),
                "--size".into(),
                size.to_string(),
                "--block-size".into(),
                bs,
            ];
            if path.extension().is_some_and(|x| x == "vhdx") {
                args.extend(["--logical-sector".into(), lss.to_string()]);
            }
            if sp.fixed {
                args.extend(["--type".into(), "fixed".into()]);
            }
            let argv: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
            chainfs_ok(&argv);
        } else {
            let parent = dir.join(specs[i - 1].name);
            chainfs_ok(&[
                "create",
                p(&path),
                "--parent",
                p(&parent),
                "--block-size",
                &bs,
            ]);
        }
        for (off, len) in layer_writes(&mut rng, size, sp.block, writes) {
            let data = rng.bytes(len as usize);
            chainfs_write_mirrored(&path, off, &data, &scratch, &mut model);
        }
        snaps.push(model.clone());
    }
    let _ = fs::remove_file(&scratch);
    Built {
        dir: dir.to_path_buf(),
        names: specs.iter().map(|s| s.name).collect(),
        snaps,
    }
}

/// A tmpfs of `size` at `dir` (root only), unmounted on drop: a small
/// file system to fill up, or one to make read-only.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "mount tmpfs: {}", text(&o));
        Tmpfs(dir.to_path_buf())
    }

    /// Remount it read-only: even root cannot create files in it.
    pub fn read_only(&self) {
        let o = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(o.status.success(), "remount tmpfs ro: {}", text(&o));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

// ---------------------------------------------------------------------------
// The page cache: what a test's own files hold in it.

pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .len()
}

/// The share of `[off, off + len)` of `path` in the page cache (`mincore`;
/// `off` a multiple of the page size).
pub fn cached_share(path: &Path, off: u64, len: u64) -> f64 {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let page = 4096u64;
    let mut vec = vec![0u8; len.div_ceil(page) as usize];
    // SAFETY: a read-only shared mapping of a file we opened, unmapped
    // below; mincore writes one byte per page into `vec`, which holds as
    // many.
    unsafe {
        let m = libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            off as libc::off_t,
        );
        assert_ne!(m, libc::MAP_FAILED, "mmap {}", path.display());
        let r = libc::mincore(m, len as usize, vec.as_mut_ptr());
        libc::munmap(m, len as usize);
        assert_eq!(r, 0, "mincore {}", path.display());
    }
    vec.iter().filter(|&&b| b & 1 != 0).count() as f64 / vec.len() as f64
}

/// Write `path` back and drop its pages from the page cache (the test's
/// own file: nothing else is touched).
pub fn evict(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: advice on a descriptor we own; no memory is involved.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise {}", path.display());
}

/// Does the file system under `dir` take `O_DIRECT`? Under CI it must
/// (the work dir is ext4); elsewhere the test prints why it skips.
pub fn require_direct_io(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join("direct-probe");
    std::fs::write(&probe, vec![0u8; 4096]).unwrap();
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .is_ok();
    std::fs::remove_file(&probe).unwrap();
    require(&format!("O_DIRECT under {}", dir.display()), ok)
}
