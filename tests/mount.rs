//! Real FUSE mounts of real chains: what the mount shows, reads of every
//! alignment, sequential reads staged around the page cache, errors,
//! locking, signals, and loop-mounting a partitioned ext4 disk whose
//! blocks live in several layers.
//!
//! What the mount shows, reads of every alignment and the MBR-partitioned
//! ext4 run once per format (`per_format!` at the end: `vhd::NAME`,
//! `vhdx::NAME`, `qcow2::NAME`); errors, locking, signals and the GPT
//! variant (the partition table is independent of the format) on VHD.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The block size of [`three_layers`]' base: 512 KiB where the format
/// allows it (VHDX: 1 MiB at least; qcow2 clusters of 512 KiB).
fn small_block(f: Fmt) -> u64 {
    f.min_block().max(512 << 10)
}

/// base (dynamic) <- mid <- leaf of format `f`, 32 MiB, data in every
/// layer, some of it shadowed; returns (leaf, model of the flat disk).
fn three_layers(f: Fmt, dir: &Path) -> (PathBuf, Vec<u8>) {
    let size = 32usize << 20;
    let mut model = vec![0u8; size];
    let mut rng = Rng(0x1234_5678 + f.index());
    let names = [
        f.base_name("base"),
        f.child_name("mid"),
        f.child_name("leaf"),
    ];
    for (i, name) in names.iter().enumerate() {
        let path = dir.join(name);
        if i == 0 {
            f.create_base(
                &path,
                size as u64,
                &["--block-size", &small_block(f).to_string()],
            );
        } else {
            f.create_child(&path, &dir.join(&names[i - 1]), &[]);
        }
        for _ in 0..6 {
            let off = rng.below(size as u64 - 300_000) as usize;
            let len = 1 + rng.below(300_000) as usize;
            let data = rng.bytes(len);
            let f = dir.join("chunk");
            std::fs::write(&f, &data).unwrap();
            chainfs_ok(&[
                "write",
                p(&path),
                "--offset",
                &off.to_string(),
                "--input",
                p(&f),
            ]);
            model[off..off + len].copy_from_slice(&data);
        }
    }
    (dir.join(&names[2]), model)
}

fn mount_shows_disk_chain_control_and_jobs(f: Fmt) {
    if !require_fuse() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (leaf, model) = three_layers(f, t.path());
    let mnt = t.path().join("mnt");
    let g = mount(&leaf, &mnt, &[]);

    let mut names: Vec<String> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["chain", "control", "disk.raw", "jobs", "layers"]);
    let md = std::fs::metadata(mnt.join("disk.raw")).unwrap();
    assert_eq!(md.len(), model.len() as u64);
    assert!(md.permissions().readonly(), "read-only by default");
    assert!(std::fs::metadata(mnt.join("jobs")).unwrap().is_dir());
    assert_eq!(std::fs::read_dir(mnt.join("jobs")).unwrap().count(), 0);

    let flat = std::fs::read(mnt.join("disk.raw")).unwrap();
    assert!(flat == model, "disk.raw differs from the model");
    let exported = t.path().join("out.raw");
    chainfs_ok(&["export", p(&leaf), p(&exported)]);
    assert_eq!(sha256_file(&exported), sha256(&flat));

    let chain = std::fs::read_to_string(mnt.join("chain")).unwrap();
    let lines: Vec<Vec<&str>> = chain.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(lines.len(), 3, "{chain}");
    let names = [
        f.child_name("leaf"),
        f.child_name("mid"),
        f.base_name("base"),
    ];
    for (depth, (l, name)) in lines.iter().zip(names).enumerate() {
        assert_eq!(l.len(), 8, "{chain}");
        assert_eq!(l[0], depth.to_string());
        assert!(l[1].ends_with(&name), "{chain}");
        assert_eq!(l[2], f.name(), "{chain}");
        assert_eq!(l[4], model.len().to_string());
    }
    assert_eq!(lines[0][3], f.disk_type(true, false), "{chain}");
    assert_eq!(lines[2][3], f.disk_type(false, false), "{chain}");
    if f.has_ids() {
        assert_ne!(lines[1][6], "-", "{chain}");
    } else {
        // A qcow2 links by backing file name alone: no ids to show.
        assert_eq!(lines[1][6], "-", "{chain}");
    }
    assert_eq!(lines[0][7], lines[1][6], "leaf's parent id is mid's id");
    assert_eq!(lines[2][7], "-");

    // A refused control command fails the write and leaves its reply on the
    // handle: merges need a writable mount (32775, EROFS).
    let mut c = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("control"))
        .unwrap();
    let cmd = format!("merge {} {}\n", f.child_name("leaf"), f.base_name("base"));
    let e = c.write(cmd.as_bytes()).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let mut reply = String::new();
    c.seek(SeekFrom::Start(0)).unwrap();
    c.read_to_string(&mut reply).unwrap();
    assert!(reply.contains("ReturnValue=32775"), "{reply}");
    assert!(reply.contains("ErrorDescription="), "{reply}");
    let e = c.write(b"frobnicate\n").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    drop(c);
    // Writes to disk.raw of a read-only mount are refused.
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("disk.raw"))
        .unwrap_err();
    assert!(
        matches!(e.raw_os_error(), Some(libc::EROFS) | Some(libc::EACCES)),
        "{e}"
    );

    chainfs_ok(&["umount", p(&mnt)]);
    assert!(!is_mounted(&mnt));
    drop(g);
}

fn reads_of_any_size_and_alignment_match_the_model(f: Fmt) {
    if !require_fuse() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (leaf, model) = three_layers(f, t.path());
    let mnt = t.path().join("mnt");
    let _g = mount(&leaf, &mnt, &[]);
    // O_DIRECT-free reads through the page cache and pread at odd places.
    let disk = std::fs::File::open(mnt.join("disk.raw")).unwrap();
    let size = model.len() as u64;
    let mut rng = Rng(99);
    let block = small_block(f);
    let mut cases: Vec<(u64, usize)> = vec![
        (0, 1),
        (511, 2),
        (block - 1, 2),         // block boundary
        (block - 100, 300_000), // straddles blocks
        (size - 1, 1),
        (size - 4096, 4096),
        (size - 10, 100), // over the end: short
        (size, 10),       // at the end: nothing
        (12345, 3 << 20),
    ];
    for _ in 0..300 {
        let off = rng.below(size);
        let max = if rng.below(4) == 0 { 2 << 20 } else { 9000 };
        let len = 1 + rng.below(max) as usize;
        cases.push((off, len));
    }
    for (off, len) in cases {
        let mut buf = vec![0xAAu8; len];
        let mut got = 0;
        while got < len {
            let n = disk.read_at(&mut buf[got..], off + got as u64).unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        let want_len = (size.saturating_sub(off) as usize).min(len);
        assert_eq!(got, want_len, "{f:?}: read of {len} at {off}");
        assert!(
            buf[..got] == model[off as usize..off as usize + got],
            "{f:?}: bytes differ for read of {len} at {off}"
        );
    }
}

#[test]
fn mount_errors_are_clear() {
    if !require_fuse() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (leaf, _) = three_layers(Fmt::Vhd, t.path());

    let missing = t.path().join("nope");
    let o = chainfs(&["mount", p(&leaf), p(&missing)]);
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope"));

    let full = t.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("x"), b"x").unwrap();
    let o = chainfs(&["mount", p(&leaf), p(&full)]);
    assert_eq!(o.status.code(), Some(9), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("not empty"));

    let mnt = t.path().join("mnt");
    let _g = mount(&leaf, &mnt, &[]);
    let o = chainfs(&["mount", p(&leaf), p(&mnt)]);
    assert_eq!(o.status.code(), Some(7), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("already a mount point"));

    // A chain that does not open gives the same error as `info`.
    let orphan = t.path().join("orphan");
    std::fs::create_dir(&orphan).unwrap();
    let gone = orphan.join("gone.vhd");
    chainfs_ok(&["create", p(&gone), "--size", "1M"]);
    chainfs_ok(&["create", p(&orphan.join("leaf.vhd")), "--parent", p(&gone)]);
    std::fs::remove_file(&gone).unwrap();
    let m2 = t.path().join("m2");
    std::fs::create_dir(&m2).unwrap();
    let _g2 = MountGuard::new(&m2);
    let info = chainfs(&["info", p(&orphan.join("leaf.vhd"))]);
    let o = chainfs(&["mount", p(&orphan.join("leaf.vhd")), p(&m2)]);
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    assert_eq!(o.status.code(), info.status.code());
    assert_eq!(o.stderr, info.stderr);
    assert!(!is_mounted(&m2));

    let o = chainfs(&["mount", p(&leaf), p(&m2), "-o", "bogus"]);
    assert_eq!(o.status.code(), Some(9));
    assert!(String::from_utf8_lossy(&o.stderr).contains("bogus"));
}

#[test]
fn locks_keep_writers_exclusive_and_readers_shared() {
    if !require_fuse() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (leaf, _) = three_layers(Fmt::Vhd, t.path());
    let a = t.path().join("a");
    let b = t.path().join("b");
    let ga = mount(&leaf, &a, &["-o", "ro"]);
    let gb = mount(&leaf, &b, &["-o", "ro"]); // read-only mounts share
    std::fs::write(t.path().join("x"), [1u8; 512]).unwrap();
    let o = chainfs(&[
        "write",
        p(&leaf),
        "--offset",
        "0",
        "--input",
        p(&t.path().join("x")),
    ]);
    assert_eq!(o.status.code(), Some(7), "a writer must be refused: {o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("in use"));
    chainfs_ok(&["umount", p(&b)]);
    drop(gb);
    let c = t.path().join("c");
    std::fs::create_dir(&c).unwrap();
    let o = chainfs(&["mount", p(&leaf), p(&c), "-o", "rw"]);
    assert_eq!(o.status.code(), Some(7), "rw mount while mounted ro: {o:?}");
    chainfs_ok(&["umount", p(&a)]);
    drop(ga);
    // Released: a writable mount now works, and excludes everyone else.
    let gc = mount(&leaf, &c, &["-o", "rw"]);
    let o = chainfs(&["mount", p(&leaf), p(&b)]);
    assert_eq!(o.status.code(), Some(7), "ro mount while mounted rw: {o:?}");
    // Plain fusermount3 -u also ends the daemon and releases the chain.
    let st = Command::new("fusermount3")
        .arg("-u")
        .arg(&c)
        .status()
        .unwrap();
    assert!(st.success());
    drop(gc);
    wait_for("the daemon to release the leaf", || {
        chainfs(&[
            "write",
            p(&leaf),
            "--offset",
            "0",
            "--input",
            p(&t.path().join("x")),
        ])
        .status
        .success()
    });
}

#[test]
fn sigterm_unmounts_cleanly() {
    if !require_fuse() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (leaf, model) = three_layers(Fmt::Vhd, t.path());
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _g = MountGuard::new(&mnt);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut child = Command::new(bin())
            .args(["mount", "-f", p(&leaf), p(&mnt)])
            .spawn()
            .unwrap();
        wait_for("the foreground mount", || is_mounted(&mnt));
        assert_eq!(
            std::fs::read(mnt.join("disk.raw")).unwrap().len(),
            model.len()
        );
        // SAFETY: kill() takes no pointers. `child` is not waited for yet,
        // so its pid still names it (a zombie keeps it), not a stranger.
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = exit_within_10s(&mut child, &format!("on signal {sig}"));
        assert!(status.success(), "daemon exit status {status}");
        assert!(!is_mounted(&mnt), "still mounted after signal {sig}");
    }
}

/// Wait for a foreground daemon to exit (killed, and the test failed,
/// after 10 s: it did not exit `when`).
fn exit_within_10s(child: &mut std::process::Child, when: &str) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("the daemon did not exit {when}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon may only ever unmount its own mount. A user lazily unmounts
/// a busy mount (`umount -l`: the path is free at once, the mount lives on
/// until its last file closes) and mounts a tmpfs at the same path; when
/// that file closes, the session ends and the daemon exits. It must leave
/// the tmpfs alone: with fuser 0.18's own teardown it unmounted it by path,
/// every time (an external `fusermount3 -u` followed at once by a mount
/// loses the same race whenever the daemon is slower than the mount, 13 of
/// 30 tries by hand on a busy machine).
#[test]
fn a_file_system_mounted_where_the_mount_was_survives_the_daemon_exit() {
    if !require_fuse() || !require("root (umount -l, mounts a tmpfs)", is_root()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (leaf, model) = three_layers(Fmt::Vhd, t.path());
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut child = Command::new(bin())
        .args(["mount", "-f", p(&leaf), p(&mnt)])
        .spawn()
        .unwrap();
    let guard = MountGuard::new(&mnt);
    wait_for("the foreground mount", || is_mounted(&mnt));
    let busy = std::fs::File::open(mnt.join("disk.raw")).unwrap();
    let o = Command::new("umount").arg("-l").arg(&mnt).output().unwrap();
    assert!(o.status.success(), "umount -l: {}", text(&o));
    drop(guard); // nothing is mounted there now: it finds nothing to do
    let other = Tmpfs::mount(&mnt, "1M");
    // The mount, detached, still serves the open file.
    let mut head = vec![0u8; 4096];
    busy.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, model[..4096]);
    drop(busy);
    let status = exit_within_10s(&mut child, "after its last file closed");
    assert!(status.success(), "daemon exit status {status}");
    assert_eq!(
        mounted_type(&mnt).as_deref(),
        Some("tmpfs"),
        "the exiting daemon unmounted the tmpfs mounted at {} after its own mount",
        mnt.display()
    );
    drop(other);
}

/// Files written into the guest filesystem at each stage: (name, bytes).
fn stage_files(stage: u64) -> Vec<(String, Vec<u8>)> {
    let mut rng = Rng(1000 + stage);
    (0..5)
        .map(|i| {
            let len = 1 + rng.below(600_000) as usize;
            (format!("stage{stage}-file{i}.bin"), rng.bytes(len))
        })
        .collect()
}

fn loop_mounted_partition_holds_files_written_in_every_layer(f: Fmt, label: &str) {
    if !require_fuse() || !require_loop() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let raw = t.path().join("work.raw");
    let size: usize = 64 << 20;
    partitioned_raw(&raw, size as u64, label);

    // Build the guest disk in three stages; each stage's changed blocks go
    // into the next layer of the chain.
    let names = [
        f.base_name("base"),
        f.child_name("mid"),
        f.child_name("leaf"),
    ];
    let layers = names.each_ref().map(|n| n.as_str());
    // VHDX blocks as small as VHD's default keep the layers small; qcow2
    // takes its default 64 KiB clusters.
    let base_args: &[&str] = match f {
        Fmt::Vhd | Fmt::Qcow2 => &["--size", "64M"],
        Fmt::Vhdx => &["--size", "64M", "--block-size", "1M"],
    };
    let mut prev = vec![0u8; size];
    let mut expected: Vec<(String, Vec<u8>)> = Vec::new();
    let guest = t.path().join("guest");
    for stage in 0..layers.len() {
        {
            let lo = LoopGuard::attach(&raw, false, true);
            wait_for("the partition device", || {
                Path::new(&lo.partition(1)).exists()
            });
            if stage == 0 {
                run(Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096", &lo.partition(1)]));
            }
            let _m = KernelMount::mount(&lo.partition(1), &guest, "rw");
            for (n, data) in stage_files(stage as u64) {
                std::fs::write(guest.join(&n), &data).unwrap();
                expected.push((n, data));
            }
            if stage == 2 {
                // Overwrite a file from the base stage: the leaf shadows it.
                let (n, _) = expected[0].clone();
                let data = Rng(77).bytes(200_000);
                std::fs::write(guest.join(&n), &data).unwrap();
                expected[0].1 = data;
            }
            run(&mut Command::new("sync"));
        }
        let now = std::fs::read(&raw).unwrap();
        let n = layer_from_snapshot(
            t.path(),
            &layers,
            stage,
            base_args,
            &prev,
            &now,
            &t.path().join("scratch"),
        );
        assert!(n > 0, "stage {stage} changed nothing");
        prev = now;
    }

    if f.qemu_reads_chains() && have_qemu_img() {
        // qemu, qcow2's independent reader, flattens the chain alike.
        let q = t.path().join("qemu.raw");
        qemu_convert(f, &t.path().join(layers[2]), &q);
        assert_same(
            &std::fs::read(&q).unwrap(),
            &prev,
            &format!("{f:?}: qemu's view of the ext4 chain"),
        );
        std::fs::remove_file(&q).unwrap();
    }
    let mnt = t.path().join("mnt");
    let _g = mount(&t.path().join(layers[2]), &mnt, &[]);
    assert_same(
        &std::fs::read(mnt.join("disk.raw")).unwrap(),
        &prev,
        &format!("{f:?}: disk.raw of the ext4 chain"),
    );
    let lo = LoopGuard::attach(&mnt.join("disk.raw"), true, true);
    wait_for("the partition device", || {
        Path::new(&lo.partition(1)).exists()
    });
    let inside = t.path().join("inside");
    let km = KernelMount::mount(&lo.partition(1), &inside, "ro");
    for (n, data) in &expected {
        let got = std::fs::read(inside.join(n)).unwrap();
        assert!(
            got == *data,
            "{f:?}: {n} differs inside the loop-mounted chain"
        );
    }
    drop(km);
    drop(lo);
}

fn loop_mount_mbr_partitioned_ext4(f: Fmt) {
    loop_mounted_partition_holds_files_written_in_every_layer(f, "dos");
}

#[test]
fn loop_mount_gpt_partitioned_ext4() {
    loop_mounted_partition_holds_files_written_in_every_layer(Fmt::Vhd, "gpt");
}

// ---------------------------------------------------------------------------
// The matrix.

/// A sequential reader of `disk.raw` is staged in the daemon's memory
/// with direct reads, so the layer files' data does not pass through
/// the page cache; with `-o readahead=0` it does (the page cache's
/// read-ahead instead). Either way the bytes are the chain's.
fn sequential_reads_are_staged_around_the_page_cache(f: Fmt) {
    if !require_fuse() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    if !require_direct_io(t.path()) {
        return;
    }
    const MIB: usize = 1 << 20;
    let size = 24 * MIB;
    let mut rng = Rng(0x5747 + f.index());
    let mut model = rng.bytes(size);
    let base = t.path().join(f.base_name("base"));
    let leaf = t.path().join(f.child_name("leaf"));
    f.create_base(&base, size as u64, &[]);
    let chunk = t.path().join("chunk");
    std::fs::write(&chunk, &model).unwrap();
    chainfs_ok(&["write", p(&base), "--offset", "0", "--input", p(&chunk)]);
    f.create_child(&leaf, &base, &[]);
    // Every third MiB rewritten in the leaf: reads alternate layers.
    for k in (0..size / MIB).step_by(3) {
        let data = rng.bytes(MIB);
        std::fs::write(&chunk, &data).unwrap();
        let off = (k * MIB).to_string();
        chainfs_ok(&["write", p(&leaf), "--offset", &off, "--input", p(&chunk)]);
        model[k * MIB..(k + 1) * MIB].copy_from_slice(&data);
    }
    let mnt = t.path().join("mnt");
    // Of the base's file, the share that holds data the view shows.
    let shown = (size - size.div_ceil(3 * MIB) * MIB) as f64
        / std::fs::metadata(&base).unwrap().len() as f64;
    for (opts, staged) in [(&[][..], true), (&["-o", "readahead=0"][..], false)] {
        evict(&base);
        evict(&leaf);
        let g = mount(&leaf, &mnt, opts);
        let mut disk = std::fs::File::open(mnt.join("disk.raw")).unwrap();
        let mut got = vec![0u8; size];
        for piece in got.chunks_mut(MIB) {
            disk.read_exact(piece).unwrap();
        }
        drop(disk);
        umount(g);
        assert_same(&got, &model, &format!("{f:?} {opts:?}: disk.raw"));
        // Cached: headers and tables, and the data only if it went through
        // the page cache.
        let cached = cached_share(&base, 0, file_len(&base)) / shown;
        eprintln!(
            "{f:?} {opts:?}: {:.0}% of the base's shown data cached",
            cached * 100.0
        );
        if staged {
            assert!(cached < 0.2, "{f:?}: {:.0}% cached", cached * 100.0);
        } else {
            assert!(
                cached > 0.8,
                "{f:?} {opts:?}: {:.0}% cached",
                cached * 100.0
            );
        }
    }
}

per_format! {
    mount_shows_disk_chain_control_and_jobs();
    reads_of_any_size_and_alignment_match_the_model();
    sequential_reads_are_staged_around_the_page_cache();
    loop_mount_mbr_partitioned_ext4();
}
