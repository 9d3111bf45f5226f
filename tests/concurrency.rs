//! Many threads on one shared `FlatImage` of a 3-layer VHD chain.
//!
//! The oracle stays simple and sound by splitting the sectors of the disk
//! between threads: a sector is either *owned* by one writer, which alone
//! changes it, or *watched*, which nobody writes. Readers read random ranges
//! of any size and alignment, straddling owned and watched sectors, block
//! boundaries and the end of the disk, and check every watched byte against
//! the model exactly while the writers allocate blocks and set bitmap bits
//! in those very blocks of the leaf. Owned bytes are only checked once the
//! writers are done (no sector-atomicity promise is made for a sector that
//! is read while it is being written). Every read must also return its full
//! length up to the end of the disk. Writers flush now and then, so reads
//! also race with the moment new blocks become durable.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use chainfs::format::vhd::create::{create_base, create_child, ParentSpec};
use chainfs::{Chain, ChainOptions, FlatImage};

const SECTOR: u64 = 512;
const SIZE: u64 = 8 << 20;
const READERS: usize = 8;
/// The top of the disk belongs to the first writer entirely, so that it can
/// write runs of any length and alignment there.
const TOP: u64 = SIZE - (1 << 20);

/// xorshift64*: cheap, deterministic test data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng((seed ^ 0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf.iter_mut() {
            *b = self.next() as u8;
        }
    }
}

/// Which writer owns `sector`, if any. With `writers` writers, writer `t`
/// owns the sectors `s` with `s % 8 == t` (`t < writers`), and writer 0 owns
/// everything from `TOP` up. The rest are watched.
fn owner(sector: u64, writers: u64) -> Option<u64> {
    if sector * SECTOR >= TOP {
        return Some(0);
    }
    let t = sector % 8;
    (t < writers).then_some(t)
}

fn new_child(parent: &Path, child: &Path, block_size: u32) {
    let c = Chain::open(parent, &ChainOptions::default()).unwrap();
    let spec = ParentSpec {
        path: parent,
        unique_id: c.leaf().info().unique_id.unwrap(),
        virtual_size: c.virtual_size(),
    };
    drop(c);
    create_child(child, &spec, block_size).unwrap();
}

/// Write `n` random runs into the leaf `path`, updating `model`.
fn scribble(path: &Path, model: &mut [u8], rng: &mut Rng, n: usize, max_len: u64) {
    let chain = Chain::open(
        path,
        &ChainOptions {
            writable: true,
            ..ChainOptions::default()
        },
    )
    .unwrap();
    let img = FlatImage::new(&chain);
    for _ in 0..n {
        let off = rng.below(SIZE);
        let len = 1 + rng.below(max_len.min(SIZE - off));
        let mut d = vec![0u8; len as usize];
        rng.fill(&mut d);
        img.write_at(off, &d).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&d);
    }
    img.flush().unwrap();
}

/// base (dynamic, 2 MiB blocks, mostly written) <- mid (512 KiB blocks,
/// scattered) <- leaf (`leaf_block`, a few runs, so most of its blocks are
/// still unallocated when the test starts).
fn build(dir: &Path, leaf_block: u32) -> (PathBuf, Vec<u8>) {
    let mut rng = Rng::new(42);
    let mut model = vec![0u8; SIZE as usize];
    let base = dir.join("base.vhd");
    let mid = dir.join("mid.vhd");
    let leaf = dir.join("leaf.vhd");
    create_base(&base, SIZE, false, 2 << 20).unwrap();
    // Blocks 0, 1 and 3 written; block 2 stays a hole (zeros).
    let chain = Chain::open(
        &base,
        &ChainOptions {
            writable: true,
            ..ChainOptions::default()
        },
    )
    .unwrap();
    let img = FlatImage::new(&chain);
    for b in [0u64, 1, 3] {
        let mut d = vec![0u8; 2 << 20];
        rng.fill(&mut d);
        img.write_at(b << 21, &d).unwrap();
        model[(b << 21) as usize..((b + 1) << 21) as usize].copy_from_slice(&d);
    }
    img.flush().unwrap();
    drop(img);
    drop(chain);
    new_child(&base, &mid, 512 << 10);
    scribble(&mid, &mut model, &mut rng, 24, 200 << 10);
    new_child(&mid, &leaf, leaf_block);
    scribble(&leaf, &mut model, &mut rng, 8, 20 << 10);
    // Allocate every other leaf block below TOP now, through a watched
    // sector, so that the writers both allocate blocks and set bits in
    // blocks that exist (the latter with no fsync in between: tight races).
    let chain = Chain::open(
        &leaf,
        &ChainOptions {
            writable: true,
            ..ChainOptions::default()
        },
    )
    .unwrap();
    let img = FlatImage::new(&chain);
    let bs = leaf_block as u64;
    for b in (0..TOP / bs).step_by(2) {
        let off = b * bs + 7 * SECTOR;
        let mut d = vec![0u8; SECTOR as usize];
        rng.fill(&mut d);
        img.write_at(off, &d).unwrap();
        model[off as usize..(off + SECTOR) as usize].copy_from_slice(&d);
    }
    img.flush().unwrap();
    (leaf, model)
}

/// Check `buf`, read at `off`, against `model` on every watched sector.
fn check_watched(buf: &[u8], off: u64, model: &[u8], writers: u64) {
    let end = off + buf.len() as u64;
    let mut s = off / SECTOR;
    while s * SECTOR < end {
        let a = (s * SECTOR).max(off);
        let b = ((s + 1) * SECTOR).min(end);
        if owner(s, writers).is_none() {
            let got = &buf[(a - off) as usize..(b - off) as usize];
            let want = &model[a as usize..b as usize];
            if got != want {
                let i = got.iter().zip(want).position(|(x, y)| x != y).unwrap();
                panic!(
                    "read at {off} (+{}): watched byte at {} is {:#04x}, model says {:#04x}",
                    buf.len(),
                    a + i as u64,
                    got[i],
                    want[i]
                );
            }
        }
        s += 1;
    }
}

/// Writer `t`'s `i`-th run: inside its own sectors only. With several
/// writers, every other run sweeps the blocks in order, in step, so that
/// all writers reach each block at the same time: they race to allocate it
/// or to set their bits in its bitmap.
fn next_write(rng: &mut Rng, t: u64, i: u64, writers: u64) -> (u64, u64) {
    if writers > 1 && i % 2 == 0 {
        let sector = (i / 2 % (TOP / SECTOR / 8)) * 8 + t;
        return (sector * SECTOR, SECTOR);
    }
    if t == 0 && rng.below(2) == 0 {
        // Anywhere in the top region, any length and alignment.
        let off = TOP + rng.below(SIZE - TOP);
        let len = 1 + rng.below((SIZE - off).min(96 << 10));
        return (off, len);
    }
    // Part of one owned sector in the interleaved region, often a whole one.
    let sector = rng.below(TOP / SECTOR / 8) * 8 + t;
    if rng.below(2) == 0 {
        return (sector * SECTOR, SECTOR);
    }
    let a = rng.below(SECTOR);
    let len = 1 + rng.below(SECTOR - a);
    (sector * SECTOR + a, len)
}

/// A scratch folder, on tmpfs when there is one: chainfs fsyncs as it
/// allocates blocks and flushes, which on a real disk would only slow the
/// test down (and narrow the races it is after).
fn scratch() -> tempfile::TempDir {
    let b = || tempfile::Builder::new().prefix("chainfs-conc").to_owned();
    b().tempdir_in("/dev/shm")
        .or_else(|_| b().tempdir())
        .unwrap()
}

fn open(leaf: &Path, tiny_cache: bool) -> (Chain, FlatImage) {
    let chain = Chain::open(
        leaf,
        &ChainOptions {
            writable: true,
            cache_bytes: if tiny_cache { 1 } else { 0 },
            ..ChainOptions::default()
        },
    )
    .unwrap();
    assert_eq!(chain.layers.len(), 3);
    let img = FlatImage::new(&chain);
    (chain, img)
}

/// Readers hammer one image while `writers` threads write their own sectors;
/// then the whole image, and a fresh open of it, must equal the model.
fn run(leaf_block: u32, tiny_cache: bool, readers: usize, writers: u64, writes_each: usize) {
    let dir = scratch();
    let (leaf, model) = build(dir.path(), leaf_block);
    let (chain, img) = open(&leaf, tiny_cache);
    let done = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    let start = Barrier::new(readers + writers as usize);
    let step = Barrier::new(writers as usize);
    let t0 = Instant::now();

    let finals: Vec<Vec<u8>> = std::thread::scope(|s| {
        for r in 0..readers {
            let (img, model, done, reads, start) = (&img, &model, &done, &reads, &start);
            s.spawn(move || {
                let mut rng = Rng::new(1000 + r as u64);
                let mut buf = vec![0u8; 300 << 10];
                start.wait();
                let mut n_reads = 0u64;
                // At least 300 reads each, and keep going while writers run.
                while n_reads < 300 || !done.load(Ordering::Acquire) {
                    let off = rng.below(SIZE + 4096);
                    let len = match rng.below(4) {
                        0 => 1 + rng.below(600),
                        1 => 1 + rng.below(8192),
                        _ => 1 + rng.below(300 << 10),
                    } as usize;
                    let b = &mut buf[..len];
                    b.fill(0xA5);
                    let n = img.read_at(off, b).unwrap();
                    let want = if off >= SIZE {
                        0
                    } else {
                        (len as u64).min(SIZE - off) as usize
                    };
                    assert_eq!(n, want, "short read at {off} (+{len}) before the end");
                    check_watched(&b[..n], off, model, writers);
                    n_reads += 1;
                }
                reads.fetch_add(n_reads, Ordering::Relaxed);
            });
        }
        let handles: Vec<_> = (0..writers)
            .map(|t| {
                let (img, model, start, step) = (&img, &model, &start, &step);
                s.spawn(move || {
                    let mut rng = Rng::new(7 + t);
                    let mut mine = model.clone();
                    start.wait();
                    for i in 0..writes_each as u64 {
                        let (off, len) = next_write(&mut rng, t, i, writers);
                        if writers > 1 && i % 2 == 0 {
                            // Sweep steps start together.
                            step.wait();
                        }
                        assert!((off / SECTOR..(off + len).div_ceil(SECTOR))
                            .all(|s| owner(s, writers) == Some(t)));
                        let mut d = vec![0u8; len as usize];
                        rng.fill(&mut d);
                        img.write_at(off, &d).unwrap();
                        mine[off as usize..(off + len) as usize].copy_from_slice(&d);
                        if i % 97 == 96 {
                            // Now and then make the writes durable, as an
                            // fsync through a mount would, while the others
                            // keep reading and writing.
                            img.flush().unwrap();
                        }
                    }
                    mine
                })
            })
            .collect();
        let finals = handles.into_iter().map(|h| h.join().unwrap()).collect();
        done.store(true, Ordering::Release);
        finals
    });
    let elapsed = t0.elapsed();

    // The final model: each sector from its owner's copy.
    let mut want = model.clone();
    for s in 0..SIZE / SECTOR {
        if let Some(t) = owner(s, writers) {
            let r = (s * SECTOR) as usize..((s + 1) * SECTOR) as usize;
            want[r.clone()].copy_from_slice(&finals[t as usize][r]);
        }
    }
    assert_ne!(want, model, "the writers changed nothing");
    img.flush().unwrap();
    let mut got = vec![0u8; SIZE as usize];
    assert_eq!(img.read_at(0, &mut got).unwrap() as u64, SIZE);
    assert_same("shared image after the writers", &got, &want);
    drop(img);
    drop(chain);
    let (chain, fresh) = open(&leaf, false);
    got.fill(0xA5);
    assert_eq!(fresh.read_at(0, &mut got).unwrap() as u64, SIZE);
    assert_same("fresh open after the writers", &got, &want);
    for l in &chain.layers {
        let problems = l.check().unwrap();
        assert!(problems.is_empty(), "{}: {problems:?}", l.path().display());
    }
    eprintln!(
        "{readers} readers, {writers} writers x {writes_each} writes, leaf blocks {leaf_block}, tiny cache {tiny_cache}: {} reads in {:.2?}",
        reads.load(Ordering::Relaxed),
        elapsed
    );
    assert!(elapsed < Duration::from_secs(120));
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if let Some(i) = got.iter().zip(want).position(|(x, y)| x != y) {
        panic!(
            "{what}: first difference at {i} (sector {}): got {:#04x}, want {:#04x}",
            i as u64 / SECTOR,
            got[i],
            want[i]
        );
    }
}

/// 8 readers and one writer allocating 4 KiB leaf blocks next to the sectors
/// the readers check.
#[test]
fn readers_see_the_model_while_one_writer_allocates_leaf_blocks() {
    run(4 << 10, false, READERS, 1, 4000);
}

/// The same with a 64 KiB metadata cache: BAT pages and bitmaps are evicted
/// and reloaded from the file while the writer changes them.
#[test]
fn readers_see_the_model_with_a_tiny_metadata_cache() {
    run(64 << 10, true, READERS, 1, 4000);
}

/// Four writers, each on its own sectors of the same 64 KiB blocks, sweeping
/// them in step so that they race to allocate each block and to set bits in
/// its bitmap, with two readers on the rest (two readers, not eight, so that
/// the writers get the cores): no write is lost, no watched byte changes.
/// Races are probabilistic: with the bitmap update's lock removed, this test
/// failed in 5 runs of 6.
#[test]
fn concurrent_writers_to_disjoint_sectors_of_shared_blocks_lose_nothing() {
    run(64 << 10, false, 2, 4, 3584);
}
