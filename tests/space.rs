//! Space a layer holds for nothing (issue 15, defect 2): a merge interrupted
//! and rerun reuses what the interrupted run allocated in DESTINATION;
//! `check` reports unreferenced space; a merge that cannot fit refuses
//! before it writes; `chainfs compact` gives unused space back without
//! changing a byte of what the chain reads, at every crash point; a merge
//! gives its deleted layers' space back (before it returns with
//! `--wait-free`, a moment after by default).
//!
//! Every test runs the real binary on real files; crashes are injected
//! with `CHAINFS_FAULT_AFTER=k` (src/fault.rs), as in tests/merge.rs.
//!
//! The cases run once per format (`per_format!` at the end: `vhd::NAME`,
//! `vhdx::NAME`, `qcow2::NAME`). `chainfs compact` is VHD and VHDX only (a
//! qcow2 refuses it, exit 6: `qemu-img check -r leaks` is its cure, and
//! `qemu-img convert` its compaction), and a qcow2 has no fixed type, so
//! the compact cases list `[Vhd, Vhdx]` and
//! [`compact_of_a_qcow2_is_unsupported_and_changes_nothing`] pins the
//! refusal.

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const MIB: u64 = 1 << 20;

fn len(p: &Path) -> u64 {
    fs::metadata(p).unwrap().len()
}

/// Bytes the file occupies (`st_blocks`).
fn on_disk(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks() * 512
}

/// sha256 of the flattened chain at `img` (its export).
fn flat_sha(img: &Path, scratch: &Path) -> Result<String, String> {
    let _ = fs::remove_file(scratch);
    let o = chainfs(&["export", p(img), p(scratch), "--force"]);
    if code(&o) != 0 {
        return Err(text(&o));
    }
    Ok(sha256_file(scratch))
}

/// base (data in a few blocks, one block of zeros) and a child holding
/// `child_blocks` blocks of its own data where the base has none, one
/// block of zeros over base data, and one partly written block.
fn chain(dir: &Path, f: Fmt, size: u64, child_blocks: u64, seed: u64) -> (PathBuf, PathBuf) {
    fs::create_dir_all(dir).unwrap();
    let base = dir.join(f.base_name("base"));
    let child = dir.join(f.child_name("mid"));
    let bs = f.min_block();
    let scratch = dir.join("scratch.bin");
    let mut rng = Rng(seed);
    chainfs_ok(&[
        "create",
        p(&base),
        "--size",
        &size.to_string(),
        "--block-size",
        &bs.to_string(),
    ]);
    chainfs_write(&base, 0, &rng.bytes(3 * bs as usize), &scratch);
    // A block of stored zeros (what compact gives back): `write` skips zeros
    // the chain already reads, so --no-sparse makes it store them.
    std::fs::write(&scratch, vec![0u8; bs as usize]).unwrap();
    chainfs_ok(&[
        "write",
        p(&base),
        "--offset",
        &(4 * bs).to_string(),
        "--input",
        p(&scratch),
        "--no-sparse",
    ]);
    chainfs_ok(&[
        "create",
        p(&child),
        "--parent",
        p(&base),
        "--block-size",
        &bs.to_string(),
    ]);
    chainfs_write(
        &child,
        8 * bs,
        &rng.bytes((child_blocks * bs) as usize),
        &scratch,
    );
    chainfs_write(&child, bs, &vec![0u8; bs as usize], &scratch);
    chainfs_write(&child, 2 * bs + 4096, &rng.bytes(8192), &scratch);
    fs::remove_file(&scratch).unwrap();
    (base, child)
}

// ---------------------------------------------------------------------------
// 1. An interrupted merge, rerun, takes no more space than one that ran
//    through.

fn merge_interrupted_at_every_point_and_rerun_is_within_one_block_of_a_clean_merge(f: Fmt) {
    let seed = 1501 + f.index();
    let t = fast_tempdir();
    let pristine = t.path().join("pristine");
    let (base, child) = chain(&pristine, f, 64 * MIB, 12, seed);
    let scratch = t.path().join("export.raw");
    let want = flat_sha(&child, &scratch).unwrap();

    // The reference: a merge that runs through.
    let clean = t.path().join("clean");
    copy_dir(&pristine, &clean);
    let cb = clean.join(f.base_name("base"));
    chainfs_ok(&["merge", p(&clean.join(f.child_name("mid"))), p(&cb)]);
    let (ref_len, ref_disk) = (len(&cb), on_disk(&cb));
    assert_eq!(flat_sha(&cb, &scratch).unwrap(), want);
    // One block of slack: its data, a VHD bitmap and alignment.
    let slack = f.min_block() + 8192;

    let mut bad = Vec::new();
    let mut points = None;
    let mut worst = 0u64;
    for k in 1..=2000u32 {
        let work = t.path().join(format!("k{k}"));
        copy_dir(&pristine, &work);
        let (wb, wc) = (
            work.join(f.base_name("base")),
            work.join(f.child_name("mid")),
        );
        let o = Command::new(bin())
            .args(["merge", p(&wc), p(&wb)])
            .env("CHAINFS_FAULT_AFTER", k.to_string())
            .output()
            .unwrap();
        match code(&o) {
            0 => {
                points = Some(k - 1);
                fs::remove_dir_all(&work).unwrap();
                break;
            }
            FAULT_EXIT => {}
            c => {
                bad.push(format!("k={k}: merge exit {c}: {}", text(&o).trim()));
                continue;
            }
        }
        // A crash after the record was removed: the merge had finished.
        let finished = !wc.exists()
            && !work
                .join(format!(".{}.chainfs-merge", f.child_name("mid")))
                .exists();
        let o = chainfs(&["merge", p(&wc), p(&wb)]);
        if !finished && code(&o) != 0 {
            bad.push(format!(
                "k={k}: rerun exit {}: {}",
                code(&o),
                text(&o).trim()
            ));
            continue;
        }
        let (l, d) = (len(&wb), on_disk(&wb));
        worst = worst.max(l.saturating_sub(ref_len));
        if l > ref_len + slack || d > ref_disk + slack {
            bad.push(format!(
                "k={k}: after the rerun {} is {l} bytes long, {d} on disk; a merge that ran \
                 through: {ref_len} long, {ref_disk} on disk",
                f.base_name("base")
            ));
        }
        match flat_sha(&wb, &scratch) {
            Ok(h) if h == want => {}
            r => bad.push(format!("k={k}: content after the rerun: {r:?}")),
        }
        let (c, probs) = check(&wb);
        if c != 0 {
            bad.push(format!("k={k}: check after the rerun: exit {c} {probs:?}"));
        }
        fs::remove_dir_all(&work).unwrap();
        if bad.len() > 20 {
            break;
        }
    }
    eprintln!(
        "{}: {points:?} fault points; worst growth over a clean merge {worst} bytes",
        f.base_name("base")
    );
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    assert!(points.expect("the merge never ran through") >= 10);
    let _ = (base, child);
}

// ---------------------------------------------------------------------------
// 2. `check` reports planted unreferenced space; `compact` gives it back.

/// What a crash before a flush leaves: `n` bytes of data past the last
/// block, no table entry pointing at them (VHD: the footer moved to the new
/// end, as the driver grows the file; VHDX: the file extended).
fn plant_leak(img: &Path, f: Fmt, n: u64, seed: u64) -> (u64, u64) {
    let file = fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(img)
        .unwrap();
    let l = file.metadata().unwrap().len();
    let junk = Rng(seed).bytes(n as usize);
    match f {
        Fmt::Vhd => {
            let mut footer = [0u8; 512];
            file.read_exact_at(&mut footer, l - 512).unwrap();
            let at = l.next_multiple_of(4096);
            file.write_all_at(&footer, at + n).unwrap();
            file.write_all_at(&junk, at).unwrap();
            (at, at + n)
        }
        Fmt::Vhdx => {
            let at = l.next_multiple_of(MIB);
            file.write_all_at(&junk, at).unwrap();
            (at, at + n)
        }
        Fmt::Qcow2 => unreachable!("the compact cases are VHD and VHDX only"),
    }
}

/// VHD and VHDX: `compact` gives the space back (a qcow2 has no compact).
fn check_reports_planted_unreferenced_space_and_compact_gives_it_back(f: Fmt) {
    let t = tempfile::tempdir().unwrap();
    let (base, child) = chain(t.path(), f, 64 * MIB, 4, 77);
    let scratch = t.path().join("export.raw");
    let want = flat_sha(&child, &scratch).unwrap();
    assert_eq!(check(&child), (0, vec![]), "check before planting");
    let (from, to) = plant_leak(&base, f, 3 * MIB, 5);
    let _ = from;
    let (c, probs) = check(&child);
    assert_eq!(c, 3, "check exit with planted space: {probs:?}");
    assert_eq!(probs.len(), 1, "{probs:?}");
    let finding = &probs[0];
    assert!(
        finding.starts_with(p(&base))
            && is_leak(finding)
            && finding.contains("3.0 MiB")
            && finding.contains(&format!("-{to:#x}"))
            && finding.contains("chainfs compact"),
        "the finding names the file, the range {from:#x}-{to:#x}, the bytes and the cure: {finding}"
    );
    // Reading is unaffected.
    assert_eq!(flat_sha(&child, &scratch).unwrap(), want);
    let before = on_disk(&base);
    let out = chainfs_ok(&["compact", p(&base), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["bytes_freed"].as_u64().unwrap() >= 3 * MIB,
        "compact frees the planted space: {out}"
    );
    assert!(on_disk(&base) + 3 * MIB <= before, "{out}");
    assert_eq!(check(&child), (0, vec![]), "check after compact");
    assert_eq!(flat_sha(&child, &scratch).unwrap(), want);
}

/// A hole is not a leak: a sparse gap past the last block is not reported.
#[test]
fn check_does_not_count_holes_as_unreferenced_space() {
    let t = tempfile::tempdir().unwrap();
    let (base, child) = chain(t.path(), Fmt::Vhdx, 64 * MIB, 2, 3);
    let l = len(&base);
    fs::OpenOptions::new()
        .write(true)
        .open(&base)
        .unwrap()
        .set_len(l + 16 * MIB)
        .unwrap();
    assert_eq!(check(&child), (0, vec![]));
}

// ---------------------------------------------------------------------------
// 3. `compact` at every crash point.

fn compact_at_every_point(f: Fmt, target_child: bool, seed: u64) {
    let t = fast_tempdir();
    let pristine = t.path().join("pristine");
    let (base, child) = chain(&pristine, f, 32 * MIB, 4, seed);
    let target = if target_child { &child } else { &base };
    plant_leak(target, f, 2 * f.min_block(), seed + 1);
    let name = target.file_name().unwrap().to_owned();
    let scratch = t.path().join("export.raw");
    let want = flat_sha(&child, &scratch).unwrap();

    let mut bad = Vec::new();
    let mut points = None;
    for k in 1..=2000u32 {
        let work = t.path().join(format!("k{k}"));
        copy_dir(&pristine, &work);
        let (wt, wc) = (work.join(&name), work.join(f.child_name("mid")));
        // Measured on the copy: copying need not keep holes.
        let before = on_disk(&wt);
        let o = Command::new(bin())
            .args(["compact", p(&wt)])
            .env("CHAINFS_FAULT_AFTER", k.to_string())
            .output()
            .unwrap();
        let c = code(&o);
        if c != 0 && c != FAULT_EXIT {
            bad.push(format!("k={k}: compact exit {c}: {}", text(&o).trim()));
        }
        match flat_sha(&wc, &scratch) {
            Ok(h) if h == want => {}
            r => bad.push(format!("k={k}: content after compact (exit {c}): {r:?}")),
        }
        let (cc, probs) = check(&wc);
        if c == 0 {
            if cc != 0 {
                bad.push(format!("k={k}: check after compact: exit {cc} {probs:?}"));
            }
            let after = on_disk(&wt);
            if after >= before {
                bad.push(format!("k={k}: compact freed nothing: {before} -> {after}"));
            }
            points = Some(k - 1);
        } else if !probs.iter().all(|p| is_leak(p)) || (cc == 0) != probs.is_empty() {
            bad.push(format!(
                "k={k}: check after a crash reports more than leaks: exit {cc} {probs:?}"
            ));
        } else {
            // A rerun finishes the job.
            let o = chainfs(&["compact", p(&wt)]);
            if code(&o) != 0 || check(&wc).0 != 0 {
                bad.push(format!("k={k}: rerun of compact: {}", text(&o).trim()));
            }
        }
        fs::remove_dir_all(&work).unwrap();
        if points.is_some() || bad.len() > 20 {
            break;
        }
    }
    eprintln!("compact {name:?}: {points:?} fault points");
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    assert!(points.expect("compact never ran through") >= 5);
}

/// VHD and VHDX (a qcow2 has no compact).
fn compact_of_a_base_at_every_crash_point_keeps_the_content(f: Fmt) {
    compact_at_every_point(f, false, 31 + 2 * f.index());
}

/// VHD and VHDX (a qcow2 has no compact).
fn compact_of_a_child_at_every_crash_point_keeps_the_content(f: Fmt) {
    compact_at_every_point(f, true, 32 + 2 * f.index());
}

/// Zero blocks of a base are unallocated; the child's zero block over base
/// data stays (it hides the parent), and the chain reads the same. VHD and
/// VHDX (a qcow2 has no compact).
fn compact_unallocates_zero_blocks_of_a_base_but_not_zeros_hiding_a_parent(f: Fmt) {
    let t = tempfile::tempdir().unwrap();
    let (base, child) = chain(t.path(), f, 32 * MIB, 2, 9);
    let scratch = t.path().join("export.raw");
    let want = flat_sha(&child, &scratch).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&chainfs_ok(&["compact", p(&base), "--json"])).unwrap();
    assert_eq!(v["blocks_freed"], 1, "{f:?}: the base's zero block: {v}");
    chainfs_ok(&["compact", p(&child), "--json"]);
    assert_eq!(flat_sha(&child, &scratch).unwrap(), want, "{f:?}");
    assert_eq!(check(&child), (0, vec![]), "{f:?}");
}

fn compact_is_refused_while_a_mount_uses_the_chain(f: Fmt) {
    if !require_fuse() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (base, child) = chain(t.path(), f, 32 * MIB, 2, 4);
    let mnt = t.path().join("mnt");
    let before = sha256_file(&base);
    let _g = mount(&child, &mnt, &["-o", "rw"]);
    for img in [&base, &child] {
        let o = chainfs(&["compact", p(img)]);
        assert_eq!(code(&o), 7, "compact of a mounted layer: {}", text(&o));
        assert!(text(&o).contains("in use"), "{}", text(&o));
    }
    assert_eq!(sha256_file(&base), before);
}

/// VHD and VHDX (a qcow2 has no fixed type).
fn compact_of_a_fixed_disk_is_unsupported(f: Fmt) {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join(f.base_name("f"));
    f.create_base(&img, 8 * MIB, &["--type", "fixed"]);
    let o = chainfs(&["compact", p(&img)]);
    assert_eq!(code(&o), 6, "{}", text(&o));
    assert!(text(&o).contains("fixed"), "{}", text(&o));
}

/// A qcow2 refuses `compact` (exit 6, "not supported"), naming the file,
/// and is left byte for byte as it was.
#[test]
fn compact_of_a_qcow2_is_unsupported_and_changes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let (base, child) = chain(t.path(), Fmt::Qcow2, 32 * MIB, 2, 10);
    for img in [&base, &child] {
        let before = sha256_file(img);
        let o = chainfs(&["compact", p(img)]);
        assert_eq!(code(&o), 6, "{}", text(&o));
        assert!(
            text(&o).contains(p(img)) && text(&o).contains("not supported"),
            "{}",
            text(&o)
        );
        assert_eq!(sha256_file(img), before, "{}", img.display());
    }
}

// ---------------------------------------------------------------------------
// 4. The pre-flight space check on a small real file system.

fn free(dir: &Path) -> u64 {
    let o = Command::new("stat")
        .args(["-f", "-c", "%a %S"])
        .arg(dir)
        .output()
        .unwrap();
    let t = String::from_utf8(o.stdout).unwrap();
    let mut it = t.split_whitespace().map(|x| x.parse::<u64>().unwrap());
    it.next().unwrap() * it.next().unwrap()
}

/// Leave `want` bytes free in `dir` with a filler file.
fn fill_to(dir: &Path, want: u64) {
    let filler = dir.join("filler");
    let _ = fs::remove_file(&filler);
    let f = free(dir);
    assert!(f > want, "{f} free, want {want}");
    let o = Command::new("fallocate")
        .args(["-l", &(f - want).to_string()])
        .arg(&filler)
        .output()
        .unwrap();
    assert!(o.status.success(), "fallocate: {}", text(&o));
}

fn merge_that_cannot_fit_is_refused_before_writing_and_the_rerun_reuses_blocks(f: Fmt) {
    if !require("root (to mount a tmpfs)", is_root() && have("fallocate")) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let fsdir = t.path().join("small");
    let _m = Tmpfs::mount(&fsdir, "300m");
    let dir = fsdir.join("chain");
    fs::create_dir(&dir).unwrap();
    let base = dir.join(f.base_name("base"));
    let child = dir.join(f.child_name("mid"));
    let scratch = t.path().join("scratch.bin");
    let mut rng = Rng(15);
    chainfs_ok(&["create", p(&base), "--size", "1280M"]);
    chainfs_write(&base, 0, &rng.bytes(40 << 20), &scratch);
    chainfs_ok(&["create", p(&child), "--parent", p(&base)]);
    chainfs_write(&child, 1 << 30, &rng.bytes(120 << 20), &scratch);
    let want = flat_sha(&child, &t.path().join("a.raw")).unwrap();
    let _ = fs::remove_file(t.path().join("a.raw"));

    // 1. 100 MiB free, the merge needs about 120 MiB more: refused before
    //    anything is written.
    fill_to(&fsdir, 100 * MIB);
    let base_sha = sha256_file(&base);
    let free_before = free(&fsdir);
    let o = chainfs(&["merge", p(&child), p(&base)]);
    let msg = text(&o);
    assert_eq!(code(&o), 9, "merge that cannot fit: {msg}");
    assert!(
        msg.contains("not enough space")
            && msg.contains(p(&base))
            && msg.contains("needs")
            && msg.contains(&format!("{free_before} bytes")),
        "the refusal names DESTINATION, needed and free bytes: {msg}"
    );
    assert_eq!(sha256_file(&base), base_sha, "DESTINATION changed");
    assert!(
        !dir.join(format!(".{}.chainfs-merge", f.child_name("mid")))
            .exists(),
        "an intent record was written"
    );
    assert_eq!(free(&fsdir), free_before);

    // 2. Room for the merge with a little to spare; a run interrupted in
    //    the middle of its copy ...
    //    (later and later points, each run on what the last one left,
    //    until one stops with a good part of the copy done).
    fill_to(&fsdir, 135 * MIB);
    let mut k = 10;
    while free(&fsdir) >= 100 * MIB {
        let o = Command::new(bin())
            .args(["merge", p(&child), p(&base)])
            .env("CHAINFS_FAULT_AFTER", k.to_string())
            .output()
            .unwrap();
        assert_eq!(code(&o), FAULT_EXIT, "k={k}: {}", text(&o));
        k += 5;
    }
    // 3. ... and the rerun fits, because it reuses them.
    let o = chainfs(&["merge", p(&child), p(&base)]);
    assert_eq!(code(&o), 0, "rerun: {}", text(&o));
    assert!(!child.exists());
    assert_eq!(
        flat_sha(&base, &t.path().join("b.raw")).unwrap(),
        want,
        "merged content"
    );
    assert_eq!(check(&base), (0, vec![]));
}

// ---------------------------------------------------------------------------
// 5. The merged layers' space comes back: with `--wait-free` before the
//    command returns; by default a moment after it, once the `chainfs-free`
//    helper that held the unlinked layers exits (src/merge/free.rs).

/// Processes with a file open under `dir` (their /proc/PID/fd links).
fn holders_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(fds) = fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = fs::read_link(fd.path()) {
                if target.starts_with(dir) {
                    found.push(format!("{}: {}", e.path().display(), target.display()));
                }
            }
        }
    }
    found
}

fn merge_gives_the_deleted_layers_space_back_with_wait_free_at_once_and_by_default_soon(f: Fmt) {
    if !require("root (to mount a tmpfs)", is_root()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    for wait_free in [true, false] {
        let fsdir = t.path().join(format!("fs-{wait_free}"));
        let _m = Tmpfs::mount(&fsdir, "200m");
        let blocks = (24 * MIB) / f.min_block();
        let (base, child) = chain(&fsdir.join("c"), f, 64 * MIB, blocks, 21);
        let want = flat_sha(&child, &t.path().join("a.raw")).unwrap();
        let held = on_disk(&child);
        let base_before = on_disk(&base);
        let free_before = free(&fsdir);
        let mut args = vec!["merge", p(&child), p(&base)];
        if wait_free {
            args.push("--wait-free");
        }
        chainfs_ok(&args);
        assert!(!child.exists(), "{} was not deleted", child.display());
        // Everything the child held, less what the base grew by (the
        // intent record and the base's own tables are within the slack).
        let want_free = free_before + held - (on_disk(&base) - base_before) - MIB;
        assert!(held > 16 * MIB, "the child holds only {held} bytes");
        if wait_free {
            assert!(
                free(&fsdir) >= want_free,
                "--wait-free returned with {} bytes free, want {want_free}: {:?}",
                free(&fsdir),
                holders_under(&fsdir)
            );
        } else {
            wait_for("the merged layer's space to come back", || {
                free(&fsdir) >= want_free
            });
        }
        wait_for(
            "no process to hold files in the merged chain's folder",
            || holders_under(&fsdir).is_empty(),
        );
        assert_eq!(
            flat_sha(&base, &t.path().join("b.raw")).unwrap(),
            want,
            "merged content"
        );
        assert_eq!(check(&base), (0, vec![]));
    }
}

// ---------------------------------------------------------------------------
// The matrix: every case above that takes a format, once per format.

per_format! {
    merge_interrupted_at_every_point_and_rerun_is_within_one_block_of_a_clean_merge();
    check_reports_planted_unreferenced_space_and_compact_gives_it_back() in [Vhd, Vhdx];
    compact_of_a_base_at_every_crash_point_keeps_the_content() in [Vhd, Vhdx];
    compact_of_a_child_at_every_crash_point_keeps_the_content() in [Vhd, Vhdx];
    compact_unallocates_zero_blocks_of_a_base_but_not_zeros_hiding_a_parent() in [Vhd, Vhdx];
    merge_that_cannot_fit_is_refused_before_writing_and_the_rerun_reuses_blocks();
    compact_is_refused_while_a_mount_uses_the_chain();
    merge_gives_the_deleted_layers_space_back_with_wait_free_at_once_and_by_default_soon();
    compact_of_a_fixed_disk_is_unsupported() in [Vhd, Vhdx];
}
