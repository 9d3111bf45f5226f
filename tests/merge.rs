//! Merges (issue 4), for real: real files, real FUSE mounts, real loop
//! devices.
//!
//! * Offline `chainfs merge` on 4–5 layer chains (into the parent, into a
//!   grandparent, leaf into base, a middle layer into base, `--keep`):
//!   flattened content against a model, `check`, `info --json`, the retired
//!   files, and libvhdi (`vhdimount`) as an independent reader.
//! * Refusals: exit codes, messages, and not one byte changed.
//! * Control-file merges on mounts: replies, `jobs/N`, EBUSY, cancel,
//!   EROFS, ENOENT, EINVAL.
//! * The view stays identical while merges run: hashing readers, and an
//!   ext4 filesystem loop-mounted from `disk.raw`.
//! * Writes during a merge of the leaf are never lost.
//! * Crash safety: fault injection at every write/sync point
//!   (`CHAINFS_FAULT_AFTER=k`), and `kill -9` of a daemon mid-merge.
//!
//! Chains are built with `chainfs create` / `chainfs write` from seeded
//! random data, 4 KiB aligned, so libvhdi can serve as an oracle.
//!
//! The offline merges, the crash loops, the readers hashing `disk.raw`,
//! the loop-mounted ext4, writes during merges and kill -9 of the daemon
//! run once per format (`per_format!` at the end: `vhd::NAME`,
//! `vhdx::NAME`, `qcow2::NAME`); after every merge each child must name its
//! parent by the parent's current identity in its own bytes
//! (`common::link_problems`; a qcow2 links by name, checked through
//! `info`), and a merge down to the base leaves a base qemu reads as the
//! chain did. libvhdi reads no qcow2: there qemu-img reads every level
//! after an offline merge and checks every layer a crash left (leaks
//! allowed). A qcow2 has no fixed type, so the fixed-base merge is VHD and
//! VHDX only. The control-file and refusal cases run on VHD.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

const K4: u64 = 4096;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------
// Small helpers.

/// sha256 of every file in `dir` (hidden ones too), by name.
fn hashes(dir: &Path) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            m.insert(
                e.file_name().to_string_lossy().into_owned(),
                sha256_file(&e.path()),
            );
        }
    }
    m
}

/// Merge records (and their temp files) in `dir`.
fn records(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("chainfs-merge"))
        .collect();
    v.sort();
    v
}

fn drop_caches() {
    fs::write("/proc/sys/vm/drop_caches", "3").expect("cannot drop caches (needs root)");
}

// ---------------------------------------------------------------------------
// Chains and what they should read.

/// One layer to build: base (first) or differencing child, and the
/// 4 KiB-aligned (offset, length) writes that go into it.
struct Spec {
    name: &'static str,
    block: &'static str,
    fixed: bool,
    writes: Vec<(u64, u64)>,
}

/// A chain on disk and its model.
struct Built {
    dir: PathBuf,
    /// Base first.
    names: Vec<String>,
    /// The flattened content as seen from each layer, base first.
    snaps: Vec<Vec<u8>>,
}

impl Built {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn leaf(&self) -> PathBuf {
        self.dir.join(self.names.last().unwrap())
    }

    fn model(&self) -> &[u8] {
        self.snaps.last().unwrap()
    }
}

fn build(dir: &Path, size: u64, specs: &[Spec], seed: u64) -> Built {
    fs::create_dir_all(dir).unwrap();
    let mut rng = Rng(seed);
    let mut model = vec![0u8; size as usize];
    let scratch = dir.join("scratch.bin");
    let mut names: Vec<String> = Vec::new();
    let mut snaps = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let path = dir.join(s.name);
        if i == 0 {
            let kind = if s.fixed { "fixed" } else { "dynamic" };
            assert!(
                !s.fixed || path.extension().is_none_or(|x| x != "qcow2"),
                "a qcow2 has no fixed type"
            );
            chainfs_ok(&[
                "create",
                p(&path),
                "--size",
                &size.to_string(),
                "--type",
                kind,
                "--block-size",
                s.block,
            ]);
        } else {
            let parent = dir.join(&names[i - 1]);
            chainfs_ok(&[
                "create",
                p(&path),
                "--parent",
                p(&parent),
                "--block-size",
                s.block,
            ]);
        }
        for &(off, len) in &s.writes {
            assert!(off % K4 == 0 && len % K4 == 0 && off + len <= size);
            let data = rng.bytes(len as usize);
            chainfs_write(&path, off, &data, &scratch);
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        names.push(s.name.to_string());
        snaps.push(model.clone());
    }
    fs::remove_file(&scratch).ok();
    Built {
        dir: dir.to_path_buf(),
        names,
        snaps,
    }
}

/// Writes for layer number `layer`: two spots every layer writes (so
/// layers shadow each other, one across a 2 MiB block boundary) plus `n`
/// random 4 KiB-aligned writes of up to `max` bytes.
fn scattered(rng: &mut Rng, size: u64, n: usize, max: u64, layer: u64) -> Vec<(u64, u64)> {
    let mut w = vec![
        (2 * MIB - K4 * (2 + layer), K4 * (3 + 2 * layer)),
        (size / 2 + K4 * layer, 16 * K4),
    ];
    for _ in 0..n {
        let len = K4 * (1 + rng.below(max / K4));
        let off = K4 * rng.below((size - len) / K4 + 1);
        w.push((off, len));
    }
    w
}

/// A 16 MiB chain named `names` (base first); block sizes alternate
/// 512 KiB (VHDX: 1 MiB) and 2 MiB; `n` random writes per layer besides the shared spots.
fn small_chain(dir: &Path, names: &[&'static str], fixed_base: bool, n: usize, seed: u64) -> Built {
    sized_chain(dir, 16 * MIB, names, fixed_base, n, seed)
}

fn sized_chain(
    dir: &Path,
    size: u64,
    names: &[&'static str],
    fixed_base: bool,
    n: usize,
    seed: u64,
) -> Built {
    let mut rng = Rng(seed ^ 0x5eed);
    // VHDX blocks are 1 MiB at least.
    let small = if names[0].ends_with(".vhdx") {
        "1M"
    } else {
        "512K"
    };
    let specs: Vec<Spec> = names
        .iter()
        .enumerate()
        .map(|(i, name)| Spec {
            name,
            block: if i % 2 == 0 { small } else { "2M" },
            fixed: i == 0 && fixed_base,
            writes: scattered(&mut rng, size, n, 128 * 1024, i as u64),
        })
        .collect();
    build(dir, size, &specs, seed)
}

/// One layer as `chainfs info --json` shows it.
#[derive(Debug, Clone)]
struct LayerInfo {
    name: String,
    /// None for a format without ids (qcow2 links by name alone).
    id: Option<String>,
    parent_id: Option<String>,
    resolved: Option<String>,
}

/// `chainfs info --json IMG`, leaf first; Err((exit status, output)).
fn info(img: &Path) -> Result<Vec<LayerInfo>, (i32, String)> {
    let o = chainfs(&["info", "--json", p(img)]);
    if !o.status.success() {
        return Err((code(&o), text(&o)));
    }
    let v: Value = serde_json::from_slice(&o.stdout).expect("info --json prints JSON");
    Ok(v.as_array()
        .expect("an array of layers")
        .iter()
        .map(|l| LayerInfo {
            name: Path::new(l["path"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
            id: l["unique_id"].as_str().map(String::from),
            parent_id: l["parent_id"].as_str().map(String::from),
            resolved: l["parent_resolved"].as_str().map(String::from),
        })
        .collect())
}

fn names_of(layers: &[LayerInfo]) -> Vec<String> {
    layers.iter().map(|l| l.name.clone()).collect()
}

/// A merge of `names[src]` into `names[dst]` (base-first indices, dst < src).
#[derive(Clone)]
struct Merge {
    names: Vec<String>,
    src: usize,
    dst: usize,
    keep: bool,
}

impl Merge {
    fn new(names: &[String], src: &str, dst: &str, keep: bool) -> Merge {
        let i = |n: &str| names.iter().position(|x| x == n).unwrap();
        let (src, dst) = (i(src), i(dst));
        assert!(dst < src);
        Merge {
            names: names.to_vec(),
            src,
            dst,
            keep,
        }
    }

    fn src_is_leaf(&self) -> bool {
        self.src == self.names.len() - 1
    }

    fn src_name(&self) -> &str {
        &self.names[self.src]
    }

    fn dst_name(&self) -> &str {
        &self.names[self.dst]
    }

    /// The chain afterwards, base first.
    fn final_names(&self) -> Vec<String> {
        let mut v = self.names[..=self.dst].to_vec();
        v.extend_from_slice(&self.names[self.src + 1..]);
        v
    }

    /// SOURCE and the layers between it and DESTINATION.
    fn retired(&self) -> &[String] {
        &self.names[self.dst + 1..=self.src]
    }

    fn final_leaf(&self, dir: &Path) -> PathBuf {
        dir.join(self.final_names().last().unwrap())
    }

    fn args(&self, dir: &Path) -> Vec<String> {
        let mut a = vec![
            "merge".to_string(),
            p(&dir.join(self.src_name())).to_string(),
            p(&dir.join(self.dst_name())).to_string(),
        ];
        if self.keep {
            a.push("--keep".into());
        }
        a
    }

    /// What each level of the chain reads afterwards, base first.
    fn final_snaps<'a>(&self, snaps: &'a [Vec<u8>]) -> Vec<&'a [u8]> {
        let mut v: Vec<&[u8]> = snaps[..self.dst].iter().map(|s| s.as_slice()).collect();
        v.push(&snaps[self.src]);
        v.extend(snaps[self.src + 1..].iter().map(|s| s.as_slice()));
        v
    }
}

/// Everything that must hold once a merge is complete; returns violations.
/// `model`: the flattened leaf; `dest_model`: what SOURCE showed, which
/// DESTINATION must now hold.
fn verify_final(
    dir: &Path,
    m: &Merge,
    model: &[u8],
    dest_model: &[u8],
    scratch: &Path,
) -> Vec<String> {
    verify_final_but(dir, m, model, dest_model, scratch, false)
}

/// [`verify_final`]; with `leaks_ok` `check` may report leaks (after the
/// rerun of a crashed merge, [`Fmt::crash_leaks_outlive_a_rerun`]).
fn verify_final_but(
    dir: &Path,
    m: &Merge,
    model: &[u8],
    dest_model: &[u8],
    scratch: &Path,
    leaks_ok: bool,
) -> Vec<String> {
    let mut bad = Vec::new();
    let leaf = m.final_leaf(dir);
    let want: Vec<String> = m.final_names().into_iter().rev().collect();
    match info(&leaf) {
        Ok(layers) => {
            if names_of(&layers) != want {
                bad.push(format!(
                    "chain of {} is {:?}, expected {want:?}",
                    leaf.display(),
                    names_of(&layers)
                ));
            }
            for w in layers.windows(2) {
                // Without ids (qcow2) the link is the parent's name, which
                // `info` resolved to the parent's file.
                let linked = match &w[1].id {
                    Some(id) => w[0].parent_id.as_deref() == Some(id.as_str()),
                    None => {
                        w[0].parent_id.is_none()
                            && w[0]
                                .resolved
                                .as_deref()
                                .is_some_and(|r| r.ends_with(&format!("/{}", w[1].name)))
                    }
                };
                if !linked {
                    bad.push(format!(
                        "{} has parent id {:?} (resolved {:?}), but its parent {} has id {:?}",
                        w[0].name, w[0].parent_id, w[0].resolved, w[1].name, w[1].id
                    ));
                }
            }
            if let Some(l) = layers.last().filter(|l| l.parent_id.is_some()) {
                bad.push(format!("the base {} has a parent id", l.name));
            }
        }
        Err((c, e)) => bad.push(format!(
            "info {} failed (exit {c}): {}",
            leaf.display(),
            e.trim()
        )),
    }
    match take_export(&leaf, scratch) {
        Ok(b) => {
            if let Some(d) = first_diff(&b, model) {
                bad.push(format!(
                    "flattened {} differs from the model: {d}",
                    leaf.display()
                ));
            }
        }
        Err(e) => bad.push(e),
    }
    let dest = dir.join(m.dst_name());
    if dest != leaf {
        match take_export(&dest, scratch) {
            Ok(b) => {
                if let Some(d) = first_diff(&b, dest_model) {
                    bad.push(format!(
                        "DESTINATION {} does not hold what SOURCE showed: {d}",
                        dest.display()
                    ));
                }
            }
            Err(e) => bad.push(e),
        }
    }
    let (c, probs) = check(&leaf);
    let leaks_only = leaks_ok && c == 3 && probs.iter().all(|x| is_leak(x));
    if (c != 0 || !probs.is_empty()) && !leaks_only {
        bad.push(format!(
            "check {} after the merge: exit {c}, {probs:?}",
            leaf.display()
        ));
    }
    // Each child names its parent by the parent's current identity in its
    // own bytes (VHDX: parent_linkage = DataWriteGuid, the log empty).
    for w in m.final_names().windows(2) {
        bad.extend(common::link_problems(&dir.join(&w[1]), &dir.join(&w[0])));
    }
    // Every VHD left has its dynamic header at 512, its footer copy at 0
    // and nothing stale (issue 14).
    for e in fs::read_dir(dir).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "vhd") {
            bad.extend(common::vhd_layout_problems(&e.path()));
        }
    }
    for r in m.retired() {
        let path = dir.join(r);
        if m.keep {
            match info(&path) {
                Err((5, e)) if e.contains("detached by a merge") => {}
                Ok(_) => bad.push(format!("kept {r} still opens as a chain")),
                Err((c, e)) => bad.push(format!(
                    "kept {r}: info exit {c} ({}), expected 5 \"detached by a merge\"",
                    e.trim()
                )),
            }
        } else if path.exists() {
            bad.push(format!("merged file {r} was not deleted"));
        }
    }
    let rec = records(dir);
    if !rec.is_empty() {
        bad.push(format!("merge records left behind: {rec:?}"));
    }
    let st = chainfs(&["merge", "--status", p(&dir.join(m.src_name()))]);
    if code(&st) != 0 {
        bad.push(format!(
            "merge --status after the merge: exit {}: {}",
            code(&st),
            text(&st).trim()
        ));
    }
    bad
}

/// After a merge was stopped (fault injection or kill -9): the chain opens
/// (from the original leaf, or from DESTINATION when a merge out of the
/// leaf already retired it), reads as before, `check` reports nothing but
/// the interrupted merge, and rerunning the merge completes it (`leaks_ok`:
/// `check` may report leaks after it). Returns the violations and a
/// description of the state found.
fn verify_interrupted(
    dir: &Path,
    m: &Merge,
    model: &[u8],
    dest_model: &[u8],
    scratch: &Path,
    leaks_ok: bool,
) -> (Vec<String>, String) {
    let mut bad = Vec::new();
    let src = dir.join(m.src_name());
    let dst = dir.join(m.dst_name());
    let orig_leaf = dir.join(m.names.last().unwrap());
    let rec_file = dir.join(format!(".{}.chainfs-merge", m.src_name()));

    let st = chainfs(&["merge", "--status", "--json", p(&src)]);
    let phase = serde_json::from_slice::<Value>(&st.stdout)
        .ok()
        .and_then(|v| v["interrupted"]["phase"].as_str().map(String::from));
    if rec_file.exists() != phase.is_some() {
        bad.push(format!(
            "record file present: {}, but merge --status says {:?}",
            rec_file.exists(),
            text(&st).trim()
        ));
    }
    let want_status = if phase.is_some() { 3 } else { 0 };
    if code(&st) != want_status {
        bad.push(format!(
            "merge --status exit {}, expected {want_status}",
            code(&st)
        ));
    }

    let src_state = if !src.exists() {
        "deleted"
    } else {
        match info(&src) {
            Ok(_) => "opens",
            Err((5, e)) if e.contains("detached by a merge") => "detached",
            Err((10, e)) if e.contains("interrupted merge") => "refused",
            Err((c, e)) => {
                bad.push(format!("SOURCE: info exit {c}: {}", e.trim()));
                "broken"
            }
        }
    };
    if phase.as_deref() == Some("relinked") && src_state == "opens" {
        bad.push("SOURCE still opens although its record says relinked".into());
    }
    if src_state == "refused" && phase.as_deref() != Some("relinked") {
        bad.push("SOURCE refused without a relinked record".into());
    }
    let state = format!(
        "record {}, SOURCE {src_state}",
        phase.as_deref().unwrap_or("none")
    );

    let open_at = if m.src_is_leaf() && src_state != "opens" {
        dst.clone()
    } else {
        orig_leaf.clone()
    };
    match take_export(&open_at, scratch) {
        Ok(b) => {
            if let Some(d) = first_diff(&b, model) {
                bad.push(format!(
                    "flattened {} differs from the original: {d}",
                    open_at.display()
                ));
            }
        }
        Err(e) => bad.push(format!("the chain does not open: {e}")),
    }
    let chain_now = info(&open_at).map(|l| names_of(&l)).unwrap_or_default();
    let src_in_chain = chain_now.iter().any(|n| n == m.src_name());
    if phase.as_deref() == Some("copy") && !src_in_chain {
        bad.push(format!(
            "the record says copy (chain unchanged), but SOURCE is no longer in the chain of {}: {chain_now:?}",
            open_at.display()
        ));
    }
    let (c, probs) = check(&open_at);
    if phase.is_some()
        && src_in_chain
        && !(c == 3 && probs.iter().any(|x| x.contains("interrupted merge")))
    {
        bad.push(format!(
            "check {} does not report the interrupted merge: exit {c}, {probs:?}",
            open_at.display()
        ));
    }
    // Besides the record, a crash can leave other reported states: a
    // stale footer copy at offset 0 (the relink switched the trailing
    // footer first, or moved a header back to 512; a writable open
    // rewrites the copy), an unfinished relink of a VHD (its journal holds
    // the new header; a writable open finishes it), a VHDX log not yet
    // applied (the same for VHDX: reads replay it, a writable open writes
    // it through), and DESTINATION blocks no BAT entry references yet (the
    // rerun reuses them).
    let only_merge = probs.iter().all(|x| {
        x.contains("interrupted merge")
            || x.contains("footer copy differs")
            || x.contains("interrupted relink")
            || x.contains("the log is not empty")
            || is_leak(x)
    });
    let consistent = (c == 0 && probs.is_empty()) || (c == 3 && !probs.is_empty());
    if !only_merge || !consistent {
        bad.push(format!(
            "check {} reports more than the interrupted merge: exit {c}, {probs:?}",
            open_at.display()
        ));
    }

    // Rerun the same merge. Without a record and with SOURCE already
    // retired, the merge had finished: there is nothing left to rerun.
    let finished = phase.is_none() && matches!(src_state, "deleted" | "detached");
    let args = m.args(dir);
    let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let o = chainfs(&argv);
    let ok = code(&o) == 0
        || (finished && src_state == "deleted" && code(&o) == 4)
        || (finished && src_state == "detached" && code(&o) == 5);
    if !ok {
        // What follows from this (files left, record left) is not listed.
        bad.push(format!(
            "rerunning `chainfs {}` exits {}: {}",
            args.join(" "),
            code(&o),
            text(&o).trim()
        ));
        return (bad, state);
    }
    bad.extend(verify_final_but(
        dir, m, model, dest_model, scratch, leaks_ok,
    ));
    (bad, state)
}

// ---------------------------------------------------------------------------
// Mounts and the control file.

fn unmount(mnt: &Path) {
    chainfs_ok(&["umount", p(mnt)]);
    assert!(!is_mounted(mnt));
}

/// The reply to one control command: the write's errno and what a read on
/// the same handle returned.
#[derive(Debug)]
struct Reply {
    errno: Option<i32>,
    text: String,
}

impl Reply {
    fn field(&self, k: &str) -> Option<&str> {
        self.text
            .lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
    }

    fn rv(&self) -> Option<u32> {
        self.field("ReturnValue").and_then(|v| v.parse().ok())
    }
}

/// Write `cmd` to MNT/control and read the reply on the same handle, without
/// seeking (as `exec 3<>control; echo cmd >&3; cat <&3` does).
fn control(mnt: &Path, cmd: &str) -> Reply {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("control"))
        .unwrap();
    let line = format!("{cmd}\n");
    let errno = match f.write(line.as_bytes()) {
        Ok(n) => {
            assert_eq!(n, line.len(), "short write of {cmd:?}");
            None
        }
        Err(e) => Some(e.raw_os_error().expect("an errno")),
    };
    let mut text = String::new();
    f.read_to_string(&mut text).unwrap();
    Reply { errno, text }
}

/// The same through a shell, literally (bash: its `echo` names the errno).
fn control_sh(mnt: &Path, cmd: &str) -> Output {
    Command::new("bash")
        .arg("-c")
        .arg(r#"exec 3<>"$1/control"; echo "$2" >&3; cat <&3"#)
        .arg("bash")
        .arg(mnt)
        .arg(cmd)
        .output()
        .unwrap()
}

/// The errno of 32775 "invalid state" refusals other than a read-only
/// mount (which is EROFS): the issue fixes only the return value.
const INVALID_STATE: &[i32] = &[libc::EPERM, libc::EROFS];

/// A refused command: the write fails with one of `errnos`, the reply
/// carries `rv` and an ErrorDescription that mentions `says`.
fn expect_refusal(mnt: &Path, cmd: &str, errnos: &[i32], rv: u32, says: &str) {
    let r = control(mnt, cmd);
    assert!(
        r.errno.is_some_and(|e| errnos.contains(&e)),
        "{cmd:?}: errno {:?}, expected one of {errnos:?}: {r:?}",
        r.errno
    );
    assert_eq!(r.rv(), Some(rv), "{cmd:?}: {r:?}");
    let desc = r.field("ErrorDescription").unwrap_or_default();
    assert!(
        desc.contains(says),
        "{cmd:?}: ErrorDescription {desc:?} should mention {says:?}"
    );
}

/// Start a merge through the control file; returns the job number.
fn start_merge(mnt: &Path, cmd: &str) -> u64 {
    let r = control(mnt, cmd);
    assert_eq!(r.errno, None, "{cmd:?} refused: {r:?}");
    assert_eq!(r.rv(), Some(4096), "{cmd:?}: {r:?}");
    let job = r.field("Job").expect("Job=jobs/N");
    job.strip_prefix("jobs/")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad Job field {job:?}"))
}

fn job(mnt: &Path, id: u64) -> BTreeMap<String, String> {
    let t = fs::read_to_string(mnt.join("jobs").join(id.to_string()))
        .unwrap_or_else(|e| panic!("jobs/{id}: {e}"));
    t.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn num(j: &BTreeMap<String, String>, k: &str) -> u64 {
    j.get(k)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("job field {k} missing or not a number: {j:?}"))
}

/// How a job went, as polled.
struct Watched {
    last: BTreeMap<String, String>,
    percents: Vec<u64>,
    running_polls: usize,
}

/// Poll jobs/ID until it ends; PercentComplete must never decrease.
fn wait_job(mnt: &Path, id: u64) -> Watched {
    let start = Instant::now();
    let mut w = Watched {
        last: BTreeMap::new(),
        percents: Vec::new(),
        running_polls: 0,
    };
    loop {
        let j = job(mnt, id);
        let pc = num(&j, "PercentComplete");
        assert!(pc <= 100, "{j:?}");
        if let Some(&prev) = w.percents.last() {
            assert!(
                pc >= prev,
                "PercentComplete of job {id} went down from {prev} to {pc}"
            );
        }
        w.percents.push(pc);
        match num(&j, "JobState") {
            3 | 4 => w.running_polls += 1,
            7 | 8 | 10 => {
                w.last = j;
                return w;
            }
            s => panic!("job {id}: JobState {s} is not a CIM job state: {j:?}"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "job {id} did not end: {j:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Run a merge through the control file to completion (JobState 7).
fn merge_via_control(mnt: &Path, cmd: &str) -> (Instant, Instant, Watched) {
    let t0 = Instant::now();
    let id = start_merge(mnt, cmd);
    let w = wait_job(mnt, id);
    let t1 = Instant::now();
    assert_eq!(num(&w.last, "JobState"), 7, "{cmd:?}: {:?}", w.last);
    (t0, t1, w)
}

/// The mount's `chain` file: (file name, unique id, parent id) per line.
fn mount_chain(mnt: &Path) -> Vec<(String, String, String)> {
    fs::read_to_string(mnt.join("chain"))
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 8, "chain line {l:?}");
            let name = Path::new(f[1])
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (name, f[6].to_string(), f[7].to_string())
        })
        .collect()
}

fn mount_chain_names(mnt: &Path) -> Vec<String> {
    mount_chain(mnt).into_iter().map(|l| l.0).collect()
}

/// Read all of `path` with O_DIRECT (every byte from the daemon, not the
/// page cache) in `chunk`-byte reads, feeding `sink`.
fn read_direct_with(path: &Path, chunk: usize, mut sink: impl FnMut(&[u8])) {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let size = f.metadata().unwrap().len();
    let mut raw = vec![0u8; chunk + 4096];
    let a = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[a..a + chunk];
    let mut off = 0u64;
    while off < size {
        let n = f
            .read_at(buf, off)
            .unwrap_or_else(|e| panic!("O_DIRECT read of {} at {off}: {e}", path.display()));
        assert!(n > 0, "{}: short at {off}", path.display());
        sink(&buf[..n]);
        off += n as u64;
    }
}

fn read_direct(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    read_direct_with(path, 1 << 20, |b| v.extend_from_slice(b));
    v
}

fn hash_direct(path: &Path, chunk: usize) -> String {
    let mut h = Sha256::new();
    read_direct_with(path, chunk, |b| h.update(b));
    hex(&h.finalize())
}

/// Buffered reads after dropping this file's cached pages.
fn hash_uncached(path: &Path) -> String {
    let mut f = fs::File::open(path).unwrap();
    // SAFETY: advice on our own descriptor.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 333_333];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

// ---------------------------------------------------------------------------
// libvhdi as an independent reader.

/// Mount `leaf` with vhdimount (as a user runs it: absolute paths, working
/// folder `/`) and read `vhdi1` (the base) .. `vhdiN` (the leaf).
/// None when vhdimount is missing outside CI.
fn libvhdi_levels(leaf: &Path, n: usize, mnt: &Path) -> Option<Vec<Vec<u8>>> {
    if !require_fuse() || !require("vhdimount (libvhdi)", have("vhdimount")) {
        return None;
    }
    fs::create_dir_all(mnt).unwrap();
    let _g = MountGuard::new(mnt);
    let o = Command::new("vhdimount")
        .current_dir("/")
        .arg(std::path::absolute(leaf).unwrap())
        .arg(std::path::absolute(mnt).unwrap())
        .output()
        .expect("vhdimount");
    assert!(o.status.success(), "vhdimount: {}", text(&o));
    let last = mnt.join(format!("vhdi{n}"));
    wait_for("vhdimount", || last.exists());
    let mut entries: Vec<String> = fs::read_dir(mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    let mut want: Vec<String> = (1..=n).map(|k| format!("vhdi{k}")).collect();
    want.sort();
    assert_eq!(entries, want, "libvhdi sees another chain");
    Some(
        (1..=n)
            .map(|k| fs::read(mnt.join(format!("vhdi{k}"))).unwrap())
            .collect(),
    )
}

// ---------------------------------------------------------------------------
// 1. Offline merges.

/// One offline merge; layers are named by stem (`base`, `l1`, ...) and get
/// the format's extensions.
struct Case {
    stems: &'static [&'static str],
    fixed_base: bool,
    src: &'static str,
    dst: &'static str,
    keep: bool,
    /// Give SOURCE a second child (outside the chain) that must be relinked.
    extra_child: bool,
    seed: u64,
}

/// `stems` as file names of format `f`: the first a base, the rest
/// differencing layers.
fn names_for(f: Fmt, stems: &[&str]) -> Vec<&'static str> {
    stems
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n = if i == 0 {
                f.base_name(s)
            } else {
                f.child_name(s)
            };
            &*Box::leak(n.into_boxed_str())
        })
        .collect()
}

/// The file name of stem `stem` in format `f`: `base` a base layer, any
/// other stem a differencing one.
fn ln(f: Fmt, stem: &str) -> &'static str {
    let n = if stem == "base" {
        f.base_name(stem)
    } else {
        f.child_name(stem)
    };
    Box::leak(n.into_boxed_str())
}

/// 512 KiB blocks where format `f` has them (VHDX: 1 MiB at least).
fn small_block(f: Fmt) -> &'static str {
    if f.min_block() > 512 << 10 {
        "1M"
    } else {
        "512K"
    }
}

/// `merge SRC DST` for the control file, by stem in format `f`.
fn merge_cmd(f: Fmt, src: &str, dst: &str) -> &'static str {
    Box::leak(format!("merge {} {}", ln(f, src), ln(f, dst)).into_boxed_str())
}

/// The file name of the layer with stem `stem` in `names`.
fn named<'a>(names: &'a [&'static str], stem: &str) -> &'a str {
    names
        .iter()
        .find(|n| n.strip_prefix(stem).is_some_and(|r| r.starts_with('.')))
        .unwrap()
}

fn offline_merge(f: Fmt, c: Case) {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("chain");
    let scratch = t.path().join("export.raw");
    let names = names_for(f, c.stems);
    let seed = c.seed + 100 * f.index();
    let b = small_chain(&dir, &names, c.fixed_base, 6, seed);
    let m = Merge::new(&b.names, named(&names, c.src), named(&names, c.dst), c.keep);
    let dst_id = (f == Fmt::Vhdx).then(|| current_header(&dir.join(m.dst_name())).data_write_guid);
    assert_same(
        &take_export(&b.leaf(), &scratch).unwrap(),
        b.model(),
        "export before the merge",
    );
    assert_eq!(check(&b.leaf()), (0, vec![]), "check before the merge");

    let extra = if c.extra_child {
        let e = dir.join(f.child_name("other-child"));
        chainfs_ok(&["create", p(&e), "--parent", p(&b.path(m.src_name()))]);
        let mut model = b.snaps[m.src].clone();
        let mut rng = Rng(seed + 1);
        for (off, len) in [(3 * MIB, 5 * K4), (2 * MIB - K4, 2 * K4)] {
            let data = rng.bytes(len as usize);
            chainfs_write(&e, off, &data, &t.path().join("x.bin"));
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        Some((e, model))
    } else {
        None
    };

    let mut args = m.args(&dir);
    args.push("--json".into());
    let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = chainfs_ok(&argv);
    let v: Value = serde_json::from_str(out.trim()).expect("merge --json prints JSON");
    assert_eq!(v["ReturnValue"], 0, "{out}");
    assert!(v["bytes_copied"].as_u64().unwrap() > 0, "{out}");

    let bad = verify_final(&dir, &m, b.model(), &b.snaps[m.src], &scratch);
    assert!(bad.is_empty(), "after the merge:\n{}", bad.join("\n"));

    let leaf = m.final_leaf(&dir);
    let layers = info(&leaf).unwrap();
    if !m.src_is_leaf() {
        // The child of SOURCE now names DESTINATION as its parent.
        let child = &layers[layers.len() - 1 - (m.dst + 1)];
        assert_eq!(child.name, m.names[m.src + 1]);
        let r = child.resolved.as_deref().unwrap();
        assert!(
            r.ends_with(&format!("/{}", m.dst_name())),
            "{} resolves its parent as {r}",
            child.name
        );
    } else {
        assert_eq!(layers[0].name, m.dst_name(), "DESTINATION is the new leaf");
    }
    if let Some((e, model)) = extra {
        let ls = info(&e).unwrap();
        let mut want = vec![f.child_name("other-child")];
        want.extend(m.final_names()[..=m.dst].iter().rev().cloned());
        assert_eq!(names_of(&ls), want, "the other child of SOURCE is relinked");
        assert_same(
            &take_export(&e, &scratch).unwrap(),
            &model,
            "the other child of SOURCE reads as before",
        );
        assert_eq!(check(&e), (0, vec![]));
    }

    // DESTINATION took new data: a format that versions its data says so
    // (VHDX: a new DataWriteGuid, which its children now name).
    if let Some(old) = dst_id {
        assert_ne!(
            current_header(&dir.join(m.dst_name())).data_write_guid,
            old,
            "{f:?}: DESTINATION kept its DataWriteGuid"
        );
    }
    // A merge down to the base leaves a base qemu reads as the chain did.
    if m.dst == 0 && have_qemu_img() {
        let base = dir.join(m.dst_name());
        if f.qemu_checks() {
            run(Command::new("qemu-img")
                .args(["check", "-f", f.qemu()])
                .arg(&base));
        }
        let q = t.path().join("qemu.raw");
        run(Command::new("qemu-img")
            .args(["convert", "-f", f.qemu(), "-O", "raw"])
            .arg(&base)
            .arg(&q));
        assert_same(
            &fs::read(&q).unwrap(),
            &b.snaps[m.src],
            &format!("{f:?}: qemu's view of the merged base"),
        );
    }

    let expect = m.final_snaps(&b.snaps);
    if f.qemu_reads_chains() && have_qemu_img() {
        // qcow2: qemu is the independent reader of every level.
        let q = t.path().join("qemu.raw");
        for (k, (name, want)) in m.final_names().iter().zip(&expect).enumerate() {
            let img = dir.join(name);
            qemu_check(f, &img);
            qemu_convert(f, &img, &q);
            assert_same(
                &fs::read(&q).unwrap(),
                want,
                &format!("qemu's level {k} ({name}) after the merge"),
            );
        }
    }
    if !f.vhdi_reads() {
        return;
    }
    if let Some(levels) = libvhdi_levels(&leaf, expect.len(), &t.path().join("vhdi")) {
        for (k, (got, want)) in levels.iter().zip(&expect).enumerate() {
            assert_same(got, want, &format!("libvhdi vhdi{} after the merge", k + 1));
        }
    }
}

fn offline_merge_of_leaf_into_its_parent_makes_the_parent_the_leaf(f: Fmt) {
    offline_merge(
        f,
        Case {
            stems: &["base", "l1", "l2", "leaf"],
            fixed_base: false,
            src: "leaf",
            dst: "l2",
            keep: false,
            extra_child: false,
            seed: 11,
        },
    );
}

fn offline_merge_into_grandparent_through_an_intermediate_relinks_the_leaf(f: Fmt) {
    offline_merge(
        f,
        Case {
            stems: &["base", "l1", "l2", "l3", "leaf"],
            fixed_base: false,
            src: "l3",
            dst: "l1",
            keep: false,
            extra_child: false,
            seed: 12,
        },
    );
}

/// VHD and VHDX: a qcow2 has no fixed type.
fn offline_merge_of_leaf_into_fixed_base_leaves_only_the_base(f: Fmt) {
    offline_merge(
        f,
        Case {
            stems: &["base", "l1", "l2", "leaf"],
            fixed_base: true,
            src: "leaf",
            dst: "base",
            keep: false,
            extra_child: false,
            seed: 13,
        },
    );
}

fn offline_merge_of_middle_layer_into_base_relinks_the_leaf_and_other_children(f: Fmt) {
    offline_merge(
        f,
        Case {
            stems: &["base", "l1", "l2", "l3", "leaf"],
            fixed_base: false,
            src: "l3",
            dst: "base",
            keep: false,
            extra_child: true,
            seed: 14,
        },
    );
}

fn offline_merge_with_keep_leaves_the_merged_files_detached(f: Fmt) {
    offline_merge(
        f,
        Case {
            stems: &["base", "l1", "l2", "l3", "leaf"],
            fixed_base: false,
            src: "l3",
            dst: "l1",
            keep: true,
            extra_child: false,
            seed: 15,
        },
    );
}

fn offline_merge_of_leaf_into_base_with_keep_detaches_every_merged_layer(f: Fmt) {
    offline_merge(
        f,
        Case {
            stems: &["base", "mid", "leaf"],
            fixed_base: false,
            src: "leaf",
            dst: "base",
            keep: true,
            extra_child: false,
            seed: 16,
        },
    );
}

// ---------------------------------------------------------------------------
// 2. Refusals.

#[test]
fn refused_offline_merges_exit_with_their_codes_and_change_no_file() {
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("a");
    let bdir = t.path().join("b");
    let scratch = t.path().join("export.raw");
    let ca = small_chain(
        &a,
        &["base.vhd", "l1.vhd", "l2.vhd", "leaf.vhd"],
        false,
        3,
        21,
    );
    let cb = small_chain(&bdir, &["obase.vhd", "oleaf.vhd"], false, 3, 22);
    let pa = |n: &str| p(&a.join(n)).to_string();
    let pb = |n: &str| p(&bdir.join(n)).to_string();

    let refuse = |args: &[String], exit: i32, says: &str| {
        let before = (hashes(&a), hashes(&bdir));
        let mut argv = vec!["merge"];
        argv.extend(args.iter().map(|s| s.as_str()));
        let o = chainfs(&argv);
        assert_eq!(code(&o), exit, "chainfs {argv:?}: {}", text(&o));
        let msg = String::from_utf8_lossy(&o.stderr);
        assert!(
            says.split('|').any(|s| msg.contains(s)),
            "chainfs {argv:?}: message {msg:?} should say {says:?}"
        );
        assert_eq!(
            (hashes(&a), hashes(&bdir)),
            before,
            "chainfs {argv:?} changed files"
        );
        assert!(records(&a).is_empty() && records(&bdir).is_empty());
    };

    // DESTINATION not an ancestor of SOURCE: 9.
    // (From SOURCE's side a descendant is simply not in its chain.)
    refuse(
        &[pa("base.vhd"), pa("leaf.vhd")],
        9,
        "is not an ancestor|not a layer of this chain",
    );
    refuse(&[pa("l1.vhd"), pa("l1.vhd")], 9, "is not an ancestor");
    refuse(
        &[pa("l1.vhd"), "leaf.vhd".into()],
        4,
        "no layer of this chain",
    );
    // Unknown files: 4.
    refuse(&[pa("leaf.vhd"), pa("nope.vhd")], 4, "nope.vhd");
    refuse(&[pa("nope.vhd"), pa("base.vhd")], 4, "nope.vhd");
    refuse(
        &[pa("leaf.vhd"), "nope.vhd".into()],
        4,
        "no layer of this chain",
    );
    // Across two chains: a path that is no layer of SOURCE's chain is an
    // invalid argument (9), a bare name of the other chain is not found (4).
    refuse(
        &[pa("leaf.vhd"), pb("obase.vhd")],
        9,
        "not a layer of this chain",
    );
    refuse(
        &[pb("oleaf.vhd"), pa("base.vhd")],
        9,
        "not a layer of this chain",
    );
    refuse(
        &[pa("leaf.vhd"), "obase.vhd".into()],
        4,
        "no layer of this chain",
    );
    // No DESTINATION: a usage error.
    refuse(&[pa("leaf.vhd")], 2, "DESTINATION");

    // Other differencing disks on an intermediate layer and on DESTINATION:
    // 10, naming them, unless --force.
    chainfs_ok(&[
        "create",
        &pa("sibling-of-l1.vhd"),
        "--parent",
        &pa("l1.vhd"),
    ]);
    chainfs_ok(&[
        "create",
        &pa("sibling-of-base.vhd"),
        "--parent",
        &pa("base.vhd"),
    ]);
    refuse(&[pa("leaf.vhd"), pa("base.vhd")], 10, "sibling-of-l1.vhd");
    refuse(&[pa("leaf.vhd"), pa("base.vhd")], 10, "sibling-of-base.vhd");
    refuse(&[pa("l2.vhd"), pa("l1.vhd")], 10, "force");
    // A disk on SOURCE itself is no obstacle: it is relinked (see the
    // offline tests); one on a layer above SOURCE neither.
    let o = chainfs(&["merge", "--status", &pa("leaf.vhd")]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(text(&o).contains("no interrupted merge"), "{}", text(&o));

    let m = Merge::new(&ca.names, "leaf.vhd", "base.vhd", false);
    chainfs_ok(&["merge", &pa("leaf.vhd"), &pa("base.vhd"), "--force"]);
    let bad = verify_final(&a, &m, ca.model(), ca.model(), &scratch);
    assert!(bad.is_empty(), "--force merge:\n{}", bad.join("\n"));
    // The other chain was never touched.
    assert_same(
        &take_export(&bdir.join("oleaf.vhd"), &scratch).unwrap(),
        cb.model(),
        "the other chain",
    );
}

#[test]
fn offline_merge_of_a_mounted_chain_is_refused_as_in_use() {
    if !require_fuse() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("c");
    let b = small_chain(&dir, &["base.vhd", "mid.vhd", "leaf.vhd"], false, 3, 23);
    let mnt = t.path().join("mnt");
    for opts in [&["-o", "ro"][..], &["-o", "rw"][..]] {
        let g = mount(&b.leaf(), &mnt, opts);
        let before = hashes(&dir);
        for (s, d) in [("mid.vhd", "base.vhd"), ("leaf.vhd", "base.vhd")] {
            let o = chainfs(&["merge", p(&b.path(s)), p(&b.path(d))]);
            assert_eq!(
                code(&o),
                7,
                "merge {s} {d} under a {opts:?} mount: {}",
                text(&o)
            );
            assert!(text(&o).contains("in use"), "{}", text(&o));
        }
        assert_eq!(hashes(&dir), before);
        assert!(records(&dir).is_empty());
        unmount(&mnt);
        drop(g);
    }
    chainfs_ok(&["merge", p(&b.path("mid.vhd")), p(&b.path("base.vhd"))]);
}

// ---------------------------------------------------------------------------
// 3. Control-file merges.

#[test]
fn control_refusals_return_errno_and_code_and_start_no_job() {
    if !require_fuse() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("c");
    let other = t.path().join("o");
    let b = small_chain(
        &dir,
        &["base.vhd", "l1.vhd", "l2.vhd", "leaf.vhd"],
        false,
        3,
        31,
    );
    let ob = small_chain(&other, &["obase.vhd", "oleaf.vhd"], false, 3, 32);
    let mnt = t.path().join("mnt");
    let g = mount(&b.leaf(), &mnt, &["-o", "rw"]);
    let before = hashes(&dir);

    use libc::{EINVAL, ENOENT, EROFS};
    let cases: Vec<(String, i32, u32, &str)> = vec![
        (
            "merge base.vhd leaf.vhd".into(),
            EINVAL,
            32773,
            "not an ancestor",
        ),
        (
            "merge l1.vhd l1.vhd".into(),
            EINVAL,
            32773,
            "not an ancestor",
        ),
        ("merge nope.vhd base.vhd".into(), ENOENT, 32779, "nope.vhd"),
        (
            format!("merge leaf.vhd {}", p(&dir.join("nope.vhd"))),
            ENOENT,
            32779,
            "no such file",
        ),
        (
            format!("merge leaf.vhd {}", p(&ob.path("obase.vhd"))),
            EINVAL,
            32773,
            "not a layer of this chain",
        ),
        (
            "merge leaf.vhd obase.vhd".into(),
            ENOENT,
            32779,
            "obase.vhd",
        ),
        ("merge leaf.vhd".into(), EINVAL, 32773, "usage"),
        (
            "merge leaf.vhd base.vhd sideways".into(),
            EINVAL,
            32773,
            "sideways",
        ),
        ("frobnicate".into(), EINVAL, 32773, "unknown command"),
        ("cancel 1".into(), ENOENT, 32779, "no job"),
        ("cancel x".into(), EINVAL, 32773, "not a job number"),
    ];
    for (cmd, errno, rv, says) in &cases {
        expect_refusal(&mnt, cmd, &[*errno], *rv, says);
    }
    // The same through a shell: the write fails, the reply is readable.
    let o = control_sh(&mnt, "merge base.vhd leaf.vhd");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("ReturnValue=32773\n"), "{}", text(&o));
    assert!(out.contains("ErrorDescription="), "{out}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Invalid argument"),
        "{}",
        text(&o)
    );

    // Sibling children: 32775 (with the errno of an invalid state), naming
    // them; `force` merges anyway.
    chainfs_ok(&[
        "create",
        p(&dir.join("sibling.vhd")),
        "--parent",
        p(&b.path("l1.vhd")),
    ]);
    let before_sib = hashes(&dir);
    expect_refusal(
        &mnt,
        "merge leaf.vhd base.vhd",
        INVALID_STATE,
        32775,
        "sibling.vhd",
    );
    expect_refusal(&mnt, "merge l2.vhd l1.vhd", INVALID_STATE, 32775, "force");
    assert_eq!(hashes(&dir), before_sib, "refusals changed files");
    assert!(before.keys().all(|k| before_sib[k] == before[k]));
    assert_eq!(fs::read_dir(mnt.join("jobs")).unwrap().count(), 0);
    assert_eq!(mount_chain_names(&mnt).len(), 4);

    let (_, _, w) = merge_via_control(&mnt, "merge l2.vhd base.vhd force");
    assert_eq!(num(&w.last, "JobId"), 1);
    assert_eq!(mount_chain_names(&mnt), ["leaf.vhd", "base.vhd"]);
    assert_same(&read_direct(&mnt.join("disk.raw")), b.model(), "disk.raw");
    unmount(&mnt);
    drop(g);

    // A read-only mount refuses merges: 32775, EROFS.
    let ro = t.path().join("ro");
    let g = mount(&ob.leaf(), &ro, &[]);
    let before = hashes(&other);
    expect_refusal(
        &ro,
        "merge oleaf.vhd obase.vhd",
        &[EROFS],
        32775,
        "read-only",
    );
    expect_refusal(
        &ro,
        "merge oleaf.vhd obase.vhd keep force",
        &[EROFS],
        32775,
        "-o rw",
    );
    assert_eq!(fs::read_dir(ro.join("jobs")).unwrap().count(), 0);
    assert_eq!(hashes(&other), before);
    unmount(&ro);
    drop(g);
}

/// base (16 MiB of data), mid (`mid_mib` MiB of data in one run from
/// 32 MiB), leaf (a little); `size` virtual.
fn big_chain(
    f: Fmt,
    dir: &Path,
    size: u64,
    mid_mib: u64,
    leaf_run: Option<(u64, u64)>,
    seed: u64,
) -> Built {
    let mut rng = Rng(seed);
    let mut base_w = scattered(&mut rng, size, 14, MIB, 0);
    base_w.push((0, 2 * MIB));
    let mut leaf_w = scattered(&mut rng, size, 8, 256 * 1024, 2);
    if let Some(r) = leaf_run {
        leaf_w.push(r);
    }
    let specs = [
        Spec {
            name: ln(f, "base"),
            block: "2M",
            fixed: false,
            writes: base_w,
        },
        Spec {
            name: ln(f, "mid"),
            block: "2M",
            fixed: false,
            writes: vec![(32 * MIB, mid_mib * MIB)],
        },
        Spec {
            name: ln(f, "leaf"),
            block: "2M",
            fixed: false,
            writes: leaf_w,
        },
    ];
    build(dir, size, &specs, seed)
}

/// A mount's `--parent-dir` folders count for merges through `control` as
/// they do for `chainfs merge --parent-dir`: a child of a layer the merge
/// would retire, kept in such a folder, stops the merge (32775, named);
/// the files stay as they were.
#[test]
fn a_control_merge_looks_for_children_in_the_mounts_parent_dirs() {
    if !require_fuse() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("c");
    let kids = t.path().join("kids");
    fs::create_dir(&kids).unwrap();
    let b = small_chain(&dir, &["base.vhd", "l1.vhd", "leaf.vhd"], false, 3, 41);
    let sibling = kids.join("sibling.vhd");
    chainfs_ok(&["create", p(&sibling), "--parent", p(&b.path("l1.vhd"))]);
    let before = (hashes(&dir), hashes(&kids));
    // Offline, the folder makes the merge refuse (the reference).
    let o = chainfs(&[
        "merge",
        p(&b.leaf()),
        p(&b.path("base.vhd")),
        "--parent-dir",
        p(&kids),
    ]);
    assert_ne!(code(&o), 0, "offline merge: {}", text(&o));
    assert!(text(&o).contains("sibling.vhd"), "{}", text(&o));

    let mnt = t.path().join("mnt");
    let g = mount(&b.leaf(), &mnt, &["-o", "rw", "--parent-dir", p(&kids)]);
    expect_refusal(
        &mnt,
        "merge leaf.vhd base.vhd",
        INVALID_STATE,
        32775,
        "sibling.vhd",
    );
    assert_eq!(fs::read_dir(mnt.join("jobs")).unwrap().count(), 0);
    assert_eq!(mount_chain_names(&mnt).len(), 3);
    unmount(&mnt);
    drop(g);
    assert_eq!(
        (hashes(&dir), hashes(&kids)),
        before,
        "a refused merge changed files"
    );
    chainfs_ok(&["check", p(&sibling)]);
}

#[test]
fn control_merge_job_refuses_a_second_merge_cancels_cleanly_and_completes() {
    if !require_fuse() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("c");
    let b = big_chain(Fmt::Vhd, &dir, 320 * MIB, 256, None, 41);
    let mnt = t.path().join("mnt");
    let g = mount(&b.leaf(), &mnt, &["-o", "rw"]);
    let chain_before = fs::read_to_string(mnt.join("chain")).unwrap();
    let lines = mount_chain(&mnt);
    assert_eq!(mount_chain_names(&mnt), ["leaf.vhd", "mid.vhd", "base.vhd"]);
    let full = |n: &str| {
        chain_before
            .lines()
            .map(|l| l.split('\t').nth(1).unwrap().to_string())
            .find(|f| f.ends_with(&format!("/{n}")))
            .unwrap()
    };

    // Started from a shell: the reply is read on the same handle.
    let o = control_sh(&mnt, "merge mid.vhd base.vhd");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "ReturnValue=4096\nJob=jobs/1\n",
        "{}",
        text(&o)
    );
    // A second merge while job 1 runs: EBUSY, 32774.
    let r = control(&mnt, "merge leaf.vhd mid.vhd");
    let j1 = job(&mnt, 1);
    assert_eq!(
        r.errno,
        Some(libc::EBUSY),
        "second merge: {r:?} (job 1: {j1:?})"
    );
    assert_eq!(r.rv(), Some(32774), "{r:?}");
    assert!(matches!(num(&j1, "JobState"), 3 | 4), "{j1:?}");

    // Cancel it: JobState 8, the chain and its bytes as they were, no record.
    let r = control(&mnt, "cancel 1");
    assert_eq!(r.errno, None, "{r:?}");
    assert_eq!(r.rv(), Some(0), "{r:?}");
    assert_eq!(r.field("Job"), Some("jobs/1"), "{r:?}");
    let w = wait_job(&mnt, 1);
    let j = &w.last;
    assert_eq!(num(j, "JobState"), 8, "{j:?}");
    assert_eq!(j["JobStateName"], "Terminated");
    assert_ne!(num(j, "ErrorCode"), 0, "{j:?}");
    assert!(j["ErrorDescription"].contains("cancel"), "{j:?}");
    assert!(num(j, "PercentComplete") < 100, "{j:?}");
    assert_eq!(fs::read_to_string(mnt.join("chain")).unwrap(), chain_before);
    assert!(records(&dir).is_empty(), "{:?}", records(&dir));
    assert_same(
        &read_direct(&mnt.join("disk.raw")),
        b.model(),
        "disk.raw after the cancelled merge",
    );
    // Cancelling an ended job is an invalid state; an unknown one not found.
    expect_refusal(&mnt, "cancel 1", INVALID_STATE, 32775, "already ended");
    expect_refusal(&mnt, "cancel jobs/99", &[libc::ENOENT], 32779, "no job 99");

    // The same merge again, polled to the end.
    let id = start_merge(&mnt, "merge mid.vhd base.vhd");
    assert_eq!(id, 2);
    let w = wait_job(&mnt, 2);
    let j = &w.last;
    assert_eq!(num(j, "JobState"), 7, "{j:?}");
    assert_eq!(j["JobStateName"], "Completed");
    assert_eq!(num(j, "JobId"), 2);
    assert_eq!(
        j["Command"],
        format!("merge {} {}", full("mid.vhd"), full("base.vhd"))
    );
    assert_eq!(num(j, "PercentComplete"), 100);
    assert_eq!(num(j, "ErrorCode"), 0);
    assert_eq!(j["ErrorDescription"], "");
    assert!(num(j, "BytesTotal") >= 256 * MIB, "{j:?}");
    assert_eq!(num(j, "BytesDone"), num(j, "BytesTotal"), "{j:?}");
    let st = &j["StartTime"];
    assert!(
        st.len() == 20 && st.as_bytes()[10] == b'T' && st.ends_with('Z'),
        "StartTime {st:?}"
    );
    assert!(num(j, "ElapsedMs") > 0, "{j:?}");
    assert!(
        w.running_polls >= 3,
        "the merge was polled only {} times while running",
        w.running_polls
    );
    eprintln!("job 2: {} polls, PercentComplete {:?}", w.percents.len(), {
        let mut d = w.percents.clone();
        d.dedup();
        d
    });

    let now = mount_chain(&mnt);
    assert_eq!(mount_chain_names(&mnt), ["leaf.vhd", "base.vhd"]);
    assert_eq!(now[0].2, lines[2].1, "leaf's parent id is base's id");
    let mut jobs: Vec<String> = fs::read_dir(mnt.join("jobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    jobs.sort();
    assert_eq!(jobs, ["1", "2"]);
    assert_eq!(
        num(&job(&mnt, 1), "JobState"),
        8,
        "a finished job stays readable"
    );
    assert_same(
        &read_direct(&mnt.join("disk.raw")),
        b.model(),
        "disk.raw after the merge",
    );
    expect_refusal(
        &mnt,
        "merge mid.vhd base.vhd",
        &[libc::ENOENT],
        32779,
        "mid.vhd",
    );
    unmount(&mnt);
    drop(g);

    let m = Merge::new(&b.names, "mid.vhd", "base.vhd", false);
    let bad = verify_final(&dir, &m, b.model(), &b.snaps[1], &t.path().join("x.raw"));
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

// ---------------------------------------------------------------------------
// 4. The view stays identical.

/// One pass of a reader: when it ran and what it saw.
struct Pass {
    start: Instant,
    end: Instant,
    hash: String,
}

fn overlaps(p: &Pass, (s, e): (Instant, Instant)) -> bool {
    p.start < e && p.end > s
}

fn readers_hash_identical_bytes_before_during_and_after_merges(f: Fmt) {
    if !require_fuse() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("c");
    let size = 96 * MIB;
    let mut rng = Rng(51);
    let names = [
        ln(f, "base"),
        ln(f, "l1"),
        ln(f, "l2"),
        ln(f, "l3"),
        ln(f, "leaf"),
    ];
    let specs: Vec<Spec> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut w = scattered(&mut rng, size, 10, 2 * MIB, i as u64);
            w.push((K4 * rng.below(size / 2 / K4), 8 * MIB));
            Spec {
                name,
                block: if i == 2 { small_block(f) } else { "2M" },
                fixed: false,
                writes: w,
            }
        })
        .collect();
    let b = build(&dir, size, &specs, 52);
    let want = sha256(b.model());
    let mnt = t.path().join("mnt");
    let g = mount(&b.leaf(), &mnt, &["-o", "rw"]);
    let disk = mnt.join("disk.raw");
    assert_eq!(hash_direct(&disk, 1 << 20), want, "before any merge");

    let done = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..3)
        .map(|r| {
            let (done, count) = (done.clone(), count.clone());
            let disk = disk.clone();
            std::thread::spawn(move || {
                let mut passes = Vec::new();
                loop {
                    let last = done.load(Ordering::SeqCst);
                    let start = Instant::now();
                    let hash = match r {
                        0 => hash_direct(&disk, 1 << 20),
                        1 => hash_direct(&disk, 192 * 1024),
                        _ => hash_uncached(&disk),
                    };
                    passes.push(Pass {
                        start,
                        end: Instant::now(),
                        hash,
                    });
                    count.fetch_add(1, Ordering::SeqCst);
                    if last {
                        return passes;
                    }
                }
            })
        })
        .collect();

    let mut merges = Vec::new();
    for (cmd, chain) in [
        (
            merge_cmd(f, "l2", "l1"),
            &[ln(f, "leaf"), ln(f, "l3"), ln(f, "l1"), ln(f, "base")][..],
        ),
        (
            merge_cmd(f, "l3", "base"),
            &[ln(f, "leaf"), ln(f, "base")][..],
        ),
        (merge_cmd(f, "leaf", "base"), &[ln(f, "base")][..]),
    ] {
        // Let the readers get going between merges.
        let c0 = count.load(Ordering::SeqCst);
        wait_for_within("reader passes", Duration::from_secs(60), || {
            count.load(Ordering::SeqCst) >= c0 + 2
        });
        let (s, e, _) = merge_via_control(&mnt, cmd);
        assert_eq!(mount_chain_names(&mnt), chain, "after {cmd}");
        merges.push((cmd, (s, e)));
    }
    done.store(true, Ordering::SeqCst);
    let passes: Vec<Vec<Pass>> = readers.into_iter().map(|h| h.join().unwrap()).collect();

    for (r, ps) in passes.iter().enumerate() {
        for (i, pass) in ps.iter().enumerate() {
            assert_eq!(pass.hash, want, "reader {r}, pass {i}: disk.raw changed");
        }
    }
    for (cmd, iv) in &merges {
        let n: usize = passes
            .iter()
            .map(|ps| ps.iter().filter(|pass| overlaps(pass, *iv)).count())
            .sum();
        assert!(n > 0, "no reader pass overlapped `{cmd}`");
    }
    eprintln!(
        "reader passes: {:?}; merges took {:?}",
        passes.iter().map(|p| p.len()).collect::<Vec<_>>(),
        merges
            .iter()
            .map(|(c, (s, e))| (*c, *e - *s))
            .collect::<Vec<_>>()
    );
    unmount(&mnt);
    drop(g);
    assert!(names.iter().skip(1).all(|n| !dir.join(n).exists()));
    assert_eq!(check(&dir.join(ln(f, "base"))), (0, vec![]));
    assert_same(
        &take_export(&dir.join(ln(f, "base")), &t.path().join("x.raw")).unwrap(),
        b.model(),
        "base after all merges",
    );
}

/// One read of a whole file inside the loop-mounted guest filesystem.
struct FileRead {
    start: Instant,
    end: Instant,
    wrong: Option<String>,
}

fn run_cmd(cmd: &mut Command) {
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{cmd:?}: {}", text(&o));
}

fn ext4_loop_mounted_from_disk_raw_reads_the_same_files_during_merges(f: Fmt) {
    if !require_fuse() || !require_loop() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("c");
    fs::create_dir(&dir).unwrap();
    let raw = t.path().join("work.raw");
    let size: usize = 160 << 20;
    fs::File::create(&raw)
        .unwrap()
        .set_len(size as u64)
        .unwrap();
    let guest = t.path().join("guest");
    let layers = [ln(f, "base"), ln(f, "mid"), ln(f, "leaf")];
    let mut prev = vec![0u8; size];
    let mut expected: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for stage in 0..layers.len() {
        {
            let lo = LoopGuard::attach(&raw, false, false);
            if stage == 0 {
                run_cmd(Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096", &lo.dev]));
            }
            let _m = KernelMount::mount(&lo.dev, &guest, "rw");
            let mut rng = Rng(600 + stage as u64);
            let mut files: Vec<(String, Vec<u8>)> = (0..4)
                .map(|i| {
                    let len = 1 + rng.below(400_000) as usize;
                    (format!("s{stage}-f{i}.bin"), rng.bytes(len))
                })
                .collect();
            // A big file per stage, so each merge has tens of megabytes to
            // copy and lasts longer than dropping the caches.
            let big = if stage == 0 { 8 << 20 } else { 48 << 20 };
            files.push((format!("s{stage}-big.bin"), rng.bytes(big)));
            if stage > 0 {
                // Rewrite a file of the stage before: this layer shadows it.
                let n = format!("s{}-f0.bin", stage - 1);
                files.push((n, rng.bytes(300_000)));
            }
            for (n, data) in files {
                fs::write(guest.join(&n), &data).unwrap();
                expected.insert(n, data);
            }
            run_cmd(&mut Command::new("sync"));
        }
        let now = fs::read(&raw).unwrap();
        layer_from_snapshot(
            &dir,
            &layers,
            stage,
            &["--size", "160M"],
            &prev,
            &now,
            &t.path().join("scratch"),
        );
        prev = now;
    }
    let model = prev;

    let mnt = t.path().join("mnt");
    let g = mount(&dir.join(ln(f, "leaf")), &mnt, &["-o", "rw"]);
    let inside = t.path().join("inside");
    let reads: Vec<FileRead>;
    let mut merges = Vec::new();
    {
        let lo = LoopGuard::attach(&mnt.join("disk.raw"), true, false);
        let km = KernelMount::mount(&lo.dev, &inside, "ro,noload");
        let expected = Arc::new(expected);
        let done = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let reader = {
            let (done, expected, inside, count) = (
                done.clone(),
                expected.clone(),
                inside.clone(),
                count.clone(),
            );
            std::thread::spawn(move || {
                let mut reads = Vec::new();
                for pass in 0.. {
                    let last = done.load(Ordering::SeqCst);
                    drop_caches();
                    for (n, data) in expected.iter() {
                        let start = Instant::now();
                        let wrong = match fs::read(inside.join(n)) {
                            Ok(got) if got == *data => None,
                            Ok(_) => Some(format!("pass {pass}, {n}: different bytes")),
                            Err(e) => Some(format!("pass {pass}, {n}: {e}")),
                        };
                        reads.push(FileRead {
                            start,
                            end: Instant::now(),
                            wrong,
                        });
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    if last {
                        break;
                    }
                }
                reads
            })
        };
        for (cmd, chain) in [
            (
                merge_cmd(f, "mid", "base"),
                &[ln(f, "leaf"), ln(f, "base")][..],
            ),
            (merge_cmd(f, "leaf", "base"), &[ln(f, "base")][..]),
        ] {
            // Start while the reader is reading, not while it drops the
            // (large, at first) caches.
            let c0 = count.load(Ordering::SeqCst);
            wait_for_within("guest reads", Duration::from_secs(60), || {
                count.load(Ordering::SeqCst) >= c0 + 3
            });
            let (s, e, _) = merge_via_control(&mnt, cmd);
            assert_eq!(mount_chain_names(&mnt), chain, "after {cmd}");
            merges.push((cmd, s, e));
        }
        done.store(true, Ordering::SeqCst);
        reads = reader.join().unwrap();
        drop(km);
        drop(lo);
    }
    let wrong: Vec<&String> = reads.iter().filter_map(|r| r.wrong.as_ref()).collect();
    assert!(
        wrong.is_empty(),
        "files read wrong inside the guest: {wrong:?}"
    );
    for (cmd, s, e) in &merges {
        let n = reads.iter().filter(|r| r.start < *e && r.end > *s).count();
        let near: Vec<String> = reads
            .iter()
            .map(|r| {
                let rel = |t: Instant| {
                    if t >= *s {
                        (t - *s).as_millis() as i64
                    } else {
                        -((*s - t).as_millis() as i64)
                    }
                };
                format!("{}..{}", rel(r.start), rel(r.end))
            })
            .collect();
        assert!(
            n > 0,
            "no read of a guest file overlapped `{cmd}` (it took {:?}); reads in ms from its start: {near:?}",
            *e - *s
        );
    }
    eprintln!(
        "guest file reads: {}; merges took {:?}",
        reads.len(),
        merges
            .iter()
            .map(|(c, s, e)| (*c, *e - *s))
            .collect::<Vec<_>>()
    );
    assert_same(&read_direct(&mnt.join("disk.raw")), &model, "disk.raw");
    unmount(&mnt);
    drop(g);
    assert!(!dir.join(ln(f, "mid")).exists() && !dir.join(ln(f, "leaf")).exists());
    assert_eq!(check(&dir.join(ln(f, "base"))), (0, vec![]));
    assert_same(
        &take_export(&dir.join(ln(f, "base")), &t.path().join("x.raw")).unwrap(),
        &model,
        "base after the merges",
    );
}

// ---------------------------------------------------------------------------
// 5. Writes during merges.

fn writes_during_merges_are_never_lost_even_when_the_leaf_is_merged_into_base(f: Fmt) {
    if !require_fuse() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("c");
    let size = 160 * MIB;
    let mut rng = Rng(71);
    let specs = [
        Spec {
            name: ln(f, "base"),
            block: "2M",
            fixed: false,
            writes: scattered(&mut rng, size, 8, MIB, 0),
        },
        Spec {
            name: ln(f, "mid"),
            block: "2M",
            fixed: false,
            writes: vec![(8 * MIB, 64 * MIB)],
        },
        Spec {
            name: ln(f, "leaf"),
            block: small_block(f),
            fixed: false,
            writes: vec![(48 * MIB, 96 * MIB), (K4, 3 * K4)],
        },
    ];
    let b = build(&dir, size, &specs, 72);
    let mnt = t.path().join("mnt");
    let g = mount(&b.leaf(), &mnt, &["-o", "rw"]);
    let disk = mnt.join("disk.raw");

    let stop = Arc::new(AtomicBool::new(false));
    let merging = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, merging, count, disk) =
            (stop.clone(), merging.clone(), count.clone(), disk.clone());
        let mut model = b.model().to_vec();
        std::thread::spawn(move || {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&disk)
                .unwrap();
            let mut rng = Rng(73);
            let mut during = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let (off, len) = if rng.below(2) == 0 {
                    let len = K4 * (1 + rng.below(64));
                    (K4 * rng.below((size - len) / K4), len)
                } else {
                    let len = 1 + rng.below(20_000);
                    (rng.below(size - len), len)
                };
                let data = rng.bytes(len as usize);
                let was_merging = merging.load(Ordering::SeqCst);
                f.write_all_at(&data, off)
                    .unwrap_or_else(|e| panic!("pwrite of {len} at {off}: {e}"));
                f.sync_all()
                    .unwrap_or_else(|e| panic!("fsync after write at {off}: {e}"));
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                if was_merging && merging.load(Ordering::SeqCst) {
                    during += 1;
                }
                count.fetch_add(1, Ordering::SeqCst);
            }
            (model, during)
        })
    };
    let wait_writes = |n: u64| {
        let c0 = count.load(Ordering::SeqCst);
        wait_for_within("the writer", Duration::from_secs(60), || {
            count.load(Ordering::SeqCst) >= c0 + n
        });
    };
    wait_writes(20);
    let mut during = Vec::new();
    for (cmd, chain) in [
        (
            merge_cmd(f, "mid", "base"),
            &[ln(f, "leaf"), ln(f, "base")][..],
        ),
        (merge_cmd(f, "leaf", "base"), &[ln(f, "base")][..]),
    ] {
        let c0 = count.load(Ordering::SeqCst);
        merging.store(true, Ordering::SeqCst);
        let (s, e, w) = merge_via_control(&mnt, cmd);
        merging.store(false, Ordering::SeqCst);
        during.push((cmd, count.load(Ordering::SeqCst) - c0, e - s));
        assert_eq!(mount_chain_names(&mnt), chain, "after {cmd}: {:?}", w.last);
        wait_writes(20);
    }
    stop.store(true, Ordering::SeqCst);
    let (model, during_total) = writer.join().unwrap();
    eprintln!(
        "{} writes, {during_total} inside merges: {during:?}",
        count.load(Ordering::SeqCst)
    );
    for (cmd, n, _) in &during {
        assert!(*n > 0, "no write happened while `{cmd}` ran");
    }

    assert_same(&read_direct(&disk), &model, "disk.raw after the merges");
    assert_same(&fs::read(&disk).unwrap(), &model, "disk.raw (page cache)");
    unmount(&mnt);
    drop(g);

    let base = dir.join(ln(f, "base"));
    assert_eq!(names_of(&info(&base).unwrap()), [ln(f, "base")]);
    assert!(!dir.join(ln(f, "mid")).exists() && !dir.join(ln(f, "leaf")).exists());
    assert!(records(&dir).is_empty());
    assert_eq!(check(&base), (0, vec![]));
    assert_same(
        &take_export(&base, &t.path().join("x.raw")).unwrap(),
        &model,
        "export of base",
    );
    let g = mount(&base, &mnt, &[]);
    assert_same(&read_direct(&disk), &model, "disk.raw of base remounted");
    unmount(&mnt);
    drop(g);
}

// ---------------------------------------------------------------------------
// 6. Fault injection at every write/sync point.

fn fault_at_every_point(f: Fmt, stems: &[&str], src: &str, dst: &str, keep: bool, seed: u64) {
    let t = fast_tempdir();
    let built = t.path().join("pristine");
    let names = names_for(f, stems);
    let (src, dst) = (named(&names, src), named(&names, dst));
    let seed = seed + 100 * f.index();
    // Few blocks, so there are tens of points, not thousands (VHDX blocks
    // are twice as large, and each of its points costs more: half the disk).
    let size = if f == Fmt::Vhdx { 4 * MIB } else { 8 * MIB };
    let b = sized_chain(&built, size, &names, false, 1, seed);
    // The copies' absolute locators name `pristine`, which must not resolve.
    let pristine = t.path().join("pristine.hidden");
    fs::rename(&built, &pristine).unwrap();
    let scratch = t.path().join("export.raw");
    let m = Merge::new(&b.names, src, dst, keep);
    let (model, dest_model) = (b.model(), &b.snaps[m.src]);

    let mut violations = Vec::new();
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    let mut last = None;
    for k in 1..=1000u32 {
        let work = t.path().join(format!("k{k}"));
        copy_dir(&pristine, &work);
        let args = m.args(&work);
        let o = Command::new(bin())
            .args(&args)
            .env("CHAINFS_FAULT_AFTER", k.to_string())
            .output()
            .unwrap();
        match code(&o) {
            FAULT_EXIT => {
                // qemu-img, qcow2's independent reader, finds no corruption
                // in any layer the crash left (leaks allowed).
                if f == Fmt::Qcow2 && have_qemu_img() {
                    for n in &b.names {
                        let l = work.join(n);
                        if l.exists() {
                            qemu_check_no_corruption(f, &l, &format!("k={k}"));
                        }
                    }
                }
                let leaks_ok = f.crash_leaks_outlive_a_rerun();
                let (bad, state) =
                    verify_interrupted(&work, &m, model, dest_model, &scratch, leaks_ok);
                violations.extend(bad.into_iter().map(|v| format!("k={k} ({state}): {v}")));
                *states.entry(state).or_default() += 1;
            }
            0 => {
                violations.extend(
                    verify_final(&work, &m, model, dest_model, &scratch)
                        .into_iter()
                        .map(|v| format!("k={k} (ran through): {v}")),
                );
                last = Some(k);
            }
            c => violations.push(format!(
                "k={k}: exit {c}, expected {FAULT_EXIT} or 0: {}",
                text(&o).trim()
            )),
        }
        fs::remove_dir_all(&work).unwrap();
        if last.is_some() || violations.len() > 200 {
            break;
        }
    }
    let points = last.map(|k| k - 1);
    eprintln!(
        "merge {src} {dst}{}: {points:?} fault points; states after the crashes: {states:?}",
        if keep { " --keep" } else { "" }
    );
    assert!(
        violations.is_empty(),
        "merge {src} {dst}{}: {} violations:\n{}",
        if keep { " --keep" } else { "" },
        violations.len(),
        violations.join("\n")
    );
    let points = points.expect("the merge never ran through");
    assert!(points >= 10, "only {points} fault points");
    assert!(
        states.keys().any(|s| s.starts_with("record copy"))
            && states.keys().any(|s| s.starts_with("record relinked")),
        "crashes never hit both phases: {states:?}"
    );
}

fn fault_injection_at_every_point_of_middle_into_base_merge_loses_nothing(f: Fmt) {
    fault_at_every_point(f, &["base", "l1", "l2", "leaf"], "l2", "base", false, 61);
}

fn fault_injection_at_every_point_of_leaf_into_grandparent_merge_loses_nothing(f: Fmt) {
    fault_at_every_point(f, &["base", "l1", "l2", "leaf"], "leaf", "l1", false, 62);
}

fn fault_injection_at_every_point_of_keep_merge_loses_nothing(f: Fmt) {
    fault_at_every_point(f, &["base", "l1", "l2", "leaf"], "l2", "base", true, 63);
}

// ---------------------------------------------------------------------------
// 7. kill -9 of the daemon during merges.

fn kill_9_of_the_daemon_during_merges_loses_nothing_and_the_merge_can_be_finished(f: Fmt) {
    if !require_fuse() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let built = t.path().join("pristine");
    let size = 256 * MIB;
    let b = big_chain(
        f,
        &built,
        size,
        96,
        Some((96 * MIB, 128 * MIB)),
        81 + 100 * f.index(),
    );
    let pristine = t.path().join("pristine.hidden");
    fs::rename(&built, &pristine).unwrap();
    let scratch = t.path().join("export.raw");

    // How long a merge takes here, so the kills land inside merges.
    let probe = t.path().join("probe");
    copy_dir(&pristine, &probe);
    let t0 = Instant::now();
    chainfs_ok(&[
        "merge",
        p(&probe.join(ln(f, "leaf"))),
        p(&probe.join(ln(f, "base"))),
    ]);
    let mut full = t0.elapsed();
    fs::remove_dir_all(&probe).unwrap();

    let mut rng = Rng(82);
    let mut interrupted = 0;
    let mut report = Vec::new();
    let mut violations = Vec::new();
    for it in 0..4 {
        let (src, share) = if it % 2 == 0 {
            (ln(f, "mid"), 0.5)
        } else {
            (ln(f, "leaf"), 1.0)
        };
        let m = Merge::new(&b.names, src, ln(f, "base"), false);
        let work = t.path().join(format!("run{it}"));
        copy_dir(&pristine, &work);
        let mnt = t.path().join(format!("mnt{it}"));
        fs::create_dir(&mnt).unwrap();
        let guard = MountGuard::new(&mnt);
        let mut child = Command::new(bin())
            .args(["mount", "-f", "-o", "rw"])
            .arg(work.join(ln(f, "leaf")))
            .arg(&mnt)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for("the foreground mount", || is_mounted(&mnt));
        let id = start_merge(&mnt, &format!("merge {src} {}", ln(f, "base")));
        assert_eq!(id, 1);
        let frac = (5 + rng.below(90)) as f64 / 100.0;
        let delay = full.mul_f64(share * frac);
        std::thread::sleep(delay);
        // SAFETY: the pid of the daemon this test spawned.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let st = child.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));
        drop(guard);
        assert!(!is_mounted(&mnt), "the dead mount is still there");

        if f == Fmt::Qcow2 && have_qemu_img() {
            for n in &b.names {
                let l = work.join(n);
                if l.exists() {
                    qemu_check_no_corruption(f, &l, &format!("iteration {it}"));
                }
            }
        }
        let leaks_ok = f.crash_leaks_outlive_a_rerun();
        let (bad, state) =
            verify_interrupted(&work, &m, b.model(), &b.snaps[m.src], &scratch, leaks_ok);
        if state.starts_with("record copy") || state.starts_with("record relink") {
            interrupted += 1;
        } else if state.contains("SOURCE deleted") {
            // The merge in the daemon ran faster than the offline probe:
            // aim the next kills earlier.
            full = full.mul_f64(0.5);
        }
        report.push(format!("merge {src} killed after {delay:?}: {state}"));
        violations.extend(
            bad.into_iter()
                .map(|v| format!("iteration {it} ({state}): {v}")),
        );
        fs::remove_dir_all(&work).unwrap();
    }
    eprintln!("full merge takes {full:?}; {}", report.join("; "));
    assert!(violations.is_empty(), "{}", violations.join("\n"));
    assert!(
        interrupted > 0,
        "no kill landed inside a merge: {}",
        report.join("; ")
    );
}

// ---------------------------------------------------------------------------
// The matrix: the offline merges and the crash loops, once per format.

per_format! {
    offline_merge_of_leaf_into_its_parent_makes_the_parent_the_leaf();
    offline_merge_into_grandparent_through_an_intermediate_relinks_the_leaf();
    offline_merge_of_leaf_into_fixed_base_leaves_only_the_base() in [Vhd, Vhdx];
    offline_merge_of_middle_layer_into_base_relinks_the_leaf_and_other_children();
    offline_merge_with_keep_leaves_the_merged_files_detached();
    offline_merge_of_leaf_into_base_with_keep_detaches_every_merged_layer();
    fault_injection_at_every_point_of_middle_into_base_merge_loses_nothing();
    fault_injection_at_every_point_of_leaf_into_grandparent_merge_loses_nothing();
    fault_injection_at_every_point_of_keep_merge_loses_nothing();
    readers_hash_identical_bytes_before_during_and_after_merges();
    ext4_loop_mounted_from_disk_raw_reads_the_same_files_during_merges();
    writes_during_merges_are_never_lost_even_when_the_leaf_is_merged_into_base();
    kill_9_of_the_daemon_during_merges_loses_nothing_and_the_merge_can_be_finished();
}
