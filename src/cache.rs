//! The bounded metadata cache shared by every layer of every open chain.
//!
//! Layers never keep whole tables in memory: BAT pages and sector bitmaps are
//! loaded on demand and kept here, in LRU order, under one byte budget (the
//! `cache=` setting, default 64 MiB). The budget holds for any chain size and
//! depth, because nothing else grows with the virtual size.
//!
//! `lru::LruCache` needs `&mut` even for `get`, so the cache is split into
//! shards, each a `Mutex`, chosen by key hash; no lock is held across file I/O.
//!
//! Consistency with writers: a layer that changes a table on disk holds its
//! metadata write lock while it writes the file and then replaces the cached
//! copy; a reader that misses holds the read lock while it loads from the file
//! and inserts. So a stale copy can never be inserted after a newer one.
//! Changes still queued in a layer's `Pending` (not in the file yet) are
//! queued and cached under the write lock, and a layer's loader looks in
//! `Pending` first, for the same reason.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lru::LruCache;
use parking_lot::{Mutex, RwLock};

use crate::error::Result;

/// Default total budget of the metadata cache.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

const SHARDS: usize = 16;

/// What a cached buffer is, for one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// A page of a layer's top-level map (the block or cluster table).
    MapPage,
    /// What a layer keeps about one block or table slice (a presence
    /// bitmap, a second-level table).
    Detail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub layer: u64,
    pub table: Table,
    pub index: u64,
}

impl Key {
    /// Page `page` of a layer's top-level map.
    pub fn map_page(layer: u64, page: u64) -> Key {
        Key {
            layer,
            table: Table::MapPage,
            index: page,
        }
    }

    /// The detail a layer keeps for its block or slice `index`.
    pub fn detail(layer: u64, index: u64) -> Key {
        Key {
            layer,
            table: Table::Detail,
            index,
        }
    }
}

struct Shard {
    lru: LruCache<Key, Arc<[u8]>>,
    bytes: usize,
}

/// A byte-bounded, sharded LRU of immutable metadata buffers.
pub struct MetaCache {
    shards: Vec<Mutex<Shard>>,
    shard_budget: usize,
    hasher: std::collections::hash_map::RandomState,
    hits: AtomicU64,
    misses: AtomicU64,
}

static NEXT_LAYER_KEY: AtomicU64 = AtomicU64::new(1);

/// A process-unique number naming one opened layer in cache keys.
pub fn new_layer_key() -> u64 {
    NEXT_LAYER_KEY.fetch_add(1, Ordering::Relaxed)
}

impl MetaCache {
    pub fn new(budget_bytes: usize) -> Arc<Self> {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    lru: LruCache::unbounded(),
                    bytes: 0,
                })
            })
            .collect();
        Arc::new(MetaCache {
            shards,
            shard_budget: (budget_bytes / SHARDS).max(4096),
            hasher: Default::default(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    fn shard(&self, key: &Key) -> &Mutex<Shard> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    pub fn get(&self, key: &Key) -> Option<Arc<[u8]>> {
        let v = self.shard(key).lock().lru.get(key).cloned();
        if v.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        v
    }

    pub fn insert(&self, key: Key, value: Arc<[u8]>) {
        let mut s = self.shard(&key).lock();
        let len = value.len();
        if let Some(old) = s.lru.put(key, value) {
            s.bytes -= old.len();
        }
        s.bytes += len;
        while s.bytes > self.shard_budget && s.lru.len() > 1 {
            match s.lru.pop_lru() {
                Some((_, v)) => s.bytes -= v.len(),
                None => break,
            }
        }
    }

    /// Look `key` up; on a miss run `load` under the read side of `lock` and
    /// keep its result (see the module docs for why the lock is needed).
    pub fn get_or_load(
        &self,
        key: Key,
        lock: &RwLock<()>,
        load: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<Arc<[u8]>> {
        if let Some(v) = self.get(&key) {
            return Ok(v);
        }
        let _g = lock.read();
        if let Some(v) = self.get(&key) {
            return Ok(v);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let v: Arc<[u8]> = load()?.into();
        self.insert(key, v.clone());
        Ok(v)
    }

    /// Drop every entry of one layer (when the layer is closed or replaced).
    pub fn forget_layer(&self, layer: u64) {
        for shard in &self.shards {
            let mut s = shard.lock();
            let keys: Vec<Key> = s
                .lru
                .iter()
                .filter(|(k, _)| k.layer == layer)
                .map(|(k, _)| *k)
                .collect();
            for k in keys {
                if let Some(v) = s.lru.pop(&k) {
                    s.bytes -= v.len();
                }
            }
        }
    }

    /// Bytes held right now (for tests and `info`).
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.lock().bytes).sum()
    }

    pub fn budget(&self) -> usize {
        self.shard_budget * SHARDS
    }

    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_budget() {
        let c = MetaCache::new(1 << 20);
        for i in 0..10_000u64 {
            c.insert(
                Key {
                    layer: 1,
                    table: Table::Detail,
                    index: i,
                },
                vec![0u8; 512].into(),
            );
        }
        assert!(c.bytes() <= c.budget(), "{} > {}", c.bytes(), c.budget());
        assert!(c.bytes() > c.budget() / 2);
    }

    #[test]
    fn forget_layer_drops_only_that_layer() {
        let c = MetaCache::new(1 << 20);
        for layer in [1, 2] {
            c.insert(
                Key {
                    layer,
                    table: Table::MapPage,
                    index: 0,
                },
                vec![1u8; 64].into(),
            );
        }
        c.forget_layer(1);
        let k = |layer| Key {
            layer,
            table: Table::MapPage,
            index: 0,
        };
        assert!(c.get(&k(1)).is_none());
        assert!(c.get(&k(2)).is_some());
    }
}
