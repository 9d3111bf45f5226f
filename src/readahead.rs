//! Read-ahead for sequential readers: of the mount, per open file handle,
//! and of the nbdkit plugin, per connection.
//!
//! The kernel sends a sequential reader's requests 1 MiB at a time, a few
//! MiB ahead of it. On a fragmented chain each request is several `pread`s
//! into different layer files, at file offsets that look random to each
//! file's own read-ahead, so the disk sees one small synchronous read after
//! another. A [`Stream`] per handle notices a sequential stream and says
//! which range to fetch ahead; the caller then resolves that range through
//! the chain and asks each layer to start reading the runs it holds
//! (`crate::image::will_need`): the reads of every layer are queued at
//! once, and the reader's `pread`s find the page cache filled. A long run
//! contiguous in one file is the exception: the kernel's own read-ahead
//! reads it in larger requests than advice does (`image::KERNEL_RUN`).
//!
//! ```text
//!   read(fh, off) ──▶ Stream::on_read ──Some(range)──▶ image::will_need(range)
//!                                                        ├─ Layer::prefetch (tables)
//!                                                        └─ Layer::will_need (each data run)
//! ```
//!
//! A stream is a run of reads each starting within [`SLACK`] of where the
//! stream has reached (the kernel's read-ahead requests may arrive a little
//! out of order). Only once it has covered [`MIN_RUN`] bytes is anything
//! fetched, so random reads (which rarely land near each other twice, and
//! never 2 MiB in a row) never cause extra I/O. Then the stream keeps a
//! window fetched ahead of the reader, topped up in steps of at least half
//! a window, so the resolving is paid once per few MiB. The window grows
//! with the stream (a short one fetches little it never reads) up to its
//! share of [`WINDOW`]: the streams of one mount share that much ahead
//! ([`Streams`]; why, at [`Stream::window`]). Memory: a few numbers per
//! handle and one shared counter; the data goes to the page cache, not to
//! this process.
//!
//! The resolving and advising run on a [`Fetcher`]: one worker thread fed
//! through a short queue, so no request waits for them (on a deep chain
//! with cold tables resolving costs more than the read itself). The
//! mount's layer views (`crate::fs`, per open handle) and the nbdkit plugin
//! (per connection) use it. The mount's `disk.raw` stages its readers'
//! next MiBs in memory instead (`crate::staging`): the same [`Stream`], with
//! a [`Window`] the size of that pool, says what to stage.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;

use crate::image::Layers;

/// How far ahead of its sequential readers a mount (or an nbdkit plugin)
/// fetches at most, shared by its streams: one stream alone may reach it,
/// four share it (see [`Stream::window`]). One stream's window grows with
/// it (four times what it has read) from [`WINDOW_MIN`].
pub const WINDOW: u64 = 128 << 20;
/// The window of a stream that has just begun, and the least any stream
/// gets however many share [`WINDOW`].
pub const WINDOW_MIN: u64 = 32 << 20;
/// How far from the stream's end a read may start and still belong to it.
pub const SLACK: u64 = 8 << 20;
/// Bytes a stream covers before it is fetched ahead of.
pub const MIN_RUN: u64 = 2 << 20;

/// How far ahead of a stream to fetch, and in what steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// What all the streams share (see `Stream::window`).
    pub max: u64,
    /// The least any stream gets, and a new stream's window.
    pub min: u64,
    /// The least a stream is topped up by (at most half its window).
    pub step: u64,
}

impl Window {
    /// Advice into the page cache ([`Fetcher`]): deep, in half windows, so
    /// the resolving is paid once per few MiB.
    pub const ADVISED: Window = Window {
        max: WINDOW,
        min: WINDOW_MIN,
        step: u64::MAX,
    };

    /// Staging into a pool of `capacity` bytes (`crate::staging`), topped
    /// up chunk by chunk as the reader frees slots. Half the pool: the
    /// other half holds what the kernel has already asked for behind the
    /// window (4 MiB per reader, `crate::mount`) and what is being copied
    /// out. The fragmented chain, cold, fio, 4 rounds, per round against
    /// the flat file read directly: one reader 3.43x with half the pool,
    /// 2.87x with all of it; four readers 1.90x against 1.83x.
    pub fn staged(capacity: u64) -> Window {
        Window {
            max: capacity / 2,
            min: (capacity / 8).max(crate::staging::CHUNK),
            step: crate::staging::CHUNK,
        }
    }
}

/// The streams that share one [`WINDOW`]: a count of those being fetched
/// ahead of now. Clones count together.
#[derive(Debug, Default, Clone)]
pub struct Streams(Arc<AtomicUsize>);

impl Streams {
    /// How many streams are being fetched ahead of.
    pub fn active(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// One handle's read pattern.
#[derive(Debug)]
pub struct Stream {
    /// Where the current stream began.
    start: u64,
    /// The furthest end of a read in it.
    next: u64,
    /// Fetched ahead up to here.
    ahead: u64,
    /// Bytes read in it (not its span: a few reads scattered within
    /// `SLACK` of each other are no stream).
    read: u64,
    /// The streams this one shares the window with ...
    shared: Streams,
    /// ... and whether it counts among them (it is being fetched ahead
    /// of). Dropping the stream, or its end, takes it out.
    counted: bool,
    limits: Window,
}

impl Default for Stream {
    fn default() -> Stream {
        Stream::new(&Streams::default())
    }
}

impl Stream {
    /// A stream fetched ahead by advice ([`Window::ADVISED`]), sharing
    /// [`WINDOW`] with every other of `shared`.
    pub fn new(shared: &Streams) -> Stream {
        Stream::with_window(shared, Window::ADVISED)
    }

    /// A stream whose windows follow `limits`.
    pub fn with_window(shared: &Streams, limits: Window) -> Stream {
        Stream {
            start: 0,
            next: 0,
            ahead: 0,
            read: 0,
            shared: shared.clone(),
            counted: false,
            limits,
        }
    }

    /// Only `[.., end)` of the range [`on_read`](Self::on_read) returned
    /// was fetched (the staging pool was full): ask for the rest again.
    pub fn fetched_to(&mut self, end: u64) {
        self.ahead = self.ahead.min(end);
    }

    /// Note a read of `len` bytes at `offset` of a file of `size` bytes;
    /// returns the range `(offset, len)` to fetch ahead now, if any.
    pub fn on_read(&mut self, offset: u64, len: u64, size: u64) -> Option<(u64, u64)> {
        let end = offset.saturating_add(len).min(size);
        let near = offset.saturating_add(SLACK) >= self.next
            && offset <= self.next.saturating_add(SLACK)
            && offset >= self.start;
        if !near || self.next == 0 {
            self.uncount();
            self.start = offset;
            self.next = end;
            self.ahead = end;
            self.read = end.saturating_sub(offset);
            return None;
        }
        self.next = self.next.max(end);
        self.read = self.read.saturating_add(end.saturating_sub(offset));
        if self.read < MIN_RUN {
            return None;
        }
        if !self.counted {
            self.counted = true;
            self.shared.0.fetch_add(1, Ordering::Relaxed);
        }
        let window = self.window();
        let from = self.ahead.max(self.next);
        let to = self.next.saturating_add(window).min(size);
        if to <= from || to - from < self.limits.step.min(window / 2) && to < size {
            return None;
        }
        self.ahead = to;
        Some((from, to - from))
    }

    /// How far ahead of this stream to fetch: four times what it has
    /// read, at least the least window ([`WINDOW_MIN`] for advice), at most
    /// its share of what all share ([`WINDOW`]).
    ///
    /// Deep because a fragmented chain's data is ~1 MiB pieces spread
    /// over several files: the disk gets them as small requests and needs
    /// many in flight to come near its sequential rate. Shared because
    /// more in flight than that made it slower (the bench's fragmented
    /// chain, cold, fio, 6 rounds each: one reader 128 MiB ahead 1,045
    /// MiB/s against 874 at 32 MiB; four readers 128 MiB ahead each 805
    /// against 930 at 32 MiB).
    fn window(&self) -> u64 {
        let Window { max, min, .. } = self.limits;
        let share = max / self.shared.active().max(1) as u64;
        self.read.saturating_mul(4).min(share).clamp(min, max)
    }

    fn uncount(&mut self) {
        if std::mem::take(&mut self.counted) {
            self.shared.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.uncount();
    }
}

/// A range to fetch ahead: the chain as seen from `layers[from..]`,
/// `len` bytes at `offset`.
type Job = (Layers, usize, u64, u64);

/// Jobs queued for the worker at most; more are dropped (the reader is
/// then far ahead of the disk anyway).
const QUEUE: usize = 4;

/// The worker that resolves and advises ranges ahead of sequential
/// readers, off the request path. It ends when the `Fetcher` is dropped.
#[derive(Debug)]
pub struct Fetcher {
    tx: SyncSender<Job>,
}

impl Fetcher {
    /// Start the worker thread; `None` (logged) if it cannot be started,
    /// and reads then go without read-ahead.
    pub fn start() -> Option<Fetcher> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("read-ahead".into())
            .spawn(move || {
                for (layers, from, offset, len) in rx {
                    crate::image::will_need(&layers, from, offset, len);
                }
            });
        match spawned {
            Ok(_) => Some(Fetcher { tx }),
            Err(e) => {
                log::warn!("no read-ahead: cannot start its thread: {e}");
                None
            }
        }
    }

    /// Queue `len` bytes at `offset` of the chain `layers[from..]`. Never
    /// waits: a full queue drops the job.
    pub fn fetch(&self, layers: Layers, from: usize, offset: u64, len: u64) {
        log::trace!("read-ahead: {len} bytes at {offset}");
        let _ = self.tx.try_send((layers, from, offset, len));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const SIZE: u64 = 1 << 30;

    /// Feed `reads` of `len` bytes; the ranges fetched.
    fn feed(s: &mut Stream, reads: impl IntoIterator<Item = u64>, len: u64) -> Vec<(u64, u64)> {
        reads
            .into_iter()
            .filter_map(|o| s.on_read(o, len, SIZE))
            .collect()
    }

    #[test]
    fn a_sequential_reader_is_fetched_ahead_in_half_windows_without_gaps() {
        let mut s = Stream::default();
        let got = feed(&mut s, (0..64).map(|i| i * MIB), MIB);
        // Nothing for the first 2 MiB, then the first window, then at
        // least half windows.
        assert_eq!(got[0], (2 * MIB, WINDOW_MIN));
        assert!(got.len() > 2, "{got:?}");
        for w in got.windows(2) {
            assert_eq!(w[0].0 + w[0].1, w[1].0, "contiguous: {got:?}");
            assert!(w[1].1 >= WINDOW_MIN / 2);
        }
        // 64 MiB read: the window is 4 x 64 MiB, capped at `WINDOW`, and
        // at least half of it is fetched ahead of the reader.
        let (o, l) = *got.last().unwrap();
        assert!(o + l >= 64 * MIB + WINDOW / 2, "{got:?}");
    }

    #[test]
    fn the_window_grows_with_the_stream_up_to_its_cap() {
        let mut s = Stream::default();
        // How far ahead of the reader's end the fetched range reaches,
        // after each 1 MiB read.
        let ahead: Vec<u64> = (0..200)
            .map(|i| {
                s.on_read(i * MIB, MIB, SIZE);
                s.ahead.saturating_sub((i + 1) * MIB)
            })
            .collect();
        // A short stream (8 MiB read) has at most the first window ahead.
        assert!(ahead[..8].iter().all(|&a| a <= WINDOW_MIN), "{ahead:?}");
        // A long one goes deeper, never past the cap.
        assert!(
            ahead[100..].iter().all(|&a| a > WINDOW_MIN && a <= WINDOW),
            "{ahead:?}"
        );
    }

    #[test]
    fn streams_share_the_window_and_one_that_ends_gives_its_share_back() {
        let shared = Streams::default();
        let long = |k: u64| {
            let mut s = Stream::new(&shared);
            feed(&mut s, (0..100).map(|i| k * 64 * MIB + i * MIB), MIB);
            s
        };
        let mut a = long(0);
        assert_eq!(shared.active(), 1);
        assert_eq!(a.window(), WINDOW, "alone: the whole window");
        let mut others: Vec<Stream> = (1..4).map(long).collect();
        assert_eq!(shared.active(), 4);
        assert_eq!(a.window(), WINDOW / 4, "four share it");
        let last = &others[2];
        assert!(last.ahead - last.next <= WINDOW / 4, "{last:?}");
        // A jump ends a stream, and so does dropping it (a closed handle).
        assert_eq!(others[0].on_read(900 * MIB, 4096, SIZE), None);
        assert_eq!(shared.active(), 3);
        others.pop();
        assert_eq!(shared.active(), 2);
        assert_eq!(a.window(), WINDOW / 2);
        // Never below the least window, however many share it.
        let many: Vec<Stream> = (4..12).map(long).collect();
        assert_eq!(shared.active(), 10);
        assert_eq!(a.window(), WINDOW_MIN);
        drop(many);
        drop(others);
        assert_eq!(a.on_read(0, 4096, SIZE), None);
        assert_eq!(shared.active(), 0, "nothing left counted");
    }

    #[test]
    fn random_reads_fetch_nothing() {
        let mut s = Stream::default();
        // A fixed pseudo-random walk of 4 KiB reads over 1 GiB.
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let offs = (0..10_000).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (SIZE / 4096)) * 4096
        });
        assert_eq!(feed(&mut s, offs, 4096), vec![]);
    }

    #[test]
    fn small_reads_scattered_near_each_other_fetch_nothing() {
        let mut s = Stream::default();
        // 4 KiB reads, each a few MiB past the last: near, but no stream.
        let got = feed(&mut s, (0..200).map(|i| i * 3 * MIB), 4096);
        assert_eq!(got, vec![]);
    }

    #[test]
    fn requests_slightly_out_of_order_stay_one_stream() {
        let mut s = Stream::default();
        let offs = [0, 1, 3, 2, 5, 4, 6, 7].map(|i| i * MIB);
        let got = feed(&mut s, offs, MIB);
        assert_eq!(got.len(), 1, "{got:?}");
    }

    #[test]
    fn a_jump_starts_a_new_stream_and_the_end_of_the_file_stops_it() {
        let mut s = Stream::default();
        assert!(!feed(&mut s, (0..4).map(|i| i * MIB), MIB).is_empty());
        // A jump far away: nothing until 2 MiB of the new stream are
        // read, then up to the end of the file.
        let far = SIZE - 8 * MIB;
        assert_eq!(s.on_read(far, MIB, SIZE), None);
        assert_eq!(
            s.on_read(far + MIB, MIB, SIZE),
            Some((far + 2 * MIB, 6 * MIB))
        );
        // Fetched to the end: nothing more.
        assert_eq!(feed(&mut s, (3..8).map(|i| far + i * MIB), MIB), vec![]);
    }
}
