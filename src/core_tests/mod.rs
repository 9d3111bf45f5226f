//! Unit tests of the core (resolver, `fs`, merge) over in-memory layers
//! ([`MemLayer`]), run by `cargo test --lib`: no format, no mount.
//!
//! A test describes each layer as a [`Spec`] (a state per sector and the
//! bytes of its data sectors), builds the layers from it and checks every
//! read against [`model`]: the same specs resolved by hand, sector by
//! sector, without `map()` or the resolver.

mod fs;
mod merge;
mod resolver;

use std::path::Path;
use std::sync::Arc;

use crate::cache::MetaCache;
use crate::chain::{Chain, Link};
use crate::format::mem::{link_to, MemLayer, Sector};
use crate::format::Layer;

/// Sector and block size of the hand-written tests: a block holds four
/// sectors, so runs of a few sectors cross block boundaries.
pub const SS: u64 = 512;
pub const BS: u64 = 4 * SS;

/// One layer's content: a state per sector and `bytes` for every sector
/// (used where the state is `Data`).
#[derive(Debug, Clone)]
pub struct Spec {
    pub states: Vec<Sector>,
    pub bytes: Vec<u8>,
}

impl Spec {
    /// From a picture, one character per sector: `d` data, `z` zero, `.`
    /// absent. Data bytes are never 0 and differ per `seed`, sector and
    /// byte, so zero fill and misplaced reads show.
    pub fn of(picture: &str, seed: u8) -> Spec {
        let states: Vec<Sector> = picture
            .chars()
            .map(|c| match c {
                'd' => Sector::Data,
                'z' => Sector::Zero,
                _ => Sector::Absent,
            })
            .collect();
        let n = states.len() * SS as usize;
        let bytes = (0..n)
            .map(|i| ((seed as usize * 97 + i * 31 + i / SS as usize) % 255 + 1) as u8)
            .collect();
        Spec { states, bytes }
    }
}

/// Build layers from `specs` (leaf first; all the same length), each with
/// an empty real file `l{i}.mem` in `dir`, each the child of the next.
/// Data sectors are stored last sector first, so file slots run backwards
/// from virtual order. `writable(i)` says which layers take writes.
pub fn build(
    dir: &Path,
    specs: &[Spec],
    block: u64,
    writable: impl Fn(usize) -> bool,
) -> Vec<Arc<MemLayer>> {
    let mut out: Vec<Arc<MemLayer>> = Vec::new();
    for (i, spec) in specs.iter().enumerate().rev() {
        let path = dir.join(format!("l{i}.mem"));
        std::fs::write(&path, b"").unwrap();
        let size = spec.states.len() as u64 * SS;
        let mut l = MemLayer::new(path, size, block, SS as u32).writable(writable(i));
        if let Some(p) = out.last() {
            l = l.child_of(p.as_ref());
        }
        for (k, s) in spec.states.iter().enumerate().rev() {
            let at = k as u64 * SS;
            match s {
                Sector::Data => l.put(at, &spec.bytes[k * SS as usize..][..SS as usize]),
                s => l.set(at, SS, *s),
            }
        }
        out.push(Arc::new(l));
    }
    out.reverse();
    out
}

/// The flat image `specs` (leaf first) describe, resolved by hand.
pub fn model(specs: &[Spec]) -> Vec<u8> {
    let n = specs[0].states.len();
    let mut flat = vec![0u8; n * SS as usize];
    for k in 0..n {
        for s in specs {
            match s.states[k] {
                Sector::Absent => continue,
                Sector::Zero => {}
                Sector::Data => {
                    let r = k * SS as usize..(k + 1) * SS as usize;
                    flat[r.clone()].copy_from_slice(&s.bytes[r]);
                }
            }
            break;
        }
    }
    flat
}

/// A `Chain` over `layers` (leaf first), as `Chain::open` would make it.
pub fn chain_of(layers: &[Arc<MemLayer>]) -> Chain {
    Chain {
        layers: layers.iter().map(|l| l.clone() as Arc<dyn Layer>).collect(),
        links: layers
            .windows(2)
            .map(|w| Link {
                hints: link_to(w[1].as_ref()).hints,
                resolved: w[1].path().to_path_buf(),
                tried: vec![w[1].path().to_path_buf()],
                id_mismatch: false,
                by_search: false,
                by_name_only: false,
            })
            .collect(),
        cache: MetaCache::new(1 << 20),
    }
}

/// Read all of `image`.
pub fn read_all(image: &crate::FlatImage) -> Vec<u8> {
    let mut buf = vec![0u8; image.size() as usize];
    assert_eq!(image.read_at(0, &mut buf).unwrap(), buf.len());
    buf
}
