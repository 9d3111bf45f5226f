//! Disk formats behind one trait.
//!
//! A [`Layer`] is one file of a chain. It answers "where do the bytes at this
//! virtual offset live?" with an [`Extent`] and never decides anything about
//! other layers: `Parent` means "not here, ask the layer below". The resolver
//! (`crate::image`) walks the chain and does the data I/O.
//!
//! ```text
//!   FlatImage ──read_at──▶ layers[0].map() ─Parent─▶ layers[1].map() ─Data─▶ pread(layers[1])
//!                                        └─Data──▶ pread(layers[0])   └─Zero─▶ fill zeros
//! ```
//!
//! Writes go to the leaf only, whole logical sectors at a time: the resolver
//! turns a partial-sector write into a read-modify-write before calling
//! [`Layer::write_sectors`].

pub mod fileio;
pub mod hint;
#[cfg(test)]
pub mod mem;
pub mod pending;
pub mod probe;
pub mod space;
pub mod vhd;
pub mod vhdx;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::cache::MetaCache;
use crate::error::{Error, ErrorKind, IoContext, Result};

/// Where one run of virtual bytes lives in a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// `len` bytes stored in this layer's file at `file_offset`.
    Data { file_offset: u64, len: u64 },
    /// `len` bytes that read as zeros, whatever lies below.
    Zero { len: u64 },
    /// `len` bytes this layer does not hold: read them from the parent.
    Parent { len: u64 },
}

impl Extent {
    pub fn len(&self) -> u64 {
        match *self {
            Extent::Data { len, .. } | Extent::Zero { len } | Extent::Parent { len } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The formats chainfs knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Vhd,
    Vhdx,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Vhd => "vhd",
            Format::Vhdx => "vhdx",
        })
    }
}

/// How a layer stores its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl std::fmt::Display for DiskType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        })
    }
}

/// One way a child names its parent, as stored in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParentHint {
    /// Where the hint came from: `W2ru`, `W2ku`, `MacX`, `name`, ...
    pub source: String,
    /// The text as stored.
    pub stored: String,
    /// The local path it stands for, if it can stand for one.
    pub path: Option<PathBuf>,
}

/// What a differencing layer says about its parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParentLink {
    /// The identity the parent must carry (VHD: footer unique id; VHDX:
    /// the parent's DataWriteGuid, `parent_linkage`).
    pub id: uuid::Uuid,
    /// A second accepted identity (VHDX `parent_linkage2`, used while a
    /// merge changes the parent).
    pub alt_id: Option<uuid::Uuid>,
    /// Candidate locations in the order they are tried.
    pub hints: Vec<ParentHint>,
}

/// A summary of one layer, for `info`, `chain` and checks.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    pub format: Format,
    pub disk_type: DiskType,
    pub virtual_size: u64,
    pub block_size: Option<u64>,
    pub sector_size: u32,
    pub unique_id: uuid::Uuid,
    pub parent_id: Option<uuid::Uuid>,
    pub creator: String,
}

/// One file of a chain. Implementations are `Send + Sync` and take `&self`:
/// many threads read at once with positional I/O.
pub trait Layer: Send + Sync {
    fn path(&self) -> &Path;
    fn info(&self) -> LayerInfo;

    fn virtual_size(&self) -> u64 {
        self.info().virtual_size
    }

    /// Logical sector size: the unit of `write_sectors`.
    fn sector_size(&self) -> u32 {
        self.info().sector_size
    }

    /// The parent link of a differencing layer, `None` for a base.
    fn parent(&self) -> Option<ParentLink>;

    /// The first run at `offset`, at most `len` bytes long (and never empty
    /// when `len > 0`).
    fn map(&self, offset: u64, len: u64) -> Result<Extent>;

    /// Read `buf.len()` bytes of this layer's file at `file_offset` (an
    /// offset returned in `Extent::Data`).
    fn read_data(&self, file_offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Start reading the tables that `map()` (and, in a layer open for
    /// writing, `write_sectors`) will need for this range (best effort,
    /// asynchronous; for bulk work such as export and merge).
    fn prefetch(&self, _offset: u64, _len: u64) {}

    /// Start reading `len` bytes of this layer's file at `file_offset`
    /// into the page cache (best effort, asynchronous).
    fn will_need(&self, _file_offset: u64, _len: u64) {}

    /// Bytes of file space holding data (allocated blocks).
    fn allocated_bytes(&self) -> Result<u64>;

    /// Is the layer open for writing?
    fn writable(&self) -> bool;

    /// Store whole sectors at `offset` (both multiples of `sector_size`).
    fn write_sectors(&self, offset: u64, data: &[u8]) -> Result<()>;

    /// Make whole sectors at `offset` read as zeros (discard / write
    /// zeroes), even where a parent holds data; free space where possible.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Make every acknowledged write durable.
    fn flush(&self) -> Result<()>;

    /// Structural problems of this file alone, one message per problem
    /// (allocated space no table references counts: a leak).
    fn check(&self) -> Result<Vec<String>>;

    /// Give unused space back to the file system (`chainfs compact`):
    /// blocks holding nothing of their own are unallocated, unreferenced
    /// space is punched out and the unreferenced tail cut off, without
    /// changing what the layer reads. Needs the layer open for writing.
    fn compact(&self) -> Result<space::CompactStats> {
        Err(Error::unsupported(
            self.path(),
            "compact is not supported for this format",
        ))
    }

    /// Bytes of new file space writing the virtual `ranges` (sorted
    /// `(offset, len)`) into this layer would take now, whole blocks (a
    /// merge's pre-flight check); 0 where nothing is allocated on write.
    fn space_for(&self, _ranges: &[(u64, u64)]) -> Result<u64> {
        Ok(0)
    }

    /// Change this process's advisory lock on the file.
    fn set_lock(&self, mode: LockMode) -> Result<()>;

    /// Make this differencing layer's parent `parent` (merges), crash-safely.
    fn set_parent(&self, parent: &dyn Layer) -> Result<()>;

    /// Mark this differencing layer as detached from any parent (a merge
    /// consumed its parent chain): it will no longer open as a chain.
    fn detach(&self) -> Result<()>;

    /// The identity this layer will take at its next user-visible change,
    /// when that changes it (VHDX DataWriteGuid); `None` when writes keep
    /// the identity (VHD). A merge tells the children before writing.
    fn next_identity(&self) -> Option<uuid::Uuid> {
        None
    }

    /// Accept a parent carrying `id` as well as the recorded one (VHDX
    /// `parent_linkage2`); nothing to do for formats without it.
    fn accept_parent_id(&self, _id: uuid::Uuid) -> Result<()> {
        Ok(())
    }
}

/// `(unique id, parent id)` of an image file without locking or fully
/// opening it; `None` when it is not an image chainfs reads.
pub fn peek_ids(path: &Path) -> Option<(uuid::Uuid, Option<uuid::Uuid>)> {
    vhdx::peek_ids(path).or_else(|| vhd::peek_ids(path))
}

/// `(is_set, count)`: the run of equal bits of sector bitmap `bm` from bit
/// `first`, at most `max` long; whole bytes of one value are skipped at
/// once. `msb_first`: bit 0 is `0x80` of byte 0 (VHD), else `0x01` (VHDX).
/// Callers keep `first + max` within the bitmap (`8 * bm.len()` bits).
///
/// ```
/// use chainfs::format::bit_run;
/// // VHD order: sectors 0-2 present in this layer, then 13 absent.
/// let bm = [0b1110_0000, 0x00];
/// assert_eq!(bit_run(&bm, 0, 16, true), (true, 3));
/// assert_eq!(bit_run(&bm, 3, 13, true), (false, 13));
/// assert_eq!(bit_run(&bm, 3, 4, true), (false, 4)); // capped at `max`
/// // The same byte in VHDX order is sectors 5-7.
/// assert_eq!(bit_run(&bm, 0, 16, false), (false, 5));
/// assert_eq!(bit_run(&bm, 5, 11, false), (true, 3));
/// ```
pub fn bit_run(bm: &[u8], first: u64, max: u64, msb_first: bool) -> (bool, u64) {
    let bit = |i: u64| {
        let mask = if msb_first {
            0x80 >> (i % 8)
        } else {
            1 << (i % 8)
        };
        bm[(i / 8) as usize] & mask != 0
    };
    let set = bit(first);
    let full = if set { 0xFF } else { 0x00 };
    let end = first + max;
    let mut i = first;
    while i < end {
        if i % 8 == 0 && i + 8 <= end && bm[(i / 8) as usize] == full {
            i += 8;
            continue;
        }
        if bit(i) != set {
            break;
        }
        i += 1;
    }
    (set, i - first)
}

/// The advisory (`flock`) lock a process holds on a layer file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    Unlocked,
    /// Readers: any number of processes.
    Shared,
    /// A writer: nobody else, not even readers.
    Exclusive,
}

/// Take or change the lock on `file`, never waiting: a conflict is a
/// `Busy` error naming the file.
pub fn lock_file(file: &File, path: &Path, mode: LockMode) -> Result<()> {
    let op = match mode {
        LockMode::Unlocked => libc::LOCK_UN,
        LockMode::Shared => libc::LOCK_SH | libc::LOCK_NB,
        LockMode::Exclusive => libc::LOCK_EX | libc::LOCK_NB,
    };
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(Error::new(
            ErrorKind::Busy,
            format!(
                "{}: in use: {}",
                path.display(),
                if mode == LockMode::Exclusive {
                    "another process has it open (a chainfs mount, merge or write)"
                } else {
                    "another process is writing to it (a writable chainfs mount, merge or write)"
                }
            ),
        ));
    }
    Err(Error::io(path, "cannot lock", None, e))
}

/// How to open one layer.
#[derive(Clone)]
pub struct LayerOptions {
    pub writable: bool,
    /// Accept structures whose checksum is wrong (read-only recovery).
    pub ignore_checksums: bool,
    pub cache: Arc<MetaCache>,
}

/// What `chainfs create` makes.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size of a base disk.
    pub size: Option<u64>,
    pub fixed: bool,
    pub block_size: Option<u64>,
    /// VHDX base: 512 or 4096.
    pub logical_sector: u32,
    /// Make a differencing child of this parent.
    pub parent: Option<PathBuf>,
}

/// The format a new file's name asks for.
pub fn format_for(path: &Path) -> Result<Format> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "vhd" | "avhd" => Ok(Format::Vhd),
        "vhdx" | "avhdx" => Ok(Format::Vhdx),
        _ => Err(Error::invalid(format!(
            "{}: name it .vhd/.avhd (VHD) or .vhdx/.avhdx (VHDX)",
            path.display()
        ))),
    }
}

/// Create a new image (never replacing a file).
pub fn create(path: &Path, o: &CreateOptions) -> Result<()> {
    let format = format_for(path)?;
    let parent = match &o.parent {
        Some(p) => Some(open_layer(
            p,
            &LayerOptions {
                writable: false,
                ignore_checksums: false,
                cache: MetaCache::new(1 << 20),
            },
        )?),
        None => None,
    };
    if let Some(pl) = &parent {
        if pl.info().format != format {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{}: a {format} child of a {} parent is not supported",
                    path.display(),
                    pl.info().format
                ),
            ));
        }
    }
    let size = || {
        o.size
            .ok_or_else(|| Error::invalid("--size is required for a base disk"))
    };
    match format {
        Format::Vhd => {
            // A VHD child takes its parent's block size: readers that work in
            // whole blocks (vhd-lib) read a chain of mixed sizes wrong.
            let inherited = parent.as_ref().and_then(|p| p.info().block_size);
            let bs = u32::try_from(o.block_size.or(inherited).unwrap_or(2 << 20))
                .map_err(|_| Error::invalid("block size too large for VHD"))?;
            match (&o.parent, &parent) {
                (Some(pp), Some(pl)) => {
                    let i = pl.info();
                    vhd::create::create_child(
                        path,
                        &vhd::create::ParentSpec {
                            path: pp,
                            unique_id: i.unique_id,
                            virtual_size: i.virtual_size,
                        },
                        bs,
                    )
                }
                _ => vhd::create::create_base(path, size()?, o.fixed, bs),
            }
        }
        Format::Vhdx => {
            let default_bs = if o.fixed || parent.is_some() {
                2 << 20
            } else {
                32 << 20
            };
            vhdx::create::create(
                path,
                &vhdx::create::VhdxSpec {
                    size: if parent.is_some() { 0 } else { size()? },
                    fixed: o.fixed,
                    block_size: o.block_size.unwrap_or(default_bs),
                    logical_sector: o.logical_sector,
                    parent: o.parent.as_deref().zip(parent.as_deref()),
                },
            )
        }
    }
}

/// Open one file, detecting its format from its bytes.
pub fn open_layer(path: &Path, opts: &LayerOptions) -> Result<Arc<dyn Layer>> {
    let file = open_file(path, opts.writable)?;
    if vhdx::probe(&file, path)? {
        return Ok(Arc::new(vhdx::VhdxLayer::open(file, path, opts)?));
    }
    if vhd::probe(&file, path)? {
        return Ok(Arc::new(vhd::VhdLayer::open(file, path, opts)?));
    }
    Err(not_vhd_error(&file, path))
}

/// The error for a file neither probe accepted: what it looks like instead
/// (see [`probe`]), or the missing cookies when nothing is recognised.
fn not_vhd_error(file: &File, path: &Path) -> Error {
    use std::os::unix::fs::FileExt;
    let len = match file.metadata() {
        Ok(m) => m.len(),
        Err(e) => return Error::io(path, "cannot stat", None, e),
    };
    let mut head = vec![0u8; probe::HEAD_LEN.min(usize::try_from(len).unwrap_or(usize::MAX))];
    if let Err(e) = file.read_exact_at(&mut head, 0) {
        return Error::io(path, "cannot read", Some(0), e);
    }
    match probe::identify(&head, len) {
        Some(f) => Error::unsupported(path, format!("{f}; {}", f.advice())),
        None => Error::unsupported(
            path,
            "not a disk image chainfs can read (no VHD footer `conectix` at offset 0 or at \
             the end, no VHDX signature `vhdxfile` at offset 0, and no other known format)",
        ),
    }
}

/// Open a layer file and take its advisory lock: exclusive when writable,
/// shared otherwise, so that a writer (a writable mount, a merge, `chainfs
/// write`) never shares a file with anyone, while readers share freely.
pub(crate) fn open_file(path: &Path, writable: bool) -> Result<File> {
    // Refuse FIFOs, devices and folders before open(2), which could block.
    let md = std::fs::metadata(path).ctx(path, "cannot open", None)?;
    if !md.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("{}: not a regular file", path.display()),
        ));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .ctx(path, "cannot open", None)?;
    lock_file(
        &f,
        path,
        if writable {
            LockMode::Exclusive
        } else {
            LockMode::Shared
        },
    )?;
    let md = f.metadata().ctx(path, "cannot stat", None)?;
    if !md.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("{}: not a regular file", path.display()),
        ));
    }
    Ok(f)
}

/// Test support for the drivers' cache-fill race tests: run `write` on
/// another thread while this one plays a reader in the middle of a cache
/// fill, holding the fill lock's read side; once the writer is done or
/// blocked, `put_old` caches the bitmap that reader read from the file.
#[cfg(test)]
pub(crate) fn race_reader_mid_fill(
    fill: &parking_lot::RwLock<()>,
    write: impl FnOnce() + Send,
    put_old: impl FnOnce(),
) {
    let guard = fill.read();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let w = s.spawn(move || {
            write();
            let _ = done_tx.send(());
        });
        // The writer either waits for the fill to end, or (the old race)
        // has queued its bitmap already.
        let _ = done_rx.recv_timeout(std::time::Duration::from_millis(300));
        put_old();
        drop(guard);
        w.join().unwrap();
    });
}
