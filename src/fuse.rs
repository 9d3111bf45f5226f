//! The thin `fuser` adapter: each callback forwards to `crate::fs` and turns
//! its `Result` into a reply. No behaviour lives here; `PermsWatch` only
//! passes a change of `fs`'s modes on to the kernel (a fuser notification).

use std::ffi::OsStr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};

use crate::error::Error;
use crate::fs::{Attr, ChainFs, Kind, CHAIN, CONTROL, DISK, JOBS, LAYERS, ROOT};
use crate::perms::ViewPerms;

/// Largest request the kernel may send (it caps this at its max_pages).
const MAX_IO: u32 = 1 << 20;

/// The file system. The session's end needs nothing from it: unmounting
/// is `crate::mount`'s (only ever its own mount, `crate::mount::own`).
pub struct Fuse(pub Arc<ChainFs>);

fn ttl(ino: u64) -> Duration {
    // disk.raw and the root never change shape; the rest is live text.
    if ino == DISK || ino == ROOT {
        Duration::from_secs(3600)
    } else {
        Duration::ZERO
    }
}

/// Keeps the kernel's view of the modes current: a merge that removed
/// layers may widen them (crate::perms), but the kernel caches `/` and
/// `disk.raw` for an hour. The daemon's main thread calls `tick` in its
/// wait loop: if the mount's last reference were dropped here, the drop
/// (which flushes the leaf) runs there, before the process exits, never
/// in a thread the exit would cut short.
pub struct PermsWatch {
    fs: Weak<ChainFs>,
    notifier: fuser::Notifier,
    last: Option<ViewPerms>,
}

impl PermsWatch {
    /// Starts from the modes the mount began with (a merge may come
    /// before the first tick).
    pub fn new(fs: Weak<ChainFs>, notifier: fuser::Notifier) -> PermsWatch {
        let last = fs.upgrade().map(|f| f.perms());
        PermsWatch { fs, notifier, last }
    }

    /// Compare the modes with the last look; on a change, tell the kernel
    /// to drop the attributes it holds.
    pub fn tick(&mut self) {
        let Some(now) = self.fs.upgrade().map(|fs| fs.perms()) else {
            return;
        };
        if self.last.is_some_and(|l| l != now) {
            log::info!("layers changed: modes now {now:?}");
            for ino in [ROOT, DISK, CONTROL, CHAIN, JOBS, LAYERS] {
                // Offset -1: the attributes only, not the page cache.
                if let Err(e) = self.notifier.inval_inode(INodeNo(ino), -1, 0) {
                    log::debug!("invalidate inode {ino}: {e}");
                }
            }
        }
        self.last = Some(now);
    }
}

fn fattr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: match a.kind {
            Kind::Dir => FileType::Directory,
            Kind::File => FileType::RegularFile,
        },
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn err(e: &Error) -> Errno {
    log::debug!("request failed: {e}");
    Errno::from_i32(e.to_errno())
}

impl Filesystem for Fuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        let _ = config
            .set_max_readahead(MAX_IO)
            .or_else(|m| config.set_max_readahead(m));
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.0.lookup(parent.0, &name.to_string_lossy()) {
            Ok(a) => reply.entry(&ttl(a.ino), &fattr(&a), Generation(0)),
            Err(e) => reply.error(err(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.0.getattr(ino.0) {
            Ok(a) => reply.attr(&ttl(a.ino), &fattr(&a)),
            Err(e) => reply.error(err(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = match size {
            Some(s) => self.0.set_size(ino.0, s),
            None => self.0.getattr(ino.0),
        };
        match r {
            Ok(a) => reply.attr(&ttl(a.ino), &fattr(&a)),
            Err(e) => reply.error(err(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = (flags.0 & libc::O_ACCMODE) != libc::O_RDONLY;
        match self.0.open(ino.0, write) {
            Ok(o) => {
                let mut f = FopenFlags::empty();
                if o.keep_cache {
                    f |= FopenFlags::FOPEN_KEEP_CACHE;
                }
                if o.direct_io {
                    f |= FopenFlags::FOPEN_DIRECT_IO;
                }
                reply.opened(FileHandle(o.fh), f)
            }
            Err(e) => reply.error(err(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.0.read(ino.0, fh.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(err(&e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let caller = crate::merge::Caller {
            uid: req.uid(),
            gid: req.gid(),
        };
        match self.0.write(ino.0, fh.0, offset, data, caller) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(err(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) makes acknowledged writes durable, as fsync does.
        match self.0.fsync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.0.fallocate(ino.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(&e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.0.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.0.fsync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.0.readdir(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(err(&e)),
        };
        let mut all = vec![
            (ino.0, Kind::Dir, ".".to_string()),
            (ROOT, Kind::Dir, "..".to_string()),
        ];
        all.extend(entries);
        for (i, (child, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            let ft = match kind {
                Kind::Dir => FileType::Directory,
                Kind::File => FileType::RegularFile,
            };
            if reply.add(INodeNo(child), (i + 1) as u64, ft, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: fuser::ReplyStatfs) {
        let blocks = self.0.image().size().div_ceil(4096);
        reply.statfs(blocks, 0, 0, 5, 0, 4096, 255, 4096);
    }
}
