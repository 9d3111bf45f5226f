//! `FlatImage`: the flattened view of a chain, the resolver.
//!
//! A read walks the layers top-down for each run: the leaf's `map()` either
//! holds the bytes, declares them zero, or passes a (possibly shorter) run
//! to its parent. The data I/O then happens with `pread` on the one layer
//! that holds the run, outside any lock, so reads of different blocks run in
//! parallel. Every byte of a read is produced by a decision here: data from
//! a layer or explicit zeros; the caller's buffer is never trusted.
//!
//! [`will_need`] resolves a range ahead of a reader without reading it and
//! asks each layer to start reading the runs it holds (the sequential
//! readers of a layer view or of the nbdkit plugin, `crate::readahead`);
//! bulk work (export, merge) plans its own. A mount's `disk.raw` stages its
//! sequential readers' next MiBs in memory instead ([`FlatImage::stage_ahead`],
//! `crate::staging`): the image loads them with `O_DIRECT` where the layer
//! files allow (`crate::direct`), serves reads from them, and drops them
//! whenever a write changes the view under them.
//!
//! The layer list sits behind an `RwLock<Arc<..>>`: a read takes a snapshot
//! (one brief read lock) and works on it, so a merge can swap in a new chain
//! atomically while reads are in flight. Beside the list sits its cache of
//! resolved runs (`crate::runs`): a read of the flat view looks there first
//! and walks the layers only on a miss, so it costs the same at any depth;
//! every write to the leaf drops the runs of what it wrote.

use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock};

use crate::cache::MetaCache;
use crate::chain::Chain;
use crate::direct::DirectFile;
use crate::error::{Error, ErrorKind, Result};
use crate::format::{Extent, Layer};
use crate::runs::RunCache;
use crate::staging::{Loader, Staging};

pub type Layers = Arc<[Arc<dyn Layer>]>;

/// Where a run of the flat image comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Stored in `layers[depth]` at `file_offset`.
    Data { depth: usize, file_offset: u64 },
    /// Held by `layers[depth]` in a form it decodes (`Layer::read_encoded`).
    Encoded { depth: usize },
    /// No layer holds it, or a layer declares it zero.
    Zero,
}

impl Source {
    /// The same run seen `by` bytes further in: a `Data` source's file
    /// offset moves along; other sources are the same anywhere in the run.
    pub fn advanced(self, by: u64) -> Source {
        match self {
            Source::Data { depth, file_offset } => Source::Data {
                depth,
                file_offset: file_offset + by,
            },
            other => other,
        }
    }

    /// Fill `buf` with the run's bytes at virtual `offset` (the run's
    /// start, or a point inside it with `file_offset` advanced alike).
    pub fn read(&self, layers: &[Arc<dyn Layer>], offset: u64, buf: &mut [u8]) -> Result<()> {
        match *self {
            Source::Data { depth, file_offset } => layers[depth].read_data(file_offset, buf),
            Source::Encoded { depth } => layers[depth].read_encoded(offset, buf),
            Source::Zero => {
                buf.fill(0);
                Ok(())
            }
        }
    }
}

/// Where a run comes from when only `layers[from..to]` are asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    Data {
        depth: usize,
        file_offset: u64,
    },
    Encoded {
        depth: usize,
    },
    Zero,
    /// None of the asked layers holds it: it comes from `layers[to..]`.
    Below,
}

/// Resolve the run at `offset` (at most `len` bytes) walking `layers[from..to]`.
/// Returns the span and the run length (> 0 when `len > 0`).
pub fn resolve_span(
    layers: &[Arc<dyn Layer>],
    from: usize,
    to: usize,
    offset: u64,
    len: u64,
) -> Result<(Span, u64)> {
    let mut len = len;
    for (depth, layer) in layers.iter().enumerate().take(to).skip(from) {
        match layer.map(offset, len)? {
            Extent::Data { file_offset, len } => {
                return Ok((Span::Data { depth, file_offset }, len))
            }
            Extent::Encoded { len } => return Ok((Span::Encoded { depth }, len)),
            Extent::Zero { len } => return Ok((Span::Zero, len)),
            Extent::Parent { len: l } => len = l,
        }
    }
    Ok((Span::Below, len))
}

/// Resolve the run at `offset` (at most `len` bytes) starting the walk at
/// `from` (0 = the leaf). Returns the source and the run length (> 0).
pub fn resolve(
    layers: &[Arc<dyn Layer>],
    from: usize,
    offset: u64,
    len: u64,
) -> Result<(Source, u64)> {
    Ok(
        match resolve_span(layers, from, layers.len(), offset, len)? {
            (Span::Data { depth, file_offset }, n) => (Source::Data { depth, file_offset }, n),
            (Span::Encoded { depth }, n) => (Source::Encoded { depth }, n),
            (Span::Zero | Span::Below, n) => (Source::Zero, n),
        },
    )
}

/// Fill `buf` with the flattened bytes at `offset` as seen from `layers[from..]`.
pub fn read_layers(
    layers: &[Arc<dyn Layer>],
    from: usize,
    offset: u64,
    buf: &mut [u8],
) -> Result<()> {
    read_runs(
        offset,
        buf,
        |at, want| resolve(layers, from, at, want),
        |src, at, piece| src.read(layers, at, piece),
    )
}

/// Fill `buf` at `offset` run by run: each run found by `resolve(at, want)`,
/// its bytes read by `read(source, at, piece)`.
fn read_runs(
    offset: u64,
    buf: &mut [u8],
    mut resolve: impl FnMut(u64, u64) -> Result<(Source, u64)>,
    mut read: impl FnMut(Source, u64, &mut [u8]) -> Result<()>,
) -> Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let at = offset + done as u64;
        let want = (buf.len() - done) as u64;
        let (src, n) = resolve(at, want)?;
        let n = n.min(want) as usize;
        read(src, at, &mut buf[done..done + n])?;
        done += n;
    }
    Ok(())
}

/// Largest piece of one `Layer::will_need` call: the kernel reads at most
/// its read-ahead size per advice, so a long run is advised in pieces.
const ADVICE: u64 = 2 << 20;

/// A run this long, contiguous in one layer's file, is not advised: the
/// kernel's own read-ahead, which the reader's `pread`s of it start, reads
/// it better. Advice reads into single pages, so a disk request holds at
/// most `max_segments` of them (~1 MiB on this virtio disk); the kernel's
/// sequential read-ahead reads large folios, 2-4 MiB per request. Measured
/// on the bench's 1 GiB flat file through the mount (cold fio, 6 rounds
/// each, medians): 1 reader 0.77x -> 0.91x a direct read, 4 readers 0.76x
/// -> 0.93x. Short runs (a fragmented chain's ~1 MiB pieces, scattered in
/// their files) look random to the kernel, and advising them all at once
/// is what keeps the disk busy, so they are still advised.
const KERNEL_RUN: u64 = 8 << 20;

/// Start reading what a read of `[offset, offset + len)` as seen from
/// `layers[from..]` will need into the page cache, without waiting: each
/// layer's tables for the range (`Layer::prefetch`), then the data of every
/// run, contiguous runs of one layer as one advice per [`ADVICE`] bytes,
/// every layer's reads queued before any completes; a run of
/// [`KERNEL_RUN`] or more is left to the kernel's read-ahead. Best effort:
/// a run that cannot be resolved ends the walk (the read itself reports the
/// error). For sequential readers of the mount (`crate::readahead`).
pub fn will_need(layers: &[Arc<dyn Layer>], from: usize, offset: u64, len: u64) {
    for l in layers.iter().skip(from) {
        l.prefetch(offset, len);
    }
    // The pending advice: (depth, file offset, length).
    let mut run: Option<(usize, u64, u64)> = None;
    let advise = |r: Option<(usize, u64, u64)>| {
        if let Some((depth, mut fo, mut n)) = r.filter(|&(_, _, n)| n < KERNEL_RUN) {
            while n > 0 {
                let piece = n.min(ADVICE);
                layers[depth].will_need(fo, piece);
                fo += piece;
                n -= piece;
            }
        }
    };
    let end = offset.saturating_add(len);
    let mut off = offset;
    while off < end {
        let Ok((src, n)) = resolve(layers, from, off, end - off) else {
            break;
        };
        if let Source::Data { depth, file_offset } = src {
            match &mut run {
                Some((d, fo, l)) if *d == depth && *fo + *l == file_offset => *l += n,
                _ => advise(run.replace((depth, file_offset, n))),
            }
        }
        off += n;
    }
    advise(run);
}

/// Resolve the run at `offset` as seen from the leaf, through `runs`: a
/// miss walks the layers up to the end of the granule (so the run it keeps
/// serves the reads after it, and never crosses a granule) and keeps the
/// result. The run returned is at most `len` bytes long (> 0 when
/// `len > 0`); `size` is the virtual size.
fn resolve_cached(
    layers: &[Arc<dyn Layer>],
    runs: &RunCache,
    size: u64,
    offset: u64,
    len: u64,
) -> Result<(Source, u64)> {
    if offset >= size || len == 0 {
        return resolve(layers, 0, offset, len);
    }
    if let Some((src, n)) = runs.get(offset) {
        return Ok((src, n.min(len)));
    }
    let epoch = runs.epoch();
    let end = runs.granule_end(offset).min(size);
    let (src, n) = resolve(layers, 0, offset, end - offset)?;
    runs.insert(epoch, offset, n, src);
    Ok((src, n.min(len)))
}

/// One layer list, the runs resolved in it, and its layers' files
/// reopened for direct reads (opened on first use; closed with the list,
/// so a merge that retires a layer leaves no descriptor keeping its space).
struct View {
    layers: Layers,
    runs: RunCache,
    size: u64,
    direct: Vec<OnceLock<Option<DirectFile>>>,
}

impl View {
    fn new(layers: Layers, granule_shift: u32) -> Arc<View> {
        Arc::new(View {
            size: layers.first().map_or(0, |l| l.virtual_size()),
            direct: layers.iter().map(|_| OnceLock::new()).collect(),
            layers,
            runs: RunCache::new(granule_shift),
        })
    }

    /// Read a `Data` run of `layers[depth]` at `file_offset`: directly
    /// where the file allows it, the rest through `Layer::read_data`.
    fn read_data(&self, depth: usize, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        let layer = &self.layers[depth];
        let mut got = 0;
        if let Some(d) = self
            .direct_file(depth)
            .filter(|d| d.fits(file_offset, buf) && !d.mostly_cached(file_offset, buf.len() as u64))
        {
            // An error here (EIO, or a file system that takes direct I/O
            // only in part) is read again the ordinary way below, which
            // reports it with its context if it is real.
            match d.read(file_offset, buf) {
                Ok(n) => got = n,
                Err(e) => log::debug!(
                    "{}: direct read at {file_offset}: {e}",
                    layer.path().display()
                ),
            }
        }
        if got < buf.len() {
            layer.read_data(file_offset + got as u64, &mut buf[got..])?;
        }
        Ok(())
    }

    /// Can `layers[depth]`'s data be read directly at all?
    fn reads_directly(&self, depth: usize) -> bool {
        self.direct_file(depth).is_some()
    }

    /// `layers[depth]`'s file reopened for direct reads, on first use.
    fn direct_file(&self, depth: usize) -> Option<&DirectFile> {
        self.direct[depth]
            .get_or_init(|| self.layers[depth].data_file().and_then(DirectFile::open))
            .as_ref()
    }

    /// Fill `buf` with the run `src`'s bytes at virtual `offset`, `Data`
    /// runs read directly where they can be.
    fn read_source(&self, src: Source, offset: u64, buf: &mut [u8]) -> Result<()> {
        match src {
            Source::Data { depth, file_offset } => self.read_data(depth, file_offset, buf),
            other => other.read(&self.layers, offset, buf),
        }
    }
}

/// One layer list of an image, fixed for as long as it is held, for bulk
/// readers that resolve a range and then read its runs (export and
/// conversion): `Data` runs are read around the page cache where the
/// layer's file allows it (`crate::direct`), into the caller's buffer. A
/// bulk copy reads each byte once, so caching it would only push the
/// user's own files out of memory; and a direct read into a buffer of huge
/// pages reaches the disk as a few large requests where advised reads
/// become many scattered single pages. The direct read sees data another
/// process wrote through the page cache: the kernel writes dirty pages of
/// the range back first.
pub struct Snapshot {
    view: Arc<View>,
}

impl Snapshot {
    /// The layer list, leaf first: the depths in `Source::Data` index it.
    pub fn layers(&self) -> &Layers {
        &self.view.layers
    }

    /// Is `layers()[depth]` read directly? (If not, its reads go through
    /// the page cache, and advising them ahead pays.)
    pub fn reads_directly(&self, depth: usize) -> bool {
        self.view.reads_directly(depth)
    }

    /// Fill `buf` with the bytes of the run `src` (resolved in
    /// [`layers`](Self::layers)) at virtual `offset`.
    pub fn read(&self, src: Source, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.view.read_source(src, offset, buf)
    }
}

impl Loader for View {
    /// The view's bytes at `offset`, data read directly where it can be.
    fn load(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        read_runs(
            offset,
            buf,
            |at, want| resolve_cached(&self.layers, &self.runs, self.size, at, want),
            |src, at, piece| self.read_source(src, at, piece),
        )
    }
}

pub struct FlatImage {
    view: RwLock<Arc<View>>,
    size: u64,
    /// Serialises read-modify-write of partial sectors.
    rmw: Mutex<()>,
    /// Every write holds the read side for its whole length; a merge that
    /// retires the leaf holds the write side while it switches.
    write_gate: RwLock<()>,
    /// While a merge copies out of the leaf: the ranges written since.
    dirty: Mutex<Option<Vec<(u64, u64)>>>,
    cache: Arc<MetaCache>,
    /// Sequential readers' next MiBs, in memory (a mount's `disk.raw`).
    staging: Option<Staging>,
}

impl FlatImage {
    pub fn new(chain: &Chain) -> FlatImage {
        FlatImage {
            view: RwLock::new(View::new(
                chain.layers.clone().into(),
                crate::runs::GRANULE_SHIFT,
            )),
            size: chain.virtual_size(),
            rmw: Mutex::new(()),
            write_gate: RwLock::new(()),
            dirty: Mutex::new(None),
            cache: chain.cache.clone(),
            staging: None,
        }
    }

    /// The same image with a staging pool of `bytes` for sequential
    /// readers (`crate::staging`); without one if `bytes` holds no chunk
    /// or the pool cannot be started.
    pub fn with_staging(mut self, bytes: u64) -> FlatImage {
        self.staging = Staging::start(bytes);
        self
    }

    /// Bytes reads took from the staging pool so far.
    pub fn staged_served(&self) -> u64 {
        self.staging.as_ref().map_or(0, Staging::served)
    }

    /// Bytes the staging pool holds at most (0: no pool).
    pub fn staging_capacity(&self) -> u64 {
        self.staging.as_ref().map_or(0, Staging::capacity)
    }

    /// Stage `[offset, offset + len)` for a sequential reader, as far as
    /// the pool has room; returns where that stopped (`offset` without a
    /// pool).
    pub fn stage_ahead(&self, offset: u64, len: u64) -> u64 {
        match &self.staging {
            Some(s) => {
                let view: Arc<dyn Loader> = self.view();
                let end = s.want(&view, offset, len, self.size);
                log::trace!("stage {len} bytes at {offset}: up to {end}");
                end
            }
            None => offset,
        }
    }

    /// The same image with run-cache granules of `1 << shift` bytes (tests
    /// use granules of a few sectors, so runs meet granule edges).
    #[cfg(test)]
    pub fn with_granule_shift(self, shift: u32) -> FlatImage {
        *self.view.write() = View::new(self.layers(), shift);
        self
    }

    /// Start (or stop) recording written ranges (a merge out of the leaf).
    pub fn track_writes(&self, on: bool) {
        *self.dirty.lock() = on.then(Vec::new);
    }

    /// The ranges written since the last call (while tracking).
    pub fn take_dirty(&self) -> Vec<(u64, u64)> {
        self.dirty
            .lock()
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Hold off every write until the guard is dropped.
    pub fn pause_writes(&self) -> parking_lot::RwLockWriteGuard<'_, ()> {
        self.write_gate.write()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The metadata cache the layers share.
    pub fn cache(&self) -> Arc<MetaCache> {
        self.cache.clone()
    }

    fn view(&self) -> Arc<View> {
        self.view.read().clone()
    }

    /// The current layer list, leaf first.
    pub fn layers(&self) -> Layers {
        self.view().layers.clone()
    }

    /// The current layer list, held for a bulk read ([`Snapshot`]).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot { view: self.view() }
    }

    /// Replace the layer list (used by merges); readers see old or new.
    /// The new list starts with no resolved runs (`crate::runs`).
    pub fn swap_layers(&self, layers: Layers) {
        let mut view = self.view.write();
        *view = View::new(layers, view.runs.granule_shift());
    }

    /// The leaf changed over `[offset, offset + len)`: drop the runs
    /// resolved there. Called after the change, failed or not (a write that
    /// failed half-way may have changed the map).
    fn changed(&self, offset: u64, len: u64) {
        self.view().runs.invalidate(offset, len);
        if let Some(s) = &self.staging {
            s.invalidate(offset, len);
        }
    }

    /// Read at `offset`; returns the bytes read, short only at the end.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.size - offset) as usize;
        let staged = self
            .staging
            .as_ref()
            .map_or(0, |s| s.take(offset, &mut buf[..n]));
        log::trace!("read {n} bytes at {offset}: {staged} staged");
        let view = self.view();
        read_runs(
            offset + staged as u64,
            &mut buf[staged..n],
            |at, want| resolve_cached(&view.layers, &view.runs, self.size, at, want),
            |src, at, piece| src.read(&view.layers, at, piece),
        )?;
        Ok(n)
    }

    /// The run at `offset`: its source and length.
    pub fn resolve(&self, offset: u64, len: u64) -> Result<(Source, u64)> {
        let view = self.view();
        resolve_cached(&view.layers, &view.runs, self.size, offset, len)
    }

    /// Write `data` at `offset` into the leaf. Partial sectors are merged
    /// with the flattened content first (read-modify-write).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let _gate = self.write_gate.read();
        self.write_inner(offset, data)?;
        if let Some(d) = self.dirty.lock().as_mut() {
            d.push((offset, data.len() as u64));
        }
        Ok(())
    }

    /// Write to the leaf, then drop the runs resolved over what changed.
    fn write_inner(&self, offset: u64, data: &[u8]) -> Result<()> {
        let r = self.write_leaf(offset, data);
        self.changed(offset, data.len() as u64);
        r
    }

    fn write_leaf(&self, offset: u64, data: &[u8]) -> Result<()> {
        let layers = self.layers();
        let leaf = &layers[0];
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "{}: write of {} bytes at {offset} ends past the virtual size {}",
                        leaf.path().display(),
                        data.len(),
                        self.size
                    ),
                )
            })?;
        if data.is_empty() {
            return Ok(());
        }
        if leaf.write_fill(offset, data.len() as u64)?.is_some() {
            // The leaf stores larger units than the write covers: fill the
            // rest of them from the flattened view, serialised with every
            // other such write (the content read must not change before it
            // is written back).
            let _g = self.rmw.lock();
            if let Some((s, e)) = leaf.write_fill(offset, data.len() as u64)? {
                let e = e.min(self.size);
                let mut buf = vec![0u8; (e - s) as usize];
                read_layers(&layers, 0, s, &mut buf)?;
                let at = (offset - s) as usize;
                buf[at..at + data.len()].copy_from_slice(data);
                // The whole unit moved into the leaf, not only the write.
                let r = leaf.write_sectors(s, &buf);
                self.changed(s, e - s);
                return r;
            }
        }
        let ss = leaf.sector_size() as u64;
        let head = offset % ss;
        let tail = end % ss;
        if head == 0 && tail == 0 {
            return leaf.write_sectors(offset, data);
        }
        // Whole sectors in the middle go straight through; the partial
        // first/last sectors are merged with what the chain shows now.
        let _g = self.rmw.lock();
        let first_full = offset.next_multiple_of(ss);
        let last_full = end - tail;
        if first_full >= last_full && offset / ss == (end - 1) / ss {
            let s = offset - head;
            let mut sec = vec![0u8; ss as usize];
            read_layers(&layers, 0, s, &mut sec)?;
            sec[head as usize..(head as usize + data.len())].copy_from_slice(data);
            return leaf.write_sectors(s, &sec);
        }
        if head != 0 {
            let s = offset - head;
            let mut sec = vec![0u8; ss as usize];
            read_layers(&layers, 0, s, &mut sec)?;
            let n = (ss - head) as usize;
            sec[head as usize..].copy_from_slice(&data[..n]);
            leaf.write_sectors(s, &sec)?;
        }
        if last_full > first_full {
            let a = (first_full - offset) as usize;
            let b = (last_full - offset) as usize;
            leaf.write_sectors(first_full, &data[a..b])?;
        }
        if tail != 0 {
            let mut sec = vec![0u8; ss as usize];
            read_layers(&layers, 0, last_full, &mut sec)?;
            let a = (last_full - offset) as usize;
            sec[..tail as usize].copy_from_slice(&data[a..]);
            leaf.write_sectors(last_full, &sec)?;
        }
        Ok(())
    }

    /// Make `[offset, offset+len)` read as zeros (discard, write zeroes):
    /// whole sectors go to the leaf's discard, partial ones are zero-written.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _gate = self.write_gate.read();
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(());
        }
        let leaf = self.layers()[0].clone();
        let ss = leaf.discard_unit().max(leaf.sector_size() as u64);
        let first_full = offset.next_multiple_of(ss).min(end);
        let last_full = (end - end % ss).max(first_full);
        if first_full > offset {
            self.write_inner(offset, &vec![0u8; (first_full - offset) as usize])?;
        }
        if last_full > first_full {
            let r = leaf.discard(first_full, last_full - first_full);
            self.changed(first_full, last_full - first_full);
            r?;
        }
        if end > last_full {
            self.write_inner(last_full, &vec![0u8; (end - last_full) as usize])?;
        }
        if let Some(d) = self.dirty.lock().as_mut() {
            d.push((offset, end - offset));
        }
        Ok(())
    }

    /// Copy-on-read: store in the leaf the whole sectors of
    /// `[offset, offset+len)` that come from a parent, so later reads stop
    /// there. Holds writes off meanwhile, so a newer write is never covered
    /// by older parent data; the flattened content does not change.
    pub fn copy_up(&self, offset: u64, len: u64) -> Result<()> {
        let layers = self.layers();
        let ss = layers[0].sector_size() as u64;
        let mut off = offset.next_multiple_of(ss);
        let end = (offset + len).min(self.size);
        let end = end - end % ss;
        if layers.len() < 2 || off >= end {
            return Ok(());
        }
        let _gate = self.write_gate.write();
        let layers = self.layers();
        let mut buf = Vec::new();
        while off < end {
            let (src, n) = resolve(&layers, 0, off, end - off)?;
            // Stored or encoded (qcow2 compressed clusters) in a parent:
            // either way the decoded bytes go up.
            if let Source::Data { depth, .. } | Source::Encoded { depth } = src {
                if depth > 0 {
                    buf.resize(n as usize, 0);
                    src.read(&layers, off, &mut buf)?;
                    // Through the fill path: the leaf may store larger
                    // units than the run (`Layer::write_fill`).
                    self.write_inner(off, &buf)?;
                }
            }
            off += n;
        }
        Ok(())
    }

    pub fn flush(&self) -> Result<()> {
        let _gate = self.write_gate.read();
        self.layers()[0].flush()
    }
}
