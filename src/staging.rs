//! Staging: a mount's read-ahead for sequential readers, read by worker
//! threads into a small pool of this process's memory.
//!
//! A sequential reader of `disk.raw` (noticed per open handle by
//! `crate::readahead::Stream`) has the next MiBs of the view staged ahead
//! of it: [`Staging::want`] queues each missing [`CHUNK`] of the range for
//! the [`WORKERS`] worker threads, which resolve it through the chain and
//! read it into a free slot of the pool ([`Loader`], implemented by
//! `crate::image`, reads layer files with `O_DIRECT` where it can:
//! `crate::direct`). The reader's requests then copy from the slot
//! ([`Staging::take`], which waits for a slot still loading); a slot read
//! to its end is free again. What no slot holds is read the ordinary way.
//!
//! ```text
//!  read(fh, off) ─▶ Stream::on_read ─▶ Staging::want(range) ─▶ queue ─▶ worker: Loader::load ─▶ slot
//!               └─▶ Staging::take(off, buf) ◀── copy ◀──────────────────────────────────────── slot
//!                   (the rest: FlatImage::read_at, through the page cache)
//! ```
//!
//! Why not the page cache (`posix_fadvise(WILLNEED)`, which the read-ahead
//! used before): advice reads into single pages allocated one by one, so a
//! 1 MiB piece of a fragmented chain becomes a disk request of up to 256
//! memory segments, and this machine's virtio disk (no indirect
//! descriptors) holds few such requests at once. Read directly into huge
//! pages a piece is one segment. Measured on the bench's fragmented chain
//! (1 MiB pieces in random order across the layer files, 512 of them, cold,
//! 3 rounds): advised all at once 880-1,768 MiB/s; direct reads into huge
//! pages by 4 threads 2,080-2,423 MiB/s, by 8 threads 2,186-2,650 MiB/s;
//! a plain sequential read of the flat file (kernel read-ahead) ~900
//! (1 reader) to ~2,000 (4 readers) MiB/s.
//!
//! Memory: the pool, [`DEFAULT_BYTES`] unless `-o readahead=SIZE` says
//! otherwise, allocated once per mount whatever the number of readers;
//! they share it ([`Staging::capacity`] is what their windows split). Staged bytes never reach the page cache of the
//! layer files (the kernel still caches `disk.raw` itself).
//!
//! Correctness: a slot holds bytes of the *view* at a virtual offset. A
//! merge never changes the view's bytes (`crate::runs` says why), so only
//! writes can make a slot stale: every change to the leaf calls
//! [`Staging::invalidate`] after it (`FlatImage::changed`), which drops
//! the slots over the range; a slot still loading there is marked stale and
//! dropped when its load ends, so bytes read before the change are never
//! served after it. A load that fails leaves nothing staged: the reader
//! reads that range the ordinary way, and reports its error.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::direct::Buffer;
use crate::error::Result;

/// The unit staged: one slot holds the view's bytes of one aligned chunk.
pub const CHUNK: u64 = 1 << 20;
/// A mount's pool by default (`-o readahead=SIZE`): 32 slots. Four
/// sequential readers each need about 8 MiB staged: what the kernel's
/// read-ahead of `disk.raw` asks in parallel (4 MiB, `crate::mount`) and
/// as much again coming in behind it. Measured on the fragmented chain
/// (cold, 4 readers, 3 rounds): 16 MiB 1,422-1,628 MiB/s, 32 MiB
/// 1,610-1,996 MiB/s; the flat file read directly 989-1,218 MiB/s then.
pub const DEFAULT_BYTES: u64 = 32 << 20;
/// The most `-o readahead=SIZE` takes.
pub const MAX_BYTES: u64 = 1 << 30;
/// Chunks read out of the pool that it remembers, so as not to stage them
/// again (4 GiB of the view, ~100 KiB): the kernel keeps what it read of
/// `disk.raw` in its page cache, so a chunk once read is rarely asked for
/// again, while a stream that restarts behind its reader (requests come a
/// little out of order) or runs into a region another reader has read
/// would stage it for nobody.
const RECENT: usize = 4096;
/// Worker threads, so reads in flight at most. The measurements above: 4
/// reached the disk's rate, 8 a little more, 32 less.
pub const WORKERS: usize = 8;
/// A staged chunk nobody read for this long is given to another reader
/// when the pool is full (its reader went elsewhere, or closed the file).
/// Readers that use what they staged take it within milliseconds.
pub const UNUSED: Duration = Duration::from_secs(1);

/// Fills a slot: the view's bytes at `offset`.
pub trait Loader: Send + Sync {
    fn load(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Free,
    Queued,
    Loading,
    Ready,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    status: Status,
    /// The chunk index (not for `Free` slots).
    chunk: u64,
    /// Bytes of the chunk it holds (the view's last chunk may be short).
    len: usize,
    /// Readers copying out of it now; it is not reused while any are.
    pins: u32,
    /// Bytes copied out so far: once all are, the slot is free again.
    taken: usize,
    /// Dropped by `invalidate` while queued, loading or pinned: never
    /// served, freed when that ends.
    stale: bool,
    /// When it was last loaded or read from: its age, for eviction.
    used: Option<Instant>,
}

const FREE: Slot = Slot {
    status: Status::Free,
    chunk: 0,
    len: 0,
    pins: 0,
    taken: 0,
    stale: false,
    used: None,
};

struct State {
    slots: Vec<Slot>,
    /// Chunk index -> its (not stale) slot.
    by_chunk: HashMap<u64, usize>,
    queue: VecDeque<(usize, Arc<dyn Loader>)>,
    /// The last [`RECENT`] chunks read to their end, oldest first, and as
    /// a set.
    recent: VecDeque<u64>,
    read: HashSet<u64>,
    stop: bool,
}

impl State {
    /// Slot `i` was read to its end: free, and its chunk not staged again.
    fn used_up(&mut self, i: usize) {
        let chunk = self.slots[i].chunk;
        if self.read.insert(chunk) {
            self.recent.push_back(chunk);
            if self.recent.len() > RECENT {
                if let Some(old) = self.recent.pop_front() {
                    self.read.remove(&old);
                }
            }
        }
        self.free(i);
    }

    fn free(&mut self, i: usize) {
        let chunk = self.slots[i].chunk;
        if self.slots[i].status != Status::Free && self.by_chunk.get(&chunk) == Some(&i) {
            self.by_chunk.remove(&chunk);
        }
        self.slots[i] = FREE;
    }

    /// A slot for a new chunk: a free one, else the ready slot left
    /// unused longest, if for [`UNUSED`] or more.
    fn claim(&mut self) -> Option<usize> {
        if let Some(i) = self.slots.iter().position(|s| s.status == Status::Free) {
            return Some(i);
        }
        let now = Instant::now();
        let i = (0..self.slots.len())
            .filter(|&i| {
                let s = &self.slots[i];
                s.status == Status::Ready
                    && s.pins == 0
                    && s.used.is_some_and(|u| now.duration_since(u) >= UNUSED)
            })
            .min_by_key(|&i| self.slots[i].used)?;
        self.free(i);
        Some(i)
    }
}

/// One slot's memory: a disjoint `CHUNK` of the pool's [`Buffer`],
/// reached only through its `Mutex` (the worker loading it, or a reader
/// copying out of it).
struct SlotMem {
    ptr: *mut u8,
}

// SAFETY: a `SlotMem` is a pointer into a `Buffer` that outlives it (both
// live in `Inner`, see `Inner::mem`); each covers its own `CHUNK` bytes and
// is only dereferenced under its `Mutex`, so no two threads touch the same
// bytes at once.
unsafe impl Send for SlotMem {}

impl SlotMem {
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: see `unsafe impl Send`: `CHUNK` bytes of a live mapping
        // that only this (locked) `SlotMem` reaches.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, CHUNK as usize) }
    }
}

struct Inner {
    state: Mutex<State>,
    /// A slot finished loading, a job was queued, or the pool stops.
    changed: Condvar,
    /// One per slot, into `_buffer`.
    mem: Vec<Mutex<SlotMem>>,
    /// Declared after `mem`, so dropped after it.
    _buffer: Buffer,
}

/// The staging pool of one mount (see the module docs).
pub struct Staging {
    inner: Arc<Inner>,
    workers: Vec<std::thread::JoinHandle<()>>,
    /// Bytes readers took from the pool so far.
    served: AtomicU64,
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staging")
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl Staging {
    /// A pool of `bytes` (whole chunks) and its workers; `None` if that
    /// holds no chunk, or (logged) the memory or a thread cannot be had:
    /// reads then use the page cache's read-ahead.
    pub fn start(bytes: u64) -> Option<Staging> {
        let slots = (bytes.min(MAX_BYTES) / CHUNK) as usize;
        if slots == 0 {
            return None;
        }
        let buffer = Buffer::new(slots * CHUNK as usize)?;
        let mem = (0..slots)
            .map(|i| {
                Mutex::new(SlotMem {
                    // SAFETY: slot `i` starts `i * CHUNK` into a buffer of
                    // at least `slots * CHUNK` bytes.
                    ptr: unsafe { buffer.as_ptr().add(i * CHUNK as usize) },
                })
            })
            .collect();
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                slots: vec![FREE; slots],
                by_chunk: HashMap::new(),
                queue: VecDeque::new(),
                recent: VecDeque::new(),
                read: Default::default(),
                stop: false,
            }),
            changed: Condvar::new(),
            mem,
            _buffer: buffer,
        });
        let mut staging = Staging {
            inner,
            workers: Vec::new(),
            served: AtomicU64::new(0),
        };
        for n in 0..WORKERS {
            let inner = staging.inner.clone();
            match std::thread::Builder::new()
                .name(format!("stage-{n}"))
                .spawn(move || work(&inner))
            {
                Ok(h) => staging.workers.push(h),
                Err(e) => {
                    log::warn!("no staged read-ahead: cannot start its threads: {e}");
                    return None; // `Drop` stops those started
                }
            }
        }
        Some(staging)
    }

    /// Bytes readers took from the pool so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Bytes the pool holds at most: what the readers' windows share.
    pub fn capacity(&self) -> u64 {
        self.inner.mem.len() as u64 * CHUNK
    }

    /// Stage the chunks over `[offset, offset + len)` of a view of `size`
    /// bytes that are not staged or queued yet, in order, while slots are
    /// free. Returns where that stopped: everything before it is staged,
    /// loading or queued (the caller asks again from there later).
    pub fn want(&self, loader: &Arc<dyn Loader>, offset: u64, len: u64, size: u64) -> u64 {
        let end = offset.saturating_add(len).min(size);
        let mut st = self.inner.state.lock();
        let mut c = offset / CHUNK;
        while c * CHUNK < end {
            if !st.by_chunk.contains_key(&c) && !st.read.contains(&c) {
                let Some(i) = st.claim() else {
                    break;
                };
                st.slots[i] = Slot {
                    status: Status::Queued,
                    chunk: c,
                    len: (size - c * CHUNK).min(CHUNK) as usize,
                    ..FREE
                };
                st.by_chunk.insert(c, i);
                st.queue.push_back((i, loader.clone()));
                self.inner.changed.notify_all();
            }
            c += 1;
        }
        (c * CHUNK).clamp(offset, end.max(offset))
    }

    /// Copy what is staged at `offset` into `buf`, waiting for chunks still
    /// loading; returns the bytes copied from the start of `buf` (0 when
    /// nothing staged is there). The caller reads the rest.
    pub fn take(&self, offset: u64, buf: &mut [u8]) -> usize {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let chunk = at / CHUNK;
            let within = (at - chunk * CHUNK) as usize;
            let Some((i, len)) = self.pin(chunk, within) else {
                break;
            };
            let n = (buf.len() - done).min(len - within);
            buf[done..done + n]
                .copy_from_slice(&self.inner.mem[i].lock().bytes()[within..within + n]);
            let mut st = self.inner.state.lock();
            let s = &mut st.slots[i];
            s.pins -= 1;
            s.taken += n;
            s.used = Some(Instant::now());
            if s.pins == 0 && s.stale {
                st.free(i);
            } else if s.pins == 0 && s.taken >= s.len {
                st.used_up(i);
            }
            done += n;
        }
        self.served.fetch_add(done as u64, Ordering::Relaxed);
        done
    }

    /// The ready slot of `chunk` and its length, pinned, if it holds byte
    /// `within`; waits while it is queued or loading.
    fn pin(&self, chunk: u64, within: usize) -> Option<(usize, usize)> {
        let mut st = self.inner.state.lock();
        loop {
            let &i = st.by_chunk.get(&chunk)?;
            let stop = st.stop;
            let s = &mut st.slots[i];
            match s.status {
                Status::Ready if within < s.len => {
                    s.pins += 1;
                    return Some((i, s.len));
                }
                Status::Queued | Status::Loading if !stop => {
                    self.inner.changed.wait(&mut st);
                }
                _ => return None,
            }
        }
    }

    /// The view changed over `[offset, offset + len)`: nothing staged there
    /// before is served after.
    pub fn invalidate(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        let mut st = self.inner.state.lock();
        for i in 0..st.slots.len() {
            let s = st.slots[i];
            let (from, to) = (s.chunk * CHUNK, s.chunk * CHUNK + s.len as u64);
            if s.status == Status::Free || to <= offset || from >= end {
                continue;
            }
            if s.status == Status::Ready && s.pins == 0 {
                st.free(i);
            } else {
                // Loading, queued or being copied: out of the index now
                // (a new load of the chunk gets a slot of its own), freed
                // when that ends.
                st.slots[i].stale = true;
                if st.by_chunk.get(&s.chunk) == Some(&i) {
                    st.by_chunk.remove(&s.chunk);
                }
            }
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        self.inner.state.lock().stop = true;
        self.inner.changed.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A worker: take queued chunks and load them until the pool stops.
fn work(inner: &Inner) {
    loop {
        let (i, loader, offset, len) = {
            let mut st = inner.state.lock();
            let (i, loader) = loop {
                if st.stop {
                    return;
                }
                match st.queue.pop_front() {
                    Some(j) => break j,
                    None => inner.changed.wait(&mut st),
                }
            };
            let s = &mut st.slots[i];
            if s.stale {
                st.free(i);
                continue;
            }
            s.status = Status::Loading;
            (i, loader, s.chunk * CHUNK, s.len)
        };
        let r = {
            let mut mem = inner.mem[i].lock();
            loader.load(offset, &mut mem.bytes()[..len])
        };
        let mut st = inner.state.lock();
        if let Err(e) = &r {
            // The reader reads it the ordinary way and reports the error.
            log::debug!("staging {len} bytes at {offset}: {e}");
        }
        if r.is_err() || st.slots[i].stale {
            st.free(i);
        } else {
            st.slots[i].status = Status::Ready;
            st.slots[i].used = Some(Instant::now());
        }
        inner.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::sync::atomic::AtomicUsize;

    /// The view's byte at `o` is a function of `o` and a version that
    /// tests bump to "write"; offsets in `fail` cannot be loaded.
    #[derive(Default)]
    struct View {
        version: AtomicU64,
        loads: AtomicUsize,
        fail: Mutex<Vec<u64>>,
    }

    fn byte(o: u64, v: u64) -> u8 {
        ((o / 4096 + v * 7) % 251) as u8
    }

    impl Loader for View {
        fn load(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            self.loads.fetch_add(1, Ordering::Relaxed);
            if self.fail.lock().contains(&offset) {
                return Err(Error::invalid(format!("cannot load {offset}")));
            }
            let v = self.version.load(Ordering::Relaxed);
            for (k, b) in buf.iter_mut().enumerate() {
                *b = byte(offset + k as u64, v);
            }
            Ok(())
        }
    }

    const SIZE: u64 = 64 * CHUNK + 12345;
    const SLOTS: usize = 16;

    fn setup() -> (Staging, Arc<View>, Arc<dyn Loader>) {
        let view = Arc::new(View::default());
        let loader: Arc<dyn Loader> = view.clone();
        (Staging::start(SLOTS as u64 * CHUNK).unwrap(), view, loader)
    }

    fn expect(at: u64, got: &[u8], v: u64) {
        for (k, &b) in got.iter().enumerate() {
            assert_eq!(b, byte(at + k as u64, v), "byte {}", at + k as u64);
        }
    }

    #[test]
    fn staged_chunks_are_served_whole_and_freed_once_read() {
        let (s, view, loader) = setup();
        assert_eq!(s.want(&loader, 0, 4 * CHUNK, SIZE), 4 * CHUNK);
        // Unaligned reads across chunk edges: all from the pool.
        let mut at = 0;
        while at < 4 * CHUNK {
            let mut buf = vec![0u8; 300_000];
            let n = (buf.len() as u64).min(4 * CHUNK - at) as usize;
            assert_eq!(s.take(at, &mut buf[..n]), n);
            expect(at, &buf[..n], 0);
            at += n as u64;
        }
        assert_eq!(view.loads.load(Ordering::Relaxed), 4);
        // Read to their ends: free again, nothing staged there now.
        assert_eq!(s.take(0, &mut [0u8; 16]), 0);
        let st = s.inner.state.lock();
        assert!(st.slots.iter().all(|x| x.status == Status::Free));
    }

    #[test]
    fn the_short_last_chunk_and_the_end_of_the_view() {
        let (s, _, loader) = setup();
        let last = SIZE / CHUNK * CHUNK;
        assert_eq!(s.want(&loader, last - CHUNK, 10 * CHUNK, SIZE), SIZE);
        let mut buf = vec![0u8; 2 * CHUNK as usize];
        assert_eq!(
            s.take(last - CHUNK, &mut buf),
            (CHUNK + SIZE - last) as usize
        );
        expect(last - CHUNK, &buf[..(CHUNK + SIZE - last) as usize], 0);
    }

    #[test]
    fn the_pool_stages_at_most_its_slots_and_says_where_it_stopped() {
        let (s, view, loader) = setup();
        let got = s.want(&loader, 0, 40 * CHUNK, SIZE);
        assert_eq!(got, SLOTS as u64 * CHUNK);
        // Reading the first chunk frees a slot for the next one.
        let mut buf = vec![0u8; CHUNK as usize];
        assert_eq!(s.take(0, &mut buf), buf.len());
        assert_eq!(s.want(&loader, got, CHUNK, SIZE), got + CHUNK);
        assert_eq!(s.take(got, &mut buf), buf.len());
        // Each chunk loaded once. (Wait for every load first: a worker may
        // have taken chunk 5 off the queue and not yet started it when
        // another has loaded chunk 16.)
        let mut probe = [0u8; 1];
        for c in 1..SLOTS as u64 {
            assert_eq!(s.take(c * CHUNK, &mut probe), 1);
        }
        assert_eq!(view.loads.load(Ordering::Relaxed), SLOTS + 1);
    }

    #[test]
    fn slots_nobody_reads_go_to_another_reader_after_a_while() {
        let (s, _, loader) = setup();
        // A reader stages a window and goes away.
        assert_eq!(
            s.want(&loader, 0, SLOTS as u64 * CHUNK, SIZE),
            SLOTS as u64 * CHUNK
        );
        // (Wait for the loads: only ready slots are given away.)
        let mut probe = [0u8; 1];
        for c in 0..SLOTS as u64 {
            s.take(c * CHUNK + CHUNK - 1, &mut probe);
        }
        // Another reader elsewhere: refused while those slots are fresh
        // (they may be about to be read), served once they are not.
        let far = 40 * CHUNK;
        assert_eq!(s.want(&loader, far, CHUNK, SIZE), far);
        std::thread::sleep(UNUSED);
        assert_eq!(s.want(&loader, far, CHUNK, SIZE), far + CHUNK);
        let mut buf = vec![0u8; CHUNK as usize];
        assert_eq!(s.take(far, &mut buf), buf.len());
        expect(far, &buf, 0);
    }

    #[test]
    fn a_change_drops_what_was_staged_before_it() {
        let (s, view, loader) = setup();
        s.want(&loader, 0, 2 * CHUNK, SIZE);
        let mut one = [0u8; 1];
        s.take(CHUNK - 2, &mut one); // chunk 0 loaded (and kept: not read to its end)
                                     // A write over chunk 0 changes the view, then invalidates.
        view.version.store(1, Ordering::Relaxed);
        s.invalidate(10, 1);
        let mut buf = vec![0u8; 4096];
        assert_eq!(s.take(0, &mut buf), 0, "stale bytes served after a write");
        // Chunk 1 was not written: still served (old and new agree there
        // in a real view; here it shows it was not dropped).
        assert_eq!(s.take(CHUNK, &mut buf), 4096);
        // Staged again after the write: the new bytes.
        s.want(&loader, 0, CHUNK, SIZE);
        assert_eq!(s.take(0, &mut buf), 4096);
        expect(0, &buf, 1);
    }

    #[test]
    fn a_failed_load_stages_nothing() {
        let (s, view, loader) = setup();
        view.fail.lock().push(CHUNK);
        s.want(&loader, 0, 3 * CHUNK, SIZE);
        let mut buf = vec![0u8; 3 * CHUNK as usize];
        // Served up to the chunk that failed; the caller reads the rest.
        assert_eq!(s.take(0, &mut buf), CHUNK as usize);
        assert_eq!(s.take(CHUNK, &mut buf), 0);
        assert_eq!(
            s.take(2 * CHUNK, &mut buf[..CHUNK as usize]),
            CHUNK as usize
        );
    }

    #[test]
    fn readers_never_see_bytes_older_than_the_last_finished_change() {
        let (s, view, loader) = setup();
        // The last version whose change (and invalidation) has finished.
        let committed = AtomicU64::new(0);
        std::thread::scope(|sc| {
            for r in 0..3u64 {
                let (s, loader, view, committed) = (&s, loader.clone(), &view, &committed);
                sc.spawn(move || {
                    for round in 0..300u64 {
                        let at = ((r * 7 + round) % 48) * CHUNK;
                        s.want(&loader, at, 2 * CHUNK, SIZE);
                        let before = committed.load(Ordering::SeqCst);
                        let mut buf = vec![0u8; 4096];
                        if s.take(at, &mut buf) == buf.len() {
                            let now = view.version.load(Ordering::SeqCst);
                            assert!(
                                (before..=now).any(|v| buf[0] == byte(at, v)),
                                "bytes at {at} older than version {before}"
                            );
                        }
                    }
                });
            }
            for v in 1..=100 {
                // A write: the view changes, then the pool is told.
                view.version.store(v, Ordering::SeqCst);
                s.invalidate(0, SIZE);
                committed.store(v, Ordering::SeqCst);
                std::thread::yield_now();
            }
        });
    }
}
