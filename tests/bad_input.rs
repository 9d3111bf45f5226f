//! Bad input gets a clear error and loses nothing.
//!
//! Each test builds valid images with the CLI, breaks a copy with a small
//! byte patch (re-checksummed through `Footer`/`DynamicHeader` where the
//! test needs a valid checksum over a bad value), and runs the read-only
//! commands `info`, `check` and `export` on it. Every run must:
//! * not panic: the exit code is a documented one (never 101, never a
//!   signal) and stderr has no "panicked";
//! * exit with the code the case calls for;
//! * name the file, and for a corrupt structure the absolute offset of the
//!   bad field, in its message;
//! * leave every file of the chain byte for byte as it was (sha256 of every
//!   file in the image folder before and after, on success and on error).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chainfs::format::vhd::{checksum, DynamicHeader, Footer};
use common::{chainfs_ok, sha256_file};
use tempfile::TempDir;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

// ---------------------------------------------------------------------------
// Running the CLI

/// One finished `chainfs` run that did not panic.
struct Run {
    args: Vec<String>,
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// Exit code `code` and every needle somewhere in stdout or stderr.
    fn expect(&self, code: i32, needles: &[&str]) -> &Self {
        assert_eq!(
            self.code, code,
            "chainfs {:?}: exit {} (wanted {code})\nstdout: {}\nstderr: {}",
            self.args, self.code, self.stdout, self.stderr
        );
        let text = self.text();
        for n in needles {
            assert!(
                text.contains(n),
                "chainfs {:?}: output lacks {n:?}\nstdout: {}\nstderr: {}",
                self.args,
                self.stdout,
                self.stderr
            );
        }
        self
    }
}

/// The exit codes the CLI documents (2 is clap's usage error).
const DOCUMENTED: std::ops::RangeInclusive<i32> = 0..=9;

fn run(args: &[&str]) -> Run {
    // The default log filter (warn) is part of what is tested: the
    // fallback to the footer copy must be visible.
    let o = Command::new(common::bin())
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("cannot run chainfs");
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let code = o
        .status
        .code()
        .unwrap_or_else(|| panic!("chainfs {args:?} died by a signal ({}): {stderr}", o.status));
    assert!(
        code != 101 && !stderr.contains("panicked"),
        "chainfs {args:?} panicked (exit {code}):\n{stderr}"
    );
    assert!(
        DOCUMENTED.contains(&code),
        "chainfs {args:?}: undocumented exit code {code}:\n{stderr}"
    );
    Run {
        args: args.iter().map(|s| s.to_string()).collect(),
        code,
        stdout,
        stderr,
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// A folder of images plus a separate folder for export outputs and
/// scratch input, so that "every file of the chain" is one directory.
struct Lab {
    dir: TempDir,
    out: TempDir,
    n: std::cell::Cell<u32>,
}

impl Lab {
    fn new() -> Lab {
        Lab {
            dir: TempDir::new().unwrap(),
            out: TempDir::new().unwrap(),
            n: 0.into(),
        }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn next(&self) -> u32 {
        self.n.set(self.n.get() + 1);
        self.n.get()
    }

    /// A dynamic base disk.
    fn base(&self, name: &str, size: u64, block: u64) -> PathBuf {
        let p = self.p(name);
        chainfs_ok(&[
            "create",
            s(&p),
            "--size",
            &size.to_string(),
            "--block-size",
            &block.to_string(),
        ]);
        p
    }

    fn fixed(&self, name: &str, size: u64) -> PathBuf {
        let p = self.p(name);
        chainfs_ok(&[
            "create",
            s(&p),
            "--size",
            &size.to_string(),
            "--type",
            "fixed",
        ]);
        p
    }

    fn child(&self, name: &str, parent: &Path) -> PathBuf {
        let p = self.p(name);
        chainfs_ok(&["create", s(&p), "--parent", s(parent)]);
        p
    }

    fn write(&self, img: &Path, offset: u64, data: &[u8]) {
        let input = self.out.path().join(format!("input-{}", self.next()));
        fs::write(&input, data).unwrap();
        chainfs_ok(&[
            "write",
            s(img),
            "--offset",
            &offset.to_string(),
            "--input",
            s(&input),
        ]);
        fs::remove_file(&input).unwrap();
    }

    /// sha256 of every file in the image folder.
    fn snapshot(&self) -> BTreeMap<PathBuf, String> {
        let mut m = BTreeMap::new();
        for e in fs::read_dir(self.dir.path()).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                m.insert(p.clone(), sha256_file(&p));
            }
        }
        m
    }

    /// Run a read-only command and insist that it changed no file.
    fn read_only(&self, args: &[&str]) -> Run {
        let before = self.snapshot();
        let r = run(args);
        let after = self.snapshot();
        assert_eq!(
            before, after,
            "chainfs {args:?} (exit {}) changed files it only had to read",
            r.code
        );
        r
    }

    fn info(&self, img: &Path, extra: &[&str]) -> Run {
        let mut a = vec!["info", s(img)];
        a.extend_from_slice(extra);
        self.read_only(&a)
    }

    fn info_json(&self, img: &Path, extra: &[&str]) -> Run {
        let mut a = vec!["info", s(img), "--json"];
        a.extend_from_slice(extra);
        self.read_only(&a)
    }

    fn check(&self, img: &Path, extra: &[&str]) -> Run {
        let mut a = vec!["check", s(img)];
        a.extend_from_slice(extra);
        let r = self.read_only(&a);
        // The JSON form must agree on the exit code.
        let mut j = a.clone();
        j.push("--json");
        let rj = self.read_only(&j);
        assert_eq!(
            r.code,
            rj.code,
            "check and check --json disagree: {}",
            rj.text()
        );
        if rj.code == 0 || (rj.code == 3 && !rj.stdout.is_empty()) {
            let v: serde_json::Value = serde_json::from_str(&rj.stdout)
                .unwrap_or_else(|e| panic!("check --json printed no JSON ({e}): {}", rj.stdout));
            assert_eq!(v["clean"], serde_json::Value::Bool(rj.code == 0));
        }
        r
    }

    /// Export to a fresh file; returns the run and the output path.
    fn export(&self, img: &Path, extra: &[&str]) -> (Run, PathBuf) {
        let out = self.out.path().join(format!("export-{}.raw", self.next()));
        let mut a = vec!["export", s(img), s(&out)];
        a.extend_from_slice(extra);
        (self.read_only(&a), out)
    }

    fn export_sha(&self, img: &Path, extra: &[&str]) -> String {
        let (r, out) = self.export(img, extra);
        r.expect(0, &[]);
        let h = sha256_file(&out);
        fs::remove_file(out).unwrap();
        h
    }

    /// `info`, `check` and `export` all fail with `code` and all name
    /// every needle (for `check`, a leaf that does not open is an error,
    /// not a list of problems, so the code is the same).
    fn all_fail(&self, img: &Path, extra: &[&str], code: i32, needles: &[&str]) {
        self.info(img, extra).expect(code, needles);
        self.info_json(img, extra).expect(code, needles);
        self.check(img, extra).expect(code, needles);
        let (r, out) = self.export(img, extra);
        r.expect(code, needles);
        let _ = fs::remove_file(out);
    }
}

/// Non-zero, position-dependent bytes.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(31)
                .wrapping_add(seed as u32 * 7 + 1) as u8
                | 1
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Patching

fn file_len(p: &Path) -> u64 {
    fs::metadata(p).unwrap().len()
}

fn patch(p: &Path, off: u64, bytes: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn read_at(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = fs::File::open(p).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

fn tail_off(p: &Path) -> u64 {
    file_len(p) - 512
}

#[derive(Clone, Copy)]
enum Which {
    Tail,
    Copy,
    Both,
}

/// Rewrite the footer(s) through `Footer` (so the checksum is valid).
fn edit_footer(p: &Path, which: Which, f: impl Fn(&mut Footer)) {
    let offs = match which {
        Which::Tail => vec![tail_off(p)],
        Which::Copy => vec![0],
        Which::Both => vec![0, tail_off(p)],
    };
    for off in offs {
        let mut ft = Footer::parse(&read_at(p, off, 512), false).unwrap();
        f(&mut ft);
        patch(p, off, &ft.to_bytes());
    }
}

fn footer(p: &Path) -> Footer {
    Footer::parse(&read_at(p, tail_off(p), 512), false).unwrap()
}

const HEADER_AT: u64 = 512;

fn header(p: &Path) -> DynamicHeader {
    DynamicHeader::parse(&read_at(p, HEADER_AT, 1024), false).unwrap()
}

/// Rewrite the dynamic header through `DynamicHeader` (valid checksum).
fn edit_header(p: &Path, f: impl Fn(&mut DynamicHeader)) {
    let mut h = header(p);
    f(&mut h);
    patch(p, HEADER_AT, &h.to_bytes());
}

/// Patch raw header bytes and fix the checksum (for fields the struct
/// does not carry).
fn edit_header_raw(p: &Path, f: impl Fn(&mut [u8])) {
    let mut b = read_at(p, HEADER_AT, 1024);
    f(&mut b);
    let c = checksum(&b, 36);
    b[36..40].copy_from_slice(&c.to_be_bytes());
    patch(p, HEADER_AT, &b);
}

fn bat_off(p: &Path, block: u64) -> u64 {
    header(p).table_offset + 4 * block
}

fn bat(p: &Path, block: u64) -> u32 {
    u32::from_be_bytes(read_at(p, bat_off(p, block), 4).try_into().unwrap())
}

fn set_bat(p: &Path, block: u64, v: u32) {
    patch(p, bat_off(p, block), &v.to_be_bytes());
}

fn hex(off: u64) -> String {
    format!("offset {off:#x}")
}

/// A dynamic 8 MiB disk of 512 KiB blocks with data in blocks 0, 1, 2 and 9.
fn dyn_with_data(lab: &Lab, name: &str) -> PathBuf {
    let p = lab.base(name, 8 * MIB, 512 * KIB);
    lab.write(&p, 1000, &pattern(600 * KIB as usize, 1));
    lab.write(&p, 1024 * KIB + 5, &pattern(100, 2));
    lab.write(&p, 9 * 512 * KIB + 4096, &pattern(8192, 3));
    p
}

/// base (dynamic, data) <- child (differencing, data); returns both.
fn two_layer(lab: &Lab) -> (PathBuf, PathBuf) {
    let base = dyn_with_data(lab, "base.vhd");
    let child = lab.child("child.vhd", &base);
    lab.write(&child, 3 * MIB + 17, &pattern(5000, 4));
    (base, child)
}

fn copy(lab: &Lab, from: &Path, name: &str) -> PathBuf {
    let to = lab.p(name);
    fs::copy(from, &to).unwrap();
    to
}

// ---------------------------------------------------------------------------
// The footer

#[test]
fn trailing_footer_bad_cookie_falls_back_to_copy_and_check_reports_it() {
    let lab = Lab::new();
    let good = dyn_with_data(&lab, "good.vhd");
    let want = lab.export_sha(&good, &[]);
    let bad = copy(&lab, &good, "bad.vhd");
    let t = tail_off(&bad);
    patch(&bad, t, b"CONECTIX");

    // Readable through the copy at offset 0, with a warning that says so.
    lab.info(&bad, &[])
        .expect(0, &[s(&bad), &hex(t), "conectix", "offset 0"]);
    assert_eq!(lab.export_sha(&bad, &[]), want, "fallback reads other data");
    // ... but `check` must not call it clean.
    lab.check(&bad, &[])
        .expect(3, &[s(&bad), &hex(t), "cookie"]);
}

#[test]
fn both_footers_bad_cookie_is_not_a_vhd() {
    let lab = Lab::new();
    let bad = dyn_with_data(&lab, "bad.vhd");
    patch(&bad, 0, b"CONECTIX");
    patch(&bad, tail_off(&bad), b"CONECTIX");
    // Recognised by its dynamic header at 0x200, and said so.
    lab.all_fail(
        &bad,
        &[],
        6,
        &[s(&bad), "conectix", "a dynamic VHD", "0x200"],
    );
}

#[test]
fn fixed_disk_bad_cookie_is_not_a_vhd() {
    let lab = Lab::new();
    let bad = lab.fixed("fixed.vhd", 64 * KIB);
    patch(&bad, tail_off(&bad), b"xxxxxxxx");
    // Zeros and no footer: nothing to recognise, the cookies are named.
    lab.all_fail(&bad, &[], 6, &[s(&bad), "conectix", "vhdxfile"]);
}

#[test]
fn footer_copy_at_zero_bad_is_reported_by_check_only() {
    let lab = Lab::new();
    let good = dyn_with_data(&lab, "good.vhd");
    let want = lab.export_sha(&good, &[]);
    let bad = copy(&lab, &good, "bad.vhd");
    patch(&bad, 0, b"CONECTIX");
    lab.info(&bad, &[]).expect(0, &[]);
    assert_eq!(lab.export_sha(&bad, &[]), want);
    lab.check(&bad, &[])
        .expect(3, &[s(&bad), "offset 0x0", "footer copy"]);
    // A well-formed copy that disagrees with the trailing footer.
    let other = copy(&lab, &good, "other.vhd");
    edit_footer(&other, Which::Copy, |f| {
        f.unique_id = uuid::Uuid::from_u128(7)
    });
    lab.info(&other, &[]).expect(0, &[]);
    lab.check(&other, &[])
        .expect(3, &[s(&other), "offset 0x0", "footer copy differs"]);
}

#[test]
fn bad_footer_checksum_in_both_copies() {
    let lab = Lab::new();
    let good = dyn_with_data(&lab, "good.vhd");
    let want = lab.export_sha(&good, &[]);
    let bad = copy(&lab, &good, "bad.vhd");
    let t = tail_off(&bad);
    // Flip a byte of the unique id: the stored checksum no longer matches.
    for off in [70, t + 70] {
        let b = read_at(&bad, off, 1)[0];
        patch(&bad, off, &[b ^ 0x55]);
    }
    lab.all_fail(&bad, &[], 3, &[s(&bad), &hex(t + 64), "checksum"]);

    // The override reads it (and is reported by check, which still fails).
    lab.info(&bad, &["--ignore-checksum"]).expect(0, &[]);
    assert_eq!(lab.export_sha(&bad, &["--ignore-checksum"]), want);
    lab.check(&bad, &["--ignore-checksum"])
        .expect(3, &[s(&bad), &hex(t + 64), "checksum"]);
}

#[test]
fn bad_trailing_footer_checksum_falls_back_to_copy() {
    let lab = Lab::new();
    let good = dyn_with_data(&lab, "good.vhd");
    let want = lab.export_sha(&good, &[]);
    let bad = copy(&lab, &good, "bad.vhd");
    let t = tail_off(&bad);
    patch(&bad, t + 64, &[0, 0, 0, 0]);
    lab.info(&bad, &[]).expect(0, &[]);
    assert_eq!(lab.export_sha(&bad, &[]), want);
    lab.check(&bad, &[])
        .expect(3, &[s(&bad), &hex(t + 64), "checksum"]);
}

#[test]
fn fixed_disk_bad_checksum_has_no_fallback() {
    let lab = Lab::new();
    let bad = lab.fixed("fixed.vhd", 64 * KIB);
    let t = tail_off(&bad);
    patch(&bad, t + 100, &[0xAB]);
    lab.all_fail(&bad, &[], 3, &[s(&bad), &hex(t + 64), "checksum"]);
    lab.info(&bad, &["--ignore-checksum"]).expect(0, &[]);
}

// ---------------------------------------------------------------------------
// The dynamic header

#[test]
fn bad_dynamic_header_checksum() {
    let lab = Lab::new();
    let good = dyn_with_data(&lab, "good.vhd");
    let want = lab.export_sha(&good, &[]);
    let bad = copy(&lab, &good, "bad.vhd");
    patch(&bad, HEADER_AT + 900, &[0x42]);
    lab.all_fail(&bad, &[], 3, &[s(&bad), &hex(HEADER_AT + 36), "checksum"]);
    lab.info(&bad, &["--ignore-checksum"]).expect(0, &[]);
    assert_eq!(lab.export_sha(&bad, &["--ignore-checksum"]), want);
    lab.check(&bad, &["--ignore-checksum"])
        .expect(3, &[s(&bad), &hex(HEADER_AT + 36), "checksum"]);
}

#[test]
fn bad_dynamic_header_cookie() {
    let lab = Lab::new();
    let bad = dyn_with_data(&lab, "bad.vhd");
    patch(&bad, HEADER_AT, b"CXSPARSE");
    lab.all_fail(&bad, &[], 3, &[s(&bad), &hex(HEADER_AT), "cxsparse"]);
}

#[test]
fn unsupported_dynamic_header_version() {
    let lab = Lab::new();
    let bad = dyn_with_data(&lab, "bad.vhd");
    edit_header_raw(&bad, |b| {
        b[24..28].copy_from_slice(&0x0002_0000u32.to_be_bytes())
    });
    lab.all_fail(&bad, &[], 3, &[s(&bad), &hex(HEADER_AT + 24), "version"]);
}

#[test]
fn absurd_current_size() {
    let lab = Lab::new();
    let good = dyn_with_data(&lab, "good.vhd");
    for (i, size) in [2041 * 1024 * MIB, u64::MAX - 511, 8 * MIB + 1]
        .into_iter()
        .enumerate()
    {
        let bad = copy(&lab, &good, &format!("size{i}.vhd"));
        edit_footer(&bad, Which::Both, |f| f.current_size = size);
        let t = tail_off(&bad);
        lab.all_fail(&bad, &[], 3, &[s(&bad), &hex(t + 48), &size.to_string()]);
        fs::remove_file(bad).unwrap();
    }
    // Fixed: a size larger than the data in the file.
    let fixed = lab.fixed("fixed.vhd", 64 * KIB);
    edit_footer(&fixed, Which::Tail, |f| f.current_size = 1024 * MIB);
    lab.all_fail(&fixed, &[], 3, &[s(&fixed), "truncated"]);
}

#[test]
fn bad_block_sizes() {
    let lab = Lab::new();
    let good = dyn_with_data(&lab, "good.vhd");
    for (i, bs) in [3 * 512 * KIB as u32, 0, 1 << 30, 256, 1000]
        .into_iter()
        .enumerate()
    {
        let bad = copy(&lab, &good, &format!("bs{i}.vhd"));
        edit_header(&bad, |h| h.block_size = bs);
        lab.all_fail(
            &bad,
            &[],
            3,
            &[s(&bad), &hex(HEADER_AT + 32), &format!("block size {bs}")],
        );
        fs::remove_file(bad).unwrap();
    }
}

#[test]
fn max_table_entries_too_small_or_too_large() {
    let lab = Lab::new();
    let good = dyn_with_data(&lab, "good.vhd");
    let small = copy(&lab, &good, "small.vhd");
    edit_header(&small, |h| h.max_table_entries = 3);
    lab.all_fail(
        &small,
        &[],
        3,
        &[s(&small), &hex(HEADER_AT + 28), "3 entries"],
    );
    let none = copy(&lab, &good, "none.vhd");
    edit_header(&none, |h| h.max_table_entries = 0);
    lab.all_fail(&none, &[], 3, &[s(&none), &hex(HEADER_AT + 28)]);
    // Far more entries than the file can hold: the BAT runs past the footer.
    let big = copy(&lab, &good, "big.vhd");
    edit_header(&big, |h| h.max_table_entries = u32::MAX);
    lab.all_fail(
        &big,
        &[],
        3,
        &[s(&big), &hex(HEADER_AT + 16), "past the footer"],
    );
}

#[test]
fn bat_offset_unaligned_or_past_eof() {
    let lab = Lab::new();
    let good = dyn_with_data(&lab, "good.vhd");
    let unaligned = copy(&lab, &good, "unaligned.vhd");
    edit_header(&unaligned, |h| h.table_offset += 4);
    lab.all_fail(&unaligned, &[], 3, &[s(&unaligned), &hex(HEADER_AT + 16)]);
    let past = copy(&lab, &good, "past.vhd");
    let len = file_len(&past);
    edit_header(&past, |h| h.table_offset = len.next_multiple_of(512) + 512);
    lab.all_fail(
        &past,
        &[],
        3,
        &[s(&past), &hex(HEADER_AT + 16), "past the footer"],
    );
}

/// A BAT offset so close to 2^64 that `table_offset + entries * 4`
/// overflows: must be "corrupt", not an arithmetic-overflow panic.
#[test]
fn bat_offset_near_u64_max() {
    let lab = Lab::new();
    // 2048 entries (8 KiB of BAT), more than the 512 bytes left below 2^64.
    let bad = lab.base("bad.vhd", 8 * MIB, 4 * KIB);
    edit_header(&bad, |h| h.table_offset = u64::MAX - 511);
    lab.all_fail(&bad, &[], 3, &[s(&bad), &hex(HEADER_AT + 16)]);
}

#[test]
fn header_offset_in_footer_past_eof() {
    let lab = Lab::new();
    let good = dyn_with_data(&lab, "good.vhd");
    for (i, off) in [file_len(&good).next_multiple_of(512), u64::MAX - 511]
        .into_iter()
        .enumerate()
    {
        let bad = copy(&lab, &good, &format!("ho{i}.vhd"));
        edit_footer(&bad, Which::Both, |f| f.data_offset = off);
        lab.all_fail(
            &bad,
            &[],
            3,
            &[s(&bad), "dynamic header offset", &format!("{off:#x}")],
        );
        fs::remove_file(bad).unwrap();
    }
}

// ---------------------------------------------------------------------------
// Truncation

#[test]
fn truncated_below_one_footer_is_a_clear_error() {
    let lab = Lab::new();
    let good = dyn_with_data(&lab, "good.vhd");
    for len in [0u64, 1, 8, 100, 511] {
        let bad = copy(&lab, &good, &format!("cut{len}.vhd"));
        fs::OpenOptions::new()
            .write(true)
            .open(&bad)
            .unwrap()
            .set_len(len)
            .unwrap();
        // Under 512 bytes there is no footer to find: "not a disk image".
        lab.all_fail(&bad, &[], 6, &[s(&bad)]);
        fs::remove_file(bad).unwrap();
    }
}

#[test]
fn truncated_in_the_metadata() {
    let lab = Lab::new();
    let good = dyn_with_data(&lab, "good.vhd");
    let h = header(&good);
    let bat_len = h.max_table_entries as u64 * 4;
    // Only the footer copy; mid header; after the header; mid BAT; just
    // before the end of the BAT.
    for len in [
        512,
        1000,
        1536,
        h.table_offset + bat_len / 2,
        h.table_offset + bat_len - 1,
    ] {
        let bad = copy(&lab, &good, &format!("cut{len}.vhd"));
        fs::OpenOptions::new()
            .write(true)
            .open(&bad)
            .unwrap()
            .set_len(len)
            .unwrap();
        lab.all_fail(&bad, &[], 3, &[s(&bad), "offset 0x"]);
        fs::remove_file(bad).unwrap();
    }
}

#[test]
fn truncated_in_the_data() {
    let lab = Lab::new();
    let good = dyn_with_data(&lab, "good.vhd");
    let last_block_start = (0..16u64)
        .map(|b| bat(&good, b))
        .filter(|&e| e != u32::MAX)
        .max()
        .unwrap() as u64
        * 512;
    let full = file_len(&good);
    for len in [last_block_start + 512 + 100 * KIB, full - 1, full - 511] {
        let bad = copy(&lab, &good, &format!("cut{len}.vhd"));
        fs::OpenOptions::new()
            .write(true)
            .open(&bad)
            .unwrap()
            .set_len(len)
            .unwrap();
        // The trailing footer is gone; the copy at 0 opens the file, and
        // the last block no longer fits: reading it fails, check says so.
        let t = len - 512;
        lab.info(&bad, &[]).expect(0, &[s(&bad), &hex(t)]);
        lab.check(&bad, &[])
            .expect(3, &[s(&bad), &hex(t), "BAT entry 9"]);
        let (r, _) = lab.export(&bad, &[]);
        r.expect(3, &[s(&bad), &hex(bat_off(&bad, 9)), "BAT entry 9"]);
        fs::remove_file(bad).unwrap();
    }
}

// ---------------------------------------------------------------------------
// The BAT

#[test]
fn bat_entry_past_eof() {
    let lab = Lab::new();
    let good = dyn_with_data(&lab, "good.vhd");
    for (i, v) in [(file_len(&good) / 512 + 8) as u32, 0xFFFF_FFFE]
        .into_iter()
        .enumerate()
    {
        let bad = copy(&lab, &good, &format!("past{i}.vhd"));
        set_bat(&bad, 1, v);
        let at = hex(bat_off(&bad, 1));
        lab.info(&bad, &[]).expect(0, &[]);
        lab.check(&bad, &[])
            .expect(3, &[s(&bad), &at, "BAT entry 1", "past the footer"]);
        let (r, _) = lab.export(&bad, &[]);
        r.expect(3, &[s(&bad), &at, "BAT entry 1"]);
        fs::remove_file(bad).unwrap();
    }
}

/// An export that fails half-way (a bad BAT entry is only met while
/// reading) must not leave a full-size file that looks like a good export,
/// nor destroy the file `--force` was going to replace.
#[test]
fn failed_export_leaves_no_partial_output_and_keeps_the_old_one() {
    let lab = Lab::new();
    let bad = dyn_with_data(&lab, "bad.vhd");
    set_bat(&bad, 9, 0x7FFF_FFF0);
    let (r, out) = lab.export(&bad, &[]);
    r.expect(3, &[s(&bad), "BAT entry 9"]);
    assert!(
        !out.exists(),
        "a failed export left {} ({} bytes) behind",
        out.display(),
        file_len(&out)
    );
    let old = lab.out.path().join("precious.raw");
    fs::write(&old, pattern(4096, 8)).unwrap();
    let want = sha256_file(&old);
    lab.read_only(&["export", s(&bad), s(&old), "--force"])
        .expect(3, &[s(&bad), "BAT entry 9"]);
    assert!(
        old.exists(),
        "a failed export --force deleted the file it was to replace"
    );
    assert_eq!(
        sha256_file(&old),
        want,
        "a failed export --force overwrote the file it was to replace"
    );
}

#[test]
fn bat_entries_overlapping_each_other() {
    let lab = Lab::new();
    let good = dyn_with_data(&lab, "good.vhd");
    // Block 2 at block 0's place; then block 2 one sector into block 0.
    for (i, delta) in [0u32, 1].into_iter().enumerate() {
        let bad = copy(&lab, &good, &format!("overlap{i}.vhd"));
        set_bat(&bad, 2, bat(&bad, 0) + delta);
        lab.info(&bad, &[]).expect(0, &[]);
        lab.check(&bad, &[]).expect(
            3,
            &[
                s(&bad),
                &hex(bat_off(&bad, 2)),
                "BAT entry 2",
                "overlaps block 0",
            ],
        );
        // The bytes are inside the file, so reading them is possible.
        lab.export(&bad, &[]).0.expect(0, &[]);
        fs::remove_file(bad).unwrap();
    }
}

#[test]
fn bat_entry_over_the_metadata() {
    let lab = Lab::new();
    let good = dyn_with_data(&lab, "good.vhd");
    let table = header(&good).table_offset;
    // Over the dynamic header, over the BAT itself.
    for (i, (sector, what)) in [(1u32, "dynamic header"), ((table / 512) as u32, "BAT")]
        .into_iter()
        .enumerate()
    {
        let bad = copy(&lab, &good, &format!("meta{i}.vhd"));
        set_bat(&bad, 0, sector);
        lab.info(&bad, &[]).expect(0, &[]);
        lab.check(&bad, &[])
            .expect(3, &[s(&bad), &hex(bat_off(&bad, 0)), "BAT entry 0", what]);
        let (r, _) = lab.export(&bad, &[]);
        assert!(r.code == 0 || r.code == 3, "{}", r.text());
        fs::remove_file(bad).unwrap();
    }
    // Over the footer copy at offset 0: never readable as data.
    let bad = copy(&lab, &good, "zero.vhd");
    set_bat(&bad, 0, 0);
    let at = hex(bat_off(&bad, 0));
    lab.check(&bad, &[])
        .expect(3, &[s(&bad), &at, "BAT entry 0", "footer copy"]);
    lab.export(&bad, &[])
        .0
        .expect(3, &[s(&bad), &at, "BAT entry 0"]);
}

// ---------------------------------------------------------------------------
// Parent locators and links

fn w2ru(h: &DynamicHeader) -> usize {
    h.locators
        .iter()
        .position(|l| &l.code.to_be_bytes() == b"W2ru")
        .expect("our writer stores a W2ru locator")
}

#[test]
fn locator_data_past_eof() {
    let lab = Lab::new();
    let (_base, child) = two_layer(&lab);
    let want = lab.export_sha(&child, &[]);
    let len = file_len(&child);
    let i = w2ru(&header(&child));
    for (n, off) in [len + 4096, u64::MAX - 10].into_iter().enumerate() {
        edit_header(&child, |h| h.locators[i].data_offset = off);
        // The other hints still find the parent.
        lab.info(&child, &[]).expect(0, &[]);
        assert_eq!(lab.export_sha(&child, &[]), want, "case {n}");
        lab.check(&child, &[]).expect(
            3,
            &[
                s(&child),
                &hex(HEADER_AT + 576 + 24 * i as u64),
                "W2ru",
                "outside the file",
            ],
        );
    }
    // A locator length far too large.
    edit_header(&child, |h| {
        h.locators[i].data_offset = 1536;
        h.locators[i].data_len = u32::MAX;
    });
    lab.info(&child, &[]).expect(0, &[]);
    lab.check(&child, &[])
        .expect(3, &[s(&child), "W2ru", "outside the file"]);
}

#[test]
fn parent_locators_pointing_nowhere() {
    let lab = Lab::new();
    let (base, child) = two_layer(&lab);
    let moved = TempDir::new().unwrap();
    let elsewhere = moved.path().join("base.vhd");
    fs::rename(&base, &elsewhere).unwrap();
    let tried = lab.p("base.vhd");
    let id = footer(&elsewhere).unique_id.to_string();
    for r in [lab.info(&child, &[]), lab.export(&child, &[]).0] {
        r.expect(
            4,
            &[
                s(&child),
                "not found",
                &id,
                "tried",
                s(&tried),
                "W2ru",
                "W2ku",
            ],
        );
    }
    // check lists the broken link as a problem.
    lab.check(&child, &[])
        .expect(3, &[s(&child), "not found", s(&tried)]);
    // Told where to look, everything opens.
    let dir = s(moved.path());
    lab.info(&child, &["--parent-dir", dir])
        .expect(0, &[s(&elsewhere)]);
    // ... but `check` says the locators are stale and how to repair them.
    lab.check(&child, &["--parent-dir", dir]).expect(
        3,
        &["found only through --parent-dir", "chainfs set-parent"],
    );
    let over = format!("{}={}", s(&child), s(&elsewhere));
    lab.info(&child, &["--parent", &over]).expect(0, &[]);
}

#[test]
fn parent_locators_all_unusable_and_no_name() {
    let lab = Lab::new();
    let (_base, child) = two_layer(&lab);
    let len = file_len(&child);
    edit_header(&child, |h| {
        for l in h.locators.iter_mut().filter(|l| l.code != 0) {
            l.data_offset = len + (1 << 20);
        }
        h.parent_name.clear();
    });
    for r in [lab.info(&child, &[]), lab.export(&child, &[]).0] {
        r.expect(4, &[s(&child), "not found"]);
    }
    lab.check(&child, &[]).expect(3, &[s(&child), "not found"]);
}

#[test]
fn parent_with_wrong_unique_id() {
    let lab = Lab::new();
    let (base, child) = two_layer(&lab);
    let want = footer(&base).unique_id;
    // Replace the parent by another disk of the same size.
    fs::remove_file(&base).unwrap();
    let impostor = dyn_with_data(&lab, "base.vhd");
    let got = footer(&impostor).unique_id;
    let needles = [s(&child), s(&impostor), &want.to_string(), &got.to_string()];
    lab.info(&child, &[]).expect(5, &needles);
    lab.export(&child, &[]).0.expect(5, &needles);
    lab.check(&child, &[]).expect(3, &needles);
    // The override opens it, and check still reports the mismatch.
    let ign = ["--ignore-id-mismatch"];
    lab.info(&child, &ign).expect(0, &[s(&impostor)]);
    lab.export(&child, &ign).0.expect(0, &[]);
    lab.check(&child, &ign)
        .expect(3, &[s(&impostor), "id differs"]);
}

#[test]
fn image_that_is_its_own_parent_by_locator() {
    let lab = Lab::new();
    let (base, child) = two_layer(&lab);
    // The child takes the parent's name, so its W2ru `.\base.vhd` and its
    // W2ku path find itself; and it records its own id as the parent's.
    fs::remove_file(&base).unwrap();
    fs::rename(&child, &base).unwrap();
    let me = base;
    let own = footer(&me).unique_id;
    edit_header(&me, |h| h.parent_id = own);
    for r in [lab.info(&me, &[]), lab.export(&me, &[]).0] {
        r.expect(5, &[s(&me), "loops"]);
    }
    lab.check(&me, &[]).expect(3, &[s(&me), "loops"]);
    // With the id check off, the path check still catches it.
    lab.info(&me, &["--ignore-id-mismatch"])
        .expect(5, &[s(&me), "loops"]);
}

#[test]
fn image_that_is_its_own_parent_by_override() {
    let lab = Lab::new();
    let (_base, child) = two_layer(&lab);
    let me = format!("{}={}", s(&child), s(&child));
    // Its own id is not the parent id it records, and it is already in the
    // chain: refused either way (as a mismatch or as a loop).
    lab.info(&child, &["--parent", &me]).expect(5, &[s(&child)]);
    lab.export(&child, &["--parent", &me])
        .0
        .expect(5, &[s(&child)]);
    // Forced past the id check, it is a loop.
    let args = ["--parent", &me, "--ignore-id-mismatch"];
    lab.info(&child, &args).expect(5, &[s(&child), "loops"]);
    lab.export(&child, &args).0.expect(5, &[s(&child), "loops"]);
    lab.check(&child, &args).expect(3, &[s(&child), "loops"]);
    // Recording its own id, it is a loop without any forcing.
    edit_header(&child, |h| h.parent_id = footer(&child).unique_id);
    lab.info(&child, &["--parent", &me])
        .expect(5, &[s(&child), "loops"]);
}

#[test]
fn two_images_that_are_each_others_parent() {
    let lab = Lab::new();
    let base = lab.base("base.vhd", 4 * MIB, 512 * KIB);
    let a = lab.child("a.vhd", &base);
    let b = lab.child("b.vhd", &a);
    // a now claims b as its parent: b -> a -> b.
    let bid = footer(&b).unique_id;
    edit_header(&a, |h| h.parent_id = bid);
    let over = format!("{}={}", s(&a), s(&b));
    for r in [
        lab.info(&b, &["--parent", &over]),
        lab.export(&b, &["--parent", &over]).0,
    ] {
        r.expect(5, &["loops", s(&b)]);
    }
    lab.check(&b, &["--parent", &over]).expect(3, &["loops"]);
}

#[test]
fn chain_deeper_than_256_layers() {
    let lab = Lab::new();
    let mut top = lab.base("l000.vhd", MIB, 512 * KIB);
    lab.write(&top, 0, b"bottom");
    // 256 layers (base + 255 children) open; the 257th is one too many.
    for i in 1..256 {
        top = lab.child(&format!("l{i:03}.vhd"), &top);
    }
    lab.write(&top, 512, b"top");
    lab.info(&top, &[]).expect(0, &["[255]"]);
    lab.check(&top, &[]).expect(0, &[]);
    let (r, out) = lab.export(&top, &[]);
    r.expect(0, &[]);
    let flat = fs::read(out).unwrap();
    assert_eq!(&flat[..6], b"bottom");
    assert_eq!(&flat[512..515], b"top");

    let deep = lab.child("l256.vhd", &top);
    let needles = [s(&deep), "deeper than 256"];
    lab.info(&deep, &[]).expect(5, &needles);
    lab.export(&deep, &[]).0.expect(5, &needles);
    lab.check(&deep, &[]).expect(3, &needles);
}

#[test]
fn child_whose_size_differs_from_its_parent() {
    let lab = Lab::new();
    let (base, child) = two_layer(&lab);
    edit_footer(&child, Which::Both, |f| f.current_size = 4 * MIB);
    let needles = [s(&child), s(&base), "4194304", "8388608"];
    lab.info(&child, &[]).expect(5, &needles);
    lab.export(&child, &[]).0.expect(5, &needles);
    lab.check(&child, &[]).expect(3, &needles);
}

#[test]
fn corrupt_parent_is_named_not_the_child() {
    let lab = Lab::new();
    let (base, child) = two_layer(&lab);
    patch(&base, HEADER_AT + 900, &[0x42]);
    let needles = [s(&base), &hex(HEADER_AT + 36), "checksum"];
    lab.info(&child, &[]).expect(3, &needles);
    lab.export(&child, &[]).0.expect(3, &needles);
    lab.check(&child, &[]).expect(3, &needles);
    lab.info(&child, &["--ignore-checksum"]).expect(0, &[]);
}

#[test]
fn parent_that_is_not_a_vhd() {
    let lab = Lab::new();
    let (base, child) = two_layer(&lab);
    fs::write(&base, pattern(64 * KIB as usize, 9)).unwrap();
    for r in [lab.info(&child, &[]), lab.export(&child, &[]).0] {
        assert!(
            r.code == 4 || r.code == 6,
            "wanted not found (4) or not a disk image (6): {}",
            r.text()
        );
        assert!(r.text().contains(s(&base)), "{}", r.text());
    }
    lab.check(&child, &[]).expect(3, &[s(&base)]);
}

// ---------------------------------------------------------------------------
// Not a VHD at all

#[test]
fn files_that_are_not_vhds() {
    let lab = Lab::new();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut random = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect()
    };
    let rand4k = lab.p("random.bin");
    fs::write(&rand4k, random(4096)).unwrap();
    lab.all_fail(&rand4k, &[], 6, &[s(&rand4k), "not a disk image"]);
    let rand1m = lab.p("random-1m.bin");
    fs::write(&rand1m, random(MIB as usize)).unwrap();
    lab.all_fail(&rand1m, &[], 6, &[s(&rand1m), "not a disk image"]);
    let empty = lab.p("empty.vhd");
    fs::write(&empty, b"").unwrap();
    lab.all_fail(&empty, &[], 6, &[s(&empty), "not a disk image"]);
    // The cookie, then garbage: a corrupt footer, not "not a VHD".
    let cookie = lab.p("cookie.vhd");
    let mut b = random(4096);
    b[..8].copy_from_slice(b"conectix");
    fs::write(&cookie, b).unwrap();
    lab.all_fail(&cookie, &[], 3, &[s(&cookie), "offset 0x"]);

    let dir = lab.dir.path().join("a-directory.vhd");
    fs::create_dir(&dir).unwrap();
    lab.all_fail(&dir, &[], 9, &[s(&dir), "not a regular file"]);
    let missing = lab.p("missing.vhd");
    lab.all_fail(&missing, &[], 4, &[s(&missing)]);
}

/// A FIFO must get "not a regular file" at once, not block in `open()`
/// waiting for a writer that never comes.
#[test]
fn a_fifo_is_refused_without_hanging() {
    let lab = Lab::new();
    let fifo = lab.p("pipe.vhd");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for cmd in ["info", "check"] {
        let mut child = Command::new(common::bin())
            .args([cmd, s(&fifo)])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if start.elapsed() > Duration::from_secs(10) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chainfs {cmd} on a FIFO still blocked after 10 s");
        };
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(status.code(), Some(9), "{cmd}: {err}");
        assert!(
            err.contains("not a regular file") && err.contains(s(&fifo)),
            "{err}"
        );
    }
}

// ---------------------------------------------------------------------------
// Nothing is written on any path

#[test]
fn read_only_commands_never_touch_a_healthy_chain() {
    let lab = Lab::new();
    let (_base, child) = two_layer(&lab);
    lab.info(&child, &[]).expect(0, &[]);
    lab.info_json(&child, &[]).expect(0, &[]);
    lab.check(&child, &[]).expect(0, &["clean"]);
    lab.export(&child, &[]).0.expect(0, &[]);
    // An export onto a file of the chain is refused and changes nothing.
    let onto = lab.read_only(&["export", s(&child), s(&lab.p("base.vhd"))]);
    assert_ne!(onto.code, 0, "{}", onto.text());
}

/// `write` changes the leaf it was asked to change, and nothing else: not
/// the parent, not on success, not on a refused write.
#[test]
fn write_changes_only_the_leaf() {
    let lab = Lab::new();
    let (base, child) = two_layer(&lab);
    let parent_sha = sha256_file(&base);
    lab.write(&child, 12345, &pattern(70000, 5));
    assert_eq!(
        sha256_file(&base),
        parent_sha,
        "write to the child changed the parent"
    );
    // Past the end: refused, nothing changes.
    let before = lab.snapshot();
    let input = lab.out.path().join("big");
    fs::write(&input, pattern(4096, 6)).unwrap();
    let r = run(&[
        "write",
        s(&child),
        "--offset",
        &(8 * MIB - 100).to_string(),
        "--input",
        s(&input),
    ]);
    r.expect(9, &[s(&child)]);
    assert_eq!(lab.snapshot(), before, "a refused write changed files");
    // Into a child whose parent is corrupt: refused, nothing changes.
    patch(&base, HEADER_AT + 900, &[0x42]);
    let before = lab.snapshot();
    let r = run(&["write", s(&child), "--offset", "0", "--input", s(&input)]);
    r.expect(3, &[s(&base)]);
    assert_eq!(lab.snapshot(), before, "a refused write changed files");
}
