//! The fuser-free filesystem (`crate::fs::ChainFs`) over in-memory layers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{build, chain_of, model, Spec, BS, SS};
use crate::error::{Error, RC_JOB_STARTED};
use crate::format::mem::{Calls, MemLayer};
use crate::format::Layer;
use crate::fs::{ChainFs, Kind, MountConfig, CHAIN, CONTROL, DISK, JOBS, JOB_BASE, LAYERS, ROOT};
use crate::image::FlatImage;
use crate::merge::Caller;
use crate::perms::Overrides;

const ROOT_CALLER: Caller = Caller { uid: 0, gid: 0 };

fn specs() -> Vec<Spec> {
    vec![
        Spec::of("d..zd...", 1),
        Spec::of(".dd.zzd.", 2),
        Spec::of("dddddd.z", 3),
    ]
}

/// A `ChainFs` over `specs`; in a writable mount every layer is writable
/// (the merge engine reopens read-only layers through `open_layer`, which
/// cannot open a `MemLayer`).
fn mount(dir: &std::path::Path, specs: &[Spec], writable: bool) -> (Vec<Arc<MemLayer>>, ChainFs) {
    let layers = build(dir, specs, BS, |_| writable);
    let image = Arc::new(FlatImage::new(&chain_of(&layers)));
    let cfg = MountConfig {
        writable,
        ..read_only()
    };
    let fs = ChainFs::new(image, cfg, Box::new(|| Ok("l0 -> l1 -> l2\n".into()))).unwrap();
    (layers, fs)
}

/// The configuration of a read-only mount with no overrides.
fn read_only() -> MountConfig {
    MountConfig {
        writable: false,
        copy_on_read: false,
        perms: Overrides::default(),
        parent_dirs: Vec::new(),
        overrides: Vec::new(),
    }
}

/// Write `cmd` to the control file on a fresh handle: the write's result
/// and the reply read back on that handle.
fn control(fs: &ChainFs, cmd: &str) -> (Result<u32, Error>, String) {
    let fh = fs.open(CONTROL, true).unwrap().fh;
    let r = fs.write(CONTROL, fh, 0, cmd.as_bytes(), ROOT_CALLER);
    let reply = fs.read(CONTROL, fh, 0, 1 << 16).unwrap();
    fs.release(fh);
    (r, String::from_utf8(reply).unwrap())
}

fn errno_of<T: std::fmt::Debug>(r: Result<T, Error>) -> i32 {
    r.unwrap_err().to_errno()
}

fn read_file(fs: &ChainFs, ino: u64) -> String {
    let fh = fs.open(ino, false).unwrap().fh;
    let t = fs.read(ino, fh, 0, 1 << 16).unwrap();
    fs.release(fh);
    String::from_utf8(t).unwrap()
}

#[test]
fn root_lookup_getattr_and_readdir() {
    let dir = tempfile::tempdir().unwrap();
    let (_, fs) = mount(dir.path(), &specs(), false);
    let names: Vec<String> = fs.readdir(ROOT).unwrap().into_iter().map(|e| e.2).collect();
    assert_eq!(names, ["disk.raw", "control", "chain", "jobs", "layers"]);
    for (name, ino, kind) in [
        ("disk.raw", DISK, Kind::File),
        ("control", CONTROL, Kind::File),
        ("chain", CHAIN, Kind::File),
        ("jobs", JOBS, Kind::Dir),
        ("layers", LAYERS, Kind::Dir),
    ] {
        let a = fs.lookup(ROOT, name).unwrap();
        assert_eq!((a.ino, a.kind), (ino, kind), "{name}");
    }
    assert_eq!(fs.getattr(DISK).unwrap().size, 8 * SS);
    assert_eq!(
        fs.getattr(CHAIN).unwrap().size,
        "l0 -> l1 -> l2\n".len() as u64
    );
    assert_eq!(errno_of(fs.lookup(ROOT, "nope")), libc::ENOENT);
    assert_eq!(errno_of(fs.lookup(JOBS, "1")), libc::ENOENT);
    assert_eq!(errno_of(fs.getattr(JOB_BASE + 1)), libc::ENOENT);
    assert_eq!(errno_of(fs.readdir(DISK)), libc::ENOTDIR);
    assert_eq!(errno_of(fs.open(JOBS, false)), libc::EISDIR);
    assert!(fs.readdir(JOBS).unwrap().is_empty());
}

#[test]
fn disk_reads_equal_the_model_and_end_at_the_size() {
    let dir = tempfile::tempdir().unwrap();
    let specs = specs();
    let (_, fs) = mount(dir.path(), &specs, false);
    let want = model(&specs);
    let fh = fs.open(DISK, false).unwrap().fh;
    for (off, len) in [
        (0u64, 4096u32),
        (1, 1),
        (511, 1030),
        (2047, 2050),
        (4000, 500),
    ] {
        let got = fs.read(DISK, fh, off, len).unwrap();
        let end = (off as usize + len as usize).min(want.len());
        assert_eq!(got, want[off as usize..end], "{len} at {off}");
    }
    assert!(fs.read(DISK, fh, 8 * SS, 100).unwrap().is_empty());
    assert_eq!(read_file(&fs, CHAIN), "l0 -> l1 -> l2\n");
}

#[test]
fn layer_views_read_the_sub_chains() {
    let dir = tempfile::tempdir().unwrap();
    let specs = specs();
    let (_, fs) = mount(dir.path(), &specs, false);
    let views = fs.readdir(LAYERS).unwrap();
    let names: Vec<&str> = views.iter().map(|v| v.2.as_str()).collect();
    assert_eq!(names, ["0-l0.mem.raw", "1-l1.mem.raw", "2-l2.mem.raw"]);
    for (k, (ino, _, name)) in views.iter().enumerate() {
        assert_eq!(fs.lookup(LAYERS, name).unwrap().ino, *ino);
        let fh = fs.open(*ino, false).unwrap().fh;
        assert_eq!(
            fs.read(*ino, fh, 0, 1 << 20).unwrap(),
            model(&specs[k..]),
            "{name}"
        );
        assert_eq!(errno_of(fs.open(*ino, true)), libc::EROFS);
    }
}

#[test]
fn sequential_readers_are_fetched_ahead_per_handle_random_ones_not() {
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let base = MemLayer::new(dir.path().join("b.mem"), 16 * MIB, MIB, SS as u32);
    let data: Vec<u8> = (0..16 * MIB).map(|i| (i % 251) as u8 + 1).collect();
    // Blocks written 0, 8, 1, 9, ...: each lands in the file apart from
    // its neighbours (a fragmented layer's 1 MiB pieces), so every run is
    // advised (a long contiguous one would be left to the kernel).
    let slot = |b: u64| if b < 8 { 2 * b } else { 2 * (b - 8) + 1 };
    for k in 0..8 {
        for b in [k, k + 8] {
            base.put(b * MIB, &data[(b * MIB) as usize..][..MIB as usize]);
        }
    }
    let base = Arc::new(base);
    let leaf = Arc::new(
        MemLayer::new(dir.path().join("l.mem"), 16 * MIB, MIB, SS as u32).child_of(base.as_ref()),
    );
    let image = Arc::new(FlatImage::new(&chain_of(&[leaf, base.clone()])));
    let fs = ChainFs::new(image, read_only(), Box::new(|| Ok(String::new()))).unwrap();
    let seq = fs.open(DISK, false).unwrap().fh;
    let random = fs.open(DISK, false).unwrap().fh;
    let advised = || base.calls.advised.lock().clone();
    // The worker advises in the background: wait (at most 5 s) until the
    // advice holds `bytes` in all.
    let wait_for = |bytes: u64| {
        let t = Instant::now();
        while advised().iter().map(|a| a.1).sum::<u64>() < bytes
            && t.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        advised()
    };
    // 4 KiB reads on one handle interleaved with the other's 1 MiB reads:
    // the streams are told apart by handle.
    for (i, at) in [9u64, 1, 13, 5].into_iter().enumerate() {
        let r = fs.read(DISK, random, at * MIB + 4096, 4096).unwrap();
        assert_eq!(r, data[(at * MIB + 4096) as usize..][..4096]);
        let off = i as u64 * MIB;
        let r = fs.read(DISK, seq, off, MIB as u32).unwrap();
        assert_eq!(r, data[off as usize..][..MIB as usize]);
        if i == 0 {
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(advised(), vec![], "one read is no stream");
        }
    }
    // After 2 MiB: the rest of the disk, from where the reader stands, one
    // piece per block, once.
    let a = wait_for(14 * MIB);
    let h = crate::format::mem::HEADER;
    assert_eq!(a.first(), Some(&(h + slot(2) * MIB, MIB)), "{a:?}");
    assert_eq!(a.iter().map(|x| x.1).sum::<u64>(), 14 * MIB, "{a:?}");
    // Random reads alone never fetch ahead: the worker takes jobs in
    // order, so once the view's reader below is advised, any advice the
    // random reads caused would have come first.
    base.calls.advised.lock().clear();
    for k in 0..200u64 {
        let at = (k * 7919 * 4096) % (16 * MIB - 4096);
        fs.read(DISK, random, at, 4096).unwrap();
    }
    // A layer view's reader is fetched ahead too.
    let view = fs.readdir(LAYERS).unwrap()[1].0;
    let vh = fs.open(view, false).unwrap().fh;
    for k in 8..11 {
        fs.read(view, vh, k * MIB, MIB as u32).unwrap();
    }
    let a = wait_for(6 * MIB);
    assert_eq!(a.first(), Some(&(h + slot(10) * MIB, MIB)), "{a:?}");
    assert_eq!(a.iter().map(|x| x.1).sum::<u64>(), 6 * MIB, "{a:?}");
    for fh in [seq, random, vh] {
        fs.release(fh);
    }
}

#[test]
fn a_sequential_reader_of_disk_raw_is_staged_random_ones_not() {
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let base = MemLayer::new(dir.path().join("b.mem"), 16 * MIB, MIB, SS as u32);
    let data: Vec<u8> = (0..16 * MIB).map(|i| (i % 251) as u8 + 1).collect();
    base.put(0, &data);
    let base = Arc::new(base);
    let leaf = Arc::new(
        MemLayer::new(dir.path().join("l.mem"), 16 * MIB, MIB, SS as u32).child_of(base.as_ref()),
    );
    let image = Arc::new(FlatImage::new(&chain_of(&[leaf, base.clone()])).with_staging(8 * MIB));
    let fs = ChainFs::new(image.clone(), read_only(), Box::new(|| Ok(String::new()))).unwrap();
    let seq = fs.open(DISK, false).unwrap().fh;
    let random = fs.open(DISK, false).unwrap().fh;
    // Random 4 KiB reads interleaved with the sequential reader's 1 MiB
    // ones: the streams are told apart by handle.
    for i in 0..16u64 {
        let at = (i * 7919 * 4096) % (16 * MIB - 4096);
        let r = fs.read(DISK, random, at, 4096).unwrap();
        assert_eq!(r, data[at as usize..][..4096]);
        let r = fs.read(DISK, seq, i * MIB, MIB as u32).unwrap();
        assert_eq!(r, data[(i * MIB) as usize..][..MIB as usize], "MiB {i}");
    }
    // The first 2 MiB make the stream; from the third on, reads come out
    // of the pool (a random read may land in a staged chunk too).
    assert!(
        image.staged_served() >= 13 * MIB,
        "{}",
        image.staged_served()
    );
    // Staged, not advised into the page cache.
    assert_eq!(base.calls.advised.lock().clone(), vec![]);
    // Random reads alone stage nothing.
    let before = image.staged_served();
    for k in 0..200u64 {
        let at = (k * 104_729 * 4096) % (16 * MIB - 4096);
        let r = fs.read(DISK, random, at, 4096).unwrap();
        assert_eq!(r, data[at as usize..][..4096]);
    }
    assert_eq!(image.staged_served(), before);
    for fh in [seq, random] {
        fs.release(fh);
    }
}

#[test]
fn read_only_mount_refuses_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let (layers, fs) = mount(dir.path(), &specs(), false);
    assert_eq!(errno_of(fs.open(DISK, true)), libc::EROFS);
    let fh = fs.open(DISK, false).unwrap().fh;
    assert_eq!(
        errno_of(fs.write(DISK, fh, 0, b"x", ROOT_CALLER)),
        libc::EROFS
    );
    assert_eq!(
        errno_of(fs.fallocate(
            DISK,
            0,
            SS,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        )),
        libc::EROFS
    );
    assert_eq!(errno_of(fs.set_size(DISK, 1)), libc::EPERM);
    assert_eq!(errno_of(fs.open(CHAIN, true)), libc::EACCES);
    assert_eq!(Calls::get(&layers[0].calls.write_sectors), 0);
}

#[test]
fn writable_mount_writes_punches_and_flushes_the_leaf() {
    let dir = tempfile::tempdir().unwrap();
    let specs = specs();
    let (layers, fs) = mount(dir.path(), &specs, true);
    let mut want = model(&specs);
    let fh = fs.open(DISK, true).unwrap().fh;
    assert_eq!(
        fs.write(DISK, fh, 700, &[9u8; 1000], ROOT_CALLER).unwrap(),
        1000
    );
    want[700..1700].fill(9);
    // A write over the end is cut at the end; one at the end is ENOSPC.
    assert_eq!(
        fs.write(DISK, fh, 8 * SS - 10, &[8u8; 100], ROOT_CALLER)
            .unwrap(),
        10
    );
    want[8 * SS as usize - 10..].fill(8);
    assert_eq!(
        errno_of(fs.write(DISK, fh, 8 * SS, b"x", ROOT_CALLER)),
        libc::ENOSPC
    );
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    fs.fallocate(DISK, 100, 3 * SS, punch).unwrap();
    want[100..100 + 3 * SS as usize].fill(0);
    assert_eq!(fs.read(DISK, fh, 0, 1 << 20).unwrap(), want);
    assert_eq!(errno_of(fs.fallocate(DISK, 0, 1, 0x40)), libc::EOPNOTSUPP);
    fs.fsync(DISK).unwrap();
    assert_eq!(Calls::get(&layers[0].calls.flush), 1);
    assert!(layers[1..]
        .iter()
        .all(|l| Calls::get(&l.calls.write_sectors) == 0));
}

#[test]
fn control_replies_and_errno_per_error_kind() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ro) = mount(dir.path(), &specs(), false);
    let (r, reply) = control(&ro, "help\n");
    assert_eq!(r.unwrap(), 5);
    assert!(reply.starts_with("ReturnValue=0\nHelp="), "{reply}");
    for (cmd, errno, rc) in [
        ("frobnicate\n", libc::EINVAL, 32773),
        ("merge onlyone\n", libc::EINVAL, 32773),
        ("cancel 9\n", libc::ENOENT, 32779),
        ("merge l0.mem l2.mem\n", libc::EROFS, 32775),
        // The first refused line stops the rest.
        ("help\nbogus\nhelp\n", libc::EINVAL, 32773),
    ] {
        let (r, reply) = control(&ro, cmd);
        assert_eq!(errno_of(r), errno, "{cmd:?}");
        assert!(
            reply.starts_with(&format!("ReturnValue={rc}\nErrorDescription=")),
            "{cmd:?}: {reply}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let (_, rw) = mount(dir.path(), &specs(), true);
    for (cmd, errno, rc, says) in [
        (
            "merge l2.mem l0.mem",
            libc::EINVAL,
            32773,
            "is not an ancestor",
        ),
        (
            "merge l1.mem l1.mem",
            libc::EINVAL,
            32773,
            "is not an ancestor",
        ),
        (
            "merge nope.mem l1.mem",
            libc::ENOENT,
            32779,
            "no layer of this chain",
        ),
        (
            "merge l0.mem /no/such/base.mem",
            libc::ENOENT,
            32779,
            "no such file",
        ),
    ] {
        let (r, reply) = control(&rw, cmd);
        assert_eq!(errno_of(r), errno, "{cmd:?}");
        assert!(
            reply.starts_with(&format!("ReturnValue={rc}\n")),
            "{cmd:?}: {reply}"
        );
        assert!(reply.contains(says), "{cmd:?}: {reply}");
    }
    assert!(rw.readdir(JOBS).unwrap().is_empty());
}

#[test]
fn merge_command_starts_a_job_file_and_keeps_the_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let specs = specs();
    let (layers, fs) = mount(dir.path(), &specs, true);
    let want = model(&specs);
    let (r, reply) = control(&fs, "merge l1.mem l2.mem\n");
    r.unwrap();
    assert_eq!(reply, format!("ReturnValue={RC_JOB_STARTED}\nJob=jobs/1\n"));
    let job = fs.jobs().get(1).unwrap();
    let t = Instant::now();
    while !job.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(20), "merge job hangs");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        fs.readdir(JOBS).unwrap(),
        [(JOB_BASE + 1, Kind::File, "1".to_string())]
    );
    assert_eq!(fs.lookup(JOBS, "1").unwrap().ino, JOB_BASE + 1);
    let text = read_file(&fs, JOB_BASE + 1);
    assert!(text.contains("JobState=7\n"), "{text}");
    assert!(text.contains("PercentComplete=100\n"), "{text}");
    assert!(text.contains("ErrorCode=0\n"), "{text}");
    assert_eq!(fs.getattr(JOB_BASE + 1).unwrap().size, text.len() as u64);
    assert_eq!(errno_of(fs.open(JOB_BASE + 1, true)), libc::EACCES);
    // The merged chain reads the same; l1 is gone from it and from disk.
    let fh = fs.open(DISK, false).unwrap().fh;
    assert_eq!(fs.read(DISK, fh, 0, 1 << 20).unwrap(), want);
    let names: Vec<String> = fs
        .readdir(LAYERS)
        .unwrap()
        .into_iter()
        .map(|v| v.2)
        .collect();
    assert_eq!(names, ["0-l0.mem.raw", "1-l2.mem.raw"]);
    assert!(!layers[1].path().exists());
    // Cancelling an ended job is refused as a state error.
    let (r, reply) = control(&fs, "cancel 1");
    assert_eq!(errno_of(r), libc::EPERM);
    assert!(reply.starts_with("ReturnValue=32775\n"), "{reply}");
}

#[test]
fn copy_on_read_moves_parent_data_into_the_leaf_without_changing_reads() {
    let dir = tempfile::tempdir().unwrap();
    let specs = specs();
    let layers = build(dir.path(), &specs, BS, |i| i == 0);
    let image = Arc::new(FlatImage::new(&chain_of(&layers)));
    let cfg = MountConfig {
        writable: true,
        copy_on_read: true,
        ..read_only()
    };
    let fs = ChainFs::new(image.clone(), cfg, Box::new(|| Ok(String::new()))).unwrap();
    let fh = fs.open(DISK, false).unwrap().fh;
    assert_eq!(fs.read(DISK, fh, 0, 1 << 20).unwrap(), model(&specs));
    assert!(Calls::get(&layers[0].calls.write_sectors) > 0);
    // Now the leaf holds every sector a parent held: the parents go unread.
    let before: Vec<u64> = layers
        .iter()
        .map(|l| Calls::get(&l.calls.read_data))
        .collect();
    assert_eq!(fs.read(DISK, fh, 0, 1 << 20).unwrap(), model(&specs));
    assert_eq!(Calls::get(&layers[1].calls.read_data), before[1]);
    assert_eq!(Calls::get(&layers[2].calls.read_data), before[2]);
}

#[test]
fn merge_is_refused_while_a_view_it_changes_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let (_, fs) = mount(dir.path(), &specs(), true);
    let view = fs.lookup(LAYERS, "2-l2.mem.raw").unwrap().ino;
    let fh = fs.open(view, false).unwrap().fh;
    let (r, reply) = control(&fs, "merge l1.mem l2.mem");
    assert_eq!(errno_of(r), libc::EBUSY);
    assert!(reply.starts_with("ReturnValue=32774\n"), "{reply}");
    assert!(reply.contains("layers/2-l2.mem.raw is open"), "{reply}");
    assert!(fs.readdir(JOBS).unwrap().is_empty());
    // Closed, the same merge starts.
    fs.release(fh);
    let (r, reply) = control(&fs, "merge l1.mem l2.mem");
    r.unwrap();
    assert!(
        reply.starts_with(&format!("ReturnValue={RC_JOB_STARTED}\n")),
        "{reply}"
    );
    let job = fs.jobs().get(1).unwrap();
    let t = Instant::now();
    while !job.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(20), "merge job hangs");
        std::thread::sleep(Duration::from_millis(10));
    }
}
