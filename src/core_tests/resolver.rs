//! The resolver (`crate::image`) against the hand-resolved model.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use proptest::prelude::*;

use super::{build, chain_of, model, read_all, Spec, BS, SS};
use crate::error::ErrorKind;
use crate::format::mem::{Calls, MemLayer, Sector};
use crate::format::Layer;
use crate::image::{FlatImage, Source};

/// Every `(offset, len)` read of `image` equals the model's bytes.
fn assert_reads(image: &FlatImage, want: &[u8], reads: &[(u64, usize)]) {
    for &(off, len) in reads {
        let mut buf = vec![0xEEu8; len];
        let n = image.read_at(off, &mut buf).unwrap();
        let start = (off as usize).min(want.len());
        let end = (off as usize + len).min(want.len());
        assert_eq!(n, end - start, "length at {off}+{len}");
        assert!(
            buf[..n] == want[start..end],
            "bytes differ reading {len} at {off}"
        );
    }
}

/// Reads at odd offsets and lengths, across blocks and layer changes.
const ODD_READS: &[(u64, usize)] = &[
    (0, 16 * SS as usize),
    (1, 1),
    (511, 2),
    (700, 3000),
    (2047, 1),
    (2047, 1026),
    (3 * 512 + 17, 5000),
    (4095, 4097),
];

#[test]
fn runs_across_layers_zero_fill_and_parent_fall_through() {
    let dir = tempfile::tempdir().unwrap();
    let specs = [
        Spec::of("d..zd...dd.....d", 1),
        Spec::of(".dd.zz.dddddd...", 2),
        Spec::of("dddddd.z...ddd..", 3),
    ];
    let layers = build(dir.path(), &specs, BS, |_| false);
    let image = FlatImage::new(&chain_of(&layers));
    let want = model(&specs);
    assert_eq!(read_all(&image), want);
    assert_reads(&image, &want, ODD_READS);
    // Sector 6: nobody holds it; sector 1: the middle layer holds it.
    assert_eq!(image.resolve(6 * SS, SS).unwrap(), (Source::Zero, SS));
    assert!(matches!(
        image.resolve(SS, 4 * SS).unwrap(),
        (Source::Data { depth: 1, .. }, n) if n == 2 * SS
    ));
}

#[test]
fn zero_in_a_child_hides_parent_data() {
    let dir = tempfile::tempdir().unwrap();
    let specs = [Spec::of("zz.z", 1), Spec::of("dddd", 2)];
    let layers = build(dir.path(), &specs, BS, |_| false);
    let image = FlatImage::new(&chain_of(&layers));
    let flat = read_all(&image);
    assert_eq!(flat, model(&specs));
    assert!(flat[..2 * SS as usize].iter().all(|&b| b == 0));
    assert!(flat[2 * SS as usize..3 * SS as usize]
        .iter()
        .all(|&b| b != 0));
    // The zero run is decided in the child: the parent's data is not read.
    let before = Calls::get(&layers[1].calls.read_data);
    let mut buf = vec![1u8; 2 * SS as usize];
    image.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, vec![0u8; 2 * SS as usize]);
    assert_eq!(Calls::get(&layers[1].calls.read_data), before);
}

#[test]
fn reads_past_the_end_are_short_then_empty() {
    let dir = tempfile::tempdir().unwrap();
    let specs = [Spec::of("d.d.", 1), Spec::of("dddd", 2)];
    let image = FlatImage::new(&chain_of(&build(dir.path(), &specs, BS, |_| false)));
    let size = image.size();
    let mut buf = vec![0u8; 4096];
    assert_eq!(image.read_at(size - 100, &mut buf).unwrap(), 100);
    assert_eq!(buf[..100], model(&specs)[size as usize - 100..]);
    assert_eq!(image.read_at(size, &mut buf).unwrap(), 0);
    assert_eq!(image.read_at(size + 12345, &mut buf).unwrap(), 0);
}

#[test]
fn chain_of_64_layers_reads_each_layers_own_sector() {
    let dir = tempfile::tempdir().unwrap();
    // Layer i holds sector i only; sector 64 is nobody's.
    let specs: Vec<Spec> = (0..64)
        .map(|i| {
            let pic: String = (0..65).map(|k| if k == i { 'd' } else { '.' }).collect();
            Spec::of(&pic, i as u8)
        })
        .collect();
    let layers = build(dir.path(), &specs, BS, |_| false);
    let image = FlatImage::new(&chain_of(&layers));
    let want = model(&specs);
    assert_eq!(read_all(&image), want);
    assert_reads(&image, &want, ODD_READS);
    // A read the leaf answers asks no other layer.
    let image = FlatImage::new(&chain_of(&layers));
    let calls = || -> Vec<u64> { layers.iter().map(|l| Calls::get(&l.calls.map)).collect() };
    let before = calls();
    image.read_at(0, &mut [0u8; 100]).unwrap();
    let after = calls();
    assert_eq!(after[0], before[0] + 1);
    for (k, (a, b)) in after.iter().zip(&before).enumerate().skip(1) {
        assert_eq!(a, b, "layer {k}");
    }
    // Depth costs nothing once a run is resolved: reading the sector the
    // base holds again (and inside it) asks no layer at all.
    let mut buf = [0u8; 100];
    image.read_at(63 * SS, &mut buf).unwrap();
    let before = calls();
    image.read_at(63 * SS + 7, &mut buf).unwrap();
    assert_eq!(buf[..], want[63 * SS as usize + 7..][..100]);
    assert_eq!(calls(), before);
}

#[test]
fn partial_sector_writes_merge_with_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let specs = [Spec::of("....z...", 1), Spec::of("dddddddd", 2)];
    let layers = build(dir.path(), &specs, BS, |i| i == 0);
    let image = FlatImage::new(&chain_of(&layers));
    let mut want = model(&specs);
    for (off, len, v) in [
        (10u64, 3usize, 0xA1u8), // inside one sector
        (500, 30, 0xA2),         // across two sectors
        (1000, 1200, 0xA3),      // head, whole sectors, tail
        (2 * SS, SS as usize, 0xA4),
        (4 * SS + 7, 1, 0xA5), // into a zero sector
        (8 * SS - 1, 1, 0xA6), // the last byte
    ] {
        let data = vec![v; len];
        image.write_at(off, &data).unwrap();
        want[off as usize..off as usize + len].copy_from_slice(&data);
        assert_eq!(read_all(&image), want, "after writing {len} at {off}");
    }
    // Only the leaf took writes; the parent still reads as before.
    assert_eq!(Calls::get(&layers[1].calls.write_sectors), 0);
    let err = image.write_at(8 * SS - 1, &[1, 2]).unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidArgument);
}

#[test]
fn discard_zeroes_partial_and_whole_sectors_over_parent_data() {
    let dir = tempfile::tempdir().unwrap();
    let specs = [Spec::of("d.d.d...", 1), Spec::of("dddddddd", 2)];
    let layers = build(dir.path(), &specs, BS, |i| i == 0);
    let image = FlatImage::new(&chain_of(&layers));
    let mut want = model(&specs);
    image.discard(300, 3 * SS).unwrap();
    want[300..300 + 3 * SS as usize].fill(0);
    assert_eq!(read_all(&image), want);
    // Whole sectors 1-2 went to the leaf's discard, the edges were written.
    assert_eq!(Calls::get(&layers[0].calls.discard), 1);
    // Past the end is clipped, not an error.
    image.discard(7 * SS + 5, 10 * SS).unwrap();
    want[7 * SS as usize + 5..].fill(0);
    assert_eq!(read_all(&image), want);
}

#[test]
fn flush_reaches_the_leaf_and_read_only_leaf_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let specs = [Spec::of("d...", 1), Spec::of("dddd", 2)];
    let layers = build(dir.path(), &specs, BS, |_| false);
    let image = FlatImage::new(&chain_of(&layers));
    image.flush().unwrap();
    assert_eq!(Calls::get(&layers[0].calls.flush), 1);
    assert_eq!(Calls::get(&layers[1].calls.flush), 0);
    let err = image.write_at(0, &[0u8; 512]).unwrap_err();
    assert_eq!(err.kind, ErrorKind::ReadOnly);
    assert_eq!(read_all(&image), model(&specs));
}

#[test]
fn copy_up_stores_parent_data_in_the_leaf_without_changing_reads() {
    let dir = tempfile::tempdir().unwrap();
    let specs = [Spec::of("d.z.....", 1), Spec::of(".ddd.d..", 2)];
    let layers = build(dir.path(), &specs, BS, |i| i == 0);
    let image = FlatImage::new(&chain_of(&layers));
    let want = model(&specs);
    image.copy_up(0, 8 * SS).unwrap();
    assert_eq!(read_all(&image), want);
    // The parent's sectors now come from the leaf; its Zero stays zero.
    for k in [1u64, 3, 5] {
        assert!(matches!(
            image.resolve(k * SS, SS).unwrap().0,
            Source::Data { depth: 0, .. }
        ));
    }
    assert_eq!(image.resolve(2 * SS, SS).unwrap().0, Source::Zero);
}

#[test]
fn copy_up_stores_encoded_parent_data_decoded_in_the_leaf() {
    let dir = tempfile::tempdir().unwrap();
    let specs = [
        Spec::of("d.......", 1),
        Spec::of(".dd.....", 2),
        Spec::of("..dddd..", 3),
    ];
    let layers = build(dir.path(), &specs, BS, |i| i == 0);
    // The middle layer holds its data encoded (like qcow2 compressed
    // clusters); the base stores it plainly.
    layers[1].set_encoded(true);
    let image = FlatImage::new(&chain_of(&layers));
    let want = model(&specs);
    assert_eq!(read_all(&image), want);
    assert!(matches!(
        image.resolve(SS, SS).unwrap().0,
        Source::Encoded { depth: 1 }
    ));
    image.copy_up(0, 8 * SS).unwrap();
    assert_eq!(read_all(&image), want);
    // Encoded (1, 2) and plain (3, 4, 5) parent sectors now come from the
    // leaf, decoded.
    for k in 1u64..6 {
        assert!(
            matches!(
                image.resolve(k * SS, SS).unwrap().0,
                Source::Data { depth: 0, .. }
            ),
            "sector {k}"
        );
    }
    let before = Calls::get(&layers[1].calls.map);
    let mut buf = vec![0u8; 2 * SS as usize];
    image.read_at(SS, &mut buf).unwrap();
    assert_eq!(buf, want[SS as usize..3 * SS as usize]);
    assert_eq!(
        Calls::get(&layers[1].calls.map),
        before,
        "not asked any more"
    );
}

#[test]
fn will_need_advises_each_layer_of_the_data_runs_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    // The leaf's zeros hide base sectors 4-5; sector 7 is nobody's.
    let specs = [Spec::of("dd..zz..", 1), Spec::of("dddddd.d", 2)];
    let layers = build(dir.path(), &specs, BS, |_| false);
    let dyn_layers: Vec<Arc<dyn Layer>> = layers.iter().map(|l| l.clone() as _).collect();
    let fo = |l: &MemLayer, k: u64| match l.map(k * SS, SS).unwrap() {
        crate::format::Extent::Data { file_offset, .. } => file_offset,
        e => panic!("sector {k}: {e:?}"),
    };
    crate::image::will_need(&dyn_layers, 0, 0, 8 * SS);
    assert_eq!(
        *layers[0].calls.advised.lock(),
        vec![(fo(&layers[0], 0), 2 * SS)]
    );
    // `build` stores blocks last first: base block 1 lies before block 0
    // in its file, so sectors 2-3 and 7 are two advices.
    assert_eq!(
        *layers[1].calls.advised.lock(),
        vec![(fo(&layers[1], 2), 2 * SS), (fo(&layers[1], 7), SS)]
    );
    // From layer 1 down (its view): all of its data, as stored.
    layers[1].calls.advised.lock().clear();
    crate::image::will_need(&dyn_layers, 1, 0, 8 * SS);
    assert_eq!(
        *layers[1].calls.advised.lock(),
        vec![
            (fo(&layers[1], 0), 4 * SS),
            (fo(&layers[1], 4), 2 * SS),
            (fo(&layers[1], 7), SS)
        ]
    );
    assert_eq!(layers[0].calls.advised.lock().len(), 1, "leaf not asked");
}

/// The advice `image::will_need` gives over the whole of `base`, a chain
/// of that one layer: (file offset, length) in order.
fn advice_over(base: MemLayer) -> Vec<(u64, u64)> {
    let size = base.virtual_size();
    let base = Arc::new(base);
    let layers: Vec<Arc<dyn Layer>> = vec![base.clone()];
    crate::image::will_need(&layers, 0, 0, size);
    let advised = base.calls.advised.lock().clone();
    advised
}

#[test]
fn will_need_joins_contiguous_runs_and_splits_long_ones() {
    const MIB: u64 = 1 << 20;
    let base = MemLayer::new("/nonexistent/b.mem", 6 * MIB, MIB, SS as u32);
    // Stored in virtual order: one contiguous 5 MiB run in the file.
    base.put(0, &vec![3u8; 5 * MIB as usize]);
    let h = crate::format::mem::HEADER;
    assert_eq!(
        advice_over(base),
        vec![(h, 2 * MIB), (h + 2 * MIB, 2 * MIB), (h + 4 * MIB, MIB)]
    );
}

#[test]
fn will_need_leaves_long_contiguous_runs_to_the_kernel() {
    const MIB: u64 = 1 << 20;
    let base = MemLayer::new("/nonexistent/b.mem", 32 * MIB, MIB, SS as u32);
    // 7 MiB at 16 MiB written first (file slots 0-6), then 10 MiB at 0
    // (slots 7-16): two runs, apart in the file.
    base.put(16 * MIB, &vec![4u8; 7 * MIB as usize]);
    base.put(0, &vec![3u8; 10 * MIB as usize]);
    let h = crate::format::mem::HEADER;
    // The kernel's read-ahead reads the 10 MiB run better than advice; the
    // shorter one is advised.
    assert_eq!(
        advice_over(base),
        vec![
            (h, 2 * MIB),
            (h + 2 * MIB, 2 * MIB),
            (h + 4 * MIB, 2 * MIB),
            (h + 6 * MIB, MIB)
        ]
    );
}

#[test]
fn mem_layer_runs_stop_at_block_and_state_changes() {
    use crate::format::Extent;
    let l = MemLayer::new("/nonexistent/x.mem", 16 * SS, BS, SS as u32);
    l.set(0, 3 * SS, Sector::Zero);
    l.put(3 * SS, &[7u8; 3 * SS as usize]);
    assert_eq!(l.map(0, 16 * SS).unwrap(), Extent::Zero { len: 3 * SS });
    // Data from sector 3 stops at the block end (sector 4).
    assert!(matches!(l.map(3 * SS, 16 * SS).unwrap(), Extent::Data { len, .. } if len == SS));
    assert_eq!(
        l.map(6 * SS, 16 * SS).unwrap(),
        Extent::Parent { len: 2 * SS }
    );
    assert_eq!(l.map(9 * SS, 3).unwrap(), Extent::Parent { len: 3 });
    assert_eq!(l.calls.map.load(Ordering::Relaxed), 4);
}

/// One step of the property test.
#[derive(Debug, Clone)]
enum Op {
    Read(u64, usize),
    Write(u64, usize, u8),
    Discard(u64, u64),
}

fn layers_strategy() -> impl Strategy<Value = (u64, Vec<Spec>)> {
    // 1-6 layers of 1-24 sectors; blocks of 1, 2, 4 or 8 sectors.
    (1usize..=24, 1usize..=6, 0u32..4).prop_flat_map(|(n, depth, b)| {
        let state = prop_oneof![
            2 => Just(Sector::Absent),
            1 => Just(Sector::Zero),
            2 => Just(Sector::Data),
        ];
        let spec = (proptest::collection::vec(state, n), any::<u8>()).prop_map(|(states, seed)| {
            let mut s = Spec::of(&".".repeat(states.len()), seed);
            s.states = states;
            s
        });
        (
            Just(SS << b),
            proptest::collection::vec(spec, depth..=depth),
        )
    })
}

fn op_strategy(size: u64) -> impl Strategy<Value = Op> {
    let at = 0..size + 600;
    prop_oneof![
        3 => (at.clone(), 0usize..3000).prop_map(|(o, n)| Op::Read(o, n)),
        2 => (0..size, 1usize..2000, 1u8..)
            .prop_map(move |(o, n, v)| Op::Write(o, n.min((size - o) as usize), v)),
        1 => (at, 0u64..3000).prop_map(|(o, n)| Op::Discard(o, n)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Random layers, then random reads, writes and discards through the
    /// resolver: every read equals a `Vec<u8>` model of the flat disk (so a
    /// run the cache kept past a write that changed it fails here).
    #[test]
    fn resolver_matches_model(
        (block, specs, ops) in layers_strategy().prop_flat_map(|(block, specs)| {
            let size = specs[0].states.len() as u64 * SS;
            (Just(block), Just(specs), proptest::collection::vec(op_strategy(size), 1..20))
        }),
        shift in 9u32..=13,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let layers = build(dir.path(), &specs, block, |i| i == 0);
        // Run-cache granules of 1 to 16 sectors: runs meet granule edges.
        let image = FlatImage::new(&chain_of(&layers)).with_granule_shift(shift);
        let mut want = model(&specs);
        prop_assert_eq!(read_all(&image), want.clone());
        for op in ops {
            match op {
                Op::Read(off, len) => assert_reads(&image, &want, &[(off, len)]),
                Op::Write(off, len, v) => {
                    image.write_at(off, &vec![v; len]).unwrap();
                    want[off as usize..off as usize + len].fill(v);
                }
                Op::Discard(off, len) => {
                    image.discard(off, len).unwrap();
                    let end = (off + len).min(want.len() as u64) as usize;
                    if (off as usize) < end {
                        want[off as usize..end].fill(0);
                    }
                }
            }
        }
        prop_assert_eq!(read_all(&image), want);
    }
}

/// A reader's walk passes the leaf (which does not hold sector 0), then a
/// write puts sector 0 into the leaf before the walk reaches the base: the
/// run the reader found (the base's) must not stay in the cache, or every
/// later read shows the old bytes (`crate::runs`: the epoch check).
#[test]
fn a_walk_that_began_before_a_write_keeps_no_run() {
    use std::sync::Barrier;
    let dir = tempfile::tempdir().unwrap();
    let specs = [Spec::of("....", 1), Spec::of("dddd", 2)];
    let layers = build(dir.path(), &specs, BS, |i| i == 0);
    let image = FlatImage::new(&chain_of(&layers));
    let want = model(&specs);
    let walked = Arc::new(Barrier::new(2));
    let written = Arc::new(Barrier::new(2));
    let once = std::sync::atomic::AtomicBool::new(true);
    let (w1, w2) = (walked.clone(), written.clone());
    *layers[1].on_map.lock() = Some(Box::new(move || {
        if once.swap(false, Ordering::SeqCst) {
            w1.wait();
            w2.wait();
        }
    }));
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut buf = vec![0u8; SS as usize];
            image.read_at(0, &mut buf).unwrap();
            buf
        });
        walked.wait();
        image.write_at(0, &[0x5A; SS as usize]).unwrap();
        written.wait();
        // The racing read may show either content, as reads racing a write may.
        let got = reader.join().unwrap();
        assert!(got == want[..SS as usize] || got.iter().all(|&b| b == 0x5A));
    });
    let mut buf = vec![0u8; SS as usize];
    image.read_at(0, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0x5A),
        "read {:#x} after the write",
        buf[0]
    );
}

/// A chain whose leaf takes writes, over a base holding every sector,
/// with a staging pool (`crate::staging`).
fn staged(dir: &std::path::Path) -> (Vec<Spec>, FlatImage) {
    let specs = vec![Spec::of("d..zd...", 1), Spec::of("dddddddd", 2)];
    let layers = build(dir, &specs, BS, |i| i == 0);
    let image = FlatImage::new(&chain_of(&layers)).with_staging(4 << 20);
    (specs, image)
}

#[test]
fn staged_reads_equal_the_model_and_come_from_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let (specs, image) = staged(dir.path());
    let size = image.size();
    assert_eq!(image.stage_ahead(0, size), size);
    assert_eq!(read_all(&image), model(&specs));
    assert_eq!(image.staged_served(), size, "not read from the pool");
    // Read to its end, the chunk left the pool: read again, the same
    // bytes come the ordinary way.
    assert_eq!(read_all(&image), model(&specs));
    assert_eq!(image.staged_served(), size);
}

#[test]
fn a_write_drops_what_was_staged_under_it() {
    let dir = tempfile::tempdir().unwrap();
    let (specs, image) = staged(dir.path());
    let size = image.size();
    image.stage_ahead(0, size);
    // Wait for the load with a read of the last byte, which leaves the
    // chunk staged (it is not read to its end).
    let mut one = [0u8; 1];
    image.read_at(size - 1, &mut one).unwrap();
    assert_eq!(image.staged_served(), 1);
    let new = vec![0x5Au8; 3 * SS as usize];
    image.write_at(SS, &new).unwrap();
    let mut want = model(&specs);
    want[SS as usize..4 * SS as usize].copy_from_slice(&new);
    assert_eq!(
        read_all(&image),
        want,
        "bytes staged before the write served after it"
    );
}
