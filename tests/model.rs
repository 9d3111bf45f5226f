//! Reference-model property tests: random VHD chains built with chainfs's own
//! writer, random writes and reads through `FlatImage`, and a `Vec<u8>` that
//! says what every byte of the flat disk must be.
//!
//! A chain is built bottom-up, the way it happens in real life: the base is
//! the leaf first and takes writes, then a differencing child is created on
//! top of it and becomes the leaf, and so on. Each layer therefore holds the
//! writes made while it was the leaf, and every earlier write shows through
//! wherever no later layer covers it. Besides writes and reads, a plan may
//! discard ranges (zeros), copy parent data up into the leaf (no visible
//! change), flush, and close and reopen the chain mid-way. After the last operation the chain is
//! opened afresh from disk and compared whole (read and `export`), every
//! layer passes its own structural check, and every parent file is byte for
//! byte what it was when its child was created.
//!
//! Failures shrink to a small `Plan`; pin each one below as a named `#[test]`
//! calling `run(&plan)`. The proptest regression file is off on purpose: the
//! pinned tests are the record.

mod common;

use std::path::{Path, PathBuf};

use chainfs::format::vhd::create::{create_base, create_child, ParentSpec};
use chainfs::{Chain, ChainOptions, ErrorKind, FlatImage};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const SECTOR: u64 = 512;
const BLOCK_SIZES: [u32; 4] = [4 << 10, 64 << 10, 512 << 10, 2 << 20];
/// How far past the end random reads may start.
const READ_SLACK: u64 = 8 << 10;

/// One random scenario: the chain's shape and what happens to each layer
/// while it is the leaf.
#[derive(Debug, Clone)]
struct Plan {
    /// Virtual size in bytes, a multiple of 512.
    size: u64,
    base_fixed: bool,
    /// Block size of each layer, base first (unused for a fixed base).
    block_sizes: Vec<u32>,
    /// Open with a 64 KiB metadata cache (4 KiB per shard), so tables are
    /// evicted and reloaded from disk all the time.
    tiny_cache: bool,
    /// Flush each leaf before closing it (else a clean close must do it).
    flush_at_close: bool,
    /// `steps[i]`: operations while layer `i` (0 = base) is the leaf.
    /// `steps.len()` is the chain depth.
    steps: Vec<Vec<Op>>,
}

#[derive(Debug, Clone, Copy)]
enum Fill {
    /// Pseudo-random bytes from a seed.
    Random(u64),
    /// Zeros: in a child they must still hide the parent's bytes.
    Zeros,
    Byte(u8),
}

/// An offset, resolved against the virtual size when the plan runs, so that
/// plans shrink independently of the size.
#[derive(Debug, Clone, Copy)]
enum Pos {
    /// `x % limit`.
    Any(u64),
    /// Near a multiple of `1 << shift` (sector, page, block boundaries).
    Near { shift: u8, k: u64, delta: i64 },
}

#[derive(Debug, Clone, Copy)]
enum Op {
    /// Write `len` bytes (clipped to the disk) at `at`.
    Write { at: Pos, len: u64, fill: Fill },
    /// A write that ends `over` bytes past the end: must fail, change nothing.
    WritePastEnd { back: u64, over: u64 },
    /// Read `len` bytes at `at` (which may lie at or past the end).
    Read { at: Pos, len: u64 },
    /// Make `len` bytes at `at` read as zeros (a range past the end is
    /// clipped): whole blocks become holes or zero blocks, the rest zeros.
    Discard { at: Pos, len: u64 },
    /// Copy-on-read: store in the leaf what its parents hold there; the
    /// flat content must not change.
    CopyUp { at: Pos, len: u64 },
    /// Make the writes durable and go on with the same open image.
    Flush,
    /// Close (after a flush, or not: a clean close must keep every write)
    /// and reopen the chain from disk (writable leaf).
    Reopen { flush: bool },
}

impl Pos {
    /// An offset in `0..limit`.
    fn resolve(self, limit: u64) -> u64 {
        match self {
            Pos::Any(x) => x % limit,
            Pos::Near { shift, k, delta } => {
                let unit = 1u64 << shift;
                let base = (k % (limit / unit + 1)) * unit;
                base.saturating_add_signed(delta).min(limit - 1)
            }
        }
    }
}

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

    fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

fn data(fill: Fill, len: usize) -> Vec<u8> {
    match fill {
        Fill::Random(seed) => {
            let mut v = vec![0u8; len];
            Rng::new(seed).fill(&mut v);
            v
        }
        Fill::Zeros => vec![0u8; len],
        Fill::Byte(b) => vec![b; len],
    }
}

/// The first index where `a` and `b` differ, with both lengths considered.
fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        return Some(i);
    }
    (a.len() != b.len()).then(|| a.len().min(b.len()))
}

fn ensure_same(what: &str, got: &[u8], want: &[u8], base: u64) -> Result<(), TestCaseError> {
    if let Some(i) = first_diff(got, want) {
        return Err(TestCaseError::fail(format!(
            "{what}: first difference at flat offset {} (got {:?}, want {:?}; lengths {} and {})",
            base + i as u64,
            got.get(i),
            want.get(i),
            got.len(),
            want.len()
        )));
    }
    Ok(())
}

/// A scratch folder, on tmpfs when there is one: chainfs fsyncs as it
/// allocates blocks and flushes, and on a real disk that alone would make a
/// few hundred cases take minutes. What is tested (the bytes) is the same.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("chainfs-model")
            .tempdir_in(shm)
        {
            return d;
        }
    }
    tempfile::Builder::new()
        .prefix("chainfs-model")
        .tempdir()
        .unwrap()
}

fn open(
    leaf: &Path,
    writable: bool,
    tiny_cache: bool,
) -> Result<(Chain, FlatImage), TestCaseError> {
    let opts = ChainOptions {
        writable,
        cache_bytes: if tiny_cache { 1 } else { 0 },
        ..ChainOptions::default()
    };
    let chain = Chain::open(leaf, &opts)
        .map_err(|e| TestCaseError::fail(format!("open {}: {e}", leaf.display())))?;
    let img = FlatImage::new(&chain);
    Ok((chain, img))
}

fn fail(what: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(what.to_string())
}

/// Run one plan; every check of the module docs.
fn run(plan: &Plan) -> Result<(), TestCaseError> {
    let size = plan.size;
    let depth = plan.steps.len();
    assert!(depth >= 1 && plan.block_sizes.len() >= depth && size % SECTOR == 0 && size > 0);
    let dir = scratch();
    let paths: Vec<PathBuf> = (0..depth)
        .map(|i| dir.path().join(format!("layer{i}.vhd")))
        .collect();
    create_base(&paths[0], size, plan.base_fixed, plan.block_sizes[0]).map_err(fail)?;

    let mut model = vec![0u8; size as usize];
    // (parent file, its sha256 when it stopped being the leaf)
    let mut frozen: Vec<(PathBuf, String)> = Vec::new();

    for (i, ops) in plan.steps.iter().enumerate() {
        if i > 0 {
            let parent = &paths[i - 1];
            frozen.push((parent.clone(), common::sha256_file(parent)));
            let (pc, _) = open(parent, false, false)?;
            let spec = ParentSpec {
                path: parent,
                unique_id: pc.leaf().info().unique_id.unwrap(),
                virtual_size: pc.virtual_size(),
            };
            drop(pc);
            create_child(&paths[i], &spec, plan.block_sizes[i]).map_err(fail)?;
        }
        let leaf = &paths[i];
        let (mut chain, mut img) = open(leaf, true, plan.tiny_cache)?;
        prop_assert_eq!(chain.layers.len(), i + 1);
        prop_assert_eq!(img.size(), size);
        for (n, op) in ops.iter().enumerate() {
            let ctx = format!("layer {i} op {n} {op:?}");
            match *op {
                Op::Write { at, len, fill } => {
                    let off = at.resolve(size);
                    let len = len.clamp(1, size - off);
                    let d = data(fill, len as usize);
                    img.write_at(off, &d)
                        .map_err(|e| fail(format!("{ctx}: write {len} at {off}: {e}")))?;
                    model[off as usize..(off + len) as usize].copy_from_slice(&d);
                }
                Op::WritePastEnd { back, over } => {
                    let back = back % (size + 1);
                    let off = size - back;
                    let d = vec![0xEEu8; (back + over.max(1)) as usize];
                    match img.write_at(off, &d) {
                        Ok(()) => {
                            return Err(fail(format!(
                                "{ctx}: write of {} bytes at {off} past the end {size} succeeded",
                                d.len()
                            )))
                        }
                        Err(e) => prop_assert_eq!(e.kind, ErrorKind::InvalidArgument, "{}", e),
                    }
                }
                Op::Read { at, len } => {
                    let off = at.resolve(size + READ_SLACK);
                    let mut buf = vec![0xA5u8; len as usize];
                    let n = img
                        .read_at(off, &mut buf)
                        .map_err(|e| fail(format!("{ctx}: read {len} at {off}: {e}")))?;
                    let want_n = if off >= size {
                        0
                    } else {
                        len.min(size - off) as usize
                    };
                    prop_assert_eq!(n, want_n, "{}: read length at {}", ctx, off);
                    if n > 0 {
                        let want = &model[off as usize..off as usize + n];
                        ensure_same(&ctx, &buf[..n], want, off)?;
                    }
                }
                Op::Discard { at, len } => {
                    let off = at.resolve(size);
                    img.discard(off, len)
                        .map_err(|e| fail(format!("{ctx}: discard {len} at {off}: {e}")))?;
                    let end = off.saturating_add(len).min(size);
                    model[off as usize..end as usize].fill(0);
                }
                Op::CopyUp { at, len } => {
                    let off = at.resolve(size);
                    img.copy_up(off, len)
                        .map_err(|e| fail(format!("{ctx}: copy_up {len} at {off}: {e}")))?;
                }
                Op::Flush => img.flush().map_err(fail)?,
                Op::Reopen { flush } => {
                    if flush {
                        img.flush().map_err(fail)?;
                    }
                    drop(img);
                    drop(chain);
                    (chain, img) = open(leaf, true, plan.tiny_cache)?;
                }
            }
        }
        if plan.flush_at_close {
            img.flush().map_err(fail)?;
        }
    }

    let leaf = &paths[depth - 1];
    let leaf_sum = common::sha256_file(leaf);

    // A fresh read-only open sees exactly the model, in one read and in
    // reads of an odd size that straddle every kind of boundary.
    let (chain, img) = open(leaf, false, plan.tiny_cache)?;
    prop_assert_eq!(chain.layers.len(), depth);
    prop_assert_eq!(img.size(), size);
    let mut whole = vec![0xA5u8; size as usize];
    let n = img.read_at(0, &mut whole).map_err(fail)?;
    prop_assert_eq!(n as u64, size);
    ensure_same("reopened, whole image", &whole, &model, 0)?;
    let step = (64 << 10) + 7;
    let mut off = 0u64;
    let mut buf = vec![0u8; step];
    while off < size {
        buf.fill(0x5A);
        let n = img.read_at(off, &mut buf).map_err(fail)?;
        prop_assert_eq!(n as u64, step.min((size - off) as usize) as u64);
        ensure_same(
            "reopened, odd-sized reads",
            &buf[..n],
            &model[off as usize..off as usize + n],
            off,
        )?;
        off += n as u64;
    }

    // Export writes the same bytes.
    let out = dir.path().join("flat.raw");
    let opts = chainfs::export::ExportOptions {
        threads: 2,
        ..Default::default()
    };
    let stats = chainfs::export::export(&img, &out, &opts, &|_| {}).map_err(fail)?;
    prop_assert_eq!(stats.virtual_size, size);
    let exported = std::fs::read(&out).map_err(fail)?;
    ensure_same("export", &exported, &model, 0)?;

    // Every layer is structurally sound, and so is the chain.
    for l in &chain.layers {
        let problems = l.check().map_err(fail)?;
        prop_assert!(
            problems.is_empty(),
            "{}: {:?}",
            l.path().display(),
            problems
        );
    }
    drop(img);
    drop(chain);
    let problems = chainfs::check::check_chain(leaf, &ChainOptions::default())
        .map_err(fail)?
        .problems;
    prop_assert!(problems.is_empty(), "check_chain: {:?}", problems);

    // Writes never touched a parent; read-only work never touched the leaf.
    for (p, sum) in &frozen {
        prop_assert_eq!(
            &common::sha256_file(p),
            sum,
            "parent {} changed after its child was created",
            p.display()
        );
    }
    prop_assert_eq!(
        common::sha256_file(leaf),
        leaf_sum,
        "read-only work changed the leaf"
    );
    Ok(())
}

fn pos() -> impl Strategy<Value = Pos> {
    prop_oneof![
        2 => any::<u64>().prop_map(Pos::Any),
        3 => (
            prop::sample::select(vec![9u8, 12, 16, 19, 21]),
            any::<u64>(),
            -1100i64..=1100,
        )
            .prop_map(|(shift, k, delta)| Pos::Near { shift, k, delta }),
    ]
}

fn len() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 1u64..=600,
        3 => 1u64..=9000,
        2 => 1u64..=(600 << 10),
        1 => (1u64 << 20)..=(3 << 20),
    ]
}

fn fill() -> impl Strategy<Value = Fill> {
    prop_oneof![
        6 => any::<u64>().prop_map(Fill::Random),
        2 => Just(Fill::Zeros),
        1 => any::<u8>().prop_map(Fill::Byte),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (pos(), len(), fill()).prop_map(|(at, len, fill)| Op::Write { at, len, fill }),
        1 => (0u64..4096, 1u64..2048).prop_map(|(back, over)| Op::WritePastEnd { back, over }),
        7 => (pos(), len()).prop_map(|(at, len)| Op::Read { at, len }),
        2 => (pos(), len()).prop_map(|(at, len)| Op::Discard { at, len }),
        1 => (pos(), len()).prop_map(|(at, len)| Op::CopyUp { at, len }),
        1 => Just(Op::Flush),
        1 => any::<bool>().prop_map(|flush| Op::Reopen { flush }),
    ]
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        // Any sector count up to 16 MiB: rarely a multiple of a block.
        6 => (1u64..=32768).prop_map(|s| s * SECTOR),
        // Whole MiB: the last block is full for every block size.
        3 => (1u64..=16).prop_map(|m| m << 20),
        // Tiny disks, smaller than one block and than one BAT page.
        1 => (1u64..=64).prop_map(|s| s * SECTOR),
    ]
}

fn plan() -> impl Strategy<Value = Plan> {
    (
        size(),
        any::<bool>(),
        prop::collection::vec(prop::sample::select(BLOCK_SIZES.to_vec()), 5),
        prop::bool::weighted(0.3),
        any::<bool>(),
        prop::collection::vec(prop::collection::vec(op(), 0..10), 1..=5),
    )
        .prop_map(
            |(size, base_fixed, block_sizes, tiny_cache, flush_at_close, steps)| Plan {
                size,
                base_fixed,
                block_sizes,
                tiny_cache,
                flush_at_close,
                steps,
            },
        )
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random chains and operations agree with the `Vec<u8>` model, before
    /// and after reopening, through reads and export; parents never change.
    #[test]
    fn random_chains_match_the_flat_model(plan in plan()) {
        run(&plan)?;
    }
}

// ---------------------------------------------------------------------------
// Hand-written scenarios: the edges the generator must reach, kept as named
// tests so they run on every build even when the random cases miss them.

fn w(at: u64, len: u64, fill: Fill) -> Op {
    Op::Write {
        at: Pos::Any(at),
        len,
        fill,
    }
}

fn r(at: u64, len: u64) -> Op {
    Op::Read {
        at: Pos::Any(at),
        len,
    }
}

fn check(plan: Plan) {
    if let Err(e) = run(&plan) {
        panic!("{e}\n{plan:#?}");
    }
}

/// Zeros written into a child hide the parent's data; sub-sector writes merge
/// with the parent's sector (read-modify-write through the chain).
#[test]
fn zeros_and_partial_sectors_in_a_child_shadow_the_parent() {
    check(Plan {
        size: 1 << 20,
        base_fixed: false,
        block_sizes: vec![4 << 10, 64 << 10],
        tiny_cache: false,
        flush_at_close: true,
        steps: vec![
            vec![w(0, 1 << 20, Fill::Random(1))],
            vec![
                w(4096, 8192, Fill::Zeros),
                w(100, 3, Fill::Byte(7)),
                w(200, 3, Fill::Byte(8)),
                w(1023, 2, Fill::Byte(9)),
                w(1020, 2, Fill::Byte(10)),
                r(0, 20_000),
            ],
        ],
    });
}

/// Writes that straddle block boundaries of layers with different block
/// sizes, on a disk whose last block is partial, read across the end.
#[test]
fn block_straddling_writes_on_a_partial_last_block() {
    let size = (1 << 20) + 3 * 512;
    check(Plan {
        size,
        base_fixed: false,
        block_sizes: vec![2 << 20, 4 << 10, 512 << 10],
        tiny_cache: true,
        flush_at_close: false,
        steps: vec![
            vec![w(4096 - 1, 4098, Fill::Random(2))],
            vec![
                w(8192 - 300, 600, Fill::Random(3)),
                w(size - 700, 700, Fill::Byte(1)),
            ],
            vec![
                w((512 << 10) - 1, 2, Fill::Zeros),
                w(size - 1, 1, Fill::Byte(2)),
                r(size - 5000, 10_000),
                r(size, 10),
            ],
        ],
    });
}

/// A fixed base under differencing children.
#[test]
fn fixed_base_with_two_children() {
    check(Plan {
        size: 3 << 20,
        base_fixed: true,
        block_sizes: vec![0, 2 << 20, 64 << 10],
        tiny_cache: false,
        flush_at_close: true,
        steps: vec![
            vec![w(511, 2 << 20, Fill::Random(4))],
            vec![
                w(1 << 20, 1 << 20, Fill::Zeros),
                Op::Flush,
                w((1 << 20) + 512, 512, Fill::Byte(5)),
                r(1 << 20, 2048),
                Op::Reopen { flush: true },
            ],
            vec![w((1 << 20) + 10, 10, Fill::Byte(3)), r(0, 3 << 20)],
        ],
    });
}

/// The smallest disk: one sector, one BAT entry.
#[test]
fn one_sector_disk() {
    check(Plan {
        size: 512,
        base_fixed: false,
        block_sizes: vec![4 << 10, 4 << 10, 2 << 20],
        tiny_cache: false,
        flush_at_close: true,
        steps: vec![
            vec![w(0, 512, Fill::Random(5))],
            vec![w(3, 4, Fill::Zeros), r(0, 600)],
            vec![
                Op::WritePastEnd { back: 0, over: 1 },
                Op::WritePastEnd { back: 1, over: 1 },
                r(511, 1),
            ],
        ],
    });
}

/// More new blocks in one session than the writer keeps pending before it
/// flushes by itself (5120 blocks of 4 KiB per layer), read back in the same
/// session and after reopening.
#[test]
fn thousands_of_new_blocks_between_flushes() {
    let size = 20 << 20;
    check(Plan {
        size,
        base_fixed: false,
        block_sizes: vec![4 << 10, 4 << 10],
        tiny_cache: false,
        flush_at_close: true,
        steps: vec![
            vec![w(0, size, Fill::Random(6)), r(0, size)],
            vec![
                w(512, size - 1024, Fill::Random(7)),
                r(0, size),
                Op::Reopen { flush: true },
                r(0, size),
            ],
        ],
    });
}

// ---------------------------------------------------------------------------
// Regressions. Each was found by these tests; keep them named.

/// Found on e5a9f7c ("deferred BAT entries made durable by flush"), fixed by
/// 3a590a0 (flush on close): a writable layer closed without an explicit
/// `flush()` forgot every block it allocated since the last flush. The
/// bitmaps and data were written past the old footer, but the BAT entries
/// only lived in memory, so after a reopen a dynamic base read zeros there
/// and a differencing child showed its parent's old bytes instead of what
/// was written. A clean close is not a crash: `chainfs mount -o rw`, `dd`
/// without fsync and `chainfs umount` lost the write the same way (on
/// e5a9f7c nothing flushed on FUSE release or on drop). The random plans
/// now close without a flush too; this is the minimal form.
#[test]
fn writes_into_new_blocks_survive_a_close_without_flush() {
    let dir = scratch();
    let base = dir.path().join("base.vhd");
    let child = dir.path().join("child.vhd");
    create_base(&base, 1 << 20, false, 64 << 10).unwrap();
    {
        let (_c, img) = open(&base, true, false).unwrap();
        img.write_at(0, &[0xAB; 1024]).unwrap();
        img.flush().unwrap();
    }
    let (pc, _) = open(&base, false, false).unwrap();
    let spec = ParentSpec {
        path: &base,
        unique_id: pc.leaf().info().unique_id.unwrap(),
        virtual_size: 1 << 20,
    };
    drop(pc);
    create_child(&child, &spec, 64 << 10).unwrap();
    {
        let (_c, img) = open(&child, true, false).unwrap();
        // New child blocks: one over the parent's data, one over a hole.
        img.write_at(0, &[0xCD; 512]).unwrap();
        img.write_at(256 << 10, &[0xEF; 512]).unwrap();
        let mut b = [0u8; 512];
        img.read_at(0, &mut b).unwrap();
        assert_eq!(b, [0xCD; 512], "the open image sees its own write");
        // Closed here without flush().
    }
    let (_c, img) = open(&child, false, false).unwrap();
    let mut b = [0u8; 512];
    img.read_at(0, &mut b).unwrap();
    assert_eq!(
        b[0], 0xCD,
        "offset 0 after reopen: 0xab is the parent's old byte, the child's write was lost"
    );
    img.read_at(256 << 10, &mut b).unwrap();
    assert_eq!(
        b[0], 0xEF,
        "offset 256 KiB after reopen: the child's write was lost"
    );
}
