//! Reference-model property tests: random chains of every format built
//! with chainfs's own writer, random writes, reads, merges and reopens
//! through `FlatImage` and the CLI, and a `Vec<u8>` that says what every
//! byte of the flat disk must be.
//!
//! A chain is built bottom-up, the way it happens in real life: the base is
//! the leaf first and takes writes, then a differencing child is created on
//! top of it and becomes the leaf, and so on. Each layer therefore holds the
//! writes made while it was the leaf, and every earlier write shows through
//! wherever no later layer covers it. Besides writes and reads, a plan may
//! discard ranges (zeros), copy parent data up into the leaf (no visible
//! change), flush, close and reopen the chain mid-way (and export it from a
//! fresh process), and merge a random legal SOURCE into one of its
//! ancestors with the offline `chainfs merge` (with and without `--keep`):
//! the flat content must not change and the chain loses the merged layers.
//! After the last operation the chain is opened afresh from disk and
//! compared whole (read and `export`), every layer passes its own
//! structural check, and every parent file is byte for byte what it was
//! when it last stopped being the leaf or was last merged into.
//!
//! The formats come from the registry (`chainfs::format::registry`): each
//! case names its base format, and the children are of the base's own
//! format where that format allows itself as a parent (VHD, VHDX), else of
//! the first format that allows the base as a parent. A raw base has none
//! today, so its cases run the steps on the base alone; once a driver lists
//! `raw` in `Driver::parents`, the same cases grow children over the raw
//! base, and merges into it, without a change here.
//!
//! Failures shrink to a small `Plan`; pin each one below as a named `#[test]`
//! calling `run(&plan)`. The proptest regression file is off on purpose: the
//! pinned tests are the record.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use chainfs::format::registry::{self, DRIVERS};
use chainfs::format::vhd::create::{create_base, create_child, ParentSpec};
use chainfs::format::CreateOptions;
use chainfs::{Chain, ChainOptions, ErrorKind, FlatImage};
use common::{Fmt, FORMATS};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};

const SECTOR: u64 = 512;
/// How far past the end random reads may start.
const READ_SLACK: u64 = 8 << 10;

/// Merges `chainfs merge` carried out, and fresh-process exports, over all
/// plans this process ran: the random runs check that they reach both.
static MERGES: AtomicUsize = AtomicUsize::new(0);
static EXPORTS: AtomicUsize = AtomicUsize::new(0);

/// The formats of one chain, by registry name: its base, and its children
/// (`None`: no format takes such a base as its parent, so the chain is the
/// base alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Formats {
    base: &'static str,
    child: Option<&'static str>,
}

impl Formats {
    /// A chain over a `base` base, with children of the format the registry
    /// allows there (the base's own format first).
    fn over(base: &'static str) -> Formats {
        let takes = |d: &&&registry::Driver| d.parents.contains(&base);
        let child = DRIVERS
            .iter()
            .filter(takes)
            .find(|d| d.name == base)
            .or_else(|| DRIVERS.iter().find(takes))
            .map(|d| d.name);
        registry::driver(base).expect("a format of the registry");
        Formats { base, child }
    }

    /// The chain a [`Fmt`] of the test matrix makes.
    fn of(fmt: Fmt) -> Formats {
        Formats::over(fmt.name())
    }

    /// The format of stage `i`'s layer (0: the base).
    fn at(self, i: usize) -> &'static str {
        if i == 0 {
            self.base
        } else {
            self.child.expect("a format that takes this base as parent")
        }
    }

    /// How many stages (layers created one on top of the other) a plan
    /// may have.
    fn max_depth(self) -> usize {
        if self.child.is_some() {
            5
        } else {
            1
        }
    }

    /// The file of stage `i`: named as the test matrix names its formats
    /// (`.avhdx` children), by the registry's first extension otherwise.
    fn file(self, dir: &Path, i: usize) -> PathBuf {
        let stem = format!("layer{i}");
        let format = self.at(i);
        let name = match FORMATS.iter().find(|f| f.name() == format) {
            Some(f) if i > 0 => f.child_name(&stem),
            Some(f) => f.base_name(&stem),
            None => format!("{stem}.{}", registry::driver(format).unwrap().extensions[0]),
        };
        dir.join(name)
    }
}

/// Block sizes a layer of `format` may be given, small ones first so that
/// small disks still span several blocks; 0 is the format's default (the
/// only choice for a format without blocks, or one this test does not
/// know yet).
fn block_sizes(format: &str) -> Vec<u32> {
    match format {
        "vhd" => vec![4 << 10, 64 << 10, 512 << 10, 2 << 20],
        "vhdx" => vec![1 << 20, 2 << 20, 8 << 20],
        // Clusters from the smallest (an L2 table per 32 KiB) to the largest.
        "qcow2" => vec![512, 4 << 10, 64 << 10, 2 << 20],
        _ => vec![0],
    }
}

/// Can `create` make a fixed base of `format`? A qcow2 has no fixed type
/// (`create` refuses it: qemu preallocates instead).
fn creates_fixed(format: &str) -> bool {
    format != "qcow2"
}

/// One random scenario: the chain's formats and shape and what happens
/// while each layer is the leaf.
#[derive(Debug, Clone)]
struct Plan {
    formats: Formats,
    /// Virtual size in bytes, a multiple of 512.
    size: u64,
    /// A fixed (fully allocated) base.
    base_fixed: bool,
    /// Block size of each layer, base first (0: the format's default;
    /// unused for a fixed base).
    block_sizes: Vec<u32>,
    /// Open with a 64 KiB metadata cache (4 KiB per shard), so tables are
    /// evicted and reloaded from disk all the time.
    tiny_cache: bool,
    /// Flush each leaf before closing it (else a clean close must do it).
    flush_at_close: bool,
    /// `steps[i]`: operations after stage `i`'s layer was created (0 = the
    /// base) on top of the leaf of the time. `steps.len()` is how many
    /// layers are created; merges make the chain shorter than that.
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
    /// Close (after a flush, or not: a clean close must keep every write),
    /// export the chain with `chainfs export` in a fresh process, and
    /// reopen it from disk (writable leaf).
    Reopen { flush: bool },
    /// Close the chain and run `chainfs merge SOURCE DESTINATION [--keep]`
    /// for the legal (SOURCE, DESTINATION) pair number `pick` (modulo how
    /// many there are; nothing when the chain has one layer), then reopen
    /// the chain from its leaf (DESTINATION when SOURCE was the leaf).
    Merge { pick: u16, keep: bool },
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

fn data(fill: Fill, len: usize) -> Vec<u8> {
    match fill {
        Fill::Random(seed) => common::Rng(seed).bytes(len),
        Fill::Zeros => vec![0u8; len],
        Fill::Byte(b) => vec![b; len],
    }
}

/// `got` equals `want` (the model from flat offset `base`), or a failure
/// naming `what` and the first difference.
fn ensure_same(what: &str, got: &[u8], want: &[u8], base: u64) -> Result<(), TestCaseError> {
    match common::first_diff(got, want) {
        None => Ok(()),
        Some(d) => Err(fail(format!("{what} (from flat offset {base:#x}): {d}"))),
    }
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

/// The layer files of the open chain, base first.
fn layer_paths(chain: &Chain) -> Vec<PathBuf> {
    chain
        .layers
        .iter()
        .rev()
        .map(|l| std::fs::canonicalize(l.path()).unwrap())
        .collect()
}

/// sha256 of every layer of `live` but the leaf: the files nothing may
/// change until the next merge.
fn freeze(live: &[PathBuf]) -> Vec<(PathBuf, String)> {
    live[..live.len() - 1]
        .iter()
        .map(|p| (p.clone(), common::sha256_file(p)))
        .collect()
}

/// Every (SOURCE, DESTINATION) index pair of `live` (base first) that
/// `chainfs merge` must accept: SOURCE a differencing layer, DESTINATION
/// one of its ancestors, and every child SOURCE's bytes end up under (its
/// child in the chain, or SOURCE itself when it is the leaf, whose place
/// DESTINATION takes) of a format the registry lets have DESTINATION's
/// format as its parent.
fn merge_pairs(formats: &[&str]) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for s in 1..formats.len() {
        let above = formats.get(s + 1).unwrap_or(&formats[s]);
        for d in 0..s {
            if registry::may_have_parent(above, formats[d])
                && registry::may_have_parent(formats[s], formats[d])
            {
                v.push((s, d));
            }
        }
    }
    v
}

/// The format of each file of `live` by the registry's probe.
fn formats_of(live: &[PathBuf]) -> Vec<&'static str> {
    live.iter()
        .map(|p| registry::peek(p).expect("a layer some driver reads").format)
        .collect()
}

/// `chainfs merge` of pair `pick` of [`merge_pairs`] in the closed chain
/// `live`, checked: it succeeds, SOURCE and the layers between leave the
/// chain (deleted, or with `keep` left in place), and the chain opened from
/// its (maybe new) leaf is `live` without them. Updates `live`; returns
/// false when the chain has no legal pair.
fn merge(live: &mut Vec<PathBuf>, pick: u16, keep: bool, ctx: &str) -> Result<bool, TestCaseError> {
    let pairs = merge_pairs(&formats_of(live));
    if pairs.is_empty() {
        return Ok(false);
    }
    let (s, d) = pairs[pick as usize % pairs.len()];
    let (src, dst) = (&live[s], &live[d]);
    let mut args = vec!["merge", common::p(src), common::p(dst)];
    if keep {
        args.push("--keep");
    }
    let o = common::chainfs(&args);
    if !o.status.success() {
        return Err(fail(format!(
            "{ctx}: chainfs {args:?} (exit {}): {}",
            common::code(&o),
            common::text(&o).trim()
        )));
    }
    let gone: Vec<PathBuf> = live.drain(d + 1..=s).collect();
    for g in &gone {
        if g.exists() != keep {
            return Err(fail(format!(
                "{ctx}: after the merge{} {} {}",
                if keep { " --keep" } else { "" },
                g.display(),
                if keep { "is gone" } else { "is still there" }
            )));
        }
    }
    MERGES.fetch_add(1, Ordering::Relaxed);
    let leaf = live.last().unwrap();
    let (chain, _) = open(leaf, false, false)?;
    let now = layer_paths(&chain);
    if now != *live {
        return Err(fail(format!(
            "{ctx}: after merging layer {s} into {d} the chain is {now:?}, not {live:?}"
        )));
    }
    Ok(true)
}

/// Create stage `i`'s layer: the base, or a child of `parent`.
fn create_layer(plan: &Plan, dir: &Path, i: usize, parent: Option<&Path>) -> PathBuf {
    let path = plan.formats.file(dir, i);
    let block = plan.block_sizes[i];
    let o = CreateOptions {
        size: parent.is_none().then_some(plan.size),
        fixed: parent.is_none() && plan.base_fixed,
        block_size: (block != 0).then_some(block as u64),
        logical_sector: 512,
        parent: parent.map(Path::to_path_buf),
        version: None,
        subblocks: false,
    };
    chainfs::format::create(&path, &o).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    std::fs::canonicalize(path).unwrap()
}

/// Run one plan; every check of the module docs.
fn run(plan: &Plan) -> Result<(), TestCaseError> {
    let size = plan.size;
    let stages = plan.steps.len();
    assert!(
        stages >= 1
            && stages <= plan.formats.max_depth()
            && plan.block_sizes.len() >= stages
            && size % SECTOR == 0
            && size > 0
    );
    let dir = common::fast_tempdir();
    let out = dir.path().join("export.raw");

    let mut model = vec![0u8; size as usize];
    // The chain's layers, base first.
    let mut live: Vec<PathBuf> = Vec::new();
    // (parent file, its sha256 when it last stopped being the leaf or was
    // last changed by a merge)
    let mut frozen: Vec<(PathBuf, String)> = Vec::new();

    for (i, ops) in plan.steps.iter().enumerate() {
        let parent = live.last().cloned();
        if let Some(p) = &parent {
            frozen.push((p.clone(), common::sha256_file(p)));
        }
        live.push(create_layer(plan, dir.path(), i, parent.as_deref()));
        let mut leaf = live.last().unwrap().clone();
        let (mut chain, mut img) = open(&leaf, true, plan.tiny_cache)?;
        prop_assert_eq!(layer_paths(&chain), live.clone());
        prop_assert_eq!(img.size(), size);
        for (n, op) in ops.iter().enumerate() {
            let ctx = format!("stage {i} op {n} {op:?}");
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
                    let flat = common::take_export(&leaf, &out).map_err(fail)?;
                    EXPORTS.fetch_add(1, Ordering::Relaxed);
                    ensure_same(&format!("{ctx}: chainfs export"), &flat, &model, 0)?;
                    (chain, img) = open(&leaf, true, plan.tiny_cache)?;
                }
                Op::Merge { pick, keep } => {
                    drop(img);
                    drop(chain);
                    if merge(&mut live, pick, keep, &ctx)? {
                        leaf = live.last().unwrap().clone();
                        frozen = freeze(&live);
                    }
                    (chain, img) = open(&leaf, true, plan.tiny_cache)?;
                    let mut whole = vec![0xA5u8; size as usize];
                    img.read_at(0, &mut whole).map_err(fail)?;
                    ensure_same(&format!("{ctx}: after the merge"), &whole, &model, 0)?;
                }
            }
        }
        if plan.flush_at_close {
            img.flush().map_err(fail)?;
        }
    }

    let leaf = live.last().unwrap();
    let leaf_sum = common::sha256_file(leaf);

    // A fresh read-only open sees exactly the model, in one read and in
    // reads of an odd size that straddle every kind of boundary.
    let (chain, img) = open(leaf, false, plan.tiny_cache)?;
    prop_assert_eq!(layer_paths(&chain), live.clone());
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
            "parent {} changed since it stopped being the leaf (or was merged into)",
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
        2 => (any::<u16>(), any::<bool>()).prop_map(|(pick, keep)| Op::Merge { pick, keep }),
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

fn plan(formats: Formats) -> impl Strategy<Value = Plan> {
    let blocks = |f: Option<&str>| prop::sample::select(block_sizes(f.unwrap_or("")));
    (
        size(),
        any::<bool>(),
        blocks(Some(formats.base)),
        prop::collection::vec(blocks(formats.child), 4),
        prop::bool::weighted(0.3),
        any::<bool>(),
        prop::collection::vec(prop::collection::vec(op(), 0..10), 1..=formats.max_depth()),
    )
        .prop_map(
            move |(
                size,
                base_fixed,
                base_block,
                child_blocks,
                tiny_cache,
                flush_at_close,
                steps,
            )| {
                Plan {
                    formats,
                    size,
                    base_fixed: base_fixed && creates_fixed(formats.base),
                    block_sizes: [vec![base_block], child_blocks].concat(),
                    tiny_cache,
                    flush_at_close,
                    steps,
                }
            },
        )
}

/// Random cases per format (`PROPTEST_CASES` overrides): sized so that a
/// format takes well under a minute on two shared cores.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128)
}

/// Random plans over `formats` agree with the `Vec<u8>` model, before and
/// after reopening and merging, through reads and export; parents never
/// change but by a merge.
fn random_plans(formats: Formats) {
    let mut runner = TestRunner::new(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let (m0, e0) = (
        MERGES.load(Ordering::Relaxed),
        EXPORTS.load(Ordering::Relaxed),
    );
    if let Err(e) = runner.run(&plan(formats), |p| run(&p)) {
        panic!("{formats:?}: {e}");
    }
    let merges = MERGES.load(Ordering::Relaxed) - m0;
    let exports = EXPORTS.load(Ordering::Relaxed) - e0;
    eprintln!(
        "{formats:?}: {} cases, {merges} merges, {exports} exports",
        cases()
    );
    // Nextest runs each test in a process of its own; under `cargo test`
    // other tests add to the counters, which only makes these larger.
    if cases() >= 32 {
        assert!(exports > 0, "{formats:?}: no plan reopened the chain");
        assert!(
            merges > 0 || formats.child.is_none(),
            "{formats:?}: no plan merged"
        );
    }
}

fn random_chains_match_the_flat_model(fmt: Fmt) {
    random_plans(Formats::of(fmt));
}

// ---------------------------------------------------------------------------
// Hand-written scenarios: the edges the generator must reach, kept as named
// tests so they run on every build even when the random cases miss them.
// Those with VHD block sizes (4 KiB..2 MiB) are VHD only; the merge
// scenario runs per format.

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
        formats: Formats::over("vhd"),
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
        formats: Formats::over("vhd"),
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
        formats: Formats::over("vhd"),
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
        formats: Formats::over("vhd"),
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
        formats: Formats::over("vhd"),
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

/// Merges of each kind, with writes between them: a middle layer into its
/// parent with `--keep` (the leaf is relinked past it), the leaf into its
/// parent (which becomes the leaf and takes the next writes), after a
/// reopen the new leaf into the base, and a merge on a one-layer chain
/// (nothing to do).
fn merges_keep_the_flat_content(fmt: Fmt) {
    let size = (3 << 20) + 3 * 512;
    let m = |pick, keep| Op::Merge { pick, keep };
    check(Plan {
        formats: Formats::of(fmt),
        size,
        base_fixed: false,
        block_sizes: vec![fmt.min_block() as u32; 4],
        tiny_cache: false,
        flush_at_close: true,
        steps: vec![
            vec![w(0, 3 << 20, Fill::Random(11))],
            vec![
                w(4096, 1 << 20, Fill::Random(12)),
                Op::Discard {
                    at: Pos::Any(2 << 20),
                    len: 64 << 10,
                },
            ],
            vec![w((1 << 20) - 100, 300, Fill::Byte(1))],
            vec![
                w(10, 10, Fill::Zeros),
                w(size - 512, 512, Fill::Byte(2)),
                // Pairs of four layers: (1,0) (2,0) (2,1) (3,0) (3,1) (3,2).
                m(2, true),
                w(700, 5000, Fill::Random(13)),
                // Of (1,0) (2,0) (2,1): the leaf into its parent.
                m(2, false),
                w(1 << 20, 100, Fill::Byte(3)),
                Op::Reopen { flush: false },
                m(0, false),
                w(100, 100, Fill::Byte(4)),
                m(0, true),
                r(0, size),
            ],
        ],
    });
}

/// A raw base: alone today (no driver lists `raw` among its parents), with
/// children and merges once one does.
mod raw {
    use super::*;

    #[test]
    fn random_chains_match_the_flat_model() {
        random_plans(Formats::over("raw"));
    }

    /// Writes, a discard, a reopen with a fresh-process export and merges
    /// on a raw base: alone today, so the merges find nothing to do; over
    /// children once a format takes a raw parent.
    #[test]
    fn writes_discards_merges_and_reopens_on_a_raw_base() {
        let formats = Formats::over("raw");
        let stages = formats.max_depth().min(3);
        let mut steps = vec![vec![
            w(0, 1 << 20, Fill::Random(21)),
            Op::Discard {
                at: Pos::Any(4096),
                len: 10_000,
            },
            Op::Reopen { flush: false },
            r(0, 2 << 20),
        ]];
        for i in 1..stages {
            steps.push(vec![
                w(i as u64 * 3000, 9000, Fill::Random(22 + i as u64)),
                Op::Merge {
                    pick: i as u16,
                    keep: i % 2 == 0,
                },
            ]);
        }
        steps[stages - 1].extend([
            Op::Merge {
                pick: 0,
                keep: false,
            },
            r(0, 2 << 20),
        ]);
        check(Plan {
            formats,
            size: (2 << 20) + 512,
            base_fixed: false,
            block_sizes: vec![0; stages],
            tiny_cache: false,
            flush_at_close: false,
            steps,
        });
    }
}

per_format! {
    random_chains_match_the_flat_model();
    merges_keep_the_flat_content();
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
    let dir = common::fast_tempdir();
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

/// Found by `vhdx::random_chains_match_the_flat_model` on b9d4b25: a write
/// into a block that a whole-block discard had made ZERO in a differencing
/// VHDX allocated the block PARTIALLY_PRESENT with only the written sectors'
/// bits set, so every other sector of the block showed the parent again
/// (here the base's 0x01 bytes from 0x2924f4 on) instead of the discard's
/// zeros: at once, and after the close and reopen. The driver now gives a
/// block that read as zeros a FULLY_PRESENT region of zeros. Shrunk input:
/// a 4 MiB disk of 1 MiB blocks; the base takes 0x01 bytes over
/// 0x2924f4..0x300001; the child discards 0x14b000..0x400000 (blocks 2 and
/// 3 whole) and writes 537 bytes at 0x1ffde8, whose last byte lands in
/// block 2. VHD, which has no ZERO state (a discarded child block is a
/// block with every bit set), runs the same steps.
fn write_after_discard_plan(format: &'static str) -> Plan {
    Plan {
        formats: Formats::over(format),
        size: 4 << 20,
        base_fixed: false,
        block_sizes: vec![1 << 20; 5],
        tiny_cache: false,
        flush_at_close: false,
        steps: vec![
            vec![Op::Write {
                at: Pos::Any(12538215144270406900),
                len: 449293,
                fill: Fill::Byte(1),
            }],
            vec![
                Op::Discard {
                    at: Pos::Near {
                        shift: 9,
                        k: 2846769266438898674,
                        delta: 0,
                    },
                    len: 2838528,
                },
                Op::Write {
                    at: Pos::Any(2653483253823962600),
                    len: 537,
                    fill: Fill::Random(0),
                },
            ],
        ],
    }
}

#[test]
fn vhdx_write_into_a_discarded_child_block_keeps_its_zeros() {
    check(write_after_discard_plan("vhdx"));
}

#[test]
fn vhd_write_into_a_discarded_child_block_keeps_its_zeros() {
    check(write_after_discard_plan("vhd"));
}
