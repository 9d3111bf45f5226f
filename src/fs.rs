//! The mounted directory, without FUSE: inodes, attributes, and what a read
//! or write of each file does. `crate::fuse` adapts this to `fuser`; all
//! behaviour lives here so it can be tested without a mount.
//!
//! ```text
//! MOUNTPOINT/          ino 1
//!   disk.raw           ino 2  the flattened image (read-only unless -o rw)
//!   control            ino 3  command file (see crate::control)
//!   chain              ino 4  one layer per line, leaf first
//!   jobs/              ino 5  one read-only file per merge job
//!     N                ino 1000+N
//!   layers/            ino 6  one read-only view per layer
//!     K-NAME.raw       ino VIEW_BASE+id  the chain as it looked at layer K
//! ```
//!
//! Layer views: `layers/K-NAME.raw` (K the depth, 0 = leaf) reads
//! `layers[K..]`, the sub-chain with layer K as its leaf, i.e. what
//! `chainfs export` of layer K's file shows. The names follow the current
//! layer list (a merge renumbers them); the inode follows the layer *file*:
//! each path gets an id the first time it is seen, so an inode never
//! silently changes to another layer's bytes after a merge. Views are
//! always read-only. The leaf's view changes with `-o rw` writes, so it is
//! opened `direct_io` then; a parent's view changes only by a merge into it,
//! and a merge that would change or retire a view is refused (32774, in
//! use) while that view is open, and opening such a view while the merge
//! runs is refused (EBUSY).
//!
//! Owner, group and modes come from the layer files (`crate::perms`):
//! computed at mount and again whenever a merge changed the layer list.
//!
//! Caching: `disk.raw` keeps a fixed mtime (the mount time) and is opened
//! with `keep_cache`, so the kernel page cache stays valid across opens; its
//! bytes change only through this mount's own writes (which go through the
//! page cache) and merges (which never change the flattened bytes). `chain`
//! and job files change, so they are opened `direct_io` with zero TTL.
//!
//! Read-ahead: each open handle of `disk.raw` or a layer view keeps its
//! read pattern (`crate::readahead::Stream`). A sequential reader of
//! `disk.raw` has its next MiBs staged in the mount's memory by worker
//! threads (`FlatImage::stage_ahead`, `crate::staging`) and its requests
//! served from there; a layer view's reader (or `disk.raw`'s, when the
//! staging pool could not be had) has them resolved and its layer files
//! asked to start reading (`crate::image::will_need`) by one
//! `crate::readahead::Fetcher` per mount. Either way no request waits for
//! the resolving.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;

use crate::control::{Command, Reply, HELP};
use crate::error::{Error, ErrorKind, Result, RC_JOB_STARTED};
use crate::image::{FlatImage, Layers};
use crate::jobs::Jobs;
use crate::merge::{Caller, MergeRequest, Progress};
use crate::perms::{Overrides, ViewPerms};
use crate::readahead::{Fetcher, Stream, Streams, Window};

pub const ROOT: u64 = 1;
pub const DISK: u64 = 2;
pub const CONTROL: u64 = 3;
pub const CHAIN: u64 = 4;
pub const JOBS: u64 = 5;
/// `jobs/N` has inode `JOB_BASE + N`.
pub const JOB_BASE: u64 = 1000;
pub const LAYERS: u64 = 6;
/// `layers/K-NAME.raw` has inode `VIEW_BASE + id`, id per layer file.
/// Above every job inode a mount can reach.
pub const VIEW_BASE: u64 = 1 << 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
}

/// What `stat` shows.
#[derive(Debug, Clone, Copy)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub perm: u16,
    pub nlink: u32,
    pub mtime: SystemTime,
    pub uid: u32,
    pub gid: u32,
}

/// How a file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub fh: u64,
    /// Keep the kernel page cache (disk.raw).
    pub keep_cache: bool,
    /// Bypass the page cache (generated text files).
    pub direct_io: bool,
}

pub struct MountConfig {
    pub writable: bool,
    /// Store data read from parents in the leaf (`-o copy_on_read`).
    pub copy_on_read: bool,
    /// `-o uid=,gid=,umask=`.
    pub perms: Overrides,
    /// `--parent-dir` folders and `--parent CHILD=PATH` overrides the
    /// chain was opened with: merges through `control` find the children
    /// of the layers they change with them, as `chainfs merge` does.
    pub parent_dirs: Vec<PathBuf>,
    pub overrides: Vec<(PathBuf, PathBuf)>,
}

struct Handle {
    ino: u64,
    /// Text snapshot taken at open (chain, jobs), or the last control reply.
    text: Vec<u8>,
    /// Control replies are read from this cursor, not from the file offset:
    /// after `echo cmd >&3` the offset sits past the command, yet `cat <&3`
    /// must show the whole reply (then end of file).
    cursor: usize,
    /// The read pattern of disk.raw and layer views (`crate::readahead`).
    stream: Stream,
}

pub struct ChainFs {
    image: Arc<FlatImage>,
    cfg: MountConfig,
    mounted_at: SystemTime,
    chain_text: Mutex<String>,
    refresh_chain: Box<dyn Fn() -> Result<String> + Send + Sync>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    jobs: Arc<Jobs>,
    /// The view's permissions and the layer list they were computed for.
    perms: Mutex<(Layers, ViewPerms)>,
    /// Layer files seen so far; the index is the view's id.
    view_ids: Mutex<Vec<PathBuf>>,
    /// Layer files whose views the running merge changes or retires.
    merging: Arc<Mutex<Vec<PathBuf>>>,
    /// The read-ahead worker (`None`: it could not be started).
    ahead: Option<Fetcher>,
    /// The handles' streams, which share how far ahead it fetches.
    streams: Streams,
}

/// The name of the view of `layer` at `depth`.
pub fn view_name(depth: usize, layer: &Path) -> String {
    let name = layer
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{depth}-{name}.raw")
}

fn errno(e: i32, msg: &str) -> Error {
    let kind = match e {
        libc::ENOENT => ErrorKind::NotFound,
        libc::EACCES => ErrorKind::AccessDenied,
        libc::EPERM => ErrorKind::InvalidState,
        libc::EROFS => ErrorKind::ReadOnly,
        libc::EOPNOTSUPP => ErrorKind::Unsupported,
        libc::EINVAL => ErrorKind::InvalidArgument,
        // No kind of its own (ENOTDIR, EISDIR, EBADF): an OS error that
        // `Error::to_errno` passes through as it is.
        _ => return Error::os(e, msg),
    };
    Error::new(kind, msg)
}

fn view_perms(layers: &Layers, cfg: &MountConfig) -> ViewPerms {
    let paths: Vec<&std::path::Path> = layers.iter().map(|l| l.path()).collect();
    crate::perms::of_layers(&paths, cfg.writable, &cfg.perms)
}

impl ChainFs {
    /// `refresh_chain` renders the `chain` file (called on each open of it).
    pub fn new(
        image: Arc<FlatImage>,
        cfg: MountConfig,
        refresh_chain: Box<dyn Fn() -> Result<String> + Send + Sync>,
    ) -> Result<ChainFs> {
        let text = refresh_chain()?;
        let layers = image.layers();
        let perms = view_perms(&layers, &cfg);
        Ok(ChainFs {
            image,
            cfg,
            mounted_at: SystemTime::now(),
            chain_text: Mutex::new(text),
            refresh_chain,
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            jobs: Arc::new(Jobs::default()),
            perms: Mutex::new((layers, perms)),
            view_ids: Mutex::new(Vec::new()),
            merging: Arc::new(Mutex::new(Vec::new())),
            ahead: Fetcher::start(),
            streams: Streams::default(),
        })
    }

    pub fn image(&self) -> &Arc<FlatImage> {
        &self.image
    }

    /// The view's permissions, computed again after a merge changed the
    /// layers (`fuse::PermsWatch` tells the kernel, which caches the
    /// attributes of `/` and `disk.raw` for an hour).
    pub fn perms(&self) -> ViewPerms {
        let layers = self.image.layers();
        let mut p = self.perms.lock();
        if !Arc::ptr_eq(&p.0, &layers) {
            let v = view_perms(&layers, &self.cfg);
            *p = (layers, v);
        }
        p.1
    }

    /// The inode of the view of `path` (assigning an id on first sight).
    fn view_ino(&self, path: &Path) -> u64 {
        let mut ids = self.view_ids.lock();
        let id = match ids.iter().position(|p| p == path) {
            Some(i) => i,
            None => {
                ids.push(path.to_path_buf());
                ids.len() - 1
            }
        };
        VIEW_BASE + id as u64
    }

    /// The current depth and layers of the view `ino`; ENOENT when its
    /// layer left the chain (a merge retired it).
    fn view(&self, ino: u64) -> Result<(usize, Layers)> {
        let path = self
            .view_ids
            .lock()
            .get((ino - VIEW_BASE) as usize)
            .cloned()
            .ok_or_else(|| errno(libc::ENOENT, "no such layer view"))?;
        let layers = self.image.layers();
        let depth = layers
            .iter()
            .position(|l| l.path() == path)
            .ok_or_else(|| errno(libc::ENOENT, "this layer left the chain"))?;
        Ok((depth, layers))
    }

    fn view_attr(&self, p: &ViewPerms, ino: u64) -> Result<Attr> {
        let (depth, layers) = self.view(ino)?;
        let paths: Vec<&Path> = layers[depth..].iter().map(|l| l.path()).collect();
        // Read-only always; narrowed to what layers K..N grant.
        let vp = crate::perms::of_layers(&paths, false, &self.cfg.perms);
        let mut a = self.attr(p, ino, Kind::File, layers[depth].virtual_size(), vp.disk);
        a.uid = vp.uid;
        a.gid = vp.gid;
        Ok(a)
    }

    /// Entries of `layers/`, leaf first.
    fn views(&self) -> Vec<(u64, Kind, String)> {
        self.image
            .layers()
            .iter()
            .enumerate()
            .map(|(k, l)| (self.view_ino(l.path()), Kind::File, view_name(k, l.path())))
            .collect()
    }

    fn attr(&self, p: &ViewPerms, ino: u64, kind: Kind, size: u64, perm: u16) -> Attr {
        Attr {
            ino,
            kind,
            size,
            perm,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            mtime: self.mounted_at,
            uid: p.uid,
            gid: p.gid,
        }
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let p = self.perms();
        Ok(match ino {
            ROOT => self.attr(&p, ROOT, Kind::Dir, 0, p.dir),
            DISK => self.attr(&p, DISK, Kind::File, self.image.size(), p.disk),
            CONTROL => self.attr(&p, CONTROL, Kind::File, 0, p.control),
            CHAIN => self.attr(
                &p,
                CHAIN,
                Kind::File,
                self.chain_text.lock().len() as u64,
                p.text,
            ),
            JOBS => self.attr(&p, JOBS, Kind::Dir, 0, p.dir),
            LAYERS => self.attr(&p, LAYERS, Kind::Dir, 0, p.dir),
            n if n >= VIEW_BASE => return self.view_attr(&p, n),
            n if n > JOB_BASE => match self.jobs.get(n - JOB_BASE) {
                Some(j) => self.attr(&p, n, Kind::File, j.render().len() as u64, p.text),
                None => return Err(errno(libc::ENOENT, "no such job")),
            },
            _ => return Err(errno(libc::ENOENT, "no such inode")),
        })
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Result<Attr> {
        let ino = match (parent, name) {
            (ROOT, "disk.raw") => DISK,
            (ROOT, "control") => CONTROL,
            (ROOT, "chain") => CHAIN,
            (ROOT, "jobs") => JOBS,
            (ROOT, "layers") => LAYERS,
            (LAYERS, n) => match self.views().into_iter().find(|v| v.2 == n) {
                Some(v) => v.0,
                None => return Err(errno(libc::ENOENT, "no such layer view")),
            },
            (JOBS, n) => match n.parse::<u64>() {
                Ok(id) if self.jobs.get(id).is_some() => JOB_BASE + id,
                _ => return Err(errno(libc::ENOENT, "no such job")),
            },
            _ => return Err(errno(libc::ENOENT, "no such file")),
        };
        self.getattr(ino)
    }

    /// Entries of a directory: (ino, kind, name), without `.` and `..`.
    pub fn readdir(&self, ino: u64) -> Result<Vec<(u64, Kind, String)>> {
        match ino {
            ROOT => Ok(vec![
                (DISK, Kind::File, "disk.raw".into()),
                (CONTROL, Kind::File, "control".into()),
                (CHAIN, Kind::File, "chain".into()),
                (JOBS, Kind::Dir, "jobs".into()),
                (LAYERS, Kind::Dir, "layers".into()),
            ]),
            LAYERS => Ok(self.views()),
            JOBS => Ok(self
                .jobs
                .ids()
                .into_iter()
                .map(|id| (JOB_BASE + id, Kind::File, id.to_string()))
                .collect()),
            _ => Err(errno(libc::ENOTDIR, "not a directory")),
        }
    }

    /// `write` says whether the open asks for write access.
    pub fn open(&self, ino: u64, write: bool) -> Result<Opened> {
        let (text, keep_cache, direct_io) = match ino {
            DISK => {
                if write && !self.cfg.writable {
                    return Err(errno(
                        libc::EROFS,
                        "disk.raw is read-only (mount with -o rw)",
                    ));
                }
                (Vec::new(), true, false)
            }
            CONTROL => (Vec::new(), false, true),
            CHAIN => {
                if write {
                    return Err(errno(libc::EACCES, "chain is read-only"));
                }
                let t = (self.refresh_chain)()?;
                *self.chain_text.lock() = t.clone();
                (t.into_bytes(), false, true)
            }
            ROOT | JOBS | LAYERS => return Err(errno(libc::EISDIR, "is a directory")),
            n if n >= VIEW_BASE => {
                if write {
                    return Err(errno(libc::EROFS, "layer views are read-only"));
                }
                let (depth, _) = self.view(n)?;
                // Only the leaf's view changes under us (-o rw writes).
                (Vec::new(), false, depth == 0 && self.cfg.writable)
            }
            n if n > JOB_BASE => {
                if write {
                    return Err(errno(libc::EACCES, "job files are read-only"));
                }
                match self.jobs.get(n - JOB_BASE) {
                    Some(j) => (j.render().into_bytes(), false, true),
                    None => return Err(errno(libc::ENOENT, "no such job")),
                }
            }
            _ => return Err(errno(libc::ENOENT, "no such file")),
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let mut handles = self.handles.lock();
        if ino >= VIEW_BASE {
            // Checked under the handle lock, which a starting merge holds
            // while it looks for open views: no open slips in between.
            let (depth, layers) = self.view(ino)?;
            if self
                .merging
                .lock()
                .iter()
                .any(|p| p == layers[depth].path())
            {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "a merge is changing {}",
                        view_name(depth, layers[depth].path())
                    ),
                ));
            }
        }
        handles.insert(
            fh,
            Handle {
                ino,
                text,
                cursor: 0,
                stream: match self.image.staging_capacity() {
                    c if ino == DISK && c > 0 => {
                        Stream::with_window(&self.streams, Window::staged(c))
                    }
                    _ => Stream::new(&self.streams),
                },
            },
        );
        Ok(Opened {
            fh,
            keep_cache,
            direct_io,
        })
    }

    pub fn release(&self, fh: u64) {
        self.handles.lock().remove(&fh);
    }

    /// What to read ahead of `fh` after its read of `n` bytes at `offset`
    /// in a file of `size` bytes (`crate::readahead`), if anything.
    fn ahead_of(&self, fh: u64, offset: u64, n: u64, size: u64) -> Option<(u64, u64)> {
        self.handles
            .lock()
            .get_mut(&fh)
            .and_then(|h| h.stream.on_read(offset, n, size))
    }

    /// Fetch ahead of a sequential reader of `fh` into the page cache: the
    /// chain as seen from `layers[from..]`, `size` bytes long.
    fn read_ahead(&self, fh: u64, layers: &Layers, from: usize, offset: u64, n: u64, size: u64) {
        if let (Some((at, len)), Some(f)) = (self.ahead_of(fh, offset, n, size), &self.ahead) {
            f.fetch(layers.clone(), from, at, len);
        }
    }

    /// Stage ahead of a sequential reader of `disk.raw` (`fh`); where the
    /// pool has no room, the stream asks again on its next read.
    fn stage_ahead(&self, fh: u64, offset: u64, n: u64) {
        if let Some((at, len)) = self.ahead_of(fh, offset, n, self.image.size()) {
            let end = self.image.stage_ahead(at, len);
            if end < at + len {
                if let Some(h) = self.handles.lock().get_mut(&fh) {
                    h.stream.fetched_to(end);
                }
            }
        }
    }

    /// Read: full length except at end of file.
    pub fn read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        if ino == DISK {
            let n = (size as u64).min(self.image.size().saturating_sub(offset)) as usize;
            if self.image.staging_capacity() > 0 {
                self.stage_ahead(fh, offset, n as u64);
            } else {
                self.read_ahead(
                    fh,
                    &self.image.layers(),
                    0,
                    offset,
                    n as u64,
                    self.image.size(),
                );
            }
            let mut buf = vec![0u8; n];
            let got = self.image.read_at(offset, &mut buf)?;
            buf.truncate(got);
            if self.cfg.copy_on_read && got > 0 {
                if let Err(e) = self.image.copy_up(offset, got as u64) {
                    log::warn!("copy-on-read at {offset}: {e}");
                }
            }
            return Ok(buf);
        }
        if ino >= VIEW_BASE {
            let (depth, layers) = self.view(ino)?;
            let end = layers[depth].virtual_size();
            let n = (size as u64).min(end.saturating_sub(offset)) as usize;
            self.read_ahead(fh, &layers, depth, offset, n as u64, end);
            let mut buf = vec![0u8; n];
            crate::image::read_layers(&layers, depth, offset, &mut buf)?;
            return Ok(buf);
        }
        let mut handles = self.handles.lock();
        let h = match handles.get_mut(&fh) {
            Some(h) if h.ino == ino => h,
            _ => return Err(errno(libc::EBADF, "stale file handle")),
        };
        let text = &h.text;
        if ino == CONTROL {
            let start = h.cursor.min(text.len());
            let end = (start + size as usize).min(text.len());
            h.cursor = end;
            return Ok(text[start..end].to_vec());
        }
        let start = (offset as usize).min(text.len());
        let end = (start + size as usize).min(text.len());
        Ok(text[start..end].to_vec())
    }

    /// Write; returns the bytes accepted. Control writes run the commands
    /// and fail with the command's errno when it is refused.
    pub fn write(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
        caller: Caller,
    ) -> Result<u32> {
        match ino {
            DISK => {
                if !self.cfg.writable {
                    return Err(errno(libc::EROFS, "disk.raw is read-only"));
                }
                // Like a block device: the part inside the disk is written,
                // a write starting at or past the end gets ENOSPC.
                let room = self.image.size().saturating_sub(offset);
                if room == 0 && !data.is_empty() {
                    return Err(Error::new(
                        ErrorKind::NoSpace,
                        format!("write at {offset} is past the end of disk.raw"),
                    ));
                }
                let n = (data.len() as u64).min(room) as usize;
                self.image.write_at(offset, &data[..n])?;
                Ok(n as u32)
            }
            CONTROL => {
                let text = String::from_utf8_lossy(data);
                let mut last: Result<Reply> = Ok(Reply::ok(vec![]));
                let mut refused = "";
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    last = self.run_command(line, caller);
                    if last.is_err() {
                        refused = line;
                        break;
                    }
                }
                let (reply, result) = match last {
                    Ok(r) => (r, Ok(data.len() as u32)),
                    Err(e) => (Reply::refused(&e), Err(e)),
                };
                if result.is_err() {
                    // `echo CMD > control` shows only the errno; the reply
                    // is on the handle (`exec 3<>control`) and here.
                    log::warn!(
                        "control: `{}` refused (uid {}): {}",
                        refused.trim(),
                        caller.uid,
                        reply.to_string().trim_end().replace('\n', "; ")
                    );
                }
                if let Some(h) = self.handles.lock().get_mut(&fh) {
                    h.text = reply.to_string().into_bytes();
                    h.cursor = 0;
                }
                result
            }
            _ => Err(errno(libc::EACCES, "read-only file")),
        }
    }

    fn run_command(&self, line: &str, caller: Caller) -> Result<Reply> {
        let cmd: Command = line.parse()?;
        match cmd {
            Command::Help => Ok(Reply::ok(vec![("Help".into(), HELP.replace('\n', " | "))])),
            Command::Cancel { job } => {
                let j = self
                    .jobs
                    .get(job)
                    .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no job {job}")))?;
                if j.is_finished() {
                    return Err(Error::new(
                        ErrorKind::InvalidState,
                        format!("job {job} has already ended"),
                    ));
                }
                j.progress.cancel.store(true, Ordering::Relaxed);
                Ok(Reply::ok(vec![("Job".into(), format!("jobs/{job}"))]))
            }
            Command::Merge {
                source,
                destination,
                keep,
                force,
            } => {
                if !self.cfg.writable {
                    return Err(Error::new(
                        ErrorKind::ReadOnly,
                        "the mount is read-only: merges need -o rw",
                    ));
                }
                if let Some(j) = self.jobs.running() {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!("job {} is still merging this chain", j.id),
                    ));
                }
                let req = MergeRequest {
                    source,
                    destination,
                    keep,
                    force,
                    parent_dirs: self.cfg.parent_dirs.clone(),
                };
                let plan = crate::merge::plan_with(
                    self.image.layers(),
                    &req,
                    Some(caller),
                    &self.cfg.overrides,
                )?;
                // The merge changes DESTINATION's view and retires those of
                // SOURCE and the layers between; views of the layers above
                // SOURCE show the same bytes before and after.
                let changed: Vec<PathBuf> = plan.layers[plan.s..=plan.d]
                    .iter()
                    .map(|l| l.path().to_path_buf())
                    .collect();
                {
                    let handles = self.handles.lock();
                    for h in handles.values().filter(|h| h.ino >= VIEW_BASE) {
                        if let Ok((depth, layers)) = self.view(h.ino) {
                            if changed.iter().any(|p| p == layers[depth].path()) {
                                return Err(Error::new(
                                    ErrorKind::Busy,
                                    format!(
                                        "layers/{} is open: the merge would change it; close it first",
                                        view_name(depth, layers[depth].path())
                                    ),
                                ));
                            }
                        }
                    }
                    *self.merging.lock() = changed;
                }
                let command = format!(
                    "{}",
                    Command::Merge {
                        source: plan.source().display().to_string(),
                        destination: plan.destination().display().to_string(),
                        keep,
                        force,
                    }
                );
                let progress = Arc::new(Progress::default());
                let job = self.jobs.start(command, progress.clone());
                // The daemon outlives the job: it reports Completed once the
                // chain is final and frees the merged layers' space after.
                let mut plan = plan;
                plan.free = crate::merge::FreeSpace::OnThread;
                let image = self.image.clone();
                let j = job.clone();
                let merging = self.merging.clone();
                let merging2 = self.merging.clone();
                std::thread::Builder::new()
                    .name(format!("merge-{}", job.id))
                    .spawn(move || {
                        j.set_running();
                        let r = crate::merge::execute(&image, plan, &progress);
                        if let Err(e) = &r {
                            log::error!("job {}: {e}", j.id);
                        }
                        merging.lock().clear();
                        j.finish(&r);
                    })
                    .map_err(|e| {
                        merging2.lock().clear();
                        Error::new(ErrorKind::Io, format!("cannot start job: {e}"))
                    })?;
                Ok(Reply {
                    return_value: RC_JOB_STARTED,
                    fields: vec![("Job".into(), format!("jobs/{}", job.id))],
                })
            }
        }
    }

    /// Wait for running jobs (at unmount).
    pub fn jobs(&self) -> &Arc<Jobs> {
        &self.jobs
    }

    /// Truncation (O_TRUNC) is accepted on `control` and is a no-op; the
    /// size of disk.raw is fixed.
    pub fn set_size(&self, ino: u64, size: u64) -> Result<Attr> {
        match ino {
            CONTROL => self.getattr(CONTROL),
            DISK if size == self.image.size() => self.getattr(DISK),
            DISK => Err(errno(
                libc::EPERM,
                "the size of disk.raw is the chain's virtual size",
            )),
            _ => Err(errno(libc::EACCES, "read-only file")),
        }
    }

    /// `fallocate(2)` on disk.raw: punching a hole or zeroing a range makes
    /// it read as zeros; plain preallocation inside the disk is a no-op; the
    /// size never changes.
    pub fn fallocate(&self, ino: u64, offset: u64, len: u64, mode: i32) -> Result<()> {
        if ino != DISK {
            return Err(errno(libc::EOPNOTSUPP, "only disk.raw takes fallocate"));
        }
        if !self.cfg.writable {
            return Err(errno(libc::EROFS, "disk.raw is read-only"));
        }
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 {
            return Err(errno(libc::EOPNOTSUPP, "unsupported fallocate mode"));
        }
        let end = offset.saturating_add(len);
        if end > self.image.size() && mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
            return Err(errno(libc::EOPNOTSUPP, "the size of disk.raw is fixed"));
        }
        if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
            self.image.discard(offset, len)?;
        }
        Ok(())
    }

    pub fn fsync(&self, ino: u64) -> Result<()> {
        if ino == DISK && self.cfg.writable {
            self.image.flush()?;
        }
        Ok(())
    }
}
