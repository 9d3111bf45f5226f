//! The merge planner and engine (`crate::merge`) over in-memory layers.
//!
//! The engine reopens a read-only layer through `open_layer` (a real file
//! and format), so the layers a merge writes (SOURCE's child, SOURCE ..
//! DESTINATION) are built writable here; `reopen_writable` then keeps them.
//! The layer files are real (empty) files in a temporary folder: the intent
//! record is written next to SOURCE and merged layers are deleted.

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use proptest::prelude::*;

use super::{build, chain_of, model, read_all, Spec, BS};
use crate::error::ErrorKind;
use crate::format::mem::{Calls, MemLayer, Sector};
use crate::format::Layer;
use crate::image::{FlatImage, Layers};
use crate::merge::{execute, plan, Caller, MergeRequest, Progress};

fn req(source: &str, destination: &str, keep: bool) -> MergeRequest {
    MergeRequest {
        source: source.into(),
        destination: destination.into(),
        keep,
        force: false,
        parent_dirs: Vec::new(),
    }
}

fn layers_of(ls: &[Arc<MemLayer>]) -> Layers {
    ls.iter().map(|l| l.clone() as Arc<dyn Layer>).collect()
}

fn specs() -> Vec<Spec> {
    vec![
        Spec::of("d...z..d.....d..", 1),
        Spec::of(".dd.zz.dddddd...", 2),
        Spec::of("d..z.ddd.z..dd..", 3),
        Spec::of("..dddd...dddd..z", 4),
        Spec::of("ddddddddddddddd.", 5),
    ]
}

#[test]
fn plan_refuses_a_destination_that_is_not_an_ancestor() {
    let dir = tempfile::tempdir().unwrap();
    let ls = build(dir.path(), &specs()[..3], BS, |_| false);
    for (s, d) in [("l2.mem", "l0.mem"), ("l1.mem", "l1.mem")] {
        let e = plan(layers_of(&ls), &req(s, d, false), None).err().unwrap();
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "{s} into {d}");
        assert!(e.to_string().contains("is not an ancestor"), "{e}");
        assert!(e.to_string().contains("l0.mem -> l1.mem -> l2.mem"), "{e}");
    }
}

#[test]
fn plan_names_layers_by_file_name_or_path() {
    let dir = tempfile::tempdir().unwrap();
    let ls = build(dir.path(), &specs()[..3], BS, |_| false);
    let full = ls[2].path().display().to_string();
    let p = plan(layers_of(&ls), &req("l0.mem", &full, false), None).unwrap();
    assert_eq!((p.s, p.d), (0, 2));
    assert!(p.extra_children.is_empty());
    let bad = [
        (
            "nope.mem",
            ErrorKind::NotFound,
            "no layer of this chain has that name",
        ),
        ("/no/such/x.mem", ErrorKind::NotFound, "no such file"),
    ];
    for (name, kind, says) in bad {
        let e = plan(layers_of(&ls), &req(name, "l2.mem", false), None)
            .err()
            .unwrap();
        assert_eq!(e.kind, kind, "{name}");
        assert!(e.to_string().contains(says), "{e}");
    }
    // A real file that is not in the chain.
    let other = dir.path().join("other.mem");
    std::fs::write(&other, b"").unwrap();
    let e = plan(
        layers_of(&ls),
        &req("l0.mem", other.to_str().unwrap(), false),
        None,
    )
    .err()
    .unwrap();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("not a layer of this chain"), "{e}");
}

#[test]
fn plan_refuses_a_name_two_layers_share() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let base = Arc::new(MemLayer::new(b.path().join("l0.mem"), 4 * 512, BS, 512));
    std::fs::write(base.path(), b"").unwrap();
    let ls = build(a.path(), &[Spec::of("d...", 1)], BS, |_| false);
    let leaf = Arc::new(MemLayer::new(ls[0].path(), 4 * 512, BS, 512).child_of(base.as_ref()));
    let e = plan(
        layers_of(&[leaf, base]),
        &req("l0.mem", "l0.mem", false),
        None,
    )
    .err()
    .unwrap();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(
        e.to_string().contains("several layers have that name"),
        "{e}"
    );
}

#[test]
fn plan_for_a_caller_checks_write_access() {
    let dir = tempfile::tempdir().unwrap();
    let ls = build(dir.path(), &specs()[..3], BS, |_| false);
    std::fs::set_permissions(ls[2].path(), std::fs::Permissions::from_mode(0o444)).unwrap();
    let nobody = Caller {
        uid: 65534,
        gid: 65534,
    };
    let e = plan(layers_of(&ls), &req("l1.mem", "l2.mem", true), Some(nobody))
        .err()
        .unwrap();
    assert_eq!(e.kind, ErrorKind::AccessDenied);
    assert!(e.to_string().contains("may not write"), "{e}");
    let root = Caller { uid: 0, gid: 0 };
    plan(layers_of(&ls), &req("l1.mem", "l2.mem", true), Some(root)).unwrap();
}

/// Merge `source` into `destination` of a chain over `specs`; `writable`
/// picks the layers built writable. Returns the layers, whose `map` and
/// `read_data` counters count the merge's calls only, and the image.
fn merged(
    dir: &std::path::Path,
    specs: &[Spec],
    s: usize,
    d: usize,
    keep: bool,
    writable: impl Fn(usize) -> bool,
) -> (Vec<Arc<MemLayer>>, FlatImage) {
    let ls = build(dir, specs, BS, writable);
    let image = FlatImage::new(&chain_of(&ls));
    assert_eq!(read_all(&image), model(specs));
    let p = plan(
        image.layers(),
        &req(&format!("l{s}.mem"), &format!("l{d}.mem"), keep),
        None,
    )
    .unwrap();
    for l in &ls {
        l.calls.map.store(0, Ordering::Relaxed);
        l.calls.read_data.store(0, Ordering::Relaxed);
    }
    let progress = Progress::default();
    execute(&image, p, &progress).unwrap();
    assert_eq!(progress.percent(), 100);
    assert!(
        !crate::intent::path_for(ls[s].path()).exists(),
        "record left"
    );
    (ls, image)
}

fn paths(layers: &Layers) -> Vec<String> {
    layers
        .iter()
        .map(|l| l.path().file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn merge_below_the_leaf_keeps_the_bytes_and_relinks_the_child() {
    let dir = tempfile::tempdir().unwrap();
    let specs = specs();
    let (ls, image) = merged(dir.path(), &specs, 1, 3, false, |i| i <= 3);
    // Nothing below DESTINATION nor above SOURCE was asked or written.
    assert_eq!(Calls::get(&ls[4].calls.map), 0);
    assert_eq!(Calls::get(&ls[0].calls.map), 0);
    assert_eq!(Calls::get(&ls[0].calls.write_sectors), 0);
    assert_eq!(read_all(&image), model(&specs));
    assert_eq!(paths(&image.layers()), ["l0.mem", "l3.mem", "l4.mem"]);
    // The child now names DESTINATION; the merged files are gone.
    assert_eq!(ls[0].parent().unwrap().ids, vec![ls[3].id()]);
    assert_eq!(Calls::get(&ls[0].calls.set_parent), 1);
    assert!(!ls[1].path().exists() && !ls[2].path().exists());
    assert!(Calls::get(&ls[3].calls.flush) >= 1);
    // DESTINATION alone now shows what l1..l3 showed over it.
    let sub = FlatImage::new(&chain_of(&ls[3..]));
    assert_eq!(read_all(&sub), model(&specs[1..]));
}

#[test]
fn merge_with_keep_detaches_the_merged_layers() {
    let dir = tempfile::tempdir().unwrap();
    let specs = specs();
    let (ls, image) = merged(dir.path(), &specs, 1, 3, true, |i| i <= 3);
    assert_eq!(read_all(&image), model(&specs));
    for l in &ls[1..3] {
        assert!(l.path().exists());
        assert_eq!(Calls::get(&l.calls.detach), 1);
        assert!(l.parent().unwrap().detached);
    }
}

#[test]
fn merge_of_the_writable_leaf_makes_destination_the_leaf() {
    let dir = tempfile::tempdir().unwrap();
    let specs = specs();
    let (ls, image) = merged(dir.path(), &specs, 0, 2, false, |i| i <= 2);
    let mut want = model(&specs);
    assert_eq!(read_all(&image), want);
    assert_eq!(paths(&image.layers()), ["l2.mem", "l3.mem", "l4.mem"]);
    // Writes go to DESTINATION now.
    let before = Calls::get(&ls[2].calls.write_sectors);
    image.write_at(100, &[7u8; 1000]).unwrap();
    want[100..1100].fill(7);
    assert_eq!(read_all(&image), want);
    assert!(Calls::get(&ls[2].calls.write_sectors) > before);
}

#[test]
fn cancelled_merge_leaves_the_chain_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let specs = specs();
    let ls = build(dir.path(), &specs, BS, |i| i <= 3);
    let image = FlatImage::new(&chain_of(&ls));
    let before = paths(&image.layers());
    let p = plan(image.layers(), &req("l1.mem", "l3.mem", false), None).unwrap();
    let progress = Progress::default();
    progress.cancel.store(true, Ordering::Relaxed);
    let e = execute(&image, p, &progress).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidState);
    assert_eq!(paths(&image.layers()), before);
    assert_eq!(read_all(&image), model(&specs));
    assert!(ls.iter().all(|l| l.path().exists()));
    assert!(!crate::intent::path_for(ls[1].path()).exists());
    assert_eq!(Calls::get(&ls[0].calls.set_parent), 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Any merge of random layers reads byte-identical before and after.
    #[test]
    fn merges_keep_the_flat_bytes(
        (specs, s, d, keep) in (2usize..=5, 1usize..=12).prop_flat_map(|(depth, n)| {
            let state = prop_oneof![Just(Sector::Absent), Just(Sector::Zero), Just(Sector::Data)];
            let spec = (proptest::collection::vec(state, n), any::<u8>()).prop_map(|(st, seed)| {
                let mut sp = Spec::of(&".".repeat(st.len()), seed);
                sp.states = st;
                sp
            });
            (proptest::collection::vec(spec, depth..=depth), 0..depth - 1)
                .prop_flat_map(move |(specs, s)| (Just(specs), Just(s), s + 1..depth, any::<bool>()))
        })
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (_, image) = merged(dir.path(), &specs, s, d, keep, |i| i <= d);
        prop_assert_eq!(read_all(&image), model(&specs));
        prop_assert_eq!(image.layers().len(), specs.len() - (d - s));
    }
}

#[test]
fn merge_of_the_leaf_while_it_is_written_keeps_every_write() {
    let dir = tempfile::tempdir().unwrap();
    // 1 MiB, so that the copy takes a while next to the writer.
    let n = 2048u64;
    let pic = |every: u64| -> String {
        (0..n)
            .map(|k| if k % every == 0 { 'd' } else { '.' })
            .collect()
    };
    let specs = [
        Spec::of(&pic(3), 1),
        Spec::of(&pic(2), 2),
        Spec::of(&pic(1), 3),
    ];
    let ls = build(dir.path(), &specs, 8 * BS, |i| i <= 1);
    let image = FlatImage::new(&chain_of(&ls));
    let mut want = model(&specs);
    let p = plan(image.layers(), &req("l0.mem", "l1.mem", false), None).unwrap();
    // The writer keeps writing from before the merge starts until after it
    // ended, so some writes land behind the copy and must be caught up.
    let done = std::sync::atomic::AtomicBool::new(false);
    let started = std::sync::atomic::AtomicBool::new(false);
    let writes = std::thread::scope(|sc| {
        let w = sc.spawn(|| {
            let mut log = Vec::new();
            for i in 0u64.. {
                let off = (i * 2_621) % (n * 512 - 700);
                let (len, v) = (1 + (i as usize * 37) % 700, i as u8 | 1);
                image.write_at(off, &vec![v; len]).unwrap();
                log.push((off, len, v));
                started.store(true, Ordering::Relaxed);
                if done.load(Ordering::Relaxed) && i > 100 {
                    break;
                }
            }
            log
        });
        while !started.load(Ordering::Relaxed) {
            std::thread::yield_now();
        }
        execute(&image, p, &Progress::default()).unwrap();
        done.store(true, Ordering::Relaxed);
        w.join().unwrap()
    });
    for &(off, len, v) in &writes {
        want[off as usize..off as usize + len].fill(v);
    }
    assert_eq!(paths(&image.layers()), ["l1.mem", "l2.mem"]);
    assert_eq!(read_all(&image), want);
}
