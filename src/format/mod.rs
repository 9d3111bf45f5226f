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
pub mod qcow2;
pub mod raw;
pub mod registry;
pub mod space;
pub mod vhd;
pub mod vhdx;

pub use registry::{create, open_layer, peek, Driver, Peek, DRIVERS};

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
    /// `len` bytes stored as they are in this layer's file at `file_offset`.
    Data { file_offset: u64, len: u64 },
    /// `len` bytes this layer holds in a form that must be decoded (e.g.
    /// compressed clusters): read them with [`Layer::read_encoded`].
    Encoded { len: u64 },
    /// `len` bytes that read as zeros, whatever lies below.
    Zero { len: u64 },
    /// `len` bytes this layer does not hold: read them from the parent.
    Parent { len: u64 },
}

impl Extent {
    pub fn len(&self) -> u64 {
        match *self {
            Extent::Data { len, .. }
            | Extent::Encoded { len }
            | Extent::Zero { len }
            | Extent::Parent { len } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One way a child names its parent, as stored in the file: where the
/// name came from (`W2ru`, `relative_path`, `backing file`, ...) and the
/// text. Which local file it means is the chain's decision
/// (`crate::paths::hint_path`), not the driver's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParentHint {
    pub source: String,
    pub stored: String,
}

/// What a differencing layer says about its parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParentLink {
    /// The identities the parent may carry, as the format records them
    /// (VHD: the parent's unique id; VHDX: `parent_linkage`, and
    /// `parent_linkage2` while a merge changes the parent). Empty: the
    /// format names its parent by file name only, and the chain verifies
    /// the link by its own rules (no cycle, depth, size).
    pub ids: Vec<uuid::Uuid>,
    /// Candidate names in the order they are tried.
    pub hints: Vec<ParentHint>,
    /// A merge consumed this layer's parent chain: it no longer opens as
    /// a chain.
    pub detached: bool,
    /// The registry name of the parent's driver, where the format records
    /// it (qcow2's backing format): the chain opens the parent with that
    /// driver instead of probing. `None`: the parent's format is probed.
    pub format: Option<String>,
}

impl ParentLink {
    /// Does a layer carrying `id` (if any) match this link's identity?
    /// A link without ids matches any layer; the chain checks the rest.
    pub fn accepts(&self, id: Option<uuid::Uuid>) -> bool {
        self.ids.is_empty() || id.is_some_and(|id| self.ids.contains(&id))
    }

    /// The link names its parent by file name only.
    pub fn by_name_only(&self) -> bool {
        self.ids.is_empty()
    }

    /// The parent's names as stored, in the order they are tried.
    pub fn stored_names(&self) -> Vec<&str> {
        self.hints.iter().map(|h| h.stored.as_str()).collect()
    }

    /// May the parent's virtual size differ from the child's? Only where
    /// the link is by name (qemu's rule for backing files: reads past the
    /// end of a shorter parent are zeros, a longer parent's tail is not
    /// seen); a link by identity is to a parent of the same size.
    pub fn allows_other_size(&self) -> bool {
        self.by_name_only()
    }
}

/// A summary of one layer, for `info`, `chain` and checks.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    /// The driver's registry name ([`Driver::name`]).
    pub format: &'static str,
    /// The format's own word for how the layer stores data (VHD and VHDX:
    /// fixed, dynamic, differencing; raw: raw).
    pub disk_type: &'static str,
    pub virtual_size: u64,
    pub block_size: Option<u64>,
    pub sector_size: u32,
    /// The identity children record for this layer, where the format has
    /// one.
    pub unique_id: Option<uuid::Uuid>,
    /// The identity changes when the data does (VHDX DataWriteGuid): a
    /// merge prepares the child above before writing into this layer
    /// ([`ParentChange::Expect`]).
    pub id_follows_data: bool,
    pub creator: String,
}

/// A change to what a differencing layer records as its parent, made
/// crash-safely in the format's own way ([`Layer::relink`]).
#[derive(Clone, Copy)]
pub enum ParentChange<'a> {
    /// The parent is about to change its data (a merge writes into it):
    /// keep accepting it before, during and after (VHDX records the
    /// parent's next identity in `parent_linkage2`; nothing to do in
    /// formats whose identity does not follow the data).
    Expect(&'a dyn Layer),
    /// Record this layer as the parent: its identity and every name the
    /// format stores for its location.
    Set(&'a dyn Layer),
    /// Record that the parent chain was merged away: the layer no longer
    /// opens as a chain.
    Detach,
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

    /// Decode the virtual bytes at `offset` (a run `map` returned as
    /// `Extent::Encoded`) into `buf`.
    fn read_encoded(&self, offset: u64, _buf: &mut [u8]) -> Result<()> {
        Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "{}: offset {offset}: no encoded data in this format",
                self.path().display()
            ),
        ))
    }

    /// Start reading the tables that `map()` (and, in a layer open for
    /// writing, `write_sectors`) will need for this range (best effort,
    /// asynchronous; for bulk work such as export and merge).
    fn prefetch(&self, _offset: u64, _len: u64) {}

    /// Start reading `len` bytes of this layer's file at `file_offset`
    /// into the page cache (best effort, asynchronous).
    fn will_need(&self, _file_offset: u64, _len: u64) {}

    /// The file `read_data` reads, where `read_data(o, buf)` is a plain
    /// positional read of it at `o` wherever the file holds the bytes: a
    /// caller may read it another way (the mount's read-ahead reads it with
    /// `O_DIRECT`, `crate::staging`) and calls `read_data` for whatever that
    /// does not return. `None`: read through `read_data` only.
    fn data_file(&self) -> Option<&std::fs::File> {
        None
    }

    /// Start writing what this layer has written back to disk (best
    /// effort, asynchronous; no durability promised: `flush` is still
    /// needed). A long copy calls it as it goes, so its final flush has
    /// little left to wait for.
    fn write_behind(&self) {}

    /// Bytes of file space holding data (allocated blocks).
    fn allocated_bytes(&self) -> Result<u64>;

    /// Is the layer open for writing?
    fn writable(&self) -> bool;

    /// Store whole sectors at `offset` (both multiples of `sector_size`).
    fn write_sectors(&self, offset: u64, data: &[u8]) -> Result<()>;

    /// The range a write of `[offset, offset + len)` must cover because
    /// this layer stores data in units larger than a sector and would
    /// otherwise need the content below (a qcow2 cluster it does not hold
    /// yet): the resolver then reads the flattened view over that range,
    /// lays the new bytes over it and writes the whole range, serialised
    /// with every other such write (`crate::image`). `None`: the range can
    /// be written as it is.
    fn write_fill(&self, _offset: u64, _len: u64) -> Result<Option<(u64, u64)>> {
        Ok(None)
    }

    /// Make whole sectors at `offset` read as zeros (discard / write
    /// zeroes), even where a parent holds data; free space where possible.
    /// The resolver passes whole [`Layer::discard_unit`]s and writes zeros
    /// for the rest.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// The granularity of `discard` (a sector, unless the format tracks
    /// zeros in larger units).
    fn discard_unit(&self) -> u64 {
        u64::from(self.sector_size())
    }

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

    /// Refuse to be a merge's DESTINATION, with the reason (an
    /// `InvalidState` error), where the format holds state a merge would
    /// leave inconsistent (qcow2 internal snapshots). Default: accepted.
    fn refuse_as_merge_destination(&self) -> Result<()> {
        Ok(())
    }

    /// Change this process's advisory lock on the file.
    fn set_lock(&self, mode: LockMode) -> Result<()>;

    /// Change what this differencing layer records as its parent (merges,
    /// `set-parent`), crash-safely; needs the layer open for writing.
    fn relink(&self, _change: ParentChange<'_>) -> Result<()> {
        Err(Error::new(
            ErrorKind::InvalidState,
            format!("{}: not a differencing disk", self.path().display()),
        ))
    }

    /// The layer as `Any`, so a driver can see its own type behind a
    /// `dyn Layer` it is given (a child looking at a parent of its format).
    fn as_any(&self) -> &dyn std::any::Any;
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
    /// The format version to write (`--compat`), one of the driver's
    /// [`Driver::create_versions`]; `None`: its newest.
    pub version: Option<String>,
    /// Blocks divided into separately allocated sub-blocks
    /// (`--extended-l2`), where the driver has them
    /// ([`Driver::create_subblocks`]).
    pub subblocks: bool,
}

/// The refusal every driver gives for a change to a layer opened
/// read-only (exit 10, EROFS).
pub(crate) fn require_writable(writable: bool, path: &Path) -> Result<()> {
    if writable {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::ReadOnly,
            format!("{}: opened read-only", path.display()),
        ))
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
