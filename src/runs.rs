//! The resolved-run cache: where each run of the flat view comes from, kept
//! so that a read does not walk every layer's map again.
//!
//! Resolving a run walks the chain leaf first (`crate::image::resolve_span`):
//! one `Layer::map` per layer, each a look-up in the shared metadata cache
//! (`crate::cache`: a hash, a shard lock, an LRU touch). On a chain of depth
//! 64 that walk was where a random 4 KiB read spent its CPU (`perf` on the
//! daemon: `MetaCache::get` and `LruCache::get` about 35%), and depth-64
//! random reads ran at 0.70x depth 1. This cache keeps the walk's answer,
//! `(start, len, Source)` per run, so a read inside a known run costs one
//! shard lock, whatever the depth.
//!
//! Layout: the virtual disk is cut into granules ([`GRANULE_SHIFT`], 1 MiB);
//! a run is resolved at most to the end of its granule, so it never crosses
//! one. Each granule keeps its runs in a short list (at most
//! [`RUNS_PER_GRANULE`]), and granules sit in sharded LRUs bounded by a total
//! count of runs ([`MAX_RUNS`]: a few MiB at most, whatever the disk size).
//!
//! Why a cached run stays right:
//! - A cache belongs to one layer list (`crate::image::FlatImage` keeps them
//!   together): a merge that swaps the list in starts an empty cache, and the
//!   depths in a `Source` always index the list they were resolved in.
//! - Writes (write, discard, copy-on-read) change the leaf's map. After the
//!   leaf changed, the writer calls [`RunCache::invalidate`] over the range
//!   it wrote, which first bumps the epoch and then drops the granules'
//!   runs. A reader reads the epoch before it walks and [`RunCache::insert`]
//!   keeps its run only if the epoch is unchanged, checked under the shard
//!   lock: a walk that may have seen the map before a write either lands
//!   before the drop (and is dropped) or is refused. A read concurrent with
//!   a write of the same range may see old or new bytes, as it always could.
//! - A merge running on the mounted chain writes into its destination only
//!   ranges that the layers above it hold (those resolve above the
//!   destination) or the same bytes the destination already shows (a fill of
//!   a larger unit, `Layer::write_fill`), and retires layers only by
//!   swapping the list: a run resolved before still reads the same bytes.

use std::sync::atomic::{AtomicU64, Ordering};

use lru::LruCache;
use parking_lot::Mutex;

use crate::image::Source;

/// Granules are `1 << GRANULE_SHIFT` bytes of the virtual disk.
pub const GRANULE_SHIFT: u32 = 20;
/// Runs kept per granule; a granule cut finer than this keeps its latest.
pub const RUNS_PER_GRANULE: usize = 32;
/// Runs kept in all (each about 40 bytes, plus the granule's entry).
pub const MAX_RUNS: usize = 1 << 16;

const SHARDS: usize = 16;

#[derive(Debug, Clone, Copy)]
struct Run {
    start: u64,
    len: u64,
    src: Source,
}

impl Run {
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

struct Shard {
    granules: LruCache<u64, Vec<Run>>,
    runs: usize,
}

/// Resolved runs of one layer list (see the module docs).
pub struct RunCache {
    shards: Vec<Mutex<Shard>>,
    shift: u32,
    shard_runs: usize,
    epoch: AtomicU64,
}

impl RunCache {
    /// A cache of granules of `1 << shift` bytes (tests use small ones).
    pub fn new(shift: u32) -> RunCache {
        RunCache {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        granules: LruCache::unbounded(),
                        runs: 0,
                    })
                })
                .collect(),
            shift,
            shard_runs: MAX_RUNS / SHARDS,
            epoch: AtomicU64::new(0),
        }
    }

    /// Granules are `1 << granule_shift()` bytes.
    pub fn granule_shift(&self) -> u32 {
        self.shift
    }

    fn shard(&self, granule: u64) -> &Mutex<Shard> {
        // Fibonacci hashing: neighbouring granules land in different shards.
        let h = granule.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60;
        &self.shards[h as usize % SHARDS]
    }

    /// The end of the granule holding `offset`: a walk from `offset` is
    /// asked for no more than this.
    pub fn granule_end(&self, offset: u64) -> u64 {
        ((offset >> self.shift) + 1)
            .checked_shl(self.shift)
            .unwrap_or(u64::MAX)
    }

    /// The epoch to pass to [`RunCache::insert`]: read it before the walk.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// The cached run holding `offset`: its source as seen from `offset`
    /// and the bytes left in it.
    pub fn get(&self, offset: u64) -> Option<(Source, u64)> {
        let g = offset >> self.shift;
        let mut s = self.shard(g).lock();
        let run = *s
            .granules
            .get(&g)?
            .iter()
            .find(|r| r.start <= offset && offset < r.end())?;
        let skip = offset - run.start;
        Some((run.src.advanced(skip), run.len - skip))
    }

    /// Keep the run `[start, start + len)` resolved to `src`, unless a
    /// write changed anything since `epoch` was read (module docs). The run
    /// must not cross a granule ([`RunCache::granule_end`]).
    pub fn insert(&self, epoch: u64, start: u64, len: u64, src: Source) {
        if len == 0 {
            return;
        }
        let g = start >> self.shift;
        debug_assert!(start + len <= self.granule_end(start));
        let mut s = self.shard(g).lock();
        if self.epoch.load(Ordering::SeqCst) != epoch {
            return;
        }
        let run = Run { start, len, src };
        let removed = match s.granules.get_mut(&g) {
            Some(runs) => {
                let before = runs.len();
                // A run resolved from an earlier offset of the same stretch
                // holds the later ones.
                runs.retain(|r| !(run.start <= r.start && r.end() <= run.end()));
                if runs.len() >= RUNS_PER_GRANULE {
                    runs.remove(0);
                }
                runs.push(run);
                before + 1 - runs.len()
            }
            None => {
                s.granules.put(g, vec![run]);
                0
            }
        };
        s.runs = s.runs + 1 - removed;
        while s.runs > self.shard_runs {
            match s.granules.pop_lru() {
                Some((_, v)) => s.runs -= v.len(),
                None => break,
            }
        }
    }

    /// Forget every run that meets `[offset, offset + len)`: the leaf's map
    /// changed there (module docs for the order).
    pub fn invalidate(&self, offset: u64, len: u64) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if len == 0 {
            return;
        }
        let first = offset >> self.shift;
        let last = (offset.saturating_add(len) - 1) >> self.shift;
        if last - first >= MAX_RUNS as u64 {
            // Wider than the cache can hold: drop everything.
            for shard in &self.shards {
                let mut s = shard.lock();
                s.granules.clear();
                s.runs = 0;
            }
            return;
        }
        for g in first..=last {
            let mut s = self.shard(g).lock();
            if let Some(v) = s.granules.pop(&g) {
                s.runs -= v.len();
            }
        }
    }

    /// Runs held right now (tests).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().runs).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: fn(u64) -> Source = |fo| Source::Data {
        depth: 3,
        file_offset: fo,
    };

    #[test]
    fn a_hit_inside_a_run_advances_the_file_offset() {
        let c = RunCache::new(12);
        c.insert(c.epoch(), 4096 + 512, 1024, D(1 << 20));
        assert_eq!(c.get(4096 + 1000), Some((D((1 << 20) + 488), 536)));
        assert_eq!(c.get(4096 + 511), None);
        assert_eq!(c.get(4096 + 1536), None);
    }

    #[test]
    fn a_write_after_the_walk_began_keeps_its_run_out() {
        let c = RunCache::new(12);
        let e = c.epoch();
        c.invalidate(0, 512);
        c.insert(e, 0, 4096, Source::Zero);
        assert!(c.is_empty());
        c.insert(c.epoch(), 0, 4096, Source::Zero);
        assert_eq!(c.get(100), Some((Source::Zero, 3996)));
    }

    #[test]
    fn invalidate_drops_every_granule_the_range_meets() {
        let c = RunCache::new(12);
        for g in 0..4u64 {
            c.insert(c.epoch(), g << 12, 4096, Source::Zero);
        }
        c.invalidate(4095, 2);
        assert_eq!(c.get(0), None);
        assert_eq!(c.get(4096), None);
        assert!(c.get(2 * 4096).is_some() && c.get(3 * 4096).is_some());
        assert_eq!(c.len(), 2);
        c.invalidate(0, u64::MAX);
        assert!(c.is_empty());
    }

    #[test]
    fn stays_within_its_run_budget() {
        let c = RunCache::new(12);
        for g in 0..(MAX_RUNS as u64 * 2) {
            c.insert(c.epoch(), g << 12, 512, Source::Zero);
            c.insert(c.epoch(), (g << 12) + 1024, 512, Source::Zero);
        }
        assert!(c.len() <= MAX_RUNS, "{} runs", c.len());
        // A granule keeps at most RUNS_PER_GRANULE runs.
        for k in 0..100u64 {
            c.insert(c.epoch(), k * 8, 8, Source::Zero);
        }
        assert_eq!(c.get(99 * 8), Some((Source::Zero, 8)));
        assert_eq!(c.get(0), None);
    }

    #[test]
    fn an_earlier_start_of_the_same_stretch_replaces_the_later() {
        let c = RunCache::new(12);
        c.insert(c.epoch(), 1024, 3072, Source::Zero);
        c.insert(c.epoch(), 0, 4096, Source::Zero);
        assert_eq!(c.len(), 1);
        assert_eq!(c.get(2048), Some((Source::Zero, 2048)));
    }
}
