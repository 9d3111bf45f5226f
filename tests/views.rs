//! Every checkpoint as its own view (`MNT/layers/K-NAME.raw`) and the map
//! of a chain (`chainfs map`, text, JSON and SVG, the SVG opened in a
//! headless Chromium and its screenshot decoded).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const NAMES: [&str; 3] = ["base.vhd", "mid.vhd", "leaf.vhd"];
const SIZE: usize = 16 << 20;
const BLOCK: usize = 512 << 10;
const SECTOR: usize = 512;

/// base (dynamic, 512 KiB blocks) <- mid <- leaf, 16 MiB, sector-aligned
/// random writes in every layer. Returns the leaf and, per sector, the
/// depths of the layers that store it (0 = leaf): a dynamic base stores
/// every sector of a block it allocated.
fn three_layers(dir: &Path) -> (PathBuf, Vec<Vec<usize>>) {
    let mut stored = vec![Vec::new(); SIZE / SECTOR];
    let mut rng = Rng(0x7e57_7123);
    let scratch = dir.join("chunk");
    for (i, name) in NAMES.iter().enumerate() {
        let path = dir.join(name);
        let depth = NAMES.len() - 1 - i;
        if i == 0 {
            chainfs_ok(&["create", p(&path), "--size", "16M", "--block-size", "512K"]);
        } else {
            chainfs_ok(&["create", p(&path), "--parent", p(&dir.join(NAMES[i - 1]))]);
        }
        for _ in 0..6 {
            let off = rng.below(((SIZE - 400_000) / SECTOR) as u64) as usize * SECTOR;
            let len = (1 + rng.below(600) as usize) * SECTOR;
            chainfs_write(&path, off as u64, &rng.bytes(len), &scratch);
            let (a, b) = if depth == NAMES.len() - 1 {
                (off / BLOCK * BLOCK, (off + len).div_ceil(BLOCK) * BLOCK)
            } else {
                (off, off + len)
            };
            for s in &mut stored[a / SECTOR..b / SECTOR] {
                if !s.contains(&depth) {
                    s.push(depth);
                }
            }
        }
    }
    (dir.join("leaf.vhd"), stored)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// The flattened disk with `layer` as the leaf, as `chainfs export` writes it.
fn export_of(layer: &Path, scratch: &Path) -> String {
    let out = scratch.join(format!(
        "{}.export.raw",
        layer.file_name().unwrap().to_string_lossy()
    ));
    chainfs_ok(&["export", p(layer), p(&out), "--force"]);
    let h = sha256_file(&out);
    fs::remove_file(&out).unwrap();
    h
}

#[test]
fn layers_dir_has_one_read_only_view_per_layer_equal_to_its_export() {
    if !require_fuse() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (leaf, _) = three_layers(t.path());
    let mnt = t.path().join("mnt");
    let _g = mount(&leaf, &mnt, &[]);

    assert!(names(&mnt).contains(&"layers".to_string()));
    let want = ["0-leaf.vhd.raw", "1-mid.vhd.raw", "2-base.vhd.raw"];
    assert_eq!(names(&mnt.join("layers")), want);
    for (k, n) in want.iter().enumerate() {
        let v = mnt.join("layers").join(n);
        let md = fs::metadata(&v).unwrap();
        assert!(md.is_file());
        assert_eq!(md.len(), SIZE as u64, "{n}");
        assert_eq!(md.permissions().mode() & 0o777, 0o444, "{n}");
        let layer = t.path().join(NAMES[NAMES.len() - 1 - k]);
        assert_eq!(sha256_file(&v), export_of(&layer, t.path()), "{n}");
        // Read-only, whatever the mount.
        let e = fs::OpenOptions::new().write(true).open(&v).unwrap_err();
        assert!(
            matches!(e.raw_os_error(), Some(libc::EROFS) | Some(libc::EACCES)),
            "{n}: {e}"
        );
    }
    // The leaf's view is the whole chain: disk.raw.
    assert_eq!(
        sha256_file(&mnt.join("layers/0-leaf.vhd.raw")),
        sha256_file(&mnt.join("disk.raw"))
    );
    // The views differ from each other (every layer holds data).
    let h: Vec<String> = want
        .iter()
        .map(|n| sha256_file(&mnt.join("layers").join(n)))
        .collect();
    assert!(h[0] != h[1] && h[1] != h[2], "{h:?}");
    assert!(fs::metadata(mnt.join("layers/3-base.vhd.raw")).is_err());
    assert!(fs::metadata(mnt.join("layers/0-mid.vhd.raw")).is_err());
}

#[test]
fn layer_views_equal_vhdimounts_sub_chains() {
    if !require_fuse() || !require("vhdimount", have("vhdimount")) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (leaf, _) = three_layers(t.path());
    let mnt = t.path().join("mnt");
    let _g = mount(&leaf, &mnt, &[]);
    let vm = t.path().join("vhdi");
    let _v = vhdimount(&leaf, &vm, 3);
    // libvhdi numbers from the base: vhdi1 is base, vhdi3 the whole chain.
    for (k, n) in ["0-leaf.vhd.raw", "1-mid.vhd.raw", "2-base.vhd.raw"]
        .iter()
        .enumerate()
    {
        assert_eq!(
            sha256_file(&mnt.join("layers").join(n)),
            sha256_file(&vm.join(format!("vhdi{}", 3 - k))),
            "{n}"
        );
    }
}

#[test]
fn a_view_is_narrowed_to_the_layers_it_reads() {
    if !require_fuse() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (leaf, _) = three_layers(t.path());
    // Only the leaf is private: disk.raw and the leaf's view need it, the
    // parents' views do not.
    fs::set_permissions(&leaf, fs::Permissions::from_mode(0o600)).unwrap();
    let mnt = t.path().join("mnt");
    let _g = mount(&leaf, &mnt, &[]);
    let mode = |n: &str| fs::metadata(mnt.join(n)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("disk.raw"), 0o400);
    assert_eq!(mode("layers/0-leaf.vhd.raw"), 0o400);
    assert_eq!(mode("layers/1-mid.vhd.raw"), 0o444);
    assert_eq!(mode("layers/2-base.vhd.raw"), 0o444);
}

#[test]
fn the_leaf_view_follows_writes_and_parent_views_do_not() {
    if !require_fuse() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (leaf, _) = three_layers(t.path());
    let mnt = t.path().join("mnt");
    let _g = mount(&leaf, &mnt, &["-o", "rw"]);
    let v0 = mnt.join("layers/0-leaf.vhd.raw");
    let v1 = mnt.join("layers/1-mid.vhd.raw");
    let before1 = sha256_file(&v1);
    // Read the leaf's view first, so a stale page cache would show.
    let f0 = fs::File::open(&v0).unwrap();
    let mut old = vec![0u8; 8192];
    f0.read_exact_at(&mut old, 1 << 20).unwrap();
    let new = Rng(99).bytes(8192);
    let d = fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("disk.raw"))
        .unwrap();
    d.write_all_at(&new, 1 << 20).unwrap();
    d.sync_all().unwrap();
    let mut got = vec![0u8; 8192];
    f0.read_exact_at(&mut got, 1 << 20).unwrap();
    assert!(got == new, "the leaf's open view does not show the write");
    assert_eq!(sha256_file(&v0), sha256_file(&mnt.join("disk.raw")));
    assert_eq!(sha256_file(&v1), before1, "a parent's view changed");
    let e = fs::OpenOptions::new().write(true).open(&v0).unwrap_err();
    assert!(
        matches!(e.raw_os_error(), Some(libc::EROFS) | Some(libc::EACCES)),
        "views stay read-only under -o rw: {e}"
    );
}

/// Write `cmd` to MNT/control; (errno of the write, reply text).
fn control(mnt: &Path, cmd: &str) -> (Option<i32>, String) {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("control"))
        .unwrap();
    let errno = f
        .write(format!("{cmd}\n").as_bytes())
        .err()
        .map(|e| e.raw_os_error().unwrap());
    let mut text = String::new();
    f.read_to_string(&mut text).unwrap();
    (errno, text)
}

fn wait_job(mnt: &Path, job: &str) -> BTreeMap<String, String> {
    let start = Instant::now();
    loop {
        let j: BTreeMap<String, String> = fs::read_to_string(mnt.join(job))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if !matches!(j.get("JobState").map(|s| s.as_str()), Some("3" | "4")) {
            return j;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{job}: {j:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_merge_changing_an_open_view_is_refused_and_retired_views_disappear() {
    if !require_fuse() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (leaf, _) = three_layers(t.path());
    let mnt = t.path().join("mnt");
    let _g = mount(&leaf, &mnt, &["-o", "rw"]);
    let layers = mnt.join("layers");
    let mid_view = sha256_file(&layers.join("1-mid.vhd.raw"));
    let leaf_view = sha256_file(&layers.join("0-leaf.vhd.raw"));

    // DESTINATION's view open: refused, 32774, EBUSY; nothing changes.
    let held = fs::File::open(layers.join("2-base.vhd.raw")).unwrap();
    let (errno, reply) = control(&mnt, "merge mid.vhd base.vhd");
    assert_eq!(errno, Some(libc::EBUSY), "{reply}");
    assert!(reply.contains("ReturnValue=32774"), "{reply}");
    assert!(reply.contains("2-base.vhd.raw"), "{reply}");
    drop(held);
    // SOURCE's view open: refused as well (it would be retired).
    let held = fs::File::open(layers.join("1-mid.vhd.raw")).unwrap();
    let (errno, reply) = control(&mnt, "merge mid.vhd base.vhd");
    assert_eq!(errno, Some(libc::EBUSY), "{reply}");
    assert!(reply.contains("ReturnValue=32774"), "{reply}");
    drop(held);
    assert_eq!(fs::read_dir(mnt.join("jobs")).unwrap().count(), 0);
    assert_eq!(names(&layers).len(), 3);

    // The leaf's view is above SOURCE: the merge does not change it, so an
    // open handle on it does not stand in the way, and reads the same after.
    let held = fs::File::open(layers.join("0-leaf.vhd.raw")).unwrap();
    let (errno, reply) = control(&mnt, "merge mid.vhd base.vhd");
    assert_eq!(errno, None, "{reply}");
    assert!(reply.contains("ReturnValue=4096"), "{reply}");
    let j = wait_job(&mnt, "jobs/1");
    assert_eq!(j.get("JobState").map(|s| s.as_str()), Some("7"), "{j:?}");
    let mut all = Vec::new();
    (&held).read_to_end(&mut all).unwrap();
    assert_eq!(sha256(&all), leaf_view);
    drop(held);

    assert_eq!(names(&layers), ["0-leaf.vhd.raw", "1-base.vhd.raw"]);
    for gone in ["1-mid.vhd.raw", "2-base.vhd.raw"] {
        let e = fs::metadata(layers.join(gone)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{gone}");
    }
    // base now holds what mid showed.
    assert_eq!(sha256_file(&layers.join("1-base.vhd.raw")), mid_view);
    assert_eq!(sha256_file(&layers.join("0-leaf.vhd.raw")), leaf_view);
}

#[test]
fn a_layer_view_loop_mounts_and_shows_the_files_of_its_time() {
    if !require_fuse() || !require_loop() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let raw = t.path().join("work.raw");
    let size: usize = 64 << 20;
    partitioned_raw(&raw, size as u64, "gpt");
    let layers = ["base.vhd", "mid.vhd", "leaf.vhd"];
    let guest = t.path().join("guest");
    let mut prev = vec![0u8; size];
    for stage in 0..layers.len() {
        {
            let lo = LoopGuard::attach(&raw, false, true);
            if stage == 0 {
                run(Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096", &lo.partition(1)]));
            }
            let _m = KernelMount::mount(&lo.partition(1), &guest, "rw");
            fs::write(
                guest.join(format!("stage{stage}.bin")),
                Rng(stage as u64).bytes(300_000),
            )
            .unwrap();
            // Each stage rewrites the same file: the view of its time shows
            // that stage's version.
            fs::write(guest.join("now.txt"), format!("stage {stage}\n")).unwrap();
            run(&mut Command::new("sync"));
        }
        let now = fs::read(&raw).unwrap();
        layer_from_snapshot(
            t.path(),
            &layers,
            stage,
            &["--size", "64M"],
            &prev,
            &now,
            &t.path().join("scratch"),
        );
        prev = now;
    }
    let mnt = t.path().join("mnt");
    let _g = mount(&t.path().join("leaf.vhd"), &mnt, &[]);
    let lo = LoopGuard::attach(&mnt.join("layers/1-mid.vhd.raw"), true, true);
    let start = Instant::now();
    while !Path::new(&lo.partition(1)).exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no partition");
        std::thread::sleep(Duration::from_millis(20));
    }
    let inside = t.path().join("inside");
    let km = KernelMount::mount(&lo.partition(1), &inside, "ro,noload");
    assert_eq!(
        fs::read_to_string(inside.join("now.txt")).unwrap(),
        "stage 1\n"
    );
    for stage in 0..2u64 {
        let got = fs::read(inside.join(format!("stage{stage}.bin"))).unwrap();
        assert!(got == Rng(stage).bytes(300_000), "stage{stage}.bin differs");
    }
    assert!(
        !inside.join("stage2.bin").exists(),
        "the view of mid shows a file written later, in leaf"
    );
    drop(km);
    drop(lo);
}

/// `chainfs map --json` of `leaf`, parsed.
fn map_json(leaf: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(bin())
        .current_dir("/")
        .args(["map", p(leaf), "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn map_names_the_layer_holding_every_run() {
    let t = tempfile::tempdir().unwrap();
    let (leaf, stored) = three_layers(t.path());
    let exported = t.path().join("flat.raw");
    chainfs_ok(&["export", p(&leaf), p(&exported)]);
    let flat = fs::read(&exported).unwrap();
    let runs = map_json(&leaf);
    assert!(runs.len() > 10, "{} runs", runs.len());
    let mut at = 0u64;
    let mut prev: Option<&serde_json::Value> = None;
    for r in &runs {
        let start = r["start"].as_u64().unwrap();
        let len = r["length"].as_u64().unwrap();
        assert_eq!(start, at, "runs leave a gap or overlap: {r}");
        assert!(len > 0 && len % SECTOR as u64 == 0, "{r}");
        let sectors = start as usize / SECTOR..(start + len) as usize / SECTOR;
        let data = r["data"].as_bool().unwrap();
        assert_eq!(r["zero"].as_bool().unwrap(), !data, "{r}");
        if data {
            // The topmost layer storing each sector supplies it.
            let depth = r["depth"].as_u64().unwrap() as usize;
            for s in sectors.clone() {
                assert_eq!(
                    stored[s].iter().min(),
                    Some(&depth),
                    "sector {s} in run {r}"
                );
            }
            // ... and the bytes are there, at `offset` in `file`.
            let file = r["file"].as_str().unwrap();
            assert!(Path::new(file).is_absolute(), "{r}");
            assert!(file.ends_with(NAMES[NAMES.len() - 1 - depth]), "{r}");
            let mut buf = vec![0u8; len as usize];
            fs::File::open(file)
                .unwrap()
                .read_exact_at(&mut buf, r["offset"].as_u64().unwrap())
                .unwrap();
            assert!(
                buf[..] == flat[start as usize..(start + len) as usize],
                "bytes at the mapped offset differ: {r}"
            );
        } else {
            for s in sectors {
                assert!(stored[s].is_empty(), "sector {s} is stored, run {r}");
            }
            assert!(r["depth"].is_null() && r["file"].is_null(), "{r}");
        }
        // Coalesced: a run never simply continues the one before.
        if let Some(q) = prev {
            let continues = q["depth"] == r["depth"]
                && (q["zero"].as_bool().unwrap()
                    || q["offset"].as_u64().unwrap() + q["length"].as_u64().unwrap()
                        == r["offset"].as_u64().unwrap());
            assert!(!continues, "{q} and {r} should be one run");
        }
        prev = Some(r);
        at = start + len;
    }
    assert_eq!(at, SIZE as u64);
    // The text form lists the same runs.
    let text = chainfs_ok(&["map", p(&leaf)]);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("Offset"), "{text}");
    assert_eq!(lines.len() - 1, runs.len(), "{text}");
    for (l, r) in lines[1..].iter().zip(&runs) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
        assert_eq!(hex(f[0]), r["start"].as_u64().unwrap(), "{l}");
        assert_eq!(hex(f[1]), r["length"].as_u64().unwrap(), "{l}");
        match r["depth"].as_u64() {
            Some(d) => {
                assert_eq!(f[2], d.to_string(), "{l}");
                assert_eq!(hex(f[3]), r["offset"].as_u64().unwrap(), "{l}");
                assert_eq!(f[4], r["file"].as_str().unwrap(), "{l}");
            }
            None => assert_eq!(&f[2..], ["-", "-", "zero"], "{l}"),
        }
    }
}

/// Is `s` well-formed XML as far as elements go: every tag closed in order,
/// attributes quoted, one root element.
fn check_xml(s: &str) {
    let body = s
        .strip_prefix("<?xml")
        .and_then(|r| r.split_once("?>"))
        .map(|(_, b)| b)
        .expect("XML declaration");
    let mut stack: Vec<&str> = Vec::new();
    let mut roots = 0;
    let mut rest = body;
    while let Some(i) = rest.find('<') {
        let tail = &rest[i + 1..];
        let end = tail.find('>').expect("unterminated tag");
        let tag = &tail[..end];
        assert_eq!(
            tag.matches('"').count() % 2,
            0,
            "unbalanced quotes in <{tag}>"
        );
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(stack.pop(), Some(name.trim()), "closing </{name}>");
        } else {
            let name = tag.split_whitespace().next().unwrap().trim_end_matches('/');
            if stack.is_empty() {
                roots += 1;
            }
            if !tag.ends_with('/') {
                stack.push(name);
            }
        }
        let text = &tail[end + 1..];
        let next = text.find('<').unwrap_or(text.len());
        assert!(!text[..next].contains('>'), "stray '>' after <{tag}>");
        rest = text;
    }
    assert!(stack.is_empty(), "unclosed elements {stack:?}");
    assert_eq!(roots, 1, "one root element");
}

/// Decode an 8-bit RGB/RGBA, non-interlaced PNG: (width, height, RGB pixels).
fn decode_png(png: &[u8]) -> (usize, usize, Vec<[u8; 3]>) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let (mut w, mut h, mut bpp) = (0usize, 0usize, 0usize);
    let mut idat = Vec::new();
    let mut pos = 8;
    while pos + 8 <= png.len() {
        let len = u32::from_be_bytes(png[pos..pos + 4].try_into().unwrap()) as usize;
        let kind = &png[pos + 4..pos + 8];
        let data = &png[pos + 8..pos + 8 + len];
        match kind {
            b"IHDR" => {
                w = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                h = u32::from_be_bytes(data[4..8].try_into().unwrap()) as usize;
                assert_eq!(data[8], 8, "bit depth");
                bpp = match data[9] {
                    2 => 3,
                    6 => 4,
                    c => panic!("colour type {c}"),
                };
                assert_eq!(data[12], 0, "interlaced");
            }
            b"IDAT" => idat.extend_from_slice(data),
            _ => {}
        }
        pos += 12 + len;
    }
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&idat[..])
        .read_to_end(&mut raw)
        .unwrap();
    let stride = w * bpp;
    assert_eq!(raw.len(), h * (stride + 1), "IDAT size");
    let mut img = vec![0u8; h * stride];
    for y in 0..h {
        let f = raw[y * (stride + 1)];
        let line = &raw[y * (stride + 1) + 1..(y + 1) * (stride + 1)];
        for x in 0..stride {
            let a = if x >= bpp {
                img[y * stride + x - bpp]
            } else {
                0
            } as i32;
            let b = if y > 0 { img[(y - 1) * stride + x] } else { 0 } as i32;
            let c = if x >= bpp && y > 0 {
                img[(y - 1) * stride + x - bpp]
            } else {
                0
            } as i32;
            let pred = match f {
                0 => 0,
                1 => a,
                2 => b,
                3 => (a + b) / 2,
                4 => {
                    let p = a + b - c;
                    let (pa, pb, pc) = ((p - a).abs(), (p - b).abs(), (p - c).abs());
                    if pa <= pb && pa <= pc {
                        a
                    } else if pb <= pc {
                        b
                    } else {
                        c
                    }
                }
                _ => panic!("filter {f}"),
            };
            img[y * stride + x] = (line[x] as i32 + pred) as u8;
        }
    }
    let px = img.chunks(bpp).map(|c| [c[0], c[1], c[2]]).collect();
    (w, h, px)
}

/// base (2 TiB VHDX) <- mid <- leaf with a few extents far apart.
fn two_tib_chain(dir: &Path) -> PathBuf {
    let scratch = dir.join("chunk");
    let names = ["base.vhdx", "mid.vhdx", "leaf.vhdx"];
    let writes: [&[u64]; 3] = [
        &[1 << 40],
        &[0, 1500 << 30],
        &[100 << 30, (2 << 40) - (1 << 20)],
    ];
    for (i, name) in names.iter().enumerate() {
        let path = dir.join(name);
        if i == 0 {
            chainfs_ok(&["create", p(&path), "--size", "2T"]);
        } else {
            chainfs_ok(&["create", p(&path), "--parent", p(&dir.join(names[i - 1]))]);
        }
        for &off in writes[i] {
            chainfs_write(&path, off, &Rng(off).bytes(1 << 20), &scratch);
        }
    }
    dir.join("leaf.vhdx")
}

#[test]
fn map_svg_of_a_2_tib_chain_is_quick_valid_and_renders() {
    let t = tempfile::tempdir().unwrap();
    let leaf = two_tib_chain(t.path());
    let svg = t.path().join("map.svg");
    let t0 = Instant::now();
    chainfs_ok(&["map", p(&leaf), "--svg", p(&svg)]);
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(30), "map --svg took {took:?}");
    let s = fs::read_to_string(&svg).unwrap();
    check_xml(&s);
    assert!(s.contains("<svg"), "{s}");
    // One row per layer, plus the "visible" row on top.
    assert_eq!(s.matches("<g class=\"row\">").count(), 4, "{s}");
    for label in ["0: leaf.vhdx", "1: mid.vhdx", "2: base.vhdx", "2.0 TiB"] {
        assert!(s.contains(label), "no {label:?} in the SVG");
    }
    // The JSON map of the same chain names the extents' layers.
    let runs = map_json(&leaf);
    let data: Vec<(u64, u64)> = runs
        .iter()
        .filter(|r| r["data"].as_bool().unwrap())
        .map(|r| (r["start"].as_u64().unwrap(), r["depth"].as_u64().unwrap()))
        .collect();
    assert_eq!(data.first(), Some(&(0, 1)), "{data:?}");
    assert!(data.contains(&(100 << 30, 0)), "{data:?}");
    assert!(
        data.iter().any(|&(s, d)| d == 2 && s <= 1 << 40),
        "{data:?}"
    );

    if !require("chromium", have("chromium")) {
        return;
    }
    let png = t.path().join("map.png");
    let o = Command::new("chromium")
        .current_dir(t.path())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            &format!("--screenshot={}", p(&png)),
            "--window-size=1400,600",
            &format!("file://{}", p(&svg)),
        ])
        .output()
        .unwrap();
    assert!(o.status.success() && png.exists(), "chromium: {}", text(&o));
    let (w, h, px) = decode_png(&fs::read(&png).unwrap());
    assert_eq!((w, h), (1400, 600));
    let white = px.iter().filter(|p| **p == [255, 255, 255]).count();
    assert!(white < px.len(), "the screenshot is blank");
    // Each layer's colour (fully opaque in the "visible" row) is on screen.
    for (name, rgb) in [
        ("leaf red", [0xd6i32, 0x27, 0x28]),
        ("mid blue", [0x1f, 0x77, 0xb4]),
        ("base green", [0x2c, 0xa0, 0x2c]),
    ] {
        let n = px
            .iter()
            .filter(|p| (0..3).all(|i| (p[i] as i32 - rgb[i]).abs() <= 24))
            .count();
        assert!(n >= 10, "{name}: {n} pixels in the screenshot");
    }
    // Labels and the axis are drawn in dark text.
    let dark = px.iter().filter(|p| p.iter().all(|&c| c < 80)).count();
    assert!(dark > 500, "{dark} dark pixels: no text?");
}

#[test]
fn views_a_running_merge_changes_cannot_be_opened() {
    if !require_fuse() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    // mid stores 256 MiB, so the merge into base runs long enough to
    // try the opens while it copies.
    chainfs_ok(&["create", p(&d.join("base.vhd")), "--size", "256M"]);
    chainfs_ok(&[
        "create",
        p(&d.join("mid.vhd")),
        "--parent",
        p(&d.join("base.vhd")),
    ]);
    let zeros = d.join("zeros");
    fs::File::create(&zeros)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    chainfs_ok(&[
        "write",
        p(&d.join("mid.vhd")),
        "--offset",
        "0",
        "--no-sparse",
        "--input",
        p(&zeros),
    ]);
    chainfs_ok(&[
        "create",
        p(&d.join("leaf.vhd")),
        "--parent",
        p(&d.join("mid.vhd")),
    ]);
    let mnt = d.join("mnt");
    let _g = mount(&d.join("leaf.vhd"), &mnt, &["-o", "rw"]);
    let layers = mnt.join("layers");

    let (errno, reply) = control(&mnt, "merge mid.vhd base.vhd");
    assert_eq!(errno, None, "{reply}");
    let base = fs::File::open(layers.join("2-base.vhd.raw")).map(|_| ());
    let mid = fs::File::open(layers.join("1-mid.vhd.raw")).map(|_| ());
    let leaf = fs::File::open(layers.join("0-leaf.vhd.raw")).map(|_| ());
    let state = fs::read_to_string(mnt.join("jobs/1")).unwrap();
    assert!(
        state.contains("JobState=4") || state.contains("JobState=3"),
        "the merge ended before the opens were tried; make mid bigger: {state}"
    );
    for (n, r) in [("2-base", base), ("1-mid", mid)] {
        let e = r.expect_err(n);
        assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{n}: {e}");
    }
    leaf.expect("the leaf's view is not changed by the merge");
    let j = wait_job(&mnt, "jobs/1");
    assert_eq!(j.get("JobState").map(|s| s.as_str()), Some("7"), "{j:?}");
    assert_eq!(names(&layers), ["0-leaf.vhd.raw", "1-base.vhd.raw"]);
    fs::File::open(layers.join("1-base.vhd.raw")).expect("open after the merge");
}
