//! The raw driver end to end (issue 10): a raw file is a base layer that
//! `info`, `export`, `map` and `mount` (read-only and `-o rw`, loop-mounted)
//! treat like any other format, probed last and never claiming a file some
//! other format is recognised in.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use common::*;

/// A sparse raw file: `size` bytes with data at a few offsets, holes
/// elsewhere; returns its content.
fn sparse_raw(path: &Path, size: u64, rng: &mut Rng) -> Vec<u8> {
    let f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut model = vec![0u8; size as usize];
    for _ in 0..6 {
        let off = rng.below(size / 4096) * 4096;
        let len = (4096 * (1 + rng.below(64))).min(size - off);
        let data = rng.bytes(len as usize);
        f.write_all_at(&data, off).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    model
}

/// Bytes of `path` holding data, by SEEK_DATA/SEEK_HOLE, as `du` would
/// not tell (it counts whole blocks).
fn data_bytes(path: &Path) -> u64 {
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "python3 -c \"import os,sys\nf=os.open(sys.argv[1],os.O_RDONLY)\nn=os.fstat(f).st_size\nt=0\no=0\nwhile o<n:\n  try:\n    d=os.lseek(f,o,os.SEEK_DATA)\n  except OSError:\n    break\n  h=os.lseek(f,d,os.SEEK_HOLE)\n  t+=h-d\n  o=h\nprint(t)\" {}",
            p(path)
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
}

#[test]
fn raw_base_info_export_and_map() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.raw");
    let model = sparse_raw(&img, 8 << 20, &mut Rng(11));
    let j = info_json(&img);
    let l = &j[0];
    assert_eq!(l["format"], "raw", "{j}");
    assert_eq!(l["disk_type"], "raw", "{j}");
    assert_eq!(l["virtual_size"], 8 << 20, "{j}");
    assert!(l["unique_id"].is_null(), "a raw file has no identity: {j}");
    assert!(l["parent_link"].is_null(), "a raw file is a base: {j}");
    assert_eq!(
        l["allocated_bytes"],
        data_bytes(&img),
        "allocation from SEEK_DATA: {j}"
    );

    let out = d.path().join("flat.raw");
    chainfs_ok(&["export", p(&img), p(&out)]);
    assert_eq!(sha256_file(&out), sha256(&model), "export of a raw base");

    // `map`: data runs where the file holds data, zero runs over holes.
    let m: serde_json::Value =
        serde_json::from_str(&chainfs_ok(&["map", "--json", p(&img)])).unwrap();
    let mut covered = 0u64;
    for r in m.as_array().unwrap() {
        let (start, len) = (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap());
        let bytes = &model[start as usize..(start + len) as usize];
        if r["zero"] == true {
            assert!(bytes.iter().all(|&b| b == 0), "zero run {r} holds data");
        } else {
            assert_eq!(
                r["offset"].as_u64(),
                Some(start),
                "raw data is in place: {r}"
            );
        }
        covered += len;
    }
    assert_eq!(covered, 8 << 20);
    // `check` finds nothing to complain about.
    chainfs_ok(&["check", p(&img)]);
}

#[test]
fn create_makes_raw_files_and_refuses_raw_parents() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("new.img");
    chainfs_ok(&["create", p(&img), "--size", "4M"]);
    assert_eq!(fs::metadata(&img).unwrap().len(), 4 << 20);
    assert_eq!(data_bytes(&img), 0, "a new raw file is sparse");
    assert_eq!(info_json(&img)[0]["format"], "raw");
    // Neither VHD nor VHDX takes a raw parent; a raw file takes no parent.
    for child in ["c.vhd", "c.vhdx", "c.raw"] {
        let c = d.path().join(child);
        let o = chainfs(&["create", p(&c), "--parent", p(&img)]);
        assert!(!o.status.success(), "{child} over a raw parent was created");
        assert!(!c.exists(), "{child} left behind");
        let t = text(&o);
        assert!(t.contains("raw"), "{child}: {t}");
    }
    // Options a raw file cannot honour are refused, not ignored.
    for (name, args, want) in [
        (
            "b.raw",
            &["--size", "4M", "--block-size", "64K"][..],
            "no blocks",
        ),
        ("s.raw", &["--size", "1000"][..], "multiple of 512"),
    ] {
        let f = d.path().join(name);
        let mut argv = vec!["create", p(&f)];
        argv.extend_from_slice(args);
        let o = chainfs(&argv);
        assert_eq!(code(&o), 9, "{name}: {}", text(&o));
        assert!(text(&o).contains(want), "{name}: {}", text(&o));
        assert!(!f.exists(), "{name} left behind");
    }
    // --type fixed allocates every byte (as unwritten extents: SEEK_DATA
    // may call them holes, st_blocks counts them).
    let fixed = d.path().join("fixed.raw");
    chainfs_ok(&["create", p(&fixed), "--size", "4M", "--type", "fixed"]);
    use std::os::unix::fs::MetadataExt;
    assert!(
        fs::metadata(&fixed).unwrap().blocks() * 512 >= 4 << 20,
        "a fixed raw file is allocated"
    );
}

#[test]
fn probing_never_shows_another_format_as_raw() {
    let d = tempfile::tempdir().unwrap();
    // A qcow2 named .img opens as the qcow2 it is, and a VMDK named .img
    // is refused as what it is.
    let q = d.path().join("q.img");
    let v = d.path().join("v.img");
    if require("qemu-img", have("qemu-img")) {
        for (fmt, img) in [("qcow2", &q), ("vmdk", &v)] {
            let o = Command::new("qemu-img")
                .args(["create", "-q", "-f", fmt, p(img), "1M"])
                .output()
                .unwrap();
            assert!(o.status.success());
        }
        assert_eq!(info_json(&q)[0]["format"], "qcow2");
        let o = chainfs(&["info", p(&v)]);
        assert!(!o.status.success(), "a VMDK named .img opened");
        assert!(text(&o).contains("VMDK"), "{}", text(&o));
    }
    // An unrecognised file with another name is not a disk.
    let t = d.path().join("notes.txt");
    fs::write(&t, vec![b'x'; 4096]).unwrap();
    let o = chainfs(&["info", p(&t)]);
    assert!(!o.status.success(), "a text file opened as a disk");
    assert!(
        text(&o).contains(".raw"),
        "says how to read it as raw: {}",
        text(&o)
    );
    // The same bytes named .dd are a raw image.
    let dd = d.path().join("evidence.dd");
    fs::copy(&t, &dd).unwrap();
    assert_eq!(info_json(&dd)[0]["format"], "raw");
}

#[test]
fn raw_mount_read_only_loop_mounts_a_file_system() {
    if !require_fuse() || !require_loop() || !require("mkfs.ext4", have("mkfs.ext4")) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    let payload = Rng(5).bytes(300_000);
    fs::write(src.join("evidence.bin"), &payload).unwrap();
    let img = d.path().join("fs.raw");
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d", p(&src), p(&img), "32M"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let before = sha256_file(&img);
    let mnt = d.path().join("mnt");
    {
        let _m = mount(&img, &mnt, &[]);
        let flat = mnt.join("disk.raw");
        assert_eq!(sha256_file(&flat), before, "disk.raw is the raw file");
        let lo = LoopGuard::attach(&flat, true, false);
        let fsdir = d.path().join("fs");
        let _k = KernelMount::mount(&lo.dev, &fsdir, "ro,noload");
        assert_eq!(fs::read(fsdir.join("evidence.bin")).unwrap(), payload);
        // Read-only: a write to disk.raw is refused.
        let w = fs::OpenOptions::new().write(true).open(&flat);
        assert!(
            w.is_err(),
            "disk.raw opened for writing on a read-only mount"
        );
    }
    assert_eq!(
        sha256_file(&img),
        before,
        "a read-only mount changed the file"
    );
}

#[test]
fn raw_mount_rw_writes_and_discards_land_in_the_file() {
    if !require_fuse() || !require_loop() || !require("mkfs.ext4", have("mkfs.ext4")) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("rw.raw");
    let mut model = sparse_raw(&img, 16 << 20, &mut Rng(21));
    let mnt = d.path().join("mnt");
    {
        let _m = mount(&img, &mnt, &["-o", "rw"]);
        let flat = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(mnt.join("disk.raw"))
            .unwrap();
        // Unaligned writes (the resolver's read-modify-write), one at the end.
        let mut rng = Rng(22);
        for (off, len) in [
            (1000u64, 3000usize),
            (5 << 20, 70_000),
            ((16 << 20) - 700, 700),
        ] {
            let data = rng.bytes(len);
            flat.write_all_at(&data, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        // A discard (a hole punched through the mount) reads as zeros.
        let o = Command::new("fallocate")
            .args(["-p", "-o", "1048576", "-l", "2097152"])
            .arg(mnt.join("disk.raw"))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "punch: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        model[1 << 20..3 << 20].fill(0);
        flat.sync_all().unwrap();
        let mut back = vec![0u8; model.len()];
        flat.read_exact_at(&mut back, 0).unwrap();
        assert!(back == model, "disk.raw reads back what was written");
    }
    assert_eq!(
        sha256_file(&img),
        sha256(&model),
        "the writes are in the file"
    );
    assert_eq!(
        fs::metadata(&img).unwrap().len(),
        16 << 20,
        "size unchanged"
    );

    // A file system made and used through a writable mount is clean.
    let img2 = d.path().join("fs.img");
    chainfs_ok(&["create", p(&img2), "--size", "64M"]);
    {
        let _m = mount(&img2, &mnt, &["-o", "rw"]);
        let lo = LoopGuard::attach(&mnt.join("disk.raw"), false, false);
        let o = Command::new("mkfs.ext4")
            .args(["-q", "-F", &lo.dev])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let fsdir = d.path().join("fs2");
        let k = KernelMount::mount(&lo.dev, &fsdir, "rw");
        fs::write(fsdir.join("a.bin"), Rng(9).bytes(1 << 20)).unwrap();
        drop(k);
    }
    let o = Command::new("e2fsck")
        .args(["-fn", p(&img2)])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "e2fsck on the raw file: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn compact_of_a_raw_file_digs_holes_where_it_reads_zeros() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.raw");
    let mut data = Rng(5).bytes(4 << 20);
    data[1 << 20..3 << 20].fill(0);
    fs::write(&img, &data).unwrap();
    let before = data_bytes(&img);
    assert_eq!(before, 4 << 20, "written out in full");
    let out = chainfs_ok(&["compact", "--json", p(&img)]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        data_bytes(&img),
        2 << 20,
        "the zero MiBs became a hole: {j}"
    );
    assert_eq!(j["holes_punched"], 1, "{j}");
    assert_eq!(fs::read(&img).unwrap(), data, "content unchanged");
    assert_eq!(
        fs::metadata(&img).unwrap().len(),
        4 << 20,
        "length unchanged"
    );
    assert_eq!(check(&img).0, 0);
}

/// Review findings on the raw driver: a damaged fixed VHD is never read as
/// raw, a write into the last partial sector of an odd-sized raw file ends,
/// and a FIFO named like an image next to a chain does not hang a write.
#[test]
fn raw_never_claims_damaged_images_and_odd_ends_and_fifos_do_not_hang() {
    let d = tempfile::tempdir().unwrap();
    // A fixed VHD holding an MBR, its only footer damaged.
    let f = d.path().join("f.vhd");
    chainfs_ok(&["create", p(&f), "--size", "4M", "--type", "fixed"]);
    let file = fs::OpenOptions::new().write(true).open(&f).unwrap();
    file.write_all_at(&[0x55, 0xaa], 510).unwrap();
    let len = file.metadata().unwrap().len();
    file.write_all_at(b"XXXXXXXX", len - 512).unwrap();
    drop(file);
    let o = chainfs(&["info", p(&f)]);
    assert!(!o.status.success(), "a damaged VHD opened: {}", text(&o));
    assert!(!text(&o).contains("format:        raw"), "{}", text(&o));

    // An odd-sized raw file: a write into its last partial sector ends.
    let odd = d.path().join("odd.img");
    fs::write(&odd, vec![7u8; 1000]).unwrap();
    let o = Command::new("timeout")
        .args(["20", p(&bin()), "write", p(&odd), "--offset", "990"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"abcdefghij")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let got = fs::read(&odd).unwrap();
    assert_eq!(got.len(), 1000);
    assert_eq!(&got[990..], b"abcdefghij");

    // A FIFO named like an image beside a chain: write does not block on it.
    let b = d.path().join("b.vhd");
    let c = d.path().join("c.vhd");
    chainfs_ok(&["create", p(&b), "--size", "4M"]);
    chainfs_ok(&["create", p(&c), "--parent", p(&b)]);
    let fifo = d.path().join("pipe.img");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let o = Command::new("timeout")
        .args([
            "20",
            p(&bin()),
            "write",
            p(&c),
            "--offset",
            "0",
            "--input",
            "/dev/null",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "write next to a FIFO: {}", text(&o));
}
